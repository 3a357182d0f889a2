//! The encoder actor: turns each coalesced update of the backing folder into wire
//! changes (exact ranges, a `fast_rsync` delta or the whole file; see
//! [`crate::sync::encode`]), and sends the files a peer asked for during catch-up.
//!
//! Changes are read from disk one piece at a time while they are sent, so a large file
//! never sits in memory whole; a full outgoing channel makes the encoder wait.

use std::error::Error;
use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use steady_state::*;

use super::session::{EncodeJob, Outgoing};
use super::update::Update;
use crate::change::Source;
use crate::identity::NodeId;
use crate::index::Index;
use crate::sync::book::Book;
use crate::sync::durability::SyncGate;
use crate::sync::encode::Encoder;
use crate::sync::local::LocalChanges;
use crate::sync::proto::{Change, Message, Vector};

/// What the encoder works with, shared across restarts of the actor.
pub struct Encoding {
    pub encoder: Mutex<Encoder>,
    /// Whether local changes go to peers (a receive-only node only reports them).
    pub sends: bool,
    pub gate: Arc<SyncGate>,
    pub local: Arc<LocalChanges>,
    pub settled: Arc<super::Settled>,
    /// Where the versions of files a peer asks for are looked up.
    pub versions: (Arc<Book>, Arc<Index>),
}

pub async fn run(
    actor: SteadyActorShadow,
    updates: SteadyRx<Update>,
    jobs: SteadyRx<EncodeJob>,
    outgoing: SteadyTx<Outgoing>,
    encoding: Arc<Encoding>,
) -> Result<(), Box<dyn Error>> {
    let actor = actor.into_spotlight([&updates, &jobs], [&outgoing]);
    encode(actor, updates, jobs, outgoing, encoding).await
}

// The state sits in a mutex only so a restarted actor finds it again; this actor alone
// locks it, on its own thread, so holding it across awaits blocks no one.
#[allow(clippy::await_holding_lock)]
async fn encode<A: SteadyActor>(
    mut actor: A,
    updates: SteadyRx<Update>,
    jobs: SteadyRx<EncodeJob>,
    outgoing: SteadyTx<Outgoing>,
    encoding: Arc<Encoding>,
) -> Result<(), Box<dyn Error>> {
    let Encoding {
        encoder,
        sends,
        gate,
        local,
        settled,
        versions: (book, index),
    } = &*encoding;
    let mut updates = updates.acquire_guard().await;
    let mut jobs = jobs.acquire_guard().await;
    let mut outgoing = outgoing.acquire_guard().await;
    let idle_wait = Duration::from_millis(100);
    while actor.is_running(|| {
        updates.is_closed_and_empty() && jobs.is_closed_and_empty() && outgoing.mark_closed()
    }) {
        let _woken = await_for_any!(
            actor.wait_avail(&mut updates, 1),
            actor.wait_avail(&mut jobs, 1),
            actor.wait_timeout(idle_wait)
        );
        settled.set_encoder_busy(
            actor.avail_units(&mut updates) > 0 || actor.avail_units(&mut jobs) > 0,
        );
        while let Some(update) = actor.try_take(&mut updates) {
            // A receive-only node keeps its changes to itself, and reports them.
            if !*sends {
                note_local_change(local, &update);
                continue;
            }
            let mut encoder = encoder.lock();
            let sent = match encoder.encode(&update) {
                Ok(changes) => send_all(&mut actor, &mut outgoing, None, changes).await,
                Err(err) => {
                    log_failure(&err);
                    None
                }
            };
            // An fsync with nothing new to send waits for what was sent before it.
            let last_seq = sent.or_else(|| encoder.next_seq().checked_sub(1));
            if let (
                Update::Changed {
                    path, synced: true, ..
                },
                Some(seq),
            ) = (&update, last_seq)
            {
                gate.sent(path, seq);
            }
        }
        while let Some(EncodeJob { peer, wants }) = actor.try_take(&mut jobs) {
            for want in wants {
                let path = match crate::sync::safe_path::checked(&want.path) {
                    Ok(path) => path,
                    Err(err) => {
                        tracing::warn!("peer {peer} asked for a file by a bad path: {err}");
                        continue;
                    }
                };
                let version = book.current(index, &path).unwrap_or_else(|err| {
                    tracing::warn!("cannot read the version of {path:?}: {err}");
                    Vector::default()
                });
                let mut encoder = encoder.lock();
                match encoder.encode_whole(&path, &want, version) {
                    Ok(changes) => {
                        send_all(&mut actor, &mut outgoing, Some(peer), changes).await;
                    }
                    Err(err) => log_failure(&err),
                }
            }
            let done = Outgoing {
                to: Some(peer),
                message: Message::CaughtUp,
            };
            actor
                .send_async(&mut outgoing, done, SendSaturation::AwaitForRoom)
                .await;
        }
    }
    Ok(())
}

/// Sends the changes of one encoding as they are read; returns the last sequence number
/// sent. A read error ends the encoding: the file is sent again by the next reconcile scan
/// or catch-up.
async fn send_all<A, E>(
    actor: &mut A,
    outgoing: &mut Tx<Outgoing>,
    to: Option<NodeId>,
    changes: impl Iterator<Item = Result<Change, E>>,
) -> Option<u64>
where
    A: SteadyActor,
    E: Display,
{
    let mut last_seq = None;
    for change in changes {
        match change {
            Ok(change) => {
                tracing::trace!(seq = change.seq, path = ?change.path, "encoded");
                last_seq = Some(change.seq);
                let message = Outgoing {
                    to,
                    message: Message::Change(change),
                };
                actor
                    .send_async(outgoing, message, SendSaturation::AwaitForRoom)
                    .await;
            }
            Err(err) => {
                log_failure(&err);
                break;
            }
        }
    }
    last_seq
}

/// Flags a change made behind a receive-only node's back, reporting each path once.
fn note_local_change(local: &LocalChanges, update: &Update) {
    let (paths, sources) = match update {
        Update::Changed { path, sources, .. }
        | Update::Removed { path, sources, .. }
        | Update::Linked { path, sources, .. } => (vec![path], sources),
        Update::Renamed {
            from, to, sources, ..
        } => (vec![from, to], sources),
        Update::Rescan { .. } => return,
    };
    // These sources never report the daemon's own writes.
    let by_others = sources
        .iter()
        .all(|source| matches!(source, Source::Ebpf | Source::Fanotify | Source::Fuse));
    for path in paths {
        if local.observed(path, by_others) {
            tracing::warn!(
                "{} was changed on this receive-only node, behind the mount's back; it is \
                 kept until 'filesync revert' restores the peers' version",
                path.display()
            );
        }
    }
}

fn log_failure(err: &dyn Display) {
    tracing::warn!("cannot encode a change for peers: {err}; the next scan sends it again");
}
