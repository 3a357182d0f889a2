//! `durability=sync`: an `fsync` on the source's mount returns only after every connected
//! peer has made the data durable.
//!
//! The [`SyncGate`] ties three events together: the overlay's `fsync` takes a ticket
//! ([`FsyncBarrier::begin`]) before it records its change; the encoder reports the
//! sequence number it gave the update carrying that `fsync` ([`SyncGate::sent`]); the
//! peer sessions report each peer's acknowledgements ([`SyncGate::acked`]). The `fsync`
//! waits until an update of its path sent after its ticket is acknowledged by every peer
//! connected at that moment. A peer that disconnects stops counting (it catches up on
//! reconnect); with no peer connected the `fsync` returns at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::fs::{Errno, FsyncBarrier};
use crate::identity::NodeId;

/// How long an `fsync` waits for peers before it fails with `EIO`: long enough for a
/// large file on a slow link, short enough that a hung peer does not hang the writer.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct State {
    /// Tickets handed out so far.
    tickets: u64,
    /// Per path: the ticket count when its latest synced update was sent, and its
    /// sequence number.
    sent: HashMap<PathBuf, (u64, u64)>,
    /// Each connected receiving peer and the highest sequence number it acknowledged.
    peers: HashMap<NodeId, u64>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct SyncGate {
    state: Mutex<State>,
    changed: Condvar,
    timeout: Duration,
}

impl SyncGate {
    pub fn new(timeout: Duration) -> SyncGate {
        SyncGate {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            timeout,
        }
    }

    /// The encoder sent the update that carries an `fsync` of `path` as `seq`.
    pub fn sent(&self, path: &Path, seq: u64) {
        let mut state = self.state.lock();
        let tickets = state.tickets;
        state.sent.insert(path.to_path_buf(), (tickets, seq));
        self.changed.notify_all();
    }

    /// A peer that receives our changes connected; `acked` is where it starts.
    pub fn connected(&self, peer: NodeId, acked: u64) {
        self.state.lock().peers.insert(peer, acked);
        self.changed.notify_all();
    }

    pub fn disconnected(&self, peer: NodeId) {
        self.state.lock().peers.remove(&peer);
        self.changed.notify_all();
    }

    /// `peer` made every change up to `seq` durable.
    pub fn acked(&self, peer: NodeId, seq: u64) {
        let mut state = self.state.lock();
        if let Some(acked) = state.peers.get_mut(&peer) {
            *acked = (*acked).max(seq);
        }
        self.changed.notify_all();
    }

    /// Whether the wait of `path` for `ticket` is over.
    fn is_done(state: &State, path: &Path, ticket: u64) -> bool {
        if state.peers.is_empty() {
            return true;
        }
        match state.sent.get(path) {
            Some(&(sent_after, seq)) if sent_after >= ticket => {
                state.peers.values().all(|&acked| acked >= seq)
            }
            _ => false,
        }
    }
}

impl FsyncBarrier for SyncGate {
    fn begin(&self) -> u64 {
        let mut state = self.state.lock();
        state.tickets += 1;
        state.tickets
    }

    fn wait(&self, path: &Path, ticket: u64) -> Result<(), Errno> {
        let deadline = Instant::now() + self.timeout;
        let mut state = self.state.lock();
        while !Self::is_done(&state, path, ticket) {
            if self.changed.wait_until(&mut state, deadline).timed_out() {
                tracing::error!(
                    "fsync of {} timed out after {:?} waiting for peers to store it \
                     (durability=sync); the data is durable here and will reach them",
                    path.display(),
                    self.timeout
                );
                return Err(Errno::IO);
            }
        }
        Ok(())
    }
}
