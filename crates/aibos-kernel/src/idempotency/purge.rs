//! The background purge of expired idempotency records: completed ones past
//! their TTL and in-flight ones whose lock ended (their kernel died).
//!
//! Expiry is checked whenever a record is read, so the purge only keeps the
//! table small: every [`limits::IDEMPOTENCY_PURGE_INTERVAL_SECONDS`], in
//! chunks of [`limits::IDEMPOTENCY_PURGE_CHUNK_ROWS`] so that no statement
//! holds SQLite's write lock long. Several kernels purging at once is
//! harmless: each deletes only what has expired.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::store;
use crate::limits;
use crate::state::AppState;

/// Runs until `stop`.
pub async fn run(state: AppState, stop: CancellationToken) {
    let first = Duration::from_secs(limits::IDEMPOTENCY_PURGE_FIRST_DELAY_SECONDS);
    let every = Duration::from_secs(limits::IDEMPOTENCY_PURGE_INTERVAL_SECONDS);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = purge(&state, crate::timestamp::now()).await {
                    tracing::warn!(error = %e, "idempotency purge failed; trying again at the next interval");
                }
            }
            () = stop.cancelled() => return,
        }
    }
}

/// Deletes the records expired as of `now`, a chunk at a time; returns how many.
pub async fn purge(state: &AppState, now: time::OffsetDateTime) -> Result<u64, sqlx::Error> {
    let now = crate::timestamp::format(now);
    let mut purged = 0;
    for _ in 0..limits::IDEMPOTENCY_PURGE_CHUNKS_MAX {
        let deleted =
            store::purge_expired(state.db(), &now, limits::IDEMPOTENCY_PURGE_CHUNK_ROWS).await?;
        purged += deleted;
        if deleted < limits::IDEMPOTENCY_PURGE_CHUNK_ROWS as u64 {
            break;
        }
    }
    state
        .metrics()
        .counter("aibos_idempotency_purged_total", &[])
        .increment(purged);
    if purged > 0 {
        tracing::info!(records = purged, "idempotency purge");
    }
    Ok(purged)
}
