//! `mount.fuse.filesync`: the helper mount(8) runs for `-t fuse.filesync` and
//! fstab lines of that type. It only translates mount's helper arguments into
//! `filesync mount ...` and execs the real binary, which validates, detaches
//! its daemon and waits for the mount to be live before exiting.

use std::env;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const NAME: &str = "mount.fuse.filesync";

// mount(8) hands the helper's exit status straight back to its caller, so use
// its documented codes: 1 = incorrect invocation, 32 = mount failure.
const EXIT_USAGE: u8 = 1;
const EXIT_MOUNT_FAILED: u8 = 32;

/// Tried after the helper's own folder and `$FILESYNC_BIN`.
const FALLBACK_BINARIES: [&str; 4] = [
    "/usr/local/bin/filesync",
    "/usr/bin/filesync",
    "/usr/local/sbin/filesync",
    "/usr/sbin/filesync",
];

// mount(8) runs helpers without PATH; give filesync one so anything it runs by
// name (fusermount3, modprobe) is still found.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const HELP: &str = "\
mount.fuse.filesync: lets mount(8) and /etc/fstab mount filesync folders.

Usage:
  mount -t fuse.filesync SOURCE MOUNTPOINT [-o OPTIONS]
  mount.fuse.filesync SOURCE MOUNTPOINT [-fnsv] [-o OPTIONS]

fstab:
  /srv/data  /mnt/data  fuse.filesync  allow_other,threads=4  0  0

Runs `filesync mount -o OPTIONS -- SOURCE MOUNTPOINT`, which returns once the
mount is live. -f does nothing and succeeds; -n and -s are ignored; -v prints
the command before running it. Several -o are joined with commas.

Cargo builds this helper as mount-fuse-filesync; `filesync install` puts it in
place as /usr/sbin/mount.fuse.filesync.

filesync is looked for next to this helper, then in $FILESYNC_BIN, then in
/usr/local/bin, /usr/bin, /usr/local/sbin and /usr/sbin.
";

/// What mount(8) asked for.
#[derive(Debug, PartialEq)]
enum Request {
    Help,
    Mount {
        source: OsString,
        target: OsString,
        options: Option<OsString>,
        fake: bool,
        verbose: bool,
    },
}

/// A failure with the exit status mount(8) should report.
struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            code: EXIT_USAGE,
        }
    }

    fn mount(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            code: EXIT_MOUNT_FAILED,
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("{NAME}: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

fn run() -> Result<(), Failure> {
    let (source, target, options, verbose) = match parse(env::args_os().skip(1))? {
        Request::Help => {
            print!("{HELP}");
            return Ok(());
        }
        // mount -f means "pretend": nothing to start.
        Request::Mount { fake: true, .. } => return Ok(()),
        Request::Mount {
            source,
            target,
            options,
            verbose,
            ..
        } => (source, target, options, verbose),
    };

    let binary = find_filesync()?;
    let mut command = Command::new(&binary);
    command.args(filesync_args(source, target, options));
    if env::var_os("PATH").is_none() {
        command.env("PATH", DEFAULT_PATH);
    }
    if verbose {
        eprintln!("{NAME}: running {command:?}");
    }
    // exec only returns on failure; on success filesync's exit status is ours.
    let error = command.exec();
    Err(Failure::mount(format!(
        "cannot run {}: {error}; reinstall with `filesync install`",
        binary.display()
    )))
}

/// Parses `SOURCE TARGET [-sfnv] [-o OPTS] [-t TYPE] [-N NS]` in any order,
/// including clustered flags like `-nv` and attached values like `-oOPTS`.
fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Request, Failure> {
    let mut args = args.into_iter();
    let mut positional = Vec::new();
    let mut options: Vec<OsString> = Vec::new();
    let mut fake = false;
    let mut verbose = false;

    while let Some(arg) = args.next() {
        let bytes = arg.as_bytes();
        if bytes == b"--" {
            positional.extend(args.by_ref());
            break;
        }
        if bytes == b"-h" || bytes == b"--help" {
            return Ok(Request::Help);
        }
        if bytes.starts_with(b"--") {
            return Err(Failure::usage(format!(
                "unknown option {}; see {NAME} --help",
                arg.to_string_lossy()
            )));
        }
        if bytes.len() < 2 || bytes[0] != b'-' {
            positional.push(arg);
            continue;
        }
        for (index, &flag) in bytes.iter().enumerate().skip(1) {
            match flag {
                b'f' => fake = true,
                b'v' => verbose = true,
                // No mtab to skip and nothing to be sloppy about.
                b'n' | b's' => {}
                b'o' | b't' | b'N' => {
                    let attached = &bytes[index + 1..];
                    let value = if attached.is_empty() {
                        args.next().ok_or_else(|| {
                            Failure::usage(format!(
                                "-{} needs a value; see {NAME} --help",
                                char::from(flag)
                            ))
                        })?
                    } else {
                        OsStr::from_bytes(attached).to_os_string()
                    };
                    match flag {
                        b'o' => options.push(value),
                        b't' => check_type(&value)?,
                        _ => {
                            return Err(Failure::usage(
                                "-N (other mount namespace) is not supported; \
                                 run mount inside the namespace with nsenter",
                            ))
                        }
                    }
                    break;
                }
                _ => {
                    return Err(Failure::usage(format!(
                        "unknown option -{}; see {NAME} --help",
                        char::from(flag).escape_default()
                    )))
                }
            }
        }
    }

    let [source, target]: [OsString; 2] = positional.try_into().map_err(|_| {
        Failure::usage(format!(
            "expected exactly SOURCE and MOUNTPOINT; see {NAME} --help"
        ))
    })?;
    Ok(Request::Mount {
        source,
        target,
        options: join_options(options),
        fake,
        verbose,
    })
}

/// mount only passes `-t` when the helper name does not already say the type.
fn check_type(value: &OsStr) -> Result<(), Failure> {
    match value.as_bytes() {
        b"fuse.filesync" | b"filesync" => Ok(()),
        _ => Err(Failure::usage(format!(
            "this helper mounts fuse.filesync, not {}; check the type in fstab",
            value.to_string_lossy()
        ))),
    }
}

/// Joins every `-o` into one comma list, dropping empty pieces.
fn join_options(options: Vec<OsString>) -> Option<OsString> {
    let mut joined = OsString::new();
    for part in options.iter().filter(|part| !part.is_empty()) {
        if !joined.is_empty() {
            joined.push(",");
        }
        joined.push(part);
    }
    (!joined.is_empty()).then_some(joined)
}

/// `--` keeps a SOURCE that starts with `-` from being read as an option.
fn filesync_args(source: OsString, target: OsString, options: Option<OsString>) -> Vec<OsString> {
    let mut args = vec![OsString::from("mount")];
    if let Some(options) = options {
        args.push(OsString::from("-o"));
        args.push(options);
    }
    args.push(OsString::from("--"));
    args.push(source);
    args.push(target);
    args
}

fn find_filesync() -> Result<PathBuf, Failure> {
    if let Some(beside) = env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("filesync")))
    {
        if is_executable(&beside) {
            return Ok(beside);
        }
    }
    if let Some(from_env) = env::var_os("FILESYNC_BIN").filter(|value| !value.is_empty()) {
        let from_env = PathBuf::from(from_env);
        // Someone pointed us here on purpose; silently skipping it would hide the mistake.
        if !is_executable(&from_env) {
            return Err(Failure::mount(format!(
                "FILESYNC_BIN={} is not an executable file; fix or unset it",
                from_env.display()
            )));
        }
        return Ok(from_env);
    }
    FALLBACK_BINARIES
        .iter()
        .map(PathBuf::from)
        .find(|path| is_executable(path))
        .ok_or_else(|| {
            Failure::mount(
                "filesync not found next to this helper, in $FILESYNC_BIN or in \
                 /usr/local/bin, /usr/bin, /usr/local/sbin, /usr/sbin; install it with \
                 `filesync install` or set FILESYNC_BIN",
            )
        })
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn mount(source: &str, target: &str, options: Option<&str>, fake: bool) -> Request {
        Request::Mount {
            source: source.into(),
            target: target.into(),
            options: options.map(OsString::from),
            fake,
            verbose: false,
        }
    }

    #[test]
    fn parses_what_mount_passes() {
        let request = parse(os(&["/srv", "/mnt", "-s", "-n", "-o", "rw,threads=2"]));
        assert_eq!(
            request.ok(),
            Some(mount("/srv", "/mnt", Some("rw,threads=2"), false))
        );
    }

    #[test]
    fn flags_may_come_first_clustered_or_attached() {
        let request = parse(os(&["-nfo", "rw", "/srv", "-oallow_other", "/mnt"]));
        assert_eq!(
            request.ok(),
            Some(mount("/srv", "/mnt", Some("rw,allow_other"), true))
        );
    }

    #[test]
    fn no_options_and_dash_source() {
        let request = parse(os(&["--", "-odd", "/mnt"]));
        assert_eq!(request.ok(), Some(mount("-odd", "/mnt", None, false)));
        assert_eq!(
            filesync_args("-odd".into(), "/mnt".into(), None),
            os(&["mount", "--", "-odd", "/mnt"])
        );
    }

    #[test]
    fn type_must_be_filesync() {
        assert!(parse(os(&["a", "b", "-t", "fuse.filesync"])).is_ok());
        let failure = parse(os(&["a", "b", "-t", "fuse.sshfs"])).err();
        assert_eq!(failure.map(|f| f.code), Some(EXIT_USAGE));
    }

    #[test]
    fn rejects_bad_invocations_with_usage_code() {
        for args in [
            &["a"][..],
            &["a", "b", "c"],
            &["a", "b", "-x"],
            &["a", "b", "--bogus"],
            &["a", "b", "-o"],
            &["a", "b", "-N", "/proc/1/ns/mnt"],
        ] {
            let failure = parse(os(args)).err();
            assert_eq!(failure.map(|f| f.code), Some(EXIT_USAGE), "{args:?}");
        }
    }

    #[test]
    fn help_wins() {
        assert_eq!(parse(os(&["a", "--help"])).ok(), Some(Request::Help));
    }
}
