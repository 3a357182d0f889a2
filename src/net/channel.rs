//! One authenticated, encrypted connection: the Noise handshake, the version and hello
//! exchange, and messages split over Noise frames.
//!
//! After `Noise_XX` each side knows the other's static key. The initiator checks it before
//! it even reveals its own (XX sends the responder's key first); the responder checks it
//! when the handshake ends. Either way, a key that is not expected ends the connection
//! before any transport message is read.
//!
//! Then, in each direction: one Noise message holding only the protocol version (a bare
//! big-endian `u16`), then [`Message`]s. A message is bincode-encoded and preceded by its
//! length as a big-endian `u32`; those bytes are cut into Noise messages of at most
//! [`MAX_PLAINTEXT`] bytes. The receiver checks the length against
//! [`proto::MAX_MESSAGE`] before it allocates, and refuses a message whose frames carry
//! more or fewer bytes than announced, or bytes bincode does not consume.
//!
//! Both sides count Noise messages per direction and rekey that direction after every
//! `rekey_after` of them, so the keys change at the same message on both ends.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::frame::{self, Deadline, MAX_FRAME, MAX_PLAINTEXT};
use super::{noise, LinkConfig, NetError, PeerSet};
use crate::identity::{NodeId, NodeKey};
use crate::sync::proto::{self, Message, PROTOCOL_VERSION};

/// The bincode configuration of every message; the limit guards decoding.
fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ proto::MAX_MESSAGE }>()
}

/// Length of the prefix before the bytes of a message.
const LENGTH_PREFIX: usize = 4;

/// Whose key the handshake must find on the other side.
pub(crate) enum Expect<'a> {
    /// A dialer knows whom it calls.
    Peer(NodeId),
    /// A listener takes any configured peer.
    AnyOf(&'a PeerSet),
}

/// The Noise transport state with its message counters, shared by both halves.
struct Transport {
    state: snow::TransportState,
    sent: u64,
    received: u64,
    rekey_after: u64,
}

impl Transport {
    fn encrypt(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), NetError> {
        let mut ciphertext = [0u8; MAX_FRAME];
        let len = self
            .state
            .write_message(plaintext, &mut ciphertext)
            .map_err(|e| NetError::Encrypt(e.to_string()))?;
        frame::push_frame(out, ciphertext.get(..len).unwrap_or_default())?;
        self.sent += 1;
        if self.sent % self.rekey_after == 0 {
            self.state.rekey_outgoing();
        }
        Ok(())
    }

    fn decrypt(&mut self, frame: &[u8], plaintext: &mut [u8]) -> Result<usize, NetError> {
        let len = self
            .state
            .read_message(frame, plaintext)
            .map_err(|_| NetError::Decrypt)?;
        self.received += 1;
        if self.received % self.rekey_after == 0 {
            self.state.rekey_incoming();
        }
        Ok(len)
    }
}

/// The sending half of a connection.
pub(crate) struct ChannelSender {
    stream: TcpStream,
    transport: Arc<Mutex<Transport>>,
    frames: Vec<u8>,
    write_timeout: Duration,
}

impl ChannelSender {
    /// Bounds every later write (a peer that takes nothing for this long is dropped).
    pub(crate) fn set_write_timeout(&mut self, timeout: Duration) -> Result<(), NetError> {
        self.write_timeout = timeout;
        self.stream
            .set_write_timeout(Some(timeout))
            .map_err(NetError::Io)
    }

    pub(crate) fn send(&mut self, message: &Message) -> Result<(), NetError> {
        let body = bincode::serde::encode_to_vec(message, bincode_config())
            .map_err(|e| NetError::Encode(e.to_string()))?;
        if body.len() > proto::MAX_MESSAGE {
            return Err(NetError::Encode(format!(
                "{} bytes, more than the {}-byte limit",
                body.len(),
                proto::MAX_MESSAGE
            )));
        }
        let total = u32::try_from(body.len())
            .map_err(|_| NetError::Encode(format!("{} bytes", body.len())))?;
        let first_len = body.len().min(MAX_PLAINTEXT - LENGTH_PREFIX);
        let (first, rest) = body.split_at(first_len);
        let mut first_plain = Vec::with_capacity(LENGTH_PREFIX + first.len());
        first_plain.extend_from_slice(&total.to_be_bytes());
        first_plain.extend_from_slice(first);
        self.frames.clear();
        {
            let mut transport = self.transport.lock();
            transport.encrypt(&first_plain, &mut self.frames)?;
            for piece in rest.chunks(MAX_PLAINTEXT) {
                transport.encrypt(piece, &mut self.frames)?;
            }
        }
        frame::write_all(&mut self.stream, &self.frames, self.write_timeout)
    }

    fn send_version(&mut self, version: u16) -> Result<(), NetError> {
        self.frames.clear();
        self.transport
            .lock()
            .encrypt(&version.to_be_bytes(), &mut self.frames)?;
        frame::write_all(&mut self.stream, &self.frames, self.write_timeout)
    }
}

/// The receiving half of a connection.
pub(crate) struct ChannelReceiver {
    stream: TcpStream,
    transport: Arc<Mutex<Transport>>,
    frame: Vec<u8>,
    plaintext: Vec<u8>,
}

impl ChannelReceiver {
    /// The next message; each of its frames must arrive within `idle_limit`.
    pub(crate) fn recv(&mut self, idle_limit: Duration) -> Result<Message, NetError> {
        self.recv_within(|| Deadline::after(idle_limit, "while connected"))
    }

    fn recv_within(&mut self, deadline: impl Fn() -> Deadline) -> Result<Message, NetError> {
        let len = self.read_plaintext(deadline(), true)?;
        let first = self.plaintext.get(..len).unwrap_or_default();
        let (prefix, first_body) = first
            .split_first_chunk::<LENGTH_PREFIX>()
            .ok_or(NetError::Malformed("a message without its length"))?;
        let total = u32::from_be_bytes(*prefix);
        let total = usize::try_from(total)
            .ok()
            .filter(|total| *total <= proto::MAX_MESSAGE)
            .ok_or(NetError::Oversized {
                len: u64::from(total),
                max: proto::MAX_MESSAGE,
            })?;
        if total == 0 {
            return Err(NetError::Malformed("an empty message"));
        }
        if first_body.len() > total {
            return Err(NetError::Malformed("bytes after the end of a message"));
        }
        let mut body = Vec::with_capacity(total);
        body.extend_from_slice(first_body);
        while body.len() < total {
            let len = self.read_plaintext(deadline(), false)?;
            if len == 0 {
                return Err(NetError::Malformed("an empty frame inside a message"));
            }
            if body.len() + len > total {
                return Err(NetError::Malformed("bytes after the end of a message"));
            }
            body.extend_from_slice(self.plaintext.get(..len).unwrap_or_default());
        }
        let (message, used) = bincode::serde::decode_from_slice(&body, bincode_config())
            .map_err(|e| NetError::Decode(e.to_string()))?;
        if used != body.len() {
            return Err(NetError::Malformed("bytes after the end of a message"));
        }
        Ok(message)
    }

    fn recv_version(&mut self, deadline: Deadline) -> Result<u16, NetError> {
        let len = self.read_plaintext(deadline, true)?;
        self.plaintext
            .get(..len)
            .and_then(|bytes| <[u8; 2]>::try_from(bytes).ok())
            .map(u16::from_be_bytes)
            .ok_or(NetError::Malformed(
                "the first message is not a protocol version",
            ))
    }

    /// Reads and decrypts one frame into `self.plaintext`; returns the plaintext length.
    fn read_plaintext(&mut self, deadline: Deadline, at_boundary: bool) -> Result<usize, NetError> {
        frame::read_frame(&mut self.stream, &mut self.frame, deadline, at_boundary)?;
        self.plaintext.resize(MAX_PLAINTEXT, 0);
        self.transport
            .lock()
            .decrypt(&self.frame, &mut self.plaintext)
    }
}

/// A connection that passed the handshake, the version check and the hello exchange.
pub(crate) struct Established {
    pub(crate) sender: ChannelSender,
    pub(crate) receiver: ChannelReceiver,
    /// Another handle on the socket, to cut the connection from outside its threads.
    pub(crate) socket: TcpStream,
    pub(crate) peer: NodeId,
    pub(crate) addr: SocketAddr,
    pub(crate) hello: proto::Hello,
}

/// Runs the whole setup on a connected stream; everything must be done by `deadline`.
pub(crate) fn establish(
    mut stream: TcpStream,
    initiator: bool,
    cfg: &LinkConfig,
    expect: Expect<'_>,
    deadline: Deadline,
) -> Result<Established, NetError> {
    let addr = stream.peer_addr().map_err(NetError::Io)?;
    stream.set_nodelay(true).map_err(NetError::Io)?;
    let (state, peer) = handshake(&mut stream, initiator, &cfg.key, &expect, addr, deadline)?;
    let transport = Arc::new(Mutex::new(Transport {
        state,
        sent: 0,
        received: 0,
        rekey_after: cfg.rekey_after.max(1),
    }));
    let mut sender = ChannelSender {
        stream: stream.try_clone().map_err(NetError::Io)?,
        transport: Arc::clone(&transport),
        frames: Vec::new(),
        write_timeout: Duration::ZERO,
    };
    let mut receiver = ChannelReceiver {
        stream: stream.try_clone().map_err(NetError::Io)?,
        transport,
        frame: Vec::new(),
        plaintext: Vec::new(),
    };
    let local = cfg.key.id();
    // A dialer refused by the other side sees the connection end right here.
    let refused = |e: NetError| match e {
        NetError::PeerClosed | NetError::Truncated if initiator => {
            NetError::RefusedByPeer { local }
        }
        NetError::Io(e)
            if initiator
                && matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
        {
            NetError::RefusedByPeer { local }
        }
        NetError::PeerClosed => NetError::Handshake("the peer hung up".into()),
        other => other,
    };
    deadline.limit_writes(&stream)?;
    sender.write_timeout = deadline.allowed();
    sender.send_version(PROTOCOL_VERSION).map_err(refused)?;
    sender
        .send(&Message::Hello(cfg.hello.clone()))
        .map_err(refused)?;
    let theirs = receiver.recv_version(deadline).map_err(refused)?;
    if theirs != PROTOCOL_VERSION {
        let error = NetError::Version {
            ours: PROTOCOL_VERSION,
            theirs,
        };
        // The other side may still understand an error message; it is a courtesy.
        let _ = sender.send(&Message::Error(error.to_string()));
        return Err(error);
    }
    let hello = match receiver.recv_within(|| deadline).map_err(refused)? {
        Message::Hello(hello) => hello,
        Message::Error(text) => return Err(NetError::Remote(text)),
        _ => {
            return Err(NetError::Unexpected {
                expected: "its hello",
            })
        }
    };
    Ok(Established {
        sender,
        receiver,
        socket: stream,
        peer,
        addr,
        hello,
    })
}

/// The three `Noise_XX` messages; returns the transport and the peer's checked ID.
fn handshake(
    stream: &mut TcpStream,
    initiator: bool,
    key: &NodeKey,
    expect: &Expect<'_>,
    addr: SocketAddr,
    deadline: Deadline,
) -> Result<(snow::TransportState, NodeId), NetError> {
    let mut state = noise::handshake(key.private_bytes(), initiator)?;
    let mut buf = [0u8; MAX_FRAME];
    let mut frame = Vec::new();
    let mut send = |state: &mut snow::HandshakeState, stream: &mut TcpStream| {
        let len = state
            .write_message(&[], &mut buf)
            .map_err(|e| NetError::Handshake(e.to_string()))?;
        let mut out = Vec::with_capacity(len + 2);
        frame::push_frame(&mut out, buf.get(..len).unwrap_or_default())?;
        deadline.limit_writes(stream)?;
        frame::write_all(stream, &out, deadline.allowed())
    };
    let mut receive = |state: &mut snow::HandshakeState, stream: &mut TcpStream| {
        read_handshake_frame(stream, &mut frame, deadline)?;
        let mut payload = [0u8; MAX_FRAME];
        let len = state
            .read_message(&frame, &mut payload)
            .map_err(|e| NetError::Handshake(e.to_string()))?;
        if len != 0 {
            return Err(NetError::Malformed("data inside the handshake"));
        }
        Ok(())
    };
    let check = |state: &snow::HandshakeState| -> Result<NodeId, NetError> {
        let peer = state
            .get_remote_static()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .map(NodeId::from_bytes)
            .ok_or_else(|| NetError::Handshake("the peer sent no static key".into()))?;
        match expect {
            Expect::Peer(expected) if *expected != peer => Err(NetError::WrongPeer {
                addr,
                expected: *expected,
                actual: peer,
            }),
            Expect::AnyOf(allowed) if !allowed.contains(&peer) => {
                Err(NetError::UnknownPeer { peer })
            }
            _ => Ok(peer),
        }
    };
    let peer = if initiator {
        send(&mut state, stream)?;
        receive(&mut state, stream)?;
        let peer = check(&state)?;
        send(&mut state, stream)?;
        peer
    } else {
        receive(&mut state, stream)?;
        send(&mut state, stream)?;
        receive(&mut state, stream)?;
        check(&state)?
    };
    let transport = state
        .into_transport_mode()
        .map_err(|e| NetError::Handshake(e.to_string()))?;
    Ok((transport, peer))
}

fn read_handshake_frame(
    stream: &mut TcpStream,
    frame: &mut Vec<u8>,
    deadline: Deadline,
) -> Result<(), NetError> {
    frame::read_frame(stream, frame, deadline, false).map_err(|e| match e {
        NetError::PeerClosed | NetError::Truncated => {
            NetError::Handshake("the peer hung up".into())
        }
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    fn config(key: &Arc<NodeKey>, allowed: &[NodeId]) -> LinkConfig {
        LinkConfig::new(
            Arc::clone(key),
            allowed.iter().copied().collect(),
            proto::Hello {
                node_name: "test".into(),
                sends: true,
                receives: true,
            },
        )
    }

    /// Both ends of one established connection over 127.0.0.1.
    fn pair() -> (Established, Established) {
        let server = Arc::new(NodeKey::generate());
        let client = Arc::new(NodeKey::generate());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server_cfg = config(&server, &[client.id()]);
        let responder = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let deadline = Deadline::after(Duration::from_secs(10), "test");
            establish(
                stream,
                false,
                &server_cfg,
                Expect::AnyOf(&server_cfg.allowed),
                deadline,
            )
            .unwrap()
        });
        let stream = TcpStream::connect(addr).unwrap();
        let deadline = Deadline::after(Duration::from_secs(10), "test");
        let client_cfg = config(&client, &[]);
        let initiator = establish(
            stream,
            true,
            &client_cfg,
            Expect::Peer(server.id()),
            deadline,
        )
        .unwrap();
        (initiator, responder.join().unwrap())
    }

    /// Messages whose encoding ends right before, at and after a frame boundary arrive
    /// whole: the length prefix and the split are exact.
    #[test]
    fn messages_around_frame_boundaries_round_trip() {
        let (mut a, mut b) = pair();
        let boundary = MAX_PLAINTEXT - LENGTH_PREFIX;
        let sizes = (boundary - 8..=boundary + 8)
            .chain(boundary + MAX_PLAINTEXT - 8..=boundary + MAX_PLAINTEXT + 8);
        for size in sizes {
            let message = Message::Error("x".repeat(size));
            a.sender.send(&message).unwrap();
            assert_eq!(b.receiver.recv(Duration::from_secs(10)).unwrap(), message);
        }
    }
}
