//! The STUN server and NAT discovery (issue 6).
//!
//! On loopback: the answer to a Binding request, checked byte by byte here (not with the
//! codec under test); malformed datagrams get nothing and the server keeps serving; the
//! per-source rate limit drops a flood while another source is still served. A mount with
//! `stun=` servers logs the address discovered from its replication port.
//!
//! Behind a NAT: network namespaces made here (a client, a router that masquerades with
//! nftables, and a "public" namespace running `filesync stun-server` on two addresses), all
//! in 198.18.0.0/15 and 10.77.0.0/24 so nothing leaves them. Discovery reports the router's
//! public address, and an endpoint-independent mapping for plain masquerade or an
//! endpoint-dependent one when the router picks a random port per connection.

mod common;

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use filesync::stun::{
    discover, Keeper, KeeperConfig, Mapping, RateLimit, Retransmission, Server, ServerConfig,
};

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const FINGERPRINT_XOR: u32 = 0x5354_554e;
/// How long to wait for an answer that must come.
const ANSWER_WAIT: Duration = Duration::from_secs(5);
/// How long to wait to be sure no answer comes: loopback answers take microseconds.
const SILENCE_WAIT: Duration = Duration::from_millis(300);

fn loopback_server(rate_limit: RateLimit) -> Server {
    Server::start(&ServerConfig {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        rate_limit,
    })
    .expect("start the STUN server on loopback")
}

/// A Binding request, built by hand.
fn binding_request(transaction: [u8; 12]) -> Vec<u8> {
    let mut message = vec![0x00, 0x01, 0x00, 0x00];
    message.extend_from_slice(&MAGIC_COOKIE);
    message.extend_from_slice(&transaction);
    message
}

/// `message` with a FINGERPRINT attribute appended and the header's length fixed.
fn with_fingerprint(mut message: Vec<u8>) -> Vec<u8> {
    let length = u16::try_from(message.len() - 20 + 8).expect("short message");
    message[2..4].copy_from_slice(&length.to_be_bytes());
    let crc = crc32fast::hash(&message) ^ FINGERPRINT_XOR;
    message.extend_from_slice(&[0x80, 0x28, 0x00, 0x04]);
    message.extend_from_slice(&crc.to_be_bytes());
    message
}

/// Sends `datagram` to `server` and returns the answer, if one comes within `wait`.
fn ask(socket: &UdpSocket, server: SocketAddr, datagram: &[u8], wait: Duration) -> Option<Vec<u8>> {
    socket.send_to(datagram, server).expect("send");
    socket.set_read_timeout(Some(wait)).expect("timeout");
    let mut buffer = [0u8; 2048];
    match socket.recv_from(&mut buffer) {
        Ok((length, from)) => {
            assert_eq!(from, server, "an answer from somewhere else");
            Some(buffer[..length].to_vec())
        }
        Err(_) => None,
    }
}

/// The attributes of a message: (type, value).
fn attributes(message: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut found = Vec::new();
    let mut at = 20;
    while at + 4 <= message.len() {
        let kind = u16::from_be_bytes([message[at], message[at + 1]]);
        let length = usize::from(u16::from_be_bytes([message[at + 2], message[at + 3]]));
        let value = message[at + 4..at + 4 + length].to_vec();
        found.push((kind, value));
        at += 4 + length.div_ceil(4) * 4;
    }
    assert_eq!(at, message.len(), "attributes do not fill the message");
    found
}

/// Checks a Binding success response to `transaction` byte by byte and returns the
/// XOR-MAPPED-ADDRESS it reports.
fn check_success(answer: &[u8], transaction: [u8; 12]) -> SocketAddr {
    assert_eq!(&answer[0..2], &[0x01, 0x01], "Binding success response");
    assert_eq!(
        usize::from(u16::from_be_bytes([answer[2], answer[3]])),
        answer.len() - 20
    );
    assert_eq!(&answer[4..8], &MAGIC_COOKIE);
    assert_eq!(&answer[8..20], &transaction);
    let found = attributes(answer);
    let (last_kind, last_value) = found.last().expect("attributes");
    assert_eq!(*last_kind, 0x8028, "FINGERPRINT comes last");
    let crc = crc32fast::hash(&answer[..answer.len() - 8]) ^ FINGERPRINT_XOR;
    assert_eq!(
        last_value.as_slice(),
        crc.to_be_bytes().as_slice(),
        "FINGERPRINT"
    );
    assert!(found.iter().any(|(kind, _)| *kind == 0x8022), "SOFTWARE");
    let (_, xor) = found
        .iter()
        .find(|(kind, _)| *kind == 0x0020)
        .expect("XOR-MAPPED-ADDRESS");
    assert_eq!(xor[1], 0x01, "IPv4");
    let port = u16::from_be_bytes([xor[2], xor[3]]) ^ 0x2112;
    let ip: [u8; 4] = std::array::from_fn(|i| xor[4 + i] ^ MAGIC_COOKIE[i]);
    SocketAddr::from((ip, port))
}

#[test]
fn binding_request_gets_xor_mapped_address_and_fingerprint() {
    let server = loopback_server(RateLimit::default());
    let address = server.local_addrs()[0];
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let local = client.local_addr().expect("address");
    for (n, request) in [
        binding_request([1; 12]),
        with_fingerprint(binding_request([2; 12])),
    ]
    .into_iter()
    .enumerate()
    {
        let transaction = [u8::try_from(n + 1).expect("small"); 12];
        let answer = ask(&client, address, &request, ANSWER_WAIT).expect("an answer");
        assert_eq!(check_success(&answer, transaction), local);
        assert!(answer.len() <= request.len() + filesync::stun::server::MAX_GROWTH);
    }
}

#[test]
fn malformed_datagrams_get_nothing_and_the_server_keeps_serving() {
    let server = loopback_server(RateLimit {
        per_second: 1_000,
        burst: 1_000,
        max_sources: 16,
    });
    let address = server.local_addrs()[0];
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let valid = with_fingerprint(binding_request([9; 12]));
    let mut bad_fingerprint = valid.clone();
    let last = bad_fingerprint.len() - 1;
    bad_fingerprint[last] ^= 0x01;
    let mut wrong_cookie = valid.clone();
    wrong_cookie[4] = 0x22;
    let mut response = valid.clone();
    response[1] = 0x01;
    response[0] = 0x01;
    let mut indication = binding_request([3; 12]);
    indication[1] = 0x11;
    let mut trailing = valid.clone();
    trailing.extend_from_slice(&[0; 4]);
    let mut bad_length = binding_request([4; 12]);
    bad_length[3] = 0x02;
    let mut rfc3489 = binding_request([5; 12]);
    rfc3489[4..8].copy_from_slice(&[0; 4]);
    let mut garbage_attribute = binding_request([6; 12]);
    // XOR-MAPPED-ADDRESS with family 7 and a length that fits no address.
    garbage_attribute.extend_from_slice(&[0x00, 0x20, 0x00, 0x04, 0x00, 0x07, 0x00, 0x00]);
    let garbage_attribute = with_fingerprint(garbage_attribute);
    let mut rng = common::Rng::new(6);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("zero length", Vec::new()),
        ("one byte", vec![0x00]),
        ("truncated header", valid[..12].to_vec()),
        ("truncated attributes", valid[..valid.len() - 4].to_vec()),
        ("wrong magic cookie", wrong_cookie),
        ("bad FINGERPRINT", bad_fingerprint),
        ("a response", response),
        ("an indication", indication),
        ("trailing bytes", trailing),
        ("length not a multiple of 4", bad_length),
        ("RFC 3489 request (no cookie)", rfc3489),
        ("undecodable attribute", garbage_attribute),
        ("garbage", rng.bytes(100)),
        ("huge", rng.bytes(60_000)),
    ];
    for (what, datagram) in &cases {
        assert_eq!(
            ask(&client, address, datagram, SILENCE_WAIT),
            None,
            "{what} was answered"
        );
        let answer = ask(&client, address, &valid, ANSWER_WAIT)
            .unwrap_or_else(|| panic!("no answer to a valid request after {what}"));
        check_success(&answer, [9; 12]);
    }
}

#[test]
fn over_tcp_malformed_messages_close_the_connection_unanswered() {
    let server = loopback_server(RateLimit::default());
    let address = server.local_addrs()[0];
    let valid = with_fingerprint(binding_request([8; 12]));
    let mut wrong_cookie = valid.clone();
    wrong_cookie[5] ^= 0xff;
    let mut bad_fingerprint = valid.clone();
    let last = bad_fingerprint.len() - 1;
    bad_fingerprint[last] ^= 0x01;
    for (what, message) in [
        ("wrong magic cookie", wrong_cookie),
        ("bad FINGERPRINT", bad_fingerprint),
        ("garbage", common::Rng::new(8).bytes(64)),
    ] {
        let mut stream = std::net::TcpStream::connect(address).expect("connect");
        stream.set_read_timeout(Some(ANSWER_WAIT)).expect("timeout");
        std::io::Write::write_all(&mut stream, &message).expect("send");
        let mut answer = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stream, &mut answer);
        assert!(answer.is_empty(), "{what} was answered over TCP");
    }
    // Two requests on one connection, both answered.
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(ANSWER_WAIT)).expect("timeout");
    let local = stream.local_addr().expect("address");
    for _ in 0..2 {
        std::io::Write::write_all(&mut stream, &valid).expect("send");
        let mut answer = vec![0u8; 20];
        std::io::Read::read_exact(&mut stream, &mut answer).expect("a header");
        let length = usize::from(u16::from_be_bytes([answer[2], answer[3]]));
        answer.resize(20 + length, 0);
        std::io::Read::read_exact(&mut stream, &mut answer[20..]).expect("the attributes");
        assert_eq!(check_success(&answer, [8; 12]), local);
    }
}

#[test]
fn rate_limit_drops_a_flood_while_another_source_is_served() {
    let server = loopback_server(RateLimit {
        per_second: 1,
        burst: 5,
        max_sources: 16,
    });
    let address = server.local_addrs()[0];
    let flooder = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let request = with_fingerprint(binding_request([7; 12]));
    let started = Instant::now();
    for _ in 0..200 {
        flooder.send_to(&request, address).expect("send");
    }
    flooder
        .set_read_timeout(Some(SILENCE_WAIT))
        .expect("timeout");
    let mut buffer = [0u8; 256];
    let mut answers = 0u64;
    while flooder.recv_from(&mut buffer).is_ok() {
        answers += 1;
    }
    // The burst, plus one per second the flood and the draining took.
    let allowed = 5 + started.elapsed().as_secs() + 1;
    assert!(
        (1..=allowed).contains(&answers),
        "{answers} answers to 200 requests"
    );
    let other = UdpSocket::bind("127.0.0.2:0").expect("bind a second loopback address");
    let answer = ask(&other, address, &request, ANSWER_WAIT).expect("the other source served");
    assert_eq!(
        check_success(&answer, [7; 12]),
        other.local_addr().expect("address")
    );
}

#[test]
fn discovery_on_loopback_sees_the_socket_itself() {
    let server = Server::start(&ServerConfig {
        listen: vec![
            SocketAddr::from(([127, 0, 0, 1], 0)),
            SocketAddr::from(([127, 0, 0, 3], 0)),
        ],
        rate_limit: RateLimit::default(),
    })
    .expect("start");
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let found = discover(&socket, server.local_addrs(), &Retransmission::default());
    assert_eq!(found.reflexive, Some(socket.local_addr().expect("address")));
    assert_eq!(found.answers.len(), 2);
    assert_eq!(found.mapping, Mapping::EndpointIndependent);
}

#[test]
fn a_mount_with_stun_servers_discovers_its_address_from_the_replication_port() {
    if !common::fuse_available() {
        return;
    }
    let server = Server::start(&ServerConfig {
        listen: vec![
            SocketAddr::from(([127, 0, 0, 1], 0)),
            SocketAddr::from(([127, 0, 0, 3], 0)),
        ],
        rate_limit: RateLimit::default(),
    })
    .expect("start");
    let keys = common::open_tempdir();
    let key = keys.path().join("node.key");
    common::run(
        Command::new(common::BIN)
            .args(["keygen", "--key"])
            .arg(&key),
        Duration::from_secs(20),
    )
    .expect_ok("filesync keygen");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let stun: Vec<String> = server
        .local_addrs()
        .iter()
        .map(|address| format!("stun={address}"))
        .collect();
    let mut options = vec![
        format!("key={}", key.display()),
        format!("listen=127.0.0.1:{port}"),
    ];
    options.extend(stun);
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    let mount = common::Mount::new(&options);
    let expected = format!("public address 127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !mount.stderr().contains(&expected) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = mount.stderr();
    assert!(
        log.contains(&expected),
        "no '{expected}' in the log:\n{log}"
    );
    assert!(log.contains("endpoint-independent"), "{log}");
    let answer =
        filesync::control::request(&mount.scratch().join("state"), "stun").expect("ask the daemon");
    assert!(answer.contains(&expected), "{answer}");
    // `filesync status` shows it too (it is copied into the status once a second).
    let public = format!("127.0.0.1:{port}");
    let mut shown = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !shown.contains(&public) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        shown = common::run(
            Command::new(common::BIN)
                .args(["status", "--json", "--state-dir"])
                .arg(mount.scratch().join("state"))
                .arg(mount.mnt()),
            Duration::from_secs(20),
        )
        .stdout;
    }
    assert!(
        shown.contains(&format!("\"public_address\":\"{public}\"")),
        "{shown}"
    );
}

// ---- behind a NAT ----

static NEXT_TOPOLOGY: AtomicU32 = AtomicU32::new(0);

/// The router's public address: what the STUN servers must report.
const ROUTER_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The two addresses the STUN server answers on, in the public namespace.
const SERVER_ADDRESSES: [&str; 2] = ["198.18.0.1:3478", "198.18.0.3:3478"];

/// Whether namespaces and nftables are here: a missing one fails under CI, skips elsewhere.
fn nat_available() -> bool {
    let works = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    if works("ip", &["netns", "list"]) && works("nft", &["--version"]) {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the NAT tests need `ip netns` (iproute2) and `nft` (nftables) as root; CI is set, so this is a failure"
    );
    eprintln!("SKIP: the NAT tests need `ip netns` (iproute2) and `nft` (nftables) as root");
    false
}

fn run(program: &str, args: &[&str]) {
    common::run(Command::new(program).args(args), Duration::from_secs(20))
        .expect_ok(&format!("{program} {args:?}"));
}

/// client (10.77.0.2) → router (10.77.0.1 | 198.18.0.2, masquerading) → public
/// (198.18.0.1 and 198.18.0.3, running `filesync stun-server`). Torn down on drop.
struct Topology {
    client: String,
    router: String,
    public: String,
    server: Option<Child>,
}

impl Topology {
    /// `masquerade` is the nftables statement, e.g. `masquerade` or `masquerade fully-random`.
    fn new(masquerade: &str) -> Topology {
        let n = NEXT_TOPOLOGY.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}-{n}", std::process::id());
        let topology = Topology {
            client: format!("fsc-{tag}"),
            router: format!("fsr-{tag}"),
            public: format!("fsp-{tag}"),
            server: None,
        };
        let (c, r, p) = (&topology.client, &topology.router, &topology.public);
        for namespace in [c, r, p] {
            run("ip", &["netns", "add", namespace]);
            run("ip", &["-n", namespace, "link", "set", "lo", "up"]);
        }
        run(
            "ip",
            &[
                "-n", r, "link", "add", "wan", "type", "veth", "peer", "name", "up0", "netns", p,
            ],
        );
        run(
            "ip",
            &[
                "-n", r, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", c,
            ],
        );
        run(
            "ip",
            &["-n", p, "addr", "add", "198.18.0.1/24", "dev", "up0"],
        );
        run(
            "ip",
            &["-n", p, "addr", "add", "198.18.0.3/24", "dev", "up0"],
        );
        run(
            "ip",
            &["-n", r, "addr", "add", "198.18.0.2/24", "dev", "wan"],
        );
        run(
            "ip",
            &["-n", r, "addr", "add", "10.77.0.1/24", "dev", "lan"],
        );
        run(
            "ip",
            &["-n", c, "addr", "add", "10.77.0.2/24", "dev", "eth0"],
        );
        for (namespace, device) in [(p, "up0"), (r, "wan"), (r, "lan"), (c, "eth0")] {
            run("ip", &["-n", namespace, "link", "set", device, "up"]);
        }
        run(
            "ip",
            &["-n", c, "route", "add", "default", "via", "10.77.0.1"],
        );
        run(
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
        let rule = format!("add rule ip nat post oifname \"wan\" {masquerade}");
        for command in [
            "add table ip nat",
            "add chain ip nat post { type nat hook postrouting priority srcnat; }",
            &rule,
        ] {
            run("ip", &["netns", "exec", r, "nft", command]);
        }
        topology
    }

    /// Starts `filesync stun-server` on both public addresses.
    fn start_server(&mut self) {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.public, common::BIN, "stun-server"]);
        for address in SERVER_ADDRESSES {
            command.args(["--listen", address]);
        }
        let child = command
            .args(["--log", "debug"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start filesync stun-server");
        self.server = Some(child);
    }

    /// Runs `f` in a thread that joined the client namespace; sockets it makes stay in
    /// that namespace whichever thread uses them later.
    fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.client);
        std::thread::spawn(move || {
            let namespace = File::open(&path).expect("open the client namespace");
            // SAFETY: setns on a valid namespace fd changes only this thread's namespace.
            let joined = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(joined, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("client namespace thread")
    }

    /// A UDP socket in the client namespace.
    fn client_socket(&self) -> UdpSocket {
        self.in_client(|| UdpSocket::bind("0.0.0.0:0").expect("bind in the client namespace"))
    }

    /// Discovery over TCP from a fixed port in the client namespace.
    fn discover_tcp(&self) -> filesync::stun::Discovery {
        self.in_client(|| {
            let local = SocketAddr::from(([10, 77, 0, 2], 41_000));
            filesync::stun::discover_tcp(local, &servers(), Duration::from_secs(5))
        })
    }

    /// Stops the server with SIGTERM; true when it exited cleanly in time.
    fn stop_server(&mut self) -> bool {
        let Some(mut child) = self.server.take() else {
            return false;
        };
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        match common::wait_child(&mut child, Duration::from_secs(10)) {
            Some(status) => status.success(),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                false
            }
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for namespace in [&self.client, &self.router, &self.public] {
            let _ = Command::new("ip")
                .args(["netns", "del", namespace])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn servers() -> Vec<SocketAddr> {
    SERVER_ADDRESSES
        .iter()
        .map(|address| address.parse().expect("address"))
        .collect()
}

/// Quick retransmissions: the server may still be starting when the first request goes.
fn quick() -> Retransmission {
    Retransmission {
        initial_rto: Duration::from_millis(200),
        transmissions: 7,
        last_wait_rtos: 8,
    }
}

#[test]
fn behind_plain_masquerade_the_mapping_is_endpoint_independent() {
    if !nat_available() {
        return;
    }
    let mut topology = Topology::new("masquerade");
    topology.start_server();
    let socket = topology.client_socket();
    let found = discover(&socket, &servers(), &quick());
    let reflexive = found.reflexive.expect("the STUN servers answered");
    assert_eq!(reflexive.ip(), IpAddr::V4(ROUTER_PUBLIC), "{found:?}");
    assert_eq!(found.answers.len(), 2, "{found:?}");
    assert_eq!(found.mapping, Mapping::EndpointIndependent, "{found:?}");

    // The keeper, from another socket, finds the same and keeps it.
    let config = KeeperConfig {
        servers: SERVER_ADDRESSES.iter().map(|s| s.to_string()).collect(),
        interval: Duration::from_millis(300),
        retransmission: quick(),
    };
    let keeper = Keeper::start(topology.client_socket(), config).expect("start the keeper");
    let first = keeper
        .wait_for_address(Duration::from_secs(20))
        .expect("a first round");
    let kept = first.reflexive.expect("an address");
    assert_eq!(kept.ip(), IpAddr::V4(ROUTER_PUBLIC));
    assert_eq!(first.mapping, Mapping::EndpointIndependent);
    // A later round (the interval is short here) sees the same mapping.
    let deadline = Instant::now() + Duration::from_secs(20);
    let later = loop {
        let latest = keeper.latest().expect("a result");
        if latest.at > first.at || Instant::now() > deadline {
            break latest;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(later.at > first.at, "no second round within 20 s");
    assert_eq!(later.reflexive, Some(kept));
    drop(keeper);

    // Over TCP from one local port: the router keeps the port, so the same mapping again.
    let over_tcp = topology.discover_tcp();
    assert_eq!(over_tcp.answers.len(), 2, "{over_tcp:?}");
    let tcp_reflexive = over_tcp.reflexive.expect("an address over TCP");
    assert_eq!(tcp_reflexive.ip(), IpAddr::V4(ROUTER_PUBLIC));
    assert_eq!(
        over_tcp.mapping,
        Mapping::EndpointIndependent,
        "{over_tcp:?}"
    );
    assert!(
        topology.stop_server(),
        "stun-server did not exit cleanly on SIGTERM"
    );
}

#[test]
fn behind_a_random_port_nat_the_mapping_is_endpoint_dependent() {
    if !nat_available() {
        return;
    }
    let mut topology = Topology::new("masquerade fully-random");
    topology.start_server();
    let socket = topology.client_socket();
    let found = discover(&socket, &servers(), &quick());
    assert_eq!(found.answers.len(), 2, "{found:?}");
    assert!(found
        .answers
        .iter()
        .all(|answer| answer.reflexive.ip() == IpAddr::V4(ROUTER_PUBLIC)));
    assert_eq!(found.mapping, Mapping::EndpointDependent, "{found:?}");
    let over_tcp = topology.discover_tcp();
    assert_eq!(over_tcp.answers.len(), 2, "{over_tcp:?}");
    assert_eq!(over_tcp.mapping, Mapping::EndpointDependent, "{over_tcp:?}");
}
