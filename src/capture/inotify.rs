//! The inotify watcher: one watch per directory of the backing folder. It needs no privilege
//! and works on every kernel, but knows neither the writing process nor byte ranges, and each
//! directory costs one watch out of `fs.inotify.max_user_watches`.
//!
//! This file also holds what both fallback watchers share (the reading thread, how a new name
//! is described, the subtree walk), so that the fanotify watcher does not repeat it.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::io::Errno;
use rustix::pipe::PipeFlags;

use super::{CaptureError, Sink, WatchSpec, Watcher, WatcherKind};
use crate::change::{AttrChange, Change, ChangeKind, FileId, Source};

/// What every directory watch asks for. `ONLYDIR` and `DONT_FOLLOW` make a name that was
/// replaced by a file or a symlink between the event and the watch fail instead of watching
/// something else; `EXCL_UNLINK` drops events of files that are already unlinked.
const DIR_MASK: WatchFlags = WatchFlags::MODIFY
    .union(WatchFlags::ATTRIB)
    .union(WatchFlags::CLOSE_WRITE)
    .union(WatchFlags::CREATE)
    .union(WatchFlags::DELETE)
    .union(WatchFlags::MOVED_FROM)
    .union(WatchFlags::MOVED_TO)
    .union(WatchFlags::DELETE_SELF)
    .union(WatchFlags::MOVE_SELF)
    .union(WatchFlags::DONT_FOLLOW)
    .union(WatchFlags::EXCL_UNLINK)
    .union(WatchFlags::ONLYDIR);

/// How long a move out of a directory waits for its move into another one. The kernel queues
/// both halves of a rename back to back, so the other half is either already read or in the
/// very next read; the wait only covers a read that ended between the two.
const PAIR_WAIT: Duration = Duration::from_millis(20);

/// Size of `struct inotify_event` before the name.
const EVENT_HEADER: usize = 16;

/// Starts watching `spec.root` and everything below it; reports to `sink` from its own thread.
pub fn start(spec: &WatchSpec, sink: Sink) -> Result<Box<dyn Watcher>, CaptureError> {
    let root = spec.root.clone();
    let fd =
        inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).map_err(|err| match err {
            Errno::MFILE => unavailable(
                "too many inotify instances for this user: raise fs.inotify.max_user_instances",
            ),
            Errno::NOSYS => unavailable("the kernel is built without inotify: use -o watcher=scan"),
            _ => io_error(&root, err),
        })?;
    let root_wd = inotify::add_watch(&fd, &root, DIR_MASK).map_err(|err| match err {
        Errno::NOSPC => unavailable(format!(
            "no inotify watch left (fs.inotify.max_user_watches = {}): raise it with sysctl",
            sysctl("fs/inotify/max_user_watches")
        )),
        _ => io_error(&root, err),
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut watcher = Inotify {
        fd,
        root: root.clone(),
        sink,
        stop: stop.clone(),
        root_wd,
        dirs: HashMap::from([(root_wd, PathBuf::new())]),
        moves: Vec::new(),
        limit_hit: false,
        limit_warned: false,
    };
    watcher.watch_below(Path::new(""), false);
    watcher.report_watch_limit();
    tracing::info!(root = %root.display(), watches = watcher.dirs.len(), "inotify watcher started");
    spawn(WatcherKind::Inotify, &root, stop, watcher)
}

/// The state of the inotify reading thread.
struct Inotify {
    fd: OwnedFd,
    root: PathBuf,
    sink: Sink,
    stop: Arc<AtomicBool>,
    root_wd: i32,
    /// Every watch and the directory it watches, relative to `root`.
    dirs: HashMap<i32, PathBuf>,
    /// Moves out of a directory waiting for their move into another one, oldest first.
    moves: Vec<PendingMove>,
    /// A directory could not be watched for lack of watches since the last `Rescan`.
    limit_hit: bool,
    limit_warned: bool,
}

/// The first half of a rename (`IN_MOVED_FROM`).
struct PendingMove {
    cookie: u32,
    path: PathBuf,
    is_dir: bool,
    until: Instant,
}

/// One `struct inotify_event`.
struct RawEvent<'a> {
    wd: i32,
    mask: ReadFlags,
    cookie: u32,
    name: Option<&'a OsStr>,
}

impl Inotify {
    fn record(&self, path: PathBuf, kind: ChangeKind) {
        self.sink.record(change(path, kind, Source::Inotify, None));
    }

    fn event(&mut self, event: RawEvent<'_>) {
        let mask = event.mask;
        if mask.contains(ReadFlags::QUEUE_OVERFLOW) {
            self.overflow();
            return;
        }
        let completes_move = mask.contains(ReadFlags::MOVED_TO)
            && self.moves.iter().any(|m| m.cookie == event.cookie);
        // Anything else than the other half of a pending move means that move left the tree:
        // report it now, so that the records stay in the order the changes happened.
        if !mask.contains(ReadFlags::MOVED_FROM) && !completes_move {
            self.flush_moves();
        }
        if mask.contains(ReadFlags::IGNORED) {
            self.dirs.remove(&event.wd);
            return;
        }
        let Some(dir) = self.dirs.get(&event.wd) else {
            // A watch this watcher already dropped (its directory left the tree).
            return;
        };
        let Some(name) = event.name else {
            self.dir_itself(event.wd, mask);
            return;
        };
        let path = dir.join(name);
        let is_dir = mask.contains(ReadFlags::ISDIR);
        if mask.contains(ReadFlags::CREATE) {
            self.arrived(path.clone(), is_dir);
        }
        if mask.contains(ReadFlags::MODIFY) {
            self.record(path.clone(), ChangeKind::Modified);
        }
        if mask.contains(ReadFlags::ATTRIB) {
            self.record(path.clone(), ChangeKind::SetAttr(AttrChange::default()));
        }
        if mask.contains(ReadFlags::CLOSE_WRITE) {
            self.record(path.clone(), ChangeKind::Closed);
        }
        if mask.contains(ReadFlags::DELETE) {
            self.record(path.clone(), gone_kind(is_dir));
        }
        if mask.contains(ReadFlags::MOVED_FROM) {
            self.moves.push(PendingMove {
                cookie: event.cookie,
                path: path.clone(),
                is_dir,
                until: Instant::now() + PAIR_WAIT,
            });
        }
        if mask.contains(ReadFlags::MOVED_TO) {
            match self.moves.iter().position(|m| m.cookie == event.cookie) {
                Some(at) => {
                    let from = self.moves.remove(at);
                    self.renamed(from.path, path, is_dir);
                }
                None => self.arrived(path, is_dir),
            }
        }
    }

    /// An event on a watched directory itself, without a name. The parent's watch reports the
    /// same change with the name, so only the root's own events matter.
    fn dir_itself(&mut self, wd: i32, mask: ReadFlags) {
        if wd != self.root_wd {
            return;
        }
        if mask.intersects(ReadFlags::DELETE_SELF | ReadFlags::MOVE_SELF | ReadFlags::UNMOUNT) {
            tracing::warn!(
                root = %self.root.display(),
                "the watched folder was deleted, moved or unmounted: nothing below it is watched any more"
            );
            self.sink.record(rescan(Source::Inotify));
        } else if mask.contains(ReadFlags::ATTRIB) {
            self.record(PathBuf::new(), ChangeKind::SetAttr(AttrChange::default()));
        }
    }

    /// A name appeared by creation or by a move in from outside the tree. A new directory is
    /// watched and then scanned, so that what was made in it before the watch existed is
    /// reported too.
    fn arrived(&mut self, path: PathBuf, is_dir: bool) {
        self.sink.record(appeared(
            &self.root,
            path.clone(),
            is_dir,
            Source::Inotify,
            None,
        ));
        if is_dir {
            self.watch(&path);
            self.watch_below(&path, true);
        }
    }

    fn renamed(&mut self, from: PathBuf, to: PathBuf, is_dir: bool) {
        self.record(
            from.clone(),
            ChangeKind::Rename {
                to: Some(to.clone()),
                exchange: false,
            },
        );
        if !is_dir {
            return;
        }
        if self.dirs.values().any(|dir| *dir == from) {
            // The watches follow the directories; only the names they are known by change.
            for dir in self.dirs.values_mut() {
                if let Ok(below) = dir.strip_prefix(&from) {
                    *dir = join(&to, below);
                }
            }
        } else {
            // It was renamed before its creation was processed, so its watch could not be
            // added under the old name: add it now, and report what it holds.
            self.watch(&to);
            self.watch_below(&to, true);
        }
    }

    /// Reports the moves that found no other half as moves out of the tree.
    fn flush_moves(&mut self) {
        for pending in std::mem::take(&mut self.moves) {
            self.record(pending.path.clone(), gone_kind(pending.is_dir));
            if pending.is_dir {
                self.unwatch_tree(&pending.path);
            }
        }
    }

    /// Drops the watches of a directory that left the tree and of everything below it, since
    /// their events would otherwise still arrive under names that no longer exist.
    fn unwatch_tree(&mut self, top: &Path) {
        let gone: Vec<i32> = self
            .dirs
            .iter()
            .filter(|(_, dir)| dir.starts_with(top))
            .map(|(wd, _)| *wd)
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            // It fails only when the kernel already dropped the watch, which is the goal.
            let _ = inotify::remove_watch(&self.fd, wd);
        }
    }

    fn overflow(&mut self) {
        tracing::warn!(
            root = %self.root.display(),
            "inotify queue overflowed (fs.inotify.max_queued_events = {}): events were lost, asking for a full rescan",
            sysctl("fs/inotify/max_queued_events")
        );
        // Their other halves may be among the lost events; the rescan finds where they went.
        self.moves.clear();
        self.sink.record(rescan(Source::Inotify));
        self.rewatch();
    }

    /// Watches every directory of the tree afresh: the lost events may have created
    /// directories that have no watch yet, and renamed ones whose names are out of date.
    fn rewatch(&mut self) {
        let before = std::mem::take(&mut self.dirs);
        if let Some(wd) = self.watch(Path::new("")) {
            self.root_wd = wd;
        }
        self.watch_below(Path::new(""), false);
        for wd in before.keys().filter(|wd| !self.dirs.contains_key(wd)) {
            // Directories that left the tree meanwhile; failing means it is gone already.
            let _ = inotify::remove_watch(&self.fd, *wd);
        }
    }

    /// Adds the watch for the directory `rel`. A directory that is gone or was replaced
    /// meanwhile is skipped: the events about that follow.
    fn watch(&mut self, rel: &Path) -> Option<i32> {
        match inotify::add_watch(&self.fd, self.root.join(rel), DIR_MASK) {
            Ok(wd) => {
                self.dirs.insert(wd, rel.to_path_buf());
                Some(wd)
            }
            Err(Errno::NOSPC) => {
                self.watch_limit();
                None
            }
            Err(Errno::NOENT | Errno::NOTDIR) => None,
            Err(err) => {
                tracing::warn!(
                    path = %rel.display(),
                    "cannot watch directory: {err}; the periodic scan covers its changes"
                );
                None
            }
        }
    }

    /// Watches every directory below `top`; with `report`, also reports every entry, since
    /// they were made before any watch could see them.
    fn watch_below(&mut self, top: &Path, report: bool) {
        let root = self.root.clone();
        let stop = self.stop.clone();
        walk(&root, top, &stop, |rel, meta| {
            if meta.is_dir() {
                self.watch(rel);
            }
            if report {
                self.sink.record(describe(
                    &root,
                    rel,
                    Some(meta),
                    false,
                    Source::Inotify,
                    None,
                ));
            }
        });
    }

    fn watch_limit(&mut self) {
        if !self.limit_warned {
            self.limit_warned = true;
            tracing::warn!(
                root = %self.root.display(),
                "inotify watch limit reached (fs.inotify.max_user_watches = {}): changes in unwatched directories are found only by the periodic scan; raise it with sysctl",
                sysctl("fs/inotify/max_user_watches")
            );
        }
        self.limit_hit = true;
    }

    /// One `Rescan` per read at most for directories left unwatched, however many there were.
    fn report_watch_limit(&mut self) {
        if std::mem::take(&mut self.limit_hit) {
            self.sink.record(rescan(Source::Inotify));
        }
    }
}

impl EventStream for Inotify {
    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn process(&mut self, bytes: &[u8]) {
        let stop = self.stop.clone();
        match each_event(bytes, &stop, parse_event, |event| self.event(event)) {
            Framing::Stopped => return,
            Framing::Malformed { left } => malformed(&self.sink, Source::Inotify, left),
            Framing::Done => {}
        }
        self.report_watch_limit();
    }

    fn deadline(&self) -> Option<Instant> {
        self.moves.first().map(|pending| pending.until)
    }

    fn expire(&mut self) {
        self.flush_moves();
    }

    fn broken(&mut self) {
        self.sink.record(rescan(Source::Inotify));
    }
}

/// Splits the first `struct inotify_event` off `bytes`; `None` when it does not fit.
fn parse_event(bytes: &[u8]) -> Option<(RawEvent<'_>, &[u8])> {
    let wd = i32::from_ne_bytes(array(bytes, 0)?);
    let mask = u32::from_ne_bytes(array(bytes, 4)?);
    let cookie = u32::from_ne_bytes(array(bytes, 8)?);
    let len = usize::try_from(u32::from_ne_bytes(array(bytes, 12)?)).ok()?;
    let end = EVENT_HEADER.checked_add(len)?;
    let name = bytes.get(EVENT_HEADER..end)?;
    let name = name_before_nul(name);
    Some((
        RawEvent {
            wd,
            mask: ReadFlags::from_bits_retain(mask),
            cookie,
            name: (!name.is_empty()).then(|| OsStr::from_bytes(name)),
        },
        bytes.get(end..)?,
    ))
}

// What both fallback watchers share.

/// How long `stop` waits for the reading thread before leaving it to finish on its own.
const STOP_WAIT: Duration = Duration::from_millis(200);

/// Bytes read from the kernel at once: room for hundreds of events per read(2).
const READ_BUFFER: usize = 64 * 1024;

/// One kernel event stream, read by the thread [`spawn`] starts.
/// How the events of one read(2) were handed on.
pub(super) enum Framing {
    Done,
    /// The watcher is stopping; the rest of the read was left.
    Stopped,
    /// An event could not be framed; the `left` bytes from it on were dropped.
    Malformed {
        left: usize,
    },
}

/// Hands each event of one read(2) to `handle`, in order, until the watcher stops. A
/// malformed event ends the read: nothing after it can be framed.
pub(super) fn each_event<'a, E>(
    mut bytes: &'a [u8],
    stop: &AtomicBool,
    parse: impl Fn(&'a [u8]) -> Option<(E, &'a [u8])>,
    mut handle: impl FnMut(E),
) -> Framing {
    while !bytes.is_empty() {
        if stop.load(Ordering::Acquire) {
            return Framing::Stopped;
        }
        let Some((event, rest)) = parse(bytes) else {
            return Framing::Malformed { left: bytes.len() };
        };
        handle(event);
        bytes = rest;
    }
    Framing::Done
}

/// A read that could not be framed lost events: log it and ask for a full rescan.
pub(super) fn malformed(sink: &Sink, source: Source, left: usize) {
    tracing::error!(
        len = left,
        ?source,
        "malformed watcher event: dropping the rest of the read, asking for a full rescan"
    );
    sink.record(rescan(source));
}

pub(super) trait EventStream: Send + 'static {
    /// The descriptor to poll and read.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Handles the bytes one read(2) returned.
    fn process(&mut self, bytes: &[u8]);
    /// When [`EventStream::expire`] must run even if nothing else arrives.
    fn deadline(&self) -> Option<Instant> {
        None
    }
    fn expire(&mut self) {}
    /// Reading failed and the thread ends: report that changes will go unseen.
    fn broken(&mut self);
}

/// Starts the thread that reads `stream` until the returned watcher is stopped.
pub(super) fn spawn(
    kind: WatcherKind,
    root: &Path,
    stop: Arc<AtomicBool>,
    stream: impl EventStream,
) -> Result<Box<dyn Watcher>, CaptureError> {
    // Closing the write end wakes the thread out of poll(2) at once: stop needs no timeout.
    let (wake_read, wake_write) =
        rustix::pipe::pipe_with(PipeFlags::CLOEXEC).map_err(|err| io_error(root, err))?;
    let (exited_tx, exited) = mpsc::channel::<()>();
    let thread_stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("capture-{kind:?}").to_lowercase())
        .spawn(move || {
            // Dropped when the thread ends, however it ends: that is what stop waits for.
            let _exited = exited_tx;
            read_events(stream, &thread_stop, &wake_read);
        })
        .map_err(|source| CaptureError::Io {
            path: root.to_path_buf(),
            source,
        })?;
    Ok(Box::new(Running {
        kind,
        stop,
        wake: Some(wake_write),
        exited,
        thread: Some(thread),
    }))
}

fn read_events(mut stream: impl EventStream, stop: &AtomicBool, wake: &OwnedFd) {
    let mut buffer = vec![0u8; READ_BUFFER];
    while !stop.load(Ordering::Acquire) {
        let timeout = stream.deadline().map_or(-1, |at| {
            let left = at.saturating_duration_since(Instant::now());
            // Rounded up: waking before the deadline would only poll again.
            i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
        });
        let mut fds = [
            libc::pollfd {
                fd: stream.fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is an array of two initialised pollfd that outlives the call, and
        // both descriptors stay open for the whole call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("cannot wait for file events: {err}; the watcher stops");
            stream.broken();
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            match rustix::io::read(stream.fd(), &mut buffer[..]) {
                Ok(0) => {
                    tracing::error!("the kernel ended the file event stream; the watcher stops");
                    stream.broken();
                    return;
                }
                Ok(len) => stream.process(buffer.get(..len).unwrap_or_default()),
                Err(Errno::AGAIN | Errno::INTR) => {}
                Err(err) => {
                    tracing::error!("cannot read file events: {err}; the watcher stops");
                    stream.broken();
                    return;
                }
            }
        } else if fds[0].revents != 0 {
            tracing::error!(
                revents = fds[0].revents,
                "the file event descriptor failed; the watcher stops"
            );
            stream.broken();
            return;
        }
        // A steady stream of events would keep poll from ever timing out.
        if stream.deadline().is_some_and(|at| at <= Instant::now()) {
            stream.expire();
        }
    }
}

/// A watcher whose events a [`spawn`]ed thread reads.
struct Running {
    kind: WatcherKind,
    stop: Arc<AtomicBool>,
    /// The write end of the wake-up pipe; dropping it wakes the thread.
    wake: Option<OwnedFd>,
    /// Disconnected when the thread has ended.
    exited: mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    fn signal(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.wake = None;
    }
}

impl Watcher for Running {
    fn kind(&self) -> WatcherKind {
        self.kind
    }

    fn stop(mut self: Box<Self>) {
        let started = Instant::now();
        self.signal();
        match self.exited.recv_timeout(STOP_WAIT) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Only a sink that blocks keeps the thread busy this long; it notices the stop
                // flag after the record it is delivering and then releases the kernel resources.
                tracing::warn!(
                    kind = ?self.kind,
                    "watcher thread is still delivering a change after {STOP_WAIT:?}; not waiting for it"
                );
            }
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if let Some(thread) = self.thread.take() {
                    if thread.join().is_err() {
                        tracing::error!(kind = ?self.kind, "watcher thread panicked");
                    }
                }
            }
        }
        tracing::debug!(kind = ?self.kind, elapsed = ?started.elapsed(), "watcher stopped");
    }
}

impl Drop for Running {
    /// A watcher dropped without `stop` still ends its thread, just without waiting for it.
    fn drop(&mut self) {
        self.signal();
    }
}

/// A change of `path` with no known file id.
pub(super) fn change(path: PathBuf, kind: ChangeKind, source: Source, pid: Option<u32>) -> Change {
    Change {
        path: Some(path),
        file: None,
        kind,
        source,
        pid,
    }
}

/// The record that says events were lost and the whole tree must be compared.
pub(super) fn rescan(source: Source) -> Change {
    Change {
        path: None,
        file: None,
        kind: ChangeKind::Rescan,
        source,
        pid: None,
    }
}

/// `Rmdir` for a directory, `Unlink` for anything else.
pub(super) fn gone_kind(is_dir: bool) -> ChangeKind {
    if is_dir {
        ChangeKind::Rmdir
    } else {
        ChangeKind::Unlink
    }
}

/// Describes a name that just appeared in the tree (`rel`, relative to `root`). Neither
/// inotify nor fanotify tells a symlink, a hard link or a device node from a new file, so the
/// name is looked at now. `is_dir` is what the event said, used if the name is gone already.
pub(super) fn appeared(
    root: &Path,
    rel: PathBuf,
    is_dir: bool,
    source: Source,
    pid: Option<u32>,
) -> Change {
    let meta = fs::symlink_metadata(root.join(&rel)).ok();
    describe(root, &rel, meta.as_ref(), is_dir, source, pid)
}

/// Describes the entry `rel` from its lstat `meta`; see [`appeared`].
pub(super) fn describe(
    root: &Path,
    rel: &Path,
    meta: Option<&fs::Metadata>,
    is_dir: bool,
    source: Source,
    pid: Option<u32>,
) -> Change {
    let Some(meta) = meta else {
        let kind = if is_dir {
            ChangeKind::Mkdir
        } else {
            ChangeKind::Create
        };
        return change(rel.to_path_buf(), kind, source, pid);
    };
    let file_type = meta.file_type();
    let kind = if file_type.is_dir() {
        ChangeKind::Mkdir
    } else if file_type.is_symlink() {
        match fs::read_link(root.join(rel)) {
            Ok(target) => ChangeKind::Symlink { target },
            // Replaced since the lstat: whatever is there now has its own event.
            Err(_) => ChangeKind::Create,
        }
    } else if file_type.is_file() {
        // A second name of a file made by link(2): the record says which file it is.
        if meta.nlink() > 1 {
            ChangeKind::Link { existing: None }
        } else {
            ChangeKind::Create
        }
    } else if file_type.is_fifo()
        || file_type.is_socket()
        || file_type.is_char_device()
        || file_type.is_block_device()
    {
        ChangeKind::Mknod {
            mode: meta.mode(),
            rdev: meta.rdev(),
        }
    } else {
        ChangeKind::Create
    };
    Change {
        path: Some(rel.to_path_buf()),
        file: Some(FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }),
        kind,
        source,
        pid,
    }
}

/// Visits everything below the directory `top` (relative to `root`), parents before their
/// contents, without following symlinks. `visit` gets each entry's path relative to `root` and
/// its lstat. A directory that cannot be read is skipped: it is gone or changing, and the
/// events about that follow.
pub(super) fn walk(
    root: &Path,
    top: &Path,
    stop: &AtomicBool,
    mut visit: impl FnMut(&Path, &fs::Metadata),
) {
    let mut pending = vec![top.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match fs::read_dir(root.join(&dir)) {
            Ok(entries) => entries,
            Err(err) => {
                tracing::debug!(path = %dir.display(), "cannot list directory: {err}");
                continue;
            }
        };
        for entry in entries.flatten() {
            if stop.load(Ordering::Acquire) {
                return;
            }
            let rel = dir.join(entry.file_name());
            // Does not follow symlinks; fails only for an entry removed since the listing.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            visit(&rel, &meta);
            if meta.is_dir() {
                pending.push(rel);
            }
        }
    }
}

/// `base` joined with `below`, without the trailing slash an empty `below` would add.
fn join(base: &Path, below: &Path) -> PathBuf {
    if below.as_os_str().is_empty() {
        base.to_path_buf()
    } else {
        base.join(below)
    }
}

/// The bytes of a NUL-padded kernel name up to its first NUL.
pub(super) fn name_before_nul(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    bytes.get(..end).unwrap_or_default()
}

/// The `N` bytes at `at`, if `bytes` holds them.
pub(super) fn array<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// A kernel limit from /proc/sys, for messages that tell which one to raise.
pub(super) fn sysctl(name: &str) -> String {
    fs::read_to_string(Path::new("/proc/sys").join(name))
        .map(|value| value.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn unavailable(reason: impl Into<String>) -> CaptureError {
    CaptureError::Unavailable {
        kind: WatcherKind::Inotify,
        reason: reason.into(),
    }
}

pub(super) fn io_error(path: &Path, err: impl Into<io::Error>) -> CaptureError {
    CaptureError::Io {
        path: path.to_path_buf(),
        source: err.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `struct inotify_event` with `name` NUL-padded to `name_len` bytes.
    fn event(wd: i32, mask: u32, cookie: u32, name: &[u8], name_len: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&wd.to_ne_bytes());
        bytes.extend_from_slice(&mask.to_ne_bytes());
        bytes.extend_from_slice(&cookie.to_ne_bytes());
        bytes.extend_from_slice(&(name_len as u32).to_ne_bytes());
        bytes.extend_from_slice(name);
        bytes.resize(EVENT_HEADER + name_len, 0);
        bytes
    }

    #[test]
    fn parses_events_back_to_back() {
        let mut bytes = event(3, libc::IN_MOVED_FROM, 7, b"old", 16);
        bytes.extend(event(1, libc::IN_ATTRIB, 0, b"", 0));
        let (first, rest) = parse_event(&bytes).expect("first event");
        assert_eq!(first.wd, 3);
        assert_eq!(first.mask, ReadFlags::MOVED_FROM);
        assert_eq!(first.cookie, 7);
        assert_eq!(first.name, Some(OsStr::new("old")));
        let (second, rest) = parse_event(rest).expect("second event");
        assert_eq!(second.wd, 1);
        assert_eq!(second.name, None);
        assert!(rest.is_empty());
    }

    #[test]
    fn rejects_every_truncation() {
        let bytes = event(3, libc::IN_CREATE, 0, b"name", 16);
        for cut in 0..bytes.len() {
            assert!(parse_event(&bytes[..cut]).is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn rejects_a_name_longer_than_the_buffer() {
        let mut bytes = event(3, libc::IN_CREATE, 0, b"name", 16);
        bytes[12..16].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_event(&bytes).is_none());
    }

    #[test]
    fn joins_without_a_trailing_slash() {
        assert_eq!(join(Path::new("a"), Path::new("")), PathBuf::from("a"));
        assert_eq!(
            join(Path::new("a"), Path::new("b/c")),
            PathBuf::from("a/b/c")
        );
    }
}
