//! What the coalescer hands on: one [`Update`] per file per burst, with the written byte
//! ranges merged.

use std::path::PathBuf;

use serde::Serialize;

use crate::change::{FileId, Source};
use crate::sync::vector::Vector;

/// How a file's content changed during a burst.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    Unchanged,
    /// Only these byte ranges (`offset`, `len`), sorted and disjoint. A truncation shows as
    /// an empty range at the new size.
    Ranges(Vec<(u64, u64)>),
    /// Somewhere, unknown where (a watcher without ranges, a passthrough write, a scan).
    Unknown,
}

impl Content {
    /// Adds the range `[offset, offset + len)`, merging it with touching neighbours.
    pub fn add_range(&mut self, offset: u64, len: u64) {
        match self {
            Content::Unknown => {}
            Content::Unchanged => *self = Content::Ranges(vec![(offset, len)]),
            Content::Ranges(ranges) => merge_range(ranges, offset, len),
        }
    }
}

impl Content {
    /// What changed in two bursts, one after the other.
    pub fn merge(&mut self, later: Content) {
        match later {
            Content::Unchanged => {}
            Content::Unknown => *self = Content::Unknown,
            Content::Ranges(ranges) => {
                for (offset, len) in ranges {
                    self.add_range(offset, len);
                }
            }
        }
    }
}

/// `ranges` stays sorted, with no two ranges overlapping or touching, so the ranges a new
/// one meets are one contiguous run found by binary search.
fn merge_range(ranges: &mut Vec<(u64, u64)>, offset: u64, len: u64) {
    let start = offset;
    let end = offset.saturating_add(len);
    let first = ranges.partition_point(|&(o, l)| o.saturating_add(l) < start);
    let past = ranges.partition_point(|&(o, _)| o <= end);
    if first >= past {
        ranges.insert(first, (start, len));
        return;
    }
    let merged_start = start.min(ranges[first].0);
    let (last_offset, last_len) = ranges[past - 1];
    let merged_end = end.max(last_offset.saturating_add(last_len));
    ranges.splice(first..past, [(merged_start, merged_end - merged_start)]);
}

/// The coalesced change of one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "update")]
pub enum Update {
    /// The file or directory exists and changed: created, written, or its metadata.
    Changed {
        path: PathBuf,
        file: Option<FileId>,
        created: bool,
        content: Content,
        metadata: bool,
        /// An `fsync` was seen: the writer wants this durable, later also on peers.
        synced: bool,
        sources: Vec<Source>,
        /// The path's version after this change, stamped by the coalescer (empty until
        /// then); see [`crate::sync::book`].
        version: Vector,
    },
    /// The path is gone.
    Removed {
        path: PathBuf,
        dir: bool,
        sources: Vec<Source>,
        /// The deletion's version: for a directory, newer than everything below it.
        version: Vector,
    },
    /// `from` was renamed to `to` (with `exchange`, the two swapped).
    Renamed {
        from: PathBuf,
        to: PathBuf,
        exchange: bool,
        sources: Vec<Source>,
        /// The moved entry's version (for an exchange, of `from`'s new content).
        version: Vector,
    },
    /// `path` became a new name (hard link) of the file at `existing`.
    Linked {
        path: PathBuf,
        existing: PathBuf,
        sources: Vec<Source>,
        version: Vector,
    },
    /// Something changed whose path is unknown, or events were lost: rescan.
    Rescan { sources: Vec<Source> },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(content: &Content) -> Vec<(u64, u64)> {
        match content {
            Content::Ranges(r) => r.clone(),
            other => panic!("expected ranges, got {other:?}"),
        }
    }

    #[test]
    fn adjacent_and_overlapping_ranges_merge() {
        let mut content = Content::Unchanged;
        content.add_range(0, 10);
        content.add_range(10, 5);
        content.add_range(100, 10);
        content.add_range(50, 0);
        content.add_range(5, 20);
        assert_eq!(ranges(&content), vec![(0, 25), (50, 0), (100, 10)]);
        content.add_range(20, 90);
        assert_eq!(ranges(&content), vec![(0, 110)]);
    }

    #[test]
    fn merging_matches_a_byte_map() {
        // Random ranges over a small span, checked against a plain per-byte map.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut content = Content::Unchanged;
        let mut bytes = [false; 512];
        for _ in 0..2000 {
            let offset = next() % 500;
            let len = next() % 12 + 1;
            content.add_range(offset, len);
            for b in &mut bytes[offset as usize..(offset + len) as usize] {
                *b = true;
            }
        }
        let mut expected = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] {
                let start = i;
                while i < bytes.len() && bytes[i] {
                    i += 1;
                }
                expected.push((start as u64, (i - start) as u64));
            } else {
                i += 1;
            }
        }
        assert_eq!(ranges(&content), expected);
    }

    #[test]
    fn unknown_content_absorbs_ranges() {
        let mut content = Content::Unknown;
        content.add_range(0, 10);
        assert_eq!(content, Content::Unknown);
    }
}
