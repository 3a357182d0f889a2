//! The Prometheus endpoint (`-o metrics=ADDRESS:PORT`): scraped twice around writes through
//! the mount, parsed as Prometheus text, and its counters must have moved.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{fuse_available, Mount};

/// A port nobody listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("address").port()
}

/// One `GET /metrics`: the status line and the body.
fn scrape(address: SocketAddr) -> (String, String) {
    get(address, "/metrics")
}

/// One `GET path`: the status line and the body.
fn get(address: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("an HTTP head and body");
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

/// Parses Prometheus/OpenMetrics text into `name{labels}` → value, checking every line.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    let mut typed = Vec::new();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.split_whitespace();
            match words.next() {
                Some("TYPE") => {
                    let name = words.next().expect("TYPE names a metric");
                    let kind = words.next().expect("TYPE gives a type");
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "info",
                            "unknown"
                        ]
                        .contains(&kind),
                        "unknown type in {line:?}"
                    );
                    typed.push(name.to_owned());
                }
                Some("HELP") | Some("EOF") | Some("UNIT") => {}
                _ => panic!("unexpected comment {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap_or(series);
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(
                    labels.starts_with('{') && labels.ends_with('}'),
                    "bad labels in {line:?}"
                );
            }
        }
        assert!(
            typed.iter().any(|family| name.starts_with(family.as_str())),
            "sample {line:?} has no # TYPE before it"
        );
        samples.insert(series.to_owned(), value);
    }
    assert_eq!(
        text.lines().last(),
        Some("# EOF"),
        "text does not end with # EOF"
    );
    samples
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

#[test]
fn counters_move_when_files_change() {
    if !fuse_available() {
        return;
    }
    let port = free_port();
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let m = Mount::new(&[&format!("metrics={address}")]);

    let (status, first) = scrape(address);
    assert_eq!(status, "HTTP/1.1 200 OK", "{first}");
    let before = parse(&first);
    for family in [
        "filesync_capture_queue_depth",
        "filesync_apply_latency_seconds_count",
    ] {
        assert!(before.contains_key(family), "no {family} in:\n{first}");
    }

    for i in 0..20 {
        std::fs::write(m.m(&format!("file-{i}.txt")), vec![b'x'; 10_000]).expect("write");
    }
    let writes = "filesync_fuse_operations_total{op=\"write\"}";
    let creates = "filesync_fuse_operations_total{op=\"create\"}";
    let captured = "filesync_captured_changes_total{source=\"fuse\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let (status, text) = scrape(address);
        assert_eq!(status, "HTTP/1.1 200 OK", "{text}");
        let after = parse(&text);
        // The coalescer counts captured changes a moment after the writes return.
        if value(&after, captured) >= value(&before, captured) + 20.0 || Instant::now() > deadline {
            break after;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        value(&after, writes) >= value(&before, writes) + 20.0,
        "{after:?}"
    );
    assert!(
        value(&after, creates) >= value(&before, creates) + 20.0,
        "{after:?}"
    );
    assert!(
        value(&after, captured) >= value(&before, captured) + 20.0,
        "{after:?}"
    );

    let (status, _) = get(address, "/other");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

#[test]
fn metrics_are_off_by_default() {
    if !fuse_available() {
        return;
    }
    let m = Mount::new(&["log=info"]);
    assert!(
        !m.stderr().contains("metrics:"),
        "metrics served without being asked for:\n{}",
        m.stderr()
    );
}

#[test]
fn a_taken_metrics_port_fails_the_mount_with_one_line() {
    if !fuse_available() {
        return;
    }
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let address = taken.local_addr().expect("address");
    let dir = common::open_tempdir();
    let (src, mnt) = (dir.path().join("src"), dir.path().join("mnt"));
    common::mkdir_mode(&src, 0o755);
    common::mkdir_mode(&mnt, 0o755);
    let out = common::run(
        std::process::Command::new(common::BIN)
            .arg("mount")
            .arg(&src)
            .arg(&mnt)
            .arg("--foreground")
            .arg("-o")
            .arg(format!(
                "state_dir={},telemetry=off,metrics={address}",
                dir.path().join("state").display()
            )),
        Duration::from_secs(20),
    );
    assert!(!out.ok(), "mounted although the metrics port is taken");
    assert_eq!(common::mount_type(&mnt), None);
    let message = out.stderr.trim();
    assert!(
        message.starts_with("filesync: cannot serve metrics on") && !message.contains('\n'),
        "{message}"
    );
}
