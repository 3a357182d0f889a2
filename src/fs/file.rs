//! Open files: open/create, read/write and the other operations on an open handle.

use std::ffi::OsStr;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;

use rustix::fs::{FallocateFlags, Mode, OFlags, SeekFrom};

use super::handle::FileHandle;
use super::{check_name, stat_fd, Attr, Caller, ChangeKind, Errno, OverlayFs, Result};

/// An open file, for the adapter to decide how the kernel serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub fh: u64,
    /// A regular file: only these can be served by the kernel straight from the backing
    /// file (FUSE passthrough).
    pub regular: bool,
    pub writable: bool,
}

/// Drops flags that only matter to the open call the kernel already made for the caller,
/// that would make reopening through procfs fail, or (`O_DIRECT`) that would demand aligned
/// buffers the daemon's requests do not have: the kernel already bypasses its cache for
/// `O_DIRECT` callers.
fn backing_open_flags(flags: i32) -> OFlags {
    let requested = OFlags::from_bits_retain(flags as u32);
    let dropped =
        OFlags::CREATE | OFlags::EXCL | OFlags::NOCTTY | OFlags::NOFOLLOW | OFlags::DIRECT;
    (requested - dropped) | OFlags::CLOEXEC
}

fn is_writable(flags: OFlags) -> bool {
    flags.contains(OFlags::WRONLY) || flags.contains(OFlags::RDWR)
}

impl OverlayFs {
    pub fn open(&self, ino: u64, flags: i32, caller: Caller) -> Result<Opened> {
        let inode = self.inode(ino)?;
        if inode.is_dir() {
            return Err(Errno::ISDIR);
        }
        let flags = backing_open_flags(flags);
        let fd = rustix::fs::open(inode.proc_path(), flags, Mode::empty())?;
        let writable = is_writable(flags);
        if writable && flags.contains(OFlags::TRUNC) {
            self.emit(&inode, None, ChangeKind::Truncate { size: 0 }, caller);
        }
        let regular = inode.file_type == libc::S_IFREG;
        Ok(self.add_handle(fd, ino, flags, regular))
    }

    fn add_handle(
        &self,
        fd: std::os::fd::OwnedFd,
        ino: u64,
        flags: OFlags,
        regular: bool,
    ) -> Opened {
        let writable = is_writable(flags);
        let handle = FileHandle::new(fd, ino, writable, flags.contains(OFlags::APPEND));
        Opened {
            fh: self.handles.insert_file(handle),
            regular,
            writable,
        }
    }

    /// Creates and opens `name` in `parent` (`open` with `O_CREAT`), counting one kernel
    /// reference to the new inode.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(Attr, Opened)> {
        let parent = self.inode(parent)?;
        check_name(name)?;
        let parent_stat = stat_fd(parent.fd())?;
        let flags = backing_open_flags(flags);
        let mode = Mode::from_raw_mode(mode & 0o7777);
        // Try an exclusive create first so we know whether the file is new: only a new
        // file changes owner and counts as a creation.
        let exclusive = flags | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
        let (fd, created) = match rustix::fs::openat(parent.fd(), name, exclusive, mode) {
            Ok(fd) => (fd, true),
            Err(Errno::EXIST) if !flags.contains(OFlags::EXCL) => {
                let fd = rustix::fs::openat(parent.fd(), name, flags | OFlags::NOFOLLOW, mode)?;
                (fd, false)
            }
            Err(err) => return Err(err),
        };
        if created {
            self.give_to_caller(&parent, name, caller, &parent_stat)?;
        }
        let (inode, attr) = self.lookup_in(&parent, name)?;
        if created {
            self.emit(&parent, Some(name), ChangeKind::Create, caller);
        } else if is_writable(flags) && flags.contains(OFlags::TRUNC) {
            self.emit(
                &parent,
                Some(name),
                ChangeKind::Truncate { size: 0 },
                caller,
            );
        }
        let regular = inode.file_type == libc::S_IFREG;
        Ok((attr, self.add_handle(fd, inode.ino, flags, regular)))
    }

    /// Runs `f` with the backing descriptor of open file `fh` (to register it for
    /// kernel passthrough).
    pub fn with_backing_fd<R>(&self, fh: u64, f: impl FnOnce(BorrowedFd<'_>) -> R) -> Result<R> {
        let handle = self.handles.file(fh)?;
        Ok(f(handle.fd()))
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let handle = self.handles.file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut filled = 0;
        // Short reads before EOF would be filled with zeroes by the kernel, so loop.
        while filled < buf.len() {
            let n = rustix::io::pread(handle.fd(), &mut buf[filled..], offset + filled as u64)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        buf.truncate(filled);
        Ok(buf)
    }

    /// Writes `data` at `offset` for `caller`.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], caller: Caller) -> Result<u32> {
        let handle = self.handles.file(fh)?;
        let written = rustix::io::pwrite(handle.fd(), data, offset)?;
        handle.wrote.store(true, Ordering::Relaxed);
        kill_suid_after_write(&handle, caller)?;
        let offset = if handle.append {
            // pwrite on an O_APPEND descriptor appends; the data ends at the new size.
            stat_fd(handle.fd())?.st_size as u64 - written as u64
        } else {
            offset
        };
        let inode = self.inode(handle.ino)?;
        self.emit(
            &inode,
            None,
            ChangeKind::Write {
                offset,
                len: written as u64,
            },
            caller,
        );
        // The kernel never asks for more than max_write (far below 4 GiB) at once.
        Ok(u32::try_from(written).unwrap_or(u32::MAX))
    }

    /// Called on every `close()` of a descriptor of the handle: closing a duplicate of the
    /// backing descriptor gives the backing filesystem the same chance to report errors.
    pub fn flush(&self, fh: u64) -> Result<()> {
        let handle = self.handles.file(fh)?;
        drop(rustix::io::dup(handle.fd())?);
        Ok(())
    }

    /// Closes handle `fh`. `written_by_kernel` says the kernel served it by passthrough,
    /// so writes through it (if it was writable) never reached the daemon.
    pub fn release(&self, fh: u64, written_by_kernel: bool, caller: Caller) -> Result<()> {
        let handle = self.handles.remove_file(fh)?;
        let kind = if handle.writable && written_by_kernel {
            ChangeKind::Modified
        } else if handle.writable && handle.wrote.load(Ordering::Relaxed) {
            ChangeKind::Closed
        } else {
            return Ok(());
        };
        if let Ok(inode) = self.inode(handle.ino) {
            self.emit(&inode, None, kind, caller);
        }
        Ok(())
    }

    pub fn fsync(&self, fh: u64, datasync: bool, caller: Caller) -> Result<()> {
        let handle = self.handles.file(fh)?;
        let barrier = self.options.fsync_barrier.as_ref();
        let ticket = barrier.map(|barrier| barrier.begin());
        if datasync {
            rustix::fs::fdatasync(handle.fd())?;
        } else {
            rustix::fs::fsync(handle.fd())?;
        }
        let inode = self.inode(handle.ino)?;
        self.emit(&inode, None, ChangeKind::Fsync { datasync }, caller);
        if let (Some(barrier), Some(ticket)) = (barrier, ticket) {
            if let Some(path) = self.relative_path(inode.fd()) {
                barrier.wait(&path, ticket)?;
            }
        }
        Ok(())
    }

    pub fn fallocate(
        &self,
        fh: u64,
        offset: u64,
        len: u64,
        mode: i32,
        caller: Caller,
    ) -> Result<()> {
        let handle = self.handles.file(fh)?;
        let flags = FallocateFlags::from_bits_retain(mode as u32);
        rustix::fs::fallocate(handle.fd(), flags, offset, len)?;
        let inode = self.inode(handle.ino)?;
        self.emit(
            &inode,
            None,
            ChangeKind::Fallocate { offset, len, mode },
            caller,
        );
        Ok(())
    }

    /// `lseek`; the kernel asks only for `SEEK_DATA`/`SEEK_HOLE` and `SEEK_END`, which
    /// need the backing file.
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        let handle = self.handles.file(fh)?;
        let unsigned = || u64::try_from(offset).map_err(|_| Errno::NXIO);
        let position = match whence {
            libc::SEEK_SET => SeekFrom::Start(u64::try_from(offset).map_err(|_| Errno::INVAL)?),
            libc::SEEK_CUR => SeekFrom::Current(offset),
            libc::SEEK_END => SeekFrom::End(offset),
            libc::SEEK_DATA => SeekFrom::Data(unsigned()?),
            libc::SEEK_HOLE => SeekFrom::Hole(unsigned()?),
            _ => return Err(Errno::INVAL),
        };
        let new = rustix::fs::seek(handle.fd(), position)?;
        i64::try_from(new).map_err(|_| Errno::OVERFLOW)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        offset_in: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
        flags: u32,
        caller: Caller,
    ) -> Result<u32> {
        if flags != 0 {
            return Err(Errno::INVAL);
        }
        let input = self.handles.file(fh_in)?;
        let output = self.handles.file(fh_out)?;
        let mut from = offset_in;
        let mut to = offset_out;
        // The reply carries a 32-bit count; the kernel loops for the rest.
        let len = usize::try_from(len.min(u32::MAX as u64)).unwrap_or(u32::MAX as usize);
        let copied = rustix::fs::copy_file_range(
            input.fd(),
            Some(&mut from),
            output.fd(),
            Some(&mut to),
            len,
        )?;
        output.wrote.store(true, Ordering::Relaxed);
        kill_suid_after_write(&output, caller)?;
        let inode = self.inode(output.ino)?;
        self.emit(
            &inode,
            None,
            ChangeKind::Write {
                offset: offset_out,
                len: copied as u64,
            },
            caller,
        );
        Ok(u32::try_from(copied).unwrap_or(u32::MAX))
    }
}

/// A write by anyone but root clears the set-user-ID bit, and the set-group-ID bit of a
/// group-executable file, as the kernel does for its own writes. The daemon writes as root,
/// so the backing filesystem would keep them; for direct-io writes the kernel leaves this
/// to us.
fn kill_suid_after_write(handle: &FileHandle, caller: Caller) -> Result<()> {
    if caller.uid == 0 {
        return Ok(());
    }
    let mode = stat_fd(handle.fd())?.st_mode;
    let mut kill = libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        kill |= libc::S_ISGID;
    }
    if mode & kill != 0 {
        rustix::fs::fchmod(handle.fd(), Mode::from_raw_mode(mode & 0o7777 & !kill))?;
    }
    Ok(())
}
