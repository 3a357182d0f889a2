//! STUN (RFC 8489): a Binding server ([`server`]) and the discovery client each node runs
//! ([`client`]), both on the `stun-rs` message codec, which has no sockets of its own.
//!
//! # Why
//!
//! Nodes behind a NAT do not know the address the rest of the Internet sees them at. A
//! Binding request to a STUN server returns it (the *server-reflexive* address). Asking two
//! servers (two different addresses) from the same local socket also tells whether the NAT
//! keeps one mapping for every destination (*endpoint-independent*, so hole punching works)
//! or a new one per destination (*endpoint-dependent*, "symmetric": only a relay works).
//!
//! # Transport
//!
//! Discovery runs over UDP from one socket that the node keeps (see [`client::Keeper`]):
//! the mapping it reports is that socket's, and the keeper's periodic requests keep it
//! alive in the NAT. Replication itself runs over TCP, and a TCP mapping is not the UDP
//! one: [`discover_tcp`] asks over TCP from a given local port (SO_REUSEPORT), which is
//! what TCP simultaneous open from the replication port needs. The server answers both.
//!
//! # Safety against abuse
//!
//! The server answers only well-formed Binding requests, each answer at most
//! [`server::MAX_GROWTH`] bytes larger than the request, and at most a token bucket's worth
//! per source address (per /64 for IPv6), with a bounded table of sources; so it cannot be
//! used to amplify traffic towards a spoofed victim.

pub mod client;
pub mod server;

pub use client::{
    discover, discover_tcp, Discovery, Keeper, KeeperConfig, Mapping, Retransmission,
};
pub use server::{handle_datagram, RateLimit, Server, ServerConfig, ServerError};

/// The SOFTWARE attribute both sides send: the product and its version.
const SOFTWARE: &str = concat!("filesync ", env!("CARGO_PKG_VERSION"));

/// The largest STUN message either side reads; anything longer is dropped. Binding
/// messages are well under 200 bytes, and this stays below any path MTU.
pub const MAX_MESSAGE: usize = 548;

/// Decodes one whole STUN message, checking its FINGERPRINT when it has one; `None` for
/// anything else. The header is checked here first (length a multiple of 4 that covers
/// exactly the datagram), so trailing bytes or a short read are never taken for a message.
fn decode_message(datagram: &[u8]) -> Option<stun_rs::StunMessage> {
    let header = datagram.get(..stun_rs::MESSAGE_HEADER_SIZE)?;
    let declared = usize::from(u16::from_be_bytes([*header.get(2)?, *header.get(3)?]));
    if declared % 4 != 0 || stun_rs::MESSAGE_HEADER_SIZE + declared != datagram.len() {
        return None;
    }
    let context = stun_rs::DecoderContextBuilder::default()
        .with_validation()
        .build();
    let decoder = stun_rs::MessageDecoderBuilder::default()
        .with_context(context)
        .build();
    let (message, used) = decoder.decode(datagram).ok()?;
    (used == datagram.len()).then_some(message)
}

/// The comprehension-required attributes of `message` that the codec does not know: a
/// request carrying any gets a 420 error, a response carrying any is discarded.
fn unknown_required(message: &stun_rs::StunMessage) -> Vec<u16> {
    message
        .attributes()
        .iter()
        .filter(|attribute| attribute.is_unknown())
        .map(|attribute| attribute.attribute_type())
        .filter(|kind| kind.is_comprehension_required())
        .map(|kind| kind.as_u16())
        .collect()
}
