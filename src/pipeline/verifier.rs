//! The verifier actor: checks everything a peer sent before anything touches the disk.
//! Paths must stay inside the folder (no `..`, not absolute), listing names must be plain
//! names, compressed data must decompress to exactly its announced size within the limits.
//! A peer that sends anything else is disconnected: the transport already proved who it
//! is, so a bad message means a bug or a hostile peer, and nothing of it is applied.

use std::error::Error;
use std::time::Duration;

use steady_state::*;

use super::session::Incoming;
use crate::sync::compress::decompress_change;
use crate::sync::proto::{Message, Op};
use crate::sync::safe_path;

/// A message that passed the checks, or why one did not.
#[derive(Debug)]
pub enum Checked {
    Valid(Incoming),
    Rejected {
        peer: crate::identity::NodeId,
        reason: String,
    },
}

pub async fn run(
    actor: SteadyActorShadow,
    incoming: SteadyRx<Incoming>,
    checked: SteadyTx<Checked>,
) -> Result<(), Box<dyn Error>> {
    let actor = actor.into_spotlight([&incoming], [&checked]);
    verify(actor, incoming, checked).await
}

async fn verify<A: SteadyActor>(
    mut actor: A,
    incoming: SteadyRx<Incoming>,
    checked: SteadyTx<Checked>,
) -> Result<(), Box<dyn Error>> {
    let mut incoming = incoming.acquire_guard().await;
    let mut checked = checked.acquire_guard().await;
    let idle_wait = Duration::from_millis(100);
    while actor.is_running(|| incoming.is_closed_and_empty() && checked.mark_closed()) {
        let _woken = await_for_any!(
            actor.wait_avail(&mut incoming, 1),
            actor.wait_timeout(idle_wait)
        );
        while let Some(item) = actor.try_take(&mut incoming) {
            tracing::trace!("verifying");
            let peer = item.from;
            let result = match check(item) {
                Ok(item) => Checked::Valid(item),
                Err(reason) => {
                    tracing::warn!("refusing a message from peer {peer}: {reason}");
                    Checked::Rejected { peer, reason }
                }
            };
            actor
                .send_async(&mut checked, result, SendSaturation::AwaitForRoom)
                .await;
        }
    }
    Ok(())
}

/// The message made ready for the applier (data decompressed), or why it is refused.
pub fn check(mut item: Incoming) -> Result<Incoming, String> {
    match &mut item.message {
        Message::Change(change) => {
            safe_path::checked(&change.path).map_err(|err| err.to_string())?;
            match &change.op {
                Op::Rename { to, .. } => {
                    safe_path::checked(to).map_err(|err| err.to_string())?;
                }
                Op::Link { existing } => {
                    safe_path::checked(existing).map_err(|err| err.to_string())?;
                }
                _ => {}
            }
            decompress_change(change).map_err(|err| err.to_string())?;
        }
        Message::Listing { dir, entries } => {
            checked_dir(dir)?;
            if let Some(entry) = entries.iter().find(|entry| !is_plain_name(&entry.name)) {
                return Err(format!(
                    "listing entry {:?} is not a plain file name",
                    String::from_utf8_lossy(&entry.name)
                ));
            }
        }
        Message::Summary(dirs) => {
            for digest in dirs.iter() {
                checked_dir(&digest.dir)?;
            }
        }
        Message::CaughtUp => {}
        other => return Err(format!("unexpected message {}", message_name(other))),
    }
    Ok(item)
}

/// A directory a peer names: the folder itself (empty) or a checked path below it.
pub fn checked_dir(dir: &crate::sync::proto::RelPath) -> Result<(), String> {
    if dir.0.is_empty() {
        return Ok(());
    }
    safe_path::checked(dir)
        .map(drop)
        .map_err(|err| err.to_string())
}

fn is_plain_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

fn message_name(message: &Message) -> &'static str {
    match message {
        Message::Hello(_) => "hello",
        Message::Keepalive => "keepalive",
        Message::Summary(_) => "summary",
        Message::WantDirs(_) => "want-dirs",
        Message::Listing { .. } => "listing",
        Message::WantFiles(_) => "want-files",
        Message::CaughtUp => "caught-up",
        Message::Change(_) => "change",
        Message::Ack { .. } => "ack",
        Message::Error(_) => "error",
        Message::Reach(_) => "rendezvous",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeKey;
    use crate::sync::proto::{Change, Codec, Entry, EntryKind, FileData, Meta, Payload, RelPath};

    fn from_peer(message: Message) -> Incoming {
        Incoming {
            from: NodeKey::generate().id(),
            message,
        }
    }

    fn change(path: &str, op: Op) -> Message {
        Message::Change(Change {
            seq: 1,
            path: RelPath(path.as_bytes().to_vec()),
            op,
            version: Default::default(),
        })
    }

    fn file(bytes: Payload) -> Op {
        Op::File {
            meta: Meta {
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime_ns: 0,
                xattrs: None,
            },
            size: 3,
            data: FileData::Whole {
                offset: 0,
                data: bytes,
                last: true,
            },
            blocks: Vec::new(),
        }
    }

    fn raw() -> Payload {
        Payload {
            codec: Codec::Raw,
            raw_len: 3,
            bytes: b"abc".to_vec(),
        }
    }

    #[test]
    fn paths_that_leave_the_folder_are_refused() {
        for path in ["../x", "/etc/passwd", "a/../../b", "", "a//b"] {
            assert!(
                check(from_peer(change(path, Op::Remove))).is_err(),
                "{path:?}"
            );
        }
        let rename = Op::Rename {
            to: RelPath(b"../outside".to_vec()),
            exchange: false,
        };
        assert!(check(from_peer(change("a", rename))).is_err());
        let link = Op::Link {
            existing: RelPath(b"/etc/shadow".to_vec()),
        };
        assert!(check(from_peer(change("a", link))).is_err());
        assert!(check(from_peer(change("a/b.txt", file(raw())))).is_ok());
    }

    #[test]
    fn listings_hold_plain_names_only() {
        let listing = |name: &[u8]| Message::Listing {
            dir: RelPath(Vec::new()),
            entries: vec![Entry {
                name: name.to_vec(),
                kind: EntryKind::File,
                size: 0,
                mtime_ns: 0,
                mode: 0o644,
                content: [0; 32],
                version: Default::default(),
                deleted: false,
            }],
        };
        for name in [&b"a/b"[..], b"..", b".", b"", b"x\0y"] {
            assert!(check(from_peer(listing(name))).is_err(), "{name:?}");
        }
        assert!(check(from_peer(listing(b"fine.txt"))).is_ok());
    }

    #[test]
    fn data_that_does_not_decompress_to_its_size_is_refused() {
        let lying = Payload {
            codec: Codec::Zstd,
            raw_len: 3,
            bytes: b"not zstd".to_vec(),
        };
        assert!(check(from_peer(change("f", file(lying)))).is_err());
        let oversized = Payload {
            codec: Codec::Raw,
            raw_len: 4,
            bytes: b"abc".to_vec(),
        };
        assert!(check(from_peer(change("f", file(oversized)))).is_err());
    }

    #[test]
    fn messages_that_belong_to_the_session_are_refused_here() {
        assert!(check(from_peer(Message::Keepalive)).is_err());
        assert!(check(from_peer(Message::Ack { seq: 1 })).is_err());
    }
}
