//! The receiving side: applying a peer's [`Change`]s to the backing folder so that a crash
//! at any instant leaves every file either as it was or as it should become, and the index
//! advancing only once the data is durable.
//!
//! How each kind of change is made safe:
//! - **New and small files, deltas, whole files** are built in a temporary file in the
//!   target's directory (`O_TMPFILE`, so a crash leaves no name behind), given their
//!   metadata, fsync'd, and then put in place in one step (`linkat` for a new name,
//!   `rename` over an old one), and the directory is fsync'd (after the mount was told, so
//!   a reader sees the file a flush sooner). A reader sees the old file or the new one,
//!   never a half-written one. During an initial sync, files sent whole wait in a batch
//!   that is made durable and put in place together ([`Applier::apply_deferred`]).
//! - **Large files** (from [`SMALL_FILE`] bytes, or with more than one hard link, which a
//!   rename would split) are patched in place under the redo [`Journal`]: the ranges are
//!   journaled and fsync'd first, then written, the file fsync'd, the journal emptied.
//!   [`Applier::open`] replays a complete record left by a crash and drops a torn one. The
//!   cost follows the size of the change, not of the file. While a patch is written a
//!   reader of that file can see part of it; that is the price of not copying the file.
//! - **Whole-file transfers** arrive in pieces into a partial file in the state directory
//!   (`partial/<BLAKE3 of the path>.data`, with a `.head` naming the path and the
//!   version), fsync'd every [`CHECKPOINT`] bytes; the target is untouched until the last
//!   piece. The version identity is [`version_id`] of the size and mtime the sender
//!   announced (the receiver cannot know the content hash before it has the content), so
//!   [`Applier::want`] reports `resume: Some((version_id, bytes held))` and the sender
//!   resumes when its file still has that size and mtime.
//! - **Names** (directories, symlinks, device nodes, links, removals, renames) are single
//!   `*at()` calls, followed by an fsync of the directories involved. A symlink or device
//!   node is created under a temporary name and renamed over the old entry.
//!
//! Every path is checked by [`safe_path::checked`] and resolved from the folder's
//! descriptor without following symlinks ([`safe_path::open_parent`]); nothing here joins
//! path strings onto the folder's path.
//!
//! The few temporary names this module creates (for symlinks, device nodes, and replacing
//! an existing file) start with [`TEMP_PREFIX`]; the one in use is noted in
//! `<state dir>/pending-temp` before it is created, and [`Applier::open`] removes it if a
//! crash left it behind.
//!
//! Known limits: a delta or whole-file transfer replaces the file's inode, so other hard
//! links to it keep the old content (the sender's change for those names fixes them). A
//! delta reads the current file through a memory map: a local process truncating that
//! file at the same moment would crash the daemon (receive-only mounts refuse local
//! writes, so only a process writing to the backing folder directly can do this).

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fast_rsync::{Signature, SignatureOptions};
use rustix::fs::{
    AtFlags, FileType, Mode, OFlags, RenameFlags, Timespec, Timestamps, XattrFlags, CWD, UTIME_OMIT,
};
use rustix::io::Errno;

use super::delta::content_hash;
use super::journal::{Found, Journal, JournalError};
use super::proto::{Change, Codec, FileData, Hash, Meta, Op, Payload, RelPath, Want};
use super::safe_path::{self, Parent, PathError, ResolveError};
use super::vector::Vector;
use super::versions::{Versions, DEFAULT_KEEP, VERSIONS_DIR};
use crate::index::{read_full, record_for, FileRecord, Index, IndexError, BLOCK_SIZE};

/// Files from this size on are patched in place under the journal rather than copied.
pub const SMALL_FILE: u64 = 1024 * 1024;

/// A whole-file transfer is made durable (and resumable) every this many bytes.
pub const CHECKPOINT: u64 = 32 * BLOCK_SIZE;

/// Names of the temporary entries the applier creates in the folder start with this.
pub const TEMP_PREFIX: &str = ".filesync-tmp.";

const PENDING_TEMP: &str = "pending-temp";
const PARTIAL_DIR: &str = "partial";
const PARTIAL_MAGIC: &[u8; 8] = b"FSPART01";
/// Offset of the durable-length field in a partial's head.
const HEAD_DURABLE_AT: u64 = 8 + 32;

/// Deepest directory tree a removal descends into (it holds one descriptor per level).
const MAX_TREE_DEPTH: usize = 512;
/// The most entries one removal deletes; a tree that keeps growing while it is removed
/// stops it here instead of looping forever.
const MAX_TREE_ENTRIES: u64 = 1 << 32;

/// Signatures describe at most about this many blocks, so that a [`Want`] stays far below
/// [`MAX_MESSAGE`](super::proto::MAX_MESSAGE) even for large files (16 bytes per block: 256 KiB).
const SIGNATURE_BLOCKS: u64 = 16 * 1024;
const SIGNATURE_MIN_BLOCK: u64 = 2048;
const SIGNATURE_MAX_BLOCK: u64 = 1024 * 1024;
/// Bytes of MD4 kept per block. A false match yields wrong content, which the BLAKE3
/// block hashes sent with the delta catch (the sender should send them for every block).
const SIGNATURE_STRONG_BYTES: u32 = 12;

/// Why a change could not be applied. Each leaves the folder as it was, except where
/// noted: the integrator can retry, ask for the whole file, or resynchronise the path.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("refused path {path:?} from the peer: {reason}; nothing was changed (the sender must send paths inside the folder)")]
    BadPath { path: String, reason: PathError },
    #[error(
        "cannot open {path:?}: {source}; check that it exists, is a directory and is accessible"
    )]
    Setup { path: PathBuf, source: io::Error },
    #[error(
        "{path:?}: {what} failed: {source}; check the backing folder's permissions and free space"
    )]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("{path:?}: payload still encoded as {codec:?}; decompress it before applying")]
    Encoded { path: PathBuf, codec: Codec },
    #[error("{path:?}: malformed change ({reason}); ask the sender for the whole file")]
    BadPayload { path: PathBuf, reason: String },
    #[error(
        "{path:?}: the local content is not the delta's base; ask the sender for the whole file"
    )]
    BaseMismatch { path: PathBuf },
    #[error("{path:?}: the result does not match the sender's block hashes; ask the sender for the whole file")]
    Diverged { path: PathBuf },
    #[error("{path:?} is not here but the change needs it; ask the sender for the whole file or directory")]
    Missing { path: PathBuf },
    #[error("{path:?}: whole-file piece at offset {offset} does not continue the {held} bytes held for this version; call want() and resume from what it reports")]
    OutOfOrder {
        path: PathBuf,
        offset: u64,
        held: u64,
    },
    #[error("{path:?}: data is durable but the index was not updated: {source}")]
    Index {
        path: PathBuf,
        source: Box<IndexError>,
    },
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// What [`Applier::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Relative paths whose state changed (for cache invalidation): the change's path(s),
    /// directories created on the way, and removed paths (their subtrees implied).
    pub paths: Vec<PathBuf>,
    /// True when the change is in place, durable and recorded in the index, so it may be
    /// acknowledged (after [`Applier::apply_deferred`]: once [`Applier::commit_deferred`]
    /// returns `Ok`). False only for a non-final whole-file piece, which is staged (durable
    /// at checkpoints) while the target stays untouched.
    pub durable: bool,
}

/// The identity of a file version for resuming a whole-file transfer: BLAKE3 of the
/// announced size and mtime. The sender compares it with the same function of its file.
pub fn version_id(size: u64, mtime_ns: i64) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"filesync version\0");
    hasher.update(&size.to_le_bytes());
    hasher.update(&mtime_ns.to_le_bytes());
    *hasher.finalize().as_bytes()
}

/// Applies received changes to one backing folder. One applier per folder; changes are
/// applied one at a time, in order.
pub struct Applier {
    /// The backing folder, `O_PATH | O_DIRECTORY`.
    root: OwnedFd,
    state_dir: PathBuf,
    /// `<state dir>/partial`, `O_RDONLY | O_DIRECTORY`.
    partial_dir: OwnedFd,
    index: Arc<Index>,
    /// Ownership is applied only when running as root.
    as_root: bool,
    journal: Journal,
    pending_temp: File,
    /// Whether the journal holds a record whose patch failed part-way (an I/O error):
    /// the next change first finishes it, so a new record never overwrites it.
    journal_pending: bool,
    /// Whether the "cannot set this xattr" notice was logged (once per applier).
    xattr_skip_logged: bool,
    /// Index records of durable files not yet committed (see [`Applier::apply_deferred`]).
    deferred: Vec<Update>,
    /// The paths in `deferred`: a change of one of them commits the group first.
    deferred_paths: HashSet<PathBuf>,
    /// New versions of files written whole, complete but not yet fsync'd nor in place:
    /// [`Applier::commit_deferred`] makes them durable and puts them in place together.
    pending: Vec<PendingFile>,
    /// The paths in `pending`, so a change can ask whether its path waits without a
    /// scan of the batch (which holds up to [`MAX_PENDING_FILES`]).
    pending_paths: HashSet<PathBuf>,
    /// Bytes held in `pending`.
    pending_bytes: u64,
    /// Set while [`Applier::apply_deferred`] applies a change that may join `pending`.
    place_later: bool,
    /// The version each of the last few paths was applied at: a change continuing the
    /// same version (the next piece of one write) replaces nothing worth keeping.
    applied_versions: HashMap<PathBuf, Vector>,
    /// Set while applying a change that continues the version of its path.
    continues_version: bool,
    /// Directories a file was just put into, fsync'd once the change's `visible` callback
    /// ran (see [`Applier::place`]).
    unsynced_dirs: Vec<(PathBuf, OwnedFd)>,
    /// Where what the changes replace or remove is kept.
    versions: Versions,
    /// The version vector each path gets once its change is committed (see
    /// [`Applier::will_have`]).
    vectors_due: HashMap<PathBuf, Vector>,
}

/// Files patched in place are copied into the version store first only up to this size;
/// a larger one would cost its whole size per small change (see [`crate::sync::versions`]).
pub const MAX_COPIED_VERSION: u64 = 256 << 20;
/// Paths whose last applied version the applier remembers (see `applied_versions`).
const REMEMBERED_VERSIONS: usize = 256;

/// A file written whole into an unnamed temporary file, waiting for
/// [`Applier::commit_deferred`].
struct PendingFile {
    rel: PathBuf,
    parent: Parent,
    file: File,
}

/// At most this many vectors wait for their changes' commits (see [`Applier::will_have`]).
const MAX_VECTORS_DUE: usize = 1 << 16;

/// From this many files a batch is made durable with `syncfs` (see
/// [`Applier::place_pending`]).
const SYNCFS_FROM: usize = 16;

/// At most this many files wait in [`Applier::commit_deferred`]'s batch...
const MAX_PENDING_FILES: usize = 1024;
/// ... and at most this many bytes, so a batch's dirty pages stay small.
const MAX_PENDING_BYTES: u64 = 64 << 20;

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("state_dir", &self.state_dir)
            .field("as_root", &self.as_root)
            .finish()
    }
}

/// How the index learns about a change once it is durable.
#[derive(Default)]
struct Outcome {
    /// Tombstoned first, subtrees included.
    removed: Vec<PathBuf>,
    /// Then read back from disk.
    changed: Vec<Update>,
    /// The file waits in [`Applier::pending`]; nothing is in place yet.
    placed_later: bool,
}

/// A path to record again: with the record whose block hashes may be reused and the
/// ranges that changed since (`None`: hash everything).
type Update = (PathBuf, Option<FileRecord>, Option<Vec<(u64, u64)>>);

/// A temporary file that becomes the target.
enum Temp {
    /// `O_TMPFILE`: no name until it is linked in.
    Unnamed(File),
    /// Where `O_TMPFILE` is not supported: a [`TEMP_PREFIX`] name in the same directory.
    Named(File, OsString),
}

impl Temp {
    fn file(&self) -> &File {
        match self {
            Temp::Unnamed(f) | Temp::Named(f, _) => f,
        }
    }
}

fn io_err<'a, E: Into<io::Error>>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(E) -> ApplyError + 'a {
    move |e| ApplyError::Io {
        path: path.to_path_buf(),
        what,
        source: e.into(),
    }
}

fn bad_path(path: &[u8], reason: PathError) -> ApplyError {
    ApplyError::BadPath {
        path: String::from_utf8_lossy(path).into_owned(),
        reason,
    }
}

/// `path` checked as a path below the folder (see [`safe_path::checked`]).
pub fn checked(path: &RelPath) -> Result<PathBuf, ApplyError> {
    safe_path::checked(path).map_err(|reason| bad_path(&path.0, reason))
}

fn resolve_err<'a>(
    rel: &'a Path,
    what: &'static str,
) -> impl FnOnce(ResolveError) -> ApplyError + 'a {
    move |e| match e {
        ResolveError::Unsafe(reason) => bad_path(rel.as_os_str().as_bytes(), reason),
        ResolveError::Io(source) => ApplyError::Io {
            path: rel.to_path_buf(),
            what,
            source,
        },
    }
}

fn proc_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn timestamps(mtime_ns: i64) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: mtime_ns.rem_euclid(1_000_000_000),
        },
    }
}

/// The raw bytes of a payload; compressed payloads must have been decoded before.
fn raw<'a>(rel: &Path, payload: &'a Payload) -> Result<&'a [u8], ApplyError> {
    if payload.codec != Codec::Raw {
        return Err(ApplyError::Encoded {
            path: rel.to_path_buf(),
            codec: payload.codec,
        });
    }
    if payload.raw_len as usize != payload.bytes.len() {
        return Err(ApplyError::BadPayload {
            path: rel.to_path_buf(),
            reason: format!(
                "payload says {} bytes but carries {}",
                payload.raw_len,
                payload.bytes.len()
            ),
        });
    }
    Ok(&payload.bytes)
}

/// Largest file offset accepted (what `off_t` holds).
const MAX_OFFSET: u64 = i64::MAX as u64;

fn check_extent(rel: &Path, offset: u64, len: usize) -> Result<(), ApplyError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= MAX_OFFSET => Ok(()),
        _ => Err(ApplyError::BadPayload {
            path: rel.to_path_buf(),
            reason: format!("range at {offset} of {len} bytes lies beyond the largest file"),
        }),
    }
}

/// Checks the `blocks` the sender hashed against what the file will hold once `ranges`
/// are written over `old` (of `old_size` bytes) and it is cut or extended to `size`:
/// computed before anything is written, so a mismatch changes nothing.
fn check_blocks(
    rel: &Path,
    old: Option<&File>,
    old_size: u64,
    ranges: &[(u64, &[u8])],
    size: u64,
    blocks: &[(u64, Hash)],
) -> Result<(), ApplyError> {
    let diverged = || ApplyError::Diverged {
        path: rel.to_path_buf(),
    };
    let mut buf = Vec::new();
    for (index, hash) in blocks {
        let start = index.checked_mul(BLOCK_SIZE).ok_or_else(diverged)?;
        if start >= size {
            return Err(diverged());
        }
        let end = (start + BLOCK_SIZE).min(size);
        buf.clear();
        buf.resize((end - start) as usize, 0);
        if let Some(old) = old {
            let old_end = end.min(old_size);
            if old_end > start {
                read_full(old, &mut buf[..(old_end - start) as usize], start)
                    .map_err(io_err(rel, "reading the file"))?;
            }
        }
        for (offset, data) in ranges {
            let range_end = offset + data.len() as u64;
            let from = (*offset).max(start);
            let to = range_end.min(end);
            if from < to {
                let src = &data[(from - offset) as usize..(to - offset) as usize];
                buf[(from - start) as usize..(to - start) as usize].copy_from_slice(src);
            }
        }
        if blake3::hash(&buf).as_bytes() != hash {
            tracing::debug!(path = ?rel, block = index, old_size, size, ranges = ranges.len(), "block differs from the sender's");
            return Err(diverged());
        }
    }
    Ok(())
}

fn write_ranges(file: &File, ranges: &[(u64, &[u8])], size: u64) -> io::Result<()> {
    for (offset, data) in ranges {
        file.write_all_at(data, *offset)?;
    }
    file.set_len(size)
}

/// Copies the first `len` bytes of `from` into `to` (a reflink where the filesystem can).
fn copy_prefix(from: &File, to: &File, len: u64) -> io::Result<()> {
    let (mut off_in, mut off_out) = (0u64, 0u64);
    while off_in < len {
        let want = usize::try_from(len - off_in)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want) {
            Ok(0) => break,
            Ok(_) => {}
            Err(Errno::INTR) => {}
            Err(Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                return copy_by_reading(from, to, off_in, len);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn copy_by_reading(from: &File, to: &File, start: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = start;
    while at < len {
        let want = ((len - at) as usize).min(buf.len());
        let got = read_full(from, &mut buf[..want], at)?;
        if got == 0 {
            break;
        }
        to.write_all_at(&buf[..got], at)?;
        at += got as u64;
    }
    Ok(())
}

/// The content of `file` (`len` bytes) for reading in place.
fn map(file: &File, len: u64) -> io::Result<Content> {
    if len == 0 {
        return Ok(Content::Empty);
    }
    // SAFETY: the map is only read. The backing folder of a receiving node is written by
    // this applier alone (its mount refuses local writes); see the module notes.
    let map = unsafe { memmap2::Mmap::map(file)? };
    Ok(Content::Mapped(map))
}

enum Content {
    Empty,
    Mapped(memmap2::Mmap),
}

impl Content {
    fn bytes(&self) -> &[u8] {
        match self {
            Content::Empty => &[],
            Content::Mapped(m) => m,
        }
    }
}

fn signature_options(len: u64) -> SignatureOptions {
    let block = len
        .div_ceil(SIGNATURE_BLOCKS)
        .max(SIGNATURE_MIN_BLOCK)
        .next_power_of_two()
        .min(SIGNATURE_MAX_BLOCK);
    SignatureOptions {
        block_size: block as u32,
        crypto_hash_size: SIGNATURE_STRONG_BYTES,
    }
}

/// An xattr call target: a readable descriptor, or the procfs path of an `O_PATH` one.
enum XattrTarget<'a> {
    Fd(BorrowedFd<'a>),
    Proc(PathBuf),
}

impl XattrTarget<'_> {
    fn list(&self, buf: &mut [u8]) -> rustix::io::Result<usize> {
        match self {
            XattrTarget::Fd(fd) => rustix::fs::flistxattr(fd, buf),
            XattrTarget::Proc(p) => rustix::fs::listxattr(p, buf),
        }
    }

    fn set(&self, name: &OsStr, value: &[u8]) -> rustix::io::Result<()> {
        match self {
            XattrTarget::Fd(fd) => rustix::fs::fsetxattr(fd, name, value, XattrFlags::empty()),
            XattrTarget::Proc(p) => rustix::fs::setxattr(p, name, value, XattrFlags::empty()),
        }
    }

    fn remove(&self, name: &OsStr) -> rustix::io::Result<()> {
        match self {
            XattrTarget::Fd(fd) => rustix::fs::fremovexattr(fd, name),
            XattrTarget::Proc(p) => rustix::fs::removexattr(p, name),
        }
    }

    /// The attribute names, or none where the filesystem has no xattrs.
    fn names(&self) -> io::Result<Vec<Vec<u8>>> {
        let mut buf = vec![0u8; 1024];
        for _ in 0..8 {
            match self.list(&mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf
                        .split(|&b| b == 0)
                        .filter(|n| !n.is_empty())
                        .map(<[u8]>::to_vec)
                        .collect());
                }
                Err(Errno::RANGE) => buf.resize(buf.len() * 4, 0),
                Err(Errno::NOTSUP) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            }
        }
        Err(Errno::RANGE.into())
    }
}

/// Namespaces whose attributes belong to the local system (labels, ACLs, trusted data):
/// kept when the sender does not list them, skipped with a notice when they cannot be set.
fn is_system_xattr(name: &[u8]) -> bool {
    name.starts_with(b"security.") || name.starts_with(b"system.") || name.starts_with(b"trusted.")
}

impl Applier {
    /// Opens the applier for the backing folder `root`, with its journal, partial
    /// transfers and notes in `state_dir` (created if missing; keep it outside the
    /// folder, on the same filesystem for whole-file transfers to finish by rename).
    /// Rolls forward an in-place patch a crash interrupted, drops a torn one, removes a
    /// temporary entry a crash left in the folder, and partial transfers whose head is
    /// damaged.
    pub fn open(root: &Path, state_dir: &Path, index: Arc<Index>) -> Result<Applier, ApplyError> {
        let setup = |path: &Path| {
            let path = path.to_path_buf();
            move |source: io::Error| ApplyError::Setup { path, source }
        };
        let root_fd = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| setup(root)(e.into()))?;
        std::fs::create_dir_all(state_dir).map_err(setup(state_dir))?;
        let partial_path = state_dir.join(PARTIAL_DIR);
        match std::fs::create_dir(&partial_path) {
            Ok(()) => File::open(state_dir)
                .and_then(|d| d.sync_all())
                .map_err(setup(state_dir))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(setup(&partial_path)(e)),
        }
        let partial_dir = rustix::fs::open(
            &partial_path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| setup(&partial_path)(e.into()))?;
        let pending_path = state_dir.join(PENDING_TEMP);
        let pending_temp = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&pending_path)
            .map_err(setup(&pending_path))?;
        let journal = Journal::open(state_dir)?;
        let versions = Versions::open(state_dir, Some(DEFAULT_KEEP)).map_err(setup(state_dir))?;
        let mut applier = Applier {
            root: root_fd,
            state_dir: state_dir.to_path_buf(),
            partial_dir,
            index,
            as_root: rustix::process::geteuid().is_root(),
            journal,
            pending_temp,
            journal_pending: false,
            xattr_skip_logged: false,
            deferred: Vec::new(),
            deferred_paths: HashSet::new(),
            pending: Vec::new(),
            pending_paths: HashSet::new(),
            pending_bytes: 0,
            place_later: false,
            applied_versions: HashMap::new(),
            continues_version: false,
            unsynced_dirs: Vec::new(),
            versions,
            vectors_due: HashMap::new(),
        };
        applier.roll_forward()?;
        applier.remove_pending_temp()?;
        applier.sweep_partials();
        Ok(applier)
    }

    /// Keeps what changes replace or remove for `keep` (`None`: nothing is kept), and
    /// drops versions older than that.
    pub fn keep_versions(&mut self, keep: Option<Duration>) -> Result<(), ApplyError> {
        self.versions =
            Versions::open(&self.state_dir, keep).map_err(|source| ApplyError::Setup {
                path: self.state_dir.join(VERSIONS_DIR),
                source,
            })?;
        self.expire_versions();
        Ok(())
    }

    /// Drops versions older than the keeping time.
    pub fn expire_versions(&self) {
        match self.versions.expire() {
            Ok(0) => {}
            Ok(n) => tracing::info!("dropped {n} expired version(s)"),
            Err(err) => tracing::warn!(
                "cannot drop expired versions in {}: {err}; check the folder's permissions",
                self.state_dir.join(VERSIONS_DIR).display()
            ),
        }
    }

    /// Finishes the in-place patch the journal holds, if a crash interrupted one.
    fn roll_forward(&mut self) -> Result<(), ApplyError> {
        let record = match self.journal.take()? {
            Found::Complete(record) => record,
            Found::Empty | Found::Discarded => return Ok(()),
        };
        let rel = checked(&RelPath(record.path.as_os_str().as_bytes().to_vec()))?;
        let opened =
            safe_path::open_beneath(self.root.as_fd(), &rel, OFlags::RDWR | OFlags::NONBLOCK);
        let fd = match opened {
            Ok(fd) => fd,
            Err(ResolveError::Io(e)) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err(&rel, "opening the journaled file")(e));
            }
            Err(e) => {
                tracing::warn!(path = ?rel, error = %e, "the journaled file is gone; dropping its patch");
                self.journal.clear()?;
                return Ok(());
            }
        };
        let file = File::from(fd);
        let size_before = file.metadata().map_err(io_err(&rel, "stat"))?.len();
        let ranges: Vec<(u64, &[u8])> = record
            .ranges
            .iter()
            .map(|(offset, data)| (*offset, data.as_slice()))
            .collect();
        write_ranges(&file, &ranges, record.size).map_err(io_err(&rel, "replaying the journal"))?;
        file.sync_all().map_err(io_err(&rel, "fsync"))?;
        self.journal.clear()?;
        tracing::info!(path = ?rel, ranges = ranges.len(), "rolled forward an interrupted patch");
        let dirty = dirty_ranges(&ranges, size_before, record.size);
        let previous = self.live_record(&rel)?;
        self.commit(Outcome {
            changed: vec![(rel, previous, Some(dirty))],
            ..Outcome::default()
        })?;
        Ok(())
    }

    /// Removes the temporary entry a crash may have left between its creation and its
    /// rename.
    fn remove_pending_temp(&mut self) -> Result<(), ApplyError> {
        let pending = std::fs::read(self.state_dir.join(PENDING_TEMP)).unwrap_or_default();
        if !pending.is_empty() {
            let name_ok = pending
                .rsplit(|&b| b == b'/')
                .next()
                .is_some_and(|n| n.starts_with(TEMP_PREFIX.as_bytes()));
            if let (true, Ok(rel)) = (name_ok, safe_path::checked(&RelPath(pending))) {
                if let Ok(parent) = safe_path::open_parent(self.root.as_fd(), &rel, false) {
                    match rustix::fs::unlinkat(
                        &parent.dir,
                        parent.name.as_os_str(),
                        AtFlags::empty(),
                    ) {
                        Ok(()) => {
                            tracing::info!(path = ?rel, "removed a temporary entry left by a crash")
                        }
                        Err(Errno::NOENT) => {}
                        Err(e) => {
                            tracing::warn!(path = ?rel, error = %e, "cannot remove a temporary entry left by a crash")
                        }
                    }
                }
            }
        }
        self.pending_temp
            .set_len(0)
            .map_err(io_err(&self.state_dir, "clearing pending-temp"))
    }

    /// Removes partial-transfer files whose other half is missing or whose head is damaged.
    fn sweep_partials(&self) {
        let Ok(mut dir) = rustix::fs::Dir::read_from(&self.partial_dir) else {
            return;
        };
        let mut names = Vec::new();
        while let Some(Ok(entry)) = dir.read() {
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        }
        for name in names {
            let stem = name
                .strip_suffix(b".data")
                .or_else(|| name.strip_suffix(b".head"));
            let keep = stem.is_some_and(|stem| {
                let head = [stem, b".head"].concat();
                let data = [stem, b".data"].concat();
                names_exist(&self.partial_dir, &data) && self.read_head_named(&head).is_some()
            });
            if !keep {
                let _ = rustix::fs::unlinkat(
                    &self.partial_dir,
                    OsStr::from_bytes(&name),
                    AtFlags::empty(),
                );
                tracing::info!(name = %String::from_utf8_lossy(&name), "removed a stale partial transfer file");
            }
        }
    }

    /// Applies one change. On `Ok` the change is durable and the index updated (see
    /// [`Applied::durable`]); on `Err` the folder is as before, except for an in-place
    /// patch whose writing failed (finished from its journal before the next change),
    /// directories created for the path, and an entry of another kind removed for a type
    /// change.
    pub fn apply(&mut self, change: &Change) -> Result<Applied, ApplyError> {
        self.apply_then(change, |_| {})
    }

    /// Like [`Applier::apply_then`], but batched for the many small files of an initial
    /// sync: a new version of a file written whole in one piece is left complete in an
    /// unnamed temporary file, and [`Applier::commit_deferred`] later fsyncs the batch
    /// together, puts every file in place and commits their index records in one
    /// transaction. That turns two journal commits per file into two per batch. Until
    /// then nothing is visible and a crash loses only the unnamed files (the sender has
    /// no acknowledgement for them and sends them again). Any other change first
    /// finishes the batch, so changes still take effect in order; `visible` then also
    /// gets the paths the batch put in place.
    pub fn apply_deferred(
        &mut self,
        change: &Change,
        visible: impl FnOnce(&[PathBuf]),
    ) -> Result<Applied, ApplyError> {
        self.apply_inner(change, visible, true)
    }

    /// Leaves the index records of changes in place for [`Applier::commit_deferred`].
    fn defer_records(&mut self, changed: Vec<Update>) {
        self.deferred_paths
            .extend(changed.iter().map(|(path, _, _)| path.clone()));
        self.deferred.extend(changed);
    }

    /// Records that `path` has version `vector` once the change being applied to it is
    /// committed: the vector is stored right after the index records (a crash in between
    /// leaves the older vector, and the peer's unacknowledged change is applied again).
    pub fn will_have(&mut self, path: PathBuf, vector: Vector) {
        // Changes that failed leave theirs behind; past this many, forget them all (a
        // path without its vector is compared again at the next catch-up).
        if self.vectors_due.len() >= MAX_VECTORS_DUE {
            self.vectors_due.clear();
        }
        self.vectors_due.insert(path, vector);
    }

    /// What is at `path` on disk now, read afresh (the index may lag behind a local change
    /// still on its way through the pipeline); `None` when nothing is there.
    pub fn current_record(&self, path: &Path) -> Result<Option<FileRecord>, ApplyError> {
        record_for(self.root.as_fd(), path, None, None).map_err(|source| ApplyError::Index {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// Whether a change to `path` was applied but its index record not committed yet (it
    /// waits in the group): the index then lags the disk.
    pub fn is_uncommitted(&self, path: &Path) -> bool {
        self.deferred_paths.contains(path) || self.pending_paths.contains(path)
    }

    /// Whether the regular file at `path` changed on disk since `record` was indexed (and
    /// not by this applier, whose own changes wait in its group): size, mtime, ctime or
    /// inode differ. Anything else than a live file on both sides counts as unchanged.
    pub fn changed_since_indexed(&self, path: &Path, record: Option<&FileRecord>) -> bool {
        let Some(record) = record.filter(|r| r.is_live()) else {
            return false;
        };
        if self.deferred_paths.contains(path) || self.pending_paths.contains(path) {
            return false;
        }
        let Ok(stat) = safe_path::stat_beneath(self.root.as_fd(), path) else {
            return false;
        };
        let mtime_ns = stat.st_mtime * 1_000_000_000 + stat.st_mtime_nsec as i64;
        let ctime_ns = stat.st_ctime * 1_000_000_000 + stat.st_ctime_nsec as i64;
        FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile
            && (stat.st_size as u64 != record.size
                || mtime_ns != record.mtime_ns
                || ctime_ns != record.ctime_ns
                || stat.st_ino != record.ino)
    }

    /// The content of the regular file at `path`, if it has at most `max` bytes.
    pub fn read_small(&self, path: &RelPath, max: u64) -> Result<Option<Vec<u8>>, ApplyError> {
        use std::io::Read;
        let rel = checked(path)?;
        let flags = OFlags::RDONLY | OFlags::NONBLOCK;
        let file = match safe_path::open_beneath(self.root.as_fd(), &rel, flags) {
            Ok(fd) => File::from(fd),
            Err(ResolveError::Unsafe(reason)) => return Err(bad_path(path.0.as_slice(), reason)),
            Err(ResolveError::Io(_)) => return Ok(None),
        };
        let meta = file.metadata().map_err(io_err(&rel, "stat"))?;
        if !meta.is_file() || meta.len() > max {
            return Ok(None);
        }
        let mut content = Vec::with_capacity(meta.len() as usize);
        file.take(max.saturating_add(1))
            .read_to_end(&mut content)
            .map_err(io_err(&rel, "reading"))?;
        Ok((content.len() as u64 <= max).then_some(content))
    }

    /// How many files wait in the batch [`Applier::commit_deferred`] finishes.
    pub fn files_waiting(&self) -> usize {
        self.pending.len()
    }

    /// Whether the batch is as large as it may get (the next file finishes it).
    pub fn batch_is_full(&self) -> bool {
        self.pending.len() >= MAX_PENDING_FILES || self.pending_bytes >= MAX_PENDING_BYTES
    }

    /// Finishes what [`Applier::apply_deferred`] left: makes the waiting files durable,
    /// puts them in place and commits the index records. Returns the paths now in place
    /// (for cache invalidation). On `Err` some files of the batch may be missing; none is
    /// torn, and the index records what is on disk.
    pub fn commit_deferred(&mut self) -> Result<Vec<PathBuf>, ApplyError> {
        let (mut shown, placing) = self.place_pending();
        self.sync_placed_dirs()?;
        let changed = std::mem::take(&mut self.deferred);
        self.deferred_paths.clear();
        if !changed.is_empty() {
            let committed = self.commit(Outcome {
                changed,
                ..Outcome::default()
            })?;
            shown.extend(committed);
            shown.sort_unstable();
            shown.dedup();
        }
        placing.map(|()| shown)
    }

    /// Makes the waiting files durable and puts them in place, like
    /// [`Applier::commit_deferred`], but leaves the fsync of their names and the index
    /// commit for later: a change that follows soon shares them (group commit). Returns
    /// the paths now in place, for the mount to show; nothing is acknowledged before
    /// `commit_deferred` finishes them.
    pub fn place_waiting(&mut self) -> Result<Vec<PathBuf>, ApplyError> {
        let (placed, placing) = self.place_pending();
        placing.map(|()| placed)
    }

    /// Whether changes are applied but not yet committed ([`Applier::commit_deferred`]).
    pub fn has_uncommitted(&self) -> bool {
        !self.pending.is_empty() || !self.deferred.is_empty() || !self.unsynced_dirs.is_empty()
    }

    /// Makes the files in [`Applier::pending`] durable and links them in. A large batch
    /// takes two `syncfs` calls (data and inodes, then the new names): on a journaling
    /// file system every file's own fsync waits for a journal commit of its own, since its
    /// extents are converted when its writeback completes. A small batch (the latency
    /// case) fsyncs its files, starting the writeback of all before waiting on any, then
    /// notes each directory for one fsync before the index commit. Returns the paths
    /// placed and the first error (the other files are still placed).
    fn place_pending(&mut self) -> (Vec<PathBuf>, Result<(), ApplyError>) {
        let pending = std::mem::take(&mut self.pending);
        self.pending_paths.clear();
        self.pending_bytes = 0;
        let Some(first) = pending.first() else {
            return (Vec::new(), Ok(()));
        };
        let first_rel = first.rel.clone();
        let syncfs_err =
            |err: io::Error| io_err(&first_rel, "syncfs of the folder's file system")(err);
        let whole_fs = match pending.len() >= SYNCFS_FROM {
            // Any descriptor on the folder's file system names it for syncfs.
            true => match first.parent.dir.try_clone() {
                Ok(fd) => Some(fd),
                Err(err) => return (Vec::new(), Err(syncfs_err(err))),
            },
            false => None,
        };
        match &whole_fs {
            Some(fs) => {
                if let Err(err) = rustix::fs::syncfs(fs) {
                    // Nothing is known durable, so nothing is placed.
                    return (Vec::new(), Err(syncfs_err(err.into())));
                }
            }
            None => pending
                .iter()
                .for_each(|waiting| start_writeback(&waiting.file)),
        }
        let mut first_error = Ok(());
        let mut note = |result: Result<(), ApplyError>| {
            if let (Err(err), true) = (result, first_error.is_ok()) {
                first_error = Err(err);
            }
        };
        let mut placed = Vec::with_capacity(pending.len());
        for PendingFile { rel, parent, file } in pending {
            let durable = match whole_fs {
                Some(_) => Ok(()),
                None => file.sync_all().map_err(io_err(&rel, "fsync")),
            };
            match durable.and_then(|()| self.put_in_place(&parent, &rel, Temp::Unnamed(file))) {
                Ok(()) => {
                    let dir = rel.parent().unwrap_or(Path::new("")).to_path_buf();
                    let known = self.unsynced_dirs.iter().any(|(d, _)| *d == dir);
                    if whole_fs.is_none() && !known {
                        self.unsynced_dirs.push((dir, parent.dir));
                    }
                    placed.push(rel);
                }
                Err(err) => note(Err(err)),
            }
        }
        if let Some(fs) = &whole_fs {
            note(rustix::fs::syncfs(fs).map_err(|err| syncfs_err(err.into())));
        }
        (placed, first_error)
    }

    /// [`Applier::apply`], calling `visible` with the paths whose new state is in place
    /// (durable) before the index is updated, so a mount can show it a little sooner.
    pub fn apply_then(
        &mut self,
        change: &Change,
        visible: impl FnOnce(&[PathBuf]),
    ) -> Result<Applied, ApplyError> {
        self.apply_inner(change, visible, false)
    }

    fn apply_inner(
        &mut self,
        change: &Change,
        visible: impl FnOnce(&[PathBuf]),
        defer: bool,
    ) -> Result<Applied, ApplyError> {
        if self.journal_pending {
            self.roll_forward()?;
            self.journal_pending = false;
        }
        let rel = checked(&change.path)?;
        let may_wait = defer && is_whole_in_one(&change.op) && !self.pending_paths.contains(&rel);
        // A file change of another path may join the group that waits for its commit: its
        // own fsync then carries the earlier names to disk, and one index commit serves all.
        let joins_group = defer
            && matches!(change.op, Op::File { .. })
            && self.pending.is_empty()
            && !self.deferred_paths.contains(&rel);
        let mut shown = Vec::new();
        if !may_wait && !joins_group {
            shown = self.commit_deferred()?;
        }
        self.place_later = may_wait;
        self.continues_version =
            !change.version.is_empty() && self.applied_versions.get(&rel) == Some(&change.version);
        let result = self.apply_op(&rel, &change.op);
        self.place_later = false;
        self.continues_version = false;
        if result.is_ok() && !change.version.is_empty() {
            if self.applied_versions.len() >= REMEMBERED_VERSIONS {
                self.applied_versions.clear();
            }
            self.applied_versions
                .insert(rel.clone(), change.version.clone());
        }
        if result.is_err() {
            self.sync_placed_dirs()?;
            // A temporary name the failed change may have left (only where O_TMPFILE is
            // not supported, or between a link and its rename).
            self.remove_pending_temp()?;
        }
        let (outcome, durable) = result?;
        if outcome.placed_later {
            self.defer_records(outcome.changed);
            if self.batch_is_full() {
                shown.extend(self.commit_deferred()?);
            }
            visible(&shown);
            self.sync_placed_dirs()?;
            tracing::trace!(seq = change.seq, path = ?rel, "change applied, placed later");
            return Ok(Applied {
                paths: vec![rel],
                durable,
            });
        }
        let in_place: Vec<PathBuf> = outcome
            .removed
            .iter()
            .cloned()
            .chain(outcome.changed.iter().map(|(path, _, _)| path.clone()))
            .collect();
        shown.extend(in_place.iter().cloned());
        visible(&shown);
        // Records read whole from disk do not depend on the index's earlier state, so
        // they may wait, and so may a file change joining the group (no other change of
        // its path is applied before the group commits); anything else first commits
        // what waits, keeping the order.
        let whole = outcome.removed.is_empty()
            && outcome
                .changed
                .iter()
                .all(|(_, previous, dirty)| previous.is_none() && dirty.is_none());
        let groups = joins_group && outcome.removed.is_empty();
        if !groups {
            self.sync_placed_dirs()?;
        }
        if defer && (whole || groups) {
            self.defer_records(outcome.changed);
            tracing::trace!(seq = change.seq, path = ?rel, "change applied, index deferred");
            return Ok(Applied {
                paths: in_place,
                durable,
            });
        }
        self.commit_deferred()?;
        let paths = self.commit(outcome)?;
        tracing::trace!(seq = change.seq, path = ?rel, "change applied");
        Ok(Applied { paths, durable })
    }

    fn apply_op(&mut self, rel: &Path, op: &Op) -> Result<(Outcome, bool), ApplyError> {
        Ok(match op {
            Op::File {
                meta,
                size,
                data,
                blocks,
            } => match data {
                FileData::Whole { offset, data, last } => {
                    match self.apply_whole(rel, meta, *size, *offset, data, *last, blocks)? {
                        Some(outcome) => (outcome, true),
                        None => (Outcome::default(), false),
                    }
                }
                data => (self.apply_file(rel, meta, *size, data, blocks)?, true),
            },
            Op::Dir { meta } => (self.apply_dir(rel, meta)?, true),
            Op::Symlink { target, meta } => (self.apply_symlink(rel, target, meta)?, true),
            Op::Special { mode, rdev, meta } => {
                (self.apply_special(rel, *mode, *rdev, meta)?, true)
            }
            Op::Link { existing } => {
                let existing = checked(existing)?;
                (self.apply_link(rel, &existing)?, true)
            }
            Op::Remove => (self.apply_remove(rel)?, true),
            Op::Rename { to, exchange } => {
                let to = checked(to)?;
                (self.apply_rename(rel, &to, *exchange)?, true)
            }
        })
    }

    /// Whether a file is at `copy`, and if so whether it holds the same bytes as the file
    /// at `path` (both relative to the folder): a conflict copy must not be written over
    /// another version that happens to get the same name.
    pub fn copy_holds(&self, path: &Path, copy: &Path) -> Result<Option<bool>, ApplyError> {
        let resolve = |rel: &Path| {
            safe_path::open_parent(self.root.as_fd(), rel, false)
                .map_err(resolve_err(rel, "resolving the path"))
        };
        let at_copy = resolve(copy)?;
        if safe_path::type_at(at_copy.dir.as_fd(), &at_copy.name)
            .map_err(io_err(copy, "stat"))?
            .is_none()
        {
            return Ok(None);
        }
        let at_path = resolve(path)?;
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let Ok(file) = rustix::fs::openat(&at_path.dir, &at_path.name, flags, Mode::empty()) else {
            return Ok(Some(false));
        };
        Ok(Some(same_content(&at_copy, &File::from(file))))
    }

    /// What the sender needs to send `path` cheaply: a signature of our current file (for
    /// a delta) and how much of an interrupted whole-file transfer we hold.
    pub fn want(&self, path: &RelPath) -> Result<Want, ApplyError> {
        let rel = checked(path)?;
        let signature = match safe_path::open_beneath(
            self.root.as_fd(),
            &rel,
            OFlags::RDONLY | OFlags::NONBLOCK,
        ) {
            Ok(fd) => {
                let file = File::from(fd);
                let meta = file.metadata().map_err(io_err(&rel, "stat"))?;
                if meta.is_file() {
                    let content = map(&file, meta.len()).map_err(io_err(&rel, "mapping"))?;
                    let bytes = content.bytes();
                    let hash = content_id(bytes);
                    let signature = Signature::calculate(bytes, signature_options(meta.len()));
                    Some((hash, signature.into_serialized()))
                } else {
                    None
                }
            }
            Err(ResolveError::Unsafe(reason)) => return Err(bad_path(path.0.as_slice(), reason)),
            Err(ResolveError::Io(_)) => None,
        };
        let resume = self
            .read_head(&rel)
            .filter(|head| head.durable > 0)
            .and_then(|head| {
                let (data_name, _) = partial_names(&rel);
                let data = self.state_dir.join(PARTIAL_DIR).join(data_name);
                let prefix = prefix_id(&data, head.durable).ok()?;
                Some((prefix, head.durable))
            });
        Ok(Want {
            path: path.clone(),
            signature,
            resume,
        })
    }

    fn parent(&self, rel: &Path, create: bool) -> Result<Parent, ApplyError> {
        safe_path::open_parent(self.root.as_fd(), rel, create)
            .map_err(resolve_err(rel, "resolving the path"))
    }

    fn live_record(&self, rel: &Path) -> Result<Option<FileRecord>, ApplyError> {
        let record = self.index.get(rel).map_err(|source| ApplyError::Index {
            path: rel.to_path_buf(),
            source: Box::new(source),
        })?;
        Ok(record.filter(FileRecord::is_live))
    }

    /// Records a durable change in the index; returns the paths it touched.
    fn commit(&mut self, outcome: Outcome) -> Result<Vec<PathBuf>, ApplyError> {
        let mut paths: Vec<PathBuf> = Vec::new();
        let mut seen = HashSet::new();
        if !outcome.removed.is_empty() {
            self.index
                .tombstone_batch(outcome.removed.clone(), now_ns())
                .map_err(|source| ApplyError::Index {
                    path: outcome.removed[0].clone(),
                    source: Box::new(source),
                })?;
            for path in outcome.removed {
                if seen.insert(path.clone()) {
                    paths.push(path);
                }
            }
        }
        let mut records = Vec::new();
        for (path, previous, dirty) in outcome.changed {
            let record = record_for(
                self.root.as_fd(),
                &path,
                previous.as_ref(),
                dirty.as_deref(),
            )
            .map_err(|source| ApplyError::Index {
                path: path.clone(),
                source: Box::new(source),
            })?;
            if let Some(record) = record {
                records.push((path.clone(), record));
            }
            if seen.insert(path.clone()) {
                paths.push(path);
            }
        }
        let vectors: Vec<(PathBuf, Vector)> = paths
            .iter()
            .filter_map(|path| Some((path.clone(), self.vectors_due.remove(path)?)))
            .collect();
        let first = records
            .first()
            .map(|(p, _)| p)
            .or(vectors.first().map(|(p, _)| p))
            .cloned();
        if let Some(first) = first {
            self.index
                .put_batch_with_vectors(records, vectors)
                .map_err(|source| ApplyError::Index {
                    path: first,
                    source: Box::new(source),
                })?;
        }
        Ok(paths)
    }

    /// Adds the directories `parent` created to `outcome`.
    fn note_created(outcome: &mut Outcome, parent: &Parent) {
        for dir in &parent.created {
            outcome.changed.push((dir.clone(), None, None));
        }
    }

    /// Removes whatever is at `name` in `dir` (a whole tree for a directory), never
    /// following symlinks. Returns whether something was there.
    fn remove_entry(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        rel: &Path,
    ) -> Result<bool, ApplyError> {
        let Some(kind) = safe_path::type_at(dir, name).map_err(io_err(rel, "stat"))? else {
            return Ok(false);
        };
        if self
            .versions
            .keep_moved(dir, name, rel)
            .map_err(io_err(rel, "keeping the old version"))?
        {
            return Ok(true);
        }
        match kind {
            FileType::Directory => {
                remove_tree(dir, name).map_err(io_err(rel, "removing the directory tree"))?;
                Ok(true)
            }
            _ => {
                match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(e) => return Err(io_err(rel, "unlink")(e)),
                }
                Ok(true)
            }
        }
    }

    /// Notes the temporary entry about to be made at `rel`'s parent, so that a crash
    /// before its rename does not leave it behind. Not fsync'd: a process crash keeps it
    /// (the page cache survives), and after a power loss a stray entry is at worst found by
    /// the next scan.
    fn temp_name(&mut self, rel: &Path) -> Result<OsString, ApplyError> {
        let name = OsString::from(format!("{TEMP_PREFIX}{:016x}", fastrand::u64(..)));
        let noted = rel.parent().unwrap_or(Path::new("")).join(&name);
        let bytes = noted.as_os_str().as_bytes();
        self.pending_temp
            .set_len(0)
            .and_then(|()| self.pending_temp.write_all_at(bytes, 0))
            .map_err(io_err(&self.state_dir, "noting a temporary name"))?;
        Ok(name)
    }

    fn create_temp(&mut self, parent: &Parent, rel: &Path) -> Result<Temp, ApplyError> {
        match rustix::fs::openat(
            &parent.dir,
            ".",
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => return Ok(Temp::Unnamed(File::from(fd))),
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {}
            Err(e) => return Err(io_err(rel, "creating a temporary file")(e)),
        }
        let name = self.temp_name(rel)?;
        let fd = rustix::fs::openat(
            &parent.dir,
            name.as_os_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(io_err(rel, "creating a temporary file"))?;
        Ok(Temp::Named(File::from(fd), name))
    }

    /// Puts a complete, fsync'd temporary file in place of `parent.name`. The directory
    /// is fsync'd by [`Applier::sync_placed_dirs`] after the mount was told (a reader may
    /// see the new file a flush earlier; a crash in between brings back the old one,
    /// never a torn one), and before the index records the change or it is acknowledged.
    fn place(&mut self, parent: &Parent, rel: &Path, temp: Temp) -> Result<(), ApplyError> {
        self.put_in_place(parent, rel, temp)?;
        let dir = parent
            .dir
            .try_clone()
            .map_err(io_err(rel, "duplicating the directory's descriptor"))?;
        self.unsynced_dirs.push((rel.to_path_buf(), dir));
        Ok(())
    }

    /// Makes the names [`Applier::place`] put in place durable.
    fn sync_placed_dirs(&mut self) -> Result<(), ApplyError> {
        for (rel, dir) in std::mem::take(&mut self.unsynced_dirs) {
            rustix::fs::fsync(&dir).map_err(io_err(&rel, "fsync of the directory"))?;
        }
        Ok(())
    }

    /// Keeps the file about to be replaced at `parent.name` by `new` as a version,
    /// unless it holds the same bytes (the same content sent again is no new version).
    fn keep_replaced(&self, parent: &Parent, rel: &Path, new: &File) -> Result<(), ApplyError> {
        if !self.versions.is_on() || self.continues_version || same_content(parent, new) {
            return Ok(());
        }
        self.versions
            .keep_linked(parent.dir.as_fd(), &parent.name, rel)
            .map_err(io_err(rel, "keeping the old version"))
    }

    /// Links or renames a complete, fsync'd temporary file in place of `parent.name`;
    /// durable once the directory is fsync'd.
    fn put_in_place(&mut self, parent: &Parent, rel: &Path, temp: Temp) -> Result<(), ApplyError> {
        let name = parent.name.as_os_str();
        match temp {
            Temp::Named(file, temp_name) => {
                self.keep_replaced(parent, rel, &file)?;
                rustix::fs::renameat(&parent.dir, temp_name.as_os_str(), &parent.dir, name)
                    .map_err(io_err(rel, "rename"))?;
            }
            Temp::Unnamed(file) => {
                let source = proc_path(file.as_fd());
                match rustix::fs::linkat(CWD, &source, &parent.dir, name, AtFlags::SYMLINK_FOLLOW) {
                    Ok(()) => {}
                    Err(Errno::EXIST) => {
                        let temp_name = self.temp_name(rel)?;
                        rustix::fs::linkat(
                            CWD,
                            &source,
                            &parent.dir,
                            temp_name.as_os_str(),
                            AtFlags::SYMLINK_FOLLOW,
                        )
                        .map_err(io_err(rel, "link"))?;
                        self.keep_replaced(parent, rel, &file)?;
                        rustix::fs::renameat(&parent.dir, temp_name.as_os_str(), &parent.dir, name)
                            .map_err(io_err(rel, "rename"))?;
                    }
                    Err(e) => return Err(io_err(rel, "link")(e)),
                }
            }
        }
        Ok(())
    }

    /// Opens the regular file at `parent.name` for patching. `None` when there is no
    /// file; anything else that is there is removed first with `replace_other` (a type
    /// change), and left alone otherwise.
    fn existing_file(
        &self,
        parent: &Parent,
        rel: &Path,
        replace_other: bool,
        outcome: &mut Outcome,
    ) -> Result<Option<File>, ApplyError> {
        let name = parent.name.as_os_str();
        match safe_path::type_at(parent.dir.as_fd(), name).map_err(io_err(rel, "stat"))? {
            None => return Ok(None),
            Some(FileType::RegularFile) => {}
            Some(_) if !replace_other => return Ok(None),
            Some(_) => {
                self.remove_entry(parent.dir.as_fd(), name, rel)?;
                outcome.removed.push(rel.to_path_buf());
                return Ok(None);
            }
        }
        let fd = rustix::fs::openat(
            &parent.dir,
            name,
            OFlags::RDWR | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err(rel, "open"))?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(io_err(rel, "stat"))?;
        if !meta.is_file() {
            return Err(ApplyError::Io {
                path: rel.to_path_buf(),
                what: "open",
                source: io::Error::other("replaced by a non-file while being opened"),
            });
        }
        Ok(Some(file))
    }

    /// A regular file's content and metadata, for every [`FileData`] but `Whole`.
    fn apply_file(
        &mut self,
        rel: &Path,
        meta: &Meta,
        size: u64,
        data: &FileData,
        blocks: &[(u64, Hash)],
    ) -> Result<Outcome, ApplyError> {
        if size > MAX_OFFSET {
            return Err(ApplyError::BadPayload {
                path: rel.to_path_buf(),
                reason: format!("size {size} is beyond the largest file"),
            });
        }
        let mut outcome = Outcome::default();
        // Only new content may create the file (and its parents, and replace another kind
        // of entry); metadata and deltas need the file that is here.
        let creates = matches!(data, FileData::Ranges(_));
        let parent = match safe_path::open_parent(self.root.as_fd(), rel, creates) {
            Ok(parent) => parent,
            Err(ResolveError::Io(e)) if !creates && e.kind() == io::ErrorKind::NotFound => {
                return Err(ApplyError::Missing {
                    path: rel.to_path_buf(),
                })
            }
            Err(e) => return Err(resolve_err(rel, "resolving the path")(e)),
        };
        Self::note_created(&mut outcome, &parent);
        let previous = self.live_record(rel)?;
        let existing = self.existing_file(&parent, rel, creates, &mut outcome)?;
        let old = match &existing {
            Some(file) => Some((file, file.metadata().map_err(io_err(rel, "stat"))?)),
            None => None,
        };
        let old_size = old.as_ref().map_or(0, |(_, m)| m.len());
        let dirty = match data {
            FileData::Unchanged => {
                let Some((file, _)) = old else {
                    return Err(ApplyError::Missing {
                        path: rel.to_path_buf(),
                    });
                };
                // "Unchanged" content cannot be longer than ours: ours is not the version
                // the sender meant (extending it would make zeros of its bytes).
                if size > old_size {
                    return Err(ApplyError::BaseMismatch {
                        path: rel.to_path_buf(),
                    });
                }
                check_blocks(rel, Some(file), old_size, &[], size, blocks)?;
                file.set_len(size).map_err(io_err(rel, "truncate"))?;
                self.set_meta_fd(file.as_fd(), rel, meta)?;
                file.sync_all().map_err(io_err(rel, "fsync"))?;
                Some(dirty_ranges(&[], old_size, size))
            }
            FileData::Ranges(ranges) => {
                // A size change alone that grows our file: the sender read the size after
                // a write whose bytes come in a later change (an `O_TRUNC` open, then a
                // write). Ours is not the content it assumed; growing it would make zeros
                // of bytes that exist there.
                if ranges.is_empty() && old.is_some() && size > old_size {
                    return Err(ApplyError::BaseMismatch {
                        path: rel.to_path_buf(),
                    });
                }
                let ranges = ranges
                    .iter()
                    .map(|r| {
                        let bytes = raw(rel, &r.data)?;
                        check_extent(rel, r.offset, bytes.len())?;
                        Ok((r.offset, bytes))
                    })
                    .collect::<Result<Vec<_>, ApplyError>>()?;
                check_blocks(
                    rel,
                    old.as_ref().map(|(f, _)| *f),
                    old_size,
                    &ranges,
                    size,
                    blocks,
                )?;
                match old {
                    Some((file, m)) if old_size >= SMALL_FILE || m.nlink() > 1 => {
                        self.patch_in_place(file, rel, size, &ranges, meta)?;
                    }
                    _ => {
                        let temp = self.create_temp(&parent, rel)?;
                        if let Some((file, _)) = old {
                            copy_prefix(file, temp.file(), old_size.min(size))
                                .map_err(io_err(rel, "copying into the temporary file"))?;
                        }
                        write_ranges(temp.file(), &ranges, size).map_err(io_err(rel, "write"))?;
                        self.finish_temp(&parent, rel, temp, meta)?;
                    }
                }
                Some(dirty_ranges(&ranges, old_size, size))
            }
            FileData::Delta { base, delta } => {
                let delta = raw(rel, delta)?;
                let Some((file, _)) = old else {
                    return Err(ApplyError::BaseMismatch {
                        path: rel.to_path_buf(),
                    });
                };
                let content = map(file, old_size).map_err(io_err(rel, "mapping"))?;
                if content_id(content.bytes()) != *base {
                    return Err(ApplyError::BaseMismatch {
                        path: rel.to_path_buf(),
                    });
                }
                let limit = usize::try_from(size).map_err(|_| ApplyError::BadPayload {
                    path: rel.to_path_buf(),
                    reason: format!("size {size} does not fit in memory addresses"),
                })?;
                let temp = self.create_temp(&parent, rel)?;
                let mut out = BufWriter::new(temp.file());
                fast_rsync::apply_limited(content.bytes(), delta, &mut out, limit).map_err(
                    |e| ApplyError::BadPayload {
                        path: rel.to_path_buf(),
                        reason: format!("delta does not apply: {e}"),
                    },
                )?;
                out.flush().map_err(io_err(rel, "write"))?;
                drop(out);
                let written = temp.file().metadata().map_err(io_err(rel, "stat"))?.len();
                if written != size {
                    return Err(ApplyError::BadPayload {
                        path: rel.to_path_buf(),
                        reason: format!("delta gives {written} bytes, the file has {size}"),
                    });
                }
                check_blocks(rel, Some(temp.file()), size, &[], size, blocks)?;
                self.finish_temp(&parent, rel, temp, meta)?;
                None
            }
            FileData::Whole { .. } => {
                return Err(ApplyError::BadPayload {
                    path: rel.to_path_buf(),
                    reason: "a whole-file piece reached the patch path".into(),
                })
            }
        };
        outcome.changed.push((rel.to_path_buf(), previous, dirty));
        Ok(outcome)
    }

    /// Gives a complete temporary file its metadata, makes it durable and puts it in place.
    fn finish_temp(
        &mut self,
        parent: &Parent,
        rel: &Path,
        temp: Temp,
        meta: &Meta,
    ) -> Result<(), ApplyError> {
        self.set_meta_fd(temp.file().as_fd(), rel, meta)?;
        temp.file().sync_all().map_err(io_err(rel, "fsync"))?;
        self.place(parent, rel, temp)
    }

    /// One piece of a whole-file transfer. `Some` once the last piece put the file in place.
    #[allow(clippy::too_many_arguments)]
    fn apply_whole(
        &mut self,
        rel: &Path,
        meta: &Meta,
        size: u64,
        offset: u64,
        piece: &Payload,
        last: bool,
        blocks: &[(u64, Hash)],
    ) -> Result<Option<Outcome>, ApplyError> {
        let bytes = raw(rel, piece)?;
        check_extent(rel, offset, bytes.len())?;
        let (data_name, head_name) = partial_names(rel);
        if offset == 0 && last {
            // The whole file in one piece (most files): straight into a temporary file
            // next to the target, without the partial's bookkeeping.
            let _ = rustix::fs::unlinkat(&self.partial_dir, data_name.as_str(), AtFlags::empty());
            let _ = rustix::fs::unlinkat(&self.partial_dir, head_name.as_str(), AtFlags::empty());
            return self.whole_in_one(rel, meta, size, bytes, blocks).map(Some);
        }
        let version = version_id(size, meta.mtime_ns);
        let data_path = self.state_dir.join(PARTIAL_DIR).join(&data_name);
        let mut durable = 0;
        if offset == 0 {
            self.start_partial(rel, version, &data_name, &head_name)?;
        } else {
            let head = self.read_head(rel);
            let held = head.as_ref().map_or(0, |h| h.durable);
            let len = std::fs::metadata(&data_path).map_or(0, |m| m.len());
            match head {
                Some(head) if head.version == version && offset <= len => durable = head.durable,
                _ => {
                    return Err(ApplyError::OutOfOrder {
                        path: rel.to_path_buf(),
                        offset,
                        held,
                    })
                }
            }
        }
        if offset < durable {
            // A piece sent again: what follows it is rewritten, so the durable mark moves
            // back first, durably, lest a crash report bytes the data file no longer has.
            durable = offset / BLOCK_SIZE * BLOCK_SIZE;
            self.write_head_durable(&head_name, durable, true)
                .map_err(io_err(rel, "updating the partial head"))?;
        }
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(io_err(rel, "opening the partial file"))?;
        let end = offset + bytes.len() as u64;
        data.write_all_at(bytes, offset)
            .and_then(|()| data.set_len(end))
            .map_err(io_err(rel, "writing the partial file"))?;
        if !last {
            if end - durable.min(end) >= CHECKPOINT {
                data.sync_data()
                    .map_err(io_err(rel, "fsync of the partial file"))?;
                let now_durable = end / BLOCK_SIZE * BLOCK_SIZE;
                self.write_head_durable(&head_name, now_durable, false)
                    .map_err(io_err(rel, "updating the partial head"))?;
            }
            return Ok(None);
        }
        if end != size {
            return Err(ApplyError::BadPayload {
                path: rel.to_path_buf(),
                reason: format!("the last piece ends at {end}, the file has {size} bytes"),
            });
        }
        check_blocks(rel, Some(&data), size, &[], size, blocks)?;
        let mut outcome = Outcome::default();
        let parent = self.parent(rel, true)?;
        Self::note_created(&mut outcome, &parent);
        let name = parent.name.as_os_str();
        self.clear_other_kind(&parent, rel, &mut outcome)?;
        self.set_meta_fd(data.as_fd(), rel, meta)?;
        data.sync_all().map_err(io_err(rel, "fsync"))?;
        match rustix::fs::renameat(&self.partial_dir, data_name.as_str(), &parent.dir, name) {
            Ok(()) => {
                rustix::fs::fsync(&parent.dir).map_err(io_err(rel, "fsync of the directory"))?
            }
            Err(Errno::XDEV) => {
                let temp = self.create_temp(&parent, rel)?;
                copy_prefix(&data, temp.file(), size)
                    .map_err(io_err(rel, "copying into the folder"))?;
                self.finish_temp(&parent, rel, temp, meta)?;
                let _ =
                    rustix::fs::unlinkat(&self.partial_dir, data_name.as_str(), AtFlags::empty());
            }
            Err(e) => return Err(io_err(rel, "rename into place")(e)),
        }
        let _ = rustix::fs::unlinkat(&self.partial_dir, head_name.as_str(), AtFlags::empty());
        outcome.changed.push((rel.to_path_buf(), None, None));
        Ok(Some(outcome))
    }

    fn whole_in_one(
        &mut self,
        rel: &Path,
        meta: &Meta,
        size: u64,
        bytes: &[u8],
        blocks: &[(u64, Hash)],
    ) -> Result<Outcome, ApplyError> {
        if bytes.len() as u64 != size {
            return Err(ApplyError::BadPayload {
                path: rel.to_path_buf(),
                reason: format!("the only piece has {} bytes, the file {size}", bytes.len()),
            });
        }
        check_blocks(rel, None, 0, &[(0, bytes)], size, blocks)?;
        let mut outcome = Outcome::default();
        let parent = self.parent(rel, true)?;
        Self::note_created(&mut outcome, &parent);
        self.clear_other_kind(&parent, rel, &mut outcome)?;
        if let Some(linked) = self.hard_linked_file(&parent, rel)? {
            // Replacing the inode would split it from its other names: rewrite it in
            // place instead, under the journal like any in-place patch.
            self.patch_in_place(&linked, rel, size, &[(0, bytes)], meta)?;
        } else {
            let temp = self.create_temp(&parent, rel)?;
            temp.file()
                .write_all_at(bytes, 0)
                .map_err(io_err(rel, "write"))?;
            match temp {
                // Only unnamed files wait: a crash leaves nothing of them behind.
                Temp::Unnamed(file) if self.place_later && outcome.removed.is_empty() => {
                    self.set_meta_fd(file.as_fd(), rel, meta)?;
                    self.pending_bytes += size;
                    self.pending_paths.insert(rel.to_path_buf());
                    self.pending.push(PendingFile {
                        rel: rel.to_path_buf(),
                        parent,
                        file,
                    });
                    outcome.placed_later = true;
                }
                temp => self.finish_temp(&parent, rel, temp, meta)?,
            }
        }
        outcome.changed.push((rel.to_path_buf(), None, None));
        Ok(outcome)
    }

    /// Removes what stands at `parent`/name if it is not a regular file (a type change),
    /// noting the removal in `outcome`.
    fn clear_other_kind(
        &mut self,
        parent: &Parent,
        rel: &Path,
        outcome: &mut Outcome,
    ) -> Result<(), ApplyError> {
        let name = parent.name.as_os_str();
        if !matches!(
            safe_path::type_at(parent.dir.as_fd(), name).map_err(io_err(rel, "stat"))?,
            None | Some(FileType::RegularFile)
        ) {
            self.remove_entry(parent.dir.as_fd(), name, rel)?;
            outcome.removed.push(rel.to_path_buf());
        }
        Ok(())
    }

    /// Writes `ranges` into `file` where it is, then cuts or extends it to `size`, under the
    /// write-ahead journal: the record is durable before the file is touched and cleared
    /// once the file is, so a crash in between is finished by [`Applier::open`].
    fn patch_in_place(
        &mut self,
        file: &File,
        rel: &Path,
        size: u64,
        ranges: &[(u64, &[u8])],
        meta: &Meta,
    ) -> Result<(), ApplyError> {
        let old_len = file.metadata().map_or(0, |m| m.len());
        // Bytes past the old end replace nothing: a growing file keeps no version per piece.
        let replaces = size < old_len || ranges.iter().any(|(offset, _)| *offset < old_len);
        if replaces && !self.continues_version && old_len <= MAX_COPIED_VERSION {
            self.versions
                .keep_copy(file, rel)
                .map_err(io_err(rel, "keeping the old version"))?;
        }
        self.journal.write(rel, size, ranges)?;
        self.journal_pending = true;
        write_ranges(file, ranges, size).map_err(io_err(rel, "write"))?;
        self.set_meta_fd(file.as_fd(), rel, meta)?;
        file.sync_all().map_err(io_err(rel, "fsync"))?;
        self.journal.clear()?;
        self.journal_pending = false;
        Ok(())
    }

    /// The regular file at `parent`/name opened for writing, if it has other names too.
    fn hard_linked_file(&self, parent: &Parent, rel: &Path) -> Result<Option<File>, ApplyError> {
        let opened = rustix::fs::openat(
            &parent.dir,
            parent.name.as_os_str(),
            OFlags::RDWR | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        );
        let Ok(fd) = opened else {
            return Ok(None);
        };
        let file = File::from(fd);
        let meta = file.metadata().map_err(io_err(rel, "stat"))?;
        Ok((meta.is_file() && meta.nlink() > 1).then_some(file))
    }

    /// Starts (or restarts) a whole-file transfer: an empty data file and a durable head.
    fn start_partial(
        &self,
        rel: &Path,
        version: Hash,
        data_name: &str,
        head_name: &str,
    ) -> Result<(), ApplyError> {
        let dir = self.state_dir.join(PARTIAL_DIR);
        let err = io_err(rel, "starting a partial file");
        let result = (|| -> io::Result<()> {
            let create = |name: &str| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(dir.join(name))
            };
            create(data_name)?;
            let head = create(head_name)?;
            let path = rel.as_os_str().as_bytes();
            let mut buf = Vec::with_capacity(8 + 32 + 8 + 4 + path.len());
            buf.extend_from_slice(PARTIAL_MAGIC);
            buf.extend_from_slice(&version);
            buf.extend_from_slice(&0u64.to_le_bytes());
            buf.extend_from_slice(&(path.len() as u32).to_le_bytes());
            buf.extend_from_slice(path);
            head.write_all_at(&buf, 0)?;
            head.sync_all()?;
            rustix::fs::fsync(&self.partial_dir)?;
            Ok(())
        })();
        result.map_err(err)
    }

    /// Records that the first `durable` bytes of a partial are fsync'd. One aligned 8-byte
    /// write; growing it needs no fsync (if lost, an older, smaller length remains), moving
    /// it back does (`sync`).
    fn write_head_durable(&self, head_name: &str, durable: u64, sync: bool) -> io::Result<()> {
        let head = OpenOptions::new()
            .write(true)
            .open(self.state_dir.join(PARTIAL_DIR).join(head_name))?;
        head.write_all_at(&durable.to_le_bytes(), HEAD_DURABLE_AT)?;
        if sync {
            head.sync_data()?;
        }
        Ok(())
    }

    fn read_head(&self, rel: &Path) -> Option<PartialHead> {
        let (_, head_name) = partial_names(rel);
        self.read_head_named(head_name.as_bytes())
            .filter(|head| head.path == rel.as_os_str().as_bytes())
    }

    fn read_head_named(&self, name: &[u8]) -> Option<PartialHead> {
        let path = self
            .state_dir
            .join(PARTIAL_DIR)
            .join(OsStr::from_bytes(name));
        let bytes = std::fs::read(path).ok()?;
        let rest = bytes.strip_prefix(PARTIAL_MAGIC.as_slice())?;
        let version: Hash = rest.get(..32)?.try_into().ok()?;
        let durable = u64::from_le_bytes(rest.get(32..40)?.try_into().ok()?);
        let len = u32::from_le_bytes(rest.get(40..44)?.try_into().ok()?) as usize;
        let path = rest.get(44..)?;
        (path.len() == len).then(|| PartialHead {
            version,
            durable,
            path: path.to_vec(),
        })
    }

    fn apply_dir(&mut self, rel: &Path, meta: &Meta) -> Result<Outcome, ApplyError> {
        let mut outcome = Outcome::default();
        let parent = self.parent(rel, true)?;
        Self::note_created(&mut outcome, &parent);
        let name = parent.name.as_os_str();
        let previous = self.live_record(rel)?;
        let existing = safe_path::type_at(parent.dir.as_fd(), name).map_err(io_err(rel, "stat"))?;
        if existing != Some(FileType::Directory) {
            if existing.is_some() {
                self.remove_entry(parent.dir.as_fd(), name, rel)?;
                outcome.removed.push(rel.to_path_buf());
            }
            match rustix::fs::mkdirat(&parent.dir, name, Mode::from_raw_mode(meta.mode & 0o7777)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(io_err(rel, "mkdir")(e)),
            }
        }
        let dir =
            safe_path::open_dir_at(parent.dir.as_fd(), name).map_err(resolve_err(rel, "open"))?;
        self.set_meta_fd(dir.as_fd(), rel, meta)?;
        rustix::fs::fsync(&dir).map_err(io_err(rel, "fsync"))?;
        if existing != Some(FileType::Directory) {
            rustix::fs::fsync(&parent.dir).map_err(io_err(rel, "fsync of the directory"))?;
        }
        outcome.changed.push((rel.to_path_buf(), previous, None));
        Ok(outcome)
    }

    fn apply_symlink(
        &mut self,
        rel: &Path,
        target: &[u8],
        meta: &Meta,
    ) -> Result<Outcome, ApplyError> {
        if target.is_empty() || target.contains(&0) || target.len() >= 4096 {
            return Err(ApplyError::BadPayload {
                path: rel.to_path_buf(),
                reason: "symlink target is empty, too long or contains NUL".into(),
            });
        }
        self.replace_with(rel, meta, |dir, temp| {
            rustix::fs::symlinkat(OsStr::from_bytes(target), dir, temp)
        })
    }

    fn apply_special(
        &mut self,
        rel: &Path,
        mode: u32,
        rdev: u64,
        meta: &Meta,
    ) -> Result<Outcome, ApplyError> {
        let file_type = FileType::from_raw_mode(mode);
        if !matches!(
            file_type,
            FileType::Fifo | FileType::Socket | FileType::CharacterDevice | FileType::BlockDevice
        ) {
            return Err(ApplyError::BadPayload {
                path: rel.to_path_buf(),
                reason: format!("mode {mode:o} is not a fifo, socket or device"),
            });
        }
        self.replace_with(rel, meta, |dir, temp| {
            rustix::fs::mknodat(dir, temp, file_type, Mode::from_raw_mode(0o600), rdev)
        })
    }

    /// Creates an entry under a temporary name with `make`, gives it `meta`, and renames
    /// it over `rel` (removing a directory in the way first).
    fn replace_with(
        &mut self,
        rel: &Path,
        meta: &Meta,
        make: impl FnOnce(BorrowedFd<'_>, &OsStr) -> rustix::io::Result<()>,
    ) -> Result<Outcome, ApplyError> {
        let mut outcome = Outcome::default();
        let parent = self.parent(rel, true)?;
        Self::note_created(&mut outcome, &parent);
        let name = parent.name.as_os_str();
        if safe_path::type_at(parent.dir.as_fd(), name).map_err(io_err(rel, "stat"))?
            == Some(FileType::Directory)
        {
            self.remove_entry(parent.dir.as_fd(), name, rel)?;
            outcome.removed.push(rel.to_path_buf());
        }
        let temp = self.temp_name(rel)?;
        make(parent.dir.as_fd(), temp.as_os_str()).map_err(io_err(rel, "create"))?;
        let result = self
            .set_meta_at(parent.dir.as_fd(), temp.as_os_str(), rel, meta)
            .and_then(|()| {
                rustix::fs::renameat(&parent.dir, temp.as_os_str(), &parent.dir, name)
                    .map_err(io_err(rel, "rename"))
            });
        if let Err(e) = result {
            let _ = rustix::fs::unlinkat(&parent.dir, temp.as_os_str(), AtFlags::empty());
            return Err(e);
        }
        rustix::fs::fsync(&parent.dir).map_err(io_err(rel, "fsync of the directory"))?;
        outcome.changed.push((rel.to_path_buf(), None, None));
        Ok(outcome)
    }

    fn apply_link(&mut self, rel: &Path, existing: &Path) -> Result<Outcome, ApplyError> {
        let source = match safe_path::open_parent(self.root.as_fd(), existing, false) {
            Ok(p) => p,
            Err(ResolveError::Io(_)) => {
                return Err(ApplyError::Missing {
                    path: existing.to_path_buf(),
                })
            }
            Err(e) => return Err(resolve_err(existing, "resolving the path")(e)),
        };
        let source_stat = match rustix::fs::statat(
            &source.dir,
            source.name.as_os_str(),
            AtFlags::SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => st,
            Err(Errno::NOENT) => {
                return Err(ApplyError::Missing {
                    path: existing.to_path_buf(),
                })
            }
            Err(e) => return Err(io_err(existing, "stat")(e)),
        };
        if FileType::from_raw_mode(source_stat.st_mode) == FileType::Directory {
            return Err(ApplyError::BadPayload {
                path: rel.to_path_buf(),
                reason: "a hard link to a directory".into(),
            });
        }
        let mut outcome = Outcome::default();
        let parent = self.parent(rel, true)?;
        Self::note_created(&mut outcome, &parent);
        let name = parent.name.as_os_str();
        match rustix::fs::statat(&parent.dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_dev == source_stat.st_dev && st.st_ino == source_stat.st_ino => {}
            Ok(_) => {
                self.remove_entry(parent.dir.as_fd(), name, rel)?;
                outcome.removed.push(rel.to_path_buf());
                self.link(&source, &parent, rel)?;
            }
            Err(Errno::NOENT) => self.link(&source, &parent, rel)?,
            Err(e) => return Err(io_err(rel, "stat")(e)),
        }
        let previous = self.live_record(existing)?;
        outcome
            .changed
            .push((rel.to_path_buf(), previous.clone(), Some(Vec::new())));
        outcome
            .changed
            .push((existing.to_path_buf(), previous, Some(Vec::new())));
        Ok(outcome)
    }

    fn link(&self, source: &Parent, parent: &Parent, rel: &Path) -> Result<(), ApplyError> {
        rustix::fs::linkat(
            &source.dir,
            source.name.as_os_str(),
            &parent.dir,
            parent.name.as_os_str(),
            AtFlags::empty(),
        )
        .map_err(io_err(rel, "link"))?;
        rustix::fs::fsync(&parent.dir).map_err(io_err(rel, "fsync of the directory"))
    }

    fn apply_remove(&mut self, rel: &Path) -> Result<Outcome, ApplyError> {
        let outcome = Outcome {
            removed: vec![rel.to_path_buf()],
            ..Outcome::default()
        };
        let parent = match safe_path::open_parent(self.root.as_fd(), rel, false) {
            Ok(p) => p,
            // A missing parent: the path is already gone.
            Err(ResolveError::Io(e)) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(outcome)
            }
            Err(e) => return Err(resolve_err(rel, "resolving the path")(e)),
        };
        if self.remove_entry(parent.dir.as_fd(), parent.name.as_os_str(), rel)? {
            rustix::fs::fsync(&parent.dir).map_err(io_err(rel, "fsync of the directory"))?;
        }
        Ok(outcome)
    }

    fn apply_rename(
        &mut self,
        from: &Path,
        to: &Path,
        exchange: bool,
    ) -> Result<Outcome, ApplyError> {
        let mut outcome = Outcome::default();
        if from == to {
            return Ok(outcome);
        }
        let missing = |path: &Path| ApplyError::Missing {
            path: path.to_path_buf(),
        };
        let source = match safe_path::open_parent(self.root.as_fd(), from, false) {
            Ok(p) => p,
            Err(ResolveError::Io(_)) => return Err(missing(from)),
            Err(e) => return Err(resolve_err(from, "resolving the path")(e)),
        };
        let from_name = source.name.as_os_str();
        if safe_path::type_at(source.dir.as_fd(), from_name)
            .map_err(io_err(from, "stat"))?
            .is_none()
        {
            return Err(missing(from));
        }
        let target = self.parent(to, true)?;
        Self::note_created(&mut outcome, &target);
        let to_name = target.name.as_os_str();
        // What the index knew below both names, to carry block hashes over to the new paths.
        let moved_from = self.known_subtree(from)?;
        let moved_to = if exchange {
            self.known_subtree(to)?
        } else {
            Vec::new()
        };
        let flags = if exchange {
            RenameFlags::EXCHANGE
        } else {
            self.versions
                .keep_linked(target.dir.as_fd(), to_name, to)
                .map_err(io_err(to, "keeping the old version"))?;
            RenameFlags::empty()
        };
        match rustix::fs::renameat_with(&source.dir, from_name, &target.dir, to_name, flags) {
            Ok(()) => {}
            Err(Errno::NOENT) if exchange => return Err(missing(to)),
            Err(Errno::NOTEMPTY | Errno::EXIST | Errno::ISDIR | Errno::NOTDIR) if !exchange => {
                // What is at `to` cannot be replaced by a rename (a type change, or a
                // directory that is not empty here): remove it, then move.
                self.remove_entry(target.dir.as_fd(), to_name, to)?;
                rustix::fs::renameat(&source.dir, from_name, &target.dir, to_name)
                    .map_err(io_err(from, "rename"))?;
            }
            Err(e) => return Err(io_err(from, "rename")(e)),
        }
        rustix::fs::fsync(&target.dir).map_err(io_err(to, "fsync of the directory"))?;
        if !same_dir(&source.dir, &target.dir) {
            rustix::fs::fsync(&source.dir).map_err(io_err(from, "fsync of the directory"))?;
        }
        outcome.removed.push(from.to_path_buf());
        outcome.removed.push(to.to_path_buf());
        for (old, record) in moved_from {
            outcome
                .changed
                .push((rebase(&old, from, to), record, Some(Vec::new())));
        }
        for (old, record) in moved_to {
            outcome
                .changed
                .push((rebase(&old, to, from), record, Some(Vec::new())));
        }
        if !outcome.changed.iter().any(|(p, _, _)| p == to) {
            outcome.changed.push((to.to_path_buf(), None, None));
        }
        if exchange && !outcome.changed.iter().any(|(p, _, _)| p == from) {
            outcome.changed.push((from.to_path_buf(), None, None));
        }
        Ok(outcome)
    }

    /// The live records of `path` and everything below it, as the index has them.
    fn known_subtree(&self, path: &Path) -> Result<Vec<(PathBuf, Option<FileRecord>)>, ApplyError> {
        let index_err = |source| ApplyError::Index {
            path: path.to_path_buf(),
            source: Box::new(source),
        };
        let mut out = vec![(path.to_path_buf(), self.live_record(path)?)];
        for (child, record) in self.index.subtree(path).map_err(index_err)? {
            if record.is_live() {
                out.push((child, Some(record)));
            }
        }
        Ok(out)
    }

    /// Sets ownership (as root), mode, xattrs and mtime through a readable descriptor of
    /// a file or directory. Mode comes after ownership, which clears set-id bits.
    fn set_meta_fd(
        &mut self,
        fd: BorrowedFd<'_>,
        rel: &Path,
        meta: &Meta,
    ) -> Result<(), ApplyError> {
        if self.as_root {
            rustix::fs::fchown(
                fd,
                Some(rustix::fs::Uid::from_raw(meta.uid)),
                Some(rustix::fs::Gid::from_raw(meta.gid)),
            )
            .map_err(io_err(rel, "chown"))?;
        }
        rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode & 0o7777))
            .map_err(io_err(rel, "chmod"))?;
        if let Some(xattrs) = &meta.xattrs {
            self.sync_xattrs(&XattrTarget::Fd(fd), rel, xattrs)?;
        }
        rustix::fs::futimens(fd, &timestamps(meta.mtime_ns))
            .map_err(io_err(rel, "setting the mtime"))
    }

    /// The same for the entry `name` in `dir` that cannot be opened for reading (a
    /// symlink, a device node, a fifo): never follows it.
    fn set_meta_at(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        rel: &Path,
        meta: &Meta,
    ) -> Result<(), ApplyError> {
        if self.as_root {
            rustix::fs::chownat(
                dir,
                name,
                Some(rustix::fs::Uid::from_raw(meta.uid)),
                Some(rustix::fs::Gid::from_raw(meta.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(io_err(rel, "chown"))?;
        }
        let handle = rustix::fs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err(rel, "open"))?;
        let st = rustix::fs::fstat(&handle).map_err(io_err(rel, "stat"))?;
        // A symlink has no mode of its own, and user xattrs are not allowed on it.
        if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
            let path = proc_path(handle.as_fd());
            rustix::fs::chmodat(
                CWD,
                &path,
                Mode::from_raw_mode(meta.mode & 0o7777),
                AtFlags::empty(),
            )
            .map_err(io_err(rel, "chmod"))?;
            if let Some(xattrs) = &meta.xattrs {
                self.sync_xattrs(&XattrTarget::Proc(path), rel, xattrs)?;
            }
        }
        rustix::fs::utimensat(
            dir,
            name,
            &timestamps(meta.mtime_ns),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(io_err(rel, "setting the mtime"))
    }

    /// Makes the attributes exactly `wanted`, except the local system's own namespaces,
    /// which are kept when not listed and skipped (with one notice) when they cannot be set.
    fn sync_xattrs(
        &mut self,
        target: &XattrTarget<'_>,
        rel: &Path,
        wanted: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<(), ApplyError> {
        let present = target.names().map_err(io_err(rel, "listing xattrs"))?;
        for name in &present {
            if is_system_xattr(name) || wanted.iter().any(|(n, _)| n == name) {
                continue;
            }
            match target.remove(OsStr::from_bytes(name)) {
                Ok(()) | Err(Errno::NODATA) => {}
                Err(e) => return Err(io_err(rel, "removing an xattr")(e)),
            }
        }
        for (name, value) in wanted {
            if name.is_empty() || name.contains(&0) {
                return Err(ApplyError::BadPayload {
                    path: rel.to_path_buf(),
                    reason: "an xattr name is empty or contains NUL".into(),
                });
            }
            match target.set(OsStr::from_bytes(name), value) {
                Ok(()) => {}
                Err(Errno::PERM | Errno::NOTSUP | Errno::ACCESS | Errno::INVAL)
                    if is_system_xattr(name) =>
                {
                    let name = String::from_utf8_lossy(name);
                    if self.xattr_skip_logged {
                        tracing::debug!(path = ?rel, xattr = %name, "skipped an xattr this system does not let us set");
                    } else {
                        self.xattr_skip_logged = true;
                        tracing::warn!(path = ?rel, xattr = %name, "skipping system/security xattrs this system does not let us set (logged once)");
                    }
                }
                Err(e) => return Err(io_err(rel, "setting an xattr")(e)),
            }
        }
        Ok(())
    }
}

/// A partial transfer's head: which version of which path it holds, and how much of it is
/// durable.
struct PartialHead {
    version: Hash,
    durable: u64,
    path: Vec<u8>,
}

/// The content hash peers agree on ([`content_hash`] over the BLAKE3 of each
/// [`BLOCK_SIZE`] block), as the index and the sender's stored versions hold it.
/// Whether `op` is a file sent whole in one piece (which [`Applier::apply_deferred`] may
/// batch).
/// Whether the regular file at `parent.name` holds exactly the bytes of `new`. False when
/// the two differ in size or modification time, when it cannot be read, or when it is
/// larger than comparing is worth (a duplicate version is then kept, which costs only a
/// link).
fn same_content(parent: &Parent, new: &File) -> bool {
    const COMPARED_AT_MOST: u64 = 64 << 20;
    const PIECE: usize = 1 << 20;
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let Ok(old) = rustix::fs::openat(&parent.dir, &parent.name, flags, Mode::empty()) else {
        return false;
    };
    let old = File::from(old);
    let (Ok(old_meta), Ok(new_meta)) = (old.metadata(), new.metadata()) else {
        return false;
    };
    let len = old_meta.len();
    // The same version sent again has the same size and modification time; anything
    // else is another version, told apart without reading a byte.
    let same_stamp =
        (old_meta.mtime(), old_meta.mtime_nsec()) == (new_meta.mtime(), new_meta.mtime_nsec());
    if !old_meta.is_file() || len != new_meta.len() || !same_stamp || len > COMPARED_AT_MOST {
        return false;
    }
    // Sized to the file: most compared files are small, and zeroing two whole pieces
    // for them would cost more than the comparison.
    let piece = usize::try_from(len).map_or(PIECE, |len| len.min(PIECE));
    let (mut a, mut b) = (vec![0u8; piece], vec![0u8; piece]);
    let mut at = 0;
    while at < len {
        let n = usize::try_from(len - at).map_or(piece, |left| left.min(piece));
        let (Some(a), Some(b)) = (a.get_mut(..n), b.get_mut(..n)) else {
            return false;
        };
        if old.read_exact_at(a, at).is_err() || new.read_exact_at(b, at).is_err() || a != b {
            return false;
        }
        at += n as u64;
    }
    true
}

fn is_whole_in_one(op: &Op) -> bool {
    matches!(
        op,
        Op::File {
            data: FileData::Whole {
                offset: 0,
                last: true,
                ..
            },
            ..
        }
    )
}

/// Starts writing `file`'s dirty pages without waiting; the fsync that follows waits. Only
/// a hint: an error here shows again at the fsync.
fn start_writeback(file: &File) {
    // SAFETY: sync_file_range reads no memory; the descriptor is open for the call.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

fn content_id(bytes: &[u8]) -> Hash {
    let hashes: Vec<Hash> = bytes
        .chunks(BLOCK_SIZE as usize)
        .map(|block| *blake3::hash(block).as_bytes())
        .collect();
    content_hash(&hashes)
}

/// The content hash of the first `len` bytes (whole blocks) of a partial transfer, which
/// the sender checks against its file before it resumes there.
fn prefix_id(data: &Path, len: u64) -> io::Result<Hash> {
    let file = File::open(data)?;
    let mut hashes = Vec::new();
    let mut block = vec![0u8; BLOCK_SIZE as usize];
    let mut at = 0;
    while at < len {
        file.read_exact_at(&mut block, at)?;
        hashes.push(*blake3::hash(&block).as_bytes());
        at += BLOCK_SIZE;
    }
    Ok(content_hash(&hashes))
}

/// The data and head file names of `rel`'s partial transfer.
fn partial_names(rel: &Path) -> (String, String) {
    let key = data_encoding::HEXLOWER.encode(blake3::hash(rel.as_os_str().as_bytes()).as_bytes());
    (format!("{key}.data"), format!("{key}.head"))
}

fn names_exist(dir: &OwnedFd, name: &[u8]) -> bool {
    rustix::fs::statat(dir, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW).is_ok()
}

/// The ranges a patch changed, as [`record_for`] wants them: the written ranges, and the
/// point from which a size change moved block extents.
fn dirty_ranges(ranges: &[(u64, &[u8])], old_size: u64, size: u64) -> Vec<(u64, u64)> {
    let mut dirty: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|(_, data)| !data.is_empty())
        .map(|(offset, data)| (*offset, data.len() as u64))
        .collect();
    dirty.push((old_size.min(size), 0));
    dirty
}

/// `path` (which is `from` or below it) moved to `to`.
fn rebase(path: &Path, from: &Path, to: &Path) -> PathBuf {
    match path.strip_prefix(from) {
        Ok(rest) if rest.as_os_str().is_empty() => to.to_path_buf(),
        Ok(rest) => to.join(rest),
        Err(_) => path.to_path_buf(),
    }
}

fn same_dir(a: &OwnedFd, b: &OwnedFd) -> bool {
    match (rustix::fs::fstat(a), rustix::fs::fstat(b)) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

/// Removes the directory `name` in `parent` and everything below it, descending by
/// descriptor and never following a symlink. Holds one descriptor per level, at most
/// [`MAX_TREE_DEPTH`].
fn remove_tree(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    struct Level {
        dir: OwnedFd,
        name: OsString,
        subdirs: Vec<OsString>,
    }
    let open_level = |parent: BorrowedFd<'_>, name: &OsStr| -> io::Result<Level> {
        let dir = rustix::fs::openat(
            parent,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut subdirs = Vec::new();
        let mut listing = rustix::fs::Dir::read_from(&dir)?;
        let mut files = Vec::new();
        while let Some(entry) = listing.read() {
            let entry = entry?;
            let entry_name = entry.file_name().to_bytes();
            if entry_name == b"." || entry_name == b".." {
                continue;
            }
            let entry_name = OsStr::from_bytes(entry_name).to_os_string();
            let kind = match entry.file_type() {
                FileType::Unknown => safe_path::type_at(dir.as_fd(), &entry_name)?,
                known => Some(known),
            };
            match kind {
                Some(FileType::Directory) => subdirs.push(entry_name),
                Some(_) => files.push(entry_name),
                None => {}
            }
        }
        for file in files {
            match rustix::fs::unlinkat(&dir, file.as_os_str(), AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Level {
            dir,
            name: name.to_os_string(),
            subdirs,
        })
    };
    let mut stack = vec![open_level(parent, name)?];
    let mut steps: u64 = 0;
    loop {
        let depth = stack.len();
        let Some(top) = stack.last_mut() else {
            break;
        };
        steps += 1;
        if steps > MAX_TREE_ENTRIES {
            return Err(io::Error::other(
                "the directory tree keeps growing while it is removed",
            ));
        }
        if let Some(sub) = top.subdirs.pop() {
            if depth >= MAX_TREE_DEPTH {
                return Err(io::Error::other(format!(
                    "the directory tree is deeper than {MAX_TREE_DEPTH} levels"
                )));
            }
            let level = open_level(top.dir.as_fd(), &sub)?;
            stack.push(level);
            continue;
        }
        let done = stack.pop();
        if let Some(done) = done {
            let parent_fd = stack.last().map_or(parent, |p| p.dir.as_fd());
            // Entries added since the listing make this fail with ENOTEMPTY: list again.
            match rustix::fs::unlinkat(parent_fd, done.name.as_os_str(), AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(Errno::NOTEMPTY) => {
                    let again = open_level(parent_fd, &done.name)?;
                    stack.push(again);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applier(root: &Path, state: &Path) -> Applier {
        let index = Arc::new(Index::open(&state.join("index.redb")).unwrap());
        Applier::open(root, &state.join("apply"), index).unwrap()
    }

    #[test]
    fn a_temporary_entry_left_by_a_crash_is_removed_on_open() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        drop(applier(root.path(), state.path()));
        std::fs::create_dir(root.path().join("sub")).unwrap();
        let stray = format!("{TEMP_PREFIX}0123456789abcdef");
        std::fs::write(root.path().join("sub").join(&stray), b"half").unwrap();
        std::fs::write(root.path().join("keep"), b"mine").unwrap();
        let pending = state.path().join("apply").join(PENDING_TEMP);
        std::fs::write(&pending, format!("sub/{stray}")).unwrap();
        drop(applier(root.path(), state.path()));
        assert!(!root.path().join("sub").join(&stray).exists());
        // Only a name with the temporary prefix is ever removed.
        std::fs::write(&pending, "keep").unwrap();
        drop(applier(root.path(), state.path()));
        assert!(root.path().join("keep").exists());
    }

    #[test]
    fn damaged_partial_transfers_are_swept_on_open() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        drop(applier(root.path(), state.path()));
        let partial = state.path().join("apply").join(PARTIAL_DIR);
        std::fs::write(partial.join("abc.data"), b"orphan").unwrap();
        std::fs::write(partial.join("def.head"), b"FSPART01 too short").unwrap();
        std::fs::write(partial.join("def.data"), b"x").unwrap();
        drop(applier(root.path(), state.path()));
        assert_eq!(std::fs::read_dir(&partial).unwrap().count(), 0);
    }

    #[test]
    fn expected_blocks_overlay_ranges_on_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abcdef").unwrap();
        let old = File::open(&path).unwrap();
        let rel = Path::new("f");
        let hash = |b: &[u8]| *blake3::hash(b).as_bytes();
        // Overwrite in the middle, extend past the end leaving a gap of zeros, then cut.
        let ranges: &[(u64, &[u8])] = &[(1, b"XY"), (8, b"ZZ")];
        check_blocks(rel, Some(&old), 6, ranges, 9, &[(0, hash(b"aXYdef\0\0Z"))]).unwrap();
        let err = check_blocks(rel, Some(&old), 6, ranges, 9, &[(0, hash(b"abcdef"))]).unwrap_err();
        assert!(matches!(err, ApplyError::Diverged { .. }));
        let err = check_blocks(rel, Some(&old), 6, &[], 6, &[(1, hash(b""))]).unwrap_err();
        assert!(
            matches!(err, ApplyError::Diverged { .. }),
            "a block past the end"
        );
    }

    #[test]
    fn moved_paths_are_rebased_and_dirty_ranges_mark_the_size_change() {
        let rebased = rebase(Path::new("a"), Path::new("a"), Path::new("b/c"));
        assert_eq!(rebased, PathBuf::from("b/c"));
        let rebased = rebase(Path::new("a/x/y"), Path::new("a"), Path::new("b"));
        assert_eq!(rebased, PathBuf::from("b/x/y"));
        let dirty = dirty_ranges(&[(4, b"ab"), (9, b"")], 100, 50);
        assert_eq!(dirty, vec![(4, 2), (50, 0)]);
    }

    #[test]
    fn signatures_stay_small_for_large_files() {
        for len in [0, 1, 4096, 1 << 30, 1 << 40] {
            let options = signature_options(len);
            let blocks = len.div_ceil(u64::from(options.block_size));
            assert!(options.block_size.is_power_of_two());
            assert!(
                blocks <= SIGNATURE_BLOCKS || u64::from(options.block_size) == SIGNATURE_MAX_BLOCK
            );
        }
    }
}
