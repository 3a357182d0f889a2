//! Issue 6: nodes behind NATs reach each other through a rendezvous: directly, through a
//! hole both punch, when their NATs keep one public port per local port; through the
//! rendezvous's relay, still encrypted end to end, when a NAT maps each destination to
//! another port; and never to an impostor an address from the rendezvous points at.
//!
//! The world is made of network namespaces: a "public" one holding a STUN server and the
//! rendezvous, and on each side a home router masquerading with nftables (dropping what
//! comes unasked from outside, as home routers do) with its node behind it.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::cluster::{assert_converge, netns_available, wait_until, Node};
use common::{open_tempdir, run, BIN};

const RENDEZVOUS: &str = "198.18.0.1:7879";
const STUN: [&str; 2] = ["198.18.0.1:3478", "198.18.0.3:3478"];
const CONNECT: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(60);

/// The world's tests run one at a time: each runs five namespaces and four daemons.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

static NEXT_WORLD: AtomicU32 = AtomicU32::new(0);

fn sh(program: &str, args: &[&str]) {
    run(Command::new(program).args(args), Duration::from_secs(20))
        .expect_ok(&format!("{program} {args:?}"));
}

fn nft(namespace: &str, command: &str) {
    sh("ip", &["netns", "exec", namespace, "nft", command]);
}

/// Whether `nft` is here too (namespaces are checked by `netns_available`).
fn nft_available() -> bool {
    let works = Command::new("nft")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        works || std::env::var_os("CI").is_none(),
        "the reach tests need `nft` (nftables); CI is set, so this is a failure"
    );
    works
}

/// public (198.18.0.1 and .3 for the servers) ── router a (masquerade) ── node a (10.71.0.2)
///                                            └─ router b (masquerade) ── node b (10.72.0.2)
struct World {
    public: String,
    routers: [String; 2],
    homes: [String; 2],
    servers: Vec<Child>,
    scratch: tempfile::TempDir,
}

impl World {
    /// `masquerade` is each router's nftables NAT statement.
    fn new(masquerade: [&str; 2]) -> World {
        let n = NEXT_WORLD.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}-{n}", std::process::id());
        let world = World {
            public: format!("rvp-{tag}"),
            routers: [format!("rva-{tag}"), format!("rvb-{tag}")],
            homes: [format!("rvha-{tag}"), format!("rvhb-{tag}")],
            servers: Vec::new(),
            scratch: open_tempdir(),
        };
        let p = world.public.as_str();
        for namespace in [p]
            .into_iter()
            .chain(world.routers.iter().map(String::as_str))
            .chain(world.homes.iter().map(String::as_str))
        {
            sh("ip", &["netns", "add", namespace]);
            sh("ip", &["-n", namespace, "link", "set", "lo", "up"]);
        }
        // The servers' addresses sit on loopback; the public namespace routes to them.
        sh(
            "ip",
            &["-n", p, "addr", "add", "198.18.0.1/32", "dev", "lo"],
        );
        sh(
            "ip",
            &["-n", p, "addr", "add", "198.18.0.3/32", "dev", "lo"],
        );
        sh(
            "ip",
            &[
                "netns",
                "exec",
                p,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_forward",
            ],
        );
        for (side, nat) in masquerade.into_iter().enumerate() {
            let (r, h) = (world.routers[side].as_str(), world.homes[side].as_str());
            let up = format!("up{side}");
            let wan_public = format!("198.19.{}.1/24", side + 1);
            let wan_router = format!("198.19.{}.2/24", side + 1);
            let wan_gateway = format!("198.19.{}.1", side + 1);
            let lan_router = format!("10.7{}.0.1/24", side + 1);
            let lan_home = format!("10.7{}.0.2/24", side + 1);
            let lan_gateway = format!("10.7{}.0.1", side + 1);
            sh(
                "ip",
                &[
                    "-n", r, "link", "add", "wan", "type", "veth", "peer", "name", &up, "netns", p,
                ],
            );
            sh(
                "ip",
                &[
                    "-n", r, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns",
                    h,
                ],
            );
            sh("ip", &["-n", p, "addr", "add", &wan_public, "dev", &up]);
            sh("ip", &["-n", r, "addr", "add", &wan_router, "dev", "wan"]);
            sh("ip", &["-n", r, "addr", "add", &lan_router, "dev", "lan"]);
            sh("ip", &["-n", h, "addr", "add", &lan_home, "dev", "eth0"]);
            for (namespace, device) in [(p, up.as_str()), (r, "wan"), (r, "lan"), (h, "eth0")] {
                sh("ip", &["-n", namespace, "link", "set", device, "up"]);
            }
            sh(
                "ip",
                &["-n", r, "route", "add", "default", "via", &wan_gateway],
            );
            sh(
                "ip",
                &["-n", h, "route", "add", "default", "via", &lan_gateway],
            );
            sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    r,
                    "sh",
                    "-c",
                    "echo 1 > /proc/sys/net/ipv4/ip_forward",
                ],
            );
            nft(r, "add table ip nat");
            nft(
                r,
                "add chain ip nat post { type nat hook postrouting priority srcnat; }",
            );
            nft(r, &format!("add rule ip nat post oifname \"wan\" {nat}"));
            nft(r, "add table ip filter");
            nft(
                r,
                "add chain ip filter input { type filter hook input priority 0; policy accept; }",
            );
            nft(
                r,
                "add rule ip filter input iifname \"wan\" ct state new drop",
            );
        }
        // Counts what reaches or leaves the rendezvous's port, to tell relayed bytes.
        nft(p, "add table ip count");
        nft(
            p,
            "add chain ip count seen { type filter hook prerouting priority 0; policy accept; }",
        );
        nft(p, "add rule ip count seen tcp dport 7879 counter");
        nft(p, "add rule ip count seen tcp sport 7879 counter");
        world
    }

    fn key(&self, name: &str) -> (PathBuf, String) {
        let key = self.scratch.path().join(format!("{name}.key"));
        let out = run(
            Command::new(BIN).args(["keygen", "--key"]).arg(&key),
            Duration::from_secs(10),
        );
        out.expect_ok("filesync keygen");
        let id = out.stdout.lines().map(str::trim).rfind(|l| !l.is_empty());
        (key, id.expect("keygen prints the ID").to_owned())
    }

    fn spawn_in_public(&mut self, args: &[&str], log: &str) {
        let log = fs::File::create(self.scratch.path().join(log)).expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.public, BIN])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start a server in the public namespace");
        self.servers.push(child);
    }

    /// Starts the STUN server and a rendezvous serving `nodes`; returns its ID.
    fn start_servers(&mut self, nodes: &[&Node], relay: bool) -> String {
        let mut stun = vec!["stun-server"];
        for address in STUN {
            stun.extend(["--listen", address]);
        }
        self.spawn_in_public(&stun, "stun.log");
        let (key, id) = self.key("rendezvous");
        let key = key.display().to_string();
        let mut args = vec!["rendezvous", "--listen", RENDEZVOUS, "--key", &key];
        for node in nodes {
            args.extend(["--peer", &node.id]);
        }
        if relay {
            args.push("--relay");
        }
        args.extend(["--log", "filesync=debug"]);
        self.spawn_in_public(&args, "rendezvous.log");
        id
    }

    fn rendezvous_log(&self) -> String {
        fs::read_to_string(self.scratch.path().join("rendezvous.log")).unwrap_or_default()
    }

    /// Bytes of packets to or from the rendezvous's port, as the public namespace saw them.
    fn rendezvous_bytes(&self) -> u64 {
        let out = run(
            Command::new("ip").args([
                "netns",
                "exec",
                &self.public,
                "nft",
                "list",
                "table",
                "ip",
                "count",
            ]),
            Duration::from_secs(10),
        );
        out.stdout
            .split("bytes ")
            .skip(1)
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    /// Router b drops everything between it and router a, as a firewall that allows only
    /// the rendezvous would: no hole can be punched.
    fn block_direct(&self) {
        let r = &self.routers[1];
        nft(r, "add table ip block");
        nft(
            r,
            "add chain ip block between { type filter hook forward priority 0; policy accept; }",
        );
        nft(r, "add rule ip block between ip daddr 198.19.1.2 drop");
        nft(r, "add rule ip block between ip saddr 198.19.1.2 drop");
    }

    fn unblock_direct(&self) {
        nft(&self.routers[1], "delete table ip block");
    }

    fn home(&self, side: usize) -> &str {
        &self.homes[side]
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- rendezvous log ----\n{}\n---- end ----",
                self.rendezvous_log()
            );
        }
        for namespace in [&self.public]
            .into_iter()
            .chain(&self.routers)
            .chain(&self.homes)
        {
            let _ = Command::new("ip")
                .args(["netns", "del", namespace])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Mount options of a node that reaches `peer` only through the rendezvous.
fn behind_nat(peer: &Node, rendezvous: &str, extra: &[&str]) -> Vec<String> {
    let mut options = vec![
        peer.peer(),
        format!("rendezvous={rendezvous}@{RENDEZVOUS}"),
        format!("stun={}", STUN[0]),
        format!("stun={}", STUN[1]),
    ];
    options.extend(extra.iter().map(|option| (*option).to_owned()));
    options
}

/// The path type of the first peer, once it is connected.
fn connected_path(node: &Node) -> Option<String> {
    let report = node.status();
    let peer = &report["mounts"][0]["peers"][0];
    (peer["connected"] == true).then(|| peer["path"].as_str().unwrap_or_default().to_owned())
}

fn wait_for_path(node: &Node, expected: &str) {
    let mut last = None;
    let reached = wait_until(CONNECT, || {
        last = connected_path(node);
        last.as_deref() == Some(expected)
    });
    assert!(
        reached,
        "node {} is not connected {expected} within {CONNECT:?} (last seen: {last:?}); status: {}",
        node.name,
        node.status()
    );
}

/// A tree of `files` files of 64 KiB of noise each (noise, so compression cannot shrink
/// what crosses the network).
fn write_tree(root: &Path, files: usize, marker: &str) -> u64 {
    let dir = root.join("tree");
    fs::create_dir_all(&dir).expect("mkdir");
    let mut rng = fastrand::Rng::with_seed(6);
    let mut total = 0;
    for i in 0..files {
        let mut data: Vec<u8> = (0..64 * 1024).map(|_| rng.u8(..)).collect();
        data.extend_from_slice(marker.as_bytes());
        total += data.len() as u64;
        fs::write(dir.join(format!("{marker}-{i}.bin")), data).expect("write");
    }
    total
}

/// The two nodes, the smaller ID first: it is the one that calls.
fn two_nodes(world: &World) -> (Node, Node) {
    let a = Node::new("a", Some(world.home(0)));
    let b = Node::new("b", Some(world.home(1)));
    if a.id < b.id {
        (a, b)
    } else {
        (b, a)
    }
}

#[test]
fn behind_two_port_keeping_nats_the_nodes_punch_through_and_sync_directly() {
    if !netns_available() || !nft_available() {
        return;
    }
    let _serial = one_at_a_time();
    let mut world = World::new(["masquerade", "masquerade"]);
    let (mut a, mut b) = two_nodes(&world);
    let rendezvous = world.start_servers(&[&a, &b], true);
    a.start(&behind_nat(&b, &rendezvous, &[]));
    b.start(&behind_nat(&a, &rendezvous, &[]));
    wait_for_path(&a, "hole-punched");
    wait_for_path(&b, "hole-punched");
    let public = a.status()["mounts"][0]["public_address"].clone();
    assert!(
        public
            .as_str()
            .is_some_and(|address| address.starts_with("198.19.")),
        "no public address of a's router in its status: {public}"
    );

    let before = world.rendezvous_bytes();
    let total = write_tree(a.mnt(), 32, "direct");
    assert_converge(a.mnt(), b.mnt(), CONVERGE);
    let through_rendezvous = world.rendezvous_bytes() - before;
    assert!(
        through_rendezvous < total / 20,
        "{through_rendezvous} bytes went through the rendezvous's port for a {total}-byte tree"
    );
    assert!(
        !world.rendezvous_log().contains("relaying between"),
        "{}",
        world.rendezvous_log()
    );
}

#[test]
fn behind_a_port_changing_nat_the_nodes_sync_through_the_relay_which_reads_nothing() {
    if !netns_available() || !nft_available() {
        return;
    }
    let _serial = one_at_a_time();
    let mut world = World::new(["masquerade", "masquerade fully-random"]);
    let (mut a, mut b) = two_nodes(&world);
    let rendezvous = world.start_servers(&[&a, &b], true);
    let capture_file = world.scratch.path().join("relay.pcap");
    let mut capture = Command::new("ip")
        .args([
            "netns",
            "exec",
            &world.public,
            "tcpdump",
            "-i",
            "any",
            "-U",
            "-s",
            "0",
            "-w",
        ])
        .arg(&capture_file)
        .args(["tcp", "port", "7879"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tcpdump in the public namespace");
    // tcpdump writes its file header once it listens.
    assert!(
        wait_until(Duration::from_secs(10), || {
            fs::metadata(&capture_file).is_ok_and(|meta| meta.len() > 0)
        }),
        "tcpdump did not start"
    );
    // Uncompressed, so the plaintext would show in the capture if it were not encrypted.
    a.start(&behind_nat(&b, &rendezvous, &["compression=off"]));
    b.start(&behind_nat(&a, &rendezvous, &["compression=off"]));
    wait_for_path(&a, "relayed");
    wait_for_path(&b, "relayed");

    let marker = "plaintext-only-the-nodes-may-read";
    let total = write_tree(a.mnt(), 16, marker);
    assert_converge(a.mnt(), b.mnt(), CONVERGE);
    std::thread::sleep(Duration::from_millis(500));
    let pid = libc::pid_t::try_from(capture.id()).expect("pid");
    // SAFETY: signalling our own child; SIGINT makes tcpdump flush and exit.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let _ = common::wait_child(&mut capture, Duration::from_secs(10));
    let _ = capture.kill();
    let _ = capture.wait();

    let captured = fs::read(&capture_file).expect("read the capture");
    assert!(
        captured.len() as u64 > total,
        "the capture holds {} bytes, less than the {total}-byte tree: it missed the relay",
        captured.len()
    );
    assert!(
        !captured
            .windows(marker.len())
            .any(|window| window == marker.as_bytes()),
        "the relay's capture holds plaintext"
    );
    assert!(world.rendezvous_log().contains("relaying between"));
}

#[test]
fn a_relayed_peer_moves_to_a_punched_path_once_one_opens() {
    if !netns_available() || !nft_available() {
        return;
    }
    let _serial = one_at_a_time();
    let mut world = World::new(["masquerade", "masquerade"]);
    world.block_direct();
    let (mut a, mut b) = two_nodes(&world);
    let rendezvous = world.start_servers(&[&a, &b], true);
    a.start(&behind_nat(&b, &rendezvous, &["upgrade_interval=2"]));
    b.start(&behind_nat(&a, &rendezvous, &["upgrade_interval=2"]));
    wait_for_path(&a, "relayed");
    wait_for_path(&b, "relayed");
    fs::write(a.mnt().join("while-relayed.txt"), "through the relay").expect("write");
    assert_converge(a.mnt(), b.mnt(), CONVERGE);

    world.unblock_direct();
    wait_for_path(&a, "hole-punched");
    wait_for_path(&b, "hole-punched");
    fs::write(b.mnt().join("once-punched.txt"), "directly").expect("write");
    assert_converge(a.mnt(), b.mnt(), CONVERGE);
}

#[test]
fn a_forged_address_from_the_rendezvous_never_reaches_an_impostor() {
    if !common::fuse_available() {
        return;
    }
    use filesync::identity::NodeKey;
    use filesync::net::{LinkConfig, LinkEvent, Listener, PeerSet};
    use filesync::sync::proto::{Hello, Message, Reach};

    let _serial = one_at_a_time();
    let (mut a, b) = {
        let first = Node::new("a", None);
        let second = Node::new("b", None);
        if first.id < second.id {
            (first, second)
        } else {
            (second, first)
        }
    };
    // The impostor: a real node with a key of its own that calls itself b and accepts a.
    let mut impostor = Node::new("b", None);
    let impostor_port = free_port();
    impostor.start(&[a.peer(), format!("listen=127.0.0.1:{impostor_port}")]);

    // A rendezvous that lies: whomever a asks for, it answers with the impostor's address.
    let key = std::sync::Arc::new(NodeKey::generate());
    let rendezvous_id = key.id();
    let hello = Hello {
        node_name: "liar".to_owned(),
        sends: false,
        receives: false,
    };
    let allowed: PeerSet = [a.id.parse().expect("a's ID")].into_iter().collect();
    let listener = Listener::bind(
        "127.0.0.1:0".parse().expect("address"),
        LinkConfig::new(key, allowed, hello),
    )
    .expect("bind the lying rendezvous");
    let address = listener.local_addr();
    let forged: std::net::SocketAddr = format!("127.0.0.1:{impostor_port}")
        .parse()
        .expect("address");
    let b_id = b.id.parse().expect("b's ID");
    let liar = std::thread::spawn(move || {
        let link = listener
            .links()
            .recv_timeout(CONNECT)
            .expect("a connects to the rendezvous");
        let mut lies = 0;
        while let Ok(event) = link.events().recv_timeout(Duration::from_secs(20)) {
            if let LinkEvent::Received(Message::Reach(Reach::Introduce { .. })) = event {
                lies += 1;
                let punch = Reach::Punch {
                    peer: b_id,
                    candidates: vec![forged],
                    relay_now: false,
                };
                let _ = link.send(Message::Reach(punch));
                if lies == 2 {
                    break;
                }
            }
        }
        lies
    });

    a.start(&[b.peer(), format!("rendezvous={rendezvous_id}@{address}")]);
    fs::write(a.mnt().join("secret.txt"), "for b only").expect("write");
    let lies = liar.join().expect("the lying rendezvous");
    assert!(lies >= 1, "a never asked the rendezvous for b");
    assert!(
        wait_until(Duration::from_secs(20), || a
            .log()
            .contains("not the expected")),
        "a did not refuse the impostor by its key:\n{}",
        a.log()
    );
    assert_eq!(connected_path(&a), None, "a connected to someone as b");
    assert!(
        !impostor.log().contains("connected to peer"),
        "{}",
        impostor.log()
    );
    assert!(!impostor.src().join("secret.txt").exists());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}
