//! The fanotify watcher: one `FAN_MARK_FILESYSTEM` mark on the backing folder's filesystem,
//! reporting directory file handles and names (`FAN_REPORT_DFID_NAME`). It sees every change
//! with the pid that made it, needs no watch per directory, but needs `CAP_SYS_ADMIN` and
//! Linux ≥ 5.9 (≥ 5.17 to pair the two names of a rename), and sees the whole filesystem, so
//! everything outside the backing folder is filtered out here.
//!
//! A directory's handle is turned into a path by opening it (`open_by_handle_at`) and reading
//! the descriptor's name from /proc. That name is the directory's name when the event is
//! read, not when it happened: a record may carry a name a later rename gave.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::inotify::{
    appeared, array, change, describe, each_event, gone_kind, io_error, malformed, name_before_nul,
    rescan, spawn, sysctl, walk, EventStream, Framing,
};
use super::{CaptureError, Sink, WatchSpec, Watcher, WatcherKind};
use crate::change::{AttrChange, ChangeKind, Source};

/// The events every mark asks for, besides those of renames.
const MASK: u64 = libc::FAN_MODIFY
    | libc::FAN_CLOSE_WRITE
    | libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_ATTRIB
    | libc::FAN_ONDIR;

/// Renames as one event with both names (Linux ≥ 5.17).
const RENAME_PAIRED: u64 = libc::FAN_RENAME;

/// Renames as two unrelated halves, on kernels without `FAN_RENAME`.
const RENAME_HALVES: u64 = libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO;

/// The events that name an entry of a directory (or the directory itself, as ".").
const NAMED: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MODIFY
    | libc::FAN_ATTRIB
    | libc::FAN_CLOSE_WRITE
    | RENAME_HALVES;

/// Size of `struct fanotify_event_metadata`.
const METADATA_LEN: usize = 24;

/// Size of `struct fanotify_event_info_fid` plus the fixed part of `struct file_handle`: where
/// the handle's bytes start in an info record.
const FID_HEADER: usize = 20;

/// Directory resolutions kept at most. The cache is dropped whenever a directory is renamed,
/// so it only saves the open and readlink for directories written to repeatedly.
const CACHE_LIMIT: usize = 4096;

/// Starts watching `spec.root` and everything below it; reports to `sink` from its own thread.
pub fn start(spec: &WatchSpec, sink: Sink) -> Result<Box<dyn Watcher>, CaptureError> {
    let root = spec.root.as_path();
    let root_c = CString::new(root.as_os_str().as_bytes())
        .map_err(|err| io_error(root, io::Error::new(io::ErrorKind::InvalidInput, err)))?;
    let mount = rustix::fs::open(
        root,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|err| io_error(root, err))?;

    // SAFETY: fanotify_init takes no pointers.
    let fd = unsafe {
        libc::fanotify_init(
            libc::FAN_CLASS_NOTIF
                | libc::FAN_REPORT_DFID_NAME
                | libc::FAN_CLOEXEC
                | libc::FAN_NONBLOCK,
            // Unused: with file handles reported, events carry no open descriptor.
            (libc::O_RDONLY | libc::O_CLOEXEC) as libc::c_uint,
        )
    };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::EPERM) => unavailable(NEEDS_ADMIN),
            Some(libc::EINVAL) => unavailable(
                "the kernel cannot report names with fanotify (FAN_REPORT_DFID_NAME needs Linux 5.9 or later): use -o watcher=inotify",
            ),
            Some(libc::ENOSYS) => unavailable(
                "the kernel is built without fanotify: use -o watcher=inotify",
            ),
            Some(libc::EMFILE) => unavailable(format!(
                "too many fanotify groups for this user (fs.fanotify.max_user_groups = {}): raise it or use -o watcher=inotify",
                sysctl("fs/fanotify/max_user_groups")
            )),
            _ => io_error(root, err),
        });
    }
    // SAFETY: fanotify_init returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };

    let paired = match mark(&fd, &root_c, MASK | RENAME_PAIRED) {
        Ok(()) => true,
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            tracing::info!("kernel has no FAN_RENAME (Linux < 5.17): renames are reported as a removal and a creation");
            mark(&fd, &root_c, MASK | RENAME_HALVES).map_err(|err| mark_error(root, err))?;
            false
        }
        Err(err) => return Err(mark_error(root, err)),
    };

    let handle_error = |err: io::Error| match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) => unavailable(format!(
            "the filesystem of {} has no file handles: use -o watcher=inotify",
            root.display()
        )),
        _ => io_error(root, err),
    };
    let root_handle = handle_of(&root_c).map_err(handle_error)?;
    let root_entry = root_entry(root).map_err(handle_error)?;
    // The root's name as /proc shows directories opened by handle: every resolved directory
    // is compared with this, so that symlinks or bind mounts in spec.root cannot make an
    // inside directory look outside.
    let shown_root = open_handle(mount.as_fd(), &root_handle)
        .and_then(|dir| fd_path(dir.as_fd()))
        .map_err(|err| match err.raw_os_error() {
            Some(libc::EPERM) => unavailable(
                "opening directories by handle needs CAP_DAC_READ_SEARCH: run filesync as root or use -o watcher=inotify",
            ),
            Some(libc::ENOENT) => unavailable(
                "/proc is not mounted, so directories cannot be named: mount it or use -o watcher=inotify",
            ),
            _ => io_error(root, err),
        })?;

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = Fanotify {
        fd,
        mount,
        root: shown_root,
        root_entry,
        ignore: spec.ignore_pids.clone(),
        sink,
        stop: stop.clone(),
        dirs: HashMap::new(),
    };
    tracing::info!(
        root = %root.display(),
        paired_renames = paired,
        "fanotify watcher started"
    );
    spawn(WatcherKind::Fanotify, root, stop, watcher)
}

const NEEDS_ADMIN: &str =
    "fanotify filesystem marks need CAP_SYS_ADMIN: run filesync as root or use -o watcher=inotify";

fn mark(fd: &OwnedFd, root: &CString, mask: u64) -> io::Result<()> {
    // SAFETY: `root` is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::fanotify_mark(
            fd.as_raw_fd(),
            libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
            mask,
            libc::AT_FDCWD,
            root.as_ptr(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn mark_error(root: &Path, err: io::Error) -> CaptureError {
    match err.raw_os_error() {
        Some(libc::EPERM) => unavailable(NEEDS_ADMIN),
        Some(libc::ENODEV | libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL) => unavailable(format!(
            "fanotify cannot watch the filesystem of {} by file handle ({err}): use -o watcher=inotify",
            root.display()
        )),
        Some(libc::ENOSPC) => unavailable(format!(
            "too many fanotify marks for this user (fs.fanotify.max_user_marks = {}): raise it or use -o watcher=inotify",
            sysctl("fs/fanotify/max_user_marks")
        )),
        _ => io_error(root, err),
    }
}

fn unavailable(reason: impl Into<String>) -> CaptureError {
    CaptureError::Unavailable {
        kind: WatcherKind::Fanotify,
        reason: reason.into(),
    }
}

/// The state of the fanotify reading thread.
struct Fanotify {
    fd: OwnedFd,
    /// The backing folder, opened: handles are opened through its mount.
    mount: OwnedFd,
    /// The backing folder as /proc names it.
    root: PathBuf,
    /// The backing folder as an entry of its parent: how its removal or rename shows.
    root_entry: Option<RootEntry>,
    ignore: Vec<u32>,
    sink: Sink,
    stop: Arc<AtomicBool>,
    /// Directory handle → path relative to the root, `None` when outside it.
    dirs: HashMap<Vec<u8>, Option<PathBuf>>,
}

/// One event's metadata and its info records.
struct RawEvent<'a> {
    mask: u64,
    pid: i32,
    info: Info<'a>,
}

/// The info records of one event that this watcher uses.
#[derive(Default)]
struct Info<'a> {
    /// Directory and entry name (`.` for the directory itself).
    entry: Option<Named<'a>>,
    /// The old and new names of a `FAN_RENAME`.
    old: Option<Named<'a>>,
    new: Option<Named<'a>>,
}

/// The backing folder's parent directory (handle) and its name there.
struct RootEntry {
    parent: Vec<u8>,
    name: Vec<u8>,
}

#[derive(Clone, Copy)]
struct Named<'a> {
    /// `struct file_handle` of the directory, as the kernel reported it.
    dir: &'a [u8],
    name: &'a [u8],
}

impl Fanotify {
    fn record(&self, path: PathBuf, kind: ChangeKind, pid: Option<u32>) {
        self.sink.record(change(path, kind, Source::Fanotify, pid));
    }

    fn event(&mut self, event: RawEvent<'_>) {
        let mask = event.mask;
        if mask & libc::FAN_Q_OVERFLOW != 0 {
            tracing::warn!(
                root = %self.root.display(),
                "fanotify queue overflowed (fs.fanotify.max_queued_events = {}): events were lost, asking for a full rescan",
                sysctl("fs/fanotify/max_queued_events")
            );
            // Lost renames may have made cached names wrong.
            self.dirs.clear();
            self.sink.record(rescan(Source::Fanotify));
            return;
        }
        // 0 is a process in a pid namespace this one cannot see.
        let pid = u32::try_from(event.pid).ok().filter(|pid| *pid != 0);
        if pid.is_some_and(|pid| self.ignore.contains(&pid)) {
            return;
        }
        let is_dir = mask & libc::FAN_ONDIR != 0;
        if is_dir && self.touches_root(mask, &event.info) {
            tracing::warn!(
                root = %self.root.display(),
                "the watched folder was deleted, moved or replaced: what is reported below it may stop"
            );
            self.sink.record(rescan(Source::Fanotify));
        }
        if mask & libc::FAN_RENAME != 0 {
            self.renamed(event.info.old, event.info.new, is_dir, pid);
        }
        if mask & NAMED == 0 {
            return;
        }
        if is_dir && mask & RENAME_HALVES != 0 {
            self.dirs.clear();
        }
        let Some(path) = event.info.entry.and_then(|entry| self.path_of(entry)) else {
            return;
        };
        self.named(path, mask, is_dir, pid);
    }

    /// The changes one event reports about one name, in the order they can have happened.
    fn named(&mut self, path: PathBuf, mask: u64, is_dir: bool, pid: Option<u32>) {
        let appears = mask & (libc::FAN_CREATE | libc::FAN_MOVED_TO) != 0;
        let goes = mask & (libc::FAN_DELETE | libc::FAN_MOVED_FROM) != 0;
        // The kernel merges same-name events, so a removal and a creation may arrive as one
        // event without their order: the name's existence now tells which came last.
        let gone_first = appears && goes && fs::symlink_metadata(self.root.join(&path)).is_ok();
        if gone_first {
            self.record(path.clone(), gone_kind(is_dir), pid);
        }
        if appears {
            self.arrived(path.clone(), is_dir, mask & libc::FAN_MOVED_TO != 0, pid);
        }
        if mask & libc::FAN_MODIFY != 0 {
            self.record(path.clone(), ChangeKind::Modified, pid);
        }
        if mask & libc::FAN_ATTRIB != 0 {
            self.record(
                path.clone(),
                ChangeKind::SetAttr(AttrChange::default()),
                pid,
            );
        }
        if mask & libc::FAN_CLOSE_WRITE != 0 {
            self.record(path.clone(), ChangeKind::Closed, pid);
        }
        if goes && !gone_first {
            self.record(path, gone_kind(is_dir), pid);
        }
    }

    fn renamed(
        &mut self,
        old: Option<Named<'_>>,
        new: Option<Named<'_>>,
        is_dir: bool,
        pid: Option<u32>,
    ) {
        if is_dir {
            // Every cached directory below the renamed one now has another name, and one
            // moved in from outside no longer is outside.
            self.dirs.clear();
        }
        let from = old.and_then(|old| self.path_of(old));
        let to = new.and_then(|new| self.path_of(new));
        match (from, to) {
            (Some(from), Some(to)) => self.record(
                from,
                ChangeKind::Rename {
                    to: Some(to),
                    exchange: false,
                },
                pid,
            ),
            (Some(from), None) => self.record(from, gone_kind(is_dir), pid),
            (None, Some(to)) => self.arrived(to, is_dir, true, pid),
            (None, None) => {}
        }
    }

    /// A name appeared. A directory moved in from outside comes with everything in it, which
    /// no event will report, so that is reported from a walk.
    fn arrived(&mut self, path: PathBuf, is_dir: bool, moved_in: bool, pid: Option<u32>) {
        self.sink.record(appeared(
            &self.root,
            path.clone(),
            is_dir,
            Source::Fanotify,
            pid,
        ));
        if is_dir && moved_in {
            walk(&self.root, &path, &self.stop, |rel, meta| {
                self.sink.record(describe(
                    &self.root,
                    rel,
                    Some(meta),
                    false,
                    Source::Fanotify,
                    pid,
                ));
            });
        }
    }

    /// The path relative to the root that a directory handle and entry name denote; `None`
    /// when it is outside the root or the directory is gone.
    fn path_of(&mut self, entry: Named<'_>) -> Option<PathBuf> {
        let dir = self.resolve(entry.dir)?;
        if entry.name == b"." {
            return Some(dir);
        }
        if entry.name.is_empty() || entry.name.contains(&b'/') || entry.name == b".." {
            tracing::debug!(name = ?OsStr::from_bytes(entry.name), "skipping event with an invalid name");
            return None;
        }
        Some(dir.join(OsStr::from_bytes(entry.name)))
    }

    fn resolve(&mut self, handle: &[u8]) -> Option<PathBuf> {
        if let Some(known) = self.dirs.get(handle) {
            return known.clone();
        }
        let dir = match open_handle(self.mount.as_fd(), handle) {
            Ok(dir) => dir,
            Err(err) => {
                // Mostly ESTALE: the directory is gone, and so is whatever happened in it.
                tracing::trace!("directory handle does not open: {err}");
                return None;
            }
        };
        let found = match rustix::fs::fstat(&dir) {
            // A removed directory still opens, with " (deleted)" after its old name.
            Ok(stat) if stat.st_nlink == 0 => None,
            Ok(_) => match fd_path(dir.as_fd()) {
                Ok(path) => path.strip_prefix(&self.root).ok().map(Path::to_path_buf),
                Err(err) => {
                    tracing::debug!("cannot name an opened directory: {err}");
                    return None;
                }
            },
            Err(err) => {
                tracing::debug!("cannot stat an opened directory: {err}");
                return None;
            }
        };
        if self.dirs.len() >= CACHE_LIMIT {
            self.dirs.clear();
        }
        self.dirs.insert(handle.to_vec(), found.clone());
        found
    }

    /// Whether the event removes, renames or replaces the backing folder itself. Its own
    /// `FAN_DELETE_SELF` would come too late: the descriptor this watcher holds on it keeps
    /// the directory from being freed until the watcher stops.
    fn touches_root(&self, mask: u64, info: &Info<'_>) -> bool {
        let Some(root) = &self.root_entry else {
            return false;
        };
        let is_root = |entry: Option<Named<'_>>| {
            entry.is_some_and(|e| e.dir == root.parent && e.name == root.name)
        };
        (mask & (libc::FAN_DELETE | RENAME_HALVES) != 0 && is_root(info.entry))
            || (mask & libc::FAN_RENAME != 0 && (is_root(info.old) || is_root(info.new)))
    }
}

impl EventStream for Fanotify {
    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn process(&mut self, bytes: &[u8]) {
        let stop = self.stop.clone();
        if let Framing::Malformed { left } =
            each_event(bytes, &stop, parse_event, |event| self.event(event))
        {
            malformed(&self.sink, Source::Fanotify, left);
        }
    }

    fn broken(&mut self) {
        self.sink.record(rescan(Source::Fanotify));
    }
}

/// Splits the first event off `bytes`; `None` when it is not a well-formed event.
fn parse_event(bytes: &[u8]) -> Option<(RawEvent<'_>, &[u8])> {
    let event_len = usize::try_from(u32::from_ne_bytes(array(bytes, 0)?)).ok()?;
    let version = *bytes.get(4)?;
    let metadata_len = usize::from(u16::from_ne_bytes(array(bytes, 6)?));
    let mask = u64::from_ne_bytes(array(bytes, 8)?);
    let fd = i32::from_ne_bytes(array(bytes, 16)?);
    let pid = i32::from_ne_bytes(array(bytes, 20)?);
    if version != libc::FANOTIFY_METADATA_VERSION
        || metadata_len < METADATA_LEN
        || event_len < metadata_len
    {
        return None;
    }
    if fd >= 0 {
        // Not expected when file handles are reported; closed so that it cannot leak.
        // SAFETY: the kernel installed this descriptor for this process and nothing else
        // knows of it.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let info = parse_info(bytes.get(metadata_len..event_len)?)?;
    Some((RawEvent { mask, pid, info }, bytes.get(event_len..)?))
}

fn parse_info(mut records: &[u8]) -> Option<Info<'_>> {
    let mut info = Info::default();
    while !records.is_empty() {
        let kind = *records.first()?;
        let len = usize::from(u16::from_ne_bytes(array(records, 2)?));
        // Each record holds at least its own 4-byte header.
        let record = records.get(..len).filter(|_| len >= 4)?;
        match kind {
            libc::FAN_EVENT_INFO_TYPE_DFID_NAME => info.entry = Some(named(record)?),
            libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME => info.old = Some(named(record)?),
            libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME => info.new = Some(named(record)?),
            // Types this watcher did not ask for, or that a newer kernel adds.
            _ => {}
        }
        records = records.get(len..)?;
    }
    Some(info)
}

/// A `struct fanotify_event_info_fid`: the file handle and the bytes after it.
fn fid_record(record: &[u8]) -> Option<(&[u8], &[u8])> {
    let handle_bytes = usize::try_from(u32::from_ne_bytes(array(record, 12)?)).ok()?;
    let end = FID_HEADER.checked_add(handle_bytes)?;
    Some((record.get(12..end)?, record.get(end..)?))
}

fn named(record: &[u8]) -> Option<Named<'_>> {
    let (dir, rest) = fid_record(record)?;
    Some(Named {
        dir,
        name: name_before_nul(rest),
    })
}

/// The backing folder as an entry of its parent; `None` when it is the root of its filesystem,
/// whose parent's events this mark does not see.
fn root_entry(root: &Path) -> io::Result<Option<RootEntry>> {
    let (Some(parent), Some(name)) = (root.parent(), root.file_name()) else {
        return Ok(None);
    };
    if fs::metadata(parent)?.dev() != fs::metadata(root)?.dev() {
        return Ok(None);
    }
    let parent = CString::new(parent.as_os_str().as_bytes())
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    Ok(Some(RootEntry {
        parent: handle_of(&parent)?,
        name: name.as_bytes().to_vec(),
    }))
}

/// The handle of `path` in the layout events use: `struct file_handle` with its bytes.
fn handle_of(path: &CString) -> io::Result<Vec<u8>> {
    let max = libc::MAX_HANDLE_SZ.unsigned_abs() as usize;
    // u32 words: struct file_handle must be 4-byte aligned.
    let mut words = vec![0u32; 2 + max.div_ceil(4)];
    if let Some(first) = words.first_mut() {
        *first = max as u32;
    }
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `words` has room for a file_handle of `max` bytes as its first word says, and
    // `path` is NUL-terminated; both outlive the call.
    let rc = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            path.as_ptr(),
            words.as_mut_ptr().cast(),
            &mut mount_id,
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = words.first().map_or(0, |len| *len as usize);
    if len > max {
        return Err(io::Error::other(
            "the kernel returned an oversized file handle",
        ));
    }
    let mut bytes: Vec<u8> = words.iter().flat_map(|word| word.to_ne_bytes()).collect();
    bytes.truncate(8 + len);
    Ok(bytes)
}

/// Opens (`O_PATH`) the object of `handle`, a `struct file_handle` whose length was checked.
fn open_handle(mount: BorrowedFd<'_>, handle: &[u8]) -> io::Result<OwnedFd> {
    // The record's bytes sit unaligned in the read buffer; the kernel wants struct file_handle
    // 4-byte aligned.
    let mut words = vec![0u32; handle.len().div_ceil(4)];
    for (word, chunk) in words.iter_mut().zip(handle.chunks(4)) {
        let mut bytes = [0u8; 4];
        for (to, from) in bytes.iter_mut().zip(chunk) {
            *to = *from;
        }
        *word = u32::from_ne_bytes(bytes);
    }
    // SAFETY: `words` holds a struct file_handle whose handle_bytes (checked by the parser
    // against the record) fit in it, and it outlives the call.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            words.as_mut_ptr().cast(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open_by_handle_at returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The path the kernel shows for an open descriptor.
fn fd_path(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An info record of `kind` with a directory handle and a NUL-terminated, padded name.
    fn named_record(kind: u8, handle: &[u8], name: &[u8]) -> Vec<u8> {
        let mut record = vec![kind, 0, 0, 0];
        record.extend_from_slice(&[0; 8]); // fsid
        record.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
        record.extend_from_slice(&1i32.to_ne_bytes()); // handle type
        record.extend_from_slice(handle);
        record.extend_from_slice(name);
        record.push(0);
        record.resize(record.len().next_multiple_of(4), 0);
        let len = (record.len() as u16).to_ne_bytes();
        record[2..4].copy_from_slice(&len);
        record
    }

    fn event(mask: u64, pid: i32, records: &[Vec<u8>]) -> Vec<u8> {
        let info: Vec<u8> = records.concat();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&((METADATA_LEN + info.len()) as u32).to_ne_bytes());
        bytes.push(libc::FANOTIFY_METADATA_VERSION);
        bytes.push(0);
        bytes.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        bytes.extend_from_slice(&mask.to_ne_bytes());
        bytes.extend_from_slice(&libc::FAN_NOFD.to_ne_bytes());
        bytes.extend_from_slice(&pid.to_ne_bytes());
        bytes.extend(info);
        bytes
    }

    fn rename() -> Vec<u8> {
        event(
            libc::FAN_RENAME,
            42,
            &[
                named_record(
                    libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME,
                    &[1, 2, 3, 4, 5],
                    b"a",
                ),
                // A record type this watcher does not use is skipped.
                vec![99, 0, 8, 0, 0, 0, 0, 0],
                named_record(libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME, &[6; 8], b"bb"),
            ],
        )
    }

    /// The `struct file_handle` bytes a record built from `f_handle` carries.
    fn handle(f_handle: &[u8]) -> Vec<u8> {
        let mut bytes = (f_handle.len() as u32).to_ne_bytes().to_vec();
        bytes.extend_from_slice(&1i32.to_ne_bytes());
        bytes.extend_from_slice(f_handle);
        bytes
    }

    #[test]
    fn parses_a_rename_and_the_next_event() {
        let mut bytes = rename();
        bytes.extend(event(
            libc::FAN_CREATE | libc::FAN_ONDIR,
            7,
            &[named_record(
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME,
                &[9; 4],
                b"d",
            )],
        ));
        let (first, rest) = parse_event(&bytes).expect("rename");
        assert_eq!(first.mask, libc::FAN_RENAME);
        assert_eq!(first.pid, 42);
        let old = first.info.old.expect("old name");
        assert_eq!(old.dir, handle(&[1, 2, 3, 4, 5]));
        assert_eq!(old.name, b"a");
        let new = first.info.new.expect("new name");
        assert_eq!(new.dir, handle(&[6; 8]));
        assert_eq!(new.name, b"bb");
        assert!(first.info.entry.is_none());

        let (second, rest) = parse_event(rest).expect("create");
        let entry = second.info.entry.expect("entry");
        assert_eq!(entry.name, b"d");
        assert!(rest.is_empty());
    }

    #[test]
    fn rejects_every_truncation() {
        let bytes = rename();
        for cut in 0..bytes.len() {
            assert!(parse_event(&bytes[..cut]).is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn rejects_inconsistent_lengths() {
        let good = rename();

        let mut version = good.clone();
        version[4] = libc::FANOTIFY_METADATA_VERSION + 1;
        assert!(parse_event(&version).is_none(), "unknown metadata version");

        let mut short_metadata = good.clone();
        short_metadata[6..8].copy_from_slice(&8u16.to_ne_bytes());
        assert!(
            parse_event(&short_metadata).is_none(),
            "metadata shorter than its struct"
        );

        let mut long_event = good.clone();
        long_event[0..4].copy_from_slice(&(good.len() as u32 + 4).to_ne_bytes());
        assert!(
            parse_event(&long_event).is_none(),
            "event longer than the read"
        );

        let mut tiny_record = good.clone();
        tiny_record[METADATA_LEN + 2..METADATA_LEN + 4].copy_from_slice(&2u16.to_ne_bytes());
        assert!(
            parse_event(&tiny_record).is_none(),
            "record shorter than its header"
        );

        let mut big_handle = good;
        big_handle[METADATA_LEN + 12..METADATA_LEN + 16].copy_from_slice(&200u32.to_ne_bytes());
        assert!(
            parse_event(&big_handle).is_none(),
            "handle longer than its record"
        );
    }
}
