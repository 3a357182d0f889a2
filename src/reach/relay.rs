//! Relaying through a rendezvous node, for when no hole can be punched.
//!
//! Each node opens a connection of its own to the rendezvous and proves its key there as
//! usual; its first message says which relay it opens or joins. When both ends are there,
//! the rendezvous answers `RelayReady` on each and from then on copies bytes between the
//! two sockets without reading them. The nodes then run a Noise handshake with each
//! other over those bytes, end to end: the rendezvous sees only ciphertext, and a
//! rendezvous that joined a node to anyone else fails that handshake.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::identity::NodeId;
use crate::net::channel::{self, Established, Expect};
use crate::net::{Deadline, LinkConfig, NetError};
use crate::sync::proto::{Message, Reach};

/// How long a relay end waits for the other end to join.
pub const JOIN_WAIT: Duration = Duration::from_secs(10);
/// A relay that carries nothing for this long is dead (nodes send keepalives far more
/// often), so a node that vanished without closing does not hold a relay forever.
const RELAY_IDLE: Duration = Duration::from_secs(60);
/// Bytes copied per read; also the largest burst a rate limit lets through at once.
const SPLICE_BUFFER: usize = 64 * 1024;

/// Opens or joins a relay at the rendezvous `via` with `first` (`RelayOpen` or
/// `RelayJoin`), then sets up the end-to-end connection with `peer` over it.
pub fn connect(
    cfg: &LinkConfig,
    via: (NodeId, SocketAddr),
    first: Reach,
    peer: NodeId,
    initiator: bool,
) -> Result<Established, NetError> {
    let (rendezvous, address) = via;
    let stream = TcpStream::connect_timeout(&address, cfg.handshake_timeout).map_err(|source| {
        NetError::Connect {
            addr: address,
            source,
        }
    })?;
    let deadline = Deadline::after(cfg.handshake_timeout, "while opening a relay");
    let mut control = channel::establish(stream, true, cfg, Expect::Peer(rendezvous), deadline)?;
    control.sender.set_write_timeout(cfg.handshake_timeout)?;
    control.sender.send(&Message::Reach(first))?;
    match control.receiver.recv(JOIN_WAIT + cfg.handshake_timeout)? {
        Message::Reach(Reach::RelayReady) => {}
        Message::Reach(Reach::RelayRefused { reason }) => {
            return Err(NetError::Remote(format!(
                "the rendezvous relays nothing: {reason}"
            )));
        }
        _ => {
            return Err(NetError::Unexpected {
                expected: "the relay to be ready",
            })
        }
    }
    // The relay's own channel ends here, at a message boundary; the peer's begins.
    let Established { socket, .. } = control;
    let deadline = Deadline::after(cfg.handshake_timeout, "through the relay");
    channel::establish(socket, initiator, cfg, Expect::Peer(peer), deadline)
}

/// A cap on the bytes per second a rendezvous relays, over all relays together.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_second: u64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    available: f64,
    refilled: Instant,
}

impl RateLimit {
    pub fn new(bytes_per_second: u64) -> RateLimit {
        RateLimit {
            bytes_per_second: bytes_per_second.max(1),
            state: Mutex::new(Bucket {
                available: 0.0,
                refilled: Instant::now(),
            }),
        }
    }

    /// Waits until `bytes` may go; a burst is at most one second's worth.
    fn take(&self, bytes: usize) {
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// Takes `bytes` from the bucket at `now`; returns how long to wait before sending
    /// them so that the rate holds.
    fn reserve(&self, bytes: usize, now: Instant) -> Duration {
        let rate = self.bytes_per_second as f64;
        let mut bucket = self.state.lock();
        let earned = now.saturating_duration_since(bucket.refilled).as_secs_f64() * rate;
        bucket.available = (bucket.available + earned).min(rate);
        bucket.refilled = bucket.refilled.max(now);
        bucket.available -= bytes as f64;
        if bucket.available >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.available / rate)
        }
    }
}

/// Copies bytes both ways between `a` and `b` until either side ends, counting them in
/// `relayed`; returns when both directions have stopped.
pub fn splice(a: TcpStream, b: TcpStream, limit: Option<Arc<RateLimit>>, relayed: Arc<AtomicU64>) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        tracing::warn!("cannot relay: a socket could not be shared between two threads");
        return;
    };
    let back_limit = limit.clone();
    let back_count = relayed.clone();
    let back = std::thread::Builder::new()
        .name("relay-back".into())
        .spawn(move || copy(b2, a2, back_limit.as_deref(), &back_count));
    copy(a, b, limit.as_deref(), &relayed);
    if let Ok(back) = back {
        let _ = back.join();
    }
}

/// One direction of a relay. Ending either direction ends both, so neither node waits on
/// a half-open relay.
fn copy(mut from: TcpStream, mut to: TcpStream, limit: Option<&RateLimit>, relayed: &AtomicU64) {
    let mut buffer = vec![0u8; SPLICE_BUFFER];
    let _ = from.set_read_timeout(Some(RELAY_IDLE));
    let _ = to.set_write_timeout(Some(RELAY_IDLE));
    loop {
        let read = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        if let Some(limit) = limit {
            limit.take(read);
        }
        let Some(bytes) = buffer.get(..read) else {
            break;
        };
        if to.write_all(bytes).is_err() {
            break;
        }
        relayed.fetch_add(read as u64, Ordering::Relaxed);
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_spaces_bytes_at_the_rate_with_at_most_a_second_of_burst() {
        let limit = RateLimit::new(1000);
        let start = limit.state.lock().refilled;
        let at = |ms: u64| start + Duration::from_millis(ms);
        // Nothing saved up at first: 500 bytes wait half a second, 500 more a second.
        assert_eq!(limit.reserve(500, at(0)), Duration::from_millis(500));
        assert_eq!(limit.reserve(500, at(0)), Duration::from_millis(1000));
        // Once that debt is paid, bytes go as fast as they were earned.
        assert_eq!(limit.reserve(100, at(1100)), Duration::ZERO);
        // A long quiet spell saves up at most one second's worth.
        assert_eq!(limit.reserve(1000, at(60_000)), Duration::ZERO);
        assert_eq!(limit.reserve(250, at(60_000)), Duration::from_millis(250));
    }
}
