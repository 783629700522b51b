//! The SQL of idempotency records (migration 0012). Each function is one
//! statement: taking a key is one atomic upsert, never a read then a write.

use crate::db::{Db, DbError, Tx};
use crate::{with_db, with_tx};

/// The associated data a record's body is sealed with: the body opens only
/// as the answer of this tenant's key.
pub fn body_place(tenant_id: &str, key: &str) -> String {
    format!("idempotency_records.response_body:{tenant_id}:{key}")
}

/// A record as read back when its key could not be taken.
#[derive(Debug, sqlx::FromRow)]
pub struct Record {
    /// The principal that used the key.
    pub subject_id: String,
    /// Lowercase hex SHA-256 of method, path and query, and body.
    pub fingerprint: String,
    /// `in_flight` or `completed`.
    pub state: String,
    /// An in-flight record's lock.
    pub locked_until: Option<String>,
    /// A completed record's status.
    pub response_status: Option<i32>,
    /// A completed record's replayed headers, a JSON array of `[name, value]`.
    pub response_headers: Option<String>,
    /// A completed record's body, sealed (see [`body_place`]).
    pub response_body: Option<String>,
    /// When the record stops counting.
    pub expires_at: String,
}

/// What taking a key writes.
pub struct Take {
    /// The caller's tenant.
    pub tenant_id: String,
    /// The key.
    pub key: String,
    /// The caller.
    pub subject_id: String,
    /// Hex fingerprint of the request.
    pub fingerprint: String,
    /// This execution's id.
    pub claim_id: String,
    /// The lock's end (also the in-flight record's `expires_at`).
    pub locked_until: String,
    /// Now.
    pub now: String,
}

/// Takes the key in flight: inserts the record, or replaces one whose
/// `expires_at` has passed (an in-flight record whose kernel died, or a
/// completed one past its TTL). True when this call holds it. One statement:
/// PostgreSQL re-checks the `WHERE` under the row lock after a concurrent
/// insert or update, so of several kernels exactly one gets a row back.
pub async fn take_in(tx: &mut Tx, t: &Take) -> Result<bool, sqlx::Error> {
    let taken: Option<String> = with_tx!(tx, conn => {
        sqlx::query_scalar(TAKE_SQL)
            .bind(&t.tenant_id).bind(&t.key).bind(&t.subject_id).bind(&t.fingerprint)
            .bind(&t.claim_id).bind(&t.locked_until).bind(&t.now)
            .fetch_optional(&mut *conn)
            .await?
    });
    Ok(taken.is_some())
}

/// A writer's failure as the `sqlx::Error` these functions return.
pub fn into_sqlx(e: DbError) -> sqlx::Error {
    match e {
        DbError::Query(e) => e,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

const TAKE_SQL: &str = "INSERT INTO idempotency_records \
         (tenant_id, idempotency_key, subject_id, fingerprint, claim_id, state, locked_until, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, 'in_flight', $6, $7, $6) \
         ON CONFLICT (tenant_id, idempotency_key) DO UPDATE SET \
             subject_id = excluded.subject_id, fingerprint = excluded.fingerprint, claim_id = excluded.claim_id, \
             state = 'in_flight', locked_until = excluded.locked_until, response_status = NULL, \
             response_headers = NULL, response_body = NULL, created_at = excluded.created_at, expires_at = excluded.expires_at \
         WHERE idempotency_records.expires_at <= $7 \
         RETURNING claim_id";

/// The record of `key` in `tenant_id`, if any.
pub async fn read(db: &Db, tenant_id: &str, key: &str) -> Result<Option<Record>, sqlx::Error> {
    const SQL: &str = "SELECT subject_id, fingerprint, state, locked_until, response_status, \
         response_headers, response_body, expires_at FROM idempotency_records \
         WHERE tenant_id = $1 AND idempotency_key = $2";
    Ok(with_db!(db, pool => {
        sqlx::query_as(SQL).bind(tenant_id).bind(key).fetch_optional(pool).await?
    }))
}

/// What completing a record stores.
pub struct Completion<'a> {
    /// HTTP status.
    pub status: u16,
    /// JSON array of `[name, value]`.
    pub headers_json: &'a str,
    /// The body, base64url-encoded and sealed (see [`body_place`]).
    pub sealed_body: &'a str,
    /// The end of its TTL.
    pub expires_at: &'a str,
}

const COMPLETE_SQL: &str = "UPDATE idempotency_records SET state = 'completed', locked_until = NULL, \
     response_status = $4, response_headers = $5, response_body = $6, expires_at = $7 \
     WHERE tenant_id = $1 AND idempotency_key = $2 AND claim_id = $3 AND state = 'in_flight'";

/// Stores the response of the execution `claim_id` (with the call's audit
/// entry, in the caller's transaction); false when the record is no longer that
/// execution's (its lock expired and another took the key).
pub async fn complete_in(
    tx: &mut Tx,
    tenant_id: &str,
    key: &str,
    claim_id: &str,
    c: &Completion<'_>,
) -> Result<bool, sqlx::Error> {
    let updated = with_tx!(tx, conn => {
        sqlx::query(COMPLETE_SQL)
            .bind(tenant_id).bind(key).bind(claim_id)
            .bind(i32::from(c.status)).bind(c.headers_json).bind(c.sealed_body).bind(c.expires_at)
            .execute(&mut *conn)
            .await?
            .rows_affected()
    });
    Ok(updated == 1)
}

/// A [`Completion`] that can move into a spawned transaction.
pub struct OwnedCompletion {
    status: u16,
    headers_json: String,
    sealed_body: String,
    expires_at: String,
}

impl From<&Completion<'_>> for OwnedCompletion {
    fn from(c: &Completion<'_>) -> OwnedCompletion {
        OwnedCompletion {
            status: c.status,
            headers_json: c.headers_json.to_owned(),
            sealed_body: c.sealed_body.to_owned(),
            expires_at: c.expires_at.to_owned(),
        }
    }
}

impl OwnedCompletion {
    /// The borrowed form the statements take.
    pub fn borrow(&self) -> Completion<'_> {
        Completion {
            status: self.status,
            headers_json: &self.headers_json,
            sealed_body: &self.sealed_body,
            expires_at: &self.expires_at,
        }
    }
}

/// Deletes the in-flight record of execution `claim_id` (a release).
pub async fn release_in(
    tx: &mut Tx,
    tenant_id: &str,
    key: &str,
    claim_id: &str,
) -> Result<(), sqlx::Error> {
    const SQL: &str = "DELETE FROM idempotency_records \
         WHERE tenant_id = $1 AND idempotency_key = $2 AND claim_id = $3 AND state = 'in_flight'";
    with_tx!(tx, conn => {
        sqlx::query(SQL).bind(tenant_id).bind(key).bind(claim_id).execute(&mut *conn).await?.rows_affected()
    });
    Ok(())
}

/// Deletes up to `limit` records whose `expires_at` is before `now`; returns
/// how many.
pub async fn purge_expired(db: &Db, now: &str, limit: i64) -> Result<u64, sqlx::Error> {
    const SQL: &str = "DELETE FROM idempotency_records WHERE (tenant_id, idempotency_key) IN ( \
         SELECT tenant_id, idempotency_key FROM idempotency_records WHERE expires_at < $1 LIMIT $2)";
    Ok(with_db!(db, pool => {
        sqlx::query(SQL).bind(now).bind(limit).execute(pool).await?.rows_affected()
    }))
}
