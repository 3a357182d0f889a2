//! `filesync conflicts` and `filesync resolve`: finding the conflict copies in a tree and
//! settling one conflict by hand.
//!
//! Both work on the files themselves, through the mount: a resolution is a rename and
//! removals like any other, so it reaches every peer, and each peer ends with the same
//! single file.

use std::fs;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::sync::conflict::parse_copy_name;

/// At most this many entries are visited when looking for conflict copies.
const MAX_VISITED: usize = 10_000_000;

/// One conflict copy beside the file it conflicted with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConflictCopy {
    /// The file that won (it may have been removed since).
    pub original: PathBuf,
    pub copy: PathBuf,
    /// When the losing version was written (`YYYYMMDD-HHMMSS`, UTC).
    pub written: String,
    /// Which node wrote it: the first 8 hex digits of its ID's key.
    pub writer: String,
}

/// Why a conflict could not be listed or resolved.
#[derive(Debug, thiserror::Error)]
pub enum ConflictError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} has no conflict copies beside it: nothing to resolve (list them with `filesync conflicts`)")]
    NoCopies { path: PathBuf },
    #[error("{path} has {count} other versions: name the one to keep with --keep FILE")]
    Ambiguous { path: PathBuf, count: usize },
    #[error("cannot {action} {path}: {source}; check that the mount is still there and writable")]
    Write {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// Every conflict copy below `root` (a mount point or any folder), sorted by path.
/// Symlinks are not followed.
pub fn find(root: &Path) -> Result<Vec<ConflictCopy>, ConflictError> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    let mut visited = 0usize;
    while let Some(dir) = pending.pop() {
        let entries = fs::read_dir(&dir).map_err(|source| ConflictError::Read {
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            visited += 1;
            if visited > MAX_VISITED {
                break;
            }
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path);
                continue;
            }
            if let Some(copy) = copy_of(&path) {
                found.push(copy);
            }
        }
    }
    found.sort_by(|a, b| a.copy.cmp(&b.copy));
    Ok(found)
}

/// What `path` is a conflict copy of, if it is one.
fn copy_of(path: &Path) -> Option<ConflictCopy> {
    let (original, written, writer) = parse_copy_name(path.file_name()?.as_bytes())?;
    Some(ConflictCopy {
        original: path.with_file_name(std::ffi::OsString::from_vec(original)),
        copy: path.to_path_buf(),
        written,
        writer,
    })
}

/// An error writing `path`, for `map_err`.
fn write_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ConflictError {
    let path = path.to_path_buf();
    move |source| ConflictError::Write {
        action,
        path,
        source,
    }
}

/// Which version `filesync resolve` keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    /// This node's version: the copy written by this node if there is one, else the file.
    Mine,
    /// The other version: the file if this node's version is a copy, else the one copy.
    Theirs,
    /// The content of this file (for instance one merged by hand).
    File(PathBuf),
}

/// Settles the conflict of `path`: puts the kept version at `path` and removes every
/// conflict copy of it. `my_tag` is this node's writer tag (see
/// [`crate::sync::conflict::writer_tag`]). Returns a one-line account.
pub fn resolve(path: &Path, keep: &Keep, my_tag: &str) -> Result<String, ConflictError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut copies: Vec<ConflictCopy> = fs::read_dir(dir)
        .map_err(|source| ConflictError::Read {
            path: dir.to_path_buf(),
            source,
        })?
        .flatten()
        .filter_map(|entry| copy_of(&entry.path()))
        .filter(|copy| copy.original == path)
        .collect();
    copies.sort_by(|a, b| a.copy.cmp(&b.copy));
    if copies.is_empty() {
        return Err(ConflictError::NoCopies {
            path: path.to_path_buf(),
        });
    }
    let mine = copies.iter().position(|c| c.writer == my_tag);
    let chosen: Option<PathBuf> = match keep {
        Keep::Mine => mine.map(|at| copies[at].copy.clone()),
        Keep::Theirs => match mine {
            Some(_) => None,
            None if copies.len() == 1 => Some(copies[0].copy.clone()),
            None => {
                return Err(ConflictError::Ambiguous {
                    path: path.to_path_buf(),
                    count: copies.len(),
                })
            }
        },
        Keep::File(file) => Some(file.clone()),
    };
    let kept = match &chosen {
        Some(source) if copies.iter().any(|c| c.copy == *source) => {
            fs::rename(source, path).map_err(write_err("rename", source))?;
            source.display().to_string()
        }
        Some(source) => {
            let mut temp = path.as_os_str().to_owned();
            temp.push(".filesync-resolve");
            let temp = PathBuf::from(temp);
            fs::copy(source, &temp).map_err(write_err("copy", source))?;
            fs::rename(&temp, path).map_err(write_err("rename", &temp))?;
            source.display().to_string()
        }
        None => path.display().to_string(),
    };
    let mut removed = 0;
    for copy in &copies {
        if Some(&copy.copy) == chosen.as_ref() {
            continue;
        }
        fs::remove_file(&copy.copy).map_err(write_err("remove", &copy.copy))?;
        removed += 1;
    }
    Ok(format!(
        "{} now holds the version of {kept}; {removed} conflict copies removed",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        fs::write(path, text).unwrap();
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap()
    }

    #[test]
    fn copies_are_found_with_their_original_and_writer() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        write(&dir.path().join("d/a.txt"), "winner");
        write(
            &dir.path()
                .join("d/a.sync-conflict-20261122-101500-0000beef.txt"),
            "loser",
        );
        write(&dir.path().join("plain.txt"), "x");
        let found = find(dir.path()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].original, dir.path().join("d/a.txt"));
        assert_eq!(found[0].writer, "0000beef");
        assert_eq!(found[0].written, "20261122-101500");
    }

    #[test]
    fn resolving_keeps_the_chosen_version_and_removes_every_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.md");
        let mine = dir
            .path()
            .join("n.sync-conflict-20261122-101500-11111111.md");
        let setup = || {
            write(&path, "theirs");
            write(&mine, "mine");
        };
        setup();
        resolve(&path, &Keep::Mine, "11111111").unwrap();
        assert_eq!(read(&path), "mine");
        assert!(!mine.exists());
        setup();
        resolve(&path, &Keep::Theirs, "11111111").unwrap();
        assert_eq!(read(&path), "theirs");
        assert!(!mine.exists());
        setup();
        let merged = dir.path().join("merged-by-hand");
        write(&merged, "both");
        resolve(&path, &Keep::File(merged.clone()), "11111111").unwrap();
        assert_eq!(read(&path), "both");
        assert!(!mine.exists() && merged.exists());
        assert!(matches!(
            resolve(&path, &Keep::Mine, "11111111"),
            Err(ConflictError::NoCopies { .. })
        ));
        // The file is this node's; two other nodes lost: which to keep must be named.
        write(
            &dir.path()
                .join("n.sync-conflict-20261122-101500-22222222.md"),
            "b",
        );
        write(
            &dir.path()
                .join("n.sync-conflict-20261122-101501-33333333.md"),
            "c",
        );
        assert!(matches!(
            resolve(&path, &Keep::Theirs, "11111111"),
            Err(ConflictError::Ambiguous { count: 2, .. })
        ));
    }
}
