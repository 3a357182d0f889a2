//! Noise messages on a TCP stream: a big-endian `u16` length, then that many bytes.
//!
//! Every read has a deadline, so a peer that stops sending, or sends one byte at a time,
//! cannot hold a thread longer than the caller allows.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::NetError;

/// The largest Noise message, ciphertext and tag included.
pub(crate) const MAX_FRAME: usize = 65_535;
/// The Poly1305 tag at the end of every encrypted Noise message.
pub(crate) const TAG_LEN: usize = 16;
/// The most plaintext one frame carries.
pub(crate) const MAX_PLAINTEXT: usize = MAX_FRAME - TAG_LEN;

/// When a read must be done by, and what it is for (named in the timeout error).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    at: Instant,
    allowed: Duration,
    what: &'static str,
}

impl Deadline {
    pub(crate) fn after(allowed: Duration, what: &'static str) -> Deadline {
        let now = Instant::now();
        // A configured timeout too large for the clock means "a very long time".
        let at = now
            .checked_add(allowed)
            .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
            .unwrap_or(now);
        Deadline { at, allowed, what }
    }

    pub(crate) fn allowed(&self) -> Duration {
        self.allowed
    }

    pub(crate) fn expired(&self) -> bool {
        Instant::now() >= self.at
    }

    fn remaining(&self) -> Result<Duration, NetError> {
        self.at
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or(NetError::Timeout {
                what: self.what,
                waited: self.allowed,
            })
    }

    /// Bounds the next writes on `stream` by this deadline.
    pub(crate) fn limit_writes(&self, stream: &TcpStream) -> Result<(), NetError> {
        stream
            .set_write_timeout(Some(self.remaining()?))
            .map_err(NetError::Io)
    }
}

/// Reads one frame into `frame` (replacing its content). `at_boundary` says whether the
/// stream may end cleanly right before this frame. Every Noise message is at least a tag
/// (transport) or a public key (handshake) long, so shorter frames are refused.
pub(crate) fn read_frame(
    stream: &mut TcpStream,
    frame: &mut Vec<u8>,
    deadline: Deadline,
    at_boundary: bool,
) -> Result<(), NetError> {
    let mut header = [0u8; 2];
    read_exact(stream, &mut header, deadline, at_boundary)?;
    let len = usize::from(u16::from_be_bytes(header));
    if len < TAG_LEN {
        return Err(NetError::Malformed(
            "a frame shorter than its authentication tag",
        ));
    }
    frame.resize(len, 0);
    read_exact(stream, frame, deadline, false)
}

fn read_exact(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Deadline,
    at_boundary: bool,
) -> Result<(), NetError> {
    let mut filled = 0;
    while filled < buf.len() {
        stream
            .set_read_timeout(Some(deadline.remaining()?))
            .map_err(NetError::Io)?;
        let Some(rest) = buf.get_mut(filled..) else {
            break;
        };
        match stream.read(rest) {
            Ok(0) if filled == 0 && at_boundary => return Err(NetError::PeerClosed),
            Ok(0) => return Err(NetError::Truncated),
            Ok(n) => filled += n,
            // Timeouts surface as WouldBlock on Linux; the deadline check above decides.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(NetError::Io(e)),
        }
    }
    Ok(())
}

/// Appends one frame holding `ciphertext` to `out`.
pub(crate) fn push_frame(out: &mut Vec<u8>, ciphertext: &[u8]) -> Result<(), NetError> {
    let len = u16::try_from(ciphertext.len())
        .map_err(|_| NetError::Encrypt(format!("a {}-byte Noise message", ciphertext.len())))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(ciphertext);
    Ok(())
}

/// Writes `bytes` whole; the caller has set the stream's write timeout to `waited`.
pub(crate) fn write_all(
    stream: &mut TcpStream,
    bytes: &[u8],
    waited: Duration,
) -> Result<(), NetError> {
    stream.write_all(bytes).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => NetError::WriteTimeout { waited },
        _ => NetError::Io(e),
    })
}
