//! Bad input to `filesync mount`: each case must exit non-zero within a bounded time, print
//! exactly one line on stderr that names the problem, and leave nothing mounted at MNT.

mod common;

use common::{fuse_available, mkdir_mode, mount_type, open_tempdir, run, unmount, BIN};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Every mount stacked at exactly `mnt`, bottom first, by fstype.
fn stack(mnt: &Path) -> Vec<String> {
    common::mounts()
        .into_iter()
        .filter(|(mp, _, _)| mp == mnt)
        .map(|(_, t, _)| t)
        .collect()
}

/// On drop, removes any mount that a wrongly successful case stacked on MNT (in the foreground
/// it would serve until the run() timeout killed it), leaving pre-existing mounts alone.
struct Cleanup(PathBuf, usize);

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Bounded: one attempt per extra layer, plus one.
        for _ in 0..=stack(&self.0).len() {
            if stack(&self.0).len() <= self.1 {
                return;
            }
            unmount_top(&self.0);
        }
    }
}

/// Unmounts only the topmost mount at `mnt`.
fn unmount_top(mnt: &Path) {
    let c = common::cpath(mnt);
    // SAFETY: NUL-terminated path; a lazy detach never blocks on a dead daemon.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// Runs `filesync mount src mnt --foreground [-o opts]` and checks the refusal. `keywords`:
/// the one stderr line must contain at least one of them (case-insensitive).
fn expect_refused(src: &Path, mnt: &Path, opts: Option<&str>, keywords: &[&str]) {
    let before = stack(mnt);
    let _cleanup = Cleanup(mnt.to_path_buf(), before.len());
    let mut cmd = Command::new(BIN);
    cmd.arg("mount").arg(src).arg(mnt).arg("--foreground");
    if let Some(o) = opts {
        cmd.arg("-o").arg(o);
    }
    // Logging configuration from the environment must not add lines to stderr.
    cmd.env_remove("RUST_LOG");
    let out = run(&mut cmd, Duration::from_secs(10));
    let what = format!(
        "filesync mount {} {} -o {opts:?}",
        src.display(),
        mnt.display()
    );
    assert!(
        !out.status.success(),
        "{what}: must fail, exited {}",
        out.status
    );
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: stderr must be exactly one line, got:\n{}",
        out.stderr
    );
    let line = lines[0].to_lowercase();
    assert!(
        keywords.iter().any(|k| line.contains(&k.to_lowercase())),
        "{what}: the message should name the problem (one of {keywords:?}): {}",
        lines[0]
    );
    assert_eq!(
        stack(mnt),
        before,
        "{what}: nothing new may be mounted at MNT"
    );
}

/// A temp root with `src` and `mnt` empty dirs.
fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = open_tempdir();
    let (src, mnt) = (tmp.path().join("src"), tmp.path().join("mnt"));
    mkdir_mode(&src, 0o755);
    mkdir_mode(&mnt, 0o755);
    (tmp, src, mnt)
}

const MISSING: &[&str] = &["exist", "no such", "not found", "missing"];
const NOT_DIR: &[&str] = &["director", "not a dir"];
const NESTED: &[&str] = &[
    "inside", "within", "overlap", "nested", "contain", "beneath", "below", "under",
];

#[test]
fn source_missing() {
    if !fuse_available() {
        return;
    }
    let (tmp, _, mnt) = dirs();
    expect_refused(&tmp.path().join("nope"), &mnt, None, MISSING);
}

#[test]
fn source_not_a_directory() {
    if !fuse_available() {
        return;
    }
    let (tmp, _, mnt) = dirs();
    let file = tmp.path().join("file");
    fs::write(&file, b"x").expect("write file");
    expect_refused(&file, &mnt, None, NOT_DIR);
}

#[test]
fn mountpoint_missing() {
    if !fuse_available() {
        return;
    }
    let (tmp, src, _) = dirs();
    expect_refused(&src, &tmp.path().join("nope"), None, MISSING);
}

#[test]
fn mountpoint_not_a_directory() {
    if !fuse_available() {
        return;
    }
    let (tmp, src, _) = dirs();
    let file = tmp.path().join("file");
    fs::write(&file, b"x").expect("write file");
    expect_refused(&src, &file, None, NOT_DIR);
}

#[test]
fn mountpoint_not_empty() {
    if !fuse_available() {
        return;
    }
    let (_tmp, src, mnt) = dirs();
    fs::write(mnt.join("stray"), b"x").expect("write stray");
    expect_refused(&src, &mnt, None, &["empty"]);
    assert!(
        mnt.join("stray").exists(),
        "the stray file must be untouched"
    );
}

#[test]
fn mountpoint_inside_source() {
    if !fuse_available() {
        return;
    }
    let (_tmp, src, _) = dirs();
    let inner = src.join("inner");
    mkdir_mode(&inner, 0o755);
    expect_refused(&src, &inner, None, NESTED);
}

#[test]
fn source_inside_mountpoint() {
    if !fuse_available() {
        return;
    }
    let (_tmp, _, mnt) = dirs();
    let inner = mnt.join("inner");
    mkdir_mode(&inner, 0o755);
    // MNT is then also not empty; either complaint names a real problem.
    let mut keys = NESTED.to_vec();
    keys.push("empty");
    expect_refused(&inner, &mnt, None, &keys);
}

#[test]
fn source_equals_mountpoint() {
    if !fuse_available() {
        return;
    }
    let (_tmp, src, _) = dirs();
    let mut keys = NESTED.to_vec();
    keys.extend(["same", "itself"]);
    expect_refused(&src, &src, None, &keys);
}

/// Mounts a tmpfs at the path for the duration, so it is "already a mount point".
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Tmpfs {
        let c = common::cpath(at);
        let (fstype, what) = (common::cstr("tmpfs"), common::cstr("filesync-test"));
        // SAFETY: NUL-terminated strings and no data argument.
        let r = unsafe {
            libc::mount(
                what.as_ptr(),
                c.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "mount tmpfs: {}", common::errname(common::errno()));
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        unmount(&self.0);
    }
}

#[test]
fn mountpoint_already_a_mount_point() {
    if !fuse_available() {
        return;
    }
    let (_tmp, src, mnt) = dirs();
    let _t = Tmpfs::mount(&mnt);
    assert_eq!(mount_type(&mnt).as_deref(), Some("tmpfs"));
    expect_refused(&src, &mnt, None, &["mount"]);
    assert_eq!(
        mount_type(&mnt).as_deref(),
        Some("tmpfs"),
        "the tmpfs must still be on top"
    );
}

#[test]
fn mountpoint_already_a_filesync_mount() {
    let Some(m) = common::setup(&[]) else { return };
    let (_tmp, other_src, _) = dirs();
    expect_refused(&other_src, m.mnt(), None, &["mount"]);
    // The original mount still serves.
    fs::write(m.m("still"), b"ok").expect("write through the original mount");
    assert_eq!(fs::read(m.s("still")).expect("read src"), b"ok");
}

#[test]
fn unknown_option_is_named() {
    if !fuse_available() {
        return;
    }
    let (_tmp, src, mnt) = dirs();
    expect_refused(&src, &mnt, Some("colour=red"), &["colour"]);
}

#[test]
fn malformed_threads_value() {
    if !fuse_available() {
        return;
    }
    let (_tmp, src, mnt) = dirs();
    expect_refused(&src, &mnt, Some("threads=abc"), &["threads"]);
}

#[test]
fn malformed_passthrough_value() {
    if !fuse_available() {
        return;
    }
    let (_tmp, src, mnt) = dirs();
    expect_refused(&src, &mnt, Some("passthrough=maybe"), &["passthrough"]);
}
