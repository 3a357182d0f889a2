//! The receiving side's apply: every kind of change, refused paths, crash recovery of
//! in-place patches, resumed whole-file transfers, deltas, block checks, and the index
//! advancing with the data. Runs as root (ownership is applied then).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use filesync::index::{FileKind, Index, BLOCK_SIZE};
use filesync::sync::apply::{Applier, ApplyError, CHECKPOINT, SMALL_FILE};
use filesync::sync::journal::Journal;
use filesync::sync::proto::{Change, Codec, FileData, Meta, Op, Payload, Range, RelPath};

struct Node {
    root: tempfile::TempDir,
    state: tempfile::TempDir,
    index: Arc<Index>,
    applier: Option<Applier>,
}

impl Node {
    fn new() -> Node {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let index = Arc::new(Index::open(&state.path().join("index.redb")).unwrap());
        let applier =
            Applier::open(root.path(), &state.path().join("apply"), index.clone()).unwrap();
        Node {
            root,
            state,
            index,
            applier: Some(applier),
        }
    }

    fn applier(&mut self) -> &mut Applier {
        self.applier.as_mut().unwrap()
    }

    /// Simulates a restart: the applier is dropped and opened again on the same state.
    fn reopen(&mut self) {
        self.applier = None;
        self.applier =
            Some(Applier::open(self.root.path(), &self.state_dir(), self.index.clone()).unwrap());
    }

    fn state_dir(&self) -> PathBuf {
        self.state.path().join("apply")
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    fn apply(&mut self, path: &str, op: Op) -> Result<filesync::sync::apply::Applied, ApplyError> {
        self.applier().apply(&change(path, op))
    }

    fn read(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.path(rel)).unwrap()
    }
}

fn change(path: &str, op: Op) -> Change {
    Change {
        seq: 1,
        path: RelPath(path.as_bytes().to_vec()),
        op,
        version: Default::default(),
    }
}

const MTIME: i64 = 1_700_000_000_123_456_789;

fn meta(mode: u32) -> Meta {
    Meta {
        mode,
        uid: 1234,
        gid: 567,
        mtime_ns: MTIME,
        xattrs: None,
    }
}

fn raw(bytes: &[u8]) -> Payload {
    Payload {
        codec: Codec::Raw,
        raw_len: bytes.len() as u32,
        bytes: bytes.to_vec(),
    }
}

fn ranges(size: u64, ranges: &[(u64, &[u8])]) -> Op {
    Op::File {
        meta: meta(0o644),
        size,
        data: FileData::Ranges(
            ranges
                .iter()
                .map(|(offset, data)| Range {
                    offset: *offset,
                    data: raw(data),
                })
                .collect(),
        ),
        blocks: Vec::new(),
    }
}

fn whole(content: &[u8]) -> Op {
    Op::File {
        meta: meta(0o644),
        size: content.len() as u64,
        data: FileData::Whole {
            offset: 0,
            data: raw(content),
            last: true,
        },
        blocks: Vec::new(),
    }
}

fn block_hash(content: &[u8], index: u64) -> [u8; 32] {
    let start = (index * BLOCK_SIZE) as usize;
    let end = (start + BLOCK_SIZE as usize).min(content.len());
    *blake3::hash(&content[start..end]).as_bytes()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

#[test]
fn a_new_file_lands_with_its_metadata_and_index_record() {
    let mut node = Node::new();
    let applied = node
        .apply("d/e/f.txt", ranges(11, &[(0, b"hello"), (6, b"world")]))
        .unwrap();
    assert!(applied.durable);
    for p in ["d", "d/e", "d/e/f.txt"] {
        assert!(
            applied.paths.contains(&PathBuf::from(p)),
            "{:?}",
            applied.paths
        );
    }
    assert_eq!(node.read("d/e/f.txt"), b"hello\0world");
    let md = std::fs::symlink_metadata(node.path("d/e/f.txt")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o644);
    assert_eq!(md.mtime() * 1_000_000_000 + md.mtime_nsec(), MTIME);
    assert_eq!((md.uid(), md.gid()), (1234, 567));
    let record = node.index.get(Path::new("d/e/f.txt")).unwrap().unwrap();
    assert!(record.is_live());
    assert_eq!(record.size, 11);
    assert_eq!(
        record.block_hashes,
        vec![*blake3::hash(b"hello\0world").as_bytes()]
    );
    assert_eq!(record.mtime_ns, MTIME);
    assert!(node.index.get(Path::new("d/e")).unwrap().unwrap().is_live());
}

#[test]
fn a_small_file_is_replaced_whole_and_a_large_one_patched_in_place() {
    let mut node = Node::new();
    node.apply("small", whole(b"0123456789")).unwrap();
    let ino = std::fs::metadata(node.path("small")).unwrap().ino();
    node.apply("small", ranges(12, &[(2, b"ab"), (10, b"XY")]))
        .unwrap();
    assert_eq!(node.read("small"), b"01ab456789XY");
    assert_ne!(std::fs::metadata(node.path("small")).unwrap().ino(), ino);

    let mut big = pattern(SMALL_FILE as usize * 2, 7);
    std::fs::write(node.path("big"), &big).unwrap();
    let ino = std::fs::metadata(node.path("big")).unwrap().ino();
    let middle = big.len() as u64 / 2 + 100;
    let old_len = big.len();
    big[middle as usize..middle as usize + 4096].fill(0xAA);
    big.truncate(old_len - 10);
    let middle_block = middle / BLOCK_SIZE;
    let last_block = (big.len() as u64 - 1) / BLOCK_SIZE;
    let Op::File {
        meta, size, data, ..
    } = ranges(big.len() as u64, &[(middle, &[0xAA; 4096])])
    else {
        unreachable!()
    };
    let op = Op::File {
        meta,
        size,
        data,
        blocks: vec![
            (middle_block, block_hash(&big, middle_block)),
            (last_block, block_hash(&big, last_block)),
        ],
    };
    node.apply("big", op).unwrap();
    assert_eq!(node.read("big"), big);
    assert_eq!(std::fs::metadata(node.path("big")).unwrap().ino(), ino);
    assert_eq!(
        std::fs::metadata(node.state_dir().join("journal"))
            .unwrap()
            .len(),
        0
    );
    let record = node.index.get(Path::new("big")).unwrap().unwrap();
    let expected: Vec<[u8; 32]> = (0..big.len().div_ceil(BLOCK_SIZE as usize) as u64)
        .map(|i| block_hash(&big, i))
        .collect();
    assert_eq!(record.block_hashes, expected);
}

#[test]
fn unchanged_data_truncates_and_sets_metadata() {
    let mut node = Node::new();
    node.apply("f", whole(b"abcdefgh")).unwrap();
    let op = Op::File {
        meta: Meta {
            mode: 0o600,
            ..meta(0)
        },
        size: 3,
        data: FileData::Unchanged,
        blocks: vec![(0, *blake3::hash(b"abc").as_bytes())],
    };
    node.apply("f", op).unwrap();
    assert_eq!(node.read("f"), b"abc");
    assert_eq!(
        std::fs::metadata(node.path("f")).unwrap().mode() & 0o7777,
        0o600
    );
    assert_eq!(node.index.get(Path::new("f")).unwrap().unwrap().size, 3);
    let err = node
        .apply(
            "missing",
            Op::File {
                meta: meta(0o600),
                size: 1,
                data: FileData::Unchanged,
                blocks: Vec::new(),
            },
        )
        .unwrap_err();
    assert!(matches!(err, ApplyError::Missing { .. }), "{err}");
    // Neither metadata nor a delta creates anything.
    let err = node
        .apply(
            "new/dir/f",
            Op::File {
                meta: meta(0o600),
                size: 1,
                data: FileData::Unchanged,
                blocks: Vec::new(),
            },
        )
        .unwrap_err();
    assert!(matches!(err, ApplyError::Missing { .. }), "{err}");
    let delta = FileData::Delta {
        base: [0; 32],
        delta: raw(b""),
    };
    let err = node
        .apply(
            "new/dir/f",
            Op::File {
                meta: meta(0o600),
                size: 1,
                data: delta,
                blocks: Vec::new(),
            },
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            ApplyError::Missing { .. } | ApplyError::BaseMismatch { .. }
        ),
        "{err}"
    );
    assert!(!node.path("new").exists());
}

#[test]
fn a_delta_applies_against_the_signature_want_reports() {
    let mut node = Node::new();
    let old = pattern(300_000, 1);
    node.apply("f", whole(&old)).unwrap();
    let want = node.applier().want(&RelPath(b"f".to_vec())).unwrap();
    let (base, signature) = want.signature.clone().unwrap();
    assert_eq!(base, filesync::sync::delta::Version::of_bytes(&old).hash);
    assert_eq!(want.resume, None);

    let mut new = old.clone();
    new[150_000..150_100].fill(9);
    new.extend_from_slice(b"tail");
    let signature = fast_rsync::Signature::deserialize(signature).unwrap();
    let mut delta = Vec::new();
    fast_rsync::diff(&signature.index(), &new, &mut delta).unwrap();
    assert!(delta.len() < 20_000, "delta of {} bytes", delta.len());
    let op = |base| Op::File {
        meta: meta(0o644),
        size: new.len() as u64,
        data: FileData::Delta {
            base,
            delta: raw(&delta),
        },
        blocks: vec![(1, block_hash(&new, 1)), (2, block_hash(&new, 2))],
    };

    let err = node.apply("f", op([7; 32])).unwrap_err();
    assert!(matches!(err, ApplyError::BaseMismatch { .. }), "{err}");
    assert_eq!(node.read("f"), old);

    node.apply("f", op(base)).unwrap();
    assert_eq!(node.read("f"), new);
    assert_eq!(
        node.index.get(Path::new("f")).unwrap().unwrap().size,
        new.len() as u64
    );
}

#[test]
fn a_block_mismatch_is_diverged_and_changes_nothing() {
    let mut node = Node::new();
    node.apply("f", whole(b"original")).unwrap();
    let record = node.index.get(Path::new("f")).unwrap().unwrap();
    let Op::File {
        meta, size, data, ..
    } = ranges(8, &[(0, b"X")])
    else {
        unreachable!()
    };
    let op = Op::File {
        meta,
        size,
        data,
        blocks: vec![(0, *blake3::hash(b"Xriginal-not").as_bytes())],
    };
    let err = node.apply("f", op).unwrap_err();
    assert!(matches!(err, ApplyError::Diverged { .. }), "{err}");
    assert_eq!(node.read("f"), b"original");
    assert_eq!(node.index.get(Path::new("f")).unwrap().unwrap(), record);

    // The right hash passes.
    let Op::File {
        meta, size, data, ..
    } = ranges(8, &[(0, b"X")])
    else {
        unreachable!()
    };
    let op = Op::File {
        meta,
        size,
        data,
        blocks: vec![(0, *blake3::hash(b"Xriginal").as_bytes())],
    };
    node.apply("f", op).unwrap();
    assert_eq!(node.read("f"), b"Xriginal");
}

#[test]
fn an_interrupted_whole_file_transfer_resumes_where_it_was_durable() {
    let mut node = Node::new();
    let content = pattern(6 * 1024 * 1024 + 5, 3);
    let piece = 1024 * 1024;
    let file_meta = meta(0o640);
    let op = |offset: usize, last: bool| Op::File {
        meta: file_meta.clone(),
        size: content.len() as u64,
        data: FileData::Whole {
            offset: offset as u64,
            data: raw(&content[offset..(offset + piece).min(content.len())]),
            last,
        },
        blocks: vec![(3, block_hash(&content, 3))],
    };
    for i in 0..5 {
        let applied = node.apply("big", op(i * piece, false)).unwrap();
        assert!(!applied.durable);
        assert!(applied.paths.is_empty());
    }
    assert!(!node.path("big").exists());
    node.reopen();
    let want = node.applier().want(&RelPath(b"big".to_vec())).unwrap();
    assert_eq!(want.signature, None);
    let (version, held) = want.resume.unwrap();
    // The sender checks its first `held` bytes against this before it resumes there.
    let prefix = filesync::sync::delta::Version::of_bytes(&content[..held as usize]);
    assert_eq!(version, prefix.hash);
    assert_eq!(held, CHECKPOINT);
    assert_eq!(held % BLOCK_SIZE, 0);

    // A piece past what is held is refused.
    let err = node.apply("big", op(6 * piece, true)).unwrap_err();
    assert!(matches!(err, ApplyError::OutOfOrder { .. }), "{err}");

    let mut offset = held as usize;
    while offset < content.len() {
        let last = offset + piece >= content.len();
        let applied = node.apply("big", op(offset, last)).unwrap();
        assert_eq!(applied.durable, last);
        offset += piece;
    }
    assert_eq!(node.read("big"), content);
    assert_eq!(
        std::fs::metadata(node.path("big")).unwrap().mode() & 0o7777,
        0o640
    );
    assert_eq!(
        node.applier()
            .want(&RelPath(b"big".to_vec()))
            .unwrap()
            .resume,
        None
    );
    let partials = std::fs::read_dir(node.state_dir().join("partial"))
        .unwrap()
        .count();
    assert_eq!(partials, 0);
    assert_eq!(
        node.index.get(Path::new("big")).unwrap().unwrap().size,
        content.len() as u64
    );
}

#[test]
fn a_journaled_patch_is_rolled_forward_after_a_crash() {
    let mut node = Node::new();
    let mut content = pattern(SMALL_FILE as usize + 4096, 5);
    std::fs::write(node.path("big"), &content).unwrap();
    node.applier = None;
    // The crash came after the journal record was durable, before the file was touched.
    Journal::open(&node.state_dir())
        .unwrap()
        .write(
            Path::new("big"),
            content.len() as u64 + 3,
            &[(10, b"PATCH"), (content.len() as u64, b"end")],
        )
        .unwrap();
    node.reopen();
    content[10..15].copy_from_slice(b"PATCH");
    content.extend_from_slice(b"end");
    assert_eq!(node.read("big"), content);
    assert_eq!(
        std::fs::metadata(node.state_dir().join("journal"))
            .unwrap()
            .len(),
        0
    );
    let record = node.index.get(Path::new("big")).unwrap().unwrap();
    assert_eq!(record.size, content.len() as u64);
    assert_eq!(record.block_hashes[0], block_hash(&content, 0));
}

#[test]
fn a_torn_journal_is_discarded_without_touching_the_file() {
    let mut node = Node::new();
    let content = pattern(SMALL_FILE as usize + 4096, 6);
    std::fs::write(node.path("big"), &content).unwrap();
    node.applier = None;
    Journal::open(&node.state_dir())
        .unwrap()
        .write(Path::new("big"), 5, &[(0, b"PATCH")])
        .unwrap();
    let journal = node.state_dir().join("journal");
    let len = std::fs::metadata(&journal).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    node.reopen();
    assert_eq!(node.read("big"), content);
    assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0);
}

#[test]
fn paths_that_leave_the_folder_are_refused_and_change_nothing() {
    let mut node = Node::new();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), node.path("link")).unwrap();
    for bad in ["../x", "/abs", "a/../../b", "a//b", "./x", ""] {
        let err = node.apply(bad, whole(b"evil")).unwrap_err();
        assert!(matches!(err, ApplyError::BadPath { .. }), "{bad}: {err}");
    }
    for op in [whole(b"evil"), Op::Dir { meta: meta(0o755) }, Op::Remove] {
        let err = node.apply("link/x", op).unwrap_err();
        assert!(matches!(err, ApplyError::BadPath { .. }), "{err}");
    }
    let err = node
        .apply(
            "f",
            Op::Rename {
                to: RelPath(b"link/moved".to_vec()),
                exchange: false,
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, ApplyError::Missing { .. } | ApplyError::BadPath { .. }),
        "{err}"
    );
    node.apply("f", whole(b"data")).unwrap();
    let err = node
        .apply(
            "f",
            Op::Rename {
                to: RelPath(b"link/moved".to_vec()),
                exchange: false,
            },
        )
        .unwrap_err();
    assert!(matches!(err, ApplyError::BadPath { .. }), "{err}");
    let err = node
        .apply(
            "g",
            Op::Link {
                existing: RelPath(b"../etc/passwd".to_vec()),
            },
        )
        .unwrap_err();
    assert!(matches!(err, ApplyError::BadPath { .. }), "{err}");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    let names: Vec<_> = std::fs::read_dir(node.root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(node.path("link").is_symlink());
    assert!(!node.path("g").exists());
}

#[test]
fn directories_symlinks_specials_and_links() {
    let mut node = Node::new();
    node.apply("dir/sub", Op::Dir { meta: meta(0o700) })
        .unwrap();
    let md = std::fs::metadata(node.path("dir/sub")).unwrap();
    assert!(md.is_dir());
    assert_eq!(md.mode() & 0o7777, 0o700);
    assert_eq!(md.mtime() * 1_000_000_000 + md.mtime_nsec(), MTIME);
    assert_eq!(
        node.index.get(Path::new("dir/sub")).unwrap().unwrap().kind,
        FileKind::Dir
    );

    let symlink = |target: &[u8]| Op::Symlink {
        target: target.to_vec(),
        meta: meta(0o777),
    };
    node.apply("dir/l", symlink(b"/etc/passwd")).unwrap();
    node.apply("dir/l", symlink(b"../elsewhere")).unwrap();
    assert_eq!(
        std::fs::read_link(node.path("dir/l")).unwrap(),
        Path::new("../elsewhere")
    );
    let md = std::fs::symlink_metadata(node.path("dir/l")).unwrap();
    assert_eq!(md.mtime() * 1_000_000_000 + md.mtime_nsec(), MTIME);
    assert_eq!((md.uid(), md.gid()), (1234, 567));
    let record = node.index.get(Path::new("dir/l")).unwrap().unwrap();
    assert_eq!(
        record.symlink_target.as_deref(),
        Some(b"../elsewhere".as_slice())
    );

    node.apply(
        "dir/fifo",
        Op::Special {
            mode: libc::S_IFIFO | 0o620,
            rdev: 0,
            meta: meta(0o620),
        },
    )
    .unwrap();
    let md = std::fs::symlink_metadata(node.path("dir/fifo")).unwrap();
    assert_eq!(md.mode() & libc::S_IFMT, libc::S_IFIFO);
    assert_eq!(md.mode() & 0o7777, 0o620);
    node.apply(
        "dir/null",
        Op::Special {
            mode: libc::S_IFCHR | 0o666,
            rdev: libc::makedev(1, 3),
            meta: meta(0o666),
        },
    )
    .unwrap();
    assert_eq!(
        std::fs::symlink_metadata(node.path("dir/null"))
            .unwrap()
            .rdev(),
        libc::makedev(1, 3)
    );

    node.apply("dir/file", whole(b"linked")).unwrap();
    let applied = node
        .apply(
            "other/hard",
            Op::Link {
                existing: RelPath(b"dir/file".to_vec()),
            },
        )
        .unwrap();
    assert!(applied.paths.contains(&PathBuf::from("dir/file")));
    let a = std::fs::metadata(node.path("dir/file")).unwrap();
    let b = std::fs::metadata(node.path("other/hard")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    // Applying it again is harmless.
    node.apply(
        "other/hard",
        Op::Link {
            existing: RelPath(b"dir/file".to_vec()),
        },
    )
    .unwrap();
    // A file with two links is patched in place, so both names see the change.
    node.apply("dir/file", ranges(6, &[(0, b"L")])).unwrap();
    assert_eq!(node.read("other/hard"), b"Linked");
}

#[test]
fn removal_takes_whole_trees_without_following_symlinks() {
    let mut node = Node::new();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("keep"), b"keep").unwrap();
    node.apply("t/a/b/c/f", whole(b"x")).unwrap();
    node.apply("t/a/g", whole(b"y")).unwrap();
    std::os::unix::fs::symlink(outside.path(), node.path("t/a/out")).unwrap();
    let applied = node.apply("t", Op::Remove).unwrap();
    assert_eq!(applied.paths, vec![PathBuf::from("t")]);
    assert!(!node.path("t").exists());
    assert!(outside.path().join("keep").exists());
    for p in ["t", "t/a", "t/a/b/c/f", "t/a/g"] {
        assert!(
            !node.index.get(Path::new(p)).unwrap().unwrap().is_live(),
            "{p}"
        );
    }
    // Removing what is not there is fine.
    node.apply("t", Op::Remove).unwrap();
    node.apply("nowhere/at/all", Op::Remove).unwrap();
}

#[test]
fn renames_move_entries_and_their_index_records() {
    let mut node = Node::new();
    node.apply("a/f1", whole(b"one")).unwrap();
    node.apply("a/sub/f2", whole(b"two")).unwrap();
    let rename = |to: &str, exchange| Op::Rename {
        to: RelPath(to.as_bytes().to_vec()),
        exchange,
    };
    let applied = node.apply("a", rename("new/place/b", false)).unwrap();
    assert!(applied.paths.contains(&PathBuf::from("a")));
    assert!(applied.paths.contains(&PathBuf::from("new/place/b")));
    assert_eq!(node.read("new/place/b/sub/f2"), b"two");
    assert!(!node.path("a").exists());
    for p in [
        "new/place/b",
        "new/place/b/f1",
        "new/place/b/sub",
        "new/place/b/sub/f2",
        "new/place",
    ] {
        assert!(
            node.index.get(Path::new(p)).unwrap().unwrap().is_live(),
            "{p}"
        );
    }
    for p in ["a", "a/f1", "a/sub/f2"] {
        assert!(
            !node.index.get(Path::new(p)).unwrap().unwrap().is_live(),
            "{p}"
        );
    }
    assert_eq!(
        node.index
            .get(Path::new("new/place/b/sub/f2"))
            .unwrap()
            .unwrap()
            .block_hashes,
        vec![*blake3::hash(b"two").as_bytes()]
    );

    node.apply("x", whole(b"xxx")).unwrap();
    node.apply("y", whole(b"yy")).unwrap();
    node.apply("x", rename("y", true)).unwrap();
    assert_eq!(node.read("x"), b"yy");
    assert_eq!(node.read("y"), b"xxx");
    assert_eq!(node.index.get(Path::new("x")).unwrap().unwrap().size, 2);

    // A file renamed over a directory that is not empty here replaces it.
    node.apply("d/inner", whole(b"i")).unwrap();
    node.apply("x", rename("d", false)).unwrap();
    assert_eq!(node.read("d"), b"yy");
    assert!(!node
        .index
        .get(Path::new("d/inner"))
        .unwrap()
        .unwrap()
        .is_live());

    let err = node.apply("ghost", rename("z", false)).unwrap_err();
    assert!(matches!(err, ApplyError::Missing { .. }), "{err}");
}

#[test]
fn a_type_change_removes_the_old_entry_first() {
    let mut node = Node::new();
    node.apply("p/child", whole(b"c")).unwrap();
    node.apply("p", whole(b"now a file")).unwrap();
    assert_eq!(node.read("p"), b"now a file");
    assert!(!node
        .index
        .get(Path::new("p/child"))
        .unwrap()
        .unwrap()
        .is_live());
    node.apply("p", Op::Dir { meta: meta(0o755) }).unwrap();
    assert!(node.path("p").is_dir());
    node.apply(
        "p",
        Op::Symlink {
            target: b"t".to_vec(),
            meta: meta(0o777),
        },
    )
    .unwrap();
    assert!(node.path("p").is_symlink());
    node.apply("p", ranges(2, &[(0, b"ok")])).unwrap();
    assert_eq!(node.read("p"), b"ok");
}

#[test]
fn xattrs_are_made_exactly_the_given_set() {
    let mut node = Node::new();
    node.apply("f", whole(b"x")).unwrap();
    let with = |xattrs: Vec<(&[u8], &[u8])>| Op::File {
        meta: Meta {
            xattrs: Some(
                xattrs
                    .into_iter()
                    .map(|(n, v)| (n.to_vec(), v.to_vec()))
                    .collect(),
            ),
            ..meta(0o644)
        },
        size: 1,
        data: FileData::Unchanged,
        blocks: Vec::new(),
    };
    let names = |node: &Node| -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 4096];
        let n = rustix::fs::listxattr(node.path("f"), &mut buf[..]).unwrap();
        let mut names: Vec<Vec<u8>> = buf[..n]
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        names.retain(|n| n.starts_with(b"user."));
        names.sort();
        names
    };
    if node
        .apply("f", with(vec![(b"user.a", b"1"), (b"user.b", b"2")]))
        .is_err()
    {
        eprintln!("skipped: the temp filesystem has no user xattrs");
        return;
    }
    assert_eq!(names(&node), vec![b"user.a".to_vec(), b"user.b".to_vec()]);
    node.apply("f", with(vec![(b"user.a", b"3")])).unwrap();
    assert_eq!(names(&node), vec![b"user.a".to_vec()]);
    let mut value = [0u8; 16];
    let n =
        rustix::fs::getxattr(node.path("f"), OsStr::from_bytes(b"user.a"), &mut value[..]).unwrap();
    assert_eq!(&value[..n], b"3");
}

#[test]
fn compressed_or_inconsistent_payloads_are_refused() {
    let mut node = Node::new();
    let mut op = whole(b"abc");
    if let Op::File {
        data: FileData::Whole { data, .. },
        ..
    } = &mut op
    {
        data.codec = Codec::Zstd;
    }
    assert!(matches!(
        node.apply("f", op).unwrap_err(),
        ApplyError::Encoded { .. }
    ));
    let mut op = whole(b"abc");
    if let Op::File {
        data: FileData::Whole { data, .. },
        ..
    } = &mut op
    {
        data.raw_len = 99;
    }
    assert!(matches!(
        node.apply("f", op).unwrap_err(),
        ApplyError::BadPayload { .. }
    ));
    let op = ranges(10, &[(u64::MAX - 1, b"xyz")]);
    assert!(matches!(
        node.apply("f", op).unwrap_err(),
        ApplyError::BadPayload { .. }
    ));
    assert!(!node.path("f").exists());
}

#[test]
fn a_reader_never_sees_a_half_written_small_file() {
    let mut node = Node::new();
    let len = 256 * 1024;
    node.apply("f", whole(&vec![b'a'; len])).unwrap();
    let path = node.path("f");
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let content = std::fs::read(&path).unwrap();
                assert_eq!(content.len(), len);
                let first = content[0];
                assert!(content.iter().all(|&b| b == first), "torn read");
                reads += 1;
            }
            reads
        })
    };
    for i in 0..60u8 {
        let byte = b'a' + i % 26;
        if i % 2 == 0 {
            node.apply("f", whole(&vec![byte; len])).unwrap();
        } else {
            node.apply("f", ranges(len as u64, &[(0, &vec![byte; len])]))
                .unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
}

#[test]
fn a_piece_sent_again_moves_the_resume_point_back() {
    let mut node = Node::new();
    let content = pattern(6 * 1024 * 1024, 4);
    let piece = 1024 * 1024;
    let op = |offset: usize| Op::File {
        meta: meta(0o600),
        size: content.len() as u64,
        data: FileData::Whole {
            offset: offset as u64,
            data: raw(&content[offset..offset + piece]),
            last: offset + piece == content.len(),
        },
        blocks: Vec::new(),
    };
    for i in 0..5 {
        node.apply("f", op(i * piece)).unwrap();
    }
    let want = |node: &mut Node| node.applier().want(&RelPath(b"f".to_vec())).unwrap().resume;
    assert_eq!(want(&mut node).map(|(_, held)| held), Some(CHECKPOINT));
    node.apply("f", op(piece)).unwrap();
    assert_eq!(want(&mut node).map(|(_, held)| held), Some(piece as u64));
    for i in 2..6 {
        node.apply("f", op(i * piece)).unwrap();
    }
    assert_eq!(node.read("f"), content);
}

#[test]
fn deferred_files_appear_together_in_order_and_vanish_if_never_committed() {
    let mut node = Node::new();
    let mut shown = Vec::new();
    for (path, content) in [("d/a", b"one".as_slice()), ("d/b", b"two"), ("c", b"three")] {
        let applied = node
            .applier()
            .apply_deferred(&change(path, whole(content)), |paths| {
                shown.extend_from_slice(paths)
            })
            .unwrap();
        assert!(applied.durable);
    }
    // Waiting for the batch: nothing in place, nothing in the index.
    assert!(shown.is_empty(), "{shown:?}");
    assert!(!node.path("d/a").exists() && !node.path("c").exists());
    assert!(node.index.get(Path::new("c")).unwrap().is_none());

    // The same file again first finishes the batch, then replaces it: the later version wins.
    node.applier()
        .apply_deferred(&change("c", whole(b"four")), |paths| {
            shown.extend_from_slice(paths)
        })
        .unwrap();
    assert_eq!(node.read("c"), b"four");
    for p in ["d/a", "d/b", "c"] {
        assert!(
            shown.contains(&PathBuf::from(p)),
            "{p} not shown: {shown:?}"
        );
    }
    // Any other kind of change finishes the batch before it is applied.
    shown.clear();
    let rename = Op::Rename {
        to: RelPath(b"e".to_vec()),
        exchange: false,
    };
    node.applier()
        .apply_deferred(&change("c", rename), |paths| shown.extend_from_slice(paths))
        .unwrap();
    assert_eq!(node.read("e"), b"four");
    assert!(!node.path("c").exists());
    assert!(shown.contains(&PathBuf::from("e")), "{shown:?}");

    node.applier()
        .apply_deferred(&change("d/late", whole(b"late")), |_| {})
        .unwrap();
    let placed = node.applier().commit_deferred().unwrap();
    assert_eq!(placed, vec![PathBuf::from("d/late")]);
    assert_eq!(node.read("d/late"), b"late");
    let record = node.index.get(Path::new("d/late")).unwrap().unwrap();
    assert_eq!(record.size, 4);
    assert_eq!(record.mode & 0o7777, 0o644);

    // A crash before the batch is finished leaves no trace of it.
    node.applier()
        .apply_deferred(&change("d/lost", whole(b"lost")), |_| {})
        .unwrap();
    node.reopen();
    assert!(!node.path("d/lost").exists());
    let names: Vec<_> = std::fs::read_dir(node.path("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(node.index.get(Path::new("d/lost")).unwrap().is_none());
}

#[test]
fn a_file_sent_while_written_then_its_ranges_in_pieces_ends_whole() {
    let mut node = Node::new();
    let full = pattern(4 << 20, 9);
    let with_blocks = |op: Op, content: &[u8], first: u64, last: u64| match op {
        Op::File {
            meta, size, data, ..
        } => Op::File {
            meta,
            size,
            data,
            blocks: (first..last).map(|b| (b, block_hash(content, b))).collect(),
        },
        other => other,
    };
    // The first snapshot: what was written by the time the sender read it.
    let snapshot = &full[..(1 << 20) + 4096];
    let first = with_blocks(whole(snapshot), snapshot, 0, 9);
    node.applier()
        .apply_deferred(&change("big", first), |_| {})
        .unwrap();
    let mib = 1u64 << 20;
    let per_block = BLOCK_SIZE;
    for piece in 0..4u64 {
        let (start, end) = (piece * mib, (piece + 1) * mib);
        let op = ranges(4 * mib, &[(start, &full[start as usize..end as usize])]);
        let op = with_blocks(op, &full, start / per_block, end / per_block);
        node.applier()
            .apply_deferred(&change("big", op), |_| {})
            .unwrap_or_else(|e| panic!("piece {piece}: {e}"));
    }
    node.applier().commit_deferred().unwrap();
    assert!(node.read("big") == full);
}

#[test]
fn a_large_batch_is_made_durable_together_and_lands_whole() {
    let mut node = Node::new();
    let mut shown = Vec::new();
    for i in 0..100u8 {
        let content = pattern(1000 + usize::from(i), i);
        node.applier()
            .apply_deferred(&change(&format!("d{}/f{i}", i % 3), whole(&content)), |p| {
                shown.extend_from_slice(p)
            })
            .unwrap();
    }
    assert!(shown.is_empty());
    assert_eq!(node.applier().files_waiting(), 100);
    let placed = node.applier().commit_deferred().unwrap();
    assert_eq!(node.applier().files_waiting(), 0);
    for i in 0..100u8 {
        let path = format!("d{}/f{i}", i % 3);
        assert_eq!(
            node.read(&path),
            pattern(1000 + usize::from(i), i),
            "{path}"
        );
        assert!(placed.contains(&PathBuf::from(&path)), "{path}");
        let record = node.index.get(Path::new(&path)).unwrap().unwrap();
        assert_eq!(record.size, 1000 + u64::from(i));
    }
}

#[test]
fn the_same_content_sent_again_keeps_no_second_version() {
    let mut node = Node::new();
    node.applier()
        .keep_versions(Some(std::time::Duration::from_secs(3600)))
        .unwrap();
    node.apply("report.txt", whole(b"first draft")).unwrap();
    node.apply("report.txt", whole(b"first draft")).unwrap();
    node.apply("report.txt", whole(b"second draft, longer"))
        .unwrap();
    let kept = filesync::sync::versions::list(&node.state_dir(), Path::new("report.txt")).unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(std::fs::read(&kept[0].path).unwrap(), b"first draft");
    assert_eq!(node.read("report.txt"), b"second draft, longer");
}

#[test]
fn pieces_of_one_write_keep_no_versions_and_the_next_write_keeps_one() {
    use filesync::sync::proto::Vector;
    let mut node = Node::new();
    node.applier()
        .keep_versions(Some(std::time::Duration::from_secs(3600)))
        .unwrap();
    let mib = 1 << 20;
    let (first, second) = (pattern(mib, 1), pattern(mib, 2));
    let size = 2 * mib as u64;
    let at = |version: u64, op: Op| Change {
        version: Vector::from_pairs(vec![(7, version)]),
        ..change("big.bin", op)
    };
    // One 2 MiB write arriving as two pieces of the same version: the second patches
    // the file in place over the hole the first left, which is no version to keep.
    node.applier()
        .apply(&at(1, ranges(size, &[(0, &first)])))
        .unwrap();
    node.applier()
        .apply(&at(1, ranges(size, &[(mib as u64, &second)])))
        .unwrap();
    let kept = |node: &Node| {
        filesync::sync::versions::list(&node.state_dir(), Path::new("big.bin")).unwrap()
    };
    assert!(kept(&node).is_empty(), "{:?}", kept(&node));
    // The next write replaces what the first one made: that is kept, once.
    node.applier()
        .apply(&at(2, ranges(size, &[(0, &second)])))
        .unwrap();
    let versions = kept(&node);
    assert_eq!(versions.len(), 1, "{versions:?}");
    let old = std::fs::read(&versions[0].path).unwrap();
    assert_eq!(old.get(..mib), Some(first.as_slice()));
    assert_eq!(old.get(mib..), Some(second.as_slice()));
}

#[test]
fn a_size_change_without_data_that_would_grow_our_file_is_a_mismatch_not_zeros() {
    let mut node = Node::new();
    node.apply("a.txt", whole(b"")).unwrap();
    let unchanged = Op::File {
        meta: meta(0o644),
        size: 44,
        data: FileData::Unchanged,
        blocks: Vec::new(),
    };
    let err = node.apply("a.txt", unchanged).unwrap_err();
    assert!(matches!(err, ApplyError::BaseMismatch { .. }), "{err:?}");
    // The same for a size change alone that would grow the file.
    let err = node.apply("a.txt", ranges(44, &[])).unwrap_err();
    assert!(matches!(err, ApplyError::BaseMismatch { .. }), "{err:?}");
    assert_eq!(node.read("a.txt"), b"");
    // A size change that shrinks it is applied.
    node.apply("a.txt", whole(b"longer text")).unwrap();
    node.apply("a.txt", ranges(6, &[])).unwrap();
    assert_eq!(node.read("a.txt"), b"longer");
}
