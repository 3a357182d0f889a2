//! What the index knows about one path, and its on-disk encoding.
//!
//! The encoding is a hand-written fixed layout rather than a serde format: it is a few
//! dozen lines, every length is checked against the bytes actually present before anything
//! is allocated (so a corrupt value cannot ask for gigabytes or panic), and the scan can
//! read it without pulling in a general decoder.
//!
//! Layout, all integers little-endian:
//!
//! ```text
//! u8  format version (1)
//! u8  kind (0 file, 1 dir, 2 symlink, 3 other)
//! u8  flags (bit 0: deleted_ns present, bit 1: symlink_target present)
//! u64 size   i64 mtime_ns   i64 ctime_ns   u64 ino   u64 dev   u64 rdev
//! u32 mode   u32 uid        u32 gid
//! [u8; 32] xattr_digest
//! i64 deleted_ns                          if flag bit 0
//! u32 len, [u8; len] symlink target       if flag bit 1
//! u32 n, [[u8; 32]; n] block hashes
//! ```

/// The value format this build writes; older versions are decoded, newer are refused.
const FORMAT_VERSION: u8 = 1;

const FLAG_DELETED: u8 = 1;
const FLAG_SYMLINK: u8 = 2;

/// Bytes before the optional fields: version, kind, flags, six 64-bit and three 32-bit
/// numbers, the xattr digest.
const FIXED_LEN: usize = 3 + 6 * 8 + 3 * 4 + 32;

/// The type of a file, as far as replication cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    /// A fifo, socket or device node: replicated by `mode` and `rdev`, no content.
    Other,
}

impl FileKind {
    /// The kind of a `st_mode`.
    pub fn from_mode(mode: u32) -> FileKind {
        match mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::File,
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            _ => FileKind::Other,
        }
    }

    fn code(self) -> u8 {
        match self {
            FileKind::File => 0,
            FileKind::Dir => 1,
            FileKind::Symlink => 2,
            FileKind::Other => 3,
        }
    }

    fn from_code(code: u8) -> Option<FileKind> {
        Some(match code {
            0 => FileKind::File,
            1 => FileKind::Dir,
            2 => FileKind::Symlink,
            3 => FileKind::Other,
            _ => return None,
        })
    }
}

/// A BLAKE3 digest.
pub type Hash = [u8; 32];

/// What the node last synced for one path. Times are nanoseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub kind: FileKind,
    /// `st_size`: bytes for files, the target's length for symlinks.
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
    /// The device number of a device node (`st_rdev`), 0 for everything else; a peer needs
    /// it to recreate the node.
    pub rdev: u64,
    /// `st_mode`, file type bits included.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// BLAKE3 over the sorted (name, value) pairs, each length-prefixed; all zero when the
    /// file has no extended attributes.
    pub xattr_digest: Hash,
    /// The target of a symlink, `None` for everything else.
    pub symlink_target: Option<Vec<u8>>,
    /// BLAKE3 of each [`BLOCK_SIZE`](super::BLOCK_SIZE) block of a regular file (the last one
    /// may be shorter); empty for an empty file and for everything that is not a file.
    pub block_hashes: Vec<Hash>,
    /// When the path was seen deleted. The record is kept (with the last known state) so
    /// that peers learn of the deletion; a live record has `None`.
    pub deleted_ns: Option<i64>,
}

impl FileRecord {
    /// Whether the path exists (the record is not a tombstone).
    pub fn is_live(&self) -> bool {
        self.deleted_ns.is_none()
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let target_len = self.symlink_target.as_ref().map_or(0, |t| 4 + t.len());
        let mut out =
            Vec::with_capacity(FIXED_LEN + 8 + target_len + 4 + self.block_hashes.len() * 32);
        let mut flags = 0;
        if self.deleted_ns.is_some() {
            flags |= FLAG_DELETED;
        }
        if self.symlink_target.is_some() {
            flags |= FLAG_SYMLINK;
        }
        out.extend_from_slice(&[FORMAT_VERSION, self.kind.code(), flags]);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.mtime_ns.to_le_bytes());
        out.extend_from_slice(&self.ctime_ns.to_le_bytes());
        out.extend_from_slice(&self.ino.to_le_bytes());
        out.extend_from_slice(&self.dev.to_le_bytes());
        out.extend_from_slice(&self.rdev.to_le_bytes());
        out.extend_from_slice(&self.mode.to_le_bytes());
        out.extend_from_slice(&self.uid.to_le_bytes());
        out.extend_from_slice(&self.gid.to_le_bytes());
        out.extend_from_slice(&self.xattr_digest);
        if let Some(when) = self.deleted_ns {
            out.extend_from_slice(&when.to_le_bytes());
        }
        if let Some(target) = &self.symlink_target {
            out.extend_from_slice(&len_u32(target.len()).to_le_bytes());
            out.extend_from_slice(target);
        }
        out.extend_from_slice(&len_u32(self.block_hashes.len()).to_le_bytes());
        for hash in &self.block_hashes {
            out.extend_from_slice(hash);
        }
        out
    }

    /// Decodes a stored value; every malformation is an error naming what was wrong.
    /// Without `blocks` the block hash list is checked but left empty, for readers that
    /// only compare metadata (the scan), sparing an allocation per record.
    pub(crate) fn decode(bytes: &[u8], blocks: bool) -> Result<FileRecord, &'static str> {
        let mut r = Reader { bytes };
        let version = r.u8()?;
        if version == 0 || version > FORMAT_VERSION {
            return Err("unknown record format version");
        }
        let kind = FileKind::from_code(r.u8()?).ok_or("unknown file kind")?;
        let flags = r.u8()?;
        if flags & !(FLAG_DELETED | FLAG_SYMLINK) != 0 {
            return Err("unknown flags");
        }
        let size = r.u64()?;
        let mtime_ns = r.i64()?;
        let ctime_ns = r.i64()?;
        let ino = r.u64()?;
        let dev = r.u64()?;
        let rdev = r.u64()?;
        let mode = r.u32()?;
        let uid = r.u32()?;
        let gid = r.u32()?;
        let xattr_digest = r.hash()?;
        let deleted_ns = if flags & FLAG_DELETED != 0 {
            Some(r.i64()?)
        } else {
            None
        };
        let symlink_target = if flags & FLAG_SYMLINK != 0 {
            let len = r.u32()? as usize;
            Some(r.take(len)?.to_vec())
        } else {
            None
        };
        let count = r.u32()? as usize;
        // The hashes are the rest of the value: checking the length first keeps a corrupt
        // count from allocating before failing.
        if r.bytes.len() != count.checked_mul(32).ok_or("block count overflows")? {
            return Err("block hash list length does not match its count");
        }
        let block_hashes = if blocks {
            r.bytes
                .chunks_exact(32)
                .map(|c| {
                    let mut h = [0u8; 32];
                    h.copy_from_slice(c);
                    h
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(FileRecord {
            kind,
            size,
            mtime_ns,
            ctime_ns,
            ino,
            dev,
            rdev,
            mode,
            uid,
            gid,
            xattr_digest,
            symlink_target,
            block_hashes,
            deleted_ns,
        })
    }
}

/// Lengths are stored as u32; nothing the index stores comes near that (a symlink target
/// is at most `PATH_MAX`, 4 GiB of block hashes would describe a 16 PiB file), so a larger
/// one is clamped rather than made an error path every caller must handle.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.bytes.len() < n {
            return Err("value is truncated");
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        self.array().map(u64::from_le_bytes)
    }

    fn i64(&mut self) -> Result<i64, &'static str> {
        self.array().map(i64::from_le_bytes)
    }

    fn hash(&mut self) -> Result<Hash, &'static str> {
        self.array()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FileRecord {
        FileRecord {
            kind: FileKind::Symlink,
            size: 7,
            mtime_ns: -5,
            ctime_ns: 1_700_000_000_123_456_789,
            ino: 42,
            dev: 0x801,
            rdev: 0,
            mode: 0o120777,
            uid: 1000,
            gid: 100,
            xattr_digest: [9; 32],
            symlink_target: Some(b"a/b/c\xff".to_vec()),
            block_hashes: vec![[1; 32], [2; 32]],
            deleted_ns: Some(77),
        }
    }

    #[test]
    fn round_trips() {
        let rec = sample();
        assert_eq!(FileRecord::decode(&rec.encode(), true), Ok(rec));
    }

    #[test]
    fn every_truncation_and_extension_is_an_error() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(FileRecord::decode(&bytes[..n], true).is_err(), "prefix {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(FileRecord::decode(&longer, true).is_err());
    }

    #[test]
    fn a_huge_block_count_fails_without_allocating() {
        let mut rec = sample();
        rec.block_hashes.clear();
        let mut bytes = rec.encode();
        let at = bytes.len() - 4;
        bytes[at..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(FileRecord::decode(&bytes, true).is_err());
        assert!(FileRecord::decode(&bytes, false).is_err());
    }
}
