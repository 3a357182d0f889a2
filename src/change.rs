//! Change records: the one type every capture source produces (the FUSE daemon, the eBPF
//! watcher, the fanotify/inotify fallbacks and the reconcile scan), so that everything
//! downstream sees one stream.
//!
//! Records are hints, not the truth (the backing folder is): a consumer that misses one
//! finds the difference at the next reconcile scan.

use std::path::PathBuf;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Identifies a file in the backing folder independently of its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// A timestamp change requested by `utimensat` and friends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeChange {
    Now,
    At(SystemTime),
}

/// The attributes one `setattr` call changed; `None` means unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeChange>,
    pub mtime: Option<TimeChange>,
}

/// What happened to the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A regular file was created (by `create`, or `mknod` of a regular file).
    Create,
    /// `len` bytes were written at `offset`.
    Write {
        offset: u64,
        len: u64,
    },
    /// The file was truncated to `size` when it was opened with `O_TRUNC`.
    Truncate {
        size: u64,
    },
    /// Space was allocated or deallocated (`mode` holds the `FALLOC_FL_*` flags).
    Fallocate {
        offset: u64,
        len: u64,
        mode: i32,
    },
    /// Mode, ownership, size or times changed.
    SetAttr(AttrChange),
    Mkdir,
    /// A fifo, socket or device node was created.
    Mknod {
        mode: u32,
        rdev: u64,
    },
    Symlink {
        target: PathBuf,
    },
    /// A new name was made for an existing file; `path` is the new name.
    Link {
        existing: Option<PathBuf>,
    },
    Unlink,
    Rmdir,
    /// `path` was renamed to `to`; with `exchange` the two names swapped their files.
    Rename {
        to: Option<PathBuf>,
        exchange: bool,
    },
    SetXattr {
        name: String,
    },
    RemoveXattr {
        name: String,
    },
    /// The data (and with `datasync == false` the metadata) reached stable storage.
    Fsync {
        datasync: bool,
    },
    /// The last reference to a handle that was opened for writing was closed.
    Closed,
    /// The file changed in ways not known exactly (a handle the kernel wrote through by
    /// passthrough was closed, or a scan found new content): compare it with what is known.
    Modified,
    /// Events may have been lost (a queue overflowed): the whole tree must be rescanned.
    /// `path` is `None`.
    Rescan,
}

/// Who saw the change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The FUSE daemon performed it for a program using the mount.
    Fuse,
    /// The eBPF watcher saw a syscall on the backing folder.
    Ebpf,
    Fanotify,
    Inotify,
    /// The reconcile scan found a difference from the index.
    Scan,
}

/// One change to the backing folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Path relative to the backing folder; `None` when the kernel could not name the file
    /// any more (it was unlinked while open, or its path is longer than `PATH_MAX`).
    pub path: Option<PathBuf>,
    /// The file the change applies to, when known.
    pub file: Option<FileId>,
    pub kind: ChangeKind,
    pub source: Source,
    /// The process that made the change, when the source knows it.
    pub pid: Option<u32>,
}

/// Where change records go: the capture queue of the actor graph, or a test's collector.
pub trait ChangeSink: Send + Sync {
    fn record(&self, change: Change);
}
