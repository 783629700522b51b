//! The background database probe behind `aibos_database_up`.
//!
//! `/api/health` checks the database when it is asked; Prometheus only reads
//! `/metrics`, so without this loop a database outage would show in no metric
//! until someone called `/api/health`. The probe is the same query with the
//! same timeout as `/api/health`, every [`limits::DATABASE_PROBE_INTERVAL_SECONDS`],
//! and `/api/health` sets the gauge too. While the database answers, each
//! probe also reads how many entries the audit trail holds
//! (`aibos_audit_entries`, SPEC §metrics: one row per tenant, the chains'
//! heads), so that its growth shows in the metrics whatever instance wrote.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::db::DbError;
use crate::limits;
use crate::state::AppState;

/// One round trip ([`crate::db::Db::ping`]) within [`limits::HEALTH_DB_TIMEOUT_MS`]; sets `aibos_database_up`.
pub async fn probe(state: &AppState) -> Result<Duration, DbError> {
    let result = state
        .db()
        .ping(Duration::from_millis(limits::HEALTH_DB_TIMEOUT_MS))
        .await;
    state.metrics().database_up(result.is_ok());
    result
}

/// Probes until `stop`, logging each change between up and down once (not
/// every probe of an outage).
pub async fn run(state: AppState, stop: CancellationToken) {
    let mut tick =
        tokio::time::interval(Duration::from_secs(limits::DATABASE_PROBE_INTERVAL_SECONDS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_up = true;
    let audit_entries = state.metrics().gauge("aibos_audit_entries", &[]);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let up = match probe(&state).await {
                    Ok(_) => {
                        match crate::audit::store::total_entries(state.db()).await {
                            Ok(n) => audit_entries.set(n as f64),
                            Err(e) => tracing::debug!(error = %e, "database probe: cannot count the audit entries"),
                        }
                        true
                    }
                    Err(e) => {
                        if was_up {
                            tracing::warn!(error = %e, "database probe: the database is down");
                        }
                        false
                    }
                };
                if up && !was_up {
                    tracing::info!("database probe: the database answers again");
                }
                was_up = up;
            }
            () = stop.cancelled() => return,
        }
    }
}
