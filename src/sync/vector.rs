//! Version vectors: which node wrote which version of a path, so that any number of nodes
//! writing in any order agree on what is newer and what is a conflict.
//!
//! A [`Vector`] maps a replica (the first 8 bytes of a node's public key, [`super::book::replica_of`])
//! to a counter. A local change sets this node's counter to `max(previous + 1, now in
//! ms)`, so a counter survives a lost index (time moves on) and the replica whose counter
//! is largest is, between nodes with roughly synchronised clocks, the last writer. Every
//! other component is carried over from the version the change was made on, so a change
//! made on top of a peer's version dominates it.
//!
//! Comparing two vectors ([`Vector::compare`]) gives equal, newer, older or concurrent;
//! concurrent versions are conflicts (see [`crate::pipeline::applier`]).
//!
//! They travel in messages, so this module depends on serde alone; [`super::book`] hands
//! out the vectors of local changes.

use serde::{Deserialize, Serialize};

/// A node, as version vectors name it: the first 8 bytes of its public key.
pub type Replica = u64;

/// `(replica, counter)` pairs sorted by replica, with no zero counter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Vector(Vec<(Replica, u64)>);

/// How one vector relates to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Equal,
    /// It has seen everything the other has, and more.
    Newer,
    Older,
    /// Each has seen something the other has not: a conflict.
    Concurrent,
}

/// The most components a vector may have when it comes from outside; far more nodes
/// than any folder is shared with.
pub const MAX_COMPONENTS: usize = 1024;

impl Vector {
    /// A vector from pairs in any order; zero counters are left out, a replica named
    /// twice keeps its largest counter.
    pub fn from_pairs(mut pairs: Vec<(Replica, u64)>) -> Vector {
        pairs.retain(|&(_, counter)| counter > 0);
        pairs.sort_unstable();
        let mut out: Vec<(Replica, u64)> = Vec::with_capacity(pairs.len());
        for (replica, counter) in pairs {
            match out.last_mut() {
                Some(last) if last.0 == replica => last.1 = last.1.max(counter),
                _ => out.push((replica, counter)),
            }
        }
        Vector(out)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn pairs(&self) -> &[(Replica, u64)] {
        &self.0
    }

    /// Whether the pairs are as [`Vector::from_pairs`] makes them (a peer's may not be).
    pub fn is_well_formed(&self) -> bool {
        self.0.len() <= MAX_COMPONENTS
            && self.0.iter().all(|&(_, counter)| counter > 0)
            && self.0.windows(2).all(|w| w[0].0 < w[1].0)
    }

    pub fn counter(&self, replica: Replica) -> u64 {
        self.0
            .binary_search_by_key(&replica, |&(r, _)| r)
            .map_or(0, |at| self.0[at].1)
    }

    /// How `self` relates to `other`.
    pub fn compare(&self, other: &Vector) -> Order {
        let (mut ahead, mut behind) = (false, false);
        let (mut mine, mut theirs) = (self.0.iter().peekable(), other.0.iter().peekable());
        loop {
            match (mine.peek(), theirs.peek()) {
                (None, None) => break,
                (Some(_), None) => {
                    ahead = true;
                    break;
                }
                (None, Some(_)) => {
                    behind = true;
                    break;
                }
                (Some(&&(a, x)), Some(&&(b, y))) => {
                    if a == b {
                        ahead |= x > y;
                        behind |= x < y;
                        mine.next();
                        theirs.next();
                    } else if a < b {
                        ahead = true;
                        mine.next();
                    } else {
                        behind = true;
                        theirs.next();
                    }
                }
            }
        }
        match (ahead, behind) {
            (false, false) => Order::Equal,
            (true, false) => Order::Newer,
            (false, true) => Order::Older,
            (true, true) => Order::Concurrent,
        }
    }

    /// Whether `self` has seen everything `other` has (equal or newer).
    pub fn covers(&self, other: &Vector) -> bool {
        matches!(self.compare(other), Order::Equal | Order::Newer)
    }

    /// The component-wise maximum of both: a version that has seen both.
    pub fn merged(&self, other: &Vector) -> Vector {
        let mut pairs = self.0.clone();
        pairs.extend_from_slice(&other.0);
        Vector::from_pairs(pairs)
    }

    /// This vector with `replica`'s counter moved past both its own value and `clock`.
    pub fn bumped(&self, replica: Replica, clock: u64) -> Vector {
        let next = self.counter(replica).saturating_add(1).max(clock);
        let mut pairs = self.0.clone();
        pairs.push((replica, next));
        Vector::from_pairs(pairs)
    }

    /// The replica with the largest counter (the larger replica on a tie): the last
    /// writer, as far as counters tell. `None` for an empty vector.
    pub fn last_writer(&self) -> Option<Replica> {
        self.0
            .iter()
            .max_by_key(|&&(replica, counter)| (counter, replica))
            .map(|&(replica, _)| replica)
    }

    /// The index's encoding: a u32 count, then each pair as two little-endian u64s.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.0.len() * 16);
        let count = u32::try_from(self.0.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_le_bytes());
        for (replica, counter) in &self.0 {
            out.extend_from_slice(&replica.to_le_bytes());
            out.extend_from_slice(&counter.to_le_bytes());
        }
        out
    }

    /// Decodes [`Vector::encode`]'s bytes; `None` when they are malformed.
    pub fn decode(bytes: &[u8]) -> Option<Vector> {
        let (count, rest) = bytes.split_first_chunk::<4>()?;
        let count = u32::from_le_bytes(*count) as usize;
        if rest.len() != count.checked_mul(16)? {
            return None;
        }
        let pairs = rest
            .chunks_exact(16)
            .map(|pair| {
                let (replica, counter) = pair.split_at(8);
                let word = |b: &[u8]| {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(b);
                    u64::from_le_bytes(w)
                };
                (word(replica), word(counter))
            })
            .collect();
        let vector = Vector(pairs);
        vector.is_well_formed().then_some(vector)
    }
}

impl std::fmt::Display for Vector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("{")?;
        for (at, (replica, counter)) in self.0.iter().enumerate() {
            if at > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{replica:016x}: {counter}")?;
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(pairs: &[(u64, u64)]) -> Vector {
        Vector::from_pairs(pairs.to_vec())
    }

    #[test]
    fn comparison_covers_every_case() {
        let a = v(&[(1, 2), (2, 1)]);
        assert_eq!(a.compare(&a), Order::Equal);
        assert_eq!(a.compare(&v(&[(1, 2)])), Order::Newer);
        assert_eq!(v(&[(1, 2)]).compare(&a), Order::Older);
        assert_eq!(a.compare(&v(&[(1, 1), (2, 2)])), Order::Concurrent);
        assert_eq!(a.compare(&v(&[(3, 1)])), Order::Concurrent);
        assert_eq!(Vector::default().compare(&a), Order::Older);
        assert_eq!(Vector::default().compare(&Vector::default()), Order::Equal);
    }

    #[test]
    fn merging_dominates_both_and_bumping_moves_past_the_clock() {
        let a = v(&[(1, 5), (2, 1)]);
        let b = v(&[(2, 3), (7, 1)]);
        let m = a.merged(&b);
        assert_eq!(m, v(&[(1, 5), (2, 3), (7, 1)]));
        assert!(m.covers(&a) && m.covers(&b));
        assert_eq!(a.bumped(1, 0).counter(1), 6);
        assert_eq!(a.bumped(1, 100).counter(1), 100);
        assert_eq!(a.bumped(9, 4).compare(&a), Order::Newer);
        assert_eq!(m.last_writer(), Some(1));
    }

    #[test]
    fn encoding_round_trips_and_rejects_malformed_bytes() {
        let a = v(&[(u64::MAX, 1), (3, 9)]);
        assert_eq!(Vector::decode(&a.encode()), Some(a.clone()));
        let bytes = a.encode();
        for cut in 0..bytes.len() {
            assert_eq!(Vector::decode(&bytes[..cut]), None);
        }
        let unsorted = Vector(vec![(5, 1), (3, 1)]);
        assert_eq!(Vector::decode(&unsorted.encode()), None);
        let zero = Vector(vec![(5, 0)]);
        assert_eq!(Vector::decode(&zero.encode()), None);
    }
}
