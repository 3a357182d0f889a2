//! The driver of `bench/scan.sh`: builds a test tree, indexes it, and times scans and
//! index opens. Each mode prints one `key=value` line for the script to read.
//!
//! ```text
//! scan_bench mktree ROOT FILES      make FILES small files in 10×10×10 directories
//! scan_bench index ROOT INDEX       scan with the index as it is and store what it reports
//! scan_bench scan ROOT INDEX        time one scan: seconds=… changes=…
//! scan_bench open INDEX             time Index::open plus one lookup: open_ms=… records=…
//! scan_bench dirty-exit INDEX       commit one batch and exit without closing, as a crash
//!                                   would leave the file
//! scan_bench commit INDEX N         time N one-record batches: commit_ms=… (mean)
//! ```

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use filesync::capture::scan::scan;
use filesync::change::{Change, ChangeKind, ChangeSink};
use filesync::ignores::Ignores;
use filesync::index::{record_for, Index};

/// Collects what the scan reports.
#[derive(Default)]
struct Collect(Mutex<Vec<Change>>);

impl ChangeSink for Collect {
    fn record(&self, change: Change) {
        if let Ok(mut v) = self.0.lock() {
            v.push(change);
        }
    }
}

/// A sink that only counts, so the timed scan measures the scan and not the collecting.
struct Discard;

impl ChangeSink for Discard {
    fn record(&self, _change: Change) {}
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> Result<&str> {
        args.get(i)
            .map(String::as_str)
            .context("missing argument; see the comment at the top of examples/scan_bench.rs")
    };
    match arg(0)? {
        "mktree" => mktree(Path::new(arg(1)?), arg(2)?.parse()?),
        "index" => index_tree(Path::new(arg(1)?), Path::new(arg(2)?)),
        "scan" => {
            let index = Index::open(Path::new(arg(2)?))?;
            let stats = scan(Path::new(arg(1)?), &index, &Ignores::none(), &Discard, None)?;
            println!(
                "seconds={:.4} changes={} files={} dirs={}",
                stats.elapsed.as_secs_f64(),
                stats.changes,
                stats.files,
                stats.dirs
            );
            Ok(())
        }
        "open" => {
            let started = Instant::now();
            let index = Index::open(Path::new(arg(1)?))?;
            index.get(Path::new("d0/d0/d0/f0"))?;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            println!("open_ms={ms:.2} records={}", index.len()?);
            Ok(())
        }
        "dirty-exit" => {
            let index = Index::open(Path::new(arg(1)?))?;
            let rec = index
                .get(Path::new("d0/d0/d0/f0"))?
                .context("index the tree first")?;
            index.put_batch(vec![(PathBuf::from("d0/d0/d0/f0"), rec)])?;
            // No drop: the file stays marked as open, like after kill -9.
            std::process::exit(0)
        }
        "commit" => {
            let index = Index::open(Path::new(arg(1)?))?;
            let n: u32 = arg(2)?.parse()?;
            let rec = index
                .get(Path::new("d0/d0/d0/f0"))?
                .context("index the tree first")?;
            let started = Instant::now();
            for _ in 0..n {
                index.put_batch(vec![(PathBuf::from("d0/d0/d0/f0"), rec.clone())])?;
            }
            let ms = started.elapsed().as_secs_f64() * 1000.0 / f64::from(n.max(1));
            println!("commit_ms={ms:.2}");
            Ok(())
        }
        other => {
            bail!("unknown mode {other}; see the comment at the top of examples/scan_bench.rs")
        }
    }
}

/// `files` files of 0–4 KiB spread over 1,000 leaf directories three levels deep.
fn mktree(root: &Path, files: u32) -> Result<()> {
    let per_dir = files.div_ceil(1000);
    let mut made = 0;
    'outer: for a in 0..10 {
        for b in 0..10 {
            for c in 0..10 {
                let dir = root.join(format!("d{a}/d{b}/d{c}"));
                std::fs::create_dir_all(&dir)?;
                for f in 0..per_dir {
                    if made == files {
                        break 'outer;
                    }
                    let len = (made as usize * 37) % 4096;
                    std::fs::write(dir.join(format!("f{f}")), vec![b'x'; len])?;
                    made += 1;
                }
            }
        }
    }
    println!("files={made}");
    Ok(())
}

/// Plays the indexer: scans, builds a record for every reported path and stores them in
/// batches of 1,000.
fn index_tree(root: &Path, index_path: &Path) -> Result<()> {
    let index = Index::open(index_path)?;
    let sink = Collect::default();
    let started = Instant::now();
    scan(root, &index, &Ignores::none(), &sink, None)?;
    let changes = match sink.0.into_inner() {
        Ok(v) => v,
        Err(poisoned) => poisoned.into_inner(),
    };
    let root_fd = File::open(root)?;
    let mut batch = Vec::new();
    let mut stored = 0;
    for change in changes {
        let Some(path) = change.path else { continue };
        if matches!(change.kind, ChangeKind::Unlink | ChangeKind::Rmdir) {
            continue;
        }
        if let Some(rec) = record_for(root_fd.as_fd(), &path, None, None)? {
            batch.push((path, rec));
        }
        if batch.len() == 1000 {
            stored += batch.len();
            index.put_batch(std::mem::take(&mut batch))?;
        }
    }
    stored += batch.len();
    index.put_batch(batch)?;
    println!(
        "indexed={stored} seconds={:.2}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
