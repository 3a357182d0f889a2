//! Setting up replication for a mount: checks done before mounting (the node key, each
//! peer's ID and address), and the parts the replication actors work with once mounted.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::applier::Receiving;
use super::session::{PeerWays, Session};
use super::ReplicationGraph;
use crate::change::ChangeSink;
use crate::config::{ConflictPolicy, DeletionRule, Mode, Replication, Settings};
use crate::identity::{NodeId, NodeKey};
use crate::ignores::Ignores;
use crate::index::Index;
use crate::net::{Link, LinkConfig, Listener, PeerSet};
use crate::reach::{ReachConfig, Reacher};
use crate::stun::{Keeper, KeeperConfig};
use crate::sync::apply::Applier;
use crate::sync::book::{replica_of, Book};
use crate::sync::compress::CompressionPolicy;
use crate::sync::conflict::{Policy, Rules};
use crate::sync::durability::{SyncGate, SYNC_TIMEOUT};
use crate::sync::encode::Encoder;
use crate::sync::local::LocalChanges;
use crate::sync::merge::Bases;
use crate::sync::proto::Hello;

/// How long a `filesync revert` waits for the applier.
const CONTROL_WAIT: Duration = Duration::from_secs(5);

/// A silent connection is probed this often, and dropped after three times as long.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// How long a peer may take to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Both directions of a connection rekey after this many messages.
const REKEY_AFTER: u64 = 65_536;

/// Why replication cannot start. One line each, saying what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("{0}")]
    Key(String),
    #[error("peer '{id}' is not a valid node ID ({reason}): copy it exactly as 'filesync id' prints it on that node")]
    PeerId { id: String, reason: String },
    #[error("cannot resolve the address {address} of peer {id}: {reason}; give HOST:PORT that resolves here")]
    PeerAddress {
        id: String,
        address: String,
        reason: String,
    },
    #[error("peer {0} is this node itself: list other nodes' IDs")]
    SelfPeer(String),
    #[error("cannot listen on {address}: {reason}; choose a free port or another address")]
    Listen { address: SocketAddr, reason: String },
    #[error("cannot start reaching peers through the rendezvous: {0}")]
    Rendezvous(String),
    #[error("cannot prepare replication in {path}: {reason}")]
    State { path: String, reason: String },
}

/// Replication checked before mounting.
#[derive(Clone)]
pub struct ReplicationPlan {
    key: Arc<NodeKey>,
    /// How conflicts are resolved, with the preferred node's ID checked.
    rules: Rules,
    peers: Vec<(NodeId, Option<SocketAddr>)>,
    rendezvous: Option<(NodeId, SocketAddr)>,
    settings: Replication,
    node_name: String,
}

impl std::fmt::Debug for ReplicationPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationPlan")
            .field("node", &self.key.id())
            .field("peers", &self.peers)
            .field("settings", &self.settings)
            .finish()
    }
}

/// The mount's side of replication: its folder and what it keeps about it.
pub struct LocalFolder<'a> {
    /// The backing folder.
    pub source: &'a Path,
    /// The mount's private state folder.
    pub state_dir: &'a Path,
    pub index: Arc<Index>,
    pub ignores: Arc<Ignores>,
    /// Where the node's own changes are captured: conflict copies the applier makes
    /// are reported here, so they are stamped and sent like any local file.
    pub capture: Arc<dyn ChangeSink>,
}

impl ReplicationPlan {
    /// `None` when the mount has no peers and does not listen.
    pub fn check(settings: &Settings) -> Result<Option<ReplicationPlan>, ReplicationError> {
        let replication = &settings.replication;
        if !replication.is_enabled() {
            return Ok(None);
        }
        let key = NodeKey::load(&replication.key)
            .map_err(|err| ReplicationError::Key(err.to_string()))?;
        let mut peers = Vec::new();
        for spec in &replication.peers {
            let id: NodeId = spec
                .id
                .parse()
                .map_err(
                    |err: crate::identity::NodeIdError| ReplicationError::PeerId {
                        id: spec.id.clone(),
                        reason: err.to_string(),
                    },
                )?;
            if id == key.id() {
                return Err(ReplicationError::SelfPeer(spec.id.clone()));
            }
            let address = match &spec.address {
                Some(address) => Some(resolve(&spec.id, address)?),
                None => None,
            };
            peers.push((id, address));
        }
        let parse_id = |id: &str| {
            id.parse::<NodeId>()
                .map_err(|err| ReplicationError::PeerId {
                    id: id.to_owned(),
                    reason: err.to_string(),
                })
        };
        let rendezvous = match &replication.rendezvous {
            Some(spec) => {
                let id = parse_id(&spec.id)?;
                let address = spec.address.as_deref().unwrap_or_default();
                Some((id, resolve(&spec.id, address)?))
            }
            None => None,
        };
        let policy = match &replication.conflicts {
            ConflictPolicy::KeepBoth => Policy::KeepBoth,
            ConflictPolicy::NewestWins => Policy::NewestWins,
            ConflictPolicy::Merge => Policy::Merge,
            ConflictPolicy::PreferNode(id) => Policy::PreferNode(replica_of(&parse_id(id)?)),
        };
        let rules = Rules {
            policy,
            deletions_win: replication.deletions == DeletionRule::DeleteWins,
        };
        Ok(Some(ReplicationPlan {
            key: Arc::new(key),
            rules,
            peers,
            rendezvous,
            settings: replication.clone(),
            node_name: settings.node_name.clone(),
        }))
    }

    /// Whether an `fsync` on the mount waits for the peers.
    pub fn is_sync(&self) -> bool {
        self.settings.durability == crate::config::Durability::Sync
    }

    pub fn mode(&self) -> Mode {
        self.settings.mode
    }

    /// Opens what replication keeps (its state under `folder.state_dir`), binds the
    /// listener and starts dialing the peers.
    pub fn start(
        &self,
        folder: LocalFolder<'_>,
        invalidate: Arc<dyn ChangeSink>,
        gate: Arc<SyncGate>,
        shared: Shared<'_>,
    ) -> Result<ReplicationGraph, ReplicationError> {
        let LocalFolder {
            source,
            state_dir,
            index,
            ignores,
            capture,
        } = folder;
        let Shared {
            settled,
            stats,
            commands,
        } = shared;
        let local = Arc::new(LocalChanges::default());
        let (revert_tx, revert_rx) = crossbeam_channel::bounded(4);
        commands.register("revert", move || {
            let (answer_tx, answer_rx) = crossbeam_channel::bounded(1);
            if revert_tx.send_timeout(answer_tx, CONTROL_WAIT).is_err() {
                return "the daemon is busy; try again".to_owned();
            }
            answer_rx
                .recv_timeout(CONTROL_WAIT)
                .unwrap_or_else(|_| "the daemon did not answer in time; try again".to_owned())
        });
        stats.set_node_id(self.key.id().to_string());
        for (id, address) in &self.peers {
            stats.add_peer(*id, *address);
        }
        let discovery = self.start_discovery();
        let stun = discovery.clone();
        commands.register("stun", move || {
            discovery.as_ref().and_then(Keeper::latest).map_or_else(
                || {
                    "no STUN discovery result (no stun= servers, or the first round is running)"
                        .to_owned()
                },
                |found| found.summary(),
            )
        });
        let state = |reason: String| ReplicationError::State {
            path: state_dir.display().to_string(),
            reason,
        };
        let mode = self.settings.mode;
        let hello = Hello {
            node_name: self.node_name.clone(),
            sends: mode.sends(),
            receives: mode.receives(),
        };
        let allowed: PeerSet = self.peers.iter().map(|(id, _)| *id).collect();
        let config = LinkConfig {
            key: self.key.clone(),
            allowed,
            hello: hello.clone(),
            keepalive: KEEPALIVE,
            rekey_after: REKEY_AFTER,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        };
        let listener = match self.settings.listen {
            Some(address) => Some(Listener::bind(address, config.clone()).map_err(|err| {
                ReplicationError::Listen {
                    address,
                    reason: err.to_string(),
                }
            })?),
            None => None,
        };
        let reacher = self.start_reacher(&config, listener.as_ref())?;
        let dialed: Vec<Link> = self
            .peers
            .iter()
            .filter_map(|(id, address)| {
                address.map(|address| Link::dial(*id, address, config.clone()))
            })
            .collect();
        let book = Arc::new(Book::new(replica_of(&self.key.id())));
        let bases = match self.rules.policy {
            Policy::Merge => Some(Arc::new(
                Bases::open(state_dir).map_err(|err| state(err.to_string()))?,
            )),
            _ => None,
        };
        let mut encoder = Encoder::open(source, state_dir).map_err(|err| state(err.to_string()))?;
        // Sequence numbers grow across restarts, so a peer's acknowledgements never go
        // backwards: start from the clock.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        encoder.set_next_seq(u64::try_from(now.as_micros()).unwrap_or(u64::MAX / 2));
        let mut applier = Applier::open(source, state_dir, index.clone())
            .map_err(|err| state(err.to_string()))?;
        applier
            .keep_versions(
                self.settings
                    .keep_versions
                    .map(|days| Duration::from_secs(u64::from(days) * 24 * 3600)),
            )
            .map_err(|err| state(err.to_string()))?;
        let compression = match self.settings.compression {
            Some(level) => CompressionPolicy::zstd(level),
            None => CompressionPolicy::off(),
        };
        tracing::info!(
            node = %self.key.id(),
            peers = self.peers.len(),
            listen = ?self.settings.listen,
            ?mode,
            "replication started"
        );
        Ok(ReplicationGraph {
            sends: mode.sends(),
            encoder,
            compression,
            session: Session::new(
                PeerWays {
                    dialed,
                    listener,
                    reacher,
                    stun,
                },
                index.clone(),
                gate.clone(),
                hello,
                settled.clone(),
                stats.clone(),
            ),
            receiving: Receiving::new(
                applier,
                index,
                invalidate,
                mode == Mode::ReceiveOnly,
                local.clone(),
                revert_rx,
                ignores,
            )
            .reporting_to(stats)
            .keeping_versions_in(
                book.clone(),
                capture,
                settled.clone(),
                self.rules,
                bases.clone(),
            ),
            gate,
            local,
            settled,
            book,
            bases,
        })
    }
}

/// What replication shares with the rest of the mount: whether its pipeline has settled,
/// its status, and its control commands (replication answers `revert`).
pub struct Shared<'a> {
    pub settled: Arc<super::Settled>,
    pub stats: Arc<crate::status::Stats>,
    pub commands: &'a crate::control::Commands,
}

impl ReplicationPlan {
    /// NAT discovery when `stun=` servers are configured, from a UDP socket on the
    /// replication port (so a later hole punch can use the same mapping), or on any port
    /// when the node does not listen. Best effort: a failure is logged, the mount goes on.
    fn start_discovery(&self) -> Option<Keeper> {
        if self.settings.stun.is_empty() {
            return None;
        }
        let local = self
            .settings
            .listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let started = std::net::UdpSocket::bind(local).and_then(|socket| {
            Keeper::start(socket, KeeperConfig::new(self.settings.stun.clone()))
        });
        match started {
            Ok(keeper) => Some(keeper),
            Err(err) => {
                tracing::warn!("NAT discovery not started: cannot use UDP {local}: {err}");
                None
            }
        }
    }
}

impl ReplicationPlan {
    /// The search for paths to the peers given without an address, when a rendezvous is
    /// configured. Its connections leave from the listening port, if the node listens.
    fn start_reacher(
        &self,
        link: &LinkConfig,
        listener: Option<&Listener>,
    ) -> Result<Option<Reacher>, ReplicationError> {
        let Some(rendezvous) = self.rendezvous else {
            return Ok(None);
        };
        let peers: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, address)| address.is_none())
            .map(|(id, _)| *id)
            .collect();
        let stun = self
            .settings
            .stun
            .iter()
            .filter_map(|server| match server.to_socket_addrs() {
                Ok(mut found) => found.next(),
                Err(err) => {
                    tracing::warn!("STUN server {server} left out: {err}");
                    None
                }
            })
            .collect();
        let config = ReachConfig {
            link: link.clone(),
            rendezvous,
            peers,
            local: listener.map(Listener::local_addr),
            stun,
            upgrade_every: self.settings.upgrade_interval,
        };
        Reacher::start(config)
            .map(Some)
            .map_err(|err| ReplicationError::Rendezvous(err.to_string()))
    }
}

/// A new gate for `durability=sync`.
pub fn sync_gate() -> Arc<SyncGate> {
    Arc::new(SyncGate::new(SYNC_TIMEOUT))
}

fn resolve(id: &str, address: &str) -> Result<SocketAddr, ReplicationError> {
    let error = |reason: String| ReplicationError::PeerAddress {
        id: id.to_owned(),
        address: address.to_owned(),
        reason,
    };
    address
        .to_socket_addrs()
        .map_err(|err| error(err.to_string()))?
        .next()
        .ok_or_else(|| error("no address found".to_owned()))
}
