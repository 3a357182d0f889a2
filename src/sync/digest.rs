//! Comparing two nodes' indexes cheaply, for catch-up.
//!
//! The sender sends one [`DirDigest`] per directory ([`summarize`]); the receiver compares
//! them with its own ([`differing_dirs`]), asks for the listings of the directories that
//! differ ([`listing`]) and compares entry by entry ([`compare`]) to find the files to
//! fetch and the ones to delete.
//!
//! A directory's digest covers each live entry's name, kind, size, mtime, permission bits,
//! version vector and content hash (BLAKE3 over the block hashes for files, over the target for
//! symlinks), in name order. It leaves out everything that legitimately differs between
//! two nodes holding the same tree: inode and device numbers, ctime, owner (only applied
//! when the receiver runs as root), and the size of directories (which depends on the
//! filesystem). Digests are per directory, not recursive, so a change deep in the tree
//! makes only its own directory differ.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::conflict::is_conflict_copy;
use super::delta::content_hash;
use super::proto::{DirDigest, Entry, EntryKind, Hash, RelPath};
use super::vector::{Order, Vector};
use crate::index::{FileKind, FileRecord, Index, IndexError};

/// Why a digest or listing could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(
        "{path:?} is not a directory path below the synced folder; the peer is broken or hostile"
    )]
    BadPath { path: String },
}

/// What a receiver must do about one directory, by name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Comparison {
    /// Entries the other side has in a version this side has not seen (newer or
    /// concurrent), or has differently at the same version.
    pub fetch: Vec<Vec<u8>>,
    /// Entries only this side has (a mirror removes them).
    pub extra: Vec<Vec<u8>>,
    /// Entries the other side deleted after the version this side has, with the version
    /// of the deletion.
    pub removed: Vec<(Vec<u8>, Vector)>,
}

/// What [`summarize`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The digest of every directory.
    pub dirs: Vec<DirDigest>,
    /// How many conflict copies the tree holds (for `filesync status`).
    pub conflict_copies: u64,
}

/// The digest of every directory in `index`, the backing folder itself (the empty path)
/// first, then breadth first. Reads one consistent snapshot, a directory at a time.
pub fn summarize(index: &Index) -> Result<Summary, DigestError> {
    let snapshot = index.snapshot()?;
    let mut out = Vec::new();
    let mut conflict_copies = 0;
    let mut queue = VecDeque::from([Vec::<u8>::new()]);
    while let Some(dir) = queue.pop_front() {
        let mut hasher = blake3::Hasher::new();
        let mut children = Vec::new();
        snapshot.for_each_child(as_path(&dir), true, |name, record| {
            if record.is_live() {
                children.push((name.to_vec(), record));
            }
        })?;
        for (name, record) in children {
            if is_conflict_copy(as_path(&name)) {
                conflict_copies += 1;
            }
            let path = child(&dir, &name);
            let version = snapshot.vector(as_path(&path))?.unwrap_or_default();
            let entry = entry_of(&name, &record, version);
            hash_entry(&mut hasher, &entry);
            if entry.kind == EntryKind::Dir {
                queue.push_back(path);
            }
        }
        out.push(DirDigest {
            dir: RelPath(dir),
            digest: *hasher.finalize().as_bytes(),
        });
    }
    Ok(Summary {
        dirs: out,
        conflict_copies,
    })
}

/// The entries of directory `dir`, deleted ones included, in name order (empty if the
/// index has none).
pub fn listing(index: &Index, dir: &RelPath) -> Result<Vec<Entry>, DigestError> {
    if dir.0.contains(&0) {
        return Err(DigestError::BadPath {
            path: String::from_utf8_lossy(&dir.0).into_owned(),
        });
    }
    let listed = index.snapshot().and_then(|snapshot| {
        let mut records = Vec::new();
        snapshot.for_each_child(as_path(&dir.0), true, |name, record| {
            records.push((name.to_vec(), record));
        })?;
        records
            .into_iter()
            .map(|(name, record)| {
                let version = snapshot
                    .vector(as_path(&child(&dir.0, &name)))?
                    .unwrap_or_default();
                Ok(entry_of(&name, &record, version))
            })
            .collect::<Result<Vec<Entry>, IndexError>>()
    });
    match listed {
        Ok(entries) => Ok(entries),
        Err(IndexError::BadPath { .. }) => Err(DigestError::BadPath {
            path: String::from_utf8_lossy(&dir.0).into_owned(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// The directories to list: those `theirs` has and `ours` lacks or has with another
/// digest, and those only `ours` has (deleted on their side). Sorted.
pub fn differing_dirs(ours: &[DirDigest], theirs: &[DirDigest]) -> Vec<RelPath> {
    let ours_by_dir: BTreeMap<&RelPath, &Hash> = ours.iter().map(|d| (&d.dir, &d.digest)).collect();
    let theirs_by_dir: BTreeMap<&RelPath, &Hash> =
        theirs.iter().map(|d| (&d.dir, &d.digest)).collect();
    let mut out: Vec<RelPath> = theirs_by_dir
        .iter()
        .filter(|(dir, digest)| ours_by_dir.get(*dir) != Some(*digest))
        .map(|(dir, _)| (*dir).clone())
        .collect();
    out.extend(
        ours_by_dir
            .keys()
            .filter(|dir| !theirs_by_dir.contains_key(*dir))
            .map(|dir| (*dir).clone()),
    );
    out.sort_unstable();
    out
}

/// Compares one directory's listings (see [`Comparison`]). Both sorted by name.
///
/// Versions decide: an entry is fetched when theirs is newer or concurrent (the applier
/// resolves the conflict), or at the same version when its state differs (nodes that
/// never stamped, or a mirror changed behind its back); a deletion newer than what this
/// side has removes it here. A deletion concurrent with an edit here is ignored: the edit
/// wins, and reaches the other side through its own catch-up.
pub fn compare(ours: &[Entry], theirs: &[Entry]) -> Comparison {
    let ours_by_name: BTreeMap<&[u8], &Entry> = ours.iter().map(|e| (&e.name[..], e)).collect();
    let mut comparison = Comparison::default();
    for entry in theirs {
        let name = entry.name.to_vec();
        let mine = ours_by_name.get(&entry.name[..]);
        if entry.deleted {
            if let Some(mine) = mine.filter(|mine| !mine.deleted) {
                if entry.version.compare(&mine.version) == Order::Newer {
                    comparison.removed.push((name, entry.version.clone()));
                }
            }
            continue;
        }
        let wanted = match mine {
            None => true,
            Some(mine) => match entry.version.compare(&mine.version) {
                Order::Newer | Order::Concurrent => true,
                Order::Older => false,
                // Deleted here at the version it is live there: only a rename racing an
                // edit does that, and the live one wins (see `conflict::judge`).
                Order::Equal if mine.deleted => true,
                Order::Equal => !same_state(mine, entry),
            },
        };
        if wanted {
            comparison.fetch.push(name);
        }
    }
    let live_there: std::collections::HashSet<&[u8]> = theirs
        .iter()
        .filter(|e| !e.deleted)
        .map(|e| &e.name[..])
        .collect();
    comparison.extra = ours
        .iter()
        .filter(|e| !e.deleted && !live_there.contains(&e.name[..]))
        .map(|e| e.name.to_vec())
        .collect();
    comparison
}

/// Whether two entries describe the same state, whatever their versions.
fn same_state(a: &Entry, b: &Entry) -> bool {
    (a.kind, a.size, a.mtime_ns, a.mode, a.content)
        == (b.kind, b.size, b.mtime_ns, b.mode, b.content)
}

/// The wire entry of a record (live or deleted) at `version`.
fn entry_of(name: &[u8], record: &FileRecord, version: Vector) -> Entry {
    let (kind, size, content) = match record.kind {
        FileKind::File => (
            EntryKind::File,
            record.size,
            content_hash(&record.block_hashes),
        ),
        FileKind::Dir => (EntryKind::Dir, 0, [0; 32]),
        FileKind::Symlink => {
            let target = record.symlink_target.as_deref().unwrap_or_default();
            (
                EntryKind::Symlink,
                record.size,
                *blake3::hash(target).as_bytes(),
            )
        }
        FileKind::Other => (EntryKind::Special, 0, [0; 32]),
    };
    Entry {
        name: name.to_vec(),
        kind,
        size,
        mtime_ns: record.mtime_ns,
        mode: record.mode & 0o7777,
        content,
        version,
        deleted: !record.is_live(),
    }
}

/// Feeds one entry to a directory's digest, every variable-length part length-prefixed so
/// that no two different listings hash alike.
fn hash_entry(hasher: &mut blake3::Hasher, entry: &Entry) {
    let kind: u8 = match entry.kind {
        EntryKind::File => 0,
        EntryKind::Dir => 1,
        EntryKind::Symlink => 2,
        EntryKind::Special => 3,
    };
    hasher.update(&(entry.name.len() as u64).to_le_bytes());
    hasher.update(&entry.name);
    hasher.update(&[kind]);
    hasher.update(&entry.size.to_le_bytes());
    hasher.update(&entry.mtime_ns.to_le_bytes());
    hasher.update(&entry.mode.to_le_bytes());
    hasher.update(&entry.content);
    let pairs = entry.version.pairs();
    hasher.update(&(pairs.len() as u64).to_le_bytes());
    for (replica, counter) in pairs {
        hasher.update(&replica.to_le_bytes());
        hasher.update(&counter.to_le_bytes());
    }
}

fn as_path(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

/// The relative path of `name` inside `dir` (empty for the backing folder).
fn child(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(dir.len() + 1 + name.len());
    if !dir.is_empty() {
        out.extend_from_slice(dir);
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};

    static INODES: AtomicU64 = AtomicU64::new(1000);

    /// A record as a node would store it; `node` changes what differs between nodes.
    fn record(kind: FileKind, size: u64, mtime_ns: i64, content: &[u8], node: u32) -> FileRecord {
        FileRecord {
            kind,
            size,
            mtime_ns,
            ctime_ns: 1_000 * i64::from(node),
            ino: INODES.fetch_add(1, Ordering::Relaxed),
            dev: u64::from(node),
            rdev: 0,
            mode: match kind {
                FileKind::Dir => libc::S_IFDIR | 0o755,
                FileKind::Symlink => libc::S_IFLNK | 0o777,
                _ => libc::S_IFREG | 0o644,
            },
            uid: node,
            gid: node,
            xattr_digest: [0; 32],
            symlink_target: (kind == FileKind::Symlink).then(|| content.to_vec()),
            block_hashes: if kind == FileKind::File {
                vec![*blake3::hash(content).as_bytes()]
            } else {
                Vec::new()
            },
            deleted_ns: None,
        }
    }

    /// The same small tree, as node `node` indexes it.
    fn tree(node: u32) -> Vec<(PathBuf, FileRecord)> {
        vec![
            ("a".into(), record(FileKind::File, 3, 10, b"abc", node)),
            (
                "d".into(),
                record(FileKind::Dir, 4096 * u64::from(node), 20, b"", node),
            ),
            ("d/x".into(), record(FileKind::File, 1, 30, b"x", node)),
            ("d/e".into(), record(FileKind::Dir, 0, 40, b"", node)),
            (
                "d/e/l".into(),
                record(FileKind::Symlink, 3, 50, b"../a", node),
            ),
            ("f".into(), record(FileKind::Dir, 0, 60, b"", node)),
        ]
    }

    fn index_of(dir: &Path, name: &str, records: Vec<(PathBuf, FileRecord)>) -> Index {
        let index = Index::open(&dir.join(name)).unwrap();
        index.put_batch(records).unwrap();
        index
    }

    fn rel(s: &str) -> RelPath {
        RelPath(s.as_bytes().to_vec())
    }

    #[test]
    fn same_tree_same_digests_whatever_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let a = summarize(&index_of(dir.path(), "a.redb", tree(1)))
            .unwrap()
            .dirs;
        let b = summarize(&index_of(dir.path(), "b.redb", tree(2)))
            .unwrap()
            .dirs;
        assert_eq!(a, b);
        let dirs: Vec<_> = a.iter().map(|d| d.dir.clone()).collect();
        assert_eq!(dirs, vec![rel(""), rel("d"), rel("f"), rel("d/e")]);
        assert!(differing_dirs(&a, &b).is_empty());
    }

    #[test]
    fn changes_show_in_their_directory_only() {
        let dir = tempfile::tempdir().unwrap();
        let ours = index_of(dir.path(), "ours.redb", tree(1));
        let mut changed = tree(2);
        // d/x has new content, f/new is new, d/e/l is deleted (a tombstone).
        changed[2].1 = record(FileKind::File, 1, 30, b"y", 2);
        changed.push(("f/new".into(), record(FileKind::File, 0, 70, b"", 2)));
        changed[4].1.deleted_ns = Some(99);
        let theirs = index_of(dir.path(), "theirs.redb", changed);
        let (o, t) = (
            summarize(&ours).unwrap().dirs,
            summarize(&theirs).unwrap().dirs,
        );
        assert_eq!(differing_dirs(&o, &t), vec![rel("d"), rel("d/e"), rel("f")]);

        let cmp = compare(
            &listing(&ours, &rel("d")).unwrap(),
            &listing(&theirs, &rel("d")).unwrap(),
        );
        assert_eq!(cmp.fetch, vec![b"x".to_vec()]);
        assert!(cmp.extra.is_empty());
        let cmp = compare(
            &listing(&ours, &rel("d/e")).unwrap(),
            &listing(&theirs, &rel("d/e")).unwrap(),
        );
        assert!(cmp.fetch.is_empty());
        assert_eq!(cmp.extra, vec![b"l".to_vec()]);
        let cmp = compare(
            &listing(&ours, &rel("f")).unwrap(),
            &listing(&theirs, &rel("f")).unwrap(),
        );
        assert_eq!(cmp.fetch, vec![b"new".to_vec()]);
    }

    #[test]
    fn directories_only_one_side_has_are_listed() {
        let ours = vec![
            DirDigest {
                dir: rel(""),
                digest: [1; 32],
            },
            DirDigest {
                dir: rel("gone"),
                digest: [2; 32],
            },
        ];
        let theirs = vec![
            DirDigest {
                dir: rel(""),
                digest: [1; 32],
            },
            DirDigest {
                dir: rel("new"),
                digest: [3; 32],
            },
        ];
        assert_eq!(
            differing_dirs(&ours, &theirs),
            vec![rel("gone"), rel("new")]
        );
    }

    #[test]
    fn hostile_listing_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let index = index_of(dir.path(), "i.redb", tree(1));
        for bad in ["../etc", "/etc", "d/../..", "a\0b"] {
            assert!(
                matches!(listing(&index, &rel(bad)), Err(DigestError::BadPath { .. })),
                "{bad}"
            );
        }
        assert!(listing(&index, &rel("missing")).unwrap().is_empty());
    }
}
