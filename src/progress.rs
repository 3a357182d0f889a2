//! Progress of long work: a scan of the backing folder, and files arriving from peers.
//!
//! A person at a terminal gets an `indicatif` bar (files, bytes, rate, time left); a log
//! file, a pipe or the journal gets plain lines every few seconds instead, because a bar
//! redrawn in place is unreadable there. The daemon always writes plain lines (through
//! `tracing`), since it has no terminal.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{
    HumanBytes, HumanCount, HumanDuration, ProgressBar, ProgressDrawTarget, ProgressStyle,
};

use crate::sync::proto::{FileData, Message, Op};

/// How often a plain progress line is written.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// How often the daemon logs files arriving from peers while they flow.
const TRANSFER_LOG_EVERY: Duration = Duration::from_secs(5);

/// A pause in arrivals this long ends a transfer; the next arrival starts a new one.
const TRANSFER_IDLE: Duration = Duration::from_secs(10);

/// The progress of a scan, shown on standard error.
pub struct ScanProgress {
    bar: ProgressBar,
    /// When not on a terminal: when the last plain line was written.
    plain: Option<Mutex<Instant>>,
    /// Entries the index knew before the scan: the expected total, for the time left.
    expected: u64,
    started: Instant,
}

impl ScanProgress {
    /// `expected` is how many entries the scan will probably see (the index's record
    /// count; 0 if unknown). `terminal` chooses the bar over plain lines.
    pub fn new(expected: u64, terminal: bool) -> ScanProgress {
        let started = Instant::now();
        if !terminal {
            return ScanProgress {
                bar: ProgressBar::hidden(),
                plain: Some(Mutex::new(started)),
                expected,
                started,
            };
        }
        let bar = ProgressBar::with_draw_target(
            (expected > 0).then_some(expected),
            ProgressDrawTarget::stderr(),
        );
        let template = if expected > 0 {
            "{spinner} [{bar:20}] {human_pos}/{human_len} files {msg} ETA {eta}"
        } else {
            "{spinner} scanning: {human_pos} files {msg} {elapsed}"
        };
        // The templates are constant; a bad one only loses the layout, not the progress.
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message("starting");
        bar.enable_steady_tick(Duration::from_millis(200));
        ScanProgress {
            bar,
            plain: None,
            expected,
            started,
        }
    }

    /// The scan has seen `files` entries holding `bytes` so far. Called from the scan's
    /// threads (see [`crate::capture::scan::scan`]).
    pub fn update(&self, files: u64, bytes: u64) {
        let rate = per_second(bytes, self.started.elapsed());
        self.bar
            .set_message(format!("{} {}/s", HumanBytes(bytes), HumanBytes(rate)));
        self.bar.update(|state| {
            // The index may know fewer entries than the folder has now.
            if state.len().is_some_and(|length| files > length) {
                state.set_len(files);
            }
            state.set_pos(files);
        });
        if let Some(last) = &self.plain {
            let Ok(mut last) = last.lock() else { return };
            if last.elapsed() >= PLAIN_EVERY {
                *last = Instant::now();
                eprintln!("{}", self.plain_line(files, bytes));
            }
        }
    }

    /// Runs `print` with the bar hidden, so that lines printed meanwhile do not mix with it.
    pub fn suspend<R>(&self, print: impl FnOnce() -> R) -> R {
        self.bar.suspend(print)
    }

    /// Removes the bar (the caller prints the outcome).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    fn plain_line(&self, files: u64, bytes: u64) -> String {
        let elapsed = self.started.elapsed();
        let mut line = format!(
            "scanning: {} files, {}, {} files/s, {}/s",
            HumanCount(files),
            HumanBytes(bytes),
            HumanCount(per_second(files, elapsed)),
            HumanBytes(per_second(bytes, elapsed))
        );
        if let Some(left) = time_left(files, self.expected, elapsed) {
            line.push_str(&format!(", about {} left", HumanDuration(left)));
        }
        line
    }
}

/// Files and bytes arriving from peers, logged every few seconds while they flow, so
/// that the log of a first sync of a large folder shows it advancing.
#[derive(Debug, Default)]
pub struct TransferLog {
    current: Option<Transfer>,
}

#[derive(Debug)]
struct Transfer {
    started: Instant,
    last_arrival: Instant,
    last_line: Instant,
    files: u64,
    bytes: u64,
}

impl TransferLog {
    /// Counts a message a peer sent (after it was checked): a file whose content is now
    /// complete counts as a file, and the file data it carries as bytes.
    pub fn record(&mut self, message: &Message) {
        let Message::Change(change) = message else {
            return;
        };
        let Op::File { data, .. } = &change.op else {
            return;
        };
        let (bytes, completes_file) = match data {
            FileData::Unchanged => (0, true),
            FileData::Ranges(ranges) => (
                ranges
                    .iter()
                    .map(|range| u64::from(range.data.raw_len))
                    .sum(),
                true,
            ),
            FileData::Delta { delta, .. } => (u64::from(delta.raw_len), true),
            FileData::Whole { data, last, .. } => (u64::from(data.raw_len), *last),
        };
        let now = Instant::now();
        let transfer = match &mut self.current {
            Some(transfer) if now.duration_since(transfer.last_arrival) < TRANSFER_IDLE => transfer,
            current => current.insert(Transfer {
                started: now,
                last_arrival: now,
                last_line: now,
                files: 0,
                bytes: 0,
            }),
        };
        transfer.last_arrival = now;
        transfer.bytes = transfer.bytes.saturating_add(bytes);
        transfer.files = transfer.files.saturating_add(u64::from(completes_file));
        if now.duration_since(transfer.last_line) >= TRANSFER_LOG_EVERY {
            transfer.last_line = now;
            let elapsed = now.duration_since(transfer.started);
            tracing::info!(
                "receiving from peers: {} files, {} in {} ({}/s)",
                HumanCount(transfer.files),
                HumanBytes(transfer.bytes),
                HumanDuration(elapsed),
                HumanBytes(per_second(transfer.bytes, elapsed))
            );
        }
    }
}

fn per_second(count: u64, elapsed: Duration) -> u64 {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 {
        return 0;
    }
    (count as f64 / seconds) as u64
}

/// The time left at the rate so far, if the total is known and not yet reached.
fn time_left(done: u64, expected: u64, elapsed: Duration) -> Option<Duration> {
    if done == 0 || expected <= done {
        return None;
    }
    let left = elapsed.as_secs_f64() * (expected - done) as f64 / done as f64;
    Some(Duration::from_secs_f64(left))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left_follows_the_rate_so_far() {
        assert_eq!(
            time_left(25, 100, Duration::from_secs(10)),
            Some(Duration::from_secs(30))
        );
        assert_eq!(time_left(0, 100, Duration::from_secs(10)), None);
        assert_eq!(time_left(120, 100, Duration::from_secs(10)), None);
        assert_eq!(per_second(100, Duration::ZERO), 0);
        assert_eq!(per_second(100, Duration::from_secs(4)), 25);
    }

    #[test]
    fn plain_lines_name_files_bytes_rate_and_time_left() {
        let progress = ScanProgress::new(1000, false);
        let line = progress.plain_line(10, 4096);
        assert!(line.starts_with("scanning: 10 files, 4.00 KiB"), "{line}");
        assert!(line.contains("files/s"), "{line}");
    }

    #[test]
    fn whole_files_count_once_complete() {
        use crate::sync::proto::{Change, Codec, Meta, Payload, RelPath};
        let piece = |last| {
            Message::Change(Change {
                seq: 1,
                path: RelPath(b"big".to_vec()),
                op: Op::File {
                    meta: Meta {
                        mode: 0o644,
                        uid: 0,
                        gid: 0,
                        mtime_ns: 0,
                        xattrs: None,
                    },
                    size: 8,
                    data: FileData::Whole {
                        offset: 0,
                        data: Payload {
                            codec: Codec::Raw,
                            raw_len: 4,
                            bytes: b"abcd".to_vec(),
                        },
                        last,
                    },
                    blocks: Vec::new(),
                },
                version: Default::default(),
            })
        };
        let mut log = TransferLog::default();
        log.record(&piece(false));
        log.record(&piece(true));
        log.record(&Message::CaughtUp);
        let transfer = log.current.as_ref().map(|t| (t.files, t.bytes));
        assert_eq!(transfer, Some((1, 8)));
    }
}
