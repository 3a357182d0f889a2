//! The steady_state actor graph that turns captured changes into updates of the index.
//!
//! ```text
//! FUSE daemon ─┐
//! watcher  ────┼─▶ capture ─▶ coalescer ─▶ indexer ─▶ scanner
//! scanner  ────┘   (the scanner's findings re-enter through capture)
//! ```

pub mod coalescer;
pub mod update;
