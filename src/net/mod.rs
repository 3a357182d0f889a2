//! The node-to-node transport: framing, the Noise session, peer links with reconnects.
