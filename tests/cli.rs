//! The command line itself: help with examples for every command, shell completions, the
//! manual page and the version, all generated from the one CLI definition.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_filesync");

fn filesync(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run filesync {args:?}: {err}"))
}

fn stdout_of(args: &[&str]) -> String {
    let out = filesync(args);
    assert!(
        out.status.success(),
        "filesync {args:?} failed with {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The subcommands, read from the top-level help, so a new one is covered without
/// editing this test.
fn subcommands() -> Vec<String> {
    let help = stdout_of(&["--help"]);
    let listing = help
        .split("Commands:")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .unwrap_or_else(|| panic!("no command list in --help:\n{help}"));
    let names: Vec<String> = listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect();
    assert!(names.len() >= 10, "too few commands found in:\n{help}");
    names
}

#[test]
fn every_command_has_help_with_examples() {
    let top = stdout_of(&["--help"]);
    assert!(top.contains("Examples"), "{top}");
    for name in subcommands() {
        let help = stdout_of(&[&name, "--help"]);
        assert!(
            help.contains("Examples:") && help.contains(&format!("filesync {name}")),
            "filesync {name} --help has no examples of itself:\n{help}"
        );
    }
}

#[test]
fn the_new_commands_are_listed() {
    let names = subcommands();
    for expected in ["demo", "scan", "completions", "man"] {
        assert!(names.iter().any(|name| name == expected), "{names:?}");
    }
}

#[test]
fn completions_are_produced_for_bash_zsh_and_fish() {
    let bash = stdout_of(&["completions", "bash"]);
    assert!(
        bash.contains("complete -F") && bash.contains("filesync"),
        "{bash}"
    );
    let zsh = stdout_of(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef filesync"), "{zsh}");
    let fish = stdout_of(&["completions", "fish"]);
    assert!(fish.contains("complete -c filesync"), "{fish}");
    for script in [&bash, &zsh, &fish] {
        for name in ["mount", "keygen", "scan", "demo"] {
            assert!(
                script.contains(name),
                "{name} missing from a completion script"
            );
        }
    }
    let unknown = filesync(&["completions", "tcsh"]);
    assert!(!unknown.status.success());
}

#[test]
fn the_manual_page_renders() {
    let page = stdout_of(&["man"]);
    assert!(page.contains(".TH filesync 1"), "{page}");
    assert!(
        page.contains("mount") && page.contains("Examples"),
        "{page}"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    stdout_of(&["man", &dir.path().display().to_string()]);
    for page in [
        "filesync.1",
        "filesync-mount.1",
        "filesync-scan.1",
        "filesync-man.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|err| panic!("{page} was not written: {err}"));
        assert!(text.contains(".TH"), "{page}:\n{text}");
    }
    // When man(1) is installed, it must render the page without complaint.
    let rendered = Command::new("man")
        .arg("-l")
        .arg(dir.path().join("filesync-mount.1"))
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "80")
        .output();
    if let Ok(out) = rendered {
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("MOUNTPOINT"), "{text}");
        }
    }
}

#[test]
fn version_names_the_protocol() {
    let version = stdout_of(&["--version"]);
    let expected = format!(
        "filesync {} (protocol {})",
        env!("CARGO_PKG_VERSION"),
        filesync::sync::proto::PROTOCOL_VERSION
    );
    assert_eq!(version.trim(), expected);
    let of_mount = stdout_of(&["mount", "--version"]);
    assert_eq!(
        of_mount.trim(),
        expected.replace("filesync ", "filesync-mount ")
    );
}

#[test]
fn scan_without_an_index_says_what_to_do() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = filesync(&["scan", &dir.path().display().to_string()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--mountpoint") && err.lines().count() == 1,
        "{err}"
    );
    let state = dir.path().join("state");
    let out = filesync(&[
        "scan",
        &dir.path().display().to_string(),
        "--state-dir",
        &state.display().to_string(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no index"), "{err}");
    assert!(
        !state.exists(),
        "a failed scan must not create the state folder"
    );
}

#[test]
fn scan_reports_what_differs_from_the_index() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (source, state) = (dir.path().join("src"), dir.path().join("state"));
    std::fs::create_dir_all(source.join("sub")).expect("mkdir");
    std::fs::create_dir_all(&state).expect("mkdir");
    std::fs::write(source.join("a.txt"), "hello").expect("write");
    std::fs::write(source.join("sub/b.txt"), "world!").expect("write");
    drop(filesync::index::Index::open(&state.join("index.redb")).expect("create an empty index"));
    let out = filesync(&[
        "scan",
        &source.display().to_string(),
        "--state-dir",
        &state.display().to_string(),
        "--list",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("2 files, 2 directories, 11 B"),
        "the summary counts files, folders and bytes:\n{stderr}"
    );
    assert!(
        stderr.contains("3 differences from the index (create 2, mkdir 1)"),
        "{stderr}"
    );
    let listed: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line per difference"))
        .collect();
    assert_eq!(listed.len(), 3, "{stdout}");
    assert!(
        !stderr.contains('\u{1b}'),
        "not a terminal: plain text only:\n{stderr}"
    );
}
