//! The peer session actor (outbound half): writes what the compressor and the applier
//! produce to the links of the peers it is for. A link's bounded queue makes this actor
//! wait when a peer reads slowly (back-pressure reaches the encoder); a peer that is not
//! connected misses live changes and gets them by catch-up when it reconnects.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use steady_state::*;

use super::session::{Outgoing, Peers, Reply};
use crate::identity::NodeId;
use crate::net::Link;
use crate::status::Stats;
use crate::sync::proto::Message;

/// How long one message may wait for room in a link's queue before the link is treated
/// as stalled and closed (it reconnects and catches up).
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(
    actor: SteadyActorShadow,
    outgoing: SteadyRx<Outgoing>,
    replies: SteadyRx<Reply>,
    peers: Arc<Peers>,
    stats: Arc<Stats>,
) -> Result<(), Box<dyn Error>> {
    let actor = actor.into_spotlight([&outgoing, &replies], []);
    send(actor, outgoing, replies, peers, stats).await
}

async fn send<A: SteadyActor>(
    mut actor: A,
    outgoing: SteadyRx<Outgoing>,
    replies: SteadyRx<Reply>,
    peers: Arc<Peers>,
    stats: Arc<Stats>,
) -> Result<(), Box<dyn Error>> {
    let mut outgoing = outgoing.acquire_guard().await;
    let mut replies = replies.acquire_guard().await;
    let idle_wait = Duration::from_millis(100);
    while actor.is_running(|| outgoing.is_closed_and_empty() && replies.is_closed_and_empty()) {
        let _woken = await_for_any!(
            actor.wait_avail(&mut outgoing, 1),
            actor.wait_avail(&mut replies, 1),
            actor.wait_timeout(idle_wait)
        );
        while let Some(reply) = actor.try_take(&mut replies) {
            match reply {
                Reply::Send { to, message } => {
                    if let Message::Ack { seq } = message {
                        stats.acked_to(to, seq);
                    }
                    deliver(&peers, &stats, Some(to), message);
                }
                Reply::Drop { peer, reason } => peers.drop_peer(peer, &reason),
                Reply::ToSender { message } => match peers.a_sender() {
                    Some(peer) => deliver(&peers, &stats, Some(peer), message),
                    None => tracing::warn!(
                        "no peer that sends is connected; the request waits for the next catch-up"
                    ),
                },
            }
        }
        while let Some(Outgoing { to, message }) = actor.try_take(&mut outgoing) {
            tracing::trace!("sending");
            deliver(&peers, &stats, to, message);
        }
    }
    Ok(())
}

fn deliver(peers: &Peers, stats: &Stats, to: Option<NodeId>, message: Message) {
    let targets = peers.targets(to);
    if let Message::Change(change) = &message {
        for (peer, _) in &targets {
            stats.change_sent(*peer, change.seq);
        }
    }
    let Some(((last_peer, last_link), others)) = targets.split_last() else {
        return;
    };
    for (peer, link) in others {
        send_to(peers, *peer, link, message.clone());
    }
    send_to(peers, *last_peer, last_link, message);
}

fn send_to(peers: &Peers, peer: NodeId, link: &Link, message: Message) {
    if let Err(err) = link.send_timeout(message, SEND_TIMEOUT) {
        peers.drop_peer(peer, &format!("cannot send to it: {err}"));
    }
}
