//! The thin `fuser` adapter over the overlay core ([`crate::fs`]).
//!
//! It translates FUSE requests into core calls and core results into replies, and owns the
//! two things that only make sense to FUSE: the kernel's init options and the passthrough
//! backing ids. Errors are mapped to errnos in one place, [`errno`].

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackingId, CopyFileRangeFlags, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

use crate::fs::{
    Attr, AttrChange, Caller, Errno, Opened, OverlayFs, Stale, TimeChange, XattrReply,
};
use crate::status::{FuseOp, Stats};

/// How long the kernel may keep names, attributes and data it was told.
#[derive(Debug, Clone, Copy)]
pub struct CachePolicy {
    pub ttl: Duration,
    /// Whether a missing name is remembered as missing for `ttl`.
    pub negative_entries: bool,
}

impl CachePolicy {
    /// A live watcher reports every change behind the mount's back and the kernel is told to
    /// drop what it made stale, so what the kernel knows can be kept long.
    pub const WATCHED: CachePolicy = CachePolicy {
        ttl: Duration::from_secs(60),
        negative_entries: true,
    };
    /// Without a live watcher, changes behind the mount's back show within a second.
    pub const UNWATCHED: CachePolicy = CachePolicy {
        ttl: Duration::from_secs(1),
        negative_entries: false,
    };
}

/// The largest write the kernel sends in one request (its limit with `max_pages` = 256).
const MAX_WRITE: u32 = 1 << 20;

/// How the kernel serves one inode's open handles. The kernel allows an inode either
/// passthrough handles (all sharing one backing file) or daemon-served ones that may
/// cache, never both: a mismatch fails the caller's `open` with EIO.
#[derive(Default)]
struct InodeIo {
    backing: Option<BackingId>,
    passthrough: usize,
    daemon: usize,
}

/// How one open handle is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoMode {
    Passthrough,
    Daemon,
}

/// What the two kinds of open reply can do with a backing file.
trait BackingReply {
    fn open_backing(&self, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<BackingId>;
}

impl BackingReply for ReplyOpen {
    fn open_backing(&self, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<BackingId> {
        ReplyOpen::open_backing(self, fd)
    }
}

impl BackingReply for ReplyCreate {
    fn open_backing(&self, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<BackingId> {
        ReplyCreate::open_backing(self, fd)
    }
}

/// The `fuser::Filesystem` for one mount.
pub struct FuseAdapter {
    fs: Arc<OverlayFs>,
    cache: CachePolicy,
    /// Passthrough is wanted and, after `init`, granted by the kernel.
    passthrough: AtomicBool,
    inode_io: Mutex<HashMap<u64, InodeIo>>,
    /// The inode and mode of every open file handle.
    handle_io: Mutex<HashMap<u64, (u64, IoMode)>>,
    /// Counts requests by kind, for the metrics.
    stats: Arc<Stats>,
}

impl FuseAdapter {
    pub fn new(
        fs: Arc<OverlayFs>,
        passthrough: bool,
        cache: CachePolicy,
        stats: Arc<Stats>,
    ) -> Self {
        FuseAdapter {
            fs,
            cache,
            passthrough: AtomicBool::new(passthrough),
            inode_io: Mutex::new(HashMap::new()),
            handle_io: Mutex::new(HashMap::new()),
            stats,
        }
    }

    /// Decides how the kernel serves a new handle, and registers the inode's backing file
    /// when it is the first passthrough one. Readers go passthrough (near-native reads)
    /// unless the daemon serves another handle of the inode; writers stay with the daemon,
    /// which sees every written range, unless passthrough handles are already open, in
    /// which case the kernel insists on passthrough and the write is reported at release.
    /// `respond` gets the reply and the backing file to reply with, or `None` for a
    /// daemon-served handle.
    fn serve_open<R: BackingReply>(
        &self,
        ino: u64,
        opened: Opened,
        reply: R,
        respond: impl FnOnce(R, Option<&BackingId>),
    ) {
        let mut inode_io = self.inode_io.lock();
        let state = inode_io.entry(ino).or_default();
        let wanted = self.passthrough.load(Ordering::Relaxed)
            && opened.regular
            && if opened.writable {
                state.passthrough > 0
            } else {
                state.daemon == 0
            };
        if wanted && state.backing.is_none() {
            let backing = self
                .fs
                .with_backing_fd(opened.fh, |fd| reply.open_backing(fd))
                .and_then(|id| id.map_err(io_errno));
            match backing {
                Ok(id) => state.backing = Some(id),
                Err(err) => self.passthrough_failed(err),
            }
        }
        let backing = state.backing.as_ref().filter(|_| wanted);
        let mode = if backing.is_some() {
            state.passthrough += 1;
            IoMode::Passthrough
        } else {
            state.daemon += 1;
            IoMode::Daemon
        };
        self.handle_io.lock().insert(opened.fh, (ino, mode));
        respond(reply, backing);
    }

    /// Forgets handle `fh`; returns whether the kernel served it by passthrough.
    fn end_io(&self, fh: u64) -> bool {
        let Some((ino, mode)) = self.handle_io.lock().remove(&fh) else {
            return false;
        };
        let mut inode_io = self.inode_io.lock();
        if let Some(state) = inode_io.get_mut(&ino) {
            match mode {
                IoMode::Passthrough => state.passthrough = state.passthrough.saturating_sub(1),
                IoMode::Daemon => state.daemon = state.daemon.saturating_sub(1),
            }
            if state.passthrough == 0 {
                // The kernel drops its backing file with its last passthrough handle.
                state.backing = None;
            }
            if state.passthrough == 0 && state.daemon == 0 {
                inode_io.remove(&ino);
            }
        }
        mode == IoMode::Passthrough
    }

    /// Open flags for a daemon-served handle. With passthrough on, readers bypass the page
    /// cache too, so the inode never enters the kernel's caching mode, which would block
    /// the next passthrough open; writers always do, so each write reaches the daemon.
    fn daemon_flags(&self, opened: Opened) -> FopenFlags {
        // No FLUSH on close: nothing is buffered in the daemon and locks stay in the kernel.
        let flags = FopenFlags::FOPEN_NOFLUSH;
        if opened.writable || self.passthrough.load(Ordering::Relaxed) {
            flags | FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            flags
        }
    }

    fn reply_entry(&self, result: Result<Attr, Errno>, reply: ReplyEntry) {
        match result {
            Ok(attr) => reply.entry(&self.cache.ttl, &file_attr(&attr), Generation(0)),
            Err(err) => reply.error(errno(err)),
        }
    }

    /// The first failure turns passthrough off for the rest of the mount, with one log line.
    fn passthrough_failed(&self, err: Errno) {
        if self.passthrough.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                "kernel passthrough refused ({err}); serving reads through the daemon from now on"
            );
        }
    }
}

/// One place that turns a core error into the errno the caller sees.
fn errno(err: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(err.raw_os_error())
}

fn io_errno(err: std::io::Error) -> Errno {
    Errno::from_io_error(&err).unwrap_or(Errno::IO)
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn system_time(secs: i64, nanos: i64) -> SystemTime {
    let nanos = nanos.clamp(0, 999_999_999) as u32;
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::new(secs as u64, nanos)
    } else {
        SystemTime::UNIX_EPOCH - Duration::new(secs.unsigned_abs(), 0) + Duration::new(0, nanos)
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn file_attr(attr: &Attr) -> FileAttr {
    let st = &attr.stat;
    FileAttr {
        ino: INodeNo(attr.ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec as i64),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec as i64),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec as i64),
        crtime: SystemTime::UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// The attributes of a negative entry: only its inode number (0) matters to the kernel.
fn missing_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn time_change(time: Option<TimeOrNow>) -> Option<TimeChange> {
    time.map(|t| match t {
        TimeOrNow::Now => TimeChange::Now,
        TimeOrNow::SpecificTime(at) => TimeChange::At(at),
    })
}

fn reply_empty(result: Result<(), Errno>, reply: ReplyEmpty) {
    match result {
        Ok(()) => reply.ok(),
        Err(err) => reply.error(errno(err)),
    }
}

fn reply_xattr(result: Result<XattrReply, Errno>, reply: ReplyXattr) {
    match result {
        Ok(XattrReply::Size(size)) => reply.size(size),
        Ok(XattrReply::Data(data)) => reply.data(&data),
        Err(err) => reply.error(errno(err)),
    }
}

/// Asks the kernel for a capability, logging rather than failing when it is missing.
fn request_capability(config: &mut KernelConfig, flag: InitFlags, name: &str) -> bool {
    match config.add_capabilities(flag) {
        Ok(()) => true,
        Err(_) => {
            tracing::info!("kernel does not offer {name}; continuing without it");
            false
        }
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for (flag, name) in [
            (InitFlags::FUSE_DO_READDIRPLUS, "readdirplus"),
            (InitFlags::FUSE_READDIRPLUS_AUTO, "adaptive readdirplus"),
            (InitFlags::FUSE_ATOMIC_O_TRUNC, "atomic O_TRUNC"),
            (
                InitFlags::FUSE_PARALLEL_DIROPS,
                "parallel directory operations",
            ),
            (
                InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
                "shared mmap of direct-io files",
            ),
        ] {
            request_capability(config, flag, name);
        }
        if let Err(limit) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(limit);
        }
        if self.passthrough.load(Ordering::Relaxed) {
            let granted = request_capability(config, InitFlags::FUSE_PASSTHROUGH, "passthrough")
                && config.set_max_stack_depth(2).is_ok();
            self.passthrough.store(granted, Ordering::Relaxed);
        }
        tracing::info!(
            passthrough = self.passthrough.load(Ordering::Relaxed),
            "FUSE session initialised"
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.stats.count_fuse_op(FuseOp::Lookup);
        match self.fs.lookup(parent.0, name) {
            // Inode number 0 tells the kernel to remember that the name does not exist.
            Err(Errno::NOENT) if self.cache.negative_entries => {
                reply.entry(&self.cache.ttl, &missing_entry(), Generation(0));
            }
            result => self.reply_entry(result, reply),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.stats.count_fuse_op(FuseOp::Getattr);
        match self.fs.getattr(ino.0) {
            Ok(attr) => reply.attr(&self.cache.ttl, &file_attr(&attr)),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.stats.count_fuse_op(FuseOp::Setattr);
        let change = AttrChange {
            mode,
            uid,
            gid,
            size,
            atime: time_change(atime),
            mtime: time_change(mtime),
        };
        match self.fs.setattr(ino.0, fh.map(|f| f.0), change, caller(req)) {
            Ok(attr) => reply.attr(&self.cache.ttl, &file_attr(&attr)),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.stats.count_fuse_op(FuseOp::Readlink);
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.stats.count_fuse_op(FuseOp::Mknod);
        let result = self
            .fs
            .mknod(parent.0, name, mode, u64::from(rdev), caller(req));
        self.reply_entry(result, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.stats.count_fuse_op(FuseOp::Mkdir);
        self.reply_entry(self.fs.mkdir(parent.0, name, mode, caller(req)), reply);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.stats.count_fuse_op(FuseOp::Unlink);
        reply_empty(self.fs.unlink(parent.0, name, caller(req)), reply);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.stats.count_fuse_op(FuseOp::Rmdir);
        reply_empty(self.fs.rmdir(parent.0, name, caller(req)), reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.stats.count_fuse_op(FuseOp::Symlink);
        self.reply_entry(
            self.fs.symlink(parent.0, link_name, target, caller(req)),
            reply,
        );
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.stats.count_fuse_op(FuseOp::Rename);
        let result = self.fs.rename(
            parent.0,
            name,
            newparent.0,
            newname,
            flags.bits(),
            caller(req),
        );
        reply_empty(result, reply);
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.stats.count_fuse_op(FuseOp::Link);
        self.reply_entry(
            self.fs.link(ino.0, newparent.0, newname, caller(req)),
            reply,
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.stats.count_fuse_op(FuseOp::Open);
        match self.fs.open(ino.0, flags.0, caller(req)) {
            Ok(opened) => self.serve_open(ino.0, opened, reply, |reply, backing| {
                let fh = FileHandle(opened.fh);
                match backing {
                    Some(id) => reply.opened_passthrough(fh, FopenFlags::FOPEN_NOFLUSH, id),
                    None => reply.opened(fh, self.daemon_flags(opened)),
                }
            }),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.stats.count_fuse_op(FuseOp::Read);
        match self.fs.read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.stats.count_fuse_op(FuseOp::Write);
        match self.fs.write(fh.0, offset, data, caller(req)) {
            Ok(written) => reply.written(written),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.stats.count_fuse_op(FuseOp::Flush);
        reply_empty(self.fs.flush(fh.0), reply);
    }

    fn release(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.stats.count_fuse_op(FuseOp::Release);
        let written_by_kernel = self.end_io(fh.0);
        reply_empty(self.fs.release(fh.0, written_by_kernel, caller(req)), reply);
    }

    fn fsync(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.stats.count_fuse_op(FuseOp::Fsync);
        reply_empty(self.fs.fsync(fh.0, datasync, caller(req)), reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.stats.count_fuse_op(FuseOp::Opendir);
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.stats.count_fuse_op(FuseOp::Readdir);
        let result = self.fs.readdir(fh.0, offset, |entry, next| {
            reply.add(
                INodeNo(entry.ino),
                next,
                file_type(entry.file_type),
                &entry.name,
            )
        });
        match result {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.stats.count_fuse_op(FuseOp::Readdir);
        let dir_attr = match self.fs.getattr(ino.0) {
            Ok(attr) => file_attr(&attr),
            Err(err) => return reply.error(errno(err)),
        };
        let result = self
            .fs
            .readdirplus(ino.0, fh.0, offset, |entry, next, attr| {
                // `.` and `..` carry no attributes; the kernel reads only their names.
                let attr = attr.map(file_attr).unwrap_or(dir_attr);
                reply.add(
                    INodeNo(entry.ino),
                    next,
                    &entry.name,
                    &self.cache.ttl,
                    &attr,
                    Generation(0),
                )
            });
        match result {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.stats.count_fuse_op(FuseOp::Releasedir);
        reply_empty(self.fs.releasedir(fh.0), reply);
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.stats.count_fuse_op(FuseOp::Fsyncdir);
        reply_empty(self.fs.fsyncdir(fh.0, datasync), reply);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        self.stats.count_fuse_op(FuseOp::Statfs);
        match self.fs.statfs(ino.0) {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.stats.count_fuse_op(FuseOp::Setxattr);
        reply_empty(
            self.fs.setxattr(ino.0, name, value, flags, caller(req)),
            reply,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.stats.count_fuse_op(FuseOp::Getxattr);
        reply_xattr(self.fs.getxattr(ino.0, name, size), reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.stats.count_fuse_op(FuseOp::Listxattr);
        reply_xattr(self.fs.listxattr(ino.0, size), reply);
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.stats.count_fuse_op(FuseOp::Removexattr);
        reply_empty(self.fs.removexattr(ino.0, name, caller(req)), reply);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.stats.count_fuse_op(FuseOp::Access);
        reply_empty(self.fs.access(ino.0, mask.bits()), reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.stats.count_fuse_op(FuseOp::Create);
        let (attr, opened) = match self.fs.create(parent.0, name, mode, flags, caller(req)) {
            Ok(created) => created,
            Err(err) => return reply.error(errno(err)),
        };
        let attr = file_attr(&attr);
        let fh = FileHandle(opened.fh);
        self.serve_open(attr.ino.0, opened, reply, |reply, backing| match backing {
            Some(id) => reply.created_passthrough(
                &self.cache.ttl,
                &attr,
                Generation(0),
                fh,
                FopenFlags::FOPEN_NOFLUSH,
                id,
            ),
            None => reply.created(
                &self.cache.ttl,
                &attr,
                Generation(0),
                fh,
                self.daemon_flags(opened),
            ),
        });
    }

    /// Regular files answer no ioctls (isatty() asks on every open by some runtimes).
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        self.stats.count_fuse_op(FuseOp::Ioctl);
        reply.error(fuser::Errno::ENOTTY);
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.stats.count_fuse_op(FuseOp::Fallocate);
        reply_empty(
            self.fs.fallocate(fh.0, offset, length, mode, caller(req)),
            reply,
        );
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.stats.count_fuse_op(FuseOp::Lseek);
        match self.fs.lseek(fh.0, offset, whence) {
            Ok(position) => reply.offset(position),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.stats.count_fuse_op(FuseOp::CopyFileRange);
        let flags = u32::try_from(flags.bits()).unwrap_or(u32::MAX);
        match self.fs.copy_file_range(
            fh_in.0,
            offset_in,
            fh_out.0,
            offset_out,
            len,
            flags,
            caller(req),
        ) {
            Ok(copied) => reply.written(copied),
            Err(err) => reply.error(errno(err)),
        }
    }
}

/// Tells the kernel to drop what changes behind the mount's back made stale. It runs on a
/// thread of its own, because the kernel may wait for a directory lock held by a request
/// the daemon is answering: no FUSE request ever waits for this thread. It ends when every
/// sender of `changes` is gone.
pub fn spawn_invalidator(
    fs: Arc<OverlayFs>,
    notifier: fuser::Notifier,
    changes: crossbeam_channel::Receiver<crate::change::Change>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("invalidator".into())
        .spawn(move || {
            for change in changes.iter() {
                for stale in fs.stale_after(&change) {
                    let result = match &stale {
                        Stale::Inode(ino) => notifier.inval_inode(INodeNo(*ino), 0, 0),
                        Stale::Entry { parent, name } => {
                            notifier.inval_entry(INodeNo(*parent), name)
                        }
                    };
                    // ENOENT: the kernel had already forgotten it.
                    if let Err(err) = result {
                        tracing::debug!(?stale, "invalidation skipped: {err}");
                    }
                }
            }
        })
}
