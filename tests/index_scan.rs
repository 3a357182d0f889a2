//! The index (records, tombstones, atomicity, corruption, crash durability), building
//! records from files (partial re-hashing), and the reconcile scan against a real tree.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use filesync::capture::scan::{scan, ScanError, ScanStats};
use filesync::change::{AttrChange, Change, ChangeKind, ChangeSink, Source};
use filesync::ignores::{Ignores, IGNORE_FILE};
use filesync::index::{record_for, FileKind, FileRecord, Index, IndexError, BLOCK_SIZE};

const BS: usize = BLOCK_SIZE as usize;

#[derive(Default)]
struct Collect(Mutex<Vec<Change>>);

impl ChangeSink for Collect {
    fn record(&self, change: Change) {
        if let Ok(mut v) = self.0.lock() {
            v.push(change);
        }
    }
}

impl Collect {
    fn take(&self) -> Vec<Change> {
        std::mem::take(&mut *self.0.lock().expect("sink lock"))
    }
}

fn rec(kind: FileKind, size: u64) -> FileRecord {
    FileRecord {
        kind,
        size,
        mtime_ns: 1,
        ctime_ns: 2,
        ino: 3,
        dev: 4,
        rdev: 0,
        mode: 0o100644,
        uid: 0,
        gid: 0,
        xattr_digest: [0; 32],
        symlink_target: None,
        block_hashes: vec![[7; 32]; size.div_ceil(BLOCK_SIZE) as usize],
        deleted_ns: None,
    }
}

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

fn names(children: &[(OsString, FileRecord)]) -> Vec<String> {
    children
        .iter()
        .map(|(n, _)| n.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn records_round_trip_and_directory_tombstones_cover_the_subtree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = Index::open(&dir.path().join("index.redb")).expect("open");
    assert!(index.is_empty().expect("len"));
    let mut link = rec(FileKind::Symlink, 3);
    link.symlink_target = Some(b"x\xffy".to_vec());
    link.block_hashes.clear();
    let records = vec![
        (p("a"), rec(FileKind::Dir, 0)),
        (p("a/b"), rec(FileKind::Dir, 0)),
        (p("a/b/c"), rec(FileKind::File, 3 * BLOCK_SIZE + 1)),
        (p("a/l"), link),
        (p("a-b"), rec(FileKind::File, 5)),
        (p("a-b/x"), rec(FileKind::File, 5)),
        (p("z"), rec(FileKind::File, 0)),
    ];
    index.put_batch(records.clone()).expect("put");
    for (path, r) in &records {
        assert_eq!(index.get(path).expect("get").as_ref(), Some(r), "{path:?}");
    }
    assert_eq!(index.get(&p("missing")).expect("get"), None);
    assert_eq!(index.len().expect("len"), 7);
    assert_eq!(
        names(&index.children(&p("")).expect("kids")),
        ["a", "a-b", "z"]
    );
    assert_eq!(names(&index.children(&p("a")).expect("kids")), ["b", "l"]);
    let below: Vec<PathBuf> = index
        .subtree(&p("a"))
        .expect("subtree")
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(below, [p("a/b"), p("a/b/c"), p("a/l")]);

    index.tombstone_batch(vec![p("a")], 99).expect("tombstone");
    for path in ["a", "a/b", "a/b/c", "a/l"] {
        let r = index.get(&p(path)).expect("get").expect("kept");
        assert_eq!(r.deleted_ns, Some(99), "{path}");
        assert!(!r.is_live());
    }
    for path in ["a-b", "a-b/x", "z"] {
        assert!(index.get(&p(path)).expect("get").expect("kept").is_live());
    }
    assert_eq!(
        names(&index.live_children(&p("")).expect("kids")),
        ["a-b", "z"]
    );
    // A second tombstone keeps the first deletion time; an unknown path is ignored.
    index
        .tombstone_batch(vec![p("a/b"), p("nothing")], 123)
        .expect("tombstone");
    assert_eq!(
        index
            .get(&p("a/b/c"))
            .expect("get")
            .expect("kept")
            .deleted_ns,
        Some(99)
    );
    assert_eq!(index.get(&p("nothing")).expect("get"), None);
    // Created again: live, its old contents stay deleted.
    index
        .put_batch(vec![(p("a"), rec(FileKind::Dir, 0))])
        .expect("put");
    assert!(index.get(&p("a")).expect("get").expect("rec").is_live());
    assert!(index.live_children(&p("a")).expect("kids").is_empty());
    assert_eq!(index.len().expect("len"), 7);

    // Tombstoning the backing folder itself covers everything.
    index.tombstone_batch(vec![p("")], 5).expect("tombstone");
    assert!(index.live_children(&p("")).expect("kids").is_empty());
    assert!(index
        .subtree(&p(""))
        .expect("all")
        .iter()
        .all(|(_, r)| !r.is_live()));

    // Records survive closing and reopening.
    drop(index);
    let index = Index::open(&dir.path().join("index.redb")).expect("reopen");
    assert_eq!(index.len().expect("len"), 7);
}

#[test]
fn a_batch_is_all_or_nothing_and_bad_paths_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = Index::open(&dir.path().join("i.redb")).expect("open");
    let err = index
        .put_batch(vec![
            (p("ok"), rec(FileKind::File, 1)),
            (p("../escape"), rec(FileKind::File, 1)),
        ])
        .expect_err("bad path");
    assert!(matches!(err, IndexError::BadPath { .. }), "{err}");
    assert_eq!(index.len().expect("len"), 0);
    assert!(matches!(
        index.get(&p("/abs")),
        Err(IndexError::BadPath { .. })
    ));
    assert!(matches!(
        index.tombstone_batch(vec![p("ok"), p("a/../../b")], 1),
        Err(IndexError::BadPath { .. })
    ));
}

#[test]
fn a_second_opener_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("i.redb");
    let _first = Index::open(&path).expect("open");
    let err = Index::open(&path).expect_err("locked");
    assert!(matches!(err, IndexError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("another process"), "{err}");
}

#[test]
fn the_index_is_shareable_private_and_refuses_foreign_files() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Index>();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("i.redb");
    drop(Index::open(&path).expect("open"));
    let mode = fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let junk = dir.path().join("junk");
    fs::write(&junk, vec![0x5a; 8192]).expect("write");
    let err = Index::open(&junk).expect_err("not an index");
    assert!(matches!(err, IndexError::Open { .. }), "{err}");
    let err = Index::open(&dir.path().join("no/such/folder/i.redb")).expect_err("no folder");
    assert!(err.to_string().contains("folder exists"), "{err}");
}

#[test]
fn a_corrupt_value_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("i.redb");
    let tree = dir.path().join("tree");
    fs::create_dir(&tree).expect("mkdir");
    fs::write(tree.join("bad"), b"x").expect("write");
    {
        let index = Index::open(&path).expect("open");
        index
            .put_batch(vec![(p("bad"), rec(FileKind::File, 1))])
            .expect("put");
    }
    // A value cut short, written behind the index's back.
    let index = index_with_value(&path, b"\x01\x00");
    let err = index.get(&p("bad")).expect_err("corrupt");
    assert!(
        err.to_string().contains("move the index file away"),
        "{err}"
    );
    assert!(index.children(&p("")).is_err());
    let sink = Collect::default();
    assert!(matches!(
        scan(&tree, &index, &Ignores::none(), &sink, None),
        Err(ScanError::Index(IndexError::Corrupt { .. }))
    ));
    drop(index);
    // Other damage: a newer version byte, an unknown kind, a huge length, nothing.
    for garbage in [
        &[9u8, 0, 0][..],
        &[1u8, 7, 0][..],
        &[1u8, 0, 2, 1, 2][..],
        &[][..],
    ] {
        drop(index_with_value(&path, garbage));
    }
}

/// Stores `value` under the key of `bad`, with the documented layout (table `records`,
/// key = parent, NUL, name), and checks that reading it fails cleanly.
fn index_with_value(path: &Path, value: &[u8]) -> Index {
    {
        let db = redb::Database::create(path).expect("raw open");
        let txn = db.begin_write().expect("write");
        {
            let table: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("records");
            let mut t = txn.open_table(table).expect("table");
            t.insert(&b"\0bad"[..], value).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let index = Index::open(path).expect("reopen");
    assert!(matches!(
        index.get(&p("bad")),
        Err(IndexError::Corrupt { .. })
    ));
    index
}

// ---- record_for ----

fn blocks_of(data: &[u8]) -> Vec<[u8; 32]> {
    data.chunks(BS)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect()
}

fn build(
    root: &File,
    rel: &str,
    prev: Option<&FileRecord>,
    dirty: Option<&[(u64, u64)]>,
) -> FileRecord {
    record_for(root.as_fd(), Path::new(rel), prev, dirty)
        .expect("record_for")
        .expect("exists")
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn record_for_rehashes_only_the_blocks_the_dirty_ranges_touch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = File::open(dir.path()).expect("root");
    let path = dir.path().join("f");
    let mut data = pattern(5 * BS + 1000, 1);
    fs::write(&path, &data).expect("write");
    let r0 = build(&root, "f", None, None);
    assert_eq!(r0.kind, FileKind::File);
    assert_eq!(r0.size, data.len() as u64);
    assert_eq!(r0.block_hashes, blocks_of(&data));

    // Change blocks 1 and 3 on disk but declare only a write into block 1: block 1 is
    // recomputed, block 3 keeps its old hash, so it was not read.
    let f = OpenOptions::new().write(true).open(&path).expect("open");
    f.write_all_at(b"XYZ", (BS + 10) as u64).expect("write");
    f.write_all_at(b"QQQ", (3 * BS + 7) as u64).expect("write");
    data[BS + 10..BS + 13].copy_from_slice(b"XYZ");
    let r1 = build(&root, "f", Some(&r0), Some(&[(BS as u64 + 10, 3)]));
    let fresh = blocks_of(&data);
    assert_eq!(r1.block_hashes[1], fresh[1]);
    assert_ne!(r1.block_hashes[1], r0.block_hashes[1]);
    assert_eq!(
        r1.block_hashes[3], r0.block_hashes[3],
        "untouched block re-read"
    );
    for i in [0, 2, 4, 5] {
        assert_eq!(r1.block_hashes[i], r0.block_hashes[i]);
    }
    // A write spanning a block boundary touches both blocks.
    data[3 * BS + 7..3 * BS + 10].copy_from_slice(b"QQQ");
    let r2 = build(&root, "f", Some(&r1), Some(&[(3 * BS as u64 + 7, 3)]));
    assert_eq!(r2.block_hashes, blocks_of(&data));
    drop(f);

    // Append: the old partial tail block and the new blocks are hashed, nothing else.
    let old_len = data.len() as u64;
    let extra = pattern(2 * BS, 9);
    OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open")
        .write_all(&extra)
        .expect("append");
    data.extend_from_slice(&extra);
    let r3 = build(
        &root,
        "f",
        Some(&r2),
        Some(&[(old_len, extra.len() as u64)]),
    );
    assert_eq!(r3.block_hashes, blocks_of(&data));
    assert_eq!(r3.size, data.len() as u64);

    // Shrink: the range the coalescer reports is empty, at the new size.
    let cut = 2 * BS + 300;
    File::options()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(cut as u64)
        .expect("truncate");
    data.truncate(cut);
    let r4 = build(&root, "f", Some(&r3), Some(&[(cut as u64, 0)]));
    assert_eq!(r4.block_hashes, blocks_of(&data));

    // Cut short and grown back to the same size in one burst: everything from the cut on
    // is zeros now and must be rehashed, though the size did not change.
    let f = File::options().write(true).open(&path).expect("open");
    f.set_len(100).expect("truncate");
    f.set_len(cut as u64).expect("grow");
    data[100..].fill(0);
    let r5 = build(&root, "f", Some(&r4), Some(&[(100, 0)]));
    assert_eq!(r5.block_hashes, blocks_of(&data));

    // Without ranges, or with a previous record that does not fit, everything is hashed.
    let mut wrong = r5.clone();
    wrong.block_hashes.pop();
    assert_eq!(
        build(&root, "f", Some(&wrong), Some(&[])).block_hashes,
        blocks_of(&data)
    );
    assert_eq!(
        build(&root, "f", Some(&r0), None).block_hashes,
        blocks_of(&data)
    );

    // An empty file has no blocks.
    fs::write(dir.path().join("empty"), b"").expect("write");
    assert!(build(&root, "empty", None, None).block_hashes.is_empty());
}

#[test]
fn record_for_handles_every_kind_and_missing_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = File::open(dir.path()).expect("root");
    fs::create_dir(dir.path().join("d")).expect("mkdir");
    fs::write(dir.path().join("d/f"), b"hello").expect("write");
    symlink("d/f", dir.path().join("l")).expect("symlink");
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).expect("cstr");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);

    let d = build(&root, "d", None, None);
    assert_eq!((d.kind, d.block_hashes.len()), (FileKind::Dir, 0));
    let l = build(&root, "l", None, None);
    assert_eq!(l.kind, FileKind::Symlink);
    assert_eq!(l.symlink_target.as_deref(), Some(&b"d/f"[..]));
    let f = build(&root, "fifo", None, None);
    assert_eq!(f.kind, FileKind::Other);
    let root_rec = build(&root, "", None, None);
    assert_eq!(root_rec.kind, FileKind::Dir);
    let file = build(&root, "./d//f", None, None);
    assert_eq!(file.block_hashes, blocks_of(b"hello"));

    let none = |rel: &str| record_for(root.as_fd(), Path::new(rel), None, None).expect("ok");
    assert_eq!(none("missing"), None);
    assert_eq!(none("d/f/below-a-file"), None);
    // Through a symlink is not below the folder as recorded.
    symlink("d", dir.path().join("ld")).expect("symlink");
    assert_eq!(none("ld/f"), None);
    assert!(matches!(
        record_for(root.as_fd(), Path::new("../x"), None, None),
        Err(IndexError::BadPath { .. })
    ));

    // Extended attributes change the digest (where the filesystem has user xattrs).
    let fpath = dir.path().join("d/f");
    if xattr_set(&fpath, "user.a", b"1") {
        let x1 = build(&root, "d/f", None, None).xattr_digest;
        assert_ne!(x1, [0; 32]);
        assert!(xattr_set(&fpath, "user.a", b"2"));
        assert_ne!(build(&root, "d/f", None, None).xattr_digest, x1);
        // A symlink's own attributes, not its target's.
        assert_eq!(build(&root, "l", None, None).xattr_digest, [0; 32]);
    }
    assert_eq!(d.xattr_digest, [0; 32]);
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) -> bool {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("cstr");
    let n = std::ffi::CString::new(name).expect("cstr");
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        ) == 0
    }
}

// ---- durability ----

const CHILD_ENV: &str = "FILESYNC_INDEX_KILL_CHILD";
const PER_BATCH: usize = 20;

/// The child of `kill_9_loses_no_committed_batch`: commits batches forever, printing each
/// number once `put_batch` returned. As a plain test run it does nothing.
#[test]
fn kill_9_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let index = Index::open(Path::new(&path)).expect("child open");
    let mut out = std::io::stdout().lock();
    for batch in 0u64.. {
        let records = (0..PER_BATCH)
            .map(|i| {
                (
                    PathBuf::from(format!("b{batch}/f{i}")),
                    rec(FileKind::File, batch),
                )
            })
            .collect();
        index.put_batch(records).expect("child put");
        writeln!(out, "committed {batch}").expect("print");
        out.flush().expect("flush");
    }
}

#[test]
fn kill_9_loses_no_committed_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("index.redb");
    // Some records already there, so the crash hits a database with history.
    {
        let index = Index::open(&path).expect("open");
        let seed: Vec<_> = (0..2000)
            .map(|i| (PathBuf::from(format!("seed/{i}")), rec(FileKind::File, 1)))
            .collect();
        index.put_batch(seed).expect("seed");
    }
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .args(["--exact", "kill_9_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut last = None;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("committed ") {
                last = n.parse::<u64>().ok();
            }
        }
        last
    });
    // A moment between 0.4 and 1.6 s, different on every run.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::thread::sleep(Duration::from_millis(400 + u64::from(nanos % 1200)));
    child.kill().expect("SIGKILL"); // std sends SIGKILL
    child.wait().expect("reap");
    let last = reader
        .join()
        .expect("reader")
        .expect("child committed nothing");

    let started = Instant::now();
    let index = Index::open(&path).expect("reopen after kill -9");
    let reopen = started.elapsed();
    for batch in 0..=last {
        for i in 0..PER_BATCH {
            let r = index
                .get(&PathBuf::from(format!("b{batch}/f{i}")))
                .expect("get")
                .unwrap_or_else(|| panic!("batch {batch} record {i} lost"));
            assert_eq!(r.size, batch);
        }
    }
    // The batch being committed at the kill is there whole or not at all.
    let next = last + 1;
    let present = (0..PER_BATCH)
        .filter(|i| {
            index
                .get(&PathBuf::from(format!("b{next}/f{i}")))
                .expect("get")
                .is_some()
        })
        .count();
    assert!(
        present == 0 || present == PER_BATCH,
        "batch {next} half there: {present}"
    );
    assert!(index.get(&p("seed/1999")).expect("get").is_some());
    eprintln!(
        "kill -9 after batch {last}: all present; reopen took {} ms",
        reopen.as_millis()
    );
    assert!(reopen < Duration::from_secs(2), "reopen took {reopen:?}");
}

// ---- scan ----

/// What the tests compare: each change as (path, kind).
fn summary(changes: &[Change]) -> BTreeSet<(String, String)> {
    changes
        .iter()
        .map(|c| {
            assert_eq!(c.source, Source::Scan);
            let path = c
                .path
                .as_ref()
                .expect("path")
                .to_string_lossy()
                .into_owned();
            (path, format!("{:?}", c.kind))
        })
        .collect()
}

fn set(items: &[(&str, ChangeKind)]) -> BTreeSet<(String, String)> {
    items
        .iter()
        .map(|(p, k)| (p.to_string(), format!("{k:?}")))
        .collect()
}

/// Plays the indexer: stores what the changes say, in order.
fn apply(index: &Index, root: &Path, changes: &[Change]) {
    let root_fd = File::open(root).expect("root");
    for c in changes {
        let path = c.path.clone().expect("path");
        match c.kind {
            ChangeKind::Unlink | ChangeKind::Rmdir => {
                index.tombstone_batch(vec![path], 1).expect("tombstone");
            }
            _ => {
                let prev = index.get(&path).expect("get");
                match record_for(root_fd.as_fd(), &path, prev.as_ref(), None).expect("record") {
                    Some(r) => index.put_batch(vec![(path, r)]).expect("put"),
                    None => index.tombstone_batch(vec![path], 1).expect("tombstone"),
                }
            }
        }
    }
}

fn run_scan(root: &Path, index: &Index) -> (Vec<Change>, ScanStats) {
    let sink = Collect::default();
    let stats = scan(root, index, &Ignores::none(), &sink, None).expect("scan");
    (sink.take(), stats)
}

fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("d1/d2")).expect("mkdir");
    fs::create_dir_all(root.join("gone/sub")).expect("mkdir");
    for f in [
        "f1",
        "f2",
        "f3",
        "mm",
        "ur",
        "d1/a",
        "d1/d2/b",
        "gone/x",
        "gone/sub/y",
        "swap",
    ] {
        fs::write(root.join(f), pattern(1000, 3)).expect("write");
    }
    symlink("f1", root.join("ln")).expect("symlink");
}

#[test]
fn scan_reports_new_entries_then_nothing_then_exactly_what_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("src");
    fs::create_dir(&root).expect("mkdir");
    make_tree(&root);
    let index = Index::open(&dir.path().join("index.redb")).expect("open");

    let (changes, stats) = run_scan(&root, &index);
    let create = |p: &str| (p.to_string(), "Create".to_string());
    let mkdir = |p: &str| (p.to_string(), "Mkdir".to_string());
    let mut expected: BTreeSet<_> = [
        "f1",
        "f2",
        "f3",
        "mm",
        "ur",
        "d1/a",
        "d1/d2/b",
        "gone/x",
        "gone/sub/y",
        "swap",
    ]
    .into_iter()
    .map(create)
    .collect();
    expected.extend(["d1", "d1/d2", "gone", "gone/sub"].into_iter().map(mkdir));
    expected.extend(set(&[("ln", ChangeKind::Symlink { target: p("f1") })]));
    assert_eq!(summary(&changes), expected);
    assert_eq!(changes.len(), expected.len());
    assert_eq!((stats.files, stats.dirs, stats.changes), (11, 5, 15));
    assert_eq!(stats.bytes, 10_000);
    // A directory is reported before what is in it.
    let at = |p: &str| {
        changes
            .iter()
            .position(|c| c.path.as_deref() == Some(Path::new(p)))
            .expect("reported")
    };
    assert!(at("d1") < at("d1/d2") && at("d1/d2") < at("d1/d2/b"));

    apply(&index, &root, &changes);
    let (changes, _) = run_scan(&root, &index);
    assert_eq!(summary(&changes), BTreeSet::new(), "unchanged tree");

    // Timestamps are kept at the kernel's tick: let one pass so same-size rewrites show.
    std::thread::sleep(Duration::from_millis(20));
    fs::write(root.join("f1"), b"new content").expect("modify");
    fs::set_permissions(root.join("f2"), fs::Permissions::from_mode(0o600)).expect("chmod");
    fs::remove_file(root.join("f3")).expect("rm");
    fs::write(root.join("f4"), b"added").expect("add");
    fs::write(root.join("d1/d2/c"), b"added deep").expect("add");
    fs::remove_dir_all(root.join("gone")).expect("rm -r");
    fs::remove_file(root.join("swap")).expect("rm");
    fs::create_dir(root.join("swap")).expect("file becomes a dir");
    mmap_write(&root.join("mm"));
    let uring = uring_write(&root.join("ur"));

    let (changes, stats) = run_scan(&root, &index);
    let mut expected = set(&[
        ("f1", ChangeKind::Modified),
        (
            "f2",
            ChangeKind::SetAttr(AttrChange {
                mode: Some(0o100600),
                ..AttrChange::default()
            }),
        ),
        ("f3", ChangeKind::Unlink),
        ("f4", ChangeKind::Create),
        ("d1/d2/c", ChangeKind::Create),
        ("gone/sub/y", ChangeKind::Unlink),
        ("gone/sub", ChangeKind::Rmdir),
        ("gone/x", ChangeKind::Unlink),
        ("gone", ChangeKind::Rmdir),
        ("swap", ChangeKind::Unlink),
        ("swap", ChangeKind::Mkdir),
        ("mm", ChangeKind::Modified),
    ]);
    if uring {
        expected.extend(set(&[("ur", ChangeKind::Modified)]));
    }
    assert_eq!(summary(&changes), expected);
    assert_eq!(stats.changes as usize, changes.len());
    assert_eq!(changes.len(), expected.len(), "{changes:#?}");
    // Deepest first, like rm -r; the old file before the new directory.
    assert!(at_of(&changes, "gone/sub/y") < at_of(&changes, "gone/sub"));
    assert!(at_of(&changes, "gone/sub") < at_of(&changes, "gone"));
    let swaps: Vec<_> = changes
        .iter()
        .filter(|c| c.path.as_deref() == Some(Path::new("swap")))
        .map(|c| c.kind.clone())
        .collect();
    assert_eq!(swaps, [ChangeKind::Unlink, ChangeKind::Mkdir]);

    apply(&index, &root, &changes);
    let (changes, _) = run_scan(&root, &index);
    assert_eq!(
        summary(&changes),
        BTreeSet::new(),
        "after applying the changes"
    );
    // The mmap-written file's record now has the new content's hashes.
    let mm = index.get(&p("mm")).expect("get").expect("record");
    assert_eq!(
        mm.block_hashes,
        blocks_of(&fs::read(root.join("mm")).expect("read"))
    );
}

fn at_of(changes: &[Change], p: &str) -> usize {
    changes
        .iter()
        .position(|c| c.path.as_deref() == Some(Path::new(p)))
        .expect("reported")
}

/// Writes the first bytes of `path` through a shared memory map (python3's `mmap`).
fn mmap_write(path: &Path) {
    let status = Command::new("python3")
        .arg("-c")
        .arg(
            "import mmap, sys\n\
             with open(sys.argv[1], 'r+b') as f:\n\
             \x20   m = mmap.mmap(f.fileno(), 0)\n\
             \x20   m[0:4] = b'MMAP'\n\
             \x20   m.flush()\n\
             \x20   m.close()\n",
        )
        .arg(path)
        .status()
        .expect("python3 is needed for the mmap write");
    assert!(status.success());
}

/// Overwrites 4 KiB of `path` in place with io_uring, through fio; false (with a note) if
/// fio is not installed or io_uring is disabled here.
fn uring_write(path: &Path) -> bool {
    let size = fs::metadata(path).expect("stat").len();
    let out = Command::new("fio")
        .args([
            "--name=uring",
            "--ioengine=io_uring",
            "--rw=write",
            "--bs=512",
            "--fallocate=none",
            "--output=/dev/null",
        ])
        .arg(format!("--size={size}"))
        .arg(format!("--filename={}", path.display()))
        .output();
    match out {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "note: io_uring write skipped, fio failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("note: io_uring write skipped, fio not runnable: {e}");
            false
        }
    }
}

#[test]
fn scan_finds_changes_made_while_filesync_was_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("src");
    let index_path = dir.path().join("state/index.redb");
    fs::create_dir_all(index_path.parent().expect("parent")).expect("mkdir");
    fs::create_dir(&root).expect("mkdir");
    make_tree(&root);
    {
        // The earlier run: everything indexed, then stopped.
        let index = Index::open(&index_path).expect("open");
        let (changes, _) = run_scan(&root, &index);
        apply(&index, &root, &changes);
    }
    std::thread::sleep(Duration::from_millis(20));
    fs::write(root.join("d1/a"), b"edited offline").expect("modify");
    fs::remove_file(root.join("ln")).expect("rm");
    symlink("f2", root.join("ln")).expect("relink");
    fs::create_dir(root.join("newdir")).expect("mkdir");
    fs::write(root.join("newdir/n"), b"n").expect("write");
    let (uid, gid) = (12345, 54321);
    std::os::unix::fs::chown(root.join("d1/d2"), Some(uid), Some(gid)).expect("chown");

    let index = Index::open(&index_path).expect("reopen");
    let (changes, _) = run_scan(&root, &index);
    assert_eq!(
        summary(&changes),
        set(&[
            ("d1/a", ChangeKind::Modified),
            ("ln", ChangeKind::Unlink),
            ("ln", ChangeKind::Symlink { target: p("f2") }),
            ("newdir", ChangeKind::Mkdir),
            ("newdir/n", ChangeKind::Create),
            (
                "d1/d2",
                ChangeKind::SetAttr(AttrChange {
                    uid: Some(uid),
                    gid: Some(gid),
                    ..AttrChange::default()
                })
            ),
        ])
    );
}

#[test]
fn scan_walks_paths_longer_than_path_max_and_skips_the_index_inside_the_tree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    // The index wrongly inside the tree: it must not show up, nor its folder.
    fs::create_dir(root.join(".state")).expect("mkdir");
    let index = Index::open(&root.join(".state/index.redb")).expect("open");
    // 24 levels of 200-byte names: over 4,800 bytes, past PATH_MAX (4096), built by
    // descriptor since no path call could reach the bottom.
    let name = "n".repeat(200);
    let mut fd = rustix::fs::open(
        root,
        rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .expect("open root");
    for _ in 0..24 {
        rustix::fs::mkdirat(&fd, name.as_str(), rustix::fs::Mode::from_raw_mode(0o755))
            .expect("mkdirat");
        fd = rustix::fs::openat(
            &fd,
            name.as_str(),
            rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .expect("openat");
    }
    let file = rustix::fs::openat(
        &fd,
        "deep",
        rustix::fs::OFlags::CREATE | rustix::fs::OFlags::WRONLY,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .expect("create deep file");
    drop(file);

    let progress_calls = std::sync::atomic::AtomicU64::new(0);
    let progress = |files: u64, _bytes: u64| {
        assert!(files <= 1);
        progress_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    let sink = Collect::default();
    let stats = scan(root, &index, &Ignores::none(), &sink, Some(&progress)).expect("scan");
    let changes = sink.take();
    assert_eq!(stats.dirs, 25);
    assert_eq!(stats.files, 1);
    assert_eq!(
        changes.len(),
        25,
        "24 Mkdir and one Create, nothing of .state"
    );
    let deepest = changes
        .iter()
        .find(|c| c.kind == ChangeKind::Create)
        .and_then(|c| c.path.clone())
        .expect("deep file");
    assert!(deepest.as_os_str().len() > 4096);
    assert!(deepest.ends_with("deep"));
    // The indexer can build its record too, and then the scan is quiet.
    let root_fd = File::open(root).expect("root");
    let rec = record_for(root_fd.as_fd(), &deepest, None, None)
        .expect("record_for a long path")
        .expect("exists");
    assert_eq!(rec.kind, FileKind::File);
    apply(&index, root, &changes);
    let (again, _) = run_scan(root, &index);
    assert!(again.is_empty(), "{again:?}");
    assert!(progress_calls.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}

#[test]
fn scan_leaves_out_ignored_entries_and_does_not_enter_ignored_directories() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("src");
    fs::create_dir_all(root.join("build/deep")).expect("mkdir");
    fs::create_dir_all(root.join("src")).expect("mkdir");
    for f in [
        "keep.txt",
        "x.tmp",
        "src/y.tmp",
        "src/main.rs",
        "build/deep/out.o",
    ] {
        fs::write(root.join(f), b"data").expect("write");
    }
    fs::write(root.join(IGNORE_FILE), "*.tmp\n/build/\n").expect("rules");
    let index = Index::open(&dir.path().join("index.redb")).expect("open");
    let sink = Collect::default();
    let stats = scan(&root, &index, &Ignores::load(&root), &sink, None).expect("scan");
    let reported: BTreeSet<String> = sink
        .take()
        .into_iter()
        .map(|c| c.path.expect("path").display().to_string())
        .collect();
    let expected: BTreeSet<String> = [IGNORE_FILE, "keep.txt", "src", "src/main.rs"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(reported, expected);
    // build/ was not entered: its directories were never opened.
    assert_eq!(stats.dirs, 2, "{stats:?}");
}
