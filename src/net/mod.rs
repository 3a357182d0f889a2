//! The node-to-node transport: an authenticated, encrypted channel over TCP, and peer
//! links that keep one alive.
//!
//! Layers, from the socket up:
//! - `frame`: every Noise message travels as a big-endian `u16` length and the bytes.
//! - `noise`: the crypto snow uses: X25519 from `x25519-dalek`, ChaCha20-Poly1305 from
//!   `chacha20poly1305`, BLAKE2s from snow's own resolver.
//! - `channel`: the `Noise_XX_25519_ChaChaPoly_BLAKE2s` handshake (both sides prove their
//!   static key; a key that is not expected is refused before anything else is read), the
//!   protocol version, `Hello`, and then [`crate::sync::proto::Message`]s: each one
//!   bincode-encoded, prefixed with its length (checked against
//!   [`proto::MAX_MESSAGE`] before anything is allocated) and split over Noise messages.
//!   Both directions rekey every [`LinkConfig::rekey_after`] Noise messages.
//! - `link`: a [`Link`] is one peer, run by threads: a dialed link reconnects with
//!   exponential backoff and jitter (`backoff`); a [`Listener`] turns each authenticated
//!   incoming connection into a link of its own. Keepalives flow when a link is idle, and a
//!   link that hears nothing for three keepalive periods is dropped.
//!
//! Anything wrong on the wire (a truncated or oversized frame, a frame that fails to
//! decrypt because it was tampered with, replayed or reordered, trailing bytes, a message
//! that does not decode) ends the connection with a [`NetError`] that says why.

pub(crate) mod backoff;
pub(crate) mod channel;
mod frame;
mod link;
mod noise;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::identity::{NodeId, NodeKey};
use crate::sync::proto;

pub(crate) use frame::Deadline;
pub use link::{Link, Listener, Rejection, Traffic};

/// How a link reaches its peer, as `filesync status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathKind {
    /// A TCP connection to an address the peer listens on (or from it to ours).
    Direct,
    /// A TCP connection both sides opened at once through their NATs (simultaneous open).
    HolePunched,
    /// Through a rendezvous node that forwards the bytes; encrypted end to end.
    Relayed,
}

impl PathKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::HolePunched => "hole-punched",
            PathKind::Relayed => "relayed",
        }
    }
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A TCP socket bound to `local` that shares its port with others bound the same way
/// (`SO_REUSEADDR` and `SO_REUSEPORT`): the listener, STUN queries, the connection to a
/// rendezvous and hole punches all leave from one port, so they share one NAT mapping.
pub fn shared_port_socket(local: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(local),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&SockAddr::from(local))?;
    Ok(socket)
}

/// A TCP connection to `remote`, from a port shared as [`shared_port_socket`] makes it
/// when `local` is given, else from any port.
pub fn connect_from(
    local: Option<SocketAddr>,
    remote: SocketAddr,
    timeout: Duration,
) -> std::io::Result<std::net::TcpStream> {
    let Some(local) = local else {
        return std::net::TcpStream::connect_timeout(&remote, timeout);
    };
    let socket = shared_port_socket(local)?;
    socket.connect_timeout(&socket2::SockAddr::from(remote), timeout)?;
    Ok(socket.into())
}

/// The Noise protocol every connection speaks.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// Mixed into the handshake, so only filesync nodes complete it with each other. It holds
/// no version: a node of another version must get through the handshake to be told so.
pub const NOISE_PROLOGUE: &[u8] = b"filesync";
/// Noise messages per direction between two rekeys.
pub const DEFAULT_REKEY_AFTER: u64 = 65_536;
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(10);
const MIN_KEEPALIVE: Duration = Duration::from_millis(10);
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The nodes allowed to connect.
#[derive(Debug, Clone, Default)]
pub struct PeerSet {
    ids: Arc<HashSet<NodeId>>,
}

impl PeerSet {
    pub fn new(ids: impl IntoIterator<Item = NodeId>) -> PeerSet {
        PeerSet {
            ids: Arc::new(ids.into_iter().collect()),
        }
    }

    pub fn contains(&self, id: &NodeId) -> bool {
        self.ids.contains(id)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

impl FromIterator<NodeId> for PeerSet {
    fn from_iter<I: IntoIterator<Item = NodeId>>(ids: I) -> PeerSet {
        PeerSet::new(ids)
    }
}

/// How links behave; one per node, cloned into each link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub key: Arc<NodeKey>,
    /// Who may connect to a [`Listener`]. A dialed link accepts only the peer it dials.
    pub allowed: PeerSet,
    /// What this node tells each peer about itself.
    pub hello: proto::Hello,
    /// A keepalive goes out after this much silence; a peer silent for three times this
    /// long is dropped.
    pub keepalive: Duration,
    /// Noise messages per direction between two rekeys. Both ends rekey at the same count
    /// without telling each other, so this is part of the protocol: two nodes must use the
    /// same value ([`DEFAULT_REKEY_AFTER`]); only tests change it.
    pub rekey_after: u64,
    /// The whole connection setup (TCP connect, handshake, version, hello) must finish
    /// within this.
    pub handshake_timeout: Duration,
}

impl LinkConfig {
    /// A configuration with the default keepalive, rekey interval and handshake timeout.
    pub fn new(key: Arc<NodeKey>, allowed: PeerSet, hello: proto::Hello) -> LinkConfig {
        LinkConfig {
            key,
            allowed,
            hello,
            keepalive: DEFAULT_KEEPALIVE,
            rekey_after: DEFAULT_REKEY_AFTER,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    /// The keepalive period, kept above a floor so a zero cannot make a busy loop.
    pub(crate) fn keepalive_period(&self) -> Duration {
        self.keepalive.max(MIN_KEEPALIVE)
    }

    /// How long a peer may stay silent (or refuse our data) before it is dropped.
    pub(crate) fn idle_limit(&self) -> Duration {
        self.keepalive_period().saturating_mul(3)
    }
}

/// What a [`Link`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A connection is up: the peer proved its key and said hello.
    Connected {
        peer: NodeId,
        addr: SocketAddr,
        hello: proto::Hello,
    },
    /// A message from the peer (keepalives are not reported).
    Received(proto::Message),
    /// A connection ended, or an attempt to make one failed. `clean` is true when one side
    /// closed it on purpose at a message boundary, false for every error.
    Disconnected { reason: String, clean: bool },
}

/// Why a connection could not be made or ended.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot listen on {addr}: {source}: choose a free address and port")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: {source}: check that the peer runs and listens there")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connection failed: {0}")]
    Io(#[source] std::io::Error),
    #[error("the peer stayed silent for {}s {what}: it is stuck or not a filesync node", .waited.as_secs_f64())]
    Timeout {
        what: &'static str,
        waited: Duration,
    },
    #[error("the peer took no data for {}s: it is stuck or the network is down", .waited.as_secs_f64())]
    WriteTimeout { waited: Duration },
    #[error(
        "Noise handshake failed ({0}): the peer is not a filesync node or its key does not match"
    )]
    Handshake(String),
    #[error(
        "peer {peer} is not in this node's peer list: add it with -o peer={peer} or in the settings file"
    )]
    UnknownPeer { peer: NodeId },
    #[error(
        "the node at {addr} has ID {actual}, not the expected {expected}: check the ID in -o peer=ID@ADDRESS"
    )]
    WrongPeer {
        addr: SocketAddr,
        expected: NodeId,
        actual: NodeId,
    },
    #[error(
        "the peer closed the connection during setup: it may not list this node; add it there with -o peer={local}"
    )]
    RefusedByPeer { local: NodeId },
    #[error(
        "the peer speaks protocol version {theirs}, this node speaks {ours}: run the same filesync release on both nodes"
    )]
    Version { ours: u16, theirs: u16 },
    #[error("the peer refused the connection: {0}")]
    Remote(String),
    #[error(
        "a frame failed to decrypt (tampered with, replayed or reordered): connection dropped"
    )]
    Decrypt,
    #[error("the peer announced a {len}-byte message, more than the {max}-byte limit: connection dropped")]
    Oversized { len: u64, max: usize },
    #[error("malformed data from the peer ({0}): connection dropped")]
    Malformed(&'static str),
    #[error("the connection ended in the middle of a frame: connection dropped")]
    Truncated,
    #[error("a message from the peer does not decode ({0}): connection dropped")]
    Decode(String),
    #[error(
        "a message is too large to send ({0}): split it into pieces of at most proto::MAX_CHUNK"
    )]
    Encode(String),
    #[error("encryption failed ({0}): connection dropped")]
    Encrypt(String),
    #[error("expected {expected} from the peer, got another message: connection dropped")]
    Unexpected { expected: &'static str },
    #[error("the peer closed the connection")]
    PeerClosed,
    #[error("the connection was closed by this node")]
    ClosedHere,
    #[error("not connected to {peer}: the link reconnects by itself; send again after it reports Connected")]
    NotConnected { peer: NodeId },
    #[error("the queue to {peer} stayed full: the peer is slow or stuck; try again later")]
    QueueFull { peer: NodeId },
    #[error("too many connections are in their handshake: refused {addr}; it may retry later")]
    Busy { addr: SocketAddr },
}

impl NetError {
    /// Whether the connection ended on purpose rather than through an error.
    pub fn is_clean_close(&self) -> bool {
        matches!(self, NetError::PeerClosed | NetError::ClosedHere)
    }
}
