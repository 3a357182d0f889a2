//! What a running mount knows about itself, for `filesync status`, the Prometheus endpoint
//! ([`crate::metrics`]) and systemd's `STATUS=` line ([`crate::service`]).
//!
//! One [`Stats`] per mount is shared (`Arc`) by the parts that feed it: the FUSE adapter
//! counts operations, the coalescer counts captured changes and beats the pipeline's
//! heartbeat, the compressor and the session count payload bytes, the session and the
//! sender follow peers (connected or not, changes in flight, last error). Counters are
//! atomics, so the hot paths never wait for a reader; the per-peer table sits behind a
//! mutex taken once per message at most.
//!
//! Bytes on the wire and round-trip times are not counted here at all: each link reads them
//! from the kernel's `TCP_INFO` when asked ([`crate::net::Traffic`]), so they cost nothing
//! between two status requests and need no change to the protocol.
//!
//! [`Stats::report`] turns the whole into a [`MountStatus`], the stable JSON document
//! `filesync status --json` prints.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::change::{Change, Source};
use crate::config::Mode;
use crate::identity::NodeId;
use crate::net::{PathKind, Traffic};
use crate::sync::proto::{FileData, Op, Payload};

/// Changes in flight remembered per peer and direction; beyond this the oldest are
/// forgotten (the lag then reads low rather than the memory growing without bound).
const MAX_IN_FLIGHT: usize = 65_536;

/// The kinds of FUSE request counted, one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuseOp {
    Lookup,
    Getattr,
    Setattr,
    Readlink,
    Mknod,
    Mkdir,
    Unlink,
    Rmdir,
    Symlink,
    Rename,
    Link,
    Open,
    Read,
    Write,
    Flush,
    Release,
    Fsync,
    Opendir,
    Readdir,
    Releasedir,
    Fsyncdir,
    Statfs,
    Setxattr,
    Getxattr,
    Listxattr,
    Removexattr,
    Access,
    Create,
    Ioctl,
    Fallocate,
    Lseek,
    CopyFileRange,
}

impl FuseOp {
    pub const ALL: [FuseOp; 32] = [
        FuseOp::Lookup,
        FuseOp::Getattr,
        FuseOp::Setattr,
        FuseOp::Readlink,
        FuseOp::Mknod,
        FuseOp::Mkdir,
        FuseOp::Unlink,
        FuseOp::Rmdir,
        FuseOp::Symlink,
        FuseOp::Rename,
        FuseOp::Link,
        FuseOp::Open,
        FuseOp::Read,
        FuseOp::Write,
        FuseOp::Flush,
        FuseOp::Release,
        FuseOp::Fsync,
        FuseOp::Opendir,
        FuseOp::Readdir,
        FuseOp::Releasedir,
        FuseOp::Fsyncdir,
        FuseOp::Statfs,
        FuseOp::Setxattr,
        FuseOp::Getxattr,
        FuseOp::Listxattr,
        FuseOp::Removexattr,
        FuseOp::Access,
        FuseOp::Create,
        FuseOp::Ioctl,
        FuseOp::Fallocate,
        FuseOp::Lseek,
        FuseOp::CopyFileRange,
    ];

    /// The label value in metrics.
    pub fn name(self) -> &'static str {
        match self {
            FuseOp::Lookup => "lookup",
            FuseOp::Getattr => "getattr",
            FuseOp::Setattr => "setattr",
            FuseOp::Readlink => "readlink",
            FuseOp::Mknod => "mknod",
            FuseOp::Mkdir => "mkdir",
            FuseOp::Unlink => "unlink",
            FuseOp::Rmdir => "rmdir",
            FuseOp::Symlink => "symlink",
            FuseOp::Rename => "rename",
            FuseOp::Link => "link",
            FuseOp::Open => "open",
            FuseOp::Read => "read",
            FuseOp::Write => "write",
            FuseOp::Flush => "flush",
            FuseOp::Release => "release",
            FuseOp::Fsync => "fsync",
            FuseOp::Opendir => "opendir",
            FuseOp::Readdir => "readdir",
            FuseOp::Releasedir => "releasedir",
            FuseOp::Fsyncdir => "fsyncdir",
            FuseOp::Statfs => "statfs",
            FuseOp::Setxattr => "setxattr",
            FuseOp::Getxattr => "getxattr",
            FuseOp::Listxattr => "listxattr",
            FuseOp::Removexattr => "removexattr",
            FuseOp::Access => "access",
            FuseOp::Create => "create",
            FuseOp::Ioctl => "ioctl",
            FuseOp::Fallocate => "fallocate",
            FuseOp::Lseek => "lseek",
            FuseOp::CopyFileRange => "copy_file_range",
        }
    }
}

/// The capture sources counted, in the order of [`Stats::captured`].
pub const SOURCES: [Source; 5] = [
    Source::Fuse,
    Source::Ebpf,
    Source::Fanotify,
    Source::Inotify,
    Source::Scan,
];

/// The label value of a capture source in metrics.
pub fn source_name(source: Source) -> &'static str {
    match source {
        Source::Fuse => "fuse",
        Source::Ebpf => "ebpf",
        Source::Fanotify => "fanotify",
        Source::Inotify => "inotify",
        Source::Scan => "scan",
    }
}

fn source_index(source: Source) -> usize {
    SOURCES.iter().position(|s| *s == source).unwrap_or(0)
}

/// Payload bytes of file data, before (raw) and after (on the wire) compression.
#[derive(Debug, Default)]
pub struct PayloadBytes {
    pub raw: AtomicU64,
    pub compressed: AtomicU64,
}

impl PayloadBytes {
    pub fn add(&self, raw: u64, compressed: u64) {
        self.raw.fetch_add(raw, Ordering::Relaxed);
        self.compressed.fetch_add(compressed, Ordering::Relaxed);
    }
}

/// Where per-link traffic is read from when a report is made (the session's peer table).
pub trait TrafficSource: Send + Sync {
    /// The traffic of every live link, by peer (a peer may have two links for a moment).
    fn traffic(&self) -> Vec<(NodeId, Traffic)>;
}

/// What is known of one peer between connections.
#[derive(Debug, Default)]
struct PeerState {
    /// The address dialed, or the one the peer last connected from.
    address: Option<SocketAddr>,
    name: Option<String>,
    connected: bool,
    /// How the current (or last) connection goes.
    path: Option<PathKind>,
    last_error: Option<String>,
    /// Whether this node dropped the current connection, with a reason in `last_error`
    /// that says more than the disconnection will.
    dropped: bool,
    /// Changes sent to the peer and not yet acknowledged: `(seq, when sent)`.
    sent: VecDeque<(u64, Instant)>,
    /// Changes received from the peer and not yet acknowledged: `(seq, when received)`.
    received: VecDeque<(u64, Instant)>,
    /// Traffic of links that have ended.
    retired: Traffic,
}

/// The live state of one mount. See the module documentation.
pub struct Stats {
    backing: PathBuf,
    mountpoint: PathBuf,
    mode: String,
    node_id: OnceLock<String>,
    watcher: OnceLock<String>,
    fuse_ops: [AtomicU64; FuseOp::ALL.len()],
    captured: [AtomicU64; SOURCES.len()],
    pub sent_payload: PayloadBytes,
    pub received_payload: PayloadBytes,
    /// Seconds from a peer's change arriving to this node acknowledging it as applied.
    pub apply_latency: Histogram,
    /// Advanced by the pipeline's actors as they loop; the systemd watchdog pings only
    /// while it moves.
    heartbeat: AtomicU64,
    capture_queue: OnceLock<crossbeam_channel::Receiver<Change>>,
    traffic: OnceLock<Arc<dyn TrafficSource>>,
    peers: Mutex<BTreeMap<NodeId, PeerState>>,
    last_error: Mutex<Option<String>>,
    /// Conflict copies in the tree, as of the last catch-up summary.
    open_conflicts: AtomicU64,
    /// This node's public address, as a rendezvous or STUN server last saw it.
    public_address: Mutex<Option<String>>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

impl Stats {
    pub fn new(backing: PathBuf, mountpoint: PathBuf, mode: String) -> Stats {
        Stats {
            backing,
            mountpoint,
            mode,
            node_id: OnceLock::new(),
            watcher: OnceLock::new(),
            fuse_ops: std::array::from_fn(|_| AtomicU64::new(0)),
            captured: std::array::from_fn(|_| AtomicU64::new(0)),
            sent_payload: PayloadBytes::default(),
            received_payload: PayloadBytes::default(),
            apply_latency: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16),
            ),
            heartbeat: AtomicU64::new(0),
            capture_queue: OnceLock::new(),
            traffic: OnceLock::new(),
            peers: Mutex::new(BTreeMap::new()),
            last_error: Mutex::new(None),
            open_conflicts: AtomicU64::new(0),
            public_address: Mutex::new(None),
        }
    }

    pub fn mountpoint(&self) -> &std::path::Path {
        &self.mountpoint
    }

    pub fn set_node_id(&self, id: String) {
        let _ = self.node_id.set(id);
    }

    /// The watcher in use: `ebpf`, `fanotify`, `inotify` or `scan`.
    pub fn set_watcher(&self, watcher: String) {
        let _ = self.watcher.set(watcher);
    }

    pub fn set_capture_queue(&self, queue: crossbeam_channel::Receiver<Change>) {
        let _ = self.capture_queue.set(queue);
    }

    pub fn set_traffic_source(&self, source: Arc<dyn TrafficSource>) {
        let _ = self.traffic.set(source);
    }

    pub fn count_fuse_op(&self, op: FuseOp) {
        if let Some(counter) = self.fuse_ops.get(op as usize) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn fuse_ops(&self) -> impl Iterator<Item = (FuseOp, u64)> + '_ {
        FuseOp::ALL
            .iter()
            .zip(&self.fuse_ops)
            .map(|(op, count)| (*op, count.load(Ordering::Relaxed)))
    }

    pub fn count_captured(&self, source: Source) {
        if let Some(counter) = self.captured.get(source_index(source)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn captured(&self) -> impl Iterator<Item = (Source, u64)> + '_ {
        SOURCES
            .iter()
            .zip(&self.captured)
            .map(|(source, count)| (*source, count.load(Ordering::Relaxed)))
    }

    pub fn beat(&self) {
        self.heartbeat.fetch_add(1, Ordering::Relaxed);
    }

    pub fn heartbeat(&self) -> u64 {
        self.heartbeat.load(Ordering::Relaxed)
    }

    /// Changes waiting for the graph in the capture queue.
    pub fn capture_queue_depth(&self) -> usize {
        self.capture_queue.get().map_or(0, |queue| queue.len())
    }

    /// Remembers the most recent error of the mount (shown until replaced).
    /// How many conflict copies the tree holds (counted at each catch-up summary).
    pub fn set_open_conflicts(&self, count: u64) {
        self.open_conflicts.store(count, Ordering::Relaxed);
    }

    pub fn set_last_error(&self, error: String) {
        *self.last_error.lock() = Some(error);
    }

    /// A configured peer, listed even before it ever connects.
    pub fn add_peer(&self, peer: NodeId, address: Option<SocketAddr>) {
        self.peers.lock().entry(peer).or_default().address = address;
    }

    pub fn set_public_address(&self, address: Option<String>) {
        *self.public_address.lock() = address;
    }

    pub fn peer_connected(&self, peer: NodeId, address: SocketAddr, name: &str, path: PathKind) {
        let mut peers = self.peers.lock();
        let state = peers.entry(peer).or_default();
        state.connected = true;
        state.path = Some(path);
        state.dropped = false;
        state.address = Some(address);
        state.name = Some(name.to_owned());
        state.sent.clear();
        state.received.clear();
    }

    /// The peer's connection ended; `error` when it ended badly.
    pub fn peer_disconnected(&self, peer: NodeId, error: Option<&str>) {
        let dropped = {
            let mut peers = self.peers.lock();
            let state = peers.entry(peer).or_default();
            state.connected = false;
            state.sent.clear();
            state.received.clear();
            std::mem::take(&mut state.dropped)
        };
        if let Some(error) = error.filter(|_| !dropped) {
            self.record_peer_error(peer, error);
        }
    }

    /// This node drops the connection to `peer` for `reason`: kept as the peer's last
    /// error and the mount's.
    pub fn peer_dropped(&self, peer: NodeId, reason: &str) {
        self.peers.lock().entry(peer).or_default().dropped = true;
        self.record_peer_error(peer, reason);
    }

    fn record_peer_error(&self, peer: NodeId, error: &str) {
        self.peers.lock().entry(peer).or_default().last_error = Some(error.to_owned());
        self.set_last_error(format!("peer {peer}: {error}"));
    }

    /// A link to `peer` ended for good; its traffic stays in the totals.
    pub fn retire_link(&self, peer: NodeId, traffic: Traffic) {
        let mut peers = self.peers.lock();
        let retired = &mut peers.entry(peer).or_default().retired;
        retired.bytes_in += traffic.bytes_in;
        retired.bytes_out += traffic.bytes_out;
    }

    /// A change numbered `seq` went to `peer`.
    pub fn change_sent(&self, peer: NodeId, seq: u64) {
        push_bounded(&mut self.peers.lock().entry(peer).or_default().sent, seq);
    }

    /// `peer` acknowledged every change up to `seq`.
    pub fn acked_by(&self, peer: NodeId, seq: u64) {
        if let Some(state) = self.peers.lock().get_mut(&peer) {
            drain_until(&mut state.sent, seq);
        }
    }

    /// A change numbered `seq` arrived from `peer`.
    pub fn change_received(&self, peer: NodeId, seq: u64) {
        push_bounded(
            &mut self.peers.lock().entry(peer).or_default().received,
            seq,
        );
    }

    /// This node acknowledged to `peer` every change up to `seq`: each is applied.
    pub fn acked_to(&self, peer: NodeId, seq: u64) {
        let applied = match self.peers.lock().get_mut(&peer) {
            Some(state) => drain_until(&mut state.received, seq),
            None => Vec::new(),
        };
        for arrived in applied {
            self.apply_latency.observe(arrived.elapsed().as_secs_f64());
        }
    }

    /// Everything known now.
    pub fn report(&self) -> MountStatus {
        let now = Instant::now();
        let mut live: BTreeMap<NodeId, (Traffic, usize)> = BTreeMap::new();
        if let Some(source) = self.traffic.get() {
            for (peer, traffic) in source.traffic() {
                let (total, links) = live.entry(peer).or_default();
                total.bytes_in += traffic.bytes_in;
                total.bytes_out += traffic.bytes_out;
                total.queued += traffic.queued;
                total.rtt = total.rtt.or(traffic.rtt);
                *links += 1;
            }
        }
        let peers: Vec<PeerStatus> = self
            .peers
            .lock()
            .iter()
            .map(|(id, state)| {
                let (traffic, _) = live.get(id).copied().unwrap_or_default();
                let oldest = state.sent.front().into_iter().chain(state.received.front());
                let lag = oldest
                    .map(|(_, when)| now.saturating_duration_since(*when))
                    .max()
                    .unwrap_or_default();
                PeerStatus {
                    id: id.to_string(),
                    name: state.name.clone(),
                    address: state.address.map(|a| a.to_string()),
                    path: state.path.unwrap_or(PathKind::Direct).to_string(),
                    connected: state.connected,
                    rtt_us: if state.connected {
                        traffic.rtt.map(duration_micros)
                    } else {
                        None
                    },
                    bytes_in: state.retired.bytes_in + traffic.bytes_in,
                    bytes_out: state.retired.bytes_out + traffic.bytes_out,
                    send_queue: traffic.queued,
                    pending_changes: state.sent.len() + state.received.len(),
                    replication_lag_ms: millis(lag),
                    last_error: state.last_error.clone(),
                }
            })
            .collect();
        let in_flight: usize = peers.iter().map(|p| p.pending_changes).sum();
        MountStatus {
            backing: self.backing.display().to_string(),
            mountpoint: self.mountpoint.display().to_string(),
            node_id: self.node_id.get().cloned(),
            watcher: self.watcher.get().cloned().unwrap_or_else(|| "scan".into()),
            mode: self.mode.clone(),
            pending_changes: self.capture_queue_depth() + in_flight,
            replication_lag_ms: peers
                .iter()
                .map(|p| p.replication_lag_ms)
                .max()
                .unwrap_or(0),
            last_error: self.last_error.lock().clone(),
            open_conflicts: self.open_conflicts.load(Ordering::Relaxed),
            public_address: self.public_address.lock().clone(),
            peers,
        }
    }

    /// One line for systemd's `STATUS=`: `mounted, watcher ebpf, 1 of 2 peers connected`.
    pub fn summary(&self) -> String {
        let (connected, total) = {
            let peers = self.peers.lock();
            (peers.values().filter(|p| p.connected).count(), peers.len())
        };
        let watcher = self.watcher.get().map_or("scan", String::as_str);
        match total {
            0 => format!("mounted, watcher {watcher}"),
            1 => format!(
                "mounted, watcher {watcher}, peer {}",
                if connected == 1 {
                    "connected"
                } else {
                    "not connected"
                }
            ),
            _ => format!("mounted, watcher {watcher}, {connected} of {total} peers connected"),
        }
    }
}

/// The name of a mode, as settings write it.
pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::SendReceive => "sendreceive",
        Mode::SendOnly => "sendonly",
        Mode::ReceiveOnly => "receiveonly",
    }
}

/// The file data a change carries: its raw size and its size as it travels (compressed or
/// not).
pub fn payload_sizes(op: &Op) -> (u64, u64) {
    let payloads: Vec<&Payload> = match op {
        Op::File { data, .. } => match data {
            FileData::Ranges(ranges) => ranges.iter().map(|range| &range.data).collect(),
            FileData::Delta { delta, .. } => vec![delta],
            FileData::Whole { data, .. } => vec![data],
            FileData::Unchanged => Vec::new(),
        },
        _ => Vec::new(),
    };
    payloads.iter().fold((0, 0), |(raw, sent), payload| {
        (
            raw + u64::from(payload.raw_len),
            sent + payload.bytes.len() as u64,
        )
    })
}

fn push_bounded(queue: &mut VecDeque<(u64, Instant)>, seq: u64) {
    if queue.len() >= MAX_IN_FLIGHT {
        queue.pop_front();
    }
    queue.push_back((seq, Instant::now()));
}

/// Removes the entries up to `seq`; returns when each arrived.
fn drain_until(queue: &mut VecDeque<(u64, Instant)>, seq: u64) -> Vec<Instant> {
    let mut done = Vec::new();
    while let Some((first, when)) = queue.front().copied() {
        if first > seq {
            break;
        }
        queue.pop_front();
        done.push(when);
    }
    done
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn duration_micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// One mount, as `filesync status --json` prints it. Fields are only ever added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountStatus {
    /// The backing folder.
    pub backing: String,
    pub mountpoint: String,
    /// This node's ID, when the mount replicates.
    pub node_id: Option<String>,
    /// `ebpf`, `fanotify`, `inotify` or `scan`.
    pub watcher: String,
    /// `sendreceive`, `sendonly` or `receiveonly`.
    pub mode: String,
    /// Changes captured and not yet taken by the pipeline, plus changes sent to or
    /// received from peers and not yet acknowledged.
    pub pending_changes: usize,
    /// The largest of the peers' lags.
    pub replication_lag_ms: u64,
    pub last_error: Option<String>,
    /// Conflict copies in the tree (`filesync conflicts` lists them), as of the last
    /// catch-up summary.
    pub open_conflicts: u64,
    /// This node's public address, when a rendezvous or STUN server told it.
    #[serde(default)]
    pub public_address: Option<String>,
    pub peers: Vec<PeerStatus>,
}

/// One configured or connected peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: String,
    /// The name the peer gave when it last connected.
    pub name: Option<String>,
    pub address: Option<String>,
    /// How the connection is made (the last one, while disconnected): `direct` (a TCP
    /// connection to an address one side listens on), `hole-punched` (through both NATs,
    /// introduced by a rendezvous) or `relayed` (through the rendezvous, still encrypted
    /// end to end).
    pub path: String,
    pub connected: bool,
    /// The kernel's smoothed TCP round-trip time of the connection, in microseconds.
    pub rtt_us: Option<u64>,
    /// Bytes received from and sent to the peer on the wire (TCP payload, encrypted),
    /// over every connection since the mount started.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Messages waiting in the link's queue.
    pub send_queue: usize,
    /// Changes sent and not yet acknowledged, plus changes received and not yet applied.
    pub pending_changes: usize,
    /// How long the oldest of those has waited.
    pub replication_lag_ms: u64,
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> NodeId {
        crate::identity::NodeKey::generate().id()
    }

    #[test]
    fn acks_drain_what_was_sent_and_received() {
        let stats = Stats::new("/srv".into(), "/mnt".into(), "sendreceive".into());
        let id = peer();
        stats.add_peer(id, None);
        stats.peer_connected(
            id,
            "127.0.0.1:1".parse().expect("address"),
            "b",
            PathKind::Direct,
        );
        for seq in 1..=3 {
            stats.change_sent(id, seq);
            stats.change_received(id, seq + 10);
        }
        assert_eq!(stats.report().peers[0].pending_changes, 6);
        stats.acked_by(id, 2);
        stats.acked_to(id, 12);
        let report = stats.report();
        assert_eq!(report.peers[0].pending_changes, 2);
        assert_eq!(report.pending_changes, 2);
        assert!(report.peers[0].connected);
        assert_eq!(stats.summary(), "mounted, watcher scan, peer connected");

        stats.peer_disconnected(id, Some("reset by peer"));
        let report = stats.report();
        assert!(!report.peers[0].connected);
        assert_eq!(report.peers[0].pending_changes, 0);
        assert_eq!(report.peers[0].last_error.as_deref(), Some("reset by peer"));
        assert!(report
            .last_error
            .is_some_and(|e| e.contains("reset by peer")));

        // The reason this node dropped a connection says more than the disconnection.
        stats.peer_connected(
            id,
            "127.0.0.1:1".parse().expect("address"),
            "b",
            PathKind::Direct,
        );
        stats.peer_dropped(id, "it sent changes to a send-only node");
        stats.peer_disconnected(id, Some("connection reset"));
        let report = stats.report();
        assert_eq!(
            report.peers[0].last_error.as_deref(),
            Some("it sent changes to a send-only node")
        );
    }

    #[test]
    fn every_fuse_op_has_its_own_counter() {
        for (index, op) in FuseOp::ALL.iter().enumerate() {
            assert_eq!(*op as usize, index, "{} is out of order in ALL", op.name());
        }
    }

    #[test]
    fn counters_count_by_kind() {
        let stats = Stats::new("/srv".into(), "/mnt".into(), "sendreceive".into());
        stats.count_fuse_op(FuseOp::Write);
        stats.count_fuse_op(FuseOp::Write);
        stats.count_captured(Source::Ebpf);
        let writes = stats.fuse_ops().find(|(op, _)| *op == FuseOp::Write);
        assert_eq!(writes, Some((FuseOp::Write, 2)));
        let ebpf = stats.captured().find(|(s, _)| *s == Source::Ebpf);
        assert_eq!(ebpf, Some((Source::Ebpf, 1)));
    }
}
