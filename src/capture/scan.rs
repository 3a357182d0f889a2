//! The reconcile scan: walks the backing folder, compares it with the index and reports
//! every difference as a [`Change`] with [`Source::Scan`].
//!
//! It finds what no live watcher saw: changes made while filesync was stopped, or lost
//! when a watcher's queue overflowed. It reads metadata only (one `fstatat` per entry,
//! plus `readlinkat` for new or replaced symlinks), never file content, and never writes
//! the index: the indexer updates it from the reported changes like from any other source,
//! so the scan can run while live capture goes on (a change seen by both is reported twice,
//! which is harmless: records are hints, the consumer compares with the file).
//!
//! How: directories are a shared LIFO work list served by several threads. Each directory
//! is opened relative to its parent's descriptor (so no path is ever longer than one name),
//! listed, every entry `fstatat`'d, the listing sorted by name and merged with the index's
//! children of that directory, which are one contiguous key range in the same order.

use std::ffi::{OsStr, OsString};
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, Mode, OFlags, RawDir, Stat};
use rustix::io::Errno;

use crate::change::{AttrChange, Change, ChangeKind, ChangeSink, FileId, Source};
use crate::ignores::Ignores;
use crate::index::{stat_times, FileKind, FileRecord, Index, IndexError, Snapshot};

/// What a scan saw and reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Entries that are not directories.
    pub files: u64,
    /// Directories, the backing folder included.
    pub dirs: u64,
    /// The sum of the sizes of regular files.
    pub bytes: u64,
    /// Changes reported to the sink.
    pub changes: u64,
    /// Directories or entries that could not be read (logged as warnings). Nothing below
    /// them is reported, deletions included, so a permission problem never looks like a
    /// deleted tree.
    pub unreadable: u64,
    /// Wall-clock time of the whole scan.
    pub elapsed: Duration,
}

/// Why a scan stopped.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot open the backing folder {path:?} to scan it: {source}; check that it exists and is readable")]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// How often the progress callback is called at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// The directory listing buffer of each thread; big enough that most directories are read
/// in one `getdents64`.
const LISTING_BUFFER: usize = 64 * 1024;

/// Walks `root` in parallel, compares every entry with `index`, and reports each
/// difference to `sink` (with [`Source::Scan`]):
///
/// - not in the index, or a tombstone there: `Create` for a file, `Mkdir`, `Symlink {
///   target }`, `Mknod { mode, rdev }`; a new directory's contents follow it;
/// - a file whose size, mtime or inode number differs: `Modified` (plus `SetAttr` if its
///   mode or owner changed too);
/// - mode, uid or gid differs: `SetAttr` with exactly those fields set; only the ctime
///   differs (xattrs, link count, a rename): `SetAttr` with no field set, meaning "read the
///   metadata again". A directory's mtime and ctime are not compared: they move with
///   every entry added or removed, which is reported for the entries themselves;
/// - a symlink or node replaced by another (inode or target differs), or any entry whose
///   type changed: the removal, then the creation;
/// - live in the index but gone from disk: `Unlink`, or for a directory `Unlink`/`Rmdir`
///   of everything the index has below it, deepest first, then `Rmdir` of it (what
///   `rm -r` would have produced).
///
/// The backing folder itself is compared by its entries only. If the index file or its
/// folder lies inside `root` they are skipped, and so is whatever `ignores` matches (an
/// ignored directory is not entered). `progress`, if given, is called with the
/// files and bytes seen so far, from the scan's threads, at most every 100 ms and once at
/// the end.
///
/// Fails only if `root` cannot be opened or the index cannot be read; a directory or entry
/// that cannot be read is logged, counted in [`ScanStats::unreadable`] and left out.
pub fn scan(
    root: &Path,
    index: &Index,
    ignores: &Ignores,
    sink: &dyn ChangeSink,
    progress: Option<&(dyn Fn(u64, u64) + Sync)>,
) -> Result<ScanStats, ScanError> {
    let started = Instant::now();
    let root_err = |source: std::io::Error| ScanError::Root {
        path: root.to_path_buf(),
        source,
    };
    let root_fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| root_err(e.into()))?;
    let root_st = rustix::fs::fstat(&root_fd).map_err(|e| root_err(e.into()))?;
    let snapshot = index.snapshot()?;
    let walk = Walk {
        index,
        ignores,
        snapshot: &snapshot,
        sink,
        root_id: (root_st.st_dev, root_st.st_ino),
        counters: Counters::default(),
        progress,
        last_progress: Mutex::new(started),
    };
    let queue = Queue {
        state: Mutex::new(QueueState {
            jobs: vec![Job {
                parent: Arc::new(root_fd),
                name: OsString::from("."),
                rel: PathBuf::new(),
            }],
            busy: 0,
            error: None,
        }),
        wake: Condvar::new(),
    };
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 8);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| worker(&walk, &queue));
        }
    });
    let error = match queue.state.into_inner() {
        Ok(state) => state.error,
        Err(poisoned) => poisoned.into_inner().error,
    };
    if let Some(e) = error {
        return Err(e.into());
    }
    let c = &walk.counters;
    let stats = ScanStats {
        files: c.files.load(Ordering::Relaxed),
        dirs: c.dirs.load(Ordering::Relaxed),
        bytes: c.bytes.load(Ordering::Relaxed),
        changes: c.changes.load(Ordering::Relaxed),
        unreadable: c.unreadable.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    };
    if let Some(progress) = progress {
        progress(stats.files, stats.bytes);
    }
    // Debug level: the caller logs the outcome with why it scanned.
    tracing::debug!(
        files = stats.files,
        dirs = stats.dirs,
        bytes = stats.bytes,
        changes = stats.changes,
        unreadable = stats.unreadable,
        elapsed_ms = stats.elapsed.as_millis() as u64,
        "scan done"
    );
    Ok(stats)
}

/// A directory to scan: opened from its parent's descriptor when its turn comes, so only
/// directories with children still waiting hold a descriptor.
struct Job {
    parent: Arc<OwnedFd>,
    name: OsString,
    rel: PathBuf,
}

struct QueueState {
    jobs: Vec<Job>,
    /// Workers holding a job: while any is, more jobs may come.
    busy: usize,
    error: Option<IndexError>,
}

struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
}

#[derive(Default)]
struct Counters {
    files: AtomicU64,
    dirs: AtomicU64,
    bytes: AtomicU64,
    changes: AtomicU64,
    unreadable: AtomicU64,
}

/// What every worker shares.
struct Walk<'a> {
    index: &'a Index,
    ignores: &'a Ignores,
    snapshot: &'a Snapshot<'a>,
    sink: &'a dyn ChangeSink,
    root_id: (u64, u64),
    counters: Counters,
    progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
    last_progress: Mutex<Instant>,
}

fn worker(walk: &Walk<'_>, queue: &Queue) {
    let mut buffers = Buffers {
        listing: Vec::with_capacity(LISTING_BUFFER),
        ..Buffers::default()
    };
    loop {
        let job = {
            let Ok(mut state) = queue.state.lock() else {
                return;
            };
            loop {
                if state.error.is_some() {
                    return;
                }
                if let Some(job) = state.jobs.pop() {
                    state.busy += 1;
                    break job;
                }
                if state.busy == 0 {
                    queue.wake.notify_all();
                    return;
                }
                state = match queue.wake.wait(state) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
        };
        let result = walk.directory(job, &mut buffers);
        let Ok(mut state) = queue.state.lock() else {
            return;
        };
        state.busy -= 1;
        match result {
            Ok(children) => state.jobs.extend(children),
            Err(e) => {
                state.error.get_or_insert(e);
            }
        }
        queue.wake.notify_all();
        drop(state);
        walk.report_progress();
    }
}

/// Buffers each thread reuses from directory to directory, so that the walk allocates
/// little per entry: names live in one arena per side instead of one string each.
#[derive(Default)]
struct Buffers {
    /// The `getdents64` buffer.
    listing: Vec<u8>,
    /// The directory's entry names, back to back; `entries` index into it.
    names: Vec<u8>,
    entries: Vec<Entry>,
    /// The index's children of the directory, likewise.
    known_names: Vec<u8>,
    known: Vec<Known>,
}

/// One entry of a directory listing.
struct Entry {
    name: Range<usize>,
    /// `None`: could not be stat'ed, is the index's own file, or is ignored; neither
    /// reported nor compared (nor, for a directory, entered).
    st: Option<Stat>,
}

/// One child of the directory in the index.
struct Known {
    name: Range<usize>,
    rec: FileRecord,
}

impl Walk<'_> {
    /// Scans one directory; returns its subdirectories to scan next.
    fn directory(&self, job: Job, buf: &mut Buffers) -> Result<Vec<Job>, IndexError> {
        let fd = match rustix::fs::openat(
            &*job.parent,
            job.name.as_os_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            // Removed or replaced since its parent was listed: the next scan sees what is
            // there now.
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => return Ok(Vec::new()),
            Err(e) => {
                self.unreadable(&job.rel, e);
                return Ok(Vec::new());
            }
        };
        self.counters.dirs.fetch_add(1, Ordering::Relaxed);
        if !self.list(&fd, &job.rel, buf) {
            return Ok(Vec::new());
        }
        let Buffers {
            names,
            entries,
            known_names,
            known,
            ..
        } = buf;
        entries.sort_unstable_by(|a, b| names[a.name.clone()].cmp(&names[b.name.clone()]));
        known.clear();
        known_names.clear();
        self.snapshot.for_each_child(&job.rel, false, |name, rec| {
            let start = known_names.len();
            known_names.extend_from_slice(name);
            known.push(Known {
                name: start..known_names.len(),
                rec,
            });
        })?;

        let fd = Arc::new(fd);
        let mut subdirs = Vec::new();
        let (mut i, mut j) = (0, 0);
        loop {
            let (on_disk, in_index) = match (entries.get(i), known.get(j)) {
                (None, None) => break,
                (Some(e), None) => (Some(e), None),
                (None, Some(k)) => (None, Some(k)),
                (Some(e), Some(k)) => match names[e.name.clone()].cmp(&known_names[k.name.clone()])
                {
                    std::cmp::Ordering::Less => (Some(e), None),
                    std::cmp::Ordering::Greater => (None, Some(k)),
                    std::cmp::Ordering::Equal => (Some(e), Some(k)),
                },
            };
            i += usize::from(on_disk.is_some());
            j += usize::from(in_index.is_some());
            match (on_disk, in_index) {
                // Unknown or the index's own: nothing to say either way.
                (Some(Entry { st: None, .. }), _) => {}
                (Some(Entry { st: Some(st), name }), k) => {
                    let name = OsStr::from_bytes(&names[name.clone()]);
                    self.count(st);
                    match k.map(|k| &k.rec).filter(|r| r.is_live()) {
                        None => self.created(&fd, name, &job.rel.join(name), st),
                        Some(rec) => self.compare(&fd, &job.rel, name, st, rec)?,
                    }
                    if FileKind::from_mode(st.st_mode) == FileKind::Dir {
                        subdirs.push(Job {
                            parent: Arc::clone(&fd),
                            name: name.to_owned(),
                            rel: job.rel.join(name),
                        });
                    }
                }
                (None, Some(k)) if k.rec.is_live() => {
                    let name = OsStr::from_bytes(&known_names[k.name.clone()]);
                    self.gone(&job.rel.join(name), &k.rec)?;
                }
                (None, _) => {}
            }
        }
        Ok(subdirs)
    }

    /// Lists and stats the entries of `fd` into `buf`; false if the listing failed part
    /// way (then nothing of the directory is compared, so that nothing looks deleted).
    fn list(&self, fd: &OwnedFd, rel: &Path, buf: &mut Buffers) -> bool {
        buf.names.clear();
        buf.entries.clear();
        let mut dir = RawDir::new(fd, buf.listing.spare_capacity_mut());
        while let Some(entry) = dir.next() {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    self.unreadable(rel, e);
                    return false;
                }
            };
            let name = entry.file_name();
            if matches!(name.to_bytes(), b"." | b"..") {
                continue;
            }
            let st = match rustix::fs::statat(fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if self.index.is_own((st.st_dev, st.st_ino), self.root_id) => None,
                Ok(st)
                    if self.ignores.is_ignored(
                        &rel.join(OsStr::from_bytes(name.to_bytes())),
                        FileKind::from_mode(st.st_mode) == FileKind::Dir,
                    ) =>
                {
                    None
                }
                Ok(st) => Some(st),
                // Deleted since the listing: it is not there.
                Err(Errno::NOENT) => continue,
                Err(e) => {
                    self.unreadable(&rel.join(OsStr::from_bytes(name.to_bytes())), e);
                    None
                }
            };
            let start = buf.names.len();
            buf.names.extend_from_slice(name.to_bytes());
            buf.entries.push(Entry {
                name: start..buf.names.len(),
                st,
            });
        }
        true
    }

    fn count(&self, st: &Stat) {
        let c = &self.counters;
        match FileKind::from_mode(st.st_mode) {
            FileKind::Dir => {}
            FileKind::File => {
                c.files.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(st.st_size as u64, Ordering::Relaxed);
            }
            FileKind::Symlink | FileKind::Other => {
                c.files.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn unreadable(&self, path: &Path, error: Errno) {
        self.counters.unreadable.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(path = %path.display(), %error, "scan cannot read this; skipped");
    }

    fn emit(&self, path: &Path, file: Option<FileId>, kind: ChangeKind) {
        self.counters.changes.fetch_add(1, Ordering::Relaxed);
        self.sink.record(Change {
            path: Some(path.to_path_buf()),
            file,
            kind,
            source: Source::Scan,
            pid: None,
        });
    }

    /// Reports a new entry: how it would have been created.
    fn created(&self, dir: &OwnedFd, name: &OsStr, path: &Path, st: &Stat) {
        let id = Some(file_id(st));
        let kind = match FileKind::from_mode(st.st_mode) {
            FileKind::File => ChangeKind::Create,
            FileKind::Dir => ChangeKind::Mkdir,
            FileKind::Other => ChangeKind::Mknod {
                mode: st.st_mode,
                rdev: st.st_rdev,
            },
            FileKind::Symlink => match rustix::fs::readlinkat(dir.as_fd(), name, Vec::new()) {
                Ok(target) => ChangeKind::Symlink {
                    target: PathBuf::from(OsStr::from_bytes(target.as_bytes())),
                },
                // Gone since the stat: nothing to report.
                Err(Errno::NOENT) => return,
                Err(e) => {
                    self.unreadable(path, e);
                    return;
                }
            },
        };
        self.emit(path, id, kind);
    }

    /// Reports the removal of `path`, which the index has as `rec`, live.
    fn gone(&self, path: &Path, rec: &FileRecord) -> Result<(), IndexError> {
        if rec.kind == FileKind::Dir {
            let below = self.snapshot.subtree(path)?;
            // Sorted parents first, so reversed is deepest first.
            for (p, r) in below.iter().rev().filter(|(_, r)| r.is_live()) {
                self.emit(p, Some(record_id(r)), removal(r));
            }
        }
        self.emit(path, Some(record_id(rec)), removal(rec));
        Ok(())
    }

    /// Reports how `parent/name`, present on disk and live in the index, differs. Most
    /// entries do not: their path is only built when there is something to report.
    fn compare(
        &self,
        dir: &OwnedFd,
        parent: &Path,
        name: &OsStr,
        st: &Stat,
        rec: &FileRecord,
    ) -> Result<(), IndexError> {
        let kind = FileKind::from_mode(st.st_mode);
        let (mtime_ns, ctime_ns) = stat_times(st);
        let size = st.st_size as u64;
        let replaced = kind != rec.kind
            || match kind {
                FileKind::File | FileKind::Dir => false,
                FileKind::Symlink => {
                    st.st_ino != rec.ino || size != rec.size || mtime_ns != rec.mtime_ns
                }
                FileKind::Other => st.st_ino != rec.ino || st.st_rdev != rec.rdev,
            };
        let content = kind == FileKind::File
            && (size != rec.size || mtime_ns != rec.mtime_ns || st.st_ino != rec.ino);
        let attrs = AttrChange {
            mode: (st.st_mode != rec.mode).then_some(st.st_mode),
            uid: (st.st_uid != rec.uid).then_some(st.st_uid),
            gid: (st.st_gid != rec.gid).then_some(st.st_gid),
            ..AttrChange::default()
        };
        let attrs_changed = attrs != AttrChange::default();
        let ctime_only = !content && kind != FileKind::Dir && ctime_ns != rec.ctime_ns;
        if !(replaced || content || attrs_changed || ctime_only) {
            return Ok(());
        }
        let path = parent.join(name);
        let id = Some(file_id(st));
        if replaced {
            self.gone(&path, rec)?;
            self.created(dir, name, &path, st);
            return Ok(());
        }
        if content {
            self.emit(&path, id, ChangeKind::Modified);
        }
        if attrs_changed {
            self.emit(&path, id, ChangeKind::SetAttr(attrs));
        } else if ctime_only {
            self.emit(&path, id, ChangeKind::SetAttr(AttrChange::default()));
        }
        Ok(())
    }

    fn report_progress(&self) {
        let Some(progress) = self.progress else {
            return;
        };
        // Whoever finds the interval passed reports; the others do not wait for the lock.
        let Ok(mut last) = self.last_progress.try_lock() else {
            return;
        };
        if last.elapsed() < PROGRESS_EVERY {
            return;
        }
        *last = Instant::now();
        drop(last);
        progress(
            self.counters.files.load(Ordering::Relaxed),
            self.counters.bytes.load(Ordering::Relaxed),
        );
    }
}

fn file_id(st: &Stat) -> FileId {
    FileId {
        dev: st.st_dev,
        ino: st.st_ino,
    }
}

fn record_id(rec: &FileRecord) -> FileId {
    FileId {
        dev: rec.dev,
        ino: rec.ino,
    }
}

fn removal(rec: &FileRecord) -> ChangeKind {
    if rec.kind == FileKind::Dir {
        ChangeKind::Rmdir
    } else {
        ChangeKind::Unlink
    }
}
