//! The overlay core: a passthrough filesystem over a backing folder, independent of FUSE.
//!
//! Every operation is done on the backing folder relative to file descriptors (`openat`,
//! `renameat2`, `fchownat`, `O_PATH` handles), never by joining path strings. Errors are
//! plain errnos ([`Errno`]); the FUSE adapter forwards them unchanged. Each successful
//! mutating operation emits one [`Change`] to the configured [`ChangeSink`].

mod dir;
mod file;
mod handle;
pub mod inode;
mod xattr;

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustix::fs::{AtFlags, Mode, OFlags, Stat, Timespec, Timestamps, CWD};
pub use rustix::io::Errno;

pub use crate::change::{AttrChange, Change, ChangeKind, ChangeSink, FileId, Source, TimeChange};
pub use dir::DirEntry;
pub use file::Opened;
use handle::HandleTable;
use inode::{Inode, InodeTable};
pub use xattr::XattrReply;

/// The result of an overlay operation: a value or the errno the caller sees.
pub type Result<T> = std::result::Result<T, Errno>;

/// Who asked for an operation, as the kernel reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// A file's attributes as the mount shows them: the backing file's `stat` with the
/// mount's inode number.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub ino: u64,
    pub stat: Stat,
}

/// A kernel cache entry that a change behind the mount's back made stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stale {
    /// The attributes and cached data of an inode.
    Inode(u64),
    /// A name in a directory (also a cached "no such name").
    Entry {
        parent: u64,
        name: std::ffi::OsString,
    },
}

/// How the overlay behaves; set once at mount time.
#[derive(Debug, Clone)]
pub struct OverlayOptions {
    /// Give files created by other users to those users (needs root and `allow_other`).
    pub create_as_caller: bool,
    /// With `durability=sync`: what an `fsync` waits for once the data is durable here.
    pub fsync_barrier: Option<Arc<dyn FsyncBarrier>>,
}

/// Makes an `fsync` on the mount wait for more than the local disk (with
/// `durability=sync`: every connected peer). The core knows nothing of peers; it takes a
/// ticket before the data is flushed and the change recorded, and waits on it after.
pub trait FsyncBarrier: Send + Sync + std::fmt::Debug {
    /// A ticket taken before the `fsync`'s change record is emitted.
    fn begin(&self) -> u64;
    /// Waits until what was recorded for `path` after `ticket` is durable everywhere it
    /// must be; an error is returned to the caller of `fsync`.
    fn wait(&self, path: &Path, ticket: u64) -> Result<()>;
}

/// The passthrough overlay over one backing folder.
pub struct OverlayFs {
    root_path: PathBuf,
    inodes: InodeTable,
    handles: HandleTable,
    sink: Arc<dyn ChangeSink>,
    options: OverlayOptions,
}

impl OverlayFs {
    /// Opens the backing folder `root`. Fails if it is not a directory.
    pub fn new(
        root: &Path,
        sink: Arc<dyn ChangeSink>,
        options: OverlayOptions,
    ) -> std::io::Result<Self> {
        let root_path = std::fs::canonicalize(root)?;
        let root_fd = rustix::fs::open(
            &root_path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let stat = rustix::fs::fstat(&root_fd)?;
        let root_id = file_id(&stat);
        Ok(OverlayFs {
            root_path,
            inodes: InodeTable::new(root_fd, root_id),
            handles: HandleTable::default(),
            sink,
            options,
        })
    }

    /// The canonical path of the backing folder.
    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    /// How many inodes the kernel currently holds.
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    fn inode(&self, ino: u64) -> Result<Arc<Inode>> {
        // An unknown number means the kernel and we disagree; ESTALE tells it to look up again.
        self.inodes.get(ino).ok_or(Errno::STALE)
    }

    /// Looks `name` up in directory `parent` and counts one kernel reference to it.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        let parent = self.inode(parent)?;
        check_name(name)?;
        self.lookup_in(&parent, name).map(|(_, attr)| attr)
    }

    /// Looks `name` up in `parent` and counts one kernel reference to it.
    fn lookup_in(&self, parent: &Inode, name: &OsStr) -> Result<(Arc<Inode>, Attr)> {
        let fd = rustix::fs::openat(
            parent.fd(),
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        self.remember(fd)
    }

    /// Adds the file behind `path_fd` to the inode table (one more kernel reference).
    fn remember(&self, path_fd: OwnedFd) -> Result<(Arc<Inode>, Attr)> {
        let stat = stat_fd(path_fd.as_fd())?;
        let inode = self
            .inodes
            .remember(path_fd, file_id(&stat), stat.st_mode & libc::S_IFMT);
        Ok((
            inode.clone(),
            Attr {
                ino: inode.ino,
                stat,
            },
        ))
    }

    /// The kernel dropped `count` references to `ino`.
    pub fn forget(&self, ino: u64, count: u64) {
        self.inodes.forget(ino, count);
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let inode = self.inode(ino)?;
        self.attr_of(&inode)
    }

    fn attr_of(&self, inode: &Inode) -> Result<Attr> {
        Ok(Attr {
            ino: inode.ino,
            stat: stat_fd(inode.fd())?,
        })
    }

    /// chmod, chown, truncate and utimens in one call, as the kernel sends them. `fh` is the
    /// open handle the change came through, if any (`ftruncate`, `fchmod`).
    pub fn setattr(
        &self,
        ino: u64,
        fh: Option<u64>,
        change: AttrChange,
        caller: Caller,
    ) -> Result<Attr> {
        let inode = self.inode(ino)?;
        let handle_fd = match fh {
            Some(fh) => self.handles.file(fh).ok(),
            None => None,
        };
        if let Some(mode) = change.mode {
            let mode = Mode::from_raw_mode(mode & 0o7777);
            match &handle_fd {
                Some(handle) => rustix::fs::fchmod(handle.fd(), mode)?,
                // chmod follows symlinks, so the kernel never sends one for a symlink.
                None => rustix::fs::chmodat(CWD, inode.proc_path(), mode, AtFlags::empty())?,
            }
        }
        if change.uid.is_some() || change.gid.is_some() {
            rustix::fs::chownat(
                inode.fd(),
                "",
                change.uid.map(rustix::fs::Uid::from_raw),
                change.gid.map(rustix::fs::Gid::from_raw),
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
        if let Some(size) = change.size {
            match &handle_fd {
                Some(handle) => rustix::fs::ftruncate(handle.fd(), size)?,
                None => {
                    let fd = rustix::fs::open(
                        inode.proc_path(),
                        OFlags::WRONLY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )?;
                    rustix::fs::ftruncate(&fd, size)?;
                }
            }
        }
        if change.atime.is_some() || change.mtime.is_some() {
            let times = Timestamps {
                last_access: timespec(change.atime),
                last_modification: timespec(change.mtime),
            };
            rustix::fs::utimensat(
                inode.fd(),
                "",
                &times,
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
        let attr = self.attr_of(&inode)?;
        self.emit(&inode, None, ChangeKind::SetAttr(change), caller);
        Ok(attr)
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        let target = rustix::fs::readlinkat(inode.fd(), "", Vec::new())?;
        Ok(target.into_bytes())
    }

    pub fn statfs(&self, ino: u64) -> Result<rustix::fs::StatVfs> {
        let inode = self.inode(ino)?;
        rustix::fs::fstatvfs(inode.fd())
    }

    /// `access(2)` for the daemon itself; with `default_permissions` the kernel checks
    /// the caller's rights before it asks.
    pub fn access(&self, ino: u64, mask: i32) -> Result<()> {
        let inode = self.inode(ino)?;
        let access = rustix::fs::Access::from_bits_retain(mask as u32);
        rustix::fs::accessat(inode.fd(), "", access, AtFlags::EMPTY_PATH)
    }

    /// What the kernel may have cached about a change made behind the mount's back: the
    /// file's inode, and for names that appeared, vanished or moved, the directory entries
    /// and the directories' own attributes. Only inodes the kernel holds are named.
    pub fn stale_after(&self, change: &Change) -> Vec<Stale> {
        let mut stale = Vec::new();
        if let Some(id) = change.file {
            self.push_known_inode(&mut stale, self.inodes.ino_for(id));
        }
        let Some(path) = change.path.as_deref() else {
            return stale;
        };
        let names_changed = matches!(
            change.kind,
            ChangeKind::Create
                | ChangeKind::Mkdir
                | ChangeKind::Mknod { .. }
                | ChangeKind::Symlink { .. }
                | ChangeKind::Link { .. }
                | ChangeKind::Unlink
                | ChangeKind::Rmdir
                | ChangeKind::Rename { .. }
        );
        if names_changed {
            self.push_entry(&mut stale, path);
            if let ChangeKind::Rename { to: Some(to), .. } = &change.kind {
                self.push_entry(&mut stale, to);
            }
        } else if change.file.is_none() {
            if let Some(ino) = self.backing_ino(path) {
                self.push_known_inode(&mut stale, ino);
            }
        }
        stale
    }

    fn push_known_inode(&self, stale: &mut Vec<Stale>, ino: u64) {
        if self.inodes.get(ino).is_some() && !stale.contains(&Stale::Inode(ino)) {
            stale.push(Stale::Inode(ino));
        }
    }

    /// The entry `path` and its directory's attributes (link count, times).
    fn push_entry(&self, stale: &mut Vec<Stale>, path: &Path) {
        let (Some(name), Some(parent)) = (path.file_name(), path.parent()) else {
            return;
        };
        let Some(parent) = self.backing_ino(parent) else {
            return;
        };
        if self.inodes.get(parent).is_none() {
            return;
        }
        stale.push(Stale::Entry {
            parent,
            name: name.to_os_string(),
        });
        self.push_known_inode(stale, parent);
    }

    /// The mount's inode number for the backing file at `path` (relative), if it exists.
    fn backing_ino(&self, path: &Path) -> Option<u64> {
        if path.as_os_str().is_empty() {
            return Some(inode::ROOT_INO);
        }
        let root = self.inodes.get(inode::ROOT_INO)?;
        let stat = rustix::fs::statat(root.fd(), path, AtFlags::SYMLINK_NOFOLLOW).ok()?;
        Some(self.inodes.ino_for(file_id(&stat)))
    }

    /// The path of a file relative to the backing folder, as the kernel names it now.
    fn relative_path(&self, fd: BorrowedFd<'_>) -> Option<PathBuf> {
        use std::os::fd::AsRawFd;
        let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let full = rustix::fs::readlink(link, Vec::new()).ok()?;
        let full = PathBuf::from(OsStr::from_bytes(full.as_bytes()));
        let relative = full.strip_prefix(&self.root_path).ok()?.to_path_buf();
        // The kernel appends " (deleted)" to the names of unlinked files.
        if full.as_os_str().as_bytes().ends_with(b" (deleted)")
            && stat_fd(fd).map(|s| s.st_nlink == 0).unwrap_or(true)
        {
            return None;
        }
        Some(relative)
    }

    /// Emits the change for `inode`, or for `name` inside directory `inode` when given.
    fn emit(&self, inode: &Inode, name: Option<&OsStr>, kind: ChangeKind, caller: Caller) {
        let base = self.relative_path(inode.fd());
        let (path, file) = match name {
            Some(name) => (base.map(|b| b.join(name)), None),
            None => (base, Some(inode.id)),
        };
        self.sink.record(Change {
            path,
            file,
            kind,
            source: Source::Fuse,
            pid: Some(caller.pid),
        });
    }

    /// Gives a newly created entry to the caller when the daemon runs as root for others.
    fn give_to_caller(
        &self,
        parent: &Inode,
        name: &OsStr,
        caller: Caller,
        parent_stat: &Stat,
    ) -> Result<()> {
        if !self.options.create_as_caller || caller.uid == 0 && caller.gid == 0 {
            return Ok(());
        }
        // In a set-group-ID directory the kernel already gave the entry the directory's
        // group, as it would for the caller; keep it.
        let gid = if parent_stat.st_mode & libc::S_ISGID != 0 {
            None
        } else {
            Some(rustix::fs::Gid::from_raw(caller.gid))
        };
        rustix::fs::chownat(
            parent.fd(),
            name,
            Some(rustix::fs::Uid::from_raw(caller.uid)),
            gid,
            AtFlags::SYMLINK_NOFOLLOW,
        )
    }
}

/// Names from the kernel are single components, but the core never relies on it.
fn check_name(name: &OsStr) -> Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.contains(&b'/') {
        return Err(Errno::INVAL);
    }
    Ok(())
}

fn stat_fd(fd: BorrowedFd<'_>) -> Result<Stat> {
    rustix::fs::statat(fd, "", AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW)
}

fn file_id(stat: &Stat) -> FileId {
    FileId {
        dev: stat.st_dev,
        ino: stat.st_ino,
    }
}

fn timespec(change: Option<TimeChange>) -> Timespec {
    match change {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        Some(TimeChange::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        Some(TimeChange::At(time)) => {
            let (secs, nanos) = match time.duration_since(SystemTime::UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(before) => {
                    // Before 1970: whole seconds down, nanoseconds back up into [0, 1e9).
                    let d = before.duration();
                    let mut secs = -(d.as_secs() as i64);
                    let mut nanos = -(d.subsec_nanos() as i64);
                    if nanos < 0 {
                        secs -= 1;
                        nanos += 1_000_000_000;
                    }
                    (secs, nanos)
                }
            };
            Timespec {
                tv_sec: secs,
                tv_nsec: nanos,
            }
        }
    }
}
