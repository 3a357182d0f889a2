//! `filesync demo` runs to completion on its own, and whether it ends normally or by
//! Ctrl-C it leaves no mount, no process and no temporary folder behind. Each run gets its
//! own `TMPDIR`, so "nothing behind" means that folder is empty again.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{run, BIN};

/// The demo's own waits are bounded (20 s each); this bounds the whole run.
const DEMO_LIMIT: Duration = Duration::from_secs(120);

/// Panics unless `tmp` is empty and no mount or process refers to anything below it.
fn assert_nothing_left(tmp: &Path) {
    let needle = tmp.display().to_string();
    let left: Vec<_> = std::fs::read_dir(tmp)
        .expect("read the demo's TMPDIR")
        .flatten()
        .map(|entry| entry.path())
        .collect();
    assert!(left.is_empty(), "the demo left files behind: {left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read mounts");
    let mounted: Vec<_> = mounts
        .lines()
        .filter(|line| line.contains(&needle))
        .collect();
    assert!(
        mounted.is_empty(),
        "the demo left mounts behind: {mounted:?}"
    );
    let processes: Vec<String> = std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(&needle))
        .collect();
    assert!(
        processes.is_empty(),
        "the demo left processes behind: {processes:?}"
    );
}

fn demo_tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("filesync-demo-test-")
        .tempdir_in("/tmp")
        .expect("a TMPDIR for the demo")
}

#[test]
fn the_demo_shows_two_nodes_syncing_and_cleans_up() {
    if !common::fuse_available() {
        return;
    }
    let tmp = demo_tmpdir();
    let out = run(
        Command::new(BIN).arg("demo").env("TMPDIR", tmp.path()),
        DEMO_LIMIT,
    );
    out.expect_ok("filesync demo");
    let shown = &out.stdout;
    assert!(
        shown.contains("node b is mounted and listens on 127.0.0.1:"),
        "{shown}"
    );
    assert!(shown.contains("the nodes are connected"), "{shown}");
    let arrivals: Vec<&str> = shown
        .lines()
        .filter(|line| line.contains(" arrived on b after "))
        .collect();
    assert_eq!(
        arrivals.len(),
        4,
        "every file arrives with its latency:\n{shown}"
    );
    for line in &arrivals {
        assert!(line.trim_end().ends_with(" ms"), "{line}");
    }
    for name in ["hello.txt", "notes/today.md", "data.bin"] {
        assert!(
            shown.contains(&format!("  {name}\n")),
            "b lists {name}:\n{shown}"
        );
    }
    assert!(shown.contains("removed the demo folder"), "{shown}");
    assert_nothing_left(tmp.path());
}

/// Runs the demo until node b is mounted, then sends SIGINT to the demo alone or, as
/// Ctrl-C in a terminal does, to its whole process group (the daemons too).
fn interrupt_demo(whole_group: bool) {
    let tmp = demo_tmpdir();
    let logs = tempfile::tempdir().expect("a folder for the demo's output");
    let (stdout, stderr) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut demo = Command::new(BIN)
        .arg("demo")
        .env("TMPDIR", tmp.path())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).expect("demo output file"))
        .stderr(std::fs::File::create(&stderr).expect("demo error file"))
        .spawn()
        .expect("start filesync demo");
    let deadline = Instant::now() + DEMO_LIMIT;
    while !std::fs::read_to_string(&stdout)
        .unwrap_or_default()
        .contains("node b is mounted")
    {
        assert!(Instant::now() < deadline, "the demo did not mount node b");
        assert!(
            matches!(demo.try_wait(), Ok(None)),
            "the demo ended before node b was mounted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = demo.id() as libc::pid_t;
    let target = if whole_group { -pid } else { pid };
    // SAFETY: kill has no memory-safety preconditions; the target is our own child (and
    // the process group it leads).
    unsafe { libc::kill(target, libc::SIGINT) };
    let status = common::wait_child(&mut demo, DEMO_LIMIT).unwrap_or_else(|| {
        let _ = demo.kill();
        panic!("the interrupted demo did not exit");
    });
    let said = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(!status.success(), "an interrupted demo fails");
    assert!(
        said.contains("interrupted") && said.lines().count() == 1,
        "one line says the demo was interrupted:\n{said}"
    );
    assert_nothing_left(tmp.path());
}

#[test]
fn an_interrupted_demo_cleans_up() {
    if !common::fuse_available() {
        return;
    }
    interrupt_demo(false);
}

#[test]
fn ctrl_c_in_a_terminal_cleans_up() {
    if !common::fuse_available() {
        return;
    }
    interrupt_demo(true);
}
