//! Replication between nodes, independent of the transport: the wire messages
//! ([`proto`]), turning local updates into messages ([`encode`], [`delta`],
//! [`compress`]), comparing two nodes' indexes ([`digest`]), and applying received changes
//! crash-safely ([`apply`], [`journal`], [`safe_path`]).

pub mod apply;
pub mod book;
pub mod compress;
pub mod conflict;
pub mod delta;
pub mod digest;
pub mod durability;
pub mod encode;
pub mod journal;
pub mod local;
pub mod merge;
pub mod proto;
pub mod safe_path;
pub mod vector;
pub mod versions;
