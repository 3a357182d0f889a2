//! The eBPF watcher against the real kernel: every syscall kind is made by a separate
//! process (`sh`, coreutils, `python3`) on a temp folder, and the right record must reach
//! the sink within two seconds.
//!
//! Needs root and kernel BTF. Without them the tests skip with a message, unless `CI` is
//! set: then they fail, so CI can never pass by skipping.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use filesync::capture::{ebpf, WatchSpec, Watcher, WatcherKind};
use filesync::change::{AttrChange, Change, ChangeKind, ChangeSink, FileId, Source, TimeChange};

/// How long a record may take to arrive.
const ARRIVAL: Duration = Duration::from_secs(2);

/// One watcher at a time: tests then see only their own programs in `bpftool`, and a
/// burst in one test cannot overflow another's ring.
static SERIAL: Mutex<()> = Mutex::new(());

fn ebpf_available() -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("not running as root");
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push("/sys/kernel/btf/vmlinux is missing");
    }
    if missing.is_empty() {
        return true;
    }
    let why = missing.join(", ");
    if std::env::var_os("CI").is_some() {
        panic!("eBPF tests cannot run: {why} (CI is set, so this is a failure)");
    }
    eprintln!("SKIP: eBPF tests need root and kernel BTF: {why}");
    false
}

/// Collects changes; `hold` makes `record` block, to let the ring fill up.
#[derive(Default)]
struct Collect {
    changes: Mutex<Vec<Change>>,
    arrived: Condvar,
    held: Mutex<bool>,
    released: Condvar,
}

impl ChangeSink for Collect {
    fn record(&self, change: Change) {
        let mut held = lock(&self.held);
        while *held {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        drop(held);
        lock(&self.changes).push(change);
        self.arrived.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A watched folder `watched` beside an unwatched `outside`, in one temp dir.
struct Fixture {
    _serial: MutexGuard<'static, ()>,
    _tmp: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    sink: Arc<Collect>,
    watcher: Option<Box<dyn Watcher>>,
}

impl Fixture {
    fn new(ignore_pids: Vec<u32>) -> Option<Self> {
        if !ebpf_available() {
            return None;
        }
        let serial = lock(&SERIAL);
        let tmp = tempfile::Builder::new()
            .prefix("filesync-ebpf-")
            .tempdir()
            .expect("temp dir");
        let base = tmp.path().canonicalize().expect("canonical temp dir");
        let root = base.join("watched");
        let outside = base.join("outside");
        fs::create_dir(&root).expect("mkdir watched");
        fs::create_dir(&outside).expect("mkdir outside");
        let sink = Arc::new(Collect::default());
        let spec = WatchSpec {
            root: root.clone(),
            ignore_pids,
        };
        let watcher = ebpf::start(&spec, sink.clone()).expect("the eBPF watcher starts");
        assert_eq!(watcher.kind(), WatcherKind::Ebpf);
        Some(Self {
            _serial: serial,
            _tmp: tmp,
            root,
            outside,
            sink,
            watcher: Some(watcher),
        })
    }

    /// Runs `sh -c script` in the watched folder; returns the shell's pid.
    fn sh(&self, script: &str) -> u32 {
        self.run(Command::new("sh").arg("-c").arg(script))
    }

    /// Runs python3 with `script` in the watched folder; returns its pid.
    fn py(&self, script: &str) -> u32 {
        self.py_output(script).0
    }

    /// Runs python3 with `script` in the watched folder; returns its pid and stdout.
    fn py_output(&self, script: &str) -> (u32, String) {
        let prelude = "import os, ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n";
        self.run_output(
            Command::new("python3")
                .arg("-c")
                .arg(format!("{prelude}{script}")),
        )
    }

    fn run(&self, command: &mut Command) -> u32 {
        self.run_output(command).0
    }

    fn run_output(&self, command: &mut Command) -> (u32, String) {
        let child = command
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
        let pid = child.id();
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (pid, String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits for a change matching `want`, and returns it.
    fn expect(&self, what: &str, want: impl Fn(&Change) -> bool) -> Change {
        let deadline = Instant::now() + ARRIVAL;
        let mut changes = lock(&self.sink.changes);
        // Only what arrived since the last look is new: bursts stay linear.
        let mut seen = 0;
        loop {
            if let Some(c) = changes[seen..].iter().find(|c| want(c)) {
                return c.clone();
            }
            seen = changes.len();
            let now = Instant::now();
            if now >= deadline {
                let shown = changes.len().saturating_sub(50);
                panic!(
                    "no {what} within {ARRIVAL:?}; got {} changes, the last ones:\n{}",
                    changes.len(),
                    changes[shown..]
                        .iter()
                        .map(|c| format!("  {c:?}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            changes = self
                .sink
                .arrived
                .wait_timeout(changes, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for `kind` at relative `path` by `pid`.
    fn expect_at(&self, path: &str, pid: u32, kind: ChangeKind) -> Change {
        self.expect_by(path, Some(pid), kind)
    }

    /// Waits for `kind` at relative `path`, by `pid` when given (a shell script that runs
    /// commands makes its changes from children).
    fn expect_by(&self, path: &str, pid: Option<u32>, kind: ChangeKind) -> Change {
        let what = format!("{kind:?} at {path} by {pid:?}");
        let c = self.expect(&what, |c| {
            c.path.as_deref() == Some(Path::new(path))
                && c.kind == kind
                && (pid.is_none() || c.pid == pid)
        });
        assert_eq!(c.source, Source::Ebpf);
        assert!(c.pid.is_some(), "no pid in {c:?}");
        c
    }

    fn changes(&self) -> Vec<Change> {
        lock(&self.sink.changes).clone()
    }

    fn file_id(&self, relative: &str) -> FileId {
        let meta = fs::metadata(self.root.join(relative)).expect("stat");
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    /// Makes a marker file by a child process and waits for it: every record of an
    /// earlier syscall has arrived by then (the ring is FIFO).
    fn sync(&self) {
        let name = format!(
            "marker-{}",
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let pid = self.sh(&format!(": > {name}"));
        self.expect_at(&name, pid, ChangeKind::Create);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(w) = self.watcher.take() {
            w.stop();
        }
    }
}

fn attr(f: impl FnOnce(&mut AttrChange)) -> ChangeKind {
    let mut a = AttrChange::default();
    f(&mut a);
    ChangeKind::SetAttr(a)
}

fn write(offset: u64, len: u64) -> ChangeKind {
    ChangeKind::Write { offset, len }
}

#[test]
fn creates_writes_appends_and_closes_by_shell_and_dd() {
    let Some(fx) = Fixture::new(vec![]) else {
        return;
    };
    let pid = fx.sh("printf hello > f; printf abc >> f");
    let created = fx.expect_at("f", pid, ChangeKind::Create);
    assert_eq!(created.file, Some(fx.file_id("f")));
    fx.expect_at("f", pid, write(0, 5));
    fx.expect_at("f", pid, write(5, 3));

    let pid = fx.run(Command::new("dd").args([
        "if=/dev/zero",
        "of=f",
        "bs=100",
        "count=1",
        "seek=3",
        "conv=notrunc",
        "status=none",
    ]));
    let w = fx.expect_at("f", pid, write(300, 100));
    assert_eq!(w.file, Some(fx.file_id("f")));
    // dd closes its output itself.
    fx.expect_at("f", pid, ChangeKind::Closed);

    // A shell that exits with the file still open closes it without close().
    let pid = fx.sh("exec 3>>f; printf z >&3");
    fx.expect_at("f", pid, write(400, 1));
    fx.expect_at("f", pid, ChangeKind::Closed);

    // O_TRUNC on an existing file.
    let pid = fx.sh(": > f");
    fx.expect_at("f", pid, ChangeKind::Truncate { size: 0 });

    // Deeper, and relative to a working directory below the root.
    fs::create_dir_all(fx.root.join("a/b")).expect("mkdir");
    let pid = fx.sh("cd a/b && printf 1234 > deep");
    fx.expect_at("a/b/deep", pid, write(0, 4));

    // 24 levels of long names: the record carries the whole chain.
    let deep: PathBuf = (0..24)
        .map(|i| format!("{i:02}-{}", "n".repeat(60)))
        .collect();
    fs::create_dir_all(fx.root.join(&deep)).expect("mkdir -p");
    let file = deep.join("leaf");
    let pid = fx.sh(&format!("printf 12 > {}", file.display()));
    fx.expect_at(&file.to_string_lossy(), pid, write(0, 2));
}

#[test]
fn positioned_and_vectored_writes_carry_their_range() {
    let Some(fx) = Fixture::new(vec![]) else {
        return;
    };
    let pid = fx.py(concat!(
        "fd = os.open('p', os.O_CREAT | os.O_WRONLY, 0o644)\n",
        "os.pwrite(fd, b'xyz', 1000)\n",
        "os.lseek(fd, 10, 0)\n",
        "os.writev(fd, [b'ab', b'cd'])\n",
        "os.pwritev(fd, [b'12', b'345'], 50)\n",
        "os.fsync(fd)\n",
        "os.fdatasync(fd)\n",
        "os.close(fd)\n",
        // pwrite on an O_APPEND file appends on Linux, whatever the offset says.
        "fd = os.open('p', os.O_WRONLY | os.O_APPEND)\n",
        "os.pwrite(fd, b'tail', 0)\n",
        "os.pwritev(fd, [b'end'], -1, os.RWF_APPEND)\n",
        "os.close(fd)\n",
    ));
    fx.expect_at("p", pid, ChangeKind::Create);
    fx.expect_at("p", pid, write(1000, 3));
    fx.expect_at("p", pid, write(10, 4));
    fx.expect_at("p", pid, write(50, 5));
    fx.expect_at("p", pid, ChangeKind::Fsync { datasync: false });
    fx.expect_at("p", pid, ChangeKind::Fsync { datasync: true });
    fx.expect_at("p", pid, write(1003, 4));
    fx.expect_at("p", pid, write(1007, 3));
    fx.expect_at("p", pid, ChangeKind::Closed);

    // Opened for writing and closed without a write: still a close to report. Opened
    // read-only: nothing.
    fs::write(fx.root.join("q"), b"q").expect("write");
    fs::write(fx.root.join("r"), b"r").expect("write");
    let pid = fx.py("os.close(os.open('q', os.O_WRONLY))\nos.close(os.open('r', os.O_RDONLY))\n");
    fx.expect_at("q", pid, ChangeKind::Closed);
    fx.sync();
    assert!(
        !fx.changes()
            .iter()
            .any(|c| c.path.as_deref() == Some(Path::new("r")) && c.pid == Some(pid)),
        "a read-only open was reported: {:?}",
        fx.changes()
    );
}

#[test]
fn copies_into_a_file_are_writes_on_the_destination() {
    let Some(fx) = Fixture::new(vec![]) else {
        return;
    };
    fs::write(fx.outside.join("src"), vec![7u8; 4096]).expect("write src");
    let src = fx.outside.join("src");
    let pid = fx.py(&format!(
        concat!(
            "src = os.open('{}', os.O_RDONLY)\n",
            "dst = os.open('dst', os.O_CREAT | os.O_WRONLY, 0o644)\n",
            "os.copy_file_range(src, dst, 100, 0, 200)\n",
            "os.lseek(dst, 1000, 0)\n",
            "os.copy_file_range(src, dst, 10, 0)\n",
            "os.lseek(dst, 2000, 0)\n",
            "os.sendfile(dst, src, 0, 30)\n",
            "r, w = os.pipe()\n",
            "os.write(w, b'piped')\n",
            "os.splice(r, dst, 5, offset_dst=3000)\n",
        ),
        src.display()
    ));
    fx.expect_at("dst", pid, write(200, 100));
    fx.expect_at("dst", pid, write(1000, 10));
    fx.expect_at("dst", pid, write(2000, 30));
    fx.expect_at("dst", pid, write(3000, 5));
    // Reading the source outside the root reports nothing about it.
    fx.sync();
    assert!(fx
        .changes()
        .iter()
        .all(|c| c.path.as_deref() != Some(Path::new("src"))));
}

#[test]
fn sizes_allocations_and_opens() {
    let Some(fx) = Fixture::new(vec![]) else {
        return;
    };
    fs::write(fx.root.join("t"), b"0123456789abcdef").expect("write");
    let pid = fx.run(Command::new("truncate").args(["-s", "10", "t"]));
    fx.expect_at("t", pid, attr(|a| a.size = Some(10)));

    let pid = fx.py(concat!(
        "os.truncate('t', 7)\n",
        "fd = os.open('t', os.O_WRONLY)\n",
        "os.posix_fallocate(fd, 0, 8192)\n",
        "os.close(fd)\n",
        // open(2), creat(2) and openat2(2) besides openat(2)
        "assert libc.syscall(2, b'o1', os.O_CREAT | os.O_WRONLY, 0o644) >= 0\n",
        "assert libc.creat(b'o2', 0o644) >= 0\n",
        "how = (ctypes.c_uint64 * 3)(os.O_CREAT | os.O_WRONLY, 0o644, 0)\n",
        "assert libc.syscall(437, -100, b'o3', ctypes.byref(how), 24) >= 0\n",
        "how = (ctypes.c_uint64 * 3)(os.O_TRUNC | os.O_WRONLY, 0, 0)\n",
        "assert libc.syscall(437, -100, b't', ctypes.byref(how), 24) >= 0\n",
    ));
    fx.expect_at("t", pid, attr(|a| a.size = Some(7)));
    fx.expect_at(
        "t",
        pid,
        ChangeKind::Fallocate {
            offset: 0,
            len: 8192,
            mode: 0,
        },
    );
    for name in ["o1", "o2", "o3"] {
        let c = fx.expect_at(name, pid, ChangeKind::Create);
        assert_eq!(c.file, Some(fx.file_id(name)));
    }
    fx.expect_at("t", pid, ChangeKind::Truncate { size: 0 });
}

#[test]
fn names_appear_and_disappear() {
    let Some(fx) = Fixture::new(vec![]) else {
        return;
    };
    fs::write(fx.root.join("f"), b"x").expect("write");
    // Each command is a child of the shell: its pid is not known here.
    fx.sh(concat!(
        "mkdir d && mkfifo d/p && ln -s ../f d/s && ln f hard && ",
        "mv hard moved && rm moved && ",
        "mkdir e && rmdir e && mkdir -p g/h && rm -r g"
    ));
    fx.expect_by("d", None, ChangeKind::Mkdir);
    let p = fx.expect("mknod of d/p", |c| {
        c.path.as_deref() == Some(Path::new("d/p")) && matches!(c.kind, ChangeKind::Mknod { .. })
    });
    assert!(
        matches!(p.kind, ChangeKind::Mknod { mode, .. } if mode & libc::S_IFMT == libc::S_IFIFO)
    );
    fx.expect_by(
        "d/s",
        None,
        ChangeKind::Symlink {
            target: PathBuf::from("../f"),
        },
    );
    fx.expect_by(
        "hard",
        None,
        ChangeKind::Link {
            existing: Some(PathBuf::from("f")),
        },
    );
    fx.expect_by(
        "hard",
        None,
        ChangeKind::Rename {
            to: Some(PathBuf::from("moved")),
            exchange: false,
        },
    );
    fx.expect_by("moved", None, ChangeKind::Unlink);
    fx.expect_by("e", None, ChangeKind::Rmdir);
    fx.expect_by("g/h", None, ChangeKind::Rmdir);
    fx.expect_by("g", None, ChangeKind::Rmdir);

    // The legacy path syscalls and renameat2(RENAME_EXCHANGE).
    let pid = fx.py(concat!(
        "os.mkdir('m')\n",
        "os.rmdir('m')\n",
        "open('a', 'w').close()\n",
        "open('b', 'w').close()\n",
        "assert libc.syscall(316, -100, b'a', -100, b'b', 2) == 0\n",
        "assert libc.syscall(82, b'a', b'c') == 0\n",
        "assert libc.syscall(86, b'c', b'c2') == 0\n",
        "assert libc.syscall(88, b'tgt', b'sym') == 0\n",
        "assert libc.syscall(87, b'c2') == 0\n",
    ));
    fx.expect_at("m", pid, ChangeKind::Mkdir);
    fx.expect_at("m", pid, ChangeKind::Rmdir);
    fx.expect_at(
        "a",
        pid,
        ChangeKind::Rename {
            to: Some(PathBuf::from("b")),
            exchange: true,
        },
    );
    fx.expect_at(
        "a",
        pid,
        ChangeKind::Rename {
            to: Some(PathBuf::from("c")),
            exchange: false,
        },
    );
    fx.expect_at(
        "c2",
        pid,
        ChangeKind::Link {
            existing: Some(PathBuf::from("c")),
        },
    );
    fx.expect_at(
        "sym",
        pid,
        ChangeKind::Symlink {
            target: PathBuf::from("tgt"),
        },
    );
    fx.expect_at("c2", pid, ChangeKind::Unlink);
}

#[test]
fn moves_across_the_edge_of_the_root() {
    let Some(fx) = Fixture::new(vec![]) else {
        return;
    };
    fs::write(fx.outside.join("in-file"), b"x").expect("write");
    fs::create_dir(fx.outside.join("in-dir")).expect("mkdir");
    fs::write(fx.root.join("out-file"), b"x").expect("write");
    fs::write(fx.root.join("swap"), b"x").expect("write");
    fs::write(fx.outside.join("swap"), b"y").expect("write");
    fx.sh("mv ../outside/in-file . && mv ../outside/in-dir . && mv out-file ../outside/");
    fx.expect_by("in-file", None, ChangeKind::Create);
    fx.expect_by("in-dir", None, ChangeKind::Mkdir);
    fx.expect_by("out-file", None, ChangeKind::Unlink);
    let pid = fx.py("assert libc.syscall(316, -100, b'swap', -100, b'../outside/swap', 2) == 0\n");
    fx.expect_at("swap", pid, ChangeKind::Modified);

    // A file written outside (the kernel caches "outside" for it), then moved in while
    // open: its next write is seen, at its new name; so is a file in a moved-in directory.
    let pid = fx.py(concat!(
        "fd = os.open('../outside/moving', os.O_CREAT | os.O_WRONLY, 0o644)\n",
        "os.write(fd, b'a')\n",
        "os.rename('../outside/moving', 'moving')\n",
        "os.write(fd, b'bc')\n",
        "os.makedirs('../outside/dir')\n",
        "fd = os.open('../outside/dir/f', os.O_CREAT | os.O_WRONLY, 0o644)\n",
        "os.write(fd, b'a')\n",
        "os.rename('../outside/dir', 'dir')\n",
        "os.write(fd, b'bc')\n",
    ));
    fx.expect_at("moving", pid, write(1, 2));
    fx.expect_at("dir/f", pid, write(1, 2));
    assert!(
        !fx.changes()
            .iter()
            .any(|c| c.kind == write(0, 1) && c.pid == Some(pid)),
        "a write made outside was reported: {:?}",
        fx.changes()
    );
}

#[test]
fn an_fd_that_named_an_unwatched_file_and_then_a_watched_one() {
    let Some(fx) = Fixture::new(vec![]) else {
        return;
    };
    // Writes to an unwatched file let the kernel cache "outside" for (process, fd); the
    // same fd then names a watched file, through close and open (the new struct file
    // often takes the freed one's address) and through dup2.
    let pid = fx.py(concat!(
        "fd = os.open('../outside/a', os.O_CREAT | os.O_WRONLY, 0o644)\n",
        "os.write(fd, b'a')\n",
        "os.write(fd, b'a')\n",
        "os.close(fd)\n",
        "assert os.open('reused', os.O_CREAT | os.O_WRONLY, 0o644) == fd\n",
        "os.write(fd, b'bc')\n",
        "out = os.open('../outside/b', os.O_CREAT | os.O_WRONLY, 0o644)\n",
        "os.write(out, b'a')\n",
        "os.write(out, b'a')\n",
        "os.dup2(fd, out)\n",
        "os.write(out, b'def')\n",
    ));
    fx.expect_at("reused", pid, write(0, 2));
    fx.expect_at("reused", pid, write(2, 3));
}

#[test]
fn a_file_unlinked_while_open_is_known_by_its_inode() {
    let Some(fx) = Fixture::new(vec![]) else {
        return;
    };
    let pid = fx.py(concat!(
        "fd = os.open('gone', os.O_CREAT | os.O_WRONLY, 0o644)\n",
        "print(os.fstat(fd).st_ino, flush=True)\n",
        "os.unlink('gone')\n",
        "os.write(fd, b'xyz')\n",
    ));
    fx.expect_at("gone", pid, ChangeKind::Unlink);
    let c = fx.expect("a write to the unlinked file", |c| {
        c.path.is_none() && c.kind == write(0, 3)
    });
    assert_eq!(c.pid, Some(pid));
    let file = c.file.expect("the inode is known");
    assert_eq!(file.dev, fs::metadata(&fx.root).expect("stat").dev());
}

#[test]
fn paths_relative_to_a_directory_above_the_root_and_absolute_paths() {
    let Some(fx) = Fixture::new(vec![]) else {
        return;
    };
    // From the parent of the root: "watched/x" crosses into it.
    let pid = fx.sh("cd .. && exec mkdir watched/from-above");
    fx.expect_at("from-above", pid, ChangeKind::Mkdir);
    let pid = fx.sh("cd .. && exec touch watched/from-above/f");
    fx.expect_at("from-above/f", pid, ChangeKind::Create);
    let abs = fx.root.join("abs");
    let pid = fx.sh(&format!("cd / && exec mkdir {}", abs.display()));
    fx.expect_at("abs", pid, ChangeKind::Mkdir);
}

#[test]
fn attributes_xattrs_and_times() {
    let Some(fx) = Fixture::new(vec![]) else {
        return;
    };
    fs::write(fx.root.join("f"), b"x").expect("write");
    let pid = fx.run(Command::new("chmod").args(["600", "f"]));
    fx.expect_at("f", pid, attr(|a| a.mode = Some(0o600)));
    let pid = fx.run(Command::new("chown").args(["1234:5678", "f"]));
    fx.expect_at(
        "f",
        pid,
        attr(|a| {
            a.uid = Some(1234);
            a.gid = Some(5678);
        }),
    );
    let pid = fx.run(Command::new("chown").args([":99", "f"]));
    fx.expect_at("f", pid, attr(|a| a.gid = Some(99)));
    let pid = fx.run(Command::new("setfattr").args(["-n", "user.k", "-v", "v", "f"]));
    fx.expect_at(
        "f",
        pid,
        ChangeKind::SetXattr {
            name: "user.k".into(),
        },
    );
    let pid = fx.run(Command::new("setfattr").args(["-x", "user.k", "f"]));
    fx.expect_at(
        "f",
        pid,
        ChangeKind::RemoveXattr {
            name: "user.k".into(),
        },
    );
    let pid = fx.run(Command::new("touch").args(["-d", "@981173106.5", "f"]));
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(981_173_106_500);
    fx.expect_at(
        "f",
        pid,
        attr(|a| {
            a.atime = Some(TimeChange::At(at));
            a.mtime = Some(TimeChange::At(at));
        }),
    );
    let pid = fx.run(Command::new("touch").args(["-m", "f"]));
    fx.expect_at("f", pid, attr(|a| a.mtime = Some(TimeChange::Now)));
    // fd-based variants.
    let pid = fx.py(concat!(
        "fd = os.open('f', os.O_RDONLY)\n",
        "os.fchmod(fd, 0o640)\n",
        "os.fchown(fd, 1, -1)\n",
        "os.setxattr(fd, 'user.fd', b'1')\n",
        "os.removexattr(fd, 'user.fd')\n",
        "os.utime(fd, ns=(5, 6))\n",
    ));
    fx.expect_at("f", pid, attr(|a| a.mode = Some(0o640)));
    fx.expect_at("f", pid, attr(|a| a.uid = Some(1)));
    fx.expect_at(
        "f",
        pid,
        ChangeKind::SetXattr {
            name: "user.fd".into(),
        },
    );
    fx.expect_at(
        "f",
        pid,
        ChangeKind::RemoveXattr {
            name: "user.fd".into(),
        },
    );
    let c = fx.expect_at(
        "f",
        pid,
        attr(|a| {
            a.atime = Some(TimeChange::At(
                SystemTime::UNIX_EPOCH + Duration::from_nanos(5),
            ));
            a.mtime = Some(TimeChange::At(
                SystemTime::UNIX_EPOCH + Duration::from_nanos(6),
            ));
        }),
    );
    assert_eq!(c.file, Some(fx.file_id("f")));

    // Newer calls, where the kernel has them: fchmodat2 (6.6), setxattrat and
    // removexattrat (6.13). Each line printed names one that ran.
    let (pid, ran) = fx.py_output(concat!(
        "def call(name, *args):\n",
        "    if libc.syscall(*args) == 0: print(name)\n",
        "    elif ctypes.get_errno() != 38: raise OSError(ctypes.get_errno(), name)\n",
        "call('fchmodat2', 452, -100, b'f', 0o604, 0)\n",
        "value = ctypes.create_string_buffer(b'v')\n",
        "args = (ctypes.c_uint64 * 2)(ctypes.addressof(value), 1)\n",
        "call('setxattrat', 463, -100, b'f', 0, b'user.at', ctypes.byref(args), 16)\n",
        "call('removexattrat', 466, -100, b'f', 0, b'user.at')\n",
    ));
    if ran.contains("fchmodat2") {
        fx.expect_at("f", pid, attr(|a| a.mode = Some(0o604)));
    }
    if ran.contains("setxattrat") {
        let name = "user.at".to_string();
        fx.expect_at("f", pid, ChangeKind::SetXattr { name });
    }
    if ran.contains("removexattrat") {
        let name = "user.at".to_string();
        fx.expect_at("f", pid, ChangeKind::RemoveXattr { name });
    }
}

#[test]
fn nothing_from_outside_the_root() {
    let Some(fx) = Fixture::new(vec![]) else {
        return;
    };
    fs::write(fx.outside.join("old"), b"x").expect("write");
    fx.sh(concat!(
        "cd ../outside && printf data > f && printf more >> f && mkdir d && mv f d/g && ",
        "chmod 600 d/g && truncate -s 1 d/g && rm -r d && ln -s x s && rm s old"
    ));
    // A name that starts like the root's is not under it.
    let lookalike = format!("{}-not", fx.root.display());
    fx.sh(&format!(
        "mkdir {lookalike} && printf x > {lookalike}/f && rm -r {lookalike}"
    ));
    fx.sync();
    let stray: Vec<_> = fx
        .changes()
        .into_iter()
        .filter(|c| {
            !c.path
                .as_deref()
                .is_some_and(|p| p.to_string_lossy().starts_with("marker-"))
        })
        .collect();
    assert!(stray.is_empty(), "changes from outside the root: {stray:?}");
}

#[test]
fn ignored_pids_are_not_reported() {
    let me = std::process::id();
    {
        // Without the pid in ignore_pids this process's writes are reported: the filter
        // below is the map's doing, not a built-in exclusion of the watcher's process.
        let Some(fx) = Fixture::new(vec![]) else {
            return;
        };
        fs::write(fx.root.join("mine"), b"abc").expect("write");
        fx.expect_at("mine", me, write(0, 3));
    }
    let Some(fx) = Fixture::new(vec![me]) else {
        return;
    };
    fs::write(fx.root.join("mine"), b"abcdef").expect("write");
    fs::create_dir(fx.root.join("mydir")).expect("mkdir");
    fs::rename(fx.root.join("mine"), fx.root.join("mine2")).expect("rename");
    fx.sync();
    let mine: Vec<_> = fx
        .changes()
        .into_iter()
        .filter(|c| c.pid == Some(me))
        .collect();
    assert!(mine.is_empty(), "changes by an ignored pid: {mine:?}");
}

#[test]
fn ring_overflow_yields_a_rescan() {
    let Some(fx) = Fixture::new(vec![]) else {
        return;
    };
    // Hold the reader inside the sink so the ring fills while python writes.
    *lock(&fx.sink.held) = true;
    let release = || {
        *lock(&fx.sink.held) = false;
        fx.sink.released.notify_all();
    };
    let burst = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fx.py(concat!(
            "fd = os.open('burst', os.O_CREAT | os.O_WRONLY, 0o644)\n",
            "for _ in range(200000): os.write(fd, b'x')\n",
        ))
    }));
    release();
    let pid = burst.unwrap_or_else(|e| std::panic::resume_unwind(e));
    fx.expect("a rescan", |c| {
        c.kind == ChangeKind::Rescan && c.path.is_none()
    });
    // What did arrive is still exact.
    fx.expect_at("burst", pid, write(0, 1));
}

/// Ids of the loaded programs named like ours.
fn our_programs() -> BTreeSet<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool runs (apt-get install bpftool)");
    assert!(out.status.success(), "bpftool prog show failed");
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    progs
        .as_array()
        .expect("a list of programs")
        .iter()
        .filter(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("filesync_"))
        })
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

#[test]
fn stop_is_bounded_and_unloads_the_programs() {
    if !ebpf_available() {
        return;
    }
    let serial = lock(&SERIAL);
    let before = our_programs();
    drop(serial);
    let Some(mut fx) = Fixture::new(vec![]) else {
        return;
    };
    let ours: BTreeSet<u64> = our_programs().difference(&before).copied().collect();
    assert_eq!(ours.len(), 2, "two programs loaded: {ours:?}");
    let watcher = fx.watcher.take().expect("running");
    let started = Instant::now();
    watcher.stop();
    let took = started.elapsed();
    assert!(took < Duration::from_millis(500), "stop took {took:?}");
    // The kernel frees detached tracing programs after an RCU grace period.
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let left: Vec<_> = our_programs().intersection(&ours).copied().collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "programs still loaded {ARRIVAL:?} after stop: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_missing_root_is_an_io_error() {
    if !ebpf_available() {
        return;
    }
    let spec = WatchSpec {
        root: PathBuf::from("/nonexistent/filesync-ebpf"),
        ignore_pids: vec![],
    };
    let sink: Arc<dyn ChangeSink> = Arc::new(Collect::default());
    match ebpf::start(&spec, sink) {
        Err(filesync::capture::CaptureError::Io { .. }) => {}
        Err(e) => panic!("expected an Io error, got {e}"),
        Ok(_) => panic!("started on a missing root"),
    }
}

/// Set in the child that `without_privilege_it_is_unavailable` runs as nobody.
const UNPRIVILEGED_CHILD: &str = "FILESYNC_EBPF_TEST_UNPRIVILEGED_CHILD";

#[test]
fn without_privilege_it_is_unavailable() {
    if std::env::var_os(UNPRIVILEGED_CHILD).is_some() {
        // The child: no capabilities, so loading must fail with Unavailable, saying why.
        let root = tempfile::tempdir().expect("temp dir");
        let spec = WatchSpec {
            root: root.path().canonicalize().expect("canonical"),
            ignore_pids: vec![],
        };
        let sink: Arc<dyn ChangeSink> = Arc::new(Collect::default());
        match ebpf::start(&spec, sink) {
            Err(e @ filesync::capture::CaptureError::Unavailable { .. }) => {
                let message = e.to_string();
                assert!(!message.contains('\n'), "one line: {message}");
                assert!(
                    message.contains("run as root"),
                    "says what to do: {message}"
                );
                println!("unavailable as expected: {message}");
            }
            Err(e) => panic!("expected Unavailable, got {e}"),
            Ok(_) => panic!("loaded eBPF without privilege"),
        }
        return;
    }
    if !ebpf_available() {
        return;
    }
    let me = std::env::current_exe().expect("test binary");
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(&me)
        .args([
            "--exact",
            "without_privilege_it_is_unavailable",
            "--nocapture",
        ])
        .env(UNPRIVILEGED_CHILD, "1")
        .env("TMPDIR", "/tmp")
        .output()
        .expect("setpriv runs (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("unavailable as expected"),
        "the unprivileged child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
