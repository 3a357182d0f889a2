//! Paths from the network, checked before use, and resolved on disk without ever leaving
//! the synced folder.
//!
//! Two layers, because either alone is not enough:
//! - [`checked`] refuses a [`RelPath`] whose text could name anything outside the folder
//!   (absolute, `..`, `.`, empty or NUL components) or that no filesystem accepts (a
//!   component over `NAME_MAX`, an absurd total length).
//! - [`open_parent`] and [`open_beneath`] then walk the checked path one component at a
//!   time from the folder's descriptor with `openat(O_NOFOLLOW | O_DIRECTORY)`, so a
//!   directory on the way that is (or was swapped for) a symlink stops the walk instead of
//!   leading elsewhere. The last component is never followed either: callers act on it
//!   with `*at()` calls and `AT_SYMLINK_NOFOLLOW`. Walking by component also handles paths
//!   longer than `PATH_MAX`.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::proto::RelPath;

/// The longest name of one component (`NAME_MAX` on Linux filesystems).
pub const MAX_COMPONENT: usize = 255;

/// The longest relative path accepted. Above `PATH_MAX` (4096) on purpose: trees deeper than
/// that exist and are walked by descriptor; the bound only keeps a message from naming a
/// path no tree could hold.
pub const MAX_PATH: usize = 32 * 1024;

/// Mode of the parent directories created for a path whose parents are missing; the
/// sender's own `Dir` change sets the real mode and times.
const CREATED_DIR_MODE: u32 = 0o755;

/// Why a path from a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path is empty")]
    Empty,
    #[error("the path is absolute")]
    Absolute,
    #[error("the path has a '.' or '..' component")]
    DotComponent,
    #[error("the path has an empty component ('//' or a trailing '/')")]
    EmptyComponent,
    #[error("the path contains a NUL byte")]
    Nul,
    #[error("a component is longer than {MAX_COMPONENT} bytes")]
    ComponentTooLong,
    #[error("the path is longer than {MAX_PATH} bytes")]
    TooLong,
    #[error("a parent directory on disk is a symlink or not a directory")]
    ThroughSymlink,
}

/// The path as a relative [`PathBuf`] once it is safe to resolve below the folder.
pub fn checked(path: &RelPath) -> Result<PathBuf, PathError> {
    let bytes = path.0.as_slice();
    if bytes.is_empty() {
        return Err(PathError::Empty);
    }
    if bytes.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    if bytes.contains(&0) {
        return Err(PathError::Nul);
    }
    if bytes.first() == Some(&b'/') {
        return Err(PathError::Absolute);
    }
    for component in bytes.split(|&b| b == b'/') {
        match component {
            b"" => return Err(PathError::EmptyComponent),
            b"." | b".." => return Err(PathError::DotComponent),
            c if c.len() > MAX_COMPONENT => return Err(PathError::ComponentTooLong),
            _ => {}
        }
    }
    Ok(PathBuf::from(OsStr::from_bytes(bytes)))
}

/// Why a checked path could not be resolved on disk.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// A directory on the way is a symlink (or another non-directory): following it could
    /// leave the folder, so the path is refused.
    #[error("{0}")]
    Unsafe(PathError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The directory holding a path's last component, opened for `*at()` calls and `fsync`.
#[derive(Debug)]
pub struct Parent {
    /// The directory, `O_RDONLY | O_DIRECTORY`.
    pub dir: OwnedFd,
    /// The last component of the path.
    pub name: OsString,
    /// Directories this call created on the way, relative to the folder, outermost first.
    pub created: Vec<PathBuf>,
}

/// The components of a path [`checked`] accepted.
fn components(rel: &Path) -> impl Iterator<Item = &OsStr> {
    rel.as_os_str()
        .as_bytes()
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .map(OsStr::from_bytes)
}

/// Opens the parent directory of `rel` (checked) below `root`, one component at a time,
/// never following a symlink. With `create`, missing directories are made (mode 0755) and
/// made durable (their parents fsync'd) before this returns.
pub fn open_parent(root: BorrowedFd<'_>, rel: &Path, create: bool) -> Result<Parent, ResolveError> {
    let names: Vec<&OsStr> = components(rel).collect();
    let Some((name, dirs)) = names.split_last() else {
        return Err(ResolveError::Unsafe(PathError::Empty));
    };
    let mut dir = open_dir_at(root, OsStr::new("."))?;
    let mut created = Vec::new();
    let mut walked = PathBuf::new();
    for component in dirs {
        walked.push(component);
        let next = match open_dir_at(dir.as_fd(), component) {
            Err(ResolveError::Io(e)) if create && e.kind() == io::ErrorKind::NotFound => {
                match rustix::fs::mkdirat(&dir, *component, Mode::from_raw_mode(CREATED_DIR_MODE)) {
                    Ok(()) => {
                        rustix::fs::fsync(&dir).map_err(io::Error::from)?;
                        created.push(walked.clone());
                    }
                    // Made by someone else in the meantime: use it like any other.
                    Err(Errno::EXIST) => {}
                    Err(e) => return Err(ResolveError::Io(e.into())),
                }
                open_dir_at(dir.as_fd(), component)?
            }
            opened => opened?,
        };
        dir = next;
    }
    Ok(Parent {
        dir,
        name: name.to_os_string(),
        created,
    })
}

/// Opens `name` in `dir` as a directory, refusing a symlink or another non-directory.
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, ResolveError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(Errno::LOOP | Errno::NOTDIR) => Err(ResolveError::Unsafe(PathError::ThroughSymlink)),
        Err(e) => Err(ResolveError::Io(e.into())),
    }
}

/// Opens `rel` (checked) below `root` with `flags` plus `O_NOFOLLOW`: a symlink as the last
/// component fails (or, with `O_PATH`, is opened itself). Parents must exist.
pub fn open_beneath(
    root: BorrowedFd<'_>,
    rel: &Path,
    flags: OFlags,
) -> Result<OwnedFd, ResolveError> {
    let parent = open_parent(root, rel, false)?;
    rustix::fs::openat(
        &parent.dir,
        parent.name.as_os_str(),
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ResolveError::Io(e.into()))
}

/// `lstat` of `rel` (checked) below `root`, resolved like [`open_beneath`].
pub fn stat_beneath(root: BorrowedFd<'_>, rel: &Path) -> Result<rustix::fs::Stat, ResolveError> {
    let parent = open_parent(root, rel, false)?;
    rustix::fs::statat(
        &parent.dir,
        parent.name.as_os_str(),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| ResolveError::Io(e.into()))
}

/// The type of `name` in `dir` without following a symlink; `None` when nothing is there.
pub fn type_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<FileType>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(s: &[u8]) -> Result<PathBuf, PathError> {
        checked(&RelPath(s.to_vec()))
    }

    #[test]
    fn accepts_plain_relative_paths() {
        assert_eq!(check(b"a").unwrap(), PathBuf::from("a"));
        assert_eq!(check(b"a/b/c.txt").unwrap(), PathBuf::from("a/b/c.txt"));
        assert_eq!(check(b"..a/b..").unwrap(), PathBuf::from("..a/b.."));
        assert!(check(b"caf\xc3\xa9/\xff\xfe").is_ok());
    }

    #[test]
    fn refuses_paths_that_could_leave_the_folder() {
        assert_eq!(check(b""), Err(PathError::Empty));
        assert_eq!(check(b"/abs"), Err(PathError::Absolute));
        assert_eq!(check(b"../x"), Err(PathError::DotComponent));
        assert_eq!(check(b"a/../../b"), Err(PathError::DotComponent));
        assert_eq!(check(b"a/./b"), Err(PathError::DotComponent));
        assert_eq!(check(b".."), Err(PathError::DotComponent));
        assert_eq!(check(b"a//b"), Err(PathError::EmptyComponent));
        assert_eq!(check(b"a/"), Err(PathError::EmptyComponent));
        assert_eq!(check(b"a\0b"), Err(PathError::Nul));
        assert_eq!(check(&[b'x'; 256]), Err(PathError::ComponentTooLong));
        assert!(check(&[b'x'; 255]).is_ok());
        let long: Vec<u8> = std::iter::repeat_n(b"abcdefgh/".as_slice(), 4000)
            .flatten()
            .copied()
            .chain(*b"z")
            .collect();
        assert_eq!(check(&long), Err(PathError::TooLong));
    }

    #[test]
    fn walk_refuses_a_symlinked_parent() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        let root_fd =
            rustix::fs::open(root.path(), OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        for create in [false, true] {
            let err = open_parent(root_fd.as_fd(), Path::new("link/x"), create).unwrap_err();
            assert!(
                matches!(err, ResolveError::Unsafe(PathError::ThroughSymlink)),
                "{err}"
            );
        }
        let err = open_parent(root_fd.as_fd(), Path::new("link/sub/x"), true).unwrap_err();
        assert!(matches!(err, ResolveError::Unsafe(_)), "{err}");
        assert!(!outside.path().join("sub").exists());
    }

    #[test]
    fn walk_creates_missing_parents() {
        let root = tempfile::tempdir().unwrap();
        let root_fd =
            rustix::fs::open(root.path(), OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let parent = open_parent(root_fd.as_fd(), Path::new("a/b/c"), true).unwrap();
        assert_eq!(parent.name, OsString::from("c"));
        assert_eq!(
            parent.created,
            vec![PathBuf::from("a"), PathBuf::from("a/b")]
        );
        assert!(root.path().join("a/b").is_dir());
        let again = open_parent(root_fd.as_fd(), Path::new("a/b/c"), true).unwrap();
        assert!(again.created.is_empty());
    }
}
