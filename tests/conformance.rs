//! POSIX conformance sweep: a differential test of the mount against the kernel's own
//! filesystem.
//!
//! The same sequence of system calls runs twice: once in a plain directory on the backing
//! filesystem (the reference) and once inside a filesync mount. Every step's outcome (return
//! value or errno, plus the data it read or the attributes it reported) must be identical, and at
//! the end a normalised listing of both trees (names, types, permission bits, sizes, link counts,
//! owners, content hashes, symlink targets, device numbers, user.* xattrs) must be identical too
//! — both as seen through the mount and as stored in the backing folder. Inode numbers, directory
//! sizes and timestamps that the script did not set itself are left out, as they legitimately
//! differ.
//!
//! `scripted_sequence` covers, in ~150 steps:
//! - open flag combinations: O_CREAT, O_EXCL, O_TRUNC, O_APPEND, O_DIRECTORY on a file,
//!   O_NOFOLLOW on a symlink, O_CREAT through a dangling symlink, write to an O_RDONLY fd (EBADF),
//!   read from an O_WRONLY fd, read from a directory fd (EISDIR), opening a directory for write;
//! - lseek (SEEK_SET/CUR/END beyond the end, negative, SEEK_DATA/SEEK_HOLE), ftruncate and
//!   truncate grow/shrink/negative, pwrite far past the end;
//! - rename edge cases: a directory into its own subdirectory (EINVAL), onto a non-empty
//!   directory (ENOTEMPTY), directory onto file (ENOTDIR), file onto directory (EISDIR), onto an
//!   empty directory, between two hard links of one file, onto "." (EBUSY), RENAME_NOREPLACE,
//!   RENAME_EXCHANGE (file/file, file/dir, missing), invalid flag combinations;
//! - link to a directory (EPERM), link to a symlink, unlink a directory (EISDIR), rmdir of a file
//!   (ENOTDIR), rmdir "." (EINVAL) and "dir/.." (ENOTEMPTY), mkdir in a missing parent, names of
//!   255 and 256 bytes;
//! - symlink loops and self-loops (ELOOP), trailing-slash lookups through symlinks, readlink;
//! - chmod through a symlink (changes the target), setuid/setgid/sticky bits, utimensat with
//!   explicit times, UTIME_NOW/UTIME_OMIT and AT_SYMLINK_NOFOLLOW;
//! - mknod of fifos, sockets and a character device;
//! - umask effects on open/mkdir/mknod (umask 027 and 0);
//! - setgid directory inheritance (group and the setgid bit on subdirectories), for root and for
//!   an unprivileged caller, and the kernel clearing setgid on chmod by a non-member;
//! - sticky-directory semantics for an unprivileged caller (uid 65534): it cannot unlink or
//!   rename root's file, can remove its own;
//! - setuid/setgid bits cleared when an unprivileged caller writes to the file;
//! - permission checks for the unprivileged caller: EACCES on write/readdir/stat in private
//!   directories, EPERM for chown/chmod of others' files and for explicit times, write
//!   permission being enough for UTIME_NOW, user.* xattrs needing write permission;
//! - user.* xattrs: set/get/list/remove, XATTR_CREATE/XATTR_REPLACE, ENODATA.
//!
//! `random_sequence` runs ~2000 operations drawn by a seeded PRNG (seed printed; set
//! `FILESYNC_CONFORMANCE_SEED` to replay) over a small set of names in three directories, mixing
//! create/write/append/truncate/rename(2)/link/symlink/unlink/mkdir/rmdir/chmod/utimensat/
//! xattr/readdir/stat calls, some of them made by the unprivileged user, and compares outcomes
//! and the final trees the same way.
//!
//! `FILESYNC_CONFORMANCE_TRACE=1` prints every scripted step's outcome in both runs.

mod common;

use common::{as_nobody, cpath, cvt, errname, fnv, open_tempdir, setup, sys, Rng};
use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where one run of a sequence happens: the root directory plus named open fds.
struct Ctx {
    root: PathBuf,
    fds: Mutex<HashMap<String, OwnedFd>>,
}

/// `Ok(v)` as "ok v", errors by errno name: the comparable outcome of a syscall.
fn res(r: Result<i64, i32>) -> String {
    match r {
        Ok(v) => format!("ok {v}"),
        Err(e) => errname(e),
    }
}

/// Like [`res`] for calls whose success value carries no information.
fn res0(r: Result<i64, i32>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => errname(e),
    }
}

fn type_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "reg",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "lnk",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "sock",
        libc::S_IFCHR => "chr",
        libc::S_IFBLK => "blk",
        _ => "?",
    }
}

/// The comparable part of a stat: no inode, device, timestamps or directory size.
fn summary(st: &libc::stat) -> String {
    let t = type_name(st.st_mode);
    let mut s = format!(
        "{t} {:04o} n={} u={} g={}",
        st.st_mode & 0o7777,
        st.st_nlink,
        st.st_uid,
        st.st_gid
    );
    if t != "dir" {
        s.push_str(&format!(" s={}", st.st_size));
    }
    if t == "chr" || t == "blk" {
        s.push_str(&format!(" rdev={}", st.st_rdev));
    }
    s
}

impl Ctx {
    fn new(root: &Path) -> Ctx {
        Ctx {
            root: root.to_path_buf(),
            fds: Mutex::new(HashMap::new()),
        }
    }

    /// `rel` under the root, kept byte-for-byte (trailing slashes and "." matter here).
    fn p(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            return self.root.clone();
        }
        let mut b = self.root.as_os_str().to_owned().into_vec();
        b.push(b'/');
        b.extend_from_slice(rel.as_bytes());
        PathBuf::from(OsString::from_vec(b))
    }

    fn fd(&self, slot: &str) -> Option<i32> {
        self.fds
            .lock()
            .expect("fd table")
            .get(slot)
            .map(|f| f.as_raw_fd())
    }

    fn open(&self, slot: &str, rel: &str, flags: i32, mode: u32) -> String {
        match common::open(&self.p(rel), flags, mode) {
            Ok(fd) => {
                self.fds.lock().expect("fd table").insert(slot.into(), fd);
                "ok".into()
            }
            Err(e) => errname(e),
        }
    }

    fn close(&self, slot: &str) -> String {
        match self.fds.lock().expect("fd table").remove(slot) {
            Some(_) => "ok".into(),
            None => "no such slot".into(),
        }
    }

    fn close_all(&self) {
        self.fds.lock().expect("fd table").clear();
    }

    /// Runs `f` with the raw fd of `slot`, or reports a missing slot (an earlier open failed).
    fn with_fd(&self, slot: &str, f: impl FnOnce(i32) -> String) -> String {
        match self.fd(slot) {
            Some(fd) => f(fd),
            None => "no such slot".into(),
        }
    }

    fn write(&self, slot: &str, data: &[u8]) -> String {
        self.with_fd(slot, |fd| {
            // SAFETY: data is readable for its length.
            res(cvt(
                unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) } as i64,
            ))
        })
    }

    fn pwrite(&self, slot: &str, data: &[u8], off: i64) -> String {
        self.with_fd(slot, |fd| {
            // SAFETY: data is readable for its length.
            res(cvt(
                unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), off) } as i64,
            ))
        })
    }

    fn read(&self, slot: &str, n: usize) -> String {
        self.with_fd(slot, |fd| {
            let mut buf = vec![0u8; n];
            // SAFETY: buf is writable for n bytes.
            match cvt(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), n) } as i64) {
                Ok(got) => format!("ok {got} {:016x}", fnv(&buf[..got as usize])),
                Err(e) => errname(e),
            }
        })
    }

    fn pread(&self, slot: &str, n: usize, off: i64) -> String {
        self.with_fd(slot, |fd| {
            let mut buf = vec![0u8; n];
            // SAFETY: buf is writable for n bytes.
            match cvt(unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), n, off) } as i64) {
                Ok(got) => format!("ok {got} {:016x}", fnv(&buf[..got as usize])),
                Err(e) => errname(e),
            }
        })
    }

    fn lseek(&self, slot: &str, off: i64, whence: i32) -> String {
        // SAFETY: lseek on an fd we own.
        self.with_fd(slot, |fd| res(cvt(unsafe { libc::lseek(fd, off, whence) })))
    }

    fn ftruncate(&self, slot: &str, len: i64) -> String {
        // SAFETY: ftruncate on an fd we own.
        self.with_fd(slot, |fd| res0(cvt(unsafe { libc::ftruncate(fd, len) })))
    }

    fn fsync(&self, slot: &str) -> String {
        // SAFETY: fsync on an fd we own.
        self.with_fd(slot, |fd| res0(cvt(unsafe { libc::fsync(fd) })))
    }

    fn fchmod(&self, slot: &str, mode: u32) -> String {
        // SAFETY: fchmod on an fd we own.
        self.with_fd(slot, |fd| res0(cvt(unsafe { libc::fchmod(fd, mode) })))
    }

    fn fstat(&self, slot: &str) -> String {
        self.with_fd(slot, |fd| {
            // SAFETY: all-zero is a valid stat to overwrite; fd is ours.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: valid out-pointer.
            match cvt(unsafe { libc::fstat(fd, &mut st) }) {
                Ok(_) => format!("ok {}", summary(&st)),
                Err(e) => errname(e),
            }
        })
    }

    fn stat(&self, rel: &str) -> String {
        match common::stat_raw(&self.p(rel), true) {
            Ok(st) => format!("ok {}", summary(&st)),
            Err(e) => errname(e),
        }
    }

    fn lstat(&self, rel: &str) -> String {
        match common::stat_raw(&self.p(rel), false) {
            Ok(st) => format!("ok {}", summary(&st)),
            Err(e) => errname(e),
        }
    }

    /// atime and mtime (of the link itself), for steps that set them to known values.
    fn times(&self, rel: &str) -> String {
        self.times_of(rel, false)
    }

    /// atime and mtime, following symlinks when `follow`.
    fn times_of(&self, rel: &str, follow: bool) -> String {
        match common::stat_raw(&self.p(rel), follow) {
            Ok(st) => format!(
                "ok a={}.{:09} m={}.{:09}",
                st.st_atime, st.st_atime_nsec, st.st_mtime, st.st_mtime_nsec
            ),
            Err(e) => errname(e),
        }
    }

    fn mkdir(&self, rel: &str, mode: u32) -> String {
        res0(sys::mkdir(&self.p(rel), mode))
    }

    fn rmdir(&self, rel: &str) -> String {
        res0(sys::rmdir(&self.p(rel)))
    }

    fn unlink(&self, rel: &str) -> String {
        res0(sys::unlink(&self.p(rel)))
    }

    fn rename(&self, a: &str, b: &str) -> String {
        res0(sys::rename(&self.p(a), &self.p(b)))
    }

    fn rename2(&self, a: &str, b: &str, flags: u32) -> String {
        res0(sys::renameat2(&self.p(a), &self.p(b), flags))
    }

    fn link(&self, a: &str, b: &str) -> String {
        res0(sys::link(&self.p(a), &self.p(b)))
    }

    fn symlink(&self, target: &str, rel: &str) -> String {
        res0(sys::symlink(target, &self.p(rel)))
    }

    fn readlink(&self, rel: &str) -> String {
        match sys::readlink(&self.p(rel)) {
            Ok(t) => format!("ok {t}"),
            Err(e) => errname(e),
        }
    }

    fn chmod(&self, rel: &str, mode: u32) -> String {
        res0(sys::chmod(&self.p(rel), mode))
    }

    fn chown(&self, rel: &str, uid: u32, gid: u32) -> String {
        res0(sys::chown(&self.p(rel), uid, gid))
    }

    fn truncate(&self, rel: &str, len: i64) -> String {
        res0(sys::truncate(&self.p(rel), len))
    }

    fn mknod(&self, rel: &str, mode: u32, dev: u64) -> String {
        res0(sys::mknod(&self.p(rel), mode, dev))
    }

    fn access(&self, rel: &str, how: i32) -> String {
        res0(sys::access(&self.p(rel), how))
    }

    fn utimens(&self, rel: &str, t: Option<[(i64, i64); 2]>, flags: i32) -> String {
        res0(sys::utimensat(&self.p(rel), t, flags))
    }

    fn setxattr(&self, rel: &str, name: &str, v: &[u8], flags: i32) -> String {
        res0(sys::setxattr(&self.p(rel), name, v, flags))
    }

    fn getxattr(&self, rel: &str, name: &str) -> String {
        match sys::getxattr(&self.p(rel), name) {
            Ok(v) => format!("ok {}", String::from_utf8_lossy(&v)),
            Err(e) => errname(e),
        }
    }

    fn listxattr(&self, rel: &str) -> String {
        match sys::listxattr(&self.p(rel)) {
            Ok(v) => format!(
                "ok {:?}",
                v.iter()
                    .filter(|n| n.starts_with("user."))
                    .collect::<Vec<_>>()
            ),
            Err(e) => errname(e),
        }
    }

    fn removexattr(&self, rel: &str, name: &str) -> String {
        res0(sys::removexattr(&self.p(rel), name))
    }

    /// Sorted `name:type` entries of a directory, read with getdents through readdir(3).
    fn readdir(&self, rel: &str) -> String {
        let c = cpath(&self.p(rel));
        // SAFETY: NUL-terminated path.
        let d = unsafe { libc::opendir(c.as_ptr()) };
        if d.is_null() {
            return errname(common::errno());
        }
        let mut v = Vec::new();
        // Bounded: these directories hold a handful of entries.
        for _ in 0..100_000 {
            // SAFETY: d is a valid DIR*; the entry is copied before the next call.
            let e = unsafe { libc::readdir64(d) };
            if e.is_null() {
                break;
            }
            // SAFETY: e points at a valid dirent64 with a NUL-terminated name.
            let (name, ty) = unsafe {
                let n = std::ffi::CStr::from_ptr((*e).d_name.as_ptr());
                (n.to_string_lossy().into_owned(), (*e).d_type)
            };
            v.push(format!("{name}:{ty}"));
        }
        // SAFETY: d is valid and closed once.
        unsafe { libc::closedir(d) };
        v.sort();
        format!("ok {}", v.join(","))
    }

    /// Runs one step as uid/gid 65534 on a thread of its own.
    fn nobody(&self, f: impl FnOnce(&Ctx) -> String + Send) -> String {
        as_nobody(|| f(self))
    }

    /// Sets this thread's umask (private to the sequence thread, see [`in_private_fs`]).
    fn umask(&self, mask: u32) -> String {
        // SAFETY: umask cannot fail.
        let old = unsafe { libc::umask(mask) };
        format!("ok {old:04o}")
    }
}

type StepFn = Box<dyn Fn(&Ctx) -> String + Send + Sync>;

struct Script(Vec<(String, StepFn)>);

impl Script {
    fn step(&mut self, what: &str, f: impl Fn(&Ctx) -> String + Send + Sync + 'static) {
        self.0.push((what.to_string(), Box::new(f)));
    }
}

/// The scripted sequence. Each step returns its comparable outcome.
fn scripted() -> Script {
    let mut s = Script(Vec::new());
    const RW: i32 = libc::O_RDWR;
    const WO: i32 = libc::O_WRONLY;
    const RO: i32 = libc::O_RDONLY;
    const CR: i32 = libc::O_CREAT;

    // Basic files and open flags.
    s.step("umask 022", |c| c.umask(0o022));
    s.step("mkdir d", |c| c.mkdir("d", 0o755));
    s.step("mkdir d again", |c| c.mkdir("d", 0o755));
    s.step("mkdir in missing parent", |c| c.mkdir("missing/x", 0o755));
    s.step("mkdir trailing slash", |c| c.mkdir("newdir/", 0o755));
    s.step("create f", |c| c.open("f1", "f", CR | WO, 0o644));
    s.step("write f", |c| c.write("f1", b"hello world"));
    s.step("fstat f", |c| c.fstat("f1"));
    s.step("close f", |c| c.close("f1"));
    s.step("O_EXCL existing", |c| {
        c.open("x", "f", CR | libc::O_EXCL | WO, 0o644)
    });
    s.step("open f/x", |c| c.open("x", "f/x", RO, 0));
    s.step("open dir O_WRONLY", |c| c.open("x", "d", WO, 0));
    s.step("open dir O_RDWR", |c| c.open("x", "d", RW, 0));
    s.step("open root O_WRONLY", |c| c.open("x", "", WO, 0));
    s.step("O_DIRECTORY on file", |c| {
        c.open("x", "f", RO | libc::O_DIRECTORY, 0)
    });
    s.step("O_DIRECTORY on dir", |c| {
        c.open("dd", "d", RO | libc::O_DIRECTORY, 0)
    });
    s.step("read dir fd", |c| c.read("dd", 10));
    s.step("write dir fd", |c| c.write("dd", b"x"));
    s.step("close dir fd", |c| c.close("dd"));
    s.step("open f O_RDONLY", |c| c.open("ro", "f", RO, 0));
    s.step("write O_RDONLY fd", |c| c.write("ro", b"x"));
    s.step("read 5", |c| c.read("ro", 5));
    s.step("lseek cur", |c| c.lseek("ro", 0, libc::SEEK_CUR));
    s.step("lseek beyond end", |c| c.lseek("ro", 100, libc::SEEK_SET));
    s.step("read at beyond end", |c| c.read("ro", 10));
    s.step("lseek negative", |c| c.lseek("ro", -1, libc::SEEK_SET));
    s.step("lseek end", |c| c.lseek("ro", 0, libc::SEEK_END));
    s.step("lseek end-3", |c| c.lseek("ro", -3, libc::SEEK_END));
    s.step("read tail", |c| c.read("ro", 10));
    s.step("SEEK_DATA 0", |c| c.lseek("ro", 0, libc::SEEK_DATA));
    s.step("SEEK_HOLE 0", |c| c.lseek("ro", 0, libc::SEEK_HOLE));
    s.step("SEEK_DATA past end", |c| {
        c.lseek("ro", 100, libc::SEEK_DATA)
    });
    s.step("ftruncate O_RDONLY fd", |c| c.ftruncate("ro", 1));
    s.step("close ro", |c| c.close("ro"));
    s.step("open f O_WRONLY", |c| c.open("wo", "f", WO, 0));
    s.step("read O_WRONLY fd", |c| c.read("wo", 5));
    s.step("close wo", |c| c.close("wo"));
    s.step("open f O_RDWR", |c| c.open("rw", "f", RW, 0));
    s.step("ftruncate shrink", |c| c.ftruncate("rw", 3));
    s.step("fstat after shrink", |c| c.fstat("rw"));
    s.step("ftruncate grow", |c| c.ftruncate("rw", 100));
    s.step("pread grown", |c| c.pread("rw", 200, 0));
    s.step("pwrite past end", |c| c.pwrite("rw", b"Z", 200));
    s.step("fstat after pwrite", |c| c.fstat("rw"));
    s.step("pread all", |c| c.pread("rw", 300, 0));
    s.step("ftruncate negative", |c| c.ftruncate("rw", -1));
    s.step("pwrite at 1 TiB", |c| c.pwrite("rw", b"far", 1 << 40));
    s.step("fstat after far pwrite", |c| c.fstat("rw"));
    s.step("ftruncate back", |c| c.ftruncate("rw", 201));
    s.step("pwrite negative offset", |c| c.pwrite("rw", b"x", -5));
    s.step("fsync", |c| c.fsync("rw"));
    s.step("close rw", |c| c.close("rw"));
    s.step("truncate negative", |c| c.truncate("f", -5));
    s.step("truncate 50", |c| c.truncate("f", 50));
    s.step("truncate dir", |c| c.truncate("d", 0));
    s.step("truncate missing", |c| c.truncate("missing", 0));
    s.step("open O_APPEND", |c| {
        c.open("ap", "f", WO | libc::O_APPEND, 0)
    });
    s.step("append write", |c| c.write("ap", b"tail"));
    s.step("lseek cur after append", |c| {
        c.lseek("ap", 0, libc::SEEK_CUR)
    });
    s.step("pwrite on O_APPEND", |c| c.pwrite("ap", b"more", 0));
    s.step("close ap", |c| c.close("ap"));
    s.step("stat f after append", |c| c.stat("f"));
    s.step("open O_TRUNC copy", |c| {
        c.open("t", "g", CR | WO, 0o644) + " " + &c.write("t", b"0123456789") + " " + &c.close("t")
    });
    s.step("O_RDWR|O_TRUNC", |c| {
        c.open("t", "g", RW | libc::O_TRUNC, 0)
    });
    s.step("fstat truncated", |c| c.fstat("t"));
    s.step("close t", |c| c.close("t"));
    s.step("O_CREAT|O_RDONLY|O_TRUNC new", |c| {
        c.open("t", "h", CR | RO | libc::O_TRUNC, 0o600)
    });
    s.step("close h", |c| c.close("t"));
    s.step("create mode 0", |c| c.open("z", "zero", CR | WO, 0));
    s.step("write mode-0 file", |c| c.write("z", b"root can"));
    s.step("close zero", |c| c.close("z"));
    s.step("root opens mode-0 file", |c| {
        c.open("z", "zero", RW, 0) + " " + &c.close("z")
    });
    s.step("255-byte name", |c| {
        c.open("n", &"n".repeat(255), CR | WO, 0o644) + " " + &c.close("n")
    });
    s.step("256-byte name", |c| {
        c.open("n", &"n".repeat(256), CR | WO, 0o644)
    });

    // Symlinks.
    s.step("symlink lnk -> f", |c| c.symlink("f", "lnk"));
    s.step("readlink lnk", |c| c.readlink("lnk"));
    s.step("readlink file", |c| c.readlink("f"));
    s.step("O_NOFOLLOW on symlink", |c| {
        c.open("x", "lnk", RO | libc::O_NOFOLLOW, 0)
    });
    s.step("O_NOFOLLOW|O_PATH on symlink", |c| {
        c.open("x", "lnk", libc::O_PATH | libc::O_NOFOLLOW, 0) + " " + &c.close("x")
    });
    s.step("stat via symlink", |c| c.stat("lnk"));
    s.step("lstat symlink", |c| c.lstat("lnk"));
    s.step("symlink loop1", |c| c.symlink("loop2", "loop1"));
    s.step("symlink loop2", |c| c.symlink("loop1", "loop2"));
    s.step("open loop", |c| c.open("x", "loop1", RO, 0));
    s.step("stat loop", |c| c.stat("loop1"));
    s.step("create through loop", |c| {
        c.open("x", "loop1", CR | WO, 0o644)
    });
    s.step("self loop", |c| c.symlink("self", "self"));
    s.step("stat self loop", |c| c.stat("self"));
    s.step("lstat self loop", |c| c.lstat("self"));
    s.step("symlink dl -> d", |c| c.symlink("d", "dl"));
    s.step("stat dl/", |c| c.stat("dl/"));
    s.step("lstat dl/ (follows)", |c| c.lstat("dl/"));
    s.step("open f/", |c| c.open("x", "f/", RO, 0));
    s.step("create through dl", |c| {
        c.open("t", "dl/viadl", CR | WO, 0o640) + " " + &c.close("t")
    });
    s.step("dangling symlink", |c| c.symlink("made-by-open", "dangle"));
    s.step("O_EXCL through dangling", |c| {
        c.open("x", "dangle", CR | libc::O_EXCL | WO, 0o644)
    });
    s.step("O_CREAT through dangling", |c| {
        c.open("t", "dangle", CR | WO, 0o640) + " " + &c.close("t")
    });
    s.step("stat made-by-open", |c| c.lstat("made-by-open"));
    s.step("symlink onto existing", |c| c.symlink("x", "f"));
    s.step("chmod via symlink", |c| c.chmod("lnk", 0o600));
    s.step("stat target after chmod", |c| c.lstat("f"));
    s.step("lstat link after chmod", |c| c.lstat("lnk"));
    s.step("link to symlink", |c| c.link("lnk", "lnk2"));
    s.step("lstat lnk2", |c| c.lstat("lnk2"));

    // Directories and renames.
    s.step("mkdir d/sub", |c| c.mkdir("d/sub", 0o755));
    s.step("mkdir via ..", |c| c.mkdir("d/sub/../sub2", 0o700));
    s.step("stat d nlink", |c| c.stat("d"));
    s.step("rename dir into own subdir", |c| c.rename("d", "d/sub/x"));
    s.step("rename dir onto own subdir", |c| c.rename("d", "d/sub"));
    s.step("mkdir e", |c| c.mkdir("e", 0o755));
    s.step("create e/file", |c| {
        c.open("t", "e/file", CR | WO, 0o644) + " " + &c.write("t", b"E") + " " + &c.close("t")
    });
    s.step("rename onto non-empty dir", |c| c.rename("d", "e"));
    s.step("rename dir onto file", |c| c.rename("d", "f"));
    s.step("rename file onto dir", |c| c.rename("f", "d"));
    s.step("mkdir empty", |c| c.mkdir("empty", 0o755));
    s.step("rename dir onto empty dir", |c| c.rename("d", "empty"));
    s.step("rename back", |c| c.rename("empty", "d"));
    s.step("rename onto .", |c| c.rename("f", "d/."));
    s.step("rename ..", |c| c.rename("d/sub/..", "q"));
    s.step("rename missing", |c| c.rename("nothing", "q"));
    s.step("rename into missing dir", |c| c.rename("g", "nothing/g"));
    s.step("rename to itself", |c| c.rename("g", "g"));
    s.step("link to dir", |c| c.link("d", "dlink"));
    s.step("unlink dir", |c| c.unlink("d"));
    s.step("rmdir file", |c| c.rmdir("f"));
    s.step("rmdir .", |c| c.rmdir("d/."));
    s.step("rmdir ..", |c| c.rmdir("d/sub/.."));
    s.step("rmdir non-empty", |c| c.rmdir("e"));
    s.step("rmdir missing", |c| c.rmdir("nothing"));
    s.step("hard link h1", |c| c.link("f", "h1"));
    s.step("hard link d/h2", |c| c.link("f", "d/h2"));
    s.step("stat f nlink 3", |c| c.stat("f"));
    s.step("rename between links", |c| c.rename("h1", "d/h2"));
    s.step("both links remain", |c| {
        c.stat("h1") + " " + " " + &c.stat("d/h2")
    });
    s.step("unlink h1", |c| c.unlink("h1"));
    s.step("stat f nlink 2", |c| c.stat("f"));
    s.step("link onto existing", |c| c.link("f", "g"));
    s.step("NOREPLACE onto existing", |c| {
        c.rename2("g", "e/file", libc::RENAME_NOREPLACE)
    });
    s.step("NOREPLACE free", |c| {
        c.rename2("g", "g2", libc::RENAME_NOREPLACE)
    });
    s.step("EXCHANGE files", |c| {
        c.rename2("g2", "e/file", libc::RENAME_EXCHANGE)
    });
    s.step("read after exchange", |c| {
        c.open("t", "g2", RO, 0) + " " + &c.read("t", 100) + " " + &c.close("t")
    });
    s.step("EXCHANGE file and dir", |c| {
        c.rename2("g2", "d", libc::RENAME_EXCHANGE)
    });
    s.step("stat after dir exchange", |c| {
        c.lstat("g2") + " " + " " + &c.lstat("d")
    });
    s.step("EXCHANGE back", |c| {
        c.rename2("g2", "d", libc::RENAME_EXCHANGE)
    });
    s.step("EXCHANGE with missing", |c| {
        c.rename2("g2", "nothing", libc::RENAME_EXCHANGE)
    });
    s.step("NOREPLACE|EXCHANGE", |c| {
        c.rename2("g2", "f", libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE)
    });
    s.step("readdir d", |c| c.readdir("d"));
    s.step("readdir root", |c| c.readdir(""));
    s.step("readdir file", |c| c.readdir("f"));

    // Modes, times, special files.
    s.step("chmod 7777", |c| c.chmod("f", 0o7777));
    s.step("stat 7777", |c| c.stat("f"));
    s.step("chmod 0644", |c| c.chmod("f", 0o644));
    s.step("chmod dir sticky", |c| c.chmod("e", 0o1755));
    s.step("chmod missing", |c| c.chmod("nothing", 0o644));
    s.step("utimens fixed", |c| {
        c.utimens("f", Some([(100, 5), (200, 6)]), 0)
    });
    s.step("times fixed", |c| c.times("f"));
    s.step("utimens OMIT atime", |c| {
        c.utimens("f", Some([(0, libc::UTIME_OMIT), (300, 7)]), 0)
    });
    s.step("times after OMIT", |c| c.times("f"));
    s.step("utimens OMIT both", |c| {
        c.utimens("f", Some([(0, libc::UTIME_OMIT), (0, libc::UTIME_OMIT)]), 0)
    });
    s.step("times unchanged", |c| c.times("f"));
    s.step("utimens symlink nofollow", |c| {
        c.utimens("lnk", Some([(10, 1), (20, 2)]), libc::AT_SYMLINK_NOFOLLOW)
    });
    s.step("symlink times", |c| c.times("lnk"));
    s.step("target times untouched", |c| c.times("f"));
    s.step("utimens dir", |c| {
        c.utimens("d", Some([(50, 0), (60, 0)]), 0)
    });
    s.step("dir times", |c| c.times("d"));
    s.step("utimens bad nsec", |c| {
        c.utimens("f", Some([(1, 2_000_000_000), (1, 0)]), 0)
    });
    s.step("mkfifo", |c| c.mknod("fifo", libc::S_IFIFO | 0o640, 0));
    s.step("open fifo nonblock read", |c| {
        c.open("fr", "fifo", RO | libc::O_NONBLOCK, 0)
    });
    s.step("open fifo nonblock write", |c| {
        c.open("fw", "fifo", WO | libc::O_NONBLOCK, 0)
    });
    s.step("fifo write", |c| c.write("fw", b"through the pipe"));
    s.step("fifo read", |c| c.read("fr", 100));
    s.step("close fifo", |c| c.close("fr") + " " + &c.close("fw"));
    s.step("mknod socket", |c| {
        c.mknod("sock", libc::S_IFSOCK | 0o755, 0)
    });
    s.step("mknod chr 1 3", |c| {
        c.mknod("cdev", libc::S_IFCHR | 0o600, libc::makedev(1, 3))
    });
    s.step("stat cdev", |c| c.lstat("cdev"));
    s.step("mknod existing", |c| c.mknod("f", libc::S_IFIFO | 0o600, 0));
    s.step("mknod regular", |c| {
        c.mknod("mkreg", libc::S_IFREG | 0o640, 0)
    });

    // umask.
    s.step("umask 027", |c| c.umask(0o027));
    s.step("create under 027", |c| {
        c.open("t", "um1", CR | WO, 0o666) + " " + &c.close("t")
    });
    s.step("mkdir under 027", |c| c.mkdir("um2", 0o777));
    s.step("mkfifo under 027", |c| {
        c.mknod("um3", libc::S_IFIFO | 0o666, 0)
    });
    s.step("umask 0", |c| c.umask(0));
    s.step("create under 0", |c| {
        c.open("t", "um4", CR | WO, 0o666) + " " + &c.close("t")
    });
    s.step("mkdir under 0", |c| c.mkdir("um5", 0o777));
    s.step("mkdir sticky under 0", |c| c.mkdir("um6", 0o1777));
    s.step("stat umask results", |c| {
        ["um1", "um2", "um3", "um4", "um5", "um6"]
            .iter()
            .map(|n| c.lstat(n))
            .collect::<Vec<_>>()
            .join(" | ")
    });
    s.step("umask back to 022", |c| c.umask(0o022));

    // setgid directories.
    s.step("mkdir sg", |c| c.mkdir("sg", 0o775));
    s.step("chown sg :4242", |c| c.chown("sg", 0, 4242));
    s.step("chmod sg 2777", |c| c.chmod("sg", 0o2777));
    s.step("root creates in sg", |c| {
        c.open("t", "sg/rootfile", CR | WO, 0o664) + " " + &c.close("t")
    });
    s.step("root mkdir in sg", |c| c.mkdir("sg/rootsub", 0o755));
    s.step("root mkfifo in sg", |c| {
        c.mknod("sg/fifo", libc::S_IFIFO | 0o644, 0)
    });
    s.step("root symlink in sg", |c| c.symlink("rootfile", "sg/ln"));
    s.step("stat sg results", |c| {
        ["sg/rootfile", "sg/rootsub", "sg/fifo", "sg/ln"]
            .iter()
            .map(|n| c.lstat(n))
            .collect::<Vec<_>>()
            .join(" | ")
    });
    s.step("nobody creates in sg", |c| {
        c.nobody(|c| c.open("t", "sg/nobfile", CR | WO, 0o664) + " " + &c.close("t"))
    });
    s.step("nobody mkdir in sg", |c| {
        c.nobody(|c| c.mkdir("sg/nobdir", 0o775))
    });
    s.step("nobody creates in sg/nobdir", |c| {
        c.nobody(|c| c.open("t", "sg/nobdir/deep", CR | WO, 0o644) + " " + &c.close("t"))
    });
    s.step("stat nobody sg results", |c| {
        ["sg/nobfile", "sg/nobdir", "sg/nobdir/deep"]
            .iter()
            .map(|n| c.lstat(n))
            .collect::<Vec<_>>()
            .join(" | ")
    });
    s.step("nobody chmod g+s as non-member", |c| {
        c.nobody(|c| c.chmod("sg/nobfile", 0o2755))
    });
    s.step("setgid dropped by kernel", |c| c.lstat("sg/nobfile"));
    s.step("nobody chown own file to other uid", |c| {
        c.nobody(|c| c.chown("sg/nobfile", 0, u32::MAX))
    });
    s.step("nobody chown own file to own gid", |c| {
        c.nobody(|c| c.chown("sg/nobfile", u32::MAX, 65534))
    });
    s.step("nobody chown own file to foreign gid", |c| {
        c.nobody(|c| c.chown("sg/nobfile", u32::MAX, 4242))
    });

    // Sticky directory.
    s.step("mkdir tmp", |c| c.mkdir("tmp", 0o755));
    s.step("chmod tmp 1777", |c| c.chmod("tmp", 0o1777));
    s.step("root file in tmp", |c| {
        c.open("t", "tmp/rootf", CR | WO, 0o644)
            + " "
            + &c.close("t")
            + " "
            + &c.chmod("tmp/rootf", 0o666)
    });
    s.step("nobody unlinks root's file", |c| {
        c.nobody(|c| c.unlink("tmp/rootf"))
    });
    s.step("nobody renames root's file", |c| {
        c.nobody(|c| c.rename("tmp/rootf", "tmp/stolen"))
    });
    s.step("nobody renames over root's file", |c| {
        c.nobody(|c| {
            c.open("t", "tmp/mine", CR | WO, 0o644)
                + " "
                + &c.close("t")
                + " "
                + &c.rename("tmp/mine", "tmp/rootf")
        })
    });
    s.step("nobody writes root's 0666 file", |c| {
        c.nobody(|c| {
            c.open("t", "tmp/rootf", WO, 0) + " " + &c.write("t", b"nob") + " " + &c.close("t")
        })
    });
    s.step("nobody creates and removes own", |c| {
        c.nobody(|c| {
            c.open("t", "tmp/nobf", CR | WO, 0o644)
                + " "
                + &c.close("t")
                + " "
                + &c.unlink("tmp/nobf")
        })
    });
    s.step("nobody leaves a file", |c| {
        c.nobody(|c| c.open("t", "tmp/nobf2", CR | WO, 0o600) + " " + &c.close("t"))
    });
    s.step("root removes nobody's file", |c| c.unlink("tmp/nobf2"));
    s.step("nobody mkdir in tmp", |c| {
        c.nobody(|c| c.mkdir("tmp/nobd", 0o700))
    });
    s.step("root rmdir nobody's dir", |c| c.rmdir("tmp/nobd"));

    // setuid cleared on write by others.
    s.step("suid file", |c| {
        c.open("t", "suid", CR | WO, 0o644) + " " + &c.close("t") + " " + &c.chmod("suid", 0o6777)
    });
    s.step("nobody writes suid file", |c| {
        c.nobody(|c| c.open("t", "suid", WO, 0) + " " + &c.write("t", b"x") + " " + &c.close("t"))
    });
    s.step("suid bits cleared", |c| c.lstat("suid"));
    s.step("suid file 2", |c| {
        c.open("t", "suid2", CR | WO, 0o644) + " " + &c.close("t") + " " + &c.chmod("suid2", 0o4777)
    });
    s.step("nobody truncates suid file", |c| {
        c.nobody(|c| c.truncate("suid2", 0))
    });
    s.step("suid cleared by truncate", |c| c.lstat("suid2"));

    // Permissions for the unprivileged caller.
    s.step("mkdir priv 0700", |c| c.mkdir("priv", 0o700));
    s.step("file in priv", |c| {
        c.open("t", "priv/x", CR | WO, 0o644) + " " + &c.close("t")
    });
    s.step("nobody stat in priv", |c| c.nobody(|c| c.stat("priv/x")));
    s.step("nobody readdir priv", |c| c.nobody(|c| c.readdir("priv")));
    s.step("nobody access priv", |c| {
        c.nobody(|c| c.access("priv", libc::X_OK))
    });
    s.step("nobody writes root 0644", |c| {
        c.nobody(|c| c.open("t", "f", WO, 0))
    });
    s.step("nobody truncates root 0644", |c| {
        c.nobody(|c| c.truncate("f", 0))
    });
    s.step("nobody chmods root's file", |c| {
        c.nobody(|c| c.chmod("f", 0o777))
    });
    s.step("nobody access W_OK", |c| {
        c.nobody(|c| c.access("f", libc::W_OK))
    });
    s.step("nobody access R_OK", |c| {
        c.nobody(|c| c.access("f", libc::R_OK))
    });
    s.step("nobody reads mode-0 file", |c| {
        c.nobody(|c| c.open("t", "zero", RO, 0))
    });
    s.step("nobody UTIME_NOW on 0666 file", |c| {
        c.nobody(|c| c.utimens("tmp/rootf", None, 0))
    });
    s.step("nobody explicit times on 0666 file", |c| {
        c.nobody(|c| c.utimens("tmp/rootf", Some([(1, 0), (1, 0)]), 0))
    });
    s.step("nobody creates in root dir", |c| {
        c.nobody(|c| c.open("t", "nob", CR | WO, 0o644))
    });
    s.step("nobody mkdir in root dir", |c| {
        c.nobody(|c| c.mkdir("nobdir", 0o755))
    });
    s.step("nobody unlinks in root dir", |c| {
        c.nobody(|c| c.unlink("g2"))
    });
    s.step("nobody xattr on root 0644", |c| {
        c.nobody(|c| c.setxattr("f", "user.n", b"1", 0))
    });
    s.step("nobody xattr on root 0666", |c| {
        c.nobody(|c| c.setxattr("tmp/rootf", "user.n", b"1", 0))
    });

    // Extended attributes.
    s.step("setxattr", |c| c.setxattr("f", "user.a", b"1", 0));
    s.step("setxattr CREATE existing", |c| {
        c.setxattr("f", "user.a", b"2", libc::XATTR_CREATE)
    });
    s.step("setxattr REPLACE missing", |c| {
        c.setxattr("f", "user.b", b"2", libc::XATTR_REPLACE)
    });
    s.step("setxattr b", |c| c.setxattr("f", "user.b", b"bee", 0));
    s.step("getxattr", |c| c.getxattr("f", "user.a"));
    s.step("listxattr", |c| c.listxattr("f"));
    s.step("removexattr", |c| c.removexattr("f", "user.a"));
    s.step("getxattr removed", |c| c.getxattr("f", "user.a"));
    s.step("removexattr missing", |c| c.removexattr("f", "user.a"));
    s.step("xattr on dir", |c| c.setxattr("d", "user.dir", b"D", 0));
    s.step("xattr via symlink", |c| c.getxattr("lnk", "user.b"));
    s.step("xattr on missing", |c| c.getxattr("nothing", "user.b"));
    s.step("unknown namespace", |c| c.setxattr("f", "bogus.x", b"1", 0));

    // fchmod through an fd and a last look around.
    s.step("fchmod", |c| {
        c.open("t", "g2", RO, 0) + " " + &c.fchmod("t", 0o640) + " " + &c.close("t")
    });
    s.step("readdir sg", |c| c.readdir("sg"));
    s.step("readdir tmp", |c| c.readdir("tmp"));
    s.step("access X_OK root on 0644", |c| c.access("f", libc::X_OK));
    s.step("access missing", |c| c.access("nothing", libc::F_OK));
    s
}

/// One normalised line per entry under `root`: the final-state comparison.
fn listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        out.push(format!("<unreadable dir {}>", dir.display()));
        return;
    };
    for e in rd {
        let Ok(e) = e else { continue };
        let p = e.path();
        let rel = p
            .strip_prefix(root)
            .unwrap_or(&p)
            .to_string_lossy()
            .into_owned();
        let st = match common::stat_raw(&p, false) {
            Ok(st) => st,
            Err(err) => {
                out.push(format!("{rel} lstat {}", errname(err)));
                continue;
            }
        };
        let mut line = format!("{rel} {}", summary(&st));
        match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => match std::fs::read(&p) {
                Ok(data) => line.push_str(&format!(" h={:016x}", fnv(&data))),
                Err(err) => line.push_str(&format!(" read error {err}")),
            },
            libc::S_IFLNK => line.push_str(&format!(" -> {:?}", sys::readlink(&p))),
            _ => {}
        }
        if matches!(st.st_mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFDIR) {
            if let Ok(names) = sys::listxattr(&p) {
                for n in names.iter().filter(|n| n.starts_with("user.")) {
                    let v = sys::getxattr(&p, n).unwrap_or_default();
                    line.push_str(&format!(" {n}={:016x}", fnv(&v)));
                }
            }
        }
        out.push(line);
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            walk(root, &p, out);
        }
    }
}

/// Runs `f` on a thread with its own umask/cwd (unshare(CLONE_FS)), so umask steps cannot leak
/// into tests running in parallel; threads it spawns (the unprivileged steps) share it.
fn in_private_fs<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            // SAFETY: unshare(CLONE_FS) only detaches this thread's fs context.
            assert_eq!(
                unsafe { libc::unshare(libc::CLONE_FS) },
                0,
                "unshare(CLONE_FS)"
            );
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// Runs every step in `ctx`, from umask 022, and returns the outcomes.
fn run_steps(ctx: &Ctx, steps: &[(String, StepFn)]) -> Vec<String> {
    // SAFETY: umask cannot fail; this thread's fs context is private (in_private_fs).
    unsafe { libc::umask(0o022) };
    let out = steps.iter().map(|(_, f)| f(ctx)).collect();
    ctx.close_all();
    // SAFETY: as above.
    unsafe { libc::umask(0o022) };
    out
}

/// Compares per-step outcomes and final listings; returns a readable report of differences.
fn compare(
    names: &[String],
    native: &[String],
    mounted: &[String],
    trees: &[(&str, Vec<String>)],
) -> Vec<String> {
    let mut diffs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if native[i] != mounted[i] {
            diffs.push(format!(
                "step {i} `{name}`: native `{}` vs mount `{}`",
                native[i], mounted[i]
            ));
        }
    }
    let reference: BTreeSet<&String> = trees[0].1.iter().collect();
    for (label, tree) in &trees[1..] {
        let other: BTreeSet<&String> = tree.iter().collect();
        for l in reference.difference(&other) {
            diffs.push(format!(
                "tree: only native: {l}   (missing/different in {label})"
            ));
        }
        for l in other.difference(&reference) {
            diffs.push(format!("tree: only in {label}: {l}"));
        }
    }
    diffs
}

#[test]
fn scripted_sequence() {
    let Some(m) = setup(&["allow_other"]) else {
        return;
    };
    let native_tmp = open_tempdir();
    let native = native_tmp.path().join("native");
    common::mkdir_mode(&native, 0o755);
    let script = scripted();
    let names: Vec<String> = script.0.iter().map(|(n, _)| n.clone()).collect();
    let (a, b) = in_private_fs(|| {
        let a = run_steps(&Ctx::new(&native), &script.0);
        let b = run_steps(&Ctx::new(m.mnt()), &script.0);
        (a, b)
    });
    if std::env::var_os("FILESYNC_CONFORMANCE_TRACE").is_some() {
        for (i, name) in names.iter().enumerate() {
            eprintln!("{i:3} {name:45} native: {:30} mount: {}", a[i], b[i]);
        }
    }
    let trees = [
        ("native", listing(&native)),
        ("mount", listing(m.mnt())),
        ("backing dir", listing(m.src())),
    ];
    let diffs = compare(&names, &a, &b, &trees);
    assert!(
        diffs.is_empty(),
        "{} differences between the native run and the mount ({} steps):\n{}",
        diffs.len(),
        names.len(),
        diffs.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// randomised sequence

const NAMES: &[&str] = &[
    "a", "b", "c", "d1", "d2", "d1/a", "d1/b", "d1/d3", "d2/a", "d2/b", "d1/d3/a", "d1/d3/b",
];
const MODES: &[u32] = &[0o644, 0o600, 0o755, 0o777, 0o444, 0o2755, 0o1777];

/// Write payload; printed as length and hash so failure reports stay readable.
#[derive(Clone)]
struct Data(Vec<u8>);

impl std::fmt::Debug for Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes {:016x}>", self.0.len(), fnv(&self.0))
    }
}

#[derive(Debug, Clone)]
enum Op {
    Create {
        p: usize,
        flags: i32,
        mode: u32,
        data: Data,
    },
    Pwrite {
        p: usize,
        off: i64,
        data: Data,
    },
    Read {
        p: usize,
    },
    Mkdir {
        p: usize,
        mode: u32,
    },
    Rmdir {
        p: usize,
    },
    Unlink {
        p: usize,
    },
    Rename {
        a: usize,
        b: usize,
        flags: u32,
    },
    Link {
        a: usize,
        b: usize,
    },
    Symlink {
        target: String,
        p: usize,
    },
    Truncate {
        p: usize,
        len: i64,
    },
    Chmod {
        p: usize,
        mode: u32,
    },
    Utimens {
        p: usize,
        t: i64,
    },
    Stat {
        p: usize,
        follow: bool,
    },
    Readdir {
        p: usize,
    },
    Readlink {
        p: usize,
    },
    Mkfifo {
        p: usize,
    },
    SetXattr {
        p: usize,
        v: u8,
    },
    RemoveXattr {
        p: usize,
    },
    GetXattr {
        p: usize,
    },
    Access {
        p: usize,
        how: i32,
    },
}

/// Indexes into NAMES of names meant for files and for directories. Ops mostly pick a name of
/// the fitting kind, so the sequence gets far enough to do interesting things, and sometimes
/// any name, so the kind-mismatch errors (ENOTDIR, EISDIR, ...) are exercised as well.
const FILES: &[usize] = &[0, 1, 2, 5, 6, 8, 9, 10, 11];
const DIRS: &[usize] = &[3, 4, 7];

fn pick(r: &mut Rng, kind: &[usize]) -> usize {
    if r.below(100) < 85 {
        kind[r.below(kind.len())]
    } else {
        r.below(NAMES.len())
    }
}

fn gen_op(r: &mut Rng) -> Op {
    let f = pick(r, FILES);
    let d = pick(r, DIRS);
    match r.below(40) {
        0..=6 => {
            let mut flags = libc::O_WRONLY | libc::O_CREAT;
            if r.below(3) == 0 {
                flags |= libc::O_TRUNC;
            }
            if r.below(4) == 0 {
                flags |= libc::O_APPEND;
            }
            if r.below(6) == 0 {
                flags |= libc::O_EXCL;
            }
            // Mostly small writes, sometimes one larger than a FUSE write request.
            let len = if r.below(20) == 0 {
                150_000
            } else {
                r.below(200)
            };
            let mode = MODES[r.below(MODES.len())];
            Op::Create {
                p: f,
                flags,
                mode,
                data: Data(r.bytes(len)),
            }
        }
        7..=8 => {
            let len = r.below(300) + 1;
            let off = r.below(10_000) as i64;
            Op::Pwrite {
                p: f,
                off,
                data: Data(r.bytes(len)),
            }
        }
        9..=10 => Op::Read { p: f },
        11..=13 => Op::Mkdir {
            p: d,
            mode: MODES[r.below(MODES.len())] | 0o700,
        },
        14 => Op::Rmdir { p: d },
        15..=17 => Op::Unlink { p: f },
        18..=21 => {
            let flags = match r.below(6) {
                0 => libc::RENAME_NOREPLACE,
                1 => libc::RENAME_EXCHANGE,
                _ => 0,
            };
            let (a, b) = if r.below(3) == 0 {
                (d, pick(r, DIRS))
            } else {
                (f, pick(r, FILES))
            };
            Op::Rename { a, b, flags }
        }
        22..=23 => Op::Link {
            a: f,
            b: pick(r, FILES),
        },
        24 => {
            let target = match r.below(3) {
                0 => NAMES[r.below(NAMES.len())].to_string(),
                1 => format!("../{}", NAMES[r.below(NAMES.len())]),
                _ => "dangling".to_string(),
            };
            Op::Symlink { target, p: f }
        }
        25..=26 => Op::Truncate {
            p: f,
            len: r.below(20_000) as i64 - 100,
        },
        27..=28 => {
            let p = if r.below(4) == 0 { d } else { f };
            Op::Chmod {
                p,
                mode: MODES[r.below(MODES.len())],
            }
        }
        29 => Op::Utimens {
            p: f,
            t: 1_000_000 + r.below(1000) as i64,
        },
        30..=32 => Op::Stat {
            p: if r.below(4) == 0 { d } else { f },
            follow: r.below(2) == 0,
        },
        // usize::MAX stands for the root directory.
        33 => Op::Readdir {
            p: if r.below(4) == 0 { usize::MAX } else { d },
        },
        34 => Op::Readlink { p: f },
        35 => Op::Mkfifo { p: f },
        36 => Op::SetXattr {
            p: f,
            v: r.below(256) as u8,
        },
        37 => Op::RemoveXattr { p: f },
        38 => Op::GetXattr { p: f },
        _ => Op::Access {
            p: f,
            how: [libc::R_OK, libc::W_OK, libc::X_OK][r.below(3)],
        },
    }
}

fn exec_op(c: &Ctx, op: &Op) -> String {
    let name = |i: &usize| NAMES[*i];
    // Names can turn into fifos: O_NONBLOCK keeps open() from waiting for a peer forever (it
    // changes nothing for regular files).
    const NB: i32 = libc::O_NONBLOCK;
    match op {
        Op::Create {
            p,
            flags,
            mode,
            data,
        } => {
            let o = c.open("r", name(p), *flags | NB, *mode);
            if o != "ok" {
                return o;
            }
            o + " " + &c.write("r", &data.0) + " " + &c.fstat("r") + &c.close("r")
        }
        Op::Pwrite { p, off, data } => {
            let o = c.open("r", name(p), libc::O_WRONLY | NB, 0);
            if o != "ok" {
                return o;
            }
            o + " " + &c.pwrite("r", &data.0, *off) + &c.close("r")
        }
        Op::Read { p } => {
            let o = c.open("r", name(p), libc::O_RDONLY | NB, 0);
            if o != "ok" {
                return o;
            }
            o + " " + &c.read("r", 1 << 20) + &c.close("r")
        }
        Op::Mkdir { p, mode } => c.mkdir(name(p), *mode),
        Op::Rmdir { p } => c.rmdir(name(p)),
        Op::Unlink { p } => c.unlink(name(p)),
        Op::Rename { a, b, flags } => {
            if *flags == 0 {
                c.rename(name(a), name(b))
            } else {
                c.rename2(name(a), name(b), *flags)
            }
        }
        Op::Link { a, b } => c.link(name(a), name(b)),
        Op::Symlink { target, p } => c.symlink(target, name(p)),
        Op::Truncate { p, len } => c.truncate(name(p), *len),
        Op::Chmod { p, mode } => c.chmod(name(p), *mode),
        Op::Utimens { p, t } => {
            // Only a successful call leaves known times to compare; otherwise they are the
            // creation times of the two runs, which legitimately differ.
            let r = c.utimens(name(p), Some([(*t, 1), (*t + 1, 2)]), 0);
            if r == "ok" {
                // utimensat followed a symlink, so look at what it changed.
                r + " " + &c.times_of(name(p), true)
            } else {
                r
            }
        }
        Op::Stat { p, follow } => {
            if *follow {
                c.stat(name(p))
            } else {
                c.lstat(name(p))
            }
        }
        Op::Readdir { p } => c.readdir(if *p == usize::MAX { "" } else { name(p) }),
        Op::Readlink { p } => c.readlink(name(p)),
        Op::Mkfifo { p } => c.mknod(name(p), libc::S_IFIFO | 0o644, 0),
        Op::SetXattr { p, v } => c.setxattr(name(p), "user.r", &[*v], 0),
        Op::RemoveXattr { p } => c.removexattr(name(p), "user.r"),
        Op::GetXattr { p } => c.getxattr(name(p), "user.r"),
        Op::Access { p, how } => c.access(name(p), *how),
    }
}

#[test]
fn random_sequence() {
    let Some(m) = setup(&["allow_other"]) else {
        return;
    };
    let seed = std::env::var("FILESYNC_CONFORMANCE_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("random_sequence seed: {seed} (replay with FILESYNC_CONFORMANCE_SEED={seed})");
    let mut rng = Rng::new(seed);
    const N: usize = 2000;
    // (op, run as nobody?) — about one op in eight comes from the unprivileged user, so the
    // mixed ownership that results exercises the kernel's permission checks through the mount.
    let ops: Vec<(Op, bool)> = (0..N)
        .map(|_| (gen_op(&mut rng), rng.below(8) == 0))
        .collect();
    let native_tmp = open_tempdir();
    let native = native_tmp.path().join("native");
    common::mkdir_mode(&native, 0o755);
    let run = |root: &Path| -> Vec<String> {
        let c = Ctx::new(root);
        // Both roots world-writable so the unprivileged user can act at the top level too.
        c.chmod("", 0o777);
        // Two directories exist from the start so deeper names are reachable early.
        c.mkdir("d1", 0o777);
        c.mkdir("d2", 0o1777);
        c.chmod("d1", 0o777);
        c.chmod("d2", 0o1777);
        let out = ops
            .iter()
            .map(|(op, nob)| {
                if *nob {
                    c.nobody(|c| exec_op(c, op))
                } else {
                    exec_op(&c, op)
                }
            })
            .collect();
        c.close_all();
        out
    };
    let (a, b) = in_private_fs(|| {
        // SAFETY: umask cannot fail; this thread's fs context is private.
        unsafe { libc::umask(0o022) };
        (run(&native), run(m.mnt()))
    });
    let names: Vec<String> = ops
        .iter()
        .map(|(op, nob)| format!("{}{op:?}", if *nob { "nobody: " } else { "" }))
        .collect();
    let trees = [
        ("native", listing(&native)),
        ("mount", listing(m.mnt())),
        ("backing dir", listing(m.src())),
    ];
    // A short profile of what the sequence did, so a run that only produced ENOENT would show.
    let mut profile: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for out in &a {
        *profile
            .entry(out.split(' ').next().unwrap_or(""))
            .or_default() += 1;
    }
    eprintln!(
        "random_sequence outcomes (native): {profile:?}; final tree: {} entries",
        trees[0].1.len()
    );
    let diffs = compare(&names, &a, &b, &trees);
    assert!(
        diffs.is_empty(),
        "seed {seed}: {} differences between the native run and the mount, first 40:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
