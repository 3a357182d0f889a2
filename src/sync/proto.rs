//! The messages nodes exchange, once the Noise handshake has authenticated and encrypted the
//! connection. They depend on serde alone; `crate::net` encodes them with bincode 2.
//!
//! A connection carries, in order:
//!
//! 1. the protocol version (a bare `u16`, sent by the channel before any serde value, so a
//!    peer of another version is told so instead of failing to decode), then [`Hello`];
//! 2. catch-up, driven by the receiving side: [`Message::Summary`] (sender → receiver: a
//!    digest per directory), [`Message::WantDirs`], [`Message::Listing`],
//!    [`Message::WantFiles`], then the files as [`Message::Change`]s and
//!    [`Message::CaughtUp`];
//! 3. live [`Message::Change`]s, each acknowledged by [`Message::Ack`] once durable on the
//!    receiver, and [`Message::Keepalive`] when idle.
//!
//! Byte strings (paths, file data) are encoded as byte strings (`serde_bytes`), which
//! bincode copies whole instead of element by element.
//!
//! Every path is a [`RelPath`]: relative to the synced folder, checked by the receiver
//! before it is used (no `..`, not absolute, no empty or NUL components).

use serde::{Deserialize, Serialize};

use crate::identity::NodeId;

pub use super::vector::Vector;

/// The version of this message set. A peer with another version is refused with an error
/// that names both.
/// Version 2 added version vectors to [`Change`] and [`Entry`], and deleted entries to
/// listings. Version 3 added [`Reach`], spoken with rendezvous nodes.
pub const PROTOCOL_VERSION: u16 = 3;

/// The most file data one [`Message`] carries; larger content travels as several
/// [`FileData::Whole`] pieces or several ranges messages.
pub const MAX_CHUNK: usize = 1024 * 1024;

/// The largest encoded message a node accepts: a chunk plus generous room for paths and
/// metadata. Checked before anything is allocated.
pub const MAX_MESSAGE: usize = MAX_CHUNK + 256 * 1024;

/// A BLAKE3 digest.
pub type Hash = [u8; 32];

/// A path relative to the synced folder, as raw bytes (Unix paths need not be UTF-8).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RelPath(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// The first message each side sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The human-readable node name (`node_name`), for logs and `filesync status`.
    pub node_name: String,
    /// Whether this side sends its changes (`mode` is not `receiveonly`).
    pub sends: bool,
    /// Whether this side accepts changes (`mode` is not `sendonly`).
    pub receives: bool,
}

/// What kind of file an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A fifo, socket or device node.
    Special,
}

/// Metadata that travels with every change of a file, directory or link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Applied only when the receiver runs as root.
    pub uid: u32,
    pub gid: u32,
    /// Nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// All extended attributes (name, value), when they changed or are not known to match;
    /// `None` leaves the receiver's as they are.
    pub xattrs: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// How a blob's bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    Raw,
    Zstd,
}

/// Bytes that may be compressed. `raw_len` is checked against limits before decompressing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    pub codec: Codec,
    pub raw_len: u32,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// New bytes at `offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub offset: u64,
    pub data: Payload,
}

/// How a regular file's new content is described.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileData {
    /// Content as before; only metadata (and `size`, for a truncation) changed.
    Unchanged,
    /// Exactly these bytes changed (from capture records); then the file is cut or
    /// extended to `size`.
    Ranges(Vec<Range>),
    /// A `fast_rsync` delta against the receiver's current content, whose BLAKE3 is
    /// `base` (the version last synced).
    Delta { base: Hash, delta: Payload },
    /// One piece of the whole content at `offset`; the file is complete after the piece
    /// with `last`. Pieces arrive in order; a resumed transfer starts past what the
    /// receiver already holds.
    Whole {
        offset: u64,
        data: Payload,
        last: bool,
    },
}

/// What happens to one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// A regular file, created or changed. `blocks` are BLAKE3 hashes of the
    /// [`crate::index::BLOCK_SIZE`] blocks the change touched, `(block index, hash)`, as
    /// the sender read them: the receiver checks its result against them and asks for the
    /// whole file when they differ.
    File {
        meta: Meta,
        size: u64,
        data: FileData,
        blocks: Vec<(u64, Hash)>,
    },
    Dir {
        meta: Meta,
    },
    Symlink {
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
        meta: Meta,
    },
    /// A fifo, socket or device node (`mode` includes the file type bits).
    Special {
        mode: u32,
        rdev: u64,
        meta: Meta,
    },
    /// A new name for the file at `existing`.
    Link {
        existing: RelPath,
    },
    /// The path (a file, a link or a whole directory tree) is gone.
    Remove,
    /// The path moved to `to` (with `exchange`, the two swapped).
    Rename {
        to: RelPath,
        exchange: bool,
    },
}

/// One change, numbered by the sender; the receiver applies them in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub seq: u64,
    pub path: RelPath,
    pub op: Op,
    /// The version the path has after the change (of the source, for a rename): the
    /// receiver applies it only over an older version, and resolves a concurrent one as
    /// a conflict. An empty vector (a peer that never stamped) counts as oldest.
    pub version: Vector,
}

/// The digest of one directory's entries (name, kind, size, mtime, mode and content hash
/// of each), so two nodes find the directories that differ without listing everything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirDigest {
    pub dir: RelPath,
    pub digest: Hash,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    pub kind: EntryKind,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    /// BLAKE3 over the file's block hashes; of the target for a symlink; zero otherwise.
    pub content: Hash,
    pub version: Vector,
    /// The path was deleted (at this version); the other fields describe its last state.
    pub deleted: bool,
}

/// A file the receiver needs during catch-up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Want {
    pub path: RelPath,
    /// A `fast_rsync` signature of the receiver's current version, with its BLAKE3, so the
    /// sender can send a delta; `None` when the receiver has nothing useful.
    pub signature: Option<(Hash, Vec<u8>)>,
    /// How many bytes of an interrupted whole-file transfer of this very version the
    /// receiver already holds durably (a multiple of the block size), with the content
    /// hash of that version, so the transfer resumes there.
    pub resume: Option<(Hash, u64)>,
}

/// Everything that travels on a connection after the version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Hello(Hello),
    /// Sent when nothing else was sent for a while; a silent connection is dropped.
    Keepalive,
    /// Sender → receiver: the digest of every directory.
    Summary(Vec<DirDigest>),
    /// Receiver → sender: the directories whose digests differ.
    WantDirs(Vec<RelPath>),
    /// Sender → receiver: the entries of one wanted directory.
    Listing {
        dir: RelPath,
        entries: Vec<Entry>,
    },
    /// Receiver → sender: the files that differ.
    WantFiles(Vec<Want>),
    /// Sender → receiver: every wanted file was sent; what follows is live.
    CaughtUp,
    Change(Change),
    /// Receiver → sender: every change up to `seq` is durable here.
    Ack {
        seq: u64,
    },
    /// The other side made an error; the connection closes after it.
    Error(String),
    /// Between a node and a rendezvous node only (see [`crate::reach`]).
    Reach(Reach),
}

/// What a node and a rendezvous node say to each other to find a path between two nodes
/// behind NATs. Every address here only says where to try: whoever answers there must
/// still prove the expected key in the Noise handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reach {
    /// Node → rendezvous, first on its control connection and again when it learns more:
    /// addresses where it may be reached (its own, and its public one from STUN), and
    /// whether its NAT maps each destination to another port (hole punching then fails).
    Announce {
        candidates: Vec<std::net::SocketAddr>,
        endpoint_dependent: bool,
    },
    /// Rendezvous → node: the address its control connection came from.
    Observed { address: std::net::SocketAddr },
    /// Node → rendezvous: have `peer` punch towards this node now.
    Introduce { peer: NodeId },
    /// Rendezvous → both nodes: connect to `peer` at these addresses now; `relay_now`
    /// when a NAT on the way maps per destination, so only a relay will do.
    Punch {
        peer: NodeId,
        candidates: Vec<std::net::SocketAddr>,
        relay_now: bool,
    },
    /// Rendezvous → node: `peer` has no control connection, so it cannot be reached.
    Absent { peer: NodeId },
    /// Node → rendezvous, the first message of a relay connection: join it to `peer`.
    RelayOpen { peer: NodeId, session: u64 },
    /// Rendezvous → node on its control connection: `peer` opened a relay; join it.
    RelayOffer { peer: NodeId, session: u64 },
    /// Node → rendezvous, the first message of a relay connection answering an offer.
    RelayJoin { peer: NodeId, session: u64 },
    /// Rendezvous → both ends of a relay: from the next byte on, this connection carries
    /// the other node's bytes unchanged.
    RelayReady,
    /// Rendezvous → node: no relay, and why.
    RelayRefused { reason: String },
}
