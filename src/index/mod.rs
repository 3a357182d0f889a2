//! The index: the node's persistent memory of what it has synced, one [`FileRecord`] per
//! path of the backing folder (live or a tombstone), in a redb database outside the synced
//! tree (the caller picks the file, e.g. `/var/lib/filesync/<mount>/index.redb`).
//!
//! Who uses it:
//! - the indexer (one writer): for each coalesced change it calls [`record_for`] with the
//!   written byte ranges and stores the result with [`Index::put_batch`], or records a
//!   deletion with [`Index::tombstone_batch`]. Each batch is one fsync'd transaction.
//! - the reconcile scan ([`crate::capture::scan`]) and later per-directory digests: they
//!   read a consistent [`Snapshot`] while the indexer keeps writing.
//!
//! Storage: table `records` maps a key made from the relative path (see `key.rs`: parent
//! path, NUL, name, so a directory's children are one contiguous key range) to the
//! encoded record (see `record.rs`, versioned); table `meta` holds `key_format`. Opening
//! reads only the file header and the `meta` table, so it takes milliseconds whatever the
//! size. Every write transaction uses redb's quick-repair mode, which saves the allocator
//! state with each commit: after a crash (`kill -9`, power loss) the next open does not
//! have to walk the whole database to rebuild it.

mod build;
mod key;
mod record;

use std::ffi::OsString;
use std::ops::RangeBounds;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use redb::{
    Database, DatabaseError, ReadOnlyTable, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, TableError, WriteTransaction,
};

pub use build::{open_to_read, record_for};
pub(crate) use build::{read_full, stat_times};
pub use record::{FileKind, FileRecord, Hash};

use crate::sync::vector::Vector;

/// The block size of [`FileRecord::block_hashes`]: 128 KiB.
///
/// Small enough that a small write re-reads and re-hashes little (≤ 128 KiB, tens of
/// microseconds), and that a peer comparing block lists fetches little beyond what
/// changed; large enough that BLAKE3 runs at full SIMD width on each block and the list
/// stays at 32 bytes per 128 KiB (0.025 % of the file: 8 KiB of hashes per 32 MiB file,
/// 256 KiB per 1 GiB). Changing it changes every stored list, so it is part of the format.
pub const BLOCK_SIZE: u64 = 128 * 1024;

const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The version vector of each path (see [`crate::sync::vector`]), keyed like `records`;
/// kept apart from the records so that the scan, which never needs them, reads less.
const VECTORS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("vectors");
/// Where each renamed path went (keyed like `records`, the value is the new path's
/// bytes), so that a peer's change to the old name, made before it heard of the rename,
/// follows it.
const MOVES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("moves");
/// How many renames in a row [`Index::moved_to`] follows.
const MAX_MOVE_HOPS: usize = 8;
const KEY_FORMAT_NAME: &str = "key_format";
/// The key layout this build reads and writes.
const KEY_FORMAT: u64 = 1;

/// Why an index operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index {path} is in use by another process: stop the other filesync using it, or give this mount its own index file")]
    Locked { path: PathBuf },
    #[error("cannot open index {path}: {source}; check that its folder exists and is writable, or move a damaged file away to rebuild the index by a full scan")]
    Open { path: PathBuf, source: redb::Error },
    #[error("index {path} was written by a newer filesync (key format {found}): upgrade filesync, or move the file away to rebuild the index")]
    NewerFormat { path: PathBuf, found: u64 },
    #[error("index {path} failed: {source}; if this persists, move the file away to rebuild the index by a full scan")]
    Db { path: PathBuf, source: redb::Error },
    #[error("index {index} holds a corrupt record for {path:?} ({reason}); move the index file away to rebuild it by a full scan")]
    Corrupt {
        index: PathBuf,
        path: PathBuf,
        reason: &'static str,
    },
    #[error("{path:?} is not a path below the backing folder: pass it relative, without '..'")]
    BadPath { path: PathBuf },
    #[error("cannot read {path:?} in the backing folder: {source}; check its permissions")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The persistent index. `Send + Sync`: share it with an `Arc`; writes are serialized by
/// redb (one write transaction at a time), reads never wait for them.
pub struct Index {
    db: Database,
    path: PathBuf,
    /// `(dev, ino)` of the database file and of its folder, so a scan of a tree that
    /// (wrongly) contains them can leave them out.
    own_file: (u64, u64),
    own_dir: (u64, u64),
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").field("path", &self.path).finish()
    }
}

impl Index {
    /// Opens the index at `path`, creating an empty one (mode 0600) if the file does not
    /// exist; its folder must exist. Only one process may have it open. Takes milliseconds
    /// at any size, also after a crash: nothing is loaded or rebuilt.
    pub fn open(path: &Path) -> Result<Index, IndexError> {
        let open_err = |source: redb::Error| IndexError::Open {
            path: path.to_path_buf(),
            source,
        };
        // Created here rather than by redb so that it is private to its owner: the daemon
        // runs with umask 0, which would leave redb's default mode world-writable.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| open_err(e.into()))?;
        let db = match Database::builder().create(path) {
            Ok(db) => db,
            Err(DatabaseError::DatabaseAlreadyOpen) => {
                return Err(IndexError::Locked {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(open_err(e.into())),
        };
        let file_meta = std::fs::metadata(path).map_err(|e| open_err(e.into()))?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir_meta = std::fs::metadata(dir).map_err(|e| open_err(e.into()))?;
        let index = Index {
            db,
            path: path.to_path_buf(),
            own_file: (file_meta.dev(), file_meta.ino()),
            own_dir: (dir_meta.dev(), dir_meta.ino()),
        };
        index.check_format()?;
        index.ensure_vectors_table()?;
        tracing::debug!(path = %path.display(), "index open");
        Ok(index)
    }

    /// Creates the tables on first open; refuses a key layout from a newer build.
    fn check_format(&self) -> Result<(), IndexError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e.into()))?;
        let found = match txn.open_table(META) {
            Ok(meta) => meta
                .get(KEY_FORMAT_NAME)
                .map_err(|e| self.db_err(e.into()))?
                .map(|v| v.value()),
            Err(TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(self.db_err(e.into())),
        };
        match found {
            Some(found) if found > KEY_FORMAT => Err(IndexError::NewerFormat {
                path: self.path.clone(),
                found,
            }),
            Some(_) => Ok(()),
            None => {
                let txn = self.begin_write()?;
                {
                    txn.open_table(RECORDS).map_err(|e| self.db_err(e.into()))?;
                    let mut meta = txn.open_table(META).map_err(|e| self.db_err(e.into()))?;
                    meta.insert(KEY_FORMAT_NAME, KEY_FORMAT)
                        .map_err(|e| self.db_err(e.into()))?;
                }
                txn.commit().map_err(|e| self.db_err(e.into()))
            }
        }
    }

    /// Creates the vectors table in an index made before version vectors existed.
    fn ensure_vectors_table(&self) -> Result<(), IndexError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e.into()))?;
        match txn.open_table(VECTORS) {
            Ok(_) => return Ok(()),
            Err(TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(self.db_err(e.into())),
        }
        let txn = self.begin_write()?;
        txn.open_table(VECTORS).map_err(|e| self.db_err(e.into()))?;
        txn.open_table(MOVES).map_err(|e| self.db_err(e.into()))?;
        txn.commit().map_err(|e| self.db_err(e.into()))
    }

    /// Notes that each `from` was renamed to its `to`.
    pub fn put_moves(&self, moves: Vec<(PathBuf, PathBuf)>) -> Result<(), IndexError> {
        if moves.is_empty() {
            return Ok(());
        }
        let encoded = moves
            .into_iter()
            .map(|(from, to)| match key::encode(&from) {
                Some(k) => Ok((k, to.into_os_string().into_vec())),
                None => Err(IndexError::BadPath { path: from }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let txn = self.begin_write()?;
        {
            let mut table = txn.open_table(MOVES).map_err(|e| self.db_err(e.into()))?;
            for (k, v) in &encoded {
                table
                    .insert(k.as_slice(), v.as_slice())
                    .map_err(|e| self.db_err(e.into()))?;
            }
        }
        txn.commit().map_err(|e| self.db_err(e.into()))
    }

    /// Where `path` is now if it, or a folder above it, was renamed and nothing lives at
    /// the old name since; `None` otherwise. Follows a few renames in a row.
    pub fn moved_to(&self, path: &Path) -> Result<Option<PathBuf>, IndexError> {
        let snapshot = self.snapshot()?;
        let txn = self.db.begin_read().map_err(|e| self.db_err(e.into()))?;
        let moves = match txn.open_table(MOVES) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.db_err(e.into())),
        };
        let mut current = path.to_path_buf();
        let mut moved = false;
        for _ in 0..MAX_MOVE_HOPS {
            let mut found = None;
            for old in current.ancestors().filter(|a| !a.as_os_str().is_empty()) {
                if snapshot.get(old)?.is_some_and(|r| r.is_live()) {
                    break;
                }
                let Some(k) = key::encode(old) else { break };
                if let Some(v) = moves.get(k.as_slice()).map_err(|e| self.db_err(e.into()))? {
                    let to = PathBuf::from(OsString::from_vec(v.value().to_vec()));
                    let below = current.strip_prefix(old).unwrap_or(Path::new(""));
                    found = Some(match below.as_os_str().is_empty() {
                        true => to,
                        false => to.join(below),
                    });
                    break;
                }
            }
            match found {
                Some(next) if next != current => {
                    current = next;
                    moved = true;
                }
                _ => break,
            }
        }
        Ok(moved.then_some(current))
    }

    /// The version vector of `path` (live or deleted), if one was stored.
    pub fn vector(&self, path: &Path) -> Result<Option<Vector>, IndexError> {
        self.snapshot()?.vector(path)
    }

    /// Stores the version vectors in one durable transaction.
    pub fn put_vectors(&self, vectors: Vec<(PathBuf, Vector)>) -> Result<(), IndexError> {
        if vectors.is_empty() {
            return Ok(());
        }
        self.put_batch_with_vectors(Vec::new(), vectors)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `(dev, ino)` is the database file or the folder holding it (the scan skips
    /// them). The folder only counts when it is not `root_id` itself, the scanned root.
    pub(crate) fn is_own(&self, id: (u64, u64), root_id: (u64, u64)) -> bool {
        id == self.own_file || (id == self.own_dir && id != root_id)
    }

    fn db_err(&self, source: redb::Error) -> IndexError {
        IndexError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn begin_write(&self) -> Result<WriteTransaction, IndexError> {
        let mut txn = self.db.begin_write().map_err(|e| self.db_err(e.into()))?;
        txn.set_quick_repair(true);
        Ok(txn)
    }

    /// A consistent read-only view of the index as of now; later commits do not show in
    /// it. Cheap; hold it only as long as needed (it pins the pages it sees).
    pub fn snapshot(&self) -> Result<Snapshot<'_>, IndexError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e.into()))?;
        let table = txn.open_table(RECORDS).map_err(|e| self.db_err(e.into()))?;
        let vectors = txn.open_table(VECTORS).map_err(|e| self.db_err(e.into()))?;
        Ok(Snapshot {
            index: self,
            table,
            vectors,
        })
    }

    /// The record of `path` (live or tombstone), if the index has one.
    pub fn get(&self, path: &Path) -> Result<Option<FileRecord>, IndexError> {
        self.snapshot()?.get(path)
    }

    /// The direct children of directory `dir`, in name order; see [`Snapshot::children`].
    pub fn children(&self, dir: &Path) -> Result<Vec<(OsString, FileRecord)>, IndexError> {
        self.snapshot()?.children(dir)
    }

    /// Only the children of `dir` that exist (tombstones left out), in name order.
    pub fn live_children(&self, dir: &Path) -> Result<Vec<(OsString, FileRecord)>, IndexError> {
        let mut all = self.children(dir)?;
        all.retain(|(_, rec)| rec.is_live());
        Ok(all)
    }

    /// Everything below `dir`; see [`Snapshot::subtree`].
    pub fn subtree(&self, dir: &Path) -> Result<Vec<(PathBuf, FileRecord)>, IndexError> {
        self.snapshot()?.subtree(dir)
    }

    /// The number of records, tombstones included.
    pub fn len(&self) -> Result<u64, IndexError> {
        self.snapshot()?
            .table
            .len()
            .map_err(|e| self.db_err(e.into()))
    }

    /// Whether the index holds no record at all.
    pub fn is_empty(&self) -> Result<bool, IndexError> {
        Ok(self.len()? == 0)
    }

    /// Stores every record in one transaction: on return all of them are durable (fsync'd),
    /// and after a crash either all or none are there. A record replaces whatever the path
    /// had, a tombstone included (the path was created again). If any path is invalid
    /// nothing is written.
    pub fn put_batch(&self, updates: Vec<(PathBuf, FileRecord)>) -> Result<(), IndexError> {
        self.put_batch_with_vectors(updates, Vec::new())
    }

    /// [`Index::put_batch`] and [`Index::put_vectors`] in one transaction (one fsync).
    pub fn put_batch_with_vectors(
        &self,
        updates: Vec<(PathBuf, FileRecord)>,
        vectors: Vec<(PathBuf, Vector)>,
    ) -> Result<(), IndexError> {
        let vectors = vectors
            .into_iter()
            .map(|(path, vector)| match key::encode(&path) {
                Some(k) => Ok((k, vector.encode())),
                None => Err(IndexError::BadPath { path }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let encoded = updates
            .into_iter()
            .map(|(path, rec)| match key::encode(&path) {
                Some(k) => Ok((k, rec.encode())),
                None => Err(IndexError::BadPath { path }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let txn = self.begin_write()?;
        {
            let mut table = txn.open_table(RECORDS).map_err(|e| self.db_err(e.into()))?;
            for (k, v) in &encoded {
                table
                    .insert(k.as_slice(), v.as_slice())
                    .map_err(|e| self.db_err(e.into()))?;
            }
        }
        if !vectors.is_empty() {
            let mut table = txn.open_table(VECTORS).map_err(|e| self.db_err(e.into()))?;
            for (k, v) in &vectors {
                table
                    .insert(k.as_slice(), v.as_slice())
                    .map_err(|e| self.db_err(e.into()))?;
            }
        }
        txn.commit().map_err(|e| self.db_err(e.into()))?;
        tracing::trace!(records = encoded.len(), "index batch committed");
        Ok(())
    }

    /// Marks each path, and for a directory everything below it, deleted at `when_ns`
    /// (nanoseconds since the epoch), in one durable transaction. Records keep their last
    /// known state so that peers learn what was deleted; paths the index does not know and
    /// records already deleted are left as they are.
    pub fn tombstone_batch(&self, paths: Vec<PathBuf>, when_ns: i64) -> Result<(), IndexError> {
        let keys = paths
            .into_iter()
            .map(|path| match (key::encode(&path), key::dir_bytes(&path)) {
                (Some(k), Some(d)) => Ok((k, d)),
                _ => Err(IndexError::BadPath { path }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let txn = self.begin_write()?;
        let mut marked = 0usize;
        {
            let mut table = txn.open_table(RECORDS).map_err(|e| self.db_err(e.into()))?;
            for (k, dir) in &keys {
                // Gathered first, written after: a table cannot be read by a range and
                // written at the same time.
                let mut live = Vec::new();
                if let Some(v) = table.get(k.as_slice()).map_err(|e| self.db_err(e.into()))? {
                    live.push((k.clone(), self.decode(k, v.value(), true)?));
                }
                for range in key::subtree_ranges(dir) {
                    let iter = table
                        .range::<&[u8]>(key::borrowed(&range))
                        .map_err(|e| self.db_err(e.into()))?;
                    for item in iter {
                        let (k, v) = item.map_err(|e| self.db_err(e.into()))?;
                        let rec = self.decode(k.value(), v.value(), true)?;
                        live.push((k.value().to_vec(), rec));
                    }
                }
                for (k, mut rec) in live {
                    if rec.is_live() {
                        rec.deleted_ns = Some(when_ns);
                        table
                            .insert(k.as_slice(), rec.encode().as_slice())
                            .map_err(|e| self.db_err(e.into()))?;
                        marked += 1;
                    }
                }
            }
        }
        txn.commit().map_err(|e| self.db_err(e.into()))?;
        tracing::trace!(paths = keys.len(), marked, "index tombstones committed");
        Ok(())
    }

    /// Decodes the value stored under `key`; the path is only rebuilt for the error.
    fn decode(&self, key: &[u8], bytes: &[u8], blocks: bool) -> Result<FileRecord, IndexError> {
        FileRecord::decode(bytes, blocks).map_err(|reason| IndexError::Corrupt {
            index: self.path.clone(),
            path: key::decode(key),
            reason,
        })
    }
}

/// A consistent read-only view of the index (one read transaction). `Send + Sync`, so the
/// scan's threads share one.
pub struct Snapshot<'a> {
    index: &'a Index,
    table: ReadOnlyTable<&'static [u8], &'static [u8]>,
    vectors: ReadOnlyTable<&'static [u8], &'static [u8]>,
}

impl Snapshot<'_> {
    /// The version vector of `path`, if one was stored.
    pub fn vector(&self, path: &Path) -> Result<Option<Vector>, IndexError> {
        let k = key::encode(path).ok_or_else(|| IndexError::BadPath {
            path: path.to_path_buf(),
        })?;
        let Some(v) = self
            .vectors
            .get(k.as_slice())
            .map_err(|e| self.index.db_err(e.into()))?
        else {
            return Ok(None);
        };
        Vector::decode(v.value())
            .map(Some)
            .ok_or_else(|| IndexError::Corrupt {
                index: self.index.path.clone(),
                path: path.to_path_buf(),
                reason: "malformed version vector",
            })
    }

    /// The record of `path` (live or tombstone), if any.
    pub fn get(&self, path: &Path) -> Result<Option<FileRecord>, IndexError> {
        let k = key::encode(path).ok_or_else(|| IndexError::BadPath {
            path: path.to_path_buf(),
        })?;
        match self
            .table
            .get(k.as_slice())
            .map_err(|e| self.index.db_err(e.into()))?
        {
            Some(v) => Ok(Some(self.index.decode(&k, v.value(), true)?)),
            None => Ok(None),
        }
    }

    /// The direct children of directory `dir` (`""` for the backing folder), tombstones
    /// included, in byte order of their names: one range read.
    pub fn children(&self, dir: &Path) -> Result<Vec<(OsString, FileRecord)>, IndexError> {
        let mut out = Vec::new();
        self.for_each_child(dir, true, |name, rec| {
            out.push((OsString::from_vec(name.to_vec()), rec));
        })?;
        Ok(out)
    }

    /// Calls `f` with the name and record of each child of directory `dir`, tombstones
    /// included, in name order; without `blocks` the records' block lists are left empty.
    pub(crate) fn for_each_child(
        &self,
        dir: &Path,
        blocks: bool,
        mut f: impl FnMut(&[u8], FileRecord),
    ) -> Result<(), IndexError> {
        let d = key::dir_bytes(dir).ok_or_else(|| IndexError::BadPath {
            path: dir.to_path_buf(),
        })?;
        let range = key::children_range(&d);
        self.each_in(&range.start[..]..&range.end[..], blocks, |k, rec| {
            f(key::name(k), rec)
        })
    }

    /// Everything below directory `dir` (not `dir` itself), tombstones included, sorted
    /// by path so that a directory comes before its contents. Held in memory: a subtree of
    /// 100,000 entries takes some tens of MB.
    pub fn subtree(&self, dir: &Path) -> Result<Vec<(PathBuf, FileRecord)>, IndexError> {
        let d = key::dir_bytes(dir).ok_or_else(|| IndexError::BadPath {
            path: dir.to_path_buf(),
        })?;
        let mut out = Vec::new();
        for range in key::subtree_ranges(&d) {
            self.each_in(key::borrowed(&range), true, |k, rec| {
                out.push((key::decode(k), rec))
            })?;
        }
        // Path's order compares component by component: a parent sorts before its children.
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Calls `f` with each key in `range` and its decoded record.
    fn each_in<'k>(
        &self,
        range: impl RangeBounds<&'k [u8]>,
        blocks: bool,
        mut f: impl FnMut(&[u8], FileRecord),
    ) -> Result<(), IndexError> {
        let iter = self
            .table
            .range(range)
            .map_err(|e| self.index.db_err(e.into()))?;
        for item in iter {
            let (k, v) = item.map_err(|e| self.index.db_err(e.into()))?;
            let k = k.value();
            let rec = self.index.decode(k, v.value(), blocks)?;
            f(k, rec);
        }
        Ok(())
    }
}
