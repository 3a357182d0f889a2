//! Running under systemd: the unit passes `systemd-analyze verify`, the daemon speaks the
//! notify protocol (READY=1, STATUS=, WATCHDOG=1, STOPPING=1) to the socket named by
//! `NOTIFY_SOCKET`, and its log suits the journal (no colours when not on a terminal, no
//! timestamps under `JOURNAL_STREAM`, level from `RUST_LOG` or `-o log=`).

mod common;

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{fuse_available, mkdir_mode, mount_type, open_tempdir, unmount, wait_child, BIN};

const UNIT: &str = include_str!("../systemd/filesync@.service");

/// Whether `systemd-analyze` is here; under CI its absence is a failure.
fn systemd_analyze_available() -> bool {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing (Debian package systemd); CI is set, so this is a failure"
        );
        eprintln!("SKIP: systemd-analyze is missing (Debian package systemd)");
    }
    found
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    if !systemd_analyze_available() {
        return;
    }
    let dir = open_tempdir();
    // verify checks that ExecStart names an executable: point it at the binary under test,
    // as `filesync install` points it at the installed one.
    let unit = UNIT.replace("/usr/local/bin/filesync", BIN);
    fs::write(dir.path().join("filesync@.service"), unit).expect("write unit");
    let instance = dir.path().join("filesync@mnt-data.service");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&instance)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Warnings about units of the host are not ours; any line naming our unit is.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("filesync")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify failed ({}):\n{stderr}",
        out.status
    );
}

/// A foreground mount of fresh folders under `dir`, with `env` added, logging to `stderr`.
fn spawn_mount(dir: &Path, opts: &str, env: &[(&str, String)], stderr: File) -> Child {
    let (src, mnt) = (dir.join("src"), dir.join("mnt"));
    mkdir_mode(&src, 0o755);
    mkdir_mode(&mnt, 0o755);
    let mut cmd = Command::new(BIN);
    cmd.arg("mount")
        .arg(&src)
        .arg(&mnt)
        .arg("--foreground")
        .arg("-o")
        .arg(format!(
            "state_dir={},telemetry=off{opts}",
            dir.join("state").display()
        ))
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd.spawn().expect("spawn filesync mount")
}

fn wait_mounted(mnt: &Path, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + common::MOUNT_TIMEOUT;
    while mount_type(mnt).as_deref() != Some("fuse.filesync") {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "filesync exited with {status}:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "not mounted in time");
        std::thread::sleep(common::POLL);
    }
}

/// Reads datagrams until one holds `wanted` (returned whole) or `timeout` passes.
fn receive_until(socket: &UnixDatagram, wanted: &str, seen: &mut Vec<String>) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        let Ok(len) = socket.recv(&mut buffer) else {
            continue;
        };
        let message = String::from_utf8_lossy(&buffer[..len]).into_owned();
        seen.push(message.clone());
        if message.lines().any(|line| line == wanted) {
            return Some(message);
        }
    }
    None
}

#[test]
fn the_daemon_notifies_systemd() {
    if !fuse_available() {
        return;
    }
    let dir = open_tempdir();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let log = dir.path().join("daemon.log");
    // A 600 ms watchdog: the daemon pings every 200 ms while its pipeline moves.
    let env = [
        ("NOTIFY_SOCKET", socket_path.display().to_string()),
        ("WATCHDOG_USEC", "600000".to_owned()),
    ];
    let stderr = File::create(&log).expect("create log");
    let mut child = spawn_mount(dir.path(), "", &env, stderr);
    let mnt = dir.path().join("mnt");
    let mut seen = Vec::new();

    let ready = receive_until(&socket, "READY=1", &mut seen);
    let ready = ready.unwrap_or_else(|| panic!("no READY=1, got {seen:?}"));
    // READY=1 comes once the mount is live.
    assert_eq!(mount_type(&mnt).as_deref(), Some("fuse.filesync"));
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=mounted, watcher ")),
        "no STATUS= with READY=1: {ready:?}"
    );
    assert!(
        receive_until(&socket, "WATCHDOG=1", &mut seen).is_some(),
        "no WATCHDOG=1, got {seen:?}"
    );

    unmount(&mnt);
    assert!(
        receive_until(&socket, "STOPPING=1", &mut seen).is_some(),
        "no STOPPING=1 after unmounting, got {seen:?}"
    );
    let status = wait_child(&mut child, Duration::from_secs(15));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "daemon did not exit cleanly: {status:?}\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
}

/// Runs a mount with `env`, unmounts it, and returns its log.
fn log_of_a_mount(opts: &str, env: &[(&str, String)], journal: bool) -> String {
    let dir = open_tempdir();
    let log = dir.path().join("daemon.log");
    File::create(&log).expect("create log");
    let mut env = env.to_vec();
    if journal {
        // What systemd sets when stderr is the journal: its device and inode.
        let meta = fs::metadata(&log).expect("log metadata");
        env.push(("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino())));
    }
    let mnt = dir.path().join("mnt");
    // Appending keeps the inode JOURNAL_STREAM names.
    let stderr = File::options().append(true).open(&log).expect("open log");
    let mut child = spawn_mount(dir.path(), opts, &env, stderr);
    wait_mounted(&mnt, &mut child, &log);
    fs::write(mnt.join("a.txt"), b"x").expect("write through the mount");
    unmount(&mnt);
    if wait_child(&mut child, Duration::from_secs(15)).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    fs::read_to_string(&log).expect("read log")
}

#[test]
fn logs_suit_the_journal() {
    if !fuse_available() {
        return;
    }
    let starts_with_time = |log: &str| {
        log.lines()
            .filter(|l| !l.is_empty())
            .all(|l| l.starts_with(|c: char| c.is_ascii_digit()))
    };

    let plain = log_of_a_mount("", &[], false);
    assert!(plain.contains("mounted"), "{plain}");
    assert!(
        !plain.contains('\u{1b}'),
        "colours in a log that is not a terminal:\n{plain}"
    );
    assert!(
        starts_with_time(&plain),
        "lines without timestamps:\n{plain}"
    );
    assert!(
        !plain.contains("DEBUG"),
        "debug lines at the default level:\n{plain}"
    );

    let journal = log_of_a_mount("", &[("RUST_LOG", "filesync=debug".to_owned())], true);
    assert!(journal.contains("mounted"), "{journal}");
    assert!(
        journal.contains("DEBUG"),
        "RUST_LOG=filesync=debug ignored:\n{journal}"
    );
    assert!(
        !journal
            .lines()
            .any(|l| l.starts_with(|c: char| c.is_ascii_digit())),
        "timestamps under JOURNAL_STREAM (the journal adds its own):\n{journal}"
    );

    // -o log= wins over RUST_LOG.
    let quiet = log_of_a_mount(",log=warn", &[("RUST_LOG", "debug".to_owned())], true);
    assert!(
        !quiet.contains("INFO") && !quiet.contains("DEBUG"),
        "{quiet}"
    );
}
