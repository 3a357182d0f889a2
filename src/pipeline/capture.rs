//! The capture actor: the graph's entry. Every capture source (the FUSE daemon's worker
//! threads, the watcher's thread, the scanner) reports into one bounded queue through a
//! [`QueueSink`]; this actor moves the records into the graph.

use std::error::Error;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use steady_state::*;

use crate::change::{Change, ChangeSink};

/// How many records may wait for the graph before sources block (back-pressure).
pub const QUEUE_CAPACITY: usize = 65_536;

/// The sink capture sources report to.
#[derive(Clone)]
pub struct QueueSink(Sender<Change>);

impl ChangeSink for QueueSink {
    fn record(&self, change: Change) {
        // A full queue makes the source wait; once the graph has stopped nobody listens.
        let _ = self.0.send(change);
    }
}

/// A queue for capture sources and the receiving end for the capture actor.
pub fn queue() -> (QueueSink, Receiver<Change>) {
    let (tx, rx) = crossbeam_channel::bounded(QUEUE_CAPACITY);
    (QueueSink(tx), rx)
}

pub async fn run(
    actor: SteadyActorShadow,
    queue: Receiver<Change>,
    changes: SteadyTx<Change>,
) -> Result<(), Box<dyn Error>> {
    let actor = actor.into_spotlight([], [&changes]);
    forward(actor, queue, changes).await
}

async fn forward<A: SteadyActor>(
    mut actor: A,
    queue: Receiver<Change>,
    changes: SteadyTx<Change>,
) -> Result<(), Box<dyn Error>> {
    let mut changes = changes.acquire_guard().await;
    // The actor has its own thread, so it may block on the queue; the timeout lets it
    // take part in shutdown.
    let poll = Duration::from_millis(50);
    while actor.is_running(|| changes.mark_closed()) {
        let first = match queue.recv_timeout(poll) {
            Ok(change) => change,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                actor.request_shutdown().await;
                continue;
            }
        };
        actor
            .send_async(&mut changes, first, SendSaturation::AwaitForRoom)
            .await;
        while let Ok(change) = queue.try_recv() {
            actor
                .send_async(&mut changes, change, SendSaturation::AwaitForRoom)
                .await;
        }
    }
    Ok(())
}
