//! How a mount starts and ends: SIGTERM/SIGINT make the daemon unmount itself and exit, an
//! external umount makes it exit, and without --foreground the command detaches and returns 0
//! only once the mount is in place.

mod common;

use common::{fuse_available, mkdir_mode, mount_type, open_tempdir, run, setup, unmount, BIN};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn stop_by_signal(sig: i32, name: &str) {
    let Some(mut m) = setup(&[]) else { return };
    fs::write(m.m("f"), b"before signal").expect("write");
    let status = m
        .signal_and_wait(sig)
        .unwrap_or_else(|| panic!("filesync did not exit within 10 s of {name}"));
    assert!(
        mount_type(m.mnt()).is_none(),
        "{name}: the daemon must unmount itself"
    );
    assert!(
        status.success(),
        "{name}: expected a clean exit, got {status}; stderr:\n{}",
        m.stderr()
    );
    assert_eq!(fs::read(m.s("f")).expect("read src"), b"before signal");
}

#[test]
fn sigterm_unmounts_and_exits() {
    stop_by_signal(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_unmounts_and_exits() {
    stop_by_signal(libc::SIGINT, "SIGINT");
}

#[test]
fn sigterm_with_busy_mount_still_exits() {
    let Some(mut m) = setup(&[]) else { return };
    fs::write(m.m("f"), b"x").expect("write");
    // An open file makes a plain unmount fail with EBUSY; the daemon must still go away and not
    // leave the mount point listed.
    let held = fs::File::open(m.m("f")).expect("open");
    let status = m.signal_and_wait(libc::SIGTERM);
    assert!(
        status.is_some(),
        "filesync must exit within 10 s of SIGTERM even while a file is open; stderr:\n{}",
        m.stderr()
    );
    assert!(
        mount_type(m.mnt()).is_none(),
        "mount still listed after SIGTERM"
    );
    drop(held);
}

#[test]
fn second_sigterm_after_busy_mount_is_released_exits() {
    let Some(mut m) = setup(&[]) else { return };
    fs::write(m.m("f"), b"x").expect("write");
    let held = fs::File::open(m.m("f")).expect("open");
    // Whatever the daemon does with a busy mount on the first signal...
    let exited = m.signal_and_check(libc::SIGTERM, Duration::from_secs(2));
    drop(held);
    if exited {
        return;
    }
    // ...a later signal, once nothing holds the mount, must still stop it.
    let status = m.signal_and_wait(libc::SIGTERM);
    assert!(
        status.is_some(),
        "a second SIGTERM (mount no longer busy) was ignored; stderr:\n{}",
        m.stderr()
    );
    assert!(mount_type(m.mnt()).is_none(), "mount still listed");
}

#[test]
fn external_umount_ends_the_daemon() {
    let Some(mut m) = setup(&[]) else { return };
    fs::write(m.m("f"), b"x").expect("write");
    let status = m
        .unmount_and_wait()
        .unwrap_or_else(|| panic!("filesync did not exit within 10 s of umount"));
    assert!(
        status.success(),
        "expected a clean exit after umount, got {status}; stderr:\n{}",
        m.stderr()
    );
}

/// Pids whose command line mentions `needle` (for finding the detached daemon).
fn pids_with_arg(needle: &Path) -> Vec<u32> {
    let needle = needle.as_os_str().as_encoded_bytes();
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).any(|a| a == needle))
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn background_mode_detaches_once_mounted() {
    if !fuse_available() {
        return;
    }
    let tmp = open_tempdir();
    let (src, mnt) = (tmp.path().join("src"), tmp.path().join("mnt"));
    mkdir_mode(&src, 0o755);
    mkdir_mode(&mnt, 0o755);
    struct Guard<'a>(&'a Path);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            unmount(self.0);
        }
    }
    let _guard = Guard(&mnt);
    // The detached daemon keeps its index and log in the test's temp dir, not the host's.
    let options = format!(
        "state_dir={},log_file={},telemetry=off",
        tmp.path().join("state").display(),
        tmp.path().join("daemon.log").display()
    );
    let out = run(
        Command::new(BIN)
            .arg("mount")
            .arg(&src)
            .arg(&mnt)
            .args(["-o", &options]),
        Duration::from_secs(15),
    );
    out.expect_ok("filesync mount without --foreground");
    // Returned 0 means mounted already: no polling here.
    assert_eq!(
        mount_type(&mnt).as_deref(),
        Some("fuse.filesync"),
        "must be mounted when the command returns"
    );
    fs::write(mnt.join("f"), b"detached").expect("write through detached mount");
    assert_eq!(fs::read(src.join("f")).expect("read src"), b"detached");
    let daemons = pids_with_arg(&mnt);
    assert!(
        !daemons.is_empty(),
        "a detached daemon serving the mount must be running"
    );
    unmount(&mnt);
    assert!(mount_type(&mnt).is_none());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids_with_arg(&mnt).is_empty() {
        assert!(
            Instant::now() < deadline,
            "detached daemon {daemons:?} still running 10 s after umount"
        );
        std::thread::sleep(common::POLL);
    }
}

#[test]
fn sigterm_drains_what_was_captured_into_the_index() {
    let Some(mut m) = setup(&[]) else { return };
    // Written just before the signal: the pipeline still holds these changes.
    for i in 0..50 {
        fs::write(m.m(&format!("f{i}")), format!("content {i}")).expect("write");
    }
    let status = m
        .signal_and_wait(libc::SIGTERM)
        .unwrap_or_else(|| panic!("filesync did not exit within 10 s of SIGTERM"));
    assert!(status.success(), "stderr:\n{}", m.stderr());
    // The index (which the next start compares with the folder) has every change: a scan
    // of the folder against it finds nothing left to pick up.
    let state = m.scratch().join("state");
    let out = run(
        Command::new(BIN)
            .arg("scan")
            .arg(m.src())
            .arg("--state-dir")
            .arg(&state)
            .arg("--list"),
        Duration::from_secs(30),
    );
    out.expect_ok("filesync scan");
    assert!(
        out.stdout.trim().is_empty(),
        "changes left out of the index at shutdown:\n{}",
        out.stdout
    );
}

#[test]
fn commands_given_only_the_mount_point_find_a_state_dir_set_by_option() {
    // The test mounts always use state_dir= in their own temp folder.
    let Some(mut m) = setup(&[]) else { return };
    let status = || {
        run(
            Command::new(BIN).arg("status").arg(m.mnt()).arg("--json"),
            Duration::from_secs(30),
        )
    };
    let out = status();
    out.expect_ok("filesync status MOUNTPOINT");
    assert!(
        out.stdout.contains(&*m.src().to_string_lossy()),
        "{}",
        out.stdout
    );
    let mnt = m.mnt().to_path_buf();
    m.signal_and_wait(libc::SIGTERM)
        .unwrap_or_else(|| panic!("filesync did not exit within 10 s of SIGTERM"));
    // Gone with the daemon: the command now looks in the default state folder.
    let out = run(
        Command::new(BIN).arg("status").arg(&mnt).arg("--json"),
        Duration::from_secs(30),
    );
    assert!(!out.ok(), "{}", out.stdout);
}
