//! Progress of long work: a scan of the backing folder, and files arriving from peers.
//!
//! A person at a terminal gets an `indicatif` bar (files, bytes, rate, time left); a log
//! file, a pipe or the journal gets plain lines every few seconds instead, because a bar
//! redrawn in place is unreadable there. The daemon writes plain lines (through
//! `tracing`), and also draws a bar while a catch-up runs if it was started in the
//! foreground on a terminal.

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
/// that the log of a first sync of a large folder shows it advancing. Once the applier
/// has asked a peer for the files a catch-up needs ([`TransferLog::expect`]), the lines
/// also say how much is left and about how long it takes, and the end of the catch-up
/// ([`TransferLog::caught_up`]) writes a summary line.
#[derive(Debug, Default)]
pub struct TransferLog {
    current: Option<Transfer>,
    /// A bar on the daemon's terminal, when it runs in the foreground on one.
    bar: Option<ProgressBar>,
}

#[derive(Debug)]
struct Transfer {
    started: Instant,
    last_arrival: Instant,
    last_line: Instant,
    files: u64,
    bytes: u64,
    /// What the catch-ups under way asked for: files and bytes (0 when not known).
    expected_files: u64,
    expected_bytes: u64,
}

impl Transfer {
    fn new(now: Instant) -> Transfer {
        Transfer {
            started: now,
            last_arrival: now,
            last_line: now,
            files: 0,
            bytes: 0,
            expected_files: 0,
            expected_bytes: 0,
        }
    }

    /// The progress line: what arrived, the rate, and with a known total what is left.
    fn line(&self, now: Instant) -> String {
        let elapsed = now.duration_since(self.started);
        let mut line = format!(
            "receiving from peers: {} files, {} in {} ({}/s)",
            HumanCount(self.files),
            HumanBytes(self.bytes),
            HumanDuration(elapsed),
            HumanBytes(per_second(self.bytes, elapsed))
        );
        if self.expected_files > 0 {
            line.push_str(&format!(
                " of {} files, {}",
                HumanCount(self.expected_files),
                HumanBytes(self.expected_bytes)
            ));
            let left = match self.expected_bytes {
                0 => time_left(self.files, self.expected_files, elapsed),
                expected => time_left(self.bytes, expected, elapsed),
            };
            if let Some(left) = left {
                line.push_str(&format!(", about {} left", HumanDuration(left)));
            }
        }
        line
    }
}

impl TransferLog {
    /// Notes that `files` files of `bytes` bytes in all were asked for (a catch-up).
    pub fn expect(&mut self, files: u64, bytes: u64) {
        if files == 0 {
            return;
        }
        let now = Instant::now();
        let transfer = self.current.get_or_insert_with(|| Transfer::new(now));
        transfer.last_arrival = now;
        transfer.expected_files = transfer.expected_files.saturating_add(files);
        transfer.expected_bytes = transfer.expected_bytes.saturating_add(bytes);
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = self.bar.get_or_insert_with(|| {
                let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                let template =
                    "{spinner} catching up [{bar:20}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}";
                // The template is constant; a bad one only loses the layout.
                if let Ok(style) = ProgressStyle::with_template(template) {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar
            });
            bar.set_length(transfer.expected_bytes);
            bar.set_position(transfer.bytes);
        }
    }

    /// A peer sent every file it was asked for: with everything asked for in, logs the
    /// summary of the transfer and starts the next one afresh.
    pub fn caught_up(&mut self) {
        let Some(transfer) = &self.current else {
            return;
        };
        if transfer.expected_files == 0 || transfer.files < transfer.expected_files {
            return;
        }
        let elapsed = transfer.started.elapsed();
        tracing::info!(
            "catch-up done: {} files, {} in {} ({}/s)",
            HumanCount(transfer.files),
            HumanBytes(transfer.bytes),
            HumanDuration(elapsed),
            HumanBytes(per_second(transfer.bytes, elapsed))
        );
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.current = None;
    }

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
            current => current.insert(Transfer::new(now)),
        };
        transfer.last_arrival = now;
        transfer.bytes = transfer.bytes.saturating_add(bytes);
        transfer.files = transfer.files.saturating_add(u64::from(completes_file));
        if let Some(bar) = &self.bar {
            bar.set_position(transfer.bytes);
        }
        if now.duration_since(transfer.last_line) >= TRANSFER_LOG_EVERY {
            transfer.last_line = now;
            tracing::info!("{}", transfer.line(now));
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

    #[test]
    fn a_catch_up_with_a_known_total_says_what_is_left_and_ends_with_a_summary() {
        let mut log = TransferLog::default();
        log.expect(4, 400);
        let started = Instant::now() - Duration::from_secs(10);
        let transfer = log.current.as_mut().expect("a transfer");
        transfer.started = started;
        transfer.files = 1;
        transfer.bytes = 100;
        let line = transfer.line(Instant::now());
        assert!(line.contains("of 4 files, 400 B"), "{line}");
        assert!(line.contains("about 30 seconds left"), "{line}");
        log.caught_up();
        assert!(log.current.is_some(), "not everything asked for is in yet");
        if let Some(transfer) = log.current.as_mut() {
            transfer.files = 4;
        }
        log.caught_up();
        assert!(log.current.is_none());
    }
}
