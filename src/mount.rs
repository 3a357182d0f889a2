//! Mounting a backing folder: the checks made before anything is touched, the FUSE
//! session, clean unmounting on signals, and detaching into the background.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, Session, SessionACL};

use crate::capture::{self, CaptureError, WatchSpec};
use crate::change::ChangeSink;
use crate::config::Settings;
use crate::fs::{OverlayFs, OverlayOptions};
use crate::fuse::{spawn_invalidator, CachePolicy, FuseAdapter};
use crate::ignores::Ignores;
use crate::index::{Index, IndexError};
use crate::pipeline::indexer::Indexer;
use crate::pipeline::replication::{self, LocalFolder, ReplicationError, ReplicationPlan};
use crate::pipeline::scanner::ScanJob;
use crate::pipeline::{self, MountGraph, Pipeline, StopError};
use crate::status::{mode_name, Stats};

/// The filesystem type the mount shows in `/proc/mounts` is `fuse.` followed by this.
pub const SUBTYPE: &str = "filesync";

/// Why a mount could not be made. Each message is one line and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("source folder {0} does not exist: create it or fix the path")]
    SourceMissing(PathBuf),
    #[error("source {0} is not a directory: give the folder to mirror")]
    SourceNotDirectory(PathBuf),
    #[error("mount point {0} does not exist: create it with mkdir first")]
    MountpointMissing(PathBuf),
    #[error("mount point {0} is not a directory: give an empty folder")]
    MountpointNotDirectory(PathBuf),
    #[error("mount point {0} is not empty: use an empty folder so nothing is hidden by the mount")]
    MountpointNotEmpty(PathBuf),
    #[error("mount point {mountpoint} is inside the source folder {backing}: choose a mount point outside it")]
    MountpointInsideSource {
        mountpoint: PathBuf,
        backing: PathBuf,
    },
    #[error("source folder {backing} is inside the mount point {mountpoint}: choose folders that do not contain each other")]
    SourceInsideMountpoint {
        backing: PathBuf,
        mountpoint: PathBuf,
    },
    #[error("{0} is already a mount point: unmount it first (umount {0})")]
    AlreadyMounted(PathBuf),
    #[error("/dev/fuse is missing: load the module (modprobe fuse) or install fuse3")]
    NoFuseDevice,
    #[error("not permitted to mount {mountpoint} ({reason}): run as root, or let users mount FUSE (/dev/fuse readable and writable by them, fuse3's setuid fusermount3 installed)")]
    NotPermitted {
        mountpoint: PathBuf,
        reason: std::io::Error,
    },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the mount daemon stopped before the mount was ready: {0}")]
    DaemonFailed(String),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Pipeline(#[from] StopError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> MountError + 'a {
    move |source| MountError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A mount that passed every check: canonical paths of the backing folder and mount point.
#[derive(Debug, Clone)]
pub struct MountPlan {
    pub source: PathBuf,
    pub mountpoint: PathBuf,
    pub settings: Settings,
    /// The node key and peers, when the mount replicates.
    pub replication: Option<ReplicationPlan>,
}

/// Checks everything that can be checked before mounting; changes nothing.
pub fn plan(source: &Path, mountpoint: &Path, settings: Settings) -> Result<MountPlan, MountError> {
    let source = existing_dir(
        source,
        MountError::SourceMissing,
        MountError::SourceNotDirectory,
    )?;
    let mountpoint = existing_dir(
        mountpoint,
        MountError::MountpointMissing,
        MountError::MountpointNotDirectory,
    )?;
    if mountpoint.starts_with(&source) {
        return Err(MountError::MountpointInsideSource {
            mountpoint,
            backing: source,
        });
    }
    if source.starts_with(&mountpoint) {
        return Err(MountError::SourceInsideMountpoint {
            backing: source,
            mountpoint,
        });
    }
    if is_mount_point(&mountpoint)? {
        return Err(MountError::AlreadyMounted(mountpoint));
    }
    let mut entries = std::fs::read_dir(&mountpoint).map_err(io_error("read", &mountpoint))?;
    if entries.next().is_some() {
        return Err(MountError::MountpointNotEmpty(mountpoint));
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::NoFuseDevice);
    }
    let replication = ReplicationPlan::check(&settings)?;
    Ok(MountPlan {
        source,
        mountpoint,
        settings,
        replication,
    })
}

fn existing_dir(
    path: &Path,
    missing: fn(PathBuf) -> MountError,
    not_dir: fn(PathBuf) -> MountError,
) -> Result<PathBuf, MountError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::canonicalize(path).map_err(io_error("resolve", path)),
        Ok(_) => Err(not_dir(path.to_path_buf())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Err(missing(path.to_path_buf())),
        Err(err) => Err(io_error("inspect", path)(err)),
    }
}

/// Whether `path` (canonical) is the mount point of some mount, per `/proc/self/mountinfo`.
fn is_mount_point(path: &Path) -> Result<bool, MountError> {
    let mountinfo = Path::new("/proc/self/mountinfo");
    let table = std::fs::read_to_string(mountinfo).map_err(io_error("read", mountinfo))?;
    Ok(table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|field| Path::new(&unescape_mountinfo(field)) == path))
}

/// The filesync mount `path` (canonical) lies in: its mount point, and `path` relative
/// to it. `None` when `path` is not inside a filesync mount.
pub fn filesync_mount_of(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let fstype = format!("fuse.{SUBTYPE}");
    let mountpoints: Vec<PathBuf> = table
        .lines()
        .filter(|line| {
            line.split_once(" - ")
                .and_then(|(_, rest)| rest.split(' ').next())
                == Some(fstype.as_str())
        })
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .collect();
    // The innermost mount holding the path.
    path.ancestors().find_map(|ancestor| {
        let mountpoint = mountpoints.iter().find(|m| m.as_path() == ancestor)?;
        let rel = path.strip_prefix(mountpoint).ok()?;
        Some((mountpoint.clone(), rel.to_path_buf()))
    })
}

/// mountinfo (and /proc/mounts) write space, tab, newline and backslash as three-digit
/// octal escapes.
pub fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes.get(i + 1..i + 4).filter(|_| bytes[i] == b'\\');
        match escape.and_then(|e| u8::from_str_radix(std::str::from_utf8(e).ok()?, 8).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn fuse_config(plan: &MountPlan) -> Config {
    let settings = &plan.settings;
    let mut options = vec![
        MountOption::FSName(plan.source.to_string_lossy().into_owned()),
        // fuser drops `Subtype` on its direct mount path; as a custom option it reaches the kernel.
        MountOption::CUSTOM(format!("subtype={SUBTYPE}")),
        // The kernel checks permissions against the attributes we report, so a mount shared
        // with `allow_other` never lets one user past another's file modes.
        MountOption::DefaultPermissions,
    ];
    // A receive-only mirror refuses local writes with EROFS; peers' changes are applied to
    // the backing folder directly.
    let read_only =
        settings.read_only || settings.replication.mode == crate::config::Mode::ReceiveOnly;
    options.push(if read_only {
        MountOption::RO
    } else {
        MountOption::RW
    });
    let flags = settings.kernel;
    for (value, on, off) in [
        (flags.dev, MountOption::Dev, MountOption::NoDev),
        (flags.suid, MountOption::Suid, MountOption::NoSuid),
        (flags.exec, MountOption::Exec, MountOption::NoExec),
        (flags.atime, MountOption::Atime, MountOption::NoAtime),
        (flags.sync, MountOption::Sync, MountOption::Async),
    ] {
        options.extend(value.map(|wanted| if wanted { on } else { off }));
    }
    if flags.dirsync == Some(true) {
        options.push(MountOption::DirSync);
    }
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = if settings.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(settings.threads);
    config.clone_fd = true;
    config
}

/// Mounts and serves until the mount is unmounted or a termination signal arrives (then it
/// unmounts itself). `ready` runs once the mount is live.
pub fn serve(plan: &MountPlan, ready: impl FnOnce()) -> Result<(), MountError> {
    // Modes from the kernel already have the caller's umask applied; ours must not apply twice.
    rustix::process::umask(rustix::fs::Mode::empty());
    let running_as_root = rustix::process::geteuid().is_root();
    let gate = replication::sync_gate();
    let options = OverlayOptions {
        create_as_caller: running_as_root && plan.settings.allow_other,
        fsync_barrier: plan
            .replication
            .as_ref()
            .filter(|replication| replication.is_sync())
            .map(|_| gate.clone() as Arc<dyn crate::fs::FsyncBarrier>),
    };
    let (sink, queue) = pipeline::capture::queue();
    let overlay = OverlayFs::new(&plan.source, Arc::new(sink.clone()), options)
        .map_err(io_error("open", &plan.source))?;
    let overlay = Arc::new(overlay);
    // Changes behind the mount's back also go to the invalidator, so the kernel's caches
    // never show a stale tree.
    let (stale_tx, stale_rx) = crossbeam_channel::unbounded();
    let behind_the_back: Arc<dyn ChangeSink> = Arc::new(TeeSink {
        queue: sink,
        stale: stale_tx.clone(),
    });
    let state_dir = plan
        .settings
        .state_dir
        .clone()
        .unwrap_or_else(|| default_state_dir(&plan.mountpoint));
    create_private_dir(&state_dir)?;
    let _pointer = StatePointer::publish(&plan.mountpoint, &state_dir);
    let stats = Arc::new(Stats::new(
        plan.source.clone(),
        plan.mountpoint.clone(),
        mode_name(plan.settings.replication.mode).to_owned(),
    ));
    stats.set_capture_queue(queue.clone());
    let commands = crate::control::Commands::default();
    let reporting = stats.clone();
    commands.register("status", move || {
        serde_json::to_string(&reporting.report())
            .unwrap_or_else(|err| format!("cannot encode the status: {err}"))
    });
    let answering = commands.clone();
    crate::control::serve(&state_dir, move |command| answering.answer(command))?;
    if let Some(address) = plan.settings.metrics {
        crate::metrics::serve(address, stats.clone())?;
    }
    let index = Arc::new(open_index(&state_dir.join("index.redb"))?);
    let root_fd = rustix::fs::open(
        &plan.source,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|err| io_error("open", &plan.source)(err.into()))?;
    let spec = WatchSpec {
        root: plan.source.clone(),
        ignore_pids: vec![std::process::id()],
    };
    let watcher = capture::start_watcher(&spec, behind_the_back.clone(), plan.settings.watcher)?;
    stats.set_watcher(
        watcher
            .as_ref()
            .map_or_else(|| "scan".to_owned(), |watcher| watcher.kind().to_string()),
    );
    // What peers change is applied by this process (so no watcher reports it back), and
    // only the kernel's caches need to hear of it.
    let applied: Arc<dyn ChangeSink> = Arc::new(StaleSink(stale_tx));
    let settled = Arc::new(pipeline::Settled::default());
    let ignores = Arc::new(Ignores::load(&plan.source));
    let replication = match &plan.replication {
        Some(replication) => Some(replication.start(
            LocalFolder {
                source: &plan.source,
                state_dir: &state_dir,
                index: index.clone(),
                ignores: ignores.clone(),
                capture: behind_the_back.clone(),
            },
            applied,
            gate,
            replication::Shared {
                settled: settled.clone(),
                stats: stats.clone(),
                commands: &commands,
            },
        )?),
        None => None,
    };
    let running = Pipeline::mount(MountGraph {
        queue,
        indexer: match replication.as_ref().and_then(|r| r.bases.clone()) {
            Some(bases) => Indexer::new(index.clone(), root_fd).keeping_merge_bases(bases),
            None => Indexer::new(index.clone(), root_fd),
        },
        scan: ScanJob {
            root: plan.source.clone(),
            index,
            ignores: ignores.clone(),
            sink: behind_the_back,
            interval: plan.settings.sync_interval,
        },
        ignores,
        debounce: plan.settings.debounce,
        telemetry: plan.settings.telemetry,
        workdir: state_dir.clone(),
        replication,
        settled,
        stats: stats.clone(),
    });
    let cache = if watcher.is_some() {
        CachePolicy::WATCHED
    } else {
        CachePolicy::UNWATCHED
    };
    let adapter = FuseAdapter::new(
        overlay.clone(),
        plan.settings.passthrough,
        cache,
        stats.clone(),
    );
    let mut session =
        Session::new(adapter, &plan.mountpoint, &fuse_config(plan)).map_err(|err| {
            match err.kind() {
                std::io::ErrorKind::PermissionDenied => MountError::NotPermitted {
                    mountpoint: plan.mountpoint.clone(),
                    reason: err,
                },
                _ => io_error("mount", &plan.mountpoint)(err),
            }
        })?;
    spawn_invalidator(overlay, session.notifier(), stale_rx).map_err(io_error(
        "start the cache invalidator for",
        &plan.mountpoint,
    ))?;
    unmount_on_signal(session.unmount_callable(), plan.mountpoint.clone())?;
    tracing::info!(
        source = %plan.source.display(),
        mountpoint = %plan.mountpoint.display(),
        threads = plan.settings.threads,
        "mounted"
    );
    ready();
    let notifier = crate::service::Notifier::ready(stats);
    let served = session.run().map_err(io_error("serve", &plan.mountpoint));
    tracing::info!(mountpoint = %plan.mountpoint.display(), "unmounted");
    notifier.stopping();
    // The FUSE session is gone; stop capturing and let the graph drain what it holds.
    if let Some(watcher) = watcher {
        watcher.stop();
    }
    running.stop()?;
    served
}

/// Sends each change both to the capture queue and to the kernel cache invalidator.
struct TeeSink {
    queue: pipeline::capture::QueueSink,
    stale: crossbeam_channel::Sender<crate::change::Change>,
}

impl ChangeSink for TeeSink {
    fn record(&self, change: crate::change::Change) {
        // Unbounded: the invalidator never makes a capture source wait.
        let _ = self.stale.send(change.clone());
        self.queue.record(change);
    }
}

/// Sends changes applied from peers to the kernel cache invalidator only: a path whose
/// file was replaced (temp file renamed over it) needs its entry dropped, one patched in
/// place its inode's data.
struct StaleSink(crossbeam_channel::Sender<crate::change::Change>);

impl ChangeSink for StaleSink {
    fn record(&self, change: crate::change::Change) {
        let entry = crate::change::Change {
            kind: crate::change::ChangeKind::Create,
            ..change.clone()
        };
        let _ = self.0.send(entry);
        let _ = self.0.send(change);
    }
}

/// How long a mount waits for the index of a previous daemon of the same mount point,
/// which may still be draining its queue right after `umount`.
const INDEX_LOCK_WAIT: Duration = Duration::from_secs(10);

fn open_index(path: &Path) -> Result<Index, MountError> {
    let deadline = std::time::Instant::now() + INDEX_LOCK_WAIT;
    loop {
        match Index::open(path) {
            Err(IndexError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            opened => return Ok(opened?),
        }
    }
}

/// Creates the state folder, owner-only: it holds what this node knows of the tree.
fn create_private_dir(path: &Path) -> Result<(), MountError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_error("create the state folder", path))
}

/// SIGTERM, SIGINT and SIGHUP unmount the folder, which ends the session loop. A mount
/// still in use cannot be unmounted cleanly; then, as libfuse does, it is detached lazily
/// and the daemon exits (files still open on it fail with ENOTCONN). A second signal exits
/// at once.
fn unmount_on_signal(
    mut unmounter: fuser::SessionUnmounter,
    mountpoint: PathBuf,
) -> Result<(), MountError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(io_error("handle signals for", &mountpoint))?;
    let error_path = mountpoint.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signals = signals.forever();
            if let Some(signal) = signals.next() {
                tracing::info!(signal, "unmounting on signal");
                if let Err(err) = unmounter.unmount() {
                    tracing::warn!(
                        "{} is busy ({err}); detaching it and exiting: open files on it now fail",
                        mountpoint.display()
                    );
                    detach_lazily(&mountpoint);
                    std::process::exit(0);
                }
            }
            if let Some(signal) = signals.next() {
                tracing::warn!(signal, "second signal: exiting now");
                std::process::exit(0);
            }
        })
        .map_err(io_error("start the signal thread for", &error_path))?;
    Ok(())
}

/// `umount -l`: as root directly, otherwise through fuse3's setuid `fusermount3 -u -z`.
fn detach_lazily(mountpoint: &Path) {
    let detached = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH);
    if let Err(err) = detached {
        let status = std::process::Command::new("fusermount3")
            .args(["-u", "-z", "--"])
            .arg(mountpoint)
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            tracing::error!("cannot detach {}: {err}", mountpoint.display());
        }
    }
}

/// Where a detached daemon logs when no `log_file` is set: `/var/log/filesync/` for root,
/// the XDG state folder otherwise, one file per mount point (named like systemd escapes it).
pub fn default_log_file(mountpoint: &Path) -> PathBuf {
    let folder = if rustix::process::geteuid().is_root() {
        PathBuf::from("/var/log/filesync")
    } else {
        user_state_home()
    };
    folder.join(format!("{}.log", mount_name(mountpoint)))
}

/// Where a mount keeps its index when no `state_dir` is set: `/var/lib/filesync/<name>`
/// for root, the XDG state folder otherwise; never inside the synced tree.
pub fn default_state_dir(mountpoint: &Path) -> PathBuf {
    let folder = if rustix::process::geteuid().is_root() {
        PathBuf::from("/var/lib/filesync")
    } else {
        user_state_home()
    };
    folder.join(mount_name(mountpoint))
}

/// The state folder of the filesync mount at `mountpoint`: the one its daemon noted
/// while it runs (see [`StatePointer`]), else the default for the mount point.
pub fn state_dir_of(mountpoint: &Path) -> PathBuf {
    std::fs::read(runtime_dir().join(mount_name(mountpoint)))
        .ok()
        .map(|bytes| PathBuf::from(std::ffi::OsString::from_vec(bytes)))
        .filter(|path| path.is_absolute())
        .unwrap_or_else(|| default_state_dir(mountpoint))
}

/// Where running daemons note their state folders: `/run/filesync` for root, else
/// `$XDG_RUNTIME_DIR/filesync`.
fn runtime_dir() -> PathBuf {
    match rustix::process::geteuid().is_root() {
        true => PathBuf::from("/run/filesync"),
        false => std::env::var_os("XDG_RUNTIME_DIR")
            .map_or_else(std::env::temp_dir, PathBuf::from)
            .join("filesync"),
    }
}

/// A running mount's note of its state folder, so `filesync status`, `revert` and
/// `versions` given only the mount point find a mount started with `state_dir=`.
/// Removed when dropped (the daemon exits); best effort, since the commands fall back to
/// the default state folder.
struct StatePointer(Option<PathBuf>);

impl StatePointer {
    fn publish(mountpoint: &Path, state_dir: &Path) -> StatePointer {
        let dir = runtime_dir();
        let path = dir.join(mount_name(mountpoint));
        let written = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .and_then(|()| {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&path)?;
                file.write_all(state_dir.as_os_str().as_bytes())
            });
        match written {
            Ok(()) => StatePointer(Some(path)),
            Err(err) => {
                tracing::debug!("cannot note the state folder in {}: {err}", path.display());
                StatePointer(None)
            }
        }
    }
}

impl Drop for StatePointer {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn user_state_home() -> PathBuf {
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir)
        .join("filesync")
}

/// A mount point as one file name, much as `systemd-escape --path` writes it:
/// `/mnt/data` is `mnt-data`.
fn mount_name(mountpoint: &Path) -> String {
    let name = mountpoint
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "-");
    if name.is_empty() {
        "-".to_string()
    } else {
        name
    }
}

/// The parent's end of a detached daemon: learns whether the mount came up.
pub enum Detached {
    /// We are the daemon; report through [`DaemonLink::ready`] or [`DaemonLink::failed`].
    Daemon(DaemonLink),
    /// We are the original process; the daemon reported this.
    Parent(Result<(), MountError>),
}

/// The daemon's end of the pipe back to the process that started it.
pub struct DaemonLink {
    pipe: std::fs::File,
}

impl DaemonLink {
    pub fn ready(mut self) {
        // The parent may have been killed meanwhile; the daemon keeps serving regardless.
        let _ = self.pipe.write_all(b"ok\n");
    }

    pub fn failed(mut self, err: &MountError) {
        let _ = writeln!(self.pipe, "{err}");
    }
}

/// Forks a daemon that logs to `log_file` and runs in its own session. Must be called
/// before any thread is started. The parent waits for the daemon's first report.
pub fn detach(log_file: &Path) -> Result<Detached, MountError> {
    if let Some(folder) = log_file.parent() {
        std::fs::create_dir_all(folder).map_err(io_error("create the log folder", folder))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .map_err(io_error("open the log file", log_file))?;
    let (read_end, write_end) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| MountError::Io {
            action: "create a pipe for",
            path: log_file.to_path_buf(),
            source: e.into(),
        })?;
    // SAFETY: no other thread exists yet (the caller's contract), so the child may run Rust code.
    match unsafe { libc::fork() } {
        -1 => Err(io_error("start the daemon logging to", log_file)(
            std::io::Error::last_os_error(),
        )),
        0 => {
            drop(read_end);
            become_daemon(&log).map_err(io_error("detach, logging to", log_file))?;
            Ok(Detached::Daemon(DaemonLink {
                pipe: std::fs::File::from(write_end),
            }))
        }
        _ => {
            drop(write_end);
            Ok(Detached::Parent(wait_for_daemon(read_end, log_file)))
        }
    }
}

fn become_daemon(log: &std::fs::File) -> std::io::Result<()> {
    rustix::process::setsid()?;
    std::env::set_current_dir("/")?;
    let null = std::fs::File::open("/dev/null")?;
    // SAFETY: dup2 onto the standard descriptors of this single-threaded process.
    unsafe {
        if libc::dup2(null.as_raw_fd(), 0) < 0
            || libc::dup2(log.as_raw_fd(), 1) < 0
            || libc::dup2(log.as_raw_fd(), 2) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// How long the parent waits for the daemon to mount before giving up on it.
const DAEMON_START_TIMEOUT_MS: i32 = 30_000;

fn wait_for_daemon(read_end: OwnedFd, log_file: &Path) -> Result<(), MountError> {
    let mut poll = libc::pollfd {
        fd: read_end.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut poll, 1, DAEMON_START_TIMEOUT_MS) };
    if ready == 0 {
        return Err(MountError::DaemonFailed(format!(
            "no answer within {} s; see {}",
            DAEMON_START_TIMEOUT_MS / 1000,
            log_file.display()
        )));
    }
    let mut report = String::new();
    // The daemon writes one line and closes its end, or exits; both end this read.
    let read = std::fs::File::from(read_end).read_to_string(&mut report);
    match (read, report.trim()) {
        (Ok(_), "ok") => Ok(()),
        (Ok(_), "") => Err(MountError::DaemonFailed(format!(
            "see {}",
            log_file.display()
        ))),
        (Ok(_), message) => Err(MountError::DaemonFailed(message.to_string())),
        (Err(err), _) => Err(MountError::DaemonFailed(err.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(
            unescape_mountinfo(r"/mnt/back\134slash"),
            r"/mnt/back\slash"
        );
        assert_eq!(unescape_mountinfo(r"/mnt/trailing\04"), r"/mnt/trailing\04");
    }

    #[test]
    fn default_log_file_is_named_after_the_mount_point() {
        let file = default_log_file(Path::new("/mnt/data"));
        assert_eq!(
            file.file_name().and_then(|n| n.to_str()),
            Some("mnt-data.log")
        );
    }
}
