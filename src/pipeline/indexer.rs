//! The indexer actor: applies each coalesced update to the persistent index, re-hashing
//! only the blocks a write touched, and asks the scanner for a rescan when events were lost
//! or an update could not be applied.

use std::error::Error;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use steady_state::*;

use super::update::{Content, Update};
use crate::index::{record_for, FileRecord, Index, IndexError};

/// Why the scanner should walk the tree now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanReason {
    /// Events were lost (a queue overflowed) or a path could not be named.
    LostEvents,
    /// An update could not be applied from its record alone.
    IndexMismatch,
}

/// How many updates one index transaction takes at most.
const BATCH: usize = 1024;

/// Index writes gathered in order; a switch between records and tombstones commits the
/// run before it, so a path removed and created again within one batch ends up present.
#[derive(Default)]
struct Writes {
    records: Vec<(PathBuf, FileRecord)>,
    tombstones: Vec<PathBuf>,
}

impl Writes {
    fn put(&mut self, index: &Index, path: PathBuf, record: FileRecord) -> Result<(), IndexError> {
        if !self.tombstones.is_empty() {
            self.commit(index)?;
        }
        self.records.push((path, record));
        Ok(())
    }

    fn remove(&mut self, index: &Index, path: PathBuf) -> Result<(), IndexError> {
        if !self.records.is_empty() {
            self.commit(index)?;
        }
        self.tombstones.push(path);
        Ok(())
    }

    /// The record `path` has once this batch is committed: one gathered here, none if it
    /// (or a folder above it) was removed here, else the committed one.
    fn previous(&self, index: &Index, path: &Path) -> Result<Option<FileRecord>, IndexError> {
        if let Some((_, record)) = self.records.iter().rev().find(|(p, _)| p == path) {
            return Ok(Some(record.clone()));
        }
        if self.tombstones.iter().any(|gone| path.starts_with(gone)) {
            return Ok(None);
        }
        index.get(path)
    }

    fn commit(&mut self, index: &Index) -> Result<(), IndexError> {
        if !self.records.is_empty() {
            index.put_batch(std::mem::take(&mut self.records))?;
        }
        if !self.tombstones.is_empty() {
            index.tombstone_batch(std::mem::take(&mut self.tombstones), now_ns())?;
        }
        Ok(())
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Applies updates to the index; the pure part of the actor.
pub struct Indexer {
    index: Arc<Index>,
    root: OwnedFd,
}

impl Indexer {
    pub fn new(index: Arc<Index>, root: OwnedFd) -> Self {
        Indexer { index, root }
    }

    /// Applies a batch of updates in order; returns whether a rescan is needed.
    pub fn apply(&self, updates: Vec<Update>) -> Result<Option<ScanReason>, IndexError> {
        let mut writes = Writes::default();
        let mut rescan = None;
        for update in updates {
            tracing::debug!(?update, "index update");
            match update {
                Update::Changed { path, content, .. } => {
                    let dirty = match &content {
                        Content::Unchanged => Some(&[][..]),
                        Content::Ranges(ranges) => Some(ranges.as_slice()),
                        Content::Unknown => None,
                    };
                    let previous = writes.previous(&self.index, &path)?;
                    self.record(&mut writes, path, previous.as_ref(), dirty)?;
                }
                Update::Removed { path, .. } => writes.remove(&self.index, path)?,
                Update::Renamed {
                    from,
                    to,
                    exchange: false,
                    ..
                } => {
                    writes.commit(&self.index)?;
                    self.rename(&mut writes, &from, &to)?;
                }
                Update::Renamed { from, to, .. } => {
                    // Two names swapped files: record both anew from the disk.
                    writes.commit(&self.index)?;
                    for path in [from, to] {
                        self.record(&mut writes, path, None, None)?;
                    }
                    rescan = Some(ScanReason::IndexMismatch);
                }
                Update::Rescan { .. } => rescan = Some(ScanReason::LostEvents),
            }
        }
        writes.commit(&self.index)?;
        Ok(rescan)
    }

    fn record(
        &self,
        writes: &mut Writes,
        path: PathBuf,
        previous: Option<&FileRecord>,
        dirty: Option<&[(u64, u64)]>,
    ) -> Result<(), IndexError> {
        match record_for(self.root.as_fd(), &path, previous, dirty)? {
            Some(record) => writes.put(&self.index, path, record),
            // Gone again before we looked: the removal follows as its own update.
            None => Ok(()),
        }
    }

    /// Moves the records of `from` (and everything below it) to `to`, re-reading only
    /// metadata: the content moved with the name.
    fn rename(&self, writes: &mut Writes, from: &Path, to: &Path) -> Result<(), IndexError> {
        let moved = self.index.subtree(from)?;
        let previous = self.index.get(from)?;
        self.record(writes, to.to_path_buf(), previous.as_ref(), Some(&[]))?;
        for (old, record) in moved {
            if !record.is_live() {
                continue;
            }
            let Ok(below) = old.strip_prefix(from) else {
                continue;
            };
            self.record(writes, to.join(below), Some(&record), Some(&[]))?;
        }
        writes.remove(&self.index, from.to_path_buf())
    }
}

pub async fn run(
    actor: SteadyActorShadow,
    updates: SteadyRx<Update>,
    rescans: SteadyTx<ScanReason>,
    indexer: Arc<Indexer>,
) -> Result<(), Box<dyn Error>> {
    let actor = actor.into_spotlight([&updates], [&rescans]);
    index_updates(actor, updates, rescans, indexer).await
}

async fn index_updates<A: SteadyActor>(
    mut actor: A,
    updates: SteadyRx<Update>,
    rescans: SteadyTx<ScanReason>,
    indexer: Arc<Indexer>,
) -> Result<(), Box<dyn Error>> {
    let mut updates = updates.acquire_guard().await;
    let mut rescans = rescans.acquire_guard().await;
    while actor.is_running(|| updates.is_closed_and_empty() && rescans.mark_closed()) {
        let _ = actor.wait_avail(&mut updates, 1).await;
        let mut batch = Vec::new();
        while batch.len() < BATCH {
            match actor.try_take(&mut updates) {
                Some(update) => batch.push(update),
                None => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let reason = match indexer.apply(batch) {
            Ok(reason) => reason,
            Err(err) => {
                // The disk is the truth: a failed update is repaired by looking again.
                tracing::warn!("index update failed ({err}); rescanning");
                Some(ScanReason::IndexMismatch)
            }
        };
        if let Some(reason) = reason {
            actor
                .send_async(&mut rescans, reason, SendSaturation::AwaitForRoom)
                .await;
        }
    }
    Ok(())
}
