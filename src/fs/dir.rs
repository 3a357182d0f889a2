//! Directories: listing, and the operations that add, remove or move names.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, Dev, FileType, Mode, OFlags, RenameFlags, CWD};

use super::handle::DirHandle;
use super::{check_name, stat_fd, Attr, Caller, ChangeKind, Errno, OverlayFs, Result};

/// One name in a directory listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    /// `S_IF*` bits of the entry.
    pub file_type: u32,
    pub name: OsString,
}

impl DirEntry {
    fn is_dot_or_dotdot(&self) -> bool {
        let name = self.name.as_encoded_bytes();
        name == b"." || name == b".."
    }
}

fn mode_bits(file_type: FileType) -> u32 {
    match file_type {
        FileType::RegularFile => libc::S_IFREG,
        FileType::Directory => libc::S_IFDIR,
        FileType::Symlink => libc::S_IFLNK,
        FileType::Fifo => libc::S_IFIFO,
        FileType::Socket => libc::S_IFSOCK,
        FileType::CharacterDevice => libc::S_IFCHR,
        FileType::BlockDevice => libc::S_IFBLK,
        FileType::Unknown => 0,
    }
}

impl OverlayFs {
    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let inode = self.inode(ino)?;
        let fd = rustix::fs::openat(
            inode.fd(),
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(self.handles.insert_dir(DirHandle::new(fd)))
    }

    pub fn releasedir(&self, fh: u64) -> Result<()> {
        self.handles.remove_dir(fh)
    }

    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> Result<()> {
        let dir = self.handles.dir(fh)?;
        if datasync {
            rustix::fs::fdatasync(dir.fd())
        } else {
            rustix::fs::fsync(dir.fd())
        }
    }

    /// Reads the whole directory into the handle's snapshot.
    fn refresh_listing(&self, dir: &DirHandle) -> Result<()> {
        let mut listing = rustix::fs::Dir::read_from(dir.fd())?;
        let mut entries = Vec::new();
        while let Some(entry) = listing.read() {
            let entry = entry?;
            entries.push(DirEntry {
                ino: entry.ino(),
                file_type: mode_bits(entry.file_type()),
                name: OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string(),
            });
        }
        *dir.entries.lock() = entries;
        Ok(())
    }

    /// Entries of open directory `fh` from `offset` on. `add` gets each entry with the
    /// offset of the next one, and returns true when the reply buffer is full.
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&DirEntry, u64) -> bool,
    ) -> Result<()> {
        let dir = self.handles.dir(fh)?;
        if offset == 0 {
            self.refresh_listing(&dir)?;
        }
        let entries = dir.entries.lock();
        for (index, entry) in entries.iter().enumerate().skip(offset as usize) {
            let mapped = DirEntry {
                ino: self.listing_ino(entry),
                ..entry.clone()
            };
            if add(&mapped, index as u64 + 1) {
                break;
            }
        }
        Ok(())
    }

    /// Like [`readdir`](Self::readdir), but each entry (other than `.` and `..`) is also
    /// looked up, which counts a kernel reference unless `add` reports the buffer full.
    pub fn readdirplus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&DirEntry, u64, Option<&Attr>) -> bool,
    ) -> Result<()> {
        let dir = self.handles.dir(fh)?;
        if offset == 0 {
            self.refresh_listing(&dir)?;
        }
        let entries = dir.entries.lock().clone();
        for (index, entry) in entries.iter().enumerate().skip(offset as usize) {
            let next = index as u64 + 1;
            if entry.is_dot_or_dotdot() {
                // The kernel does not take references through `.` and `..`.
                if add(entry, next, None) {
                    break;
                }
                continue;
            }
            // The entry may have gone since the listing was taken; skip it then.
            let Ok(attr) = self.lookup(ino, &entry.name) else {
                continue;
            };
            let mapped = DirEntry {
                ino: attr.ino,
                ..entry.clone()
            };
            if add(&mapped, next, Some(&attr)) {
                self.forget(attr.ino, 1);
                break;
            }
        }
        Ok(())
    }

    fn listing_ino(&self, entry: &DirEntry) -> u64 {
        let root = self.inodes.get(super::inode::ROOT_INO);
        let dev = root.map(|r| r.id.dev).unwrap_or(0);
        self.inodes.ino_for(super::FileId {
            dev,
            ino: entry.ino,
        })
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, caller: Caller) -> Result<Attr> {
        let parent = self.inode(parent)?;
        check_name(name)?;
        let parent_stat = stat_fd(parent.fd())?;
        rustix::fs::mkdirat(parent.fd(), name, Mode::from_raw_mode(mode & 0o7777))?;
        self.give_to_caller(&parent, name, caller, &parent_stat)?;
        let attr = self.lookup_in(&parent, name)?.1;
        self.emit(&parent, Some(name), ChangeKind::Mkdir, caller);
        Ok(attr)
    }

    /// Creates a fifo, socket, device node or empty regular file.
    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u64,
        caller: Caller,
    ) -> Result<Attr> {
        let parent = self.inode(parent)?;
        check_name(name)?;
        let parent_stat = stat_fd(parent.fd())?;
        let file_type = FileType::from_raw_mode(mode);
        rustix::fs::mknodat(
            parent.fd(),
            name,
            file_type,
            Mode::from_raw_mode(mode & 0o7777),
            rdev as Dev,
        )?;
        self.give_to_caller(&parent, name, caller, &parent_stat)?;
        let attr = self.lookup_in(&parent, name)?.1;
        let kind = if file_type == FileType::RegularFile {
            ChangeKind::Create
        } else {
            ChangeKind::Mknod { mode, rdev }
        };
        self.emit(&parent, Some(name), kind, caller);
        Ok(attr)
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &Path,
        caller: Caller,
    ) -> Result<Attr> {
        let parent = self.inode(parent)?;
        check_name(name)?;
        let parent_stat = stat_fd(parent.fd())?;
        rustix::fs::symlinkat(target, parent.fd(), name)?;
        self.give_to_caller(&parent, name, caller, &parent_stat)?;
        let attr = self.lookup_in(&parent, name)?.1;
        self.emit(
            &parent,
            Some(name),
            ChangeKind::Symlink {
                target: target.to_path_buf(),
            },
            caller,
        );
        Ok(attr)
    }

    /// A new name `newname` in `newparent` for the file `ino`.
    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr, caller: Caller) -> Result<Attr> {
        let inode = self.inode(ino)?;
        let newparent = self.inode(newparent)?;
        check_name(newname)?;
        // linkat with AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; the procfs path does not.
        rustix::fs::linkat(
            CWD,
            inode.proc_path(),
            newparent.fd(),
            newname,
            AtFlags::SYMLINK_FOLLOW,
        )?;
        let existing = self.relative_path(inode.fd());
        let attr = self.lookup_in(&newparent, newname)?.1;
        self.emit(
            &newparent,
            Some(newname),
            ChangeKind::Link { existing },
            caller,
        );
        Ok(attr)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr, caller: Caller) -> Result<()> {
        let parent = self.inode(parent)?;
        check_name(name)?;
        rustix::fs::unlinkat(parent.fd(), name, AtFlags::empty())?;
        self.emit(&parent, Some(name), ChangeKind::Unlink, caller);
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr, caller: Caller) -> Result<()> {
        let parent = self.inode(parent)?;
        check_name(name)?;
        rustix::fs::unlinkat(parent.fd(), name, AtFlags::REMOVEDIR)?;
        self.emit(&parent, Some(name), ChangeKind::Rmdir, caller);
        Ok(())
    }

    /// `renameat2`, with `RENAME_NOREPLACE` and `RENAME_EXCHANGE` passed through.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        caller: Caller,
    ) -> Result<()> {
        let parent = self.inode(parent)?;
        let newparent = self.inode(newparent)?;
        check_name(name)?;
        check_name(newname)?;
        let flags = RenameFlags::from_bits(flags).ok_or(Errno::INVAL)?;
        rustix::fs::renameat_with(parent.fd(), name, newparent.fd(), newname, flags)?;
        let to = self.relative_path(newparent.fd()).map(|p| p.join(newname));
        self.emit(
            &parent,
            Some(name),
            ChangeKind::Rename {
                to,
                exchange: flags.contains(RenameFlags::EXCHANGE),
            },
            caller,
        );
        Ok(())
    }
}
