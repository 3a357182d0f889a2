//! The book of version vectors for local changes (see [`super::vector`]).
//!
//! It merges what the index has for a path with what was handed out or applied in the
//! last seconds and is maybe not committed yet, so two quick changes of one path, or a
//! local edit right after a peer's change appeared, still build on each other. The
//! coalescer stamps local changes with it, the applier notes what it applies, and both
//! ask it what this node knows of a path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use super::vector::{Replica, Vector};
use crate::identity::NodeId;
use crate::index::{Index, IndexError};

/// The replica of node `id`.
pub fn replica_of(id: &NodeId) -> Replica {
    let bytes = id.as_bytes();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes[..8]);
    Replica::from_be_bytes(first)
}

/// How long a vector handed out or applied is remembered beside the index; far longer
/// than any change takes from the coalescer to an index commit.
const REMEMBER: Duration = Duration::from_secs(30);
/// The book prunes itself once it remembers this many paths.
const PRUNE_FROM: usize = 4096;

/// Hands out the vectors of local changes and remembers recent ones (see the module
/// docs). Shared by the coalescer, the encoder and the applier.
#[derive(Debug)]
pub struct Book {
    replica: Replica,
    state: Mutex<BookState>,
}

#[derive(Debug, Default)]
struct BookState {
    /// The largest counter handed out, so counters grow even if the clock steps back.
    last: u64,
    recent: HashMap<PathBuf, (Vector, Instant)>,
    /// `recent` is pruned when it reaches this size: twice what the last pruning left,
    /// so a burst of more than [`PRUNE_FROM`] paths within [`REMEMBER`] costs a scan per
    /// doubling, not one per path.
    prune_at: usize,
}

impl Book {
    pub fn new(replica: Replica) -> Book {
        Book {
            replica,
            state: Mutex::new(BookState::default()),
        }
    }

    /// This node's replica.
    pub fn replica(&self) -> Replica {
        self.replica
    }

    /// What this node knows of `path`'s version: the index's vector merged with a recent
    /// one not committed yet.
    pub fn current(&self, index: &Index, path: &Path) -> Result<Vector, IndexError> {
        let stored = index.vector(path)?.unwrap_or_default();
        let state = self.state.lock();
        Ok(match state.recent.get(path) {
            Some((recent, _)) => stored.merged(recent),
            None => stored,
        })
    }

    /// The vector of a local change of `path` (see the module docs), remembered.
    pub fn stamp(&self, index: &Index, path: &Path) -> Result<Vector, IndexError> {
        let base = self.current(index, path)?;
        Ok(self.stamp_on(path, &base))
    }

    /// What this node knows of the version of everything at and below `dir`, merged: the
    /// base of a folder's deletion, so that it is newer than all it removes.
    pub fn current_tree(&self, index: &Index, dir: &Path) -> Result<Vector, IndexError> {
        let mut merged = self.current(index, dir)?;
        let snapshot = index.snapshot()?;
        for (path, _) in snapshot.subtree(dir)? {
            if let Some(vector) = snapshot.vector(&path)? {
                merged = merged.merged(&vector);
            }
        }
        let state = self.state.lock();
        for (path, (vector, _)) in &state.recent {
            if path.starts_with(dir) {
                merged = merged.merged(vector);
            }
        }
        Ok(merged)
    }

    /// The vector of a local change made on top of `base` (e.g. the merged vectors of a
    /// removed folder's contents), remembered for `path`.
    pub fn stamp_on(&self, path: &Path, base: &Vector) -> Vector {
        let mut state = self.state.lock();
        let counter = now_ms().max(state.last.saturating_add(1));
        let vector = base.bumped(self.replica, counter);
        state.last = vector.counter(self.replica);
        state.remember(path.to_path_buf(), vector.clone());
        vector
    }

    /// Remembers that `path` now has `vector` (a peer's change, applied here).
    pub fn note(&self, path: &Path, vector: &Vector) {
        self.state
            .lock()
            .remember(path.to_path_buf(), vector.clone());
    }
}

impl BookState {
    fn remember(&mut self, path: PathBuf, vector: Vector) {
        let now = Instant::now();
        if self.recent.len() >= self.prune_at.max(PRUNE_FROM) {
            self.recent
                .retain(|_, (_, when)| now.duration_since(*when) < REMEMBER);
            self.prune_at = self.recent.len().saturating_mul(2);
        }
        self.recent.insert(path, (vector, now));
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(pairs: &[(u64, u64)]) -> Vector {
        Vector::from_pairs(pairs.to_vec())
    }

    #[test]
    fn stamps_grow_even_when_the_clock_does_not() {
        let book = Book::new(7);
        let path = Path::new("a");
        let first = book.stamp_on(path, &Vector::default());
        let second = book.stamp_on(path, &first);
        assert_eq!(second.compare(&first), super::super::vector::Order::Newer);
        let far_ahead = v(&[(7, u64::MAX - 1)]);
        let third = book.stamp_on(path, &far_ahead);
        assert_eq!(third.counter(7), u64::MAX);
    }
}
