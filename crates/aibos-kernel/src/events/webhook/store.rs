//! The SQL of webhook subscriptions, their deliveries and attempts.
//!
//! Secrets are stored sealed under the master key (`secrets`): this file
//! stores and returns the sealed text; `routes` and the worker seal and open.

use crate::db::{Db, Tx};
use crate::{timestamp, with_db, with_tx};

use super::{Delivery, DeliveryAttempt, Subscription};

/// Associated data of a subscription's current signing secret.
pub fn secret_place(subscription_id: &str) -> String {
    format!("webhook_subscriptions.secret:{subscription_id}")
}

/// Associated data of a subscription's previous signing secret (a rotation's grace period).
pub fn previous_secret_place(subscription_id: &str) -> String {
    format!("webhook_subscriptions.previous_secret:{subscription_id}")
}

const SUBSCRIPTION_COLUMNS: &str = "id, tenant_id, url, event_types, description, enabled, disabled_reason, secret, previous_secret, \
     previous_secret_expires_at, delivered_seq, stream_generation, pending_delivery_id, next_attempt_at, failing_since, version, created_at, updated_at";

/// A subscription row; `secret` and `previous_secret` are sealed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SubscriptionRow {
    /// UUIDv7.
    pub id: String,
    /// Owner.
    pub tenant_id: String,
    /// Receiver.
    pub url: String,
    /// JSON array of filters.
    pub event_types: String,
    /// Free text.
    pub description: String,
    /// Delivering or not.
    pub enabled: bool,
    /// `failing` when the kernel disabled it.
    pub disabled_reason: Option<String>,
    /// Sealed `whsec_…`.
    pub secret: String,
    /// Sealed previous `whsec_…`, during a rotation's grace period.
    pub previous_secret: Option<String>,
    /// End of that grace period.
    pub previous_secret_expires_at: Option<String>,
    /// The stream's cursor.
    pub delivered_seq: i64,
    /// Bumped by each replay.
    pub stream_generation: i64,
    /// The stream's head delivery while it waits for its next attempt.
    pub pending_delivery_id: Option<String>,
    /// When that attempt is due.
    pub next_attempt_at: Option<String>,
    /// Start of the current run of failures.
    pub failing_since: Option<String>,
    /// Optimistic-concurrency version.
    pub version: i64,
    /// Creation time.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
}

impl SubscriptionRow {
    /// The filters.
    pub fn filters(&self) -> Vec<String> {
        serde_json::from_str(&self.event_types).unwrap_or_default()
    }

    /// The API view (never a secret).
    pub fn view(&self) -> Subscription {
        let now = timestamp::now_text();
        Subscription {
            id: self.id.clone(),
            url: self.url.clone(),
            event_types: self.filters(),
            description: self.description.clone(),
            enabled: self.enabled,
            disabled_reason: self.disabled_reason.clone(),
            delivered_seq: self.delivered_seq,
            failing_since: self.failing_since.clone(),
            previous_secret_expires_at: self
                .previous_secret_expires_at
                .clone()
                .filter(|t| *t > now),
            version: self.version,
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
        }
    }
}

/// What a subscription is made of, as the API sets it.
#[derive(Debug, Clone)]
pub struct SubscriptionFields {
    /// Receiver (already checked).
    pub url: String,
    /// Filters (already checked).
    pub event_types: Vec<String>,
    /// Free text.
    pub description: String,
    /// Delivering or not.
    pub enabled: bool,
}

fn types_json(types: &[String]) -> String {
    serde_json::to_string(types).unwrap_or_else(|_| "[]".to_owned())
}

/// How many subscriptions a tenant has.
pub async fn subscription_count(tx: &mut Tx, tenant_id: &str) -> Result<i64, sqlx::Error> {
    with_tx!(tx, conn => sqlx::query_scalar("SELECT COUNT(*) FROM webhook_subscriptions WHERE tenant_id = $1").bind(tenant_id).fetch_one(&mut *conn).await)
}

/// Inserts a subscription whose stream starts after `delivered_seq`.
pub async fn insert_subscription(
    tx: &mut Tx,
    id: &str,
    tenant_id: &str,
    fields: &SubscriptionFields,
    sealed_secret: &str,
    delivered_seq: i64,
) -> Result<SubscriptionRow, sqlx::Error> {
    let now = timestamp::now_text();
    let sql = format!(
        "INSERT INTO webhook_subscriptions (id, tenant_id, url, event_types, description, enabled, secret, delivered_seq, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) RETURNING {SUBSCRIPTION_COLUMNS}"
    );
    with_tx!(tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).bind(tenant_id).bind(&fields.url).bind(types_json(&fields.event_types))
            .bind(&fields.description).bind(fields.enabled).bind(sealed_secret).bind(delivered_seq).bind(&now)
            .fetch_one(&mut *conn).await
    })
}

/// One subscription of the tenant.
pub async fn subscription(
    db: &Db,
    tenant_id: &str,
    id: &str,
) -> Result<Option<SubscriptionRow>, sqlx::Error> {
    let sql = format!(
        "SELECT {SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions WHERE tenant_id = $1 AND id = $2"
    );
    with_db!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(id).fetch_optional(pool).await)
}

/// One subscription of the tenant, read inside `tx`.
pub async fn subscription_in(
    tx: &mut Tx,
    tenant_id: &str,
    id: &str,
) -> Result<Option<SubscriptionRow>, sqlx::Error> {
    let sql = format!(
        "SELECT {SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions WHERE tenant_id = $1 AND id = $2"
    );
    with_tx!(tx, conn => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(id).fetch_optional(&mut *conn).await)
}

/// A page of the tenant's subscriptions after `after_id`, by id.
pub async fn subscriptions(
    db: &Db,
    tenant_id: &str,
    after_id: &str,
    limit: u32,
) -> Result<Vec<SubscriptionRow>, sqlx::Error> {
    let sql = format!(
        "SELECT {SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3"
    );
    with_db!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(after_id).bind(i64::from(limit)).fetch_all(pool).await)
}

/// Changes a subscription under optimistic concurrency (`None`: no such row
/// at that version). Enabling clears the kernel's reason for disabling and the
/// run of failures, so the schedule to disabling starts again.
pub async fn update_subscription(
    tx: &mut Tx,
    tenant_id: &str,
    id: &str,
    fields: &SubscriptionFields,
    expected_version: Option<i64>,
) -> Result<Option<SubscriptionRow>, sqlx::Error> {
    let now = timestamp::now_text();
    let sql = format!(
        "UPDATE webhook_subscriptions SET url = $3, event_types = $4, description = $5, enabled = $6, \
         disabled_reason = CASE WHEN $6 THEN NULL ELSE disabled_reason END, \
         failing_since = CASE WHEN $6 AND NOT enabled THEN NULL ELSE failing_since END, \
         version = version + 1, updated_at = $7 \
         WHERE tenant_id = $1 AND id = $2 AND ($8 IS NULL OR version = $8) RETURNING {SUBSCRIPTION_COLUMNS}"
    );
    with_tx!(tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(id).bind(&fields.url).bind(types_json(&fields.event_types))
            .bind(&fields.description).bind(fields.enabled).bind(&now).bind(expected_version)
            .fetch_optional(&mut *conn).await
    })
}

/// Deletes a subscription and its history; `false` when none matched.
pub async fn delete_subscription(
    tx: &mut Tx,
    tenant_id: &str,
    id: &str,
    expected_version: Option<i64>,
) -> Result<bool, sqlx::Error> {
    // Attempts and deliveries first: SQLite enforces the cascade only with
    // foreign keys on, and being explicit costs nothing on PostgreSQL.
    let n = with_tx!(tx, conn => {
        let version_ok: Option<i64> = sqlx::query_scalar("SELECT version FROM webhook_subscriptions WHERE tenant_id = $1 AND id = $2 AND ($3 IS NULL OR version = $3)")
            .bind(tenant_id).bind(id).bind(expected_version).fetch_optional(&mut *conn).await?;
        if version_ok.is_none() {
            return Ok(false);
        }
        sqlx::query("DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT id FROM webhook_deliveries WHERE subscription_id = $1)").bind(id).execute(&mut *conn).await?;
        sqlx::query("DELETE FROM webhook_deliveries WHERE subscription_id = $1").bind(id).execute(&mut *conn).await?;
        sqlx::query("DELETE FROM webhook_subscriptions WHERE tenant_id = $1 AND id = $2").bind(tenant_id).bind(id).execute(&mut *conn).await?.rows_affected()
    });
    Ok(n == 1)
}

/// Puts a new sealed secret in force, the old one (re-sealed for its new place)
/// signing too until `previous_expires_at`; `None` when the stored secret is no
/// longer `expected_sealed` (rotated meanwhile) or the subscription is gone.
pub async fn rotate_secret(
    tx: &mut Tx,
    tenant_id: &str,
    id: &str,
    expected_sealed: &str,
    sealed_secret: &str,
    sealed_previous: &str,
    previous_expires_at: &str,
) -> Result<Option<SubscriptionRow>, sqlx::Error> {
    let now = timestamp::now_text();
    // Only over the secret that was read: two rotations at once must not leave
    // in force a secret no one was shown.
    let sql = format!(
        "UPDATE webhook_subscriptions SET secret = $4, previous_secret = $5, previous_secret_expires_at = $6, \
         version = version + 1, updated_at = $7 WHERE tenant_id = $1 AND id = $2 AND secret = $3 RETURNING {SUBSCRIPTION_COLUMNS}"
    );
    with_tx!(tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(id).bind(expected_sealed).bind(sealed_secret).bind(sealed_previous)
            .bind(previous_expires_at).bind(&now).fetch_optional(&mut *conn).await
    })
}

const DELIVERY_COLUMNS: &str = "id, subscription_id, event_id, event_seq, event_type, status, out_of_band, retry_base, attempts, next_attempt_at, created_at, updated_at";

/// A delivery row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryRow {
    /// UUIDv7.
    pub id: String,
    /// Its subscription.
    pub subscription_id: String,
    /// The event (and `webhook-id`).
    pub event_id: String,
    /// The event's seq.
    pub event_seq: i64,
    /// The event's type.
    pub event_type: String,
    /// `pending`, `delivered`, `dead_letter`, `cancelled`.
    pub status: String,
    /// A retry beside the ordered stream.
    pub out_of_band: bool,
    /// Attempts made before the last retry asked for.
    pub retry_base: i64,
    /// Attempts made.
    pub attempts: i64,
    /// When the next attempt is due.
    pub next_attempt_at: Option<String>,
    /// Creation time.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
}

impl DeliveryRow {
    fn view(self, attempts: Vec<DeliveryAttempt>) -> Delivery {
        Delivery {
            id: self.id,
            subscription_id: self.subscription_id,
            event_id: self.event_id,
            event_seq: self.event_seq,
            event_type: self.event_type,
            status: self.status,
            out_of_band: self.out_of_band,
            next_attempt_at: self.next_attempt_at,
            attempts,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

#[derive(sqlx::FromRow)]
struct AttemptRow {
    delivery_id: String,
    number: i64,
    attempted_at: String,
    outcome: String,
    response_status: Option<i64>,
    latency_ms: i64,
    response_excerpt: Option<String>,
    error: Option<String>,
}

/// A page of a subscription's deliveries, newest first, before `before_id`
/// (empty: from the newest), each with its attempts; `status` filters.
pub async fn deliveries(
    db: &Db,
    tenant_id: &str,
    subscription_id: &str,
    before_id: &str,
    status: Option<&str>,
    limit: u32,
) -> Result<Vec<Delivery>, sqlx::Error> {
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE tenant_id = $1 AND subscription_id = $2 \
         AND ($3 = '' OR id < $3) AND ($4 IS NULL OR status = $4) ORDER BY id DESC LIMIT $5"
    );
    let rows: Vec<DeliveryRow> = with_db!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(subscription_id).bind(before_id).bind(status)
            .bind(i64::from(limit)).fetch_all(pool).await?
    });
    with_attempts(db, tenant_id, rows).await
}

/// One delivery of a subscription, with its attempts.
pub async fn delivery(
    db: &Db,
    tenant_id: &str,
    subscription_id: &str,
    id: &str,
) -> Result<Option<Delivery>, sqlx::Error> {
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE tenant_id = $1 AND subscription_id = $2 AND id = $3"
    );
    let rows: Vec<DeliveryRow> = with_db!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(subscription_id).bind(id).fetch_all(pool).await?
    });
    Ok(with_attempts(db, tenant_id, rows).await?.pop())
}

/// Which subscription a delivery of the tenant belongs to.
pub async fn delivery_subscription(
    db: &Db,
    tenant_id: &str,
    id: &str,
) -> Result<Option<String>, sqlx::Error> {
    with_db!(db, pool => {
        sqlx::query_scalar("SELECT subscription_id FROM webhook_deliveries WHERE tenant_id = $1 AND id = $2")
            .bind(tenant_id).bind(id).fetch_optional(pool).await
    })
}

async fn with_attempts(
    db: &Db,
    tenant_id: &str,
    rows: Vec<DeliveryRow>,
) -> Result<Vec<Delivery>, sqlx::Error> {
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return Ok(Vec::new());
    };
    // The page's attempts in one query over its range of delivery ids (a page
    // is one subscription's, ids are time-ordered): no list of a thousand
    // parameters. Attempts of deliveries in the range but not on the page (a
    // status filter) are read and left out.
    let (low, high) = if first.id <= last.id {
        (first.id.clone(), last.id.clone())
    } else {
        (last.id.clone(), first.id.clone())
    };
    let attempts: Vec<AttemptRow> = with_db!(db, pool => {
        sqlx::query_as(
            "SELECT a.delivery_id, a.number, a.attempted_at, a.outcome, a.response_status, a.latency_ms, a.response_excerpt, a.error \
             FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id \
             WHERE a.tenant_id = $1 AND d.subscription_id = $2 AND d.id >= $3 AND d.id <= $4 ORDER BY a.delivery_id, a.number")
            .bind(tenant_id).bind(&first.subscription_id).bind(&low).bind(&high).fetch_all(pool).await?
    });
    let mut by_delivery: std::collections::HashMap<String, Vec<DeliveryAttempt>> =
        std::collections::HashMap::new();
    for a in attempts {
        by_delivery
            .entry(a.delivery_id)
            .or_default()
            .push(DeliveryAttempt {
                number: a.number,
                attempted_at: a.attempted_at,
                outcome: a.outcome,
                response_status: a.response_status,
                latency_ms: a.latency_ms,
                response_excerpt: a.response_excerpt,
                error: a.error,
            });
    }
    Ok(rows
        .into_iter()
        .map(|r| {
            let attempts = by_delivery.remove(&r.id).unwrap_or_default();
            r.view(attempts)
        })
        .collect())
}

/// What asking for a retry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    /// No such delivery of that subscription.
    Missing,
    /// A cancelled delivery: a replay already sent its event again.
    Cancelled,
    /// Its next attempt is due now.
    Scheduled,
}

/// Makes a delivery's next attempt due now: a delivered or dead-lettered one is
/// sent again beside the ordered stream, with the schedule starting over; a
/// pending one (the stream's head, or an earlier retry) is brought forward.
pub async fn retry_delivery(
    tx: &mut Tx,
    tenant_id: &str,
    subscription_id: &str,
    id: &str,
) -> Result<RetryOutcome, sqlx::Error> {
    let now = timestamp::now_text();
    let status: Option<String> = with_tx!(tx, conn => {
        sqlx::query_scalar("SELECT status FROM webhook_deliveries WHERE tenant_id = $1 AND subscription_id = $2 AND id = $3")
            .bind(tenant_id).bind(subscription_id).bind(id).fetch_optional(&mut *conn).await?
    });
    match status.as_deref() {
        None => Ok(RetryOutcome::Missing),
        Some("cancelled") => Ok(RetryOutcome::Cancelled),
        Some("pending") => {
            with_tx!(tx, conn => {
                sqlx::query("UPDATE webhook_deliveries SET next_attempt_at = $2, updated_at = $2 WHERE id = $1").bind(id).bind(&now).execute(&mut *conn).await?;
                // The stream's head waits on the subscription's own due time too.
                sqlx::query("UPDATE webhook_subscriptions SET next_attempt_at = $2 WHERE id = $1 AND pending_delivery_id = $3")
                    .bind(subscription_id).bind(&now).bind(id).execute(&mut *conn).await?;
            });
            Ok(RetryOutcome::Scheduled)
        }
        Some(_) => {
            with_tx!(tx, conn => {
                sqlx::query("UPDATE webhook_deliveries SET status = 'pending', out_of_band = $2, retry_base = attempts, next_attempt_at = $3, updated_at = $3 WHERE id = $1")
                    .bind(id).bind(true).bind(&now).execute(&mut *conn).await?;
            });
            Ok(RetryOutcome::Scheduled)
        }
    }
}

/// Moves a subscription's cursor back so that its events from `since_seq` on
/// are sent again (never forward: events not sent yet are not skipped). A
/// stream head waiting for a retry is cancelled: the replay sends its event
/// again as a new delivery. Returns the cursor now in force.
pub async fn replay(
    tx: &mut Tx,
    tenant_id: &str,
    subscription_id: &str,
    since_seq: i64,
) -> Result<Option<i64>, sqlx::Error> {
    let now = timestamp::now_text();
    with_tx!(tx, conn => {
        let head: Option<Option<String>> = sqlx::query_scalar("SELECT pending_delivery_id FROM webhook_subscriptions WHERE tenant_id = $1 AND id = $2")
            .bind(tenant_id).bind(subscription_id).fetch_optional(&mut *conn).await?;
        let Some(head) = head else {
            return Ok(None);
        };
        if let Some(head) = head {
            sqlx::query("UPDATE webhook_deliveries SET status = 'cancelled', next_attempt_at = NULL, updated_at = $2 WHERE id = $1 AND status = 'pending'")
                .bind(&head).bind(&now).execute(&mut *conn).await?;
        }
        let cursor: i64 = sqlx::query_scalar(
            "UPDATE webhook_subscriptions SET delivered_seq = CASE WHEN delivered_seq < $3 THEN delivered_seq ELSE $3 END, \
             stream_generation = stream_generation + 1, pending_delivery_id = NULL, next_attempt_at = NULL, updated_at = $4 \
             WHERE tenant_id = $1 AND id = $2 RETURNING delivered_seq")
            .bind(tenant_id).bind(subscription_id).bind((since_seq - 1).max(0)).bind(&now).fetch_one(&mut *conn).await?;
        Ok(Some(cursor))
    })
}

// --- The delivery worker's SQL ------------------------------------------------

/// Subscriptions that have work and no live lease: new events after their
/// cursor (the tenant's head is past it), a stream head whose next attempt is
/// due, or a due retry asked for through the API. The longest unleased first,
/// so that subscriptions beyond the free slots get their turn.
pub async fn claimable(db: &Db, now: &str, limit: u32) -> Result<Vec<String>, sqlx::Error> {
    let sql = "SELECT s.id FROM webhook_subscriptions s LEFT JOIN event_heads h ON h.tenant_id = s.tenant_id \
               WHERE s.enabled AND (s.lease_owner IS NULL OR s.lease_until < $1) \
               AND ((s.pending_delivery_id IS NULL AND COALESCE(h.last_seq, 0) > s.delivered_seq) \
                 OR (s.pending_delivery_id IS NOT NULL AND s.next_attempt_at <= $1) \
                 OR EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.subscription_id = s.id \
                            AND d.status = 'pending' AND d.out_of_band AND d.next_attempt_at <= $1)) \
               ORDER BY COALESCE(s.lease_until, ''), s.id LIMIT $2";
    with_db!(db, pool => sqlx::query_scalar(sql).bind(now).bind(i64::from(limit)).fetch_all(pool).await)
}

/// Takes the lease of one subscription if it is still free (or expired) and
/// enabled. On PostgreSQL a second instance's UPDATE of the same row waits for
/// the first one's, then re-checks the condition on the row as it now is, so
/// exactly one of them gets it.
pub async fn claim(
    db: &Db,
    id: &str,
    instance: &str,
    now: &str,
    lease_until: &str,
) -> Result<Option<SubscriptionRow>, sqlx::Error> {
    let sql = format!(
        "UPDATE webhook_subscriptions SET lease_owner = $2, lease_until = $3 \
         WHERE id = $1 AND enabled AND (lease_owner IS NULL OR lease_until < $4) RETURNING {SUBSCRIPTION_COLUMNS}"
    );
    with_db!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).bind(instance).bind(lease_until).bind(now).fetch_optional(pool).await
    })
}

/// Gives a lease back (the time stays, so the claim order is round-robin).
pub async fn release(db: &Db, id: &str, instance: &str, now: &str) -> Result<(), sqlx::Error> {
    with_db!(db, pool => {
        sqlx::query("UPDATE webhook_subscriptions SET lease_owner = NULL, lease_until = $3 WHERE id = $1 AND lease_owner = $2")
            .bind(id).bind(instance).bind(now).execute(pool).await?;
    });
    Ok(())
}

/// Gives back every lease of an instance (at shutdown).
pub async fn release_all(db: &Db, instance: &str, now: &str) -> Result<u64, sqlx::Error> {
    let done = with_db!(db, pool => {
        sqlx::query("UPDATE webhook_subscriptions SET lease_owner = NULL, lease_until = $2 WHERE lease_owner = $1")
            .bind(instance).bind(now).execute(pool).await?.rows_affected()
    });
    Ok(done)
}

/// Retries asked for through the API whose attempt is due, oldest first.
pub async fn due_retries(
    db: &Db,
    subscription_id: &str,
    now: &str,
    limit: u32,
) -> Result<Vec<DeliveryRow>, sqlx::Error> {
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE subscription_id = $1 AND status = 'pending' \
         AND out_of_band AND next_attempt_at <= $2 ORDER BY next_attempt_at, id LIMIT $3"
    );
    with_db!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(subscription_id).bind(now).bind(i64::from(limit)).fetch_all(pool).await
    })
}

/// One delivery row by id.
pub async fn delivery_row(db: &Db, id: &str) -> Result<Option<DeliveryRow>, sqlx::Error> {
    let sql = format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = $1");
    with_db!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(pool).await)
}

/// A delivery as the worker writes it, new or changed.
#[derive(Debug, Clone)]
pub struct DeliveryWrite {
    /// UUIDv7.
    pub id: String,
    /// The event.
    pub event_id: String,
    /// Its seq.
    pub event_seq: i64,
    /// Its type.
    pub event_type: String,
    /// `pending`, `delivered` or `dead_letter`.
    pub status: &'static str,
    /// A retry beside the stream.
    pub out_of_band: bool,
    /// Attempts before the last retry asked for.
    pub retry_base: i64,
    /// Attempts made.
    pub attempts: i64,
    /// When the next one is due, while pending.
    pub next_attempt_at: Option<String>,
    /// The last answer's status.
    pub last_response_status: Option<i64>,
    /// Creation time (new rows).
    pub created_at: String,
}

/// An attempt as the worker records it.
#[derive(Debug, Clone)]
pub struct AttemptWrite {
    /// UUIDv7.
    pub id: String,
    /// Its delivery.
    pub delivery_id: String,
    /// 1 for the first.
    pub number: i64,
    /// When it was sent.
    pub attempted_at: String,
    /// See `client::Outcome`.
    pub outcome: &'static str,
    /// The receiver's status.
    pub response_status: Option<i64>,
    /// Duration.
    pub latency_ms: i64,
    /// The answer's first bytes.
    pub response_excerpt: Option<String>,
    /// What went wrong.
    pub error: Option<String>,
}

/// What the worker did since its last write, for one subscription.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// New deliveries (stream events seen for the first time).
    pub new_deliveries: Vec<DeliveryWrite>,
    /// Deliveries that existed (the stream's head, retries) in their new state.
    pub changed_deliveries: Vec<DeliveryWrite>,
    /// Attempts made.
    pub attempts: Vec<AttemptWrite>,
    /// The stream's new cursor, when it moved.
    pub cursor: Option<i64>,
    /// The stream's head: `Some(None)` clears it, `Some(Some((id, due)))` sets it.
    pub head: Option<Option<(String, String)>>,
    /// The run of failures: `Some(None)` ends it, `Some(Some(since))` starts it.
    pub failing_since: Option<Option<String>>,
}

impl Progress {
    /// Whether there is anything to write but the lease.
    pub fn is_empty(&self) -> bool {
        self.new_deliveries.is_empty()
            && self.changed_deliveries.is_empty()
            && self.attempts.is_empty()
            && self.cursor.is_none()
            && self.head.is_none()
            && self.failing_since.is_none()
    }
}

/// What a worker's write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Written; the lease runs on.
    Kept,
    /// Written, but a replay moved the stream meanwhile: the cursor and head
    /// were left as the replay set them (a head made here was cancelled).
    Replayed,
    /// The subscription is disabled or gone, or its lease is another
    /// instance's now: nothing was written.
    Lost,
}

/// Writes a subscription's progress and renews its lease, in one transaction:
/// only while `instance` holds the lease, and the stream's cursor and head only
/// if no replay came in between (`generation`).
pub async fn write_progress(
    tx: &mut Tx,
    subscription_id: &str,
    tenant_id: &str,
    instance: &str,
    generation: i64,
    lease_until: &str,
    mut progress: Progress,
) -> Result<Written, sqlx::Error> {
    let lock = if tx.is_postgres() { " FOR UPDATE" } else { "" };
    let sql = format!(
        "SELECT stream_generation, enabled FROM webhook_subscriptions WHERE id = $1 AND lease_owner = $2{lock}"
    );
    let found: Option<(i64, bool)> = with_tx!(tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(subscription_id).bind(instance).fetch_optional(&mut *conn).await?
    });
    let Some((current_generation, enabled)) = found else {
        return Ok(Written::Lost);
    };
    if !enabled {
        return Ok(Written::Lost);
    }
    let replayed = current_generation != generation;
    if replayed {
        // The replay sends these events again; a head made here would block it.
        for d in progress
            .new_deliveries
            .iter_mut()
            .chain(progress.changed_deliveries.iter_mut())
        {
            if d.status == "pending" && !d.out_of_band {
                d.status = "cancelled";
                d.next_attempt_at = None;
            }
        }
    }
    let now = timestamp::now_text();
    insert_deliveries(
        tx,
        tenant_id,
        subscription_id,
        &progress.new_deliveries,
        &now,
    )
    .await?;
    for d in &progress.changed_deliveries {
        with_tx!(tx, conn => {
            sqlx::query("UPDATE webhook_deliveries SET status = $2, attempts = $3, next_attempt_at = $4, last_response_status = $5, updated_at = $6 WHERE id = $1")
                .bind(&d.id).bind(d.status).bind(d.attempts).bind(&d.next_attempt_at).bind(d.last_response_status).bind(&now)
                .execute(&mut *conn).await?;
        });
    }
    insert_attempts(tx, tenant_id, &progress.attempts, instance).await?;
    let (set_head, head_id, head_due) = match (&progress.head, replayed) {
        (Some(Some((id, due))), false) => (true, Some(id.clone()), Some(due.clone())),
        (Some(None), false) => (true, None, None),
        _ => (false, None, None),
    };
    let cursor = if replayed { None } else { progress.cursor };
    let (set_failing, failing) = match &progress.failing_since {
        Some(f) => (true, f.clone()),
        None => (false, None),
    };
    with_tx!(tx, conn => {
        sqlx::query(
            "UPDATE webhook_subscriptions SET \
             delivered_seq = CASE WHEN $3 THEN $4 ELSE delivered_seq END, \
             pending_delivery_id = CASE WHEN $5 THEN $6 ELSE pending_delivery_id END, \
             next_attempt_at = CASE WHEN $5 THEN $7 ELSE next_attempt_at END, \
             failing_since = CASE WHEN $8 THEN $9 ELSE failing_since END, \
             lease_until = $10 WHERE id = $1 AND lease_owner = $2")
            .bind(subscription_id).bind(instance)
            .bind(cursor.is_some()).bind(cursor.unwrap_or(0))
            .bind(set_head).bind(head_id).bind(head_due)
            .bind(set_failing).bind(failing)
            .bind(lease_until)
            .execute(&mut *conn).await?;
    });
    Ok(if replayed {
        Written::Replayed
    } else {
        Written::Kept
    })
}

async fn insert_deliveries(
    tx: &mut Tx,
    tenant_id: &str,
    subscription_id: &str,
    rows: &[DeliveryWrite],
    now: &str,
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    match tx {
        // In-process: one cached prepared statement per row costs no round
        // trip, where a statement of thousands of `$N` would cost SQLite a
        // quadratic scan of its parameter names.
        Tx::Sqlite(t) => {
            for d in rows {
                sqlx::query(
                    "INSERT INTO webhook_deliveries (id, tenant_id, subscription_id, event_id, event_seq, event_type, status, \
                     out_of_band, retry_base, attempts, next_attempt_at, last_response_status, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                )
                .bind(&d.id).bind(tenant_id).bind(subscription_id).bind(&d.event_id).bind(d.event_seq)
                .bind(&d.event_type).bind(d.status).bind(d.out_of_band).bind(d.retry_base).bind(d.attempts)
                .bind(&d.next_attempt_at).bind(d.last_response_status).bind(&d.created_at).bind(now)
                .execute(&mut **t)
                .await?;
            }
        }
        // One statement (one round trip, one cached plan) for the whole batch.
        Tx::Postgres(t) => {
            sqlx::query(
                "INSERT INTO webhook_deliveries (id, tenant_id, subscription_id, event_id, event_seq, event_type, status, \
                 out_of_band, retry_base, attempts, next_attempt_at, last_response_status, created_at, updated_at) \
                 SELECT id, $1, $2, event_id, event_seq, event_type, status, out_of_band, retry_base, attempts, \
                        next_attempt_at, last_response_status, created_at, $3 \
                 FROM UNNEST($4::text[], $5::text[], $6::bigint[], $7::text[], $8::text[], $9::bool[], $10::bigint[], \
                             $11::bigint[], $12::text[], $13::bigint[], $14::text[]) \
                   AS d(id, event_id, event_seq, event_type, status, out_of_band, retry_base, attempts, \
                        next_attempt_at, last_response_status, created_at)",
            )
            .bind(tenant_id)
            .bind(subscription_id)
            .bind(now)
            .bind(rows.iter().map(|d| d.id.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|d| d.event_id.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|d| d.event_seq).collect::<Vec<_>>())
            .bind(rows.iter().map(|d| d.event_type.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|d| d.status.to_owned()).collect::<Vec<_>>())
            .bind(rows.iter().map(|d| d.out_of_band).collect::<Vec<_>>())
            .bind(rows.iter().map(|d| d.retry_base).collect::<Vec<_>>())
            .bind(rows.iter().map(|d| d.attempts).collect::<Vec<_>>())
            .bind(rows.iter().map(|d| d.next_attempt_at.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|d| d.last_response_status).collect::<Vec<_>>())
            .bind(rows.iter().map(|d| d.created_at.clone()).collect::<Vec<_>>())
            .execute(&mut **t)
            .await?;
        }
    }
    Ok(())
}

async fn insert_attempts(
    tx: &mut Tx,
    tenant_id: &str,
    rows: &[AttemptWrite],
    instance: &str,
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    match tx {
        Tx::Sqlite(t) => {
            for a in rows {
                sqlx::query(
                    "INSERT INTO webhook_attempts (id, tenant_id, delivery_id, number, attempted_at, outcome, response_status, \
                     latency_ms, response_excerpt, error, instance) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                )
                .bind(&a.id).bind(tenant_id).bind(&a.delivery_id).bind(a.number).bind(&a.attempted_at)
                .bind(a.outcome).bind(a.response_status).bind(a.latency_ms).bind(&a.response_excerpt)
                .bind(&a.error).bind(instance)
                .execute(&mut **t)
                .await?;
            }
        }
        Tx::Postgres(t) => {
            sqlx::query(
                "INSERT INTO webhook_attempts (id, tenant_id, delivery_id, number, attempted_at, outcome, response_status, \
                 latency_ms, response_excerpt, error, instance) \
                 SELECT id, $1, delivery_id, number, attempted_at, outcome, response_status, latency_ms, \
                        response_excerpt, error, $2 \
                 FROM UNNEST($3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[], $8::bigint[], $9::bigint[], \
                             $10::text[], $11::text[]) \
                   AS a(id, delivery_id, number, attempted_at, outcome, response_status, latency_ms, response_excerpt, error)",
            )
            .bind(tenant_id)
            .bind(instance)
            .bind(rows.iter().map(|a| a.id.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|a| a.delivery_id.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|a| a.number).collect::<Vec<_>>())
            .bind(rows.iter().map(|a| a.attempted_at.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|a| a.outcome.to_owned()).collect::<Vec<_>>())
            .bind(rows.iter().map(|a| a.response_status).collect::<Vec<_>>())
            .bind(rows.iter().map(|a| a.latency_ms).collect::<Vec<_>>())
            .bind(rows.iter().map(|a| a.response_excerpt.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|a| a.error.clone()).collect::<Vec<_>>())
            .execute(&mut **t)
            .await?;
        }
    }
    Ok(())
}

/// Disables a failing subscription (the kernel's own change: the caller audits
/// and announces it in the same transaction); `None` when it was gone.
pub async fn disable_failing(
    tx: &mut Tx,
    subscription_id: &str,
) -> Result<Option<SubscriptionRow>, sqlx::Error> {
    let now = timestamp::now_text();
    let sql = format!(
        "UPDATE webhook_subscriptions SET enabled = $2, disabled_reason = 'failing', lease_owner = NULL, lease_until = $3, \
         version = version + 1, updated_at = $3 WHERE id = $1 AND enabled RETURNING {SUBSCRIPTION_COLUMNS}"
    );
    with_tx!(tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(subscription_id).bind(false).bind(&now).fetch_optional(&mut *conn).await
    })
}

/// Deletes up to `limit` finished deliveries (and their attempts) last changed
/// before `cutoff`; how many deliveries went.
pub async fn purge_history(tx: &mut Tx, cutoff: &str, limit: u32) -> Result<u64, sqlx::Error> {
    let done = with_tx!(tx, conn => {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM webhook_deliveries WHERE updated_at < $1 AND status <> 'pending' ORDER BY updated_at LIMIT $2")
            .bind(cutoff).bind(i64::from(limit)).fetch_all(&mut *conn).await?;
        // Chunks of 100: a short `IN` list per statement.
        for chunk in ids.chunks(100) {
            let list: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let list = list.join(", ");
            for table_sql in [
                format!("DELETE FROM webhook_attempts WHERE delivery_id IN ({list})"),
                format!("DELETE FROM webhook_deliveries WHERE id IN ({list})"),
            ] {
                let mut query = sqlx::query(sqlx::AssertSqlSafe(table_sql));
                for id in chunk {
                    query = query.bind(id);
                }
                query.execute(&mut *conn).await?;
            }
        }
        ids.len() as u64
    });
    Ok(done)
}

/// The tenant's last event `seq`, read in `tx` (a new subscription's stream
/// starts after it: it gets only later events).
pub async fn event_head(tx: &mut Tx, tenant_id: &str) -> Result<i64, sqlx::Error> {
    let last: Option<i64> = with_tx!(tx, conn => {
        sqlx::query_scalar("SELECT last_seq FROM event_heads WHERE tenant_id = $1").bind(tenant_id).fetch_optional(&mut *conn).await?
    });
    Ok(last.unwrap_or(0))
}
