//! The rendezvous: a node every other node can reach, which tells nodes behind NATs where
//! to find each other and relays between them when nothing else works.
//!
//! Nodes keep a control connection to it (Noise, like every connection; only configured
//! nodes get in). On each it learns the address the node's NAT shows (the connection's
//! source) and the addresses the node announces. When one node asks to be introduced to
//! another, both get each other's addresses at once and punch (see [`super::punch`]).
//! A relay is a pair of further connections, one from each node, whose bytes it then
//! copies without reading them (see [`super::relay`]).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use parking_lot::Mutex;

use super::punch::MAX_CANDIDATES;
use super::relay::{self, RateLimit, JOIN_WAIT};
use crate::identity::{NodeId, NodeKey};
use crate::net::channel::{self, Established, Expect};
use crate::net::{Deadline, Link, LinkConfig, LinkEvent, NetError, PathKind, PeerSet};
use crate::sync::proto::{Hello, Message, Reach};

/// Relays running at once; more are refused.
const MAX_RELAYS: usize = 64;
/// Connections in their setup at once; more are closed at once.
const MAX_PENDING: usize = 32;
/// How often the accept loop and control loops look at the stop signal.
const POLL: Duration = Duration::from_millis(100);

/// Whether and how much a rendezvous relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayPolicy {
    Off,
    Unlimited,
    /// At most this many bytes per second, over all relays together.
    Capped(u64),
}

#[derive(Debug, Clone)]
pub struct RendezvousConfig {
    pub listen: SocketAddr,
    pub key: Arc<NodeKey>,
    /// The nodes it serves.
    pub allowed: PeerSet,
    pub relay: RelayPolicy,
    /// Keepalive of the control connections (tests shorten it).
    pub keepalive: Duration,
}

/// What a rendezvous has done, for its log and for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RendezvousStats {
    pub nodes: usize,
    pub introductions: u64,
    pub relays: u64,
    pub relayed_bytes: u64,
}

/// A running rendezvous; stops when dropped.
pub struct Rendezvous {
    local_addr: SocketAddr,
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

struct State {
    cfg: LinkConfig,
    limit: Option<Arc<RateLimit>>,
    relay: RelayPolicy,
    stop: AtomicBool,
    nodes: Mutex<HashMap<NodeId, Control>>,
    /// Relays waiting for their second end: (opener, joiner, session).
    waiting: Mutex<HashMap<(NodeId, NodeId, u64), Sender<Established>>>,
    pending: AtomicUsize,
    relays: AtomicUsize,
    introductions: AtomicU64,
    relays_made: AtomicU64,
    relayed_bytes: Arc<AtomicU64>,
}

/// One node's control connection and what it told us.
struct Control {
    link: Arc<Link>,
    observed: SocketAddr,
    candidates: Vec<SocketAddr>,
    endpoint_dependent: bool,
}

impl Control {
    /// Where the node may be reached: where its connection came from first.
    fn addresses(&self) -> Vec<SocketAddr> {
        let mut addresses = vec![self.observed];
        for candidate in &self.candidates {
            if !addresses.contains(candidate) {
                addresses.push(*candidate);
            }
        }
        addresses.truncate(MAX_CANDIDATES);
        addresses
    }
}

impl Rendezvous {
    pub fn start(config: RendezvousConfig) -> Result<Rendezvous, NetError> {
        let addr = config.listen;
        let bind_error = |source| NetError::Bind { addr, source };
        let listener = TcpListener::bind(addr).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let local_addr = listener.local_addr().map_err(bind_error)?;
        let hello = Hello {
            node_name: "rendezvous".to_owned(),
            sends: false,
            receives: false,
        };
        let mut cfg = LinkConfig::new(config.key, config.allowed, hello);
        cfg.keepalive = config.keepalive;
        let state = Arc::new(State {
            cfg,
            limit: match config.relay {
                RelayPolicy::Capped(rate) => Some(Arc::new(RateLimit::new(rate))),
                RelayPolicy::Off | RelayPolicy::Unlimited => None,
            },
            relay: config.relay,
            stop: AtomicBool::new(false),
            nodes: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
            pending: AtomicUsize::new(0),
            relays: AtomicUsize::new(0),
            introductions: AtomicU64::new(0),
            relays_made: AtomicU64::new(0),
            relayed_bytes: Arc::new(AtomicU64::new(0)),
        });
        let accepting = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("rendezvous".into())
            .spawn(move || accept_loop(&listener, &accepting))
            .map_err(bind_error)?;
        tracing::info!(
            "rendezvous listening on {local_addr} for {} node(s); relay: {}",
            state.cfg.allowed.len(),
            describe(config.relay)
        );
        Ok(Rendezvous {
            local_addr,
            state,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> RendezvousStats {
        RendezvousStats {
            nodes: self.state.nodes.lock().len(),
            introductions: self.state.introductions.load(Ordering::Relaxed),
            relays: self.state.relays_made.load(Ordering::Relaxed),
            relayed_bytes: self.state.relayed_bytes.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        for (_, control) in self.state.nodes.lock().drain() {
            control.link.disconnect();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn describe(policy: RelayPolicy) -> String {
    match policy {
        RelayPolicy::Off => "off".to_owned(),
        RelayPolicy::Unlimited => "on, no rate limit".to_owned(),
        RelayPolicy::Capped(rate) => format!("on, at most {rate} bytes/s"),
    }
}

fn accept_loop(listener: &TcpListener, state: &Arc<State>) {
    while !state.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, addr)) => admit(state, stream, addr),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(POLL / 5);
            }
            Err(err) => {
                tracing::warn!("cannot accept a connection: {err}");
                std::thread::sleep(POLL);
            }
        }
    }
}

fn admit(state: &Arc<State>, stream: TcpStream, addr: SocketAddr) {
    if state.pending.load(Ordering::SeqCst) >= MAX_PENDING || stream.set_nonblocking(false).is_err()
    {
        tracing::warn!("refused the connection from {addr}: too many in their setup");
        return;
    }
    state.pending.fetch_add(1, Ordering::SeqCst);
    let state = Arc::clone(state);
    let spawned = std::thread::Builder::new()
        .name(format!("rv-{addr}"))
        .spawn(move || {
            let first = first_message(&state, stream);
            state.pending.fetch_sub(1, Ordering::SeqCst);
            match first {
                Ok((established, message)) => serve(&state, established, message),
                Err(err) => tracing::warn!("refused the connection from {addr}: {err}"),
            }
        });
    if let Err(err) = spawned {
        tracing::warn!("refused the connection from {addr}: cannot start a thread: {err}");
    }
}

/// The handshake with a configured node, then its first message.
fn first_message(state: &State, stream: TcpStream) -> Result<(Established, Reach), NetError> {
    let cfg = &state.cfg;
    let deadline = Deadline::after(cfg.handshake_timeout, "during connection setup");
    let mut established =
        channel::establish(stream, false, cfg, Expect::AnyOf(&cfg.allowed), deadline)?;
    established
        .sender
        .set_write_timeout(cfg.handshake_timeout)?;
    match established.receiver.recv(cfg.handshake_timeout)? {
        Message::Reach(reach) => Ok((established, reach)),
        _ => Err(NetError::Unexpected {
            expected: "a rendezvous request",
        }),
    }
}

fn serve(state: &Arc<State>, established: Established, first: Reach) {
    let node = established.peer;
    match first {
        Reach::Announce {
            candidates,
            endpoint_dependent,
        } => control(state, established, candidates, endpoint_dependent),
        Reach::RelayOpen { peer, session } => open_relay(state, established, peer, session),
        Reach::RelayJoin { peer, session } => join_relay(state, established, peer, session),
        _ => tracing::warn!(
            "dropped the connection of {node}: it began with a message only a rendezvous sends"
        ),
    }
}

/// Runs a node's control connection until it ends.
fn control(
    state: &Arc<State>,
    established: Established,
    candidates: Vec<SocketAddr>,
    endpoint_dependent: bool,
) {
    let node = established.peer;
    let observed = established.addr;
    let link = Arc::new(Link::over(established, state.cfg.clone(), PathKind::Direct));
    // The link can take messages once it reports the connection.
    if !matches!(
        link.events().recv_timeout(state.cfg.handshake_timeout),
        Ok(LinkEvent::Connected { .. })
    ) {
        tracing::warn!("the control connection of {node} ended at once");
        return;
    }
    if let Err(err) = link.send(Message::Reach(Reach::Observed { address: observed })) {
        tracing::warn!("cannot answer {node}: {err}");
        return;
    }
    tracing::info!("node {node} is here, from {observed}");
    let replaced = state.nodes.lock().insert(
        node,
        Control {
            link: Arc::clone(&link),
            observed,
            candidates: limited(candidates),
            endpoint_dependent,
        },
    );
    if let Some(old) = replaced {
        old.link.disconnect();
    }
    while !state.stop.load(Ordering::SeqCst) {
        let event = match link.events().recv_timeout(POLL) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match event {
            LinkEvent::Received(Message::Reach(Reach::Announce {
                candidates,
                endpoint_dependent,
            })) => {
                if let Some(control) = state.nodes.lock().get_mut(&node) {
                    control.candidates = limited(candidates);
                    control.endpoint_dependent = endpoint_dependent;
                }
            }
            LinkEvent::Received(Message::Reach(Reach::Introduce { peer })) => {
                introduce(state, node, peer);
            }
            LinkEvent::Received(_) => {
                tracing::warn!("dropped the control connection of {node}: it sent something other than a rendezvous request");
                link.disconnect();
            }
            LinkEvent::Disconnected { reason, .. } => {
                tracing::info!("node {node} left: {reason}");
                break;
            }
            LinkEvent::Connected { .. } => {}
        }
    }
    let mut nodes = state.nodes.lock();
    if nodes
        .get(&node)
        .is_some_and(|control| Arc::ptr_eq(&control.link, &link))
    {
        nodes.remove(&node);
    }
}

fn limited(mut candidates: Vec<SocketAddr>) -> Vec<SocketAddr> {
    candidates.truncate(MAX_CANDIDATES);
    candidates
}

/// Sends each of `node` and `peer` the other's addresses, so both punch at once.
fn introduce(state: &State, node: NodeId, peer: NodeId) {
    let nodes = state.nodes.lock();
    let Some(asking) = nodes.get(&node) else {
        return;
    };
    let Some(asked) = nodes.get(&peer).filter(|_| peer != node) else {
        let _ = asking.link.send(Message::Reach(Reach::Absent { peer }));
        return;
    };
    state.introductions.fetch_add(1, Ordering::Relaxed);
    let relay_now = asking.endpoint_dependent || asked.endpoint_dependent;
    tracing::info!(
        "introducing {node} ({}) and {peer} ({})",
        asking.observed,
        asked.observed
    );
    let to_asked = Message::Reach(Reach::Punch {
        peer: node,
        candidates: asking.addresses(),
        relay_now,
    });
    let to_asking = Message::Reach(Reach::Punch {
        peer,
        candidates: asked.addresses(),
        relay_now,
    });
    for (link, message) in [(&asked.link, to_asked), (&asking.link, to_asking)] {
        if let Err(err) = link.send_timeout(message, POLL) {
            tracing::warn!("cannot send an introduction to {}: {err}", link.peer());
        }
    }
}

fn refuse(mut established: Established, reason: &str) {
    tracing::info!("refused a relay for {}: {reason}", established.peer);
    let _ = established
        .sender
        .send(&Message::Reach(Reach::RelayRefused {
            reason: reason.to_owned(),
        }));
}

fn open_relay(state: &Arc<State>, established: Established, peer: NodeId, session: u64) {
    let opener = established.peer;
    if state.relay == RelayPolicy::Off {
        return refuse(
            established,
            "this rendezvous does not relay (started without --relay)",
        );
    }
    if state.relays.load(Ordering::SeqCst) >= MAX_RELAYS {
        return refuse(established, "too many relays are running; try again later");
    }
    let offered = {
        let nodes = state.nodes.lock();
        nodes.get(&peer).map(|control| {
            control.link.send_timeout(
                Message::Reach(Reach::RelayOffer {
                    peer: opener,
                    session,
                }),
                POLL,
            )
        })
    };
    match offered {
        None => return refuse(established, "the peer is not connected to this rendezvous"),
        Some(Err(err)) => return refuse(established, &format!("the peer cannot be told: {err}")),
        Some(Ok(())) => {}
    }
    let (joined, arrives) = bounded(1);
    let key = (opener, peer, session);
    state.waiting.lock().insert(key, joined);
    let other = arrives.recv_timeout(JOIN_WAIT);
    state.waiting.lock().remove(&key);
    let Ok(other) = other else {
        return refuse(established, "the peer did not join the relay in time");
    };
    run_relay(state, established, other);
}

fn join_relay(state: &Arc<State>, established: Established, opener: NodeId, session: u64) {
    let key = (opener, established.peer, session);
    let Some(waiting) = state.waiting.lock().remove(&key) else {
        return refuse(established, "no such relay is waiting (it timed out)");
    };
    if let Err(err) = waiting.send(established) {
        refuse(err.into_inner(), "the relay was given up");
    }
}

fn run_relay(state: &Arc<State>, mut a: Established, mut b: Established) {
    let ready = Message::Reach(Reach::RelayReady);
    if let Err(err) = a.sender.send(&ready).and_then(|()| b.sender.send(&ready)) {
        tracing::warn!(
            "a relay between {} and {} failed to start: {err}",
            a.peer,
            b.peer
        );
        return;
    }
    let (a_peer, b_peer) = (a.peer, b.peer);
    tracing::info!("relaying between {a_peer} and {b_peer}");
    state.relays.fetch_add(1, Ordering::SeqCst);
    state.relays_made.fetch_add(1, Ordering::Relaxed);
    let before = state.relayed_bytes.load(Ordering::Relaxed);
    relay::splice(
        a.socket,
        b.socket,
        state.limit.clone(),
        state.relayed_bytes.clone(),
    );
    state.relays.fetch_sub(1, Ordering::SeqCst);
    let carried = state
        .relayed_bytes
        .load(Ordering::Relaxed)
        .saturating_sub(before);
    tracing::info!("the relay between {a_peer} and {b_peer} ended after about {carried} bytes");
}
