//! filesync: a FUSE overlay filesystem that mirrors writes to other machines.
//!
//! The layers, from the kernel inwards:
//! - [`fuse`]: a thin `fuser` adapter; the only module that knows about FUSE.
//! - [`fs`]: the overlay core, every operation done on the backing folder by file descriptor.
//! - [`config`]: mount options, settings file and environment, merged with a fixed precedence.
//! - [`sync`]: replication messages, deltas and crash-safe apply; [`net`]: the encrypted
//!   transport between nodes; [`identity`]: node keys and IDs; [`stun`]: the STUN server
//!   and the discovery of this node's public address.

pub mod capture;
pub mod change;
pub mod config;
pub mod conflicts;
pub mod control;
pub mod fs;
pub mod fuse;
pub mod identity;
pub mod ignores;
pub mod index;
pub mod install;
pub mod metrics;
pub mod mount;
pub mod net;
pub mod pipeline;
pub mod progress;
pub mod reach;
pub mod service;
pub mod status;
pub mod stun;
pub mod sync;
pub mod telemetry;
