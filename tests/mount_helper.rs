//! The mount(8) integration: `mount -t fuse.filesync`, fstab lines, bad options through mount,
//! the helper's own flags, and `filesync install` / `uninstall`.
//!
//! The system-level cases must not touch the host's /usr/sbin, /etc/fstab, /var/log or
//! /run/mount. Each runs a bash script in a private mount namespace (`unshare --mount
//! --propagation private`) that first overlays a temp folder holding the helper (and a copy of
//! `filesync` next to it) onto /usr/sbin, bind-mounts temp folders over /var/log and
//! /var/lib/filesync (where the detached daemons log and keep their indexes) and puts a tmpfs
//! on /run/mount (libmount's utab). None of that, nor the
//! FUSE mounts made in there, is visible outside. Every script unmounts what it mounted on exit
//! and the Rust side kills any daemon of the test that is still running afterwards, so a failed
//! case leaves nothing behind.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The filesync binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_filesync");
/// Cargo's name for the helper: a dot is not allowed in a binary name.
const HELPER_BUILD_NAME: &str = "mount-fuse-filesync";
/// The name mount(8) looks for in /sbin for `-t fuse.filesync`.
const HELPER_NAME: &str = "mount.fuse.filesync";
/// Upper bound for one script. Each one normally takes about a second; a hung FUSE request
/// would otherwise hang the test forever.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(40);
/// Upper bound for a plain command such as `filesync install`.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// Poll interval for every bounded wait here.
const POLL: Duration = Duration::from_millis(20);

/// The facility check for the cases that mount. Outside CI a machine without root, /dev/fuse
/// or `unshare` skips with a message; under CI (env `CI` set) that is a failure, so CI can
/// never pass by silently skipping.
fn mount_facilities() -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("not running as root".to_owned());
    }
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse is missing".to_owned());
    }
    for tool in ["unshare", "mount", "umount", "bash"] {
        if find_in_path(tool).is_none() {
            missing.push(format!("`{tool}` is not in PATH"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let why = missing.join(", ");
    if std::env::var_os("CI").is_some() {
        panic!("mount helper tests cannot run: {why} (CI is set, so this is a failure)");
    }
    eprintln!("SKIP: mount helper tests need root, /dev/fuse and util-linux unshare: {why}");
    false
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The helper binary. `CARGO_BIN_EXE_*` only covers the root crate, but cargo puts every
/// workspace binary in the same folder.
fn helper_binary() -> PathBuf {
    let helper = Path::new(BIN).with_file_name(HELPER_BUILD_NAME);
    assert!(
        helper.is_file(),
        "mount helper {} is not built; run `cargo build --workspace` (or `cargo test \
         --workspace`) first",
        helper.display()
    );
    helper
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// What one command or script did.
struct Outcome {
    /// `None` when it was killed for running past its time limit.
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn report(&self) -> String {
        let status = match self.status {
            Some(status) => status.to_string(),
            None => "killed after the time limit".to_owned(),
        };
        format!(
            "status: {status}\n--- stdout\n{}--- stderr\n{}",
            self.stdout, self.stderr
        )
    }

    fn succeeded(&self) -> bool {
        self.status.is_some_and(|status| status.success())
    }
}

/// Runs `cmd` with stdout/stderr captured in files under `dir` (files, not pipes, so a chatty
/// child can never block on a full pipe), killing its whole process group at `timeout`.
fn run_bounded(mut cmd: Command, dir: &Path, name: &str, timeout: Duration) -> Outcome {
    let stdout_path = dir.join(format!("{name}.stdout"));
    let stderr_path = dir.join(format!("{name}.stderr"));
    cmd.stdin(Stdio::null())
        .stdout(fs::File::create(&stdout_path).expect("create stdout file"))
        .stderr(fs::File::create(&stderr_path).expect("create stderr file"))
        // Its own group, so a timeout can kill the script and everything it started in one go.
        .process_group(0);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let group = i32::try_from(child.id()).expect("pid fits in i32");
            // SAFETY: kill has no memory preconditions; the group is the one we just created.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            // SIGKILL cannot be ignored, so this wait is short.
            let _ = child.wait();
            break None;
        }
        sleep(POLL);
    };
    let read =
        |path: &Path| String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned();
    Outcome {
        status,
        stdout: read(&stdout_path),
        stderr: read(&stderr_path),
    }
}

/// Shell functions every script starts with. `$T` is the sandbox folder.
const PRELUDE: &str = r#"set -u

fail() { echo "FAIL: $*"; exit 1; }
step() { echo "== $*"; }

# Whether a filesync mount sits exactly at $1.
mounted() { grep -q " $1 fuse.filesync " /proc/mounts; }

# Pids of the filesync processes serving mount point $1: their argv ends in it.
daemon_pids() {
    local f args
    for f in /proc/[0-9]*/cmdline; do
        args=$(tr '\0' ' ' < "$f" 2>/dev/null) || continue
        case "$args" in
            *"filesync mount "*" $1 ") f=${f#/proc/}; echo "${f%/cmdline}" ;;
        esac
    done
}

# A zombie has exited; only its parent has not noticed yet.
alive() { [ -e "/proc/$1" ] && ! grep -qs '^State:[[:space:]]*Z' "/proc/$1/status"; }

# wait_gone SECONDS PID...: whether all PIDs exit within SECONDS.
wait_gone() {
    local limit=$(( $1 * 10 )) i pid any
    shift
    for (( i = 0; i < limit; i++ )); do
        any=0
        for pid in "$@"; do alive "$pid" && any=1; done
        [ "$any" = 0 ] && return 0
        sleep 0.1
    done
    return 1
}

# Unmount whatever the script left mounted, so the daemons exit. Bounded: a dead daemon
# cannot block a lazy detach.
cleanup() {
    local m
    for m in "$T"/mnt*; do
        if grep -q " $m " /proc/mounts; then
            timeout 10 umount "$m" 2>/dev/null || umount -l "$m"
        fi
    done
}
trap 'rc=$?; cleanup; exit $rc' EXIT

# Everything below is private to this mount namespace.
mount -t overlay overlay -o "lowerdir=$T/extra:/usr/sbin" /usr/sbin \
    || fail "cannot overlay the helper onto /usr/sbin (overlay filesystem missing?)"
mount --bind "$T/logs" /var/log || fail "cannot bind $T/logs over /var/log"
# The daemons keep their indexes under /var/lib/filesync; keep them in the sandbox too.
mkdir -p "$T/state" /var/lib/filesync
mount --bind "$T/state" /var/lib/filesync || fail "cannot bind $T/state over /var/lib/filesync"
if [ -d /run/mount ]; then
    mount -t tmpfs tmpfs /run/mount || fail "cannot put a tmpfs on /run/mount"
fi
[ -x /sbin/mount.fuse.filesync ] || fail "helper not visible as /sbin/mount.fuse.filesync"
"#;

/// One test's temp folder: `extra/` (helper + filesync, overlaid onto /usr/sbin), `logs/`
/// (seen as /var/log by the scripts) and whatever `src*`/`mnt*` folders the test makes.
struct Sandbox {
    tmp: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        let helper = helper_binary();
        let tmp = tempfile::Builder::new()
            .prefix("filesync-mh-")
            .tempdir_in("/tmp")
            .expect("create temp dir in /tmp");
        let sandbox = Sandbox { tmp };
        let extra = sandbox.path("extra");
        fs::create_dir(&extra).expect("mkdir extra");
        fs::create_dir(sandbox.path("logs")).expect("mkdir logs");
        // Copies, not links: the helper must find filesync in its own folder, as it does
        // after `filesync install`, not next to the build output.
        for (from, name) in [
            (helper.as_path(), HELPER_NAME),
            (Path::new(BIN), "filesync"),
        ] {
            let to = extra.join(name);
            fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
            fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).expect("chmod copy");
        }
        sandbox
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Creates `name` (e.g. `src`, `mnt2`) and returns its path.
    fn dir(&self, name: &str) -> PathBuf {
        let path = self.path(name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        path
    }

    /// Runs PRELUDE + `body` in a private mount namespace and panics with its output and the
    /// daemon logs unless it exits 0.
    fn run_script(&self, body: &str) {
        let script = self.path("script.sh");
        fs::write(&script, format!("{PRELUDE}\n{body}\nexit 0\n")).expect("write script");
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "bash"])
            .arg(&script)
            .env("T", self.tmp.path());
        let outcome = run_bounded(cmd, self.tmp.path(), "script", SCRIPT_TIMEOUT);
        if !outcome.succeeded() {
            panic!(
                "script in {} failed\n{}{}",
                self.tmp.path().display(),
                outcome.report(),
                self.daemon_logs()
            );
        }
    }

    /// The detached daemons' logs (written under /var/log/filesync inside the namespace).
    fn daemon_logs(&self) -> String {
        let mut text = String::new();
        let Ok(entries) = fs::read_dir(self.path("logs").join("filesync")) else {
            return text;
        };
        for entry in entries.flatten() {
            let body = fs::read_to_string(entry.path()).unwrap_or_default();
            text.push_str(&format!("--- {}\n{body}", entry.path().display()));
        }
        text
    }

    /// Processes whose command line mentions this sandbox: daemons (and, after a timeout,
    /// anything else) this test started. Never this test process itself.
    fn own_processes(&self) -> Vec<i32> {
        let needle = self.tmp.path().as_os_str().as_encoded_bytes().to_vec();
        let me = std::process::id();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != me && self.mentions_sandbox(pid, &needle))
            .filter_map(|pid| i32::try_from(pid).ok())
            .collect()
    }

    fn mentions_sandbox(&self, pid: u32, needle: &[u8]) -> bool {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let zombie = status
            .lines()
            .any(|line| line.starts_with("State:") && line.contains('Z'));
        !zombie && cmdline.windows(needle.len()).any(|w| w == needle)
    }
}

impl Drop for Sandbox {
    /// Ends any daemon the test left running: SIGTERM first (the daemon unmounts itself), then
    /// SIGKILL. Killing the last process of a namespace also drops the mounts made in it.
    fn drop(&mut self) {
        for (signal, grace) in [
            (libc::SIGTERM, Duration::from_secs(3)),
            (libc::SIGKILL, Duration::from_secs(2)),
        ] {
            let pids = self.own_processes();
            if pids.is_empty() {
                return;
            }
            eprintln!("killing leftover processes of this test: {pids:?}");
            for pid in pids {
                // SAFETY: kill has no memory preconditions; the pid was just seen running
                // with this test's unique temp path on its command line.
                unsafe { libc::kill(pid, signal) };
            }
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline && !self.own_processes().is_empty() {
                sleep(POLL);
            }
        }
        // No panic here: Drop may run while the test is already unwinding.
        let left = self.own_processes();
        if !left.is_empty() {
            eprintln!("WARNING: processes {left:?} survived SIGKILL");
        }
    }
}

#[test]
fn mount_type_fuse_filesync_writes_through_and_unmounts() {
    if !mount_facilities() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.dir("src");
    sandbox.dir("mnt");
    sandbox.run_script(
        r#"
step "mount -t fuse.filesync"
mount -t fuse.filesync "$T/src" "$T/mnt" -o node_name=laptop || fail "mount exited $?"
mounted "$T/mnt" || fail "no ' $T/mnt fuse.filesync ' line in /proc/mounts"
pids=$(daemon_pids "$T/mnt")
[ -n "$pids" ] || fail "no filesync daemon serving $T/mnt"
for pid in $pids; do
    # The helper must have run the filesync beside it, not one from /usr/local/bin.
    argv0=$(tr '\0' '\n' < "/proc/$pid/cmdline" | head -n 1)
    [ "$argv0" = /usr/sbin/filesync ] || fail "daemon $pid runs $argv0, not /usr/sbin/filesync"
done

step "write through the mount"
echo hello > "$T/mnt/a.txt" || fail "write to $T/mnt/a.txt failed"
[ "$(cat "$T/src/a.txt")" = hello ] || fail "src/a.txt does not hold hello"

step "umount"
umount "$T/mnt" || fail "umount exited $?"
mounted "$T/mnt" && fail "still mounted after umount"
# shellcheck disable=SC2086 # one word per pid
wait_gone 5 $pids || fail "daemon $pids still running 5 s after umount"
"#,
    );
}

#[test]
fn fstab_lines_mount_with_mount_t_and_mount_a() {
    if !mount_facilities() {
        return;
    }
    let sandbox = Sandbox::new();
    let (src1, mnt1) = (sandbox.dir("src1"), sandbox.dir("mnt1"));
    let (src2, mnt2) = (sandbox.dir("src2"), sandbox.dir("mnt2"));
    // The first line is noauto so only an explicit `mount MNT` mounts it; `mount -a` skips
    // noauto lines, so the second one is auto and must come up with -a.
    let fstab = format!(
        "# filesync test fstab\n\
         {} {} fuse.filesync defaults,_netdev,noauto 0 0\n\
         {} {} fuse.filesync defaults,_netdev,x-systemd.automount,nofail 0 0\n",
        src1.display(),
        mnt1.display(),
        src2.display(),
        mnt2.display()
    );
    fs::write(sandbox.path("fstab"), fstab).expect("write fstab");
    sandbox.run_script(
        r#"
step "mount -T fstab mnt1"
mount -T "$T/fstab" "$T/mnt1" || fail "mount -T fstab mnt1 exited $?"
mounted "$T/mnt1" || fail "mnt1 not mounted"
mounted "$T/mnt2" && fail "mnt2 mounted by 'mount mnt1'"

step "mount -a -T fstab"
mount -a -T "$T/fstab" || fail "mount -a exited $?"
mounted "$T/mnt2" || fail "mnt2 not mounted by mount -a"

step "both work"
echo one > "$T/mnt1/x" || fail "write to mnt1 failed"
echo two > "$T/mnt2/y" || fail "write to mnt2 failed"
[ "$(cat "$T/src1/x")" = one ] || fail "src1/x does not hold one"
[ "$(cat "$T/src2/y")" = two ] || fail "src2/y does not hold two"

step "mount -a again mounts nothing twice"
mount -a -T "$T/fstab" || fail "second mount -a exited $?"
for m in "$T/mnt1" "$T/mnt2"; do
    n=$(grep -c " $m fuse.filesync " /proc/mounts)
    [ "$n" = 1 ] || fail "$m is mounted $n times"
done

step "umount both"
pids="$(daemon_pids "$T/mnt1") $(daemon_pids "$T/mnt2")"
umount "$T/mnt1" "$T/mnt2" || fail "umount exited $?"
mounted "$T/mnt1" && fail "mnt1 still mounted"
mounted "$T/mnt2" && fail "mnt2 still mounted"
# shellcheck disable=SC2086 # one word per pid
wait_gone 5 $pids || fail "daemons still running 5 s after umount"
"#,
    );
}

#[test]
fn bad_option_through_mount_fails_with_one_line() {
    if !mount_facilities() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.dir("src");
    sandbox.dir("mnt");
    sandbox.run_script(
        r#"
step "mount -o colour=red"
mount -t fuse.filesync "$T/src" "$T/mnt" -o colour=red 2> "$T/mount.err"
rc=$?
echo "exit status $rc; stderr:"
cat "$T/mount.err"
# 32 is mount(8)'s "mount failure", which the helper passes on from filesync.
[ "$rc" = 32 ] || fail "expected exit status 32, got $rc"
lines=$(wc -l < "$T/mount.err")
[ "$lines" = 1 ] || fail "expected one line on stderr, got $lines"
grep -q colour "$T/mount.err" || fail "stderr does not name colour"
grep -q " $T/mnt " /proc/mounts && fail "something is mounted at $T/mnt"
[ -z "$(daemon_pids "$T/mnt")" ] || fail "a daemon is running for $T/mnt"
"#,
    );
}

#[test]
fn helper_fake_mounts_nothing_and_verbose_prints_the_command() {
    if !mount_facilities() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.dir("src");
    sandbox.dir("mnt");
    sandbox.run_script(
        r#"
H=/usr/sbin/mount.fuse.filesync

step "helper -f"
"$H" "$T/src" "$T/mnt" -f -o rw,node_name=laptop || fail "helper -f exited $?"
sleep 0.2  # a wrongly started daemon would be mounting by now
grep -q " $T/mnt " /proc/mounts && fail "helper -f mounted something"
[ -z "$(daemon_pids "$T/mnt")" ] || fail "helper -f started a daemon"

step "mount -f (mount passes -f to the helper)"
mount -f -t fuse.filesync "$T/src" "$T/mnt" || fail "mount -f exited $?"
sleep 0.2
grep -q " $T/mnt " /proc/mounts && fail "mount -f mounted something"
[ -z "$(daemon_pids "$T/mnt")" ] || fail "mount -f started a daemon"

step "helper -v"
"$H" "$T/src" "$T/mnt" -v -o rw,node_name=laptop 2> "$T/verbose.err" \
    || fail "helper -v exited $?"
cat "$T/verbose.err"
for part in "running" "/usr/sbin/filesync" '"mount"' "node_name=laptop" "$T/src" "$T/mnt"; do
    grep -qF -- "$part" "$T/verbose.err" || fail "helper -v output does not mention $part"
done
mounted "$T/mnt" || fail "helper -v did not mount"
umount "$T/mnt" || fail "umount exited $?"

step "mount -v (mount passes -v to the helper)"
mount -v -t fuse.filesync "$T/src" "$T/mnt" 2> "$T/mount-verbose.err" \
    || fail "mount -v exited $?"
cat "$T/mount-verbose.err"
grep -qF "mount.fuse.filesync: running" "$T/mount-verbose.err" \
    || fail "mount -v did not show the helper's command"
mounted "$T/mnt" || fail "mount -v did not mount"
umount "$T/mnt" || fail "umount exited $?"
"#,
    );
}

/// Needs neither root nor FUSE: everything goes below a temp root.
#[test]
fn install_and_uninstall_into_a_root() {
    let helper = helper_binary();
    let tmp = tempfile::Builder::new()
        .prefix("filesync-install-")
        .tempdir_in("/tmp")
        .expect("create temp dir");
    let root = tmp.path().join("root");
    let logs = tmp.path();
    let filesync = |verb: &str, name: &str| {
        let mut cmd = Command::new(BIN);
        cmd.arg(verb).arg("--root").arg(&root);
        let outcome = run_bounded(cmd, logs, name, COMMAND_TIMEOUT);
        assert!(
            outcome.succeeded(),
            "filesync {verb} --root failed\n{}",
            outcome.report()
        );
        outcome
    };
    let binary = root.join("usr/local/bin/filesync");
    let installed_helper = root.join("usr/sbin/mount.fuse.filesync");
    let unit = root.join("etc/systemd/system/filesync@.service");
    let config_dir = root.join("etc/filesync");
    let config = config_dir.join("filesync.toml");
    // Completions where Debian's shells look for vendor ones, and one manual page per command.
    let completions = [
        root.join("usr/share/bash-completion/completions/filesync"),
        root.join("usr/share/zsh/vendor-completions/_filesync"),
        root.join("usr/share/fish/vendor_completions.d/filesync.fish"),
    ];
    let man_pages = [
        root.join("usr/share/man/man1/filesync.1"),
        root.join("usr/share/man/man1/filesync-status.1"),
        root.join("usr/share/man/man1/filesync-install.1"),
    ];

    filesync("install", "install1");
    let check_installed = || {
        for file in completions.iter().chain(&man_pages) {
            assert_eq!(mode(file), 0o644, "{}", file.display());
            let text = fs::read_to_string(file).expect("read generated file");
            assert!(
                text.contains("filesync"),
                "{} is empty:\n{text}",
                file.display()
            );
        }
        let page = fs::read_to_string(&man_pages[1]).expect("read page");
        assert!(page.contains(".TH"), "not a manual page:\n{page}");
        assert_eq!(mode(&binary), 0o755, "{}", binary.display());
        assert_eq!(
            mode(&installed_helper),
            0o755,
            "{}",
            installed_helper.display()
        );
        assert_eq!(mode(&unit), 0o644, "{}", unit.display());
        assert_eq!(mode(&config), 0o644, "{}", config.display());
        assert_eq!(mode(&config_dir), 0o755, "{}", config_dir.display());
        // Byte-for-byte copies of the build output, the helper under its mount(8) name.
        let same = |a: &Path, b: &Path| fs::read(a).expect("read") == fs::read(b).expect("read");
        assert!(same(&binary, Path::new(BIN)), "installed binary differs");
        assert!(same(&installed_helper, &helper), "installed helper differs");
        let unit_text = fs::read_to_string(&unit).expect("read unit");
        // --root is a staging root: the unit must name where the binary will live, not the
        // staging path.
        assert!(
            unit_text.contains("/usr/local/bin/filesync"),
            "unit does not run /usr/local/bin/filesync:\n{unit_text}"
        );
        assert!(
            !unit_text.contains(&*root.to_string_lossy()),
            "unit names the staging root:\n{unit_text}"
        );
        // Atomic replacement must not leave its temp files behind.
        for dir in [&binary, &installed_helper, &unit, &config] {
            let dir = dir.parent().expect("parent");
            for entry in fs::read_dir(dir).expect("list dir").flatten() {
                let name = entry.file_name();
                assert!(
                    !name.to_string_lossy().starts_with('.'),
                    "leftover temp file {}",
                    entry.path().display()
                );
            }
        }
    };
    check_installed();

    // The installed helper runs (as mount(8) would start it) and -f is a no-op.
    let mut cmd = Command::new(&installed_helper);
    cmd.args(["/nonexistent-src", "/nonexistent-mnt", "-f"]);
    let fake = run_bounded(cmd, logs, "helper-fake", COMMAND_TIMEOUT);
    assert!(fake.succeeded(), "installed helper -f\n{}", fake.report());

    // A second install replaces the binaries but keeps a config the user edited.
    let edited = "# mine\n[node]\nname = \"kept\"\n";
    fs::write(&config, edited).expect("edit config");
    let again = filesync("install", "install2");
    check_installed();
    assert_eq!(
        fs::read_to_string(&config).expect("read config"),
        edited,
        "reinstall overwrote the user's config"
    );
    assert!(
        again.stdout.contains("kept existing"),
        "reinstall does not say it kept the config:\n{}",
        again.report()
    );

    filesync("uninstall", "uninstall1");
    for gone in [&binary, &installed_helper, &unit]
        .into_iter()
        .chain(&completions)
        .chain(&man_pages)
    {
        assert!(!gone.exists(), "uninstall left {}", gone.display());
    }
    let man1 = root.join("usr/share/man/man1");
    let left: Vec<_> = fs::read_dir(&man1)
        .expect("list man1")
        .flatten()
        .map(|entry| entry.file_name())
        .collect();
    assert!(left.is_empty(), "uninstall left manual pages {left:?}");
    assert_eq!(
        fs::read_to_string(&config).expect("uninstall removed the config"),
        edited
    );
    // Nothing left to remove is not an error.
    filesync("uninstall", "uninstall2");
}
