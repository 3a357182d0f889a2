//! Open file and directory handles, numbered for the kernel.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::dir::DirEntry;
use super::{Errno, Result};

/// An open regular file (or fifo, device...) of the backing folder.
#[derive(Debug)]
pub struct FileHandle {
    fd: OwnedFd,
    pub ino: u64,
    pub writable: bool,
    /// Opened with `O_APPEND`: the backing file's `pwrite` appends wherever the kernel
    /// says, so the written range is read back from the file size.
    pub append: bool,
    /// Whether anything was written, so `release` knows to report a close-after-write.
    pub wrote: AtomicBool,
}

impl FileHandle {
    pub fn new(fd: OwnedFd, ino: u64, writable: bool, append: bool) -> Self {
        FileHandle {
            fd,
            ino,
            writable,
            append,
            wrote: AtomicBool::new(false),
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An open directory: a snapshot of its entries, taken at `opendir` and on rewind, so
/// offsets stay valid while the directory changes underneath.
#[derive(Debug)]
pub struct DirHandle {
    fd: OwnedFd,
    pub entries: Mutex<Vec<DirEntry>>,
}

impl DirHandle {
    pub fn new(fd: OwnedFd) -> Self {
        DirHandle {
            fd,
            entries: Mutex::new(Vec::new()),
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[derive(Debug, Clone)]
enum Handle {
    File(Arc<FileHandle>),
    Dir(Arc<DirHandle>),
}

/// Handle numbers start at 1 so that 0 never names a live handle.
#[derive(Debug)]
pub struct HandleTable {
    next: AtomicU64,
    handles: RwLock<HashMap<u64, Handle>>,
}

impl Default for HandleTable {
    fn default() -> Self {
        HandleTable {
            next: AtomicU64::new(1),
            handles: RwLock::new(HashMap::new()),
        }
    }
}

impl HandleTable {
    fn insert(&self, handle: Handle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.handles.write().insert(fh, handle);
        fh
    }

    pub fn insert_file(&self, handle: FileHandle) -> u64 {
        self.insert(Handle::File(Arc::new(handle)))
    }

    pub fn insert_dir(&self, handle: DirHandle) -> u64 {
        self.insert(Handle::Dir(Arc::new(handle)))
    }

    /// The open file `fh`; EBADF if it is not an open file.
    pub fn file(&self, fh: u64) -> Result<Arc<FileHandle>> {
        match self.handles.read().get(&fh) {
            Some(Handle::File(file)) => Ok(file.clone()),
            _ => Err(Errno::BADF),
        }
    }

    /// The open directory `fh`; EBADF if it is not an open directory.
    pub fn dir(&self, fh: u64) -> Result<Arc<DirHandle>> {
        match self.handles.read().get(&fh) {
            Some(Handle::Dir(dir)) => Ok(dir.clone()),
            _ => Err(Errno::BADF),
        }
    }

    /// Closes the open file `fh`, returning it for a last look.
    pub fn remove_file(&self, fh: u64) -> Result<Arc<FileHandle>> {
        let mut handles = self.handles.write();
        match handles.get(&fh) {
            Some(Handle::File(_)) => match handles.remove(&fh) {
                Some(Handle::File(file)) => Ok(file),
                _ => Err(Errno::BADF),
            },
            _ => Err(Errno::BADF),
        }
    }

    pub fn remove_dir(&self, fh: u64) -> Result<()> {
        let mut handles = self.handles.write();
        match handles.get(&fh) {
            Some(Handle::Dir(_)) => {
                handles.remove(&fh);
                Ok(())
            }
            _ => Err(Errno::BADF),
        }
    }
}
