//! Compression of the file data in [`proto::Change`]s, behind the small [`Codec`] trait so
//! that other codecs can plug in next to [`Zstd`].
//!
//! The sender runs [`CompressionPolicy::compress_change`] on each change: every
//! [`proto::Payload`] is compressed unless the file's extension names an already-compressed
//! type (compressing a JPEG again costs CPU and gains nothing), or the result is not
//! smaller, in which case it stays [`proto::Codec::Raw`].
//!
//! The receiver runs [`decompress_change`]. Every payload's `raw_len` is checked against
//! [`proto::MAX_CHUNK`] before anything is decompressed, and the decompressor may not
//! produce more than `raw_len` bytes, so a small message cannot expand into a large
//! allocation. The sender keeps every payload at most `MAX_CHUNK` raw bytes by
//! construction (see `encode.rs`).

use std::collections::HashSet;

use super::proto::{self, Change, FileData, Op, Payload};

/// Payloads smaller than this are sent raw: a compressed frame has overhead of its own.
const MIN_COMPRESS: usize = 64;

/// Why a payload could not be compressed or decompressed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("a payload claims {raw_len} raw bytes, more than the limit of {limit}: the peer is broken or hostile; the connection is dropped")]
    TooLarge { raw_len: u64, limit: usize },
    #[error("a payload decoded to {got} bytes but claimed {raw_len}: the peer sent corrupt data; the connection is dropped")]
    LengthMismatch { raw_len: u64, got: usize },
    #[error("{codec:?} failed: {reason}; the data is corrupt, the transfer is retried")]
    Codec { codec: proto::Codec, reason: String },
    #[error("no codec for {codec:?} is built in: upgrade filesync on this node")]
    Unsupported { codec: proto::Codec },
}

/// A way to compress payloads, named on the wire by [`Codec::id`].
pub trait Codec: Send + Sync {
    /// The wire name of this codec.
    fn id(&self) -> proto::Codec;
    /// Compresses `raw`.
    fn compress(&self, raw: &[u8]) -> Result<Vec<u8>, CodecError>;
    /// Decompresses `bytes`, which must yield exactly `raw_len` bytes; never allocates
    /// more than `raw_len`.
    fn decompress(&self, bytes: &[u8], raw_len: usize) -> Result<Vec<u8>, CodecError>;
}

/// Zstandard at a fixed level.
#[derive(Debug, Clone, Copy)]
pub struct Zstd {
    level: i32,
}

impl Zstd {
    /// The level the policy uses unless configured: fast, and most of the gain.
    pub const DEFAULT_LEVEL: i32 = 3;

    /// Zstd at `level`, clamped to the range the library supports.
    pub fn new(level: i32) -> Zstd {
        let range = zstd::compression_level_range();
        Zstd {
            level: level.clamp(*range.start(), *range.end()),
        }
    }

    pub fn level(&self) -> i32 {
        self.level
    }
}

impl Default for Zstd {
    fn default() -> Zstd {
        Zstd::new(Zstd::DEFAULT_LEVEL)
    }
}

impl Codec for Zstd {
    fn id(&self) -> proto::Codec {
        proto::Codec::Zstd
    }

    fn compress(&self, raw: &[u8]) -> Result<Vec<u8>, CodecError> {
        zstd::bulk::compress(raw, self.level).map_err(|e| CodecError::Codec {
            codec: proto::Codec::Zstd,
            reason: e.to_string(),
        })
    }

    fn decompress(&self, bytes: &[u8], raw_len: usize) -> Result<Vec<u8>, CodecError> {
        // The capacity caps the output: a frame that would decode to more fails here.
        let out = zstd::bulk::decompress(bytes, raw_len).map_err(|e| CodecError::Codec {
            codec: proto::Codec::Zstd,
            reason: e.to_string(),
        })?;
        Ok(out)
    }
}

/// Extensions (lower case) of files whose content is already compressed: archives,
/// images, audio, video, and office/PDF containers.
pub const DEFAULT_SKIP: &[&str] = &[
    "zst", "gz", "tgz", "bz2", "tbz2", "xz", "txz", "lz4", "lzma", "7z", "zip", "rar", "jar",
    "apk", "whl", "deb", "rpm", "jpg", "jpeg", "png", "gif", "webp", "heic", "avif", "jxl", "mp3",
    "mp4", "m4a", "m4v", "mkv", "mov", "avi", "webm", "ogg", "opus", "flac", "aac", "pdf", "docx",
    "xlsx", "pptx", "odt", "ods", "odp", "epub",
];

/// Which payloads the sender compresses, and how.
pub struct CompressionPolicy {
    /// `None`: compression is off.
    codec: Option<Box<dyn Codec>>,
    /// Lower-case extensions, without the dot, whose files are sent raw.
    skip: HashSet<Vec<u8>>,
}

impl std::fmt::Debug for CompressionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompressionPolicy")
            .field("codec", &self.codec.as_ref().map(|c| c.id()))
            .field("skip", &self.skip.len())
            .finish()
    }
}

impl Default for CompressionPolicy {
    /// Zstd at level 3, skipping [`DEFAULT_SKIP`].
    fn default() -> CompressionPolicy {
        CompressionPolicy::new(Box::new(Zstd::default()), DEFAULT_SKIP.iter().copied())
    }
}

impl CompressionPolicy {
    /// Compress with `codec`, except files whose extension is in `skip` (with or without
    /// the dot, any case).
    pub fn new<'a>(codec: Box<dyn Codec>, skip: impl IntoIterator<Item = &'a str>) -> Self {
        CompressionPolicy {
            codec: Some(codec),
            skip: skip
                .into_iter()
                .map(|ext| {
                    ext.trim_start_matches('.')
                        .to_ascii_lowercase()
                        .into_bytes()
                })
                .collect(),
        }
    }

    /// Zstd at `level` with the default skip list.
    pub fn zstd(level: i32) -> CompressionPolicy {
        CompressionPolicy::new(Box::new(Zstd::new(level)), DEFAULT_SKIP.iter().copied())
    }

    /// No compression at all.
    pub fn off() -> CompressionPolicy {
        CompressionPolicy {
            codec: None,
            skip: HashSet::new(),
        }
    }

    /// Whether payloads of the file at `path` would be compressed.
    pub fn compresses(&self, path: &proto::RelPath) -> bool {
        self.codec.is_some() && !self.skip.contains(&extension(&path.0))
    }

    /// Compresses each raw payload of `change` in place when its file type is not skipped
    /// and the result is smaller; otherwise leaves it raw. A codec failure leaves the
    /// payload raw too (it is logged): the data still travels, only larger.
    pub fn compress_change(&self, change: &mut Change) {
        let Some(codec) = &self.codec else { return };
        if !self.compresses(&change.path) {
            return;
        }
        for payload in payloads_mut(&mut change.op) {
            if payload.codec != proto::Codec::Raw || payload.bytes.len() < MIN_COMPRESS {
                continue;
            }
            match codec.compress(&payload.bytes) {
                Ok(packed) if packed.len() < payload.bytes.len() => {
                    payload.codec = codec.id();
                    payload.bytes = packed;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(seq = change.seq, error = %e, "sending a payload raw"),
            }
        }
    }
}

/// What the sender remembers between the pieces of a whole-file transfer: the file whose
/// first piece did not compress. Its later pieces are sent raw without trying: a large
/// random or already-packed file costs a zstd pass per MiB for nothing otherwise, the
/// largest cost of an initial sync of such files.
#[derive(Debug, Default)]
pub struct WholeTransfers {
    incompressible: Option<proto::RelPath>,
}

impl WholeTransfers {
    /// Compresses `change` by `policy`, except a later piece of a whole file whose first
    /// piece stayed raw.
    pub fn compress_change(&mut self, policy: &CompressionPolicy, change: &mut Change) {
        let Op::File {
            data: FileData::Whole { offset, data, .. },
            ..
        } = &change.op
        else {
            policy.compress_change(change);
            return;
        };
        let first = *offset == 0;
        let sizeable = data.bytes.len() >= MIN_COMPRESS;
        if !first && self.incompressible.as_ref() == Some(&change.path) {
            return;
        }
        policy.compress_change(change);
        if first && sizeable {
            let stayed_raw = payloads_mut(&mut change.op)
                .iter()
                .all(|payload| payload.codec == proto::Codec::Raw);
            self.incompressible = stayed_raw.then(|| change.path.clone());
        }
    }
}

/// The lower-cased extension of the last component of `path`, empty when it has none (a
/// leading dot, as in `.bashrc`, starts a name, not an extension).
fn extension(path: &[u8]) -> Vec<u8> {
    let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
    match name.iter().rposition(|&b| b == b'.') {
        Some(0) | None => Vec::new(),
        Some(dot) => name.get(dot + 1..).unwrap_or_default().to_ascii_lowercase(),
    }
}

/// The payloads inside an operation.
fn payloads_mut(op: &mut Op) -> Vec<&mut Payload> {
    match op {
        Op::File { data, .. } => match data {
            FileData::Ranges(ranges) => ranges.iter_mut().map(|r| &mut r.data).collect(),
            FileData::Delta { delta, .. } => vec![delta],
            FileData::Whole { data, .. } => vec![data],
            FileData::Unchanged => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// The built-in codec for a wire name.
fn codec_for(id: proto::Codec) -> Option<Box<dyn Codec>> {
    match id {
        proto::Codec::Zstd => Some(Box::new(Zstd::default())),
        proto::Codec::Raw => None,
    }
}

/// Turns every payload of a received `change` back to raw bytes. Refuses a payload that
/// claims more than [`proto::MAX_CHUNK`] bytes before decompressing it, and one whose
/// bytes do not come out at exactly `raw_len`.
pub fn decompress_change(change: &mut Change) -> Result<(), CodecError> {
    for payload in payloads_mut(&mut change.op) {
        let raw_len = payload.raw_len as usize;
        if raw_len > proto::MAX_CHUNK {
            return Err(CodecError::TooLarge {
                raw_len: u64::from(payload.raw_len),
                limit: proto::MAX_CHUNK,
            });
        }
        let raw = match payload.codec {
            proto::Codec::Raw => None,
            other => {
                let codec = codec_for(other).ok_or(CodecError::Unsupported { codec: other })?;
                Some(codec.decompress(&payload.bytes, raw_len)?)
            }
        };
        if let Some(raw) = raw {
            payload.bytes = raw;
            payload.codec = proto::Codec::Raw;
        }
        if payload.bytes.len() != raw_len {
            return Err(CodecError::LengthMismatch {
                raw_len: u64::from(payload.raw_len),
                got: payload.bytes.len(),
            });
        }
    }
    Ok(())
}

/// A raw payload of `bytes` (at most [`proto::MAX_CHUNK`] long, which the encoder ensures).
pub fn raw_payload(bytes: Vec<u8>) -> Payload {
    Payload {
        codec: proto::Codec::Raw,
        raw_len: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
        bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::proto::{Meta, Range, RelPath};

    fn meta() -> Meta {
        Meta {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            xattrs: None,
        }
    }

    fn whole(path: &str, bytes: Vec<u8>) -> Change {
        Change {
            seq: 1,
            path: RelPath(path.as_bytes().to_vec()),
            op: Op::File {
                meta: meta(),
                size: bytes.len() as u64,
                data: FileData::Whole {
                    offset: 0,
                    data: raw_payload(bytes),
                    last: true,
                },
                blocks: Vec::new(),
            },
            version: Default::default(),
        }
    }

    fn payload(change: &Change) -> &Payload {
        match &change.op {
            Op::File {
                data: FileData::Whole { data, .. },
                ..
            } => data,
            other => panic!("not a whole piece: {other:?}"),
        }
    }

    fn text(len: usize) -> Vec<u8> {
        b"all work and no play makes jack a dull boy\n"
            .iter()
            .cycle()
            .take(len)
            .copied()
            .collect()
    }

    #[test]
    fn zstd_round_trip() {
        let raw = text(300_000);
        let mut change = whole("notes/log.txt", raw.clone());
        CompressionPolicy::default().compress_change(&mut change);
        assert_eq!(payload(&change).codec, proto::Codec::Zstd);
        assert!(payload(&change).bytes.len() < raw.len() / 10);
        decompress_change(&mut change).unwrap();
        assert_eq!(payload(&change).codec, proto::Codec::Raw);
        assert_eq!(payload(&change).bytes, raw);
    }

    #[test]
    fn ranges_and_deltas_are_compressed_too() {
        let mut change = whole("a.txt", Vec::new());
        if let Op::File { data, .. } = &mut change.op {
            *data = FileData::Ranges(vec![
                Range {
                    offset: 0,
                    data: raw_payload(text(5000)),
                },
                Range {
                    offset: 9000,
                    data: raw_payload(text(10)),
                },
            ]);
        }
        CompressionPolicy::zstd(19).compress_change(&mut change);
        let Op::File {
            data: FileData::Ranges(ranges),
            ..
        } = &change.op
        else {
            panic!("ranges expected")
        };
        assert_eq!(ranges[0].data.codec, proto::Codec::Zstd);
        // Too small to be worth it.
        assert_eq!(ranges[1].data.codec, proto::Codec::Raw);
        decompress_change(&mut change).unwrap();
    }

    #[test]
    fn skipped_types_and_incompressible_data_stay_raw() {
        let policy = CompressionPolicy::default();
        for path in ["photo.JPG", "dir.d/archive.tar.zst", "x.Mp4"] {
            let mut change = whole(path, text(100_000));
            policy.compress_change(&mut change);
            assert_eq!(payload(&change).codec, proto::Codec::Raw, "{path}");
        }
        // A dot starting the name is no extension; a skipped word elsewhere in the path
        // does not count either.
        for path in [".jpg", "jpg/notes", "zip.d/x.txt"] {
            let mut change = whole(path, text(100_000));
            policy.compress_change(&mut change);
            assert_eq!(payload(&change).codec, proto::Codec::Zstd, "{path}");
        }
        let mut change = whole("random.bin", noise(0x9e37_79b9_7f4a_7c15, 100_000));
        policy.compress_change(&mut change);
        assert_eq!(payload(&change).codec, proto::Codec::Raw);
        let mut change = whole("a.txt", text(100_000));
        CompressionPolicy::off().compress_change(&mut change);
        assert_eq!(payload(&change).codec, proto::Codec::Raw);
        let custom = CompressionPolicy::new(Box::new(Zstd::new(1)), [".TXT"]);
        let mut change = whole("a.txt", text(100_000));
        custom.compress_change(&mut change);
        assert_eq!(payload(&change).codec, proto::Codec::Raw);
    }

    /// `len` bytes that do not compress (xorshift from `seed`).
    fn noise(mut state: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    fn piece(path: &str, offset: u64, bytes: Vec<u8>) -> Change {
        let mut change = whole(path, bytes);
        if let Op::File {
            data: FileData::Whole { offset: at, .. },
            ..
        } = &mut change.op
        {
            *at = offset;
        }
        change
    }

    #[test]
    fn a_whole_file_whose_first_piece_stays_raw_is_sent_raw_to_its_end() {
        let policy = CompressionPolicy::default();
        let mut transfers = WholeTransfers::default();
        let mut first = piece("big.bin", 0, noise(0x2545_f491_4f6c_dd1d, 100_000));
        transfers.compress_change(&policy, &mut first);
        assert_eq!(payload(&first).codec, proto::Codec::Raw);
        // Text later in the same file is not tried.
        let mut later = piece("big.bin", 100_000, text(100_000));
        transfers.compress_change(&policy, &mut later);
        assert_eq!(payload(&later).codec, proto::Codec::Raw);
        // Another file, or the same file sent again from its start, is tried again.
        for path in ["other.bin", "big.bin"] {
            let mut change = piece(path, 0, text(100_000));
            transfers.compress_change(&policy, &mut change);
            assert_eq!(payload(&change).codec, proto::Codec::Zstd, "{path}");
            let mut later = piece(path, 100_000, text(100_000));
            transfers.compress_change(&policy, &mut later);
            assert_eq!(payload(&later).codec, proto::Codec::Zstd, "{path}");
        }
    }

    #[test]
    fn decompress_refuses_oversized_and_mismatched_lengths() {
        // A tiny frame of zeros that would expand far beyond the limit.
        let zeros = vec![0u8; proto::MAX_CHUNK + 1];
        let packed = Zstd::default().compress(&zeros).unwrap();
        let mut change = whole("a", Vec::new());
        if let Op::File {
            data: FileData::Whole { data, .. },
            ..
        } = &mut change.op
        {
            *data = Payload {
                codec: proto::Codec::Zstd,
                raw_len: (proto::MAX_CHUNK + 1) as u32,
                bytes: packed.clone(),
            };
        }
        assert!(matches!(
            decompress_change(&mut change.clone()),
            Err(CodecError::TooLarge { .. })
        ));
        // Claiming less than the frame holds: the capped decompressor refuses.
        if let Op::File {
            data: FileData::Whole { data, .. },
            ..
        } = &mut change.op
        {
            data.raw_len = 1000;
        }
        assert!(decompress_change(&mut change.clone()).is_err());
        // Claiming more than the frame holds: the length check refuses.
        let packed = Zstd::default().compress(&text(1000)).unwrap();
        if let Op::File {
            data: FileData::Whole { data, .. },
            ..
        } = &mut change.op
        {
            *data = Payload {
                codec: proto::Codec::Zstd,
                raw_len: 2000,
                bytes: packed,
            };
        }
        assert!(matches!(
            decompress_change(&mut change.clone()),
            Err(CodecError::LengthMismatch { .. })
        ));
        // A raw payload whose length disagrees.
        let mut change = whole("a", text(10));
        if let Op::File {
            data: FileData::Whole { data, .. },
            ..
        } = &mut change.op
        {
            data.raw_len = 11;
        }
        assert!(matches!(
            decompress_change(&mut change),
            Err(CodecError::LengthMismatch { .. })
        ));
    }
}
