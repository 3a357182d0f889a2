//! What the coalescer hands on: one [`Update`] per file per burst, with the written byte
//! ranges merged.

use std::path::PathBuf;

use serde::Serialize;

use crate::change::{FileId, Source};

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

fn merge_range(ranges: &mut Vec<(u64, u64)>, offset: u64, len: u64) {
    let mut start = offset;
    let mut end = offset.saturating_add(len);
    // Keep ranges that neither overlap nor touch; absorb the others into [start, end).
    ranges.retain(|&(o, l)| {
        let e = o.saturating_add(l);
        let separate = e < start || o > end;
        if !separate {
            start = start.min(o);
            end = end.max(e);
        }
        separate
    });
    let at = ranges.partition_point(|&(o, _)| o < start);
    ranges.insert(at, (start, end - start));
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
    },
    /// The path is gone.
    Removed {
        path: PathBuf,
        dir: bool,
        sources: Vec<Source>,
    },
    /// `from` was renamed to `to` (with `exchange`, the two swapped).
    Renamed {
        from: PathBuf,
        to: PathBuf,
        exchange: bool,
        sources: Vec<Source>,
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
    fn unknown_content_absorbs_ranges() {
        let mut content = Content::Unknown;
        content.add_range(0, 10);
        assert_eq!(content, Content::Unknown);
    }
}
