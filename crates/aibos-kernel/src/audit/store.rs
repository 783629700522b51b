//! The audit trail's SQL.

use std::borrow::Cow;

use sqlx::FromRow;
use uuid::Uuid;

use super::chain::{self, GENESIS_HASH, Verification, Verifier, compute_hash};
use super::{AuditContext, AuditEntry};
use crate::db::{Db, Tx};
use crate::{timestamp, with_db, with_tx};

/// Rows fetched per round trip while verifying a chain.
const VERIFY_BATCH_ROWS: i64 = 10_000;

#[derive(FromRow)]
struct Row {
    id: String,
    tenant_id: String,
    seq: i64,
    occurred_at: String,
    actor_type: String,
    actor_id: Option<String>,
    action: String,
    resource_type: Option<String>,
    resource_id: Option<String>,
    outcome: String,
    severity: String,
    client_ip: Option<String>,
    user_agent: Option<String>,
    correlation_id: Option<String>,
    details: String,
    prev_hash: String,
    hash: String,
}

impl From<Row> for AuditEntry {
    fn from(r: Row) -> AuditEntry {
        AuditEntry {
            id: r.id,
            tenant_id: r.tenant_id,
            seq: r.seq,
            occurred_at: r.occurred_at,
            actor_type: r.actor_type,
            actor_id: r.actor_id,
            action: r.action,
            resource_type: r.resource_type,
            resource_id: r.resource_id,
            outcome: r.outcome,
            severity: r.severity,
            client_ip: r.client_ip,
            user_agent: r.user_agent,
            correlation_id: r.correlation_id,
            // A stored value that is not JSON is kept as text, so verification reports the
            // entry as edited instead of failing to read it.
            details: serde_json::from_str(&r.details)
                .unwrap_or(serde_json::Value::String(r.details)),
            prev_hash: r.prev_hash,
            hash: r.hash,
        }
    }
}

const COLUMNS: &str = "id, tenant_id, seq, occurred_at, actor_type, actor_id, action, resource_type, resource_id, \
                       outcome, severity, client_ip, user_agent, correlation_id, details, prev_hash, hash";

/// Appends one entry to the tenant's chain. The head row is claimed with an
/// `UPDATE … RETURNING`, which locks it until `tx` ends: writers of one tenant
/// take turns, writers of other tenants are not involved.
#[allow(clippy::too_many_arguments)]
pub async fn append(
    tx: &mut Tx,
    ctx: &AuditContext,
    action: &str,
    resource_type: Option<&str>,
    resource_id: Option<String>,
    outcome: &str,
    severity: &str,
    details: serde_json::Value,
) -> Result<AuditEntry, sqlx::Error> {
    let claimed: Option<(i64, String)> = with_tx!(tx, conn => {
        let claimed = sqlx::query_as("UPDATE audit_heads SET seq = seq + 1 WHERE tenant_id = $1 RETURNING seq, hash")
            .bind(&ctx.tenant_id)
            .fetch_optional(&mut *conn)
            .await?;
        match claimed {
            Some(row) => Some(row),
            None => {
                sqlx::query("INSERT INTO audit_heads (tenant_id, seq, hash) VALUES ($1, 1, $2) ON CONFLICT (tenant_id) DO NOTHING")
                    .bind(&ctx.tenant_id)
                    .bind(GENESIS_HASH)
                    .execute(&mut *conn)
                    .await?;
                None
            }
        }
    });
    let (seq, prev_hash) = match claimed {
        Some(row) => row,
        None => {
            // Either we created the head (seq 1) or a concurrent writer did first: claim again.
            let row: (i64, String) = with_tx!(tx, conn => {
                sqlx::query_as("SELECT seq, hash FROM audit_heads WHERE tenant_id = $1").bind(&ctx.tenant_id).fetch_one(&mut *conn).await?
            });
            if row.0 == 1 && row.1 == GENESIS_HASH {
                row
            } else {
                with_tx!(tx, conn => {
                    sqlx::query_as("UPDATE audit_heads SET seq = seq + 1 WHERE tenant_id = $1 RETURNING seq, hash")
                        .bind(&ctx.tenant_id)
                        .fetch_one(&mut *conn)
                        .await?
                })
            }
        }
    };

    let mut entry = AuditEntry {
        id: Uuid::now_v7().to_string(),
        tenant_id: ctx.tenant_id.clone(),
        seq,
        occurred_at: timestamp::now_text(),
        actor_type: ctx.actor_type.to_owned(),
        actor_id: ctx.actor_id.clone(),
        action: action.to_owned(),
        resource_type: resource_type.map(str::to_owned),
        resource_id,
        outcome: outcome.to_owned(),
        severity: severity.to_owned(),
        client_ip: ctx.client_ip.clone(),
        user_agent: ctx.user_agent.clone(),
        correlation_id: ctx.correlation_id.clone(),
        details,
        prev_hash,
        hash: String::new(),
    };
    entry.hash = compute_hash(&entry);
    let details_text = entry.details.to_string();
    // PostgreSQL: the entry and the head's new hash in one statement (a
    // data-modifying CTE), one round trip fewer per audited change. SQLite has
    // no data-modifying CTEs, and its statements are calls within the process.
    let sql = if tx.is_postgres() {
        "WITH head AS (UPDATE audit_heads SET hash = $17 WHERE tenant_id = $2) \
         INSERT INTO audit_log (id, tenant_id, seq, occurred_at, actor_type, actor_id, action, resource_type, resource_id, \
         outcome, severity, client_ip, user_agent, correlation_id, details, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
    } else {
        "INSERT INTO audit_log (id, tenant_id, seq, occurred_at, actor_type, actor_id, action, resource_type, resource_id, \
         outcome, severity, client_ip, user_agent, correlation_id, details, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
    };
    let postgres = tx.is_postgres();
    with_tx!(tx, conn => {
        sqlx::query(sql)
        .bind(&entry.id)
        .bind(&entry.tenant_id)
        .bind(entry.seq)
        .bind(&entry.occurred_at)
        .bind(&entry.actor_type)
        .bind(&entry.actor_id)
        .bind(&entry.action)
        .bind(&entry.resource_type)
        .bind(&entry.resource_id)
        .bind(&entry.outcome)
        .bind(&entry.severity)
        .bind(&entry.client_ip)
        .bind(&entry.user_agent)
        .bind(&entry.correlation_id)
        .bind(&details_text)
        .bind(&entry.prev_hash)
        .bind(&entry.hash)
        .execute(&mut *conn)
        .await?;
        if !postgres {
            sqlx::query("UPDATE audit_heads SET hash = $2 WHERE tenant_id = $1")
                .bind(&entry.tenant_id)
                .bind(&entry.hash)
                .execute(&mut *conn)
                .await?;
        }
    });
    // Pair of the hash computed before insert: the stored form must verify as written.
    debug_assert_eq!(compute_hash(&entry), entry.hash);
    Ok(entry)
}

/// Inserts entries exactly as given (already chained and hashed) and moves the
/// tenant's head to the last one: for restores and for benchmarks that need a
/// long chain quickly. The caller guarantees they continue the current head.
pub async fn append_verbatim(tx: &mut Tx, entries: &[AuditEntry]) -> Result<(), sqlx::Error> {
    const ROWS_PER_STATEMENT: usize = 500;
    for chunk in entries.chunks(ROWS_PER_STATEMENT) {
        // One SQL text, built per engine (the builder is typed by its driver).
        with_tx!(tx, conn => {
            let mut builder = sqlx::QueryBuilder::new(format!("INSERT INTO audit_log ({COLUMNS}) "));
            builder.push_values(chunk, |mut row, e| {
                row.push_bind(e.id.clone())
                    .push_bind(e.tenant_id.clone())
                    .push_bind(e.seq)
                    .push_bind(e.occurred_at.clone())
                    .push_bind(e.actor_type.clone())
                    .push_bind(e.actor_id.clone())
                    .push_bind(e.action.clone())
                    .push_bind(e.resource_type.clone())
                    .push_bind(e.resource_id.clone())
                    .push_bind(e.outcome.clone())
                    .push_bind(e.severity.clone())
                    .push_bind(e.client_ip.clone())
                    .push_bind(e.user_agent.clone())
                    .push_bind(e.correlation_id.clone())
                    .push_bind(e.details.to_string())
                    .push_bind(e.prev_hash.clone())
                    .push_bind(e.hash.clone());
            });
            builder.build().execute(&mut *conn).await?;
        });
    }
    if let Some(last) = entries.last() {
        with_tx!(tx, conn => {
            sqlx::query("INSERT INTO audit_heads (tenant_id, seq, hash) VALUES ($1, $2, $3) \
                         ON CONFLICT (tenant_id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash")
                .bind(&last.tenant_id).bind(last.seq).bind(&last.hash).execute(&mut *conn).await?;
        });
    }
    Ok(())
}

/// The head (`seq`, `hash`) of a tenant's chain, if it has one.
pub async fn head(db: &Db, tenant_id: &str) -> Result<Option<(i64, String)>, sqlx::Error> {
    with_db!(db, pool => sqlx::query_as("SELECT seq, hash FROM audit_heads WHERE tenant_id = $1").bind(tenant_id).fetch_optional(pool).await)
}

/// Entries in the whole audit trail, every tenant: the sum of the chains'
/// head `seq`s (a chain numbers its entries from 1 without gaps), one row per
/// tenant to read instead of the trail.
pub async fn total_entries(db: &Db) -> Result<i64, sqlx::Error> {
    with_db!(db, pool => sqlx::query_scalar("SELECT CAST(COALESCE(SUM(seq), 0) AS BIGINT) FROM audit_heads").fetch_one(pool).await)
}

/// Filters of `GET /api/kernel/audit`; all optional, all within one tenant.
#[derive(Debug, Default, Clone)]
pub struct AuditFilter {
    /// Exact action.
    pub action: Option<String>,
    /// Exact actor.
    pub actor_id: Option<String>,
    /// Exact resource type.
    pub resource_type: Option<String>,
    /// Exact resource id.
    pub resource_id: Option<String>,
    /// Exact correlation id.
    pub correlation_id: Option<String>,
    /// Exact outcome.
    pub outcome: Option<String>,
    /// `occurred_at >= from`.
    pub from: Option<String>,
    /// `occurred_at < to`.
    pub to: Option<String>,
}

/// One page of a tenant's entries in `seq` order, after `after_seq`.
pub async fn list(
    db: &Db,
    tenant_id: &str,
    filter: &AuditFilter,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<AuditEntry>, sqlx::Error> {
    // Every filter is a bound parameter: `$n IS NULL OR column = $n` keeps one SQL text.
    let sql = format!(
        "SELECT {COLUMNS} FROM audit_log WHERE tenant_id = $1 AND seq > $2 \
         AND ($3 IS NULL OR action = $3) AND ($4 IS NULL OR actor_id = $4) \
         AND ($5 IS NULL OR resource_type = $5) AND ($6 IS NULL OR resource_id = $6) \
         AND ($7 IS NULL OR correlation_id = $7) AND ($8 IS NULL OR outcome = $8) \
         AND ($9 IS NULL OR occurred_at >= $9) AND ($10 IS NULL OR occurred_at < $10) \
         ORDER BY seq LIMIT $11"
    );
    let rows: Vec<Row> = with_db!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant_id)
            .bind(after_seq)
            .bind(&filter.action)
            .bind(&filter.actor_id)
            .bind(&filter.resource_type)
            .bind(&filter.resource_id)
            .bind(&filter.correlation_id)
            .bind(&filter.outcome)
            .bind(&filter.from)
            .bind(&filter.to)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
    });
    Ok(rows.into_iter().map(AuditEntry::from).collect())
}

/// A row as the verification query returns it: one JSON array per entry, its
/// strings borrowed from the batch's text where they need no unescaping.
#[derive(serde::Deserialize)]
struct JsonRow<'a>(
    #[serde(borrow)] Cow<'a, str>,
    #[serde(borrow)] Cow<'a, str>,
    i64,
    #[serde(borrow)] Cow<'a, str>,
    #[serde(borrow)] Cow<'a, str>,
    #[serde(borrow)] Option<Cow<'a, str>>,
    #[serde(borrow)] Cow<'a, str>,
    #[serde(borrow)] Option<Cow<'a, str>>,
    #[serde(borrow)] Option<Cow<'a, str>>,
    #[serde(borrow)] Cow<'a, str>,
    #[serde(borrow)] Cow<'a, str>,
    #[serde(borrow)] Option<Cow<'a, str>>,
    #[serde(borrow)] Option<Cow<'a, str>>,
    #[serde(borrow)] Option<Cow<'a, str>>,
    #[serde(borrow)] Cow<'a, str>,
    #[serde(borrow)] Cow<'a, str>,
    #[serde(borrow)] Cow<'a, str>,
);

/// What verification keeps of an entry after its hash was checked.
struct Checked {
    seq: i64,
    tenant_id: String,
    prev_hash: String,
    hash: String,
    hash_ok: bool,
}

/// One batch of a tenant's entries in `seq` order, fetched as a single JSON
/// document (a million rows one by one spent most of verification in per-row
/// driver overhead), as the batch's text.
async fn verification_batch(
    db: &Db,
    tenant_id: &str,
    after: i64,
    until: i64,
) -> Result<String, sqlx::Error> {
    const ROW: &str = "id, tenant_id, seq, occurred_at, actor_type, actor_id, action, resource_type, resource_id, \
                       outcome, severity, client_ip, user_agent, correlation_id, details, prev_hash, hash";
    let text: Option<String> = match db {
        Db::Sqlite(crate::db::SqliteDb { pool, .. }) => {
            let sql = format!(
                "SELECT json_group_array(json_array({ROW})) FROM \
                 (SELECT {COLUMNS} FROM audit_log WHERE tenant_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq)"
            );
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(tenant_id)
                .bind(after)
                .bind(until)
                .fetch_one(pool)
                .await?
        }
        Db::Postgres(pool) => {
            let sql = format!(
                "SELECT COALESCE(json_agg(json_build_array({ROW}) ORDER BY seq), '[]')::text FROM \
                 (SELECT {COLUMNS} FROM audit_log WHERE tenant_id = $1 AND seq > $2 AND seq <= $3) t"
            );
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(tenant_id)
                .bind(after)
                .bind(until)
                .fetch_one(pool)
                .await?
        }
    };
    Ok(text.unwrap_or_else(|| "[]".to_owned()))
}

/// Parses a batch and checks every entry's hash, on every core.
fn check_batch(text: &str) -> Result<Vec<Checked>, serde_json::Error> {
    let mut rows: Vec<JsonRow<'_>> = serde_json::from_str(text)?;
    // The aggregate's order is the subquery's in practice; do not rely on it.
    rows.sort_by_key(|r| r.2);
    let threads = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .max(1);
    let chunk = rows.len().div_ceil(threads).max(1);
    Ok(std::thread::scope(|scope| {
        let parts: Vec<_> = rows
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    let mut buffer = Vec::with_capacity(1024);
                    part.iter()
                        .map(|r| {
                            // A stored value that is not JSON is kept as text: reported as edited.
                            let details = serde_json::from_str(&r.14)
                                .unwrap_or_else(|_| serde_json::Value::String(r.14.to_string()));
                            let fields = chain::Fields {
                                id: &r.0,
                                tenant_id: &r.1,
                                seq: r.2,
                                occurred_at: &r.3,
                                actor_type: &r.4,
                                actor_id: r.5.as_deref(),
                                action: &r.6,
                                resource_type: r.7.as_deref(),
                                resource_id: r.8.as_deref(),
                                outcome: &r.9,
                                severity: &r.10,
                                client_ip: r.11.as_deref(),
                                user_agent: r.12.as_deref(),
                                correlation_id: r.13.as_deref(),
                                details: &details,
                                prev_hash: &r.15,
                            };
                            Checked {
                                seq: r.2,
                                tenant_id: r.1.to_string(),
                                prev_hash: r.15.to_string(),
                                hash: r.16.to_string(),
                                hash_ok: chain::hash_matches(&fields, &r.16, &mut buffer),
                            }
                        })
                        .collect::<Vec<Checked>>()
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().unwrap_or_default())
            .collect()
    }))
}

/// Recomputes one tenant's chain up to `until_seq` (all of it when `None`).
///
/// Batches are ranges of `seq` (not pages after the last row seen), so the next
/// batch can be fetched while the current one is hashed on every core. The
/// ranges run to the highest `seq` present or recorded, so an entry appended
/// past the head, or a gap, is still seen.
pub async fn verify_tenant(
    db: &Db,
    tenant_id: &str,
    until_seq: Option<i64>,
) -> Result<Verification, sqlx::Error> {
    verify_tenant_range(db, tenant_id, 0, until_seq)
        .await
        .map(|(verification, _)| verification)
}

/// Recomputes the entries after `after_seq` up to `until_seq` of one tenant's
/// chain, as [`verify_tenant`] does from the start (`after_seq = 0`). The
/// first of them must link to entry `after_seq` as stored, whose own hash is
/// checked again first: an entry edited since an earlier range verified it is
/// found there, and one edited and re-hashed no longer links to the next.
/// Returns the verification (its `entries` are those after `after_seq`) and the
/// chain's last `seq`: the higher of the highest stored and the recorded head.
pub async fn verify_tenant_range(
    db: &Db,
    tenant_id: &str,
    after_seq: i64,
    until_seq: Option<i64>,
) -> Result<(Verification, i64), sqlx::Error> {
    assert!(after_seq >= 0, "seq counts from 1");
    let until = until_seq.unwrap_or(i64::MAX);
    let (max_seq, head): (Option<i64>, Option<i64>) = with_db!(db, pool => {
        sqlx::query_as("SELECT (SELECT MAX(seq) FROM audit_log WHERE tenant_id = $1), (SELECT seq FROM audit_heads WHERE tenant_id = $1)")
            .bind(tenant_id).fetch_one(pool).await?
    });
    let chain_last = max_seq.unwrap_or(0).max(head.unwrap_or(0));
    let mut verifier = if after_seq == 0 {
        Verifier::new(tenant_id)
    } else {
        let text = verification_batch(db, tenant_id, after_seq - 1, after_seq).await?;
        let seed = tokio::task::spawn_blocking(move || check_batch(&text))
            .await
            .map_err(|e| sqlx::Error::Protocol(e.to_string()))?
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?
            .pop();
        match seed {
            Some(c) if c.hash_ok => Verifier::resume(tenant_id, after_seq + 1, &c.hash),
            // Edited since: the verifier names it as the first bad entry.
            Some(c) => {
                let mut v = Verifier::resume(tenant_id, after_seq, &c.prev_hash);
                v.push_checked(c.seq, &c.tenant_id, &c.prev_hash, &c.hash, c.hash_ok);
                v
            }
            // Deleted since: the next entry (or the head) names it as missing.
            None => Verifier::resume(tenant_id, after_seq, GENESIS_HASH),
        }
    };
    let last = chain_last.min(until);
    let fetch = |after: i64| {
        let (db, tenant_id) = (db.clone(), tenant_id.to_owned());
        tokio::spawn(async move {
            verification_batch(
                &db,
                &tenant_id,
                after,
                (after + VERIFY_BATCH_ROWS).min(until),
            )
            .await
        })
    };
    let mut after = after_seq;
    let mut pending = (after < last).then(|| fetch(after));
    while let Some(task) = pending.take() {
        let text = task
            .await
            .map_err(|e| sqlx::Error::Protocol(e.to_string()))??;
        after += VERIFY_BATCH_ROWS;
        pending = (after < last).then(|| fetch(after));
        let checked = tokio::task::spawn_blocking(move || check_batch(&text))
            .await
            .map_err(|e| sqlx::Error::Protocol(e.to_string()))?
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        if checked
            .iter()
            .any(|c| !verifier.push_checked(c.seq, &c.tenant_id, &c.prev_hash, &c.hash, c.hash_ok))
        {
            if let Some(task) = pending.take() {
                task.abort();
            }
            break;
        }
    }
    Ok((verifier.finish(head.map(|h| h.min(until))), chain_last))
}

/// Every tenant that has an audit chain (or ever had one).
pub async fn tenants_with_entries(db: &Db) -> Result<Vec<String>, sqlx::Error> {
    with_db!(db, pool => {
        sqlx::query_scalar("SELECT tenant_id FROM audit_heads UNION SELECT DISTINCT tenant_id FROM audit_log ORDER BY 1").fetch_all(pool).await
    })
}
