//! Three-way merges of text files edited on two nodes at once (`conflicts=merge`).
//!
//! A merge needs the last version both sides had. [`Bases`] keeps, for each small text
//! file of the folder, its last few synced versions with their version vectors in
//! `<state dir>/bases/` (one file per path, named by the BLAKE3 of the path); the common
//! base of two concurrent versions is the newest kept one that both have seen. The
//! indexer keeps each version this node makes, the applier each it receives.
//!
//! Both nodes of a conflict merge with the winner (see [`super::conflict`]) as "ours",
//! so they compute the same bytes; edits that touch the same lines do not merge, and the
//! conflict falls back to keep-both. Bases are a cache: they are written without fsync,
//! and a missing or damaged one only means that conflict is kept both ways.

use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::vector::Vector;

/// Files up to this size that contain no NUL byte are merged as text.
pub const MAX_MERGED: u64 = 1024 * 1024;
/// Versions kept per path.
const KEPT_PER_PATH: usize = 4;
const BASES_DIR: &str = "bases";
const MAGIC: &[u8; 8] = b"FSBASE01";

/// Whether `content` is merged as text.
pub fn is_text(content: &[u8]) -> bool {
    content.len() as u64 <= MAX_MERGED && !content.contains(&0)
}

/// Merges `winner` and `loser`, both made from `base`; `None` when an edit of one touches
/// lines the other edited too, or when any of them is not text.
pub fn three_way(base: &[u8], winner: &[u8], loser: &[u8]) -> Option<Vec<u8>> {
    if !(is_text(base) && is_text(winner) && is_text(loser)) {
        return None;
    }
    diffy::merge_bytes(base, winner, loser).ok()
}

/// The store of merge bases (see the module docs).
#[derive(Debug)]
pub struct Bases {
    dir: PathBuf,
}

impl Bases {
    /// The store below `state_dir`, created if missing (owner-only).
    pub fn open(state_dir: &Path) -> io::Result<Bases> {
        let dir = state_dir.join(BASES_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(Bases { dir })
    }

    /// Keeps `content` as `path`'s version `version`, if it is text.
    pub fn keep(&self, path: &Path, version: &Vector, content: &[u8]) -> io::Result<()> {
        if version.is_empty() || !is_text(content) {
            return Ok(());
        }
        let mut kept = self.read(path);
        kept.retain(|(known, _)| known != version);
        kept.push((version.clone(), content.to_vec()));
        let drop = kept.len().saturating_sub(KEPT_PER_PATH);
        kept.drain(..drop);
        self.write(path, &kept)
    }

    /// The newest kept version of `path` that both `a` and `b` have seen.
    pub fn common(&self, path: &Path, a: &Vector, b: &Vector) -> Option<Vec<u8>> {
        self.read(path)
            .into_iter()
            .rev()
            .find(|(version, _)| a.covers(version) && b.covers(version))
            .map(|(_, content)| content)
    }

    /// Keeps the file at `path` below the folder `root` (a descriptor of it) as version
    /// `version`, if it is a small text file; anything else is left alone.
    pub fn keep_from(&self, root: BorrowedFd<'_>, path: &Path, version: &Vector) -> io::Result<()> {
        use rustix::fs::{Mode, OFlags};
        if version.is_empty() {
            return Ok(());
        }
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let file = fs::File::from(rustix::fs::openat(
            root.as_fd(),
            path,
            flags,
            Mode::empty(),
        )?);
        let meta = file.metadata()?;
        if !meta.is_file() || meta.len() > MAX_MERGED {
            return Ok(());
        }
        let mut content = Vec::with_capacity(meta.len() as usize);
        file.take(MAX_MERGED + 1).read_to_end(&mut content)?;
        self.keep(path, version, &content)
    }

    fn file_of(&self, path: &Path) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        let name = blake3::hash(path.as_os_str().as_bytes()).to_hex();
        self.dir.join(name.as_str())
    }

    /// What is kept for `path`; nothing if the file is missing or damaged.
    fn read(&self, path: &Path) -> Vec<(Vector, Vec<u8>)> {
        let Ok(bytes) = fs::read(self.file_of(path)) else {
            return Vec::new();
        };
        decode(&bytes).unwrap_or_default()
    }

    fn write(&self, path: &Path, kept: &[(Vector, Vec<u8>)]) -> io::Result<()> {
        let mut out = MAGIC.to_vec();
        for (version, content) in kept {
            let version = version.encode();
            for part in [&version[..], content] {
                out.extend_from_slice(&(part.len() as u64).to_le_bytes());
                out.extend_from_slice(part);
            }
        }
        let file = self.file_of(path);
        let temp = file.with_extension("tmp");
        fs::write(&temp, &out)?;
        fs::rename(&temp, &file)
    }
}

/// Decodes a bases file; `None` if it is damaged.
fn decode(bytes: &[u8]) -> Option<Vec<(Vector, Vec<u8>)>> {
    let mut rest = bytes.strip_prefix(MAGIC)?;
    let mut take = || -> Option<&[u8]> {
        let (len, tail) = rest.split_first_chunk::<8>()?;
        let len = usize::try_from(u64::from_le_bytes(*len)).ok()?;
        if tail.len() < len {
            return None;
        }
        let (part, tail) = tail.split_at(len);
        rest = tail;
        Some(part)
    };
    let mut kept = Vec::new();
    while let Some(version) = take() {
        let content = take()?;
        kept.push((Vector::decode(version)?, content.to_vec()));
        if kept.len() > KEPT_PER_PATH {
            return None;
        }
    }
    Some(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(pairs: &[(u64, u64)]) -> Vector {
        Vector::from_pairs(pairs.to_vec())
    }

    #[test]
    fn edits_of_different_lines_merge_the_same_in_either_order() {
        let base = b"one\ntwo\nthree\nfour\nfive\n";
        let a = b"ONE\ntwo\nthree\nfour\nfive\n";
        let b = b"one\ntwo\nthree\nfour\nFIVE\n";
        let merged = three_way(base, a, b).expect("merges");
        assert_eq!(merged, b"ONE\ntwo\nthree\nfour\nFIVE\n");
        assert_eq!(three_way(base, b, a), Some(merged));
        let clash = b"one\ntwo\nTHREE?\nfour\nfive\n";
        let other = b"one\ntwo\nthree!\nfour\nfive\n";
        assert_eq!(three_way(base, clash, other), None);
        assert_eq!(three_way(base, b"bin\0ary", a), None);
    }

    #[test]
    fn the_common_base_is_the_newest_both_have_seen() {
        let dir = tempfile::tempdir().unwrap();
        let bases = Bases::open(dir.path()).unwrap();
        let path = Path::new("d/notes.txt");
        let (v1, v2) = (v(&[(1, 1)]), v(&[(1, 2)]));
        bases.keep(path, &v1, b"first\n").unwrap();
        bases.keep(path, &v2, b"second\n").unwrap();
        // A went on from v2, B from v1 only.
        let (a, b) = (v(&[(1, 3)]), v(&[(1, 1), (2, 1)]));
        assert_eq!(bases.common(path, &a, &b), Some(b"first\n".to_vec()));
        let b2 = v(&[(1, 2), (2, 1)]);
        assert_eq!(bases.common(path, &a, &b2), Some(b"second\n".to_vec()));
        assert_eq!(bases.common(Path::new("other"), &a, &b), None);
        for n in 3..10 {
            bases.keep(path, &v(&[(1, n)]), b"later\n").unwrap();
        }
        assert_eq!(bases.read(path).len(), KEPT_PER_PATH);
        fs::write(bases.file_of(path), b"FSBASE01\xff\xff").unwrap();
        assert!(bases.read(path).is_empty());
    }
}
