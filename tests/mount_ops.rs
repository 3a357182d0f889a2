//! Every filesystem operation through a real filesync mount. Each test checks both what the
//! caller sees through the mount and the resulting state of the backing folder (SRC), which is
//! the contract: every operation is passed through.

mod common;

use common::{
    as_nobody, assert_errno, cpath, cvt, errname, fnv, lstat, ok, open, setup, sh, sh_nobody, stat,
    stat_raw, sys, Mount, Rng,
};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const S_IFMT: u32 = libc::S_IFMT;

fn ftype(st: &libc::stat) -> u32 {
    st.st_mode & S_IFMT
}

fn perm(st: &libc::stat) -> u32 {
    st.st_mode & 0o7777
}

#[track_caller]
fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

#[track_caller]
fn write(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()))
}

#[track_caller]
fn open_ok(p: &Path, flags: i32, mode: u32) -> File {
    File::from(
        open(p, flags, mode).unwrap_or_else(|e| panic!("open {}: {}", p.display(), errname(e))),
    )
}

fn exists(p: &Path) -> bool {
    stat_raw(p, false).is_ok()
}

fn lseek(fd: &impl AsRawFd, off: i64, whence: i32) -> Result<i64, i32> {
    // SAFETY: lseek on an fd we own.
    cvt(unsafe { libc::lseek(fd.as_raw_fd(), off, whence) })
}

fn fallocate(fd: &impl AsRawFd, mode: i32, off: i64, len: i64) -> Result<i64, i32> {
    // SAFETY: fallocate on an fd we own.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off, len) })
}

fn fstat(fd: &impl AsRawFd) -> libc::stat {
    // SAFETY: all-zero stat is valid; fd is ours.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    ok(
        cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }),
        "fstat",
    );
    st
}

/// Names in `dir` (without . and ..), sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// lookup, getattr, create, read, write

#[test]
fn lookup_and_getattr_match_backing() {
    let Some(m) = common::setup_with(&[], |src| {
        fs::write(src.join("pre"), b"hello world").expect("write pre");
        fs::set_permissions(src.join("pre"), fs::Permissions::from_mode(0o640)).expect("chmod");
        fs::create_dir(src.join("dir")).expect("mkdir");
        fs::write(src.join("dir/inner"), b"x").expect("write inner");
    }) else {
        return;
    };
    for rel in ["pre", "dir", "dir/inner"] {
        let (a, b) = (lstat(&m.m(rel)), lstat(&m.s(rel)));
        assert_eq!(a.st_mode, b.st_mode, "{rel}: mode");
        assert_eq!(a.st_uid, b.st_uid, "{rel}: uid");
        assert_eq!(a.st_gid, b.st_gid, "{rel}: gid");
        assert_eq!(a.st_nlink, b.st_nlink, "{rel}: nlink");
        assert_eq!(
            (a.st_mtime, a.st_mtime_nsec),
            (b.st_mtime, b.st_mtime_nsec),
            "{rel}: mtime"
        );
        if ftype(&a) != libc::S_IFDIR {
            assert_eq!(a.st_size, b.st_size, "{rel}: size");
        }
    }
    assert_eq!(perm(&lstat(&m.m("pre"))), 0o640);
    assert_eq!(read(&m.m("pre")), b"hello world");
    assert_errno(
        stat_raw(&m.m("missing"), false).map(|_| 0),
        libc::ENOENT,
        "stat missing",
    );
    assert_errno(
        stat_raw(&m.m("dir/missing"), false).map(|_| 0),
        libc::ENOENT,
        "stat dir/missing",
    );
    // The mount root shows the backing root's attributes.
    let (a, b) = (lstat(m.mnt()), lstat(m.src()));
    assert_eq!(a.st_mode, b.st_mode, "root mode");
    assert_eq!(a.st_uid, b.st_uid, "root uid");
}

#[test]
fn create_write_fsync_read_release() {
    let Some(m) = setup(&[]) else { return };
    let data = Rng::new(1).bytes(300_000);
    {
        let mut f = open_ok(
            &m.m("f"),
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
            0o644,
        );
        f.write_all(&data).expect("write");
        f.flush().expect("flush");
        f.sync_data().expect("fdatasync");
        f.sync_all().expect("fsync");
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 0).expect("pread back");
        assert!(
            back == data,
            "pread through the same fd returned different data"
        );
        assert_eq!(fstat(&f).st_size as usize, data.len());
    } // release
    assert!(read(&m.s("f")) == data, "backing file content differs");
    assert!(read(&m.m("f")) == data, "re-read through the mount differs");
    let st = lstat(&m.s("f"));
    assert_eq!(perm(&st), 0o644);
    assert_eq!(st.st_uid, 0);
    // Overwrite in the middle through a second open.
    let f = open_ok(&m.m("f"), libc::O_WRONLY, 0);
    f.write_all_at(b"MIDDLE", 1000).expect("pwrite");
    drop(f);
    let mut want = data.clone();
    want[1000..1006].copy_from_slice(b"MIDDLE");
    assert!(read(&m.s("f")) == want, "backing file after pwrite differs");
}

#[test]
fn append_writes_go_to_the_end() {
    let Some(m) = setup(&[]) else { return };
    write(&m.m("log"), b"start\n");
    let a = open_ok(&m.m("log"), libc::O_WRONLY | libc::O_APPEND, 0);
    let b = open_ok(&m.m("log"), libc::O_WRONLY | libc::O_APPEND, 0);
    let mut want = b"start\n".to_vec();
    for i in 0..20 {
        let line = format!("line {i}\n");
        let f = if i % 2 == 0 { &a } else { &b };
        (&*f).write_all(line.as_bytes()).expect("append write");
        want.extend_from_slice(line.as_bytes());
    }
    // Linux ignores the offset of pwrite on an O_APPEND fd and appends.
    a.write_all_at(b"tail\n", 0).expect("pwrite with O_APPEND");
    want.extend_from_slice(b"tail\n");
    drop((a, b));
    assert_eq!(
        String::from_utf8_lossy(&read(&m.s("log"))),
        String::from_utf8_lossy(&want)
    );
    assert_eq!(read(&m.m("log")), want);
}

#[test]
fn o_trunc_empties_existing_file() {
    let Some(m) = setup(&[]) else { return };
    write(&m.m("t"), &[7u8; 10_000]);
    let mut f = open_ok(&m.m("t"), libc::O_WRONLY | libc::O_TRUNC, 0);
    assert_eq!(fstat(&f).st_size, 0, "fstat after O_TRUNC");
    assert_eq!(lstat(&m.s("t")).st_size, 0, "backing size after O_TRUNC");
    f.write_all(b"x").expect("write");
    drop(f);
    assert_eq!(read(&m.s("t")), b"x");
    // O_CREAT|O_TRUNC on an existing file truncates too, and keeps its mode.
    fs::set_permissions(m.m("t"), fs::Permissions::from_mode(0o600)).expect("chmod");
    drop(open_ok(
        &m.m("t"),
        libc::O_CREAT | libc::O_TRUNC | libc::O_RDWR,
        0o666,
    ));
    assert_eq!(lstat(&m.s("t")).st_size, 0);
    assert_eq!(perm(&lstat(&m.s("t"))), 0o600);
}

#[test]
fn o_tmpfile_then_linkat() {
    let Some(m) = setup(&[]) else { return };
    fs::create_dir(m.m("d")).expect("mkdir");
    match open(&m.m("d"), libc::O_TMPFILE | libc::O_RDWR, 0o640) {
        Ok(fd) => {
            let f = File::from(fd);
            f.write_all_at(b"anonymous", 0).expect("write tmpfile");
            assert!(
                names(&m.s("d")).is_empty(),
                "O_TMPFILE must not appear by name: {:?}",
                names(&m.s("d"))
            );
            let proc_path = cpath(Path::new(&format!("/proc/self/fd/{}", f.as_raw_fd())));
            let dst = cpath(&m.m("d/named"));
            // SAFETY: NUL-terminated paths; AT_SYMLINK_FOLLOW resolves the /proc magic link.
            let r = cvt(unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    proc_path.as_ptr(),
                    libc::AT_FDCWD,
                    dst.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            });
            ok(r, "linkat /proc/self/fd/N -> d/named");
            drop(f);
            assert_eq!(read(&m.s("d/named")), b"anonymous");
            assert_eq!(read(&m.m("d/named")), b"anonymous");
            assert_eq!(perm(&lstat(&m.s("d/named"))), 0o640);
        }
        Err(e) => {
            // Acceptable only as a clean "not supported": nothing left behind, mount still fine.
            assert_eq!(e, libc::EOPNOTSUPP, "O_TMPFILE failed with {}", errname(e));
            eprintln!("NOTE: O_TMPFILE on the mount returns EOPNOTSUPP");
            assert!(names(&m.s("d")).is_empty());
            write(&m.m("d/after"), b"ok");
            assert_eq!(read(&m.s("d/after")), b"ok");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// sparse files, fallocate, copy_file_range, truncate

#[test]
fn sparse_file_seek_data_and_hole_match_backing() {
    let Some(m) = setup(&[]) else { return };
    const MB: i64 = 1 << 20;
    let f = open_ok(&m.m("sparse"), libc::O_CREAT | libc::O_RDWR, 0o644);
    f.write_all_at(&[b'a'; 4096], 0).expect("write head");
    f.write_all_at(&[b'b'; 4096], 4 * MB as u64)
        .expect("write tail");
    f.sync_all().expect("fsync");
    let size = 4 * MB + 4096;
    assert_eq!(fstat(&f).st_size, size);
    let backing = open_ok(&m.s("sparse"), libc::O_RDONLY, 0);
    let ro = open_ok(&m.m("sparse"), libc::O_RDONLY, 0);
    assert!(
        lstat(&m.s("sparse")).st_blocks < 1024,
        "backing file should be sparse"
    );
    for whence in [libc::SEEK_DATA, libc::SEEK_HOLE] {
        for off in [
            0,
            100,
            4096,
            8192,
            2 * MB,
            4 * MB - 1,
            4 * MB,
            4 * MB + 100,
            size - 1,
            size,
            size + 10,
        ] {
            let (got, want) = (lseek(&f, off, whence), lseek(&backing, off, whence));
            let w = if whence == libc::SEEK_DATA {
                "SEEK_DATA"
            } else {
                "SEEK_HOLE"
            };
            assert_eq!(got, want, "lseek({off}, {w}) through the mount vs backing");
            // A read-only fd may be a passthrough one: it must answer the same.
            assert_eq!(
                lseek(&ro, off, whence),
                want,
                "lseek({off}, {w}) on a read-only fd"
            );
        }
    }
    // The hole reads as zeros.
    let mut buf = vec![1u8; 8192];
    f.read_exact_at(&mut buf, MB as u64).expect("read hole");
    assert!(buf.iter().all(|b| *b == 0), "hole must read as zeros");
    // Plain lseek still works, including beyond the end.
    assert_eq!(lseek(&f, size + 1000, libc::SEEK_SET), Ok(size + 1000));
    assert_eq!(lseek(&f, 0, libc::SEEK_END), Ok(size));
}

#[test]
fn fallocate_and_punch_hole() {
    let Some(m) = setup(&[]) else { return };
    const MB: i64 = 1 << 20;
    let f = open_ok(&m.m("fa"), libc::O_CREAT | libc::O_RDWR, 0o644);
    ok(fallocate(&f, 0, 0, MB), "fallocate 1 MiB");
    assert_eq!(fstat(&f).st_size, MB, "size through the mount");
    let st = lstat(&m.s("fa"));
    assert_eq!(st.st_size, MB, "backing size");
    assert!(
        st.st_blocks * 512 >= MB,
        "backing blocks allocated: {}",
        st.st_blocks
    );
    // KEEP_SIZE beyond EOF allocates without growing.
    ok(
        fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, MB, MB),
        "fallocate KEEP_SIZE",
    );
    assert_eq!(lstat(&m.s("fa")).st_size, MB);
    let data = Rng::new(2).bytes(MB as usize);
    f.write_all_at(&data, 0).expect("write data");
    f.sync_all().expect("fsync");
    let before = lstat(&m.s("fa")).st_blocks;
    ok(
        fallocate(
            &f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            256 * 1024,
            256 * 1024,
        ),
        "punch hole",
    );
    assert_eq!(fstat(&f).st_size, MB, "punch hole must keep the size");
    let st = lstat(&m.s("fa"));
    assert_eq!(st.st_size, MB);
    assert!(
        st.st_blocks < before,
        "punching must free blocks in the backing file ({} -> {})",
        before,
        st.st_blocks
    );
    let mut want = data.clone();
    want[256 * 1024..512 * 1024].fill(0);
    let mut got = vec![0u8; MB as usize];
    f.read_exact_at(&mut got, 0)
        .expect("read back through mount");
    assert!(
        got == want,
        "content through the mount after punch hole differs"
    );
    assert!(
        read(&m.s("fa")) == want,
        "backing content after punch hole differs"
    );
    // Punch without KEEP_SIZE is invalid.
    assert_errno(
        fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096),
        libc::EOPNOTSUPP,
        "PUNCH_HOLE without KEEP_SIZE",
    );
}

#[test]
fn copy_file_range_between_files_on_mount() {
    let Some(m) = setup(&[]) else { return };
    let data = Rng::new(3).bytes(3 << 20);
    write(&m.m("a"), &data);
    let a = open_ok(&m.m("a"), libc::O_RDONLY, 0);
    let b = open_ok(&m.m("b"), libc::O_CREAT | libc::O_WRONLY, 0o644);
    let (mut off_in, mut off_out): (i64, i64) = (0, 0);
    // Bounded: each call copies at least one byte or we stop.
    for _ in 0..10_000 {
        if off_in as usize >= data.len() {
            break;
        }
        let left = data.len() - off_in as usize;
        // SAFETY: both fds are ours; offsets are valid out-pointers.
        let n = ok(
            cvt(unsafe {
                libc::copy_file_range(
                    a.as_raw_fd(),
                    &mut off_in,
                    b.as_raw_fd(),
                    &mut off_out,
                    left,
                    0,
                )
            } as i64),
            "copy_file_range",
        );
        assert!(n > 0, "copy_file_range returned 0 before the end");
    }
    drop(b);
    assert!(read(&m.s("b")) == data, "backing copy differs");
    assert!(read(&m.m("b")) == data, "copy through the mount differs");
    // With offsets into an existing file.
    write(&m.m("c"), &[b'.'; 100]);
    let c = open_ok(&m.m("c"), libc::O_WRONLY, 0);
    let (mut oi, mut oo): (i64, i64) = (12_345, 5);
    // SAFETY: as above.
    let n = ok(
        cvt(unsafe {
            libc::copy_file_range(a.as_raw_fd(), &mut oi, c.as_raw_fd(), &mut oo, 1000, 0)
        } as i64),
        "copy_file_range with offsets",
    );
    assert_eq!(n, 1000);
    drop(c);
    let mut want = vec![b'.'; 5];
    want.extend_from_slice(&data[12_345..13_345]);
    assert_eq!(read(&m.s("c")), want);
}

#[test]
fn truncate_and_ftruncate() {
    let Some(m) = setup(&[]) else { return };
    let data = Rng::new(4).bytes(10_000);
    write(&m.m("t"), &data);
    ok(sys::truncate(&m.m("t"), 5000), "truncate shrink");
    assert_eq!(read(&m.s("t")), &data[..5000]);
    ok(sys::truncate(&m.m("t"), 20_000), "truncate grow");
    let mut want = data[..5000].to_vec();
    want.resize(20_000, 0);
    assert_eq!(read(&m.s("t")), want);
    assert_eq!(read(&m.m("t")), want);
    assert_errno(
        sys::truncate(&m.m("t"), -1),
        libc::EINVAL,
        "truncate negative",
    );
    let f = open_ok(&m.m("t"), libc::O_RDWR, 0);
    // SAFETY: ftruncate on our fd.
    ok(
        cvt(unsafe { libc::ftruncate(f.as_raw_fd(), 100) }),
        "ftruncate 100",
    );
    assert_eq!(lstat(&m.s("t")).st_size, 100);
    assert_eq!(fstat(&f).st_size, 100);
    // SAFETY: as above.
    ok(
        cvt(unsafe { libc::ftruncate(f.as_raw_fd(), 0) }),
        "ftruncate 0",
    );
    assert_eq!(lstat(&m.s("t")).st_size, 0);
    drop(f);
    let ro = open_ok(&m.m("t"), libc::O_RDONLY, 0);
    // SAFETY: as above.
    let r = cvt(unsafe { libc::ftruncate(ro.as_raw_fd(), 10) });
    assert!(
        matches!(r, Err(libc::EINVAL) | Err(libc::EBADF)),
        "ftruncate on O_RDONLY fd: {r:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// attributes

#[test]
fn chmod_changes_backing_mode() {
    let Some(m) = setup(&[]) else { return };
    write(&m.m("f"), b"x");
    fs::create_dir(m.m("d")).expect("mkdir");
    for mode in [0o600, 0o755, 0o4755, 0o2750, 0o000, 0o1777] {
        ok(sys::chmod(&m.m("f"), mode), "chmod");
        assert_eq!(
            perm(&lstat(&m.s("f"))),
            mode,
            "backing mode after chmod {mode:o}"
        );
        assert_eq!(
            perm(&lstat(&m.m("f"))),
            mode,
            "mode through mount after chmod {mode:o}"
        );
    }
    ok(sys::chmod(&m.m("d"), 0o1770), "chmod dir");
    assert_eq!(perm(&lstat(&m.s("d"))), 0o1770);
    let f = open_ok(&m.m("f"), libc::O_RDONLY, 0);
    // SAFETY: fchmod on our fd.
    ok(cvt(unsafe { libc::fchmod(f.as_raw_fd(), 0o640) }), "fchmod");
    assert_eq!(perm(&lstat(&m.s("f"))), 0o640);
}

#[test]
fn chown_changes_backing_owner() {
    let Some(m) = setup(&[]) else { return };
    write(&m.m("f"), b"x");
    ok(sys::symlink("f", &m.m("ln")), "symlink");
    ok(sys::chown(&m.m("f"), 65534, 65534), "chown");
    let st = lstat(&m.s("f"));
    assert_eq!((st.st_uid, st.st_gid), (65534, 65534), "backing owner");
    let st = lstat(&m.m("f"));
    assert_eq!(
        (st.st_uid, st.st_gid),
        (65534, 65534),
        "owner through the mount"
    );
    // -1 keeps a field.
    ok(sys::chown(&m.m("f"), u32::MAX, 0), "chown gid only");
    let st = lstat(&m.s("f"));
    assert_eq!((st.st_uid, st.st_gid), (65534, 0));
    // lchown changes the link, not its target.
    ok(sys::lchown(&m.m("ln"), 65534, 65534), "lchown");
    assert_eq!(lstat(&m.s("ln")).st_uid, 65534, "symlink owner");
    assert_eq!(lstat(&m.s("f")).st_gid, 0, "target untouched by lchown");
    let f = open_ok(&m.m("f"), libc::O_RDONLY, 0);
    // SAFETY: fchown on our fd.
    ok(
        cvt(unsafe { libc::fchown(f.as_raw_fd(), 0, 65534) }),
        "fchown",
    );
    let st = lstat(&m.s("f"));
    assert_eq!((st.st_uid, st.st_gid), (0, 65534));
}

#[test]
fn utimensat_sets_now_and_omits() {
    let Some(m) = setup(&[]) else { return };
    write(&m.m("f"), b"x");
    let times = |p: &Path| {
        let st = lstat(p);
        (
            (st.st_atime, st.st_atime_nsec),
            (st.st_mtime, st.st_mtime_nsec),
        )
    };
    let fixed = [(1_000_000_000, 123_456_789), (1_500_000_000, 987_654_321)];
    ok(sys::utimensat(&m.m("f"), Some(fixed), 0), "utimensat fixed");
    assert_eq!(times(&m.s("f")), (fixed[0], fixed[1]), "backing times");
    assert_eq!(
        times(&m.m("f")),
        (fixed[0], fixed[1]),
        "times through the mount"
    );

    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64
    };
    let t0 = now();
    ok(
        sys::utimensat(
            &m.m("f"),
            Some([(0, libc::UTIME_OMIT), (0, libc::UTIME_NOW)]),
            0,
        ),
        "mtime=NOW atime=OMIT",
    );
    let t1 = now();
    let (a, mt) = times(&m.s("f"));
    assert_eq!(a, fixed[0], "atime must be unchanged by UTIME_OMIT");
    assert!(
        mt.0 >= t0 - 1 && mt.0 <= t1 + 1,
        "mtime must be now: {mt:?} not in [{t0}, {t1}]"
    );
    assert_eq!(times(&m.m("f")).0, fixed[0], "atime through the mount");

    ok(
        sys::utimensat(
            &m.m("f"),
            Some([(0, libc::UTIME_NOW), (0, libc::UTIME_OMIT)]),
            0,
        ),
        "atime=NOW mtime=OMIT",
    );
    let (a2, mt2) = times(&m.s("f"));
    assert_eq!(mt2, mt, "mtime must be unchanged by UTIME_OMIT");
    assert!(a2.0 >= t0 - 1, "atime must be now: {a2:?}");

    // NULL times: both now.
    ok(
        sys::utimensat(&m.m("f"), Some(fixed), 0),
        "utimensat fixed again",
    );
    ok(sys::utimensat(&m.m("f"), None, 0), "utimensat NULL");
    let (a3, m3) = times(&m.s("f"));
    assert!(
        a3.0 >= t0 - 1 && m3.0 >= t0 - 1,
        "NULL times must set both to now: {a3:?} {m3:?}"
    );

    // On a symlink itself (AT_SYMLINK_NOFOLLOW) the target is untouched.
    ok(sys::symlink("f", &m.m("ln")), "symlink");
    ok(
        sys::utimensat(&m.m("f"), Some(fixed), 0),
        "utimensat target",
    );
    ok(
        sys::utimensat(
            &m.m("ln"),
            Some([(1_234_567_890, 0), (1_234_567_890, 5)]),
            libc::AT_SYMLINK_NOFOLLOW,
        ),
        "lutimes",
    );
    assert_eq!(
        times(&m.s("ln")).1,
        (1_234_567_890, 5),
        "symlink mtime in backing"
    );
    assert_eq!(
        times(&m.s("f")),
        (fixed[0], fixed[1]),
        "target must be untouched by lutimes"
    );
}

// ---------------------------------------------------------------------------------------------
// directories and special files

/// Reads a directory with readdir(3) so d_type is checked as the kernel returns it.
fn readdir_typed(dir: &Path) -> Vec<(String, u8, u64)> {
    let c = cpath(dir);
    // SAFETY: NUL-terminated path.
    let d = unsafe { libc::opendir(c.as_ptr()) };
    assert!(
        !d.is_null(),
        "opendir {}: {}",
        dir.display(),
        errname(common::errno())
    );
    let mut out = Vec::new();
    // Bounded by the directory size; the cap only guards against a looping readdir.
    for _ in 0..1_000_000 {
        // SAFETY: d is a valid DIR*; the entry is copied before the next call.
        let e = unsafe { libc::readdir64(d) };
        if e.is_null() {
            break;
        }
        // SAFETY: e points at a valid dirent64 with a NUL-terminated name.
        let (name, ty, ino) = unsafe {
            let n = std::ffi::CStr::from_ptr((*e).d_name.as_ptr());
            (n.to_string_lossy().into_owned(), (*e).d_type, (*e).d_ino)
        };
        out.push((name, ty, ino));
    }
    // SAFETY: d is valid and closed once.
    unsafe { libc::closedir(d) };
    out
}

#[test]
fn mkdir_readdir_many_entries_rmdir() {
    let Some(m) = setup(&[]) else { return };
    let dir = m.m("big");
    ok(sys::mkdir(&dir, 0o755), "mkdir big");
    const N: usize = 2000;
    let kind = |i: usize| match i % 4 {
        0 => libc::DT_REG,
        1 => libc::DT_DIR,
        2 => libc::DT_LNK,
        _ => libc::DT_FIFO,
    };
    for i in 0..N {
        let p = dir.join(format!("entry-{i:05}-with-a-longer-name-to-fill-buffers"));
        let r = match kind(i) {
            libc::DT_REG => open(&p, libc::O_CREAT | libc::O_WRONLY, 0o644).map(|_| 0),
            libc::DT_DIR => sys::mkdir(&p, 0o755),
            libc::DT_LNK => sys::symlink("target", &p),
            _ => sys::mknod(&p, libc::S_IFIFO | 0o644, 0),
        };
        ok(r, &format!("create {}", p.display()));
    }
    let entries = readdir_typed(&dir);
    let mut seen = std::collections::HashMap::new();
    for (name, ty, _) in &entries {
        *seen.entry(name.clone()).or_insert(0) += 1;
        if name == "." || name == ".." {
            continue;
        }
        let i: usize = name[6..11].parse().expect("entry index");
        assert_eq!(*ty, kind(i), "d_type of {name}");
    }
    assert_eq!(seen.get("."), Some(&1), "'.' listed once");
    assert_eq!(seen.get(".."), Some(&1), "'..' listed once");
    let dups: Vec<_> = seen.iter().filter(|(_, c)| **c != 1).collect();
    assert!(dups.is_empty(), "entries listed more than once: {dups:?}");
    assert_eq!(entries.len(), N + 2, "every entry listed exactly once");
    assert_eq!(names(&m.s("big")).len(), N, "backing dir entries");
    // nlink of the dir counts its subdirectories, as in the backing dir.
    assert_eq!(lstat(&m.m("big")).st_nlink, lstat(&m.s("big")).st_nlink);
    for i in 0..N {
        let p = dir.join(format!("entry-{i:05}-with-a-longer-name-to-fill-buffers"));
        let r = if kind(i) == libc::DT_DIR {
            sys::rmdir(&p)
        } else {
            sys::unlink(&p)
        };
        ok(r, &format!("remove {}", p.display()));
    }
    assert_eq!(readdir_typed(&dir).len(), 2, "only . and .. left");
    assert!(names(&m.s("big")).is_empty());
    ok(sys::rmdir(&dir), "rmdir big");
    assert!(!exists(&m.s("big")), "rmdir must remove the backing dir");
}

#[test]
fn mknod_fifo_and_char_device() {
    let Some(m) = setup(&[]) else { return };
    ok(
        sys::mknod(&m.m("fifo"), libc::S_IFIFO | 0o640, 0),
        "mknod fifo",
    );
    let st = lstat(&m.s("fifo"));
    assert_eq!(ftype(&st), libc::S_IFIFO, "backing fifo type");
    assert_eq!(perm(&st), 0o640);
    assert_eq!(ftype(&lstat(&m.m("fifo"))), libc::S_IFIFO);
    // A fifo opened O_RDWR never blocks; data passes through the kernel pipe.
    let f = open_ok(&m.m("fifo"), libc::O_RDWR, 0);
    (&f).write_all(b"ping").expect("write fifo");
    let mut buf = [0u8; 4];
    (&f).read_exact(&mut buf).expect("read fifo");
    assert_eq!(&buf, b"ping");
    drop(f);

    let dev = libc::makedev(1, 3);
    ok(
        sys::mknod(&m.m("null"), libc::S_IFCHR | 0o666, dev),
        "mknod c 1 3",
    );
    for p in [m.s("null"), m.m("null")] {
        let st = lstat(&p);
        assert_eq!(ftype(&st), libc::S_IFCHR, "{}: type", p.display());
        assert_eq!(st.st_rdev, dev, "{}: rdev", p.display());
        assert_eq!(perm(&st), 0o644, "{}: mode", p.display());
    }
    ok(
        sys::mknod(&m.m("plain"), libc::S_IFREG | 0o600, 0),
        "mknod regular",
    );
    assert_eq!(ftype(&lstat(&m.s("plain"))), libc::S_IFREG);
    assert_eq!(lstat(&m.s("plain")).st_size, 0);
}

#[test]
fn unix_socket_bind_and_connect() {
    let Some(m) = setup(&[]) else { return };
    let path = m.m("sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind socket in mount");
    assert_eq!(
        ftype(&lstat(&m.s("sock"))),
        libc::S_IFSOCK,
        "backing entry is a socket"
    );
    assert_eq!(ftype(&lstat(&path)), libc::S_IFSOCK);
    // connect() completes into the backlog, so accept() below returns at once.
    let mut client =
        std::os::unix::net::UnixStream::connect(&path).expect("connect via mount path");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let (mut server, _) = listener.accept().expect("accept");
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    client.write_all(b"hi").expect("client write");
    let mut buf = [0u8; 2];
    server.read_exact(&mut buf).expect("server read");
    assert_eq!(&buf, b"hi");
    drop((client, server, listener));
    ok(sys::unlink(&path), "unlink socket");
    assert!(!exists(&m.s("sock")));
}

#[test]
fn symlink_readlink_dangling_lstat_vs_stat() {
    let Some(m) = setup(&[]) else { return };
    write(&m.m("target"), b"0123456789");
    ok(sys::symlink("target", &m.m("ln")), "symlink");
    assert_eq!(sys::readlink(&m.m("ln")), Ok("target".into()));
    assert_eq!(
        sys::readlink(&m.s("ln")),
        Ok("target".into()),
        "backing link target"
    );
    let l = lstat(&m.m("ln"));
    assert_eq!(ftype(&l), libc::S_IFLNK);
    assert_eq!(l.st_size, 6, "symlink size is the target length");
    let s = stat(&m.m("ln"));
    assert_eq!(ftype(&s), libc::S_IFREG);
    assert_eq!(s.st_size, 10);
    assert_eq!(read(&m.m("ln")), b"0123456789");
    // Absolute targets are stored verbatim, not rewritten.
    ok(
        sys::symlink("/etc/../etc/hostname", &m.m("abs")),
        "absolute symlink",
    );
    assert_eq!(
        sys::readlink(&m.s("abs")),
        Ok("/etc/../etc/hostname".into())
    );
    // Dangling.
    ok(
        sys::symlink("nowhere/../missing", &m.m("dangle")),
        "dangling symlink",
    );
    assert_eq!(ftype(&lstat(&m.m("dangle"))), libc::S_IFLNK);
    assert_errno(
        stat_raw(&m.m("dangle"), true).map(|_| 0),
        libc::ENOENT,
        "stat dangling",
    );
    assert_errno(
        open(&m.m("dangle"), libc::O_RDONLY, 0).map(|_| 0),
        libc::ENOENT,
        "open dangling",
    );
    assert_errno(
        sys::readlink(&m.m("target")).map(|_| 0),
        libc::EINVAL,
        "readlink on a file",
    );
    // O_CREAT through a dangling link creates its target.
    ok(
        sys::symlink("created-via-link", &m.m("dangle2")),
        "symlink 2",
    );
    drop(open_ok(
        &m.m("dangle2"),
        libc::O_CREAT | libc::O_WRONLY,
        0o644,
    ));
    assert_eq!(ftype(&lstat(&m.s("created-via-link"))), libc::S_IFREG);
    // Symlink to a directory: traversal works.
    fs::create_dir(m.m("d")).expect("mkdir");
    write(&m.m("d/x"), b"in dir");
    ok(sys::symlink("d", &m.m("dl")), "dir symlink");
    assert_eq!(read(&m.m("dl/x")), b"in dir");
    assert_errno(
        sys::symlink("x", &m.m("ln")),
        libc::EEXIST,
        "symlink onto existing",
    );
}

#[test]
fn hard_link_same_inode_and_nlink() {
    let Some(m) = setup(&[]) else { return };
    write(&m.m("a"), b"shared");
    fs::create_dir(m.m("d")).expect("mkdir");
    ok(sys::link(&m.m("a"), &m.m("b")), "link a b");
    ok(sys::link(&m.m("a"), &m.m("d/c")), "link a d/c");
    let (a, b, c) = (lstat(&m.m("a")), lstat(&m.m("b")), lstat(&m.m("d/c")));
    assert_eq!(a.st_ino, b.st_ino, "same inode through both names");
    assert_eq!(a.st_ino, c.st_ino, "same inode across dirs");
    assert_eq!(
        (a.st_nlink, b.st_nlink, c.st_nlink),
        (3, 3, 3),
        "nlink through the mount"
    );
    assert_eq!(lstat(&m.s("a")).st_nlink, 3, "backing nlink");
    assert_eq!(
        lstat(&m.s("a")).st_ino,
        lstat(&m.s("b")).st_ino,
        "backing names are real hard links"
    );
    let f = open_ok(&m.m("b"), libc::O_WRONLY, 0);
    f.write_all_at(b"SH", 0).expect("write via b");
    drop(f);
    assert_eq!(read(&m.m("a")), b"SHared");
    ok(sys::unlink(&m.m("a")), "unlink a");
    assert_eq!(
        lstat(&m.m("b")).st_nlink,
        2,
        "nlink after unlink through the mount"
    );
    assert_eq!(lstat(&m.s("b")).st_nlink, 2, "backing nlink after unlink");
    assert_errno(
        sys::link(&m.m("d"), &m.m("dlink")),
        libc::EPERM,
        "link to a dir",
    );
    assert_errno(
        sys::link(&m.m("b"), &m.m("d/c")),
        libc::EEXIST,
        "link onto existing",
    );
}

#[test]
fn rename_variants() {
    let Some(m) = setup(&[]) else { return };
    fs::create_dir(m.m("d1")).expect("mkdir d1");
    fs::create_dir(m.m("d2")).expect("mkdir d2");
    write(&m.m("a"), b"A");
    let ino_a = lstat(&m.m("a")).st_ino;
    ok(sys::rename(&m.m("a"), &m.m("b")), "plain rename");
    assert!(!exists(&m.m("a")) && !exists(&m.s("a")), "old name gone");
    assert_eq!(read(&m.s("b")), b"A");
    assert_eq!(
        lstat(&m.m("b")).st_ino,
        ino_a,
        "rename keeps the inode number"
    );

    write(&m.m("c"), b"C");
    ok(
        sys::rename(&m.m("c"), &m.m("b")),
        "rename onto existing file",
    );
    assert_eq!(read(&m.s("b")), b"C");
    assert_eq!(read(&m.m("b")), b"C");
    assert!(!exists(&m.s("c")));

    write(&m.m("d1/x"), b"X");
    ok(
        sys::rename(&m.m("d1/x"), &m.m("d2/y")),
        "rename across directories",
    );
    assert_eq!(read(&m.s("d2/y")), b"X");
    assert!(!exists(&m.s("d1/x")));

    ok(
        sys::rename(&m.m("d2"), &m.m("d1/d2moved")),
        "rename a non-empty dir",
    );
    assert_eq!(read(&m.s("d1/d2moved/y")), b"X");
    assert_eq!(read(&m.m("d1/d2moved/y")), b"X");

    write(&m.m("p"), b"P");
    write(&m.m("q"), b"Q");
    assert_errno(
        sys::renameat2(&m.m("p"), &m.m("q"), libc::RENAME_NOREPLACE),
        libc::EEXIST,
        "RENAME_NOREPLACE",
    );
    assert_eq!(
        (read(&m.s("p")), read(&m.s("q"))),
        (b"P".to_vec(), b"Q".to_vec()),
        "NOREPLACE left both"
    );
    ok(
        sys::renameat2(&m.m("p"), &m.m("p2"), libc::RENAME_NOREPLACE),
        "RENAME_NOREPLACE to a free name",
    );
    assert_eq!(read(&m.s("p2")), b"P");

    ok(
        sys::renameat2(&m.m("p2"), &m.m("q"), libc::RENAME_EXCHANGE),
        "RENAME_EXCHANGE files",
    );
    assert_eq!(
        (read(&m.s("p2")), read(&m.s("q"))),
        (b"Q".to_vec(), b"P".to_vec()),
        "backing swapped"
    );
    assert_eq!(
        (read(&m.m("p2")), read(&m.m("q"))),
        (b"Q".to_vec(), b"P".to_vec()),
        "mount swapped"
    );

    ok(
        sys::renameat2(&m.m("q"), &m.m("d1"), libc::RENAME_EXCHANGE),
        "RENAME_EXCHANGE file <-> dir",
    );
    assert_eq!(ftype(&lstat(&m.s("q"))), libc::S_IFDIR);
    assert_eq!(read(&m.s("d1")), b"P");
    assert_eq!(read(&m.m("q/d2moved/y")), b"X");
    assert_errno(
        sys::renameat2(&m.m("q"), &m.m("nonexistent"), libc::RENAME_EXCHANGE),
        libc::ENOENT,
        "EXCHANGE with missing",
    );
}

#[test]
fn unlink_while_open_keeps_fd_usable() {
    let Some(m) = setup(&[]) else { return };
    write(&m.m("u"), b"abc");
    write(&m.m("r"), b"read-only data");
    let f = open_ok(&m.m("u"), libc::O_RDWR, 0);
    // A read-only open may be served by passthrough; it must survive unlink too.
    let ro = open_ok(&m.m("r"), libc::O_RDONLY, 0);
    ok(sys::unlink(&m.m("u")), "unlink u");
    ok(sys::unlink(&m.m("r")), "unlink r");
    assert!(!exists(&m.m("u")), "name gone in the mount");
    assert!(
        names(m.src()).is_empty(),
        "names gone in the backing dir: {:?}",
        names(m.src())
    );
    f.write_all_at(b"def", 3).expect("write after unlink");
    let mut buf = [0u8; 6];
    f.read_exact_at(&mut buf, 0).expect("read after unlink");
    assert_eq!(&buf, b"abcdef");
    assert_eq!(fstat(&f).st_nlink, 0, "fstat nlink after unlink");
    assert_eq!(fstat(&f).st_size, 6);
    let mut s = String::new();
    (&ro).read_to_string(&mut s).expect("read ro after unlink");
    assert_eq!(s, "read-only data");
    // A new file under the same name is a different file.
    write(&m.m("u"), b"new");
    f.read_exact_at(&mut buf, 0).expect("read old fd");
    assert_eq!(&buf, b"abcdef");
    assert_eq!(read(&m.s("u")), b"new");
}

#[test]
fn statfs_matches_backing_fs() {
    let Some(m) = setup(&[]) else { return };
    let a = sys::statvfs(m.mnt()).unwrap_or_else(|e| panic!("statvfs mnt: {}", errname(e)));
    let b = sys::statvfs(m.src()).unwrap_or_else(|e| panic!("statvfs src: {}", errname(e)));
    assert_eq!(a.f_blocks, b.f_blocks, "f_blocks");
    assert_eq!(a.f_frsize, b.f_frsize, "f_frsize");
    assert_eq!(a.f_files, b.f_files, "f_files");
    assert_eq!(a.f_namemax, b.f_namemax, "f_namemax");
    // Free space moves while other tests run; it must be of the same order.
    let diff = a.f_bavail.abs_diff(b.f_bavail);
    assert!(
        diff < b.f_blocks / 10 + 1,
        "f_bavail {} vs {}",
        a.f_bavail,
        b.f_bavail
    );
}

#[test]
fn xattr_user_namespace() {
    let Some(m) = setup(&[]) else { return };
    write(&m.m("f"), b"x");
    fs::create_dir(m.m("d")).expect("mkdir");
    let f = m.m("f");
    ok(sys::setxattr(&f, "user.k", b"v1", 0), "setxattr");
    assert_eq!(sys::getxattr(&f, "user.k"), Ok(b"v1".to_vec()));
    assert_eq!(
        sys::getxattr(&m.s("f"), "user.k"),
        Ok(b"v1".to_vec()),
        "backing xattr"
    );
    let bin = [0u8, 1, 2, 255, 0, 7];
    ok(sys::setxattr(&f, "user.bin", &bin, 0), "binary value");
    assert_eq!(sys::getxattr(&f, "user.bin"), Ok(bin.to_vec()));
    let list = sys::listxattr(&f).expect("listxattr");
    assert!(
        list.contains(&"user.k".to_string()) && list.contains(&"user.bin".to_string()),
        "{list:?}"
    );
    assert_eq!(
        sys::getxattr_cap(&f, "user.k", 0).map(|v| v.len()),
        Ok(2),
        "size query"
    );
    assert_errno(
        sys::getxattr_cap(&f, "user.bin", 2).map(|_| 0),
        libc::ERANGE,
        "small buffer",
    );
    assert_errno(
        sys::setxattr(&f, "user.k", b"v2", libc::XATTR_CREATE),
        libc::EEXIST,
        "XATTR_CREATE existing",
    );
    assert_errno(
        sys::setxattr(&f, "user.nope", b"v", libc::XATTR_REPLACE),
        libc::ENODATA,
        "XATTR_REPLACE missing",
    );
    ok(
        sys::setxattr(&f, "user.k", b"v2", libc::XATTR_REPLACE),
        "XATTR_REPLACE existing",
    );
    assert_eq!(sys::getxattr(&m.s("f"), "user.k"), Ok(b"v2".to_vec()));
    assert_errno(
        sys::getxattr(&f, "user.missing").map(|_| 0),
        libc::ENODATA,
        "get missing",
    );
    ok(sys::removexattr(&f, "user.k"), "removexattr");
    assert_errno(
        sys::getxattr(&f, "user.k").map(|_| 0),
        libc::ENODATA,
        "get removed",
    );
    assert_errno(
        sys::getxattr(&m.s("f"), "user.k").map(|_| 0),
        libc::ENODATA,
        "backing removed",
    );
    assert_errno(
        sys::removexattr(&f, "user.k"),
        libc::ENODATA,
        "remove missing",
    );
    // Directories carry user xattrs too; symlinks cannot (the backing fs says EPERM).
    ok(sys::setxattr(&m.m("d"), "user.dir", b"yes", 0), "dir xattr");
    assert_eq!(sys::getxattr(&m.s("d"), "user.dir"), Ok(b"yes".to_vec()));
    ok(sys::symlink("f", &m.m("ln")), "symlink");
    let native = sys::lsetxattr(&m.s("ln"), "user.x", b"1", 0);
    assert_eq!(
        sys::lsetxattr(&m.m("ln"), "user.x", b"1", 0),
        native,
        "lsetxattr on a symlink: same as backing"
    );
    // Set in the backing dir, seen through the mount.
    ok(
        sys::setxattr(&m.s("f"), "user.fromsrc", b"s", 0),
        "set in src",
    );
    assert_eq!(sys::getxattr(&f, "user.fromsrc"), Ok(b"s".to_vec()));
}

/// Whether `tool` is on PATH (the attr package is optional outside CI).
fn have_tool(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
}

#[test]
fn xattr_with_setfattr_and_getfattr() {
    if !have_tool("setfattr") || !have_tool("getfattr") {
        eprintln!("SKIP: setfattr/getfattr (package attr) not installed; libc xattr calls are tested in xattr_user_namespace");
        return;
    }
    let Some(m) = setup(&[]) else { return };
    write(&m.m("f"), b"x");
    sh(m.mnt(), "setfattr -n user.tool -v hello f").expect_ok("setfattr");
    assert_eq!(
        sys::getxattr(&m.s("f"), "user.tool"),
        Ok(b"hello".to_vec()),
        "backing xattr"
    );
    let out = sh(
        m.mnt(),
        "getfattr --absolute-names -n user.tool --only-values f",
    );
    out.expect_ok("getfattr -n");
    assert_eq!(out.stdout, "hello");
    let out = sh(m.mnt(), "getfattr --absolute-names -d f");
    out.expect_ok("getfattr -d");
    assert!(
        out.stdout.contains("user.tool=\"hello\""),
        "getfattr -d output:\n{}",
        out.stdout
    );
    sh(m.mnt(), "setfattr -x user.tool f").expect_ok("setfattr -x");
    assert_eq!(
        sys::getxattr(&m.s("f"), "user.tool"),
        Err(libc::ENODATA),
        "removed in backing"
    );
    let out = sh(m.mnt(), "getfattr -n user.tool f");
    assert!(!out.ok(), "getfattr of a removed attribute must fail");
    assert!(
        out.stderr.contains("No such attribute"),
        "stderr: {}",
        out.stderr
    );
}

#[test]
fn access_checks() {
    let Some(m) = setup(&["allow_other"]) else {
        return;
    };
    write(&m.m("f"), b"x");
    ok(sys::chmod(&m.m("f"), 0o644), "chmod");
    write(&m.m("secret"), b"s");
    ok(sys::chmod(&m.m("secret"), 0o600), "chmod");
    write(&m.m("exe"), b"#!/bin/sh\n");
    ok(sys::chmod(&m.m("exe"), 0o755), "chmod");
    ok(sys::access(&m.m("f"), libc::R_OK | libc::W_OK), "root R|W");
    assert_errno(
        sys::access(&m.m("f"), libc::X_OK),
        libc::EACCES,
        "root X_OK without any x bit",
    );
    ok(sys::access(&m.m("exe"), libc::X_OK), "root X_OK on 0755");
    assert_errno(
        sys::access(&m.m("missing"), libc::F_OK),
        libc::ENOENT,
        "F_OK missing",
    );
    let (f, secret, exe) = (m.m("f"), m.m("secret"), m.m("exe"));
    as_nobody(|| {
        ok(sys::access(&f, libc::R_OK), "nobody R_OK on 0644");
        assert_errno(
            sys::access(&f, libc::W_OK),
            libc::EACCES,
            "nobody W_OK on root 0644",
        );
        assert_errno(
            sys::access(&secret, libc::R_OK),
            libc::EACCES,
            "nobody R_OK on root 0600",
        );
        ok(sys::access(&exe, libc::X_OK), "nobody X_OK on 0755");
    });
}

// ---------------------------------------------------------------------------------------------
// locks between two processes

/// Forks a child that runs `f` (only async-signal-safe syscalls inside!) and returns its exit
/// code, waiting at most 10 s. fork() rather than a helper binary keeps the test self-contained;
/// the child touches nothing but raw syscalls and _exit, which is safe after fork in a
/// multi-threaded process.
fn in_child(f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: see above; the child only makes raw syscalls and leaves through _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", errname(common::errno()));
    if pid == 0 {
        let code = f();
        // SAFETY: terminate the child without running the parent's destructors or atexit.
        unsafe { libc::_exit(code) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            assert!(
                libc::WIFEXITED(status),
                "child died abnormally: {status:#x}"
            );
            return libc::WEXITSTATUS(status);
        }
        if Instant::now() >= deadline {
            // SAFETY: kill and reap our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("lock child did not finish within 10 s (blocked on a lock?)");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Child exit codes: 0 = the lock attempt failed with a conflict, 10 = it succeeded,
/// 20 + errno-ish = something else went wrong.
fn child_try_lock(path: &std::ffi::CStr, posix: Option<(i64, i64)>) -> i32 {
    // SAFETY: raw syscalls only (we are in the forked child).
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDWR);
        if fd < 0 {
            return 20;
        }
        let r = match posix {
            None => libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB),
            Some((start, len)) => {
                let mut fl: libc::flock = std::mem::zeroed();
                fl.l_type = libc::F_WRLCK as i16;
                fl.l_whence = libc::SEEK_SET as i16;
                fl.l_start = start;
                fl.l_len = len;
                libc::fcntl(fd, libc::F_SETLK, &fl)
            }
        };
        if r == 0 {
            return 10;
        }
        let e = *libc::__errno_location();
        if e == libc::EWOULDBLOCK || e == libc::EACCES || e == libc::EAGAIN {
            0
        } else {
            21
        }
    }
}

/// Child: F_GETLK on [start, start+len); exits 0 if it reports a write lock held by `owner`.
fn child_getlk(path: &std::ffi::CStr, start: i64, len: i64, owner: i32) -> i32 {
    // SAFETY: raw syscalls only (we are in the forked child).
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDWR);
        if fd < 0 {
            return 20;
        }
        let mut fl: libc::flock = std::mem::zeroed();
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = start;
        fl.l_len = len;
        if libc::fcntl(fd, libc::F_GETLK, &mut fl) != 0 {
            return 21;
        }
        if fl.l_type != libc::F_WRLCK as i16 {
            return 22;
        }
        if fl.l_pid != owner {
            return 23;
        }
        0
    }
}

#[test]
fn flock_conflicts_between_processes() {
    let Some(m) = setup(&[]) else { return };
    write(&m.m("lock"), b"");
    let f = open_ok(&m.m("lock"), libc::O_RDWR, 0);
    let c = cpath(&m.m("lock"));
    // SAFETY: flock on our fd.
    ok(
        cvt(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }),
        "flock EX",
    );
    assert_eq!(
        in_child(|| child_try_lock(&c, None)),
        0,
        "second process must not get the flock"
    );
    // SAFETY: as above.
    ok(
        cvt(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) }),
        "flock UN",
    );
    assert_eq!(
        in_child(|| child_try_lock(&c, None)),
        10,
        "lock is free after LOCK_UN"
    );
    // Shared locks coexist, an exclusive one does not.
    // SAFETY: as above.
    ok(
        cvt(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH) }),
        "flock SH",
    );
    assert_eq!(
        in_child(|| child_try_lock(&c, None)),
        0,
        "EX against SH must conflict"
    );
}

#[test]
fn posix_locks_conflict_between_processes() {
    let Some(m) = setup(&[]) else { return };
    write(&m.m("plock"), &[0u8; 1000]);
    let f = open_ok(&m.m("plock"), libc::O_RDWR, 0);
    let c = cpath(&m.m("plock"));
    // SAFETY: all-zero flock is valid; fcntl on our fd.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = 0;
    fl.l_len = 100;
    // SAFETY: valid flock pointer.
    ok(
        cvt(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) }),
        "F_SETLK 0..100",
    );
    assert_eq!(
        in_child(|| child_try_lock(&c, Some((50, 10)))),
        0,
        "overlapping lock must conflict"
    );
    assert_eq!(
        in_child(|| child_try_lock(&c, Some((200, 100)))),
        10,
        "disjoint range must lock"
    );
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    assert_eq!(
        in_child(|| child_getlk(&c, 50, 10, me)),
        0,
        "F_GETLK must report our write lock and pid"
    );
    fl.l_type = libc::F_UNLCK as i16;
    // SAFETY: valid flock pointer.
    ok(
        cvt(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) }),
        "unlock",
    );
    assert_eq!(
        in_child(|| child_try_lock(&c, Some((50, 10)))),
        10,
        "lock free after unlock"
    );
}

// ---------------------------------------------------------------------------------------------
// errors

#[test]
fn error_cases_match_posix() {
    let Some(m) = setup(&[]) else { return };
    fs::create_dir(m.m("d")).expect("mkdir");
    write(&m.m("d/inner"), b"i");
    write(&m.m("f"), b"f");
    fs::create_dir(m.m("empty")).expect("mkdir");
    let none = |r: Result<OwnedFd, i32>| r.map(|_| 0);
    // ENOENT
    assert_errno(
        none(open(&m.m("missing"), libc::O_RDONLY, 0)),
        libc::ENOENT,
        "open missing",
    );
    assert_errno(sys::unlink(&m.m("missing")), libc::ENOENT, "unlink missing");
    assert_errno(sys::rmdir(&m.m("missing")), libc::ENOENT, "rmdir missing");
    assert_errno(
        sys::mkdir(&m.m("nope/x"), 0o755),
        libc::ENOENT,
        "mkdir in missing parent",
    );
    assert_errno(
        sys::rename(&m.m("missing"), &m.m("x")),
        libc::ENOENT,
        "rename missing",
    );
    assert_errno(
        none(open(&m.m("nope/x"), libc::O_CREAT | libc::O_WRONLY, 0o644)),
        libc::ENOENT,
        "create in missing parent",
    );
    // EEXIST
    assert_errno(sys::mkdir(&m.m("d"), 0o755), libc::EEXIST, "mkdir existing");
    assert_errno(
        sys::mkdir(&m.m("f"), 0o755),
        libc::EEXIST,
        "mkdir over file",
    );
    assert_errno(
        none(open(
            &m.m("f"),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
            0o644,
        )),
        libc::EEXIST,
        "O_EXCL existing",
    );
    assert_errno(
        sys::mknod(&m.m("f"), libc::S_IFIFO | 0o644, 0),
        libc::EEXIST,
        "mknod existing",
    );
    // ENOTEMPTY
    assert_errno(sys::rmdir(&m.m("d")), libc::ENOTEMPTY, "rmdir non-empty");
    assert!(exists(&m.s("d/inner")));
    // ENOTDIR
    assert_errno(
        none(open(&m.m("f/x"), libc::O_RDONLY, 0)),
        libc::ENOTDIR,
        "open file/x",
    );
    assert_errno(
        sys::mkdir(&m.m("f/x"), 0o755),
        libc::ENOTDIR,
        "mkdir file/x",
    );
    assert_errno(sys::rmdir(&m.m("f")), libc::ENOTDIR, "rmdir a file");
    assert_errno(
        none(open(&m.m("f"), libc::O_RDONLY | libc::O_DIRECTORY, 0)),
        libc::ENOTDIR,
        "O_DIRECTORY on file",
    );
    assert_errno(
        sys::rename(&m.m("empty"), &m.m("f")),
        libc::ENOTDIR,
        "rename dir onto file",
    );
    // EISDIR
    assert_errno(
        none(open(&m.m("d"), libc::O_WRONLY, 0)),
        libc::EISDIR,
        "open dir O_WRONLY",
    );
    assert_errno(
        none(open(&m.m("d"), libc::O_RDWR, 0)),
        libc::EISDIR,
        "open dir O_RDWR",
    );
    assert_errno(sys::unlink(&m.m("d")), libc::EISDIR, "unlink a dir");
    assert_errno(
        sys::rename(&m.m("f"), &m.m("empty")),
        libc::EISDIR,
        "rename file onto dir",
    );
    let dfd = open(&m.m("d"), libc::O_RDONLY | libc::O_DIRECTORY, 0).expect("open dir");
    let mut buf = [0u8; 8];
    // SAFETY: read into a valid buffer on our fd.
    let r = cvt(unsafe { libc::read(dfd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } as i64);
    assert_errno(r, libc::EISDIR, "read on a dir fd");
    // EXDEV: rename/link from the mount to a path outside it.
    let outside = m.scratch().join("outside");
    assert_errno(
        sys::rename(&m.m("f"), &outside),
        libc::EXDEV,
        "rename mount -> outside",
    );
    assert_errno(
        sys::link(&m.m("f"), &outside),
        libc::EXDEV,
        "link mount -> outside",
    );
    write(&outside, b"o");
    assert_errno(
        sys::rename(&outside, &m.m("o")),
        libc::EXDEV,
        "rename outside -> mount",
    );
    assert_errno(
        sys::rename(&m.m("f"), Path::new("/tmp/filesync-exdev-probe")),
        libc::EXDEV,
        "rename mount -> /tmp",
    );
    assert!(
        exists(&m.s("f")) && !exists(&m.s("o")),
        "EXDEV attempts left the backing dir alone"
    );
    // Names that are too long.
    let long = "n".repeat(256);
    assert_errno(
        none(open(&m.m(&long), libc::O_CREAT | libc::O_WRONLY, 0o644)),
        libc::ENAMETOOLONG,
        "256-byte name",
    );
    let max = "n".repeat(255);
    drop(open_ok(&m.m(&max), libc::O_CREAT | libc::O_WRONLY, 0o644));
    assert!(exists(&m.s(&max)), "255-byte name created in backing dir");
}

#[test]
fn nonroot_caller_permissions_and_ownership() {
    let Some(m) = setup(&["allow_other"]) else {
        return;
    };
    write(&m.m("rootfile"), b"root data");
    ok(sys::chmod(&m.m("rootfile"), 0o644), "chmod");
    ok(sys::mkdir(&m.m("pub"), 0o777), "mkdir pub");
    ok(sys::chmod(&m.m("pub"), 0o777), "chmod pub");
    let (rootfile, mnt, pubdir) = (m.m("rootfile"), m.m(""), m.m("pub"));
    as_nobody(|| {
        let none = |r: Result<OwnedFd, i32>| r.map(|_| 0);
        assert_errno(
            none(open(&rootfile, libc::O_WRONLY, 0)),
            libc::EACCES,
            "nobody writes root 0644",
        );
        assert_errno(
            none(open(&rootfile, libc::O_WRONLY | libc::O_TRUNC, 0)),
            libc::EACCES,
            "nobody truncates root 0644",
        );
        let mut s = String::new();
        File::from(open(&rootfile, libc::O_RDONLY, 0).expect("nobody reads 0644"))
            .read_to_string(&mut s)
            .expect("read");
        assert_eq!(s, "root data");
        assert_errno(
            sys::unlink(&rootfile),
            libc::EACCES,
            "nobody unlinks in root 0755 dir",
        );
        assert_errno(
            sys::mkdir(&mnt.join("x"), 0o755),
            libc::EACCES,
            "nobody mkdir in root 0755 dir",
        );
        assert_errno(
            sys::chmod(&rootfile, 0o666),
            libc::EPERM,
            "nobody chmods root's file",
        );
        assert_errno(
            sys::chown(&rootfile, 65534, 65534),
            libc::EPERM,
            "nobody chowns root's file",
        );
        assert_errno(
            sys::truncate(&rootfile, 0),
            libc::EACCES,
            "nobody truncate(2)s root's file",
        );
        assert_errno(
            sys::utimensat(&rootfile, Some([(1, 0), (1, 0)]), 0),
            libc::EPERM,
            "nobody sets times on root's file",
        );
        drop(File::from(
            open(&pubdir.join("mine"), libc::O_CREAT | libc::O_WRONLY, 0o644)
                .expect("nobody creates in 0777"),
        ));
        ok(
            sys::mkdir(&pubdir.join("mydir"), 0o755),
            "nobody mkdir in 0777",
        );
        ok(
            sys::symlink("mine", &pubdir.join("mylink")),
            "nobody symlink",
        );
        ok(
            sys::mknod(&pubdir.join("myfifo"), libc::S_IFIFO | 0o644, 0),
            "nobody mkfifo",
        );
        ok(
            sys::link(&pubdir.join("mine"), &pubdir.join("mylink2")),
            "nobody hard link to own file",
        );
        ok(
            sys::chmod(&pubdir.join("mine"), 0o600),
            "nobody chmods own file",
        );
        ok(
            sys::utimensat(&pubdir.join("mine"), Some([(5, 0), (5, 0)]), 0),
            "nobody sets own times",
        );
    });
    for rel in ["pub/mine", "pub/mydir", "pub/mylink", "pub/myfifo"] {
        let st = lstat(&m.s(rel));
        assert_eq!(
            (st.st_uid, st.st_gid),
            (65534, 65534),
            "{rel}: backing owner must be the caller"
        );
        let st = lstat(&m.m(rel));
        assert_eq!(
            (st.st_uid, st.st_gid),
            (65534, 65534),
            "{rel}: owner through the mount"
        );
    }
    assert_eq!(perm(&lstat(&m.s("pub/mine"))), 0o600);
    assert_eq!(
        read(&m.s("rootfile")),
        b"root data",
        "root's file untouched"
    );
    // The same through a real shell running as uid 65534.
    let out = sh_nobody(m.mnt(), "echo hi > pub/shfile && id -u");
    out.expect_ok("nobody shell creating a file");
    assert_eq!(out.stdout.trim(), "65534");
    assert_eq!(lstat(&m.s("pub/shfile")).st_uid, 65534);
    let out = sh_nobody(m.mnt(), "echo x > rootfile");
    assert!(!out.ok(), "nobody shell must not write root's 0644 file");
    assert!(
        out.stderr.contains("Permission denied"),
        "stderr: {}",
        out.stderr
    );
    assert_eq!(read(&m.s("rootfile")), b"root data");
}

#[test]
fn without_allow_other_other_users_are_refused() {
    let Some(m) = setup(&[]) else { return };
    write(&m.m("f"), b"x");
    let (mnt, f) = (m.m(""), m.m("f"));
    as_nobody(|| {
        assert_errno(
            stat_raw(&f, false).map(|_| 0),
            libc::EACCES,
            "nobody stat without allow_other",
        );
        assert_errno(
            open(&mnt, libc::O_RDONLY, 0).map(|_| 0),
            libc::EACCES,
            "nobody open root without allow_other",
        );
    });
}

// ---------------------------------------------------------------------------------------------
// paths and concurrency

/// Walks `names` below `root` with openat, creating directories when `create`.
fn walk(root: &Path, names: &[String], create: bool) -> OwnedFd {
    let mut fd = open(root, libc::O_RDONLY | libc::O_DIRECTORY, 0).expect("open walk root");
    for n in names {
        let c = common::cstr(n);
        if create {
            // SAFETY: fd is a directory we own; c is NUL-terminated.
            ok(
                cvt(unsafe { libc::mkdirat(fd.as_raw_fd(), c.as_ptr(), 0o755) }),
                "mkdirat",
            );
        }
        // SAFETY: as above.
        let next = unsafe {
            libc::openat(
                fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        assert!(next >= 0, "openat {n}: {}", errname(common::errno()));
        // SAFETY: next was just returned by openat.
        fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(next) };
    }
    fd
}

fn openat_file(dir: &OwnedFd, name: &str, flags: i32) -> File {
    let c = common::cstr(name);
    // SAFETY: dir is our directory fd; c is NUL-terminated.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags | libc::O_CLOEXEC,
            0o644 as libc::c_uint,
        )
    };
    assert!(fd >= 0, "openat {name}: {}", errname(common::errno()));
    // SAFETY: fd was just returned by openat.
    File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

#[test]
fn path_longer_than_path_max() {
    let Some(m) = setup(&[]) else { return };
    let comps: Vec<String> = (0..18)
        .map(|i| format!("{i:02}{}", "d".repeat(240)))
        .collect();
    let total = m.mnt().as_os_str().len()
        + comps.iter().map(|c| c.len() + 1).sum::<usize>()
        + "/leaf.txt".len();
    assert!(total > 4096, "path must exceed PATH_MAX: {total}");
    {
        let bottom = walk(m.mnt(), &comps, true);
        let mut f = openat_file(
            &bottom,
            "leaf.txt",
            libc::O_CREAT | libc::O_WRONLY | libc::O_EXCL,
        );
        f.write_all(b"deep").expect("write leaf");
    }
    // Force the kernel to forget the chain so the daemon has to resolve it again.
    sys::drop_caches();
    let bottom = walk(m.mnt(), &comps, false);
    let mut s = String::new();
    openat_file(&bottom, "leaf.txt", libc::O_RDONLY)
        .read_to_string(&mut s)
        .expect("read leaf via mount");
    assert_eq!(s, "deep");
    let mut s = String::new();
    let src_bottom = walk(m.src(), &comps, false);
    openat_file(&src_bottom, "leaf.txt", libc::O_RDONLY)
        .read_to_string(&mut s)
        .expect("read leaf in src");
    assert_eq!(s, "deep");
    // Renaming near the bottom works relative to fds too.
    let (a, b) = (common::cstr("leaf.txt"), common::cstr("leaf2.txt"));
    // SAFETY: directory fd and NUL-terminated names.
    ok(
        cvt(unsafe {
            libc::renameat(
                bottom.as_raw_fd(),
                a.as_ptr(),
                bottom.as_raw_fd(),
                b.as_ptr(),
            )
        }),
        "renameat deep",
    );
    openat_file(&src_bottom, "leaf2.txt", libc::O_RDONLY);
    // The full path cannot be passed whole.
    let mut full = m.mnt().to_path_buf();
    for c in &comps {
        full.push(c);
    }
    full.push("leaf2.txt");
    assert_errno(
        open(&full, libc::O_RDONLY, 0).map(|_| 0),
        libc::ENAMETOOLONG,
        "whole long path",
    );
}

#[test]
fn concurrent_writers() {
    let Some(m) = setup(&[]) else { return };
    const OWN: usize = 2 << 20;
    const REGION: usize = 1 << 20;
    let shared = std::sync::Arc::new(open_ok(&m.m("shared"), libc::O_CREAT | libc::O_RDWR, 0o644));
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let p = m.m(&format!("own-{t}"));
            s.spawn(move || {
                let data = Rng::new(100 + t).bytes(OWN);
                let mut f = open_ok(&p, libc::O_CREAT | libc::O_WRONLY, 0o644);
                for chunk in data.chunks(64 * 1024) {
                    f.write_all(chunk).expect("own write");
                }
            });
        }
        for t in 0..4u64 {
            let shared = std::sync::Arc::clone(&shared);
            s.spawn(move || {
                let data = Rng::new(200 + t).bytes(REGION);
                // Interleave small pwrites so the threads really overlap in time.
                for (i, chunk) in data.chunks(16 * 1024).enumerate() {
                    let off = t as usize * REGION + i * 16 * 1024;
                    shared
                        .write_all_at(chunk, off as u64)
                        .expect("shared pwrite");
                }
            });
        }
    });
    shared.sync_all().expect("fsync shared");
    drop(shared);
    for t in 0..8u64 {
        let want = Rng::new(100 + t).bytes(OWN);
        let rel = format!("own-{t}");
        assert!(read(&m.s(&rel)) == want, "{rel}: backing content differs");
        assert!(
            read(&m.m(&rel)) == want,
            "{rel}: content through the mount differs"
        );
    }
    let mut want = Vec::new();
    for t in 0..4u64 {
        want.extend(Rng::new(200 + t).bytes(REGION));
    }
    let got = read(&m.s("shared"));
    assert_eq!(got.len(), want.len(), "shared size");
    for t in 0..4 {
        let r = t * REGION..(t + 1) * REGION;
        assert!(
            got[r.clone()] == want[r],
            "shared region {t} differs in backing file"
        );
    }
    assert!(
        read(&m.m("shared")) == want,
        "shared content through the mount differs"
    );
}

// ---------------------------------------------------------------------------------------------
// real tools

#[test]
fn git_repository_inside_mount() {
    let Some(m) = setup(&[]) else { return };
    let home = m.scratch().join("home");
    fs::create_dir(&home).expect("mkdir home");
    let script = r#"
        set -e
        git -c init.defaultBranch=main init -q repo
        cd repo
        mkdir -p a/b
        echo hello > a/b/f
        seq 1 20000 > big
        ln -s a/b/f link
        chmod +x a/b/f
        git add -A
        git -c user.name=T -c user.email=t@example.com commit -q -m init
        echo more >> big
        git mv a/b/f a/b/g
        git -c user.name=T -c user.email=t@example.com commit -q -am second
        git gc -q
        git fsck --strict --no-progress
        test -z "$(git status --porcelain)"
        test "$(git rev-list --count HEAD)" = 2
    "#;
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .current_dir(m.mnt())
        .env("HOME", &home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null");
    common::run(&mut cmd, Duration::from_secs(120)).expect_ok("git in the mount");
    // The backing repository is a valid repository with the same history.
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("git fsck --strict --no-progress && test -z \"$(git status --porcelain)\" && git log --format=%s")
        .current_dir(m.s("repo"))
        .env("HOME", &home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null");
    let out = common::run(&mut cmd, Duration::from_secs(60));
    out.expect_ok("git fsck/status in the backing dir");
    assert_eq!(out.stdout.trim(), "second\ninit");
}

/// A small tree with varied modes, owners, times, a hard link, a symlink and a fifo.
fn build_tree(root: &Path) {
    fs::create_dir_all(root.join("sub/deeper")).expect("mkdir tree");
    fs::create_dir(root.join("emptydir")).expect("mkdir emptydir");
    let mut rng = Rng::new(7);
    let files = [
        ("plain.txt", 0o644, 100),
        ("exec.sh", 0o755, 30),
        ("private", 0o600, 5000),
        ("sub/big.bin", 0o640, 300_000),
        ("sub/deeper/empty", 0o444, 0),
        ("sub/setuid", 0o4755, 10),
    ];
    for (rel, mode, len) in files {
        fs::write(root.join(rel), rng.bytes(len)).expect("write tree file");
        fs::set_permissions(root.join(rel), fs::Permissions::from_mode(mode))
            .expect("chmod tree file");
    }
    ok(
        sys::chown(&root.join("private"), 65534, 65534),
        "chown tree file",
    );
    ok(
        sys::link(&root.join("plain.txt"), &root.join("sub/hardlink.txt")),
        "tree hard link",
    );
    ok(
        sys::symlink("../plain.txt", &root.join("sub/link")),
        "tree symlink",
    );
    ok(
        sys::mknod(&root.join("fifo"), libc::S_IFIFO | 0o600, 0),
        "tree fifo",
    );
    // Fixed past times, set bottom-up so directory times are not disturbed afterwards.
    let mut all = Vec::new();
    collect(root, &mut all);
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in all.iter().enumerate() {
        let t = 1_600_000_000 + i as i64 * 1000;
        ok(
            sys::utimensat(
                p,
                Some([(t, 111), (t + 1, 222_000_000)]),
                libc::AT_SYMLINK_NOFOLLOW,
            ),
            "set tree times",
        );
    }
    ok(
        sys::utimensat(root, Some([(1_500_000_000, 0), (1_500_000_000, 0)]), 0),
        "root times",
    );
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        out.push(p.clone());
        if lstat(&p).st_mode & S_IFMT == libc::S_IFDIR {
            collect(&p, out);
        }
    }
}

/// (relpath, type|mode, uid, gid, size, mtime sec, mtime nsec, nlink) of one entry.
type MetaRow = (String, u32, u32, u32, i64, i64, i64, u64);

/// [`MetaRow`]s of everything under root, sorted.
fn tree_meta(root: &Path, with_nsec: bool) -> Vec<MetaRow> {
    let mut all = Vec::new();
    collect(root, &mut all);
    let mut v: Vec<_> = all
        .iter()
        .map(|p| {
            let st = lstat(p);
            let rel = p
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            let is_dir = st.st_mode & S_IFMT == libc::S_IFDIR;
            (
                rel,
                st.st_mode,
                st.st_uid,
                st.st_gid,
                if is_dir { 0 } else { st.st_size },
                st.st_mtime,
                if with_nsec { st.st_mtime_nsec } else { 0 },
                if is_dir { 0 } else { st.st_nlink },
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn cp_a_tree_into_mount() {
    let Some(m) = setup(&[]) else { return };
    let tree = m.scratch().join("tree");
    build_tree(&tree);
    sh(
        m.scratch(),
        &format!("cp -a tree {}", m.m("tree").display()),
    )
    .expect_ok("cp -a into mount");
    sh(
        m.scratch(),
        &format!(
            "diff -r --no-dereference -x fifo tree {}",
            m.m("tree").display()
        ),
    )
    .expect_ok("diff -r");
    let want = tree_meta(&tree, true);
    assert_eq!(
        tree_meta(&m.m("tree"), true),
        want,
        "modes/owners/mtimes through the mount"
    );
    assert_eq!(
        tree_meta(&m.s("tree"), true),
        want,
        "modes/owners/mtimes in the backing dir"
    );
    let (a, b) = (
        lstat(&m.m("tree/plain.txt")),
        lstat(&m.m("tree/sub/hardlink.txt")),
    );
    assert_eq!(a.st_ino, b.st_ino, "cp -a keeps hard links");
}

#[test]
fn tar_round_trip() {
    let Some(m) = setup(&[]) else { return };
    let tree = m.scratch().join("tree");
    build_tree(&tree);
    let script = format!(
        "set -e; tar -C tree -cf {mnt}/t.tar .; mkdir {mnt}/x; tar -C {mnt}/x -xpf {mnt}/t.tar; \
         diff -r --no-dereference -x fifo tree {mnt}/x; tar -C {mnt}/x -cf back.tar .; mkdir y; \
         tar -C y -xpf back.tar; diff -r --no-dereference -x fifo tree y",
        mnt = m.mnt().display()
    );
    sh(m.scratch(), &script).expect_ok("tar round trip");
    // tar keeps whole seconds only.
    let want = tree_meta(&tree, false);
    assert_eq!(
        tree_meta(&m.m("x"), false),
        want,
        "extracted through the mount"
    );
    assert_eq!(tree_meta(&m.s("x"), false), want, "extracted, backing dir");
    assert_eq!(
        tree_meta(&m.scratch().join("y"), false),
        want,
        "archived from the mount"
    );
    assert_eq!(read(&m.s("t.tar")), read(&m.m("t.tar")));
}

// ---------------------------------------------------------------------------------------------
// inode numbers, read-only, passthrough, options

#[test]
fn inode_numbers_stable_across_forget() {
    let Some(m) = setup(&[]) else { return };
    fs::create_dir(m.m("d")).expect("mkdir");
    write(&m.m("f"), b"x");
    ok(sys::link(&m.m("f"), &m.m("d/h")), "link");
    let ino = |rel: &str| lstat(&m.m(rel)).st_ino;
    let before = (ino("f"), ino("d"), ino("d/h"));
    for round in 0..3 {
        sys::drop_caches();
        // Look up through the other name first this time.
        let h = ino("d/h");
        let after = (ino("f"), ino("d"), h);
        assert_eq!(
            after, before,
            "inode numbers changed after forget (round {round})"
        );
    }
    assert_eq!(before.0, before.2, "hard links share the inode");
    ok(sys::rename(&m.m("f"), &m.m("d/f2")), "rename");
    sys::drop_caches();
    assert_eq!(
        ino("d/f2"),
        before.0,
        "rename + forget keeps the inode number"
    );
}

#[test]
fn readdir_ino_matches_stat() {
    let Some(m) = setup(&[]) else { return };
    write(&m.m("f"), b"x");
    fs::create_dir(m.m("d")).expect("mkdir");
    ok(sys::symlink("f", &m.m("l")), "symlink");
    for (name, _, d_ino) in readdir_typed(m.mnt()) {
        if name == "." || name == ".." {
            continue;
        }
        assert_eq!(d_ino, lstat(&m.m(&name)).st_ino, "{name}: d_ino vs st_ino");
    }
}

#[test]
fn read_only_mount_refuses_writes() {
    let Some(m) = common::setup_with(&["ro"], |src| {
        fs::write(src.join("f"), b"content").expect("write");
        fs::create_dir(src.join("d")).expect("mkdir");
    }) else {
        return;
    };
    let opts = common::mount_options(m.mnt()).unwrap_or_default();
    assert!(
        opts.split(',').any(|o| o == "ro"),
        "mount options should contain ro: {opts}"
    );
    assert_eq!(read(&m.m("f")), b"content");
    let none = |r: Result<OwnedFd, i32>| r.map(|_| 0);
    let f = m.m("f");
    assert_errno(
        none(open(&f, libc::O_WRONLY, 0)),
        libc::EROFS,
        "open O_WRONLY",
    );
    assert_errno(none(open(&f, libc::O_RDWR, 0)), libc::EROFS, "open O_RDWR");
    assert_errno(
        none(open(&m.m("new"), libc::O_CREAT | libc::O_WRONLY, 0o644)),
        libc::EROFS,
        "create",
    );
    assert_errno(sys::mkdir(&m.m("nd"), 0o755), libc::EROFS, "mkdir");
    assert_errno(sys::unlink(&f), libc::EROFS, "unlink");
    assert_errno(sys::rmdir(&m.m("d")), libc::EROFS, "rmdir");
    assert_errno(sys::rename(&f, &m.m("g")), libc::EROFS, "rename");
    assert_errno(sys::chmod(&f, 0o600), libc::EROFS, "chmod");
    assert_errno(sys::chown(&f, 1, 1), libc::EROFS, "chown");
    assert_errno(sys::truncate(&f, 0), libc::EROFS, "truncate");
    assert_errno(sys::utimensat(&f, None, 0), libc::EROFS, "utimensat");
    assert_errno(sys::symlink("f", &m.m("l")), libc::EROFS, "symlink");
    assert_errno(sys::link(&f, &m.m("l")), libc::EROFS, "link");
    assert_errno(
        sys::mknod(&m.m("p"), libc::S_IFIFO | 0o644, 0),
        libc::EROFS,
        "mknod",
    );
    assert_errno(
        sys::setxattr(&f, "user.x", b"1", 0),
        libc::EROFS,
        "setxattr",
    );
    assert_eq!(read(&m.s("f")), b"content");
    assert_eq!(names(m.src()), vec!["d".to_string(), "f".to_string()]);
}

fn check_big_read(m: &Mount, data: &[u8]) {
    assert!(read(&m.m("big")) == data, "whole-file read differs");
    let f = open_ok(&m.m("big"), libc::O_RDONLY, 0);
    let mut rng = Rng::new(99);
    for _ in 0..64 {
        let off = rng.below(data.len());
        let len = rng.below(300_000).min(data.len() - off);
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off as u64).expect("pread");
        assert!(buf == data[off..off + len], "pread({off}, {len}) differs");
    }
}

#[test]
fn passthrough_on_and_off_read_identical_content() {
    if !common::fuse_available() {
        return;
    }
    let data = Rng::new(8).bytes(8 << 20);
    let fill = |src: &Path| fs::write(src.join("big"), &data).expect("write big");
    for opt in ["passthrough=off", "passthrough=on"] {
        let m = Mount::with_src(&[opt], fill);
        check_big_read(&m, &data);
    }
    // Default (passthrough on) as well.
    let m = Mount::with_src(&[], fill);
    check_big_read(&m, &data);
    assert_eq!(fnv(&read(&m.s("big"))), fnv(&data));
}

#[test]
fn passthrough_read_sees_writes_through_other_fd() {
    let Some(m) = setup(&["passthrough=on"]) else {
        return;
    };
    write(&m.m("f"), &[b'a'; 8192]);
    // Opened read-only first: the fd most likely to be served by passthrough.
    let ro = open_ok(&m.m("f"), libc::O_RDONLY, 0);
    let mut buf = vec![0u8; 8192];
    ro.read_exact_at(&mut buf, 0).expect("first read");
    let rw = open_ok(&m.m("f"), libc::O_RDWR, 0);
    rw.write_all_at(&[b'b'; 100], 4000).expect("pwrite");
    ro.read_exact_at(&mut buf, 0).expect("second read");
    assert!(
        buf[4000..4100].iter().all(|b| *b == b'b'),
        "read-only fd must see the write made through another fd"
    );
    rw.write_all_at(b"grow", 8192).expect("extend");
    let mut tail = [0u8; 4];
    ro.read_exact_at(&mut tail, 8192).expect("read grown tail");
    assert_eq!(&tail, b"grow");
    drop(rw);
    assert_eq!(lstat(&m.s("f")).st_size, 8196);
    // A fresh read-only open after close sees everything too.
    assert_eq!(read(&m.m("f"))[4000..4100], [b'b'; 100]);
}

#[test]
fn all_documented_options_are_accepted() {
    let Some(m) = setup(&[
        "threads=4",
        "log=debug",
        "node_name=test-node",
        "passthrough=off",
        "allow_other",
    ]) else {
        return;
    };
    write(&m.m("f"), b"options");
    assert_eq!(read(&m.s("f")), b"options");
    assert_eq!(read(&m.m("f")), b"options");
}

/// Polls `cond` every 20 ms for up to 3 s: changes made behind the kernel's back in SRC may
/// take up to the attr/entry cache timeout (~1 s) to show through the mount.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "not visible through the mount within 3 s: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn changes_in_src_show_through_mount() {
    let Some(m) = setup(&[]) else { return };
    write(&m.m("f"), b"first");
    assert_eq!(read(&m.m("f")), b"first");
    // New name: never looked up, so visible at once.
    write(&m.s("new"), b"made in src");
    assert_eq!(read(&m.m("new")), b"made in src");
    assert!(
        names(m.mnt()).contains(&"new".to_string()),
        "readdir shows the new name"
    );
    // Content and size of a file the kernel has cached.
    write(&m.s("f"), b"second, longer");
    eventually("rewritten content", || read(&m.m("f")) == b"second, longer");
    // Attributes.
    fs::set_permissions(m.s("f"), fs::Permissions::from_mode(0o600)).expect("chmod in src");
    eventually("chmod in src", || perm(&lstat(&m.m("f"))) == 0o600);
    // Rename and unlink.
    fs::rename(m.s("new"), m.s("renamed")).expect("rename in src");
    eventually("rename in src", || {
        !exists(&m.m("new")) && exists(&m.m("renamed"))
    });
    fs::remove_file(m.s("renamed")).expect("unlink in src");
    eventually("unlink in src", || !exists(&m.m("renamed")));
    // A directory tree made in src can be walked.
    fs::create_dir_all(m.s("a/b/c")).expect("mkdir -p in src");
    write(&m.s("a/b/c/leaf"), b"leaf");
    assert_eq!(read(&m.m("a/b/c/leaf")), b"leaf");
    // Replaced behind the mount's back by a different file under the same name.
    fs::remove_file(m.s("f")).expect("unlink f in src");
    write(&m.s("f"), b"replacement");
    eventually("replaced file", || {
        fs::read(m.m("f")).ok().as_deref() == Some(b"replacement".as_slice())
    });
}

// ---------------------------------------------------------------------------------------------
// mmap, O_DIRECT, exec, and mixing open modes on one inode

/// A shared mapping of `len` bytes of `fd`, unmapped on drop.
struct Map {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Map {
    fn new(fd: &impl AsRawFd, len: usize, prot: i32) -> Result<Map, i32> {
        // SAFETY: a fresh shared mapping of an fd we own; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(common::errno());
        }
        Ok(Map { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is len bytes long and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; mapped writable by the caller's choice of prot.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<u8>(), self.len) }
    }

    fn msync(&self) -> Result<i64, i32> {
        // SAFETY: syncing our own mapping.
        cvt(unsafe { libc::msync(self.ptr, self.len, libc::MS_SYNC) })
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

#[test]
fn mmap_shared_write_and_read() {
    let Some(m) = setup(&[]) else { return };
    let data = Rng::new(11).bytes(3 * 4096 + 100);
    write(&m.m("ro"), &data);
    // Read-only mapping (possibly of a passthrough fd).
    let f = open_ok(&m.m("ro"), libc::O_RDONLY, 0);
    let map = Map::new(&f, data.len(), libc::PROT_READ)
        .unwrap_or_else(|e| panic!("mmap read-only: {}", errname(e)));
    assert!(map.bytes() == data, "read-only mapping content differs");
    drop(map);
    // Writable shared mapping: the stores must reach the backing file after msync.
    write(&m.m("rw"), &[0u8; 8192]);
    let f = open_ok(&m.m("rw"), libc::O_RDWR, 0);
    let mut map = Map::new(&f, 8192, libc::PROT_READ | libc::PROT_WRITE)
        .unwrap_or_else(|e| panic!("mmap shared writable: {}", errname(e)));
    map.bytes_mut()[..5].copy_from_slice(b"mmap!");
    map.bytes_mut()[8000..8005].copy_from_slice(b"tail!");
    ok(map.msync(), "msync");
    let src = read(&m.s("rw"));
    assert_eq!(&src[..5], b"mmap!", "backing file after msync");
    assert_eq!(&src[8000..8005], b"tail!");
    // A write through the fd shows in the mapping.
    f.write_all_at(b"pwrite", 100).expect("pwrite");
    assert_eq!(&map.bytes()[100..106], b"pwrite", "mapping sees pwrite");
    drop(map);
    drop(f);
    assert_eq!(&read(&m.m("rw"))[..5], b"mmap!");
}

/// A 4096-aligned buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: non-zero size layout; checked for null.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "alloc");
        Aligned { ptr, len }
    }

    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes while self lives.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("layout");
        // SAFETY: allocated above with the same layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

#[test]
fn o_direct_io_behaves_like_backing_fs() {
    let Some(m) = setup(&[]) else { return };
    let native = open(
        &m.scratch().join("direct"),
        libc::O_CREAT | libc::O_RDWR | libc::O_DIRECT,
        0o644,
    );
    let mounted = open(
        &m.m("direct"),
        libc::O_CREAT | libc::O_RDWR | libc::O_DIRECT,
        0o644,
    );
    match (&native, &mounted) {
        (Ok(_), Ok(fd)) => {
            let mut buf = Aligned::new(8192);
            buf.buf().copy_from_slice(&Rng::new(12).bytes(8192));
            let want = buf.buf().to_vec();
            // SAFETY: aligned buffer valid for its length; fd is ours.
            let n = cvt(unsafe { libc::pwrite(fd.as_raw_fd(), buf.ptr.cast(), 8192, 4096) } as i64);
            assert_eq!(n, Ok(8192), "O_DIRECT pwrite");
            let mut back = Aligned::new(8192);
            // SAFETY: as above.
            let n = cvt(unsafe { libc::pread(fd.as_raw_fd(), back.ptr.cast(), 8192, 4096) } as i64);
            assert_eq!(n, Ok(8192), "O_DIRECT pread");
            assert!(back.buf() == want.as_slice(), "O_DIRECT read back differs");
            assert!(
                read(&m.s("direct"))[4096..] == want[..],
                "backing content after O_DIRECT write"
            );
        }
        _ => assert_eq!(
            mounted.as_ref().map(|_| ()),
            native.as_ref().map(|_| ()),
            "O_DIRECT open on the mount vs the backing fs"
        ),
    }
}

#[test]
fn exec_programs_from_mount() {
    let Some(m) = setup(&[]) else { return };
    fs::copy("/bin/echo", m.m("echo")).expect("copy echo into the mount");
    fs::set_permissions(m.m("echo"), fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = common::run(
        std::process::Command::new(m.m("echo")).arg("from the mount"),
        Duration::from_secs(10),
    );
    out.expect_ok("exec a binary from the mount");
    assert_eq!(out.stdout, "from the mount\n");
    write(&m.m("script.sh"), b"#!/bin/sh\necho script ran\n");
    fs::set_permissions(m.m("script.sh"), fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = common::run(
        &mut std::process::Command::new(m.m("script.sh")),
        Duration::from_secs(10),
    );
    out.expect_ok("exec a script from the mount");
    assert_eq!(out.stdout, "script ran\n");
    // Without x permission exec is refused.
    write(&m.m("noexec.sh"), b"#!/bin/sh\necho no\n");
    fs::set_permissions(m.m("noexec.sh"), fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = std::process::Command::new(m.m("noexec.sh"))
        .output()
        .expect_err("exec of a 0644 file must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "exec 0644: {err}");
}

#[test]
fn mixed_open_modes_on_one_inode() {
    let Some(m) = setup(&[]) else { return };
    // The kernel refuses (EIO) an open that would mix passthrough and daemon-served handles of
    // one inode unless the daemon keeps them apart; drive random interleavings of read-only,
    // read-write and write-only opens, reads, writes and closes and check against a model.
    let path = m.m("mixed");
    const LEN: usize = 64 * 1024;
    write(&path, &vec![0u8; LEN]);
    let mut model = vec![0u8; LEN];
    let mut rng = Rng::new(13);
    let mut fds: Vec<(i32, File)> = Vec::new();
    for step in 0..400 {
        match rng.below(5) {
            0 | 1 if fds.len() < 6 => {
                let flags = [libc::O_RDONLY, libc::O_RDWR, libc::O_WRONLY][rng.below(3)];
                let f = open(&path, flags, 0).unwrap_or_else(|e| {
                    panic!(
                        "step {step}: open flags {flags:#o} with {} other fds: {}",
                        fds.len(),
                        errname(e)
                    )
                });
                fds.push((flags, File::from(f)));
            }
            2 if !fds.is_empty() => {
                fds.swap_remove(rng.below(fds.len()));
            }
            _ if !fds.is_empty() => {
                let (flags, f) = &fds[rng.below(fds.len())];
                let off = rng.below(LEN - 512);
                let len = rng.below(512) + 1;
                if *flags == libc::O_RDONLY || (*flags == libc::O_RDWR && rng.below(2) == 0) {
                    let mut buf = vec![0u8; len];
                    f.read_exact_at(&mut buf, off as u64)
                        .unwrap_or_else(|e| panic!("step {step}: pread: {e}"));
                    assert!(
                        buf == model[off..off + len],
                        "step {step}: pread({off}, {len}) differs from what was written"
                    );
                } else {
                    let data = rng.bytes(len);
                    f.write_all_at(&data, off as u64)
                        .unwrap_or_else(|e| panic!("step {step}: pwrite: {e}"));
                    model[off..off + len].copy_from_slice(&data);
                }
            }
            _ => {}
        }
    }
    drop(fds);
    assert!(
        read(&m.s("mixed")) == model,
        "backing content differs from the model"
    );
    assert!(
        read(&path) == model,
        "content through the mount differs from the model"
    );
}
