//! Every datagram the STUN server could receive goes through the same function the server
//! runs: it must never panic, and an answer must never grow past the amplification cap.
#![no_main]

use std::net::SocketAddr;

use filesync::stun::server::{handle_datagram, MAX_GROWTH};
use filesync::stun::MAX_MESSAGE;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|datagram: &[u8]| {
    let source = SocketAddr::from(([198, 18, 0, 9], 5000));
    let mut out = [0u8; MAX_MESSAGE];
    if let Some(length) = handle_datagram(datagram, source, &mut out) {
        assert!(length <= datagram.len() + MAX_GROWTH);
    }
});
