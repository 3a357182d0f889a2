//! Keys of the records table: `parent ++ 0x00 ++ name`.
//!
//! `parent` is the parent directory's relative path with its components joined by `/`
//! (empty for entries of the backing folder itself), `name` the last component. A name
//! can contain neither `/` nor NUL, so the split is unambiguous, and:
//! - a directory's direct children are exactly the keys starting with `parent ++ 0x00`,
//!   one contiguous range in name order (what the scan merges with a sorted listing, and
//!   what per-directory digests will hash);
//! - everything deeper below `dir` starts with `dir ++ '/'`, a second contiguous range,
//!   so a subtree is two range reads.
//!
//! The backing folder itself is the empty key (every other key contains a NUL).

use std::ffi::OsStr;
use std::ops::{Bound, Range};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

const SEP: u8 = 0;
const SLASH: u8 = b'/';

/// The normalized components of a relative path, or `None` if it is absolute or climbs
/// with `..` (it would not name something below the backing folder).
fn components(path: &Path) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(name) => out.push(name.as_bytes()),
            Component::CurDir => {}
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// The path of `dir` as stored in keys: components joined by `/`.
pub(crate) fn dir_bytes(dir: &Path) -> Option<Vec<u8>> {
    Some(components(dir)?.join(&SLASH))
}

/// The key of `path`, or `None` if `path` is not a plain relative path.
pub(crate) fn encode(path: &Path) -> Option<Vec<u8>> {
    let parts = components(path)?;
    let Some((name, parent)) = parts.split_last() else {
        return Some(Vec::new());
    };
    let mut key = parent.join(&SLASH);
    key.push(SEP);
    key.extend_from_slice(name);
    Some(key)
}

/// The path a key stands for.
pub(crate) fn decode(key: &[u8]) -> PathBuf {
    match key.iter().rposition(|&b| b == SEP) {
        None => PathBuf::new(),
        Some(at) => {
            let (parent, name) = (&key[..at], &key[at + 1..]);
            let mut path = PathBuf::from(OsStr::from_bytes(parent));
            path.push(OsStr::from_bytes(name));
            path
        }
    }
}

/// The name part of a key (its last component).
pub(crate) fn name(key: &[u8]) -> &[u8] {
    match key.iter().rposition(|&b| b == SEP) {
        None => &[],
        Some(at) => &key[at + 1..],
    }
}

/// The keys of the direct children of the directory stored as `dir` (see [`dir_bytes`]).
pub(crate) fn children_range(dir: &[u8]) -> Range<Vec<u8>> {
    let mut start = dir.to_vec();
    start.push(SEP);
    let mut end = dir.to_vec();
    end.push(SEP + 1);
    start..end
}

/// The keys of everything deeper than the direct children of `dir` (not meaningful for the
/// backing folder itself, whose grandchildren have no `/` in their keys).
fn grandchildren_range(dir: &[u8]) -> Range<Vec<u8>> {
    let mut start = dir.to_vec();
    start.push(SLASH);
    let mut end = dir.to_vec();
    end.push(SLASH + 1);
    start..end
}

/// A range of keys, owned.
pub(crate) type KeyRange = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// The key ranges holding everything below the directory stored as `dir`: its children
/// and what is deeper, or for the backing folder itself every key but its own (empty) one.
pub(crate) fn subtree_ranges(dir: &[u8]) -> Vec<KeyRange> {
    if dir.is_empty() {
        return vec![(Bound::Excluded(Vec::new()), Bound::Unbounded)];
    }
    [children_range(dir), grandchildren_range(dir)]
        .into_iter()
        .map(|r| (Bound::Included(r.start), Bound::Excluded(r.end)))
        .collect()
}

/// `range` with borrowed bounds, as redb's range reads take them.
pub(crate) fn borrowed(range: &KeyRange) -> (Bound<&[u8]>, Bound<&[u8]>) {
    (
        range.0.as_ref().map(Vec::as_slice),
        range.1.as_ref().map(Vec::as_slice),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_group_children() {
        for p in ["", "a", "a/b", "a/b/c", "x\u{1}y/z"] {
            let key = encode(Path::new(p)).unwrap_or_default();
            assert_eq!(decode(&key), PathBuf::from(p));
        }
        assert_eq!(encode(Path::new("./a//b/")), encode(Path::new("a/b")));
        assert_eq!(encode(Path::new("/a")), None);
        assert_eq!(encode(Path::new("a/../b")), None);

        let kids = children_range(b"a");
        let child = encode(Path::new("a/b")).unwrap_or_default();
        let sibling = encode(Path::new("a-b/c")).unwrap_or_default();
        assert!(kids.contains(&child));
        assert!(!kids.contains(&sibling));
        let deep = grandchildren_range(b"a");
        assert!(deep.contains(&encode(Path::new("a/b/c")).unwrap_or_default()));
        assert!(!deep.contains(&child));
    }
}
