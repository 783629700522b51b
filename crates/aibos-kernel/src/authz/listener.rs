//! Invalidations from other processes: on PostgreSQL `LISTEN aibos_authz`,
//! on SQLite a poll of `invalidation_log`.
//!
//! Every change that affects permissions sends `NOTIFY aibos_authz` in its own
//! transaction (on SQLite, appends the same payload to the log); this task
//! applies the same invalidation in this instance. If the listening connection
//! drops, notifications may have been missed, so the whole cache is cleared
//! before listening again. On SQLite the other process is the offline command
//! line (`aibos tenant suspend`, `keys rotate`), seen within a poll interval.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio_util::sync::CancellationToken;

use super::cache::{Invalidation, NOTIFY_CHANNEL};
use crate::limits;
use crate::state::AppState;

/// Pause before reconnecting a failed listener.
const RECONNECT_DELAY_MS: u64 = 500;

/// Runs until `stop`.
pub async fn run(pool: PgPool, state: AppState, stop: CancellationToken) {
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            // Anything sent while we were not listening is lost: start from a clean cache.
            state.invalidate(&Invalidation::All);
            rebuild_gateway(&state).await;
            loop {
                let notification = listener.recv().await?;
                apply(&state, Invalidation::parse(notification.payload())).await;
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            result = listener => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "invalidation listener lost its connection; reconnecting");
                }
            }
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(RECONNECT_DELAY_MS)) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Applies one invalidation another process sent.
async fn apply(state: &AppState, what: Invalidation) {
    match what {
        Invalidation::All => {
            state.refresh_keys().await;
            rebuild_gateway(state).await;
            state.invalidate(&what);
        }
        Invalidation::Registry => rebuild_gateway(state).await,
        what => state.invalidate(&what),
    }
}

/// Runs until `stop` on SQLite: reads the invalidation log every
/// [`limits::INVALIDATION_POLL_MS`] and applies what other processes (and
/// this one: harmless, a second invalidation) wrote since the last read;
/// forgets entries older than [`limits::INVALIDATION_LOG_RETENTION_SECONDS`].
pub async fn poll_log(state: AppState, stop: CancellationToken) {
    let mut last = match super::store::last_invalidation(state.db()).await {
        Ok(seq) => seq,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the invalidation log; reading it all");
            0
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(limits::INVALIDATION_POLL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Pruning is a write: once a minute is plenty for an hour's retention.
    let prune_every = (60_000 / limits::INVALIDATION_POLL_MS).max(1);
    let mut polls = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        match super::store::invalidations_after(
            state.db(),
            last,
            limits::INVALIDATION_POLL_BATCH_MAX,
        )
        .await
        {
            Ok(entries) => {
                for (seq, payload) in entries {
                    apply(&state, Invalidation::parse(&payload)).await;
                    last = seq;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the invalidation log"),
        }
        polls += 1;
        if polls.is_multiple_of(prune_every) {
            let before = crate::timestamp::format(
                crate::timestamp::now()
                    - time::Duration::seconds(limits::INVALIDATION_LOG_RETENTION_SECONDS),
            );
            if let Err(e) = super::store::prune_invalidations(state.db(), &before).await {
                tracing::warn!(error = %e, "cannot prune the invalidation log");
            }
        }
    }
}

async fn rebuild_gateway(state: &AppState) {
    if let Err(e) = state.rebuild_gateway().await {
        tracing::warn!(error = ?e.code(), "could not rebuild the gateway's route table");
    }
}
