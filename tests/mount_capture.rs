//! Change capture end to end, through real mounts and the real actor graph: what the index
//! holds after writes through the mount, writes behind its back, and changes made while
//! filesync was stopped, with each watcher; `filesync watch`'s JSON lines; the telemetry
//! page on localhost.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{fuse_available, mount_type, open_tempdir, sh, unmount, wait_child};
use filesync::index::{FileKind, FileRecord, Index};

const BIN: &str = env!("CARGO_BIN_EXE_filesync");

/// How long the graph gets to index what happened before we unmount and look.
const SETTLE: Duration = Duration::from_millis(800);

/// A backing folder, mount point and state folder that outlive several daemons.
struct Node {
    tmp: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        let tmp = open_tempdir();
        for dir in ["src", "mnt", "state"] {
            std::fs::create_dir(tmp.path().join(dir)).expect("create test folder");
        }
        Node { tmp }
    }

    fn src(&self) -> PathBuf {
        self.tmp.path().join("src")
    }

    fn mnt(&self) -> PathBuf {
        self.tmp.path().join("mnt")
    }

    /// Runs a daemon with `options` until the returned guard is finished.
    fn mount(&self, options: &str) -> Daemon {
        let options = format!(
            "state_dir={},telemetry=off,{options}",
            self.tmp.path().join("state").display()
        );
        let child = Command::new(BIN)
            .arg("mount")
            .arg(self.src())
            .arg(self.mnt())
            .args(["--foreground", "-o", &options])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start filesync mount");
        let daemon = Daemon {
            child: Some(child),
            mnt: self.mnt(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while mount_type(&self.mnt()).is_none() {
            assert!(
                Instant::now() < deadline,
                "the mount did not appear in 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        daemon
    }

    fn index(&self) -> Index {
        Index::open(&self.tmp.path().join("state/index.redb")).expect("open the index")
    }
}

/// A running daemon; unmounted (and waited for) on drop, so a failing test leaves no mount.
struct Daemon {
    child: Option<Child>,
    mnt: PathBuf,
}

impl Daemon {
    /// Unmounts and waits for the daemon to exit; returns its log.
    fn stop(mut self) -> String {
        self.finish()
    }

    fn finish(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return String::new();
        };
        unmount(&self.mnt);
        let status = wait_child(&mut child, Duration::from_secs(15));
        let mut log = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            let _ = stderr.read_to_string(&mut log);
        }
        assert!(
            status.is_some_and(|s| s.success()),
            "daemon did not exit cleanly after umount ({status:?}); log:\n{log}"
        );
        log
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unmount(&self.mnt);
            let _ = child.kill();
            let _ = wait_child(&mut child, Duration::from_secs(5));
        }
    }
}

fn live(index: &Index, path: &str) -> FileRecord {
    let record = index
        .get(Path::new(path))
        .expect("read the index")
        .unwrap_or_else(|| panic!("{path} is not in the index"));
    assert!(record.is_live(), "{path} is a tombstone: {record:?}");
    record
}

fn assert_content(index: &Index, path: &str, content: &[u8]) {
    let record = live(index, path);
    assert_eq!(record.size, content.len() as u64, "size of {path}");
    let expected: Vec<[u8; 32]> = content
        .chunks(filesync::index::BLOCK_SIZE as usize)
        .map(|block| *blake3::hash(block).as_bytes())
        .collect();
    assert_eq!(record.block_hashes, expected, "block hashes of {path}");
}

/// Writes through the mount, writes behind its back by another process, and a file that
/// was there before mounting all end up in the index with the right content hashes.
fn capture_with(watcher: &str) {
    if !fuse_available() {
        return;
    }
    let node = Node::new();
    std::fs::write(node.src().join("before"), b"there before the mount").expect("seed file");
    // With only the scan watching, changes behind the mount's back wait for the next scan.
    let options = format!("watcher={watcher},sync_interval=1");
    let daemon = node.mount(&options);
    std::fs::write(node.mnt().join("through"), b"written through the mount").expect("write");
    let src = node.src();
    sh(
        &src,
        "printf 'written behind its back' > behind && mkdir dir && echo x > dir/f",
    )
    .expect_ok("write behind the mount's back");
    let big: Vec<u8> = (0..400_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(node.mnt().join("big"), &big).expect("write a multi-block file");
    std::thread::sleep(if watcher == "scan" {
        Duration::from_millis(2500)
    } else {
        SETTLE
    });
    let log = daemon.stop();
    assert!(
        log.contains(&format!("watcher: {watcher}"))
            || watcher == "scan" && log.contains("scan only"),
        "the log names the active watcher:\n{log}"
    );
    let index = node.index();
    assert_content(&index, "before", b"there before the mount");
    assert_content(&index, "through", b"written through the mount");
    assert_content(&index, "behind", b"written behind its back");
    assert_content(&index, "dir/f", b"x\n");
    assert_content(&index, "big", &big);
    assert_eq!(live(&index, "dir").kind, FileKind::Dir);
}

#[test]
fn ebpf_capture_fills_the_index() {
    capture_with("ebpf");
}

#[test]
fn fanotify_capture_fills_the_index() {
    capture_with("fanotify");
}

#[test]
fn inotify_capture_fills_the_index() {
    capture_with("inotify");
}

#[test]
fn scan_only_capture_fills_the_index() {
    capture_with("scan");
}

#[test]
fn changes_made_while_stopped_are_found_at_the_next_start() {
    if !fuse_available() {
        return;
    }
    let node = Node::new();
    let daemon = node.mount("watcher=auto");
    std::fs::write(node.mnt().join("kept"), b"first").expect("write");
    std::fs::write(node.mnt().join("doomed"), b"to be deleted").expect("write");
    std::thread::sleep(SETTLE);
    daemon.stop();

    // filesync is stopped: change the backing folder directly.
    let src = node.src();
    sh(
        &src,
        "printf ' and more' >> kept && rm doomed && printf new > added",
    )
    .expect_ok("change the folder while filesync is stopped");

    let daemon = node.mount("watcher=auto");
    std::thread::sleep(SETTLE);
    daemon.stop();
    let index = node.index();
    assert_content(&index, "kept", b"first and more");
    assert_content(&index, "added", b"new");
    let doomed = index
        .get(Path::new("doomed"))
        .expect("read the index")
        .expect("a deleted file keeps a tombstone");
    assert!(
        !doomed.is_live(),
        "doomed should be a tombstone: {doomed:?}"
    );
}

#[test]
fn an_mmap_write_is_found_by_the_scan() {
    if !fuse_available() {
        return;
    }
    let node = Node::new();
    std::fs::write(node.src().join("mapped"), vec![b'0'; 8192]).expect("seed file");
    let daemon = node.mount("watcher=auto,sync_interval=1");
    std::thread::sleep(SETTLE);
    // An mmap write makes no write() syscall, so only the periodic scan can see it.
    let script = "import mmap, os, time\n\
        f = open('mapped', 'r+b')\n\
        m = mmap.mmap(f.fileno(), 8192)\n\
        m[0:5] = b'mmap!'\n\
        m.flush()\n\
        m.close()\n\
        f.close()\n\
        t = time.time() + 5\n\
        os.utime('mapped', ns=(int(t * 1e9), int(t * 1e9)))\n";
    let src = node.src();
    common::run(
        Command::new("python3")
            .args(["-c", script])
            .current_dir(&src),
        Duration::from_secs(10),
    )
    .expect_ok("write through mmap");
    std::thread::sleep(Duration::from_millis(2500));
    daemon.stop();
    let mut expected = vec![b'0'; 8192];
    expected[..5].copy_from_slice(b"mmap!");
    assert_content(&node.index(), "mapped", &expected);
}

#[test]
fn watch_prints_each_change_as_a_json_line() {
    if !fuse_available() {
        return;
    }
    let tmp = open_tempdir();
    let mut child = Command::new(BIN)
        .arg("watch")
        .arg(tmp.path())
        .args(["-o", "telemetry=off"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start filesync watch");
    let stderr = child.stderr.take().expect("stderr");
    let stdout = child.stdout.take().expect("stdout");
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("watcher:") {
                let _ = ready_tx.send(());
            }
        }
    });
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("watch did not start its watcher within 10 s");
    let mut writer = Command::new("sh")
        .args(["-c", "printf hello > watched.txt"])
        .current_dir(tmp.path())
        .spawn()
        .expect("run a writer");
    let writer_pid = writer.id();
    assert!(
        wait_child(&mut writer, Duration::from_secs(5)).is_some_and(|s| s.success()),
        "the writer failed"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines_rx.recv_timeout(left) else {
            break None;
        };
        let value: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        if value["path"] == "watched.txt" && value["kind"]["write"].is_object() {
            break Some(value);
        }
        seen.push(line);
    };
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::INT,
    );
    let status = wait_child(&mut child, Duration::from_secs(10));
    let value = found.unwrap_or_else(|| panic!("no write of watched.txt among {seen:?}"));
    assert_eq!(value["kind"]["write"]["offset"], 0);
    assert_eq!(value["kind"]["write"]["len"], 5);
    assert_eq!(value["source"], "ebpf");
    // The shell forks printf's write in itself; the pid is the writer's.
    assert_eq!(value["pid"], writer_pid);
    assert!(
        status.is_some_and(|s| s.success()),
        "watch exits cleanly on Ctrl-C"
    );
}

#[test]
fn the_telemetry_page_shows_the_actor_graph_on_localhost() {
    if !fuse_available() {
        return;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port();
    let node = Node::new();
    // `telemetry=` given again after the harness default wins.
    let daemon = node.mount(&format!("telemetry=127.0.0.1:{port}"));
    // The graph fills in as each actor first reports, so wait for all of them.
    let actors = ["capture", "coalescer", "indexer", "scanner"];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut page = String::new();
    while !actors.iter().all(|actor| page.contains(actor)) {
        assert!(
            Instant::now() < deadline,
            "the telemetry graph on port {port} lacks some of {actors:?} after 10 s:\n{page}"
        );
        std::thread::sleep(Duration::from_millis(100));
        page = http_get(port, "/graph.dot").unwrap_or_default();
    }
    let listening = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let exposed = format!("00000000:{port:04X}");
    assert!(
        !listening.contains(&exposed),
        "telemetry listens on 0.0.0.0:{port}"
    );
    daemon.stop();
}

fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut page = String::new();
    stream.read_to_string(&mut page)?;
    Ok(page)
}
