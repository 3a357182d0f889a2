//! Node identity: each node owns a static X25519 key pair, and its public key is its ID.
//!
//! The key file holds the 32 raw bytes of the private key and nothing else. It is a
//! secret, so it is refused unless it belongs to the user reading it and no one else may
//! read or write it (mode 0600 or stricter). A new key is written atomically (temp file,
//! fsync, rename or link), so a crash never leaves a half-written key behind.
//!
//! A [`NodeId`] is printed like a Syncthing device ID: base32 (RFC 4648 alphabet) of the
//! public key followed by a 3-byte check code, 56 characters in 8 dash-separated groups of
//! 7. The check code is a BLAKE3 hash of the key, so a mistyped or truncated ID is
//! detected when it is parsed instead of becoming a peer that can never connect.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use x25519_dalek::{PublicKey, StaticSecret};

/// Where `filesync keygen` and the daemon keep the node key unless told otherwise.
pub const DEFAULT_KEY_PATH: &str = "/etc/filesync/node.key";

/// Length of a key file: the raw private key.
const KEY_FILE_LEN: usize = 32;
/// Bytes of check code appended to the public key in a printed ID.
const CHECK_LEN: usize = 3;
/// Characters in a printed ID without dashes: base32 of 35 bytes, no padding needed.
const ID_CHARS: usize = (32 + CHECK_LEN) * 8 / 5;
const GROUP_LEN: usize = 7;
/// Domain separation for the check code, so it is not a bare hash of the key.
const CHECK_CONTEXT: &[u8] = b"filesync node id check v1";

/// A node's public identity: its X25519 public key.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct NodeId([u8; 32]);

impl NodeId {
    pub fn from_bytes(bytes: [u8; 32]) -> NodeId {
        NodeId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first group of the printed ID: enough to tell nodes apart in logs.
    pub fn short(&self) -> String {
        self.to_string().chars().take(GROUP_LEN).collect()
    }

    fn check_code(&self) -> [u8; CHECK_LEN] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(CHECK_CONTEXT);
        hasher.update(&self.0);
        let hash = hasher.finalize();
        let mut code = [0; CHECK_LEN];
        code.copy_from_slice(&hash.as_bytes()[..CHECK_LEN]);
        code
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = [0u8; 32 + CHECK_LEN];
        raw[..32].copy_from_slice(&self.0);
        raw[32..].copy_from_slice(&self.check_code());
        let text = data_encoding::BASE32_NOPAD.encode(&raw);
        for (index, group) in text.as_bytes().chunks(GROUP_LEN).enumerate() {
            if index > 0 {
                f.write_str("-")?;
            }
            // Base32 output is ASCII.
            f.write_str(std::str::from_utf8(group).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({}…)", self.short())
    }
}

/// Why a text is not a node ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    #[error(
        "node ID '{text}' has {found} letters and digits, not {ID_CHARS}: copy the whole ID \
         from `filesync id` on that node"
    )]
    Length { text: String, found: usize },
    #[error(
        "node ID '{text}' contains '{found}', which never occurs in IDs (they use A-Z and 2-7): \
         check it for typos"
    )]
    Character { text: String, found: char },
    #[error(
        "node ID '{text}' fails its check code, so it has a typo: copy it again from \
         `filesync id` on that node"
    )]
    Checksum { text: String },
}

impl FromStr for NodeId {
    type Err = NodeIdError;

    fn from_str(text: &str) -> Result<NodeId, NodeIdError> {
        let shown = text.trim().to_owned();
        let compact: String = text
            .chars()
            .filter(|c| *c != '-' && !c.is_whitespace())
            .map(|c| c.to_ascii_uppercase())
            .collect();
        if let Some(found) = compact
            .chars()
            .find(|c| !matches!(c, 'A'..='Z' | '2'..='7'))
        {
            return Err(NodeIdError::Character { text: shown, found });
        }
        if compact.len() != ID_CHARS {
            return Err(NodeIdError::Length {
                text: shown,
                found: compact.len(),
            });
        }
        let raw = data_encoding::BASE32_NOPAD
            .decode(compact.as_bytes())
            .map_err(|_| NodeIdError::Checksum {
                text: shown.clone(),
            })?;
        let (key, check) = raw.split_at(raw.len().min(32));
        let key: [u8; 32] = key.try_into().map_err(|_| NodeIdError::Checksum {
            text: shown.clone(),
        })?;
        let id = NodeId(key);
        if check != id.check_code() {
            return Err(NodeIdError::Checksum { text: shown });
        }
        Ok(id)
    }
}

/// Why a key file cannot be used or written.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no node key at {path}: create one with `filesync keygen --key {path}`", path = .path.display())]
    Missing { path: PathBuf },
    #[error("cannot read node key {path}: {source}", path = .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("node key {path} is not a regular file: point --key at the key file", path = .path.display())]
    NotAFile { path: PathBuf },
    #[error(
        "node key {path} may be read or changed by other users (mode {mode:04o}): run `chmod 600 {path}`",
        path = .path.display()
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error(
        "node key {path} belongs to uid {owner}, not to this user (uid {uid}): run `chown {uid} {path}` or use a key of your own",
        path = .path.display()
    )]
    WrongOwner { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "node key {path} holds {len} bytes, not {KEY_FILE_LEN}, so it is not a filesync key: make a new one with `filesync keygen --force --key {path}`",
        path = .path.display()
    )]
    WrongSize { path: PathBuf, len: u64 },
    #[error(
        "node key {path} already exists: keep it, or pass --force to replace it (the node then gets a new ID that its peers must learn)",
        path = .path.display()
    )]
    Exists { path: PathBuf },
    #[error("cannot write node key {path}: {source}", path = .path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// This node's static key pair.
pub struct NodeKey {
    secret: StaticSecret,
    id: NodeId,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl NodeKey {
    /// A new random key from the operating system's generator.
    pub fn generate() -> NodeKey {
        NodeKey::from_secret(StaticSecret::random())
    }

    /// The key with these private bytes (as stored in a key file).
    pub fn from_private_bytes(bytes: [u8; 32]) -> NodeKey {
        NodeKey::from_secret(StaticSecret::from(bytes))
    }

    fn from_secret(secret: StaticSecret) -> NodeKey {
        let id = NodeId(PublicKey::from(&secret).to_bytes());
        NodeKey { secret, id }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The private key, for the Noise handshake (and nothing else: it is the node's secret).
    pub fn private_bytes(&self) -> &[u8; 32] {
        self.secret.as_bytes()
    }

    /// Reads a key file, refusing one that others could read or change, that belongs to
    /// someone else, or that does not hold exactly one key.
    pub fn load(path: &Path) -> Result<NodeKey, IdentityError> {
        let read_error = |source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                IdentityError::Missing {
                    path: path.to_owned(),
                }
            } else {
                IdentityError::Read {
                    path: path.to_owned(),
                    source,
                }
            }
        };
        let mut file = File::open(path).map_err(read_error)?;
        // Checked on the open descriptor, so the file cannot be swapped after the check.
        let meta = file.metadata().map_err(read_error)?;
        if !meta.is_file() {
            return Err(IdentityError::NotAFile {
                path: path.to_owned(),
            });
        }
        let uid = rustix::process::geteuid().as_raw();
        if meta.uid() != uid {
            return Err(IdentityError::WrongOwner {
                path: path.to_owned(),
                owner: meta.uid(),
                uid,
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::TooOpen {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() != KEY_FILE_LEN as u64 {
            return Err(IdentityError::WrongSize {
                path: path.to_owned(),
                len: meta.len(),
            });
        }
        let mut bytes = [0u8; KEY_FILE_LEN];
        file.read_exact(&mut bytes).map_err(read_error)?;
        Ok(NodeKey::from_private_bytes(bytes))
    }

    /// Makes a new key and writes it to `path` (mode 0600; a missing parent folder is
    /// created with mode 0700). An existing file is replaced only with `force`.
    pub fn create(path: &Path, force: bool) -> Result<NodeKey, IdentityError> {
        let write_error = |source: io::Error| IdentityError::Write {
            path: path.to_owned(),
            source,
        };
        if !force && fs::symlink_metadata(path).is_ok() {
            return Err(IdentityError::Exists {
                path: path.to_owned(),
            });
        }
        let folder = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&folder)
            .map_err(write_error)?;
        let key = NodeKey::generate();
        let temp = folder.join(format!(
            ".node-key-{}-{:016x}.tmp",
            std::process::id(),
            fastrand::u64(..)
        ));
        let written = write_key_file(&temp, key.private_bytes()).and_then(|()| {
            if force {
                fs::rename(&temp, path)
            } else {
                // A link fails if the name exists, so a key that appeared meanwhile is kept.
                fs::hard_link(&temp, path).and_then(|()| fs::remove_file(&temp))
            }
        });
        if let Err(source) = written {
            let _ = fs::remove_file(&temp);
            if source.kind() == io::ErrorKind::AlreadyExists {
                return Err(IdentityError::Exists {
                    path: path.to_owned(),
                });
            }
            return Err(write_error(source));
        }
        File::open(&folder)
            .and_then(|dir| dir.sync_all())
            .map_err(write_error)?;
        Ok(key)
    }
}

fn write_key_file(temp: &Path, secret: &[u8; 32]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(temp)?;
    file.write_all(secret)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_prints_as_groups_and_parses_back() {
        let id = NodeKey::generate().id();
        let text = id.to_string();
        assert_eq!(text.len(), ID_CHARS + ID_CHARS / GROUP_LEN - 1);
        assert_eq!(text.split('-').count(), ID_CHARS / GROUP_LEN);
        assert_eq!(text.parse::<NodeId>(), Ok(id));
        // Case and dashes do not matter when typing an ID.
        assert_eq!(
            text.replace('-', "").to_lowercase().parse::<NodeId>(),
            Ok(id)
        );
    }

    #[test]
    fn every_single_character_typo_is_detected() {
        // A fixed key keeps the test deterministic.
        let text = NodeKey::from_private_bytes([7; 32]).id().to_string();
        for (index, original) in text.char_indices().filter(|(_, c)| *c != '-') {
            let typo = if original == 'A' { 'B' } else { 'A' };
            let mut changed = text.clone();
            changed.replace_range(index..index + 1, &typo.to_string());
            assert!(
                matches!(changed.parse::<NodeId>(), Err(NodeIdError::Checksum { .. })),
                "typo at {index} not detected"
            );
        }
    }

    #[test]
    fn wrong_characters_and_lengths_are_named() {
        let text = NodeKey::generate().id().to_string();
        let with_zero = text.replacen(|c: char| c.is_ascii_alphabetic(), "0", 1);
        assert!(matches!(
            with_zero.parse::<NodeId>(),
            Err(NodeIdError::Character { found: '0', .. })
        ));
        let short = &text[..text.len() - 1];
        assert!(matches!(
            short.parse::<NodeId>(),
            Err(NodeIdError::Length { found, .. }) if found == ID_CHARS - 1
        ));
    }

    #[test]
    fn debug_shows_only_a_prefix() {
        let key = NodeKey::generate();
        let debug = format!("{key:?}");
        assert!(debug.contains(&key.id().short()));
        assert!(!debug.contains(&key.id().to_string()));
    }
}
