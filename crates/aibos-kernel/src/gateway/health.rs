//! Active health checks: every `gateway.health_interval_seconds`, and right
//! after the route table changes, each canon's `health_path` is called. A canon
//! that does not answer 2xx within `gateway.health_timeout_ms` is marked
//! unhealthy and not called until it answers again; each change of state (other
//! than the first success after start) is audited as `canon.health_changed`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, header};
use tokio_util::sync::CancellationToken;

use super::client::{self, UpstreamClient};
use super::state::Health;
use super::table::CanonEntry;
use crate::audit::{AuditContext, AuditEvent};
use crate::identity::SYSTEM_TENANT_ID;
use crate::state::AppState;

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
            tokio::time::timeout(timeout, client.send(&canon.base, canon.h2c, request)).await,
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
    // so reading it and setting it after the audit entry is no race. The entry
    // is written first so that whoever sees the new state can find its entry;
    // a failed audit write is logged and does not hold the state back.
    let before = canon.state.health();
    if before != now && !(before == Health::Unknown && now == Health::Healthy) {
        audit_change(state, canon, before, now).await;
    }
    canon.state.set_health(now);
}

async fn audit_change(state: &AppState, canon: &CanonEntry, before: Health, now: Health) {
    let healthy = now == Health::Healthy;
    tracing::warn!(canon = %canon.name, from = before.as_str(), to = now.as_str(), "canon health changed");
    let event = AuditEvent::new("canon.health_changed")
        .severity(if healthy { "info" } else { "warning" })
        .outcome(if healthy { "success" } else { "failure" })
        .resource("canon", &canon.id)
        .details(
            serde_json::json!({ "canon": canon.name, "from": before.as_str(), "to": now.as_str() }),
        );
    if let Err(e) = state
        .audit_alone(AuditContext::system(SYSTEM_TENANT_ID), event)
        .await
    {
        tracing::error!(error = ?e.code(), canon = %canon.name, "could not audit a health change");
    }
}
