//! What a node does with a peer's change, given the versions (see [`super::vector`]):
//! apply it, drop it, or keep both sides of a conflict, by the folder's [`Rules`]. Pure,
//! so every rule is tested without a folder.
//!
//! The rules, the same on every node so that all of them end with the same tree:
//! - A change newer than what the node has is applied; an older or equal one is dropped
//!   (which also ends echoes and relay loops), except for the later pieces of a change
//!   being applied right now, which share its version.
//! - Concurrent versions of a path are a conflict:
//!   - a deletion against an edit: the edit wins, whichever side made it (unless the
//!     rules say deletions win);
//!   - two directories, or two files with the same content, simply merge their versions;
//!   - two different files (or links, or device nodes): the winner is the one with the
//!     newer mtime, then the larger last writer (with `prefer-node`, that node's version
//!     first). Under `keep-both` a node whose own version loses keeps it beside the
//!     winner as `name.sync-conflict-YYYYMMDD-HHMMSS-<writer>.ext` (a new local file,
//!     replicated like any other) and takes the winner; a node whose version wins drops
//!     the peer's, and the peer does the renaming when it sees this version. Only the
//!     loser's holder renames, so each conflict makes exactly one copy. Under
//!     `newest-wins` and `prefer-node` the loser is only kept in the versions store.
//!     Under `merge` the applier first tries a three-way merge of text.
//!
//! Every node of a folder must use the same rules, or they may disagree on winners.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use super::proto::{Change, FileData, Hash, Op};
use super::vector::{Order, Replica, Vector};
use super::versions::format_time;
use crate::index::FileRecord;

/// How concurrent versions of a file are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    #[default]
    KeepBoth,
    NewestWins,
    /// This replica's version wins; between two others, the newer.
    PreferNode(Replica),
    /// A three-way merge of text when both sides changed different lines, else keep-both.
    Merge,
}

/// A folder's conflict rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rules {
    pub policy: Policy,
    /// Whether a deletion beats a concurrent edit (by default the edit wins).
    pub deletions_win: bool,
}

/// What to do with a peer's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Apply it; the path then has this version.
    Apply(Vector),
    /// Leave the path as it is.
    Drop(&'static str),
    /// This node's version lost a conflict: move it to `copy`, then apply the change,
    /// after which the path has `version`.
    KeepBoth { copy: PathBuf, version: Vector },
    /// Both changed the file: try a three-way merge, which the version `version` then
    /// has; `theirs_wins` says which side wins if the merge is impossible, and `copy` is
    /// where this node's version goes then.
    Merge {
        version: Vector,
        theirs_wins: bool,
        copy: PathBuf,
    },
}

/// What this node has at a path.
#[derive(Debug, Clone, Copy)]
pub struct Local<'a> {
    pub version: &'a Vector,
    /// The index record, live or deleted (`None`: never seen).
    pub record: Option<&'a FileRecord>,
}

/// Decides about `change` (already checked) to the path `path`. `mid_change` says that
/// an earlier piece of a change with this same version was applied (its later pieces
/// carry the same version).
pub fn judge(
    rules: Rules,
    change: &Change,
    path: &Path,
    local: Local<'_>,
    mid_change: bool,
) -> Verdict {
    let incoming = &change.version;
    if mid_change {
        return Verdict::Apply(incoming.merged(local.version));
    }
    match incoming.compare(local.version) {
        Order::Newer => Verdict::Apply(incoming.clone()),
        // Nodes that never stamped (or an index from before versions) compare by content,
        // as the sender decided.
        Order::Equal if incoming.is_empty() => Verdict::Apply(incoming.clone()),
        // The same version with other content should not happen; if a race made it, the
        // newer content (then the larger hash) wins on every node, so they converge.
        // Deleted here at the version it is live there (a rename moved it while it was
        // edited): the live one wins, so nothing is lost and both sides agree.
        Order::Equal
            if !local.record.is_some_and(FileRecord::is_live)
                && !matches!(change.op, Op::Remove | Op::Rename { .. }) =>
        {
            Verdict::Apply(incoming.clone())
        }
        Order::Equal => match (&change.op, local.record.filter(|r| r.is_live())) {
            (
                op @ Op::File {
                    data: FileData::Whole { .. } | FileData::Delta { .. },
                    ..
                },
                Some(record),
            ) if !same_content(op, record) && outranks(op, record) => {
                Verdict::Apply(incoming.clone())
            }
            _ => Verdict::Drop("this version is here already"),
        },
        Order::Older => Verdict::Drop("a newer version is here"),
        Order::Concurrent => {
            let merged = incoming.merged(local.version);
            match (&change.op, local.record.filter(|r| r.is_live())) {
                (Op::Remove, Some(_)) if rules.deletions_win => Verdict::Apply(merged),
                (Op::Remove, Some(_)) => Verdict::Drop("edited here while deleted there"),
                (_, None) if rules.deletions_win && local.record.is_some() => {
                    Verdict::Drop("deleted here while edited there")
                }
                (_, None) => Verdict::Apply(merged),
                (Op::Dir { .. } | Op::Rename { .. } | Op::Link { .. }, Some(_)) => {
                    Verdict::Apply(merged)
                }
                (op, Some(record)) if same_content(op, record) => Verdict::Apply(merged),
                (op, Some(record)) => {
                    // Newer mtime, then the last writer, then the vectors themselves: two
                    // concurrent vectors always differ, so exactly one side wins, and
                    // both sides rank the same pair the same way.
                    let theirs = (
                        mtime_of(op).unwrap_or(i64::MIN),
                        incoming.last_writer(),
                        incoming.pairs(),
                    );
                    let mine = (
                        record.mtime_ns,
                        local.version.last_writer(),
                        local.version.pairs(),
                    );
                    let theirs_win = match rules.policy {
                        Policy::PreferNode(node) if theirs.1 == Some(node) => true,
                        Policy::PreferNode(node) if mine.1 == Some(node) => false,
                        _ => theirs > mine,
                    };
                    let copy = conflict_name(path, record.mtime_ns, mine.1.unwrap_or_default());
                    match rules.policy {
                        Policy::Merge if matches!(op, Op::File { .. }) => Verdict::Merge {
                            version: merged,
                            theirs_wins: theirs_win,
                            copy,
                        },
                        _ if !theirs_win => Verdict::Drop("this node's version wins the conflict"),
                        Policy::KeepBoth | Policy::Merge => Verdict::KeepBoth {
                            copy,
                            version: merged,
                        },
                        Policy::NewestWins | Policy::PreferNode(_) => Verdict::Apply(merged),
                    }
                }
            }
        }
    }
}

/// Whether a file change's content ranks above the record's: newer mtime, then the
/// larger hash of its block hashes.
fn outranks(op: &Op, record: &FileRecord) -> bool {
    let Op::File { meta, blocks, .. } = op else {
        return false;
    };
    let theirs: Vec<Hash> = blocks.iter().map(|(_, hash)| *hash).collect();
    let digest = |hashes: &[Hash]| *blake3::hash(hashes.concat().as_slice()).as_bytes();
    (meta.mtime_ns, digest(&theirs)) > (record.mtime_ns, digest(&record.block_hashes))
}

/// The modification time a change gives its path, if it says.
fn mtime_of(op: &Op) -> Option<i64> {
    match op {
        Op::File { meta, .. }
        | Op::Dir { meta }
        | Op::Symlink { meta, .. }
        | Op::Special { meta, .. } => Some(meta.mtime_ns),
        _ => None,
    }
}

/// Whether `op` leaves the same bytes as `record` has: every block hash matches.
fn same_content(op: &Op, record: &FileRecord) -> bool {
    match op {
        Op::File { size, blocks, .. } => {
            *size == record.size
                && blocks.len() == record.block_hashes.len()
                && blocks.iter().all(|(at, hash): &(u64, Hash)| {
                    usize::try_from(*at)
                        .ok()
                        .and_then(|at| record.block_hashes.get(at))
                        == Some(hash)
                })
        }
        Op::Symlink { target, .. } => record.symlink_target.as_deref() == Some(target.as_slice()),
        _ => false,
    }
}

/// Marks conflict copies: `filesync conflicts` lists the names that hold it.
pub const CONFLICT_MARK: &str = ".sync-conflict-";
/// The length of `YYYYMMDD-HHMMSS-xxxxxxxx` after the mark.
const COPY_STAMP: usize = 8 + 1 + 6 + 1 + 8;

/// Where a losing version of `path` is kept: beside it, named after the time it was last
/// changed (UTC) and its last writer, before the extension so that it still opens with
/// the same program (`notes.txt` → `notes.sync-conflict-20261122-101500-1a2b3c4d.txt`).
pub fn conflict_name(path: &Path, mtime_ns: i64, writer: Replica) -> PathBuf {
    let name = path.file_name().map(OsStrExt::as_bytes).unwrap_or_default();
    // A leading dot is part of the stem (".bashrc" has no extension).
    let split = name
        .iter()
        .rposition(|&b| b == b'.')
        .filter(|&at| at > 0)
        .unwrap_or(name.len());
    let (stem, ext) = name.split_at(split);
    let secs = mtime_ns.div_euclid(1_000_000_000);
    let when = match u64::try_from(secs) {
        Ok(secs) => format_time(UNIX_EPOCH + Duration::from_secs(secs)),
        Err(_) => format_time(UNIX_EPOCH),
    };
    let mut copy = stem.to_vec();
    copy.extend_from_slice(CONFLICT_MARK.as_bytes());
    copy.extend_from_slice(format!("{when}-{}", writer_tag(writer)).as_bytes());
    copy.extend_from_slice(ext);
    path.with_file_name(OsString::from_vec(copy))
}

/// `copy` (a name [`conflict_name`] made) with a counter after its writer's tag, for a
/// second version that would get the same name (`notes.sync-conflict-…-1a2b3c4d-2.txt`).
pub fn numbered_copy(copy: &Path, counter: u32) -> PathBuf {
    let name = copy.file_name().map(OsStrExt::as_bytes).unwrap_or_default();
    let Some(at) = name
        .windows(CONFLICT_MARK.len())
        .position(|w| w == CONFLICT_MARK.as_bytes())
    else {
        return copy.to_path_buf();
    };
    let stamp_end = (at + CONFLICT_MARK.len() + COPY_STAMP).min(name.len());
    let (head, ext) = name.split_at(stamp_end);
    let mut numbered = head.to_vec();
    numbered.extend_from_slice(format!("-{counter}").as_bytes());
    numbered.extend_from_slice(ext);
    copy.with_file_name(OsString::from_vec(numbered))
}

/// How conflict copy names show a writer: the first 4 bytes of its key, in hex.
pub fn writer_tag(writer: Replica) -> String {
    format!("{:08x}", writer >> 32)
}

/// The parts of a conflict copy's file name: the original name, when the losing version
/// was written (`YYYYMMDD-HHMMSS`, UTC) and its writer's tag; `None` for other names.
pub fn parse_copy_name(name: &[u8]) -> Option<(Vec<u8>, String, String)> {
    let mark = CONFLICT_MARK.as_bytes();
    let at = name.windows(mark.len()).position(|w| w == mark)?;
    let (stem, rest) = (&name[..at], &name[at + mark.len()..]);
    // YYYYMMDD-HHMMSS-xxxxxxxx, a counter if several versions got that name, then the
    // extension if any.
    let stamp = std::str::from_utf8(rest.get(..COPY_STAMP)?).ok()?;
    let mut ext = &rest[COPY_STAMP..];
    if let Some(counted) = ext.strip_prefix(b"-") {
        let digits = counted.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        ext = &counted[digits..];
    }
    let (when, tag) = stamp.rsplit_once('-')?;
    let well_formed = when.len() == 15
        && when.bytes().enumerate().all(|(i, b)| match i {
            8 => b == b'-',
            _ => b.is_ascii_digit(),
        })
        && tag.bytes().all(|b| b.is_ascii_hexdigit());
    if !well_formed || (!ext.is_empty() && ext[0] != b'.') {
        return None;
    }
    let mut original = stem.to_vec();
    original.extend_from_slice(ext);
    Some((original, when.to_owned(), tag.to_owned()))
}

/// Whether `path` names a conflict copy.
pub fn is_conflict_copy(path: &Path) -> bool {
    path.file_name().is_some_and(|name| {
        name.as_bytes()
            .windows(CONFLICT_MARK.len())
            .any(|w| w == CONFLICT_MARK.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::FileKind;
    use crate::sync::proto::{FileData, Meta, RelPath};

    fn v(pairs: &[(u64, u64)]) -> Vector {
        Vector::from_pairs(pairs.to_vec())
    }

    fn record(mtime_ns: i64, content: &[u8], live: bool) -> FileRecord {
        FileRecord {
            kind: FileKind::File,
            size: content.len() as u64,
            mtime_ns,
            ctime_ns: 0,
            ino: 1,
            dev: 1,
            rdev: 0,
            mode: libc::S_IFREG | 0o644,
            uid: 0,
            gid: 0,
            xattr_digest: [0; 32],
            symlink_target: None,
            block_hashes: vec![*blake3::hash(content).as_bytes()],
            deleted_ns: (!live).then_some(1),
        }
    }

    fn file(version: Vector, mtime_ns: i64, content: &[u8]) -> Change {
        Change {
            seq: 1,
            path: RelPath(b"d/notes.txt".to_vec()),
            op: Op::File {
                meta: Meta {
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    mtime_ns,
                    xattrs: None,
                },
                size: content.len() as u64,
                data: FileData::Unchanged,
                blocks: vec![(0, *blake3::hash(content).as_bytes())],
            },
            version,
        }
    }

    fn removal(version: Vector) -> Change {
        Change {
            seq: 1,
            path: RelPath(b"d/notes.txt".to_vec()),
            op: Op::Remove,
            version,
        }
    }

    const PATH: &str = "d/notes.txt";

    fn judged(change: &Change, version: &Vector, record: Option<&FileRecord>) -> Verdict {
        judged_by(Rules::default(), change, version, record)
    }

    fn judged_by(
        rules: Rules,
        change: &Change,
        version: &Vector,
        record: Option<&FileRecord>,
    ) -> Verdict {
        let local = Local { version, record };
        judge(rules, change, Path::new(PATH), local, false)
    }

    #[test]
    fn newer_applies_older_and_equal_drop() {
        let here = v(&[(1, 5)]);
        let rec = record(10, b"a", true);
        let newer = file(v(&[(1, 5), (2, 1)]), 20, b"b");
        assert_eq!(
            judged(&newer, &here, Some(&rec)),
            Verdict::Apply(newer.version.clone())
        );
        assert!(matches!(
            judged(&file(v(&[(1, 4)]), 20, b"b"), &here, Some(&rec)),
            Verdict::Drop(_)
        ));
        let same = file(here.clone(), 10, b"a");
        assert!(matches!(judged(&same, &here, Some(&rec)), Verdict::Drop(_)));
        let local = Local {
            version: &here,
            record: Some(&rec),
        };
        assert!(matches!(
            judge(Rules::default(), &same, Path::new(PATH), local, true),
            Verdict::Apply(_)
        ));
    }

    #[test]
    fn concurrent_versions_tied_on_mtime_and_last_writer_still_have_one_winner() {
        // Both last written by replica 1 at the same instant, each merged with another.
        let (va, vb) = (v(&[(1, 9), (2, 3)]), v(&[(1, 9), (3, 4)]));
        let (ra, rb) = (record(100, b"text", true), record(100, b"", true));
        let on_a = judged(&file(vb.clone(), 100, b""), &va, Some(&ra));
        let on_b = judged(&file(va.clone(), 100, b"text"), &vb, Some(&rb));
        let a_keeps_both = matches!(on_a, Verdict::KeepBoth { .. });
        let b_keeps_both = matches!(on_b, Verdict::KeepBoth { .. });
        assert!(a_keeps_both != b_keeps_both, "{on_a:?} / {on_b:?}");
        assert!(matches!(on_a, Verdict::Drop(_)) != matches!(on_b, Verdict::Drop(_)));
    }

    #[test]
    fn concurrent_edits_pick_the_same_winner_on_both_sides() {
        let (va, vb) = (v(&[(1, 7), (2, 3)]), v(&[(1, 5), (2, 9)]));
        let (ra, rb) = (record(100, b"from a", true), record(200, b"from b", true));
        // On A, B's newer edit arrives: A keeps its own as a conflict copy.
        let on_a = judged(&file(vb.clone(), 200, b"from b"), &va, Some(&ra));
        let Verdict::KeepBoth { copy, version } = on_a else {
            panic!("expected keep-both, got {on_a:?}");
        };
        assert_eq!(version, va.merged(&vb));
        let name = copy.to_string_lossy().into_owned();
        assert!(
            name.starts_with("d/notes.sync-conflict-19700101-000000-") && name.ends_with(".txt"),
            "{name}"
        );
        // On B, A's older edit arrives: B's wins, nothing to do.
        let on_b = judged(&file(va.clone(), 100, b"from a"), &vb, Some(&rb));
        assert!(matches!(on_b, Verdict::Drop(_)), "{on_b:?}");
        // The same mtime: the last writer decides, still the same on both sides.
        let (ra, rb) = (record(100, b"from a", true), record(100, b"from b", true));
        let on_a = judged(&file(vb.clone(), 100, b"from b"), &va, Some(&ra));
        let on_b = judged(&file(va.clone(), 100, b"from a"), &vb, Some(&rb));
        assert!(matches!(on_a, Verdict::KeepBoth { .. }), "{on_a:?}");
        assert!(matches!(on_b, Verdict::Drop(_)), "{on_b:?}");
    }

    #[test]
    fn edits_win_over_concurrent_deletions_and_equal_content_merges() {
        let (va, vb) = (v(&[(1, 7)]), v(&[(2, 9)]));
        let live = record(100, b"kept", true);
        let gone = record(100, b"kept", false);
        assert!(matches!(
            judged(&removal(vb.clone()), &va, Some(&live)),
            Verdict::Drop(_)
        ));
        assert_eq!(
            judged(&file(vb.clone(), 50, b"edit"), &va, Some(&gone)),
            Verdict::Apply(va.merged(&vb))
        );
        assert_eq!(
            judged(&file(vb.clone(), 500, b"kept"), &va, Some(&live)),
            Verdict::Apply(va.merged(&vb))
        );
    }

    #[test]
    fn policies_choose_the_winner_and_what_is_kept() {
        let (va, vb) = (v(&[(1, 7), (2, 3)]), v(&[(1, 5), (2, 9)]));
        let (ra, rb) = (record(100, b"from a", true), record(200, b"from b", true));
        let newest = Rules {
            policy: Policy::NewestWins,
            deletions_win: false,
        };
        assert_eq!(
            judged_by(newest, &file(vb.clone(), 200, b"from b"), &va, Some(&ra)),
            Verdict::Apply(va.merged(&vb))
        );
        // Node 1 (A, the older edit) is preferred: A's version wins on both sides.
        let prefer_a = Rules {
            policy: Policy::PreferNode(1),
            deletions_win: false,
        };
        assert!(matches!(
            judged_by(prefer_a, &file(vb.clone(), 200, b"from b"), &va, Some(&ra)),
            Verdict::Drop(_)
        ));
        assert_eq!(
            judged_by(prefer_a, &file(va.clone(), 100, b"from a"), &vb, Some(&rb)),
            Verdict::Apply(va.merged(&vb))
        );
        let merge = Rules {
            policy: Policy::Merge,
            deletions_win: false,
        };
        assert!(matches!(
            judged_by(merge, &file(vb.clone(), 200, b"from b"), &va, Some(&ra)),
            Verdict::Merge {
                theirs_wins: true,
                ..
            }
        ));
        let deletions = Rules {
            policy: Policy::KeepBoth,
            deletions_win: true,
        };
        let gone = record(100, b"from a", false);
        assert_eq!(
            judged_by(deletions, &removal(vb.clone()), &va, Some(&ra)),
            Verdict::Apply(va.merged(&vb))
        );
        assert!(matches!(
            judged_by(deletions, &file(vb.clone(), 200, b"b"), &va, Some(&gone)),
            Verdict::Drop(_)
        ));
    }

    #[test]
    fn conflict_names_keep_the_extension_and_are_recognised() {
        let at = 1_795_000_000_000_000_000;
        let copy = conflict_name(Path::new("a/b/report.final.pdf"), at, 0x1a2b_3c4d_0000_0000);
        assert_eq!(
            copy,
            Path::new("a/b/report.final.sync-conflict-20261118-110640-1a2b3c4d.pdf")
        );
        assert!(is_conflict_copy(&copy));
        let name = copy.file_name().unwrap().as_bytes();
        assert_eq!(
            parse_copy_name(name),
            Some((
                b"report.final.pdf".to_vec(),
                "20261118-110640".to_owned(),
                "1a2b3c4d".to_owned()
            ))
        );
        assert_eq!(parse_copy_name(b"report.pdf"), None);
        assert_eq!(
            parse_copy_name(b"a.sync-conflict-2026x118-110640-1a2b3c4d"),
            None
        );
        assert!(!is_conflict_copy(Path::new("a/b/report.final.pdf")));
        let hidden = conflict_name(Path::new(".bashrc"), at, 1);
        assert_eq!(
            hidden,
            Path::new(".bashrc.sync-conflict-20261118-110640-00000000")
        );
        // A second version with the same name gets a counter, and is still recognised.
        let second = numbered_copy(&copy, 2);
        assert_eq!(
            second,
            Path::new("a/b/report.final.sync-conflict-20261118-110640-1a2b3c4d-2.pdf")
        );
        assert_eq!(
            parse_copy_name(second.file_name().unwrap().as_bytes()),
            Some((
                b"report.final.pdf".to_vec(),
                "20261118-110640".to_owned(),
                "1a2b3c4d".to_owned()
            ))
        );
        assert_eq!(
            numbered_copy(&hidden, 3),
            Path::new(".bashrc.sync-conflict-20261118-110640-00000000-3")
        );
        assert_eq!(
            parse_copy_name(b"a.sync-conflict-20261118-110640-1a2b3c4d-.txt"),
            None
        );
    }
}
