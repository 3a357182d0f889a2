//! The coalescer actor: merges bursts of changes to the same file into one [`Update`],
//! with the written ranges merged. A file's update goes out when it is closed or fsync'd,
//! or once no change has arrived for it within the debounce time. Renames and deletions go
//! out at once, after everything pending before them, so the order of the tree's history is
//! kept.

use std::collections::HashMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use steady_state::*;

use super::update::{Content, Update};
use super::Settled;
use crate::change::{Change, ChangeKind, FileId, Source};
use crate::ignores::{is_ignore_file, Ignores};
use crate::index::Index;
use crate::status::Stats;
use crate::sync::book::Book;
use crate::sync::vector::Vector;

/// The merged state of one path while its burst lasts.
struct Pending {
    file: Option<FileId>,
    created: bool,
    content: Content,
    metadata: bool,
    synced: bool,
    sources: Vec<Source>,
    /// When the first change of the burst arrived (orders the output).
    first: Instant,
    /// When the latest change arrived (the debounce runs from here).
    last: Instant,
}

impl Pending {
    fn into_update(self, path: PathBuf) -> Update {
        Update::Changed {
            path,
            file: self.file,
            created: self.created,
            content: self.content,
            metadata: self.metadata,
            synced: self.synced,
            sources: self.sources,
            version: Vector::default(),
        }
    }
}

/// The coalescing rules, without the actor around them (tested on their own).
pub struct Coalescer {
    debounce: Duration,
    pending: HashMap<PathBuf, Pending>,
}

impl Coalescer {
    pub fn new(debounce: Duration) -> Self {
        Coalescer {
            debounce,
            pending: HashMap::new(),
        }
    }

    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// Takes one change; returns the updates that must go out now, in order.
    pub fn push(&mut self, change: Change, now: Instant) -> Vec<Update> {
        let source = change.source;
        let Some(path) = change.path else {
            // A file without a name (unlinked while open) has nothing left to sync; a name
            // the kernel could not produce (beyond PATH_MAX) is found by the periodic scan.
            return if change.kind == ChangeKind::Rescan {
                self.flush_all_then(Update::Rescan {
                    sources: vec![source],
                })
            } else {
                Vec::new()
            };
        };
        match change.kind {
            ChangeKind::Unlink | ChangeKind::Rmdir => {
                let dir = change.kind == ChangeKind::Rmdir;
                self.forget_under(&path, dir);
                vec![Update::Removed {
                    path,
                    dir,
                    sources: vec![source],
                    version: Vector::default(),
                }]
            }
            ChangeKind::Rename {
                to: Some(to),
                exchange,
            } => self.flush_all_then(Update::Renamed {
                from: path,
                to,
                exchange,
                sources: vec![source],
                version: Vector::default(),
            }),
            // Moved out of the tree: gone as far as the tree is concerned.
            ChangeKind::Rename { to: None, .. } => {
                self.forget_under(&path, true);
                vec![Update::Removed {
                    path,
                    dir: false,
                    sources: vec![source],
                    version: Vector::default(),
                }]
            }
            // A hard link travels as a link, after what is pending for the file it names.
            ChangeKind::Link {
                existing: Some(existing),
            } => self.flush_all_then(Update::Linked {
                path,
                existing,
                sources: vec![source],
                version: Vector::default(),
            }),
            ChangeKind::Rescan => self.flush_all_then(Update::Rescan {
                sources: vec![source],
            }),
            kind => {
                let flush_now = matches!(kind, ChangeKind::Fsync { .. } | ChangeKind::Closed);
                self.merge(&path, change.file, source, kind, now);
                if flush_now {
                    self.take(&path).into_iter().collect()
                } else {
                    Vec::new()
                }
            }
        }
    }

    fn merge(
        &mut self,
        path: &Path,
        file: Option<FileId>,
        source: Source,
        kind: ChangeKind,
        now: Instant,
    ) {
        let pending = self
            .pending
            .entry(path.to_path_buf())
            .or_insert_with(|| Pending {
                file,
                created: false,
                content: Content::Unchanged,
                metadata: false,
                synced: false,
                sources: Vec::new(),
                first: now,
                last: now,
            });
        pending.last = now;
        pending.file = pending.file.or(file);
        if !pending.sources.contains(&source) {
            pending.sources.push(source);
        }
        match kind {
            ChangeKind::Write { offset, len } | ChangeKind::Fallocate { offset, len, .. } => {
                pending.content.add_range(offset, len)
            }
            ChangeKind::Truncate { size } => pending.content.add_range(size, 0),
            ChangeKind::SetAttr(attr) => {
                if let Some(size) = attr.size {
                    pending.content.add_range(size, 0);
                }
                let times = attr.atime.is_some() || attr.mtime.is_some();
                if attr.mode.is_some() || attr.uid.is_some() || attr.gid.is_some() || times {
                    pending.metadata = true;
                }
                // A watcher that cannot tell which attribute changed reports an empty set.
                if attr == Default::default() {
                    pending.metadata = true;
                }
            }
            ChangeKind::SetXattr { .. } | ChangeKind::RemoveXattr { .. } => pending.metadata = true,
            ChangeKind::Modified => pending.content = Content::Unknown,
            ChangeKind::Create
            | ChangeKind::Mkdir
            | ChangeKind::Mknod { .. }
            | ChangeKind::Symlink { .. }
            | ChangeKind::Link { .. } => pending.created = true,
            ChangeKind::Fsync { .. } => pending.synced = true,
            ChangeKind::Closed
            | ChangeKind::Unlink
            | ChangeKind::Rmdir
            | ChangeKind::Rename { .. }
            | ChangeKind::Rescan => {}
        }
    }

    fn take(&mut self, path: &Path) -> Option<Update> {
        self.pending
            .remove(path)
            .map(|pending| pending.into_update(path.to_path_buf()))
    }

    /// Drops what is pending for `path` (and, for a directory, below it): it is gone.
    fn forget_under(&mut self, path: &Path, dir: bool) {
        self.pending
            .retain(|pending, _| !(pending == path || dir && pending.starts_with(path)));
    }

    fn flush_all_then(&mut self, last: Update) -> Vec<Update> {
        let mut updates = self.drain_all();
        updates.push(last);
        updates
    }

    /// Everything pending, oldest burst first.
    pub fn drain_all(&mut self) -> Vec<Update> {
        let mut pending: Vec<_> = self.pending.drain().collect();
        pending.sort_by_key(|(_, p)| p.first);
        pending
            .into_iter()
            .map(|(path, p)| p.into_update(path))
            .collect()
    }

    /// The updates whose debounce has run out, oldest burst first.
    pub fn due(&mut self, now: Instant) -> Vec<Update> {
        let debounce = self.debounce;
        let mut due: Vec<PathBuf> = self
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.last) >= debounce)
            .map(|(path, _)| path.clone())
            .collect();
        due.sort_by_key(|path| self.pending.get(path).map(|p| p.first));
        due.iter().filter_map(|path| self.take(path)).collect()
    }

    /// How long until the next pending update is due.
    pub fn next_due(&self, now: Instant) -> Option<Duration> {
        self.pending
            .values()
            .map(|p| (p.last + self.debounce).saturating_duration_since(now))
            .min()
    }
}

/// What the coalescer works with besides its channels.
pub struct CoalescerSetup {
    pub debounce: Duration,
    pub settled: Arc<Settled>,
    pub ignores: Arc<Ignores>,
    pub stats: Arc<Stats>,
    /// Where local changes get their versions, when the folder is shared with peers.
    pub versions: Option<(Arc<Book>, Arc<Index>)>,
}

/// Gives `update` its version: one past what this node knows of the path (for a
/// folder's deletion, of everything below it; for a rename, of both names).
fn stamp(book: &Book, index: &Index, update: &mut Update) {
    let known = |path: &Path, tree: bool| {
        let found = match tree {
            true => book.current_tree(index, path),
            false => book.current(index, path),
        };
        found.unwrap_or_else(|err| {
            tracing::warn!("cannot read the version of {path:?}, starting it anew: {err}");
            Vector::default()
        })
    };
    match update {
        Update::Changed { path, version, .. } | Update::Linked { path, version, .. } => {
            *version = book.stamp_on(path, &known(path, false));
        }
        Update::Removed {
            path, dir, version, ..
        } => *version = book.stamp_on(path, &known(path, *dir)),
        Update::Renamed {
            from, to, version, ..
        } => {
            let base = known(from, false).merged(&known(to, false));
            *version = book.stamp_on(to, &base);
            book.note(from, version);
        }
        Update::Rescan { .. } => {}
    }
}

/// The actor: changes from every capture source in, updates out.
pub async fn run(
    actor: SteadyActorShadow,
    changes: SteadyRx<Change>,
    updates: SteadyTx<Update>,
    replica: Option<SteadyTx<Update>>,
    setup: Arc<CoalescerSetup>,
) -> Result<(), Box<dyn Error>> {
    match replica {
        Some(replica) => {
            let actor = actor.into_spotlight([&changes], [&updates, &replica]);
            coalesce(actor, changes, updates, Some(replica), &setup).await
        }
        None => {
            let actor = actor.into_spotlight([&changes], [&updates]);
            coalesce(actor, changes, updates, None, &setup).await
        }
    }
}

/// Coalesces changes into updates for the indexer and, with peers, for replication too.
async fn coalesce<A: SteadyActor>(
    mut actor: A,
    changes: SteadyRx<Change>,
    updates: SteadyTx<Update>,
    replica: Option<SteadyTx<Update>>,
    setup: &CoalescerSetup,
) -> Result<(), Box<dyn Error>> {
    let CoalescerSetup {
        debounce,
        settled,
        ignores,
        stats,
        versions,
    } = setup;
    let debounce = *debounce;
    let mut changes = changes.acquire_guard().await;
    let mut updates = updates.acquire_guard().await;
    let mut replica = match &replica {
        Some(replica) => Some(replica.acquire_guard().await),
        None => None,
    };
    let mut coalescer = Coalescer::new(debounce);
    // With nothing pending, wake now and then anyway to take part in shutdown.
    let idle_wait = Duration::from_millis(100);
    while actor.is_running(|| {
        changes.is_closed_and_empty()
            && coalescer.is_idle()
            && updates.mark_closed()
            && replica.as_mut().is_none_or(|replica| replica.mark_closed())
    }) {
        if actor.avail_units(&mut changes) == 0 {
            let wait = coalescer.next_due(Instant::now()).unwrap_or(idle_wait);
            let _woken =
                await_for_any!(actor.wait_avail(&mut changes, 1), actor.wait_timeout(wait));
        }
        stats.beat();
        let mut out = Vec::new();
        while let Some(change) = actor.try_take(&mut changes) {
            stats.count_captured(change.source);
            out.extend(coalescer.push(change, Instant::now()));
        }
        if changes.is_closed_and_empty() {
            out.extend(coalescer.drain_all());
        } else {
            out.extend(coalescer.due(Instant::now()));
        }
        settled.set_coalescer_idle(coalescer.is_idle() && actor.avail_units(&mut changes) == 0);
        for mut update in out.into_iter().flat_map(|update| admit(ignores, update)) {
            if let Some((book, index)) = versions {
                stamp(book, index, &mut update);
            }
            if let Some(replica) = replica.as_mut() {
                actor
                    .send_async(replica, update.clone(), SendSaturation::AwaitForRoom)
                    .await;
            }
            actor
                .send_async(&mut updates, update, SendSaturation::AwaitForRoom)
                .await;
        }
    }
    Ok(())
}

/// What of `update` passes the ignore rules: nothing when it touches only ignored paths; a
/// removal when something moved into an ignored name; a rescan when something moved out
/// of one (its content is unknown). A change of the ignore file itself reloads the rules
/// and is followed by a rescan, which finds what they no longer ignore.
fn admit(ignores: &Ignores, update: Update) -> Vec<Update> {
    let rules_changed = match &update {
        Update::Changed { path, .. } | Update::Removed { path, .. } => is_ignore_file(path),
        Update::Renamed { from, to, .. } => is_ignore_file(from) || is_ignore_file(to),
        Update::Linked { path, .. } => is_ignore_file(path),
        Update::Rescan { .. } => false,
    };
    if rules_changed {
        ignores.reload();
        let sources = match &update {
            Update::Changed { sources, .. }
            | Update::Removed { sources, .. }
            | Update::Renamed { sources, .. }
            | Update::Linked { sources, .. }
            | Update::Rescan { sources } => sources.clone(),
        };
        return vec![update, Update::Rescan { sources }];
    }
    let admitted = match update {
        Update::Changed { ref path, .. } if ignores.is_ignored_on_disk(path) => None,
        Update::Removed { ref path, dir, .. } if ignores.is_ignored(path, dir) => None,
        Update::Renamed {
            from,
            to,
            exchange,
            sources,
            version,
        } => match (
            ignores.is_ignored_on_disk(&from),
            ignores.is_ignored_on_disk(&to),
        ) {
            (false, false) => Some(Update::Renamed {
                from,
                to,
                exchange,
                sources,
                version,
            }),
            (true, true) => None,
            (false, true) if !exchange => Some(Update::Removed {
                dir: ignores.is_dir_on_disk(&to),
                path: from,
                sources,
                version,
            }),
            _ => Some(Update::Rescan { sources }),
        },
        Update::Linked {
            path,
            existing,
            sources,
            version,
        } => match (
            ignores.is_ignored_on_disk(&path),
            ignores.is_ignored_on_disk(&existing),
        ) {
            (false, false) => Some(Update::Linked {
                path,
                existing,
                sources,
                version,
            }),
            (true, _) => None,
            (false, true) => Some(Update::Changed {
                path,
                file: None,
                created: true,
                content: Content::Unknown,
                metadata: true,
                synced: false,
                sources,
                version,
            }),
        },
        other => Some(other),
    };
    admitted.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::AttrChange;

    fn change(path: &str, kind: ChangeKind) -> Change {
        Change {
            path: Some(PathBuf::from(path)),
            file: None,
            kind,
            source: Source::Fuse,
            pid: None,
        }
    }

    fn write(path: &str, offset: u64, len: u64) -> Change {
        change(path, ChangeKind::Write { offset, len })
    }

    #[test]
    fn a_burst_of_writes_becomes_one_update_with_merged_ranges() {
        let start = Instant::now();
        let mut coalescer = Coalescer::new(Duration::from_millis(1));
        for i in 0..100 {
            assert!(coalescer.push(write("a", i * 10, 10), start).is_empty());
        }
        assert!(coalescer.push(write("a", 5000, 1), start).is_empty());
        assert!(
            coalescer.due(start).is_empty(),
            "not due before the debounce"
        );
        let updates = coalescer.due(start + Duration::from_millis(1));
        assert_eq!(updates.len(), 1);
        match &updates[0] {
            Update::Changed { path, content, .. } => {
                assert_eq!(path, Path::new("a"));
                assert_eq!(content, &Content::Ranges(vec![(0, 1000), (5000, 1)]));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(coalescer.is_idle());
    }

    #[test]
    fn close_and_fsync_flush_at_once() {
        let now = Instant::now();
        let mut coalescer = Coalescer::new(Duration::from_secs(60));
        coalescer.push(write("a", 0, 1), now);
        let updates = coalescer.push(change("a", ChangeKind::Closed), now);
        assert_eq!(updates.len(), 1);
        coalescer.push(write("b", 0, 1), now);
        let updates = coalescer.push(change("b", ChangeKind::Fsync { datasync: true }), now);
        assert!(matches!(
            updates.as_slice(),
            [Update::Changed { synced: true, .. }]
        ));
    }

    #[test]
    fn renames_flush_what_came_before_in_order() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_micros(10);
        let mut coalescer = Coalescer::new(Duration::from_secs(60));
        coalescer.push(change("d", ChangeKind::Mkdir), t0);
        coalescer.push(write("d/f", 0, 3), t1);
        let rename = ChangeKind::Rename {
            to: Some(PathBuf::from("e")),
            exchange: false,
        };
        let updates = coalescer.push(change("d", rename), t1);
        let paths: Vec<String> = updates
            .iter()
            .map(|u| match u {
                Update::Changed { path, .. } => path.display().to_string(),
                Update::Renamed { from, to, .. } => format!("{}->{}", from.display(), to.display()),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(paths, ["d", "d/f", "d->e"]);
    }

    #[test]
    fn deleting_drops_what_was_pending_below() {
        let now = Instant::now();
        let mut coalescer = Coalescer::new(Duration::from_secs(60));
        coalescer.push(write("d/f", 0, 3), now);
        coalescer.push(write("other", 0, 3), now);
        let updates = coalescer.push(change("d", ChangeKind::Rmdir), now);
        assert!(matches!(
            updates.as_slice(),
            [Update::Removed { dir: true, .. }]
        ));
        let rest = coalescer.drain_all();
        assert_eq!(rest.len(), 1, "only 'other' is left: {rest:?}");
    }

    #[test]
    fn the_same_write_seen_twice_is_reported_once() {
        let now = Instant::now();
        let mut coalescer = Coalescer::new(Duration::from_millis(1));
        coalescer.push(write("a", 0, 4096), now);
        let mut echo = change("a", ChangeKind::Modified);
        echo.source = Source::Inotify;
        coalescer.push(echo, now);
        let updates = coalescer.drain_all();
        assert_eq!(updates.len(), 1);
    }

    #[test]
    fn attributes_and_truncation_are_kept_apart_from_content() {
        let now = Instant::now();
        let mut coalescer = Coalescer::new(Duration::from_millis(1));
        let chmod = AttrChange {
            mode: Some(0o600),
            ..AttrChange::default()
        };
        coalescer.push(change("a", ChangeKind::SetAttr(chmod)), now);
        coalescer.push(change("b", ChangeKind::Truncate { size: 7 }), now);
        let updates = coalescer.drain_all();
        assert!(updates.iter().any(|u| matches!(u,
            Update::Changed { path, metadata: true, content: Content::Unchanged, .. } if path == Path::new("a"))));
        assert!(updates.iter().any(|u| matches!(u,
            Update::Changed { content: Content::Ranges(r), .. } if r == &vec![(7, 0)])));
    }

    #[test]
    fn a_lost_event_asks_for_a_rescan_after_flushing() {
        let now = Instant::now();
        let mut coalescer = Coalescer::new(Duration::from_secs(60));
        coalescer.push(write("a", 0, 1), now);
        let lost = Change {
            path: None,
            file: None,
            kind: ChangeKind::Rescan,
            source: Source::Ebpf,
            pid: None,
        };
        let updates = coalescer.push(lost, now);
        assert!(matches!(
            updates.as_slice(),
            [Update::Changed { .. }, Update::Rescan { .. }]
        ));
    }
}
