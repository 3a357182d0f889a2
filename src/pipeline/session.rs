//! The peer session actor (inbound half): owns the connections to peers — the links it
//! dials and the ones its listener accepts — follows them coming and going, and routes
//! what peers send: changes and catch-up data to the verifier, requests for directories
//! and files to the index and the encoder, acknowledgements to the durability gate.
//!
//! Its outbound half, [`super::sender`], writes to the same links; both share the
//! [`Peers`] table. Every connection starts with catch-up: the side that sends offers a
//! digest of every directory (see [`crate::sync::digest`]); the receiving side asks for
//! what differs.

use std::collections::HashMap;
use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Select;
use parking_lot::Mutex;
use steady_state::*;

use super::Settled;
use crate::identity::NodeId;
use crate::index::Index;
use crate::net::{Link, LinkEvent, Listener, Traffic};
use crate::reach::Reacher;
use crate::status::{payload_sizes, Stats, TrafficSource};
use crate::stun::Keeper;
use crate::sync::digest;
use crate::sync::durability::SyncGate;
use crate::sync::proto::{Hello, Message, Want};

/// A message for peers: `to` one peer, or `None` for every connected peer that receives.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub to: Option<NodeId>,
    pub message: Message,
}

/// A message a peer sent.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub from: NodeId,
    pub message: Message,
}

/// What the receiving side asks the session to do.
#[derive(Debug, Clone)]
pub enum Reply {
    Send {
        to: NodeId,
        message: Message,
    },
    /// To one connected peer that sends (for a revert).
    ToSender {
        message: Message,
    },
    /// The peer sent something invalid: close its connection.
    Drop {
        peer: NodeId,
        reason: String,
    },
}

/// Files a peer asked for, for the encoder.
#[derive(Debug, Clone)]
pub struct EncodeJob {
    pub peer: NodeId,
    pub wants: Vec<Want>,
}

/// One link and what is known of the peer on its other end.
struct PeerLink {
    link: Arc<Link>,
    /// Set while connected: the peer and its hello.
    connected: Option<(NodeId, Hello)>,
}

/// The links of this node, shared by the session's two halves.
pub struct Peers {
    links: Mutex<Vec<PeerLink>>,
    /// Where the reason a connection was dropped is kept for `filesync status`.
    stats: Arc<Stats>,
}

impl Peers {
    /// The connected links to send `to` (one peer, or every peer that receives): one per
    /// peer (the first in the table), even when both nodes dialed each other and two
    /// links are up, so nothing is sent twice or out of order.
    pub fn targets(&self, to: Option<NodeId>) -> Vec<(NodeId, Arc<Link>)> {
        let mut targets: Vec<(NodeId, Arc<Link>)> = Vec::new();
        for peer in self.links.lock().iter() {
            let Some((id, hello)) = peer.connected.as_ref() else {
                continue;
            };
            let wanted = match to {
                Some(to) => *id == to,
                None => hello.receives,
            };
            if wanted && targets.iter().all(|(known, _)| known != id) {
                targets.push((*id, peer.link.clone()));
            }
        }
        targets
    }

    /// A connected peer that sends its changes, if any.
    pub fn a_sender(&self) -> Option<NodeId> {
        self.links.lock().iter().find_map(|peer| {
            let (id, hello) = peer.connected.as_ref()?;
            hello.sends.then_some(*id)
        })
    }

    /// Closes the connection to `peer` (an accepted link is forgotten; a dialed one
    /// reconnects after its backoff).
    pub fn drop_peer(&self, peer: NodeId, reason: &str) {
        tracing::warn!("dropping the connection to peer {peer}: {reason}");
        self.stats.peer_dropped(peer, reason);
        for link in self.links.lock().iter() {
            if link.link.peer() == peer {
                link.link.disconnect();
            }
        }
    }

    fn add(&self, link: Link) {
        self.links.lock().push(PeerLink {
            link: Arc::new(link),
            connected: None,
        });
    }

    /// The links to listen to; accepted links whose connection ended are closed here (their
    /// traffic stays in `stats`).
    fn event_sources(&self, stats: &Stats) -> Vec<Arc<Link>> {
        let mut ended = Vec::new();
        let mut links = self.links.lock();
        links.retain(|peer| {
            let finished = peer.link.is_finished() && peer.link.events().is_empty();
            if finished {
                ended.push(peer.link.clone());
            }
            !finished
        });
        let sources = links.iter().map(|p| p.link.clone()).collect();
        drop(links);
        for link in &ended {
            stats.retire_link(link.peer(), link.traffic());
        }
        close_in_background(ended);
        sources
    }

    fn set_connected(&self, link: &Arc<Link>, state: Option<(NodeId, Hello)>) {
        let mut links = self.links.lock();
        if let Some(peer) = links.iter_mut().find(|p| Arc::ptr_eq(&p.link, link)) {
            peer.connected = state;
        }
    }

    fn close_all(&self) {
        let links: Vec<Arc<Link>> = self.links.lock().drain(..).map(|peer| peer.link).collect();
        for link in links {
            if let Ok(link) = Arc::try_unwrap(link) {
                link.close();
            }
        }
    }
}

impl TrafficSource for Peers {
    fn traffic(&self) -> Vec<(NodeId, Traffic)> {
        self.links
            .lock()
            .iter()
            .map(|peer| (peer.link.peer(), peer.link.traffic()))
            .collect()
    }
}

/// Closing a link flushes and waits for its threads; the session must not wait on that.
fn close_in_background(links: Vec<Arc<Link>>) {
    if links.is_empty() {
        return;
    }
    let closing = std::thread::Builder::new()
        .name("link-close".into())
        .spawn(move || {
            for link in links {
                // The sender may still hold the link for a moment; then it closes on drop.
                if let Ok(link) = Arc::try_unwrap(link) {
                    link.close();
                }
            }
        });
    if let Err(err) = closing {
        tracing::warn!("cannot start a thread to close links: {err}");
    }
}

/// How the session finds its peers, and its own public address.
pub struct PeerWays {
    /// Links to peers at known addresses.
    pub dialed: Vec<Link>,
    /// Accepts peers that connect to this node.
    pub listener: Option<Listener>,
    /// Finds paths to peers behind NATs through a rendezvous.
    pub reacher: Option<Reacher>,
    /// NAT discovery over UDP, when STUN servers are configured.
    pub stun: Option<Keeper>,
}

/// What the inbound half works with.
pub struct Session {
    pub peers: Arc<Peers>,
    pub listener: Option<Listener>,
    /// Paths to peers behind NATs, found through a rendezvous.
    pub reacher: Option<Reacher>,
    pub stun: Option<Keeper>,
    /// When the public address was last copied into `stats`.
    public_noted: Option<Instant>,
    pub index: Arc<Index>,
    pub gate: Arc<SyncGate>,
    /// This node's own hello: whether it sends and receives.
    pub hello: Hello,
    /// Whether the local pipeline has indexed everything it captured.
    pub settled: Arc<Settled>,
    /// Where connections, changes in flight and payload bytes are counted.
    pub stats: Arc<Stats>,
    /// When each connected receiving peer is next offered a summary.
    summaries: HashMap<NodeId, Instant>,
}

impl Session {
    pub fn new(
        ways: PeerWays,
        index: Arc<Index>,
        gate: Arc<SyncGate>,
        hello: Hello,
        settled: Arc<Settled>,
        stats: Arc<Stats>,
    ) -> Session {
        let peers = Arc::new(Peers {
            links: Mutex::new(Vec::new()),
            stats: stats.clone(),
        });
        let PeerWays {
            dialed,
            listener,
            reacher,
            stun,
        } = ways;
        for link in dialed {
            peers.add(link);
        }
        stats.set_traffic_source(peers.clone());
        Session {
            peers,
            listener,
            reacher,
            stun,
            public_noted: None,
            index,
            gate,
            hello,
            settled,
            stats,
            summaries: HashMap::new(),
        }
    }

    /// Copies this node's public address, as the rendezvous or STUN last saw it, into the
    /// status, once a second.
    fn note_public_address(&mut self) {
        if self
            .public_noted
            .is_some_and(|at| at.elapsed() < PUBLIC_ADDRESS_EVERY)
        {
            return;
        }
        self.public_noted = Some(Instant::now());
        let reached = self.reacher.as_ref().map(Reacher::status);
        let public = reached
            .and_then(|found| found.observed.or(found.stun.map(|(address, _)| address)))
            .or_else(|| self.stun.as_ref()?.latest()?.reflexive);
        self.stats
            .set_public_address(public.map(|address| address.to_string()));
    }

    /// Offers a summary to every peer whose turn it is, once the local pipeline has
    /// settled: at connection, then every [`RESUMMARIZE`], so a change that reached the
    /// index while no peer listened still gets to every peer.
    fn offer_due_summaries(&mut self) {
        let now = Instant::now();
        // What peers changed reaches the other peers through their catch-up: with
        // versions, a node in the middle relays between nodes that never meet.
        if self.summaries.len() > 1 && self.settled.take_applied_from_peer() {
            let soon = now + RELAY_WITHIN;
            for due in self.summaries.values_mut() {
                *due = (*due).min(soon);
            }
        }
        if !self.summaries.values().any(|due| *due <= now) || !self.settled.is_settled() {
            return;
        }
        let due: Vec<NodeId> = self
            .summaries
            .iter()
            .filter(|(_, due)| **due <= now)
            .map(|(peer, _)| *peer)
            .collect();
        let summary = match digest::summarize(&self.index) {
            Ok(summary) => {
                self.stats.set_open_conflicts(summary.conflict_copies);
                summary.dirs
            }
            Err(err) => {
                tracing::warn!("cannot summarize the index for catch-up: {err}");
                return;
            }
        };
        for peer in due {
            self.summaries.insert(peer, now + RESUMMARIZE);
            for (_, link) in self.peers.targets(Some(peer)) {
                if let Err(err) = link.send(Message::Summary(summary.clone())) {
                    tracing::warn!("cannot offer catch-up to peer {peer}: {err}");
                }
            }
        }
    }
}

/// How often a connected peer is offered the digest of every directory again.
const RESUMMARIZE: Duration = Duration::from_secs(30);
/// How often the status's public address is brought up to date.
const PUBLIC_ADDRESS_EVERY: Duration = Duration::from_secs(1);
/// How soon the other peers are offered a summary after a peer's change was applied.
const RELAY_WITHIN: Duration = Duration::from_secs(1);

pub async fn run(
    actor: SteadyActorShadow,
    incoming: SteadyTx<Incoming>,
    jobs: SteadyTx<EncodeJob>,
    session: Arc<Mutex<Session>>,
) -> Result<(), Box<dyn Error>> {
    let actor = actor.into_spotlight([], [&incoming, &jobs]);
    receive(actor, incoming, jobs, session).await
}

/// How long the session blocks waiting for a peer before it looks at shutdown again.
const POLL: Duration = Duration::from_millis(50);

// The state sits in a mutex only so a restarted actor finds it again; this actor alone
// locks it, on its own thread, so holding it across awaits blocks no one.
#[allow(clippy::await_holding_lock)]
async fn receive<A: SteadyActor>(
    mut actor: A,
    incoming: SteadyTx<Incoming>,
    jobs: SteadyTx<EncodeJob>,
    session: Arc<Mutex<Session>>,
) -> Result<(), Box<dyn Error>> {
    let mut incoming = incoming.acquire_guard().await;
    let mut jobs = jobs.acquire_guard().await;
    let mut session = session.lock();
    while actor.is_running(|| incoming.mark_closed() && jobs.mark_closed()) {
        session.stats.beat();
        session.offer_due_summaries();
        session.note_public_address();
        let Some((link, event)) = next_event(&session) else {
            continue;
        };
        match event {
            LinkEvent::Connected { peer, addr, hello } => {
                tracing::info!(
                    "connected to peer {peer} ({}) at {addr}, {}: it {}",
                    hello.node_name,
                    link.path(),
                    describe(&hello)
                );
                session
                    .stats
                    .peer_connected(peer, addr, &hello.node_name, link.path());
                // Both nodes may have dialed: a second link to a connected peer carries
                // what is sent over it, but the peer is already caught up with.
                let first = session.peers.targets(Some(peer)).is_empty();
                session
                    .peers
                    .set_connected(&link, Some((peer, hello.clone())));
                if first && session.hello.sends && hello.receives {
                    session.gate.connected(peer, 0);
                    session.summaries.insert(peer, Instant::now());
                }
            }
            LinkEvent::Disconnected { reason, clean } => {
                let peer = link.peer();
                if clean {
                    tracing::info!("peer {peer} disconnected: {reason}");
                } else {
                    tracing::warn!("connection to peer {peer} lost or refused: {reason}");
                }
                session.peers.set_connected(&link, None);
                if session.peers.targets(Some(peer)).is_empty() {
                    session
                        .stats
                        .peer_disconnected(peer, (!clean).then_some(reason.as_str()));
                    session.gate.disconnected(peer);
                    session.summaries.remove(&peer);
                }
            }
            LinkEvent::Received(message) => {
                let from = link.peer();
                tracing::trace!("received");
                match message {
                    Message::Change(_)
                    | Message::Summary(_)
                    | Message::Listing { .. }
                    | Message::CaughtUp => {
                        if session.hello.receives {
                            if let Message::Change(change) = &message {
                                session.stats.change_received(from, change.seq);
                                let (raw, compressed) = payload_sizes(&change.op);
                                session.stats.received_payload.add(raw, compressed);
                            }
                            let item = Incoming { from, message };
                            actor
                                .send_async(&mut incoming, item, SendSaturation::AwaitForRoom)
                                .await;
                        } else {
                            session
                                .peers
                                .drop_peer(from, "it sent changes to a send-only node");
                        }
                    }
                    Message::WantDirs(dirs) => answer_dirs(&session, &link, from, dirs),
                    Message::WantFiles(wants) => {
                        let job = EncodeJob { peer: from, wants };
                        actor
                            .send_async(&mut jobs, job, SendSaturation::AwaitForRoom)
                            .await;
                    }
                    Message::Ack { seq } => {
                        session.stats.acked_by(from, seq);
                        session.gate.acked(from, seq);
                    }
                    Message::Error(text) => {
                        session
                            .peers
                            .drop_peer(from, &format!("it reported an error: {text}"));
                    }
                    Message::Hello(_) | Message::Keepalive => {
                        session
                            .peers
                            .drop_peer(from, "it sent a hello in the middle of a session");
                    }
                    Message::Reach(_) => {
                        session
                            .peers
                            .drop_peer(from, "it sent a rendezvous message on a sync connection");
                    }
                }
            }
        }
    }
    session.peers.close_all();
    Ok(())
}

/// Waits up to [`POLL`] for an event of any link, taking newly accepted links on the way.
fn next_event(session: &Session) -> Option<(Arc<Link>, LinkEvent)> {
    if let Some(listener) = &session.listener {
        while let Ok(link) = listener.links().try_recv() {
            session.peers.add(link);
        }
        while let Ok(rejection) = listener.rejections().try_recv() {
            tracing::warn!(
                "refused a connection from {}: {}",
                rejection.addr,
                rejection.error
            );
        }
    }
    if let Some(reacher) = &session.reacher {
        while let Ok(link) = reacher.links().try_recv() {
            session.peers.add(link);
        }
    }
    let links = session.peers.event_sources(&session.stats);
    let mut select = Select::new();
    for link in &links {
        select.recv(link.events());
    }
    let accepted = session
        .listener
        .as_ref()
        .map(|l| (select.recv(l.links()), select.recv(l.rejections())));
    let reached = session
        .reacher
        .as_ref()
        .map(|reacher| select.recv(reacher.links()));
    let ready = select.ready_timeout(POLL).ok()?;
    if accepted.is_some_and(|(links, rejections)| ready == links || ready == rejections)
        || reached == Some(ready)
    {
        return None;
    }
    let link = links.get(ready)?;
    let event = link.events().try_recv().ok()?;
    Some((link.clone(), event))
}

fn describe(hello: &Hello) -> &'static str {
    match (hello.sends, hello.receives) {
        (true, true) => "sends and receives",
        (true, false) => "only sends",
        (false, true) => "only receives",
        (false, false) => "neither sends nor receives",
    }
}

/// Sends the listing of each directory a peer asked for.
fn answer_dirs(
    session: &Session,
    link: &Link,
    peer: NodeId,
    dirs: Vec<crate::sync::proto::RelPath>,
) {
    for dir in dirs {
        let entries = match super::verifier::checked_dir(&dir)
            .and_then(|()| digest::listing(&session.index, &dir).map_err(|err| err.to_string()))
        {
            Ok(entries) => entries,
            Err(reason) => {
                session
                    .peers
                    .drop_peer(peer, &format!("bad directory request: {reason}"));
                return;
            }
        };
        if let Err(err) = link.send(Message::Listing { dir, entries }) {
            tracing::warn!("cannot send a listing to peer {peer}: {err}");
            return;
        }
    }
}
