//! Versioning: what a peer's change replaces or removes is kept in the mount's state
//! folder (`<state folder>/versions/`) for a while (30 days by default), so no change that
//! arrives from elsewhere can make a file unrecoverable. `filesync versions PATH` lists a
//! path's versions and `filesync restore PATH` puts one back.
//!
//! A version keeps the folder's layout, with the time it was replaced (UTC) before the
//! extension, as Syncthing does: `docs/report.pdf` replaced at 09:30:00 on 22 November
//! 2026 is kept as `docs/report~20261122-093000.pdf`. A removed directory is kept whole
//! (`docs~20261122-093000/...`).
//!
//! Keeping costs almost nothing where it can be a rename or a hard link (the store is on
//! the folder's file system): a removed entry is moved into the store, a replaced file gets
//! a second name there before the new one is renamed over it. A large file patched in
//! place must be copied first (`copy_file_range`, so the kernel copies, or shares extents
//! where the file system can). Where the store is on another file system, nothing is kept
//! and that is logged once.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use super::safe_path;

/// The store's folder, inside the applier's state folder.
pub const VERSIONS_DIR: &str = "versions";

/// How long versions are kept unless configured otherwise.
pub const DEFAULT_KEEP: Duration = Duration::from_secs(30 * 24 * 3600);

/// The form of the time in a version's name.
const STAMP: &[time::format_description::FormatItem<'static>] =
    time::macros::format_description!("[year][month][day]-[hour][minute][second]");

/// The version store of one mount.
#[derive(Debug)]
pub struct Versions {
    store: OwnedFd,
    path: PathBuf,
    /// `None`: versioning is off.
    keep: Option<Duration>,
}

/// One kept version of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// When it was replaced or removed.
    pub replaced: SystemTime,
    /// Where it is kept.
    pub path: PathBuf,
}

impl Versions {
    /// Opens (creating) the store under `state_dir`; `keep: None` keeps nothing.
    pub fn open(state_dir: &Path, keep: Option<Duration>) -> io::Result<Versions> {
        let path = state_dir.join(VERSIONS_DIR);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let store = rustix::fs::open(
            &path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Versions { store, path, keep })
    }

    /// Whether anything is kept.
    pub fn is_on(&self) -> bool {
        self.keep.is_some()
    }

    /// Moves what is at `dir`/`name` (`rel` in the folder) into the store. `Ok(false)`
    /// when versioning is off or the store is on another file system: then the caller
    /// removes it.
    pub fn keep_moved(&self, dir: BorrowedFd<'_>, name: &OsStr, rel: &Path) -> io::Result<bool> {
        if !self.is_on() {
            return Ok(false);
        }
        let (slot_dir, slot_name) = self.slot(rel)?;
        match rustix::fs::renameat(dir, name, &slot_dir, &slot_name) {
            Ok(()) => Ok(true),
            Err(Errno::XDEV) => {
                tracing::debug!(path = ?rel, "version store on another file system: not kept");
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the file or symlink at `dir`/`name` a second name in the store, before
    /// something is renamed over it. Nothing there (or versioning off) is not an error.
    pub fn keep_linked(&self, dir: BorrowedFd<'_>, name: &OsStr, rel: &Path) -> io::Result<()> {
        if !self.is_on() {
            return Ok(());
        }
        match safe_path::type_at(dir, name)? {
            None | Some(rustix::fs::FileType::Directory) => return Ok(()),
            Some(_) => {}
        }
        let (slot_dir, slot_name) = self.slot(rel)?;
        match rustix::fs::linkat(dir, name, &slot_dir, &slot_name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT | Errno::XDEV) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Copies `file` (about to be patched in place) into the store.
    pub fn keep_copy(&self, file: &File, rel: &Path) -> io::Result<()> {
        if !self.is_on() {
            return Ok(());
        }
        let (slot_dir, slot_name) = self.slot(rel)?;
        let copy: File = rustix::fs::openat(
            &slot_dir,
            &slot_name,
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?
        .into();
        let len = file.metadata()?.len();
        let mut copied = 0;
        while copied < len {
            let mut from = copied;
            let mut to = copied;
            let step = (len - copied).min(1 << 30) as usize;
            let n = rustix::fs::copy_file_range(file, Some(&mut from), &copy, Some(&mut to), step)?;
            if n == 0 {
                break;
            }
            copied += n as u64;
        }
        let meta = file.metadata()?;
        let _ = rustix::fs::fchmod(&copy, Mode::from_raw_mode(meta_mode(&meta)));
        Ok(())
    }

    /// Removes versions older than the keeping time; returns how many went.
    pub fn expire(&self) -> io::Result<usize> {
        let Some(keep) = self.keep else {
            return Ok(0);
        };
        let oldest = SystemTime::now()
            .checked_sub(keep)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut removed = 0;
        let mut dirs = vec![self.path.clone()];
        // Bounded by the store's size: each directory is visited once.
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let name = entry.file_name();
                let path = entry.path();
                match split_version_name(&name) {
                    Some((_, when)) if when < oldest => {
                        if entry.file_type()?.is_dir() {
                            std::fs::remove_dir_all(&path)?;
                        } else {
                            std::fs::remove_file(&path)?;
                        }
                        removed += 1;
                    }
                    Some(_) => {}
                    None if entry.file_type()?.is_dir() => dirs.push(path),
                    None => {}
                }
            }
        }
        Ok(removed)
    }

    /// A free name in the store for a version of `rel` made now, with its parent
    /// directories created.
    fn slot(&self, rel: &Path) -> io::Result<(OwnedFd, OsString)> {
        let now = SystemTime::now();
        let stamp = time::OffsetDateTime::from(now)
            .format(STAMP)
            .map_err(io::Error::other)?;
        let parent = safe_path::open_parent(self.store.as_fd(), rel, true)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let name = parent.name.as_bytes();
        // Made to the second: a second version within one gets a counter.
        for attempt in 0..1000u32 {
            let tag = match attempt {
                0 => stamp.clone(),
                n => format!("{stamp}-{n}"),
            };
            let candidate = version_name(name, &tag);
            if safe_path::type_at(parent.dir.as_fd(), &candidate)?.is_none() {
                return Ok((parent.dir, candidate));
            }
        }
        Err(io::Error::other(format!(
            "more than 1000 versions of {} within one second",
            rel.display()
        )))
    }
}

/// The versions of `rel` kept in the store under `state_dir` (also those inside a kept
/// directory), oldest first.
pub fn list(state_dir: &Path, rel: &Path) -> io::Result<Vec<Version>> {
    let store = state_dir.join(VERSIONS_DIR);
    let components: Vec<&OsStr> = rel.iter().collect();
    let mut found = Vec::new();
    // The path itself, or any of its directories, may have been kept.
    for depth in 0..components.len() {
        let dir = store.join(components[..depth].iter().collect::<PathBuf>());
        let rest: PathBuf = components[depth + 1..].iter().collect();
        let wanted = components[depth].as_bytes();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if let Some((original, replaced)) = split_version_name(&name) {
                let path = match rest.as_os_str().is_empty() {
                    true => entry.path(),
                    false => entry.path().join(&rest),
                };
                if original == wanted && std::fs::symlink_metadata(&path).is_ok() {
                    found.push(Version { replaced, path });
                }
            }
        }
    }
    found.sort_by_key(|v| v.replaced);
    Ok(found)
}

/// A time given on the command line: `YYYYMMDD-HHMMSS` as in version names, or RFC 3339
/// (`2026-11-22T09:30:00Z`); UTC unless RFC 3339 says otherwise.
pub fn parse_time(text: &str) -> Option<SystemTime> {
    if let Ok(local) = time::PrimitiveDateTime::parse(text, STAMP) {
        return Some(local.assume_utc().into());
    }
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// The time as version names show it.
pub fn format_time(when: SystemTime) -> String {
    time::OffsetDateTime::from(when)
        .format(STAMP)
        .unwrap_or_else(|_| "?".to_owned())
}

/// Copies the kept `version` (a file or a symlink) back to `target`: into a temporary
/// name beside it, then renamed over it, so a reader sees the old or the restored file.
/// Through a mount, the restore is a local change like any other and reaches the peers.
pub fn restore(version: &Version, target: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(&version.path)?;
    let parent = target.parent().unwrap_or(Path::new("."));
    let name = target.file_name().unwrap_or_default();
    let mut temp_name = OsString::from(".filesync-restore-");
    temp_name.push(name);
    let temp = parent.join(temp_name);
    if meta.is_dir() {
        return Err(io::Error::other(format!(
            "{} is a kept folder; copy what you need from it by hand",
            version.path.display()
        )));
    }
    if meta.file_type().is_symlink() {
        let link = std::fs::read_link(&version.path)?;
        let _ = std::fs::remove_file(&temp);
        std::os::unix::fs::symlink(link, &temp)?;
    } else {
        std::fs::copy(&version.path, &temp)?;
        File::open(&temp)?.sync_all()?;
    }
    std::fs::rename(&temp, target).inspect_err(|_| {
        let _ = std::fs::remove_file(&temp);
    })
}

/// `report.pdf` with tag `T` is `report~T.pdf`; a name without an extension (or starting
/// with its only dot) gets the tag at the end.
fn version_name(name: &[u8], tag: &str) -> OsString {
    let (stem, ext) = match name.iter().rposition(|&b| b == b'.') {
        Some(dot) if dot > 0 => name.split_at(dot),
        _ => (name, &b""[..]),
    };
    let mut out = stem.to_vec();
    out.push(b'~');
    out.extend_from_slice(tag.as_bytes());
    out.extend_from_slice(ext);
    OsString::from(OsStr::from_bytes(&out))
}

/// The original name and the time of a version's name; `None` for any other name.
fn split_version_name(name: &OsStr) -> Option<(Vec<u8>, SystemTime)> {
    let bytes = name.as_bytes();
    let tilde = bytes.iter().rposition(|&b| b == b'~')?;
    let (stem, tagged) = (&bytes[..tilde], &bytes[tilde + 1..]);
    // The tag: 15 characters of stamp, maybe "-N", then the extension.
    let stamp = std::str::from_utf8(tagged.get(..15)?).ok()?;
    let mut rest = &tagged[15..];
    if rest.first() == Some(&b'-') {
        let digits = rest[1..].iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        rest = &rest[1 + digits..];
    }
    if !(rest.is_empty() || rest.first() == Some(&b'.')) {
        return None;
    }
    let when = time::PrimitiveDateTime::parse(stamp, STAMP)
        .ok()?
        .assume_utc();
    let mut original = stem.to_vec();
    original.extend_from_slice(rest);
    Some((original, when.into()))
}

fn meta_mode(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_time_before_the_extension_and_parse_back() {
        let name = version_name(b"report.pdf", "20261122-093000");
        assert_eq!(name, OsStr::new("report~20261122-093000.pdf"));
        let (original, when) = split_version_name(&name).unwrap();
        assert_eq!(original, b"report.pdf");
        let expected = time::macros::datetime!(2026-11-22 09:30:00 UTC);
        assert_eq!(when, SystemTime::from(expected));
        assert_eq!(
            version_name(b".bashrc", "20261122-093000-2"),
            OsStr::new(".bashrc~20261122-093000-2")
        );
        let (original, _) = split_version_name(OsStr::new(".bashrc~20261122-093000-2")).unwrap();
        assert_eq!(original, b".bashrc");
        assert!(split_version_name(OsStr::new("plain.txt")).is_none());
        assert!(split_version_name(OsStr::new("odd~2026.txt")).is_none());
    }

    #[test]
    fn moved_linked_and_copied_versions_are_listed_and_expire() {
        let folder = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let versions = Versions::open(state.path(), Some(DEFAULT_KEEP)).unwrap();
        let root = File::open(folder.path()).unwrap();
        std::fs::create_dir_all(folder.path().join("d/sub")).unwrap();
        std::fs::write(folder.path().join("d/sub/f.txt"), b"one").unwrap();
        std::fs::write(folder.path().join("g.txt"), b"gee").unwrap();

        versions
            .keep_linked(root.as_fd(), OsStr::new("g.txt"), Path::new("g.txt"))
            .unwrap();
        let file = File::open(folder.path().join("g.txt")).unwrap();
        versions.keep_copy(&file, Path::new("g.txt")).unwrap();
        assert!(versions
            .keep_moved(root.as_fd(), OsStr::new("d"), Path::new("d"))
            .unwrap());
        assert!(!folder.path().join("d").exists());

        let kept = list(state.path(), Path::new("g.txt")).unwrap();
        assert_eq!(kept.len(), 2, "{kept:?}");
        for version in &kept {
            assert_eq!(std::fs::read(&version.path).unwrap(), b"gee");
        }
        let inside = list(state.path(), Path::new("d/sub/f.txt")).unwrap();
        assert_eq!(inside.len(), 1, "{inside:?}");
        assert_eq!(std::fs::read(&inside[0].path).unwrap(), b"one");

        assert_eq!(versions.expire().unwrap(), 0);
        let no_time = Versions::open(state.path(), Some(Duration::ZERO)).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(no_time.expire().unwrap(), 3);
        assert!(list(state.path(), Path::new("g.txt")).unwrap().is_empty());
    }

    #[test]
    fn nothing_is_kept_when_versioning_is_off() {
        let folder = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let versions = Versions::open(state.path(), None).unwrap();
        std::fs::write(folder.path().join("f"), b"x").unwrap();
        let root = File::open(folder.path()).unwrap();
        assert!(!versions
            .keep_moved(root.as_fd(), OsStr::new("f"), Path::new("f"))
            .unwrap());
        assert!(folder.path().join("f").exists());
    }
}
