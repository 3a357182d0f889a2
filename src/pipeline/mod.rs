//! The steady_state actor graph that turns captured changes into updates of the index.
//!
//! ```text
//! FUSE daemon ─┐
//! watcher  ────┼─▶ capture ─▶ coalescer ─▶ indexer ─▶ scanner
//! scanner  ────┘   (the scanner's findings re-enter through capture)
//! ```
//!
//! With peers (issue 4) the coalesced updates also go to replication:
//!
//! ```text
//! coalescer ─▶ encoder ─▶ compressor ─▶ sender ─▶ peers      (this node sends)
//! peers ─▶ session ─▶ verifier ─▶ applier ─▶ sender (acks, requests)
//!          session ─▶ encoder (files a peer asked for)
//! ```
//!
//! `filesync watch` runs the short graph `capture ─▶ printer`.
//!
//! Every capture source reports into one queue ([`capture::queue`]), so each actor has one
//! input and shutdown drains the graph front to back. steady_state's telemetry page shows
//! the graph live at the configured address (default `http://127.0.0.1:9900`).

pub mod applier;
pub mod capture;
pub mod coalescer;
pub mod compressor;
pub mod encoder;
pub mod indexer;
pub mod printer;
pub mod replication;
pub mod scanner;
pub mod sender;
pub mod session;
pub mod update;
pub mod verifier;

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use parking_lot::Mutex;
use steady_state::actor_builder::ActorBuilder;
use steady_state::{Graph, GraphBuilder, SoloAct};

use crate::change::Change;
use crate::ignores::Ignores;
use crate::status::Stats;
use crate::sync::compress::CompressionPolicy;
use crate::sync::durability::SyncGate;
use crate::sync::encode::Encoder;
use crate::telemetry::TelemetryFront;
use applier::Receiving;
use indexer::{Indexer, ScanReason};
use scanner::ScanJob;
use session::Session;
use update::Update;

/// Whether the local pipeline has caught up with the folder: nothing waits in the
/// coalescer, for the indexer or for the encoder. Catch-up offers peers a digest of the
/// index only then, so a change made before a peer connected (and so never sent live) is
/// in the index, and a peer does not ask again for files already on their way to it.
#[derive(Debug, Default)]
pub struct Settled {
    coalescer_idle: std::sync::atomic::AtomicBool,
    indexer_idle: std::sync::atomic::AtomicBool,
    encoder_busy: std::sync::atomic::AtomicBool,
    /// A peer's change was applied since the last summaries went out: the other peers
    /// are offered one soon, which relays the change to them (see the session).
    applied_from_peer: std::sync::atomic::AtomicBool,
}

impl Settled {
    pub fn is_settled(&self) -> bool {
        use std::sync::atomic::Ordering::Acquire;
        self.coalescer_idle.load(Acquire)
            && self.indexer_idle.load(Acquire)
            && !self.encoder_busy.load(Acquire)
    }

    /// Notes that a peer's change was applied here.
    pub fn applied_from_peer(&self) {
        self.applied_from_peer
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether a peer's change was applied since the last call.
    pub fn take_applied_from_peer(&self) -> bool {
        self.applied_from_peer
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    fn set_encoder_busy(&self, busy: bool) {
        self.encoder_busy
            .store(busy, std::sync::atomic::Ordering::Release);
    }

    fn set_coalescer_idle(&self, idle: bool) {
        self.coalescer_idle
            .store(idle, std::sync::atomic::Ordering::Release);
    }

    fn set_indexer_idle(&self, idle: bool) {
        self.indexer_idle
            .store(idle, std::sync::atomic::Ordering::Release);
    }
}

/// Everything the mount's graph works with.
pub struct MountGraph {
    /// Where every capture source reports (see [`capture::queue`]).
    pub queue: Receiver<Change>,
    pub indexer: Indexer,
    pub scan: ScanJob,
    pub debounce: Duration,
    pub telemetry: Option<SocketAddr>,
    /// A private folder the graph works in (the mount's state folder).
    pub workdir: PathBuf,
    /// The replication actors, when the mount has peers or listens for them.
    pub replication: Option<ReplicationGraph>,
    /// Shared with replication's session (see [`Settled`]).
    pub settled: Arc<Settled>,
    /// The folder's ignore rules: the coalescer drops updates of ignored paths.
    pub ignores: Arc<Ignores>,
    /// What `filesync status`, the metrics and systemd are told (see [`crate::status`]).
    pub stats: Arc<Stats>,
}

/// What the replication actors work with.
pub struct ReplicationGraph {
    /// Whether local changes go to peers (`mode` is not `receiveonly`).
    pub sends: bool,
    pub encoder: Encoder,
    pub compression: CompressionPolicy,
    pub session: Session,
    pub receiving: Receiving,
    pub gate: Arc<SyncGate>,
    pub local: Arc<crate::sync::local::LocalChanges>,
    pub settled: Arc<Settled>,
    /// The versions of local changes (shared by the coalescer, encoder and applier).
    pub book: Arc<crate::sync::book::Book>,
    /// Merge bases under `conflicts=merge`; the mount's indexer keeps local versions.
    pub bases: Option<Arc<crate::sync::merge::Bases>>,
}

/// How many messages a channel carrying file data holds: each may carry up to a chunk
/// (1 MiB), so this bounds the memory a slow peer can make the node use.
const DATA_CHANNEL_CAPACITY: usize = 64;

/// How long a stopping graph may take to drain before it is abandoned.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How many records a channel between actors holds before its sender waits.
const CHANNEL_CAPACITY: usize = 16_384;

/// Why the graph could not stop cleanly.
#[derive(Debug, thiserror::Error)]
#[error("the change pipeline did not stop cleanly within {STOP_TIMEOUT:?}: {0}")]
pub struct StopError(String);

/// A running actor graph.
pub struct Pipeline {
    graph: Graph,
    /// Serves the telemetry page while the graph runs (see [`crate::telemetry`]).
    _telemetry: Option<TelemetryFront>,
}

impl Pipeline {
    /// `filesync watch`: every captured change printed as a JSON line.
    pub fn watch(
        queue: Receiver<Change>,
        telemetry: Option<SocketAddr>,
        workdir: &Path,
    ) -> Pipeline {
        let (mut graph, telemetry) = new_graph(telemetry, workdir);
        let (changes_tx, changes_rx) = graph
            .channel_builder()
            .with_capacity(CHANNEL_CAPACITY)
            .build::<Change>();
        let actors = actor_builder(&mut graph);
        actors.with_name("capture").build(
            move |actor| capture::run(actor, queue.clone(), changes_tx.clone()),
            SoloAct,
        );
        actors.with_name("printer").build(
            move |actor| printer::run(actor, changes_rx.clone()),
            SoloAct,
        );
        graph.start();
        Pipeline {
            graph,
            _telemetry: telemetry,
        }
    }

    /// A mount's graph: capture, coalescer, indexer and scanner.
    pub fn mount(parts: MountGraph) -> Pipeline {
        let MountGraph {
            queue,
            indexer,
            scan,
            debounce,
            telemetry,
            workdir,
            replication,
            settled,
            ignores,
            stats,
        } = parts;
        let coalescer_setup = Arc::new(coalescer::CoalescerSetup {
            debounce,
            settled: settled.clone(),
            ignores,
            stats: stats.clone(),
            versions: replication
                .as_ref()
                .map(|r| (r.book.clone(), r.session.index.clone())),
        });
        let (indexer, scan) = (Arc::new(indexer), Arc::new(scan));
        let (mut graph, telemetry) = new_graph(telemetry, &workdir);
        let channels = graph.channel_builder().with_capacity(CHANNEL_CAPACITY);
        let (changes_tx, changes_rx) = channels.build::<Change>();
        let (updates_tx, updates_rx) = channels.build::<Update>();
        // Requests pile up as one: a scan answers all that came before it.
        let (rescan_tx, rescan_rx) = graph
            .channel_builder()
            .with_capacity(16)
            .build::<ScanReason>();
        let actors = actor_builder(&mut graph);
        actors.with_name("capture").build(
            move |actor| capture::run(actor, queue.clone(), changes_tx.clone()),
            SoloAct,
        );
        let replica_tx = match replication {
            Some(replication) => {
                let (replica_tx, replica_rx) = channels.build::<Update>();
                add_replication(&mut graph, replication, replica_rx, stats.clone());
                Some(replica_tx)
            }
            None => None,
        };
        let actors = actor_builder(&mut graph);
        actors.with_name("coalescer").build(
            move |actor| {
                coalescer::run(
                    actor,
                    changes_rx.clone(),
                    updates_tx.clone(),
                    replica_tx.as_ref().map(|tx| tx.clone()),
                    coalescer_setup.clone(),
                )
            },
            SoloAct,
        );
        actors.with_name("indexer").build(
            move |actor| {
                indexer::run(
                    actor,
                    updates_rx.clone(),
                    rescan_tx.clone(),
                    indexer.clone(),
                    settled.clone(),
                )
            },
            SoloAct,
        );
        actors.with_name("scanner").build(
            move |actor| scanner::run(actor, rescan_rx.clone(), scan.clone()),
            SoloAct,
        );
        graph.start();
        Pipeline {
            graph,
            _telemetry: telemetry,
        }
    }

    /// Asks every actor to finish and waits until the graph has drained.
    pub fn stop(mut self) -> Result<(), StopError> {
        self.graph.request_shutdown();
        self.graph
            .block_until_stopped(STOP_TIMEOUT)
            .map_err(|err| StopError(err.to_string()))
    }
}

/// The replication actors: `replica` carries the coalesced updates to send.
fn add_replication(
    graph: &mut Graph,
    parts: ReplicationGraph,
    replica: steady_state::LazySteadyRx<Update>,
    stats: Arc<Stats>,
) {
    let ReplicationGraph {
        sends,
        encoder,
        compression,
        session,
        receiving,
        gate,
        local,
        settled,
        book,
        bases: _,
    } = parts;
    let peers = session.peers.clone();
    let encoding = Arc::new(encoder::Encoding {
        encoder: Mutex::new(encoder),
        sends,
        gate,
        local,
        settled,
        versions: (book, session.index.clone()),
    });
    let compression = Arc::new(compression);
    let compressor_stats = stats.clone();
    let session = Arc::new(Mutex::new(session));
    let receiving = Arc::new(Mutex::new(receiving));
    let data = graph.channel_builder().with_capacity(DATA_CHANNEL_CAPACITY);
    let (raw_tx, raw_rx) = data.build::<session::Outgoing>();
    let (compressed_tx, compressed_rx) = data.build::<session::Outgoing>();
    let (incoming_tx, incoming_rx) = data.build::<session::Incoming>();
    let (checked_tx, checked_rx) = data.build::<verifier::Checked>();
    let control = graph.channel_builder().with_capacity(CHANNEL_CAPACITY);
    let (jobs_tx, jobs_rx) = control.build::<session::EncodeJob>();
    let (replies_tx, replies_rx) = control.build::<session::Reply>();
    let actors = actor_builder(graph);
    actors.with_name("encoder").build(
        move |actor| {
            encoder::run(
                actor,
                replica.clone(),
                jobs_rx.clone(),
                raw_tx.clone(),
                encoding.clone(),
            )
        },
        SoloAct,
    );
    actors.with_name("compressor").build(
        move |actor| {
            compressor::run(
                actor,
                raw_rx.clone(),
                compressed_tx.clone(),
                compression.clone(),
                compressor_stats.clone(),
            )
        },
        SoloAct,
    );
    actors.with_name("sender").build(
        move |actor| {
            sender::run(
                actor,
                compressed_rx.clone(),
                replies_rx.clone(),
                peers.clone(),
                stats.clone(),
            )
        },
        SoloAct,
    );
    actors.with_name("session").build(
        move |actor| session::run(actor, incoming_tx.clone(), jobs_tx.clone(), session.clone()),
        SoloAct,
    );
    actors.with_name("verifier").build(
        move |actor| verifier::run(actor, incoming_rx.clone(), checked_tx.clone()),
        SoloAct,
    );
    actors.with_name("applier").build(
        move |actor| {
            applier::run(
                actor,
                checked_rx.clone(),
                replies_tx.clone(),
                receiving.clone(),
            )
        },
        SoloAct,
    );
}

fn actor_builder(graph: &mut Graph) -> ActorBuilder {
    graph.actor_builder().with_mcpu_avg().with_load_avg()
}

/// The graph, with the telemetry page on `telemetry` or off: our front serves it there
/// and steady_state's own server listens on a private loopback port behind it. If the
/// address cannot be bound the graph runs without the page. steady_state writes
/// `logs/graph.dot` and `../output_logs` relative to the working directory, so the process
/// works in `workdir/telemetry`: both stay inside `workdir`, a private folder of ours,
/// rather than wherever the process was started.
fn new_graph(telemetry: Option<SocketAddr>, workdir: &Path) -> (Graph, Option<TelemetryFront>) {
    let graph_dir = workdir.join("telemetry");
    let entered = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&graph_dir)
        .and_then(|()| std::env::set_current_dir(&graph_dir));
    if let Err(err) = entered {
        tracing::warn!("cannot work in {}: {err}", graph_dir.display());
    }
    let front = telemetry.and_then(|address| match TelemetryFront::start(address) {
        Ok(front) => Some(front),
        Err(err) => {
            tracing::warn!("running without the telemetry page: {err}");
            None
        }
    });
    if let Some(front) = &front {
        // steady_state reads its listening address from the environment when the server
        // starts; its own default (0.0.0.0) would expose it to the network.
        let upstream = front.upstream();
        std::env::set_var("TELEMETRY_SERVER_IP", upstream.ip().to_string());
        std::env::set_var("TELEMETRY_SERVER_PORT", upstream.port().to_string());
    }
    let graph = GraphBuilder::for_production()
        .with_telemetry_metric_features(front.is_some())
        .build(());
    (graph, front)
}
