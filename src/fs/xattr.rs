//! Extended attributes, reached through the procfs path of the file's `O_PATH`
//! descriptor (the xattr calls have no descriptor-relative form for `O_PATH`).

use std::ffi::OsStr;

use rustix::fs::XattrFlags;

use super::{Caller, ChangeKind, Errno, OverlayFs, Result};

/// An xattr reply: the size the caller must allocate, or the bytes themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

/// Asks for the value's size when `size` is 0, as getxattr(2) does; otherwise reads into
/// a buffer of `size` bytes (ERANGE if it does not fit).
fn sized(
    size: u32,
    query: impl Fn() -> Result<usize>,
    read: impl Fn(&mut [u8]) -> Result<usize>,
) -> Result<XattrReply> {
    if size == 0 {
        let needed = query()?;
        return Ok(XattrReply::Size(
            u32::try_from(needed).map_err(|_| Errno::TOOBIG)?,
        ));
    }
    let mut buf = vec![0u8; size as usize];
    let n = read(&mut buf)?;
    buf.truncate(n);
    Ok(XattrReply::Data(buf))
}

impl OverlayFs {
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> Result<XattrReply> {
        let inode = self.inode(ino)?;
        let path = inode.proc_path();
        sized(
            size,
            || rustix::fs::getxattr_query(&path, name),
            |buf| rustix::fs::getxattr(&path, name, buf),
        )
    }

    pub fn listxattr(&self, ino: u64, size: u32) -> Result<XattrReply> {
        let inode = self.inode(ino)?;
        let path = inode.proc_path();
        sized(
            size,
            || rustix::fs::listxattr_query(&path),
            |buf| rustix::fs::listxattr(&path, buf),
        )
    }

    pub fn setxattr(
        &self,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        caller: Caller,
    ) -> Result<()> {
        let inode = self.inode(ino)?;
        let flags = XattrFlags::from_bits(flags as u32).ok_or(Errno::INVAL)?;
        rustix::fs::setxattr(inode.proc_path(), name, value, flags)?;
        let name = name.to_string_lossy().into_owned();
        self.emit(&inode, None, ChangeKind::SetXattr { name }, caller);
        Ok(())
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr, caller: Caller) -> Result<()> {
        let inode = self.inode(ino)?;
        rustix::fs::removexattr(inode.proc_path(), name)?;
        let name = name.to_string_lossy().into_owned();
        self.emit(&inode, None, ChangeKind::RemoveXattr { name }, caller);
        Ok(())
    }
}
