//! `filesync stun-server`: a STUN Binding server over UDP and TCP (RFC 8489), on the same
//! port number of each address.
//!
//! - A Binding request gets a success response with XOR-MAPPED-ADDRESS (the source address
//!   the request came from), SOFTWARE and FINGERPRINT. MAPPED-ADDRESS is left out: it only
//!   serves RFC 3489 clients, whose requests lack the magic cookie and are dropped anyway.
//! - A request with a FINGERPRINT that does not match, or that is malformed in any way
//!   (short, truncated, wrong magic cookie, length not a multiple of 4, trailing bytes, an
//!   attribute that does not decode) gets no answer. So do responses, indications, other
//!   methods, and requests with MESSAGE-INTEGRITY: this server has no credentials.
//! - A request with an unknown comprehension-required attribute gets a 420 (Unknown
//!   Attribute) error response listing them (RFC 8489 §6.3.1.1).
//!
//! # Amplification
//!
//! A response is never more than [`MAX_GROWTH`] bytes larger than its request (checked
//! before sending: a success response is at most 72 bytes for the smallest, 20-byte,
//! request), and each source address gets at most a token bucket's worth of answers
//! ([`RateLimit`]); IPv6 sources are counted per /64, which one host usually owns whole. The
//! table of sources is capped, the oldest entry giving way, so a flood of spoofed sources
//! costs bounded memory.
//!
//! Over TCP (which proves the source address, so amplification is moot) each connection
//! may carry a few requests, one after the other; it is closed at the first malformed one,
//! after [`TCP_IDLE`] of silence, or after [`TCP_MAX_REQUESTS`]. At most
//! [`TCP_MAX_CONNECTIONS`] are open at once; the rate limit applies to them as well.
//!
//! [`handle_datagram`] is the whole per-message logic without sockets, so the fuzz target
//! and the tests exercise exactly what the server runs.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use stun_rs::attributes::stun::{
    ErrorCode, Fingerprint, MessageIntegrity, MessageIntegritySha256, Software, UnknownAttributes,
    XorMappedAddress,
};
use stun_rs::{MessageClass, MessageEncoderBuilder, StunMessage, StunMessageBuilder};

use super::{decode_message, unknown_required, MAX_MESSAGE, SOFTWARE};

/// The most a response may exceed its request by, in bytes. The largest answer, a 420
/// error for one unknown attribute, is 60 bytes over its request.
pub const MAX_GROWTH: usize = 64;

/// At most this many unknown attributes are listed in a 420 response.
const MAX_LISTED_UNKNOWN: usize = 16;

/// How often a serving thread looks at the stop flag when no datagram arrives.
const POLL: Duration = Duration::from_millis(200);

/// How long a TCP connection may stay silent before it is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(5);
/// How many requests one TCP connection may carry.
pub const TCP_MAX_REQUESTS: usize = 16;
/// How many TCP connections may be open at once; more are closed at once.
pub const TCP_MAX_CONNECTIONS: usize = 256;

/// How often the count of requests dropped by the rate limit is logged, at most.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Why the server could not start. One line each, saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "cannot listen for STUN on {address}: {source}; choose a free port or another address"
    )]
    Bind {
        address: SocketAddr,
        source: io::Error,
    },
    #[error("the STUN server needs at least one address to listen on: give --listen ADDRESS:PORT")]
    NoAddress,
    #[error("the STUN rate limit cannot be zero: give --rate and --burst of 1 or more")]
    ZeroRate,
}

/// The response to one datagram from `source`, written into `out`: its length, or `None`
/// when nothing should be sent. Never panics, whatever `datagram` holds.
pub fn handle_datagram(datagram: &[u8], source: SocketAddr, out: &mut [u8]) -> Option<usize> {
    if datagram.len() > MAX_MESSAGE {
        return None;
    }
    let request = decode_message(datagram)?;
    if request.class() != MessageClass::Request || request.method() != stun_rs::methods::BINDING {
        return None;
    }
    // The codec already refuses MESSAGE-INTEGRITY it cannot check (we give it no key);
    // this says so here too, so the rule holds whatever the codec does.
    let has_integrity = request.get::<MessageIntegrity>().is_some()
        || request.get::<MessageIntegritySha256>().is_some();
    if has_integrity {
        return None;
    }
    let unknown = unknown_required(&request);
    let response = if unknown.is_empty() {
        success(&request, source)?
    } else {
        unknown_attributes_error(&request, &unknown)?
    };
    let length = MessageEncoderBuilder::default()
        .build()
        .encode(out, &response)
        .ok()?;
    (length <= datagram.len() + MAX_GROWTH).then_some(length)
}

/// A Binding success response telling `source` its address.
fn success(request: &StunMessage, source: SocketAddr) -> Option<StunMessage> {
    // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; the client wants a.b.c.d.
    let source = SocketAddr::new(source.ip().to_canonical(), source.port());
    Some(
        StunMessageBuilder::new(stun_rs::methods::BINDING, MessageClass::SuccessResponse)
            .with_transaction_id(*request.transaction_id())
            .with_attribute(XorMappedAddress::from(source))
            .with_attribute(Software::new(SOFTWARE).ok()?)
            .with_attribute(Fingerprint::default())
            .build(),
    )
}

/// A 420 (Unknown Attribute) error response listing `unknown`.
fn unknown_attributes_error(request: &StunMessage, unknown: &[u16]) -> Option<StunMessage> {
    let mut listed = UnknownAttributes::default();
    for kind in unknown.iter().take(MAX_LISTED_UNKNOWN) {
        listed.add(*kind);
    }
    let code = stun_rs::ErrorCode::new(420, "Unknown Attribute").ok()?;
    Some(
        StunMessageBuilder::new(stun_rs::methods::BINDING, MessageClass::ErrorResponse)
            .with_transaction_id(*request.transaction_id())
            .with_attribute(ErrorCode::from(code))
            .with_attribute(listed)
            .with_attribute(Software::new(SOFTWARE).ok()?)
            .with_attribute(Fingerprint::default())
            .build(),
    )
}

/// How many answers each source may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Answers per second, on average, per source address (per /64 for IPv6).
    pub per_second: u32,
    /// How many answers a source may get at once after being quiet.
    pub burst: u32,
    /// How many sources are tracked at once; when full, the oldest is forgotten.
    pub max_sources: usize,
}

impl Default for RateLimit {
    /// Plenty for nodes refreshing every 25 s with retransmissions, far too little to be
    /// worth spoofing.
    fn default() -> RateLimit {
        RateLimit {
            per_second: 5,
            burst: 20,
            max_sources: 65_536,
        }
    }
}

/// One source's token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// Token buckets per source, in a table of bounded size.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    buckets: HashMap<IpAddr, Bucket>,
    /// The tracked sources, oldest first, so the oldest can be forgotten when full.
    order: VecDeque<IpAddr>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> RateLimiter {
        RateLimiter {
            limit,
            buckets: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Whether `source` may get an answer now; takes one token if so.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        let key = source_key(source);
        let burst = f64::from(self.limit.burst);
        if !self.buckets.contains_key(&key) {
            while self.order.len() >= self.limit.max_sources.max(1) {
                match self.order.pop_front() {
                    Some(oldest) => {
                        self.buckets.remove(&oldest);
                    }
                    None => break,
                }
            }
            self.order.push_back(key);
        }
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            refilled: now,
        });
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * f64::from(self.limit.per_second)).min(burst);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How many sources are tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

/// The key a source is counted under: the address, or its /64 for IPv6.
fn source_key(source: IpAddr) -> IpAddr {
    match source.to_canonical() {
        IpAddr::V6(address) => {
            let prefix = u128::from(address) & !u128::from(u64::MAX);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// What the server is started with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Every address to answer on (a second address lets clients check their NAT's
    /// mapping behaviour against one server).
    pub listen: Vec<SocketAddr>,
    pub rate_limit: RateLimit,
}

/// A running server: one thread per address, sharing one rate limiter. Stops when dropped.
pub struct Server {
    addresses: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Binds every address, then answers on each in a thread of its own.
    pub fn start(config: &ServerConfig) -> Result<Server, ServerError> {
        if config.listen.is_empty() {
            return Err(ServerError::NoAddress);
        }
        if config.rate_limit.per_second == 0 || config.rate_limit.burst == 0 {
            return Err(ServerError::ZeroRate);
        }
        let mut sockets = Vec::new();
        for &address in &config.listen {
            let bind_error = |source| ServerError::Bind { address, source };
            let socket = UdpSocket::bind(address).map_err(bind_error)?;
            socket.set_read_timeout(Some(POLL)).map_err(bind_error)?;
            let bound = socket.local_addr().map_err(bind_error)?;
            // The same port over TCP, so a client can ask either way at one address.
            let listener = TcpListener::bind(bound)
                .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
                .map_err(|source| ServerError::Bind {
                    address: bound,
                    source,
                })?;
            sockets.push((socket, listener, bound));
        }
        let limiter = Arc::new(Mutex::new(RateLimiter::new(config.rate_limit)));
        let stop = Arc::new(AtomicBool::new(false));
        let mut server = Server {
            addresses: sockets.iter().map(|(_, _, bound)| *bound).collect(),
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for (socket, listener, bound) in sockets {
            let thread_error = |source| ServerError::Bind {
                address: bound,
                source,
            };
            let (limiter_udp, stop_udp) = (limiter.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name("stun-server".into())
                .spawn(move || serve(&socket, &limiter_udp, &stop_udp))
                .map_err(thread_error)?;
            server.threads.push(thread);
            let (limiter_tcp, stop_tcp) = (limiter.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name("stun-server-tcp".into())
                .spawn(move || serve_tcp(&listener, &limiter_tcp, &stop_tcp))
                .map_err(thread_error)?;
            server.threads.push(thread);
            tracing::info!(address = %bound, "STUN server listening (UDP and TCP)");
        }
        Ok(server)
    }

    /// The addresses actually bound (with the port chosen when 0 was asked for).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addresses
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            // Each thread sees the flag within one POLL.
            let _ = thread.join();
        }
    }
}

/// Answers datagrams on `socket` until `stop` is set.
fn serve(socket: &UdpSocket, limiter: &Mutex<RateLimiter>, stop: &AtomicBool) {
    // One byte more than the largest message, so an oversized datagram is seen as such
    // instead of being cut to a size that might decode.
    let mut datagram = [0u8; MAX_MESSAGE + 1];
    let mut response = [0u8; MAX_MESSAGE];
    let mut dropped: u64 = 0;
    let mut last_report = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let (length, source) = match socket.recv_from(&mut datagram) {
            Ok(received) => received,
            Err(err) if is_timeout(&err) => continue,
            Err(err) => {
                // Such as an ICMP error for an earlier answer: nothing to do about it.
                tracing::debug!("STUN receive failed: {err}");
                continue;
            }
        };
        let allowed = limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allow(source.ip(), Instant::now());
        if !allowed {
            dropped += 1;
            if last_report.elapsed() >= DROP_REPORT_EVERY {
                tracing::info!(
                    dropped,
                    "STUN requests over the per-source rate limit dropped"
                );
                dropped = 0;
                last_report = Instant::now();
            }
            continue;
        }
        let Some(request) = datagram.get(..length) else {
            continue;
        };
        let Some(answer) = handle_datagram(request, source, &mut response) else {
            tracing::debug!(%source, length, "STUN datagram ignored");
            continue;
        };
        if let Some(answer) = response.get(..answer) {
            if let Err(err) = socket.send_to(answer, source) {
                tracing::debug!(%source, "STUN answer not sent: {err}");
            }
        }
    }
}

/// Accepts TCP connections until `stop` is set, each served in a thread of its own.
fn serve_tcp(listener: &TcpListener, limiter: &Arc<Mutex<RateLimiter>>, stop: &Arc<AtomicBool>) {
    let open = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        let (stream, source) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(err) if is_timeout(&err) => {
                std::thread::sleep(TCP_ACCEPT_POLL);
                continue;
            }
            Err(err) => {
                // Such as EMFILE: back off instead of spinning.
                tracing::debug!("STUN TCP accept failed: {err}");
                std::thread::sleep(POLL);
                continue;
            }
        };
        if open.fetch_add(1, Ordering::Relaxed) >= TCP_MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        let (limiter, stop, done) = (limiter.clone(), stop.clone(), open.clone());
        let spawned = std::thread::Builder::new()
            .name("stun-tcp".into())
            .spawn(move || {
                if let Err(err) = answer_tcp(stream, source, &limiter, &stop) {
                    tracing::debug!(%source, "STUN TCP connection ended: {err}");
                }
                done.fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// How often the TCP listener looks for a new connection.
const TCP_ACCEPT_POLL: Duration = Duration::from_millis(20);

/// Answers the requests on one TCP connection, one after the other; returns at the first
/// malformed or unanswerable one, at end of stream, or when a limit is reached.
fn answer_tcp(
    mut stream: TcpStream,
    source: SocketAddr,
    limiter: &Mutex<RateLimiter>,
    stop: &AtomicBool,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(TCP_IDLE))?;
    stream.set_write_timeout(Some(TCP_IDLE))?;
    let mut message = [0u8; MAX_MESSAGE];
    let mut response = [0u8; MAX_MESSAGE];
    for _ in 0..TCP_MAX_REQUESTS {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let Some(length) = read_message(&mut stream, &mut message)? else {
            break;
        };
        let allowed = limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allow(source.ip(), Instant::now());
        let request = message.get(..length).unwrap_or_default();
        let answer = if allowed {
            handle_datagram(request, source, &mut response)
        } else {
            None
        };
        match answer.and_then(|length| response.get(..length)) {
            Some(answer) => stream.write_all(answer)?,
            None => break,
        }
    }
    Ok(())
}

/// Reads one STUN message from a stream (its header says how long it is) into `buffer`;
/// `None` at a clean end of stream or when the header announces more than fits.
pub(super) fn read_message(
    stream: &mut impl Read,
    buffer: &mut [u8; MAX_MESSAGE],
) -> io::Result<Option<usize>> {
    let header_size = stun_rs::MESSAGE_HEADER_SIZE;
    let (header, body) = buffer.split_at_mut(header_size);
    match stream.read_exact(header) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let declared = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let Some(body) = body.get_mut(..declared) else {
        return Ok(None);
    };
    stream.read_exact(body)?;
    Ok(Some(header_size + declared))
}

fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(per_second: u32, burst: u32, max_sources: usize) -> RateLimit {
        RateLimit {
            per_second,
            burst,
            max_sources,
        }
    }

    #[test]
    fn bucket_allows_a_burst_then_refills_at_the_rate() {
        let mut limiter = RateLimiter::new(limit(2, 3, 8));
        let start = Instant::now();
        let source: IpAddr = "198.18.0.7".parse().expect("address");
        let allowed = (0..10).filter(|_| limiter.allow(source, start)).count();
        assert_eq!(allowed, 3);
        assert!(limiter.allow(source, start + Duration::from_millis(500)));
        assert!(!limiter.allow(source, start + Duration::from_millis(500)));
    }

    #[test]
    fn table_stays_bounded_and_forgets_the_oldest() {
        let mut limiter = RateLimiter::new(limit(1, 1, 4));
        let now = Instant::now();
        let first: IpAddr = "198.18.1.0".parse().expect("address");
        assert!(limiter.allow(first, now));
        assert!(!limiter.allow(first, now));
        for n in 1..=100u8 {
            limiter.allow(IpAddr::from([198, 18, 1, n]), now);
            assert!(limiter.tracked() <= 4);
        }
        // Forgotten, so it starts again with a full bucket.
        assert!(limiter.allow(first, now));
    }

    /// A valid Binding request with FINGERPRINT and one attribute of the given type.
    fn request_with(kind: u16) -> Vec<u8> {
        let mut message = vec![0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42];
        message.extend_from_slice(&[7; 12]);
        message.extend_from_slice(&kind.to_be_bytes());
        message.extend_from_slice(&[0x00, 0x04, 1, 2, 3, 4]);
        with_fingerprint(message)
    }

    /// `message` with a FINGERPRINT appended (computed here, independently of the codec).
    fn with_fingerprint(mut message: Vec<u8>) -> Vec<u8> {
        let length = u16::try_from(message.len() - 20 + 8).expect("short message");
        message[2..4].copy_from_slice(&length.to_be_bytes());
        let crc = crc32fast::hash(&message) ^ 0x5354_554e;
        message.extend_from_slice(&[0x80, 0x28, 0x00, 0x04]);
        message.extend_from_slice(&crc.to_be_bytes());
        message
    }

    #[test]
    fn thousands_of_mutated_and_random_datagrams_never_panic_nor_grow() {
        let source: SocketAddr = "198.18.0.9:5000".parse().expect("address");
        let seeds = [
            with_fingerprint(request_with(0x8022)[..28].to_vec()),
            request_with(0x0024),
            request_with(0x7fff),
        ];
        let mut rng = fastrand::Rng::with_seed(0x5354_554e);
        let mut out = [0u8; MAX_MESSAGE];
        let mut answered = 0;
        for round in 0..6_000 {
            let mut datagram = match round % 3 {
                0 => (0..rng.usize(0..=MAX_MESSAGE + 8))
                    .map(|_| rng.u8(..))
                    .collect(),
                _ => seeds[rng.usize(..seeds.len())].clone(),
            };
            if round % 3 != 0 {
                for _ in 0..rng.usize(1..=4) {
                    match rng.u8(..4) {
                        0 if !datagram.is_empty() => {
                            let at = rng.usize(..datagram.len());
                            datagram[at] ^= 1 << rng.u8(..8);
                        }
                        1 => datagram.truncate(rng.usize(..=datagram.len())),
                        2 => datagram.extend((0..rng.usize(1..8)).map(|_| rng.u8(..))),
                        _ if datagram.len() >= 28 => {
                            // Keep the message well-formed but with a recomputed FINGERPRINT, so
                            // mutations reach the attribute decoders.
                            let body = datagram[..datagram.len() - 8].to_vec();
                            datagram = with_fingerprint(body);
                        }
                        _ => {}
                    }
                }
            }
            if let Some(length) = handle_datagram(&datagram, source, &mut out) {
                assert!(length <= datagram.len() + MAX_GROWTH);
                answered += 1;
            }
        }
        assert!(answered > 0, "no mutated request was still valid");
    }

    #[test]
    fn answers_requests_and_refuses_unknown_required_attributes() {
        let source: SocketAddr = "198.18.0.9:5000".parse().expect("address");
        let mut out = [0u8; MAX_MESSAGE];
        // Comprehension-optional unknown (0x8022 is SOFTWARE, known; 0xc0de is not): success.
        let optional = request_with(0xc0de);
        let length = handle_datagram(&optional, source, &mut out).expect("answered");
        assert_eq!(&out[..2], &[0x01, 0x01], "a Binding success response");
        assert!(length <= optional.len() + MAX_GROWTH);
        // Comprehension-required unknown: a 420 error response naming it.
        let required = request_with(0x7fff);
        let length = handle_datagram(&required, source, &mut out).expect("answered");
        assert_eq!(&out[..2], &[0x01, 0x11], "a Binding error response");
        let answer = &out[..length];
        assert!(answer.windows(2).any(|pair| pair == [0x7f, 0xff]));
        assert!(
            answer.windows(4).any(|quad| quad == [0, 0, 4, 20]),
            "code 420"
        );
        // A broken FINGERPRINT: nothing.
        let mut broken = optional.clone();
        let last = broken.len() - 1;
        broken[last] ^= 1;
        assert_eq!(handle_datagram(&broken, source, &mut out), None);
    }

    #[test]
    fn ipv6_sources_share_their_slash_64() {
        let mut limiter = RateLimiter::new(limit(1, 1, 8));
        let now = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("address");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("address");
        let other: IpAddr = "2001:db8:1:3::1".parse().expect("address");
        assert!(limiter.allow(a, now));
        assert!(!limiter.allow(b, now));
        assert!(limiter.allow(other, now));
    }
}
