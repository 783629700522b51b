//! The outbox publisher: posts each committed payment's
//! `finance.payment.processed` to the kernel, as the service account of the
//! payment's tenant.
//!
//! A row is written in the payment's own transaction, so an event exists for
//! every payment and for no refused one. The publisher reads due rows, posts
//! them with `Idempotency-Key` = the row id (a resend after a timeout is
//! recorded once by the kernel), and marks them published. A failed publish
//! is retried with exponential backoff capped at [`OUTBOX_BACKOFF_MAX`];
//! no row is ever dropped. Woken right after a commit, it polls every
//! [`OUTBOX_POLL_INTERVAL`] otherwise.
//!
//! Each configured service account's tenant is learnt from the kernel
//! (`GET /api/kernel/auth/me`); an account the kernel cannot name yet is
//! asked again with backoff. Rows of a tenant without an account wait.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use aibos_cell::{CorrelationId, KernelClient, NewEvent};
use futures_util::StreamExt as _;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::db::Db;
use crate::limits::{
    OUTBOX_BACKOFF_BASE, OUTBOX_BACKOFF_MAX, OUTBOX_BATCH_ROWS_MAX, OUTBOX_ERROR_CHARS_MAX,
    OUTBOX_POLL_INTERVAL, OUTBOX_PUBLISH_CONCURRENCY,
};
use crate::store::{self, OutboxResult, OutboxRow};

/// The most tenants remembered as "already warned about": beyond it the
/// warning may repeat, which is better than an unbounded set.
const WARNED_TENANTS_MAX: usize = 10_000;

/// The delay before attempt `attempts + 1`: base × 2^attempts, at most the cap.
pub fn backoff(attempts: u32) -> Duration {
    let factor = 1u32.checked_shl(attempts.min(16)).unwrap_or(u32::MAX);
    OUTBOX_BACKOFF_BASE
        .saturating_mul(factor)
        .min(OUTBOX_BACKOFF_MAX)
}

/// A service account whose tenant is not known yet.
struct Pending {
    client: KernelClient,
    attempts: u32,
    next_try: Instant,
}

/// The background publisher. Built by `Hub::build`, run by `Hub::run_until_stopped`.
pub struct Publisher {
    db: Db,
    wake: Arc<Notify>,
    pending: Vec<Pending>,
    by_tenant: HashMap<String, KernelClient>,
    warned: HashSet<String>,
}

impl Publisher {
    /// A publisher over `db` for `clients` (one per service account).
    pub fn new(db: Db, wake: Arc<Notify>, clients: Vec<KernelClient>) -> Publisher {
        let now = Instant::now();
        Publisher {
            db,
            wake,
            pending: clients
                .into_iter()
                .map(|client| Pending {
                    client,
                    attempts: 0,
                    next_try: now,
                })
                .collect(),
            by_tenant: HashMap::new(),
            warned: HashSet::new(),
        }
    }

    /// Runs until `stop` is cancelled; a pass in hand is finished first.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            if stop.is_cancelled() {
                return;
            }
            self.resolve_tenants().await;
            let full_batch = match self.pass().await {
                Ok(rows) => rows as i64 == OUTBOX_BATCH_ROWS_MAX,
                Err(error) => {
                    tracing::warn!(%error, "outbox pass failed; retrying");
                    false
                }
            };
            if full_batch {
                continue;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(OUTBOX_POLL_INTERVAL) => {}
            }
        }
    }

    /// Asks the kernel who each not-yet-known account is.
    async fn resolve_tenants(&mut self) {
        let now = Instant::now();
        let mut still_pending = Vec::with_capacity(self.pending.len());
        for mut pending in std::mem::take(&mut self.pending) {
            if pending.next_try > now {
                still_pending.push(pending);
                continue;
            }
            match pending.client.whoami().await {
                Ok(identity) => {
                    tracing::info!(
                        tenant_id = %identity.tenant_id,
                        tenant = %identity.tenant_slug,
                        "outbox publisher serves this tenant"
                    );
                    self.warned.remove(&identity.tenant_id);
                    self.by_tenant.insert(identity.tenant_id, pending.client);
                }
                Err(error) => {
                    let delay = backoff(pending.attempts);
                    tracing::warn!(%error, ?pending.client, retry_in_ms = delay.as_millis() as u64,
                        "cannot learn a service account's tenant from the kernel");
                    pending.attempts = pending.attempts.saturating_add(1);
                    pending.next_try = Instant::now() + delay;
                    still_pending.push(pending);
                }
            }
        }
        self.pending = still_pending;
    }

    /// One pass over the due rows; returns how many were read.
    async fn pass(&mut self) -> Result<usize, crate::error::HubError> {
        let rows = store::due_outbox(&self.db, store::now_millis(), OUTBOX_BATCH_ROWS_MAX).await?;
        let count = rows.len();
        if count == 0 {
            return Ok(0);
        }
        let mut results = Vec::with_capacity(count);
        let mut work = Vec::with_capacity(count);
        for row in rows {
            match self.by_tenant.get(&row.tenant_id) {
                Some(client) => work.push((client.clone(), row)),
                None => {
                    if self.warned.len() < WARNED_TENANTS_MAX
                        && self.warned.insert(row.tenant_id.clone())
                    {
                        tracing::warn!(tenant_id = %row.tenant_id,
                            "no service account of this tenant is configured (or known yet); its events wait in the outbox");
                    }
                    results.push(failed(
                        &row,
                        "no service account of this tenant is configured".to_owned(),
                    ));
                }
            }
        }
        let published: Vec<OutboxResult> = futures_util::stream::iter(work)
            .map(|(client, row)| async move { publish(&client, &row).await })
            .buffer_unordered(OUTBOX_PUBLISH_CONCURRENCY)
            .collect()
            .await;
        let failures: Vec<&str> = published
            .iter()
            .filter_map(|result| match result {
                OutboxResult::Failed { error, .. } => Some(error.as_str()),
                OutboxResult::Published(_) => None,
            })
            .collect();
        if let Some(first) = failures.first() {
            tracing::warn!(failed = failures.len(), of = published.len(), first_error = %first,
                "events could not be published; their rows stay and are retried with backoff");
        }
        results.extend(published);
        store::record_outbox(&self.db, results).await?;
        Ok(count)
    }
}

fn failed(row: &OutboxRow, error: String) -> OutboxResult {
    let attempts = u32::try_from(row.attempts).unwrap_or(0);
    let delay_ms = i64::try_from(backoff(attempts).as_millis()).unwrap_or(i64::MAX);
    OutboxResult::Failed {
        id: row.id.clone(),
        next_attempt_ms: store::now_millis().saturating_add(delay_ms),
        error: error.chars().take(OUTBOX_ERROR_CHARS_MAX).collect(),
    }
}

async fn publish(client: &KernelClient, row: &OutboxRow) -> OutboxResult {
    let payload = match serde_json::from_str::<serde_json::Value>(&row.payload) {
        Ok(payload) => payload,
        Err(error) => return failed(row, format!("the stored payload is not JSON: {error}")),
    };
    let mut event = NewEvent::new(row.event_type.clone(), payload)
        .with_subject(row.subject.clone())
        .with_idempotency_key(row.id.clone());
    if let Some(id) = CorrelationId::parse(&row.correlation_id) {
        event = event.with_correlation_id(id);
    }
    match client.publish_event(&event).await {
        Ok(published) => {
            tracing::debug!(outbox_id = %row.id, event_id = %published.id, correlation_id = %row.correlation_id,
                "published");
            OutboxResult::Published(row.id.clone())
        }
        Err(error) => {
            // Per row at debug; the pass logs one warning for all its failures,
            // so a kernel that is down for an hour does not flood the log.
            tracing::debug!(outbox_id = %row.id, %error, retryable = error.is_retryable(),
                correlation_id = %row.correlation_id, "publish failed; the row stays and is retried");
            failed(row, error.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base_up_to_the_cap() {
        assert_eq!(backoff(0), OUTBOX_BACKOFF_BASE);
        assert_eq!(backoff(1), OUTBOX_BACKOFF_BASE * 2);
        assert_eq!(backoff(3), OUTBOX_BACKOFF_BASE * 8);
        assert_eq!(backoff(10), OUTBOX_BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), OUTBOX_BACKOFF_MAX);
    }
}
