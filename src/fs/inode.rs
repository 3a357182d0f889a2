//! The inode table: which backing file each inode number the kernel holds refers to.
//!
//! Every known inode keeps an `O_PATH` descriptor to its backing file, so every operation
//! works relative to a descriptor and never re-joins path strings (no races with renames,
//! no `PATH_MAX` limit). Holding the descriptor also pins the backing inode, so its number
//! cannot be reused while the kernel still knows it.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::change::FileId;

/// The inode number the kernel uses for the mount's root.
pub const ROOT_INO: u64 = 1;

/// Inode numbers handed out for files whose backing number cannot be used as is (another
/// device under the backing folder, or a backing number equal to `ROOT_INO`) start here,
/// far above any number a real filesystem hands out.
const SYNTHETIC_INO_BASE: u64 = 1 << 62;

/// A backing file the kernel currently knows.
#[derive(Debug)]
pub struct Inode {
    pub ino: u64,
    pub id: FileId,
    /// `S_IFMT` bits of the backing file: they never change for a given inode.
    pub file_type: u32,
    path_fd: OwnedFd,
}

impl Inode {
    /// The `O_PATH` descriptor of the backing file.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.path_fd.as_fd()
    }

    pub fn is_dir(&self) -> bool {
        self.file_type == libc::S_IFDIR
    }

    pub fn is_symlink(&self) -> bool {
        self.file_type == libc::S_IFLNK
    }

    /// A path that reopens this exact file through procfs, for the few calls that have no
    /// descriptor-relative form for `O_PATH` descriptors (open, chmod, xattrs).
    pub fn proc_path(&self) -> String {
        use std::os::fd::AsRawFd;
        format!("/proc/self/fd/{}", self.path_fd.as_raw_fd())
    }
}

struct Entry {
    inode: Arc<Inode>,
    /// How many lookups the kernel holds; the entry goes when it reaches zero.
    lookups: u64,
}

#[derive(Default)]
struct Tables {
    entries: HashMap<u64, Entry>,
    /// Numbers assigned to backing files that could not keep their own number; kept for
    /// the life of the mount so a file always shows the same number.
    synthetic: HashMap<FileId, u64>,
}

/// All inodes the kernel knows, keyed by the inode number it uses.
pub struct InodeTable {
    root_dev: u64,
    root_id: FileId,
    tables: RwLock<Tables>,
}

impl InodeTable {
    /// A table holding only the root, backed by `root_fd` (an `O_PATH` descriptor).
    pub fn new(root_fd: OwnedFd, root_id: FileId) -> Self {
        let root = Arc::new(Inode {
            ino: ROOT_INO,
            id: root_id,
            file_type: libc::S_IFDIR,
            path_fd: root_fd,
        });
        let mut tables = Tables::default();
        tables.entries.insert(
            ROOT_INO,
            Entry {
                inode: root,
                // The root is never forgotten.
                lookups: 1,
            },
        );
        InodeTable {
            root_dev: root_id.dev,
            root_id,
            tables: RwLock::new(tables),
        }
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Inode>> {
        self.tables
            .read()
            .entries
            .get(&ino)
            .map(|e| e.inode.clone())
    }

    /// The inode number the kernel sees for a backing file. Files on the backing folder's
    /// own device keep their backing number, so numbers survive a remount too.
    pub fn ino_for(&self, id: FileId) -> u64 {
        if id == self.root_id {
            return ROOT_INO;
        }
        if id.dev == self.root_dev && id.ino != ROOT_INO && id.ino < SYNTHETIC_INO_BASE {
            return id.ino;
        }
        if let Some(&ino) = self.tables.read().synthetic.get(&id) {
            return ino;
        }
        let mut tables = self.tables.write();
        let next = SYNTHETIC_INO_BASE + tables.synthetic.len() as u64;
        *tables.synthetic.entry(id).or_insert(next)
    }

    /// Records one more kernel lookup of the backing file behind `path_fd`, adding it to the
    /// table if it is new. Returns the inode; `path_fd` is dropped when the file was known.
    pub fn remember(&self, path_fd: OwnedFd, id: FileId, file_type: u32) -> Arc<Inode> {
        let ino = self.ino_for(id);
        let mut tables = self.tables.write();
        // `ino_for` is one-to-one on backing files, and a known file is pinned by its
        // descriptor, so a number already in the table is the same file.
        if let Some(entry) = tables.entries.get_mut(&ino) {
            entry.lookups += 1;
            return entry.inode.clone();
        }
        let inode = Arc::new(Inode {
            ino,
            id,
            file_type,
            path_fd,
        });
        tables.entries.insert(
            ino,
            Entry {
                inode: inode.clone(),
                lookups: 1,
            },
        );
        inode
    }

    /// Drops `count` kernel lookups of `ino`; the entry and its descriptor go at zero.
    pub fn forget(&self, ino: u64, count: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut tables = self.tables.write();
        if let Some(entry) = tables.entries.get_mut(&ino) {
            entry.lookups = entry.lookups.saturating_sub(count);
            if entry.lookups == 0 {
                tables.entries.remove(&ino);
            }
        }
    }

    /// How many inodes the kernel currently holds (for tests and metrics).
    pub fn len(&self) -> usize {
        self.tables.read().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
