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
            builder.with_ansi(ansi).with_writer(std::io::stderr).init();
        }
    }
    Ok(())
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
