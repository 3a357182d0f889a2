//! The scanner actor: the safety net. It walks the backing folder at start-up, every
//! `sync_interval`, and whenever the indexer asks (lost events), and reports every
//! difference from the index as a change, through the same queue as the live sources.

use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use steady_state::*;

use super::indexer::ScanReason;
use crate::capture::scan::scan;
use crate::change::ChangeSink;
use crate::ignores::Ignores;
use crate::index::Index;

/// What the scanner needs; shared with every restart of the actor.
pub struct ScanJob {
    pub root: PathBuf,
    pub index: Arc<Index>,
    /// What the walk leaves out.
    pub ignores: Arc<Ignores>,
    /// Where findings go: the capture queue (and the mount's cache invalidator).
    pub sink: Arc<dyn ChangeSink>,
    /// Zero: no periodic scan (still at start-up and on request).
    pub interval: Duration,
}

impl ScanJob {
    fn run(&self, why: &str) {
        let started = Instant::now();
        match scan(
            &self.root,
            &self.index,
            &self.ignores,
            self.sink.as_ref(),
            None,
        ) {
            Ok(stats) => tracing::info!(
                why,
                files = stats.files,
                dirs = stats.dirs,
                changes = stats.changes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "reconcile scan done"
            ),
            Err(err) => tracing::error!("reconcile scan of {} failed: {err}", self.root.display()),
        }
    }
}

pub async fn run(
    actor: SteadyActorShadow,
    requests: SteadyRx<ScanReason>,
    job: Arc<ScanJob>,
) -> Result<(), Box<dyn Error>> {
    let actor = actor.into_spotlight([&requests], []);
    scan_when_needed(actor, requests, job).await
}

async fn scan_when_needed<A: SteadyActor>(
    mut actor: A,
    requests: SteadyRx<ScanReason>,
    job: Arc<ScanJob>,
) -> Result<(), Box<dyn Error>> {
    let mut requests = requests.acquire_guard().await;
    // Changes made while filesync was stopped are found by this first scan.
    job.run("start-up");
    let mut next_periodic = Instant::now() + job.interval;
    // Without a periodic scan, wake now and then anyway to take part in shutdown.
    let idle_wait = Duration::from_millis(200);
    while actor.is_running(|| requests.is_closed_and_empty()) {
        let wait = if job.interval.is_zero() {
            idle_wait
        } else {
            next_periodic
                .saturating_duration_since(Instant::now())
                .min(idle_wait)
        };
        let _woken = await_for_any!(actor.wait_avail(&mut requests, 1), actor.wait_timeout(wait));
        let mut requested = None;
        while let Some(reason) = actor.try_take(&mut requests) {
            requested = Some(reason);
        }
        if let Some(reason) = requested {
            job.run(match reason {
                ScanReason::LostEvents => "events were lost",
                ScanReason::IndexMismatch => "the index disagreed with the disk",
            });
            next_periodic = Instant::now() + job.interval;
        } else if !job.interval.is_zero() && Instant::now() >= next_periodic {
            job.run("periodic");
            next_periodic = Instant::now() + job.interval;
        }
    }
    Ok(())
}
