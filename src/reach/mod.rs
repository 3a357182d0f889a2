//! Reaching peers behind NATs: a rendezvous node introduces them, they punch a TCP hole
//! to each other (a simultaneous open from the port their rendezvous connection uses),
//! and when that fails the rendezvous relays their end-to-end encrypted bytes.
//!
//! - [`rendezvous`]: the server (`filesync rendezvous`).
//! - [`node`]: a node's side ([`Reacher`]), which hands each path it finds to the session
//!   as a [`crate::net::Link`] whose [`crate::net::PathKind`] says how it goes.
//! - `punch` and `relay`: the two ways through.
//!
//! Every path ends in the same Noise handshake as a direct connection, expecting the
//! peer's key: an address from the rendezvous is only a place to try, so a lying
//! rendezvous can make a node fail to connect, never talk to an impostor.

pub mod node;
mod punch;
mod relay;
pub mod rendezvous;

pub use node::{ReachConfig, ReachStatus, Reacher};
pub use rendezvous::{RelayPolicy, Rendezvous, RendezvousConfig, RendezvousStats};
