//! The fallback watchers (fanotify, then inotify) on the real kernel. One suite of scenarios,
//! each a function taking the watcher kind, runs for both (`fanotify::*` and `inotify::*`):
//! every change is made by a separate process (sh, mv, python3, truncate, ln, setfattr,
//! touch, chmod) in a temp dir, and the records the watcher reports are polled with bounded
//! waits.
//!
//! A watcher the machine cannot run is skipped with a message, unless env `CI` is set: then it
//! is a failure, so CI can never pass by skipping.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use filesync::capture::{fanotify, inotify, CaptureError, WatchSpec, Watcher, WatcherKind};
use filesync::change::{Change, ChangeKind, ChangeSink, FileId, Source};
use parking_lot::{Condvar, Mutex, RwLock, RwLockReadGuard};

/// Upper bound for every wait on a record.
const WAIT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(10);
/// How long a test waits to be sure that something is *not* reported.
const QUIET: Duration = Duration::from_millis(300);
/// What `stop` may take.
const STOP_BOUND: Duration = Duration::from_millis(200);

/// The overflow test floods the filesystem, which every fanotify watcher of the other tests
/// sees too: it runs alone, the others share this lock.
static FLOOD: RwLock<()> = RwLock::new(());

/// Env var that makes [`child_process`] do its work: which scenario.
const CHILD_ENV: &str = "FILESYNC_CAPTURE_CHILD";
/// Linux capability number of CAP_SYS_ADMIN.
const CAP_SYS_ADMIN: libc::c_ulong = 21;

macro_rules! suite {
    ($($scenario:ident),* $(,)?) => {
        mod fanotify_watcher {
            $(#[test]
            fn $scenario() {
                super::$scenario(filesync::capture::WatcherKind::Fanotify);
            })*
        }
        mod inotify_watcher {
            $(#[test]
            fn $scenario() {
                super::$scenario(filesync::capture::WatcherKind::Inotify);
            })*
        }
    };
}

suite!(
    create_write_append_truncate,
    renames_inside,
    moves_across_the_boundary,
    unlink_mkdir_rmdir,
    same_name_churn,
    links_and_special_files,
    attributes,
    deep_new_directories,
    nothing_from_outside,
    ignored_pids,
    overflow_means_rescan,
    watched_folder_removed_or_moved,
    stop_is_bounded,
    without_cap_sys_admin,
);

/// A sink that keeps every record, and can hold the watcher's thread inside `record` to let
/// the kernel queue overflow.
#[derive(Default)]
struct Collect {
    records: Mutex<Vec<Change>>,
    paused: Mutex<bool>,
    resumed: Condvar,
    /// A record is being held by `paused`.
    holding: AtomicBool,
}

impl ChangeSink for Collect {
    fn record(&self, change: Change) {
        let mut paused = self.paused.lock();
        let deadline = Instant::now() + Duration::from_secs(30);
        while *paused && Instant::now() < deadline {
            self.holding.store(true, Ordering::Release);
            self.resumed.wait_until(&mut paused, deadline);
        }
        drop(paused);
        self.records.lock().push(change);
    }
}

impl Collect {
    fn pause(&self) {
        *self.paused.lock() = true;
    }

    fn resume(&self) {
        *self.paused.lock() = false;
        self.resumed.notify_all();
    }
}

fn start_watcher(
    kind: WatcherKind,
    spec: &WatchSpec,
    sink: Arc<Collect>,
) -> Result<Box<dyn Watcher>, CaptureError> {
    match kind {
        WatcherKind::Fanotify => fanotify::start(spec, sink),
        WatcherKind::Inotify => inotify::start(spec, sink),
        other => panic!("{other:?} is not a fallback watcher"),
    }
}

fn source_of(kind: WatcherKind) -> Source {
    match kind {
        WatcherKind::Fanotify => Source::Fanotify,
        _ => Source::Inotify,
    }
}

/// A running watcher on `<tmp>/watched`, next to `<tmp>/outside` and `<tmp>/watched2` (a
/// sibling whose name starts with the watched folder's name).
struct Fixture {
    kind: WatcherKind,
    root: PathBuf,
    outside: PathBuf,
    sibling: PathBuf,
    sink: Arc<Collect>,
    watcher: Option<Box<dyn Watcher>>,
    _tmp: tempfile::TempDir,
    _shared: Option<RwLockReadGuard<'static, ()>>,
}

impl Fixture {
    /// Starts `kind` on a fresh folder; `None` (after a message) when the machine cannot run
    /// it and CI is not set.
    fn start(kind: WatcherKind, ignore_pids: Vec<u32>) -> Option<Fixture> {
        let shared = FLOOD.read();
        let mut fixture = Self::start_alone(kind, ignore_pids)?;
        fixture._shared = Some(shared);
        Some(fixture)
    }

    /// [`Fixture::start`] for a test that holds [`FLOOD`] itself.
    fn start_alone(kind: WatcherKind, ignore_pids: Vec<u32>) -> Option<Fixture> {
        let tmp = tempfile::Builder::new()
            .prefix("filesync-capture-")
            .tempdir_in("/tmp")
            .expect("create temp dir in /tmp");
        let base = tmp.path().canonicalize().expect("canonicalize temp dir");
        let root = base.join("watched");
        let outside = base.join("outside");
        let sibling = base.join("watched2");
        for dir in [&root, &outside, &sibling] {
            fs::create_dir(dir).expect("create test folder");
        }
        let sink = Arc::new(Collect::default());
        let spec = WatchSpec {
            root: root.clone(),
            ignore_pids,
        };
        let watcher = match start_watcher(kind, &spec, sink.clone()) {
            Ok(watcher) => watcher,
            Err(CaptureError::Unavailable { reason, .. }) => {
                if std::env::var_os("CI").is_some() {
                    panic!("the {kind:?} watcher cannot run here (CI is set, so this is a failure): {reason}");
                }
                eprintln!("SKIP: the {kind:?} watcher cannot run here: {reason}");
                return None;
            }
            Err(err) => panic!("starting the {kind:?} watcher failed: {err}"),
        };
        assert_eq!(watcher.kind(), kind);
        Some(Fixture {
            kind,
            root,
            outside,
            sibling,
            sink,
            watcher: Some(watcher),
            _tmp: tmp,
            _shared: None,
        })
    }

    /// Runs `script` with `sh -c` in the watched folder ($OUT and $SIB name the outside
    /// folders) and returns the shell's pid.
    fn sh(&self, script: &str) -> u32 {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&self.root)
            .env("OUT", &self.outside)
            .env("SIB", &self.sibling)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sh");
        let pid = child.id();
        let status = child.wait().expect("wait for sh");
        assert!(status.success(), "`{script}` failed: {status}");
        pid
    }

    fn records(&self) -> Vec<Change> {
        self.sink.records.lock().clone()
    }

    fn clear(&self) {
        self.sink.records.lock().clear();
    }

    /// Waits (bounded) for a record that `matches`; panics with everything seen otherwise.
    fn wait_for(&self, what: &str, matches: impl Fn(&Change) -> bool) -> Change {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(found) = self.records().into_iter().find(&matches) {
                return found;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{:?}: no record for {what} within {WAIT:?}; got {:#?}",
                    self.kind,
                    self.records()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for a record of `path` whose kind `matches`, and checks what every record of this
    /// watcher carries.
    fn expect(&self, path: &str, what: &str, matches: impl Fn(&ChangeKind) -> bool) -> Change {
        let found = self.wait_for(&format!("{what} of {path}"), |change| {
            change.path.as_deref() == Some(Path::new(path)) && matches(&change.kind)
        });
        assert_eq!(found.source, source_of(self.kind));
        if self.kind == WatcherKind::Inotify {
            assert_eq!(found.pid, None, "inotify cannot know the pid: {found:?}");
        }
        found
    }

    /// Makes a change and holds the watcher's thread in the sink with its record, so that
    /// what follows stays in the kernel queue until `sink.resume()`.
    fn hold(&self) {
        self.sink.pause();
        self.sh("echo held > held");
        let deadline = Instant::now() + WAIT;
        while !self.sink.holding.load(Ordering::Acquire) {
            assert!(
                Instant::now() < deadline,
                "the watcher never reported `held`"
            );
            std::thread::sleep(POLL);
        }
    }

    fn stat_id(&self, path: &str) -> FileId {
        let meta = fs::symlink_metadata(self.root.join(path)).expect("stat test file");
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Never leave a thread blocked in the sink behind a failed assertion.
        self.sink.resume();
        if let Some(watcher) = self.watcher.take() {
            watcher.stop();
        }
    }
}

fn is_rename_to(kind: &ChangeKind, to: &str) -> bool {
    matches!(kind, ChangeKind::Rename { to: Some(target), exchange: false } if target == Path::new(to))
}

fn create_write_append_truncate(kind: WatcherKind) {
    let Some(fx) = Fixture::start(kind, Vec::new()) else {
        return;
    };
    let pid = fx.sh("echo hello > f");
    let created = fx.expect("f", "create", |k| *k == ChangeKind::Create);
    assert_eq!(created.file, Some(fx.stat_id("f")));
    if kind == WatcherKind::Fanotify {
        assert_eq!(
            created.pid,
            Some(pid),
            "fanotify reports the writing process"
        );
    }
    fx.expect("f", "write", |k| *k == ChangeKind::Modified);
    fx.expect("f", "close", |k| *k == ChangeKind::Closed);

    fx.clear();
    fx.sh(r#"python3 -c "import os; fd = os.open('f', os.O_WRONLY); os.pwrite(fd, b'J', 0); os.close(fd)""#);
    fx.expect("f", "write in place", |k| *k == ChangeKind::Modified);
    fx.expect("f", "close", |k| *k == ChangeKind::Closed);

    fx.clear();
    fx.sh("echo more >> f");
    fx.expect("f", "append", |k| *k == ChangeKind::Modified);
    fx.expect("f", "close", |k| *k == ChangeKind::Closed);

    fx.clear();
    fx.sh("truncate -s 3 f");
    fx.expect("f", "truncate", |k| *k == ChangeKind::Modified);
}

fn renames_inside(kind: WatcherKind) {
    let Some(fx) = Fixture::start(kind, Vec::new()) else {
        return;
    };
    fx.sh("echo a > f && mkdir d && echo x > d/x");
    fx.expect("d/x", "create", |k| *k == ChangeKind::Create);

    fx.clear();
    fx.sh("mv f g");
    fx.expect("f", "rename to g", |k| is_rename_to(k, "g"));

    fx.sh("mv d e");
    fx.expect("d", "rename to e", |k| is_rename_to(k, "e"));
    // The renamed directory is still watched, under its new name.
    fx.sh("echo y > e/y");
    fx.expect("e/y", "create", |k| *k == ChangeKind::Create);

    // Renamed before the watcher could handle its creation.
    fx.sh("mkdir -p e/sub && mv e/sub e/sub2 && echo z > e/sub2/z");
    fx.expect("e/sub2/z", "create", |k| *k == ChangeKind::Create);
    fx.sh("echo w > e/sub2/w");
    fx.expect("e/sub2/w", "create", |k| *k == ChangeKind::Create);
}

fn moves_across_the_boundary(kind: WatcherKind) {
    let Some(fx) = Fixture::start(kind, Vec::new()) else {
        return;
    };
    fx.sh(
        r#"echo in > "$OUT/file" && mkdir -p "$OUT/dir/inner" && echo deep > "$OUT/dir/inner/f""#,
    );

    fx.sh(r#"mv "$OUT/file" file"#);
    let moved = fx.expect("file", "move in", |k| *k == ChangeKind::Create);
    assert_eq!(moved.file, Some(fx.stat_id("file")));

    // A directory moved in comes with everything in it.
    fx.sh(r#"mv "$OUT/dir" dir"#);
    fx.expect("dir", "move in", |k| *k == ChangeKind::Mkdir);
    fx.expect("dir/inner", "content of a moved-in directory", |k| {
        *k == ChangeKind::Mkdir
    });
    fx.expect("dir/inner/f", "content of a moved-in directory", |k| {
        *k == ChangeKind::Create
    });
    fx.sh("echo more > dir/inner/g");
    fx.expect("dir/inner/g", "create", |k| *k == ChangeKind::Create);

    fx.sh(r#"mv file "$OUT/file""#);
    fx.expect("file", "move out", |k| *k == ChangeKind::Unlink);
    fx.sh(r#"mv dir "$OUT/dir""#);
    fx.expect("dir", "move out", |k| *k == ChangeKind::Rmdir);

    // What was moved out is not watched any more.
    fx.clear();
    fx.sh(r#"echo after > "$OUT/dir/inner/h" && echo x >> "$OUT/file" && echo m > marker"#);
    fx.expect("marker", "create", |k| *k == ChangeKind::Create);
    std::thread::sleep(QUIET);
    let stray: Vec<Change> = fx
        .records()
        .into_iter()
        .filter(|c| c.path.as_deref() != Some(Path::new("marker")))
        .collect();
    assert!(stray.is_empty(), "records from moved-out files: {stray:#?}");
}

fn unlink_mkdir_rmdir(kind: WatcherKind) {
    let Some(fx) = Fixture::start(kind, Vec::new()) else {
        return;
    };
    fx.sh("echo x > f && mkdir d");
    fx.expect("f", "create", |k| *k == ChangeKind::Create);
    let made = fx.expect("d", "mkdir", |k| *k == ChangeKind::Mkdir);
    assert_eq!(made.file, Some(fx.stat_id("d")));

    fx.clear();
    fx.sh("rm f");
    fx.expect("f", "unlink", |k| *k == ChangeKind::Unlink);
    fx.sh("rmdir d");
    fx.expect("d", "rmdir", |k| *k == ChangeKind::Rmdir);
}

/// A name removed and made again (or made and removed) by one process in quick succession: the
/// kernel may merge those events into one without their order, and the records must still
/// end in the name's final state.
fn same_name_churn(kind: WatcherKind) {
    let Some(fx) = Fixture::start(kind, Vec::new()) else {
        return;
    };
    fx.sh("echo 0 > y");
    fx.expect("y", "create", |k| *k == ChangeKind::Create);
    fx.clear();
    // Held in the sink, the watcher leaves the events queued, where the kernel may merge them.
    fx.hold();
    fx.sh(r#"python3 -c "import os
open('x', 'w').write('1')
os.unlink('x')
os.unlink('y')
open('y', 'w').write('2')
open('marker', 'w').close()""#);
    fx.sink.resume();
    fx.expect("marker", "create", |k| *k == ChangeKind::Create);
    std::thread::sleep(QUIET);
    let records = fx.records();
    let lifecycle = |name: &str| -> Vec<ChangeKind> {
        records
            .iter()
            .filter(|c| c.path.as_deref() == Some(Path::new(name)))
            .filter(|c| matches!(c.kind, ChangeKind::Create | ChangeKind::Unlink))
            .map(|c| c.kind.clone())
            .collect()
    };
    assert_eq!(
        lifecycle("x"),
        [ChangeKind::Create, ChangeKind::Unlink],
        "{records:#?}"
    );
    assert_eq!(
        lifecycle("y"),
        [ChangeKind::Unlink, ChangeKind::Create],
        "{records:#?}"
    );
}

fn links_and_special_files(kind: WatcherKind) {
    let Some(fx) = Fixture::start(kind, Vec::new()) else {
        return;
    };
    fx.sh("echo x > target");
    fx.expect("target", "create", |k| *k == ChangeKind::Create);

    fx.sh("ln -s target sym");
    let sym = fx.expect(
        "sym",
        "symlink",
        |k| matches!(k, ChangeKind::Symlink { target } if target == Path::new("target")),
    );
    assert_eq!(sym.file, Some(fx.stat_id("sym")));

    fx.sh("ln target hard");
    let hard = fx.expect("hard", "hard link", |k| {
        *k == ChangeKind::Link { existing: None }
    });
    assert_eq!(
        hard.file,
        Some(fx.stat_id("target")),
        "the link names its file"
    );

    fx.sh("mkfifo fifo");
    fx.expect(
        "fifo",
        "mkfifo",
        |k| matches!(k, ChangeKind::Mknod { mode, .. } if mode & libc::S_IFMT == libc::S_IFIFO),
    );
}

fn attributes(kind: WatcherKind) {
    let Some(fx) = Fixture::start(kind, Vec::new()) else {
        return;
    };
    let setattr = |k: &ChangeKind| matches!(k, ChangeKind::SetAttr(_));
    fx.sh("echo x > f && mkdir d");
    fx.expect("d", "mkdir", |k| *k == ChangeKind::Mkdir);

    for (what, script) in [
        ("chmod", "chmod 600 f"),
        ("utimes", "touch -d '2001-02-03 04:05:06' f"),
        ("setxattr", "setfattr -n user.filesync -v 1 f"),
        ("removexattr", "setfattr -x user.filesync f"),
    ] {
        fx.clear();
        fx.sh(script);
        fx.expect("f", what, setattr);
    }

    fx.clear();
    fx.sh("chmod 700 d");
    fx.expect("d", "chmod of a directory", setattr);
    fx.clear();
    fx.sh("chmod 750 .");
    fx.expect("", "chmod of the watched folder", setattr);
}

fn deep_new_directories(kind: WatcherKind) {
    let Some(fx) = Fixture::start(kind, Vec::new()) else {
        return;
    };
    // The files are made before a watcher can have watched the new directories.
    fx.sh("mkdir -p a/b/c && echo f > a/b/c/f && echo g > a/b/g");
    for dir in ["a", "a/b", "a/b/c"] {
        fx.expect(dir, "mkdir -p", |k| *k == ChangeKind::Mkdir);
    }
    fx.expect("a/b/c/f", "create in a new directory", |k| {
        *k == ChangeKind::Create
    });
    fx.expect("a/b/g", "create in a new directory", |k| {
        *k == ChangeKind::Create
    });
    fx.sh("echo h > a/b/c/h");
    fx.expect("a/b/c/h", "create", |k| *k == ChangeKind::Create);
}

fn nothing_from_outside(kind: WatcherKind) {
    let Some(fx) = Fixture::start(kind, Vec::new()) else {
        return;
    };
    for dir in ["$OUT", "$SIB"] {
        fx.sh(&format!(
            r#"echo x > "{dir}/o" && echo y >> "{dir}/o" && chmod 600 "{dir}/o" && mv "{dir}/o" "{dir}/p" && ln -s p "{dir}/s" && rm "{dir}/p" "{dir}/s" && mkdir "{dir}/od" && rmdir "{dir}/od""#
        ));
    }
    fx.sh("echo m > marker");
    fx.expect("marker", "create", |k| *k == ChangeKind::Create);
    std::thread::sleep(QUIET);
    let stray: Vec<Change> = fx
        .records()
        .into_iter()
        .filter(|c| c.path.as_deref() != Some(Path::new("marker")))
        .collect();
    assert!(
        stray.is_empty(),
        "records from outside the watched folder: {stray:#?}"
    );
}

fn ignored_pids(kind: WatcherKind) {
    let own = std::process::id();
    let Some(fx) = Fixture::start(kind, vec![own]) else {
        return;
    };
    // From this process, which the spec ignores.
    fs::write(fx.root.join("mine"), b"x").expect("write from the test process");
    fs::rename(fx.root.join("mine"), fx.root.join("mine2")).expect("rename");
    fs::remove_file(fx.root.join("mine2")).expect("unlink");
    fs::create_dir(fx.root.join("mydir")).expect("mkdir");

    let pid = fx.sh("echo t > theirs");
    let theirs = fx.expect("theirs", "create by another process", |k| {
        *k == ChangeKind::Create
    });
    if kind == WatcherKind::Inotify {
        // inotify knows no pids: it cannot ignore any, and says so by reporting None.
        fx.expect("mine", "create by the test process", |k| {
            *k == ChangeKind::Create
        });
        return;
    }
    assert_eq!(theirs.pid, Some(pid));
    std::thread::sleep(QUIET);
    let mine: Vec<Change> = fx
        .records()
        .into_iter()
        .filter(|c| c.path.as_deref() != Some(Path::new("theirs")))
        .collect();
    assert!(mine.is_empty(), "records of an ignored pid: {mine:#?}");
}

fn overflow_means_rescan(kind: WatcherKind) {
    let _alone = FLOOD.write();
    let Some(fx) = Fixture::start_alone(kind, Vec::new()) else {
        return;
    };
    let queue: usize = fs::read_to_string(match kind {
        WatcherKind::Fanotify => "/proc/sys/fs/fanotify/max_queued_events",
        _ => "/proc/sys/fs/inotify/max_queued_events",
    })
    .expect("read the queue length")
    .trim()
    .parse()
    .expect("queue length is a number");

    // Hold the watcher's thread in the sink so that nothing drains the kernel queue.
    fx.hold();
    // Each file is at least a creation and a close: twice the queue's length in events.
    fx.sh(&format!(
        r#"python3 -c "import os
for i in range({queue}):
    os.close(os.open('flood%d' % i, os.O_CREAT | os.O_WRONLY))""#
    ));
    let resumed = Instant::now();
    fx.sink.resume();
    let rescan = fx.wait_for("Rescan after an overflow", |c| c.kind == ChangeKind::Rescan);
    assert_eq!(rescan.path, None);
    assert_eq!(rescan.source, source_of(kind));
    eprintln!(
        "{kind:?}: Rescan {:?} after draining a full queue of {queue}",
        resumed.elapsed()
    );

    // Still watching after the overflow.
    fx.sh("echo after > after");
    fx.expect("after", "create after an overflow", |k| {
        *k == ChangeKind::Create
    });
}

/// Nothing below a removed or moved watched folder can be reported any more: the watcher says
/// so with a `Rescan`, which makes the caller look at the folder.
fn watched_folder_removed_or_moved(kind: WatcherKind) {
    for how in ["rmdir", "mv"] {
        let Some(fx) = Fixture::start(kind, Vec::new()) else {
            return;
        };
        let script = match how {
            "rmdir" => format!("cd / && rmdir '{}'", fx.root.display()),
            _ => format!(
                "mv '{}' '{}/moved'",
                fx.root.display(),
                fx.outside.display()
            ),
        };
        let status = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .status()
            .expect("run sh");
        assert!(status.success(), "`{script}` failed");
        let rescan = fx.wait_for(&format!("Rescan after {how}"), |c| {
            c.kind == ChangeKind::Rescan
        });
        assert_eq!(rescan.path, None);
    }
}

fn stop_is_bounded(kind: WatcherKind) {
    let Some(mut fx) = Fixture::start(kind, Vec::new()) else {
        return;
    };
    fx.sh("echo x > f");
    fx.expect("f", "create", |k| *k == ChangeKind::Create);

    // Stop while changes keep arriving.
    let mut busy = Command::new("sh")
        .arg("-c")
        .arg("i=0; while [ $i -lt 2000 ]; do echo $i > busy$i; i=$((i+1)); done")
        .current_dir(&fx.root)
        .spawn()
        .expect("spawn busy writer");
    std::thread::sleep(Duration::from_millis(50));
    let watcher = fx.watcher.take().expect("watcher is running");
    let started = Instant::now();
    watcher.stop();
    let took = started.elapsed();
    eprintln!("{kind:?}: stop took {took:?} under load");
    assert!(took <= STOP_BOUND, "stop took {took:?}");

    let seen = fx.records().len();
    assert!(busy.wait().expect("wait for busy writer").success());
    fx.sh("echo y > after");
    std::thread::sleep(QUIET);
    assert_eq!(fx.records().len(), seen, "records after stop");
}

/// fanotify needs CAP_SYS_ADMIN and must say it is unavailable without it, so that the caller
/// falls back; inotify needs nothing. Runs [`child_process`] in a copy of this test binary
/// whose capability bounding set lacks CAP_SYS_ADMIN.
fn without_cap_sys_admin(kind: WatcherKind) {
    let _shared = FLOOD.read();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var_os("CI").is_some() {
            panic!("dropping CAP_SYS_ADMIN needs root (CI is set, so this is a failure)");
        }
        eprintln!("SKIP: dropping CAP_SYS_ADMIN needs root");
        return;
    }
    let mut child = Command::new(std::env::current_exe().expect("path of the test binary"));
    // SAFETY: the closure makes one async-signal-safe system call.
    unsafe {
        child.pre_exec(|| {
            // Gone from the bounding set, the capability is not regained by exec as root.
            if libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_ADMIN, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let scenario = match kind {
        WatcherKind::Fanotify => "fanotify-unprivileged",
        _ => "inotify-unprivileged",
    };
    run_child(scenario, child);
}

/// When the inotify watches run out, what cannot be watched is left to the periodic scan and
/// a `Rescan` says so. Runs [`child_process`] in a new user namespace, whose own
/// max_inotify_watches can be lowered without touching the rest of the machine.
#[test]
fn inotify_watch_limit() {
    let _shared = FLOOD.read();
    let unshare = Command::new("unshare")
        .args(["--user", "--map-root-user", "true"])
        .status();
    if !unshare.is_ok_and(|status| status.success()) {
        if std::env::var_os("CI").is_some() {
            panic!(
                "cannot make a user namespace with unshare(1) (CI is set, so this is a failure)"
            );
        }
        eprintln!("SKIP: cannot make a user namespace with unshare(1)");
        return;
    }
    let mut child = Command::new("unshare");
    child
        .args(["--user", "--map-root-user"])
        .arg(std::env::current_exe().expect("path of the test binary"));
    run_child("inotify-watch-limit", child);
}

/// Runs the test [`child_process`] with `scenario` through `command` (the test binary, maybe
/// behind a wrapper) and checks that it passed.
fn run_child(scenario: &str, mut command: Command) {
    command
        .args([
            "--exact",
            "child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, scenario);
    let output = command.output().expect("run the child test process");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child process for {scenario} failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("1 passed"),
        "the child ran no test:\n{stdout}"
    );
}

/// The work of the tests that need a changed process ([`run_child`]); does nothing in a normal
/// run.
#[test]
fn child_process() {
    let Ok(scenario) = std::env::var(CHILD_ENV) else {
        return;
    };
    let tmp = tempfile::tempdir_in("/tmp").expect("create temp dir");
    let spec = WatchSpec {
        root: tmp.path().canonicalize().expect("canonicalize temp dir"),
        ignore_pids: Vec::new(),
    };
    let sink = Arc::new(Collect::default());
    let wait_for = |what: &str, matches: &dyn Fn(&Change) -> bool| {
        let deadline = Instant::now() + WAIT;
        while !sink.records.lock().iter().any(matches) {
            assert!(
                Instant::now() < deadline,
                "no record for {what}; got {:#?}",
                sink.records.lock()
            );
            std::thread::sleep(POLL);
        }
    };
    match scenario.as_str() {
        "fanotify-unprivileged" | "inotify-unprivileged" => {
            let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
            let effective = status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))
                .and_then(|caps| u64::from_str_radix(caps.trim(), 16).ok())
                .expect("CapEff in /proc/self/status");
            assert_eq!(
                effective & (1 << CAP_SYS_ADMIN),
                0,
                "CAP_SYS_ADMIN was not dropped"
            );
        }
        "inotify-watch-limit" => {
            // The root and two directories get a watch; two do not.
            fs::write("/proc/sys/user/max_inotify_watches", "3")
                .expect("lower max_inotify_watches in the new user namespace");
            for dir in ["d1", "d2", "d3", "d4"] {
                fs::create_dir(spec.root.join(dir)).expect("create test folder");
            }
        }
        other => panic!("unknown child scenario {other}"),
    }
    if scenario == "fanotify-unprivileged" {
        match fanotify::start(&spec, sink) {
            Err(CaptureError::Unavailable { kind, reason }) => {
                assert_eq!(kind, WatcherKind::Fanotify);
                assert!(reason.contains("CAP_SYS_ADMIN"), "reason: {reason}");
                eprintln!("fanotify without CAP_SYS_ADMIN: {reason}");
            }
            Err(err) => panic!("expected Unavailable, got {err}"),
            Ok(_) => panic!("fanotify started without CAP_SYS_ADMIN"),
        }
        return;
    }
    let watcher = inotify::start(&spec, sink.clone()).expect("start inotify");
    if scenario == "inotify-watch-limit" {
        assert_eq!(
            sink.records.lock().as_slice(),
            [Change {
                path: None,
                file: None,
                kind: ChangeKind::Rescan,
                source: Source::Inotify,
                pid: None,
            }],
            "one Rescan for the directories left unwatched at start"
        );
        sink.records.lock().clear();
        fs::create_dir(spec.root.join("new")).expect("mkdir");
        wait_for("Mkdir of new", &|c| {
            c.path.as_deref() == Some(Path::new("new")) && c.kind == ChangeKind::Mkdir
        });
        wait_for("Rescan for the unwatched new directory", &|c| {
            c.kind == ChangeKind::Rescan
        });
    }
    // Still reporting what happens where it has watches.
    fs::write(spec.root.join("f"), b"x").expect("write a file");
    wait_for("Create of f", &|c| {
        c.path.as_deref() == Some(Path::new("f")) && c.kind == ChangeKind::Create
    });
    watcher.stop();
}
