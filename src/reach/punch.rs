//! TCP hole punching: both nodes connect to each other at once, from the port their
//! rendezvous connection uses, so each NAT has already let its own node's packet out
//! when the other node's packet arrives (a TCP simultaneous open).
//!
//! Every candidate address is tried in its own thread, again and again until the window
//! closes: a NAT that answers the first packet with a reset, or a packet that crosses
//! the other's, only costs one more try. The first connection whose Noise handshake
//! proves the expected key wins; an address that answers with another key (a forged
//! candidate) is refused like any impostor.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver};

use crate::identity::NodeId;
use crate::net::channel::{self, Established, Expect};
use crate::net::{connect_from, Deadline, LinkConfig, NetError};

/// The most candidate addresses of one peer tried at once.
pub const MAX_CANDIDATES: usize = 8;
/// Between two tries of one address that failed at once (a reset).
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// The longest one try waits for its connection (the kernel resends the SYN after a
/// second, which is another chance for the packets to cross).
const TRY_LIMIT: Duration = Duration::from_millis(1500);

/// Tries to reach `peer` at each of `candidates` from `local` until `window` ends.
/// Returns the first connection set up with the peer's key, or why none was.
pub fn punch(
    cfg: &LinkConfig,
    local: SocketAddr,
    peer: NodeId,
    candidates: &[SocketAddr],
    initiator: bool,
    window: Duration,
) -> Result<Established, String> {
    let until = Instant::now() + window;
    let candidates: Vec<SocketAddr> = candidates
        .iter()
        .copied()
        .filter(|address| usable(*address, local))
        .take(MAX_CANDIDATES)
        .collect();
    if candidates.is_empty() {
        return Err("the rendezvous knows no address of the peer".to_owned());
    }
    let (found, results) = bounded(candidates.len());
    for address in &candidates {
        let cfg = cfg.clone();
        let found = found.clone();
        let address = *address;
        let spawned = std::thread::Builder::new()
            .name(format!("punch-{}", address.port()))
            .spawn(move || {
                let result = try_address(&cfg, local, address, peer, initiator, until);
                let _ = found.send((address, result));
            });
        if let Err(err) = spawned {
            return Err(format!("cannot start a thread to punch: {err}"));
        }
    }
    drop(found);
    first_success(&results, candidates.len())
}

/// The first connection that came up, closing any that come up after it.
fn first_success(
    results: &Receiver<(SocketAddr, Result<Established, String>)>,
    tries: usize,
) -> Result<Established, String> {
    let mut reasons = Vec::new();
    for _ in 0..tries {
        match results.recv() {
            Ok((_, Ok(established))) => {
                let late = results.clone();
                // The other tries end by the window's end; whatever they made is closed.
                std::thread::spawn(move || {
                    for (_, result) in late.iter() {
                        if let Ok(extra) = result {
                            let _ = extra.socket.shutdown(std::net::Shutdown::Both);
                        }
                    }
                });
                return Ok(established);
            }
            Ok((address, Err(reason))) => reasons.push(format!("{address}: {reason}")),
            Err(_) => break,
        }
    }
    Err(reasons.join("; "))
}

/// Whether an address is worth a try: not unspecified, not our own socket.
fn usable(address: SocketAddr, local: SocketAddr) -> bool {
    !address.ip().is_unspecified() && address.port() != 0 && address != local
}

fn try_address(
    cfg: &LinkConfig,
    local: SocketAddr,
    address: SocketAddr,
    peer: NodeId,
    initiator: bool,
    until: Instant,
) -> Result<Established, String> {
    let mut last = String::from("no try within the window");
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(last);
        }
        match connect_from(Some(local), address, left.min(TRY_LIMIT)) {
            Ok(stream) => {
                let deadline = Deadline::after(cfg.handshake_timeout, "during a hole punch");
                return channel::establish(stream, initiator, cfg, Expect::Peer(peer), deadline)
                    .map_err(|err: NetError| err.to_string());
            }
            Err(err) => {
                last = err.to_string();
                std::thread::sleep(
                    RETRY_PAUSE.min(until.saturating_duration_since(Instant::now())),
                );
            }
        }
    }
}
