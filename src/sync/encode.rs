//! The sending side: turning coalesced [`Update`]s (and the files a catching-up peer asks
//! for) into numbered [`proto::Change`]s, with as few bytes of file data as possible.
//!
//! What is sent for a regular file, in order of preference:
//! - the exact byte ranges the capture recorded ([`Content::Ranges`]), read from the file
//!   now, split over several changes so that no change carries more than
//!   [`proto::MAX_CHUNK`] bytes of data;
//! - a `fast_rsync` delta against the version last sent ([`delta::SignatureStore`]) when the
//!   written places are unknown and the file is large (or, in catch-up, against the
//!   signature the receiver sent);
//! - otherwise the whole file, in pieces of [`proto::MAX_CHUNK`].
//!
//! Each change lists the BLAKE3 hashes of the [`BLOCK_SIZE`] blocks it rewrote, as read
//! together with the data, so the receiver can check its result. Data is read lazily, one
//! change at a time, by the [`Encoded`] iterator: a 1 GiB file is never held in memory. A
//! delta is computed on a memory map of the file and is at most [`delta::MAX_DELTA`] bytes;
//! a larger one falls back to whole pieces.
//!
//! After a whole file or a delta is sent, the stored version of the file becomes the one
//! sent; after ranges, it is patched block by block when the ranges cover every block that
//! changed (an append, an overwrite), and dropped otherwise (the next unknown change of the
//! file then goes whole).
//!
//! Every path is opened below the backing folder's descriptor with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, `O_NOFOLLOW`): a symlink anywhere on the way
//! makes the path count as gone, which is sent as a removal — the folder is the truth.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use fast_rsync::{Signature, SignatureOptions};
use rustix::fs::{Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

use super::compress::raw_payload;
use super::delta::{
    self, content_hash, DeltaError, SignatureStore, Version, VersionBuilder, DELTA_THRESHOLD,
    MAX_DELTA,
};
use super::proto::{self, Change, FileData, Hash, Meta, Op, Range, RelPath, Vector, Want};
use crate::index::{open_to_read, read_full, stat_times, FileKind, BLOCK_SIZE};
use crate::pipeline::update::{Content, Update};

/// Room a change may use beyond its data for range headers and block hashes: the rest of
/// [`proto::MAX_MESSAGE`] is left for the path and extended attributes.
const OVERHEAD_BUDGET: usize = 128 * 1024;
/// Generous encoded sizes of one [`Range`] header and one `(block, hash)` pair.
const RANGE_COST: usize = 32;
const BLOCK_COST: usize = 48;
/// The most blocks whose new signature a ranges change remembers to patch the stored
/// version; beyond it the stored version is dropped instead.
const MAX_PATCHED_BLOCKS: usize = 16 * 1024;
/// `fast_rsync` signature header length.
const SIGNATURE_HEADER: usize = 12;

/// Why an update could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(
        "cannot open the backing folder {path}: {source}; check that it exists and is a directory"
    )]
    Root { path: PathBuf, source: io::Error },
    #[error("{path:?} is not a path below the backing folder (absolute, or with '..'); this is a bug in the caller")]
    BadPath { path: PathBuf },
    #[error("cannot read {path:?} in the backing folder: {source}; check its permissions; the next change or scan retries it")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Signatures(#[from] DeltaError),
}

/// Turns updates into changes, numbering them.
#[derive(Debug)]
pub struct Encoder {
    /// `O_PATH` descriptor of the backing folder; every path is opened below it.
    root: OwnedFd,
    signatures: SignatureStore,
    next_seq: u64,
}

/// The path of an `O_PATH` descriptor in procfs, through which it can be reopened for
/// reading and its extended attributes reached.
fn proc_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The wire form of a relative path, or `None` if it is absolute or climbs with `..`.
pub fn rel_path(path: &Path) -> Option<RelPath> {
    let mut out = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(name.as_bytes());
            }
            Component::CurDir => {}
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(RelPath(out))
}

/// A file below the backing folder, opened without following symlinks.
struct Opened {
    fd: OwnedFd,
    stat: Stat,
}

impl Encoder {
    /// An encoder for the backing folder `root`, keeping signatures below `state_dir`
    /// (which must be outside `root`). Numbering starts at 1.
    pub fn open(root: &Path, state_dir: &Path) -> Result<Encoder, EncodeError> {
        let root_fd = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| EncodeError::Root {
            path: root.to_path_buf(),
            source: e.into(),
        })?;
        Ok(Encoder {
            root: root_fd,
            signatures: SignatureStore::open(state_dir)?,
            next_seq: 1,
        })
    }

    /// The number the next change gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Continues numbering at `seq` (e.g. after the last number a peer acknowledged).
    pub fn set_next_seq(&mut self, seq: u64) {
        self.next_seq = seq;
    }

    /// The changes that bring a peer up to date with `update`. File data is read as the
    /// iterator advances; an update of nothing sendable (a rescan request) yields nothing.
    pub fn encode(&mut self, update: &Update) -> Result<Encoded<'_>, EncodeError> {
        let version = match update {
            Update::Changed { version, .. }
            | Update::Removed { version, .. }
            | Update::Renamed { version, .. }
            | Update::Linked { version, .. } => version.clone(),
            Update::Rescan { .. } => Vector::default(),
        };
        let (path, state) = match update {
            Update::Changed {
                path,
                created,
                content,
                metadata,
                ..
            } => (
                path.clone(),
                self.changed(path, *created, content, *metadata)?,
            ),
            Update::Removed { path, dir, .. } => {
                let rel = checked(path)?;
                self.signatures.remove(&rel)?;
                if *dir {
                    self.signatures.remove_tree(&rel)?;
                }
                (
                    path.clone(),
                    State::Queue(VecDeque::from([(rel, Op::Remove)])),
                )
            }
            Update::Renamed {
                from, to, exchange, ..
            } => {
                let (from_rel, to_rel) = (checked(from)?, checked(to)?);
                self.signatures.rename(&from_rel, &to_rel, *exchange)?;
                let moved_dir = [to, from].into_iter().any(|p| {
                    matches!(self.open_beneath(p), Ok(Some(o)) if FileKind::from_mode(o.stat.st_mode) == FileKind::Dir)
                });
                if moved_dir {
                    self.signatures.rename_tree(&from_rel, &to_rel, *exchange)?;
                }
                let op = Op::Rename {
                    to: to_rel,
                    exchange: *exchange,
                };
                (from.clone(), State::Queue(VecDeque::from([(from_rel, op)])))
            }
            Update::Linked { path, existing, .. } => {
                let (rel, existing) = (checked(path)?, checked(existing)?);
                (
                    path.clone(),
                    State::Queue(VecDeque::from([(rel, Op::Link { existing })])),
                )
            }
            Update::Rescan { .. } => (PathBuf::new(), State::Done),
        };
        let rel = checked(&path)?;
        Ok(Encoded {
            encoder: self,
            version,
            path,
            rel,
            state,
        })
    }

    /// One file for a catching-up peer: a delta against `want.signature` when it has one
    /// and the delta is small; the rest of a whole transfer from `want.resume` when the
    /// receiver's partial copy matches this file's start; else the whole file. `path` is
    /// the checked form of `want.path`. A path that is not a regular file is sent as what
    /// it is (directory, symlink, removal...). Every change carries `version`, what this
    /// node knows of the path's version.
    pub fn encode_whole(
        &mut self,
        path: &Path,
        want: &Want,
        version: Vector,
    ) -> Result<Encoded<'_>, EncodeError> {
        let rel = checked(path)?;
        let state = match self.open_beneath(path)? {
            None => State::Queue(VecDeque::from([(rel.clone(), Op::Remove)])),
            Some(opened) if FileKind::from_mode(opened.stat.st_mode) != FileKind::File => {
                self.not_a_file(rel.clone(), path, &opened, true)?
            }
            Some(opened) => {
                let meta = self.meta(path, &opened, true)?;
                let base = want.signature.as_ref().map(|(hash, signature)| Base {
                    hash: *hash,
                    signature: signature.clone(),
                    blocks: None,
                });
                let file = reopen(path, &opened)?;
                match self.try_delta(&rel, path, &file, &meta, base)? {
                    Some(state) => state,
                    None => {
                        let mut stream = WholeStream::new(file, meta, opened.stat.st_size as u64);
                        if let Some((hash, offset)) = want.resume {
                            stream.resume(hash, offset).map_err(io_err(path))?;
                        }
                        State::Whole(stream)
                    }
                }
            }
        };
        Ok(Encoded {
            encoder: self,
            version,
            path: path.to_path_buf(),
            rel,
            state,
        })
    }

    fn changed(
        &mut self,
        path: &Path,
        created: bool,
        content: &Content,
        metadata: bool,
    ) -> Result<State, EncodeError> {
        let rel = checked(path)?;
        let Some(opened) = self.open_beneath(path)? else {
            self.signatures.remove(&rel)?;
            return Ok(State::Queue(VecDeque::from([(rel, Op::Remove)])));
        };
        let with_xattrs = metadata || created;
        if FileKind::from_mode(opened.stat.st_mode) != FileKind::File {
            return self.not_a_file(rel, path, &opened, with_xattrs);
        }
        let meta = self.meta(path, &opened, with_xattrs)?;
        let size = opened.stat.st_size as u64;
        // A created file's content is new as a whole, whatever the update says.
        let content = match content {
            Content::Unchanged if created => &Content::Unknown,
            other => other,
        };
        match content {
            Content::Unchanged => Ok(State::Queue(VecDeque::from([(
                rel,
                Op::File {
                    meta,
                    size,
                    data: FileData::Unchanged,
                    blocks: Vec::new(),
                },
            )]))),
            Content::Ranges(ranges) => {
                let file = reopen(path, &opened)?;
                let stored = self.signatures.load(&rel)?;
                // Dropped now and stored again, patched, once every range is out: a stream
                // abandoned half way leaves no version the peer may not have.
                self.signatures.remove(&rel)?;
                Ok(State::Ranges(RangeStream::new(
                    file, meta, size, ranges, stored,
                )))
            }
            Content::Unknown => {
                let file = reopen(path, &opened)?;
                let base = self.signatures.load(&rel)?.map(|v| Base {
                    hash: v.hash,
                    signature: v.signature,
                    blocks: Some(v.block_hashes),
                });
                match self.try_delta(&rel, path, &file, &meta, base)? {
                    Some(state) => Ok(state),
                    None => Ok(State::Whole(WholeStream::new(file, meta, size))),
                }
            }
        }
    }

    /// The single change for a directory, symlink or special file.
    fn not_a_file(
        &self,
        rel: RelPath,
        path: &Path,
        opened: &Opened,
        with_xattrs: bool,
    ) -> Result<State, EncodeError> {
        let st = &opened.stat;
        let op = match FileKind::from_mode(st.st_mode) {
            FileKind::Dir => Op::Dir {
                meta: self.meta(path, opened, with_xattrs)?,
            },
            FileKind::Symlink => Op::Symlink {
                target: rustix::fs::readlinkat(&opened.fd, c"", Vec::new())
                    .map_err(|e| io_err(path)(e.into()))?
                    .into_bytes(),
                // User xattrs cannot be set on symlinks, and procfs would reach the
                // link's target instead.
                meta: self.meta(path, opened, false)?,
            },
            FileKind::Other => Op::Special {
                mode: st.st_mode,
                rdev: st.st_rdev,
                meta: self.meta(path, opened, with_xattrs)?,
            },
            FileKind::File => {
                return Err(io_err(path)(io::Error::other(
                    "a regular file here is a bug",
                )))
            }
        };
        Ok(State::Queue(VecDeque::from([(rel, op)])))
    }

    /// A delta change of `file` against `base`, when the file is large, the delta exists
    /// and fits one message; then the sent version is stored. `None`: send it whole.
    fn try_delta(
        &mut self,
        rel: &RelPath,
        path: &Path,
        file: &File,
        meta: &Meta,
        base: Option<Base>,
    ) -> Result<Option<State>, EncodeError> {
        let Some(base) = base else { return Ok(None) };
        let size = file.metadata().map_err(io_err(path))?.len();
        if size < DELTA_THRESHOLD {
            return Ok(None);
        }
        let Some(map) = delta::map_file(file).map_err(io_err(path))? else {
            return Ok(None);
        };
        let version = Version::of_bytes(&map);
        let op = if version.hash == base.hash {
            // The peer holds exactly this content already.
            Op::File {
                meta: meta.clone(),
                size: version.size,
                data: FileData::Unchanged,
                blocks: Vec::new(),
            }
        } else {
            let found = match delta::diff_with(
                &base.signature,
                &map,
                Some(&version.signature),
                MAX_DELTA,
            ) {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "sending the file whole");
                    None
                }
            };
            let Some(found) = found else {
                return Ok(None);
            };
            let mut touched = found.touched;
            // Blocks that differ from the known base version, so the receiver checks
            // every block whose content changed, whatever the delta claims.
            if let Some(old) = &base.blocks {
                touched.extend(
                    version
                        .block_hashes
                        .iter()
                        .enumerate()
                        .filter(|(i, hash)| old.get(*i) != Some(*hash))
                        .map(|(i, _)| i as u64),
                );
                touched.sort_unstable();
                touched.dedup();
            }
            if touched.len() * BLOCK_COST > OVERHEAD_BUDGET {
                return Ok(None);
            }
            let blocks = touched
                .into_iter()
                .filter_map(|i| Some((i, *version.block_hashes.get(i as usize)?)))
                .collect();
            Op::File {
                meta: meta.clone(),
                size: version.size,
                data: FileData::Delta {
                    base: base.hash,
                    delta: raw_payload(found.bytes),
                },
                blocks,
            }
        };
        drop(map);
        self.signatures.store(rel, &version)?;
        Ok(Some(State::Queue(VecDeque::from([(rel.clone(), op)]))))
    }

    /// Opens `path` below the backing folder as `O_PATH` without following any symlink;
    /// `None` when nothing is there any more.
    fn open_beneath(&self, path: &Path) -> Result<Option<Opened>, EncodeError> {
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS;
        let target = if path.as_os_str().is_empty() {
            Path::new(".")
        } else {
            path
        };
        let fd = match rustix::fs::openat2(&self.root, target, flags, Mode::empty(), how) {
            Ok(fd) => fd,
            // ELOOP: a directory on the way is now a symlink, so the path as named is gone.
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => return Ok(None),
            Err(e) => return Err(io_err(path)(e.into())),
        };
        let stat = rustix::fs::fstat(&fd).map_err(|e| io_err(path)(e.into()))?;
        Ok(Some(Opened { fd, stat }))
    }

    /// The metadata of an opened file, with all its extended attributes if asked.
    fn meta(&self, path: &Path, opened: &Opened, with_xattrs: bool) -> Result<Meta, EncodeError> {
        let st = &opened.stat;
        let xattrs = if with_xattrs {
            Some(read_xattrs(&proc_path(&opened.fd)).map_err(io_err(path))?)
        } else {
            None
        };
        Ok(Meta {
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime_ns: stat_times(st).0,
            xattrs,
        })
    }
}

/// The wire path of `path`, or an error naming it.
fn checked(path: &Path) -> Result<RelPath, EncodeError> {
    rel_path(path).ok_or_else(|| EncodeError::BadPath {
        path: path.to_path_buf(),
    })
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> EncodeError + '_ {
    move |source| EncodeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reopens an `O_PATH` descriptor of a regular file for reading, through procfs: the link
/// names exactly the inode already checked, whatever happened to the path since.
fn reopen(path: &Path, opened: &Opened) -> Result<File, EncodeError> {
    open_to_read(&proc_path(&opened.fd)).map_err(io_err(path))
}

/// All extended attributes, sorted by name; empty where the filesystem has none.
fn read_xattrs(proc_path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = Vec::new();
    if !read_sized(&mut names, |buf| rustix::fs::listxattr(proc_path, buf))? {
        return Ok(Vec::new());
    }
    let mut names: Vec<&[u8]> = names.split(|&b| b == 0).filter(|n| !n.is_empty()).collect();
    names.sort_unstable();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let mut value = Vec::new();
        // One removed between the listing and the read is simply not there.
        if read_sized(&mut value, |buf| {
            rustix::fs::getxattr(proc_path, OsStr::from_bytes(name), buf)
        })? {
            out.push((name.to_vec(), value));
        }
    }
    Ok(out)
}

/// Runs a size-returning xattr call into `out`, growing the buffer while the value grows
/// between calls (up to 16 MiB). `false` when there is nothing to read.
fn read_sized(
    out: &mut Vec<u8>,
    call: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
) -> io::Result<bool> {
    out.resize(256, 0);
    loop {
        match call(out) {
            Ok(n) => {
                out.truncate(n);
                return Ok(true);
            }
            Err(Errno::RANGE) if out.len() < 1 << 24 => {
                let bigger = out.len() * 4;
                out.resize(bigger, 0);
            }
            Err(Errno::NODATA | Errno::NOTSUP) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The version a delta is computed against.
struct Base {
    hash: Hash,
    signature: Vec<u8>,
    /// Its block hashes, when known (the sender's own stored version).
    blocks: Option<Vec<Hash>>,
}

/// The changes of one update, numbered as they are taken. Each item is read from the
/// file when it is taken; after an error the iterator ends.
pub struct Encoded<'a> {
    encoder: &'a mut Encoder,
    /// The version every streamed change carries.
    version: Vector,
    /// The path as the update named it, for error messages.
    path: PathBuf,
    /// The path the streamed changes are for.
    rel: RelPath,
    state: State,
}

impl std::fmt::Debug for Encoded<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoded").field("path", &self.path).finish()
    }
}

enum State {
    Done,
    /// Operations already known, sent in order.
    Queue(VecDeque<(RelPath, Op)>),
    Ranges(RangeStream),
    Whole(WholeStream),
}

impl Iterator for Encoded<'_> {
    type Item = Result<Change, EncodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        let signatures = &self.encoder.signatures;
        let rel = &self.rel;
        let step: Result<Option<(RelPath, Op)>, EncodeError> = match &mut self.state {
            State::Done => Ok(None),
            State::Queue(ops) => Ok(ops.pop_front()),
            State::Ranges(stream) => match stream.next_op() {
                Ok(Some(op)) => Ok(Some((rel.clone(), op))),
                // Every range is out: the peer now holds the patched version, if any.
                Ok(None) => match stream.finish() {
                    Some(version) => signatures.store(rel, &version).map(|()| None),
                    None => Ok(None),
                }
                .map_err(Into::into),
                Err(e) => Err(io_err(&self.path)(e)),
            },
            State::Whole(stream) => match stream.next_op() {
                Ok(Some((op, finished))) => match finished {
                    Some(Some(version)) => signatures.store(rel, &version),
                    Some(None) => signatures.remove(rel),
                    None => Ok(()),
                }
                .map(|()| Some((rel.clone(), op)))
                .map_err(Into::into),
                Ok(None) => Ok(None),
                Err(e) => Err(io_err(&self.path)(e)),
            },
        };
        match step {
            Ok(Some((path, op))) => {
                let seq = self.encoder.next_seq;
                self.encoder.next_seq += 1;
                Some(Ok(Change {
                    seq,
                    path,
                    op,
                    version: self.version.clone(),
                }))
            }
            Ok(None) => {
                self.state = State::Done;
                None
            }
            Err(e) => {
                self.state = State::Done;
                Some(Err(e))
            }
        }
    }
}

/// Whole-file pieces, read one at a time.
struct WholeStream {
    file: File,
    meta: Meta,
    size: u64,
    offset: u64,
    /// Builds the version being sent, for files large enough to be sent by delta later.
    builder: Option<VersionBuilder>,
    done: bool,
}

impl WholeStream {
    fn new(file: File, meta: Meta, size: u64) -> WholeStream {
        WholeStream {
            file,
            meta,
            size,
            offset: 0,
            builder: (size >= DELTA_THRESHOLD).then(|| VersionBuilder::new(size)),
            done: false,
        }
    }

    /// Starts at `offset` when the receiver's first `offset` bytes (a whole number of
    /// blocks, whose block hashes hash to `prefix_hash` as [`content_hash`] computes) are
    /// this file's; otherwise from the start.
    fn resume(&mut self, prefix_hash: Hash, offset: u64) -> io::Result<()> {
        if offset == 0 || offset % BLOCK_SIZE != 0 || offset > self.size {
            return Ok(());
        }
        let mut hashes = Vec::new();
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        let mut at = 0;
        while at < offset {
            let got = read_full(&self.file, &mut buf, at)?;
            if got < buf.len() {
                return Ok(());
            }
            hashes.push(*blake3::hash(&buf).as_bytes());
            if let Some(builder) = &mut self.builder {
                builder.feed(&buf);
            }
            at += BLOCK_SIZE;
        }
        if content_hash(&hashes) == prefix_hash {
            self.offset = offset;
        } else {
            self.builder = (self.size >= DELTA_THRESHOLD).then(|| VersionBuilder::new(self.size));
        }
        Ok(())
    }

    /// The next piece, and with the last one the version sent (`Some(None)` when the file
    /// is too small to keep one).
    fn next_op(&mut self) -> io::Result<Option<(Op, Option<Option<Version>>)>> {
        if self.done {
            return Ok(None);
        }
        let want = (self.size.saturating_sub(self.offset)).min(proto::MAX_CHUNK as u64) as usize;
        let mut data = vec![0u8; want];
        let got = read_full(&self.file, &mut data, self.offset)?;
        data.truncate(got);
        let offset = self.offset;
        self.offset += got as u64;
        // A short read: the file shrank while it was sent; it ends here.
        let last = got < want || self.offset >= self.size;
        if last {
            self.size = self.offset;
        }
        let blocks: Vec<(u64, Hash)> = data
            .chunks(BLOCK_SIZE as usize)
            .enumerate()
            .map(|(i, block)| {
                (
                    offset / BLOCK_SIZE + i as u64,
                    *blake3::hash(block).as_bytes(),
                )
            })
            .collect();
        if let Some(builder) = &mut self.builder {
            builder.feed(&data);
        }
        let finished = if last {
            self.done = true;
            Some(self.builder.take().map(VersionBuilder::finish))
        } else {
            None
        };
        let meta = self.meta.clone();
        // Extended attributes travel once, with the first piece.
        self.meta.xattrs = None;
        let op = Op::File {
            meta,
            size: self.size,
            data: FileData::Whole {
                offset,
                data: raw_payload(data),
                last,
            },
            blocks,
        };
        Ok(Some((op, finished)))
    }
}

/// Recorded ranges, read block by block, several changes when they are large.
struct RangeStream {
    file: File,
    meta: Meta,
    size: u64,
    /// `[start, end)` of each range clamped to the size, sorted, merged, none empty.
    segments: Vec<(u64, u64)>,
    /// The index of the first segment not wholly sent.
    segment: usize,
    /// The block to read next.
    block: u64,
    /// The last partial block, checked because the file was cut (or extended) there.
    tail_block: Option<u64>,
    /// Whether at least one change went out (an update always yields one).
    emitted: bool,
    patch: Option<Patch>,
}

/// What is needed to bring the stored version up to date with the ranges sent.
struct Patch {
    base: Version,
    options: SignatureOptions,
    /// Per block read: its hash and its signature entries.
    blocks: BTreeMap<u64, (Hash, Vec<u8>)>,
}

impl RangeStream {
    fn new(
        file: File,
        meta: Meta,
        size: u64,
        ranges: &[(u64, u64)],
        stored: Option<Version>,
    ) -> RangeStream {
        let mut marks_size = false;
        let mut segments: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        let mut sorted = ranges.to_vec();
        sorted.sort_unstable();
        for (offset, len) in sorted {
            let end = offset.saturating_add(len);
            if len == 0 || end > size {
                marks_size = true;
            }
            let end = end.min(size);
            if offset >= end {
                continue;
            }
            match segments.last_mut() {
                Some(last) if last.1 >= offset => last.1 = last.1.max(end),
                _ => segments.push((offset, end)),
            }
        }
        let tail_block = (marks_size && size % BLOCK_SIZE != 0).then_some(size / BLOCK_SIZE);
        let block = segments.first().map_or(u64::MAX, |s| s.0 / BLOCK_SIZE);
        let patch = stored.and_then(|base| {
            let header = base.signature.get(..SIGNATURE_HEADER)?;
            let word =
                |at: usize| Some(u32::from_be_bytes(header.get(at..at + 4)?.try_into().ok()?));
            let options = SignatureOptions {
                block_size: word(4)?,
                crypto_hash_size: word(8)?,
            };
            Some(Patch {
                base,
                options,
                blocks: BTreeMap::new(),
            })
        });
        RangeStream {
            file,
            meta,
            size,
            segments,
            segment: 0,
            block,
            tail_block,
            emitted: false,
            patch,
        }
    }

    /// The next block to read, if any: the blocks the segments touch in order, then the
    /// tail block if no segment covered it.
    fn peek_block(&self) -> Option<u64> {
        if self.segment < self.segments.len() {
            return Some(self.block);
        }
        self.tail_block
    }

    /// Moves past `block`.
    fn advance(&mut self, block: u64) {
        if self.segment >= self.segments.len() {
            self.tail_block = None;
            return;
        }
        if self.tail_block == Some(block) {
            self.tail_block = None;
        }
        let next = block + 1;
        let block_end = next * BLOCK_SIZE;
        while let Some(&(_, end)) = self.segments.get(self.segment) {
            if end > block_end {
                break;
            }
            self.segment += 1;
        }
        if let Some(&(start, _)) = self.segments.get(self.segment) {
            self.block = next.max(start / BLOCK_SIZE);
        }
    }

    /// The parts of the segments inside `[from, to)`.
    fn portions(&self, from: u64, to: u64) -> Vec<(u64, u64)> {
        self.segments
            .iter()
            .skip(self.segment)
            .take_while(|s| s.0 < to)
            .filter(|s| s.1 > from)
            .map(|s| (s.0.max(from), s.1.min(to)))
            .collect()
    }

    fn next_op(&mut self) -> io::Result<Option<Op>> {
        let mut ranges: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut blocks: Vec<(u64, Hash)> = Vec::new();
        let mut blocks_read = 0usize;
        let mut data_len = 0usize;
        let mut buf = Vec::new();
        while let Some(block) = self.peek_block() {
            let start = block * BLOCK_SIZE;
            let portions = self.portions(start, start + BLOCK_SIZE);
            let adding: u64 = portions.iter().map(|p| p.1 - p.0).sum();
            let cost =
                (ranges.len() + portions.len()) * RANGE_COST + (blocks_read + 1) * BLOCK_COST;
            if blocks_read > 0
                && (data_len as u64 + adding > proto::MAX_CHUNK as u64 || cost > OVERHEAD_BUDGET)
            {
                break;
            }
            self.advance(block);
            if start >= self.size {
                continue;
            }
            let want = (self.size - start).min(BLOCK_SIZE) as usize;
            buf.resize(want, 0);
            let got = read_full(&self.file, &mut buf, start)?;
            if got < want {
                // The file shrank since the stat: it ends here now.
                self.size = start + got as u64;
            }
            let read = buf.get(..got).unwrap_or_default();
            let hash = *blake3::hash(read).as_bytes();
            // A block the ranges cover only in part also holds bytes the receiver got (or
            // gets) from other changes, and a writer may be changing them right now (the
            // rest of one large write arrives as later updates): checking its hash would
            // fail for no fault and fetch the whole file again. The same goes for a block
            // touched only by a size change (a truncation read after the next write).
            // Only blocks the ranges cover whole are checked; catch-up compares whole
            // files later anyway.
            let covered: u64 = portions.iter().map(|p| p.1 - p.0).sum();
            if got > 0 {
                blocks_read += 1;
                if !portions.is_empty() && covered >= got as u64 {
                    blocks.push((block, hash));
                }
            }
            if let Some(patch) = &mut self.patch {
                let entries = Signature::calculate(read, patch.options);
                patch.blocks.insert(
                    block,
                    (
                        hash,
                        entries
                            .serialized()
                            .get(SIGNATURE_HEADER..)
                            .unwrap_or_default()
                            .to_vec(),
                    ),
                );
                if patch.blocks.len() > MAX_PATCHED_BLOCKS {
                    self.patch = None;
                }
            }
            for (from, to) in portions {
                let Some(bytes) =
                    read.get((from - start) as usize..((to - start) as usize).min(got))
                else {
                    continue;
                };
                data_len += bytes.len();
                match ranges.last_mut() {
                    Some((offset, data)) if *offset + data.len() as u64 == from => {
                        data.extend_from_slice(bytes)
                    }
                    _ => ranges.push((from, bytes.to_vec())),
                }
            }
        }
        if blocks_read == 0 && self.emitted {
            return Ok(None);
        }
        self.emitted = true;
        let meta = self.meta.clone();
        self.meta.xattrs = None;
        Ok(Some(Op::File {
            meta,
            size: self.size,
            data: FileData::Ranges(
                ranges
                    .into_iter()
                    .map(|(offset, data)| Range {
                        offset,
                        data: raw_payload(data),
                    })
                    .collect(),
            ),
            blocks,
        }))
    }

    /// The stored version patched with the blocks sent, when they cover every block that
    /// changed extent with the size; `None` when it cannot be (then none stays stored).
    fn finish(&mut self) -> Option<Version> {
        let patch = self.patch.take()?;
        let base = &patch.base;
        let bs = u64::from(patch.options.block_size);
        if bs == 0 || BLOCK_SIZE % bs != 0 {
            return None;
        }
        let entry = 4 + patch.options.crypto_hash_size as usize;
        let count = self.size.div_ceil(BLOCK_SIZE);
        let changed_from = if base.size == self.size {
            count
        } else {
            base.size.min(self.size) / BLOCK_SIZE
        };
        let mut block_hashes = Vec::with_capacity(count as usize);
        let mut signature = base.signature.get(..SIGNATURE_HEADER)?.to_vec();
        for block in 0..count {
            match patch.blocks.get(&block) {
                Some((hash, entries)) => {
                    block_hashes.push(*hash);
                    signature.extend_from_slice(entries);
                }
                None if block < changed_from => {
                    block_hashes.push(*base.block_hashes.get(block as usize)?);
                    let start = block * BLOCK_SIZE;
                    let len = (self.size - start).min(BLOCK_SIZE);
                    let at = SIGNATURE_HEADER + (start / bs) as usize * entry;
                    let end = at + len.div_ceil(bs) as usize * entry;
                    signature.extend_from_slice(base.signature.get(at..end)?);
                }
                None => return None,
            }
        }
        Some(Version {
            size: self.size,
            hash: content_hash(&block_hashes),
            block_hashes,
            signature,
        })
    }
}
