//! The configuration of a mount: mount options, settings file, environment and defaults,
//! merged with a fixed precedence into one [`Settings`].
//!
//! # Precedence
//!
//! For every key the first source that gives it wins:
//!
//! 1. mount options (`-o a=b,c`, several `-o` flags are merged, a later value wins);
//! 2. the settings file (TOML);
//! 3. the environment (only the three variables below);
//! 4. the built-in defaults.
//!
//! Every source is checked with the same rules, even when a higher source overrides it, so a
//! stray invalid value is reported instead of lying in wait. Errors name where the value came
//! from: `mount option 'x'`, `settings key '[section].key' in FILE` or
//! `environment variable 'NAME'`.
//!
//! # Which settings file is read
//!
//! - `--config PATH` on the command line, if given. It must exist.
//! - Otherwise the mount option `config=PATH` (an absolute path). It must exist.
//! - Otherwise [`DEFAULT_CONFIG_PATH`] (`/etc/filesync/filesync.toml`). It may be missing; if it
//!   exists it must be readable and valid.
//!
//! Unknown sections and unknown keys in the file are errors, so a typo is never silently ignored.
//!
//! # Keys
//!
//! | mount option | settings key | environment | accepted values | default |
//! |---|---|---|---|---|
//! | `node_id=ID` | `[node] id` | `FILESYNCH_NODE_ID` | 1 to 64 characters from `A-Z a-z 0-9 _ -` | the first 16 characters of `/etc/machine-id`, else the node name lowercased with other characters replaced by `-` |
//! | `node_name=NAME` | `[node] name` | `FILESYNCH_NODE_NAME` | 1 to 64 printable characters without `/` | the host name, else `filesync` |
//! | `sync_interval=SECONDS` | `[sync] interval` | `FILESYNCH_SYNC_INTERVAL` | whole seconds 0 to 86400; 0 disables the periodic scan | 60 |
//! | `allow_other` | `[mount] allow_other` | | `true` / `false` (the option takes no value) | false |
//! | `ro`, `rw` | `[mount] read_only` | | `true` / `false` (the options take no value) | false |
//! | `passthrough=on\|off` | `[mount] passthrough` | | `on`/`off`, `true`/`false`, `yes`/`no`, `1`/`0` | on |
//! | `threads=N` | `[mount] threads` | | 1 to 64 | the number of CPUs, clamped to 2 to 16 |
//! | `log=FILTER` | `[mount] log` | | a `tracing` filter such as `info` or `filesync=debug` | `info` |
//! | `log_file=PATH` | `[mount] log_file` | | an absolute path | none (log to standard error) |
//! | `state_dir=PATH` | `[mount] state_dir` | | an absolute path: where the mount keeps its index and other state | chosen at mount time: `/var/lib/filesync/<mount>` when mounted by root |
//! | `watcher=KIND` | `[capture] watcher` | | `auto`, `ebpf`, `fanotify`, `inotify` or `scan` (no live watcher, only the periodic scan); `auto` tries eBPF, then fanotify, then inotify | `auto` |
//! | `debounce_us=N` | `[capture] debounce_us` | | whole microseconds 0 to 1000000: how long the coalescer waits for more changes to a file before passing its update on; 0 does not wait | 1000 (1 ms) |
//! | `telemetry=off\|ADDRESS:PORT` | `[telemetry] listen` | | `off`, or an IP address and a port from 1 to 65535 (`127.0.0.1:9900`, `[::1]:9900`) where the telemetry page is served. The default binds it to localhost only; any other address (such as `0.0.0.0:9900`) is accepted but exposes the page to everyone who can reach that address | `127.0.0.1:9900` |
//! | `metrics=off\|ADDRESS:PORT` | `[metrics] listen` | | `off`, or an IP address and a port from 1 to 65535 where Prometheus text is served at `/metrics` (for example `127.0.0.1:9901`). Use a loopback address unless the scraper runs elsewhere: any other address exposes the figures to everyone who can reach it | `off` |
//! | `peer=ID[@HOST:PORT]` | `[replication] peers` (a list of the same strings) | | a node ID as `filesync id` prints it, optionally with the address to dial; may be given several times, peers from every source are combined | none |
//! | `listen=ADDRESS:PORT` | `[replication] listen` | | `off`, or an IP address and port where peers may connect (`0.0.0.0:7878` for every interface) | `off` |
//! | `mode=MODE` | `[replication] mode` | | `sendreceive`, `sendonly` or `receiveonly` (local writes through the mount fail with `EROFS`) | `sendreceive` |
//! | `durability=LEVEL` | `[replication] durability` | | `async` (an `fsync` returns once local data is durable) or `sync` (also waits until every connected peer has it durably) | `async` |
//! | `key=PATH` | `[replication] key` | | an absolute path to this node's key (`filesync keygen`) | `/etc/filesync/node.key` |
//! | `compression=LEVEL` | `[replication] compression` | | `off` or a zstd level from 1 to 19 | 3 |
//! | `keep_versions=DAYS` | `[replication] keep_versions` | | `off`, or how many days to keep what a peer's change replaced or removed (`filesync versions`), 1 to 36500 | 30 |
//! | `conflicts=POLICY` | `[replication] conflicts` | | how concurrent edits of one file are resolved, the same on every node: `keep-both` (the newer mtime wins, the other is kept beside it as `name.sync-conflict-YYYYMMDD-HHMMSS-<writer>.ext`), `newest-wins` (the other is only kept in the versions, `filesync versions`), `prefer-node=ID` (that node's edit wins, else the newer; the other is kept in the versions) or `merge` (text files edited in different places are merged three-way; otherwise keep-both). Give every node the same policy | `keep-both` |
//! | `deletions=RULE` | `[replication] deletions` | | `edit-wins` (a file edited on one node while deleted on another is restored everywhere) or `delete-wins` | `edit-wins` |
//! | `stun=HOST:PORT` | `[replication] stun` (a list of the same strings) | | a STUN server (`filesync stun-server` or any public one) that tells this node its public address and NAT type; may be given several times, servers from every source are combined; two servers at different addresses are needed to tell the NAT type | none |
//! | `rendezvous=ID@HOST:PORT` | `[replication] rendezvous` | | a node every peer can reach (`filesync rendezvous`): it introduces this node to peers given without an address, so they punch through their NATs to each other or, failing that, relays their encrypted bytes. The ID is checked in the handshake | none |
//! | `upgrade_interval=SECONDS` | `[replication] upgrade_interval` | | while a peer is reached through the rendezvous's relay, how often a direct path (a hole punch) is tried again; whole seconds 0 to 86400, 0 never tries again | 60 |
//! | `config=PATH` | | | an absolute path | see above |
//!
//! An empty environment variable counts as unset. In the settings file a value may be written as
//! a TOML string with the same text a mount option takes (`interval = "60"`,
//! `passthrough = "on"`), or in its natural TOML type (`interval = 60`, `passthrough = true`).
//!
//! ```toml
//! [node]
//! id = "laptop-1"
//! name = "laptop"
//!
//! [sync]
//! interval = 60          # seconds
//!
//! [mount]
//! allow_other = false
//! read_only = false
//! passthrough = true
//! threads = 4
//! log = "info"
//! log_file = "/var/log/filesync/data.log"
//! state_dir = "/var/lib/filesync/data"
//!
//! [capture]
//! watcher = "auto"       # or "ebpf", "fanotify", "inotify", "scan"
//! debounce_us = 1000     # microseconds
//!
//! [telemetry]
//! listen = "127.0.0.1:9900"  # or "off"
//!
//! [metrics]
//! listen = "127.0.0.1:9901"  # default "off"
//!
//! [replication]
//! peers = ["7QJVEH5-UEI5XBM-3ZCWMDW-EXAMPLE@10.0.0.2:7878"]  # IDs from `filesync id`
//! listen = "off"             # or "0.0.0.0:7878"
//! mode = "sendreceive"       # or "sendonly", "receiveonly"
//! durability = "async"       # or "sync"
//! key = "/etc/filesync/node.key"
//! compression = 3            # zstd level, or "off"
//! keep_versions = 30         # days, or "off"
//! conflicts = "keep-both"    # or "newest-wins", "prefer-node=ID", "merge"
//! deletions = "edit-wins"    # or "delete-wins"
//! stun = ["stun.example.org:3478", "198.18.0.3:3478"]  # STUN servers for NAT discovery
//! rendezvous = "ID@rendezvous.example.org:7879"  # reaches peers behind NATs
//! upgrade_interval = 60      # seconds between tries to replace a relay by a direct path
//! ```
//!
//! # Mount options
//!
//! Options are separated by commas; empty items (`a,,b`) are ignored and a later option wins
//! over an earlier one. A value that itself contains commas, such as a log filter with several
//! directives, is written in double quotes as mount(8) does it: `log="filesync=debug,fuser=warn"`.
//! A flag given a value (`allow_other=3`) or an option missing its value (`node_name`,
//! `node_name=`) is an error.
//!
//! The standard kernel flags are passed on to the mount: `ro`, `rw`, `dev`, `nodev`, `suid`,
//! `nosuid`, `exec`, `noexec`, `atime`, `noatime`, `sync`, `async`, `dirsync` (FUSE mounts
//! default to `nodev,nosuid`). `relatime` is the kernel's default and accepted; `norelatime`,
//! `strictatime`, `nodiratime`, `diratime` and `lazytime` cannot be expressed by the FUSE mount
//! call and are refused. The other standard options that mount(8), mount.fuse and fstab pass
//! are accepted and ignored: `defaults`, `auto`, `noauto`, `user`, `users`, `nouser`, `owner`,
//! `group`, `nofail`, `_netdev`, `default_permissions` (always enforced anyway), `user=NAME`,
//! `comment=…`, `fsname=…`, `subtype=…` and anything starting with `x-` or `X-` (such as
//! `x-systemd.automount`). Every other option is an error.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::capture::WatcherKind;

/// The settings file read when neither `--config` nor `config=` names one; it may be missing,
/// so that a mount works without any file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/filesync/filesync.toml";

/// Environment variable for the node id, the documented product name.
const ENV_NODE_ID: &str = "FILESYNCH_NODE_ID";
/// Environment variable for the node name.
const ENV_NODE_NAME: &str = "FILESYNCH_NODE_NAME";
/// Environment variable for the periodic scan interval in seconds.
const ENV_SYNC_INTERVAL: &str = "FILESYNCH_SYNC_INTERVAL";

/// Our own mount options, listed in the error for an unknown option so the user sees the choice.
const ACCEPTED_OPTIONS: &str = "node_id, node_name, sync_interval, allow_other, ro, rw, \
     passthrough, threads, log, log_file, state_dir, watcher, debounce_us, telemetry, metrics, \
     peer, listen, mode, durability, key, compression, keep_versions, conflicts, deletions, stun, \
     rendezvous, upgrade_interval, config";

/// Standard value-less options of mount(8), mount.fuse and fstab that we accept and ignore,
/// so that an fstab line or a systemd mount unit works unchanged.
const IGNORED_FLAGS: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "nofail",
    "_netdev",
    "relatime",
    "default_permissions",
];

/// Access-time variants the FUSE mount call cannot express; refused rather than ignored so
/// an fstab line never gets a mount that differs from what it asks for.
const UNSUPPORTED_FLAGS: &[&str] = &[
    "norelatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "lazytime",
];

/// Standard options that carry a value we ignore (`user=NAME` is what mount(8) passes for a
/// user mount).
const IGNORED_WITH_VALUE: &[&str] = &["comment", "fsname", "subtype", "user"];

/// The largest `sync_interval`: one day, beyond which a periodic scan is pointless.
const MAX_SYNC_INTERVAL_SECS: u64 = 86_400;
/// The largest worker thread count; more only adds contention on the backing folder.
const MAX_THREADS: usize = 64;
/// The longest `debounce_us`: one second, beyond which updates would lag visibly.
const MAX_DEBOUNCE_MICROS: u64 = 1_000_000;
/// The debounce when none is given: long enough to merge the writes of one burst, short
/// enough not to be noticed.
const DEFAULT_DEBOUNCE: Duration = Duration::from_micros(1_000);
/// Where the telemetry page is served when no address is given: localhost only, so the page
/// is not exposed unless the user asks for it.
const DEFAULT_TELEMETRY: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9_900));
/// The longest node id and node name, so they fit in file names and protocol headers.
const MAX_NAME_CHARS: usize = 64;
/// Where the default node id comes from.
const MACHINE_ID_PATH: &str = "/etc/machine-id";
/// How many characters of the machine id make the default node id: short, yet unique enough.
const MACHINE_ID_CHARS: usize = 16;

const EXPECT_NODE_ID: &str = "a string of 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'";
const EXPECT_NODE_NAME: &str = "a string of 1 to 64 printable characters without '/'";
const EXPECT_SECONDS: &str = "whole seconds from 0 to 86400 (0 disables the periodic scan)";
const EXPECT_THREADS: &str = "a whole number from 1 to 64";
const EXPECT_SWITCH: &str = "on or off (also true/false, yes/no, 1/0)";
const EXPECT_LOG: &str = "a tracing filter such as 'info' or 'filesync=debug'";
const EXPECT_PATH: &str = "an absolute path (one starting with '/')";
const EXPECT_WATCHER: &str = "auto, ebpf, fanotify, inotify or scan";
const EXPECT_DEBOUNCE: &str = "whole microseconds from 0 to 1000000";
const EXPECT_PEER: &str = "a node ID as 'filesync id' prints it, optionally followed by \
     @HOST:PORT, such as ID@10.0.0.2:7878";
const EXPECT_LISTEN: &str = "off, or an IP address and a port from 1 to 65535 such as \
     0.0.0.0:7878 or 127.0.0.1:7878";
const EXPECT_MODE: &str = "sendreceive, sendonly or receiveonly";
const EXPECT_CONFLICTS: &str =
    "keep-both, newest-wins, prefer-node=ID (a node ID as `filesync id` prints it) or merge";
const EXPECT_DELETIONS: &str = "edit-wins or delete-wins";
const EXPECT_DURABILITY: &str = "async or sync";
const EXPECT_COMPRESSION: &str = "off or a zstd level from 1 to 19";
const EXPECT_KEEP_VERSIONS: &str = "off or a number of days from 1 to 36500";
const EXPECT_RENDEZVOUS: &str = "a node ID as 'filesync id' prints it, then @HOST:PORT, such \
     as ID@198.18.0.1:7879";
const EXPECT_STUN: &str = "a STUN server as HOST:PORT, such as stun.example.org:3478 or \
     198.18.0.1:3478";
/// Where the node key is when none is named.
pub const DEFAULT_KEY_PATH: &str = "/etc/filesync/node.key";
/// How often a relayed peer is tried directly again, when not set.
const DEFAULT_UPGRADE_INTERVAL: Duration = Duration::from_secs(60);
/// The zstd level when none is given: fast, and most of the gain.
const DEFAULT_COMPRESSION: i32 = 3;
/// Days versions are kept unless configured otherwise: a month.
const DEFAULT_KEEP_VERSIONS_DAYS: u32 = 30;
const EXPECT_METRICS: &str = "off, or an IP address and a port from 1 to 65535 such as \
     127.0.0.1:9901 or [::1]:9901";
const EXPECT_TELEMETRY: &str = "off, or an IP address and a port from 1 to 65535 such as \
     127.0.0.1:9900 or [::1]:9900";

/// Why the configuration of a mount could not be built. Each message is one line that names the
/// offending option, key or file and says what would be accepted, because it is shown to the
/// person who typed the mount command or wrote the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An `-o` option we do not know; rejected so a typo does not silently do nothing.
    #[error(
        "unknown mount option '{option}': accepted options are {ACCEPTED_OPTIONS} and the \
         standard mount(8) options (see 'filesync mount --help')"
    )]
    UnknownOption {
        /// The option as written, value included.
        option: String,
    },
    /// A standard option the FUSE mount call cannot honour.
    #[error(
        "mount option '{option}' is not supported by filesync mounts: remove it (atime, \
         noatime and the default relatime are)"
    )]
    UnsupportedOption {
        /// The option as written.
        option: String,
    },
    /// A flag option written with a value, whose meaning would be unclear.
    #[error(
        "mount option '{name}' takes no value but was given as '{option}': write just '{name}'"
    )]
    UnexpectedValue {
        /// The option name.
        name: String,
        /// The option as written.
        option: String,
    },
    /// An option that needs a value written without one (or with an empty one).
    #[error("mount option '{name}' needs a value: write it as '{name}={placeholder}'")]
    MissingValue {
        /// The option name.
        name: String,
        /// What the value looks like, e.g. `SECONDS`.
        placeholder: &'static str,
    },
    /// A double quote in the `-o` string that is never closed.
    #[error(
        "unterminated double quote in mount options '{options}': close the quote after the value"
    )]
    UnterminatedQuote {
        /// The whole `-o` string.
        options: String,
    },
    /// A value that breaks the rules of its key, from any source.
    #[error("invalid value '{value}' for {origin}: expected {expected}")]
    InvalidValue {
        /// The value as written (control characters escaped).
        value: String,
        /// Where it came from, e.g. `mount option 'threads'`.
        origin: String,
        /// What would be accepted.
        expected: &'static str,
    },
    /// The settings file named with `--config` or `config=` does not exist.
    #[error(
        "settings file {} does not exist: create it, or name an existing file with --config or \
         config=", path.display()
    )]
    SettingsMissing {
        /// The file that was named.
        path: PathBuf,
    },
    /// The settings file exists but cannot be read (permissions, a directory, not UTF-8, ...).
    #[error("cannot read settings file {}: {error}; make it a readable UTF-8 file", path.display())]
    SettingsUnreadable {
        /// The file that was tried.
        path: PathBuf,
        /// What the system said; part of the message rather than a source so it stays one line.
        error: std::io::Error,
    },
    /// The settings file is not valid TOML or has an unknown section or key.
    #[error(
        "invalid settings file {} at {location}: {message}; correct that line of the file",
        path.display()
    )]
    SettingsInvalid {
        /// The file that was read.
        path: PathBuf,
        /// `line L, column C`, or `an unknown position`.
        location: String,
        /// The parser's message, on one line.
        message: String,
    },
}

/// A configured peer, as written: the ID is checked against its checksum when the mount
/// starts, and the address resolved then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// The peer's node ID (its public key), as `filesync id` prints it.
    pub id: String,
    /// `HOST:PORT` to dial; `None` when the peer connects to us.
    pub address: Option<String>,
}

/// How concurrent edits of one file are resolved (see [`crate::sync::conflict`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum ConflictPolicy {
    /// The newer edit wins; the other is kept beside it as a conflict copy.
    #[default]
    KeepBoth,
    /// The newer edit wins; the other is kept only in the versions store.
    NewestWins,
    /// This node's (an ID as `filesync id` prints it) edit wins, else the newer one.
    PreferNode(String),
    /// Text files edited in different places are merged three-way; otherwise keep-both.
    Merge,
}

/// Whether an edit or a concurrent deletion of the same file wins.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum DeletionRule {
    #[default]
    EditWins,
    DeleteWins,
}

/// Which way changes flow for this node's folder.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Send local changes and apply the peers'.
    #[default]
    SendReceive,
    /// Send local changes; ignore the peers'.
    SendOnly,
    /// Apply the peers' changes; local writes through the mount fail with `EROFS`.
    ReceiveOnly,
}

impl Mode {
    /// Whether local changes are sent to peers.
    pub fn sends(self) -> bool {
        self != Mode::ReceiveOnly
    }

    /// Whether the peers' changes are applied here.
    pub fn receives(self) -> bool {
        self != Mode::SendOnly
    }
}

/// When an `fsync` on the mount returns.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Once the data is durable here; peers get it at once, asynchronously.
    #[default]
    Async,
    /// Once every connected peer has also made it durable.
    Sync,
}

/// How this node replicates, after every source is merged.
#[derive(Debug, Clone, PartialEq)]
pub struct Replication {
    pub peers: Vec<PeerSpec>,
    /// Where peers may connect; `None` accepts no connections.
    pub listen: Option<SocketAddr>,
    pub mode: Mode,
    pub durability: Durability,
    /// This node's private key file.
    pub key: PathBuf,
    /// The zstd level; `None` sends everything uncompressed.
    pub compression: Option<i32>,
    /// Days to keep what a peer's change replaced or removed; `None`: nothing is kept.
    pub keep_versions: Option<u32>,
    pub conflicts: ConflictPolicy,
    pub deletions: DeletionRule,
    /// STUN servers (`HOST:PORT`) asked for this node's public address.
    pub stun: Vec<String>,
    /// The rendezvous that introduces this node to peers without an address.
    pub rendezvous: Option<PeerSpec>,
    /// While a peer is relayed, how often a direct path is tried; zero never tries again.
    pub upgrade_interval: Duration,
}

impl Replication {
    /// Whether this mount talks to any peer at all.
    pub fn is_enabled(&self) -> bool {
        !self.peers.is_empty() || self.listen.is_some() || self.rendezvous.is_some()
    }
}

/// Standard mount flags that reach the kernel's mount call. `None` keeps the default, which
/// for FUSE mounts is `nodev`, `nosuid`, `exec`, `relatime` and asynchronous writes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KernelFlags {
    /// `dev` (true) or `nodev` (false): whether device nodes work.
    pub dev: Option<bool>,
    /// `suid` (true) or `nosuid` (false): whether set-user-ID bits take effect.
    pub suid: Option<bool>,
    /// `exec` (true) or `noexec` (false): whether programs may run from the mount.
    pub exec: Option<bool>,
    /// `atime` (true) or `noatime` (false).
    pub atime: Option<bool>,
    /// `sync` (true) or `async` (false): synchronous writes.
    pub sync: Option<bool>,
    /// `dirsync`: synchronous directory changes.
    pub dirsync: Option<bool>,
}

impl KernelFlags {
    /// Records one standard flag; returns false when `name` is not one.
    fn set(&mut self, name: &str) -> bool {
        let (field, on) = match name {
            "dev" | "nodev" => (&mut self.dev, name == "dev"),
            "suid" | "nosuid" => (&mut self.suid, name == "suid"),
            "exec" | "noexec" => (&mut self.exec, name == "exec"),
            "atime" | "noatime" => (&mut self.atime, name == "atime"),
            "sync" | "async" => (&mut self.sync, name == "sync"),
            "dirsync" => (&mut self.dirsync, true),
            _ => return false,
        };
        *field = Some(on);
        true
    }

    /// Later flags win.
    fn merge(self, later: KernelFlags) -> KernelFlags {
        KernelFlags {
            dev: later.dev.or(self.dev),
            suid: later.suid.or(self.suid),
            exec: later.exec.or(self.exec),
            atime: later.atime.or(self.atime),
            sync: later.sync.or(self.sync),
            dirsync: later.dirsync.or(self.dirsync),
        }
    }
}

/// Options given with `-o`, parsed but not yet merged. Each field is `None` when not given, so
/// that lower-precedence sources can fill it in.
///
/// The same shape also carries what the settings file and the environment give, so that all
/// layers merge with one [`MountOptions::merge`].
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MountOptions {
    /// `node_id=ID`: the stable identity of this machine among its peers.
    pub node_id: Option<String>,
    /// `node_name=NAME`: the human-readable name shown to peers.
    pub node_name: Option<String>,
    /// `sync_interval=SECONDS`: how often to rescan for changes missed by the live stream.
    pub sync_interval: Option<Duration>,
    /// `allow_other`: let users other than the mounting one use the mount.
    pub allow_other: Option<bool>,
    /// `ro` (true) or `rw` (false).
    pub read_only: Option<bool>,
    /// `passthrough=on|off`: let the kernel read and write the backing files directly.
    pub passthrough: Option<bool>,
    /// `threads=N`: how many FUSE worker threads to run.
    pub threads: Option<usize>,
    /// `log=FILTER`: a tracing filter such as `info` or `filesync=debug`.
    pub log: Option<String>,
    /// `log_file=PATH`: where to write the log instead of standard error.
    pub log_file: Option<PathBuf>,
    /// `state_dir=PATH`: where the mount keeps its index and other state.
    pub state_dir: Option<PathBuf>,
    /// `watcher=KIND`: which watcher observes the backing folder; `Some(None)` is `auto`.
    pub watcher: Option<Option<WatcherKind>>,
    /// `debounce_us=N`: how long the coalescer waits for more changes to a file.
    pub debounce: Option<Duration>,
    /// `telemetry=off|ADDRESS:PORT`: where to serve the telemetry page; `Some(None)` is `off`.
    pub telemetry: Option<Option<SocketAddr>>,
    /// `metrics=off|ADDRESS:PORT`: where to serve Prometheus text; `Some(None)` is `off`.
    pub metrics: Option<Option<SocketAddr>>,
    /// `peer=ID[@HOST:PORT]`, repeatable: the nodes this one replicates with.
    pub peers: Vec<PeerSpec>,
    /// `listen=off|ADDRESS:PORT`: where peers may connect; `Some(None)` is `off`.
    pub listen: Option<Option<SocketAddr>>,
    /// `mode=MODE`: whether this node sends, receives or both.
    pub mode: Option<Mode>,
    /// `durability=async|sync`: when an `fsync` on the mount returns.
    pub durability: Option<Durability>,
    /// `key=PATH`: this node's private key.
    pub key: Option<PathBuf>,
    /// `compression=off|LEVEL`: the zstd level; `Some(None)` is `off`.
    pub compression: Option<Option<i32>>,
    /// `keep_versions=off|DAYS`: how long replaced files are kept; `Some(None)` is `off`.
    pub keep_versions: Option<Option<u32>>,
    /// `conflicts=POLICY`: how concurrent edits are resolved.
    pub conflicts: Option<ConflictPolicy>,
    /// `deletions=edit-wins|delete-wins`.
    pub deletions: Option<DeletionRule>,
    /// `stun=HOST:PORT`, repeatable: STUN servers for NAT discovery.
    pub stun: Vec<String>,
    /// `rendezvous=ID@HOST:PORT`.
    pub rendezvous: Option<PeerSpec>,
    /// `upgrade_interval=SECONDS`.
    pub upgrade_interval: Option<Duration>,
    /// `config=PATH`: the settings file, same as `--config` (for fstab, which has no flags).
    pub config: Option<PathBuf>,
    /// `noexec`, `nosuid`, `noatime`...: passed on to the kernel.
    pub kernel: KernelFlags,
}

impl MountOptions {
    /// Parse a comma-separated `-o` string; may be called several times (several `-o` flags)
    /// and the results combined with [`MountOptions::merge`]. Standard mount(8) options are
    /// accepted and ignored so fstab lines work; anything else unknown is an error.
    pub fn parse(options: &str) -> Result<MountOptions, ConfigError> {
        let mut parsed = MountOptions::default();
        for item in split_options(options)? {
            parsed.apply_option(item)?;
        }
        Ok(parsed)
    }

    /// Combine two sets of options; where both give a value, the one in `later` wins, as a
    /// later `-o` flag or a higher-precedence source should.
    pub fn merge(self, later: MountOptions) -> MountOptions {
        MountOptions {
            node_id: later.node_id.or(self.node_id),
            node_name: later.node_name.or(self.node_name),
            sync_interval: later.sync_interval.or(self.sync_interval),
            allow_other: later.allow_other.or(self.allow_other),
            read_only: later.read_only.or(self.read_only),
            passthrough: later.passthrough.or(self.passthrough),
            threads: later.threads.or(self.threads),
            log: later.log.or(self.log),
            log_file: later.log_file.or(self.log_file),
            state_dir: later.state_dir.or(self.state_dir),
            watcher: later.watcher.or(self.watcher),
            debounce: later.debounce.or(self.debounce),
            telemetry: later.telemetry.or(self.telemetry),
            metrics: later.metrics.or(self.metrics),
            peers: merge_peers(self.peers, later.peers),
            listen: later.listen.or(self.listen),
            mode: later.mode.or(self.mode),
            durability: later.durability.or(self.durability),
            key: later.key.or(self.key),
            compression: later.compression.or(self.compression),
            keep_versions: later.keep_versions.or(self.keep_versions),
            conflicts: later.conflicts.or(self.conflicts),
            deletions: later.deletions.or(self.deletions),
            stun: merge_stun(self.stun, later.stun),
            rendezvous: later.rendezvous.or(self.rendezvous),
            upgrade_interval: later.upgrade_interval.or(self.upgrade_interval),
            config: later.config.or(self.config),
            kernel: self.kernel.merge(later.kernel),
        }
    }

    /// Apply one non-empty `name[=value]` item of an `-o` string.
    fn apply_option(&mut self, item: &str) -> Result<(), ConfigError> {
        let (name, value) = match item.split_once('=') {
            Some((name, value)) => (name, Some(unquote(value))),
            None => (item, None),
        };
        let origin = Origin::MountOption(name);
        let needs = |placeholder| needs_value(name, value, placeholder).map(Raw::Text);
        match name {
            "node_id" => self.node_id = Some(check_node_id(needs("ID")?, &origin)?),
            "node_name" => self.node_name = Some(check_node_name(needs("NAME")?, &origin)?),
            "sync_interval" => {
                self.sync_interval = Some(check_seconds(needs("SECONDS")?, &origin)?);
            }
            "passthrough" => self.passthrough = Some(check_switch(needs("on|off")?, &origin)?),
            "threads" => self.threads = Some(check_threads(needs("N")?, &origin)?),
            "log" => self.log = Some(check_log(needs("FILTER")?, &origin)?),
            "log_file" => self.log_file = Some(check_absolute(needs("PATH")?, &origin)?),
            "state_dir" => self.state_dir = Some(check_absolute(needs("PATH")?, &origin)?),
            "watcher" => self.watcher = Some(check_watcher(needs("KIND")?, &origin)?),
            "debounce_us" => self.debounce = Some(check_debounce(needs("N")?, &origin)?),
            "telemetry" => {
                self.telemetry = Some(check_telemetry(needs("off|ADDRESS:PORT")?, &origin)?);
            }
            "metrics" => {
                self.metrics = Some(check_metrics(needs("off|ADDRESS:PORT")?, &origin)?);
            }
            "peer" => {
                let peer = check_peer(needs("ID[@HOST:PORT]")?, &origin)?;
                self.peers = merge_peers(std::mem::take(&mut self.peers), vec![peer]);
            }
            "listen" => self.listen = Some(check_listen(needs("off|ADDRESS:PORT")?, &origin)?),
            "mode" => self.mode = Some(check_mode(needs("MODE")?, &origin)?),
            "durability" => {
                self.durability = Some(check_durability(needs("async|sync")?, &origin)?);
            }
            "key" => self.key = Some(check_absolute(needs("PATH")?, &origin)?),
            "compression" => {
                self.compression = Some(check_compression(needs("off|LEVEL")?, &origin)?);
            }
            "keep_versions" => {
                self.keep_versions = Some(check_keep_versions(needs("off|DAYS")?, &origin)?);
            }
            "conflicts" => self.conflicts = Some(check_conflicts(needs("POLICY")?, &origin)?),
            "deletions" => {
                self.deletions = Some(check_deletions(needs("edit-wins|delete-wins")?, &origin)?);
            }
            "upgrade_interval" => {
                self.upgrade_interval = Some(check_seconds(needs("SECONDS")?, &origin)?);
            }
            "rendezvous" => {
                self.rendezvous = Some(check_rendezvous(needs("ID@HOST:PORT")?, &origin)?);
            }
            "stun" => {
                let server = check_stun(needs("HOST:PORT")?, &origin)?;
                self.stun = merge_stun(std::mem::take(&mut self.stun), vec![server]);
            }
            "config" => self.config = Some(check_absolute(needs("PATH")?, &origin)?),
            "allow_other" => {
                takes_no_value(item, name, value)?;
                self.allow_other = Some(true);
            }
            "ro" | "rw" => {
                takes_no_value(item, name, value)?;
                self.read_only = Some(name == "ro");
            }
            _ if self.kernel.set(name) => takes_no_value(item, name, value)?,
            _ if UNSUPPORTED_FLAGS.contains(&name) => {
                return Err(ConfigError::UnsupportedOption {
                    option: one_line(item),
                })
            }
            _ if is_ignored_standard_option(item, name, value)? => {}
            _ => {
                return Err(ConfigError::UnknownOption {
                    option: one_line(item),
                })
            }
        }
        Ok(())
    }
}

/// The merged result a mount runs with: every key has its final value.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The stable identity of this machine among its peers.
    pub node_id: String,
    /// The human-readable name shown to peers.
    pub node_name: String,
    /// How often to rescan for missed changes; [`Duration::ZERO`] disables the periodic scan.
    pub sync_interval: Duration,
    /// Whether users other than the mounting one may use the mount.
    pub allow_other: bool,
    /// Whether the mount refuses writes.
    pub read_only: bool,
    /// Whether the kernel may read and write the backing files directly.
    pub passthrough: bool,
    /// How many FUSE worker threads to run.
    pub threads: usize,
    /// The tracing filter for the log.
    pub log: String,
    /// Where to write the log; `None` means standard error.
    pub log_file: Option<PathBuf>,
    /// Where the mount keeps its index and other state; `None` leaves the choice to the
    /// caller (`/var/lib/filesync/<mount>` when mounted by root).
    pub state_dir: Option<PathBuf>,
    /// Which watcher observes the backing folder; `None` is `auto`: the caller tries eBPF,
    /// then fanotify, then inotify.
    pub watcher: Option<WatcherKind>,
    /// How long the coalescer waits for more changes to a file before passing its update on.
    pub debounce: Duration,
    /// Where to serve the telemetry page; `None` is off. Any address is accepted, but only
    /// a loopback one (the default) keeps the page private.
    pub telemetry: Option<SocketAddr>,
    /// Where to serve Prometheus text at `/metrics`; `None` (the default) is off.
    pub metrics: Option<SocketAddr>,
    /// Replication: peers, listening address, mode, durability, key and compression.
    pub replication: Replication,
    /// The settings file actually read, if any, so it can be reported in the log.
    pub config_file: Option<PathBuf>,
    /// Standard mount flags for the kernel (mount options only).
    pub kernel: KernelFlags,
}

/// Merge mount options, settings file, environment and defaults, in that order of precedence.
///
/// `cli_config` is `--config PATH` (explicit: a missing file is an error); otherwise
/// `options.config` (also explicit), otherwise [`DEFAULT_CONFIG_PATH`] (implicit: a missing file
/// is fine, an unreadable or invalid one is an error). `env` looks up an environment variable
/// (tests pass a closure over a map; production passes `|name| std::env::var(name).ok()`), so
/// the result does not depend on the process environment in tests.
pub fn resolve(
    options: &MountOptions,
    cli_config: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, ConfigError> {
    resolve_on(&Host::probe(), options, cli_config, env)
}

/// [`resolve`] with the facts about the machine given, so tests control the defaults.
fn resolve_on(
    host: &Host,
    options: &MountOptions,
    cli_config: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, ConfigError> {
    let environment = environment_layer(env)?;
    let (file, config_file) = match (cli_config, options.config.as_deref()) {
        (Some(path), _) | (None, Some(path)) => (read_settings_file(path)?, Some(path)),
        (None, None) => match read_optional_settings_file(&host.default_config)? {
            Some(file) => (file, Some(host.default_config.as_path())),
            None => (MountOptions::default(), None),
        },
    };
    let merged = environment.merge(file).merge(options.clone());
    Ok(host.complete(merged, config_file.map(Path::to_path_buf)))
}

/// Where a value came from, named in error messages so the user knows what to fix.
#[derive(Debug, Clone, Copy)]
enum Origin<'a> {
    /// An `-o` option, by name.
    MountOption(&'a str),
    /// A key in the settings file, written `[section].key`.
    SettingsKey { file: &'a Path, key: &'a str },
    /// An environment variable, by name.
    Environment(&'a str),
}

impl fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::MountOption(name) => write!(f, "mount option '{name}'"),
            Origin::SettingsKey { file, key } => {
                write!(f, "settings key '{key}' in {}", file.display())
            }
            Origin::Environment(name) => write!(f, "environment variable '{name}'"),
        }
    }
}

/// A value as written, before it is checked: text from a mount option or the environment, or a
/// TOML value from the settings file. Keeping both lets every checker serve every source.
#[derive(Debug, Clone, Copy)]
enum Raw<'a> {
    /// Text from a mount option or an environment variable.
    Text(&'a str),
    /// A value from the settings file, in whatever TOML type it was written.
    Toml(&'a toml::Value),
}

impl<'a> Raw<'a> {
    /// The value as text: any text, or a TOML string.
    fn text(self) -> Option<&'a str> {
        match self {
            Raw::Text(text) => Some(text),
            Raw::Toml(toml::Value::String(text)) => Some(text),
            Raw::Toml(_) => None,
        }
    }

    /// The value as a non-negative whole number: decimal text or a TOML integer.
    fn whole_number(self) -> Option<u64> {
        match self {
            Raw::Toml(toml::Value::Integer(number)) => u64::try_from(*number).ok(),
            _ => self.text()?.parse().ok(),
        }
    }

    /// The value as a switch: a TOML boolean, or one of the usual words for on and off.
    fn switch(self) -> Option<bool> {
        if let Raw::Toml(toml::Value::Boolean(on)) = self {
            return Some(*on);
        }
        let text = self.text()?;
        let is = |words: &[&str]| words.iter().any(|word| text.eq_ignore_ascii_case(word));
        if is(&["on", "true", "yes", "1"]) {
            Some(true)
        } else if is(&["off", "false", "no", "0"]) {
            Some(false)
        } else {
            None
        }
    }

    /// The error for this value, shown the way it was written and kept on one line.
    fn invalid(self, origin: &Origin<'_>, expected: &'static str) -> ConfigError {
        let value = match self {
            Raw::Text(text) => one_line(text),
            Raw::Toml(value) => one_line(&value.to_string()),
        };
        ConfigError::InvalidValue {
            value,
            origin: origin.to_string(),
            expected,
        }
    }
}

/// Check a node id: 1 to 64 characters from `[A-Za-z0-9_-]`, safe in file names and headers.
fn check_node_id(raw: Raw<'_>, origin: &Origin<'_>) -> Result<String, ConfigError> {
    match raw.text() {
        Some(text) if is_valid_node_id(text) => Ok(text.to_owned()),
        _ => Err(raw.invalid(origin, EXPECT_NODE_ID)),
    }
}

/// Check a node name: 1 to 64 printable characters without `/`, so it displays on one line.
fn check_node_name(raw: Raw<'_>, origin: &Origin<'_>) -> Result<String, ConfigError> {
    match raw.text() {
        Some(text) if is_valid_node_name(text) => Ok(text.to_owned()),
        _ => Err(raw.invalid(origin, EXPECT_NODE_NAME)),
    }
}

/// Check a scan interval: whole seconds from 0 (off) to one day.
fn check_seconds(raw: Raw<'_>, origin: &Origin<'_>) -> Result<Duration, ConfigError> {
    match raw.whole_number() {
        Some(seconds) if seconds <= MAX_SYNC_INTERVAL_SECS => Ok(Duration::from_secs(seconds)),
        _ => Err(raw.invalid(origin, EXPECT_SECONDS)),
    }
}

/// Check a thread count: 1 to 64.
fn check_threads(raw: Raw<'_>, origin: &Origin<'_>) -> Result<usize, ConfigError> {
    match raw.whole_number().map(usize::try_from) {
        Some(Ok(threads)) if (1..=MAX_THREADS).contains(&threads) => Ok(threads),
        _ => Err(raw.invalid(origin, EXPECT_THREADS)),
    }
}

/// Check an on/off setting.
fn check_switch(raw: Raw<'_>, origin: &Origin<'_>) -> Result<bool, ConfigError> {
    raw.switch()
        .ok_or_else(|| raw.invalid(origin, EXPECT_SWITCH))
}

/// Check a log filter by parsing it the way the logger will, so a bad filter fails the mount
/// with a clear message instead of being ignored later.
fn check_log(raw: Raw<'_>, origin: &Origin<'_>) -> Result<String, ConfigError> {
    match raw.text() {
        Some(text)
            if !text.trim().is_empty()
                && tracing_subscriber::EnvFilter::builder().parse(text).is_ok() =>
        {
            Ok(text.to_owned())
        }
        _ => Err(raw.invalid(origin, EXPECT_LOG)),
    }
}

/// Check a watcher kind: `auto` (`None`) or one of [`WatcherKind`], in any ASCII case.
fn check_watcher(raw: Raw<'_>, origin: &Origin<'_>) -> Result<Option<WatcherKind>, ConfigError> {
    let kinds = [
        ("auto", None),
        ("ebpf", Some(WatcherKind::Ebpf)),
        ("fanotify", Some(WatcherKind::Fanotify)),
        ("inotify", Some(WatcherKind::Inotify)),
        ("scan", Some(WatcherKind::Scan)),
    ];
    raw.text()
        .and_then(|text| {
            kinds
                .into_iter()
                .find(|(word, _)| text.eq_ignore_ascii_case(word))
        })
        .map(|(_, kind)| kind)
        .ok_or_else(|| raw.invalid(origin, EXPECT_WATCHER))
}

/// Check a debounce time: whole microseconds from 0 (no wait) to one second.
fn check_debounce(raw: Raw<'_>, origin: &Origin<'_>) -> Result<Duration, ConfigError> {
    match raw.whole_number() {
        Some(micros) if micros <= MAX_DEBOUNCE_MICROS => Ok(Duration::from_micros(micros)),
        _ => Err(raw.invalid(origin, EXPECT_DEBOUNCE)),
    }
}

/// Check a telemetry address: `off` (`None`) or an IP socket address with a non-zero port.
/// An address other than loopback is accepted, since the user asked for it.
fn check_telemetry(raw: Raw<'_>, origin: &Origin<'_>) -> Result<Option<SocketAddr>, ConfigError> {
    match raw.text() {
        Some(text) if text.eq_ignore_ascii_case("off") => Ok(None),
        Some(text) => match text.parse::<SocketAddr>() {
            Ok(address) if address.port() != 0 => Ok(Some(address)),
            _ => Err(raw.invalid(origin, EXPECT_TELEMETRY)),
        },
        None => Err(raw.invalid(origin, EXPECT_TELEMETRY)),
    }
}

/// Check a metrics address: `off` (`None`) or an IP socket address with a non-zero port.
/// An address other than loopback is accepted, since the user asked for it.
fn check_metrics(raw: Raw<'_>, origin: &Origin<'_>) -> Result<Option<SocketAddr>, ConfigError> {
    match raw.text() {
        Some(text) if text.eq_ignore_ascii_case("off") => Ok(None),
        Some(text) => match text.parse::<SocketAddr>() {
            Ok(address) if address.port() != 0 => Ok(Some(address)),
            _ => Err(raw.invalid(origin, EXPECT_METRICS)),
        },
        None => Err(raw.invalid(origin, EXPECT_METRICS)),
    }
}

/// Check a peer: `ID` or `ID@HOST:PORT`. The ID's checksum is verified when the mount
/// starts (it needs the identity module); here its shape and the address are checked.
fn check_peer(raw: Raw<'_>, origin: &Origin<'_>) -> Result<PeerSpec, ConfigError> {
    let text = raw.text().ok_or_else(|| raw.invalid(origin, EXPECT_PEER))?;
    let (id, address) = match text.split_once('@') {
        Some((id, address)) => (id, Some(address)),
        None => (text, None),
    };
    let id_ok = !id.is_empty()
        && id.len() <= 128
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    let address_ok = address.is_none_or(|address| {
        address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        })
    });
    if !id_ok || !address_ok {
        return Err(raw.invalid(origin, EXPECT_PEER));
    }
    Ok(PeerSpec {
        id: id.to_owned(),
        address: address.map(str::to_owned),
    })
}

/// Check a listening address: `off` (`None`) or an IP socket address with a non-zero port.
fn check_listen(raw: Raw<'_>, origin: &Origin<'_>) -> Result<Option<SocketAddr>, ConfigError> {
    match raw.text() {
        Some(text) if text.eq_ignore_ascii_case("off") => Ok(None),
        Some(text) => match text.parse::<SocketAddr>() {
            Ok(address) if address.port() != 0 => Ok(Some(address)),
            _ => Err(raw.invalid(origin, EXPECT_LISTEN)),
        },
        None => Err(raw.invalid(origin, EXPECT_LISTEN)),
    }
}

/// Check a folder mode.
fn check_mode(raw: Raw<'_>, origin: &Origin<'_>) -> Result<Mode, ConfigError> {
    let modes = [
        ("sendreceive", Mode::SendReceive),
        ("sendonly", Mode::SendOnly),
        ("receiveonly", Mode::ReceiveOnly),
    ];
    raw.text()
        .and_then(|text| {
            modes
                .into_iter()
                .find(|(word, _)| text.eq_ignore_ascii_case(word))
        })
        .map(|(_, mode)| mode)
        .ok_or_else(|| raw.invalid(origin, EXPECT_MODE))
}

/// Check a durability level.
fn check_durability(raw: Raw<'_>, origin: &Origin<'_>) -> Result<Durability, ConfigError> {
    match raw.text() {
        Some(text) if text.eq_ignore_ascii_case("async") => Ok(Durability::Async),
        Some(text) if text.eq_ignore_ascii_case("sync") => Ok(Durability::Sync),
        _ => Err(raw.invalid(origin, EXPECT_DURABILITY)),
    }
}

/// Check a compression level: `off` (`None`) or a zstd level from 1 to 19.
fn check_compression(raw: Raw<'_>, origin: &Origin<'_>) -> Result<Option<i32>, ConfigError> {
    if raw
        .text()
        .is_some_and(|text| text.eq_ignore_ascii_case("off"))
    {
        return Ok(None);
    }
    match raw.whole_number() {
        Some(level @ 1..=19) => Ok(Some(level as i32)),
        _ => Err(raw.invalid(origin, EXPECT_COMPRESSION)),
    }
}

/// Check a conflict policy.
fn check_conflicts(raw: Raw<'_>, origin: &Origin<'_>) -> Result<ConflictPolicy, ConfigError> {
    let text = raw
        .text()
        .ok_or_else(|| raw.invalid(origin, EXPECT_CONFLICTS))?;
    let lower = text.to_ascii_lowercase();
    match lower.as_str() {
        "keep-both" => return Ok(ConflictPolicy::KeepBoth),
        "newest-wins" => return Ok(ConflictPolicy::NewestWins),
        "merge" => return Ok(ConflictPolicy::Merge),
        _ => {}
    }
    let id = lower
        .strip_prefix("prefer-node=")
        .map(|_| &text["prefer-node=".len()..])
        .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .ok_or_else(|| raw.invalid(origin, EXPECT_CONFLICTS))?;
    Ok(ConflictPolicy::PreferNode(id.to_owned()))
}

/// Check a deletion rule.
fn check_deletions(raw: Raw<'_>, origin: &Origin<'_>) -> Result<DeletionRule, ConfigError> {
    match raw.text() {
        Some(text) if text.eq_ignore_ascii_case("edit-wins") => Ok(DeletionRule::EditWins),
        Some(text) if text.eq_ignore_ascii_case("delete-wins") => Ok(DeletionRule::DeleteWins),
        _ => Err(raw.invalid(origin, EXPECT_DELETIONS)),
    }
}

/// Check a version keeping time: `off` (`None`) or whole days from 1 to 36500.
fn check_keep_versions(raw: Raw<'_>, origin: &Origin<'_>) -> Result<Option<u32>, ConfigError> {
    if raw
        .text()
        .is_some_and(|text| text.eq_ignore_ascii_case("off"))
    {
        return Ok(None);
    }
    match raw.whole_number() {
        Some(days @ 1..=36_500) => Ok(Some(days as u32)),
        _ => Err(raw.invalid(origin, EXPECT_KEEP_VERSIONS)),
    }
}

/// Peers from two sources: all of them, a later entry for the same ID replacing the
/// earlier one (so a mount option can give an address the settings file lacks).
fn merge_peers(earlier: Vec<PeerSpec>, later: Vec<PeerSpec>) -> Vec<PeerSpec> {
    let mut peers = earlier;
    for peer in later {
        peers.retain(|known| known.id != peer.id);
        peers.push(peer);
    }
    peers
}

/// Check a STUN server: `HOST:PORT` with a non-empty host and a non-zero port; the name is
/// resolved by the discovery client, again on every round.
/// A rendezvous: a peer specification that must name an address.
fn check_rendezvous(raw: Raw<'_>, origin: &Origin<'_>) -> Result<PeerSpec, ConfigError> {
    match check_peer(raw, origin) {
        Ok(spec) if spec.address.is_some() => Ok(spec),
        _ => Err(raw.invalid(origin, EXPECT_RENDEZVOUS)),
    }
}

fn check_stun(raw: Raw<'_>, origin: &Origin<'_>) -> Result<String, ConfigError> {
    let text = raw.text().ok_or_else(|| raw.invalid(origin, EXPECT_STUN))?;
    let valid = text.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && !host.contains(|c: char| c.is_whitespace() || c.is_control() || c == '/')
            && port.parse::<u16>().is_ok_and(|p| p != 0)
    });
    if valid {
        Ok(text.to_owned())
    } else {
        Err(raw.invalid(origin, EXPECT_STUN))
    }
}

/// STUN servers from two sources: all of them, each once.
fn merge_stun(earlier: Vec<String>, later: Vec<String>) -> Vec<String> {
    let mut servers = earlier;
    for server in later {
        if !servers.contains(&server) {
            servers.push(server);
        }
    }
    servers
}

/// Check a path that must be absolute, because a mount helper's working directory is unknown.
fn check_absolute(raw: Raw<'_>, origin: &Origin<'_>) -> Result<PathBuf, ConfigError> {
    match raw.text().map(Path::new) {
        Some(path) if path.is_absolute() => Ok(path.to_path_buf()),
        _ => Err(raw.invalid(origin, EXPECT_PATH)),
    }
}

/// `text` with control characters escaped (`\n`, `\u{1b}`), so an error message stays on one
/// line and cannot mangle a terminal.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Whether `text` is a valid node id.
fn is_valid_node_id(text: &str) -> bool {
    (1..=MAX_NAME_CHARS).contains(&text.chars().count()) && text.chars().all(is_node_id_char)
}

/// Whether `c` may appear in a node id.
fn is_node_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Whether `text` is a valid node name. Whitespace other than a plain space is refused along
/// with control characters, since it would not display as written.
fn is_valid_node_name(text: &str) -> bool {
    (1..=MAX_NAME_CHARS).contains(&text.chars().count())
        && text
            .chars()
            .all(|c| c != '/' && !c.is_control() && (c == ' ' || !c.is_whitespace()))
}

/// Split an `-o` string at commas outside double quotes, dropping empty items, so a value such
/// as `log="a=debug,b=warn"` stays whole as it does for mount(8).
fn split_options(options: &str) -> Result<Vec<&str>, ConfigError> {
    let mut items = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (index, c) in options.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                items.push(&options[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return Err(ConfigError::UnterminatedQuote {
            options: one_line(options),
        });
    }
    items.push(&options[start..]);
    Ok(items
        .into_iter()
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .collect())
}

/// Remove one pair of double quotes around a whole value.
fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(value)
}

/// The value of an option that needs one; a missing or empty value is an error.
fn needs_value<'a>(
    name: &str,
    value: Option<&'a str>,
    placeholder: &'static str,
) -> Result<&'a str, ConfigError> {
    match value {
        Some(value) if !value.is_empty() => Ok(value),
        _ => Err(ConfigError::MissingValue {
            name: name.to_owned(),
            placeholder,
        }),
    }
}

/// Refuse a value on a flag option.
fn takes_no_value(item: &str, name: &str, value: Option<&str>) -> Result<(), ConfigError> {
    match value {
        None => Ok(()),
        Some(_) => Err(ConfigError::UnexpectedValue {
            name: name.to_owned(),
            option: one_line(item),
        }),
    }
}

/// Whether an option is one of the standard ones that we accept and ignore; a standard flag
/// given a value is an error like one of ours.
fn is_ignored_standard_option(
    item: &str,
    name: &str,
    value: Option<&str>,
) -> Result<bool, ConfigError> {
    if name.starts_with("x-") || name.starts_with("X-") || IGNORED_WITH_VALUE.contains(&name) {
        return Ok(true);
    }
    if IGNORED_FLAGS.contains(&name) {
        takes_no_value(item, name, value)?;
        return Ok(true);
    }
    Ok(false)
}

/// The settings file as written. Unknown sections and keys are refused so typos are reported.
/// A new section is one struct and one field here (plus, where it feeds [`Settings`], its
/// `apply_to`).
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a settings file with [node], [sync], [mount], [capture], [telemetry], \
                 [metrics] and [replication]"
)]
struct SettingsFile {
    #[serde(default)]
    node: NodeSection,
    #[serde(default)]
    sync: SyncSection,
    #[serde(default)]
    mount: MountSection,
    #[serde(default)]
    capture: CaptureSection,
    #[serde(default)]
    telemetry: TelemetrySection,
    #[serde(default)]
    metrics: MetricsSection,
    #[serde(default)]
    replication: ReplicationSection,
}

/// `[node]`: who this machine is.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a [node] table with the keys id and name"
)]
struct NodeSection {
    id: Option<toml::Value>,
    name: Option<toml::Value>,
}

/// `[sync]`: how mirroring is driven.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a [sync] table with the key interval"
)]
struct SyncSection {
    interval: Option<toml::Value>,
}

/// `[mount]`: how the FUSE mount behaves.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a [mount] table with the keys allow_other, read_only, passthrough, threads, \
                 log, log_file and state_dir"
)]
struct MountSection {
    allow_other: Option<toml::Value>,
    read_only: Option<toml::Value>,
    passthrough: Option<toml::Value>,
    threads: Option<toml::Value>,
    log: Option<toml::Value>,
    log_file: Option<toml::Value>,
    state_dir: Option<toml::Value>,
}

/// `[capture]`: how changes behind the mount's back are observed and coalesced.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a [capture] table with the keys watcher and debounce_us"
)]
struct CaptureSection {
    watcher: Option<toml::Value>,
    debounce_us: Option<toml::Value>,
}

/// `[telemetry]`: the live telemetry page.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a [telemetry] table with the key listen"
)]
struct TelemetrySection {
    listen: Option<toml::Value>,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a [metrics] table with the key listen"
)]
struct MetricsSection {
    listen: Option<toml::Value>,
}

/// `[replication]`: peers and how changes travel to them.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a [replication] table with the keys peers, listen, mode, durability, key, \
                 compression, keep_versions, conflicts, deletions, stun, rendezvous and \
                 upgrade_interval"
)]
struct ReplicationSection {
    peers: Option<Vec<toml::Value>>,
    rendezvous: Option<toml::Value>,
    upgrade_interval: Option<toml::Value>,
    stun: Option<Vec<toml::Value>>,
    listen: Option<toml::Value>,
    mode: Option<toml::Value>,
    durability: Option<toml::Value>,
    key: Option<toml::Value>,
    compression: Option<toml::Value>,
    keep_versions: Option<toml::Value>,
    conflicts: Option<toml::Value>,
    deletions: Option<toml::Value>,
}

/// Check an optional value with `check`, naming `origin` if it is invalid.
fn checked<T>(
    raw: Option<Raw<'_>>,
    origin: Origin<'_>,
    check: fn(Raw<'_>, &Origin<'_>) -> Result<T, ConfigError>,
) -> Result<Option<T>, ConfigError> {
    raw.map(|raw| check(raw, &origin)).transpose()
}

impl SettingsFile {
    /// Check every value and turn the file into a layer for merging.
    fn into_layer(self, file: &Path) -> Result<MountOptions, ConfigError> {
        let mut layer = MountOptions::default();
        self.node.apply_to(file, &mut layer)?;
        self.sync.apply_to(file, &mut layer)?;
        self.mount.apply_to(file, &mut layer)?;
        self.capture.apply_to(file, &mut layer)?;
        self.telemetry.apply_to(file, &mut layer)?;
        self.metrics.apply_to(file, &mut layer)?;
        self.replication.apply_to(file, &mut layer)?;
        Ok(layer)
    }
}

/// A settings value, if the key was given.
fn raw(value: &Option<toml::Value>) -> Option<Raw<'_>> {
    value.as_ref().map(Raw::Toml)
}

/// The origin of `[section].key` in `file`.
fn key_in<'a>(file: &'a Path, key: &'a str) -> Origin<'a> {
    Origin::SettingsKey { file, key }
}

impl NodeSection {
    /// Check `[node]` and put its values into `layer`.
    fn apply_to(&self, file: &Path, layer: &mut MountOptions) -> Result<(), ConfigError> {
        let id = self.id.as_ref().map(Raw::Toml);
        let name = self.name.as_ref().map(Raw::Toml);
        layer.node_id = checked(id, key_in(file, "[node].id"), check_node_id)?;
        layer.node_name = checked(name, key_in(file, "[node].name"), check_node_name)?;
        Ok(())
    }
}

impl SyncSection {
    /// Check `[sync]` and put its values into `layer`.
    fn apply_to(&self, file: &Path, layer: &mut MountOptions) -> Result<(), ConfigError> {
        let interval = self.interval.as_ref().map(Raw::Toml);
        layer.sync_interval = checked(interval, key_in(file, "[sync].interval"), check_seconds)?;
        Ok(())
    }
}

impl MountSection {
    /// Check `[mount]` and put its values into `layer`.
    fn apply_to(&self, file: &Path, layer: &mut MountOptions) -> Result<(), ConfigError> {
        let key = |name| key_in(file, name);
        layer.allow_other = checked(
            raw(&self.allow_other),
            key("[mount].allow_other"),
            check_switch,
        )?;
        layer.read_only = checked(raw(&self.read_only), key("[mount].read_only"), check_switch)?;
        layer.passthrough = checked(
            raw(&self.passthrough),
            key("[mount].passthrough"),
            check_switch,
        )?;
        layer.threads = checked(raw(&self.threads), key("[mount].threads"), check_threads)?;
        layer.log = checked(raw(&self.log), key("[mount].log"), check_log)?;
        layer.log_file = checked(raw(&self.log_file), key("[mount].log_file"), check_absolute)?;
        layer.state_dir = checked(
            raw(&self.state_dir),
            key("[mount].state_dir"),
            check_absolute,
        )?;
        Ok(())
    }
}

impl CaptureSection {
    /// Check `[capture]` and put its values into `layer`.
    fn apply_to(&self, file: &Path, layer: &mut MountOptions) -> Result<(), ConfigError> {
        let key = |name| key_in(file, name);
        layer.watcher = checked(raw(&self.watcher), key("[capture].watcher"), check_watcher)?;
        layer.debounce = checked(
            raw(&self.debounce_us),
            key("[capture].debounce_us"),
            check_debounce,
        )?;
        Ok(())
    }
}

impl TelemetrySection {
    /// Check `[telemetry]` and put its values into `layer`.
    fn apply_to(&self, file: &Path, layer: &mut MountOptions) -> Result<(), ConfigError> {
        let listen = raw(&self.listen);
        layer.telemetry = checked(listen, key_in(file, "[telemetry].listen"), check_telemetry)?;
        Ok(())
    }
}

impl MetricsSection {
    /// Check `[metrics]` and put its value into `layer`.
    fn apply_to(&self, file: &Path, layer: &mut MountOptions) -> Result<(), ConfigError> {
        let listen = raw(&self.listen);
        layer.metrics = checked(listen, key_in(file, "[metrics].listen"), check_metrics)?;
        Ok(())
    }
}

impl ReplicationSection {
    /// Check `[replication]` and put its values into `layer`.
    fn apply_to(&self, file: &Path, layer: &mut MountOptions) -> Result<(), ConfigError> {
        let key = |name| key_in(file, name);
        for peer in self.peers.iter().flatten() {
            let peer = check_peer(Raw::Toml(peer), &key("[replication].peers"))?;
            layer.peers = merge_peers(std::mem::take(&mut layer.peers), vec![peer]);
        }
        for server in self.stun.iter().flatten() {
            let server = check_stun(Raw::Toml(server), &key("[replication].stun"))?;
            layer.stun = merge_stun(std::mem::take(&mut layer.stun), vec![server]);
        }
        layer.listen = checked(raw(&self.listen), key("[replication].listen"), check_listen)?;
        layer.rendezvous = checked(
            raw(&self.rendezvous),
            key("[replication].rendezvous"),
            check_rendezvous,
        )?;
        layer.upgrade_interval = checked(
            raw(&self.upgrade_interval),
            key("[replication].upgrade_interval"),
            check_seconds,
        )?;
        layer.mode = checked(raw(&self.mode), key("[replication].mode"), check_mode)?;
        layer.durability = checked(
            raw(&self.durability),
            key("[replication].durability"),
            check_durability,
        )?;
        layer.key = checked(raw(&self.key), key("[replication].key"), check_absolute)?;
        layer.compression = checked(
            raw(&self.compression),
            key("[replication].compression"),
            check_compression,
        )?;
        layer.keep_versions = checked(
            raw(&self.keep_versions),
            key("[replication].keep_versions"),
            check_keep_versions,
        )?;
        layer.conflicts = checked(
            raw(&self.conflicts),
            key("[replication].conflicts"),
            check_conflicts,
        )?;
        layer.deletions = checked(
            raw(&self.deletions),
            key("[replication].deletions"),
            check_deletions,
        )?;
        Ok(())
    }
}

/// Read a settings file that was named explicitly: a missing file is an error.
fn read_settings_file(path: &Path) -> Result<MountOptions, ConfigError> {
    read_optional_settings_file(path)?.ok_or_else(|| ConfigError::SettingsMissing {
        path: path.to_path_buf(),
    })
}

/// Read a settings file that may be missing (`Ok(None)`); an unreadable or invalid one is an
/// error, since silently ignoring it would mount with settings the admin did not intend.
fn read_optional_settings_file(path: &Path) -> Result<Option<MountOptions>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(ConfigError::SettingsUnreadable {
                path: path.to_path_buf(),
                error,
            })
        }
    };
    let file: SettingsFile =
        toml::from_str(&text).map_err(|error| settings_syntax_error(path, &text, &error))?;
    file.into_layer(path).map(Some)
}

/// Turn the TOML parser's multi-line report into a one-line error with file, line and column.
fn settings_syntax_error(path: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
    let location = match error.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before
                .rsplit('\n')
                .next()
                .map_or(0, |tail| tail.chars().count())
                + 1;
            format!("line {line}, column {column}")
        }
        None => "an unknown position".to_owned(),
    };
    ConfigError::SettingsInvalid {
        path: path.to_path_buf(),
        location,
        message: one_line(
            &error
                .message()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        ),
    }
}

/// The layer the environment gives; an empty variable counts as unset, as shells make it easy
/// to export an empty one by accident.
fn environment_layer(env: &dyn Fn(&str) -> Option<String>) -> Result<MountOptions, ConfigError> {
    let var = |name| env(name).filter(|value| !value.is_empty());
    let (id, name, interval) = (var(ENV_NODE_ID), var(ENV_NODE_NAME), var(ENV_SYNC_INTERVAL));
    Ok(MountOptions {
        node_id: checked(
            id.as_deref().map(Raw::Text),
            Origin::Environment(ENV_NODE_ID),
            check_node_id,
        )?,
        node_name: checked(
            name.as_deref().map(Raw::Text),
            Origin::Environment(ENV_NODE_NAME),
            check_node_name,
        )?,
        sync_interval: checked(
            interval.as_deref().map(Raw::Text),
            Origin::Environment(ENV_SYNC_INTERVAL),
            check_seconds,
        )?,
        ..MountOptions::default()
    })
}

/// What the machine provides for the defaults, gathered in one place so tests can supply it.
#[derive(Debug, Clone)]
struct Host {
    /// The implicit settings file.
    default_config: PathBuf,
    /// The contents of `/etc/machine-id`, if readable.
    machine_id: Option<String>,
    /// The host name, if known.
    hostname: Option<String>,
    /// The number of CPUs available to us, if known.
    parallelism: Option<usize>,
}

impl Host {
    /// Look at the running machine.
    fn probe() -> Host {
        Host {
            default_config: PathBuf::from(DEFAULT_CONFIG_PATH),
            machine_id: std::fs::read_to_string(MACHINE_ID_PATH).ok(),
            hostname: hostname(),
            parallelism: std::thread::available_parallelism()
                .ok()
                .map(std::num::NonZeroUsize::get),
        }
    }

    /// Fill the keys no source gave with the defaults.
    fn complete(&self, merged: MountOptions, config_file: Option<PathBuf>) -> Settings {
        let node_name = merged.node_name.unwrap_or_else(|| self.default_node_name());
        let node_id = merged
            .node_id
            .unwrap_or_else(|| self.default_node_id(&node_name));
        Settings {
            node_id,
            node_name,
            sync_interval: merged.sync_interval.unwrap_or(Duration::from_secs(60)),
            allow_other: merged.allow_other.unwrap_or(false),
            read_only: merged.read_only.unwrap_or(false),
            passthrough: merged.passthrough.unwrap_or(true),
            threads: merged.threads.unwrap_or_else(|| self.default_threads()),
            log: merged.log.unwrap_or_else(|| "info".to_owned()),
            log_file: merged.log_file,
            state_dir: merged.state_dir,
            watcher: merged.watcher.flatten(),
            debounce: merged.debounce.unwrap_or(DEFAULT_DEBOUNCE),
            telemetry: merged.telemetry.unwrap_or(Some(DEFAULT_TELEMETRY)),
            metrics: merged.metrics.flatten(),
            replication: Replication {
                peers: merged.peers,
                listen: merged.listen.flatten(),
                mode: merged.mode.unwrap_or_default(),
                durability: merged.durability.unwrap_or_default(),
                key: merged
                    .key
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_KEY_PATH)),
                compression: merged.compression.unwrap_or(Some(DEFAULT_COMPRESSION)),
                keep_versions: merged
                    .keep_versions
                    .unwrap_or(Some(DEFAULT_KEEP_VERSIONS_DAYS)),
                conflicts: merged.conflicts.unwrap_or_default(),
                deletions: merged.deletions.unwrap_or_default(),
                stun: merged.stun,
                rendezvous: merged.rendezvous,
                upgrade_interval: merged.upgrade_interval.unwrap_or(DEFAULT_UPGRADE_INTERVAL),
            },
            config_file,
            kernel: merged.kernel,
        }
    }

    /// The host name if it is a valid node name, else `filesync`.
    fn default_node_name(&self) -> String {
        self.hostname
            .as_deref()
            .filter(|name| is_valid_node_name(name))
            .unwrap_or("filesync")
            .to_owned()
    }

    /// The first 16 characters of the machine id (stable across renames), else the node name
    /// made into a valid id.
    fn default_node_id(&self, node_name: &str) -> String {
        self.machine_id
            .as_deref()
            .and_then(node_id_from_machine_id)
            .unwrap_or_else(|| node_id_from_name(node_name))
    }

    /// The CPU count clamped to 2..=16: at least two so one slow call does not stall the mount,
    /// at most sixteen since more threads only contend; 2 when the count is unknown.
    fn default_threads(&self) -> usize {
        self.parallelism.unwrap_or(2).clamp(2, 16)
    }
}

/// The first 16 characters of a machine id, if it is hexadecimal and long enough.
fn node_id_from_machine_id(contents: &str) -> Option<String> {
    let id = contents.trim();
    (id.len() >= MACHINE_ID_CHARS && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| id[..MACHINE_ID_CHARS].to_ascii_lowercase())
}

/// A node name lowercased, with every character not allowed in an id replaced by `-`.
fn node_id_from_name(node_name: &str) -> String {
    node_name
        .to_lowercase()
        .chars()
        .map(|c| if is_node_id_char(c) { c } else { '-' })
        .take(MAX_NAME_CHARS)
        .collect()
}

/// The host name from gethostname(2), if it is UTF-8.
fn hostname() -> Option<String> {
    let mut buffer = [0u8; 256];
    // SAFETY: the pointer and length describe `buffer`, which is valid for writes of that many
    // bytes; gethostname writes at most `len` bytes into it.
    let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if result != 0 {
        return None;
    }
    let end = buffer.iter().position(|&b| b == 0)?;
    String::from_utf8(buffer[..end].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A host with fixed facts and the implicit settings file at `default_config`.
    fn host(default_config: &Path) -> Host {
        Host {
            default_config: default_config.to_path_buf(),
            machine_id: Some("0123456789abcdef0123456789abcdef\n".to_owned()),
            hostname: Some("Build Box".to_owned()),
            parallelism: Some(8),
        }
    }

    /// A temporary directory holding `filesync.toml` with `contents`, if given.
    fn settings_dir(contents: Option<&str>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("filesync.toml");
        if let Some(contents) = contents {
            std::fs::write(&path, contents).expect("write settings file");
        }
        (dir, path)
    }

    /// Resolve with `options` as `-o`, `file` as the implicit settings file and `env` as the
    /// environment.
    fn resolve_layers(
        options: &str,
        file: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<Settings, ConfigError> {
        let (_dir, path) = settings_dir(file);
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let options = MountOptions::parse(options)?;
        resolve_on(&host(&path), &options, None, &|name| env.get(name).cloned())
    }

    fn settings(options: &str, file: Option<&str>, env: &[(&str, &str)]) -> Settings {
        match resolve_layers(options, file, env) {
            Ok(settings) => settings,
            Err(error) => panic!("unexpected error: {error}"),
        }
    }

    fn error(options: &str, file: Option<&str>, env: &[(&str, &str)]) -> String {
        match resolve_layers(options, file, env) {
            Ok(settings) => panic!("expected an error, got {settings:?}"),
            Err(error) => error.to_string(),
        }
    }

    fn parse_error(options: &str) -> String {
        match MountOptions::parse(options) {
            Ok(parsed) => panic!("expected an error for {options:?}, got {parsed:?}"),
            Err(error) => error.to_string(),
        }
    }

    fn assert_mentions(message: &str, parts: &[&str]) {
        assert!(
            !message.contains('\n'),
            "message is not one line: {message}"
        );
        for part in parts {
            assert!(
                message.contains(part),
                "{message:?} does not mention {part:?}"
            );
        }
    }

    #[test]
    fn defaults() {
        let settings = settings("", None, &[]);
        assert_eq!(
            settings,
            Settings {
                node_id: "0123456789abcdef".to_owned(),
                node_name: "Build Box".to_owned(),
                sync_interval: Duration::from_secs(60),
                allow_other: false,
                read_only: false,
                passthrough: true,
                threads: 8,
                log: "info".to_owned(),
                log_file: None,
                state_dir: None,
                watcher: None,
                debounce: Duration::from_millis(1),
                telemetry: Some("127.0.0.1:9900".parse().expect("address")),
                metrics: None,
                replication: Replication {
                    peers: Vec::new(),
                    listen: None,
                    mode: Mode::SendReceive,
                    durability: Durability::Async,
                    key: PathBuf::from(DEFAULT_KEY_PATH),
                    compression: Some(3),
                    keep_versions: Some(30),
                    conflicts: ConflictPolicy::KeepBoth,
                    deletions: DeletionRule::EditWins,
                    stun: Vec::new(),
                    rendezvous: None,
                    upgrade_interval: Duration::from_secs(60),
                },
                config_file: None,
                kernel: KernelFlags::default(),
            }
        );
    }

    #[test]
    fn default_node_id_falls_back_to_the_node_name() {
        let mut host = host(Path::new("/nonexistent/filesync.toml"));
        host.machine_id = Some("uninitialized\n".to_owned());
        assert_eq!(host.default_node_id("Build Box/ü"), "build-box--");
        host.machine_id = None;
        assert_eq!(host.default_node_id("laptop_1"), "laptop_1");
        assert!(is_valid_node_id(&host.default_node_id(&"Ä".repeat(64))));
    }

    #[test]
    fn default_node_name_falls_back_to_filesync() {
        let mut host = host(Path::new("/nonexistent/filesync.toml"));
        host.hostname = Some(String::new());
        assert_eq!(host.default_node_name(), "filesync");
        host.hostname = None;
        assert_eq!(host.default_node_name(), "filesync");
    }

    #[test]
    fn default_threads_are_clamped() {
        let mut host = host(Path::new("/nonexistent/filesync.toml"));
        for (cpus, threads) in [(Some(1), 2), (Some(12), 12), (Some(200), 16), (None, 2)] {
            host.parallelism = cpus;
            assert_eq!(host.default_threads(), threads);
        }
    }

    #[test]
    fn machine_id_must_be_hex() {
        assert_eq!(
            node_id_from_machine_id("0123456789ABCDEF0123\n").as_deref(),
            Some("0123456789abcdef")
        );
        assert_eq!(node_id_from_machine_id("0123456789abcde"), None);
        assert_eq!(node_id_from_machine_id("0123456789abcdefg"), None);
    }

    #[test]
    fn real_host_gives_valid_defaults() {
        let (_dir, path) = settings_dir(None);
        let mut host = Host::probe();
        host.default_config = path;
        let settings =
            resolve_on(&host, &MountOptions::default(), None, &|_| None).expect("defaults resolve");
        assert!(is_valid_node_id(&settings.node_id));
        assert!(is_valid_node_name(&settings.node_name));
        assert!((2..=16).contains(&settings.threads));
    }

    #[test]
    fn node_id_precedence() {
        let file = "[node]\nid = \"from-file\"\n";
        let env = [(ENV_NODE_ID, "from-env")];
        assert_eq!(settings("", None, &env).node_id, "from-env");
        assert_eq!(settings("", Some(file), &env).node_id, "from-file");
        assert_eq!(
            settings("node_id=from-option", Some(file), &env).node_id,
            "from-option"
        );
    }

    #[test]
    fn node_name_precedence() {
        let file = "[node]\nname = \"file name\"\n";
        let env = [(ENV_NODE_NAME, "env name")];
        assert_eq!(settings("", None, &env).node_name, "env name");
        assert_eq!(settings("", Some(file), &env).node_name, "file name");
        assert_eq!(
            settings("node_name=option name", Some(file), &env).node_name,
            "option name"
        );
    }

    #[test]
    fn default_node_id_follows_the_resolved_name() {
        let mut host = host(Path::new("/nonexistent/filesync.toml"));
        host.machine_id = None;
        let options = MountOptions::parse("node_name=My Laptop").expect("valid options");
        let settings = resolve_on(&host, &options, None, &|_| None).expect("resolves");
        assert_eq!(settings.node_id, "my-laptop");
    }

    #[test]
    fn sync_interval_precedence() {
        let file = "[sync]\ninterval = 30\n";
        let env = [(ENV_SYNC_INTERVAL, "20")];
        let interval = |o, f, e| settings(o, f, e).sync_interval.as_secs();
        assert_eq!(interval("", None, &env), 20);
        assert_eq!(interval("", Some(file), &env), 30);
        assert_eq!(interval("sync_interval=0", Some(file), &env), 0);
    }

    #[test]
    fn mount_section_precedence() {
        let file = "[mount]\nallow_other = true\nread_only = true\npassthrough = false\n\
                    threads = 3\nlog = \"debug\"\nlog_file = \"/var/log/file.log\"\n";
        let from_file = settings("", Some(file), &[]);
        assert!(from_file.allow_other);
        assert!(from_file.read_only);
        assert!(!from_file.passthrough);
        assert_eq!(from_file.threads, 3);
        assert_eq!(from_file.log, "debug");
        assert_eq!(
            from_file.log_file.as_deref(),
            Some(Path::new("/var/log/file.log"))
        );

        let options = "rw,passthrough=on,threads=5,log=warn,log_file=/tmp/option.log";
        let from_options = settings(options, Some(file), &[]);
        assert!(!from_options.read_only);
        assert!(from_options.passthrough);
        assert_eq!(from_options.threads, 5);
        assert_eq!(from_options.log, "warn");
        assert_eq!(
            from_options.log_file.as_deref(),
            Some(Path::new("/tmp/option.log"))
        );

        let file = "[mount]\nallow_other = false\nread_only = false\n";
        let flags = settings("allow_other,ro", Some(file), &[]);
        assert!(flags.allow_other);
        assert!(flags.read_only);
    }

    #[test]
    fn state_dir_precedence() {
        let file = "[mount]\nstate_dir = \"/srv/filesync/state\"\n";
        let state_dir = |o, f| settings(o, f, &[]).state_dir;
        assert_eq!(state_dir("", None), None);
        assert_eq!(
            state_dir("", Some(file)),
            Some(PathBuf::from("/srv/filesync/state"))
        );
        assert_eq!(
            state_dir("state_dir=/var/lib/f", Some(file)),
            Some(PathBuf::from("/var/lib/f"))
        );
    }

    #[test]
    fn watcher_precedence() {
        let file = "[capture]\nwatcher = \"fanotify\"\n";
        let watcher = |o, f| settings(o, f, &[]).watcher;
        assert_eq!(watcher("", None), None);
        assert_eq!(watcher("", Some(file)), Some(WatcherKind::Fanotify));
        assert_eq!(watcher("watcher=scan", Some(file)), Some(WatcherKind::Scan));
        // `auto` given as an option overrides a kind in the file.
        assert_eq!(watcher("watcher=auto", Some(file)), None);
        let auto_in_file = "[capture]\nwatcher = \"auto\"\n";
        assert_eq!(
            watcher("watcher=ebpf", Some(auto_in_file)),
            Some(WatcherKind::Ebpf)
        );
    }

    #[test]
    fn watcher_words() {
        for (word, kind) in [
            ("auto", None),
            ("ebpf", Some(WatcherKind::Ebpf)),
            ("eBPF", Some(WatcherKind::Ebpf)),
            ("fanotify", Some(WatcherKind::Fanotify)),
            ("inotify", Some(WatcherKind::Inotify)),
            ("scan", Some(WatcherKind::Scan)),
        ] {
            let parsed = MountOptions::parse(&format!("watcher={word}")).expect("valid");
            assert_eq!(parsed.watcher, Some(kind), "{word}");
        }
        assert_eq!(
            parse_error("watcher=kqueue"),
            "invalid value 'kqueue' for mount option 'watcher': expected auto, ebpf, \
             fanotify, inotify or scan"
        );
        assert_mentions(&parse_error("watcher"), &["watcher=KIND"]);
    }

    #[test]
    fn debounce_precedence() {
        let file = "[capture]\ndebounce_us = 5000\n";
        let debounce = |o, f| settings(o, f, &[]).debounce;
        assert_eq!(debounce("", None), Duration::from_micros(1000));
        assert_eq!(debounce("", Some(file)), Duration::from_millis(5));
        assert_eq!(debounce("debounce_us=0", Some(file)), Duration::ZERO);
        assert_eq!(
            debounce("debounce_us=1000000", None),
            Duration::from_secs(1)
        );
        assert_eq!(
            debounce("", Some("[capture]\ndebounce_us = \"250\"\n")),
            Duration::from_micros(250)
        );
    }

    #[test]
    fn telemetry_precedence() {
        let address = |text: &str| Some(text.parse::<SocketAddr>().expect("address"));
        let file = "[telemetry]\nlisten = \"127.0.0.1:9911\"\n";
        let telemetry = |o, f| settings(o, f, &[]).telemetry;
        assert_eq!(telemetry("", None), address("127.0.0.1:9900"));
        assert_eq!(telemetry("", Some(file)), address("127.0.0.1:9911"));
        assert_eq!(
            telemetry("telemetry=[::1]:9922", Some(file)),
            address("[::1]:9922")
        );
        assert_eq!(telemetry("telemetry=off", Some(file)), None);
        assert_eq!(telemetry("telemetry=OFF", None), None);
        let off_in_file = "[telemetry]\nlisten = \"off\"\n";
        assert_eq!(telemetry("", Some(off_in_file)), None);
        assert_eq!(
            telemetry("telemetry=127.0.0.1:9933", Some(off_in_file)),
            address("127.0.0.1:9933")
        );
    }

    #[test]
    fn metrics_is_off_unless_asked_for() {
        let address = |text: &str| Some(text.parse::<SocketAddr>().expect("address"));
        let file = "[metrics]\nlisten = \"127.0.0.1:9911\"\n";
        let metrics = |o, f| settings(o, f, &[]).metrics;
        assert_eq!(metrics("", None), None);
        assert_eq!(metrics("", Some(file)), address("127.0.0.1:9911"));
        assert_eq!(
            metrics("metrics=[::1]:9922", Some(file)),
            address("[::1]:9922")
        );
        assert_eq!(metrics("metrics=off", Some(file)), None);
        assert_eq!(
            metrics("metrics=0.0.0.0:9901", None),
            address("0.0.0.0:9901")
        );
        assert_mentions(
            &parse_error("metrics=localhost:9901"),
            &["'metrics'", "127.0.0.1:9901"],
        );
        assert_mentions(
            &error("", Some("[metrics]\nlisten = 9901\n"), &[]),
            &["'[metrics].listen'"],
        );
    }

    #[test]
    fn telemetry_accepts_addresses_beyond_loopback() {
        let telemetry = |o| settings(o, None, &[]).telemetry;
        assert_eq!(
            telemetry("telemetry=0.0.0.0:9900"),
            Some("0.0.0.0:9900".parse().expect("address"))
        );
        assert_eq!(
            telemetry("telemetry=[::]:80"),
            Some("[::]:80".parse().expect("address"))
        );
        assert_eq!(
            parse_error("telemetry=127.0.0.1:0"),
            "invalid value '127.0.0.1:0' for mount option 'telemetry': expected off, or an IP \
             address and a port from 1 to 65535 such as 127.0.0.1:9900 or [::1]:9900"
        );
    }

    #[test]
    fn new_sections_in_one_file() {
        let file = "[mount]\nstate_dir = \"/var/lib/filesync/data\"\n\n[capture]\n\
                    watcher = \"inotify\"\ndebounce_us = 2500\n\n[telemetry]\nlisten = \"off\"\n";
        let settings = settings("", Some(file), &[]);
        assert_eq!(
            settings.state_dir.as_deref(),
            Some(Path::new("/var/lib/filesync/data"))
        );
        assert_eq!(settings.watcher, Some(WatcherKind::Inotify));
        assert_eq!(settings.debounce, Duration::from_micros(2500));
        assert_eq!(settings.telemetry, None);
    }

    #[test]
    fn module_docs_example_is_valid() {
        let docs = include_str!("config.rs");
        let start = docs.find("//! ```toml\n").expect("example start") + "//! ```toml\n".len();
        let end = start + docs[start..].find("//! ```").expect("example end");
        let example: String = docs[start..end]
            .lines()
            .map(|line| line.strip_prefix("//!").unwrap_or(line).trim_start())
            .map(|line| format!("{line}\n"))
            .collect();
        let settings = settings("", Some(&example), &[]);
        assert_eq!(settings.node_id, "laptop-1");
        assert_eq!(settings.watcher, None);
        assert_eq!(settings.debounce, Duration::from_millis(1));
        assert_eq!(
            settings.telemetry,
            Some("127.0.0.1:9900".parse().expect("address"))
        );
    }

    #[test]
    fn unknown_capture_and_telemetry_keys() {
        let message = error("", Some("[capture]\nwatch = \"ebpf\"\n"), &[]);
        assert_mentions(
            &message,
            &["filesync.toml", "line 2", "watch", "watcher", "debounce_us"],
        );
        let message = error("", Some("[telemetry]\naddress = \"off\"\n"), &[]);
        assert_mentions(&message, &["filesync.toml", "line 2", "address", "listen"]);
        let message = error("", Some("telemetry = \"off\"\n"), &[]);
        assert_mentions(&message, &["filesync.toml", "line 1", "[telemetry] table"]);
    }

    #[test]
    fn settings_file_accepts_option_text() {
        let file = "[sync]\ninterval = \"45\"\n[mount]\npassthrough = \"off\"\nthreads = \"6\"\n";
        let settings = settings("", Some(file), &[]);
        assert_eq!(settings.sync_interval, Duration::from_secs(45));
        assert!(!settings.passthrough);
        assert_eq!(settings.threads, 6);
    }

    #[test]
    fn empty_environment_variables_are_unset() {
        let env = [
            (ENV_NODE_ID, ""),
            (ENV_NODE_NAME, ""),
            (ENV_SYNC_INTERVAL, ""),
        ];
        let settings = settings("", None, &env);
        assert_eq!(settings.node_id, "0123456789abcdef");
        assert_eq!(settings.node_name, "Build Box");
        assert_eq!(settings.sync_interval, Duration::from_secs(60));
    }

    #[test]
    fn standard_options_are_ignored_or_passed_to_the_kernel() {
        let parsed = MountOptions::parse("rw,nosuid,nodev,_netdev,x-systemd.automount,defaults")
            .expect("standard options");
        assert_eq!(
            parsed,
            MountOptions {
                read_only: Some(false),
                kernel: KernelFlags {
                    suid: Some(false),
                    dev: Some(false),
                    ..KernelFlags::default()
                },
                ..MountOptions::default()
            }
        );
        let parsed = MountOptions::parse("noexec,noatime,sync,dirsync,exec").expect("flags");
        assert_eq!(
            parsed.kernel,
            KernelFlags {
                exec: Some(true),
                atime: Some(false),
                sync: Some(true),
                dirsync: Some(true),
                ..KernelFlags::default()
            }
        );
        assert_mentions(
            &parse_error("rw,lazytime"),
            &["'lazytime'", "not supported"],
        );
        let parsed = MountOptions::parse(
            "user=alice,comment=x,fsname=filesync,subtype=filesync,X-mount.mkdir,\
             x-systemd.requires=network.target,default_permissions,relatime",
        )
        .expect("standard options with values");
        assert_eq!(parsed, MountOptions::default());
    }

    #[test]
    fn replication_options() {
        let parsed = MountOptions::parse(
            "peer=AAAA-BBBB@10.0.0.2:7878,peer=CCCC,listen=0.0.0.0:7878,mode=receiveonly,\
             durability=sync,key=/etc/k,compression=off,peer=AAAA-BBBB@[::1]:9",
        )
        .expect("valid options");
        assert_eq!(
            parsed.peers,
            vec![
                PeerSpec {
                    id: "CCCC".to_owned(),
                    address: None
                },
                PeerSpec {
                    id: "AAAA-BBBB".to_owned(),
                    address: Some("[::1]:9".to_owned())
                },
            ]
        );
        assert_eq!(
            parsed.listen,
            Some(Some("0.0.0.0:7878".parse().expect("address")))
        );
        assert_eq!(parsed.mode, Some(Mode::ReceiveOnly));
        assert_eq!(parsed.durability, Some(Durability::Sync));
        assert_eq!(parsed.key, Some(PathBuf::from("/etc/k")));
        assert_eq!(parsed.compression, Some(None));
        for bad in [
            "peer=",
            "peer=AB@host",
            "peer=AB@host:0",
            "peer=A/B",
            "peer=AB@:77",
            "listen=7878",
            "listen=localhost:7878",
            "mode=mirror",
            "durability=always",
            "key=relative",
            "compression=20",
            "compression=0",
        ] {
            let message = parse_error(bad);
            let name = bad.split('=').next().unwrap_or(bad);
            assert!(message.contains(name), "{bad}: {message}");
        }
    }

    #[test]
    fn stun_servers_from_every_source() {
        let parsed =
            MountOptions::parse("stun=198.18.0.1:3478,stun=[::1]:3478,stun=198.18.0.1:3478")
                .expect("valid options");
        assert_eq!(parsed.stun, vec!["198.18.0.1:3478", "[::1]:3478"]);
        let file = "[replication]\nstun = [\"stun.example.org:3478\", \"198.18.0.1:3478\"]\n";
        let replication = settings("stun=198.18.0.3:3478", Some(file), &[]).replication;
        assert_eq!(
            replication.stun,
            vec![
                "stun.example.org:3478",
                "198.18.0.1:3478",
                "198.18.0.3:3478"
            ]
        );
        for bad in [
            "stun=",
            "stun=host",
            "stun=host:0",
            "stun=:3478",
            "stun=a b:1",
        ] {
            assert_mentions(&parse_error(bad), &["stun", "HOST:PORT"]);
        }
        let message = error("", Some("[replication]\nstun = [3478]\n"), &[]);
        assert_mentions(&message, &["[replication].stun", "HOST:PORT"]);
    }

    #[test]
    fn rendezvous_and_upgrade_interval_from_options_and_file() {
        let replication = settings(
            "rendezvous=AAAA-BBBB@198.18.0.1:7879,upgrade_interval=5",
            None,
            &[],
        )
        .replication;
        let rendezvous = replication.rendezvous.clone().expect("a rendezvous");
        assert_eq!(rendezvous.id, "AAAA-BBBB");
        assert_eq!(rendezvous.address.as_deref(), Some("198.18.0.1:7879"));
        assert_eq!(replication.upgrade_interval, Duration::from_secs(5));
        assert!(replication.is_enabled());
        let file =
            "[replication]\nrendezvous = \"CCCC@rv.example.org:7879\"\nupgrade_interval = 0\n";
        let replication = settings("", Some(file), &[]).replication;
        assert_eq!(
            replication
                .rendezvous
                .and_then(|spec| spec.address)
                .as_deref(),
            Some("rv.example.org:7879")
        );
        assert_eq!(replication.upgrade_interval, Duration::ZERO);
        assert_eq!(
            settings("", None, &[]).replication.upgrade_interval,
            Duration::from_secs(60)
        );
        for bad in [
            "rendezvous=",
            "rendezvous=AAAA",
            "rendezvous=AAAA@host",
            "rendezvous=@h:1",
        ] {
            assert_mentions(&parse_error(bad), &["rendezvous", "@HOST:PORT"]);
        }
        assert_mentions(&parse_error("upgrade_interval=soon"), &["upgrade_interval"]);
        let message = error("", Some("[replication]\nrendezvous = 7879\n"), &[]);
        assert_mentions(&message, &["[replication].rendezvous"]);
    }

    #[test]
    fn replication_section_and_peers_from_every_source() {
        let file =
            "[replication]\npeers = [\"AAAA@10.0.0.1:1\", \"BBBB\"]\nlisten = \"127.0.0.1:7000\"\n\
                    mode = \"sendonly\"\ndurability = \"sync\"\ncompression = 9\n";
        let replication = settings("peer=BBBB@10.0.0.3:3", Some(file), &[]).replication;
        assert_eq!(replication.peers.len(), 2);
        assert_eq!(replication.peers[1].address.as_deref(), Some("10.0.0.3:3"));
        assert_eq!(
            replication.listen,
            Some("127.0.0.1:7000".parse().expect("address"))
        );
        assert_eq!(replication.mode, Mode::SendOnly);
        assert_eq!(replication.durability, Durability::Sync);
        assert_eq!(replication.compression, Some(9));
        assert!(replication.is_enabled());
        let message = error("", Some("[replication]\nmode = \"both\"\n"), &[]);
        assert_mentions(&message, &["[replication].mode", "sendreceive"]);
        assert!(!settings("", None, &[]).replication.is_enabled());
    }

    #[test]
    fn parses_every_option() {
        let parsed = MountOptions::parse(
            "node_id=n-1,node_name=Node 1,sync_interval=10,allow_other,ro,passthrough=no,\
             threads=4,log=\"filesync=debug,fuser=warn\",log_file=/tmp/l.log,config=/etc/f.toml,\
             state_dir=/var/lib/f,watcher=inotify,debounce_us=250,telemetry=[::1]:9901",
        )
        .expect("valid options");
        assert_eq!(
            parsed,
            MountOptions {
                node_id: Some("n-1".to_owned()),
                node_name: Some("Node 1".to_owned()),
                sync_interval: Some(Duration::from_secs(10)),
                allow_other: Some(true),
                read_only: Some(true),
                passthrough: Some(false),
                threads: Some(4),
                log: Some("filesync=debug,fuser=warn".to_owned()),
                log_file: Some(PathBuf::from("/tmp/l.log")),
                state_dir: Some(PathBuf::from("/var/lib/f")),
                watcher: Some(Some(WatcherKind::Inotify)),
                debounce: Some(Duration::from_micros(250)),
                telemetry: Some(Some("[::1]:9901".parse().expect("address"))),
                config: Some(PathBuf::from("/etc/f.toml")),
                kernel: KernelFlags::default(),
                ..MountOptions::default()
            }
        );
    }

    #[test]
    fn empty_items_are_ignored_and_later_options_win() {
        let parsed = MountOptions::parse(",ro,,threads=2,,rw,threads=3,").expect("valid options");
        assert_eq!(parsed.read_only, Some(false));
        assert_eq!(parsed.threads, Some(3));
        assert_eq!(
            MountOptions::parse("").expect("empty"),
            MountOptions::default()
        );
    }

    #[test]
    fn merge_prefers_later() {
        let first = MountOptions::parse(
            "threads=2,ro,node_name=a,watcher=ebpf,telemetry=127.0.0.1:1,debounce_us=7,\
             state_dir=/a",
        )
        .expect("valid");
        let second = MountOptions::parse("threads=3,watcher=auto,telemetry=off,state_dir=/b")
            .expect("valid");
        let merged = first.merge(second);
        assert_eq!(merged.threads, Some(3));
        assert_eq!(merged.read_only, Some(true));
        assert_eq!(merged.node_name.as_deref(), Some("a"));
        assert_eq!(merged.watcher, Some(None));
        assert_eq!(merged.telemetry, Some(None));
        assert_eq!(merged.debounce, Some(Duration::from_micros(7)));
        assert_eq!(merged.state_dir.as_deref(), Some(Path::new("/b")));
    }

    #[test]
    fn passthrough_words() {
        for (word, on) in [
            ("on", true),
            ("off", false),
            ("true", true),
            ("false", false),
            ("yes", true),
            ("no", false),
            ("1", true),
            ("0", false),
        ] {
            let parsed = MountOptions::parse(&format!("passthrough={word}")).expect("valid");
            assert_eq!(parsed.passthrough, Some(on), "{word}");
        }
    }

    #[test]
    fn unknown_option() {
        let message = parse_error("ro,colour=red");
        assert_mentions(
            &message,
            &[
                "unknown mount option 'colour=red'",
                "node_id",
                "sync_interval",
                "watcher",
                "debounce_us",
                "telemetry",
                "state_dir",
                "--help",
            ],
        );
        assert_mentions(&parse_error("loop"), &["'loop'"]);
    }

    #[test]
    fn flag_with_value() {
        assert_mentions(
            &parse_error("allow_other=3"),
            &["'allow_other'", "'allow_other=3'", "takes no value"],
        );
        assert_mentions(&parse_error("ro=1"), &["'ro'", "takes no value"]);
        assert_mentions(&parse_error("nosuid=yes"), &["'nosuid'", "takes no value"]);
    }

    #[test]
    fn key_without_value() {
        for options in ["node_name", "node_name="] {
            assert_mentions(
                &parse_error(options),
                &["'node_name'", "needs a value", "node_name=NAME"],
            );
        }
        assert_mentions(&parse_error("threads"), &["threads=N"]);
    }

    #[test]
    fn values_are_shown_as_written_on_one_line() {
        let message = error("", Some("[node]\nid = \"a b\""), &[]);
        assert!(
            message.starts_with("invalid value '\"a b\"' for settings key '[node].id' in /"),
            "{message}"
        );
        let message = error("", None, &[(ENV_NODE_NAME, "a\u{1b}b\n")]);
        assert!(
            message.starts_with("invalid value 'a\\u{1b}b\\n' for environment variable"),
            "{message}"
        );
    }

    #[test]
    fn unterminated_quote() {
        assert_mentions(&parse_error("log=\"info,ro"), &["unterminated", "quote"]);
    }

    #[test]
    fn invalid_mount_option_values() {
        let long_id = format!("node_id={}", "a".repeat(65));
        let cases = [
            ("node_id=bad id", "'node_id'", "A-Z, a-z, 0-9"),
            (long_id.as_str(), "'node_id'", "1 to 64"),
            ("node_name=a/b", "'node_name'", "without '/'"),
            ("node_name=a\tb", "'node_name'", "printable"),
            ("sync_interval=abc", "'sync_interval'", "0 to 86400"),
            ("sync_interval=86401", "'sync_interval'", "0 to 86400"),
            ("sync_interval=-1", "'sync_interval'", "0 to 86400"),
            ("threads=0", "'threads'", "1 to 64"),
            ("threads=65", "'threads'", "1 to 64"),
            ("passthrough=maybe", "'passthrough'", "on or off"),
            ("log_file=relative.log", "'log_file'", "absolute path"),
            ("config=etc/filesync.toml", "'config'", "absolute path"),
            ("state_dir=var/lib/f", "'state_dir'", "absolute path"),
            ("watcher=kqueue", "'watcher'", EXPECT_WATCHER),
            ("debounce_us=1000001", "'debounce_us'", "0 to 1000000"),
            ("debounce_us=1ms", "'debounce_us'", "0 to 1000000"),
            ("debounce_us=-1", "'debounce_us'", "0 to 1000000"),
            ("telemetry=9900", "'telemetry'", "port from 1 to 65535"),
            ("telemetry=localhost:9900", "'telemetry'", "IP address"),
            (
                "telemetry=127.0.0.1:0",
                "'telemetry'",
                "port from 1 to 65535",
            ),
            (
                "telemetry=127.0.0.1:65536",
                "'telemetry'",
                "port from 1 to 65535",
            ),
            ("telemetry=::1:9900", "'telemetry'", "[::1]:9900"),
            ("telemetry=on", "'telemetry'", "off, or"),
        ];
        for (options, key, expected) in cases {
            let message = parse_error(options);
            assert_mentions(&message, &["invalid value", "mount option", key, expected]);
        }
        assert_eq!(
            parse_error("sync_interval=abc"),
            "invalid value 'abc' for mount option 'sync_interval': expected whole seconds \
             from 0 to 86400 (0 disables the periodic scan)"
        );
    }

    #[test]
    fn invalid_settings_values() {
        let cases = [
            ("[node]\nid = \"a b\"", "'[node].id'", "A-Z, a-z, 0-9"),
            ("[node]\nid = 5", "'[node].id'", "A-Z, a-z, 0-9"),
            ("[node]\nname = \"\"", "'[node].name'", "printable"),
            (
                "[sync]\ninterval = 100000",
                "'[sync].interval'",
                "0 to 86400",
            ),
            ("[sync]\ninterval = 1.5", "'[sync].interval'", "0 to 86400"),
            (
                "[mount]\nallow_other = 2",
                "'[mount].allow_other'",
                "on or off",
            ),
            (
                "[mount]\nread_only = \"perhaps\"",
                "'[mount].read_only'",
                "on or off",
            ),
            (
                "[mount]\npassthrough = []",
                "'[mount].passthrough'",
                "on or off",
            ),
            ("[mount]\nthreads = 65", "'[mount].threads'", "1 to 64"),
            ("[mount]\nlog = \"\"", "'[mount].log'", "tracing filter"),
            (
                "[mount]\nlog_file = \"x.log\"",
                "'[mount].log_file'",
                "absolute path",
            ),
            (
                "[mount]\nstate_dir = \"state\"",
                "'[mount].state_dir'",
                "absolute path",
            ),
            (
                "[capture]\nwatcher = \"poll\"",
                "'[capture].watcher'",
                EXPECT_WATCHER,
            ),
            (
                "[capture]\nwatcher = true",
                "'[capture].watcher'",
                EXPECT_WATCHER,
            ),
            (
                "[capture]\ndebounce_us = 2000000",
                "'[capture].debounce_us'",
                "0 to 1000000",
            ),
            (
                "[capture]\ndebounce_us = 0.5",
                "'[capture].debounce_us'",
                "0 to 1000000",
            ),
            (
                "[telemetry]\nlisten = \"127.0.0.1\"",
                "'[telemetry].listen'",
                "port from 1 to 65535",
            ),
            (
                "[telemetry]\nlisten = 9900",
                "'[telemetry].listen'",
                "port from 1 to 65535",
            ),
            (
                "[telemetry]\nlisten = false",
                "'[telemetry].listen'",
                "off, or",
            ),
        ];
        for (file, key, expected) in cases {
            let message = error("", Some(file), &[]);
            assert_mentions(
                &message,
                &[
                    "invalid value",
                    "settings key",
                    key,
                    "filesync.toml",
                    expected,
                ],
            );
        }
    }

    #[test]
    fn invalid_environment_values() {
        let cases = [
            (ENV_NODE_ID, "a/b", "A-Z, a-z, 0-9"),
            (ENV_NODE_NAME, "a\nb", "printable"),
            (ENV_SYNC_INTERVAL, "1m", "0 to 86400"),
        ];
        for (name, value, expected) in cases {
            let message = error("", None, &[(name, value)]);
            assert_mentions(
                &message,
                &["invalid value", "environment variable", name, expected],
            );
        }
    }

    #[test]
    fn unknown_settings_key() {
        let message = error("", Some("[mount]\nthreads = 2\ncolour = \"red\"\n"), &[]);
        assert_mentions(
            &message,
            &[
                "filesync.toml",
                "line 3",
                "colour",
                "allow_other",
                "read_only",
            ],
        );
    }

    #[test]
    fn unknown_settings_section() {
        let message = error("", Some("[node]\nid = \"a\"\n\n[peers]\nx = 1\n"), &[]);
        assert_mentions(
            &message,
            &["filesync.toml", "line 4", "peers", "node", "mount"],
        );
    }

    #[test]
    fn section_of_the_wrong_type() {
        let message = error("", Some("node = 5\n"), &[]);
        assert_mentions(&message, &["filesync.toml", "line 1", "[node] table"]);
    }

    #[test]
    fn invalid_toml() {
        let message = error("", Some("[node\nid = \"a\"\n"), &[]);
        assert_mentions(
            &message,
            &["invalid settings file", "filesync.toml", "line 1"],
        );
    }

    #[test]
    fn explicit_config_must_exist() {
        let (_dir, missing) = settings_dir(None);
        let host = host(Path::new("/nonexistent/filesync.toml"));
        let options = MountOptions::default();
        let message = match resolve_on(&host, &options, Some(&missing), &|_| None) {
            Ok(settings) => panic!("expected an error, got {settings:?}"),
            Err(error) => error.to_string(),
        };
        assert_mentions(&message, &["does not exist", "filesync.toml", "--config"]);

        let options = MountOptions {
            config: Some(missing.clone()),
            ..MountOptions::default()
        };
        assert!(matches!(
            resolve_on(&host, &options, None, &|_| None),
            Err(ConfigError::SettingsMissing { .. })
        ));
    }

    #[test]
    fn implicit_config_may_be_missing() {
        assert_eq!(settings("", None, &[]).config_file, None);
    }

    #[test]
    fn config_file_choice() {
        let (_cli_dir, cli) = settings_dir(Some("[mount]\nthreads = 11\n"));
        let (_option_dir, option) = settings_dir(Some("[mount]\nthreads = 12\n"));
        let (_default_dir, default) = settings_dir(Some("[mount]\nthreads = 13\n"));
        let host = host(&default);
        let with_option = MountOptions {
            config: Some(option.clone()),
            ..MountOptions::default()
        };
        let resolve = |options: &MountOptions, cli: Option<&Path>| {
            resolve_on(&host, options, cli, &|_| None).expect("resolves")
        };

        let settings = resolve(&with_option, Some(&cli));
        assert_eq!((settings.threads, settings.config_file), (11, Some(cli)));
        let settings = resolve(&with_option, None);
        assert_eq!((settings.threads, settings.config_file), (12, Some(option)));
        let settings = resolve(&MountOptions::default(), None);
        assert_eq!(
            (settings.threads, settings.config_file),
            (13, Some(default))
        );
    }

    #[test]
    fn unreadable_config_is_an_error() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let host = host(dir.path());
        let message = match resolve_on(&host, &MountOptions::default(), None, &|_| None) {
            Ok(settings) => panic!("expected an error, got {settings:?}"),
            Err(error) => error.to_string(),
        };
        assert_mentions(&message, &["cannot read settings file", "readable"]);
    }
}
