//! The eBPF watcher: syscall tracepoints report every change under the backing folder,
//! with the byte range of each write and the pid of the writer.
//!
//! The program (`ebpf/watcher.bpf.c`, compiled into `ebpf/watcher.bpf.o` and embedded
//! here) filters in the kernel: only calls that succeeded, on files under the watched
//! root, by processes not in `ignore_pids`, reach the ring buffer. This module loads it,
//! fills its maps, and turns its records into [`Change`]s on a thread of its own.
//!
//! Before loading, the object is linked against the running kernel: the program's fast
//! path for writes to unwatched files calls the kfunc bpf_rdonly_cast, which neither
//! clang 14 nor aya 0.14 can link, so it is emitted with placeholder immediates that
//! [`LinkedObject`] replaces with the kernel's BTF ids. A kernel that refuses the casts
//! gets the object with them turned into `r0 = 0`, which selects the slower probe-read path.
//!
//! What it cannot see (io_uring, writes through `mmap`, writes by the kernel itself, files
//! more than 31 levels below the root, paths reached through a symlink from outside
//! the root, 32-bit processes) is left to the reconcile scan, like every lost record.
//! `ebpf/README.md` has the design, the record format and the measured costs.

use std::ffi::OsStr;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, ProgramError};
use aya::{Btf, Ebpf, EbpfLoader};
use aya_obj::btf::BtfKind;

use super::{CaptureError, Sink, WatchSpec, Watcher, WatcherKind};
use crate::change::{AttrChange, Change, ChangeKind, FileId, Source, TimeChange};

/// The compiled program; `ebpf/build.sh` rebuilds it and `ebpf/build.sh --check` proves it
/// matches the source.
static PROGRAM: &[u8] = aya::include_bytes_aligned!("../../ebpf/watcher.bpf.o");

/// Programs and the tracepoints they attach to. There is deliberately no sys_enter
/// program: a second program on every syscall of the machine costs more than all the
/// filtering (see ebpf/README.md).
const PROGRAMS: [(&str, &str); 2] = [
    ("filesync_exit", "sys_exit"),
    ("filesync_reap", "sched_process_exit"),
];

/// The instructions of the object that the loader completes (`RDONLY_CAST` in
/// watcher.bpf.c): a kfunc call whose immediate stands for bpf_rdonly_cast, and the
/// `r2 = imm` whose immediate stands for the BTF id of `struct file`.
const CAST_CALL: [u8; 8] = [0x85, 0x20, 0x00, 0x00, 0x01, 0x00, 0x5a, 0x5a];
const CAST_TO_FILE: [u8; 8] = [0xb7, 0x02, 0x00, 0x00, 0x02, 0x00, 0x5a, 0x5a];
/// `r0 = 0`: what a cast call becomes where the kernel cannot cast. The cast then
/// yields NULL, and the program takes its probe-read path.
const R0_ZERO: [u8; 8] = [0xb7, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00];

/// How long the reader waits for records before it looks at the stop flag again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Records handled between two looks at the stop flag and the drop counter.
const BATCH: usize = 1024;

/// Must match `PREFIX_MAX` in watcher.bpf.c.
const PREFIX_MAX: usize = 512;
/// Must match `UTIME_NOW` / `UTIME_OMIT` (include/uapi/linux/stat.h).
const UTIME_NOW: u64 = (1 << 30) - 1;
const UTIME_OMIT: u64 = (1 << 30) - 2;
/// renameat2's `RENAME_EXCHANGE`.
const RENAME_EXCHANGE: u64 = 2;

/// `watched_dirs` key, `struct dir_key` in watcher.bpf.c.
#[repr(C)]
#[derive(Clone, Copy)]
struct DirKey {
    dev: u32,
    pad: u32,
    ino: u64,
}

/// `watched_dirs` value, `struct dir_val` in watcher.bpf.c.
#[repr(C)]
#[derive(Clone, Copy)]
struct DirVal {
    kind: u32,
    prefix_off: u32,
}

const DIR_ROOT: u32 = 1;
const DIR_ANCESTOR: u32 = 2;

/// `root_prefix` value, `struct prefix` in watcher.bpf.c.
#[repr(C)]
#[derive(Clone, Copy)]
struct Prefix {
    len: u32,
    bytes: [u8; PREFIX_MAX],
}

// SAFETY: plain `#[repr(C)]` integers and byte arrays without padding, valid for any bytes.
unsafe impl aya::Pod for DirKey {}
// SAFETY: as above.
unsafe impl aya::Pod for DirVal {}
// SAFETY: as above.
unsafe impl aya::Pod for Prefix {}

/// Loads the program, fills the watched-folder map, and reports changes under spec.root to
/// sink from its own thread.
pub fn start(spec: &WatchSpec, sink: Sink) -> Result<Box<dyn Watcher>, CaptureError> {
    let layout = RootLayout::of(&spec.root)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let thread = {
        let thread_spec = spec.clone();
        let stop = Arc::clone(&stop);
        // The aya objects are created and dropped on the reader thread, so that dropping
        // them there on stop detaches the programs, whatever their Send-ness.
        std::thread::Builder::new()
            .name("filesync-ebpf".into())
            .spawn(move || match Loaded::load(&thread_spec, &layout) {
                Ok(loaded) => {
                    // The receiver only goes away if start() itself is gone.
                    let _ = ready_tx.send(Ok(()));
                    let resolver =
                        Resolver::new(thread_spec.root, layout.kernel_dev, layout.st_dev);
                    loaded.run(&resolver, &*sink, &stop);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|source| CaptureError::Io {
                path: spec.root.clone(),
                source,
            })?
    };
    let started = ready_rx
        .recv()
        .unwrap_or_else(|_| Err(unavailable("the eBPF reader thread died while loading")));
    if let Err(e) = started {
        // The thread has finished or is about to: it sent its last message.
        let _ = thread.join();
        return Err(e);
    }
    Ok(Box::new(EbpfWatcher {
        stop,
        thread: Some(thread),
    }))
}

struct EbpfWatcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher for EbpfWatcher {
    fn kind(&self) -> WatcherKind {
        WatcherKind::Ebpf
    }

    fn stop(self: Box<Self>) {
        // Drop does the work, so that a watcher dropped without stop() stops too.
    }
}

impl Drop for EbpfWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the eBPF reader thread panicked; its programs are detached");
            }
        }
    }
}

fn unavailable(reason: impl Into<String>) -> CaptureError {
    CaptureError::Unavailable {
        kind: WatcherKind::Ebpf,
        reason: reason.into(),
    }
}

/// What the kernel side needs to know about the root, taken from the file system before
/// anything is loaded.
struct RootLayout {
    /// `sb->s_dev` of the root.
    kernel_dev: u32,
    /// `st_dev` of the root, which `FileId`s use.
    st_dev: u64,
    /// The root first, then its ancestors, as `watched_dirs` entries.
    dirs: Vec<(DirKey, DirVal)>,
    prefix: Prefix,
}

impl RootLayout {
    fn of(root: &Path) -> Result<Self, CaptureError> {
        let io_error = |source| CaptureError::Io {
            path: root.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(root).map_err(io_error)?;
        // Read once: the mount table does not change between the root and its ancestors.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if !meta.is_dir() {
            return Err(io_error(io::Error::new(
                io::ErrorKind::NotADirectory,
                "the watched root must be a directory",
            )));
        }
        // "/" is stored as the empty prefix, so that every prefix is followed by '/'.
        let text = root.as_os_str().as_bytes();
        let text = if text == b"/" { &b""[..] } else { text };
        if text.len() >= PREFIX_MAX {
            return Err(unavailable(format!(
                "the watched path is {} bytes long and the program matches at most {}; watch a shorter path",
                text.len(),
                PREFIX_MAX - 1
            )));
        }
        let mut prefix = Prefix {
            len: 0,
            bytes: [0; PREFIX_MAX],
        };
        prefix.bytes[..text.len()].copy_from_slice(text);
        prefix.len = text.len() as u32;

        let root_dev = superblock_dev(&mountinfo, root, meta.dev());
        let mut dirs = vec![(
            DirKey {
                dev: root_dev,
                pad: 0,
                ino: meta.ino(),
            },
            DirVal {
                kind: DIR_ROOT,
                prefix_off: prefix.len,
            },
        )];
        for ancestor in root.ancestors().skip(1) {
            let meta = std::fs::metadata(ancestor).map_err(io_error)?;
            // What follows the ancestor's name in the root's path, after its '/'.
            let name_len = ancestor.as_os_str().as_bytes().len();
            let prefix_off = if ancestor == Path::new("/") {
                1
            } else {
                name_len + 1
            };
            dirs.push((
                DirKey {
                    dev: superblock_dev(&mountinfo, ancestor, meta.dev()),
                    pad: 0,
                    ino: meta.ino(),
                },
                DirVal {
                    kind: DIR_ANCESTOR,
                    prefix_off: prefix_off as u32,
                },
            ));
        }
        Ok(Self {
            kernel_dev: root_dev,
            st_dev: meta.dev(),
            dirs,
            prefix,
        })
    }
}

/// `sb->s_dev` of the file system holding `path`, which is what the program compares.
/// /proc/self/mountinfo states it; `st_dev` can differ (btrfs gives each subvolume its own),
/// and is only the fallback when no mount matches.
fn superblock_dev(mountinfo: &str, path: &Path, st_dev: u64) -> u32 {
    match mount_dev(mountinfo, path) {
        Some((major, minor)) => (major << 20) | (minor & 0xf_ffff),
        None => kernel_dev(st_dev),
    }
}

/// `major:minor` of the mount that holds `path`: the deepest mount point above it, the
/// last listed when several are stacked on one point (that one is on top).
fn mount_dev(mountinfo: &str, path: &Path) -> Option<(u32, u32)> {
    let mut best: Option<(usize, (u32, u32))> = None;
    for line in mountinfo.lines() {
        // "36 35 98:0 /mnt1 /mnt2 rw,noatime ...": id, parent, major:minor, root, mount point.
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(dev), Some(point)) = (fields.get(2), fields.get(4)) else {
            continue;
        };
        let Some((major, minor)) = dev.split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (major.parse(), minor.parse()) else {
            continue;
        };
        let point = PathBuf::from(OsStr::from_bytes(&unescape_mount_point(point)));
        if !path.starts_with(&point) {
            continue;
        }
        let depth = point.components().count();
        if best.is_none_or(|(d, _)| depth >= d) {
            best = Some((depth, (major, minor)));
        }
    }
    best.map(|(_, dev)| dev)
}

/// mountinfo writes space, tab, newline and backslash in a mount point as `\ooo` octal.
fn unescape_mount_point(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(((d[0] - b'0') << 6) | ((d[1] - b'0') << 3) | (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

/// `st_dev` as the kernel stores it in `sb->s_dev`: `MAJOR << 20 | MINOR`.
fn kernel_dev(st_dev: u64) -> u32 {
    (libc::major(st_dev) << 20) | (libc::minor(st_dev) & 0xf_ffff)
}

/// `sb->s_dev` back in `st_dev` form.
fn user_dev(kernel_dev: u32) -> u64 {
    libc::makedev(kernel_dev >> 20, kernel_dev & 0xf_ffff)
}

/// The running kernel's BTF ids that complete the casts of the object.
#[derive(Clone, Copy)]
struct CastIds {
    rdonly_cast: u32,
    file: u32,
}

impl CastIds {
    /// None when the kernel lacks the kfunc (before 6.2) or the struct.
    fn of(btf: &Btf) -> Option<Self> {
        Some(Self {
            rdonly_cast: btf
                .id_by_type_name_kind("bpf_rdonly_cast", BtfKind::Func)
                .ok()?,
            file: btf.id_by_type_name_kind("file", BtfKind::Struct).ok()?,
        })
    }
}

/// A copy of the object with its cast instructions completed, 8-byte aligned like the
/// embedded one (the ELF parser reads its headers in place).
struct LinkedObject {
    words: Vec<u64>,
    len: usize,
}

impl LinkedObject {
    /// With ids, the casts call bpf_rdonly_cast; without, each call becomes `r0 = 0`.
    fn new(object: &[u8], ids: Option<CastIds>) -> Self {
        let mut bytes = object.to_vec();
        let call = match ids {
            Some(ids) => {
                replace_all(
                    &mut bytes,
                    &CAST_TO_FILE,
                    &with_immediate(CAST_TO_FILE, ids.file),
                );
                with_immediate(CAST_CALL, ids.rdonly_cast)
            }
            None => R0_ZERO,
        };
        replace_all(&mut bytes, &CAST_CALL, &call);
        let words = bytes
            .chunks(8)
            .map(|chunk| {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                u64::from_ne_bytes(word)
            })
            .collect();
        Self {
            words,
            len: object.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the words own at least len initialised bytes (div_ceil above), any byte
        // pattern is a valid u8, and the slice borrows self.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }
}

/// The instruction with its 32-bit immediate (bytes 4..8, little endian) set to imm.
fn with_immediate(mut insn: [u8; 8], imm: u32) -> [u8; 8] {
    insn[4..].copy_from_slice(&imm.to_le_bytes());
    insn
}

/// Replaces every occurrence of the 8-byte instruction from with to.
fn replace_all(bytes: &mut [u8], from: &[u8; 8], to: &[u8; 8]) {
    let mut at = 0;
    while let Some(found) = bytes
        .get(at..)
        .and_then(|rest| rest.windows(8).position(|w| w == from))
    {
        let start = at + found;
        if let Some(slot) = bytes.get_mut(start..start + 8) {
            slot.copy_from_slice(to);
        }
        at = start + 8;
    }
}

/// The loaded and attached program with the maps the reader needs.
struct Loaded {
    /// Owns the programs and their links: dropping it detaches them.
    _ebpf: Ebpf,
    ring: RingBuf<MapData>,
    drops: PerCpuArray<MapData, u64>,
}

impl Loaded {
    /// Loads with the casts linked (the fast path for writes outside the root); where the
    /// kernel refuses them, again without.
    fn load(spec: &WatchSpec, layout: &RootLayout) -> Result<Self, CaptureError> {
        let started = std::time::Instant::now();
        let btf = Btf::from_sys_fs().map_err(|e| {
            unavailable(format!(
                "the kernel has no usable BTF ({}); boot a kernel built with CONFIG_DEBUG_INFO_BTF=y",
                one_line(&e)
            ))
        })?;
        let with_casts = CastIds::of(&btf).map(|ids| {
            Self::load_object(spec, layout, &btf, &LinkedObject::new(PROGRAM, Some(ids)))
        });
        let (loaded, fast_path) = match with_casts {
            Some(Ok(loaded)) => (loaded, "bpf_rdonly_cast"),
            Some(Err(refused)) => {
                let loaded =
                    Self::load_object(spec, layout, &btf, &LinkedObject::new(PROGRAM, None))?;
                tracing::warn!(
                    "the kernel refused the eBPF watcher's casts ({refused}); it uses probe reads, which cost other processes about 140 ns more per write"
                );
                (loaded, "probe reads")
            }
            None => (
                Self::load_object(spec, layout, &btf, &LinkedObject::new(PROGRAM, None))?,
                "probe reads (bpf_rdonly_cast needs Linux 6.2)",
            ),
        };
        let (loaded, attached) = loaded;
        tracing::info!(
            "eBPF watcher active on {} (loaded in {} ms; fast path: {fast_path}): {}",
            spec.root.display(),
            started.elapsed().as_millis(),
            attached.join(", ")
        );
        Ok(loaded)
    }

    /// Loads and attaches one linking of the object; returns what it attached, for the log.
    fn load_object(
        spec: &WatchSpec,
        layout: &RootLayout,
        btf: &Btf,
        object: &LinkedObject,
    ) -> Result<(Self, Vec<String>), CaptureError> {
        let mut ebpf = EbpfLoader::new()
            .btf(Some(btf))
            .override_global("root_dev", &layout.kernel_dev, true)
            .load(object.bytes())
            .map_err(|e| load_error(&e))?;

        let mut dirs: HashMap<_, DirKey, DirVal> = map(&mut ebpf, "watched_dirs")?;
        for (key, val) in &layout.dirs {
            dirs.insert(key, val, 0).map_err(|e| load_error(&e))?;
        }
        let mut prefix: Array<_, Prefix> = map(&mut ebpf, "root_prefix")?;
        prefix
            .set(0, layout.prefix, 0)
            .map_err(|e| load_error(&e))?;
        let mut ignored: HashMap<_, u32, u8> = map(&mut ebpf, "ignored_tgids")?;
        for pid in &spec.ignore_pids {
            ignored.insert(pid, 1, 0).map_err(|e| {
                unavailable(format!(
                    "cannot ignore pid {pid} ({}); pass at most 1024 pids to ignore",
                    one_line(&e)
                ))
            })?;
        }

        let mut attached = Vec::with_capacity(PROGRAMS.len());
        for (name, tracepoint) in PROGRAMS {
            let program: &mut BtfTracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| {
                    unavailable(format!(
                        "the embedded object lacks program {name}; rebuild it with ebpf/build.sh"
                    ))
                })?
                .try_into()
                .map_err(|e: ProgramError| program_error(name, &e))?;
            program
                .load(tracepoint, btf)
                .map_err(|e| program_error(name, &e))?;
            program.attach().map_err(|e| program_error(name, &e))?;
            let insns = program
                .info()
                .ok()
                .and_then(|info| info.verified_instruction_count());
            attached.push(match insns {
                Some(n) => format!("{name} on {tracepoint} ({n} insns verified)"),
                None => format!("{name} on {tracepoint}"),
            });
        }

        let ring = take_map(&mut ebpf, "events")?;
        let drops = take_map(&mut ebpf, "drops")?;
        Ok((
            Self {
                _ebpf: ebpf,
                ring,
                drops,
            },
            attached,
        ))
    }

    /// Reads records until `stop` is set; every lost record becomes one rescan.
    fn run(mut self, resolver: &Resolver, sink: &dyn crate::change::ChangeSink, stop: &AtomicBool) {
        let mut dropped_before = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Err(e) = wait_readable(&self.ring, POLL_INTERVAL) {
                tracing::error!("eBPF watcher stops: polling its ring buffer failed: {e}");
                sink.record(resolver.rescan());
                return;
            }
            // Before the backlog, so that a rescan is asked for at once, not after it.
            match self.dropped() {
                Ok(dropped) if dropped > dropped_before => {
                    tracing::warn!(
                        lost = dropped - dropped_before,
                        "eBPF ring buffer overflowed; asking for a rescan"
                    );
                    dropped_before = dropped;
                    sink.record(resolver.rescan());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!("eBPF watcher stops: reading its drop counter failed: {e}");
                    sink.record(resolver.rescan());
                    return;
                }
            }
            // A bounded batch: then the stop flag and the drop counter are looked at again.
            for _ in 0..BATCH {
                let Some(item) = self.ring.next() else { break };
                resolver.report(&item, sink);
            }
        }
    }

    fn dropped(&self) -> Result<u64, aya::maps::MapError> {
        let per_cpu = self.drops.get(&0, 0)?;
        Ok(per_cpu.iter().sum())
    }
}

fn map<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<T, CaptureError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.map_mut(name).ok_or_else(|| {
        unavailable(format!(
            "the embedded object lacks map {name}; rebuild it with ebpf/build.sh"
        ))
    })?;
    T::try_from(map).map_err(|e| load_error(&e))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| {
        unavailable(format!(
            "the embedded object lacks map {name}; rebuild it with ebpf/build.sh"
        ))
    })?;
    T::try_from(map).map_err(|e| load_error(&e))
}

/// Waits until the ring has records or the timeout passes; EINTR counts as a timeout.
fn wait_readable(ring: &RingBuf<MapData>, timeout: Duration) -> io::Result<()> {
    let mut fds = [libc::pollfd {
        fd: ring.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: fds is a valid array of one pollfd for the duration of the call.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout_ms) };
    if ready < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// An error and its sources on one line; aya's messages often repeat their source, so a
/// source already in the text is not added again.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text.replace('\n', " ")
}

/// Whether an error chain says the kernel refused for lack of privilege.
fn permission_denied(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) {
                return true;
            }
        }
        current = err.source();
    }
    false
}

fn load_error(e: &(dyn std::error::Error + 'static)) -> CaptureError {
    if permission_denied(e) {
        return unavailable(format!(
            "the kernel refused to create the eBPF maps ({}); run as root or with CAP_BPF and CAP_PERFMON",
            one_line(e)
        ));
    }
    unavailable(format!(
        "loading the eBPF object failed ({}); check that the kernel supports BPF ring buffers (5.8+) and bpf_loop (5.17+)",
        one_line(e)
    ))
}

fn program_error(name: &str, e: &ProgramError) -> CaptureError {
    if let ProgramError::LoadError {
        io_error,
        verifier_log,
    } = e
    {
        let log = verifier_log.to_string();
        tracing::debug!(program = name, "verifier log:\n{log}");
        if matches!(
            io_error.raw_os_error(),
            Some(libc::EPERM) | Some(libc::EACCES)
        ) {
            return unavailable(format!(
                "the kernel refused to load eBPF program {name} ({io_error}); run as root or with CAP_BPF and CAP_PERFMON"
            ));
        }
        let last = log
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty() && !l.starts_with("processed "))
            .unwrap_or("no verifier output");
        return unavailable(format!(
            "the verifier rejected eBPF program {name} ({io_error}: {last}); run with RUST_LOG=debug for its log and report it with `uname -r`"
        ));
    }
    if permission_denied(e) {
        return unavailable(format!(
            "the kernel refused eBPF program {name} ({}); run as root or with CAP_BPF and CAP_PERFMON",
            one_line(e)
        ));
    }
    unavailable(format!(
        "eBPF program {name} could not be loaded or attached ({}); the kernel needs BTF tracepoints (5.5+)",
        one_line(e)
    ))
}

// Record layout; must match watcher.bpf.c.
const HEADER_LEN: usize = 64;
const ITEM_HEADER_LEN: usize = 4;
const ANCHOR_CHAIN: u16 = 0xffff;

const F_SIDE0: u16 = 0x1;
const F_SIDE1: u16 = 0x2;
const F_TRUNCATED: u16 = 0x4;
const F_UNLINKED: u16 = 0x8;
const F_FILE: u16 = 0x10;

const ITEM_NAME0: u8 = 1;
const ITEM_NAME1: u8 = 2;
const ITEM_PATH0: u8 = 3;
const ITEM_PATH1: u8 = 4;
const ITEM_STR: u8 = 5;

const OP_WRITE: u16 = 1;
const OP_TRUNCATE_OPEN: u16 = 2;
const OP_CREATE: u16 = 3;
const OP_SET_SIZE: u16 = 4;
const OP_FALLOCATE: u16 = 5;
const OP_CLOSED: u16 = 6;
const OP_UNLINK: u16 = 7;
const OP_RMDIR: u16 = 8;
const OP_RENAME: u16 = 9;
const OP_MKDIR: u16 = 10;
const OP_MKNOD: u16 = 11;
const OP_SYMLINK: u16 = 12;
const OP_LINK: u16 = 13;
const OP_CHMOD: u16 = 14;
const OP_CHOWN: u16 = 15;
const OP_SET_XATTR: u16 = 16;
const OP_REMOVE_XATTR: u16 = 17;
const OP_UTIMES: u16 = 18;
const OP_FSYNC: u16 = 19;

/// A record as the kernel wrote it, checked against the buffer it came in.
struct Record<'a> {
    op: u16,
    flags: u16,
    tgid: u32,
    dev: u32,
    anchor: [u16; 2],
    ino: u64,
    a: u64,
    b: u64,
    c: u64,
    d: u64,
    /// d_name components per side, leaf first.
    names: [Vec<&'a [u8]>; 2],
    paths: [Option<&'a [u8]>; 2],
    string: Option<&'a [u8]>,
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl<'a> Record<'a> {
    /// Parses one ring-buffer record; `None` when its lengths do not add up.
    fn parse(buf: &'a [u8]) -> Option<Self> {
        let data_len = le_u32(buf, 56)? as usize;
        let data = buf.get(HEADER_LEN..HEADER_LEN.checked_add(data_len)?)?;
        let mut record = Record {
            op: le_u16(buf, 0)?,
            flags: le_u16(buf, 2)?,
            tgid: le_u32(buf, 4)?,
            dev: le_u32(buf, 8)?,
            anchor: [le_u16(buf, 12)?, le_u16(buf, 14)?],
            ino: le_u64(buf, 16)?,
            a: le_u64(buf, 24)?,
            b: le_u64(buf, 32)?,
            c: le_u64(buf, 40)?,
            d: le_u64(buf, 48)?,
            names: [Vec::new(), Vec::new()],
            paths: [None, None],
            string: None,
        };
        let mut at = 0;
        while at < data.len() {
            let kind = *data.get(at)?;
            let len = le_u16(data, at + 2)? as usize;
            let body = data.get(at + ITEM_HEADER_LEN..at + ITEM_HEADER_LEN + len)?;
            match kind {
                ITEM_NAME0 => record.names[0].push(body),
                ITEM_NAME1 => record.names[1].push(body),
                ITEM_PATH0 => record.paths[0] = Some(body),
                ITEM_PATH1 => record.paths[1] = Some(body),
                ITEM_STR => record.string = Some(body),
                _ => return None,
            }
            at += ITEM_HEADER_LEN + len;
        }
        Some(record)
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Where one side of a record is.
#[derive(Debug, PartialEq)]
enum Place {
    /// Under the root, at this relative path.
    Inside(PathBuf),
    /// Outside the root.
    Outside,
    /// Under the root, but the name is unknown (unlinked, or too long for a record).
    Unnamed,
}

/// Turns records into changes relative to the root.
struct Resolver {
    root: PathBuf,
    /// The root's `sb->s_dev` and `st_dev`: a `FileId` holds the latter, like `stat`.
    root_kernel_dev: u32,
    root_st_dev: u64,
}

impl Resolver {
    fn new(root: PathBuf, root_kernel_dev: u32, root_st_dev: u64) -> Self {
        Self {
            root,
            root_kernel_dev,
            root_st_dev,
        }
    }

    fn file_dev(&self, kernel_dev: u32) -> u64 {
        if kernel_dev == self.root_kernel_dev {
            self.root_st_dev
        } else {
            user_dev(kernel_dev)
        }
    }

    fn rescan(&self) -> Change {
        Change {
            path: None,
            file: None,
            kind: ChangeKind::Rescan,
            source: Source::Ebpf,
            pid: None,
        }
    }

    fn report(&self, buf: &[u8], sink: &dyn crate::change::ChangeSink) {
        let Some(record) = Record::parse(buf) else {
            tracing::warn!(
                len = buf.len(),
                "malformed eBPF record; asking for a rescan"
            );
            sink.record(self.rescan());
            return;
        };
        if let Some(change) = self.change(&record) {
            sink.record(change);
        }
    }

    fn place(&self, record: &Record<'_>, side: usize) -> Place {
        let flag = if side == 0 { F_SIDE0 } else { F_SIDE1 };
        if !record.has(flag) {
            return Place::Outside;
        }
        if record.has(F_TRUNCATED) || (record.has(F_UNLINKED) && record.paths[side].is_none()) {
            return Place::Unnamed;
        }
        let mut full = match record.anchor[side] {
            ANCHOR_CHAIN => {
                let mut p = self.root.clone();
                for name in record.names[side].iter().rev() {
                    p.push(OsStr::from_bytes(name));
                }
                p
            }
            // The path continues the root's own path after this many bytes.
            off => {
                let root = self.root.as_os_str().as_bytes();
                PathBuf::from(OsStr::from_bytes(root.get(..off as usize).unwrap_or(b"/")))
            }
        };
        if let Some(path) = record.paths[side] {
            full.push(OsStr::from_bytes(path));
        }
        match normalize(&full).strip_prefix(&self.root) {
            Ok(relative) => Place::Inside(relative.to_path_buf()),
            Err(_) => Place::Outside,
        }
    }

    fn change(&self, record: &Record<'_>) -> Option<Change> {
        let file = record.has(F_FILE).then(|| FileId {
            dev: self.file_dev(record.dev),
            ino: record.ino,
        });
        let change = |path: Option<PathBuf>, kind| Change {
            path,
            file,
            kind,
            source: Source::Ebpf,
            pid: Some(record.tgid),
        };
        let from = self.place(record, 0);
        let kind = match record.op {
            OP_RENAME => return self.rename(record, from),
            OP_LINK => {
                let existing = match from {
                    Place::Inside(p) => Some(p),
                    _ => None,
                };
                return match self.place(record, 1) {
                    Place::Inside(to) => Some(change(Some(to), ChangeKind::Link { existing })),
                    Place::Outside => None,
                    Place::Unnamed => Some(self.rescan()),
                };
            }
            OP_CREATE if record.has(F_UNLINKED) => return None, // O_TMPFILE: nothing has a name yet
            OP_WRITE => ChangeKind::Write {
                offset: record.a,
                len: record.b,
            },
            OP_TRUNCATE_OPEN => ChangeKind::Truncate { size: 0 },
            OP_CREATE => ChangeKind::Create,
            OP_SET_SIZE => ChangeKind::SetAttr(AttrChange {
                size: Some(record.a),
                ..AttrChange::default()
            }),
            OP_FALLOCATE => ChangeKind::Fallocate {
                offset: record.a,
                len: record.b,
                mode: record.c as i32,
            },
            OP_CLOSED => ChangeKind::Closed,
            OP_UNLINK => ChangeKind::Unlink,
            OP_RMDIR => ChangeKind::Rmdir,
            OP_MKDIR => ChangeKind::Mkdir,
            OP_MKNOD => ChangeKind::Mknod {
                mode: record.a as u32,
                rdev: record.b,
            },
            OP_SYMLINK => ChangeKind::Symlink {
                target: PathBuf::from(OsStr::from_bytes(record.string.unwrap_or_default())),
            },
            OP_CHMOD => ChangeKind::SetAttr(AttrChange {
                mode: Some(record.a as u32 & 0o7777),
                ..AttrChange::default()
            }),
            OP_CHOWN => ChangeKind::SetAttr(AttrChange {
                uid: id_change(record.a),
                gid: id_change(record.b),
                ..AttrChange::default()
            }),
            OP_SET_XATTR => ChangeKind::SetXattr {
                name: String::from_utf8_lossy(record.string.unwrap_or_default()).into_owned(),
            },
            OP_REMOVE_XATTR => ChangeKind::RemoveXattr {
                name: String::from_utf8_lossy(record.string.unwrap_or_default()).into_owned(),
            },
            OP_UTIMES => ChangeKind::SetAttr(AttrChange {
                atime: time_change(record.a, record.b),
                mtime: time_change(record.c, record.d),
                ..AttrChange::default()
            }),
            OP_FSYNC => ChangeKind::Fsync {
                datasync: record.a != 0,
            },
            op => {
                tracing::warn!(op, "unknown eBPF record; asking for a rescan");
                return Some(self.rescan());
            }
        };
        match from {
            Place::Inside(path) => Some(change(Some(path), kind)),
            // Only an open file can lose its name and still be known by its inode.
            Place::Unnamed if file.is_some() => Some(change(None, kind)),
            Place::Unnamed => Some(self.rescan()),
            Place::Outside => None,
        }
    }

    /// A rename inside the root is a rename; across its edge it is a removal or an arrival.
    fn rename(&self, record: &Record<'_>, from: Place) -> Option<Change> {
        let exchange = record.c & RENAME_EXCHANGE != 0;
        let change = |path, kind| {
            Some(Change {
                path: Some(path),
                file: None,
                kind,
                source: Source::Ebpf,
                pid: Some(record.tgid),
            })
        };
        match (from, self.place(record, 1)) {
            (Place::Inside(from), Place::Inside(to)) => change(
                from,
                ChangeKind::Rename {
                    to: Some(to),
                    exchange,
                },
            ),
            (Place::Unnamed, _) | (_, Place::Unnamed) => Some(self.rescan()),
            // Something else now has this name; what it is must be looked at.
            (Place::Inside(path), Place::Outside) | (Place::Outside, Place::Inside(path))
                if exchange =>
            {
                change(path, ChangeKind::Modified)
            }
            (Place::Inside(from), Place::Outside) => change(from, ChangeKind::Unlink),
            (Place::Outside, Place::Inside(to)) => {
                let kind = self.arrival_kind(&to);
                change(to, kind)
            }
            (Place::Outside, Place::Outside) => None,
        }
    }

    /// What a name moved in from outside now holds: the record cannot say, lstat can
    /// (racily: if it changed again since, that change has its own record).
    fn arrival_kind(&self, relative: &Path) -> ChangeKind {
        match std::fs::symlink_metadata(self.root.join(relative)) {
            Ok(meta) if meta.is_dir() => ChangeKind::Mkdir,
            Ok(meta) if meta.is_file() => ChangeKind::Create,
            // A symlink, a device, or nothing any more.
            _ => ChangeKind::Modified,
        }
    }
}

/// Resolves `.` and `..` without touching the file system: the kernel resolved the real
/// path already, this only has to agree with it when no symlink is involved.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// chown's "-1 = leave unchanged".
fn id_change(id: u64) -> Option<u32> {
    let id = id as u32;
    (id != u32::MAX).then_some(id)
}

/// utimensat's (seconds, nanoseconds) with its UTIME_NOW / UTIME_OMIT markers.
fn time_change(sec: u64, nsec: u64) -> Option<TimeChange> {
    match nsec {
        UTIME_NOW => Some(TimeChange::Now),
        UTIME_OMIT => None,
        nsec => {
            let sec = sec as i64;
            let nanos = Duration::from_nanos(nsec.min(999_999_999));
            let at = if sec >= 0 {
                SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(sec as u64))
            } else {
                SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(sec.unsigned_abs()))
            };
            // A time SystemTime cannot hold is still a change, of an unknown value.
            Some(
                at.and_then(|t| t.checked_add(nanos))
                    .map_or(TimeChange::Now, TimeChange::At),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(bytes: &[u8], insn: &[u8; 8]) -> usize {
        bytes.windows(8).filter(|w| w == insn).count()
    }

    #[test]
    fn linking_completes_every_cast_of_the_object() {
        // Two casts (the fd array, then the file) in filesync_exit's fast path.
        assert_eq!(count(PROGRAM, &CAST_CALL), 2);
        assert_eq!(count(PROGRAM, &CAST_TO_FILE), 1);
        let ids = CastIds {
            rdonly_cast: 65500,
            file: 718,
        };
        let linked = LinkedObject::new(PROGRAM, Some(ids));
        assert_eq!(linked.bytes().len(), PROGRAM.len());
        assert_eq!(linked.bytes().as_ptr().align_offset(8), 0);
        assert_eq!(count(linked.bytes(), &CAST_CALL), 0);
        assert_eq!(count(linked.bytes(), &with_immediate(CAST_CALL, 65500)), 2);
        assert_eq!(count(linked.bytes(), &with_immediate(CAST_TO_FILE, 718)), 1);

        let without = LinkedObject::new(PROGRAM, None);
        assert_eq!(count(without.bytes(), &CAST_CALL), 0);
        assert!(count(without.bytes(), &R0_ZERO) >= 2);
    }

    fn header(op: u16, flags: u16, anchor: [u16; 2], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&op.to_le_bytes());
        b[2..4].copy_from_slice(&flags.to_le_bytes());
        b[4..8].copy_from_slice(&42u32.to_le_bytes());
        b[8..12].copy_from_slice(&0x0fe0_0001u32.to_le_bytes());
        b[12..14].copy_from_slice(&anchor[0].to_le_bytes());
        b[14..16].copy_from_slice(&anchor[1].to_le_bytes());
        b[16..24].copy_from_slice(&7u64.to_le_bytes());
        b[24..32].copy_from_slice(&100u64.to_le_bytes());
        b[32..40].copy_from_slice(&5u64.to_le_bytes());
        b[56..60].copy_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(data);
        b
    }

    fn item(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![kind, 0];
        v.extend_from_slice(&(body.len() as u16).to_le_bytes());
        v.extend_from_slice(body);
        v
    }

    fn resolver() -> Resolver {
        Resolver::new(
            PathBuf::from("/srv/data"),
            0x0fe0_0001,
            libc::makedev(254, 1),
        )
    }

    #[test]
    fn the_deepest_and_topmost_mount_gives_the_superblock() {
        let mountinfo = concat!(
            "22 1 254:1 / / rw,relatime - ext4 /dev/vda1 rw\n",
            "30 22 0:41 / /srv rw - btrfs /dev/vdb rw\n",
            "31 30 0:52 / /srv/my\\040data rw - tmpfs tmpfs rw\n",
            "32 30 0:53 / /srv/my\\040data rw - tmpfs tmpfs rw\n",
            "garbage line\n",
        );
        let dev = |p: &str| mount_dev(mountinfo, Path::new(p));
        assert_eq!(dev("/srv/my data/x"), Some((0, 53)));
        assert_eq!(dev("/srv/other"), Some((0, 41)));
        // A name that merely starts like a mount point is not under it.
        assert_eq!(dev("/srvx"), Some((254, 1)));
        assert_eq!(superblock_dev(mountinfo, Path::new("/srv"), 0), 41);
        assert_eq!(
            superblock_dev("", Path::new("/srv"), libc::makedev(8, 2)),
            (8 << 20) | 2
        );
        assert_eq!(unescape_mount_point("a\\134b\\011\\9"), b"a\\b\t\\9");
    }

    #[test]
    fn kernel_dev_round_trips() {
        let st_dev = libc::makedev(254, 1);
        assert_eq!(kernel_dev(st_dev), 0x0fe0_0001);
        assert_eq!(user_dev(kernel_dev(st_dev)), st_dev);
    }

    #[test]
    fn write_by_fd_names_the_chain_leaf_last() {
        let data = [item(ITEM_NAME0, b"f"), item(ITEM_NAME0, b"sub")].concat();
        let buf = header(
            OP_WRITE,
            F_SIDE0 | F_FILE,
            [ANCHOR_CHAIN, ANCHOR_CHAIN],
            &data,
        );
        let record = Record::parse(&buf).expect("well-formed");
        let change = resolver().change(&record).expect("inside");
        assert_eq!(change.path, Some(PathBuf::from("sub/f")));
        assert_eq!(
            change.kind,
            ChangeKind::Write {
                offset: 100,
                len: 5
            }
        );
        assert_eq!(
            change.file,
            Some(FileId {
                dev: libc::makedev(254, 1),
                ino: 7
            })
        );
        assert_eq!(change.pid, Some(42));
    }

    #[test]
    fn paths_from_an_ancestor_and_absolute_paths_resolve() {
        // "data/x" relative to /srv, whose name ends at byte 5 of "/srv/data".
        let buf = header(
            OP_UNLINK,
            F_SIDE0,
            [5, ANCHOR_CHAIN],
            &item(ITEM_PATH0, b"data/x"),
        );
        let record = Record::parse(&buf).expect("well-formed");
        assert_eq!(record_path(&record), Some(PathBuf::from("x")));

        let buf = header(
            OP_UNLINK,
            F_SIDE0,
            [0, ANCHOR_CHAIN],
            &item(ITEM_PATH0, b"/srv/data/./a/../b"),
        );
        let record = Record::parse(&buf).expect("well-formed");
        assert_eq!(record_path(&record), Some(PathBuf::from("b")));
    }

    fn record_path(record: &Record<'_>) -> Option<PathBuf> {
        resolver().change(record).and_then(|c| c.path)
    }

    #[test]
    fn dot_dot_out_of_the_root_is_outside() {
        let data = [
            item(ITEM_PATH0, b"../../etc/passwd"),
            item(ITEM_NAME0, b"sub"),
        ]
        .concat();
        let buf = header(OP_UNLINK, F_SIDE0, [ANCHOR_CHAIN, ANCHOR_CHAIN], &data);
        let record = Record::parse(&buf).expect("well-formed");
        assert_eq!(resolver().change(&record), None);
    }

    #[test]
    fn truncated_path_asks_for_a_rescan() {
        let buf = header(
            OP_MKDIR,
            F_SIDE0 | F_TRUNCATED,
            [0, ANCHOR_CHAIN],
            &item(ITEM_PATH0, b"/srv/data/aaaa"),
        );
        let record = Record::parse(&buf).expect("well-formed");
        let change = resolver().change(&record).expect("reported");
        assert_eq!(change.kind, ChangeKind::Rescan);
    }

    #[test]
    fn malformed_records_are_rejected() {
        // An item claiming more bytes than the record has.
        let mut buf = header(
            OP_UNLINK,
            F_SIDE0,
            [0, 0],
            &item(ITEM_PATH0, b"/srv/data/x"),
        );
        let last = buf.len() - 1;
        buf.truncate(last);
        assert!(Record::parse(&buf).is_none());
        // A header cut short.
        assert!(Record::parse(&[0u8; 10]).is_none());
        // data_len beyond the buffer, without overflowing.
        let mut buf = header(OP_UNLINK, F_SIDE0, [0, 0], &[]);
        buf[56..60].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Record::parse(&buf).is_none());
    }

    #[test]
    fn renames_across_the_edge() {
        let out_to_in = header(
            OP_RENAME,
            F_SIDE1,
            [ANCHOR_CHAIN, 0],
            &item(ITEM_PATH1, b"/srv/data/new"),
        );
        let record = Record::parse(&out_to_in).expect("well-formed");
        let change = resolver().change(&record).expect("arrival");
        assert_eq!(change.path, Some(PathBuf::from("new")));
        // /srv/data/new does not exist here, so the kind is unknown.
        assert_eq!(change.kind, ChangeKind::Modified);

        let in_to_out = header(
            OP_RENAME,
            F_SIDE0,
            [0, ANCHOR_CHAIN],
            &item(ITEM_PATH0, b"/srv/data/old"),
        );
        let record = Record::parse(&in_to_out).expect("well-formed");
        let change = resolver().change(&record).expect("removal");
        assert_eq!(change.path, Some(PathBuf::from("old")));
        assert_eq!(change.kind, ChangeKind::Unlink);
    }

    #[test]
    fn times_decode() {
        assert_eq!(time_change(0, UTIME_NOW), Some(TimeChange::Now));
        assert_eq!(time_change(0, UTIME_OMIT), None);
        assert_eq!(
            time_change(10, 5),
            Some(TimeChange::At(
                SystemTime::UNIX_EPOCH + Duration::from_secs(10) + Duration::from_nanos(5)
            ))
        );
        assert_eq!(
            time_change(-10i64 as u64, 0),
            Some(TimeChange::At(
                SystemTime::UNIX_EPOCH - Duration::from_secs(10)
            ))
        );
    }
}
