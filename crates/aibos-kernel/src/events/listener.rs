//! Commits of events in other PostgreSQL kernels: `LISTEN aibos_events`.
//!
//! Every append sends `NOTIFY aibos_events` in its own transaction (see
//! `store::append`); this task wakes this kernel's readers (event streams, the
//! webhook worker) when one arrives. Nothing is lost when the connection
//! drops: readers also look again every [`crate::limits::EVENT_POLL_MS`].

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// Pause before reconnecting a failed listener.
const RECONNECT_DELAY_MS: u64 = 500;

/// Runs until `stop`.
pub async fn run(pool: PgPool, state: AppState, stop: CancellationToken) {
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(super::NOTIFY_CHANNEL).await?;
            // Commits made while we were not listening are found by the readers' next look.
            state.events().committed();
            loop {
                listener.recv().await?;
                state.events().committed();
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            result = listener => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "event listener lost its connection; reconnecting");
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
