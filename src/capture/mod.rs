//! Change capture behind the mount's back: watchers of the backing folder and the
//! reconcile scan. Every watcher produces the crate's one [`Change`] record into a
//! [`ChangeSink`]; the pipeline merges them with the FUSE daemon's own records.

pub mod ebpf;
pub mod fanotify;
pub mod inotify;
pub mod scan;

use std::path::PathBuf;
use std::sync::Arc;

use crate::change::ChangeSink;

/// Which watcher observes the backing folder (`-o watcher=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatcherKind {
    /// Syscall tracepoints in the kernel: every change with its byte range and pid.
    Ebpf,
    /// `FAN_MARK_FILESYSTEM` with `FAN_REPORT_DFID_NAME`: every change, no ranges.
    Fanotify,
    /// One inotify watch per directory: every change, no ranges, no pid.
    Inotify,
    /// No live watcher: only the periodic reconcile scan.
    Scan,
}

/// What a watcher watches.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// The backing folder, canonical.
    pub root: PathBuf,
    /// Processes whose changes are not reported: filesync's own, so that what it applies
    /// (later: changes from peers) is not captured again.
    pub ignore_pids: Vec<u32>,
}

/// A running watcher. It reports to its sink from its own thread(s) until stopped; a
/// lost event (a queue overflow) is reported as a `ChangeKind::Rescan` record, never
/// dropped silently.
pub trait Watcher: Send {
    fn kind(&self) -> WatcherKind;
    /// Stops reporting and releases the kernel resources; bounded in time.
    fn stop(self: Box<Self>);
}

/// Why a watcher could not start; the caller falls back to the next kind.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("the {kind} watcher is not available here: {reason}")]
    Unavailable { kind: WatcherKind, reason: String },
    #[error("cannot watch {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The sink every watcher reports to.
pub type Sink = Arc<dyn ChangeSink>;

impl std::fmt::Display for WatcherKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WatcherKind::Ebpf => "ebpf",
            WatcherKind::Fanotify => "fanotify",
            WatcherKind::Inotify => "inotify",
            WatcherKind::Scan => "scan",
        })
    }
}

/// Starts the requested watcher, or with `None` the best one available here: eBPF, then
/// fanotify, then inotify. Logs one line saying which is active. Returns `None` when only
/// the periodic scan watches (asked for with `Scan`, or nothing else could start). A watcher
/// asked for by name that cannot start is an error.
pub fn start_watcher(
    spec: &WatchSpec,
    sink: Sink,
    requested: Option<WatcherKind>,
) -> Result<Option<Box<dyn Watcher>>, CaptureError> {
    const AUTO: [WatcherKind; 3] = [
        WatcherKind::Ebpf,
        WatcherKind::Fanotify,
        WatcherKind::Inotify,
    ];
    let candidates = match requested {
        Some(kind) => vec![kind],
        None => AUTO.to_vec(),
    };
    for kind in candidates {
        let started = match kind {
            WatcherKind::Ebpf => ebpf::start(spec, sink.clone()),
            WatcherKind::Fanotify => fanotify::start(spec, sink.clone()),
            WatcherKind::Inotify => inotify::start(spec, sink.clone()),
            WatcherKind::Scan => {
                tracing::info!(
                    "watcher: scan only; changes behind the mount's back are found by the periodic scan"
                );
                return Ok(None);
            }
        };
        match started {
            Ok(watcher) => {
                tracing::info!("watcher: {kind} on {}", spec.root.display());
                return Ok(Some(watcher));
            }
            Err(err) if requested.is_none() => tracing::info!("{err}; trying the next watcher"),
            Err(err) => return Err(err),
        }
    }
    tracing::warn!(
        "watcher: none could start; changes behind the mount's back are found by the periodic scan only"
    );
    Ok(None)
}
