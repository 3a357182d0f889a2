//! The printer actor of `filesync watch`: one JSON line per change on standard output.

use std::error::Error;
use std::io::Write;

use steady_state::*;

use crate::change::Change;

pub async fn run(
    actor: SteadyActorShadow,
    changes: SteadyRx<Change>,
) -> Result<(), Box<dyn Error>> {
    let actor = actor.into_spotlight([&changes], []);
    print(actor, changes).await
}

async fn print<A: SteadyActor>(
    mut actor: A,
    changes: SteadyRx<Change>,
) -> Result<(), Box<dyn Error>> {
    let mut changes = changes.acquire_guard().await;
    let stdout = std::io::stdout();
    while actor.is_running(|| changes.is_closed_and_empty()) {
        let _ = actor.wait_avail(&mut changes, 1).await;
        let mut out = stdout.lock();
        while let Some(change) = actor.try_take(&mut changes) {
            serde_json::to_writer(&mut out, &change)?;
            out.write_all(b"\n")?;
        }
        // A reader like `jq` or a test wants each line as it happens.
        out.flush()?;
    }
    Ok(())
}
