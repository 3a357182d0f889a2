//! The write-ahead (redo) journal that makes an in-place patch of a large file crash-safe.
//!
//! A large file is patched where it lies, so that applying a change costs the size of the
//! change, not of the file. Before the first byte is written, the complete change (target
//! path, new byte ranges with their data, new size) is written to the journal with a
//! BLAKE3 checksum and fsync'd. Only then is the file patched and fsync'd, and the journal
//! emptied. After a crash, [`Journal::take`] finds either
//! - an empty journal: nothing was in flight;
//! - a complete record (checksum matches): the patch may be partly applied; replaying it
//!   writes the same bytes again, which is idempotent, and finishes it;
//! - an incomplete or corrupt record: the crash came before the record was durable, so
//!   the file was not touched yet; the record is discarded.
//!
//! One journal file (`<state dir>/journal`) serves all patches: changes are applied one at
//! a time. The file is created once and then only rewritten and truncated, so its
//! directory entry is durable from the start and each record costs one `fdatasync`.
//! Emptying it is fsync'd as well: a stale record that came back after a power loss would
//! be replayed over newer content.
//!
//! Record layout, integers little-endian:
//!
//! ```text
//! [u8; 8] magic "FSJRNL01"
//! u32 path length, path bytes (relative to the synced folder)
//! u64 new size
//! u32 range count, then per range: u64 offset, u64 length, bytes
//! [u8; 32] BLAKE3 of everything above
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FSJRNL01";
const FILE_NAME: &str = "journal";
/// A record larger than this is not one this build wrote: a change carries at most
/// [`MAX_MESSAGE`](super::proto::MAX_MESSAGE) bytes, and the bound keeps a damaged file from
/// making the reader allocate much.
const MAX_RECORD: u64 = 64 * 1024 * 1024;

/// Why the journal could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path:?}: {source}; check that the state directory exists, is writable and has free space")]
    Io { path: PathBuf, source: io::Error },
    #[error("journal record for {path:?} is larger than {MAX_RECORD} bytes; send the change in smaller pieces")]
    TooLarge { path: PathBuf },
}

/// A patch of one file: write each range, then cut or extend the file to `size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRecord {
    /// Relative to the synced folder.
    pub path: PathBuf,
    pub size: u64,
    pub ranges: Vec<(u64, Vec<u8>)>,
}

/// What [`Journal::take`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Empty,
    /// A complete record: replay it, then [`Journal::clear`].
    Complete(JournalRecord),
    /// A torn or damaged record (the crash came before it was durable); already cleared.
    Discarded,
}

/// The journal file of one applier.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
}

impl Journal {
    /// Opens (creating, mode 0600, and making its directory entry durable) the journal in
    /// `state_dir`, which must exist.
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let path = state_dir.join(FILE_NAME);
        let io_err = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err)?;
        if !existed {
            File::open(state_dir)
                .and_then(|dir| dir.sync_all())
                .map_err(io_err)?;
        }
        Ok(Journal { file, path })
    }

    fn io_err(&self, source: io::Error) -> JournalError {
        JournalError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Writes the record of a patch and makes it durable: on `Ok`, a crash at any later
    /// point replays it.
    pub fn write(
        &mut self,
        path: &Path,
        size: u64,
        ranges: &[(u64, &[u8])],
    ) -> Result<(), JournalError> {
        let path_bytes = path.as_os_str().as_bytes();
        let data_len: usize = ranges.iter().map(|(_, d)| 16 + d.len()).sum();
        let total = 8 + 4 + path_bytes.len() + 8 + 4 + data_len + 32;
        if total as u64 > MAX_RECORD || path_bytes.len() > u32::MAX as usize {
            return Err(JournalError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let mut buf = Vec::with_capacity(total);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(path_bytes.len() as u32).to_le_bytes());
        buf.extend_from_slice(path_bytes);
        buf.extend_from_slice(&size.to_le_bytes());
        buf.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
        for (offset, data) in ranges {
            buf.extend_from_slice(&offset.to_le_bytes());
            buf.extend_from_slice(&(data.len() as u64).to_le_bytes());
            buf.extend_from_slice(data);
        }
        let sum = blake3::hash(&buf);
        buf.extend_from_slice(sum.as_bytes());
        self.file.set_len(0).map_err(|e| self.io_err(e))?;
        self.file
            .write_all_at(&buf, 0)
            .map_err(|e| self.io_err(e))?;
        // fdatasync also persists the new length, which the reader relies on.
        self.file.sync_data().map_err(|e| self.io_err(e))
    }

    /// Empties the journal durably: the patch it described is complete and fsync'd.
    pub fn clear(&mut self) -> Result<(), JournalError> {
        self.file.set_len(0).map_err(|e| self.io_err(e))?;
        self.file.sync_data().map_err(|e| self.io_err(e))
    }

    /// Reads what a crash left. A torn or damaged record is cleared here.
    pub fn take(&mut self) -> Result<Found, JournalError> {
        let len = self.file.metadata().map_err(|e| self.io_err(e))?.len();
        if len == 0 {
            return Ok(Found::Empty);
        }
        let parsed = if len > MAX_RECORD {
            None
        } else {
            let mut buf = vec![0u8; len as usize];
            self.file
                .read_exact_at(&mut buf, 0)
                .map_err(|e| self.io_err(e))?;
            parse(&buf)
        };
        match parsed {
            Some(record) => Ok(Found::Complete(record)),
            None => {
                tracing::warn!(journal = %self.path.display(), len, "discarding an incomplete journal record (a crash before it was durable; the file was not touched)");
                self.clear()?;
                Ok(Found::Discarded)
            }
        }
    }
}

/// Decodes a whole record; `None` when anything is missing, extra or fails the checksum.
fn parse(buf: &[u8]) -> Option<JournalRecord> {
    let body_len = buf.len().checked_sub(32)?;
    let (body, sum) = buf.split_at(body_len);
    if blake3::hash(body).as_bytes() != sum {
        return None;
    }
    let mut r = body;
    if take(&mut r, 8)? != MAGIC {
        return None;
    }
    let path_len = u32::from_le_bytes(take(&mut r, 4)?.try_into().ok()?) as usize;
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(take(&mut r, path_len)?));
    let size = u64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?);
    let count = u32::from_le_bytes(take(&mut r, 4)?.try_into().ok()?);
    let mut ranges = Vec::new();
    for _ in 0..count {
        let offset = u64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?);
        let len = usize::try_from(u64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?)).ok()?;
        ranges.push((offset, take(&mut r, len)?.to_vec()));
    }
    r.is_empty().then_some(JournalRecord { path, size, ranges })
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if r.len() < n {
        return None;
    }
    let (head, rest) = r.split_at(n);
    *r = rest;
    Some(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_record_is_found_complete_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        assert_eq!(journal.take().unwrap(), Found::Empty);
        journal
            .write(Path::new("a/b"), 77, &[(5, b"hello"), (1 << 40, b"")])
            .unwrap();
        let mut reopened = Journal::open(dir.path()).unwrap();
        let expected = JournalRecord {
            path: PathBuf::from("a/b"),
            size: 77,
            ranges: vec![(5, b"hello".to_vec()), (1 << 40, Vec::new())],
        };
        assert_eq!(reopened.take().unwrap(), Found::Complete(expected));
        reopened.clear().unwrap();
        assert_eq!(reopened.take().unwrap(), Found::Empty);
    }

    #[test]
    fn a_torn_or_damaged_record_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        journal.write(Path::new("f"), 3, &[(0, b"abc")]).unwrap();
        let file = dir.path().join(FILE_NAME);
        let len = std::fs::metadata(&file).unwrap().len();
        // Torn: the tail never reached the disk.
        OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        assert_eq!(journal.take().unwrap(), Found::Discarded);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 0);
        // Damaged: one byte flipped.
        journal.write(Path::new("f"), 3, &[(0, b"abc")]).unwrap();
        let f = OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(b"X", 20).unwrap();
        assert_eq!(journal.take().unwrap(), Found::Discarded);
    }
}
