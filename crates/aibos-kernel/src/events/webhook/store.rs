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
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    // One query for the page's attempts: `IN ($2, $3, …)` over at most a page of ids.
    let placeholders: Vec<String> = (0..rows.len()).map(|i| format!("${}", i + 2)).collect();
    let sql = format!(
        "SELECT delivery_id, number, attempted_at, outcome, response_status, latency_ms, response_excerpt, error \
         FROM webhook_attempts WHERE tenant_id = $1 AND delivery_id IN ({}) ORDER BY delivery_id, number",
        placeholders.join(", ")
    );
    let attempts: Vec<AttemptRow> = with_db!(db, pool => {
        let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone())).bind(tenant_id);
        for row in &rows {
            query = query.bind(&row.id);
        }
        query.fetch_all(pool).await?
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
            .bind(tenant_id).bind(subscription_id).bind(since_seq - 1).bind(&now).fetch_one(&mut *conn).await?;
        Ok(Some(cursor))
    })
}
