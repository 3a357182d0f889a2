//! `filesync`: the command line. Parses arguments, sets up logging and hands over to the
//! library; every error a user sees is one line and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use std::sync::Arc;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use filesync::capture::{self, WatchSpec};
use filesync::config::{self, MountOptions, Settings};
use filesync::identity::{self, NodeKey};
use filesync::install::{self, InstallPlan};
use filesync::mount::{self, Detached, MountPlan};
use filesync::pipeline::{self, Pipeline};
use filesync::sync::versions;

/// mount(8)'s exit status for a failed mount, which `mount -t fuse.filesync` passes on.
const MOUNT_FAILED: u8 = 32;

/// `--version`: the crate's version and the wire protocol's, which two nodes must share.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} (protocol {})",
        env!("CARGO_PKG_VERSION"),
        filesync::sync::proto::PROTOCOL_VERSION
    )
});

#[derive(Parser)]
#[command(
    name = "filesync",
    version = VERSION.as_str(),
    propagate_version = true,
    about = "A FUSE overlay filesystem that mirrors writes to other machines in real time",
    after_help = "\
Examples:
  filesync demo                                 two nodes on this machine, syncing
  filesync keygen                               this node's key and ID
  filesync mount /srv/data /mnt/data -o peer=ID@host:7878
  filesync COMMAND --help                       examples for each command
  filesync man | man -l -                       the manual page"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount SOURCE at MOUNTPOINT: everything written to MOUNTPOINT lands in SOURCE.
    #[command(after_help = "\
Examples:
  filesync mount /srv/data /mnt/data
  filesync mount /srv/data /mnt/data -o node_name=laptop,allow_other --foreground
  filesync mount /srv/data /mnt/data -o peer=ID@10.0.0.2:7878
  filesync mount /srv/replica /mnt/data -o listen=0.0.0.0:7878,peer=ID,mode=receiveonly
  filesync mount /srv/data /mnt/data -o telemetry=127.0.0.1:9900   (open http://127.0.0.1:9900)")]
    Mount {
        /// The backing folder: the truth, where every change lands.
        source: PathBuf,
        /// An existing empty folder where SOURCE is shown.
        mountpoint: PathBuf,
        /// Mount options, comma-separated (node_id, node_name, sync_interval, allow_other,
        /// ro, rw, passthrough=on|off, threads=N, log=FILTER, log_file=PATH, config=PATH,
        /// plus the standard options mount(8) and fstab pass). May be repeated.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Settings file (default /etc/filesync/filesync.toml).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Stay in the foreground, logging to standard error, until unmounted or signalled.
        #[arg(short, long)]
        foreground: bool,
    },
    /// Print every change made to FOLDER as it happens, one JSON line each (path, kind,
    /// byte range, pid, source), until Ctrl-C.
    #[command(after_help = "\
Examples:
  filesync watch /srv/data
  filesync watch /srv/data -o watcher=fanotify | jq .")]
    Watch {
        folder: PathBuf,
        /// Options as for mount; these matter here: watcher=auto|ebpf|fanotify|inotify,
        /// telemetry=off|ADDRESS:PORT, log=FILTER.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Settings file (default /etc/filesync/filesync.toml).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Install the binary, the mount.fuse.filesync helper and the systemd unit, so that
    /// `mount -t fuse.filesync` and /etc/fstab lines work.
    #[command(after_help = "\
Examples:
  sudo filesync install
  filesync install --root /tmp/pkgroot          (for packaging)")]
    Install {
        /// Install below this folder instead of / (for packaging).
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Remove what `install` put in place (the settings folder is kept).
    #[command(after_help = "\
Examples:
  sudo filesync uninstall
  filesync uninstall --root /tmp/pkgroot")]
    Uninstall {
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Make this node's key pair, store it (mode 0600) and print the node ID, which
    /// peers list in their `-o peer=` options.
    #[command(after_help = "\
Examples:
  filesync keygen
  filesync keygen --key /etc/filesync/other.key --force")]
    Keygen {
        /// Where to store the key.
        #[arg(long, value_name = "PATH", default_value = identity::DEFAULT_KEY_PATH)]
        key: PathBuf,
        /// Replace an existing key; the node then gets a new ID.
        #[arg(long)]
        force: bool,
    },
    /// Print this node's ID (its public key, with a check code against typos).
    #[command(after_help = "\
Examples:
  filesync id
  filesync id --key /etc/filesync/other.key")]
    Id {
        /// The key file written by `filesync keygen`.
        #[arg(long, value_name = "PATH", default_value = identity::DEFAULT_KEY_PATH)]
        key: PathBuf,
    },
    /// Undo the changes made behind a receive-only mount's back: each locally changed path
    /// gets the sending peer's version again (or is removed if the peer lacks it).
    #[command(after_help = "\
Examples:
  filesync revert /mnt/data
  filesync revert /mnt/data --state-dir /var/lib/filesync/data")]
    Revert {
        /// The mount point of the receive-only mount.
        mountpoint: PathBuf,
        /// The mount's state folder, if it was mounted with `state_dir=`.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// List the kept versions of a file that peers' changes replaced or removed.
    ///
    /// Oldest first, each with when it was replaced and where it is kept.
    #[command(after_help = "\
Examples:
  filesync versions /mnt/data/report.txt
  filesync versions /mnt/data/report.txt --state-dir /var/lib/filesync/data")]
    Versions {
        /// The file, as a path in a filesync mount (it need not exist any more).
        path: PathBuf,
        /// The mount's state folder, if it was mounted with `state_dir=`.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Put a kept version of a file back (through the mount, so peers get it too).
    #[command(after_help = "\
Examples:
  filesync restore /mnt/data/report.txt
  filesync restore /mnt/data/report.txt --at 20261122-090000
  filesync restore /mnt/data/report.txt --at 2026-11-22T10:00:00+01:00")]
    Restore {
        /// The file, as a path in a filesync mount.
        path: PathBuf,
        /// The version that was current at this time (`YYYYMMDD-HHMMSS` in UTC, or RFC
        /// 3339); the newest version by default.
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
        /// The mount's state folder, if it was mounted with `state_dir=`.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// List the conflict copies below a folder (a mount point, by default the current one).
    ///
    /// Each copy is a version that lost a conflict, kept beside the file it conflicted
    /// with; settle one with `filesync resolve`.
    #[command(after_help = "\
Examples:
  filesync conflicts /mnt/data
  filesync conflicts /mnt/data/reports --json")]
    Conflicts {
        /// Where to look (every folder below it too).
        #[arg(default_value = ".")]
        folder: PathBuf,
        /// One JSON object per line: original, copy, written, writer.
        #[arg(long)]
        json: bool,
    },
    /// Settle the conflict of a file: keep one version, remove its conflict copies.
    ///
    /// Done through the mount, so every peer ends with the same single file.
    #[command(after_help = "\
Examples:
  filesync resolve /mnt/data/notes.txt --keep mine
  filesync resolve /mnt/data/notes.txt --keep theirs
  filesync resolve /mnt/data/notes.txt --keep /tmp/notes-merged.txt")]
    Resolve {
        /// The file that has conflict copies beside it, as a path in a filesync mount.
        path: PathBuf,
        /// `mine` (this node's version), `theirs` (the other one), or a file whose
        /// content to keep (e.g. merged by hand).
        #[arg(long, value_name = "mine|theirs|FILE")]
        keep: String,
        /// The mount's state folder, if it was mounted with `state_dir=`.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Show the running mounts, their peers and how replication is going
    ///
    /// Per mount: backing folder, watcher, mode, pending changes, replication lag, last
    /// error, and every peer with its address, connection, round-trip time and bytes in
    /// and out. Without MOUNTPOINT, every filesync mount in /proc/mounts.
    ///
    /// Examples:
    ///   filesync status
    ///   filesync status /mnt/data --json
    ///   filesync status --watch
    ///   filesync status --state-dir /var/lib/filesync/data --json | jq '.mounts[0].peers'
    #[command(verbatim_doc_comment)]
    Status {
        /// The mount point to ask about (default: every filesync mount).
        mountpoint: Option<PathBuf>,
        /// The mount's state folder, if it was mounted with `state_dir=`.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Print JSON ({"mounts": [...], "errors": [...]}) for scripts; with --watch, one
        /// document per line.
        #[arg(long)]
        json: bool,
        /// Refresh every second until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// Run a STUN server that tells nodes their public address (for `-o stun=`)
    ///
    /// RFC 8489 Binding, over UDP and TCP, for mounts' `-o stun=HOST:PORT`. Runs in the
    /// foreground until Ctrl-C or SIGTERM.
    ///
    /// Each answer is at most 64 bytes larger than its request, and each source address
    /// gets at most --rate answers per second (after a burst of --burst), so the server
    /// cannot be used to amplify traffic.
    ///
    /// Examples:
    ///   filesync stun-server                          # 127.0.0.1:3478 only
    ///   filesync stun-server --listen 0.0.0.0:3478    # every interface
    ///   filesync stun-server --listen 198.18.0.1:3478 --listen 198.18.0.3:3478
    #[command(verbatim_doc_comment)]
    StunServer {
        /// Where to answer; repeat for several addresses (two addresses let a client tell
        /// its NAT type from one server).
        #[arg(long, value_name = "ADDRESS:PORT", default_value = "127.0.0.1:3478")]
        listen: Vec<std::net::SocketAddr>,
        /// Answers per second per source address (per /64 for IPv6).
        #[arg(long, value_name = "N", default_value_t = filesync::stun::RateLimit::default().per_second)]
        rate: u32,
        /// Answers a quiet source may get at once.
        #[arg(long, value_name = "N", default_value_t = filesync::stun::RateLimit::default().burst)]
        burst: u32,
        /// A tracing filter for the log on standard error.
        #[arg(long, value_name = "FILTER", default_value = "info")]
        log: String,
    },
    /// Run a rendezvous that lets nodes behind NATs reach each other (for `-o rendezvous=`)
    ///
    /// Run it where every node can reach it. Nodes keep a connection to it (Noise, like
    /// any filesync connection; only the nodes given with --peer get in). When one node
    /// asks for another, both are told each other's addresses and connect to each other
    /// directly through their NATs (a TCP hole punch). When that is impossible (a NAT
    /// that maps each destination to another port) and --relay is given, the rendezvous
    /// forwards their bytes, which stay encrypted end to end: it cannot read them. Runs in
    /// the foreground until Ctrl-C or SIGTERM; its ID (for `rendezvous=ID@HOST:PORT`) is
    /// `filesync id --key` of its key.
    ///
    /// Examples:
    ///   filesync rendezvous --listen 0.0.0.0:7879 --peer ID1 --peer ID2
    ///   filesync rendezvous --listen 0.0.0.0:7879 --peer ID1 --peer ID2 --relay --relay-rate 10000000
    #[command(verbatim_doc_comment)]
    Rendezvous {
        /// Where nodes connect.
        #[arg(long, value_name = "ADDRESS:PORT", default_value = "127.0.0.1:7879")]
        listen: std::net::SocketAddr,
        /// The rendezvous's own key (made with `filesync keygen --key PATH`).
        #[arg(long, value_name = "PATH", default_value = identity::DEFAULT_KEY_PATH)]
        key: PathBuf,
        /// A node it serves, by ID; repeat for each node.
        #[arg(long = "peer", value_name = "ID", required = true)]
        peers: Vec<String>,
        /// Also relay between nodes that cannot reach each other directly.
        #[arg(long)]
        relay: bool,
        /// With --relay: at most this many bytes per second over all relays.
        #[arg(long, value_name = "BYTES", requires = "relay")]
        relay_rate: Option<u64>,
        /// A tracing filter for the log on standard error.
        #[arg(long, value_name = "FILTER", default_value = "info")]
        log: String,
    },
    /// Show two nodes on this machine syncing, with no configuration.
    ///
    /// Two nodes in temporary folders, both mounted and connected over loopback with fresh
    /// keys: files written on one arrive on the other, with the time each took. Everything
    /// is unmounted and removed at the end or on Ctrl-C.
    #[command(after_help = "\
Examples:
  sudo filesync demo
  cargo run --release -- demo")]
    Demo,
    /// Compare a backing folder with its mount's index once and report what differs.
    ///
    /// The same scan the mount runs at start-up: what it reports is what filesync would
    /// pick up at its next start. Shows a progress bar on a terminal, plain lines
    /// otherwise. The mount must not be running (it holds the index).
    #[command(after_help = "\
Examples:
  filesync scan /srv/data --mountpoint /mnt/data
  filesync scan /srv/data --state-dir /var/lib/filesync/data --list | jq .path")]
    Scan {
        /// The backing folder.
        source: PathBuf,
        /// The mount point SOURCE is mounted at: finds the default state folder.
        #[arg(long, value_name = "DIR", conflicts_with = "state_dir")]
        mountpoint: Option<PathBuf>,
        /// The mount's state folder, if it was mounted with `state_dir=`.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Also print each difference as a JSON line on standard output.
        #[arg(long)]
        list: bool,
    },
    /// Print a shell completion script.
    #[command(after_help = "\
Examples:
  filesync completions bash > /etc/bash_completion.d/filesync
  filesync completions zsh > \"${fpath[1]}/_filesync\"
  filesync completions fish > ~/.config/fish/completions/filesync.fish")]
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page, or write one page per command into DIR.
    #[command(after_help = "\
Examples:
  filesync man | man -l -
  sudo filesync man /usr/local/share/man/man1")]
    Man {
        /// Write filesync.1 and filesync-COMMAND.1 here instead of printing filesync.1.
        dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mounting = matches!(cli.command, Command::Mount { .. });
    let result = match cli.command {
        Command::Mount {
            source,
            mountpoint,
            options,
            config,
            foreground,
        } => run_mount(
            &source,
            &mountpoint,
            &options,
            config.as_deref(),
            foreground,
        ),
        Command::Watch {
            folder,
            options,
            config,
        } => run_watch(&folder, &options, config.as_deref()),
        Command::Install { root } => run_install(root, false),
        Command::Uninstall { root } => run_install(root, true),
        Command::Keygen { key, force } => run_keygen(&key, force),
        Command::Id { key } => run_id(&key),
        Command::Revert {
            mountpoint,
            state_dir,
        } => run_revert(&mountpoint, state_dir),
        Command::Versions { path, state_dir } => run_versions(&path, state_dir),
        Command::Restore {
            path,
            at,
            state_dir,
        } => run_restore(&path, at.as_deref(), state_dir),
        Command::Conflicts { folder, json } => run_conflicts(&folder, json),
        Command::Resolve {
            path,
            keep,
            state_dir,
        } => run_resolve(&path, &keep, state_dir),
        Command::Status {
            mountpoint,
            state_dir,
            json,
            watch,
        } => run_status(mountpoint.as_deref(), state_dir.as_deref(), json, watch),
        Command::Demo => run_demo(),
        Command::StunServer {
            listen,
            rate,
            burst,
            log,
        } => run_stun_server(listen, rate, burst, &log),
        Command::Rendezvous {
            listen,
            key,
            peers,
            relay,
            relay_rate,
            log,
        } => run_rendezvous(listen, &key, &peers, relay.then_some(relay_rate), &log),
        Command::Scan {
            source,
            mountpoint,
            state_dir,
            list,
        } => run_scan(&source, mountpoint.as_deref(), state_dir, list),
        Command::Completions { shell } => run_completions(shell),
        Command::Man { dir } => run_man(dir.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("filesync: {err:#}");
            if mounting {
                ExitCode::from(MOUNT_FAILED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Settings from `-o` options, the settings file and the environment, and the log filter:
/// an explicit `-o log=` wins over RUST_LOG, which wins over the file and the default.
fn settings(options: &[String], config_file: Option<&Path>) -> anyhow::Result<(Settings, String)> {
    let mut merged = MountOptions::default();
    for option in options {
        merged = merged.merge(MountOptions::parse(option)?);
    }
    let settings = config::resolve(&merged, config_file, &|name| std::env::var(name).ok())?;
    let log_filter = match (&merged.log, std::env::var("RUST_LOG")) {
        (None, Ok(filter)) if !filter.is_empty() => filter,
        _ => settings.log.clone(),
    };
    Ok((settings, log_filter))
}

fn run_mount(
    source: &Path,
    mountpoint: &Path,
    options: &[String],
    config_file: Option<&Path>,
    foreground: bool,
) -> anyhow::Result<()> {
    let (settings, log_filter) = settings(options, config_file)?;
    let plan = mount::plan(source, mountpoint, settings)?;
    if foreground {
        init_logging(&log_filter, plan.settings.log_file.as_deref())?;
        return Ok(mount::serve(&plan, || {})?);
    }
    let log_file = plan
        .settings
        .log_file
        .clone()
        .unwrap_or_else(|| mount::default_log_file(&plan.mountpoint));
    match mount::detach(&log_file)? {
        Detached::Parent(report) => Ok(report?),
        Detached::Daemon(link) => {
            init_logging(&log_filter, None)?;
            serve_detached(&plan, link);
            Ok(())
        }
    }
}

fn serve_detached(plan: &MountPlan, link: mount::DaemonLink) {
    let mut link = Some(link);
    let result = mount::serve(plan, || {
        if let Some(link) = link.take() {
            link.ready();
        }
    });
    if let Err(err) = result {
        tracing::error!("{err}");
        if let Some(link) = link.take() {
            link.failed(&err);
        }
    }
}

/// Logs to standard error (the log file of a detached daemon, the journal under systemd)
/// or to `log_file` when one is set.
fn init_logging(filter: &str, log_file: Option<&Path>) -> anyhow::Result<()> {
    // fuser unmounts again when its session ends; after a plain `umount` that always fails
    // with a WARN that means nothing. It is that module's only warning, so keep its errors.
    let mut filter = filter.to_owned();
    if !filter.contains("fuser") {
        filter.push_str(",fuser::session=error");
    }
    // steady_state logs the private port of its own server, which our telemetry front
    // (src/telemetry.rs) stands in front of; the front logs the address to open.
    if !filter.contains("steady_state") {
        filter.push_str(",steady_state::telemetry::metrics_server=warn");
    }
    let filter = EnvFilter::try_new(&filter).with_context(|| {
        format!("invalid log filter '{filter}': use e.g. info or filesync=debug")
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match log_file {
        Some(path) => {
            if let Some(folder) = path.parent() {
                std::fs::create_dir_all(folder)
                    .with_context(|| format!("cannot create log folder {}", folder.display()))?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        None => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let builder = builder.with_ansi(ansi).with_writer(std::io::stderr);
            // The journal stamps every line itself.
            if stderr_is_journal() {
                builder.without_time().init();
            } else {
                builder.init();
            }
        }
    }
    Ok(())
}

/// Whether standard error is the journal: systemd then sets `JOURNAL_STREAM` to its
/// device and inode (a child that inherited the variable but not the stream is not).
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    stream.to_string_lossy() == format!("{}:{}", stat.st_dev, stat.st_ino)
}

fn run_watch(folder: &Path, options: &[String], config_file: Option<&Path>) -> anyhow::Result<()> {
    let (settings, log_filter) = settings(options, config_file)?;
    init_logging(&log_filter, settings.log_file.as_deref())?;
    let root = std::fs::canonicalize(folder).with_context(|| {
        format!(
            "cannot watch {}: check that the folder exists",
            folder.display()
        )
    })?;
    if !root.is_dir() {
        bail!("cannot watch {}: it is not a directory", root.display());
    }
    let (sink, queue) = pipeline::capture::queue();
    let spec = WatchSpec {
        root,
        ignore_pids: vec![std::process::id()],
    };
    let watcher = capture::start_watcher(&spec, Arc::new(sink), settings.watcher)?;
    let workdir = WatchWorkdir::create()?;
    let running = Pipeline::watch(queue, settings.telemetry, &workdir.0);
    // Registered after the graph exists: steady_state installs a SIGINT handler of its own
    // that replaces any installed before it, while signal-hook chains to earlier ones.
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).context("cannot handle signals")?;
    signals.forever().next();
    if let Some(watcher) = watcher {
        watcher.stop();
    }
    running.stop()?;
    Ok(())
}

/// A private folder for the graph of `filesync watch`, removed when the command ends.
struct WatchWorkdir(PathBuf);

impl WatchWorkdir {
    fn create() -> anyhow::Result<WatchWorkdir> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!("filesync-watch-{}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("cannot create the working folder {}", path.display()))?;
        Ok(WatchWorkdir(path))
    }
}

impl Drop for WatchWorkdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run_install(root: PathBuf, remove: bool) -> anyhow::Result<()> {
    let plan = InstallPlan {
        root,
        ..InstallPlan::default()
    };
    let generated = completions_and_manual_pages()?;
    if remove {
        install::uninstall(&plan, &generated)?;
    } else {
        install::install(&plan, &generated)?;
    }
    Ok(())
}

/// The shell completions and manual pages `install` puts in place, generated
/// from the same CLI definition as `filesync completions` and `filesync man`.
fn completions_and_manual_pages() -> anyhow::Result<Vec<install::GeneratedFile>> {
    use clap_complete::Shell;
    let mut files = Vec::new();
    for (shell, dir, name) in [
        (Shell::Bash, install::BASH_COMPLETION_DIR, "filesync"),
        (Shell::Zsh, install::ZSH_COMPLETION_DIR, "_filesync"),
        (Shell::Fish, install::FISH_COMPLETION_DIR, "filesync.fish"),
    ] {
        let mut contents = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "filesync", &mut contents);
        files.push(install::GeneratedFile {
            dir: PathBuf::from(dir),
            name: name.to_owned(),
            contents,
        });
    }
    let mut pages = Vec::new();
    collect_manual_pages(Cli::command(), &mut pages)?;
    files.extend(pages);
    Ok(files)
}

/// One page per command, named as `clap_mangen::generate_to` names them
/// (`filesync.1`, `filesync-mount.1`, ...: building the command sets those
/// display names), so `man filesync-mount` works.
fn collect_manual_pages(
    command: clap::Command,
    pages: &mut Vec<install::GeneratedFile>,
) -> anyhow::Result<()> {
    fn collect(
        command: &clap::Command,
        pages: &mut Vec<install::GeneratedFile>,
    ) -> anyhow::Result<()> {
        let man = clap_mangen::Man::new(command.clone());
        let mut contents = Vec::new();
        man.render(&mut contents)
            .context("cannot render the manual pages")?;
        pages.push(install::GeneratedFile {
            dir: PathBuf::from(install::MAN1_DIR),
            name: man.get_filename(),
            contents,
        });
        for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
            collect(sub, pages)?;
        }
        Ok(())
    }
    let mut command = command.disable_help_subcommand(true);
    command.build();
    collect(&command, pages)
}

fn run_keygen(key_path: &Path, force: bool) -> anyhow::Result<()> {
    let key = NodeKey::create(key_path, force)?;
    println!("{}", key.id());
    Ok(())
}

fn run_revert(mountpoint: &Path, state_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let mountpoint = std::fs::canonicalize(mountpoint)
        .with_context(|| format!("cannot find the mount point {}", mountpoint.display()))?;
    let state_dir = state_dir.unwrap_or_else(|| mount::state_dir_of(&mountpoint));
    let answer = filesync::control::request(&state_dir, "revert")?;
    println!("{answer}");
    Ok(())
}

/// `path` (a file, which need not exist) with its folder made absolute.
fn absolute_file_path(path: &Path) -> anyhow::Result<PathBuf> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    let parent = std::fs::canonicalize(parent.unwrap_or(Path::new(".")))
        .with_context(|| format!("cannot find the folder of {}", path.display()))?;
    Ok(parent.join(path.file_name().context("give the path of a file")?))
}

/// The filesync mount an absolute `path` is in, and the path relative to it.
fn mount_of(path: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    mount::filesync_mount_of(path).with_context(|| {
        format!(
            "{} is not in a filesync mount: give a path inside the mount point",
            path.display()
        )
    })
}

/// The versions kept of `path` (a path in a filesync mount), with the path made absolute.
fn kept_versions(
    path: &Path,
    state_dir: Option<PathBuf>,
) -> anyhow::Result<(PathBuf, Vec<versions::Version>)> {
    let path = absolute_file_path(path)?;
    let (mountpoint, rel) = mount_of(&path)?;
    let state_dir = state_dir.unwrap_or_else(|| mount::state_dir_of(&mountpoint));
    let kept = versions::list(&state_dir, &rel)
        .with_context(|| format!("cannot read the versions in {}", state_dir.display()))?;
    Ok((path, kept))
}

fn run_versions(path: &Path, state_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let (path, kept) = kept_versions(path, state_dir)?;
    if kept.is_empty() {
        println!("no versions of {} are kept", path.display());
    }
    for version in kept {
        let size = std::fs::symlink_metadata(&version.path).map_or(0, |m| m.len());
        println!(
            "{}  {size:>12} bytes  {}",
            versions::format_time(version.replaced),
            version.path.display()
        );
    }
    Ok(())
}

fn run_restore(path: &Path, at: Option<&str>, state_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let (path, kept) = kept_versions(path, state_dir)?;
    let at = match at {
        Some(text) => Some(versions::parse_time(text).with_context(|| {
            format!("--at {text}: give a time as YYYYMMDD-HHMMSS (UTC) or RFC 3339")
        })?),
        None => None,
    };
    // What the file held at `at` is the first version replaced after it.
    let chosen = match at {
        None => kept.last(),
        Some(at) => kept.iter().find(|v| v.replaced >= at),
    };
    let chosen = chosen.with_context(|| match at {
        None => format!("no versions of {} are kept", path.display()),
        Some(_) => format!(
            "nothing of {} was replaced after that time: its content then is the current one",
            path.display()
        ),
    })?;
    versions::restore(chosen, &path)
        .with_context(|| format!("cannot restore {}", path.display()))?;
    println!(
        "restored {} from the version replaced at {}",
        path.display(),
        versions::format_time(chosen.replaced)
    );
    Ok(())
}

fn run_conflicts(folder: &Path, json: bool) -> anyhow::Result<()> {
    let found = filesync::conflicts::find(folder)?;
    if json {
        for copy in &found {
            println!("{}", serde_json::to_string(copy)?);
        }
        return Ok(());
    }
    if found.is_empty() {
        println!("no conflict copies below {}", folder.display());
    }
    for copy in &found {
        println!(
            "{}: {} (written {} UTC by node {})",
            copy.original.display(),
            copy.copy.display(),
            copy.written,
            copy.writer
        );
    }
    Ok(())
}

fn run_resolve(path: &Path, keep: &str, state_dir: Option<PathBuf>) -> anyhow::Result<()> {
    use filesync::conflicts::Keep;
    let keep = match keep {
        "mine" => Keep::Mine,
        "theirs" => Keep::Theirs,
        file => Keep::File(PathBuf::from(file)),
    };
    let path = absolute_file_path(path)?;
    // Which copy is this node's: the daemon knows this node's ID.
    let my_tag = match keep {
        Keep::File(_) => String::new(),
        _ => {
            let (mountpoint, _) = mount_of(&path)?;
            let state_dir = state_dir.unwrap_or_else(|| mount::state_dir_of(&mountpoint));
            let answer = filesync::control::request(&state_dir, "status")?;
            let status: filesync::status::MountStatus = serde_json::from_str(&answer)
                .with_context(|| format!("the daemon's answer is not a status: {answer}"))?;
            let id: filesync::identity::NodeId = status
                .node_id
                .context("the mount has no node ID (no peers): use --keep FILE")?
                .parse()?;
            filesync::sync::conflict::writer_tag(filesync::sync::book::replica_of(&id))
        }
    };
    println!("{}", filesync::conflicts::resolve(&path, &keep, &my_tag)?);
    Ok(())
}

/// Every mount point of a filesync mount, from /proc/mounts.
fn filesync_mounts() -> anyhow::Result<Vec<PathBuf>> {
    let table = std::fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    let kind = format!("fuse.{}", mount::SUBTYPE);
    Ok(table
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let mountpoint = fields.nth(1)?;
            (fields.next()? == kind).then(|| PathBuf::from(mount::unescape_mountinfo(mountpoint)))
        })
        .collect())
}

/// What `filesync status --json` prints.
#[derive(serde::Serialize)]
struct StatusReport {
    mounts: Vec<filesync::status::MountStatus>,
    errors: Vec<StatusError>,
}

#[derive(serde::Serialize)]
struct StatusError {
    mountpoint: String,
    error: String,
}

/// Asks each daemon for its status over its control socket.
fn collect_status(
    mountpoint: Option<&Path>,
    state_dir: Option<&Path>,
) -> anyhow::Result<StatusReport> {
    let targets: Vec<(String, PathBuf)> = match (mountpoint, state_dir) {
        (_, Some(state_dir)) => vec![(
            mountpoint.map_or_else(
                || state_dir.display().to_string(),
                |m| m.display().to_string(),
            ),
            state_dir.to_path_buf(),
        )],
        (Some(mountpoint), None) => {
            let canonical = std::fs::canonicalize(mountpoint)
                .with_context(|| format!("cannot find the mount point {}", mountpoint.display()))?;
            vec![(
                canonical.display().to_string(),
                mount::state_dir_of(&canonical),
            )]
        }
        (None, None) => filesync_mounts()?
            .into_iter()
            .map(|m| (m.display().to_string(), mount::state_dir_of(&m)))
            .collect(),
    };
    let mut report = StatusReport {
        mounts: Vec::new(),
        errors: Vec::new(),
    };
    for (mountpoint, state_dir) in targets {
        // One line each: the control error already names the socket and the cause.
        let answer = filesync::control::request(&state_dir, "status")
            .map_err(|err| format!("{err}; for a mount with state_dir=, give --state-dir DIR"))
            .and_then(|answer| {
                serde_json::from_str(&answer)
                    .map_err(|err| format!("the daemon's answer is not a status ({err}): {answer}"))
            });
        match answer {
            Ok(status) => report.mounts.push(status),
            Err(error) => report.errors.push(StatusError { mountpoint, error }),
        }
    }
    Ok(report)
}

fn run_status(
    mountpoint: Option<&Path>,
    state_dir: Option<&Path>,
    json: bool,
    watch: bool,
) -> anyhow::Result<()> {
    let explicit = mountpoint.is_some() || state_dir.is_some();
    let clear = watch && !json && std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let report = collect_status(mountpoint, state_dir)?;
        if clear {
            print!("\x1b[2J\x1b[H");
        }
        if json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print_status(&report);
        }
        if !watch {
            if explicit && report.mounts.is_empty() {
                bail!("no answer from the filesync daemon");
            }
            return Ok(());
        }
        // Ctrl-C ends the command (SIGINT's default action).
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn print_status(report: &StatusReport) {
    if report.mounts.is_empty() && report.errors.is_empty() {
        println!("no filesync mounts");
    }
    for mount in &report.mounts {
        println!("{} (backing folder {})", mount.mountpoint, mount.backing);
        println!(
            "  watcher {}, mode {}, {} pending changes, replication lag {} ms, {} open conflicts",
            mount.watcher,
            mount.mode,
            mount.pending_changes,
            mount.replication_lag_ms,
            mount.open_conflicts
        );
        if let Some(id) = &mount.node_id {
            println!("  node {id}");
        }
        if let Some(address) = &mount.public_address {
            println!("  public address {address}");
        }
        if let Some(error) = &mount.last_error {
            println!("  last error: {error}");
        }
        for peer in &mount.peers {
            let name = peer
                .name
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            let address = peer.address.as_deref().unwrap_or("-");
            let state = if peer.connected {
                "connected"
            } else {
                "not connected"
            };
            let rtt = peer
                .rtt_us
                .map(|us| format!(", rtt {:.2} ms", us as f64 / 1000.0))
                .unwrap_or_default();
            println!("  peer {}{name}", peer.id);
            println!(
                "    {address} {}, {state}{rtt}, in {} B, out {} B, {} pending, lag {} ms",
                peer.path,
                peer.bytes_in,
                peer.bytes_out,
                peer.pending_changes,
                peer.replication_lag_ms
            );
            if let Some(error) = &peer.last_error {
                println!("    last error: {error}");
            }
        }
    }
    for error in &report.errors {
        println!("{}: {}", error.mountpoint, error.error);
    }
}

fn run_stun_server(
    listen: Vec<std::net::SocketAddr>,
    rate: u32,
    burst: u32,
    log: &str,
) -> anyhow::Result<()> {
    use filesync::stun::{RateLimit, Server, ServerConfig};
    init_logging(log, None)?;
    let config = ServerConfig {
        listen,
        rate_limit: RateLimit {
            per_second: rate,
            burst,
            ..RateLimit::default()
        },
    };
    // Before the server announces itself, so a signal right after is never missed.
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).context("cannot handle signals")?;
    let server = Server::start(&config)?;
    signals.forever().next();
    drop(server);
    tracing::info!("STUN server stopped");
    Ok(())
}

/// `relay`: `None` relays nothing, `Some(None)` relays without a rate limit.
fn run_rendezvous(
    listen: std::net::SocketAddr,
    key: &Path,
    peers: &[String],
    relay: Option<Option<u64>>,
    log: &str,
) -> anyhow::Result<()> {
    use filesync::reach::{RelayPolicy, Rendezvous, RendezvousConfig};
    init_logging(log, None)?;
    let key = NodeKey::load(key)?;
    let mut allowed = Vec::new();
    for peer in peers {
        let id: filesync::identity::NodeId = peer.parse().with_context(|| {
            format!("--peer {peer} is not a node ID: copy it as 'filesync id' prints it")
        })?;
        allowed.push(id);
    }
    let relay = match relay {
        None => RelayPolicy::Off,
        Some(None) => RelayPolicy::Unlimited,
        Some(Some(rate)) => RelayPolicy::Capped(rate),
    };
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).context("cannot handle signals")?;
    println!("{}", key.id());
    let rendezvous = Rendezvous::start(RendezvousConfig {
        listen,
        key: std::sync::Arc::new(key),
        allowed: allowed.into_iter().collect(),
        relay,
        keepalive: filesync::net::DEFAULT_KEEPALIVE,
    })?;
    signals.forever().next();
    let stats = rendezvous.stats();
    drop(rendezvous);
    tracing::info!(
        "rendezvous stopped: {} introductions, {} relays, {} bytes relayed",
        stats.introductions,
        stats.relays,
        stats.relayed_bytes
    );
    Ok(())
}

fn run_id(key_path: &Path) -> anyhow::Result<()> {
    println!("{}", NodeKey::load(key_path)?.id());
    Ok(())
}

/// How long the demo waits for a daemon to mount, for the peers to connect, and for each
/// file to arrive.
const DEMO_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a demo daemon may take to unmount and exit after SIGTERM before it is killed.
const DEMO_STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// One node of `filesync demo`: a backing folder, its mount and the daemon serving it.
struct DemoNode {
    name: &'static str,
    folder: PathBuf,
    daemon: Option<std::process::Child>,
}

impl DemoNode {
    fn backing(&self) -> PathBuf {
        self.folder.join("backing")
    }

    fn mounted(&self) -> PathBuf {
        self.folder.join("mnt")
    }

    fn log(&self) -> PathBuf {
        self.folder.join("daemon.log")
    }

    fn key(&self) -> PathBuf {
        self.folder.join("node.key")
    }

    /// Stops the daemon (SIGTERM makes it unmount), kills it if it does not exit in time,
    /// and detaches a mount left behind by a killed daemon.
    fn stop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(&daemon),
                rustix::process::Signal::TERM,
            );
            let deadline = Instant::now() + DEMO_STOP_TIMEOUT;
            while matches!(daemon.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        // A killed daemon leaves a dead mount: detach it (`umount -l`), as root directly,
        // otherwise through fuse3's setuid helper.
        let mounted = self.mounted();
        if is_mounted(&mounted)
            && rustix::mount::unmount(&mounted, rustix::mount::UnmountFlags::DETACH).is_err()
        {
            let _ = std::process::Command::new("fusermount3")
                .args(["-u", "-z", "--"])
                .arg(&mounted)
                .status();
        }
    }
}

/// Everything `filesync demo` makes, under one private temporary folder: removed, after
/// both daemons stopped and unmounted, however the demo ends.
struct Demo {
    top: PathBuf,
    nodes: [DemoNode; 2],
    /// Set by SIGINT, SIGTERM or SIGHUP: every wait of the demo gives up.
    interrupted: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
        let _ = std::fs::remove_dir_all(&self.top);
    }
}

impl Demo {
    fn create() -> anyhow::Result<Demo> {
        use std::os::unix::fs::DirBuilderExt;
        let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for signal in [SIGINT, SIGTERM, SIGHUP] {
            signal_hook::flag::register(signal, interrupted.clone())
                .context("cannot handle signals")?;
        }
        let top = std::env::temp_dir().join(format!("filesync-demo-{}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&top)
            .with_context(|| format!("cannot create the demo folder {}", top.display()))?;
        let node = |name: &'static str| DemoNode {
            name,
            folder: top.join(name),
            daemon: None,
        };
        let demo = Demo {
            nodes: [node("a"), node("b")],
            top,
            interrupted,
        };
        for node in &demo.nodes {
            for folder in [node.backing(), node.mounted()] {
                std::fs::create_dir_all(&folder)
                    .with_context(|| format!("cannot create {}", folder.display()))?;
            }
        }
        Ok(demo)
    }

    fn check_interrupted(&self) -> anyhow::Result<()> {
        if self.interrupted.load(std::sync::atomic::Ordering::Relaxed) {
            bail!("interrupted");
        }
        Ok(())
    }

    /// Polls `done` every millisecond until it holds, for at most `timeout`.
    fn wait_for(&self, timeout: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<bool> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            self.check_interrupted()?;
            if done() {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(false)
    }

    /// Starts node `which` with `options` (besides its own key, state and log) and waits
    /// until it is mounted.
    fn start(&mut self, which: usize, options: &str) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("cannot find the filesync binary")?;
        let node = &self.nodes[which];
        let log = std::fs::File::create(node.log())
            .with_context(|| format!("cannot create {}", node.log().display()))?;
        let daemon = std::process::Command::new(exe)
            .arg("mount")
            .arg(node.backing())
            .arg(node.mounted())
            .arg("--foreground")
            .arg("-o")
            // Everything the demo makes stays under its temporary folder.
            .arg(format!(
                "node_name=demo-{},key={},state_dir={},telemetry=off,log=info,{options}",
                node.name,
                node.key().display(),
                node.folder.join("state").display()
            ))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().context("cannot share the daemon log")?)
            .stderr(log)
            .spawn()
            .context("cannot start the mount daemon")?;
        self.nodes[which].daemon = Some(daemon);
        let node = &self.nodes[which];
        let mounted = node.mounted();
        if !self.wait_for(DEMO_TIMEOUT, || is_mounted(&mounted))? {
            bail!(
                "node {} was not mounted within {} s; its log:\n{}",
                node.name,
                DEMO_TIMEOUT.as_secs(),
                std::fs::read_to_string(node.log()).unwrap_or_default()
            );
        }
        Ok(())
    }
}

fn run_demo() -> anyhow::Result<()> {
    let mut demo = Demo::create()?;
    let shown = show_demo(&mut demo);
    let interrupted = demo.interrupted.load(std::sync::atomic::Ordering::Relaxed);
    drop(demo);
    match shown {
        // Whatever failed then (a write on a mount going away, say) is the interruption.
        Err(_) if interrupted => {
            bail!("interrupted: unmounted both nodes and removed the demo folder")
        }
        Err(err) => Err(err),
        Ok(()) => {
            println!("\nunmounted both nodes and removed the demo folder");
            Ok(())
        }
    }
}

/// The demo itself; the caller cleans up.
fn show_demo(demo: &mut Demo) -> anyhow::Result<()> {
    let ids = demo
        .nodes
        .iter()
        .map(|node| Ok(NodeKey::create(&node.key(), false)?.id().to_string()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (id_a, id_b) = match ids.as_slice() {
        [a, b] => (a.clone(), b.clone()),
        _ => bail!("the demo needs two node keys"),
    };
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .context("cannot find a free loopback port")?
        .port();
    println!(
        "filesync demo: two nodes on this machine, in {}",
        demo.top.display()
    );
    println!(
        "  node a (sends):    {} mounted at {}",
        demo.nodes[0].backing().display(),
        demo.nodes[0].mounted().display()
    );
    println!(
        "  node b (receives): {} mounted at {}",
        demo.nodes[1].backing().display(),
        demo.nodes[1].mounted().display()
    );

    demo.start(
        1,
        &format!("listen=127.0.0.1:{port},peer={id_a},mode=receiveonly"),
    )?;
    println!("node b is mounted and listens on 127.0.0.1:{port}");
    demo.start(0, &format!("peer={id_b}@127.0.0.1:{port}"))?;
    println!("node a is mounted and dials node b");
    let log_b = demo.nodes[1].log();
    let connected = demo.wait_for(DEMO_TIMEOUT, || {
        std::fs::read_to_string(&log_b).is_ok_and(|log| log.contains("connected to peer"))
    })?;
    if !connected {
        bail!(
            "the nodes did not connect within {} s; node b's log:\n{}",
            DEMO_TIMEOUT.as_secs(),
            std::fs::read_to_string(&log_b).unwrap_or_default()
        );
    }
    println!("the nodes are connected (Noise handshake with their fresh keys)\n");

    let (from, to) = (demo.nodes[0].mounted(), demo.nodes[1].mounted());
    let big: Vec<u8> = (0..1024 * 1024u32).map(|n| (n % 251) as u8).collect();
    let steps = [
        (
            "hello.txt",
            DemoEdit::Write(b"hello from node a\n".to_vec()),
        ),
        (
            "notes/today.md",
            DemoEdit::Write(b"# Today\n- try filesync\n".to_vec()),
        ),
        ("data.bin", DemoEdit::Write(big)),
        (
            "hello.txt",
            DemoEdit::Append(b"and one more line\n".to_vec()),
        ),
    ];
    for (name, edit) in steps {
        let (source, target) = (from.join(name), to.join(name));
        let started = Instant::now();
        let (action, bytes) = edit.apply(&source)?;
        let written = started.elapsed();
        let expected = std::fs::read(&source)
            .with_context(|| format!("cannot read back {}", source.display()))?;
        let arrived = demo.wait_for(DEMO_TIMEOUT, || {
            std::fs::read(&target).is_ok_and(|there| there == expected)
        })?;
        if !arrived {
            bail!(
                "{name} did not arrive on node b within {} s; node a's log:\n{}",
                DEMO_TIMEOUT.as_secs(),
                std::fs::read_to_string(demo.nodes[0].log()).unwrap_or_default()
            );
        }
        println!(
            "{action:<8} {:>9}  a/{name:<16} arrived on b after {:.1} ms",
            indicatif::HumanBytes(bytes).to_string(),
            started.elapsed().saturating_sub(written).as_secs_f64() * 1000.0
        );
    }
    println!("\nnode b's mount now lists:");
    for entry in walk_files(&to) {
        println!("  {}", entry.display());
    }
    Ok(())
}

/// What the demo does to a file on node a.
enum DemoEdit {
    Write(Vec<u8>),
    /// Only the appended bytes travel, not the whole file.
    Append(Vec<u8>),
}

impl DemoEdit {
    /// Makes the change and says what it did, and with how many bytes.
    fn apply(&self, path: &Path) -> anyhow::Result<(&'static str, u64)> {
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder)
                .with_context(|| format!("cannot create {}", folder.display()))?;
        }
        match self {
            DemoEdit::Write(content) => {
                std::fs::write(path, content)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                Ok(("wrote", content.len() as u64))
            }
            DemoEdit::Append(content) => {
                use std::io::Write;
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(path)
                    .and_then(|mut file| file.write_all(content))
                    .with_context(|| format!("cannot append to {}", path.display()))?;
                Ok(("appended", content.len() as u64))
            }
        }
    }
}

/// The files below `root`, relative to it, sorted (a few levels; the demo's tree is tiny).
fn walk_files(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut folders = vec![root.to_path_buf()];
    while let Some(folder) = folders.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                folders.push(path);
            } else if let Ok(relative) = path.strip_prefix(root) {
                files.push(relative.to_path_buf());
            }
        }
    }
    files.sort();
    files
}

/// Whether a filesync mount is at `mountpoint` (per /proc/self/mounts).
fn is_mounted(mountpoint: &Path) -> bool {
    let needle = format!(" {} fuse.{} ", mountpoint.display(), mount::SUBTYPE);
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|line| format!("{line} ").contains(&needle))
}

/// A scan's findings, counted by kind and, with `--list`, printed as JSON lines.
struct ScanReport<'a> {
    kinds: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Whether differences are still printed: off without `--list`, and once standard
    /// output is closed (as by `| head`).
    listing: std::sync::atomic::AtomicBool,
    progress: &'a filesync::progress::ScanProgress,
}

impl filesync::change::ChangeSink for ScanReport<'_> {
    fn record(&self, change: filesync::change::Change) {
        // A unit variant serializes as its name, the others as an object keyed by it.
        let kind = match serde_json::to_value(&change.kind) {
            Ok(serde_json::Value::String(name)) => name,
            Ok(serde_json::Value::Object(fields)) => {
                fields.keys().next().cloned().unwrap_or_default()
            }
            _ => String::from("other"),
        };
        if let Ok(mut kinds) = self.kinds.lock() {
            *kinds.entry(kind).or_default() += 1;
        }
        use std::sync::atomic::Ordering::Relaxed;
        if self.listing.load(Relaxed) {
            if let Ok(line) = serde_json::to_string(&change) {
                let printed = self.progress.suspend(|| {
                    use std::io::Write;
                    writeln!(std::io::stdout().lock(), "{line}")
                });
                if printed.is_err() {
                    self.listing.store(false, Relaxed);
                }
            }
        }
    }
}

fn run_scan(
    source: &Path,
    mountpoint: Option<&Path>,
    state_dir: Option<PathBuf>,
    list: bool,
) -> anyhow::Result<()> {
    let root = std::fs::canonicalize(source).with_context(|| {
        format!(
            "cannot scan {}: check that the folder exists",
            source.display()
        )
    })?;
    let state_dir = match (state_dir, mountpoint) {
        (Some(state_dir), _) => state_dir,
        (None, Some(mountpoint)) => {
            let mountpoint = std::fs::canonicalize(mountpoint).with_context(|| {
                format!("cannot find the mount point {}", mountpoint.display())
            })?;
            mount::state_dir_of(&mountpoint)
        }
        (None, None) => bail!(
            "which mount's index should {} be compared with? give --mountpoint DIR or --state-dir DIR",
            root.display()
        ),
    };
    init_logging(
        &std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        None,
    )?;
    let index_path = state_dir.join("index.redb");
    if !index_path.exists() {
        bail!(
            "no index at {}: mount {} once first, or give the mount's --state-dir",
            index_path.display(),
            root.display()
        );
    }
    let index = match filesync::index::Index::open(&index_path) {
        Err(filesync::index::IndexError::Locked { path }) => bail!(
            "the index {} is in use by the running mount: unmount it first (while mounted, \
             its own scan runs at start-up and every sync_interval)",
            path.display()
        ),
        opened => opened?,
    };
    let expected = index.len()?;
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let progress = filesync::progress::ScanProgress::new(expected, terminal);
    let report = ScanReport {
        kinds: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        listing: std::sync::atomic::AtomicBool::new(list),
        progress: &progress,
    };
    let update = |files, bytes| progress.update(files, bytes);
    let ignores = filesync::ignores::Ignores::load(&root);
    let stats = capture::scan::scan(&root, &index, &ignores, &report, Some(&update))?;
    progress.finish();
    eprintln!(
        "scanned {}: {} files, {} directories, {} in {:.2} s",
        root.display(),
        indicatif::HumanCount(stats.files),
        indicatif::HumanCount(stats.dirs),
        indicatif::HumanBytes(stats.bytes),
        stats.elapsed.as_secs_f64()
    );
    let kinds = report.kinds.into_inner().unwrap_or_default();
    let by_kind = kinds
        .iter()
        .map(|(kind, count)| format!("{kind} {count}"))
        .collect::<Vec<_>>()
        .join(", ");
    if stats.changes == 0 {
        eprintln!("no differences from the index");
    } else {
        eprintln!("{} differences from the index ({by_kind})", stats.changes);
    }
    if stats.unreadable > 0 {
        eprintln!(
            "{} entries could not be read (see the warnings above)",
            stats.unreadable
        );
    }
    Ok(())
}

fn run_completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "filesync",
        &mut std::io::stdout(),
    );
    Ok(())
}

fn run_man(dir: Option<&Path>) -> anyhow::Result<()> {
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), dir)
                .with_context(|| format!("cannot write the manual pages into {}", dir.display()))?;
            println!("wrote the manual pages into {}", dir.display());
        }
        None => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .context("cannot print the manual page")?,
    }
    Ok(())
}
