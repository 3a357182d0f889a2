//! `filesync`: the command line. Parses arguments, sets up logging and hands over to the
//! library; every error a user sees is one line and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
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

#[derive(Parser)]
#[command(
    name = "filesync",
    version,
    about = "A FUSE overlay filesystem that mirrors writes to other machines in real time"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount SOURCE at MOUNTPOINT: everything written to MOUNTPOINT lands in SOURCE.
    ///
    /// Examples:
    ///   filesync mount /srv/data /mnt/data
    ///   filesync mount /srv/data /mnt/data -o node_name=laptop,allow_other --foreground
    #[command(verbatim_doc_comment)]
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
    ///
    /// Examples:
    ///   filesync watch /srv/data
    ///   filesync watch /srv/data -o watcher=fanotify | jq .
    #[command(verbatim_doc_comment)]
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
    Install {
        /// Install below this folder instead of / (for packaging).
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Remove what `install` put in place (the settings folder is kept).
    Uninstall {
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Make this node's key pair, store it (mode 0600) and print the node ID, which
    /// peers list in their `-o peer=` options.
    ///
    /// Examples:
    ///   filesync keygen
    ///   filesync keygen --key /etc/filesync/other.key --force
    #[command(verbatim_doc_comment)]
    Keygen {
        /// Where to store the key.
        #[arg(long, value_name = "PATH", default_value = identity::DEFAULT_KEY_PATH)]
        key: PathBuf,
        /// Replace an existing key; the node then gets a new ID.
        #[arg(long)]
        force: bool,
    },
    /// Print this node's ID (its public key, with a check code against typos).
    ///
    /// Examples:
    ///   filesync id
    ///   filesync id --key /etc/filesync/other.key
    #[command(verbatim_doc_comment)]
    Id {
        /// The key file written by `filesync keygen`.
        #[arg(long, value_name = "PATH", default_value = identity::DEFAULT_KEY_PATH)]
        key: PathBuf,
    },
    /// Undo the changes made behind a receive-only mount's back: each locally changed path
    /// gets the sending peer's version again (or is removed if the peer lacks it).
    ///
    /// Examples:
    ///   filesync revert /mnt/data
    ///   filesync revert /mnt/data --state-dir /var/lib/filesync/data
    #[command(verbatim_doc_comment)]
    Revert {
        /// The mount point of the receive-only mount.
        mountpoint: PathBuf,
        /// The mount's state folder, if it was mounted with `state_dir=`.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// List the versions kept of a file that changes from peers replaced or removed
    /// (oldest first), with when each was replaced.
    Versions {
        /// The file, as a path in a filesync mount (it need not exist any more).
        path: PathBuf,
        /// The mount's state folder, if it was mounted with `state_dir=`.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Put a kept version of a file back (through the mount, so peers get it too).
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
    /// Show each running mount: backing folder, watcher, mode, pending changes, replication
    /// lag, last error, and every peer with its address, connection, round-trip time and
    /// bytes in and out. Without MOUNTPOINT, every filesync mount in /proc/mounts.
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
    /// Show filesync working: mount a temporary folder, write through it, show the write
    /// land in the backing folder, unmount and clean up.
    Demo,
    /// Run a STUN server (RFC 8489 Binding, over UDP and TCP) that tells nodes their public address,
    /// for mounts' `-o stun=HOST:PORT`. Runs in the foreground until Ctrl-C or SIGTERM.
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
    let filter = if filter.contains("fuser") {
        filter.to_owned()
    } else {
        format!("{filter},fuser::session=error")
    };
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
    if remove {
        install::uninstall(&plan)?;
    } else {
        install::install(&plan)?;
    }
    Ok(())
}

fn run_keygen(key_path: &Path, force: bool) -> anyhow::Result<()> {
    let key = NodeKey::create(key_path, force)?;
    println!("{}", key.id());
    Ok(())
}

fn run_revert(mountpoint: &Path, state_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let mountpoint = std::fs::canonicalize(mountpoint)
        .with_context(|| format!("cannot find the mount point {}", mountpoint.display()))?;
    let state_dir = state_dir.unwrap_or_else(|| mount::default_state_dir(&mountpoint));
    let answer = filesync::control::request(&state_dir, "revert")?;
    println!("{answer}");
    Ok(())
}

/// The versions kept of `path` (a path in a filesync mount), with the path made absolute.
fn kept_versions(
    path: &Path,
    state_dir: Option<PathBuf>,
) -> anyhow::Result<(PathBuf, Vec<versions::Version>)> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    let parent = std::fs::canonicalize(parent.unwrap_or(Path::new(".")))
        .with_context(|| format!("cannot find the folder of {}", path.display()))?;
    let path = parent.join(path.file_name().context("give the path of a file")?);
    let (mountpoint, rel) = mount::filesync_mount_of(&path).with_context(|| {
        format!(
            "{} is not in a filesync mount: give a path inside the mount point",
            path.display()
        )
    })?;
    let state_dir = state_dir.unwrap_or_else(|| mount::default_state_dir(&mountpoint));
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
                mount::default_state_dir(&canonical),
            )]
        }
        (None, None) => filesync_mounts()?
            .into_iter()
            .map(|m| (m.display().to_string(), mount::default_state_dir(&m)))
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

fn run_id(key_path: &Path) -> anyhow::Result<()> {
    println!("{}", NodeKey::load(key_path)?.id());
    Ok(())
}

/// Temporary folders of the demo, removed (after unmounting) however the demo ends.
struct DemoFolders {
    top: PathBuf,
    daemon: Option<std::process::Child>,
}

impl Drop for DemoFolders {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            // SIGTERM makes the daemon unmount itself.
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(&daemon),
                rustix::process::Signal::TERM,
            );
            let _ = daemon.wait();
        }
        let _ = std::fs::remove_dir_all(&self.top);
    }
}

fn run_demo() -> anyhow::Result<()> {
    let top = std::env::temp_dir().join(format!("filesync-demo-{}", std::process::id()));
    let backing = top.join("backing");
    let mounted = top.join("mnt");
    std::fs::create_dir_all(&backing)
        .and_then(|()| std::fs::create_dir_all(&mounted))
        .with_context(|| format!("cannot create demo folders under {}", top.display()))?;
    let mut folders = DemoFolders { top, daemon: None };
    println!("backing folder: {}", backing.display());
    println!("mount point:    {}", mounted.display());

    let exe = std::env::current_exe().context("cannot find the filesync binary")?;
    let daemon = std::process::Command::new(exe)
        .arg("mount")
        .arg(&backing)
        .arg(&mounted)
        .arg("--foreground")
        .arg("-o")
        // Everything the demo makes stays under its temporary folder.
        .arg(format!(
            "log=warn,telemetry=off,state_dir={}",
            folders.top.join("state").display()
        ))
        .spawn()
        .context("cannot start the mount daemon")?;
    folders.daemon = Some(daemon);
    wait_until_mounted(&mounted, Duration::from_secs(10))?;
    println!("mounted {} at {}", backing.display(), mounted.display());

    let text = "hello from filesync\n";
    let started = Instant::now();
    std::fs::write(mounted.join("hello.txt"), text).context("write through the mount failed")?;
    let landed = std::fs::read_to_string(backing.join("hello.txt"))
        .context("the write did not land in the backing folder")?;
    let elapsed = started.elapsed();
    if landed != text {
        bail!("the backing folder holds {landed:?}, expected {text:?}");
    }
    println!(
        "wrote {}/hello.txt; {}/hello.txt holds {:?} ({} µs after the write started)",
        mounted.display(),
        backing.display(),
        landed.trim_end(),
        elapsed.as_micros()
    );
    drop(folders);
    println!("unmounted and cleaned up");
    Ok(())
}

fn wait_until_mounted(mountpoint: &Path, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let needle = format!(" {} fuse.{} ", mountpoint.display(), mount::SUBTYPE);
    while Instant::now() < deadline {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        if mounts
            .lines()
            .any(|line| format!("{line} ").contains(&needle))
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "{} was not mounted within {} s",
        mountpoint.display(),
        timeout.as_secs()
    )
}
