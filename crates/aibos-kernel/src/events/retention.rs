//! The retention purge (`events.retention_days`): hourly, each tenant's events
//! older than the retention that nobody is still owed (see
//! `store::purge_tenant`), and finished webhook deliveries as old.
//!
//! Several kernels on one database may purge at once: deleting what another
//! already deleted is harmless, and what is owed is read from the database,
//! not from this instance's memory.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::store;
use crate::limits;
use crate::state::AppState;

/// Tenants read per query while purging.
const TENANTS_PER_PAGE: i64 = 500;

/// Runs until `stop`: a first purge a minute after start, then every
/// [`limits::EVENT_RETENTION_INTERVAL_SECONDS`].
pub async fn run(state: AppState, stop: CancellationToken) {
    let first = Duration::from_secs(limits::EVENT_RETENTION_FIRST_DELAY_SECONDS);
    let every = Duration::from_secs(limits::EVENT_RETENTION_INTERVAL_SECONDS);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = crate::timestamp::now();
                if let Err(e) = purge(&state, now).await {
                    tracing::warn!(error = %e, "event retention purge failed; trying again at the next interval");
                }
            }
            () = stop.cancelled() => return,
        }
    }
}

/// What one purge removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    /// Events deleted.
    pub events: u64,
    /// Finished webhook deliveries deleted (with their attempts).
    pub deliveries: u64,
}

/// Purges what the retention allows as of `now`.
pub async fn purge(state: &AppState, now: time::OffsetDateTime) -> Result<Purged, sqlx::Error> {
    let config = state.config();
    let days = i64::try_from(config.events.retention_days).unwrap_or(i64::MAX / 86_400);
    let cutoff = crate::timestamp::format(now - time::Duration::days(days));
    let relay = config.events.nats_url.is_some();
    let mut purged = Purged::default();
    let mut after = String::new();
    loop {
        let tenants = store::tenants_with_events(state.db(), &after, TENANTS_PER_PAGE).await?;
        for tenant_id in &tenants {
            purged.events += store::purge_tenant(state.db(), tenant_id, &cutoff, relay).await?;
        }
        match tenants.last() {
            Some(last) if tenants.len() as i64 == TENANTS_PER_PAGE => after = last.clone(),
            _ => break,
        }
    }
    loop {
        let deleted = store::purge_delivery_history(state.db(), &cutoff).await?;
        purged.deliveries += deleted;
        if deleted == 0 {
            break;
        }
    }
    let metrics = state.metrics();
    metrics
        .counter("aibos_events_purged_total", &[])
        .increment(purged.events);
    metrics
        .counter("aibos_webhook_deliveries_purged_total", &[])
        .increment(purged.deliveries);
    if purged != Purged::default() {
        tracing::info!(events = purged.events, deliveries = purged.deliveries, %cutoff, "event retention purge");
    }
    Ok(purged)
}

/// Runs until `stop`: the outbox's depth (`aibos_webhook_outbox_events`) read
/// every [`limits::METRICS_UPKEEP_SECONDS`], one aggregate query.
pub async fn gauge_outbox(state: AppState, stop: CancellationToken) {
    let gauge = state.metrics().gauge("aibos_webhook_outbox_events", &[]);
    let mut tick = tokio::time::interval(Duration::from_secs(limits::METRICS_UPKEEP_SECONDS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => match store::outbox_depth(state.db()).await {
                Ok(depth) => gauge.set(depth as f64),
                Err(e) => tracing::debug!(error = %e, "cannot read the webhook outbox depth"),
            },
            () = stop.cancelled() => return,
        }
    }
}
