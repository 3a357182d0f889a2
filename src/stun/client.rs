//! Discovery: this node's server-reflexive address and its NAT's mapping behaviour, asked
//! of the configured STUN servers from one UDP socket ([`discover`]), again and again by a
//! background [`Keeper`] that also keeps the mapping alive.
//!
//! Requests to every server are in flight at once and retransmitted as RFC 8489 §6.2.1
//! says: first after the RTO (500 ms), doubling each time, at most 7 transmissions, then a
//! last wait of 16 RTOs (39.5 s in all when a server never answers). A response counts only
//! if it matches an outstanding transaction ID, comes from that server's address, has a
//! valid FINGERPRINT when it has one, and holds no unknown comprehension-required attribute.
//!
//! [`discover_tcp`] asks the same over TCP, from a fixed local address bound with
//! SO_REUSEADDR and SO_REUSEPORT: a TCP mapping is not the UDP one, and TCP hole punching
//! (simultaneous open from the replication port) needs the TCP mapping of that very port.
//! TCP needs no retransmissions; each server gets one bounded connection.
//!
//! The mapping is endpoint-independent when at least two servers at different IP addresses
//! saw the same reflexive address, endpoint-dependent when any two answers differ, and
//! unknown otherwise (fewer than two answers, or all from one IP address, which cannot
//! tell an endpoint-independent mapping from an address-dependent one).

use std::io;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use stun_rs::attributes::stun::{Fingerprint, MappedAddress, Software, XorMappedAddress};
use stun_rs::{
    MessageClass, MessageEncoderBuilder, StunMessage, StunMessageBuilder, TransactionId,
};

use super::{decode_message, unknown_required, MAX_MESSAGE, SOFTWARE};

/// The longest a receive waits before looking at the clock and the stop flag again.
const RECEIVE_SLICE: Duration = Duration::from_millis(250);

/// When requests are retransmitted (RFC 8489 §6.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retransmission {
    /// The wait after the first transmission; doubled after each one.
    pub initial_rto: Duration,
    /// How many times a request is sent at most (Rc).
    pub transmissions: u32,
    /// After the last transmission, how many initial RTOs to wait for an answer (Rm).
    pub last_wait_rtos: u32,
}

impl Default for Retransmission {
    /// RFC 8489's recommended values: RTO 500 ms, Rc 7, Rm 16.
    fn default() -> Retransmission {
        Retransmission {
            initial_rto: Duration::from_millis(500),
            transmissions: 7,
            last_wait_rtos: 16,
        }
    }
}

/// How this node's NAT maps one local socket to public addresses (RFC 4787).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// One public address for every destination: peers can punch through to it.
    EndpointIndependent,
    /// A different public address per destination ("symmetric NAT"): only a relay works.
    EndpointDependent,
    /// Not enough answers to tell.
    Unknown,
}

impl std::fmt::Display for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mapping::EndpointIndependent => "endpoint-independent",
            Mapping::EndpointDependent => "endpoint-dependent",
            Mapping::Unknown => "unknown",
        })
    }
}

/// One server's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The server asked.
    pub server: SocketAddr,
    /// Where that server saw the request come from.
    pub reflexive: SocketAddr,
}

/// What one round of questions found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// The local socket asked from.
    pub local: SocketAddr,
    /// The public address, when any server answered (the first server's answer if they
    /// disagree, since that is the mapping towards it).
    pub reflexive: Option<SocketAddr>,
    pub mapping: Mapping,
    /// Every server that answered, in the order the servers were given.
    pub answers: Vec<Answer>,
    /// When the round ended.
    pub at: Instant,
}

impl Discovery {
    /// One line for logs and `filesync status`.
    pub fn summary(&self) -> String {
        match self.reflexive {
            Some(reflexive) => format!(
                "public address {reflexive} ({} of the STUN servers answered; NAT mapping {})",
                self.answers.len(),
                self.mapping
            ),
            None => "no STUN server answered; public address unknown".to_owned(),
        }
    }
}

/// Asks every server in `servers` for this socket's reflexive address, all at once, with
/// retransmissions. Returns when every server answered or gave up (bounded by
/// `retransmission`). Changes the socket's read timeout.
pub fn discover(
    socket: &UdpSocket,
    servers: &[SocketAddr],
    retransmission: &Retransmission,
) -> Discovery {
    discover_until(socket, servers, retransmission, &|| false)
}

/// Asks every server in `servers`, one TCP connection each from `local` (bound with
/// SO_REUSEADDR and SO_REUSEPORT, so the replication listener can share the port if it
/// sets SO_REUSEPORT too), for the reflexive address of that local port. Each connection
/// takes at most `timeout` to connect and `timeout` to answer.
pub fn discover_tcp(local: SocketAddr, servers: &[SocketAddr], timeout: Duration) -> Discovery {
    let mut answers = Vec::new();
    let mut bound = local;
    for &server in servers {
        match ask_tcp(local, server, timeout) {
            Ok((reflexive, from)) => {
                bound = from;
                if let Some(reflexive) = reflexive {
                    answers.push(Answer { server, reflexive });
                }
            }
            Err(err) => tracing::debug!(%server, "STUN over TCP failed: {err}"),
        }
    }
    Discovery {
        local: bound,
        reflexive: answers.first().map(|answer| answer.reflexive),
        mapping: classify(&answers),
        answers,
        at: Instant::now(),
    }
}

/// One Binding transaction over TCP: the reflexive address (`None` for an error response)
/// and the local address actually bound.
fn ask_tcp(
    local: SocketAddr,
    server: SocketAddr,
    timeout: Duration,
) -> io::Result<(Option<SocketAddr>, SocketAddr)> {
    let mut stream = crate::net::connect_from(Some(local), server, timeout)?;
    let bound = stream.local_addr()?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let id = TransactionId::default();
    let request =
        binding_request(id).ok_or_else(|| io::Error::other("cannot encode a Binding request"))?;
    std::io::Write::write_all(&mut stream, &request)?;
    let mut buffer = [0u8; MAX_MESSAGE];
    let length = super::server::read_message(&mut stream, &mut buffer)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no STUN answer"))?;
    match buffer.get(..length).and_then(parse_response) {
        Some((answered, reflexive)) if answered == id => Ok((reflexive, bound)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a Binding response to our request",
        )),
    }
}

/// A request in flight to one server.
struct Transaction {
    server: SocketAddr,
    id: TransactionId,
    request: Vec<u8>,
    sent: u32,
    rto: Duration,
    /// When to retransmit, or (after the last transmission) to give up.
    next: Instant,
}

/// [`discover`], returning early (with what it has) once `stop` says so.
fn discover_until(
    socket: &UdpSocket,
    servers: &[SocketAddr],
    retransmission: &Retransmission,
    stop: &dyn Fn() -> bool,
) -> Discovery {
    let local = socket
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let now = Instant::now();
    let mut pending: Vec<Transaction> = servers
        .iter()
        .filter_map(|&server| {
            let id = TransactionId::default();
            Some(Transaction {
                server,
                id,
                request: binding_request(id)?,
                sent: 0,
                rto: retransmission.initial_rto,
                next: now,
            })
        })
        .collect();
    let mut answers: Vec<Answer> = Vec::new();
    let mut buffer = [0u8; MAX_MESSAGE + 1];
    while !pending.is_empty() && !stop() {
        let now = Instant::now();
        pending.retain_mut(|transaction| {
            transmit_or_give_up(socket, transaction, retransmission, now)
        });
        let Some(next) = pending.iter().map(|transaction| transaction.next).min() else {
            break;
        };
        let wait = next
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), RECEIVE_SLICE);
        if socket.set_read_timeout(Some(wait)).is_err() {
            std::thread::sleep(wait);
            continue;
        }
        match socket.recv_from(&mut buffer) {
            Ok((length, from)) => {
                let Some(datagram) = buffer.get(..length) else {
                    continue;
                };
                let Some((id, reflexive)) = parse_response(datagram) else {
                    continue;
                };
                if let Some(index) = pending
                    .iter()
                    .position(|transaction| transaction.id == id && transaction.server == from)
                {
                    let transaction = pending.swap_remove(index);
                    if let Some(reflexive) = reflexive {
                        answers.push(Answer {
                            server: transaction.server,
                            reflexive,
                        });
                    } else {
                        tracing::debug!(server = %from, "STUN server answered with an error");
                    }
                }
            }
            Err(err) if is_timeout(&err) => {}
            Err(err) => {
                // Such as ECONNREFUSED from an earlier ICMP error; the deadlines still bound
                // the loop, so wait out the slice rather than spin.
                tracing::debug!("STUN receive failed: {err}");
                std::thread::sleep(wait);
            }
        }
    }
    answers.sort_by_key(|answer| servers.iter().position(|server| *server == answer.server));
    Discovery {
        local,
        reflexive: answers.first().map(|answer| answer.reflexive),
        mapping: classify(&answers),
        answers,
        at: Instant::now(),
    }
}

/// Sends the transaction's request when it is due; false once it has run out of time.
fn transmit_or_give_up(
    socket: &UdpSocket,
    transaction: &mut Transaction,
    retransmission: &Retransmission,
    now: Instant,
) -> bool {
    if transaction.next > now {
        return true;
    }
    if transaction.sent >= retransmission.transmissions.max(1) {
        tracing::debug!(server = %transaction.server, "STUN server did not answer");
        return false;
    }
    if let Err(err) = socket.send_to(&transaction.request, transaction.server) {
        tracing::debug!(server = %transaction.server, "STUN request not sent: {err}");
    }
    transaction.sent += 1;
    transaction.next = if transaction.sent >= retransmission.transmissions.max(1) {
        now + retransmission.initial_rto * retransmission.last_wait_rtos
    } else {
        now + transaction.rto
    };
    transaction.rto = transaction.rto.saturating_mul(2);
    true
}

/// A Binding request with SOFTWARE and FINGERPRINT, encoded.
fn binding_request(id: TransactionId) -> Option<Vec<u8>> {
    let message = StunMessageBuilder::new(stun_rs::methods::BINDING, MessageClass::Request)
        .with_transaction_id(id)
        .with_attribute(Software::new(SOFTWARE).ok()?)
        .with_attribute(Fingerprint::default())
        .build();
    encode(&message)
}

fn encode(message: &StunMessage) -> Option<Vec<u8>> {
    let mut buffer = vec![0u8; MAX_MESSAGE];
    let length = MessageEncoderBuilder::default()
        .build()
        .encode(&mut buffer, message)
        .ok()?;
    buffer.truncate(length);
    Some(buffer)
}

/// A Binding response's transaction ID and, for a success, the reflexive address it
/// reports; `None` for anything else (which is ignored).
fn parse_response(datagram: &[u8]) -> Option<(TransactionId, Option<SocketAddr>)> {
    let message = decode_message(datagram)?;
    if message.method() != stun_rs::methods::BINDING || !unknown_required(&message).is_empty() {
        return None;
    }
    let id = *message.transaction_id();
    match message.class() {
        MessageClass::SuccessResponse => {
            let xor = message
                .get::<XorMappedAddress>()
                .and_then(|attribute| attribute.as_xor_mapped_address().ok())
                .map(|address| *address.socket_address());
            // Servers that predate RFC 5389 only send MAPPED-ADDRESS.
            let plain = || {
                message
                    .get::<MappedAddress>()
                    .and_then(|attribute| attribute.as_mapped_address().ok())
                    .map(|address| *address.socket_address())
            };
            Some((id, Some(xor.or_else(plain)?)))
        }
        MessageClass::ErrorResponse => Some((id, None)),
        MessageClass::Request | MessageClass::Indication => None,
    }
}

/// The mapping behaviour the answers show (see the module docs).
fn classify(answers: &[Answer]) -> Mapping {
    let Some(first) = answers.first() else {
        return Mapping::Unknown;
    };
    if answers
        .iter()
        .any(|answer| answer.reflexive != first.reflexive)
    {
        return Mapping::EndpointDependent;
    }
    let distinct_addresses = answers
        .iter()
        .any(|answer| answer.server.ip() != first.server.ip());
    if distinct_addresses {
        Mapping::EndpointIndependent
    } else {
        Mapping::Unknown
    }
}

fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// What the [`Keeper`] runs with.
#[derive(Debug, Clone)]
pub struct KeeperConfig {
    /// `HOST:PORT` of each STUN server, resolved again every round so a server that moves
    /// is followed.
    pub servers: Vec<String>,
    /// How long after one round ends the next one starts. Short enough that the NAT keeps
    /// the mapping: many NATs forget an idle UDP mapping after 30 s.
    pub interval: Duration,
    pub retransmission: Retransmission,
}

impl KeeperConfig {
    /// The servers, refreshed every 25 s, with RFC 8489's retransmissions.
    pub fn new(servers: Vec<String>) -> KeeperConfig {
        KeeperConfig {
            servers,
            interval: Duration::from_secs(25),
            retransmission: Retransmission::default(),
        }
    }
}

/// What the keeper's thread and its handles share.
struct Shared {
    latest: Mutex<Option<Discovery>>,
    /// Signalled when a round ends or the keeper stops.
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn latest(&self) -> std::sync::MutexGuard<'_, Option<Discovery>> {
        self.latest.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The last handle to a keeper: stops its thread when dropped.
struct Running {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    local: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
        let thread = self
            .thread
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            // The thread looks at the flag at least every RECEIVE_SLICE.
            let _ = thread.join();
        }
    }
}

/// Discovery in the background: a round at once, then one every `interval`, each from the
/// same socket, which keeps the NAT's mapping for it alive. Clones share the keeper; the
/// thread stops when the last one is dropped.
#[derive(Clone)]
pub struct Keeper {
    running: Arc<Running>,
}

impl Keeper {
    /// Starts discovering from `socket`, which the keeper keeps reading; so nothing else
    /// should read from it.
    pub fn start(socket: UdpSocket, config: KeeperConfig) -> io::Result<Keeper> {
        let local = socket.local_addr()?;
        let shared = Arc::new(Shared {
            latest: Mutex::new(None),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("stun-keeper".into())
                .spawn(move || keep(&socket, &config, &shared))?
        };
        Ok(Keeper {
            running: Arc::new(Running {
                shared,
                thread: Mutex::new(Some(thread)),
                local,
            }),
        })
    }

    /// The local socket's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.running.local
    }

    /// The latest round's result; `None` until the first round ends.
    pub fn latest(&self) -> Option<Discovery> {
        self.running.shared.latest().clone()
    }

    /// Waits up to `timeout` for a round that found a reflexive address (returning at once
    /// if the latest did), else returns the latest result.
    pub fn wait_for_address(&self, timeout: Duration) -> Option<Discovery> {
        let shared = &self.running.shared;
        let deadline = Instant::now() + timeout;
        let mut latest = shared.latest();
        loop {
            let found = latest
                .as_ref()
                .is_some_and(|discovery| discovery.reflexive.is_some());
            let left = deadline.saturating_duration_since(Instant::now());
            if found || left.is_zero() {
                return latest.clone();
            }
            latest = shared
                .changed
                .wait_timeout(latest, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The keeper's thread: rounds until stopped, logging when the result changes.
fn keep(socket: &UdpSocket, config: &KeeperConfig, shared: &Shared) {
    let stopped = || shared.stop.load(Ordering::Relaxed);
    let family_matches = |address: &SocketAddr| {
        socket
            .local_addr()
            .is_ok_and(|local| local.is_ipv4() == address.is_ipv4())
    };
    while !stopped() {
        let servers: Vec<SocketAddr> = config
            .servers
            .iter()
            .filter_map(|server| match server.to_socket_addrs() {
                Ok(mut addresses) => addresses.find(|address| family_matches(address)),
                Err(err) => {
                    tracing::warn!("cannot resolve STUN server {server}: {err}");
                    None
                }
            })
            .collect();
        let discovery = discover_until(socket, &servers, &config.retransmission, &stopped);
        if stopped() {
            break;
        }
        let mut latest = shared.latest();
        let changed = latest.as_ref().is_none_or(|previous| {
            previous.reflexive != discovery.reflexive || previous.mapping != discovery.mapping
        });
        if changed {
            if discovery.reflexive.is_some() {
                tracing::info!(local = %discovery.local, "{}", discovery.summary());
            } else {
                tracing::warn!(
                    servers = ?config.servers,
                    "no STUN server answered; check the stun= servers and that UDP reaches them"
                );
            }
        }
        *latest = Some(discovery);
        shared.changed.notify_all();
        let deadline = Instant::now() + config.interval;
        while !stopped() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            latest = shared
                .changed
                .wait_timeout(latest, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(server: &str, reflexive: &str) -> Answer {
        Answer {
            server: server.parse().expect("address"),
            reflexive: reflexive.parse().expect("address"),
        }
    }

    #[test]
    fn mapping_needs_two_server_addresses_to_be_independent() {
        assert_eq!(classify(&[]), Mapping::Unknown);
        let one = answer("198.18.0.1:3478", "198.18.5.5:4000");
        assert_eq!(classify(&[one]), Mapping::Unknown);
        let same_ip = answer("198.18.0.1:3479", "198.18.5.5:4000");
        assert_eq!(classify(&[one, same_ip]), Mapping::Unknown);
        let other_ip = answer("198.18.0.3:3478", "198.18.5.5:4000");
        assert_eq!(classify(&[one, other_ip]), Mapping::EndpointIndependent);
        let moved = answer("198.18.0.3:3478", "198.18.5.5:4001");
        assert_eq!(classify(&[one, moved]), Mapping::EndpointDependent);
        let port_only = answer("198.18.0.1:3479", "198.18.5.5:4001");
        assert_eq!(classify(&[one, port_only]), Mapping::EndpointDependent);
    }

    #[test]
    fn over_tcp_two_servers_see_the_same_local_port() {
        let server = crate::stun::Server::start(&crate::stun::ServerConfig {
            listen: vec![
                SocketAddr::from(([127, 0, 0, 1], 0)),
                SocketAddr::from(([127, 0, 0, 3], 0)),
            ],
            rate_limit: crate::stun::RateLimit::default(),
        })
        .expect("start");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let local = SocketAddr::from(([127, 0, 0, 1], port));
        let found = discover_tcp(local, server.local_addrs(), Duration::from_secs(5));
        assert_eq!(found.reflexive, Some(local), "{found:?}");
        assert_eq!(found.answers.len(), 2, "{found:?}");
        assert_eq!(found.mapping, Mapping::EndpointIndependent);
    }

    #[test]
    fn retransmissions_follow_rfc_8489_and_then_give_up() {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        // A port nobody answers on: bind one and never read it.
        let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let server = silent.local_addr().expect("address");
        let retransmission = Retransmission {
            initial_rto: Duration::from_millis(20),
            transmissions: 3,
            last_wait_rtos: 4,
        };
        let started = Instant::now();
        let discovery = discover(&socket, &[server], &retransmission);
        let took = started.elapsed();
        assert_eq!(discovery.reflexive, None);
        assert_eq!(discovery.mapping, Mapping::Unknown);
        // 20 + 40 ms between the three sends, then 4 × 20 ms: at least 140 ms.
        assert!(took >= Duration::from_millis(140), "{took:?}");
        silent.set_nonblocking(true).expect("nonblocking");
        let mut buffer = [0u8; 600];
        let received = std::iter::from_fn(|| silent.recv_from(&mut buffer).ok()).count();
        assert_eq!(received, 3);
    }
}
