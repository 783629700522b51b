//! Cross-instance invalidation on PostgreSQL: `LISTEN aibos_authz`.
//!
//! Every change that affects permissions sends `NOTIFY aibos_authz` in its own
//! transaction; this task applies the same invalidation in this instance. If
//! the listening connection drops, notifications may have been missed, so the
//! whole cache is cleared before listening again.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio_util::sync::CancellationToken;

use super::cache::{Invalidation, NOTIFY_CHANNEL};
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
                let what = Invalidation::parse(notification.payload());
                if what == Invalidation::All {
                    state.refresh_keys().await;
                    rebuild_gateway(&state).await;
                }
                if what == Invalidation::Registry {
                    rebuild_gateway(&state).await;
                    continue;
                }
                state.invalidate(&what);
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

async fn rebuild_gateway(state: &AppState) {
    if let Err(e) = state.rebuild_gateway().await {
        tracing::warn!(error = ?e.code(), "could not rebuild the gateway's route table");
    }
}
