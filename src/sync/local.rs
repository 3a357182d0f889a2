//! Changes made on a receive-only node behind its mount's back (its mount refuses writes,
//! but the backing folder is still a folder). They are reported, kept out of catch-up so
//! they are not silently overwritten, and reverted to the peers' version on request
//! (`filesync revert`).
//!
//! The applier's own writes are not local changes: the watchers ignore the daemon's pid,
//! and for watchers that cannot tell (inotify, the scan), a path the applier wrote within
//! [`APPLIED_GRACE`] is not counted.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long after the applier wrote a path an update of it is taken as the applier's own.
pub const APPLIED_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct State {
    changed: BTreeSet<PathBuf>,
    applied: HashMap<PathBuf, Instant>,
    /// When `applied` was last pruned: pruning on every write would make a bulk transfer
    /// quadratic in the files it writes within the grace time.
    pruned: Option<Instant>,
}

/// See the module documentation. Shared by the encoder (which sees local updates), the
/// applier and the control socket.
#[derive(Debug, Default)]
pub struct LocalChanges {
    state: Mutex<State>,
}

impl LocalChanges {
    /// The applier wrote `path` (it now holds the peers' version).
    pub fn applied(&self, path: &Path) {
        let mut state = self.state.lock();
        let now = Instant::now();
        if state
            .pruned
            .is_none_or(|pruned| now.duration_since(pruned) >= APPLIED_GRACE)
        {
            state
                .applied
                .retain(|_, at| now.duration_since(*at) < APPLIED_GRACE);
            state.pruned = Some(now);
        }
        state.applied.insert(path.to_path_buf(), now);
        state.changed.remove(path);
    }

    /// A local update of `path` was captured; returns whether it is newly flagged (to
    /// report it once). `by_others` says the source already left out the daemon's own
    /// writes (eBPF, fanotify); otherwise a path the applier just wrote is not counted.
    pub fn observed(&self, path: &Path, by_others: bool) -> bool {
        let mut state = self.state.lock();
        if !by_others {
            if let Some(at) = state.applied.get(path) {
                if at.elapsed() < APPLIED_GRACE {
                    return false;
                }
            }
        }
        state.changed.insert(path.to_path_buf())
    }

    /// Whether `path` (or a folder above it) was changed locally.
    pub fn is_changed(&self, path: &Path) -> bool {
        let state = self.state.lock();
        path.ancestors().any(|p| state.changed.contains(p))
    }

    /// The flagged paths, now forgotten: the caller asks the peers for them.
    pub fn take_all(&self) -> Vec<PathBuf> {
        std::mem::take(&mut self.state.lock().changed)
            .into_iter()
            .collect()
    }

    pub fn list(&self) -> Vec<PathBuf> {
        self.state.lock().changed.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_appliers_own_writes_are_not_local_changes() {
        let local = LocalChanges::default();
        local.applied(Path::new("a"));
        assert!(!local.observed(Path::new("a"), false));
        assert!(local.observed(Path::new("b"), false));
        assert!(!local.observed(Path::new("b"), false), "reported once");
        assert!(local.is_changed(Path::new("b")));
        assert!(local.is_changed(Path::new("b/c")), "below a changed folder");
        assert_eq!(local.take_all(), vec![PathBuf::from("b")]);
        assert!(local.list().is_empty());
    }

    #[test]
    fn applying_a_path_clears_its_flag() {
        let local = LocalChanges::default();
        assert!(local.observed(Path::new("x"), true));
        local.applied(Path::new("x"));
        assert!(!local.is_changed(Path::new("x")));
    }
}
