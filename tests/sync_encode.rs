//! The sending side of replication: what the encoder sends for each kind of update, read
//! back against the files, and the size of a delta for a small change in a large file.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{symlink, FileExt};
use std::path::{Path, PathBuf};

use filesync::index::BLOCK_SIZE;
use filesync::pipeline::update::{Content, Update};
use filesync::sync::compress::{decompress_change, CompressionPolicy};
use filesync::sync::delta::{SignatureStore, Version};
use filesync::sync::encode::Encoder;
use filesync::sync::proto::{self, Change, FileData, Op, RelPath, Want};

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    state: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let state = dir.path().join("state");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&state).unwrap();
    Setup {
        _dir: dir,
        root,
        state,
    }
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn changed(path: &str, content: Content) -> Update {
    Update::Changed {
        path: path.into(),
        file: None,
        created: false,
        content,
        metadata: false,
        synced: false,
        sources: Vec::new(),
        version: Default::default(),
    }
}

fn rel(s: &str) -> RelPath {
    RelPath(s.as_bytes().to_vec())
}

fn all(encoder: &mut Encoder, update: &Update) -> Vec<Change> {
    encoder
        .encode(update)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// Bytes of file data (compressed or not) the changes carry.
fn data_bytes(changes: &[Change]) -> usize {
    changes
        .iter()
        .map(|c| match &c.op {
            Op::File { data, .. } => match data {
                FileData::Ranges(r) => r.iter().map(|r| r.data.bytes.len()).sum(),
                FileData::Delta { delta, .. } => delta.bytes.len(),
                FileData::Whole { data, .. } => data.bytes.len(),
                FileData::Unchanged => 0,
            },
            _ => 0,
        })
        .sum()
}

/// The encoded size of the changes, as the channel would send them.
fn wire_bytes(changes: &[Change]) -> usize {
    changes
        .iter()
        .map(|c| {
            bincode::serde::encode_to_vec(
                proto::Message::Change(c.clone()),
                bincode::config::standard(),
            )
            .unwrap()
            .len()
        })
        .sum()
}

/// Rebuilds a file from whole pieces (checking order and the `last` flag).
fn reassemble(changes: &[Change]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, change) in changes.iter().enumerate() {
        let Op::File {
            data: FileData::Whole { offset, data, last },
            ..
        } = &change.op
        else {
            panic!("whole pieces expected, got {:?}", change.op)
        };
        assert_eq!(*offset, out.len() as u64);
        assert!(data.bytes.len() <= proto::MAX_CHUNK);
        assert_eq!(*last, i + 1 == changes.len());
        out.extend_from_slice(&data.bytes);
    }
    out
}

fn check_blocks(content: &[u8], blocks: &[(u64, proto::Hash)]) {
    for (index, hash) in blocks {
        let start = (*index * BLOCK_SIZE) as usize;
        let end = (start + BLOCK_SIZE as usize).min(content.len());
        assert_eq!(
            hash,
            blake3::hash(&content[start..end]).as_bytes(),
            "block {index}"
        );
    }
}

#[test]
fn ranges_are_read_exactly_and_split_at_the_chunk_limit() {
    let s = setup();
    let content = noise(3 << 20, 1);
    fs::write(s.root.join("f"), &content).unwrap();
    let mut encoder = Encoder::open(&s.root, &s.state).unwrap();
    encoder.set_next_seq(10);
    let ranges = vec![(100, 10), (500_000, 2_500_000), (3_100_000, 0)];
    let changes = all(&mut encoder, &changed("f", Content::Ranges(ranges)));
    assert!(changes.len() >= 3, "{} changes", changes.len());
    let mut seen = Vec::new();
    for (i, change) in changes.iter().enumerate() {
        assert_eq!(change.seq, 10 + i as u64);
        assert_eq!(change.path, rel("f"));
        let Op::File {
            size,
            data: FileData::Ranges(ranges),
            blocks,
            ..
        } = &change.op
        else {
            panic!("ranges expected")
        };
        assert_eq!(*size, content.len() as u64);
        let total: usize = ranges.iter().map(|r| r.data.bytes.len()).sum();
        assert!(total <= proto::MAX_CHUNK);
        check_blocks(&content, blocks);
        for range in ranges {
            let at = range.offset as usize;
            assert_eq!(range.data.raw_len as usize, range.data.bytes.len());
            assert_eq!(range.data.bytes, content[at..at + range.data.bytes.len()]);
            seen.push((range.offset, range.data.bytes.len() as u64));
        }
        assert!(wire_bytes(std::slice::from_ref(change)) <= proto::MAX_MESSAGE);
    }
    // Pieces of one range arrive in order and cover it exactly.
    seen.dedup_by(|b, a| {
        if a.0 + a.1 == b.0 {
            a.1 += b.1;
            true
        } else {
            false
        }
    });
    assert_eq!(seen, vec![(100, 10), (500_000, 2_500_000)]);
    assert_eq!(encoder.next_seq(), 10 + changes.len() as u64);
}

#[test]
fn truncation_sends_the_new_size_and_no_data() {
    let s = setup();
    let content = noise(300_000, 2);
    fs::write(s.root.join("t"), &content).unwrap();
    File::options()
        .write(true)
        .open(s.root.join("t"))
        .unwrap()
        .set_len(200_000)
        .unwrap();
    let mut encoder = Encoder::open(&s.root, &s.state).unwrap();
    // A write recorded past the new end is clamped away.
    let changes = all(
        &mut encoder,
        &changed("t", Content::Ranges(vec![(200_000, 0), (250_000, 10)])),
    );
    assert_eq!(changes.len(), 1);
    let Op::File {
        size,
        data: FileData::Ranges(ranges),
        blocks,
        ..
    } = &changes[0].op
    else {
        panic!("ranges expected")
    };
    assert_eq!(*size, 200_000);
    assert!(ranges.is_empty());
    // The last block is not checked by hash: a write may already have changed it, which
    // a later change brings (catch-up compares whole files).
    assert!(blocks.is_empty());
}

#[test]
fn unknown_content_of_a_small_file_goes_whole_and_compresses() {
    let s = setup();
    let content: Vec<u8> = b"a line of text\n"
        .iter()
        .cycle()
        .take(2_500_000)
        .copied()
        .collect();
    fs::write(s.root.join("log.txt"), &content).unwrap();
    let mut encoder = Encoder::open(&s.root, &s.state).unwrap();
    let mut changes = all(&mut encoder, &changed("log.txt", Content::Unknown));
    assert_eq!(changes.len(), 3);
    let policy = CompressionPolicy::default();
    for change in &mut changes {
        policy.compress_change(change);
    }
    assert!(data_bytes(&changes) < content.len() / 20);
    for change in &mut changes {
        decompress_change(change).unwrap();
        let Op::File { blocks, .. } = &change.op else {
            unreachable!()
        };
        check_blocks(&content, blocks);
    }
    assert_eq!(reassemble(&changes), content);
    // Created but said unchanged: still sent whole. Empty files too.
    fs::write(s.root.join("empty"), b"").unwrap();
    let mut update = changed("empty", Content::Unchanged);
    if let Update::Changed { created, .. } = &mut update {
        *created = true;
    }
    assert_eq!(reassemble(&all(&mut encoder, &update)), b"");
}

/// Sends `path` once whole (storing its signature), changes 4 KiB in the middle, and
/// returns the changes for the unknown update that follows.
fn small_change_in_large_file(size: u64) -> (Vec<Change>, Vec<u8>, Vec<u8>) {
    let s = setup();
    let path = s.root.join("big.img");
    let file = File::create(&path).unwrap();
    file.set_len(size).unwrap();
    let mut encoder = Encoder::open(&s.root, &s.state).unwrap();
    // The first send is whole; only piece lengths are kept, not the data.
    let mut sent = 0u64;
    for change in encoder
        .encode(&changed("big.img", Content::Unknown))
        .unwrap()
    {
        if let Op::File {
            data: FileData::Whole { data, .. },
            ..
        } = change.unwrap().op
        {
            sent += data.bytes.len() as u64;
        }
    }
    assert_eq!(sent, size);
    let patch = noise(4096, 3);
    let middle = size / 2 + 1234;
    file.write_all_at(&patch, middle).unwrap();
    let changes = all(&mut encoder, &changed("big.img", Content::Unknown));
    (changes, patch, middle.to_le_bytes().to_vec())
}

#[test]
fn a_small_change_in_a_large_file_sends_a_small_delta() {
    // 32 MiB keeps this under a few seconds in a debug build, where fast_rsync's MD4 is
    // slow; `measure_delta_of_4k_in_1g` is the full-size case.
    let size = 32 << 20;
    let (changes, patch, middle) = small_change_in_large_file(size);
    let middle = u64::from_le_bytes(middle.try_into().unwrap());
    assert_eq!(changes.len(), 1);
    let wire = wire_bytes(&changes);
    assert!(wire < 64 * 1024, "{wire} bytes on the wire");
    let Op::File {
        data: FileData::Delta { base, delta },
        blocks,
        size: sent_size,
        ..
    } = &changes[0].op
    else {
        panic!("delta expected, got {:?}", changes[0].op)
    };
    assert_eq!(*sent_size, size);
    let old = vec![0u8; size as usize];
    let zero_block = *blake3::hash(&old[..BLOCK_SIZE as usize]).as_bytes();
    let zero_blocks = vec![zero_block; (size / BLOCK_SIZE) as usize];
    assert_eq!(*base, filesync::sync::delta::content_hash(&zero_blocks));
    let mut new = Vec::new();
    fast_rsync::apply(&old, &delta.bytes, &mut new).unwrap();
    let mut expected = old;
    expected[middle as usize..middle as usize + patch.len()].copy_from_slice(&patch);
    assert!(new == expected);
    let touched: Vec<u64> = blocks.iter().map(|b| b.0).collect();
    assert_eq!(touched, vec![middle / BLOCK_SIZE]);
    check_blocks(&expected, blocks);
}

/// The case without exact ranges (a change capture could not name): 4 KiB changed
/// in the middle of a 1 GiB file goes as a delta well under 64 KiB (about 16 KiB).
#[test]
fn a_4k_change_in_1gib_without_ranges_is_a_small_delta() {
    let (changes, _, _) = small_change_in_large_file(1 << 30);
    assert_eq!(changes.len(), 1);
    assert!(
        wire_bytes(&changes) < 64 * 1024,
        "{} bytes",
        wire_bytes(&changes)
    );
}

#[test]
fn ranges_keep_the_stored_version_current_for_later_deltas() {
    let s = setup();
    let path = s.root.join("db");
    let mut content = noise(4 << 20, 4);
    fs::write(&path, &content).unwrap();
    let mut encoder = Encoder::open(&s.root, &s.state).unwrap();
    all(&mut encoder, &changed("db", Content::Unknown));
    // An overwrite and an append, sent as ranges.
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(b"overwritten", 1_000_000).unwrap();
    file.write_all_at(&noise(300_000, 5), content.len() as u64)
        .unwrap();
    let ranges = vec![(1_000_000, 11), (content.len() as u64, 300_000)];
    all(&mut encoder, &changed("db", Content::Ranges(ranges)));
    content = fs::read(&path).unwrap();
    let store = SignatureStore::open(&s.state).unwrap();
    let patched = store.load(&rel("db")).unwrap().expect("a patched version");
    let fresh = Version::of_bytes(&content);
    assert_eq!((patched.size, patched.hash), (fresh.size, fresh.hash));
    assert!(patched.block_hashes == fresh.block_hashes);
    // The signature keeps the block size chosen for the first version.
    let options = fast_rsync::SignatureOptions {
        block_size: 1024,
        crypto_hash_size: filesync::sync::delta::CRYPTO_HASH_SIZE,
    };
    assert!(patched.signature == fast_rsync::Signature::calculate(&content, options).serialized());
    // An unseen change now goes by delta against what the peer holds.
    file.write_all_at(b"unseen", 2_000_000).unwrap();
    let changes = all(&mut encoder, &changed("db", Content::Unknown));
    let Op::File {
        data: FileData::Delta { base, .. },
        ..
    } = &changes[0].op
    else {
        panic!("delta expected")
    };
    assert_eq!(*base, Version::of_bytes(&content).hash);
    // A hole punched by growing the file is not covered by the ranges: the version goes.
    file.set_len(8 << 20).unwrap();
    all(
        &mut encoder,
        &changed("db", Content::Ranges(vec![(8 << 20, 0)])),
    );
    assert!(store.load(&rel("db")).unwrap().is_none());
}

#[test]
fn catch_up_resumes_and_uses_the_receivers_signature() {
    let s = setup();
    let content = noise(5 << 20, 6);
    fs::write(s.root.join("v"), &content).unwrap();
    let mut encoder = Encoder::open(&s.root, &s.state).unwrap();
    let block_hashes: Vec<proto::Hash> = content
        .chunks(BLOCK_SIZE as usize)
        .map(|b| *blake3::hash(b).as_bytes())
        .collect();
    let held = 17;
    let prefix = filesync::sync::delta::content_hash(&block_hashes[..held]);
    let resume_at = held as u64 * BLOCK_SIZE;
    let want = Want {
        path: rel("v"),
        signature: None,
        resume: Some((prefix, resume_at)),
    };
    let changes: Vec<Change> = encoder
        .encode_whole(Path::new("v"), &want, Default::default())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let Op::File {
        data: FileData::Whole { offset, .. },
        ..
    } = &changes[0].op
    else {
        panic!("whole expected")
    };
    assert_eq!(*offset, resume_at);
    assert_eq!(
        data_bytes(&changes) as u64,
        content.len() as u64 - resume_at
    );
    // A partial copy of another version starts over.
    let want = Want {
        resume: Some(([7; 32], resume_at)),
        ..want
    };
    let changes: Vec<Change> = encoder
        .encode_whole(Path::new("v"), &want, Default::default())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(reassemble(&changes), content);
    // The receiver holds an older version and sends its signature.
    let mut older = content.clone();
    older[3_000_000..3_000_100].fill(0);
    let theirs = Version::of_bytes(&older);
    let want = Want {
        path: rel("v"),
        signature: Some((theirs.hash, theirs.signature.clone())),
        resume: None,
    };
    let changes: Vec<Change> = encoder
        .encode_whole(Path::new("v"), &want, Default::default())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let Op::File {
        data: FileData::Delta { base, delta },
        meta,
        ..
    } = &changes[0].op
    else {
        panic!("delta expected")
    };
    assert_eq!(*base, theirs.hash);
    assert!(meta.xattrs.is_some());
    let mut rebuilt = Vec::new();
    fast_rsync::apply(&older, &delta.bytes, &mut rebuilt).unwrap();
    assert!(rebuilt == content);
    // A signature that does not parse is ignored: the file goes whole.
    let want = Want {
        signature: Some(([1; 32], b"junk".to_vec())),
        ..want
    };
    let changes: Vec<Change> = encoder
        .encode_whole(Path::new("v"), &want, Default::default())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(reassemble(&changes), content);
}

#[test]
fn other_kinds_removals_renames_and_vanished_paths() {
    let s = setup();
    fs::create_dir(s.root.join("d")).unwrap();
    symlink("../outside", s.root.join("d/link")).unwrap();
    let fifo = s.root.join("d/fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o640) }, 0);
    fs::write(s.root.join("d/f"), b"x").unwrap();
    xattr_set(&s.root.join("d/f"), "user.tag", b"blue");
    let mut encoder = Encoder::open(&s.root, &s.state).unwrap();

    let one = |encoder: &mut Encoder, update: Update| {
        let changes = all(encoder, &update);
        assert_eq!(changes.len(), 1, "{changes:?}");
        changes.into_iter().next().unwrap().op
    };
    assert!(matches!(
        one(&mut encoder, changed("d", Content::Unchanged)),
        Op::Dir { .. }
    ));
    match one(&mut encoder, changed("d/link", Content::Unknown)) {
        Op::Symlink { target, .. } => assert_eq!(target, b"../outside"),
        other => panic!("{other:?}"),
    }
    match one(&mut encoder, changed("d/fifo", Content::Unknown)) {
        Op::Special { mode, meta, .. } => {
            assert_eq!(mode & libc::S_IFMT, libc::S_IFIFO);
            assert_eq!(meta.mode, 0o640 & !umask());
        }
        other => panic!("{other:?}"),
    }
    let mut update = changed("d/f", Content::Unchanged);
    if let Update::Changed { metadata, .. } = &mut update {
        *metadata = true;
    }
    match one(&mut encoder, update) {
        Op::File {
            data: FileData::Unchanged,
            size,
            meta,
            ..
        } => {
            assert_eq!(size, 1);
            let xattrs = meta.xattrs.unwrap();
            if !xattrs.is_empty() {
                assert!(xattrs.contains(&(b"user.tag".to_vec(), b"blue".to_vec())));
            }
        }
        other => panic!("{other:?}"),
    }
    // Through a symlinked directory, or simply gone: removed.
    symlink("d", s.root.join("alias")).unwrap();
    assert_eq!(
        one(&mut encoder, changed("alias/f", Content::Unknown)),
        Op::Remove
    );
    assert_eq!(
        one(&mut encoder, changed("gone", Content::Unknown)),
        Op::Remove
    );
    let removed = Update::Removed {
        path: "d/f".into(),
        dir: false,
        sources: Vec::new(),
        version: Default::default(),
    };
    assert_eq!(one(&mut encoder, removed), Op::Remove);
    let renamed = Update::Renamed {
        from: "d".into(),
        to: "e/d2".into(),
        exchange: true,
        sources: Vec::new(),
        version: Default::default(),
    };
    assert_eq!(
        one(&mut encoder, renamed),
        Op::Rename {
            to: rel("e/d2"),
            exchange: true
        }
    );
    assert_eq!(
        all(
            &mut encoder,
            &Update::Rescan {
                sources: Vec::new()
            }
        ),
        vec![]
    );
    assert!(encoder
        .encode(&changed("../escape", Content::Unknown))
        .is_err());
}

fn umask() -> u32 {
    let old = unsafe { libc::umask(0o022) };
    unsafe { libc::umask(old) };
    old
}

/// Sets a user xattr when the filesystem supports them (tmpfs on older kernels does not).
fn xattr_set(path: &Path, name: &str, value: &[u8]) {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
}
