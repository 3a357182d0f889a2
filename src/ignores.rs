//! Ignore patterns: `.filesyncignore` at the top of the synced folder, in gitignore syntax
//! (matched by the `ignore` crate, the matcher ripgrep uses). An ignored path is not
//! indexed, not sent, and not accepted from a peer; the scan does not descend into an
//! ignored directory. The ignore file itself is never ignored, so it syncs like any file
//! and every node ends up with the same rules.
//!
//! The rules are read when the mount starts and again whenever the ignore file changes
//! (locally or from a peer). A pattern the matcher cannot parse is skipped with a warning
//! naming the line; the other patterns still apply.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use parking_lot::RwLock;

/// The name of the ignore file, at the top of the synced folder.
pub const IGNORE_FILE: &str = ".filesyncignore";

/// The folder's current ignore rules, shared by the capture, the scan and the applier.
#[derive(Debug)]
pub struct Ignores {
    root: PathBuf,
    rules: RwLock<Arc<Gitignore>>,
}

impl Ignores {
    /// Reads `root/.filesyncignore` (no file: nothing is ignored).
    pub fn load(root: &Path) -> Ignores {
        Ignores {
            root: root.to_path_buf(),
            rules: RwLock::new(Arc::new(read_rules(root))),
        }
    }

    /// Ignores nothing (for folders without rules, and tests).
    pub fn none() -> Ignores {
        Ignores {
            root: PathBuf::new(),
            rules: RwLock::new(Arc::new(Gitignore::empty())),
        }
    }

    /// Reads the ignore file again.
    pub fn reload(&self) {
        let rules = read_rules(&self.root);
        tracing::info!(
            "ignore rules reloaded from {}: {} pattern(s)",
            self.root.join(IGNORE_FILE).display(),
            rules.num_ignores() + rules.num_whitelists()
        );
        *self.rules.write() = Arc::new(rules);
    }

    /// Whether `rel`, whose kind is not known, is ignored: a pattern for directories only
    /// (`build/`) is checked against what is on disk now.
    pub fn is_ignored_on_disk(&self, rel: &Path) -> bool {
        let as_file = self.is_ignored(rel, false);
        if as_file == self.is_ignored(rel, true) {
            return as_file;
        }
        self.is_ignored(rel, self.is_dir_on_disk(rel))
    }

    /// Whether `rel` is a directory in the folder now (not following a symlink).
    pub fn is_dir_on_disk(&self, rel: &Path) -> bool {
        std::fs::symlink_metadata(self.root.join(rel)).is_ok_and(|m| m.is_dir())
    }

    /// Whether `rel` (relative to the folder) is ignored, by its own name or a parent
    /// directory's. `is_dir` says whether `rel` is a directory (for patterns ending in `/`).
    pub fn is_ignored(&self, rel: &Path, is_dir: bool) -> bool {
        if is_ignore_file(rel) || rel.as_os_str().is_empty() || rel.has_root() {
            return false;
        }
        let rules = self.rules.read().clone();
        rules.matched_path_or_any_parents(rel, is_dir).is_ignore()
    }
}

/// Whether `rel` is the ignore file itself.
pub fn is_ignore_file(rel: &Path) -> bool {
    rel == Path::new(IGNORE_FILE)
}

fn read_rules(root: &Path) -> Gitignore {
    let path = root.join(IGNORE_FILE);
    if !path.exists() {
        return Gitignore::empty();
    }
    let mut builder = GitignoreBuilder::new(root);
    if let Some(err) = builder.add(&path) {
        tracing::warn!(
            "skipping part of {}: {err}; fix the pattern",
            path.display()
        );
    }
    builder.build().unwrap_or_else(|err| {
        tracing::warn!(
            "cannot use the ignore rules in {}: {err}; nothing is ignored until it is fixed",
            path.display()
        );
        Gitignore::empty()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_rules(rules: &str) -> (tempfile::TempDir, Ignores) {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join(IGNORE_FILE), rules).unwrap();
        let ignores = Ignores::load(root.path());
        (root, ignores)
    }

    #[test]
    fn gitignore_syntax_matches_names_parents_and_negations() {
        let (_root, ignores) = with_rules("*.tmp\n/build/\ncache/\n!keep.tmp\n# comment\n");
        assert!(ignores.is_ignored(Path::new("a.tmp"), false));
        assert!(ignores.is_ignored(Path::new("deep/down/a.tmp"), false));
        assert!(!ignores.is_ignored(Path::new("keep.tmp"), false));
        assert!(ignores.is_ignored(Path::new("build"), true));
        assert!(ignores.is_ignored(Path::new("build/out/x.o"), false));
        // Anchored: only at the top.
        assert!(!ignores.is_ignored(Path::new("src/build/x.o"), false));
        assert!(ignores.is_ignored(Path::new("src/cache/x"), false));
        assert!(!ignores.is_ignored(Path::new("src/main.rs"), false));
    }

    #[test]
    fn the_ignore_file_itself_is_never_ignored() {
        let (_root, ignores) = with_rules(".*\n*\n");
        assert!(!ignores.is_ignored(Path::new(IGNORE_FILE), false));
        assert!(ignores.is_ignored(Path::new("anything"), false));
    }

    #[test]
    fn reload_picks_up_new_rules_and_a_missing_file_ignores_nothing() {
        let (root, ignores) = with_rules("*.log\n");
        assert!(ignores.is_ignored(Path::new("x.log"), false));
        std::fs::write(root.path().join(IGNORE_FILE), "*.bak\n").unwrap();
        ignores.reload();
        assert!(!ignores.is_ignored(Path::new("x.log"), false));
        assert!(ignores.is_ignored(Path::new("x.bak"), false));
        std::fs::remove_file(root.path().join(IGNORE_FILE)).unwrap();
        ignores.reload();
        assert!(!ignores.is_ignored(Path::new("x.bak"), false));
    }

    #[test]
    fn a_bad_pattern_is_skipped_and_the_rest_apply() {
        let (_root, ignores) = with_rules("a[\n*.o\n");
        assert!(ignores.is_ignored(Path::new("x.o"), false));
    }
}
