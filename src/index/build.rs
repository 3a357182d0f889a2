//! Building a [`FileRecord`] from the file in the backing folder.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

use super::record::{FileKind, FileRecord, Hash};
use super::{IndexError, BLOCK_SIZE};

/// Builds the record of `rel` (relative to the backing folder `root`) from what is on
/// disk now; `Ok(None)` when nothing is at `rel` any more (the caller has, or will get, the
/// deletion as its own change).
///
/// File content is hashed in [`BLOCK_SIZE`] blocks. With a `previous` record of a regular
/// file whose block list matches its size, and `dirty` ranges, only the blocks those ranges
/// touch are read and hashed again; the other hashes are copied from `previous`. Blocks whose
/// extent changed with the size (a grown or shrunk tail) are always rehashed. `dirty` holds
/// `(offset, len)` pairs and must cover every byte whose content may have changed since
/// `previous` was built (an fallocate that punched or zeroed a range included). An empty
/// range `(size, 0)` marks a truncation, as the coalescer's `Content::Ranges` does: every
/// block from `size` on is rehashed, since the file may have been cut there and grown
/// again. With `dirty` = `None`, or no usable `previous`, every block is hashed.
///
/// The metadata is taken before the content is read, so a file that changes while it is
/// hashed is recorded with the older mtime and the next scan reports it as modified again.
///
/// `rel` is resolved below `root` without following any symlink (a symlink is recorded as
/// a symlink, and a path through one is treated as gone), and must not leave it.
pub fn record_for(
    root: BorrowedFd<'_>,
    rel: &Path,
    previous: Option<&FileRecord>,
    dirty: Option<&[(u64, u64)]>,
) -> Result<Option<FileRecord>, IndexError> {
    let io_err = |source: io::Error| IndexError::Io {
        path: rel.to_path_buf(),
        source,
    };
    if super::key::encode(rel).is_none() {
        return Err(IndexError::BadPath {
            path: rel.to_path_buf(),
        });
    }
    let fd = match open_beneath(root, rel) {
        Ok(fd) => fd,
        // ELOOP: a directory on the way was replaced by a symlink, so `rel` as recorded
        // is gone.
        Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => return Ok(None),
        Err(e) => return Err(io_err(e.into())),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| io_err(e.into()))?;
    let kind = FileKind::from_mode(st.st_mode);
    let proc_path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    let symlink_target = match kind {
        FileKind::Symlink => Some(
            rustix::fs::readlinkat(&fd, c"", Vec::new())
                .map_err(|e| io_err(e.into()))?
                .into_bytes(),
        ),
        _ => None,
    };
    let xattr_digest = xattr_digest(&proc_path).map_err(io_err)?;
    let (mtime_ns, ctime_ns) = stat_times(&st);
    // An update that says the content is untouched cannot be taken at its word when the
    // size or mtime moved: something wrote unseen (through mmap, say), so hash it all.
    let dirty = match (dirty, previous) {
        (Some([]), Some(prev)) if prev.size != st.st_size as u64 || prev.mtime_ns != mtime_ns => {
            None
        }
        _ => dirty,
    };
    let block_hashes = match kind {
        FileKind::File => {
            hash_blocks(&proc_path, st.st_size as u64, previous, dirty).map_err(io_err)?
        }
        _ => Vec::new(),
    };
    Ok(Some(FileRecord {
        kind,
        size: st.st_size as u64,
        mtime_ns,
        ctime_ns,
        ino: st.st_ino,
        dev: st.st_dev,
        rdev: if kind == FileKind::Other {
            st.st_rdev
        } else {
            0
        },
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        xattr_digest,
        symlink_target,
        block_hashes,
        deleted_ns: None,
    }))
}

/// Opens a file to read its content without moving its access time (`O_NOATIME`), so
/// hashing or sending a file is not a change a user can see; where the caller may not
/// use `O_NOATIME` (not the file's owner, no `CAP_FOWNER`) it opens the file plainly.
pub fn open_to_read(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => File::open(path),
        opened => opened,
    }
}

/// Opens `rel` below `root` as an `O_PATH` descriptor without following any symlink. A
/// path longer than `PATH_MAX` (which the scan reports, walking by descriptor) is opened a
/// few thousand bytes of components at a time.
fn open_beneath(root: BorrowedFd<'_>, rel: &Path) -> rustix::io::Result<OwnedFd> {
    const FLAGS: OFlags = OFlags::PATH.union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);
    const HOW: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS);
    // Well below PATH_MAX (4096) with room for one more name (NAME_MAX, 255).
    const CHUNK: usize = 3800;
    let open = |base: BorrowedFd<'_>, path: &Path, flags: OFlags| {
        let path = if path.as_os_str().is_empty() {
            Path::new(".")
        } else {
            path
        };
        rustix::fs::openat2(base, path, flags, Mode::empty(), HOW)
    };
    if rel.as_os_str().len() < CHUNK {
        return open(root, rel, FLAGS);
    }
    let mut dir: Option<OwnedFd> = None;
    let mut chunk = PathBuf::new();
    for name in rel.components().filter_map(|c| match c {
        Component::Normal(name) => Some(name),
        _ => None,
    }) {
        if !chunk.as_os_str().is_empty() && chunk.as_os_str().len() + name.len() >= CHUNK {
            let base = dir.as_ref().map_or(root, |d| d.as_fd());
            dir = Some(open(base, &chunk, FLAGS | OFlags::DIRECTORY)?);
            chunk.clear();
        }
        chunk.push(name);
    }
    open(dir.as_ref().map_or(root, |d| d.as_fd()), &chunk, FLAGS)
}

/// Nanoseconds since the epoch from a `stat` time pair, saturating far outside ±292 years.
fn nanos(secs: i64, nsecs: u64) -> i64 {
    // nsecs is below 10^9 by definition, so the cast is exact.
    secs.saturating_mul(1_000_000_000)
        .saturating_add(nsecs as i64)
}

/// `(mtime_ns, ctime_ns)` of a `stat`, as records store them (the scan compares these).
pub(crate) fn stat_times(st: &Stat) -> (i64, i64) {
    (
        nanos(st.st_mtime, st.st_mtime_nsec),
        nanos(st.st_ctime, st.st_ctime_nsec),
    )
}

/// How many blocks a file of `size` bytes has.
fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE)
}

fn hash_blocks(
    proc_path: &Path,
    size: u64,
    previous: Option<&FileRecord>,
    dirty: Option<&[(u64, u64)]>,
) -> io::Result<Vec<Hash>> {
    let count = block_count(size);
    // Reopened through procfs because the O_PATH descriptor cannot read; the procfs link
    // names exactly the inode already stat'ed, whatever happened to the path since.
    let file = open_to_read(proc_path)?;
    let reusable = match (previous, dirty) {
        (Some(prev), Some(dirty))
            if prev.kind == FileKind::File
                && prev.block_hashes.len() as u64 == block_count(prev.size) =>
        {
            Some((prev, dirty))
        }
        _ => None,
    };
    // Sized to the file when it is smaller than a block: most files are.
    let mut buf = vec![0u8; BLOCK_SIZE.min(size) as usize];
    let mut hashes = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for i in 0..count {
        let start = i * BLOCK_SIZE;
        let end = (start + BLOCK_SIZE).min(size);
        if let Some((prev, dirty)) = reusable {
            let prev_end = (start + BLOCK_SIZE).min(prev.size);
            let touched = dirty
                .iter()
                .any(|&(off, len)| off < end && (len == 0 || off.saturating_add(len) > start));
            if !touched && prev_end == end {
                if let Some(hash) = prev.block_hashes.get(i as usize) {
                    hashes.push(*hash);
                    continue;
                }
            }
        }
        let want = (end - start) as usize;
        let got = read_full(&file, &mut buf[..want], start)?;
        hashes.push(*blake3::hash(&buf[..got]).as_bytes());
    }
    Ok(hashes)
}

/// Reads until `buf` is full or the file ends (it may have shrunk since the stat); returns
/// how many bytes it read.
pub(crate) fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// BLAKE3 over the sorted (name, value) pairs, each part prefixed by its u32 length so
/// that no two different sets hash alike; all zero when there are none. Reached through
/// the procfs link because the xattr calls have no form for `O_PATH` descriptors.
fn xattr_digest(proc_path: &Path) -> io::Result<Hash> {
    let mut names = Vec::new();
    if !read_sized(&mut names, |buf| rustix::fs::listxattr(proc_path, buf))? {
        return Ok([0; 32]);
    }
    let mut names: Vec<&[u8]> = names.split(|&b| b == 0).filter(|n| !n.is_empty()).collect();
    if names.is_empty() {
        return Ok([0; 32]);
    }
    names.sort_unstable();
    let mut hasher = blake3::Hasher::new();
    let mut value = Vec::new();
    for name in names {
        let name_os = OsStr::from_bytes(name);
        // An attribute removed between the listing and the read is simply not there.
        if !read_sized(&mut value, |buf| {
            rustix::fs::getxattr(proc_path, name_os, buf)
        })? {
            continue;
        }
        hasher.update(&(name.len() as u32).to_le_bytes());
        hasher.update(name);
        hasher.update(&(value.len() as u32).to_le_bytes());
        hasher.update(&value);
    }
    Ok(*hasher.finalize().as_bytes())
}

/// Runs a size-returning xattr call into `out`, growing the buffer when the attribute grew
/// between calls. Returns false when there is nothing to read (no support, or gone).
fn read_sized(
    out: &mut Vec<u8>,
    call: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
) -> io::Result<bool> {
    out.resize(out.capacity().max(256), 0);
    loop {
        match call(out) {
            Ok(n) => {
                out.truncate(n);
                return Ok(true);
            }
            Err(Errno::RANGE) => {
                let bigger = out.len().saturating_mul(4).min(1 << 24);
                if bigger == out.len() {
                    return Err(Errno::RANGE.into());
                }
                out.resize(bigger, 0);
            }
            Err(Errno::NODATA | Errno::NOTSUP) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
}
