//! Deltas of large files against the version a peer already holds.
//!
//! For every file of at least [`DELTA_THRESHOLD`] bytes it sends whole or by delta, the
//! sender keeps a [`Version`] in its state directory ([`SignatureStore`]): the size, the
//! BLAKE3 hash of each [`BLOCK_SIZE`] block, the content hash (BLAKE3 over those block
//! hashes, the same value as [`proto::Entry::content`]) and a `fast_rsync` signature. When
//! the file later changes in unknown places, [`diff`] against that signature gives a delta
//! whose size follows the change, not the file; its base is the stored content hash, which
//! the receiver checks against the version it holds before applying.
//!
//! Signature block size grows with the file, about half its square root rounded to a power
//! of two, between [`MIN_SIGNATURE_BLOCK`] and [`MAX_SIGNATURE_BLOCK`]: a 1 GiB file gets
//! 16 KiB blocks, so a 4 KiB change costs at most two blocks of literal data (32 KiB) and
//! the signature is 1 MiB. Every signature block size divides [`BLOCK_SIZE`], which lets a
//! signature be built piece by piece while a whole file streams out ([`VersionBuilder`]).
//!
//! Store files are named by the BLAKE3 of the relative path and written to a temporary
//! name, then renamed, so a reader sees an old or a new version, never a torn one; they are
//! a cache, so they are not fsync'd: a file lost or damaged in a crash is checked on load
//! and ignored, and the next change of that file is sent whole.
//!
//! `fast_rsync` works on whole slices, so large files are memory-mapped ([`map_file`]).
//! A process that truncates the file while it is mapped makes the next access to the lost
//! pages raise SIGBUS; the encoder maps only for the duration of one diff.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use fast_rsync::{Signature, SignatureOptions};
use memmap2::Mmap;

use super::proto::{self, Hash, RelPath};
use crate::index::BLOCK_SIZE;

/// Files smaller than this are always sent whole: a delta would save little.
pub const DELTA_THRESHOLD: u64 = 256 * 1024;

/// The smallest and largest `fast_rsync` block sizes used.
pub const MIN_SIGNATURE_BLOCK: u32 = 1024;
pub const MAX_SIGNATURE_BLOCK: u32 = 64 * 1024;

/// Bytes of MD4 kept per signature block: with the 32-bit rolling checksum, 128 bits
/// tell blocks apart, and the signature stays at 16 bytes per block.
pub const CRYPTO_HASH_SIZE: u32 = 12;

/// The smallest crypto hash accepted in a peer's signature: fewer bits make false block
/// matches likely.
const MIN_CRYPTO_HASH_SIZE: u32 = 8;

/// `fast_rsync` signature header: magic, block size, crypto hash size.
const SIGNATURE_HEADER: usize = 12;

/// The largest delta worth sending: one message's worth of data.
pub const MAX_DELTA: usize = proto::MAX_CHUNK;

/// Magic of a store file, with the format version in the last byte.
const STORE_MAGIC: &[u8; 8] = b"FSSIGV01";

/// Windows sampled by [`diff`] before a full diff of a large file, and the signature
/// blocks in each.
const PROBE_WINDOWS: u64 = 8;
const PROBE_BLOCKS: u64 = 64;

/// How much larger than its limit `fast_rsync`'s own delta may be before [`normalize`]
/// merges its copies.
const RAW_DELTA_FACTOR: usize = 8;

/// Why a signature or delta operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("cannot use the signature folder {path}: {source}; check that the state directory exists and is writable")]
    Store { path: PathBuf, source: io::Error },
    #[error("the peer sent an unusable signature ({reason}); the file is sent whole")]
    BadSignature { reason: &'static str },
    #[error("computing a delta failed: {reason}; the file is sent whole")]
    Diff { reason: String },
}

/// The `fast_rsync` options for a file of `size` bytes.
pub fn signature_options(size: u64) -> SignatureOptions {
    let root = (size as f64).sqrt() as u64 / 2;
    let block = root.checked_next_power_of_two().unwrap_or(u64::MAX).clamp(
        u64::from(MIN_SIGNATURE_BLOCK),
        u64::from(MAX_SIGNATURE_BLOCK),
    );
    SignatureOptions {
        // Clamped to at most 64 Ki above, so the cast is exact.
        block_size: block as u32,
        crypto_hash_size: CRYPTO_HASH_SIZE,
    }
}

/// The content hash of a file: BLAKE3 over its [`BLOCK_SIZE`] block hashes in order (as
/// the index stores them), so a node computes it from its index without reading the file.
pub fn content_hash(block_hashes: &[Hash]) -> Hash {
    let mut hasher = blake3::Hasher::new();
    for hash in block_hashes {
        hasher.update(hash);
    }
    *hasher.finalize().as_bytes()
}

/// One version of a file, as far as deltas need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub size: u64,
    /// [`content_hash`] of `block_hashes`.
    pub hash: Hash,
    /// BLAKE3 of each [`BLOCK_SIZE`] block.
    pub block_hashes: Vec<Hash>,
    /// A serialized `fast_rsync` signature.
    pub signature: Vec<u8>,
}

impl Version {
    /// The version of `data`, a whole file.
    pub fn of_bytes(data: &[u8]) -> Version {
        let mut builder = VersionBuilder::new(data.len() as u64);
        builder.feed(data);
        builder.finish()
    }
}

/// Builds a [`Version`] from a file's bytes fed in order, in pieces of any size.
#[derive(Debug)]
pub struct VersionBuilder {
    options: SignatureOptions,
    size: u64,
    block_hashes: Vec<Hash>,
    signature: Vec<u8>,
    /// The bytes of the current, incomplete [`BLOCK_SIZE`] block.
    pending: Vec<u8>,
}

impl VersionBuilder {
    /// `expected_size` picks the signature block size; the version has the size of what
    /// was fed.
    pub fn new(expected_size: u64) -> VersionBuilder {
        let options = signature_options(expected_size);
        let empty = Signature::calculate(&[], options).into_serialized();
        VersionBuilder {
            options,
            size: 0,
            block_hashes: Vec::new(),
            signature: empty,
            pending: Vec::new(),
        }
    }

    pub fn feed(&mut self, mut bytes: &[u8]) {
        self.size += bytes.len() as u64;
        let block = BLOCK_SIZE as usize;
        while !bytes.is_empty() {
            if self.pending.is_empty() && bytes.len() >= block {
                let (whole, rest) = bytes.split_at(block);
                self.add_block(whole);
                bytes = rest;
                continue;
            }
            let take = (block - self.pending.len()).min(bytes.len());
            let (head, rest) = bytes.split_at(take);
            self.pending.extend_from_slice(head);
            bytes = rest;
            if self.pending.len() == block {
                let full = std::mem::take(&mut self.pending);
                self.add_block(&full);
                self.pending = full;
                self.pending.clear();
            }
        }
    }

    /// Adds one block; only the last may be short. Signature blocks divide [`BLOCK_SIZE`],
    /// so the signature of the file is the concatenation of its blocks' signatures.
    fn add_block(&mut self, block: &[u8]) {
        self.block_hashes.push(*blake3::hash(block).as_bytes());
        let sig = Signature::calculate(block, self.options);
        self.signature
            .extend_from_slice(sig.serialized().get(SIGNATURE_HEADER..).unwrap_or_default());
    }

    pub fn finish(mut self) -> Version {
        if !self.pending.is_empty() {
            let last = std::mem::take(&mut self.pending);
            self.add_block(&last);
        }
        Version {
            size: self.size,
            hash: content_hash(&self.block_hashes),
            block_hashes: self.block_hashes,
            signature: self.signature,
        }
    }
}

/// Maps `file` read-only, `None` when it is empty (an empty mapping is not allowed).
pub fn map_file(file: &File) -> io::Result<Option<Mmap>> {
    if file.metadata()?.len() == 0 {
        return Ok(None);
    }
    // SAFETY: the mapping is read-only and private to this process; the bytes may change
    // under it if another process writes the file, which only yields a wrong delta that
    // the receiver's block check rejects. Truncation by another process raises SIGBUS on
    // access, the documented limit of mapping files (see the module docs).
    let map = unsafe { Mmap::map(file)? };
    Ok(Some(map))
}

/// A delta and where it puts new data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The `fast_rsync` delta.
    pub bytes: Vec<u8>,
    /// Indexes of the [`BLOCK_SIZE`] blocks of the new file that hold literal data or data
    /// copied from another offset of the base, sorted: the blocks the receiver must check.
    pub touched: Vec<u64>,
}

/// Checks a serialized signature and returns its block size.
fn check_signature(signature: &[u8]) -> Result<u32, DeltaError> {
    let field = |at: usize| -> Result<u32, DeltaError> {
        let bytes = signature.get(at..at + 4).ok_or(DeltaError::BadSignature {
            reason: "truncated header",
        })?;
        let mut word = [0u8; 4];
        word.copy_from_slice(bytes);
        Ok(u32::from_be_bytes(word))
    };
    let block_size = field(4)?;
    let crypto = field(8)?;
    if !(MIN_SIGNATURE_BLOCK..=MAX_SIGNATURE_BLOCK).contains(&block_size)
        || BLOCK_SIZE % u64::from(block_size) != 0
    {
        return Err(DeltaError::BadSignature {
            reason: "block size out of range",
        });
    }
    if !(MIN_CRYPTO_HASH_SIZE..=16).contains(&crypto) {
        return Err(DeltaError::BadSignature {
            reason: "hash size out of range",
        });
    }
    if (signature.len() - SIGNATURE_HEADER) % (4 + crypto as usize) != 0 {
        return Err(DeltaError::BadSignature {
            reason: "length is not a whole number of blocks",
        });
    }
    Ok(block_size)
}

/// The delta turning the version `signature` describes into `data`, or `None` when it
/// would be larger than `limit` bytes or nothing is shared (then send the file whole).
///
/// The delta is built in two steps. First the signature of `data` at the same block
/// size tells which blocks are unchanged in place; they become copies in place, merged
/// into runs. Then only the runs of other blocks are given to `fast_rsync`, which finds
/// data moved within the file (an insertion shifts everything after it). This keeps the
/// work and the delta proportional to the change, also for repetitive content, for which
/// `fast_rsync` alone copies every block from the one base block it remembers for that
/// content, one command each.
///
/// `fast_rsync` writes literal data only when the next match is found, so a run sharing
/// nothing with the base would be scanned to its end before the limit could stop it; for
/// long runs a few windows spread over them are diffed first, and when none of them shares
/// a single block with the base, the file is sent whole.
pub fn diff(signature: &[u8], data: &[u8], limit: usize) -> Result<Option<Delta>, DeltaError> {
    diff_with(signature, data, None, limit)
}

/// [`diff`], given the signature of `data` when the caller has one: it is used when its
/// block and hash sizes are those of `signature`, sparing a pass over the data.
pub fn diff_with(
    signature: &[u8],
    data: &[u8],
    data_signature: Option<&[u8]>,
    limit: usize,
) -> Result<Option<Delta>, DeltaError> {
    let block_size = check_signature(signature)?;
    let crypto_hash_size = u32::from_be_bytes(
        signature
            .get(8..12)
            .and_then(|b| b.try_into().ok())
            .unwrap_or_default(),
    );
    let sig = Signature::deserialize(signature.to_vec()).map_err(|_| DeltaError::BadSignature {
        reason: "not an MD4 rsync signature",
    })?;
    let index = sig.index();
    let options = SignatureOptions {
        block_size,
        crypto_hash_size,
    };
    let computed;
    let ours = match data_signature {
        Some(given) if given.get(..SIGNATURE_HEADER) == signature.get(..SIGNATURE_HEADER) => given,
        _ => {
            computed = Signature::calculate(data, options);
            computed.serialized()
        }
    };
    let entry = 4 + crypto_hash_size as usize;
    let base_entries = signature.get(SIGNATURE_HEADER..).unwrap_or_default();
    let new_entries = ours.get(SIGNATURE_HEADER..).unwrap_or_default();
    let mut out = Emitter::new(base_entries, u64::from(block_size), entry, limit);
    let bs = block_size as usize;
    let blocks = data.len().div_ceil(bs);
    let same = |j: usize| {
        let span = j * entry..(j + 1) * entry;
        matches!(base_entries.get(span.clone()), Some(e) if Some(e) == new_entries.get(span))
    };
    let mut j = 0;
    while j < blocks {
        let start = j;
        let clean = same(j);
        while j < blocks && same(j) == clean {
            j += 1;
        }
        let (from, to) = (start * bs, (j * bs).min(data.len()));
        let run = data.get(from..to).unwrap_or_default();
        let done = if clean {
            out.copy(from as u64, run.len() as u64)
        } else {
            diff_run(&index, run, u64::from(block_size), &mut out)?
        };
        if !done {
            return Ok(None);
        }
    }
    Ok(out.finish())
}

/// Adds the delta of `run`, a stretch of changed blocks, to `out`; `false` when the delta
/// got too large or nothing in a long run is shared.
fn diff_run(
    index: &fast_rsync::IndexedSignature<'_>,
    run: &[u8],
    block_size: u64,
    out: &mut Emitter<'_>,
) -> Result<bool, DeltaError> {
    let window = block_size * PROBE_BLOCKS;
    let len = run.len() as u64;
    if len >= window * PROBE_WINDOWS * 4 {
        let stride = len / PROBE_WINDOWS;
        let mut shared = false;
        for i in 0..PROBE_WINDOWS {
            let start = (i * stride) as usize;
            let Some(sample) = run.get(start..start + window as usize) else {
                continue;
            };
            let mut count = Counter(0);
            fast_rsync::diff(index, sample, &mut count).map_err(diff_error)?;
            // A matched block costs a few bytes instead of its size.
            if count.0 < window {
                shared = true;
                break;
            }
        }
        if !shared {
            return Ok(false);
        }
    }
    // Room for the many small copies of repetitive content, before they are merged.
    let mut delta = Limited {
        bytes: Vec::new(),
        limit: out.limit.saturating_mul(RAW_DELTA_FACTOR),
    };
    match fast_rsync::diff(index, run, &mut delta) {
        Ok(()) => {}
        Err(fast_rsync::DiffError::Io(e)) if e.kind() == io::ErrorKind::FileTooLarge => {
            return Ok(false)
        }
        Err(e) => return Err(diff_error(e)),
    }
    let commands = parse_delta(&delta.bytes).ok_or_else(|| DeltaError::Diff {
        reason: "fast_rsync wrote a delta that does not parse".into(),
    })?;
    for command in commands {
        let fits = match command {
            Command::Copy { offset, len } => out.copy(offset, len),
            Command::Literal { at, len } => {
                out.literal(delta.bytes.get(at..at + len).unwrap_or_default())
            }
        };
        if !fits {
            return Ok(false);
        }
    }
    Ok(true)
}

fn diff_error(e: fast_rsync::DiffError) -> DeltaError {
    DeltaError::Diff {
        reason: e.to_string(),
    }
}

/// A writer that only counts.
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A buffer that fails with `FileTooLarge` past `limit` bytes.
struct Limited {
    bytes: Vec<u8>,
    limit: usize,
}

impl Write for Limited {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            return Err(io::ErrorKind::FileTooLarge.into());
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One command of a librsync-format delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    /// `len` literal bytes, found at `at` in the delta.
    Literal { at: usize, len: usize },
    /// `len` bytes of the base from `offset`.
    Copy { offset: u64, len: u64 },
}

const DELTA_MAGIC: [u8; 4] = 0x7273_0236u32.to_be_bytes();
const OP_END: u8 = 0;
const OP_LITERAL_64: u8 = 0x40;
const OP_LITERAL_N1: u8 = 0x41;
const OP_LITERAL_N8: u8 = 0x44;
const OP_COPY_N1_N1: u8 = 0x45;
const OP_COPY_N8_N8: u8 = 0x54;

/// The commands of a delta, `None` if it does not parse.
fn parse_delta(delta: &[u8]) -> Option<Vec<Command>> {
    let body = delta.strip_prefix(&DELTA_MAGIC)?;
    let mut at = DELTA_MAGIC.len();
    let mut take = |n: usize| -> Option<(usize, u64)> {
        let bytes = body.get(at - DELTA_MAGIC.len()..at - DELTA_MAGIC.len() + n)?;
        let start = at;
        at += n;
        Some((
            start,
            bytes.iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b)),
        ))
    };
    let mut commands = Vec::new();
    loop {
        let (_, op) = take(1)?;
        let op = u8::try_from(op).ok()?;
        let command = match op {
            OP_END => return Some(commands),
            1..=OP_LITERAL_64 => {
                let (at, _) = take(usize::from(op))?;
                Command::Literal {
                    at,
                    len: usize::from(op),
                }
            }
            OP_LITERAL_N1..=OP_LITERAL_N8 => {
                let (_, len) = take(1 << (op - OP_LITERAL_N1))?;
                let len = usize::try_from(len).ok()?;
                let (at, _) = take(len)?;
                Command::Literal { at, len }
            }
            OP_COPY_N1_N1..=OP_COPY_N8_N8 => {
                let class = op - OP_COPY_N1_N1;
                let (_, offset) = take(1 << (class / 4))?;
                let (_, len) = take(1 << (class % 4))?;
                Command::Copy { offset, len }
            }
            _ => return None,
        };
        commands.push(command);
    }
}

/// The bytes of `value` in the smallest of 1, 2, 4 or 8, and the size class (0..=3).
fn varint(value: u64) -> (u8, Vec<u8>) {
    if let Ok(v) = u8::try_from(value) {
        (0, vec![v])
    } else if let Ok(v) = u16::try_from(value) {
        (1, v.to_be_bytes().to_vec())
    } else if let Ok(v) = u32::try_from(value) {
        (2, v.to_be_bytes().to_vec())
    } else {
        (3, value.to_be_bytes().to_vec())
    }
}

/// Writes a librsync-format delta command by command, merging adjacent copies, turning
/// copies of blocks whose base checksums equal those at the destination into copies in
/// place, and noting the [`BLOCK_SIZE`] blocks of the result that are not copied in place.
struct Emitter<'a> {
    bytes: Vec<u8>,
    /// The copy not yet written, which the next may extend.
    pending: Option<(u64, u64)>,
    /// Bytes of the result described so far.
    pos: u64,
    touched: Vec<u64>,
    limit: usize,
    base_entries: &'a [u8],
    block_size: u64,
    entry: usize,
}

impl<'a> Emitter<'a> {
    fn new(base_entries: &'a [u8], block_size: u64, entry: usize, limit: usize) -> Emitter<'a> {
        Emitter {
            bytes: DELTA_MAGIC.to_vec(),
            pending: None,
            pos: 0,
            touched: Vec::new(),
            limit,
            base_entries,
            block_size,
            entry,
        }
    }

    /// Whether the base blocks at `a` and at `b` have the same checksums, `len` bytes long.
    fn same_base(&self, a: u64, b: u64, len: u64) -> bool {
        let bs = self.block_size;
        if a % bs != 0 || b % bs != 0 || len % bs != 0 {
            return false;
        }
        let span = |first: u64| {
            let start = (first / bs) as usize * self.entry;
            self.base_entries
                .get(start..start + (len / bs) as usize * self.entry)
        };
        span(a).is_some() && span(a) == span(b)
    }

    fn touch(&mut self, len: u64) {
        if len == 0 {
            return;
        }
        let last = (self.pos + len - 1) / BLOCK_SIZE;
        for block in self.pos / BLOCK_SIZE..=last {
            if self.touched.last() != Some(&block) {
                self.touched.push(block);
            }
        }
    }

    /// `false` once the delta is over its limit.
    fn copy(&mut self, offset: u64, len: u64) -> bool {
        let offset = if offset != self.pos && self.same_base(offset, self.pos, len) {
            self.pos
        } else {
            offset
        };
        if offset != self.pos {
            self.touch(len);
        }
        self.pos += len;
        match &mut self.pending {
            Some((start, pending)) if *start + *pending == offset => *pending += len,
            _ => {
                self.flush();
                self.pending = Some((offset, len));
            }
        }
        self.bytes.len() <= self.limit
    }

    fn literal(&mut self, data: &[u8]) -> bool {
        if data.is_empty() {
            return true;
        }
        self.flush();
        self.touch(data.len() as u64);
        self.pos += data.len() as u64;
        if data.len() <= 64 {
            self.bytes.push(data.len() as u8);
        } else {
            let (class, len) = varint(data.len() as u64);
            self.bytes.push(OP_LITERAL_N1 + class);
            self.bytes.extend_from_slice(&len);
        }
        self.bytes.extend_from_slice(data);
        self.bytes.len() <= self.limit
    }

    fn flush(&mut self) {
        if let Some((offset, len)) = self.pending.take() {
            let ((offset_class, offset), (len_class, len)) = (varint(offset), varint(len));
            self.bytes
                .push(OP_COPY_N1_N1 + offset_class * 4 + len_class);
            self.bytes.extend_from_slice(&offset);
            self.bytes.extend_from_slice(&len);
        }
    }

    /// The finished delta, `None` if over the limit.
    fn finish(mut self) -> Option<Delta> {
        self.flush();
        self.bytes.push(OP_END);
        (self.bytes.len() <= self.limit).then_some(Delta {
            bytes: self.bytes,
            touched: self.touched,
        })
    }
}

/// The sender's stored [`Version`]s, one file per path in `<state_dir>/signatures`.
#[derive(Debug)]
pub struct SignatureStore {
    dir: PathBuf,
}

impl SignatureStore {
    /// Opens (creating it if needed) the store below `state_dir`.
    pub fn open(state_dir: &Path) -> Result<SignatureStore, DeltaError> {
        let dir = state_dir.join("signatures");
        std::fs::create_dir_all(&dir).map_err(|source| DeltaError::Store {
            path: dir.clone(),
            source,
        })?;
        Ok(SignatureStore { dir })
    }

    fn file_of(&self, rel: &RelPath) -> PathBuf {
        self.dir.join(blake3::hash(&rel.0).to_hex().as_str())
    }

    fn store_err(&self, source: io::Error) -> DeltaError {
        DeltaError::Store {
            path: self.dir.clone(),
            source,
        }
    }

    /// The version last sent for `rel`, if one is stored and intact.
    pub fn load(&self, rel: &RelPath) -> Result<Option<Version>, DeltaError> {
        let bytes = match std::fs::read(self.file_of(rel)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.store_err(e)),
        };
        match decode(&bytes, rel) {
            Some(version) => Ok(Some(version)),
            None => {
                tracing::warn!(path = %String::from_utf8_lossy(&rel.0), "ignoring a damaged stored signature");
                Ok(None)
            }
        }
    }

    /// Records `version` as the one the peers now hold for `rel`.
    pub fn store(&self, rel: &RelPath, version: &Version) -> Result<(), DeltaError> {
        let file = self.file_of(rel);
        let temp = file.with_extension("tmp");
        std::fs::write(&temp, encode(rel, version)).map_err(|e| self.store_err(e))?;
        std::fs::rename(&temp, &file).map_err(|e| self.store_err(e))
    }

    /// Moves the stored version of `from` to `to` (the file was renamed); with `exchange`
    /// the two swap.
    pub fn rename(&self, from: &RelPath, to: &RelPath, exchange: bool) -> Result<(), DeltaError> {
        let theirs = if exchange { self.load(to)? } else { None };
        match self.load(from)? {
            Some(version) => self.store(to, &version)?,
            None => self.remove(to)?,
        }
        match theirs {
            Some(version) => self.store(from, &version),
            None => self.remove(from),
        }
    }

    /// Forgets `rel` (deleted, or changed in a way the stored version no longer describes).
    pub fn remove(&self, rel: &RelPath) -> Result<(), DeltaError> {
        self.remove_file(&self.file_of(rel))
    }

    fn remove_file(&self, file: &Path) -> Result<(), DeltaError> {
        match std::fs::remove_file(file) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(self.store_err(e)),
            _ => Ok(()),
        }
    }

    /// The store files of every path strictly below directory `dir`, with those paths.
    /// Reads each file's header only; the store holds one file per large file sent.
    fn below(&self, dir: &RelPath) -> Result<Vec<(PathBuf, RelPath)>, DeltaError> {
        let mut prefix = dir.0.clone();
        prefix.push(b'/');
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| self.store_err(e))? {
            let file = entry.map_err(|e| self.store_err(e))?.path();
            if let Some(rel) = stored_path(&file) {
                if rel.starts_with(&prefix) {
                    out.push((file, RelPath(rel)));
                }
            }
        }
        Ok(out)
    }

    /// Forgets every path below directory `dir` (it was deleted).
    pub fn remove_tree(&self, dir: &RelPath) -> Result<(), DeltaError> {
        for (file, _) in self.below(dir)? {
            self.remove_file(&file)?;
        }
        Ok(())
    }

    /// Moves the stored versions of every path below directory `from` below `to` (the
    /// directory was renamed); with `exchange` both trees' versions are dropped instead,
    /// which only costs their next change a whole transfer.
    pub fn rename_tree(
        &self,
        from: &RelPath,
        to: &RelPath,
        exchange: bool,
    ) -> Result<(), DeltaError> {
        if exchange {
            self.remove_tree(from)?;
            return self.remove_tree(to);
        }
        self.remove_tree(to)?;
        for (file, rel) in self.below(from)? {
            let mut moved = to.0.clone();
            moved.extend_from_slice(rel.0.get(from.0.len()..).unwrap_or_default());
            if let Some(version) = self.load(&rel)? {
                self.store(&RelPath(moved), &version)?;
            }
            self.remove_file(&file)?;
        }
        Ok(())
    }
}

/// The path a store file is for, read from its header; `None` for anything else.
fn stored_path(file: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut header = [0u8; STORE_MAGIC.len() + 8 + 32 + 4];
    let mut reader = File::open(file).ok()?;
    reader.read_exact(&mut header).ok()?;
    let len_at = header.len() - 4;
    if header.get(..STORE_MAGIC.len())? != STORE_MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(header.get(len_at..)?.try_into().ok()?) as usize;
    // Paths are bounded by PATH_MAX in practice; a damaged length must not allocate much.
    if len > 64 * 1024 {
        return None;
    }
    let mut path = vec![0u8; len];
    reader.read_exact(&mut path).ok()?;
    Some(path)
}

/// Store file layout, integers little-endian: magic, u64 size, content hash, u32 path
/// length and path (so a file can be told apart and pruned), u32 block count and block
/// hashes, then the signature to the end.
fn encode(rel: &RelPath, v: &Version) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(64 + rel.0.len() + v.block_hashes.len() * 32 + v.signature.len());
    out.extend_from_slice(STORE_MAGIC);
    out.extend_from_slice(&v.size.to_le_bytes());
    out.extend_from_slice(&v.hash);
    out.extend_from_slice(&(rel.0.len() as u32).to_le_bytes());
    out.extend_from_slice(&rel.0);
    out.extend_from_slice(&(v.block_hashes.len() as u32).to_le_bytes());
    for hash in &v.block_hashes {
        out.extend_from_slice(hash);
    }
    out.extend_from_slice(&v.signature);
    out
}

/// Decodes a store file of `rel`, checking every length and that the parts agree.
fn decode(bytes: &[u8], rel: &RelPath) -> Option<Version> {
    let mut rest = bytes.strip_prefix(STORE_MAGIC)?;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
        rest = tail;
        Some(head)
    };
    let size = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let hash: Hash = take(32)?.try_into().ok()?;
    let path_len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    if take(path_len)? != rel.0.as_slice() {
        return None;
    }
    let count = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    if count as u64 != size.div_ceil(BLOCK_SIZE) {
        return None;
    }
    let hashes = take(count.checked_mul(32)?)?;
    let block_hashes: Vec<Hash> = hashes
        .chunks_exact(32)
        .filter_map(|c| c.try_into().ok())
        .collect();
    let signature = rest.to_vec();
    let sig_block = u64::from(check_signature(&signature).ok()?);
    let crypto = u64::from(u32::from_be_bytes(signature.get(8..12)?.try_into().ok()?));
    let blocks = (signature.len() - SIGNATURE_HEADER) as u64 / (4 + crypto);
    if blocks != size.div_ceil(sig_block) || content_hash(&block_hashes) != hash {
        return None;
    }
    Some(Version {
        size,
        hash,
        block_hashes,
        signature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    fn rel(s: &str) -> RelPath {
        RelPath(s.as_bytes().to_vec())
    }

    #[test]
    fn block_size_grows_with_the_file() {
        assert_eq!(signature_options(0).block_size, MIN_SIGNATURE_BLOCK);
        assert_eq!(signature_options(1 << 20).block_size, 1024);
        assert_eq!(signature_options(1 << 30).block_size, 16 * 1024);
        assert_eq!(signature_options(u64::MAX).block_size, MAX_SIGNATURE_BLOCK);
    }

    #[test]
    fn streamed_version_equals_whole_version() {
        let data = noise(3 * BLOCK_SIZE as usize + 12_345, 7);
        let whole = Version::of_bytes(&data);
        let direct = Signature::calculate(&data, signature_options(data.len() as u64));
        assert_eq!(whole.signature, direct.serialized());
        let mut builder = VersionBuilder::new(data.len() as u64);
        for piece in data.chunks(77_777) {
            builder.feed(piece);
        }
        assert_eq!(builder.finish(), whole);
        assert_eq!(whole.block_hashes.len(), 4);
        assert_eq!(Version::of_bytes(&[]).hash, content_hash(&[]));
    }

    #[test]
    fn delta_of_a_small_change_is_small_and_applies() {
        let old = noise(4 << 20, 3);
        let mut new = old.clone();
        new[2_000_000..2_004_096].copy_from_slice(&noise(4096, 99));
        let base = Version::of_bytes(&old);
        let delta = diff(&base.signature, &new, MAX_DELTA).unwrap().unwrap();
        assert!(delta.bytes.len() < 16 * 1024, "{}", delta.bytes.len());
        assert_eq!(delta.touched, vec![2_000_000 / BLOCK_SIZE]);
        let mut out = Vec::new();
        fast_rsync::apply(&old, &delta.bytes, &mut out).unwrap();
        assert_eq!(out, new);
    }

    #[test]
    fn insertion_touches_every_block_after_it() {
        let old = noise(1 << 20, 5);
        let mut new = old.clone();
        new.splice(300_000..300_000, *b"0123456789");
        let delta = diff(&Version::of_bytes(&old).signature, &new, MAX_DELTA)
            .unwrap()
            .unwrap();
        assert_eq!(delta.touched, (2..=8).collect::<Vec<u64>>());
    }

    #[test]
    fn repeated_content_is_copied_in_place() {
        let old = vec![0u8; 8 << 20];
        let mut new = old.clone();
        new[5_000_000..5_004_096].copy_from_slice(&noise(4096, 42));
        let delta = diff(&Version::of_bytes(&old).signature, &new, MAX_DELTA)
            .unwrap()
            .unwrap();
        // Two copies around one or two blocks of literal data.
        assert!(delta.bytes.len() < 3 * 4096, "{}", delta.bytes.len());
        assert_eq!(delta.touched, vec![5_000_000 / BLOCK_SIZE]);
        let commands = parse_delta(&delta.bytes).unwrap();
        assert!(commands.len() <= 4, "{commands:?}");
        let mut out = Vec::new();
        fast_rsync::apply(&old, &delta.bytes, &mut out).unwrap();
        assert!(out == new);
    }

    #[test]
    fn delta_commands_round_trip() {
        let source = noise(70_000, 8);
        let mut out = Emitter::new(&[], 1024, 16, MAX_DELTA);
        assert!(out.copy(0, 3));
        assert!(out.copy(3, 4));
        assert!(out.literal(&source[..64]));
        assert!(out.literal(&source[..65_000]));
        assert!(out.copy(1 << 33, 70_000));
        let delta = out.finish().unwrap();
        let parsed = parse_delta(&delta.bytes).unwrap();
        assert_eq!(parsed.len(), 4);
        assert_eq!(parsed[0], Command::Copy { offset: 0, len: 7 });
        assert_eq!(
            parsed[3],
            Command::Copy {
                offset: 1 << 33,
                len: 70_000
            }
        );
        for (command, len) in parsed[1..3].iter().zip([64, 65_000]) {
            let Command::Literal { at, len: got } = *command else {
                panic!("literal expected")
            };
            assert_eq!(got, len);
            assert_eq!(delta.bytes[at..at + len], source[..len]);
        }
        // Bytes 7.. are literal, then the copy from afar: blocks 0 to 1 of the result.
        assert_eq!(delta.touched, vec![0, 1]);
        assert!(parse_delta(&delta.bytes[..delta.bytes.len() - 1]).is_none());
        assert!(parse_delta(b"nope").is_none());
    }

    #[test]
    fn unrelated_or_oversized_deltas_are_refused() {
        let old = noise(8 << 20, 11);
        let new = noise(8 << 20, 12);
        let sig = Version::of_bytes(&old).signature;
        assert_eq!(diff(&sig, &new, MAX_DELTA).unwrap(), None);
        let small = noise(100_000, 13);
        assert_eq!(diff(&sig, &small, 1000).unwrap(), None);
        assert!(diff(b"garbage", &small, MAX_DELTA).is_err());
        let mut bad = sig.clone();
        bad[4..8].copy_from_slice(&0u32.to_be_bytes());
        assert!(diff(&bad, &small, MAX_DELTA).is_err());
    }

    #[test]
    fn store_round_trip_rename_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = SignatureStore::open(dir.path()).unwrap();
        let v = Version::of_bytes(&noise(300_000, 1));
        assert_eq!(store.load(&rel("a")).unwrap(), None);
        store.store(&rel("a"), &v).unwrap();
        assert_eq!(store.load(&rel("a")).unwrap(), Some(v.clone()));
        store.rename(&rel("a"), &rel("b/c"), false).unwrap();
        assert_eq!(store.load(&rel("a")).unwrap(), None);
        assert_eq!(store.load(&rel("b/c")).unwrap(), Some(v.clone()));
        let w = Version::of_bytes(b"other");
        store.store(&rel("a"), &w).unwrap();
        store.rename(&rel("a"), &rel("b/c"), true).unwrap();
        assert_eq!(store.load(&rel("a")).unwrap(), Some(v.clone()));
        assert_eq!(store.load(&rel("b/c")).unwrap(), Some(w));
        // Truncated or corrupted files are ignored, not trusted.
        let file = store.file_of(&rel("a"));
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(store.load(&rel("a")).unwrap(), None);
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        std::fs::write(&file, &flipped).unwrap();
        assert_eq!(store.load(&rel("a")).unwrap(), None);
        store.remove(&rel("a")).unwrap();
        store.remove(&rel("a")).unwrap();
        assert!(!file.exists());
    }

    #[test]
    fn directory_trees_move_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = SignatureStore::open(dir.path()).unwrap();
        let v = Version::of_bytes(b"some content");
        for path in ["d/a", "d/sub/b", "dx/c", "e"] {
            store.store(&rel(path), &v).unwrap();
        }
        store.rename_tree(&rel("d"), &rel("n/d"), false).unwrap();
        let present = |p: &str| store.load(&rel(p)).unwrap().is_some();
        assert!(!present("d/a") && !present("d/sub/b"));
        assert!(present("n/d/a") && present("n/d/sub/b") && present("dx/c"));
        store.remove_tree(&rel("n")).unwrap();
        assert!(!present("n/d/a") && !present("n/d/sub/b"));
        assert!(present("dx/c") && present("e"));
        store.rename_tree(&rel("dx"), &rel("e"), true).unwrap();
        assert!(!present("dx/c") && present("e"));
    }
}
