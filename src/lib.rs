//! filesync: a FUSE overlay filesystem that mirrors writes to other machines.
//!
//! The layers, from the kernel inwards:
//! - [`fuse`]: a thin `fuser` adapter; the only module that knows about FUSE.
//! - [`fs`]: the overlay core, every operation done on the backing folder by file descriptor.
//! - [`config`]: mount options, settings file and environment, merged with a fixed precedence.
//! - [`sync`]: replication messages, deltas and crash-safe apply; [`net`]: the encrypted
//!   transport between nodes; [`identity`]: node keys and IDs.

pub mod capture;
pub mod change;
pub mod config;
pub mod control;
pub mod fs;
pub mod fuse;
pub mod identity;
pub mod index;
pub mod install;
pub mod mount;
pub mod net;
pub mod pipeline;
pub mod progress;
pub mod sync;
pub mod telemetry;
