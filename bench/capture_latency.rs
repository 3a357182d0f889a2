//! Capture latency and machine cost of the change watchers; run by bench/capture_latency.sh,
//! which builds this file as a small package of its own (see the script for why).
//!
//! Latency: a writer process writes 8 bytes into a different file of the watched folder
//! every millisecond and notes CLOCK_MONOTONIC right after write() returns; the sink notes
//! CLOCK_MONOTONIC when the first record about that file arrives. Both clocks are the same
//! kernel clock, so the difference is the capture latency.
//!
//! Cost: a write-heavy workload outside the watched folder (on the same file system, the
//! worst case for the eBPF filter, which must walk up to the file system's root to tell)
//! is timed with and without each watcher, alternating runs to spread drift evenly; so is
//! a loop of syscalls that touch no file, which shows what a syscall tracepoint costs
//! every syscall of the machine. Each workload reports its wall-clock time and its CPU
//! time (user + system, which includes the probe: it runs in the writer's syscalls). On
//! a machine shared with other work the CPU time is the steadier figure, as the writer's
//! waits for a CPU are not in it. Each run with a watcher is also divided by the run
//! without one just before it: the median and the range of those paired ratios show how
//! far other work on the machine moved the figures.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use filesync::capture::{CaptureError, Sink, WatchSpec, Watcher};
use filesync::change::{Change, ChangeSink};

type Start = fn(&WatchSpec, Sink) -> Result<Box<dyn Watcher>, CaptureError>;

/// The watchers this build has; the script enables the fallbacks' features when their
/// modules exist.
fn watchers() -> Vec<(&'static str, Option<Start>)> {
    vec![
        ("ebpf", Some(filesync::capture::ebpf::start as Start)),
        #[cfg(feature = "fanotify")]
        (
            "fanotify",
            Some(filesync::capture::fanotify::start as Start),
        ),
        #[cfg(not(feature = "fanotify"))]
        ("fanotify", None),
        #[cfg(feature = "inotify")]
        ("inotify", Some(filesync::capture::inotify::start as Start)),
        #[cfg(not(feature = "inotify"))]
        ("inotify", None),
    ]
}

const SAMPLES: usize = 2000;
const SAMPLE_INTERVAL: Duration = Duration::from_millis(1);
/// Alternating rounds of each cost workload; `FILESYNC_BENCH_ROUNDS` overrides it.
const COST_ROUNDS: usize = 7;
/// getppid() calls of the syscall workload.
const SYSCALLS: u64 = 4_000_000;

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("writer") => writer(&args[2..]),
        Some("load") => load(&args[2..]),
        Some("syscalls") => syscalls(&args[2..]),
        None => run(),
        Some(other) => Err(format!(
            "unknown mode {other}; run without arguments (the script does)"
        )),
    }
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `writer DIR N`: makes N files, then writes each once, printing "i t_ns" per write.
fn writer(args: &[String]) -> Result<(), String> {
    let [dir, n] = args else {
        return Err("usage: writer DIR N".into());
    };
    let dir = PathBuf::from(dir);
    let n: usize = n.parse().map_err(|e| format!("N: {e}"))?;
    for i in 0..n {
        File::create(dir.join(format!("w{i}"))).map_err(|e| e.to_string())?;
    }
    // Let the records of the creations arrive before the clock starts.
    std::thread::sleep(Duration::from_millis(300));
    let mut out = std::io::stdout().lock();
    writeln!(out, "start {}", now_ns()).map_err(|e| e.to_string())?;
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(dir.join(format!("w{i}")))
            .map_err(|e| e.to_string())?;
        f.write_all_at(b"12345678", 0).map_err(|e| e.to_string())?;
        times.push(now_ns());
        drop(f);
        std::thread::sleep(SAMPLE_INTERVAL);
    }
    for (i, t) in times.iter().enumerate() {
        writeln!(out, "{i} {t}").map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `load FILE MIB BLOCK`: writes MIB MiB in BLOCK-byte writes, prints the seconds taken
/// (wall clock, then CPU).
fn load(args: &[String]) -> Result<(), String> {
    let [path, mib, block] = args else {
        return Err("usage: load FILE MIB BLOCK".into());
    };
    let mib: u64 = mib.parse().map_err(|e| format!("MIB: {e}"))?;
    let block: usize = block.parse().map_err(|e| format!("BLOCK: {e}"))?;
    let mut f = File::create(path).map_err(|e| e.to_string())?;
    let buf = vec![0x5au8; block];
    let writes = mib * (1 << 20) / block as u64;
    let started = Instant::now();
    let cpu_before = cpu_seconds();
    for i in 0..writes {
        f.write_all(&buf).map_err(|e| e.to_string())?;
        // Start over every 64 MiB: the page cache stays warm and the file small.
        if ((i + 1) * block as u64).is_multiple_of(64 << 20) {
            f.set_len(0).map_err(|e| e.to_string())?;
            f.rewind().map_err(|e| e.to_string())?;
        }
    }
    print_times(started, cpu_before);
    Ok(())
}

/// This process's CPU time (user + system) in seconds.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec; CLOCK_PROCESS_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Prints "wall cpu": the seconds since started, and the CPU seconds since cpu_before.
fn print_times(started: Instant, cpu_before: f64) {
    println!(
        "{} {}",
        started.elapsed().as_secs_f64(),
        cpu_seconds() - cpu_before
    );
}

/// `syscalls N`: makes N getppid() calls, prints the seconds taken (wall clock, then CPU).
fn syscalls(args: &[String]) -> Result<(), String> {
    let [n] = args else {
        return Err("usage: syscalls N".into());
    };
    let n: u64 = n.parse().map_err(|e| format!("N: {e}"))?;
    let started = Instant::now();
    let cpu_before = cpu_seconds();
    for _ in 0..n {
        // SAFETY: getppid has no arguments and cannot fail.
        unsafe { libc::getppid() };
    }
    print_times(started, cpu_before);
    Ok(())
}

/// Arrival times per file name.
#[derive(Default)]
struct Arrivals {
    at: Mutex<HashMap<PathBuf, Vec<u64>>>,
}

impl ChangeSink for Arrivals {
    fn record(&self, change: Change) {
        let at = now_ns();
        if let Some(path) = change.path {
            self.at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(path)
                .or_default()
                .push(at);
        }
    }
}

fn run() -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Removed on drop, also when a panic (a closed stdout, say) unwinds.
    let tmp = tempfile::Builder::new()
        .prefix("filesync-bench-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let root = tmp.path().join("watched");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    fs::create_dir_all(&outside).map_err(|e| e.to_string())?;
    bench(&root, &outside)
}

fn bench(root: &Path, outside: &Path) -> Result<(), String> {
    let root = root.canonicalize().map_err(|e| e.to_string())?;
    let spec = WatchSpec {
        root: root.clone(),
        ignore_pids: vec![std::process::id()],
    };
    let me = std::env::current_exe().map_err(|e| e.to_string())?;

    println!(
        "capture latency: {SAMPLES} writes, one per {SAMPLE_INTERVAL:?}, each to its own file"
    );
    println!(
        "{:<10} {:>9} {:>9} {:>9} {:>8}",
        "watcher", "p50 µs", "p99 µs", "max µs", "missed"
    );
    for (name, start) in watchers() {
        let Some(start) = start else {
            println!("{name:<10} not built");
            continue;
        };
        for f in fs::read_dir(&root).map_err(|e| e.to_string())? {
            let _ = fs::remove_file(f.map_err(|e| e.to_string())?.path());
        }
        let sink = Arc::new(Arrivals::default());
        let watcher = match start(&spec, sink.clone()) {
            Ok(w) => w,
            Err(e) => {
                println!("{name:<10} unavailable: {e}");
                continue;
            }
        };
        let (started, writes) = run_writer(&me, &root)?;
        // Give the last records time to arrive.
        std::thread::sleep(Duration::from_millis(200));
        watcher.stop();
        let arrivals = sink.at.lock().unwrap_or_else(|e| e.into_inner());
        let mut latencies: Vec<i64> = Vec::with_capacity(SAMPLES);
        let mut missed = 0;
        for (i, t) in writes {
            // The first record after the clock started: the creation's records came before.
            let first = arrivals
                .get(Path::new(&format!("w{i}")))
                .and_then(|times| times.iter().copied().find(|&at| at >= started));
            match first {
                Some(at) => latencies.push(at as i64 - t as i64),
                None => missed += 1,
            }
        }
        latencies.sort_unstable();
        println!(
            "{name:<10} {:>9.1} {:>9.1} {:>9.1} {:>8}",
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
            percentile(&latencies, 1.0),
            missed
        );
    }

    let rounds = std::env::var("FILESYNC_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(COST_ROUNDS);
    let file = outside.join("load");
    let workloads = [
        (
            "1024 MiB in 64 KiB writes",
            Load::Write {
                mib: 1024,
                block: 65536,
            },
        ),
        (
            "512 MiB in 4 KiB writes",
            Load::Write {
                mib: 512,
                block: 4096,
            },
        ),
        ("32 MiB in 64 B writes", Load::Write { mib: 32, block: 64 }),
        ("getppid() calls, no file", Load::Syscalls(SYSCALLS)),
    ];
    for (label, workload) in workloads {
        println!();
        println!("cost outside the watched folder: {label}, {rounds} alternating runs (medians)");
        println!(
            "{:<10} {:>8} {:>7} {:>8} {:>7} {:>25} {:>13}",
            "watcher",
            "wall s",
            "ratio",
            "CPU s",
            "ratio",
            "CPU paired: median, range",
            "CPU ns a call"
        );
        let calls = workload.calls() as f64;
        let mut base = Runs::default();
        let mut with: HashMap<&str, Runs> = HashMap::new();
        for _ in 0..rounds {
            let before = workload.run(&me, &file)?;
            base.add(before, before);
            for (name, start) in watchers() {
                let Some(start) = start else { continue };
                let Ok(watcher) = start(&spec, Arc::new(Arrivals::default())) else {
                    continue;
                };
                let times = workload.run(&me, &file)?;
                watcher.stop();
                with.entry(name).or_default().add(times, before);
            }
        }
        let (base_wall, base_cpu) = (median(&mut base.wall), median(&mut base.cpu));
        println!(
            "{:<10} {base_wall:>8.3} {:>7.3} {base_cpu:>8.3} {:>7.3} {:>25} {:>13.0}",
            "none",
            1.0,
            1.0,
            "",
            base_cpu / calls * 1e9
        );
        for (name, _) in watchers() {
            let Some(runs) = with.get_mut(name) else {
                println!("{name:<10} not built");
                continue;
            };
            let (wall, cpu) = (median(&mut runs.wall), median(&mut runs.cpu));
            let paired = format!(
                "{:.3}, {:.3}-{:.3}",
                median(&mut runs.paired_cpu),
                runs.paired_cpu
                    .iter()
                    .copied()
                    .fold(f64::INFINITY, f64::min),
                runs.paired_cpu
                    .iter()
                    .copied()
                    .fold(f64::NEG_INFINITY, f64::max)
            );
            println!(
                "{name:<10} {wall:>8.3} {:>7.3} {cpu:>8.3} {:>7.3} {paired:>25} {:>13.0}",
                wall / base_wall,
                cpu / base_cpu,
                (cpu - base_cpu) / calls * 1e9
            );
        }
    }
    Ok(())
}

/// Runs the writer; returns its start time and (file number, time after write) pairs.
fn run_writer(me: &Path, root: &Path) -> Result<(u64, Vec<(usize, u64)>), String> {
    let child = Command::new(me)
        .arg("writer")
        .arg(root)
        .arg(SAMPLES.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("writer failed: {}", out.status));
    }
    let mut started = None;
    let mut writes = Vec::new();
    for line in BufReader::new(&out.stdout[..]).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next().map(str::parse::<u64>)) {
            (Some("start"), Some(Ok(t))) => started = Some(t),
            (Some(i), Some(Ok(t))) => {
                if let Ok(i) = i.parse() {
                    writes.push((i, t));
                }
            }
            _ => {}
        }
    }
    let started = started.ok_or("the writer printed no start time")?;
    Ok((started, writes))
}

/// A cost workload, run as a child process of its own.
#[derive(Clone, Copy)]
enum Load {
    /// MIB MiB written in BLOCK-byte writes to one file outside the watched folder.
    Write { mib: u64, block: usize },
    /// That many getppid() calls.
    Syscalls(u64),
}

impl Load {
    fn calls(self) -> u64 {
        match self {
            Load::Write { mib, block } => (mib << 20) / block as u64,
            Load::Syscalls(n) => n,
        }
    }

    /// Runs it once; returns the seconds it took.
    fn run(self, me: &Path, file: &Path) -> Result<Times, String> {
        let mut command = Command::new(me);
        match self {
            Load::Write { mib, block } => command
                .arg("load")
                .arg(file)
                .arg(mib.to_string())
                .arg(block.to_string()),
            Load::Syscalls(n) => command.arg("syscalls").arg(n.to_string()),
        };
        run_load(&mut command)
    }
}

/// The runs of one workload under one configuration.
#[derive(Default)]
struct Runs {
    wall: Vec<f64>,
    cpu: Vec<f64>,
    /// CPU time of each run divided by that of the run without a watcher before it.
    paired_cpu: Vec<f64>,
}

impl Runs {
    fn add(&mut self, times: Times, before: Times) {
        self.wall.push(times.wall);
        self.cpu.push(times.cpu);
        self.paired_cpu.push(times.cpu / before.cpu);
    }
}

/// Wall-clock and CPU seconds of one run of a workload.
#[derive(Clone, Copy)]
struct Times {
    wall: f64,
    cpu: f64,
}

fn run_load(command: &mut Command) -> Result<Times, String> {
    let out = command.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "load failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace().map(str::parse::<f64>);
    match (fields.next(), fields.next()) {
        (Some(Ok(wall)), Some(Ok(cpu))) => Ok(Times { wall, cpu }),
        _ => Err(format!("load printed no times: {text:?}")),
    }
}

fn percentile(sorted: &[i64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
