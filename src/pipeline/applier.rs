//! The applier actor: applies verified changes from peers to the backing folder, crash-safely
//! (see [`crate::sync::apply`]), acknowledges them once durable, shows them in the mount at
//! once (cache invalidation), and drives the receiving side of catch-up: it compares the
//! sender's directory digests and listings with the local index and asks for what differs.

use std::collections::{HashMap, HashSet};
use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use steady_state::*;

use super::session::{Incoming, Reply};
use super::verifier::Checked;
use crate::change::{Change as LocalChange, ChangeKind, ChangeSink, Source};
use crate::identity::NodeId;
use crate::ignores::{Ignores, IGNORE_FILE};
use crate::index::Index;
use crate::index::BLOCK_SIZE;
use crate::progress::TransferLog;
use crate::status::Stats;
use crate::sync::apply::{Applier, ApplyError};
use crate::sync::book::Book;
use crate::sync::compress::raw_payload;
use crate::sync::conflict::{self, Local, Rules, Verdict};
use crate::sync::digest;
use crate::sync::local::LocalChanges;
use crate::sync::merge::{self, Bases, MAX_MERGED};
use crate::sync::proto::{
    Change, DirDigest, Entry, EntryKind, FileData, Message, Meta, Op, RelPath, Vector, Want,
};
use crate::sync::vector::Order;

/// Catch-up with one peer, while its listings arrive.
#[derive(Default)]
struct CatchUp {
    /// Listings asked for and not yet received.
    dirs_pending: usize,
    wants: Vec<Want>,
    /// How many of `wants` are files, and their bytes, as the peer's listings give them.
    wanted_files: u64,
    wanted_bytes: u64,
    started: Option<Instant>,
}

/// What the applier works with.
pub struct Receiving {
    pub applier: Applier,
    pub index: Arc<Index>,
    /// Where applied paths are reported so the mount's caches drop them.
    pub invalidate: Arc<dyn ChangeSink>,
    /// Whether this node only mirrors (`mode=receiveonly`): then files the sender lacks are
    /// removed during catch-up.
    pub mirror: bool,
    catch_up: HashMap<NodeId, CatchUp>,
    /// Files changing live (path, when their last piece or range came): catch-up does not
    /// ask for these while they keep arriving (the file may be half written, and a whole
    /// copy would race with its live changes); a quiet one is compared again later.
    arriving: HashMap<RelPath, Instant>,
    /// Files asked for again after a change could not be applied, and when.
    asked: HashMap<RelPath, Instant>,
    /// Changes made here behind the mount's back (on a receive-only node).
    local: Arc<LocalChanges>,
    /// `filesync revert` requests, each with where to send the one-line answer.
    reverts: crossbeam_channel::Receiver<crossbeam_channel::Sender<String>>,
    /// This node's ignore rules: what they match is not taken from peers.
    ignores: Arc<Ignores>,
    /// Files arriving from peers, logged with the progress of catch-ups.
    arrivals: TransferLog,
    /// Where a change that cannot be applied is recorded as the mount's last error, so
    /// `filesync status` shows it and not only the log.
    stats: Option<Arc<Stats>>,
    /// Version vectors, when peers' changes are judged by them (not on a mirror).
    versions: Option<Versioning>,
}

/// What judging changes by their versions takes (see [`crate::sync::conflict`]).
struct Versioning {
    book: Arc<Book>,
    /// Where conflict copies are reported as local changes.
    capture: Arc<dyn ChangeSink>,
    /// The version of each path whose change is being applied piece by piece; its later
    /// pieces carry the same version.
    applying: HashMap<RelPath, (Vector, Instant)>,
    /// `applying` is pruned when it reaches this size (twice what the last pruning left,
    /// and at least [`APPLYING_PRUNE_FROM`]), so a catch-up of many files does not scan
    /// it for every piece.
    applying_prune_at: usize,
    /// Told of every applied change, so the session relays it to the other peers.
    settled: Arc<super::Settled>,
    rules: Rules,
    /// The merge bases, under `conflicts=merge`.
    bases: Option<Arc<Bases>>,
}

/// The kind of a change's operation, for logs.
fn op_name(op: &Op) -> &'static str {
    match op {
        Op::File { data, .. } => match data {
            FileData::Whole { .. } => "file (whole)",
            FileData::Ranges(ranges) if ranges.is_empty() => "file (size only)",
            FileData::Ranges(_) => "file (ranges)",
            FileData::Delta { .. } => "file (delta)",
            FileData::Unchanged => "file (metadata)",
        },
        Op::Dir { .. } => "dir",
        Op::Symlink { .. } => "symlink",
        Op::Special { .. } => "special",
        Op::Link { .. } => "link",
        Op::Remove => "remove",
        Op::Rename { .. } => "rename",
    }
}

/// What became of a three-way merge.
enum Merged {
    /// The merged file is in place.
    Done,
    /// The peer's version came as a patch: it is asked for whole first.
    NeedsWhole,
    /// Not text, no common base, or both sides changed the same lines.
    Impossible,
}

/// The most conflict copies of one path, writer and second told apart by a counter.
const MAX_COPY_COUNTER: u32 = 100;
/// How long the pieces of one change may take to arrive before a repeat of its version
/// counts as a duplicate.
const PIECES_WITHIN: Duration = Duration::from_secs(300);
/// `Versioning::applying` is pruned of old entries past this size.
const APPLYING_PRUNE_FROM: usize = 4096;

/// What this node's ignore rules make of an incoming change.
enum Admission {
    /// Nothing it touches is ignored.
    Apply,
    /// Everything it touches is ignored.
    Drop,
    /// A rename into an ignored name: here the source is simply gone.
    RemoveSource,
    /// A rename or link out of an ignored name: the new name's content is needed whole.
    FetchTarget(RelPath),
}

/// From this many files waiting in the applier's batch, it lingers for more (see `apply`).
const LINGER_FROM: usize = 32;
/// How long it lingers for the next file of a bulk transfer.
const LINGER: Duration = Duration::from_millis(3);

/// How often versions past their keeping time are dropped (also at start).
const EXPIRE_VERSIONS_EVERY: Duration = Duration::from_secs(3600);

/// How long the applier waits for the next change before committing those it applied
/// (see `apply`): about what the next small file takes to come in a steady stream.
const GROUP_WAIT: Duration = Duration::from_millis(2);
/// The longest a group of applied changes waits for its commit (and acknowledgement).
const GROUP_AT_MOST: Duration = Duration::from_millis(25);

/// How long a whole-file transfer may pause before catch-up asks for the file anew.
const STALLED: Duration = Duration::from_secs(15);

impl Receiving {
    pub fn new(
        applier: Applier,
        index: Arc<Index>,
        invalidate: Arc<dyn ChangeSink>,
        mirror: bool,
        local: Arc<LocalChanges>,
        reverts: crossbeam_channel::Receiver<crossbeam_channel::Sender<String>>,
        ignores: Arc<Ignores>,
    ) -> Receiving {
        Receiving {
            applier,
            index,
            invalidate,
            mirror,
            catch_up: HashMap::new(),
            arriving: HashMap::new(),
            asked: HashMap::new(),
            local,
            reverts,
            ignores,
            stats: None,
            versions: None,
            arrivals: TransferLog::default(),
        }
    }

    /// Judges peers' changes by their version vectors (`book`), reporting the conflict
    /// copies it makes to `capture`. A mirror applies what its sender sends regardless.
    /// `settled` hears of every applied change, so that the session relays it; `bases`
    /// (under `conflicts=merge`) keeps what it applies for three-way merges.
    pub fn keeping_versions_in(
        mut self,
        book: Arc<Book>,
        capture: Arc<dyn ChangeSink>,
        settled: Arc<super::Settled>,
        rules: Rules,
        bases: Option<Arc<Bases>>,
    ) -> Self {
        self.versions = Some(Versioning {
            book,
            capture,
            applying: HashMap::new(),
            applying_prune_at: APPLYING_PRUNE_FROM,
            settled,
            rules,
            bases,
        });
        self
    }

    /// Records changes that cannot be applied as the mount's last error in `stats`.
    pub fn reporting_to(mut self, stats: Arc<Stats>) -> Receiving {
        self.stats = Some(stats);
        self
    }
}

pub async fn run(
    actor: SteadyActorShadow,
    checked: SteadyRx<Checked>,
    replies: SteadyTx<Reply>,
    receiving: Arc<Mutex<Receiving>>,
) -> Result<(), Box<dyn Error>> {
    let actor = actor.into_spotlight([&checked], [&replies]);
    apply(actor, checked, replies, receiving).await
}

// The state sits in a mutex only so a restarted actor finds it again; this actor alone
// locks it, on its own thread, so holding it across awaits blocks no one.
#[allow(clippy::await_holding_lock)]
async fn apply<A: SteadyActor>(
    mut actor: A,
    checked: SteadyRx<Checked>,
    replies: SteadyTx<Reply>,
    receiving: Arc<Mutex<Receiving>>,
) -> Result<(), Box<dyn Error>> {
    let mut checked = checked.acquire_guard().await;
    let mut replies = replies.acquire_guard().await;
    let mut receiving = receiving.lock();
    let idle_wait = Duration::from_millis(100);
    let mut versions_expired = Instant::now();
    // One acknowledgement per peer per commit: the highest change made durable.
    let mut acks: HashMap<NodeId, u64> = HashMap::new();
    // When the changes applied but not yet committed started to gather.
    let mut group: Option<Instant> = None;
    while actor.is_running(|| checked.is_closed_and_empty() && replies.mark_closed()) {
        if versions_expired.elapsed() >= EXPIRE_VERSIONS_EVERY {
            receiving.applier.expire_versions();
            versions_expired = Instant::now();
        }
        let _woken = await_for_any!(
            actor.wait_avail(&mut checked, 1),
            actor.wait_timeout(idle_wait)
        );
        let mut out = Vec::new();
        while let Ok(answer) = receiving.reverts.try_recv() {
            let (replies, text) = receiving.revert();
            out.extend(replies);
            let _ = answer.send(text);
        }
        loop {
            while let Some(item) = actor.try_take(&mut checked) {
                match item {
                    Checked::Rejected { peer, reason } => out.push(Reply::Drop { peer, reason }),
                    Checked::Valid(Incoming { from, message }) => {
                        out.extend(receiving.handle(from, message, &mut acks));
                    }
                }
            }
            // A batch that is already large means a bulk transfer: linger a moment for more
            // files, so the batch is made durable with fewer journal commits. A lone
            // change (the latency case) never waits.
            if receiving.applier.files_waiting() < LINGER_FROM || receiving.applier.batch_is_full()
            {
                break;
            }
            let more = await_for_any!(
                actor.wait_avail(&mut checked, 1),
                actor.wait_timeout(LINGER)
            );
            if !more || actor.avail_units(&mut checked) == 0 {
                break;
            }
        }
        // What waits is shown as soon as it is durable and in place; the fsync of the new
        // names and the index commit wait a moment for the next change, which then shares
        // them (group commit): a lone small file costs one journal commit before it shows.
        let waiting = receiving
            .applier
            .place_waiting()
            .map(|placed| receiving.show(&placed));
        let grouped = waiting.is_ok() && receiving.applier.has_uncommitted();
        let started = *group.get_or_insert_with(Instant::now);
        if grouped && started.elapsed() < GROUP_AT_MOST {
            let more = await_for_any!(
                actor.wait_avail(&mut checked, 1),
                actor.wait_timeout(GROUP_WAIT)
            );
            if more && actor.avail_units(&mut checked) > 0 {
                send_replies(&mut actor, &mut replies, out).await;
                continue;
            }
        }
        group = None;
        // Acknowledged changes must be in place and in the index first.
        let committed = waiting.and_then(|_| receiving.applier.commit_deferred());
        match committed {
            Ok(placed) => receiving.show(&placed),
            Err(err) => {
                tracing::warn!(
                    "cannot finish a batch of changes: {err}; they are not acknowledged, so the peer sends them again"
                );
                acks.clear();
            }
        }
        for (peer, seq) in acks.drain() {
            out.push(Reply::Send {
                to: peer,
                message: Message::Ack { seq },
            });
        }
        send_replies(&mut actor, &mut replies, out).await;
    }
    Ok(())
}

/// Sends the replies, waiting for room.
async fn send_replies<A: SteadyActor>(actor: &mut A, replies: &mut Tx<Reply>, out: Vec<Reply>) {
    for reply in out {
        actor
            .send_async(replies, reply, SendSaturation::AwaitForRoom)
            .await;
    }
}

impl Receiving {
    fn handle(
        &mut self,
        from: NodeId,
        message: Message,
        acks: &mut HashMap<NodeId, u64>,
    ) -> Vec<Reply> {
        self.arrivals.record(&message);
        match message {
            Message::Change(change) => {
                let seq = change.seq;
                let (durable, replies) = self.apply_change(from, &change);
                if durable {
                    let acked = acks.entry(from).or_insert(seq);
                    *acked = (*acked).max(seq);
                }
                replies
            }
            Message::Summary(theirs) => self.start_catch_up(from, &theirs),
            Message::Listing { dir, entries } => self.compare_listing(from, &dir, &entries),
            Message::CaughtUp => {
                self.arrivals.caught_up();
                if let Some(catch_up) = self.catch_up.remove(&from) {
                    let took = catch_up.started.map(|s| s.elapsed()).unwrap_or_default();
                    tracing::info!("caught up with peer {from} in {took:?}");
                } else {
                    tracing::debug!("peer {from} sent every file asked for");
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// Applies one change; returns whether it is durable (may be acknowledged) and what
    /// to tell the peer.
    fn apply_change(&mut self, from: NodeId, change: &Change) -> (bool, Vec<Reply>) {
        match self.admission(change) {
            Admission::Apply => {}
            Admission::Drop => {
                tracing::debug!(path = ?change.path, "ignored here: not applied");
                return (true, Vec::new());
            }
            Admission::RemoveSource => {
                let removal = Change {
                    seq: change.seq,
                    path: change.path.clone(),
                    op: Op::Remove,
                    version: change.version.clone(),
                };
                return self.apply_change(from, &removal);
            }
            Admission::FetchTarget(path) => return (true, self.ask_for(from, vec![path])),
        }
        let followed = self.follow_moves(change);
        let change = followed.as_ref().unwrap_or(change);
        let touches_rules = self.touches_ignore_file(change);
        let applied = self.apply_admitted(from, change);
        if let (
            Op::Rename {
                to,
                exchange: false,
            },
            (true, _),
        ) = (&change.op, &applied)
        {
            let paths = crate::sync::safe_path::checked(&change.path)
                .and_then(|from| Ok((from, crate::sync::safe_path::checked(to)?)));
            if let Ok((from, to)) = paths {
                if let Err(err) = self.index.put_moves(vec![(from, to)]) {
                    tracing::warn!("cannot note a rename in the index: {err}");
                }
            }
        }
        if touches_rules {
            self.ignores.reload();
        }
        applied
    }

    /// `change` redirected to where its path went, if this node renamed the path (or a
    /// folder above it) since the peer last heard: the peer's edit follows the rename.
    /// A removal does not follow: a peer that no longer has the old name (it may have
    /// applied the rename already) answers for it with a removal, which must not remove
    /// the renamed file; a deletion racing a rename leaves the file alive, losing nothing.
    fn follow_moves(&self, change: &Change) -> Option<Change> {
        self.versions.as_ref()?;
        if matches!(change.op, Op::Remove) {
            return None;
        }
        let path = crate::sync::safe_path::checked(&change.path).ok()?;
        let moved = self.index.moved_to(&path).ok()??;
        let moved = crate::sync::encode::rel_path(&moved)?;
        tracing::debug!(from = ?change.path, to = ?moved, "the path was renamed here: following");
        Some(Change {
            path: moved,
            ..change.clone()
        })
    }

    fn is_ignored(&self, path: &RelPath, is_dir: bool) -> bool {
        crate::sync::safe_path::checked(path).is_ok_and(|p| self.ignores.is_ignored(&p, is_dir))
    }

    fn admission(&self, change: &Change) -> Admission {
        match &change.op {
            Op::Rename { to, exchange } => {
                let (source, target) =
                    (self.is_ignored_here(&change.path), self.is_ignored_here(to));
                match (source, target) {
                    (false, false) => Admission::Apply,
                    (true, true) => Admission::Drop,
                    (false, true) if !exchange => Admission::RemoveSource,
                    (false, true) => Admission::FetchTarget(change.path.clone()),
                    (true, false) => Admission::FetchTarget(to.clone()),
                }
            }
            Op::Link { existing } => {
                if self.is_ignored(&change.path, false) {
                    Admission::Drop
                } else if self.is_ignored_here(existing) {
                    Admission::FetchTarget(change.path.clone())
                } else {
                    Admission::Apply
                }
            }
            Op::Remove => match self.is_ignored_here(&change.path) {
                true => Admission::Drop,
                false => Admission::Apply,
            },
            op => match self.is_ignored(&change.path, matches!(op, Op::Dir { .. })) {
                true => Admission::Drop,
                false => Admission::Apply,
            },
        }
    }

    /// Whether `path`, whose kind the change does not say, is ignored (by what is here).
    fn is_ignored_here(&self, path: &RelPath) -> bool {
        crate::sync::safe_path::checked(path).is_ok_and(|p| self.ignores.is_ignored_on_disk(&p))
    }

    fn touches_ignore_file(&self, change: &Change) -> bool {
        let is_rules = |path: &RelPath| path.0 == IGNORE_FILE.as_bytes();
        is_rules(&change.path) || matches!(&change.op, Op::Rename { to, .. } if is_rules(to))
    }

    fn apply_admitted(&mut self, from: NodeId, change: &Change) -> (bool, Vec<Reply>) {
        let version = match self.judge(change) {
            Ok(Some(Verdict::Drop(why))) => {
                tracing::debug!(path = ?change.path, version = %change.version, "not applied: {why}");
                return (true, Vec::new());
            }
            Ok(Some(Verdict::Apply(version))) => {
                tracing::debug!(
                    path = %String::from_utf8_lossy(&change.path.0),
                    op = op_name(&change.op),
                    %version,
                    "applying"
                );
                Some(version)
            }
            Ok(Some(Verdict::KeepBoth { copy, version })) => match self.keep_mine(change, &copy) {
                Ok(()) => Some(version),
                Err(err) => return (false, self.failed(from, &err)),
            },
            Ok(Some(Verdict::Merge {
                version,
                theirs_wins,
                copy,
            })) => match self.merge(change, &version, theirs_wins) {
                Ok(Merged::Done) => return (true, Vec::new()),
                Ok(Merged::NeedsWhole) => return (true, self.ask_whole(from, &change.path)),
                Ok(Merged::Impossible) if theirs_wins => match self.keep_mine(change, &copy) {
                    Ok(()) => Some(version),
                    Err(err) => return (false, self.failed(from, &err)),
                },
                Ok(Merged::Impossible) => return (true, Vec::new()),
                Err(err) => return (false, self.failed(from, &err)),
            },
            Ok(None) => None,
            Err(err) => return (false, self.failed(from, &err)),
        };
        if let Some(version) = &version {
            self.will_have(change, version);
        }
        match &change.op {
            Op::File {
                data: FileData::Whole { last: true, .. },
                ..
            } => {
                self.arriving.remove(&change.path);
                self.asked.remove(&change.path);
            }
            Op::File { .. } => {
                self.arriving.insert(change.path.clone(), Instant::now());
            }
            _ => {}
        }
        // The mount shows the change as soon as it is in place, before the index commit.
        // A new link changes the link count the other names show, too.
        let existing = match &change.op {
            Op::Link { existing } => crate::sync::safe_path::checked(existing).ok(),
            _ => None,
        };
        let (local, invalidate) = (&self.local, &self.invalidate);
        let result = self.applier.apply_deferred(change, |paths| {
            show_paths(local, invalidate.as_ref(), paths, existing)
        });
        tracing::trace!(seq = change.seq, ok = result.is_ok(), "applied");
        match result {
            Ok(applied) => {
                if let (Some(versions), Some(version)) = (&mut self.versions, version) {
                    if let (Some(bases), Op::File { .. }) = (&versions.bases, &change.op) {
                        if let Ok(Some(content)) = self.applier.read_small(&change.path, MAX_MERGED)
                        {
                            if let Ok(path) = crate::sync::safe_path::checked(&change.path) {
                                if let Err(err) = bases.keep(&path, &version, &content) {
                                    tracing::debug!(?path, "not kept as a merge base: {err}");
                                }
                            }
                        }
                    }
                    versions.applied(change, version);
                }
                (applied.durable, Vec::new())
            }
            Err(
                err @ (ApplyError::BaseMismatch { .. }
                | ApplyError::Diverged { .. }
                | ApplyError::Missing { .. }
                | ApplyError::OutOfOrder { .. }),
            ) => {
                // A rename whose source is missing here needs what is now at its target.
                let wanted = match &change.op {
                    Op::Rename { to, .. } => to.clone(),
                    _ => change.path.clone(),
                };
                // Every later piece of a transfer whose start was missed fails the same
                // way: one request for the file is enough.
                let now = Instant::now();
                let asked_lately = self
                    .asked
                    .get(&wanted)
                    .is_some_and(|when| now.duration_since(*when) < STALLED);
                if asked_lately {
                    tracing::debug!("{err}: already asked peer {from} for it");
                    return (true, Vec::new());
                }
                tracing::info!("{err}: asking peer {from} for it");
                self.asked
                    .retain(|_, when| now.duration_since(*when) < STALLED);
                self.asked.insert(wanted.clone(), now);
                (true, self.ask_for(from, vec![wanted]))
            }
            Err(err) => (false, self.failed(from, &err)),
        }
    }

    /// Logs a change that cannot be applied and makes it the mount's last error.
    fn failed(&self, from: NodeId, err: &dyn std::fmt::Display) -> Vec<Reply> {
        tracing::warn!("cannot apply a change from peer {from}: {err}");
        if let Some(stats) = &self.stats {
            stats.set_last_error(format!("cannot apply a change from peer {from}: {err}"));
        }
        Vec::new()
    }

    /// What to do with `change` by its version; `None` when versions are not used.
    fn judge(&mut self, change: &Change) -> Result<Option<Verdict>, ApplyError> {
        if self.versions.is_none() {
            return Ok(None);
        }
        if self.mirror {
            return Ok(Some(Verdict::Apply(change.version.clone())));
        }
        let path = crate::sync::apply::checked(&change.path)?;
        let index_err = |source| ApplyError::Index {
            path: path.clone(),
            source: Box::new(source),
        };
        if self.applier.is_uncommitted(&path) {
            // A change of this path waits for its commit: commit first, so the index
            // the judgement reads is not behind the disk.
            let placed = self.applier.commit_deferred()?;
            show_paths(&self.local, self.invalidate.as_ref(), &placed, None);
        }
        let Some(versions) = &mut self.versions else {
            return Ok(None);
        };
        let mut version = versions
            .book
            .current(&self.index, &path)
            .map_err(index_err)?;
        let mut record = self.index.get(&path).map_err(index_err)?;
        // Only file data comes in pieces; a removal or anything else with the same
        // version is a duplicate (e.g. a peer answering for a name it renamed meanwhile).
        let mid_change = matches!(change.op, Op::File { .. })
            && versions
                .applying
                .get(&change.path)
                .is_some_and(|(applying, _)| *applying == change.version);
        // A local write still on its way to the coalescer has no version yet, but the
        // file on disk already differs from the index: it counts as this node's next
        // version, so a peer's change cannot silently replace it.
        if !mid_change
            && change.version.compare(&version) == Order::Newer
            && self.applier.changed_since_indexed(&path, record.as_ref())
        {
            version = version.bumped(versions.book.replica(), 0);
        }
        if change.version.compare(&version) == Order::Concurrent {
            // Conflicts are decided on what is on disk: a local edit may be stamped but
            // not indexed yet.
            record = match self.applier.current_record(&path)? {
                Some(fresh) => Some(fresh),
                None => record.map(|mut gone| {
                    gone.deleted_ns.get_or_insert(0);
                    gone
                }),
            };
        }
        let local = Local {
            version: &version,
            record: record.as_ref(),
        };
        let verdict = conflict::judge(versions.rules, change, &path, local, mid_change);
        // A folder is removed only if this node has nothing below it that the removal
        // has not seen; the rest is removed entry by entry by catch-up.
        let folder = record
            .as_ref()
            .is_some_and(|r| r.is_live() && r.kind == crate::index::FileKind::Dir);
        if let (Verdict::Apply(_), Op::Remove, true) = (&verdict, &change.op, folder) {
            let snapshot = self.index.snapshot().map_err(index_err)?;
            for (below, _) in snapshot.subtree(&path).map_err(index_err)? {
                let known = snapshot.vector(&below).map_err(index_err)?;
                if !change.version.covers(&known.unwrap_or_default()) {
                    return Ok(Some(Verdict::Drop(
                        "something in the folder changed here since the peer removed it",
                    )));
                }
            }
        }
        Ok(Some(verdict))
    }

    /// Notes the versions the paths of `change` get once it is committed.
    fn will_have(&mut self, change: &Change, version: &crate::sync::vector::Vector) {
        let paths = std::iter::once(&change.path).chain(match &change.op {
            Op::Rename { to, .. } => Some(to),
            _ => None,
        });
        for path in paths {
            if let Ok(path) = crate::sync::safe_path::checked(path) {
                self.applier.will_have(path, version.clone());
            }
        }
    }

    /// Tries the three-way merge of `change` (concurrent with this node's version) and
    /// applies the result as `version`.
    fn merge(
        &mut self,
        change: &Change,
        version: &Vector,
        theirs_win: bool,
    ) -> Result<Merged, ApplyError> {
        let Some(versions) = &self.versions else {
            return Ok(Merged::Impossible);
        };
        let Some(bases) = versions.bases.clone() else {
            return Ok(Merged::Impossible);
        };
        let Op::File {
            meta: their_meta,
            size,
            data,
            ..
        } = &change.op
        else {
            return Ok(Merged::Impossible);
        };
        let theirs = match data {
            FileData::Whole {
                offset: 0,
                data,
                last: true,
            } => data.bytes.clone(),
            _ if *size <= MAX_MERGED => return Ok(Merged::NeedsWhole),
            _ => return Ok(Merged::Impossible),
        };
        let path = crate::sync::apply::checked(&change.path)?;
        let index_err = |source| ApplyError::Index {
            path: path.clone(),
            source: Box::new(source),
        };
        let mine_version = versions
            .book
            .current(&self.index, &path)
            .map_err(index_err)?;
        let Some(record) = self.index.get(&path).map_err(index_err)? else {
            return Ok(Merged::Impossible);
        };
        let Some(mine) = self.applier.read_small(&change.path, MAX_MERGED)? else {
            return Ok(Merged::Impossible);
        };
        let Some(base) = bases.common(&path, &mine_version, &change.version) else {
            return Ok(Merged::Impossible);
        };
        let (winner, loser) = match theirs_win {
            true => (&theirs, &mine),
            false => (&mine, &theirs),
        };
        let Some(merged) = merge::three_way(&base, winner, loser) else {
            return Ok(Merged::Impossible);
        };
        // The winner's metadata, so that both sides of the conflict write the same file.
        let meta = match theirs_win {
            true => their_meta.clone(),
            false => Meta {
                mode: record.mode & 0o7777,
                uid: record.uid,
                gid: record.gid,
                mtime_ns: record.mtime_ns,
                xattrs: None,
            },
        };
        let blocks = merged
            .chunks(BLOCK_SIZE as usize)
            .enumerate()
            .map(|(at, block)| (at as u64, *blake3::hash(block).as_bytes()))
            .collect();
        let result = Change {
            seq: change.seq,
            path: change.path.clone(),
            op: Op::File {
                meta,
                size: merged.len() as u64,
                data: FileData::Whole {
                    offset: 0,
                    data: raw_payload(merged.clone()),
                    last: true,
                },
                blocks,
            },
            version: version.clone(),
        };
        self.applier.will_have(path.clone(), version.clone());
        let (local, invalidate) = (&self.local, &self.invalidate);
        self.applier.apply_then(&result, |paths| {
            show_paths(local, invalidate.as_ref(), paths, None)
        })?;
        if let Some(versions) = &mut self.versions {
            versions.applied(&result, version.clone());
        }
        if let Err(err) = bases.keep(&path, version, &merged) {
            tracing::debug!(?path, "merge result not kept as a base: {err}");
        }
        tracing::info!(?path, "conflict: both versions merged three-way");
        Ok(Merged::Done)
    }

    /// Asks `peer` for the whole of `path`, with nothing to build a delta on.
    fn ask_whole(&self, peer: NodeId, path: &RelPath) -> Vec<Reply> {
        vec![Reply::Send {
            to: peer,
            message: Message::WantFiles(vec![Want {
                path: path.clone(),
                signature: None,
                resume: None,
            }]),
        }]
    }

    /// Moves this node's losing version of `change`'s path to `copy` and reports the copy
    /// as a new local file, so it reaches every peer.
    fn keep_mine(&mut self, change: &Change, copy: &std::path::Path) -> Result<(), ApplyError> {
        let path = crate::sync::apply::checked(&change.path)?;
        // Two losing versions last written by one node in one second get one name: the
        // second takes the next free counter, unless it is the very same version.
        let named = copy;
        let mut copy = copy.to_path_buf();
        let mut counter = 1;
        loop {
            match self.applier.copy_holds(&path, &copy)? {
                None => break,
                Some(true) => {
                    tracing::info!(
                        path = %path.display(),
                        copy = %copy.display(),
                        "conflict: a peer's concurrent version wins; this node's is already kept as a copy"
                    );
                    return Ok(());
                }
                Some(false) if counter < MAX_COPY_COUNTER => {
                    counter += 1;
                    copy = crate::sync::conflict::numbered_copy(named, counter);
                }
                Some(false) => break,
            }
        }
        let copy = copy.as_path();
        let Some(to) = crate::sync::encode::rel_path(copy) else {
            return Ok(());
        };
        // Applied as a rename of this node's own: the old name keeps its version (now
        // deleted), and the copy gets a version of its own once captured.
        let rename = Change {
            seq: change.seq,
            path: change.path.clone(),
            op: Op::Rename {
                to,
                exchange: false,
            },
            version: Vector::default(),
        };
        let (local, invalidate) = (&self.local, &self.invalidate);
        self.applier.apply_then(&rename, |paths| {
            show_paths(local, invalidate.as_ref(), paths, None)
        })?;
        tracing::info!(
            path = %String::from_utf8_lossy(&change.path.0),
            copy = %copy.display(),
            "conflict: a peer's concurrent version wins; this node's is kept as a copy"
        );
        if let Some(versions) = &self.versions {
            for kind in [ChangeKind::Modified, ChangeKind::Closed] {
                versions.capture.record(LocalChange {
                    path: Some(copy.to_path_buf()),
                    file: None,
                    kind,
                    source: Source::Scan,
                    pid: None,
                });
            }
        }
        Ok(())
    }

    /// Tells the local-change tracker and the kernel's caches about paths now in place.
    fn show(&self, paths: &[PathBuf]) {
        show_paths(&self.local, self.invalidate.as_ref(), paths, None);
    }

    /// Asks `peer` for `paths`, with what we hold of each so it can send a delta or resume.
    fn ask_for(&mut self, peer: NodeId, paths: Vec<RelPath>) -> Vec<Reply> {
        let wants = paths.into_iter().map(|path| self.want(path)).collect();
        vec![Reply::Send {
            to: peer,
            message: Message::WantFiles(wants),
        }]
    }

    fn want(&self, path: RelPath) -> Want {
        self.applier.want(&path).unwrap_or(Want {
            path,
            signature: None,
            resume: None,
        })
    }

    /// `filesync revert`: asks a sending peer for every locally changed path; what the
    /// peer lacks comes back as a removal.
    fn revert(&mut self) -> (Vec<Reply>, String) {
        let paths = self.local.take_all();
        if paths.is_empty() {
            return (Vec::new(), "nothing to revert: no local changes".to_owned());
        }
        let wants: Vec<Want> = paths
            .iter()
            .filter_map(|path| crate::sync::encode::rel_path(path))
            .map(|path| self.want(path))
            .collect();
        let count = wants.len();
        tracing::info!("reverting {count} locally changed paths to a sending peer's version");
        (
            vec![Reply::ToSender {
                message: Message::WantFiles(wants),
            }],
            format!("reverting {count} paths to the version of a sending peer"),
        )
    }

    fn start_catch_up(&mut self, from: NodeId, theirs: &[DirDigest]) -> Vec<Reply> {
        let ours = match digest::summarize(&self.index) {
            Ok(summary) => {
                if let Some(stats) = &self.stats {
                    stats.set_open_conflicts(summary.conflict_copies);
                }
                summary.dirs
            }
            Err(err) => {
                tracing::warn!("cannot summarize the index for catch-up: {err}");
                return Vec::new();
            }
        };
        let dirs = digest::differing_dirs(&ours, theirs);
        if dirs.is_empty() {
            tracing::debug!("in sync with peer {from}: every directory digest matches");
            return Vec::new();
        }
        tracing::info!(
            "catching up with peer {from}: {} directories differ",
            dirs.len()
        );
        self.catch_up.insert(
            from,
            CatchUp {
                dirs_pending: dirs.len(),
                wants: Vec::new(),
                wanted_files: 0,
                wanted_bytes: 0,
                started: Some(Instant::now()),
            },
        );
        vec![Reply::Send {
            to: from,
            message: Message::WantDirs(dirs),
        }]
    }

    fn compare_listing(&mut self, from: NodeId, dir: &RelPath, theirs: &[Entry]) -> Vec<Reply> {
        let ours = digest::listing(&self.index, dir).unwrap_or_default();
        let comparison = digest::compare(&ours, theirs);
        let their_dirs: HashSet<&[u8]> = theirs
            .iter()
            .filter(|entry| entry.kind == EntryKind::Dir)
            .map(|entry| entry.name.as_slice())
            .collect();
        let child = |name: &[u8]| {
            let mut path = dir.0.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name);
            RelPath(path)
        };
        // Local changes wait for `filesync revert` rather than being overwritten unasked.
        let changes_here = self.local.clone();
        let local = move |path: &RelPath| {
            use std::os::unix::ffi::OsStrExt;
            changes_here.is_changed(std::path::Path::new(std::ffi::OsStr::from_bytes(&path.0)))
        };
        if self.mirror {
            for name in &comparison.extra {
                let removal = Change {
                    seq: 0,
                    path: child(name),
                    op: Op::Remove,
                    version: Vector::default(),
                };
                if local(&removal.path) {
                    continue;
                }
                self.apply_change(from, &removal);
            }
        } else {
            // Deletions this node missed (made while it was away), newer than its version.
            for (name, version) in comparison.removed {
                let removal = Change {
                    seq: 0,
                    path: child(&name),
                    op: Op::Remove,
                    version,
                };
                self.apply_change(from, &removal);
            }
        }
        let now = Instant::now();
        self.arriving
            .retain(|_, last| now.duration_since(*last) < STALLED);
        let wants: Vec<Want> = comparison
            .fetch
            .iter()
            .filter(|name| !self.is_ignored(&child(name), their_dirs.contains(name.as_slice())))
            .map(|name| child(name))
            .filter(|path| !self.arriving.contains_key(path) && !local(path))
            .map(|path| self.want(path))
            .collect();
        let wanted: HashSet<&RelPath> = wants.iter().map(|want| &want.path).collect();
        let (wanted_files, wanted_bytes) = theirs
            .iter()
            .filter(|entry| entry.kind == EntryKind::File && wanted.contains(&child(&entry.name)))
            .fold((0u64, 0u64), |(files, bytes), entry| {
                (files + 1, bytes.saturating_add(entry.size))
            });
        let Some(catch_up) = self.catch_up.get_mut(&from) else {
            return Vec::new();
        };
        catch_up.wants.extend(wants);
        catch_up.wanted_files += wanted_files;
        catch_up.wanted_bytes = catch_up.wanted_bytes.saturating_add(wanted_bytes);
        catch_up.dirs_pending = catch_up.dirs_pending.saturating_sub(1);
        if catch_up.dirs_pending > 0 {
            return Vec::new();
        }
        let wants = std::mem::take(&mut catch_up.wants);
        let wanted_files = std::mem::take(&mut catch_up.wanted_files);
        let wanted_bytes = std::mem::take(&mut catch_up.wanted_bytes);
        tracing::info!(
            "asking peer {from} for {} entries: {wanted_files} files, {wanted_bytes} bytes",
            wants.len()
        );
        self.arrivals.expect(wanted_files, wanted_bytes);
        for want in wants.iter().take(20) {
            tracing::debug!(path = %String::from_utf8_lossy(&want.path.0), "asking for");
        }
        vec![Reply::Send {
            to: from,
            message: Message::WantFiles(wants),
        }]
    }
}

impl Versioning {
    /// Remembers what `change` gave its path, for the changes that follow.
    fn applied(&mut self, change: &Change, version: Vector) {
        self.settled.applied_from_peer();
        let paths = std::iter::once(&change.path).chain(match &change.op {
            Op::Rename { to, .. } => Some(to),
            _ => None,
        });
        for path in paths {
            if let Ok(path) = crate::sync::safe_path::checked(path) {
                self.book.note(&path, &version);
            }
        }
        let now = Instant::now();
        if self.applying.len() >= self.applying_prune_at {
            self.applying
                .retain(|_, (_, when)| now.duration_since(*when) < PIECES_WITHIN);
            self.applying_prune_at = (self.applying.len() * 2).max(APPLYING_PRUNE_FROM);
        }
        // Later pieces carry the change's own version, whatever the path now has.
        match &change.op {
            Op::File {
                data: FileData::Whole { last: true, .. },
                ..
            } => {
                self.applying.remove(&change.path);
            }
            _ => {
                self.applying
                    .insert(change.path.clone(), (change.version.clone(), now));
            }
        }
    }
}

/// Tells `local` and the kernel's caches (through `invalidate`) about `paths` and `also`.
fn show_paths(
    local: &LocalChanges,
    invalidate: &dyn ChangeSink,
    paths: &[PathBuf],
    also: Option<PathBuf>,
) {
    for path in paths.iter().cloned().chain(also) {
        local.applied(&path);
        invalidate.record(LocalChange {
            path: Some(path),
            file: None,
            kind: ChangeKind::Modified,
            source: Source::Fuse,
            pid: None,
        });
    }
}
