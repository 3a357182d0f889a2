//! The node-to-node channel over 127.0.0.1: normal traffic, rekeying, big messages,
//! reconnects, and hostile peers, which must each end with the connection dropped and a
//! reason, never a panic. Hostile peers are written here with snow's own default
//! resolver, which also shows that the transport speaks standard Noise.
//!
//! Also the key files behind node identities.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use filesync::identity::{IdentityError, NodeId, NodeIdError, NodeKey};
use filesync::net::{
    Link, LinkConfig, LinkEvent, Listener, NetError, PeerSet, NOISE_PARAMS, NOISE_PROLOGUE,
};
use filesync::sync::proto::{
    self, Change, Codec, FileData, Hello, Message, Meta, Op, Payload, RelPath, PROTOCOL_VERSION,
};

/// Long enough for a loaded 2-core machine; tests never wait this long when things work.
const WAIT: Duration = Duration::from_secs(20);

fn hello(name: &str) -> Hello {
    Hello {
        node_name: name.into(),
        sends: true,
        receives: true,
    }
}

fn config(key: &Arc<NodeKey>, allowed: &[NodeId]) -> LinkConfig {
    let mut cfg = LinkConfig::new(
        Arc::clone(key),
        allowed.iter().copied().collect::<PeerSet>(),
        hello(&key.id().short()),
    );
    cfg.keepalive = Duration::from_secs(2);
    cfg.handshake_timeout = Duration::from_secs(5);
    cfg
}

fn keys() -> (Arc<NodeKey>, Arc<NodeKey>) {
    (Arc::new(NodeKey::generate()), Arc::new(NodeKey::generate()))
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn next_event(link: &Link) -> LinkEvent {
    link.events()
        .recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("no event from {:?} within {WAIT:?}", link.peer()))
}

fn expect_connected(link: &Link) -> Hello {
    match next_event(link) {
        LinkEvent::Connected { peer, hello, .. } => {
            assert_eq!(peer, link.peer());
            hello
        }
        other => panic!("expected Connected, got {other:?}"),
    }
}

fn expect_received(link: &Link) -> Message {
    match next_event(link) {
        LinkEvent::Received(message) => message,
        other => panic!("expected a message, got {other:?}"),
    }
}

fn expect_disconnected(link: &Link) -> (String, bool) {
    match next_event(link) {
        LinkEvent::Disconnected { reason, clean } => (reason, clean),
        other => panic!("expected Disconnected, got {other:?}"),
    }
}

fn accept(listener: &Listener) -> Link {
    listener
        .links()
        .recv_timeout(WAIT)
        .expect("the listener accepted no link")
}

fn rejection(listener: &Listener) -> NetError {
    listener
        .rejections()
        .recv_timeout(WAIT)
        .expect("the listener refused nothing")
        .error
}

fn change(seq: u64, data: Vec<u8>) -> Message {
    Message::Change(Change {
        seq,
        path: RelPath(format!("dir/file-{seq}").into_bytes()),
        op: Op::File {
            meta: Meta {
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime_ns: 1,
                xattrs: None,
            },
            size: data.len() as u64,
            data: FileData::Whole {
                offset: 0,
                data: Payload {
                    codec: Codec::Raw,
                    raw_len: data.len() as u32,
                    bytes: data,
                },
                last: true,
            },
            blocks: Vec::new(),
        },
        version: Default::default(),
    })
}

/// A listener for `server` that allows `client`, a link from `client` to it, and the
/// accepted end, both connected.
fn connected_pair(
    server: &Arc<NodeKey>,
    client: &Arc<NodeKey>,
    tune: impl Fn(&mut LinkConfig),
) -> (Listener, Link, Link) {
    let mut server_cfg = config(server, &[client.id()]);
    tune(&mut server_cfg);
    let listener = Listener::bind(loopback(), server_cfg).unwrap();
    let mut client_cfg = config(client, &[]);
    tune(&mut client_cfg);
    let dialer = Link::dial(server.id(), listener.local_addr(), client_cfg);
    let accepted = accept(&listener);
    assert_eq!(accepted.peer(), client.id());
    assert_eq!(expect_connected(&dialer).node_name, server.id().short());
    assert_eq!(expect_connected(&accepted).node_name, client.id().short());
    assert!(dialer.is_connected() && accepted.is_connected());
    (listener, dialer, accepted)
}

#[test]
fn messages_flow_both_ways_and_a_close_is_clean() {
    let (server, client) = keys();
    let (listener, dialer, accepted) = connected_pair(&server, &client, |_| {});
    dialer.send(change(1, b"from the dialer".to_vec())).unwrap();
    accepted.send(Message::Ack { seq: 1 }).unwrap();
    assert_eq!(
        expect_received(&accepted),
        change(1, b"from the dialer".to_vec())
    );
    assert_eq!(expect_received(&dialer), Message::Ack { seq: 1 });

    // Queued right before closing, still delivered: close sends what is queued first.
    dialer.send(Message::CaughtUp).unwrap();
    dialer.close();
    assert_eq!(expect_received(&accepted), Message::CaughtUp);
    let (reason, clean) = expect_disconnected(&accepted);
    assert!(clean, "{reason}");
    assert!(reason.contains("closed"), "{reason}");
    assert!(matches!(
        accepted.send(Message::CaughtUp),
        Err(NetError::NotConnected { .. })
    ));
    accepted.close();
    listener.close();
}

#[test]
fn messages_keep_flowing_across_many_rekeys() {
    let (server, client) = keys();
    let (listener, dialer, accepted) = connected_pair(&server, &client, |cfg| cfg.rekey_after = 3);
    let count = 300u64;
    let sender = std::thread::spawn(move || {
        for seq in 0..count {
            dialer.send(change(seq, vec![seq as u8; 100])).unwrap();
        }
        dialer
    });
    for seq in 0..count {
        assert_eq!(
            expect_received(&accepted),
            change(seq, vec![seq as u8; 100])
        );
        accepted.send(Message::Ack { seq }).unwrap();
    }
    let dialer = sender.join().unwrap();
    for seq in 0..count {
        assert_eq!(expect_received(&dialer), Message::Ack { seq });
    }
    dialer.close();
    accepted.close();
    listener.close();
}

#[test]
fn a_message_near_the_limit_arrives_whole() {
    let (server, client) = keys();
    let (listener, dialer, accepted) = connected_pair(&server, &client, |_| {});
    let data: Vec<u8> = (0..proto::MAX_CHUNK).map(|i| (i % 251) as u8).collect();
    let big = change(7, data);
    let encoded = bincode::serde::encode_to_vec(&big, bincode::config::standard()).unwrap();
    assert!(encoded.len() > proto::MAX_CHUNK && encoded.len() <= proto::MAX_MESSAGE);
    dialer.send(big.clone()).unwrap();
    assert_eq!(expect_received(&accepted), big);
    // The link survives a message it refuses to send because it is too large.
    dialer.send(change(8, vec![0; proto::MAX_MESSAGE])).unwrap();
    dialer.send(Message::CaughtUp).unwrap();
    assert_eq!(expect_received(&accepted), Message::CaughtUp);
    dialer.close();
    accepted.close();
    listener.close();
}

#[test]
fn a_dialer_refuses_a_node_with_another_key() {
    let (server, client) = keys();
    let impostor = Arc::new(NodeKey::generate());
    let listener = Listener::bind(loopback(), config(&impostor, &[client.id()])).unwrap();
    let dialer = Link::dial(server.id(), listener.local_addr(), config(&client, &[]));
    let (reason, clean) = expect_disconnected(&dialer);
    assert!(!clean);
    assert!(reason.contains("not the expected"), "{reason}");
    assert!(reason.contains(&impostor.id().to_string()), "{reason}");
    // The dialer gave up before proving its own key.
    assert!(matches!(rejection(&listener), NetError::Handshake(_)));
    assert!(listener.links().is_empty());
    dialer.close();
    listener.close();
}

#[test]
fn a_listener_refuses_an_unknown_peer() {
    let (server, client) = keys();
    let someone_else = NodeKey::generate().id();
    let listener = Listener::bind(loopback(), config(&server, &[someone_else])).unwrap();
    let dialer = Link::dial(server.id(), listener.local_addr(), config(&client, &[]));
    match rejection(&listener) {
        NetError::UnknownPeer { peer } => assert_eq!(peer, client.id()),
        other => panic!("expected UnknownPeer, got {other}"),
    }
    let (reason, clean) = expect_disconnected(&dialer);
    assert!(!clean);
    assert!(reason.contains(&client.id().to_string()), "{reason}");
    assert!(listener.links().is_empty());
    dialer.close();
    listener.close();
}

/// A peer written with snow's default resolver, sending whatever a test wants.
struct RawPeer {
    stream: TcpStream,
    transport: snow::TransportState,
}

fn noise(key: &NodeKey) -> snow::Builder<'_> {
    snow::Builder::new(NOISE_PARAMS.parse().unwrap())
        .prologue(NOISE_PROLOGUE)
        .unwrap()
        .local_private_key(key.private_bytes())
        .unwrap()
}

fn raw_frame(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

fn read_raw_frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut header = [0u8; 2];
    stream.read_exact(&mut header).ok()?;
    let mut frame = vec![0u8; usize::from(u16::from_be_bytes(header))];
    stream.read_exact(&mut frame).ok()?;
    Some(frame)
}

impl RawPeer {
    fn connect(addr: SocketAddr, key: &NodeKey) -> RawPeer {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut state = noise(key).build_initiator().unwrap();
        let mut buf = vec![0u8; 65_535];
        let len = state.write_message(&[], &mut buf).unwrap();
        stream.write_all(&raw_frame(&buf[..len])).unwrap();
        let reply = read_raw_frame(&mut stream).unwrap();
        state.read_message(&reply, &mut buf).unwrap();
        let len = state.write_message(&[], &mut buf).unwrap();
        stream.write_all(&raw_frame(&buf[..len])).unwrap();
        RawPeer {
            stream,
            transport: state.into_transport_mode().unwrap(),
        }
    }

    fn accept(listener: &TcpListener, key: &NodeKey) -> RawPeer {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut state = noise(key).build_responder().unwrap();
        let mut buf = vec![0u8; 65_535];
        let first = read_raw_frame(&mut stream).unwrap();
        state.read_message(&first, &mut buf).unwrap();
        let len = state.write_message(&[], &mut buf).unwrap();
        stream.write_all(&raw_frame(&buf[..len])).unwrap();
        let third = read_raw_frame(&mut stream).unwrap();
        state.read_message(&third, &mut buf).unwrap();
        RawPeer {
            stream,
            transport: state.into_transport_mode().unwrap(),
        }
    }

    /// One encrypted frame holding `plaintext`, not yet sent.
    fn seal(&mut self, plaintext: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; 65_535];
        let len = self.transport.write_message(plaintext, &mut buf).unwrap();
        raw_frame(&buf[..len])
    }

    fn send_plain(&mut self, plaintext: &[u8]) {
        let frame = self.seal(plaintext);
        self.stream.write_all(&frame).unwrap();
    }

    fn send_version(&mut self, version: u16) {
        self.send_plain(&version.to_be_bytes());
    }

    /// A message small enough for one frame: its length, then bincode.
    fn message_plaintext(message: &Message) -> Vec<u8> {
        let body = bincode::serde::encode_to_vec(message, bincode::config::standard()).unwrap();
        let mut plain = (body.len() as u32).to_be_bytes().to_vec();
        plain.extend_from_slice(&body);
        plain
    }

    fn send_message(&mut self, message: &Message) {
        self.send_plain(&RawPeer::message_plaintext(message));
    }

    /// Version and hello, as a well-behaved node sends them.
    fn introduce(&mut self) {
        self.send_version(PROTOCOL_VERSION);
        self.send_message(&Message::Hello(hello("raw")));
    }

    fn recv_plain(&mut self) -> Option<Vec<u8>> {
        let frame = read_raw_frame(&mut self.stream)?;
        let mut buf = vec![0u8; 65_535];
        let len = self.transport.read_message(&frame, &mut buf).ok()?;
        buf.truncate(len);
        Some(buf)
    }

    fn recv_message(&mut self) -> Option<Message> {
        let plain = self.recv_plain()?;
        let body = plain.get(4..)?;
        let (message, _) =
            bincode::serde::decode_from_slice(body, bincode::config::standard()).ok()?;
        Some(message)
    }

    /// True once the other side has closed the connection (a reset counts: closing with
    /// unread garbage in the buffer resets).
    fn sees_end(&mut self) -> bool {
        let mut rest = Vec::new();
        match self.stream.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// A listener and a raw client that got through the whole setup, with the link the
/// listener made of it.
fn raw_client_connected() -> (Listener, RawPeer, Link) {
    let (server, client) = keys();
    let listener = Listener::bind(loopback(), config(&server, &[client.id()])).unwrap();
    let mut raw = RawPeer::connect(listener.local_addr(), &client);
    raw.introduce();
    assert_eq!(
        raw.recv_plain(),
        Some(PROTOCOL_VERSION.to_be_bytes().to_vec())
    );
    assert!(matches!(raw.recv_message(), Some(Message::Hello(_))));
    let link = accept(&listener);
    assert_eq!(expect_connected(&link).node_name, "raw");
    (listener, raw, link)
}

fn assert_dropped(link: &Link, raw: &mut RawPeer, expected: &str) {
    let (reason, clean) = expect_disconnected(link);
    assert!(!clean, "{reason}");
    assert!(
        reason.contains(expected),
        "'{reason}' does not say '{expected}'"
    );
    assert!(raw.sees_end());
    assert!(!link.is_connected());
}

#[test]
fn a_truncated_frame_drops_the_connection() {
    let (listener, mut raw, link) = raw_client_connected();
    let frame = raw.seal(&RawPeer::message_plaintext(&Message::CaughtUp));
    raw.stream.write_all(&frame[..frame.len() - 3]).unwrap();
    raw.stream.shutdown(Shutdown::Write).unwrap();
    assert_dropped(&link, &mut raw, "middle of a frame");
    listener.close();
}

#[test]
fn an_oversized_length_is_refused_before_allocating() {
    let (listener, mut raw, link) = raw_client_connected();
    let mut plain = ((proto::MAX_MESSAGE + 1) as u32).to_be_bytes().to_vec();
    plain.extend_from_slice(b"and nothing more");
    raw.send_plain(&plain);
    assert_dropped(&link, &mut raw, "more than the");
    listener.close();
}

#[test]
fn a_replayed_frame_fails_to_decrypt() {
    let (listener, mut raw, link) = raw_client_connected();
    let frame = raw.seal(&RawPeer::message_plaintext(&Message::CaughtUp));
    raw.stream.write_all(&frame).unwrap();
    raw.stream.write_all(&frame).unwrap();
    assert_eq!(expect_received(&link), Message::CaughtUp);
    assert_dropped(&link, &mut raw, "failed to decrypt");
    listener.close();
}

#[test]
fn trailing_bytes_and_undecodable_messages_drop_the_connection() {
    let (listener, mut raw, link) = raw_client_connected();
    let mut plain = RawPeer::message_plaintext(&Message::CaughtUp);
    plain.push(0);
    raw.send_plain(&plain);
    assert_dropped(&link, &mut raw, "after the end of a message");
    listener.close();

    let (listener, mut raw, link) = raw_client_connected();
    let mut plain = 3u32.to_be_bytes().to_vec();
    plain.extend_from_slice(&[0xff, 0xff, 0xff]);
    raw.send_plain(&plain);
    assert_dropped(&link, &mut raw, "does not decode");
    listener.close();
}

#[test]
fn garbage_after_the_handshake_is_refused() {
    let (server, client) = keys();
    let listener = Listener::bind(loopback(), config(&server, &[client.id()])).unwrap();
    let mut raw = RawPeer::connect(listener.local_addr(), &client);
    let garbage: Vec<u8> = (0..200u32).map(|i| (i * 37 % 256) as u8).collect();
    raw.stream.write_all(&garbage).unwrap();
    assert!(matches!(rejection(&listener), NetError::Decrypt));
    assert!(raw.sees_end());
    assert!(listener.links().is_empty());
    listener.close();
}

#[test]
fn another_protocol_version_is_named_on_both_sides() {
    let (server, client) = keys();
    // A listener meets a client of another version.
    let listener = Listener::bind(loopback(), config(&server, &[client.id()])).unwrap();
    let mut raw = RawPeer::connect(listener.local_addr(), &client);
    raw.send_version(999);
    match rejection(&listener) {
        NetError::Version { ours, theirs } => assert_eq!((ours, theirs), (PROTOCOL_VERSION, 999)),
        other => panic!("expected a version error, got {other}"),
    }
    assert_eq!(
        raw.recv_plain(),
        Some(PROTOCOL_VERSION.to_be_bytes().to_vec())
    );
    assert!(matches!(raw.recv_message(), Some(Message::Hello(_))));
    match raw.recv_message() {
        Some(Message::Error(text)) => assert!(text.contains("999"), "{text}"),
        other => panic!("expected an error message, got {other:?}"),
    }
    assert!(raw.sees_end());
    listener.close();

    // A dialer meets a server of another version.
    let raw_listener = TcpListener::bind(loopback()).unwrap();
    let addr = raw_listener.local_addr().unwrap();
    let server_key = Arc::clone(&server);
    let raw_server = std::thread::spawn(move || {
        let mut raw = RawPeer::accept(&raw_listener, &server_key);
        raw.send_version(7);
        raw.sees_end()
    });
    let dialer = Link::dial(server.id(), addr, config(&client, &[]));
    let (reason, clean) = expect_disconnected(&dialer);
    assert!(!clean);
    assert!(
        reason.contains("version 7") && reason.contains(&format!("speaks {PROTOCOL_VERSION}")),
        "{reason}"
    );
    dialer.close();
    assert!(raw_server.join().unwrap());
}

#[test]
fn silent_peers_time_out() {
    let (server, client) = keys();
    let quick = |key: &Arc<NodeKey>, allowed: &[NodeId]| {
        let mut cfg = config(key, allowed);
        cfg.handshake_timeout = Duration::from_millis(500);
        cfg
    };
    // A dialer meets a server that accepts and never answers.
    let silent = TcpListener::bind(loopback()).unwrap();
    let dialer = Link::dial(
        server.id(),
        silent.local_addr().unwrap(),
        quick(&client, &[]),
    );
    let (reason, clean) = expect_disconnected(&dialer);
    assert!(!clean);
    assert!(reason.contains("silent"), "{reason}");
    dialer.close();

    // A listener meets a client that connects and never speaks.
    let listener = Listener::bind(loopback(), quick(&server, &[client.id()])).unwrap();
    let mut mute = TcpStream::connect(listener.local_addr()).unwrap();
    mute.set_read_timeout(Some(WAIT)).unwrap();
    assert!(matches!(rejection(&listener), NetError::Timeout { .. }));
    assert_eq!(mute.read(&mut [0u8; 16]).unwrap(), 0);
    listener.close();
}

#[test]
fn a_connected_peer_that_goes_quiet_is_dropped() {
    let (server, client) = keys();
    let mut cfg = config(&server, &[client.id()]);
    cfg.keepalive = Duration::from_millis(200);
    let listener = Listener::bind(loopback(), cfg).unwrap();
    let mut raw = RawPeer::connect(listener.local_addr(), &client);
    raw.introduce();
    let link = accept(&listener);
    expect_connected(&link);
    // Keepalives arrive while the raw peer sends nothing back, and are not events.
    assert_eq!(
        raw.recv_plain(),
        Some(PROTOCOL_VERSION.to_be_bytes().to_vec())
    );
    assert!(matches!(raw.recv_message(), Some(Message::Hello(_))));
    assert_eq!(raw.recv_message(), Some(Message::Keepalive));
    let (reason, clean) = expect_disconnected(&link);
    assert!(!clean);
    assert!(reason.contains("silent"), "{reason}");
    listener.close();
}

#[test]
fn a_dialer_reconnects_when_the_listener_comes_back() {
    let (server, client) = keys();
    let (listener, dialer, accepted) = connected_pair(&server, &client, |_| {});
    let addr = listener.local_addr();
    listener.close();
    accepted.close();
    let (reason, clean) = expect_disconnected(&dialer);
    assert!(clean, "{reason}");
    assert!(!dialer.is_connected());
    assert!(matches!(
        dialer.send(Message::CaughtUp),
        Err(NetError::NotConnected { .. })
    ));

    // Attempts fail while nothing listens; each is reported.
    let (reason, _) = expect_disconnected(&dialer);
    assert!(reason.contains("cannot connect"), "{reason}");

    let listener = Listener::bind(addr, config(&server, &[client.id()])).unwrap();
    let accepted = accept(&listener);
    loop {
        match next_event(&dialer) {
            LinkEvent::Connected { peer, .. } => {
                assert_eq!(peer, server.id());
                break;
            }
            LinkEvent::Disconnected { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    expect_connected(&accepted);
    dialer.send(Message::CaughtUp).unwrap();
    assert_eq!(expect_received(&accepted), Message::CaughtUp);
    dialer.close();
    accepted.close();
    listener.close();
}

#[test]
fn key_file_round_trip_and_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys/node.key");
    let created = NodeKey::create(&path, false).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    let loaded = NodeKey::load(&path).unwrap();
    assert_eq!(loaded.id(), created.id());
    assert_eq!(created.id().to_string().parse::<NodeId>(), Ok(created.id()));

    assert!(matches!(
        NodeKey::create(&path, false),
        Err(IdentityError::Exists { .. })
    ));
    let replaced = NodeKey::create(&path, true).unwrap();
    assert_ne!(replaced.id(), created.id());
    assert_eq!(NodeKey::load(&path).unwrap().id(), replaced.id());

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let error = NodeKey::load(&path).unwrap_err();
    assert!(matches!(error, IdentityError::TooOpen { mode: 0o644, .. }));
    assert!(error.to_string().contains("chmod 600"), "{error}");
}

#[test]
fn key_files_of_the_wrong_size_or_missing_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.key");
    assert!(matches!(
        NodeKey::load(&path),
        Err(IdentityError::Missing { .. })
    ));
    std::fs::write(&path, [1u8; 33]).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let error = NodeKey::load(&path).unwrap_err();
    assert!(
        matches!(error, IdentityError::WrongSize { len: 33, .. }),
        "{error}"
    );
    assert!(!error.to_string().contains('\n'));
}

#[test]
fn a_typo_in_a_node_id_is_detected() {
    // A fixed key keeps the test deterministic.
    let id = NodeKey::from_private_bytes([3; 32]).id().to_string();
    let mut chars: Vec<char> = id.chars().collect();
    let position = 20;
    chars[position] = if chars[position] == 'Q' { 'R' } else { 'Q' };
    let typo: String = chars.into_iter().collect();
    let error = typo.parse::<NodeId>().unwrap_err();
    assert!(matches!(error, NodeIdError::Checksum { .. }));
    assert!(error.to_string().contains("typo"), "{error}");
    // Swapped neighbours, a common typing slip.
    let mut chars: Vec<char> = id.chars().collect();
    let swap = (1..chars.len())
        .find(|&i| chars[i] != chars[i - 1] && chars[i] != '-' && chars[i - 1] != '-')
        .unwrap();
    chars.swap(swap, swap - 1);
    let swapped: String = chars.into_iter().collect();
    assert!(swapped.parse::<NodeId>().is_err());
}
