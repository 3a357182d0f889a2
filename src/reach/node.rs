//! A node's side of reaching peers through a rendezvous: the [`Reacher`].
//!
//! It keeps a control connection to the rendezvous from the node's shared port and
//! announces where the node may be reached. For each peer it is to reach, the node with
//! the smaller ID calls: it asks for an introduction, and both nodes punch at once. If no
//! hole opens within [`RELAY_AFTER`] (at once when a NAT maps per destination), the caller
//! also opens a relay; whichever path comes up is handed to the session, and a hole
//! punched later replaces a relay. While relayed, the caller tries to punch again every
//! `upgrade_every`. The node with the larger ID answers: it punches when introduced and
//! joins relays it is offered.
//!
//! The smaller ID is the Noise initiator on both kinds of path, so the two ends of a
//! simultaneous open agree on who speaks first.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

use super::{punch, relay};
use crate::identity::NodeId;
use crate::net::backoff::Backoff;
use crate::net::channel::Established;
use crate::net::{shared_port_socket, Link, LinkConfig, LinkEvent, PathKind};
use crate::stun::{discover_tcp, Mapping};
use crate::sync::proto::{Message, Reach};

/// How long a punch keeps trying.
pub const PUNCH_WINDOW: Duration = Duration::from_secs(5);
/// How long the caller gives a punch before it also opens a relay.
pub const RELAY_AFTER: Duration = Duration::from_secs(2);
/// How long one STUN question over TCP may take.
const STUN_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the public address is asked again and announced.
const REDISCOVER: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(100);
const ACCEPTED_QUEUE: usize = 16;

#[derive(Debug, Clone)]
pub struct ReachConfig {
    /// The node's own link settings (key, hello, keepalive).
    pub link: LinkConfig,
    pub rendezvous: (NodeId, SocketAddr),
    /// The peers to reach through the rendezvous.
    pub peers: Vec<NodeId>,
    /// The address every connection leaves from: the listening address, or (`None`) a
    /// port the reacher keeps for this.
    pub local: Option<SocketAddr>,
    /// STUN servers asked over TCP from `local` for the node's public address.
    pub stun: Vec<SocketAddr>,
    /// While a peer is relayed, how often a punch is tried again; zero never tries.
    pub upgrade_every: Duration,
}

/// What the rendezvous told this node about itself, for `filesync status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReachStatus {
    /// The node's public address as the rendezvous sees it.
    pub observed: Option<SocketAddr>,
    /// The node's public address as the STUN servers see it, and its NAT's mapping.
    pub stun: Option<(SocketAddr, String)>,
}

/// Finds paths to peers through a rendezvous; hands each new one out as a [`Link`].
pub struct Reacher {
    links: Receiver<Link>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Holds the shared port when the node does not listen (bound, never listening).
    _reserved: Option<socket2::Socket>,
}

struct Shared {
    config: ReachConfig,
    local: SocketAddr,
    me: NodeId,
    stop: AtomicBool,
    status: Mutex<ReachStatus>,
    control: Link,
    links: Sender<Link>,
    /// What the control connection hears for each peer this node calls.
    outcomes: HashMap<NodeId, Sender<Outcome>>,
}

/// What a caller learns about its peer.
enum Outcome {
    Punched(Result<Box<Established>, String>),
    /// The rendezvous knows the peer cannot be punched to.
    RelayNow,
    Absent,
}

impl Reacher {
    pub fn start(config: ReachConfig) -> std::io::Result<Reacher> {
        let me = config.link.key.id();
        let (local, reserved) = match config.local {
            Some(local) => (local, None),
            None => {
                let socket = shared_port_socket(SocketAddr::from(([0, 0, 0, 0], 0)))?;
                let local = socket
                    .local_addr()?
                    .as_socket()
                    .ok_or_else(|| std::io::Error::other("the reserved port has no address"))?;
                (local, Some(socket))
            }
        };
        let (rendezvous, address) = config.rendezvous;
        let control = Link::dial_from(rendezvous, address, Some(local), config.link.clone());
        let (links_tx, links) = bounded(ACCEPTED_QUEUE);
        let mut outcomes = HashMap::new();
        let mut callers = Vec::new();
        for peer in &config.peers {
            if me < *peer {
                let (tx, rx) = bounded(4);
                outcomes.insert(*peer, tx);
                callers.push((*peer, rx));
            }
        }
        let shared = Arc::new(Shared {
            config,
            local,
            me,
            stop: AtomicBool::new(false),
            status: Mutex::new(ReachStatus::default()),
            control,
            links: links_tx,
            outcomes,
        });
        let mut threads = Vec::new();
        let listening = Arc::clone(&shared);
        threads.push(
            std::thread::Builder::new()
                .name("rendezvous-ctl".into())
                .spawn(move || control_loop(&listening))?,
        );
        for (peer, outcomes) in callers {
            let caller = Arc::clone(&shared);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("call-{}", peer.short()))
                    .spawn(move || call(&caller, peer, &outcomes))?,
            );
        }
        Ok(Reacher {
            links,
            shared,
            threads,
            _reserved: reserved,
        })
    }

    /// A link for each path found; the session takes them like accepted connections.
    pub fn links(&self) -> &Receiver<Link> {
        &self.links
    }

    pub fn status(&self) -> ReachStatus {
        self.shared.status.lock().clone()
    }
}

impl Drop for Reacher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.control.disconnect();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn initiator(&self, peer: NodeId) -> bool {
        self.me < peer
    }

    fn tell_rendezvous(&self, reach: Reach) -> bool {
        match self.control.send_timeout(Message::Reach(reach), POLL) {
            Ok(()) => true,
            Err(err) => {
                tracing::debug!("cannot reach the rendezvous: {err}");
                false
            }
        }
    }

    /// Gives a new path to the session; returns what is needed to watch and cut it.
    fn hand_out(&self, established: Established, path: PathKind) -> Option<Current> {
        let peer = established.peer;
        let socket = established.socket.try_clone().ok();
        let link = Link::over(established, self.config.link.clone(), path);
        let ended = link.ended();
        tracing::info!("reached peer {peer}: {path}");
        if self
            .links
            .send_timeout(link, self.config.link.handshake_timeout)
            .is_err()
        {
            tracing::warn!("the session took no new link to {peer}; dropping it");
            return None;
        }
        Some(Current {
            path,
            ended,
            socket,
        })
    }

    /// This node's addresses, as the rendezvous should pass them on.
    fn announcement(&self) -> Reach {
        let mut candidates = Vec::new();
        if let Some(own) = own_address(self.local, self.config.rendezvous.1) {
            candidates.push(own);
        }
        let mut endpoint_dependent = false;
        if !self.config.stun.is_empty() {
            let found = discover_tcp(self.local, &self.config.stun, STUN_TIMEOUT);
            tracing::info!("over TCP: {}", found.summary());
            endpoint_dependent = found.mapping == Mapping::EndpointDependent;
            if let Some(reflexive) = found.reflexive {
                candidates.push(reflexive);
                self.status.lock().stun = Some((reflexive, found.mapping.to_string()));
            }
        }
        Reach::Announce {
            candidates,
            endpoint_dependent,
        }
    }
}

/// The local address of the shared port as others on the same network would dial it:
/// the interface address that routes towards the rendezvous when bound to every address.
fn own_address(local: SocketAddr, towards: SocketAddr) -> Option<SocketAddr> {
    if !local.ip().is_unspecified() {
        return Some(local);
    }
    let probe = UdpSocket::bind(SocketAddr::new(local.ip(), 0)).ok()?;
    probe.connect(towards).ok()?;
    let ip = probe.local_addr().ok()?.ip();
    Some(SocketAddr::new(ip, local.port()))
}

/// A path handed to the session.
struct Current {
    path: PathKind,
    /// Disconnected when the link ended.
    ended: Receiver<()>,
    /// To cut the path when a better one replaces it.
    socket: Option<std::net::TcpStream>,
}

impl Current {
    fn is_alive(&self) -> bool {
        self.ended.try_recv() != Err(crossbeam_channel::TryRecvError::Disconnected)
    }

    fn cut(&self) {
        if let Some(socket) = &self.socket {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Follows the control connection: announces this node, and answers introductions and
/// relay offers.
fn control_loop(shared: &Arc<Shared>) {
    let mut announced_at: Option<Instant> = None;
    while !shared.stopped() {
        if shared.control.is_connected() && announced_at.is_some_and(|at| at.elapsed() > REDISCOVER)
        {
            let announcement = shared.announcement();
            if shared.tell_rendezvous(announcement) {
                announced_at = Some(Instant::now());
            }
        }
        let event = match shared.control.events().recv_timeout(POLL) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        match event {
            LinkEvent::Connected { addr, .. } => {
                tracing::info!("connected to the rendezvous at {addr}");
                let announcement = shared.announcement();
                if shared.tell_rendezvous(announcement) {
                    announced_at = Some(Instant::now());
                }
            }
            LinkEvent::Disconnected { reason, .. } => {
                tracing::debug!("no connection to the rendezvous: {reason}");
            }
            LinkEvent::Received(Message::Reach(reach)) => answer(shared, reach),
            LinkEvent::Received(_) => {
                tracing::warn!("the rendezvous sent a sync message; dropping its connection");
                shared.control.disconnect();
            }
        }
    }
}

fn answer(shared: &Arc<Shared>, reach: Reach) {
    match reach {
        Reach::Observed { address } => {
            tracing::info!("the rendezvous sees this node at {address}");
            shared.status.lock().observed = Some(address);
        }
        Reach::Punch {
            peer,
            candidates,
            relay_now,
        } if shared.config.peers.contains(&peer) => {
            if relay_now {
                if let Some(outcomes) = shared.outcomes.get(&peer) {
                    let _ = outcomes.try_send(Outcome::RelayNow);
                }
            }
            let puncher = Arc::clone(shared);
            let spawned = std::thread::Builder::new()
                .name(format!("punch-{}", peer.short()))
                .spawn(move || punch_for(&puncher, peer, &candidates));
            if let Err(err) = spawned {
                tracing::warn!("cannot start a thread to punch to {peer}: {err}");
            }
        }
        Reach::Absent { peer } => {
            if let Some(outcomes) = shared.outcomes.get(&peer) {
                let _ = outcomes.try_send(Outcome::Absent);
            }
        }
        Reach::RelayOffer { peer, session }
            if shared.config.peers.contains(&peer) && !shared.initiator(peer) =>
        {
            let joiner = Arc::clone(shared);
            let spawned = std::thread::Builder::new()
                .name(format!("relay-{}", peer.short()))
                .spawn(move || {
                    let join = Reach::RelayJoin { peer, session };
                    let rendezvous = joiner.config.rendezvous;
                    match relay::connect(&joiner.config.link, rendezvous, join, peer, false) {
                        Ok(established) => {
                            joiner.hand_out(established, PathKind::Relayed);
                        }
                        Err(err) => tracing::warn!("cannot join the relay to {peer}: {err}"),
                    }
                });
            if let Err(err) = spawned {
                tracing::warn!("cannot start a thread to join a relay: {err}");
            }
        }
        other => tracing::warn!("ignored a rendezvous message not meant for this node: {other:?}"),
    }
}

/// Punches towards `peer`; a caller hears the outcome, an answerer hands the path out.
fn punch_for(shared: &Arc<Shared>, peer: NodeId, candidates: &[SocketAddr]) {
    let initiator = shared.initiator(peer);
    let result = punch::punch(
        &shared.config.link,
        shared.local,
        peer,
        candidates,
        initiator,
        PUNCH_WINDOW,
    );
    match shared.outcomes.get(&peer) {
        Some(outcomes) => {
            let _ = outcomes.send_timeout(Outcome::Punched(result.map(Box::new)), POLL);
        }
        None => match result {
            Ok(established) => {
                shared.hand_out(established, PathKind::HolePunched);
            }
            Err(reason) => tracing::info!("no hole punched to {peer}: {reason}"),
        },
    }
}

/// The caller's side for one peer: keeps a path to it, the best one it can find.
fn call(shared: &Arc<Shared>, peer: NodeId, outcomes: &Receiver<Outcome>) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    while !shared.stopped() {
        if !shared.control.is_connected() {
            std::thread::sleep(POLL);
            continue;
        }
        let Some(current) = attempt(shared, peer, outcomes) else {
            let delay = backoff.next_delay();
            tracing::info!("no path to {peer} yet; trying again in {delay:?}");
            sleep_unless_stopped(shared, delay);
            continue;
        };
        backoff.reset();
        keep(shared, peer, outcomes, current);
    }
}

/// While `current` lives. A relayed path asks for an introduction every
/// `upgrade_every`; a hole punched meanwhile (also a late one from the first try)
/// replaces the relay.
fn keep(shared: &Arc<Shared>, peer: NodeId, outcomes: &Receiver<Outcome>, mut current: Current) {
    let mut next_upgrade = Instant::now() + shared.config.upgrade_every;
    while !shared.stopped() && current.is_alive() {
        let upgrading = !shared.config.upgrade_every.is_zero();
        if upgrading && current.path == PathKind::Relayed && Instant::now() >= next_upgrade {
            next_upgrade = Instant::now() + shared.config.upgrade_every;
            shared.tell_rendezvous(Reach::Introduce { peer });
        }
        select! {
            recv(current.ended) -> _ => break,
            recv(outcomes) -> outcome => {
                let Ok(Outcome::Punched(Ok(established))) = outcome else {
                    continue;
                };
                if current.path != PathKind::Relayed {
                    let _ = established.socket.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                if let Some(better) = shared.hand_out(*established, PathKind::HolePunched) {
                    tracing::info!("the relay to {peer} gives way to a punched path");
                    current.cut();
                    current = better;
                }
            },
            default(POLL) => {}
        }
    }
    if current.is_alive() {
        current.cut();
    }
}

/// One try to reach `peer`: an introduction (both nodes punch), and a relay after
/// [`RELAY_AFTER`], or as soon as the punch fails or the rendezvous says only a relay
/// will do. Returns the first path that comes up.
fn attempt(shared: &Arc<Shared>, peer: NodeId, outcomes: &Receiver<Outcome>) -> Option<Current> {
    while outcomes.try_recv().is_ok() {}
    if !shared.tell_rendezvous(Reach::Introduce { peer }) {
        return None;
    }
    let started = Instant::now();
    let punch_until = started + PUNCH_WINDOW + shared.config.link.handshake_timeout;
    let mut relay_at = Some(started + RELAY_AFTER);
    let mut relay = crossbeam_channel::never();
    let mut relay_pending = false;
    let mut punching = true;
    loop {
        let now = Instant::now();
        if shared.stopped() {
            return None;
        }
        if relay_at.is_some_and(|at| now >= at) {
            relay = open_relay(shared, peer);
            relay_pending = true;
            relay_at = None;
        }
        punching &= now < punch_until;
        if !punching && !relay_pending && relay_at.is_none() {
            return None;
        }
        select! {
            recv(outcomes) -> outcome => match outcome {
                Ok(Outcome::Punched(Ok(established))) => {
                    return shared.hand_out(*established, PathKind::HolePunched);
                }
                Ok(Outcome::Punched(Err(reason))) => {
                    tracing::info!("no hole punched to {peer}: {reason}");
                    punching = false;
                    relay_at = relay_at.map(|_| now);
                }
                Ok(Outcome::RelayNow) => relay_at = relay_at.map(|_| now),
                Ok(Outcome::Absent) => {
                    tracing::info!("peer {peer} is not connected to the rendezvous");
                    return None;
                }
                Err(_) => return None,
            },
            recv(relay) -> made => {
                relay = crossbeam_channel::never();
                relay_pending = false;
                if let Some(established) = made.ok().flatten() {
                    return shared.hand_out(established, PathKind::Relayed);
                }
            },
            default(POLL) => {}
        }
    }
}

/// Opens a relay to `peer` in the background; the channel gets the connection or `None`.
fn open_relay(shared: &Arc<Shared>, peer: NodeId) -> Receiver<Option<Established>> {
    let (made, result) = bounded(1);
    let opener = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name(format!("relay-{}", peer.short()))
        .spawn(move || {
            let session = fastrand::u64(..);
            let open = Reach::RelayOpen { peer, session };
            let rendezvous = opener.config.rendezvous;
            let connected = relay::connect(&opener.config.link, rendezvous, open, peer, true)
                .map_err(|err| tracing::warn!("cannot relay to {peer}: {err}"))
                .ok();
            let _ = made.send(connected);
        });
    if let Err(err) = spawned {
        tracing::warn!("cannot start a thread to open a relay: {err}");
        return crossbeam_channel::never();
    }
    result
}

fn sleep_unless_stopped(shared: &Shared, delay: Duration) {
    let until = Instant::now() + delay;
    while !shared.stopped() && Instant::now() < until {
        std::thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
    }
}
