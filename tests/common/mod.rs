//! Shared harness for the integration tests.
//!
//! [`Mount`] runs a real `filesync mount --foreground` on fresh temp dirs and always tears it
//! down on drop, so a failing test never leaves a mount behind. The `sys` helpers wrap raw
//! syscalls so tests can compare exact errno values rather than `std::io` error kinds.
// Each test crate (tests/*.rs) compiles this module separately and uses a different subset of
// it; without this every crate would warn about the helpers it does not call.
#![allow(dead_code)]

pub mod cluster;

use std::ffi::CString;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The binary under test, built by cargo for integration tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_filesync");
/// uid/gid of nobody/nogroup: the unprivileged caller for permission tests.
pub const NOBODY: u32 = 65534;
/// How long a mount may take to show up in /proc/self/mounts.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval for every bounded wait in the harness.
pub const POLL: Duration = Duration::from_millis(10);
/// Upper bound for one test's life on a mount. A filesystem deadlock would otherwise hang the
/// test thread inside a syscall forever; killing the daemon makes the kernel fail the pending
/// FUSE requests with ENOTCONN, so the test fails instead of hanging the suite.
pub const WATCHDOG: Duration = Duration::from_secs(150);

/// The one facility check every test goes through. FUSE tests need /dev/fuse and root (to
/// mount, to chown, and to switch to uid 65534). Outside CI a machine without them skips with a
/// message; under CI (env `CI` set) the same condition is a failure, so CI can never pass by
/// silently skipping everything.
pub fn fuse_available() -> bool {
    let mut missing = Vec::new();
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse is missing");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("not running as root");
    }
    if missing.is_empty() {
        return true;
    }
    let why = missing.join(", ");
    if std::env::var_os("CI").is_some() {
        panic!("FUSE integration tests cannot run: {why} (CI is set, so this is a failure)");
    }
    eprintln!("SKIP: FUSE integration tests need /dev/fuse and root: {why}");
    false
}

/// Facility check plus mount: `let Some(m) = common::setup(&[]) else { return };`.
pub fn setup(opts: &[&str]) -> Option<Mount> {
    if !fuse_available() {
        return None;
    }
    Some(Mount::new(opts))
}

/// Facility check plus mount of a `src` that `fill` populated before mounting.
pub fn setup_with(opts: &[&str], fill: impl FnOnce(&Path)) -> Option<Mount> {
    if !fuse_available() {
        return None;
    }
    Some(Mount::with_src(opts, fill))
}

/// A temp dir under /tmp made traversable by everyone: tempfile creates 0700 dirs, which would
/// stop uid 65534 before it ever reached the mount.
pub fn open_tempdir() -> tempfile::TempDir {
    let tmp = tempfile::Builder::new()
        .prefix("filesync-test-")
        .tempdir_in("/tmp")
        .expect("create temp dir in /tmp");
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    tmp
}

/// Creates `path` as a directory with exactly `mode` (umask does not apply).
pub fn mkdir_mode(path: &Path, mode: u32) {
    fs::create_dir(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// One running `filesync mount --foreground` on its own `src` and `mnt`.
pub struct Mount {
    child: Option<Child>,
    src: PathBuf,
    mnt: PathBuf,
    stderr_path: PathBuf,
    watchdog: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
    // Last, so the directories outlive everything above (the Drop body unmounts first anyway).
    tmp: tempfile::TempDir,
}

impl Mount {
    /// Mounts a fresh empty `src` at a fresh `mnt` with `-o opts` (comma-joined) and waits,
    /// bounded, until the kernel lists the mount. Panics with the daemon's stderr otherwise.
    pub fn new(opts: &[&str]) -> Mount {
        let tmp = open_tempdir();
        let src = tmp.path().join("src");
        let mnt = tmp.path().join("mnt");
        mkdir_mode(&src, 0o755);
        mkdir_mode(&mnt, 0o755);
        Self::spawn(tmp, src, mnt, opts)
    }

    /// Like [`Mount::new`] but lets the caller fill `src` before mounting.
    pub fn with_src(opts: &[&str], fill: impl FnOnce(&Path)) -> Mount {
        let tmp = open_tempdir();
        let src = tmp.path().join("src");
        let mnt = tmp.path().join("mnt");
        mkdir_mode(&src, 0o755);
        mkdir_mode(&mnt, 0o755);
        fill(&src);
        Self::spawn(tmp, src, mnt, opts)
    }

    fn spawn(tmp: tempfile::TempDir, src: PathBuf, mnt: PathBuf, opts: &[&str]) -> Mount {
        let stderr_path = tmp.path().join("daemon.stderr");
        let stdout_path = tmp.path().join("daemon.stdout");
        let mut cmd = Command::new(BIN);
        cmd.arg("mount").arg(&src).arg(&mnt).arg("--foreground");
        // Keep each test's index in its own temp dir (not the host's /var/lib/filesync),
        // and leave the telemetry port to the tests that check it.
        let state = tmp.path().join("state");
        cmd.arg("-o")
            .arg(format!("state_dir={},telemetry=off", state.display()));
        if !opts.is_empty() {
            cmd.arg("-o").arg(opts.join(","));
        }
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout_path).expect("create daemon stdout file"))
            .stderr(File::create(&stderr_path).expect("create daemon stderr file"));
        let child = cmd.spawn().expect("spawn filesync mount");
        // Built before waiting so that a panic below still runs Drop (kill + unmount).
        let mut m = Mount {
            child: Some(child),
            src,
            mnt,
            stderr_path,
            watchdog: None,
            tmp,
        };
        m.wait_mounted(opts);
        m.start_watchdog();
        m
    }

    fn wait_mounted(&mut self, opts: &[&str]) {
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            if mount_type(&self.mnt).as_deref() == Some("fuse.filesync") {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "filesync mount -o {:?} exited with {status} before mounting; stderr:\n{}",
                        opts,
                        self.stderr()
                    );
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "filesync mount -o {:?} did not show up in /proc/self/mounts within {:?}; \
                     stderr:\n{}",
                    opts,
                    MOUNT_TIMEOUT,
                    self.stderr()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn start_watchdog(&mut self) {
        let Some(pid) = self.child.as_ref().map(|c| c.id()) else {
            return;
        };
        let (tx, rx) = mpsc::channel::<()>();
        let mnt = self.mnt.clone();
        let handle = std::thread::spawn(move || {
            // Drop disconnects the channel, which ends this wait at once.
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(WATCHDOG) {
                eprintln!(
                    "watchdog: test on {} ran longer than {WATCHDOG:?}; killing filesync (pid \
                     {pid}) so blocked FUSE calls fail with ENOTCONN",
                    mnt.display()
                );
                // SAFETY: plain kill(2); Drop joins this thread before reaping the child, so the
                // pid cannot have been reused yet.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        });
        self.watchdog = Some((tx, handle));
    }

    pub fn src(&self) -> &Path {
        &self.src
    }

    pub fn mnt(&self) -> &Path {
        &self.mnt
    }

    /// The temp dir holding src and mnt, for scratch files outside the mount on the same fs.
    pub fn scratch(&self) -> &Path {
        self.tmp.path()
    }

    /// Path of `rel` inside the mount.
    pub fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Path of `rel` inside the backing folder.
    pub fn s(&self, rel: &str) -> PathBuf {
        self.src.join(rel)
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_else(|e| format!("<unreadable: {e}>"))
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Unmounts and returns the daemon's exit status (bounded), for lifecycle tests.
    pub fn unmount_and_wait(&mut self) -> Option<ExitStatus> {
        self.stop_watchdog();
        unmount(&self.mnt);
        let child = self.child.as_mut()?;
        let status = wait_child(child, Duration::from_secs(10));
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Sends `sig` to the daemon without waiting; returns whether it has exited within `wait`.
    pub fn signal_and_check(&mut self, sig: i32, wait: Duration) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        // SAFETY: plain kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        wait_child(child, wait).is_some()
    }

    /// Sends `sig` to the daemon and waits (bounded) for it to exit.
    pub fn signal_and_wait(&mut self, sig: i32) -> Option<ExitStatus> {
        self.stop_watchdog();
        let child = self.child.as_mut()?;
        // SAFETY: plain kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        let status = wait_child(child, Duration::from_secs(10));
        if status.is_some() {
            self.child = None;
        }
        status
    }

    fn stop_watchdog(&mut self) {
        if let Some((tx, handle)) = self.watchdog.take() {
            drop(tx);
            let _ = handle.join();
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // Stop the watchdog first so it can never signal a pid we are about to reap.
        self.stop_watchdog();
        unmount(&self.mnt);
        if let Some(mut child) = self.child.take() {
            if wait_child(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "---- filesync stderr ({}) ----\n{}\n---- end of filesync stderr ----",
                self.mnt.display(),
                self.stderr()
            );
        }
    }
}

/// Unmounts whatever is mounted at `mnt`: a normal umount first, a lazy one if that fails (a
/// test still holding an fd open, or a wedged daemon). Uses the syscall rather than umount(8)
/// so that nothing here stats the possibly hung mount root.
pub fn unmount(mnt: &Path) {
    let c = cpath(mnt);
    // Bounded: at most a few attempts, each a single syscall.
    for _ in 0..3 {
        if mount_type(mnt).is_none() {
            return;
        }
        // SAFETY: c is a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
            continue;
        }
        // SAFETY: as above.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Waits up to `timeout` for `child` to exit.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// Undoes the octal escapes (`\040` for space, ...) that /proc/self/mounts uses.
fn unescape_mount_field(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// `(mountpoint, fstype, options)` of every line of /proc/self/mounts.
pub fn mounts() -> Vec<(PathBuf, String, String)> {
    let text = fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 4 {
                return None;
            }
            let mp = PathBuf::from(std::ffi::OsStr::from_bytes(&unescape_mount_field(f[1])));
            Some((mp, f[2].to_string(), f[3].to_string()))
        })
        .collect()
}

/// The fstype of the topmost mount at exactly `mnt`, if any.
pub fn mount_type(mnt: &Path) -> Option<String> {
    mounts()
        .into_iter()
        .rev()
        .find(|(mp, _, _)| mp == mnt)
        .map(|(_, t, _)| t)
}

/// The options of the topmost mount at exactly `mnt`, if any.
pub fn mount_options(mnt: &Path) -> Option<String> {
    mounts()
        .into_iter()
        .rev()
        .find(|(mp, _, _)| mp == mnt)
        .map(|(_, _, o)| o)
}

/// Output of a command run with [`run`].
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// Panics with everything the command printed unless it succeeded.
    pub fn expect_ok(&self, what: &str) -> &Self {
        assert!(
            self.status.success(),
            "{what} failed with {}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs `cmd` to completion with a time limit; output goes to temp files rather than pipes so a
/// chatty command can never block on a full pipe while we poll. On timeout the command is killed
/// and the test fails with whatever it printed.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let out = tempfile::tempfile().expect("temp file for stdout");
    let err = tempfile::tempfile().expect("temp file for stderr");
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup stdout file"))
        .stderr(err.try_clone().expect("dup stderr file"));
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let status = wait_child(&mut child, timeout);
    let read_all = |mut f: &File| {
        use std::io::Seek;
        let mut s = String::new();
        let _ = f.seek(std::io::SeekFrom::Start(0));
        let _ = f.read_to_string(&mut s);
        s
    };
    match status {
        Some(status) => Output {
            status,
            stdout: read_all(&out),
            stderr: read_all(&err),
        },
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                read_all(&out),
                read_all(&err)
            );
        }
    }
}

/// `sh -c script` in `cwd` as root, 60 s limit.
pub fn sh(cwd: &Path, script: &str) -> Output {
    run(
        Command::new("sh").arg("-c").arg(script).current_dir(cwd),
        Duration::from_secs(60),
    )
}

/// `sh -c script` in `cwd` as uid/gid 65534. std drops the supplementary groups itself when a
/// uid is set, so root's groups do not leak into the unprivileged caller.
pub fn sh_nobody(cwd: &Path, script: &str) -> Output {
    run(
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(cwd)
            .env("HOME", "/tmp")
            .uid(NOBODY)
            .gid(NOBODY),
        Duration::from_secs(60),
    )
}

/// Runs `f` on a fresh thread whose credentials are uid/gid 65534 with no supplementary groups.
/// Linux credentials are per thread at the syscall level; the raw syscalls are used on purpose
/// because glibc's wrappers would switch every thread of the test process (and so every test
/// running in parallel).
pub fn as_user<T: Send>(uid: u32, gid: u32, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            // SAFETY: raw credential syscalls on the current thread only; arguments are plain
            // integers and a null list with length 0.
            unsafe {
                assert_eq!(
                    libc::syscall(
                        libc::SYS_setgroups,
                        0 as libc::c_long,
                        std::ptr::null::<libc::gid_t>()
                    ),
                    0,
                    "setgroups([])"
                );
                assert_eq!(
                    libc::syscall(
                        libc::SYS_setresgid,
                        gid as libc::c_long,
                        gid as libc::c_long,
                        gid as libc::c_long
                    ),
                    0,
                    "setresgid"
                );
                assert_eq!(
                    libc::syscall(
                        libc::SYS_setresuid,
                        uid as libc::c_long,
                        uid as libc::c_long,
                        uid as libc::c_long
                    ),
                    0,
                    "setresuid"
                );
            }
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// [`as_user`] for nobody/nogroup.
pub fn as_nobody<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    as_user(NOBODY, NOBODY, f)
}

/// A deterministic PRNG (splitmix64), so data and random sequences are reproducible from a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `0..n` (n > 0); the modulo bias is irrelevant for tests.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// A 64-bit FNV-1a hash: enough to compare contents in listings and messages.
pub fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A path as a C string for raw syscalls.
pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// A string as a C string for raw syscalls.
pub fn cstr(s: &str) -> CString {
    CString::new(s).expect("string without NUL")
}

/// The calling thread's errno.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Turns a raw `-1 means errno` return into a Result carrying the errno.
pub fn cvt<T: Into<i64> + Copy>(ret: T) -> Result<i64, i32> {
    let v: i64 = ret.into();
    if v == -1 {
        Err(errno())
    } else {
        Ok(v)
    }
}

/// Symbolic name of an errno, for readable assertion messages.
pub fn errname(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETXTBSY => "ETXTBSY",
        libc::ENXIO => "ENXIO",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::ENOTSOCK => "ENOTSOCK",
        _ => "E?",
    };
    format!("{name}({e})")
}

/// Asserts that a raw syscall result failed with exactly `want`.
#[track_caller]
pub fn assert_errno(res: Result<i64, i32>, want: i32, what: &str) {
    match res {
        Ok(v) => panic!("{what}: expected {} but it succeeded ({v})", errname(want)),
        Err(e) => assert_eq!(
            e,
            want,
            "{what}: expected {} got {}",
            errname(want),
            errname(e)
        ),
    }
}

/// Asserts that a raw syscall result succeeded and returns its value.
#[track_caller]
pub fn ok(res: Result<i64, i32>, what: &str) -> i64 {
    match res {
        Ok(v) => v,
        Err(e) => panic!("{what}: failed with {}", errname(e)),
    }
}

/// lstat(2)/stat(2) with the errno kept.
pub fn stat_raw(p: &Path, follow: bool) -> Result<libc::stat, i32> {
    let c = cpath(p);
    // SAFETY: an all-zero stat is a valid value to be overwritten by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated and st is a valid out-pointer.
    let r = unsafe {
        if follow {
            libc::stat(c.as_ptr(), &mut st)
        } else {
            libc::lstat(c.as_ptr(), &mut st)
        }
    };
    if r == 0 {
        Ok(st)
    } else {
        Err(errno())
    }
}

/// lstat that must succeed.
#[track_caller]
pub fn lstat(p: &Path) -> libc::stat {
    stat_raw(p, false).unwrap_or_else(|e| panic!("lstat {}: {}", p.display(), errname(e)))
}

/// stat (following symlinks) that must succeed.
#[track_caller]
pub fn stat(p: &Path) -> libc::stat {
    stat_raw(p, true).unwrap_or_else(|e| panic!("stat {}: {}", p.display(), errname(e)))
}

/// open(2) with the errno kept; the fd is owned by the result.
pub fn open(p: &Path, flags: i32, mode: u32) -> Result<std::os::fd::OwnedFd, i32> {
    use std::os::fd::FromRawFd;
    let c = cpath(p);
    // SAFETY: c is NUL-terminated; mode is passed as the variadic third argument.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
    if fd < 0 {
        Err(errno())
    } else {
        // SAFETY: fd was just returned by open and is owned by nobody else.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }
}

/// Thin path-based syscall wrappers that keep the raw errno (`Err(errno)`), shared by the
/// operation tests and the conformance sweep.
pub mod sys {
    use super::{cpath, cvt};
    use std::path::Path;

    type R = Result<i64, i32>;

    pub fn unlink(p: &Path) -> R {
        let c = cpath(p);
        // SAFETY: NUL-terminated path.
        cvt(unsafe { libc::unlink(c.as_ptr()) })
    }

    pub fn rmdir(p: &Path) -> R {
        let c = cpath(p);
        // SAFETY: NUL-terminated path.
        cvt(unsafe { libc::rmdir(c.as_ptr()) })
    }

    pub fn mkdir(p: &Path, mode: u32) -> R {
        let c = cpath(p);
        // SAFETY: NUL-terminated path.
        cvt(unsafe { libc::mkdir(c.as_ptr(), mode) })
    }

    pub fn rename(a: &Path, b: &Path) -> R {
        let (ca, cb) = (cpath(a), cpath(b));
        // SAFETY: NUL-terminated paths.
        cvt(unsafe { libc::rename(ca.as_ptr(), cb.as_ptr()) })
    }

    pub fn renameat2(a: &Path, b: &Path, flags: u32) -> R {
        let (ca, cb) = (cpath(a), cpath(b));
        // SAFETY: NUL-terminated paths; AT_FDCWD with absolute or cwd-relative paths.
        cvt(unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                flags,
            )
        })
    }

    pub fn link(a: &Path, b: &Path) -> R {
        let (ca, cb) = (cpath(a), cpath(b));
        // SAFETY: NUL-terminated paths.
        cvt(unsafe { libc::link(ca.as_ptr(), cb.as_ptr()) })
    }

    pub fn symlink(target: &str, p: &Path) -> R {
        let (ct, cp) = (super::cstr(target), cpath(p));
        // SAFETY: NUL-terminated strings.
        cvt(unsafe { libc::symlink(ct.as_ptr(), cp.as_ptr()) })
    }

    pub fn readlink(p: &Path) -> Result<String, i32> {
        let c = cpath(p);
        let mut buf = vec![0u8; 8192];
        // SAFETY: buf is writable for its full length.
        let n = unsafe { libc::readlink(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(super::errno());
        }
        buf.truncate(n as usize);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    pub fn chmod(p: &Path, mode: u32) -> R {
        let c = cpath(p);
        // SAFETY: NUL-terminated path.
        cvt(unsafe { libc::chmod(c.as_ptr(), mode) })
    }

    pub fn chown(p: &Path, uid: u32, gid: u32) -> R {
        let c = cpath(p);
        // SAFETY: NUL-terminated path.
        cvt(unsafe { libc::chown(c.as_ptr(), uid, gid) })
    }

    pub fn lchown(p: &Path, uid: u32, gid: u32) -> R {
        let c = cpath(p);
        // SAFETY: NUL-terminated path.
        cvt(unsafe { libc::lchown(c.as_ptr(), uid, gid) })
    }

    pub fn truncate(p: &Path, len: i64) -> R {
        let c = cpath(p);
        // SAFETY: NUL-terminated path.
        cvt(unsafe { libc::truncate(c.as_ptr(), len) })
    }

    pub fn mknod(p: &Path, mode: u32, dev: u64) -> R {
        let c = cpath(p);
        // SAFETY: NUL-terminated path.
        cvt(unsafe { libc::mknod(c.as_ptr(), mode, dev) })
    }

    pub fn access(p: &Path, how: i32) -> R {
        let c = cpath(p);
        // SAFETY: NUL-terminated path.
        cvt(unsafe { libc::access(c.as_ptr(), how) })
    }

    /// utimensat(AT_FDCWD, p, [atime, mtime], flags); a `None` leaves the pointer null (both
    /// set to now), otherwise each entry is `(sec, nsec)` where nsec may be UTIME_NOW/OMIT.
    pub fn utimensat(p: &Path, times: Option<[(i64, i64); 2]>, flags: i32) -> R {
        let c = cpath(p);
        let ts = times.map(|t| {
            [
                libc::timespec {
                    tv_sec: t[0].0,
                    tv_nsec: t[0].1,
                },
                libc::timespec {
                    tv_sec: t[1].0,
                    tv_nsec: t[1].1,
                },
            ]
        });
        let ptr = ts.as_ref().map_or(std::ptr::null(), |t| t.as_ptr());
        // SAFETY: NUL-terminated path; ptr is null or points at two timespecs.
        cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ptr, flags) })
    }

    pub fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> R {
        let (c, n) = (cpath(p), super::cstr(name));
        // SAFETY: NUL-terminated strings; value is readable for its length.
        cvt(unsafe {
            libc::setxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        })
    }

    pub fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> R {
        let (c, n) = (cpath(p), super::cstr(name));
        // SAFETY: NUL-terminated strings; value is readable for its length.
        cvt(unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        })
    }

    /// getxattr with a buffer of `cap` bytes (0 asks for the size).
    pub fn getxattr_cap(p: &Path, name: &str, cap: usize) -> Result<Vec<u8>, i32> {
        let (c, n) = (cpath(p), super::cstr(name));
        let mut buf = vec![0u8; cap];
        let ptr = if cap == 0 {
            std::ptr::null_mut()
        } else {
            buf.as_mut_ptr().cast()
        };
        // SAFETY: NUL-terminated strings; ptr is null with size 0 or writable for cap bytes.
        let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), ptr, cap) };
        if r < 0 {
            return Err(super::errno());
        }
        if cap == 0 {
            return Ok(vec![0u8; r as usize]);
        }
        buf.truncate(r as usize);
        Ok(buf)
    }

    pub fn getxattr(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
        getxattr_cap(p, name, 65536)
    }

    /// listxattr as a sorted list of names.
    pub fn listxattr(p: &Path) -> Result<Vec<String>, i32> {
        let c = cpath(p);
        let mut buf = vec![0u8; 65536];
        // SAFETY: buf is writable for its full length.
        let r = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            return Err(super::errno());
        }
        buf.truncate(r as usize);
        let mut names: Vec<String> = buf
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        names.sort();
        Ok(names)
    }

    pub fn removexattr(p: &Path, name: &str) -> R {
        let (c, n) = (cpath(p), super::cstr(name));
        // SAFETY: NUL-terminated strings.
        cvt(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) })
    }

    /// statvfs(3), keeping errno.
    pub fn statvfs(p: &Path) -> Result<libc::statvfs, i32> {
        let c = cpath(p);
        // SAFETY: all-zero is a valid statvfs to be overwritten.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: NUL-terminated path and a valid out-pointer.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0 {
            Ok(st)
        } else {
            Err(super::errno())
        }
    }

    /// Drops clean dentries and inodes system-wide, which makes the kernel send FORGET for
    /// unused FUSE inodes: the next lookup has to come from the daemon again.
    pub fn drop_caches() {
        std::fs::write("/proc/sys/vm/drop_caches", "2\n").expect("write /proc/sys/vm/drop_caches");
    }
}
