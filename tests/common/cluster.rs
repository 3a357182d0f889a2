//! Several filesync nodes on one machine for the replication tests: each node has its own
//! backing folder, mount point, state folder and key, and may run inside a network namespace
//! of its own ([`Net`]), joined only for networking (`nsenter --net`), so its mount stays
//! visible to the test.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{
    mkdir_mode, mount_type, open_tempdir, run, unmount, wait_child, BIN, MOUNT_TIMEOUT, POLL,
};

/// Whether network namespaces can be made here (root and `ip`). Like
/// [`super::fuse_available`], a missing facility fails under `CI` and skips elsewhere.
pub fn netns_available() -> bool {
    if !super::fuse_available() {
        return false;
    }
    let ok = Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "replication tests need `ip netns` (iproute2) as root; CI is set, so this is a failure"
        );
    }
    eprintln!("SKIP: replication tests need `ip netns` (iproute2) as root");
    false
}

static NEXT_NET: AtomicU32 = AtomicU32::new(0);

/// Two network namespaces joined by a veth pair: `a` is 198.18.0.1, `b` is 198.18.0.2
/// (a benchmarking range that never leaves the namespaces). Deleted on drop.
pub struct Net {
    pub a: String,
    pub b: String,
}

/// The address of namespace `a` and `b` of a [`Net`].
pub const ADDR_A: &str = "198.18.0.1";
pub const ADDR_B: &str = "198.18.0.2";

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args), Duration::from_secs(10)).expect_ok(&format!("ip {args:?}"));
}

impl Net {
    pub fn pair() -> Net {
        let n = NEXT_NET.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}-{n}", std::process::id());
        let net = Net {
            a: format!("fsa-{tag}"),
            b: format!("fsb-{tag}"),
        };
        ip(&["netns", "add", &net.a]);
        ip(&["netns", "add", &net.b]);
        ip(&[
            "-n", &net.a, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns",
            &net.b,
        ]);
        ip(&[
            "-n",
            &net.a,
            "addr",
            "add",
            &format!("{ADDR_A}/24"),
            "dev",
            "veth0",
        ]);
        ip(&[
            "-n",
            &net.b,
            "addr",
            "add",
            &format!("{ADDR_B}/24"),
            "dev",
            "veth1",
        ]);
        for (ns, dev) in [(&net.a, "veth0"), (&net.b, "veth1")] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        net
    }

    /// Takes the link down (both ends), as if the cable were pulled.
    pub fn cut(&self) {
        ip(&["-n", &self.a, "link", "set", "veth0", "down"]);
    }

    pub fn heal(&self) {
        ip(&["-n", &self.a, "link", "set", "veth0", "up"]);
        ip(&["-n", &self.b, "link", "set", "veth1", "up"]);
    }

    /// Bytes namespace `a` has sent on the link so far (IP payload and headers).
    pub fn bytes_sent_by_a(&self) -> u64 {
        let out = run(
            Command::new("ip").args(["-n", &self.a, "-s", "-j", "link", "show", "veth0"]),
            Duration::from_secs(10),
        );
        let json: serde_json::Value = serde_json::from_str(&out.stdout).expect("ip -j output");
        json[0]["stats64"]["tx"]["bytes"]
            .as_u64()
            .expect("tx bytes in ip -j output")
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Several network namespaces, one per node, with a veth link of its own between every
/// two of them, so that any one link can be cut: the link between nodes `i < j` is the
/// subnet 198.18.(10 + 10 i + j).0/24, where node `i` is `.1` and node `j` is `.2`.
/// Deleted on drop.
pub struct Mesh {
    names: Vec<String>,
}

impl Mesh {
    /// `n` namespaces (at most 9), each pair linked.
    pub fn new(n: usize) -> Mesh {
        assert!((2..10).contains(&n), "a mesh has 2 to 9 nodes");
        let tag = format!(
            "{}-{}",
            std::process::id(),
            NEXT_NET.fetch_add(1, Ordering::SeqCst)
        );
        let names: Vec<String> = (0..n).map(|i| format!("fsm{i}-{tag}")).collect();
        for name in &names {
            ip(&["netns", "add", name]);
            ip(&["-n", name, "link", "set", "lo", "up"]);
        }
        let mesh = Mesh { names };
        for i in 0..n {
            for j in i + 1..n {
                let (di, dj) = (Mesh::dev(j), Mesh::dev(i));
                ip(&[
                    "-n",
                    &mesh.names[i],
                    "link",
                    "add",
                    &di,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &dj,
                    "netns",
                    &mesh.names[j],
                ]);
                for (ns, dev, me) in [(i, &di, i), (j, &dj, j)] {
                    let addr = format!("{}/24", mesh.addr(me, if me == i { j } else { i }));
                    ip(&["-n", &mesh.names[ns], "addr", "add", &addr, "dev", dev]);
                    ip(&["-n", &mesh.names[ns], "link", "set", dev, "up"]);
                }
            }
        }
        mesh
    }

    /// The device in a namespace that leads to node `other`.
    fn dev(other: usize) -> String {
        format!("to{other}")
    }

    /// Node `i`'s namespace.
    pub fn ns(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Node `i`'s address on its link with node `j`.
    pub fn addr(&self, i: usize, j: usize) -> String {
        let (low, high) = (i.min(j), i.max(j));
        let host = if i == low { 1 } else { 2 };
        format!("198.18.{}.{host}", 10 + 10 * low + high)
    }

    /// Takes the link between `i` and `j` down.
    pub fn cut(&self, i: usize, j: usize) {
        ip(&["-n", &self.names[i], "link", "set", &Mesh::dev(j), "down"]);
    }

    pub fn heal(&self, i: usize, j: usize) {
        ip(&["-n", &self.names[i], "link", "set", &Mesh::dev(j), "up"]);
        ip(&["-n", &self.names[j], "link", "set", &Mesh::dev(i), "up"]);
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// One node: folders, key, and (while started) its `filesync mount --foreground`.
pub struct Node {
    pub name: String,
    pub id: String,
    netns: Option<String>,
    src: PathBuf,
    mnt: PathBuf,
    state: PathBuf,
    key: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    tmp: tempfile::TempDir,
}

impl Node {
    /// A node with fresh folders and a fresh key, not started.
    pub fn new(name: &str, netns: Option<&str>) -> Node {
        let tmp = open_tempdir();
        let src = tmp.path().join("src");
        let mnt = tmp.path().join("mnt");
        let state = tmp.path().join("state");
        mkdir_mode(&src, 0o755);
        mkdir_mode(&mnt, 0o755);
        let key = tmp.path().join("node.key");
        let out = run(
            Command::new(BIN).args(["keygen", "--key"]).arg(&key),
            Duration::from_secs(10),
        );
        out.expect_ok("filesync keygen");
        let id = out
            .stdout
            .lines()
            .map(str::trim)
            .rfind(|line| !line.is_empty())
            .expect("keygen prints the node ID")
            .to_owned();
        Node {
            name: name.to_owned(),
            id,
            netns: netns.map(str::to_owned),
            log: tmp.path().join("daemon.log"),
            src,
            mnt,
            state,
            key,
            child: None,
            tmp,
        }
    }

    pub fn src(&self) -> &Path {
        &self.src
    }

    pub fn mnt(&self) -> &Path {
        &self.mnt
    }

    /// The mount's state folder.
    pub fn state(&self) -> &Path {
        &self.state
    }

    pub fn scratch(&self) -> &Path {
        self.tmp.path()
    }

    /// Mounts with `opts` (besides the node's own state dir and key) and waits until mounted.
    pub fn start(&mut self, opts: &[String]) {
        assert!(
            self.child.is_none(),
            "node {} is already running",
            self.name
        );
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(BIN);
                cmd
            }
            None => Command::new(BIN),
        };
        cmd.arg("mount")
            .arg(&self.src)
            .arg(&self.mnt)
            .arg("--foreground");
        cmd.arg("-o").arg(format!(
            "state_dir={},telemetry=off,key={},node_name={},log=filesync=debug",
            self.state.display(),
            self.key.display(),
            self.name
        ));
        if !opts.is_empty() {
            cmd.arg("-o").arg(opts.join(","));
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open node log");
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawn filesync mount"));
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while mount_type(&self.mnt).as_deref() != Some("fuse.filesync") {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                panic!(
                    "node {} exited with {status} before mounting:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not mount within {MOUNT_TIMEOUT:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Unmounts and waits for the daemon to exit.
    pub fn stop(&mut self) {
        unmount(&self.mnt);
        if let Some(mut child) = self.child.take() {
            if wait_child(&mut child, Duration::from_secs(15)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// `kill -9` of the daemon, then the dead mount is detached so it can be mounted again.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        unmount(&self.mnt);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `filesync status --json` for this node's mount, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = run(
            Command::new(BIN)
                .args(["status", "--json", "--state-dir"])
                .arg(&self.state)
                .arg(&self.mnt),
            Duration::from_secs(20),
        );
        serde_json::from_str(&out.stdout).unwrap_or_else(|err| {
            panic!(
                "status --json printed no JSON ({err}): {}\n{}",
                out.stdout, out.stderr
            )
        })
    }

    /// `peer=ID@ADDR:PORT` to dial this node, or `peer=ID` to accept it.
    pub fn peer_at(&self, address: &str) -> String {
        format!("peer={}@{address}", self.id)
    }

    pub fn peer(&self) -> String {
        format!("peer={}", self.id)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "---- node {} log ----\n{}\n---- end ----",
                self.name,
                self.log()
            );
        }
    }
}

/// What a tree holds, entry by entry, for comparing two nodes: type, permission bits,
/// size, mtime (not for directories, whose times follow their entries), content, link
/// target, extended attributes in the `user.` namespace, and which paths are hard links of
/// one another.
pub fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, String> = BTreeMap::new();
    walk(root, root, &mut out, &mut inodes);
    out
}

fn walk(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<String, String>,
    inodes: &mut BTreeMap<u64, String>,
) {
    let mut entries: Vec<_> = match fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(Result::ok).collect(),
        Err(err) => {
            out.insert(dir.display().to_string(), format!("unreadable: {err}"));
            return;
        }
    };
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .expect("below root")
            .display()
            .to_string();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let ft = meta.file_type();
        let perm = meta.mode() & 0o7777;
        let mut line = if ft.is_dir() {
            format!("dir {perm:o}")
        } else if ft.is_symlink() {
            let target = fs::read_link(&path)
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            format!("link -> {target} mtime {}", meta.mtime())
        } else if ft.is_file() {
            let data = fs::read(&path).unwrap_or_default();
            let mut line = format!(
                "file {perm:o} size {} mtime {}.{:09} data {:016x}",
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec(),
                super::fnv(&data)
            );
            if meta.nlink() > 1 {
                let first = inodes.entry(meta.ino()).or_insert_with(|| rel.clone());
                line.push_str(&format!(" linked-with {first}"));
            }
            line
        } else if ft.is_fifo() {
            format!("fifo {perm:o}")
        } else {
            format!("other {perm:o}")
        };
        line.push_str(&xattrs(&path));
        out.insert(rel, line);
        if ft.is_dir() {
            walk(root, &path, out, inodes);
        }
    }
}

fn xattrs(path: &Path) -> String {
    let out = run(
        Command::new("getfattr")
            .args(["-h", "-d", "-m", "^user\\.", "--absolute-names"])
            .arg(path),
        Duration::from_secs(10),
    );
    let mut attrs: Vec<&str> = out
        .stdout
        .lines()
        .filter(|line| line.starts_with("user."))
        .collect();
    attrs.sort_unstable();
    if attrs.is_empty() {
        String::new()
    } else {
        format!(" xattrs {}", attrs.join(";"))
    }
}

/// Polls `check` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `a` and `b` hold the same tree; panics with the differences otherwise.
pub fn assert_converge(a: &Path, b: &Path, timeout: Duration) {
    if wait_until(timeout, || tree(a) == tree(b)) {
        return;
    }
    let (ta, tb) = (tree(a), tree(b));
    let mut diff = Vec::new();
    for key in ta
        .keys()
        .chain(tb.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        if ta.get(key) != tb.get(key) {
            diff.push(format!(
                "{key}:\n  a: {:?}\n  b: {:?}",
                ta.get(key),
                tb.get(key)
            ));
        }
    }
    panic!(
        "{} and {} did not converge within {timeout:?}:\n{}",
        a.display(),
        b.display(),
        diff.join("\n")
    );
}
