//! The steady_state actor graph that turns captured changes into updates of the index.
//!
//! ```text
//! FUSE daemon ─┐
//! watcher  ────┼─▶ capture ─▶ coalescer ─▶ indexer ─▶ scanner
//! scanner  ────┘   (the scanner's findings re-enter through capture)
//! ```
//!
//! `filesync watch` runs the short graph `capture ─▶ printer`.
//!
//! Every capture source reports into one queue ([`capture::queue`]), so each actor has one
//! input and shutdown drains the graph front to back. steady_state's telemetry page shows
//! the graph live at the configured address (default `http://127.0.0.1:9900`).

pub mod capture;
pub mod coalescer;
pub mod indexer;
pub mod printer;
pub mod scanner;
pub mod update;

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use steady_state::actor_builder::ActorBuilder;
use steady_state::{Graph, GraphBuilder, SoloAct};

use crate::change::Change;
use indexer::{Indexer, ScanReason};
use scanner::ScanJob;
use update::Update;

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
}

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
}

impl Pipeline {
    /// `filesync watch`: every captured change printed as a JSON line.
    pub fn watch(
        queue: Receiver<Change>,
        telemetry: Option<SocketAddr>,
        workdir: &Path,
    ) -> Pipeline {
        let mut graph = new_graph(telemetry, workdir);
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
        Pipeline { graph }
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
        } = parts;
        let (indexer, scan) = (Arc::new(indexer), Arc::new(scan));
        let mut graph = new_graph(telemetry, &workdir);
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
        actors.with_name("coalescer").build(
            move |actor| coalescer::run(actor, changes_rx.clone(), updates_tx.clone(), debounce),
            SoloAct,
        );
        actors.with_name("indexer").build(
            move |actor| {
                indexer::run(
                    actor,
                    updates_rx.clone(),
                    rescan_tx.clone(),
                    indexer.clone(),
                )
            },
            SoloAct,
        );
        actors.with_name("scanner").build(
            move |actor| scanner::run(actor, rescan_rx.clone(), scan.clone()),
            SoloAct,
        );
        graph.start();
        Pipeline { graph }
    }

    /// Asks every actor to finish and waits until the graph has drained.
    pub fn stop(mut self) -> Result<(), StopError> {
        self.graph.request_shutdown();
        self.graph
            .block_until_stopped(STOP_TIMEOUT)
            .map_err(|err| StopError(err.to_string()))
    }
}

fn actor_builder(graph: &mut Graph) -> ActorBuilder {
    graph.actor_builder().with_mcpu_avg().with_load_avg()
}

/// The graph, with steady_state's telemetry server on `telemetry` or off. steady_state
/// writes `logs/graph.dot` and `../output_logs` relative to the working directory, so the
/// process works in `workdir/telemetry`: both stay inside `workdir`, a private folder of
/// ours, rather than wherever the process was started.
fn new_graph(telemetry: Option<SocketAddr>, workdir: &Path) -> Graph {
    let graph_dir = workdir.join("telemetry");
    let entered = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&graph_dir)
        .and_then(|()| std::env::set_current_dir(&graph_dir));
    if let Err(err) = entered {
        tracing::warn!("cannot work in {}: {err}", graph_dir.display());
    }
    if let Some(address) = telemetry {
        // steady_state reads its listening address from the environment when the server
        // starts; its own default (0.0.0.0) would expose the page to the network.
        std::env::set_var("TELEMETRY_SERVER_IP", address.ip().to_string());
        std::env::set_var("TELEMETRY_SERVER_PORT", address.port().to_string());
    }
    GraphBuilder::for_production()
        .with_telemetry_metric_features(telemetry.is_some())
        .build(())
}
