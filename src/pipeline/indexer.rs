//! The indexer actor: applies each coalesced update to the persistent index, re-hashing
//! only the blocks a write touched, and asks the scanner for a rescan when events were lost
//! or an update could not be applied.

use std::collections::HashMap;
use std::error::Error;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use steady_state::*;

use super::update::{Content, Update};
use super::Settled;
use crate::index::{record_for, FileRecord, Index, IndexError};
use crate::sync::merge::Bases;
use crate::sync::vector::Vector;

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

/// How long a file must go without new writes before its blocks are re-hashed. The exact
/// written ranges already travel with each update; the block hashes only record what the
/// file now holds, and re-hashing a 128 KiB block for every small random write of a busy
/// file would take a core from the programs writing it.
pub const HASH_QUIET: Duration = Duration::from_millis(250);

/// Content updates of files still being written, held until the file goes quiet, is
/// fsync'd, or its name changes.
#[derive(Default)]
pub struct Deferred {
    files: HashMap<PathBuf, (Update, Instant)>,
}

impl Deferred {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Splits a batch into the updates to apply now, in order, and the ones that can wait.
    pub fn sort(&mut self, updates: Vec<Update>, now: Instant) -> Vec<Update> {
        let mut ready = Vec::new();
        for update in updates {
            match update {
                Update::Changed {
                    ref path,
                    ref content,
                    synced: false,
                    ..
                } if *content != Content::Unchanged => {
                    let path = path.clone();
                    match self.files.remove(&path) {
                        Some((mut held, _)) => {
                            merge_changed(&mut held, update);
                            self.files.insert(path, (held, now));
                        }
                        None => {
                            self.files.insert(path, (update, now));
                        }
                    }
                }
                Update::Changed { ref path, .. } => {
                    // What is held for the file goes out with this update, which must not
                    // overtake it.
                    match self.files.remove(path) {
                        Some((mut held, _)) => {
                            merge_changed(&mut held, update);
                            ready.push(held);
                        }
                        None => ready.push(update),
                    }
                }
                Update::Removed { ref path, .. } => {
                    self.files.retain(|held, _| !held.starts_with(path));
                    ready.push(update);
                }
                Update::Renamed {
                    ref from, ref to, ..
                } => {
                    ready.extend(self.take_under(from));
                    ready.extend(self.take_under(to));
                    ready.push(update);
                }
                Update::Linked { .. } | Update::Rescan { .. } => ready.push(update),
            }
        }
        ready
    }

    fn take_under(&mut self, dir: &Path) -> Vec<Update> {
        let paths: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|held| held.starts_with(dir))
            .cloned()
            .collect();
        paths
            .iter()
            .filter_map(|path| self.files.remove(path).map(|(update, _)| update))
            .collect()
    }

    /// The held updates of files quiet for [`HASH_QUIET`].
    pub fn quiet(&mut self, now: Instant) -> Vec<Update> {
        let quiet: Vec<PathBuf> = self
            .files
            .iter()
            .filter(|(_, (_, last))| now.duration_since(*last) >= HASH_QUIET)
            .map(|(path, _)| path.clone())
            .collect();
        quiet
            .iter()
            .filter_map(|path| self.files.remove(path).map(|(update, _)| update))
            .collect()
    }

    /// Everything held (at shutdown).
    pub fn drain(&mut self) -> Vec<Update> {
        self.files.drain().map(|(_, (update, _))| update).collect()
    }

    /// How long until the next held update is due.
    pub fn next_due(&self, now: Instant) -> Option<Duration> {
        self.files
            .values()
            .map(|(_, last)| (*last + HASH_QUIET).saturating_duration_since(now))
            .min()
    }
}

/// Folds a later `Changed` update of the same file into `held`.
fn merge_changed(held: &mut Update, later: Update) {
    if let (
        Update::Changed {
            content,
            created,
            metadata,
            synced,
            sources,
            file,
            ..
        },
        Update::Changed {
            content: later_content,
            created: later_created,
            metadata: later_metadata,
            synced: later_synced,
            sources: later_sources,
            file: later_file,
            ..
        },
    ) = (held, later)
    {
        content.merge(later_content);
        *created |= later_created;
        *metadata |= later_metadata;
        *synced |= later_synced;
        *file = file.or(later_file);
        for source in later_sources {
            if !sources.contains(&source) {
                sources.push(source);
            }
        }
    }
}

/// Index writes gathered in order; a switch between records and tombstones commits the
/// run before it, so a path removed and created again within one batch ends up present.
#[derive(Default)]
struct Writes {
    records: Vec<(PathBuf, FileRecord)>,
    tombstones: Vec<PathBuf>,
    /// Version vectors, stored after the records they describe (a crash in between
    /// leaves an older vector, which the next local change moves past anyway).
    vectors: Vec<(PathBuf, Vector)>,
    /// Renames, so a peer's change to an old name follows it (see [`Index::moved_to`]).
    moves: Vec<(PathBuf, PathBuf)>,
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
        let mut vectors = std::mem::take(&mut self.vectors);
        if !self.records.is_empty() {
            // Vectors ride with the records' transaction: one fsync for both.
            let records = std::mem::take(&mut self.records);
            let with_records = match self.tombstones.is_empty() {
                true => std::mem::take(&mut vectors),
                false => Vec::new(),
            };
            index.put_batch_with_vectors(records, with_records)?;
        }
        if !self.tombstones.is_empty() {
            index.tombstone_batch(std::mem::take(&mut self.tombstones), now_ns())?;
        }
        index.put_vectors(vectors)?;
        index.put_moves(std::mem::take(&mut self.moves))
    }

    /// Notes `path`'s version; an empty vector (a folder not shared) is not stored.
    fn version(&mut self, path: &Path, version: &Vector) {
        if !version.is_empty() {
            self.vectors.push((path.to_path_buf(), version.clone()));
        }
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
    /// Where the versions this node makes of small text files are kept as merge bases
    /// (`conflicts=merge` only).
    bases: Option<Arc<Bases>>,
}

impl Indexer {
    pub fn new(index: Arc<Index>, root: OwnedFd) -> Self {
        Indexer {
            index,
            root,
            bases: None,
        }
    }

    /// Keeps each version this node makes of a small text file in `bases`.
    pub fn keeping_merge_bases(mut self, bases: Arc<Bases>) -> Self {
        self.bases = Some(bases);
        self
    }

    /// Applies a batch of updates in order; returns whether a rescan is needed.
    pub fn apply(&self, updates: Vec<Update>) -> Result<Option<ScanReason>, IndexError> {
        let mut writes = Writes::default();
        let mut rescan = None;
        let mut made = Vec::new();
        for update in updates {
            tracing::debug!(?update, "index update");
            match update {
                Update::Changed {
                    path,
                    content,
                    version,
                    ..
                } => {
                    writes.version(&path, &version);
                    if self.bases.is_some() {
                        made.push((path.clone(), version));
                    }
                    let dirty = match &content {
                        Content::Unchanged => Some(&[][..]),
                        Content::Ranges(ranges) => Some(ranges.as_slice()),
                        Content::Unknown => None,
                    };
                    let previous = writes.previous(&self.index, &path)?;
                    self.record(&mut writes, path, previous.as_ref(), dirty)?;
                }
                Update::Removed {
                    path, dir, version, ..
                } => {
                    if dir && !version.is_empty() {
                        for (below, _) in self.index.subtree(&path)? {
                            writes.version(&below, &version);
                        }
                    }
                    writes.version(&path, &version);
                    writes.remove(&self.index, path)?
                }
                Update::Renamed {
                    from,
                    to,
                    exchange: false,
                    version,
                    ..
                } => {
                    writes.commit(&self.index)?;
                    writes.version(&from, &version);
                    writes.version(&to, &version);
                    writes.moves.push((from.clone(), to.clone()));
                    self.rename(&mut writes, &from, &to)?;
                }
                Update::Renamed {
                    from, to, version, ..
                } => {
                    // Two names swapped files: record both anew from the disk.
                    writes.commit(&self.index)?;
                    writes.version(&from, &version);
                    writes.version(&to, &version);
                    for path in [from, to] {
                        self.record(&mut writes, path, None, None)?;
                    }
                    rescan = Some(ScanReason::IndexMismatch);
                }
                Update::Linked { path, version, .. } => {
                    writes.version(&path, &version);
                    let previous = writes.previous(&self.index, &path)?;
                    self.record(&mut writes, path, previous.as_ref(), Some(&[]))?;
                }
                Update::Rescan { .. } => rescan = Some(ScanReason::LostEvents),
            }
        }
        writes.commit(&self.index)?;
        if let Some(bases) = &self.bases {
            for (path, version) in made {
                if let Err(err) = bases.keep_from(self.root.as_fd(), &path, &version) {
                    tracing::debug!(?path, "not kept as a merge base: {err}");
                }
            }
        }
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
            if let Some(vector) = self.index.vector(&old)? {
                writes.version(&to.join(below), &vector);
            }
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
    settled: Arc<Settled>,
) -> Result<(), Box<dyn Error>> {
    let actor = actor.into_spotlight([&updates], [&rescans]);
    index_updates(actor, updates, rescans, indexer, settled).await
}

async fn index_updates<A: SteadyActor>(
    mut actor: A,
    updates: SteadyRx<Update>,
    rescans: SteadyTx<ScanReason>,
    indexer: Arc<Indexer>,
    settled: Arc<Settled>,
) -> Result<(), Box<dyn Error>> {
    let mut updates = updates.acquire_guard().await;
    let mut rescans = rescans.acquire_guard().await;
    let mut deferred = Deferred::default();
    // With nothing held, wake now and then anyway to take part in shutdown.
    let idle_wait = Duration::from_millis(100);
    while actor.is_running(|| {
        updates.is_closed_and_empty() && deferred.is_empty() && rescans.mark_closed()
    }) {
        if actor.avail_units(&mut updates) == 0 {
            let wait = deferred.next_due(Instant::now()).unwrap_or(idle_wait);
            let _woken =
                await_for_any!(actor.wait_avail(&mut updates, 1), actor.wait_timeout(wait));
        }
        let mut taken = Vec::new();
        while taken.len() < BATCH {
            match actor.try_take(&mut updates) {
                Some(update) => taken.push(update),
                None => break,
            }
        }
        let now = Instant::now();
        let mut batch = deferred.sort(taken, now);
        if updates.is_closed_and_empty() {
            batch.extend(deferred.drain());
        } else {
            batch.extend(deferred.quiet(now));
        }
        if batch.is_empty() {
            settled.set_indexer_idle(deferred.is_empty() && actor.avail_units(&mut updates) == 0);
            continue;
        }
        settled.set_indexer_idle(false);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn written(path: &str, offset: u64, len: u64) -> Update {
        Update::Changed {
            path: PathBuf::from(path),
            file: None,
            created: false,
            content: Content::Ranges(vec![(offset, len)]),
            metadata: false,
            synced: false,
            sources: Vec::new(),
            version: Default::default(),
        }
    }

    #[test]
    fn writes_wait_until_the_file_is_quiet_and_come_out_merged() {
        let start = Instant::now();
        let mut deferred = Deferred::default();
        assert!(deferred.sort(vec![written("f", 0, 10)], start).is_empty());
        let later = start + HASH_QUIET / 2;
        assert!(deferred.sort(vec![written("f", 100, 10)], later).is_empty());
        assert!(deferred.quiet(start + HASH_QUIET).is_empty(), "still busy");
        let out = deferred.quiet(later + HASH_QUIET);
        assert!(matches!(out.as_slice(),
            [Update::Changed { content: Content::Ranges(r), .. }] if r == &vec![(0, 10), (100, 10)]));
        assert!(deferred.is_empty());
    }

    #[test]
    fn fsync_metadata_removal_and_rename_do_not_wait() {
        let now = Instant::now();
        let mut deferred = Deferred::default();
        deferred.sort(vec![written("a", 0, 1), written("d/b", 0, 1)], now);
        let mut synced = written("a", 5, 1);
        if let Update::Changed { synced: flag, .. } = &mut synced {
            *flag = true;
        }
        let out = deferred.sort(vec![synced], now);
        assert!(matches!(out.as_slice(),
            [Update::Changed { content: Content::Ranges(r), synced: true, .. }] if r == &vec![(0, 1), (5, 1)]));
        let rename = Update::Renamed {
            from: PathBuf::from("d"),
            to: PathBuf::from("e"),
            exchange: false,
            sources: Vec::new(),
            version: Default::default(),
        };
        let out = deferred.sort(vec![rename], now);
        assert_eq!(
            out.len(),
            2,
            "the held write to d/b goes before the rename: {out:?}"
        );
        assert!(deferred.is_empty());
    }

    #[test]
    fn a_removed_file_drops_what_was_held() {
        let now = Instant::now();
        let mut deferred = Deferred::default();
        deferred.sort(vec![written("d/x", 0, 1)], now);
        let removed = Update::Removed {
            path: PathBuf::from("d"),
            dir: true,
            sources: Vec::new(),
            version: Default::default(),
        };
        assert_eq!(deferred.sort(vec![removed], now).len(), 1);
        assert!(deferred.is_empty());
    }
}
