//! The delivery worker: each kernel instance runs one, and together they
//! deliver every subscription's stream at least once, in `seq` order.
//!
//! The events table is the outbox: an event is stored in its publisher's
//! transaction, and each subscription keeps a durable cursor, `delivered_seq`,
//! of the tenant's events it is done with (delivered, dead-lettered, or not
//! matching). An instance delivers a subscription only while it holds the
//! subscription's lease (`lease_owner`, `lease_until`), taken by a conditional
//! UPDATE that one instance wins; so one instance at a time sends a
//! subscription's events, one at a time, in order, and each attempt is made by
//! the instance that holds the lease.
//!
//! ```text
//! wake-up (a commit here or in another instance, an API change, the poll)
//!  └ claimable subscriptions → claim a lease each, up to the free slots
//!     └ one task per subscription, for a slice of time:
//!        retries asked for through the API that are due
//!        → the stream's head, if it waits for a retry and is due
//!        → the events after the cursor that match, one attempt each, in order;
//!          the first failure becomes the head (next attempt per the schedule,
//!          or the dead letter after the last) and the stream waits for it
//!        progress (history, cursor, head) written every 250 ms and at the end,
//!        with the lease renewed; the lease given back at the end
//! ```
//!
//! A kernel killed mid-delivery leaves a lease that expires after one attempt's
//! timeout and a margin; another instance (or the restarted one) then delivers
//! again from the last cursor written: at least once. Attempts are bounded in
//! number across subscriptions (`events.webhook_max_concurrent_deliveries`),
//! in time and in bytes read (`client`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Uri;
use metrics::{Counter, Histogram};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::client::{self, DeliveryClient, Message, Outcome};
use super::config::WebhookConfig;
use super::signature::{self, SigningKey};
use super::store::{
    self, AttemptWrite, DeliveryRow, DeliveryWrite, Progress, SubscriptionRow, Written,
};
use crate::audit::{AuditContext, AuditEvent};
use crate::change::Change;
use crate::db::Tx;
use crate::error::ApiError;
use crate::events::{Event, TypeFilter};
use crate::limits;
use crate::state::AppState;
use crate::timestamp;

/// The handle the API uses to wake the worker, and this instance's name in leases.
#[derive(Debug)]
pub struct Webhooks {
    wake: Notify,
    instance: String,
}

impl Default for Webhooks {
    fn default() -> Webhooks {
        Webhooks {
            wake: Notify::new(),
            // A new name per start: a restarted kernel does not take its
            // predecessor's leases for its own (they expire instead).
            instance: Uuid::now_v7().to_string(),
        }
    }
}

impl Webhooks {
    /// Wakes the worker: a subscription changed, a retry or a replay is due.
    pub fn nudge(&self) {
        self.wake.notify_one();
    }

    /// This kernel instance's name in leases and attempts.
    pub fn instance(&self) -> &str {
        &self.instance
    }
}

/// The tenant's last event `seq`, read in the creating transaction: a new
/// subscription gets only the events after it.
pub async fn stream_head(tx: &mut Tx, tenant_id: &str) -> Result<i64, sqlx::Error> {
    store::event_head(tx, tenant_id).await
}

/// Metric handles, registered once.
struct WebhookMetrics {
    delivered: Counter,
    rejected: Counter,
    timeout: Counter,
    connection_failed: Counter,
    refused_address: Counter,
    dead_letters: Counter,
    disabled: Counter,
    attempt_seconds: Histogram,
    lag_seconds: Histogram,
}

impl WebhookMetrics {
    fn new(state: &AppState) -> WebhookMetrics {
        let m = state.metrics();
        let attempts = |outcome: Outcome| {
            m.counter(
                "aibos_webhook_attempts_total",
                &[("outcome", outcome.as_str().to_owned())],
            )
        };
        WebhookMetrics {
            delivered: attempts(Outcome::Delivered),
            rejected: attempts(Outcome::Rejected),
            timeout: attempts(Outcome::Timeout),
            connection_failed: attempts(Outcome::ConnectionFailed),
            refused_address: attempts(Outcome::RefusedAddress),
            dead_letters: m.counter("aibos_webhook_dead_letters_total", &[]),
            disabled: m.counter("aibos_webhook_subscriptions_disabled_total", &[]),
            attempt_seconds: m.histogram("aibos_webhook_attempt_duration_seconds", &[]),
            lag_seconds: m.histogram("aibos_webhook_delivery_lag_seconds", &[]),
        }
    }

    fn attempt(&self, attempt: &client::Attempt) {
        match attempt.outcome {
            Outcome::Delivered => &self.delivered,
            Outcome::Rejected => &self.rejected,
            Outcome::Timeout => &self.timeout,
            Outcome::ConnectionFailed => &self.connection_failed,
            Outcome::RefusedAddress => &self.refused_address,
        }
        .increment(1);
        self.attempt_seconds.record(attempt.latency.as_secs_f64());
    }
}

/// What every delivery task shares.
struct Worker {
    state: AppState,
    client: DeliveryClient,
    config: WebhookConfig,
    instance: String,
    /// How long a lease lasts from its last renewal.
    lease: Duration,
    metrics: WebhookMetrics,
    stop: CancellationToken,
}

/// Runs until `stop`: claims subscriptions with work and delivers each in a
/// task of its own, at most `events.webhook_max_concurrent_deliveries` at once.
pub async fn run(state: AppState, stop: CancellationToken) {
    let config = state.config().events.webhook.clone();
    let worker = Arc::new(Worker {
        client: DeliveryClient::new(config.webhook_allow_private_networks, config.timeout()),
        lease: config.timeout() + Duration::from_secs(limits::WEBHOOK_LEASE_MARGIN_SECONDS),
        instance: state.webhooks().instance().to_owned(),
        metrics: WebhookMetrics::new(&state),
        stop: stop.clone(),
        config,
        state: state.clone(),
    });
    let slots = Arc::new(Semaphore::new(
        usize::try_from(worker.config.webhook_max_concurrent_deliveries).unwrap_or(1),
    ));
    let mut commits = state.events().watch();
    let mut tasks = JoinSet::new();
    let mut last_purge = Instant::now();
    loop {
        worker.claim_into(&slots, &mut tasks).await;
        if last_purge.elapsed() >= Duration::from_secs(limits::WEBHOOK_PURGE_INTERVAL_SECONDS) {
            last_purge = Instant::now();
            worker.purge().await;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = state.webhooks().wake.notified() => {}
            _ = commits.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(limits::WEBHOOK_POLL_MS)) => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    // Tasks stop between attempts once `stop` is cancelled and write what they
    // did; one attempt's timeout is the longest that can take.
    let drained = tokio::time::timeout(worker.config.timeout() + Duration::from_secs(2), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
    // Leases given back now are claimable at once by another instance, rather
    // than after they expire.
    if let Err(e) = store::release_all(state.db(), &worker.instance, &timestamp::now_text()).await {
        tracing::warn!(error = %e, "webhook leases not given back at shutdown; they expire instead");
    }
}

impl Worker {
    /// Claims subscriptions with work, as many as there are free slots, and
    /// starts a task for each.
    async fn claim_into(self: &Arc<Self>, slots: &Arc<Semaphore>, tasks: &mut JoinSet<()>) {
        let free = slots
            .available_permits()
            .min(limits::WEBHOOK_CLAIM_BATCH_MAX as usize);
        if free == 0 || self.stop.is_cancelled() {
            return;
        }
        let db = self.state.db();
        let now = timestamp::now_text();
        let ids = match store::claimable(db, &now, free as u32).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for webhook work");
                return;
            }
        };
        for id in ids {
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                return;
            };
            let lease_until = timestamp::format(timestamp::now() + self.lease);
            match store::claim(db, &id, &self.instance, &now, &lease_until).await {
                Ok(Some(row)) => {
                    let worker = self.clone();
                    tasks.spawn(async move { worker.deliver(row, permit).await });
                }
                Ok(None) => {} // Another instance was first.
                Err(e) => {
                    tracing::warn!(error = %e, subscription_id = %id, "cannot lease a webhook subscription")
                }
            }
        }
    }

    async fn purge(&self) {
        let cutoff = timestamp::format(
            timestamp::now() - Duration::from_secs(limits::WEBHOOK_HISTORY_RETENTION_DAYS * 86_400),
        );
        let purged = self
            .state
            .db()
            .write(move |tx| {
                Box::pin(async move {
                    store::purge_history(tx, &cutoff, limits::WEBHOOK_PURGE_BATCH_MAX)
                        .await
                        .map_err(ApiError::from)
                })
            })
            .await;
        match purged {
            Ok(0) => {}
            Ok(n) => tracing::info!(deliveries = n, "purged old webhook delivery history"),
            Err(e) => tracing::warn!(error = ?e, "cannot purge webhook delivery history"),
        }
    }

    /// Delivers one leased subscription for a slice of time, then gives the lease back.
    async fn deliver(self: Arc<Self>, row: SubscriptionRow, _slot: OwnedSemaphorePermit) {
        let id = row.id.clone();
        let tenant_id = row.tenant_id.clone();
        match Stream::open(&self, row) {
            Ok(mut stream) => {
                if let Err(e) = self.run_stream(&mut stream).await {
                    tracing::warn!(error = ?e, subscription_id = %id, tenant_id = %tenant_id, "webhook delivery interrupted; it resumes from the last progress written");
                    // A pause before the lease is given back: a database that
                    // fails every query must not be asked again at once, in a loop.
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(limits::WEBHOOK_POLL_MS)) => {}
                        () = self.stop.cancelled() => {}
                    }
                }
            }
            Err(e) => {
                // Not given back: it is tried again when its lease expires
                // (what fails here, a secret that does not open, does not heal at once).
                tracing::error!(error = %e, subscription_id = %id, tenant_id = %tenant_id, "cannot deliver a webhook subscription");
                return;
            }
        }
        // Only this instance's lease is given back (the UPDATE checks the owner).
        if let Err(e) =
            store::release(self.state.db(), &id, &self.instance, &timestamp::now_text()).await
        {
            tracing::warn!(error = %e, subscription_id = %id, "webhook lease not given back; it expires instead");
        }
    }

    async fn run_stream(&self, s: &mut Stream) -> Result<(), ApiError> {
        let db = self.state.db().clone();
        let slice = Duration::from_millis(limits::WEBHOOK_SLICE_MS);
        while s.started.elapsed() < slice
            && !self.stop.is_cancelled()
            && !s.lost
            && !s.disabled
            && !s.stop_slice
        {
            // Retries asked for through the API, beside the stream.
            let now = timestamp::now_text();
            for delivery in
                store::due_retries(&db, &s.row.id, &now, limits::WEBHOOK_DUE_RETRIES_PER_READ)
                    .await?
            {
                self.retry_one(s, delivery).await?;
                if s.lost || s.disabled || s.stop_slice {
                    break;
                }
            }
            if s.lost || s.disabled || s.stop_slice {
                break;
            }
            // The stream's head, waiting for its next attempt.
            if let Some(head_id) = s.row.pending_delivery_id.clone() {
                let due = s
                    .row
                    .next_attempt_at
                    .as_deref()
                    .is_none_or(|t| t <= now.as_str());
                if !due {
                    break;
                }
                self.head_attempt(s, &head_id).await?;
                self.write(s).await?;
                if s.row.pending_delivery_id.is_some() {
                    break;
                }
                continue;
            }
            // New events after the cursor. The head is read first: every event
            // up to it is committed (seq order is commit order), so one the
            // read below does not return is not there (purged) or not wanted.
            let head = crate::events::store::head(&db, &s.row.tenant_id).await?;
            let batch = crate::events::store::read_after(
                &db,
                &s.row.tenant_id,
                s.row.delivered_seq,
                &s.filter,
                limits::WEBHOOK_BATCH_EVENTS_MAX,
            )
            .await?;
            let mut stopped_early = false;
            for event in &batch.events {
                if s.started.elapsed() >= slice || self.stop.is_cancelled() {
                    stopped_early = true;
                    break;
                }
                self.keep_lease(s).await?;
                if s.lost {
                    return Ok(());
                }
                if !self.stream_attempt(s, event).await {
                    stopped_early = true;
                    break;
                }
            }
            if !stopped_early {
                // Everything scanned is done, the events that did not match included.
                s.advance(batch.scanned_to);
                if !batch.more {
                    s.advance(head);
                }
            }
            self.write(s).await?;
            if stopped_early || !batch.more {
                break;
            }
        }
        self.write(s).await?;
        Ok(())
    }

    /// Renews the lease (writing progress) when the next attempt could
    /// outlast it, and writes progress at least every flush interval.
    async fn keep_lease(&self, s: &mut Stream) -> Result<(), ApiError> {
        let needed = self.config.timeout() + Duration::from_secs(2);
        if s.lease_deadline.saturating_duration_since(Instant::now()) < needed
            || s.last_write.elapsed() >= Duration::from_millis(limits::WEBHOOK_FLUSH_INTERVAL_MS)
        {
            self.write(s).await?;
        }
        Ok(())
    }

    /// One attempt of a new stream event; `false` when it did not succeed (the
    /// stream then waits on it).
    async fn stream_attempt(&self, s: &mut Stream, event: &Event) -> bool {
        let delivery_id = Uuid::now_v7().to_string();
        let created_at = timestamp::now_text();
        let first_wait = self.config.delay_before(0).unwrap_or_default();
        let mut write = DeliveryWrite {
            id: delivery_id.clone(),
            event_id: event.id.clone(),
            event_seq: event.seq,
            event_type: event.event_type.clone(),
            status: "pending",
            out_of_band: false,
            retry_base: 0,
            attempts: 0,
            next_attempt_at: None,
            last_response_status: None,
            created_at,
        };
        if !first_wait.is_zero() {
            // The schedule's first attempt is not immediate: the event becomes the head at once.
            let due = timestamp::format(timestamp::now() + first_wait);
            write.next_attempt_at = Some(due.clone());
            s.progress.new_deliveries.push(write);
            s.set_head(Some((delivery_id, due)), event.seq - 1);
            return false;
        }
        let attempt = self.attempt(s, event, &delivery_id, 1).await;
        write.attempts = 1;
        write.last_response_status = attempt.status.map(i64::from);
        let delivered = attempt.outcome == Outcome::Delivered;
        if delivered {
            write.status = "delivered";
            self.lag(event);
            s.progress.new_deliveries.push(write);
            s.succeeded();
            s.advance(event.seq);
            return true;
        }
        match self.next_due(1, &attempt) {
            Some(due) => {
                write.next_attempt_at = Some(due.clone());
                s.progress.new_deliveries.push(write);
                s.set_head(Some((delivery_id, due)), event.seq - 1);
            }
            None => {
                write.status = "dead_letter";
                self.metrics.dead_letters.increment(1);
                s.progress.new_deliveries.push(write);
                s.advance(event.seq);
            }
        }
        s.failed(&self.config);
        // A dead letter lets the stream go on; a scheduled retry holds it.
        s.row.pending_delivery_id.is_none() && !s.disabled
    }

    /// The next attempt of the stream's head.
    async fn head_attempt(&self, s: &mut Stream, head_id: &str) -> Result<(), ApiError> {
        let db = self.state.db().clone();
        let Some(row) = store::delivery_row(&db, head_id).await? else {
            // Gone (purged, or the subscription recreated): the stream goes on.
            s.set_head(None, s.row.delivered_seq);
            return Ok(());
        };
        let event = crate::events::store::get(&db, &s.row.tenant_id, &row.event_id).await?;
        let Some(event) = event else {
            // The event is no longer stored: nothing to send; the stream moves past it.
            let mut write = changed(&row);
            write.status = "dead_letter";
            write.next_attempt_at = None;
            s.progress.changed_deliveries.push(write);
            s.set_head(None, row.event_seq.max(s.row.delivered_seq));
            return Ok(());
        };
        self.keep_lease(s).await?;
        let number = row.attempts + 1;
        let attempt = self.attempt(s, &event, &row.id, number).await;
        let mut write = changed(&row);
        write.attempts = number;
        write.last_response_status = attempt.status.map(i64::from);
        if attempt.outcome == Outcome::Delivered {
            write.status = "delivered";
            write.next_attempt_at = None;
            self.lag(&event);
            s.succeeded();
            s.set_head(None, event.seq);
        } else {
            match self.next_due(number - row.retry_base, &attempt) {
                Some(due) => {
                    write.next_attempt_at = Some(due.clone());
                    s.set_head(Some((row.id.clone(), due)), s.row.delivered_seq);
                }
                None => {
                    write.status = "dead_letter";
                    write.next_attempt_at = None;
                    self.metrics.dead_letters.increment(1);
                    s.set_head(None, event.seq);
                }
            }
            s.failed(&self.config);
        }
        s.progress.changed_deliveries.push(write);
        Ok(())
    }

    /// One attempt of a retry asked for through the API (beside the stream).
    async fn retry_one(&self, s: &mut Stream, row: DeliveryRow) -> Result<(), ApiError> {
        let db = self.state.db().clone();
        let mut write = changed(&row);
        match crate::events::store::get(&db, &s.row.tenant_id, &row.event_id).await? {
            None => {
                write.status = "dead_letter";
                write.next_attempt_at = None;
            }
            Some(event) => {
                self.keep_lease(s).await?;
                let number = row.attempts + 1;
                let attempt = self.attempt(s, &event, &row.id, number).await;
                write.attempts = number;
                write.last_response_status = attempt.status.map(i64::from);
                if attempt.outcome == Outcome::Delivered {
                    write.status = "delivered";
                    write.next_attempt_at = None;
                    s.succeeded();
                } else {
                    match self.next_due(number - row.retry_base, &attempt) {
                        Some(due) => write.next_attempt_at = Some(due),
                        None => {
                            write.status = "dead_letter";
                            write.next_attempt_at = None;
                            self.metrics.dead_letters.increment(1);
                        }
                    }
                    s.failed(&self.config);
                }
            }
        }
        s.progress.changed_deliveries.push(write);
        self.write(s).await
    }

    /// When the attempt after `made` failed attempts (since the last retry
    /// asked for) is due: the schedule's wait, or the receiver's `Retry-After`
    /// when that is longer; `None` after the schedule's last attempt.
    fn next_due(&self, made: i64, attempt: &client::Attempt) -> Option<String> {
        let index = usize::try_from(made).ok()?;
        let wait = self.config.delay_before(index)?;
        let wait = wait.max(attempt.retry_after.unwrap_or_default());
        Some(timestamp::format(timestamp::now() + wait))
    }

    /// Sends `event` once, signed with every secret in force, and records the attempt.
    async fn attempt(
        &self,
        s: &mut Stream,
        event: &Event,
        delivery_id: &str,
        number: i64,
    ) -> client::Attempt {
        let body = match serde_json::to_vec(event) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(error = %e, event_id = %event.id, "an event does not serialise");
                Vec::new()
            }
        };
        let attempted_at = timestamp::now();
        let seconds = attempted_at.unix_timestamp();
        let keys = s.keys();
        let signature = signature::signature_header(&keys, &event.id, seconds, &body);
        let message = Message {
            id: &event.id,
            timestamp: seconds,
            signature: &signature,
            correlation_id: event.correlation_id.as_deref(),
        };
        let attempt = self.client.send(&s.url, &message, body.into()).await;
        self.metrics.attempt(&attempt);
        if attempt.outcome != Outcome::Delivered {
            tracing::debug!(subscription_id = %s.row.id, event_id = %event.id, outcome = attempt.outcome.as_str(), status = ?attempt.status, "webhook attempt failed");
        }
        s.progress.attempts.push(AttemptWrite {
            id: Uuid::now_v7().to_string(),
            delivery_id: delivery_id.to_owned(),
            number,
            attempted_at: timestamp::format(attempted_at),
            outcome: attempt.outcome.as_str(),
            response_status: attempt.status.map(i64::from),
            latency_ms: i64::try_from(attempt.latency.as_millis()).unwrap_or(i64::MAX),
            response_excerpt: attempt.excerpt.clone(),
            error: attempt.error.clone(),
        });
        if s.failing_started.is_none() && attempt.outcome != Outcome::Delivered {
            s.failing_started = Some(attempted_at);
        }
        attempt
    }

    fn lag(&self, event: &Event) {
        if let Some(at) = timestamp::parse(&event.occurred_at) {
            let lag = timestamp::now() - at;
            self.metrics
                .lag_seconds
                .record(lag.as_seconds_f64().max(0.0));
        }
    }

    /// Writes the stream's progress and renews its lease; disables the
    /// subscription (audited, announced) when it has failed for too long.
    async fn write(&self, s: &mut Stream) -> Result<(), ApiError> {
        if s.lost {
            return Ok(());
        }
        let progress = std::mem::take(&mut s.progress);
        let lease_until = timestamp::format(timestamp::now() + self.lease);
        let renewed_at = Instant::now();
        let disable = s.disabled;
        let (id, tenant_id, instance, generation) = (
            s.row.id.clone(),
            s.row.tenant_id.clone(),
            self.instance.clone(),
            s.row.stream_generation,
        );
        let keys = self.state.redact_keys();
        let since = s.row.failing_since.clone();
        let written = self
            .state
            .db()
            .write(move |tx| {
                Box::pin(async move {
                    let written = store::write_progress(tx, &id, &tenant_id, &instance, generation, &lease_until, progress).await?;
                    let mut disabled = false;
                    if disable && written != Written::Lost
                        && let Some(row) = store::disable_failing(tx, &id).await?
                    {
                        // The kernel's own change: audited as the system, in the
                        // tenant's chain, and announced to the tenant.
                        let mut change = Change::new(AuditContext::system(tenant_id.clone()), keys);
                        change
                            .audit(
                                AuditEvent::new("subscription.disabled")
                                    .resource("subscription", &row.id)
                                    .severity("warning")
                                    .details(serde_json::json!({ "reason": "failing", "failing_since": since, "url": row.url, "version": row.version })),
                            )
                            .publish("kernel.subscription.disabled");
                        change.flush(tx).await?;
                        disabled = true;
                    }
                    Ok::<_, ApiError>((written, disabled))
                })
            })
            .await?;
        s.last_write = Instant::now();
        let (written, announced) = written;
        if announced {
            // Readers of this instance learn of the event now, not at their next poll.
            self.state.events().committed();
        }
        match written {
            Written::Kept => {
                s.lease_deadline = renewed_at + self.lease;
                if disable {
                    self.metrics.disabled.increment(1);
                    tracing::warn!(subscription_id = %s.row.id, tenant_id = %s.row.tenant_id, "webhook subscription disabled after failing for events.webhook_disable_after_hours");
                    s.lost = true;
                }
            }
            // A replay moved the cursor: stop; the next claim starts from it.
            Written::Replayed => {
                s.lease_deadline = renewed_at + self.lease;
                s.stop_slice = true;
            }
            Written::Lost => s.lost = true,
        }
        Ok(())
    }
}

/// A delivery row as it will be written back after a change.
fn changed(row: &DeliveryRow) -> DeliveryWrite {
    DeliveryWrite {
        id: row.id.clone(),
        event_id: row.event_id.clone(),
        event_seq: row.event_seq,
        event_type: row.event_type.clone(),
        status: "pending",
        out_of_band: row.out_of_band,
        retry_base: row.retry_base,
        attempts: row.attempts,
        next_attempt_at: row.next_attempt_at.clone(),
        last_response_status: None,
        created_at: row.created_at.clone(),
    }
}

/// One leased subscription while its task delivers it.
struct Stream {
    row: SubscriptionRow,
    url: Uri,
    filter: TypeFilter,
    key: SigningKey,
    /// The secret before the last rotation, and until when it signs too.
    previous: Option<(SigningKey, time::OffsetDateTime)>,
    progress: Progress,
    started: Instant,
    last_write: Instant,
    lease_deadline: Instant,
    /// A failed attempt's time, when the run of failures starts in this slice.
    failing_started: Option<time::OffsetDateTime>,
    /// Failing for too long: disabled at the next write.
    disabled: bool,
    /// End this slice (a replay moved the stream): the next claim starts afresh.
    stop_slice: bool,
    /// The lease is gone (another instance, a deletion, a disabling): write nothing more.
    lost: bool,
}

impl Stream {
    fn open(worker: &Worker, row: SubscriptionRow) -> Result<Stream, String> {
        let master = worker.state.master_keys();
        let secret = master
            .open(&row.secret, &store::secret_place(&row.id))
            .map_err(|e| format!("its secret does not open: {e}"))?;
        let key = SigningKey::parse(&secret).map_err(|e| format!("its secret {e}"))?;
        let previous = match (&row.previous_secret, &row.previous_secret_expires_at) {
            (Some(sealed), Some(until)) => {
                let until =
                    timestamp::parse(until).ok_or("its previous secret's expiry is not a time")?;
                let text = master
                    .open(sealed, &store::previous_secret_place(&row.id))
                    .map_err(|e| format!("its previous secret does not open: {e}"))?;
                Some((
                    SigningKey::parse(&text).map_err(|e| format!("its previous secret {e}"))?,
                    until,
                ))
            }
            _ => None,
        };
        let url = row
            .url
            .parse::<Uri>()
            .map_err(|e| format!("its URL does not parse: {e}"))?;
        let filters = row.filters();
        let filter = TypeFilter::parse(filters.iter().map(String::as_str))?;
        let now = Instant::now();
        Ok(Stream {
            url,
            filter,
            key,
            previous,
            progress: Progress::default(),
            started: now,
            last_write: now,
            lease_deadline: now + worker.lease,
            failing_started: None,
            disabled: false,
            stop_slice: false,
            lost: false,
            row,
        })
    }

    /// The keys that sign now: the current secret, and the previous one
    /// during its grace period.
    fn keys(&self) -> Vec<SigningKey> {
        let mut keys = vec![self.key.clone()];
        if let Some((previous, until)) = &self.previous
            && *until > timestamp::now()
        {
            keys.push(previous.clone());
        }
        keys
    }

    /// Every event up to `seq` is done.
    fn advance(&mut self, seq: i64) {
        if seq > self.row.delivered_seq {
            self.row.delivered_seq = seq;
            self.progress.cursor = Some(seq);
        }
    }

    /// Sets (or clears) the stream's head; the cursor stands at `cursor`.
    fn set_head(&mut self, head: Option<(String, String)>, cursor: i64) {
        self.advance(cursor);
        self.row.pending_delivery_id = head.as_ref().map(|(id, _)| id.clone());
        self.row.next_attempt_at = head.as_ref().map(|(_, due)| due.clone());
        self.progress.head = Some(head);
    }

    fn succeeded(&mut self) {
        self.failing_started = None;
        if self.row.failing_since.is_some() || matches!(self.progress.failing_since, Some(Some(_)))
        {
            self.row.failing_since = None;
            self.progress.failing_since = Some(None);
        }
    }

    /// After a failed attempt: starts the run of failures, or disables the
    /// subscription when the run has lasted `events.webhook_disable_after_hours`.
    fn failed(&mut self, config: &WebhookConfig) {
        match self.row.failing_since.as_deref().and_then(timestamp::parse) {
            None => {
                let since = timestamp::format(self.failing_started.unwrap_or_else(timestamp::now));
                self.row.failing_since = Some(since.clone());
                self.progress.failing_since = Some(Some(since));
            }
            Some(since) => {
                let failing_for = timestamp::now() - since;
                if failing_for.as_seconds_f64() >= config.disable_after().as_secs_f64() {
                    self.disabled = true;
                }
            }
        }
    }
}
