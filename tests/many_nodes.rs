//! Issue 5: many nodes, all sending and receiving, each in a network namespace of its own
//! with real mounts. Every link between two nodes can be cut on its own (see
//! [`common::cluster::Mesh`]).

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use std::process::Command;

use common::cluster::{netns_available, tree, wait_until, Mesh, Node};
use common::{run, BIN};

const PORT: u16 = 7878;
const CONVERGE: Duration = Duration::from_secs(90);

/// The tests here run one at a time: each starts three daemons, and on a 2-core machine
/// several such clusters at once starve each other far past any real deployment.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds [`ONE_AT_A_TIME`] for a test (a failed test's poisoned lock is still a lock).
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts one node per namespace of `mesh`, each listening; for each `(from, to)` in
/// `links`, node `from` dials node `to`, which accepts it.
fn start(mesh: &Mesh, count: usize, links: &[(usize, usize)]) -> Vec<Node> {
    start_with(mesh, count, links, &[])
}

/// [`start`] with `extra` options for every node.
fn start_with(mesh: &Mesh, count: usize, links: &[(usize, usize)], extra: &[&str]) -> Vec<Node> {
    let mut nodes: Vec<Node> = (0..count)
        .map(|i| Node::new(&format!("n{i}"), Some(mesh.ns(i))))
        .collect();
    // Listeners first, so the first dial succeeds.
    for i in (0..count).rev() {
        let mut opts = options(mesh, &nodes, links, i);
        opts.extend(extra.iter().map(|o| o.to_string()));
        nodes[i].start(&opts);
    }
    nodes
}

/// [`start_with`], then waits until every node has seen each of its links connect.
fn start_connected(mesh: &Mesh, links: &[(usize, usize)], extra: &[&str]) -> Vec<Node> {
    let count = links.iter().map(|&(a, b)| a.max(b) + 1).max().unwrap_or(0);
    let nodes = start_with(mesh, count, links, extra);
    for (i, node) in nodes.iter().enumerate() {
        let mine = links.iter().filter(|&&(a, b)| a == i || b == i).count();
        assert_connected(node, mine);
    }
    nodes
}

/// Node `i`'s mount options (see [`start`]).
fn options(mesh: &Mesh, nodes: &[Node], links: &[(usize, usize)], i: usize) -> Vec<String> {
    let mut opts = vec![
        format!("listen=0.0.0.0:{PORT}"),
        "sync_interval=0".to_owned(),
    ];
    for &(from, to) in links {
        if from == i {
            let address = mesh.addr(to, from);
            opts.push(format!("peer={}@{address}:{PORT}", nodes[to].id));
        } else if to == i {
            opts.push(format!("peer={}", nodes[from].id));
        }
    }
    opts
}

/// Waits until every node's backing folder holds the same tree; panics with each tree
/// otherwise.
fn assert_all_converge(nodes: &[Node]) {
    let same = || {
        let first = tree(nodes[0].src());
        nodes[1..].iter().all(|n| tree(n.src()) == first)
    };
    if wait_until(CONVERGE, same) {
        return;
    }
    let mut report = String::new();
    for node in nodes {
        report.push_str(&format!("---- {} ----\n", node.name));
        for (path, line) in tree(node.src()) {
            report.push_str(&format!("{path}: {line}\n"));
        }
    }
    panic!("the nodes did not converge within {CONVERGE:?}:\n{report}");
}

/// Waits until `node` logs `count` connections.
fn assert_connected(node: &Node, count: usize) {
    assert!(
        wait_until(CONVERGE, || node.log().matches("connected to peer").count()
            >= count),
        "{} did not see {count} peers connect:\n{}",
        node.name,
        node.log()
    );
}

fn conflict_copies(dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = fs::read_dir(dir)
        .expect("read dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".sync-conflict-"))
        .collect();
    found.sort();
    found
}

#[test]
fn three_nodes_in_a_chain_converge_through_the_middle() {
    if !netns_available() {
        return;
    }
    let _serial = one_at_a_time();
    let mesh = Mesh::new(3);
    // A (0) and C (2) only know B (1); their own link is down for good measure.
    mesh.cut(0, 2);
    let nodes = start(&mesh, 3, &[(0, 1), (2, 1)]);
    assert_connected(&nodes[1], 2);
    fs::write(nodes[0].mnt().join("from-a.txt"), b"written on A").expect("write on A");
    fs::create_dir(nodes[2].mnt().join("from-c")).expect("mkdir on C");
    fs::write(nodes[2].mnt().join("from-c/notes.md"), b"written on C").expect("write on C");
    assert_all_converge(&nodes);
    // A edits what C wrote, C removes what A wrote: both travel through B.
    fs::write(nodes[0].mnt().join("from-c/notes.md"), b"edited on A").expect("edit on A");
    fs::remove_file(nodes[2].mnt().join("from-a.txt")).expect("remove on C");
    assert_all_converge(&nodes);
    let notes = fs::read(nodes[2].src().join("from-c/notes.md")).expect("read on C");
    assert_eq!(notes, b"edited on A");
    assert!(!nodes[0].src().join("from-a.txt").exists());
    for node in &nodes {
        assert!(
            conflict_copies(node.src()).is_empty(),
            "no conflict was made"
        );
    }
}

#[test]
fn a_partition_heals_into_one_tree_keeping_both_sides_of_every_conflict() {
    if !netns_available() {
        return;
    }
    let _serial = one_at_a_time();
    let mesh = Mesh::new(3);
    let nodes = start_connected(&mesh, &[(0, 1), (0, 2), (1, 2)], &[]);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    fs::write(a.mnt().join("notes.txt"), b"the common base\n").expect("write");
    fs::write(a.mnt().join("doomed.txt"), b"the common base\n").expect("write");
    fs::write(a.mnt().join("calm.txt"), b"nobody touches this\n").expect("write");
    assert_all_converge(&nodes);

    // A is cut off from both others.
    mesh.cut(0, 1);
    mesh.cut(0, 2);
    fs::write(a.mnt().join("notes.txt"), b"edited on A, offline\n").expect("edit on A");
    fs::write(a.mnt().join("doomed.txt"), b"kept alive on A\n").expect("edit on A");
    // C's edit is the newer one (mtimes have a second's resolution in the copy's name).
    std::thread::sleep(Duration::from_millis(1100));
    fs::write(c.mnt().join("notes.txt"), b"edited on C\n").expect("edit on C");
    fs::remove_file(b.mnt().join("doomed.txt")).expect("delete on B");
    assert!(
        wait_until(CONVERGE, || !c.src().join("doomed.txt").exists()),
        "B's deletion did not reach C while A was away"
    );
    mesh.heal(0, 1);
    mesh.heal(0, 2);
    assert_all_converge(&nodes);

    for node in &nodes {
        let notes = fs::read(node.src().join("notes.txt")).expect("notes.txt");
        assert_eq!(
            notes, b"edited on C\n",
            "the newer edit wins on {}",
            node.name
        );
        let copies = conflict_copies(node.src());
        assert_eq!(
            copies.len(),
            1,
            "one conflict copy on {}: {copies:?}",
            node.name
        );
        assert!(copies[0].starts_with("notes.sync-conflict-") && copies[0].ends_with(".txt"));
        let kept = fs::read(node.src().join(&copies[0])).expect("conflict copy");
        assert_eq!(
            kept, b"edited on A, offline\n",
            "A's edit is kept on {}",
            node.name
        );
        let doomed = fs::read(node.src().join("doomed.txt")).expect("the edit survives");
        assert_eq!(doomed, b"kept alive on A\n");
        assert_eq!(
            fs::read(node.src().join("calm.txt")).expect("calm.txt"),
            b"nobody touches this\n"
        );
    }

    // `filesync status` counts it (at a catch-up summary, so within half a minute).
    let counted = wait_until(CONVERGE, || {
        let status = run(
            Command::new(BIN)
                .args(["status", "--json", "--state-dir"])
                .arg(b.state()),
            Duration::from_secs(10),
        );
        status.stdout.contains("\"open_conflicts\":1")
    });
    assert!(counted, "B's status never counted the conflict copy");

    // The conflict is listed everywhere, and settled on A by keeping A's version.
    let listed = run(
        Command::new(BIN).args(["conflicts", "--json"]).arg(b.mnt()),
        Duration::from_secs(10),
    );
    listed.expect_ok("filesync conflicts");
    assert_eq!(listed.stdout.lines().count(), 1, "{}", listed.stdout);
    assert!(listed.stdout.contains("notes.sync-conflict-"));
    let resolved = run(
        Command::new(BIN)
            .arg("resolve")
            .arg(a.mnt().join("notes.txt"))
            .args(["--keep", "mine", "--state-dir"])
            .arg(a.state()),
        Duration::from_secs(10),
    );
    resolved.expect_ok("filesync resolve --keep mine");
    assert_all_converge(&nodes);
    for node in &nodes {
        let notes = fs::read(node.src().join("notes.txt")).expect("notes.txt");
        assert_eq!(
            notes, b"edited on A, offline\n",
            "A's version is kept on {}",
            node.name
        );
        assert!(
            conflict_copies(node.src()).is_empty(),
            "no copies left on {}",
            node.name
        );
    }
}

#[test]
fn a_node_that_was_stopped_reconciles_by_catch_up() {
    if !netns_available() {
        return;
    }
    let _serial = one_at_a_time();
    let mesh = Mesh::new(3);
    let links = [(0, 1), (0, 2), (1, 2)];
    let mut nodes = start_connected(&mesh, &links, &[]);
    for name in ["report.txt", "old.txt", "mine.txt"] {
        fs::write(nodes[1].mnt().join(name), b"base\n").expect("write");
    }
    assert_all_converge(&nodes);

    // A is stopped; while it is down, its folder is edited directly (found by its scan
    // at start) and the others edit and delete.
    nodes[0].stop();
    fs::write(nodes[0].src().join("report.txt"), b"A's offline edit\n").expect("edit A");
    fs::write(nodes[0].src().join("mine.txt"), b"only A changed this\n").expect("edit A");
    std::thread::sleep(Duration::from_millis(1100));
    fs::write(nodes[2].mnt().join("report.txt"), b"C's later edit\n").expect("edit C");
    fs::remove_file(nodes[1].mnt().join("old.txt")).expect("delete on B");
    let opts = options(&mesh, &nodes, &links, 0);
    nodes[0].start(&opts);
    assert_all_converge(&nodes);

    for node in &nodes {
        let report = fs::read(node.src().join("report.txt")).expect("report.txt");
        assert_eq!(report, b"C's later edit\n", "on {}", node.name);
        let copies = conflict_copies(node.src());
        assert_eq!(
            copies.len(),
            1,
            "one conflict copy on {}: {copies:?}",
            node.name
        );
        let kept = fs::read(node.src().join(&copies[0])).expect("conflict copy");
        assert_eq!(kept, b"A's offline edit\n");
        assert!(
            !node.src().join("old.txt").exists(),
            "B's deletion reached {}",
            node.name
        );
        let mine = fs::read(node.src().join("mine.txt")).expect("mine.txt");
        assert_eq!(
            mine, b"only A changed this\n",
            "A's edit reached {}",
            node.name
        );
    }
}

#[test]
fn text_edited_in_different_places_merges_and_overlapping_edits_keep_both() {
    if !netns_available() {
        return;
    }
    let _serial = one_at_a_time();
    let mesh = Mesh::new(3);
    let nodes = start_connected(&mesh, &[(0, 1), (0, 2), (1, 2)], &["conflicts=merge"]);
    let lines: String = (1..=12).map(|n| format!("line {n}\n")).collect();
    fs::write(nodes[1].mnt().join("plan.md"), &lines).expect("write");
    fs::write(nodes[1].mnt().join("clash.md"), &lines).expect("write");
    assert_all_converge(&nodes);

    mesh.cut(0, 1);
    mesh.cut(0, 2);
    let edit = |node: &Node, name: &str, from: &str, to: &str| {
        let path = node.mnt().join(name);
        let text = fs::read_to_string(&path).expect("read");
        fs::write(&path, text.replacen(from, to, 1)).expect("edit");
    };
    edit(&nodes[0], "plan.md", "line 2\n", "line 2, edited on A\n");
    edit(&nodes[0], "clash.md", "line 6\n", "line 6 as A has it\n");
    std::thread::sleep(Duration::from_millis(1100));
    edit(&nodes[2], "plan.md", "line 11\n", "line 11, edited on C\n");
    edit(&nodes[2], "clash.md", "line 6\n", "line 6 as C has it\n");
    mesh.heal(0, 1);
    mesh.heal(0, 2);
    assert_all_converge(&nodes);

    let merged = lines
        .replacen("line 2\n", "line 2, edited on A\n", 1)
        .replacen("line 11\n", "line 11, edited on C\n", 1);
    for node in &nodes {
        let plan = fs::read_to_string(node.src().join("plan.md")).expect("plan.md");
        assert_eq!(plan, merged, "both edits are in plan.md on {}", node.name);
        let clash = fs::read_to_string(node.src().join("clash.md")).expect("clash.md");
        assert!(
            clash.contains("line 6 as C has it"),
            "C's newer edit wins on {}",
            node.name
        );
        let copies = conflict_copies(node.src());
        assert_eq!(
            copies.len(),
            1,
            "only clash.md is kept both ways on {}: {copies:?}",
            node.name
        );
        assert!(copies[0].starts_with("clash.sync-conflict-"));
        let kept = fs::read_to_string(node.src().join(&copies[0])).expect("copy");
        assert!(kept.contains("line 6 as A has it"));
    }
}

/// Every file's content below `root`, by content.
fn contents(root: &Path) -> std::collections::HashSet<Vec<u8>> {
    let mut found = std::collections::HashSet::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path);
            } else if let Ok(data) = fs::read(&path) {
                found.insert(data);
            }
        }
    }
    found
}

/// The model-based test: random writes and deletions on random nodes, while random links
/// are cut and healed. At the end every node has the same tree, and every write that no
/// later operation on a node that had it replaced is still there, at its path or as a
/// conflict copy. `FILESYNC_SEED` replays a run; the seed is printed on failure.
#[test]
fn random_operations_partitions_and_heals_converge_without_losing_a_write() {
    if !netns_available() {
        return;
    }
    let _serial = one_at_a_time();
    let seed = std::env::var("FILESYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("random_operations seed: FILESYNC_SEED={seed}");
    let mut rng = common::Rng::new(seed);
    const STEPS: usize = 40;
    const NODES: usize = 3;
    let paths = ["a.txt", "b.txt", "d/c.txt"];
    let links = [(0, 1), (0, 2), (1, 2)];
    let mesh = Mesh::new(NODES);
    let nodes = start_connected(&mesh, &links, &[]);
    fs::create_dir(nodes[0].mnt().join("d")).expect("mkdir");
    assert_all_converge(&nodes);

    let mut written: Vec<Vec<u8>> = Vec::new();
    let mut superseded = std::collections::HashSet::new();
    let mut cut = [false; 3];
    let mut log = Vec::new();
    for step in 0..STEPS {
        let roll = rng.below(10);
        let n = rng.below(NODES);
        let path = nodes[n].mnt().join(paths[rng.below(paths.len())]);
        if roll < 2 {
            let link = rng.below(links.len());
            let (i, j) = links[link];
            if cut[link] {
                mesh.heal(i, j);
            } else {
                mesh.cut(i, j);
            }
            cut[link] = !cut[link];
            log.push(format!("{step}: link {i}-{j} cut={}", cut[link]));
        } else {
            // What this node has now is replaced by what it does next. Read from the
            // backing folder, which is what the node versions (its mount's cache may
            // lag an applied change by a moment).
            let rel = path.strip_prefix(nodes[n].mnt()).expect("below the mount");
            if let Ok(before) = fs::read(nodes[n].src().join(rel)) {
                superseded.insert(before);
            }
            if roll < 8 {
                let content = format!("step {step} on node {n}, seed {seed}\n").into_bytes();
                fs::write(&path, &content).expect("write");
                written.push(content);
                log.push(format!("{step}: node {n} writes {}", path.display()));
            } else {
                let _ = fs::remove_file(&path);
                log.push(format!("{step}: node {n} removes {}", path.display()));
            }
        }
        std::thread::sleep(Duration::from_millis(rng.below(300) as u64));
    }
    for (link, &(i, j)) in links.iter().enumerate() {
        if cut[link] {
            mesh.heal(i, j);
        }
    }
    let context = format!("FILESYNC_SEED={seed}; steps:\n{}", log.join("\n"));
    if !wait_until(CONVERGE, || {
        let first = tree(nodes[0].src());
        nodes[1..].iter().all(|n| tree(n.src()) == first)
    }) {
        assert_all_converge(&nodes);
    }
    let present = contents(nodes[0].src());
    for content in written.iter().filter(|c| !superseded.contains(*c)) {
        assert!(
            present.contains(content),
            "a write that nothing replaced is lost: {:?}\n{context}\nnode 0 holds:\n{}",
            String::from_utf8_lossy(content),
            tree(nodes[0].src())
                .iter()
                .map(|(path, entry)| format!("  {path}: {entry}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn an_edit_follows_a_folder_renamed_meanwhile_on_another_node() {
    if !netns_available() {
        return;
    }
    let _serial = one_at_a_time();
    let mesh = Mesh::new(3);
    let nodes = start_connected(&mesh, &[(0, 1), (0, 2), (1, 2)], &[]);
    let (a, c) = (&nodes[0], &nodes[2]);
    fs::create_dir(a.mnt().join("proj")).expect("mkdir");
    fs::write(a.mnt().join("proj/readme.md"), b"first draft\n").expect("write");
    fs::write(a.mnt().join("proj/big.bin"), vec![7u8; 3 << 20]).expect("write");
    assert_all_converge(&nodes);

    mesh.cut(0, 1);
    mesh.cut(0, 2);
    fs::rename(a.mnt().join("proj"), a.mnt().join("project")).expect("rename on A");
    fs::write(c.mnt().join("proj/readme.md"), b"edited on C\n").expect("edit on C");
    std::thread::sleep(Duration::from_millis(500));
    mesh.heal(0, 1);
    mesh.heal(0, 2);
    assert_all_converge(&nodes);
    for node in &nodes {
        let src = node.src();
        assert!(
            src.join("project/big.bin").exists(),
            "the rename reached {}",
            node.name
        );
        let readme = fs::read(src.join("project/readme.md")).expect("readme.md");
        assert_eq!(
            readme, b"edited on C\n",
            "C's edit followed the rename on {}",
            node.name
        );
        assert!(
            !src.join("proj").exists(),
            "the old folder is gone on {}",
            node.name
        );
    }
}
