//! Active health checks: every `gateway.health_interval_seconds`, and right
//! after the route table changes, each canon's `health_path` is called. A canon
//! that does not answer 2xx within `gateway.health_timeout_ms` is marked
//! unhealthy and not called until it answers again.
//!
//! Each instance keeps its own view (it is the one calling the cell), and
//! records a change of it in `canon_health`, shared by all instances: a change
//! of the recorded state is audited as `canon.health_changed` by the one
//! instance that recorded it, so several instances seeing the same failure
//! write one entry, and a restart does not forget a canon that was down. A
//! canon's first recorded state is audited only if it is a failure. See
//! `record_change` for a record left behind by an instance that stopped.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, header};
use tokio_util::sync::CancellationToken;

use super::client::{self, UpstreamClient};
use super::state::Health;
use super::table::CanonEntry;
use crate::audit::{self, AuditContext, AuditEvent};
use crate::error::ApiError;
use crate::identity::SYSTEM_TENANT_ID;
use crate::registry::store::{self, HealthRecord};
use crate::state::AppState;
use crate::timestamp;

/// Runs until `stop`.
pub async fn run(state: AppState, stop: CancellationToken) {
    let client = client::build(&state.config_ref().gateway);
    loop {
        check_all(&state, &client).await;
        let interval = Duration::from_secs(state.config_ref().gateway.health_interval_seconds);
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = state.gateway().table_changed() => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Checks every canon at once (at most `limits::CANONS_MAX` of them).
pub async fn check_all(state: &AppState, client: &UpstreamClient) {
    let table = state.gateway().table().clone();
    let timeout = Duration::from_millis(state.config_ref().gateway.health_timeout_ms);
    let mut checks = tokio::task::JoinSet::new();
    for canon in table.canons() {
        let (state, client, canon) = (state.clone(), client.clone(), Arc::clone(canon));
        checks.spawn(async move { check_one(&state, &client, &canon, timeout).await });
    }
    while checks.join_next().await.is_some() {}
}

async fn check_one(
    state: &AppState,
    client: &UpstreamClient,
    canon: &CanonEntry,
    timeout: Duration,
) {
    let request = Request::get(format!("{}{}", canon.base.path_prefix, canon.health_path))
        .header(header::USER_AGENT, "aibos-health-check")
        .body(Body::empty());
    let healthy = match request {
        Ok(request) => matches!(
            tokio::time::timeout(timeout, client.send(&canon.base, canon.h2c, canon.tls.as_ref(), request)).await,
            Ok(Ok(response)) if response.status().is_success()
        ),
        Err(_) => false,
    };
    let now = if healthy {
        Health::Healthy
    } else {
        Health::Unhealthy
    };
    // Only this task writes a canon's health (one check per canon at a time),
    // so reading it and setting it after recording the change is no race. The
    // change is recorded (and audited) first so that whoever sees the new state
    // can find its entry; a failed write is logged and does not hold the state back.
    let before = canon.state.health();
    if before != now {
        tracing::warn!(canon = %canon.name, from = before.as_str(), to = now.as_str(), "canon health changed");
        record_change(state, canon, before, now).await;
    }
    canon.state.set_health(now);
}

/// Records the canon's new state for all instances, and audits it if no other
/// instance has recorded this change.
///
/// Every instance checks every canon each `health_interval_seconds`, so all
/// that see one change see it within an interval and a timeout of each other.
/// The same state recorded longer ago than twice that is another change's
/// record, left by an instance that stopped before the canon changed back: an
/// instance that saw the other state before records and audits this change.
async fn record_change(state: &AppState, canon: &CanonEntry, before: Health, now: Health) {
    let healthy = now == Health::Healthy;
    let stale_before = (before != Health::Unknown).then(|| {
        let gateway = &state.config_ref().gateway;
        let same_change_within = 2 * Duration::from_secs(gateway.health_interval_seconds)
            + Duration::from_millis(gateway.health_timeout_ms);
        timestamp::format(timestamp::now() - same_change_within)
    });
    let (canon_id, name) = (canon.id.clone(), canon.name.clone());
    let keys = state.redact_keys();
    let written = state
        .db()
        .write(move |tx| {
            Box::pin(async move {
                let recorded =
                    store::record_health(tx, &canon_id, now.as_str(), stale_before.as_deref())
                        .await?;
                let from = match recorded {
                    HealthRecord::Changed | HealthRecord::Renewed if healthy => Health::Unhealthy,
                    HealthRecord::Changed | HealthRecord::Renewed => Health::Healthy,
                    // Healthy is what a new canon is expected to be; only a
                    // failure is news.
                    HealthRecord::First if !healthy => Health::Unknown,
                    HealthRecord::First | HealthRecord::Unchanged => return Ok(()),
                };
                let event = AuditEvent::new("canon.health_changed")
                    .severity(if healthy { "info" } else { "warning" })
                    .outcome(if healthy { "success" } else { "failure" })
                    .resource("canon", &canon_id)
                    .details(serde_json::json!({ "canon": name, "from": from.as_str(), "to": now.as_str() }));
                audit::record(tx, &AuditContext::system(SYSTEM_TENANT_ID), event, &keys).await?;
                Ok::<_, ApiError>(())
            })
        })
        .await;
    if let Err(e) = written {
        tracing::error!(error = ?e.code(), canon = %canon.name, "could not record a health change");
    }
}
