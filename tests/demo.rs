//! `filesync demo` runs to completion on its own, and whether it ends normally or by
//! Ctrl-C it leaves no mount, no process and no temporary folder behind. Each run gets its
//! own `TMPDIR`, so "nothing behind" means that folder is empty again.

mod common;

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

#[test]
fn an_interrupted_demo_cleans_up() {
    if !common::fuse_available() {
        return;
    }
    let tmp = demo_tmpdir();
    let output = tmp.path().join("..").join(format!(
        "{}.out",
        tmp.path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let mut demo = Command::new(BIN)
        .arg("demo")
        .env("TMPDIR", tmp.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&output).expect("demo output file"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start filesync demo");
    // Interrupt once node b is mounted: a daemon runs and its mount is live.
    let deadline = Instant::now() + DEMO_LIMIT;
    while !std::fs::read_to_string(&output)
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
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
    unsafe { libc::kill(demo.id() as libc::pid_t, libc::SIGINT) };
    let status = common::wait_child(&mut demo, DEMO_LIMIT).unwrap_or_else(|| {
        let _ = demo.kill();
        panic!("the interrupted demo did not exit");
    });
    let shown = std::fs::read_to_string(&output).unwrap_or_default();
    let _ = std::fs::remove_file(&output);
    assert!(!status.success(), "an interrupted demo fails: {shown}");
    assert_nothing_left(tmp.path());
}
