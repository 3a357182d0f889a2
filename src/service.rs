//! Running as a systemd service (`Type=notify`, see `systemd/filesync@.service`).
//!
//! Once the folder is mounted and the watcher runs, the daemon sends `READY=1` with a
//! `STATUS=` line (`mounted, watcher ebpf, peer connected`). A thread then refreshes that
//! line when it changes and, when the unit sets `WatchdogSec=`, sends `WATCHDOG=1` three
//! times per period, but only while the pipeline's heartbeat moves: the coalescer and the
//! peer session advance it every time round their loops (at least every 100 ms when
//! idle), so a graph that is wedged stops the pings and systemd restarts the service.
//! Unmounting sends `STOPPING=1` before the graph drains.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) nothing is sent and no thread runs.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use sd_notify::NotifyState;

use crate::status::Stats;

/// How often the `STATUS=` line is refreshed when no watchdog asks for more.
const STATUS_PERIOD: Duration = Duration::from_secs(5);
/// The shortest tick, so a tiny `WatchdogSec=` cannot make a busy loop.
const MIN_TICK: Duration = Duration::from_millis(100);

/// The daemon's side of the conversation with systemd.
pub struct Notifier {
    /// Dropping it stops the thread.
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Notifier {
    /// Tells systemd the mount is ready and starts the status and watchdog thread.
    pub fn ready(stats: Arc<Stats>) -> Notifier {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Notifier {
                stop: None,
                thread: None,
            };
        }
        let mut status = stats.summary();
        send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        let watchdog = sd_notify::watchdog_enabled();
        let tick = watchdog
            .map_or(STATUS_PERIOD, |period| (period / 3).min(STATUS_PERIOD))
            .max(MIN_TICK);
        let (stop, stopped) = bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("sd-notify".into())
            .spawn(move || {
                let mut last_beat = stats.heartbeat();
                while stopped.recv_timeout(tick) == Err(RecvTimeoutError::Timeout) {
                    let beat = stats.heartbeat();
                    if watchdog.is_some() {
                        if beat != last_beat {
                            send(&[NotifyState::Watchdog]);
                        } else {
                            tracing::warn!(
                                "the pipeline made no progress for {tick:?}: no watchdog ping"
                            );
                        }
                    }
                    last_beat = beat;
                    let now = stats.summary();
                    if now != status {
                        status = now;
                        send(&[NotifyState::Status(&status)]);
                    }
                }
            });
        match thread {
            Ok(thread) => Notifier {
                stop: Some(stop),
                thread: Some(thread),
            },
            Err(err) => {
                tracing::warn!("cannot start the systemd notification thread: {err}");
                Notifier {
                    stop: None,
                    thread: None,
                }
            }
        }
    }

    /// Tells systemd the service is stopping (the graph drains next) and ends the thread.
    pub fn stopping(mut self) {
        if self.stop.take().is_some() {
            send(&[
                NotifyState::Stopping,
                NotifyState::Status("unmounted, draining the queue"),
            ]);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(err) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {err}");
    }
}
