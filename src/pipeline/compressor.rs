//! The compressor actor: compresses the file data of outgoing changes by the folder's
//! policy (see [`crate::sync::compress`]: zstd at the configured level, skipping types that
//! are already compressed), so the session sends fewer bytes. The pieces of a whole file
//! whose first piece did not compress are sent raw without trying again.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use steady_state::*;

use super::session::Outgoing;
use crate::status::{payload_sizes, Stats};
use crate::sync::compress::{CompressionPolicy, WholeTransfers};
use crate::sync::proto::Message;

pub async fn run(
    actor: SteadyActorShadow,
    raw: SteadyRx<Outgoing>,
    compressed: SteadyTx<Outgoing>,
    policy: Arc<CompressionPolicy>,
    stats: Arc<Stats>,
) -> Result<(), Box<dyn Error>> {
    let actor = actor.into_spotlight([&raw], [&compressed]);
    compress(actor, raw, compressed, policy, stats).await
}

async fn compress<A: SteadyActor>(
    mut actor: A,
    raw: SteadyRx<Outgoing>,
    compressed: SteadyTx<Outgoing>,
    policy: Arc<CompressionPolicy>,
    stats: Arc<Stats>,
) -> Result<(), Box<dyn Error>> {
    let mut raw = raw.acquire_guard().await;
    let mut compressed = compressed.acquire_guard().await;
    let idle_wait = Duration::from_millis(100);
    let mut transfers = WholeTransfers::default();
    while actor.is_running(|| raw.is_closed_and_empty() && compressed.mark_closed()) {
        let _woken = await_for_any!(actor.wait_avail(&mut raw, 1), actor.wait_timeout(idle_wait));
        while let Some(mut outgoing) = actor.try_take(&mut raw) {
            if let Message::Change(change) = &mut outgoing.message {
                tracing::trace!(seq = change.seq, "compressing");
                let (raw_bytes, _) = payload_sizes(&change.op);
                transfers.compress_change(&policy, change);
                let (_, compressed_bytes) = payload_sizes(&change.op);
                stats.sent_payload.add(raw_bytes, compressed_bytes);
            }
            actor
                .send_async(&mut compressed, outgoing, SendSaturation::AwaitForRoom)
                .await;
        }
    }
    Ok(())
}
