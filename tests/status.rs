//! `filesync status` against two running nodes, each in its own network namespace: both
//! show the other connected; after one daemon is killed (`kill -9`), the other shows it
//! disconnected.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::cluster::{netns_available, wait_until, Net, Node, ADDR_B};
use common::run;

const PORT: u16 = 7878;
const CONNECT: Duration = Duration::from_secs(30);

/// The first peer of the only mount in a status report.
fn peer(report: &serde_json::Value) -> &serde_json::Value {
    &report["mounts"][0]["peers"][0]
}

fn connected(node: &Node) -> bool {
    peer(&node.status())["connected"] == serde_json::Value::Bool(true)
}

fn assert_mount(report: &serde_json::Value, node: &Node, mode: &str) {
    let mount = &report["mounts"][0];
    assert_eq!(mount["mountpoint"], node.mnt().display().to_string());
    assert_eq!(mount["backing"], node.src().display().to_string());
    assert_eq!(mount["mode"], mode);
    assert_eq!(mount["open_conflicts"], 0);
    for key in [
        "watcher",
        "pending_changes",
        "replication_lag_ms",
        "node_id",
    ] {
        assert!(!mount[key].is_null(), "no {key} in {mount}");
    }
}

#[test]
fn status_shows_peers_connected_then_a_killed_one_disconnected() {
    if !netns_available() {
        return;
    }
    let net = Net::pair();
    let mut a = Node::new("a", Some(&net.a));
    let mut b = Node::new("b", Some(&net.b));
    b.start(&[
        format!("listen={ADDR_B}:{PORT}"),
        a.peer(),
        "mode=receiveonly".to_owned(),
    ]);
    a.start(&[b.peer_at(&format!("{ADDR_B}:{PORT}"))]);

    assert!(
        wait_until(CONNECT, || connected(&a) && connected(&b)),
        "the peers never both showed connected:\nA: {}\nB: {}",
        a.status(),
        b.status()
    );
    std::fs::write(a.mnt().join("hello.txt"), b"hello").expect("write on A");
    let report_a = a.status();
    let report_b = b.status();
    assert_mount(&report_a, &a, "sendreceive");
    assert_mount(&report_b, &b, "receiveonly");
    assert_eq!(peer(&report_a)["id"], b.id.as_str());
    assert_eq!(peer(&report_b)["id"], a.id.as_str());
    assert_eq!(peer(&report_a)["address"], format!("{ADDR_B}:{PORT}"));
    assert_eq!(peer(&report_a)["path"], "direct");
    assert_eq!(peer(&report_b)["name"], "a");
    assert!(
        wait_until(CONNECT, || {
            let report = b.status();
            peer(&report)["bytes_in"].as_u64().unwrap_or(0) > 0
                && peer(&report)["bytes_out"].as_u64().unwrap_or(0) > 0
        }),
        "B never counted bytes: {}",
        b.status()
    );
    assert!(
        peer(&a.status())["rtt_us"].as_u64().is_some(),
        "no round-trip time on a live connection: {}",
        a.status()
    );

    a.kill9();
    assert!(
        wait_until(CONNECT, || !connected(&b)),
        "B still shows A connected after kill -9: {}",
        b.status()
    );
    let report = b.status();
    assert!(peer(&report)["rtt_us"].is_null(), "{report}");

    // The human-readable form names the mount and the peer's state.
    let out = run(
        Command::new(common::BIN)
            .args(["status", "--state-dir"])
            .arg(b.scratch().join("state"))
            .arg(b.mnt()),
        Duration::from_secs(20),
    );
    out.expect_ok("filesync status");
    assert!(
        out.stdout.contains(&b.mnt().display().to_string()),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("not connected"), "{}", out.stdout);
}

#[test]
fn status_of_a_folder_that_is_not_mounted_fails() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = run(
        Command::new(common::BIN)
            .args(["status", "--state-dir"])
            .arg(dir.path())
            .arg(Path::new("/")),
        Duration::from_secs(20),
    );
    assert!(!out.ok(), "status of nothing succeeded: {}", out.stdout);
    assert!(
        out.stdout.contains("cannot reach the filesync daemon"),
        "{}",
        out.stdout
    );
}
