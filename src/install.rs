//! `filesync install` / `filesync uninstall`: puts the binary, the mount(8)
//! helper, the systemd unit template (`filesync@.service`, `Type=notify`, see
//! [`crate::service`]), an example settings file, and the shell completions and
//! manual pages in place. The completions and pages are generated from the CLI
//! definition, which lives in the binary, so the caller passes them in as
//! [`GeneratedFile`]s; this module only decides where files go and how they are
//! written.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Name of the main binary in `bin_dir`.
const BINARY_NAME: &str = "filesync";
/// Name mount(8) looks for in /sbin for `-t fuse.filesync`.
const HELPER_NAME: &str = "mount.fuse.filesync";
/// Cargo cannot name a binary with dots, so the helper is built under this name.
const HELPER_BUILD_NAME: &str = "mount-fuse-filesync";
const UNIT_NAME: &str = "filesync@.service";
const CONFIG_NAME: &str = "filesync.toml";

const UNIT: &str = include_str!("../systemd/filesync@.service");
/// Where the unit's ExecStart expects the binary; rewritten when `bin_dir` differs.
const UNIT_BINARY: &str = "/usr/local/bin/filesync";

const EXAMPLE_CONFIG: &str = r#"# filesync settings. Precedence: mount options > this file > environment > defaults.
[node]
# id = "laptop-1"          # default: from /etc/machine-id (env FILESYNCH_NODE_ID)
# name = "laptop"          # default: the hostname (env FILESYNCH_NODE_NAME)

[sync]
# interval = 60            # seconds between reconcile scans, 0 = off (env FILESYNCH_SYNC_INTERVAL)

[mount]
# allow_other = false
# passthrough = true
# threads = 4
# log = "info"
# log_file = "/var/log/filesync/data.log"

[metrics]
# listen = "127.0.0.1:9901"  # Prometheus text at /metrics; default off
"#;

/// Where things go. `root` is prepended to every path (like DESTDIR), so tests
/// can install into a temp dir.
#[derive(Debug, Clone)]
pub struct InstallPlan {
    pub root: PathBuf,
    pub bin_dir: PathBuf,
    pub helper_dir: PathBuf,
    pub unit_dir: PathBuf,
    pub config_dir: PathBuf,
}

/// A file made by the binary at install time (a shell completion script or a
/// manual page): `dir` is absolute as on the target system, below `root`.
#[derive(Debug, Clone)]
pub struct GeneratedFile {
    pub dir: PathBuf,
    pub name: String,
    pub contents: Vec<u8>,
}

/// Where Debian's bash-completion, zsh and fish look for vendor completions.
pub const BASH_COMPLETION_DIR: &str = "/usr/share/bash-completion/completions";
pub const ZSH_COMPLETION_DIR: &str = "/usr/share/zsh/vendor-completions";
pub const FISH_COMPLETION_DIR: &str = "/usr/share/fish/vendor_completions.d";
/// Section 1 manual pages (user commands).
pub const MAN1_DIR: &str = "/usr/share/man/man1";

impl Default for InstallPlan {
    fn default() -> Self {
        InstallPlan {
            root: PathBuf::from("/"),
            bin_dir: PathBuf::from("/usr/local/bin"),
            helper_dir: PathBuf::from("/usr/sbin"),
            unit_dir: PathBuf::from("/etc/systemd/system"),
            config_dir: PathBuf::from("/etc/filesync"),
        }
    }
}

impl InstallPlan {
    /// `dir/name` under `root`; `Path::join` would drop `root` for absolute dirs.
    fn target(&self, dir: &Path, name: &str) -> PathBuf {
        self.root
            .join(dir.strip_prefix("/").unwrap_or(dir))
            .join(name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot find the running filesync binary: {0}; run it by its full path")]
    CurrentExe(#[source] io::Error),
    #[error(
        "mount helper {0} not found next to the filesync binary; run `cargo build --workspace` \
         first and install from the build folder"
    )]
    HelperMissing(PathBuf),
    #[error("cannot read {path}: {source}; rebuild with `cargo build --workspace`")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}: {source}; run as root and check the disk has space")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {path}: {source}; run as root")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "binary folder {0} cannot be written into the systemd unit; pick a UTF-8 path without \
         spaces"
    )]
    UnitPath(PathBuf),
}

/// Copies the running `filesync` binary and the mount helper built next to it
/// into place atomically (temp file + rename, mode 0755), installs the systemd
/// unit, creates `config_dir` (0755) with an example `filesync.toml` (0644,
/// only if absent), writes `generated` (0644) and prints one line per file
/// installed. Returns the files written.
pub fn install(
    plan: &InstallPlan,
    generated: &[GeneratedFile],
) -> Result<Vec<PathBuf>, InstallError> {
    let binary = std::env::current_exe().map_err(InstallError::CurrentExe)?;
    let helper = binary.with_file_name(HELPER_BUILD_NAME);
    install_from(plan, &binary, &helper, generated)
}

/// Removes what [`install`] put in place (including `generated`, by path)
/// except the config folder, which may hold the user's settings. Returns the
/// files removed.
pub fn uninstall(
    plan: &InstallPlan,
    generated: &[GeneratedFile],
) -> Result<Vec<PathBuf>, InstallError> {
    let mut removed = Vec::new();
    let fixed = [
        plan.target(&plan.bin_dir, BINARY_NAME),
        plan.target(&plan.helper_dir, HELPER_NAME),
        plan.target(&plan.unit_dir, UNIT_NAME),
    ];
    let generated_paths = generated
        .iter()
        .map(|file| plan.target(&file.dir, &file.name));
    for path in fixed.into_iter().chain(generated_paths) {
        match fs::remove_file(&path) {
            Ok(()) => {
                println!("removed {}", path.display());
                removed.push(path);
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(InstallError::Remove { path, source }),
        }
    }
    Ok(removed)
}

/// [`install`] with the source files given, so tests need no real build.
fn install_from(
    plan: &InstallPlan,
    binary: &Path,
    helper: &Path,
    generated: &[GeneratedFile],
) -> Result<Vec<PathBuf>, InstallError> {
    // Check before touching anything so a half-built tree installs nothing.
    if !helper.is_file() {
        return Err(InstallError::HelperMissing(helper.to_path_buf()));
    }
    let read = |path: &Path| {
        fs::read(path).map_err(|source| InstallError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let binary = read(binary)?;
    let helper = read(helper)?;
    let unit = unit_text(&plan.bin_dir)?;

    let mut installed = Vec::new();
    for (dir, name, contents, mode) in [
        (&plan.bin_dir, BINARY_NAME, binary.as_slice(), 0o755),
        (&plan.helper_dir, HELPER_NAME, helper.as_slice(), 0o755),
        (&plan.unit_dir, UNIT_NAME, unit.as_bytes(), 0o644),
    ] {
        let path = plan.target(dir, name);
        replace_file(&path, contents, mode)?;
        println!("installed {}", path.display());
        installed.push(path);
    }
    for file in generated {
        let path = plan.target(&file.dir, &file.name);
        replace_file(&path, &file.contents, 0o644)?;
        println!("installed {}", path.display());
        installed.push(path);
    }

    let config = plan.target(&plan.config_dir, CONFIG_NAME);
    if create_config(&config)? {
        println!("installed {}", config.display());
        installed.push(config);
    } else {
        println!("kept existing {}", config.display());
    }
    Ok(installed)
}

/// The unit's ExecStart must name the binary where it was actually installed.
fn unit_text(bin_dir: &Path) -> Result<String, InstallError> {
    let binary = bin_dir.join(BINARY_NAME);
    let text = binary
        .to_str()
        .filter(|text| binary.is_absolute() && !text.contains(char::is_whitespace))
        .ok_or_else(|| InstallError::UnitPath(bin_dir.to_path_buf()))?;
    Ok(UNIT.replace(UNIT_BINARY, text))
}

/// Writes `path` via a temp file and rename, so a running copy of the old
/// binary keeps working and readers never see a half-written file.
fn replace_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), InstallError> {
    let write_error = |source| InstallError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = parent(path)?;
    fs::create_dir_all(dir).map_err(write_error)?;
    let temp = temp_path(path)?;
    let result = write_new(&temp, contents, mode)
        .and_then(|()| fs::rename(&temp, path))
        .and_then(|()| sync_dir(dir));
    if result.is_err() {
        // Best effort: the write error below is what the user needs to see.
        let _ = fs::remove_file(&temp);
    }
    result.map_err(write_error)
}

/// Creates the example config unless a file (or dangling link) is already
/// there. Returns whether it was created.
fn create_config(path: &Path) -> Result<bool, InstallError> {
    let write_error = |source| InstallError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = parent(path)?;
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(write_error)?;
        // create_dir_all follows the umask; the folder must be readable by all.
        fs::set_permissions(dir, Permissions::from_mode(0o755)).map_err(write_error)?;
    }
    let temp = temp_path(path)?;
    write_new(&temp, EXAMPLE_CONFIG.as_bytes(), 0o644).map_err(write_error)?;
    // link(2) never replaces an existing file, so a user's config is safe even
    // if it appears between a check and the write.
    let linked = fs::hard_link(&temp, path);
    let _ = fs::remove_file(&temp);
    match linked {
        Ok(()) => {
            sync_dir(dir).map_err(write_error)?;
            Ok(true)
        }
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(write_error(source)),
    }
}

fn parent(path: &Path) -> Result<&Path, InstallError> {
    path.parent().ok_or_else(|| InstallError::Write {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "no parent folder"),
    })
}

/// A hidden sibling of `path`, so the rename stays within one filesystem.
fn temp_path(path: &Path) -> Result<PathBuf, InstallError> {
    let name = path.file_name().ok_or_else(|| InstallError::Write {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "no file name"),
    })?;
    let mut temp = std::ffi::OsString::from(".");
    temp.push(name);
    temp.push(format!(".tmp-{}", std::process::id()));
    Ok(path.with_file_name(temp))
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    // A leftover from a crashed run with the same pid would make create_new fail.
    match fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents)?;
    // The open mode is masked by the umask; set it exactly.
    file.set_permissions(Permissions::from_mode(mode))?;
    file.sync_all()
}

/// Makes the new directory entry survive a crash right after install.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    struct Fixture {
        _sources: tempfile::TempDir,
        root: tempfile::TempDir,
        binary: PathBuf,
        helper: PathBuf,
        plan: InstallPlan,
    }

    fn fixture() -> Fixture {
        let sources = tempfile::tempdir().expect("temp dir");
        let root = tempfile::tempdir().expect("temp dir");
        let binary = sources.path().join(BINARY_NAME);
        let helper = sources.path().join(HELPER_BUILD_NAME);
        fs::write(&binary, b"fake filesync").expect("write binary");
        fs::write(&helper, b"fake helper").expect("write helper");
        let plan = InstallPlan {
            root: root.path().to_path_buf(),
            ..InstallPlan::default()
        };
        Fixture {
            _sources: sources,
            root,
            binary,
            helper,
            plan,
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("installed file").mode() & 0o7777
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read dir")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }

    #[test]
    fn installs_everything_with_modes() {
        let f = fixture();
        let root = f.root.path();
        let installed = install_from(&f.plan, &f.binary, &f.helper, &[]).expect("install");

        let binary = root.join("usr/local/bin/filesync");
        let helper = root.join("usr/sbin/mount.fuse.filesync");
        let unit = root.join("etc/systemd/system/filesync@.service");
        let config = root.join("etc/filesync/filesync.toml");
        assert_eq!(
            installed,
            [binary.clone(), helper.clone(), unit.clone(), config.clone()]
        );

        assert_eq!(fs::read(&binary).expect("binary"), b"fake filesync");
        assert_eq!(fs::read(&helper).expect("helper"), b"fake helper");
        assert_eq!(fs::read_to_string(&unit).expect("unit"), UNIT);
        assert_eq!(fs::read_to_string(&config).expect("config"), EXAMPLE_CONFIG);
        assert_eq!(mode(&binary), 0o755);
        assert_eq!(mode(&helper), 0o755);
        assert_eq!(mode(&unit), 0o644);
        assert_eq!(mode(&config), 0o644);
        assert_eq!(mode(&root.join("etc/filesync")), 0o755);
        // No temp files left behind.
        assert_eq!(entries(&root.join("usr/local/bin")), ["filesync"]);
        assert_eq!(entries(&root.join("etc/filesync")), ["filesync.toml"]);
    }

    #[test]
    fn reinstall_replaces_binaries_but_keeps_config() {
        let f = fixture();
        let config = f.root.path().join("etc/filesync/filesync.toml");
        fs::create_dir_all(config.parent().expect("parent")).expect("config dir");
        fs::write(&config, "[mount]\nthreads = 8\n").expect("user config");
        install_from(&f.plan, &f.binary, &f.helper, &[]).expect("first install");

        fs::write(&f.binary, b"new filesync").expect("rebuild");
        let installed = install_from(&f.plan, &f.binary, &f.helper, &[]).expect("reinstall");

        assert!(!installed.contains(&config));
        assert_eq!(
            fs::read_to_string(&config).expect("config"),
            "[mount]\nthreads = 8\n"
        );
        let binary = f.root.path().join("usr/local/bin/filesync");
        assert_eq!(fs::read(&binary).expect("binary"), b"new filesync");
    }

    #[test]
    fn uninstall_keeps_config() {
        let f = fixture();
        let installed = install_from(&f.plan, &f.binary, &f.helper, &[]).expect("install");
        let removed = uninstall(&f.plan, &[]).expect("uninstall");

        assert_eq!(removed, installed[..3]);
        for path in &removed {
            assert!(!path.exists(), "{} still there", path.display());
        }
        assert!(f.root.path().join("etc/filesync/filesync.toml").is_file());
        assert!(uninstall(&f.plan, &[])
            .expect("second uninstall")
            .is_empty());
    }

    #[test]
    fn missing_helper_installs_nothing() {
        let f = fixture();
        fs::remove_file(&f.helper).expect("remove helper");
        let error = install_from(&f.plan, &f.binary, &f.helper, &[]).expect_err("must fail");

        assert!(matches!(error, InstallError::HelperMissing(_)));
        assert!(error.to_string().contains("cargo build --workspace"));
        assert!(entries(f.root.path()).is_empty());
    }

    #[test]
    fn unit_names_the_installed_binary() {
        let mut f = fixture();
        f.plan.bin_dir = PathBuf::from("/opt/filesync/bin");
        install_from(&f.plan, &f.binary, &f.helper, &[]).expect("install");
        let unit = fs::read_to_string(f.root.path().join("etc/systemd/system/filesync@.service"))
            .expect("unit");

        assert!(unit.contains("ExecStart=/opt/filesync/bin/filesync mount "));
        assert!(!unit.contains(UNIT_BINARY));
        assert!(matches!(
            unit_text(Path::new("/my tools")),
            Err(InstallError::UnitPath(_))
        ));
    }
}
