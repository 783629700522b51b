//! The event bus's SQL.

use serde_json::value::RawValue;
use sqlx::FromRow;
use uuid::Uuid;

use super::{Appended, Event, NewEvent, TypeFilter};
use crate::db::{Db, Tx};
use crate::{timestamp, with_db, with_tx};

const COLUMNS: &str = "id, tenant_id, seq, event_type, version, source, subject, actor_type, \
                       actor_id, correlation_id, occurred_at, payload";

/// Rows read per round trip while a filtered read skips types it does not want.
const FILTER_SCAN_ROWS: u32 = 1_000;

/// Most rows one filtered read scans before it answers with what it found (a
/// bound on the work of one request; the cursor moves past what was scanned,
/// so nothing is skipped).
pub const FILTER_SCAN_ROWS_MAX: u32 = 20_000;

#[derive(FromRow)]
struct Row {
    id: String,
    tenant_id: String,
    seq: i64,
    event_type: String,
    version: i32,
    source: String,
    subject: Option<String>,
    actor_type: String,
    actor_id: Option<String>,
    correlation_id: Option<String>,
    occurred_at: String,
    payload: String,
}

impl TryFrom<Row> for Event {
    type Error = sqlx::Error;

    fn try_from(r: Row) -> Result<Event, sqlx::Error> {
        let payload = RawValue::from_string(r.payload)
            .map_err(|e| sqlx::Error::Decode(format!("event {} payload: {e}", r.id).into()))?;
        Ok(Event {
            id: r.id,
            tenant_id: r.tenant_id,
            seq: r.seq,
            event_type: r.event_type,
            version: r.version,
            source: r.source,
            subject: r.subject,
            actor_type: r.actor_type,
            actor_id: r.actor_id,
            correlation_id: r.correlation_id,
            occurred_at: r.occurred_at,
            payload,
        })
    }
}

/// Appends `events` to `tenant_id`'s sequence inside `tx`, in the given order.
///
/// The tenant's head row is moved up by the number of events first: that
/// statement locks the row until `tx` ends, so the next appender of this tenant
/// (another publisher, another instance) waits for this commit before it gets
/// its numbers. Hence seq order is commit order, and a reader that has seen
/// `seq = N` will never later find a smaller one appear.
pub async fn append(
    tx: &mut Tx,
    tenant_id: &str,
    events: &[NewEvent],
) -> Result<Vec<Appended>, sqlx::Error> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let count = events.len() as i64;
    let last: i64 = with_tx!(tx, conn => {
        sqlx::query_scalar(
            "INSERT INTO event_heads (tenant_id, last_seq) VALUES ($1, $2) \
             ON CONFLICT (tenant_id) DO UPDATE SET last_seq = event_heads.last_seq + $2 \
             RETURNING last_seq",
        )
        .bind(tenant_id)
        .bind(count)
        .fetch_one(&mut *conn)
        .await?
    });
    let first = last - count + 1;
    let occurred_at = timestamp::now_text();
    let appended: Vec<Appended> = (0..count)
        .map(|i| Appended {
            id: Uuid::now_v7().to_string(),
            seq: first + i,
        })
        .collect();
    match tx {
        Tx::Sqlite(t) => {
            // One statement for the batch: sqlx runs every SQLite statement on
            // the connection's worker thread, a hand-over each way, which per
            // row was most of a group commit's CPU. The rows travel as one JSON
            // array; each payload as a JSON string, so `->>` gives back its
            // exact text.
            let rows: Vec<_> = events
                .iter()
                .zip(&appended)
                .map(|(e, at)| {
                    (
                        &at.id,
                        &e.event_type,
                        e.version,
                        &e.source,
                        &e.subject,
                        &e.actor_type,
                        &e.actor_id,
                        &e.correlation_id,
                        &e.payload,
                    )
                })
                .collect();
            let rows =
                serde_json::to_string(&rows).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
            sqlx::query(
                "INSERT INTO events (id, tenant_id, seq, event_type, version, source, subject, \
                 actor_type, actor_id, correlation_id, occurred_at, payload) \
                 SELECT value ->> 0, $1, $2 + key, value ->> 1, value ->> 2, value ->> 3, value ->> 4, \
                        value ->> 5, value ->> 6, value ->> 7, $3, value ->> 8 \
                 FROM json_each($4)",
            )
            .bind(tenant_id)
            .bind(first)
            .bind(&occurred_at)
            .bind(rows)
            .execute(&mut **t)
            .await?;
        }
        Tx::Postgres(t) => {
            // One statement for the whole batch: a round trip per row would be
            // most of a group commit's time.
            let column =
                |f: fn(&NewEvent) -> Option<String>| events.iter().map(f).collect::<Vec<_>>();
            sqlx::query(
                "INSERT INTO events (id, tenant_id, seq, event_type, version, source, subject, \
                 actor_type, actor_id, correlation_id, occurred_at, payload) \
                 SELECT id, $2, seq, event_type, version, source, subject, actor_type, actor_id, \
                        correlation_id, $3, payload \
                 FROM UNNEST($1::text[], $4::bigint[], $5::text[], $6::int[], $7::text[], $8::text[], \
                             $9::text[], $10::text[], $11::text[], $12::text[]) \
                   AS e(id, seq, event_type, version, source, subject, actor_type, actor_id, \
                        correlation_id, payload)",
            )
            .bind(appended.iter().map(|a| a.id.clone()).collect::<Vec<_>>())
            .bind(tenant_id)
            .bind(&occurred_at)
            .bind(appended.iter().map(|a| a.seq).collect::<Vec<_>>())
            .bind(column(|e| Some(e.event_type.clone())))
            .bind(events.iter().map(|e| e.version).collect::<Vec<_>>())
            .bind(column(|e| Some(e.source.clone())))
            .bind(column(|e| e.subject.clone()))
            .bind(column(|e| Some(e.actor_type.clone())))
            .bind(column(|e| e.actor_id.clone()))
            .bind(column(|e| e.correlation_id.clone()))
            .bind(column(|e| Some(e.payload.clone())))
            .execute(&mut **t)
            .await?;
            // Other instances' readers and workers wake on this, at commit.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(super::NOTIFY_CHANNEL)
                .bind(tenant_id)
                .execute(&mut **t)
                .await?;
        }
    }
    Ok(appended)
}

/// Appends a group commit's events, tenant by tenant, on PostgreSQL in ONE
/// statement outside any explicit transaction: the heads of the batch's
/// tenants move up (locked in tenant order), the events go in, and the
/// notification goes out, all committed at once. One round trip instead of
/// five (BEGIN, head, insert, notify, COMMIT), and a head row stays locked
/// only for the statement and its commit, which is what bounds a tenant's
/// publish rate. Returns each group's events' places, in order.
pub async fn append_groups_pg(
    pool: &sqlx::PgPool,
    groups: &[(String, Vec<NewEvent>)],
) -> Result<Vec<Vec<Appended>>, sqlx::Error> {
    let mut tenants = Vec::with_capacity(groups.len());
    let mut counts = Vec::with_capacity(groups.len());
    let (mut ids, mut owners, mut places) = (Vec::new(), Vec::new(), Vec::<i64>::new());
    let (mut types, mut versions, mut sources, mut subjects) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut actor_types, mut actor_ids, mut correlations, mut payloads) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (tenant_id, events) in groups {
        tenants.push(tenant_id.as_str());
        counts.push(events.len() as i64);
        for (i, e) in events.iter().enumerate() {
            ids.push(Uuid::now_v7().to_string());
            owners.push(tenant_id.as_str());
            places.push(i as i64 + 1);
            types.push(e.event_type.as_str());
            versions.push(e.version);
            sources.push(e.source.as_str());
            subjects.push(e.subject.as_deref());
            actor_types.push(e.actor_type.as_str());
            actor_ids.push(e.actor_id.as_deref());
            correlations.push(e.correlation_id.as_deref());
            payloads.push(e.payload.as_str());
        }
    }
    // `stored` runs to completion though nothing reads it: PostgreSQL's rule
    // for data-modifying WITH.
    let heads: Vec<(String, i64)> = sqlx::query_as(
        "WITH counts AS (SELECT * FROM UNNEST($1::text[], $2::bigint[]) AS c(tenant_id, n)), \
         heads AS ( \
             INSERT INTO event_heads (tenant_id, last_seq) \
             SELECT tenant_id, n FROM counts ORDER BY tenant_id \
             ON CONFLICT (tenant_id) DO UPDATE SET last_seq = event_heads.last_seq + EXCLUDED.last_seq \
             RETURNING tenant_id, last_seq), \
         stored AS ( \
             INSERT INTO events (id, tenant_id, seq, event_type, version, source, subject, \
                                 actor_type, actor_id, correlation_id, occurred_at, payload) \
             SELECT e.id, e.tenant_id, h.last_seq - c.n + e.place, e.event_type, e.version, e.source, \
                    e.subject, e.actor_type, e.actor_id, e.correlation_id, $3, e.payload \
             FROM UNNEST($4::text[], $5::text[], $6::bigint[], $7::text[], $8::int[], $9::text[], \
                         $10::text[], $11::text[], $12::text[], $13::text[], $14::text[]) \
                  AS e(id, tenant_id, place, event_type, version, source, subject, actor_type, \
                       actor_id, correlation_id, payload) \
             JOIN heads h ON h.tenant_id = e.tenant_id JOIN counts c ON c.tenant_id = e.tenant_id \
             RETURNING 1) \
         SELECT h.tenant_id, h.last_seq FROM heads h \
         CROSS JOIN LATERAL (SELECT pg_notify($15, h.tenant_id)) AS woken",
    )
    .bind(&tenants)
    .bind(&counts)
    .bind(timestamp::now_text())
    .bind(&ids)
    .bind(&owners)
    .bind(&places)
    .bind(&types)
    .bind(&versions)
    .bind(&sources)
    .bind(&subjects)
    .bind(&actor_types)
    .bind(&actor_ids)
    .bind(&correlations)
    .bind(&payloads)
    .bind(super::NOTIFY_CHANNEL)
    .fetch_all(pool)
    .await?;
    let mut ids = ids.into_iter();
    groups
        .iter()
        .map(|(tenant_id, events)| {
            let last = heads
                .iter()
                .find(|(t, _)| t == tenant_id)
                .map(|(_, last)| *last)
                .ok_or_else(|| {
                    sqlx::Error::Protocol(format!("no head returned for tenant {tenant_id}"))
                })?;
            let first = last - events.len() as i64 + 1;
            Ok((0..events.len() as i64)
                .map(|i| Appended {
                    id: ids.next().unwrap_or_default(),
                    seq: first + i,
                })
                .collect())
        })
        .collect()
}

/// One event of `tenant_id` by id.
pub async fn get(db: &Db, tenant_id: &str, id: &str) -> Result<Option<Event>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM events WHERE tenant_id = $1 AND id = $2");
    let row: Option<Row> = with_db!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(id).fetch_optional(pool).await?
    });
    row.map(Event::try_from).transpose()
}

/// What a read from a position found.
#[derive(Debug)]
pub struct Batch {
    /// The events that pass the filter, in `seq` order.
    pub events: Vec<Event>,
    /// The last `seq` read (including events the filter left out): the
    /// position to read from next. Equal to `after_seq` when nothing was read.
    pub scanned_to: i64,
    /// Whether rows remain after `scanned_to` that this read did not look at.
    pub more: bool,
}

/// The events of `tenant_id` after `after_seq` that `filter` passes, at most
/// `limit`, in `seq` order; scans at most [`FILTER_SCAN_ROWS_MAX`] rows.
pub async fn read_after(
    db: &Db,
    tenant_id: &str,
    after_seq: i64,
    filter: &TypeFilter,
    limit: u32,
) -> Result<Batch, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM events WHERE tenant_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
    );
    let mut batch = Batch {
        events: Vec::new(),
        scanned_to: after_seq,
        more: false,
    };
    let mut scanned = 0u32;
    loop {
        let want = if filter.is_everything() {
            limit - batch.events.len() as u32
        } else {
            FILTER_SCAN_ROWS.min(FILTER_SCAN_ROWS_MAX - scanned)
        };
        let rows: Vec<Row> = with_db!(db, pool => {
            sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
                .bind(tenant_id)
                .bind(batch.scanned_to)
                .bind(i64::from(want))
                .fetch_all(pool)
                .await?
        });
        let full = rows.len() as u32 == want;
        scanned += rows.len() as u32;
        for row in rows {
            if batch.events.len() as u32 == limit {
                // The page is full: the rest of this round trip is read again next time.
                batch.more = true;
                return Ok(batch);
            }
            batch.scanned_to = row.seq;
            if filter.matches(&row.event_type) {
                batch.events.push(Event::try_from(row)?);
            }
        }
        if !full {
            return Ok(batch);
        }
        if batch.events.len() as u32 == limit || scanned >= FILTER_SCAN_ROWS_MAX {
            batch.more = true;
            return Ok(batch);
        }
    }
}

/// The last `seq` of `tenant_id` (0 before its first event).
pub async fn head(db: &Db, tenant_id: &str) -> Result<i64, sqlx::Error> {
    let last: Option<i64> = with_db!(db, pool => {
        sqlx::query_scalar("SELECT last_seq FROM event_heads WHERE tenant_id = $1")
            .bind(tenant_id)
            .fetch_optional(pool)
            .await?
    });
    Ok(last.unwrap_or(0))
}

// --- The NATS JetStream relay (relay.rs) -------------------------------------

/// A tenant with events the relay has not relayed yet.
#[derive(Debug, Clone, FromRow)]
pub struct RelayBacklog {
    /// The tenant.
    pub tenant_id: String,
    /// Its slug: the second token of its subjects.
    pub slug: String,
    /// Its last committed `seq`.
    pub last_seq: i64,
    /// How far the relay got; `None` before its first relay.
    pub relayed_seq: Option<i64>,
}

/// Tenants whose events are not all relayed, least recently relayed first (so
/// none waits behind busier ones), at most `limit`.
pub async fn relay_backlog(db: &Db, limit: u32) -> Result<Vec<RelayBacklog>, sqlx::Error> {
    Ok(with_db!(db, pool => {
        sqlx::query_as(
            "SELECT h.tenant_id, t.slug, h.last_seq, p.relayed_seq \
             FROM event_heads h \
             JOIN tenants t ON t.id = h.tenant_id \
             LEFT JOIN event_relay_positions p ON p.tenant_id = h.tenant_id \
             WHERE h.last_seq > COALESCE(p.relayed_seq, 0) \
             ORDER BY COALESCE(p.updated_at, ''), h.tenant_id \
             LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?
    }))
}

/// Events committed but not relayed yet, over every tenant.
pub async fn relay_lag(db: &Db) -> Result<i64, sqlx::Error> {
    Ok(with_db!(db, pool => {
        sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(h.last_seq - COALESCE(p.relayed_seq, 0)), 0) AS BIGINT) \
             FROM event_heads h LEFT JOIN event_relay_positions p ON p.tenant_id = h.tenant_id",
        )
        .fetch_one(pool)
        .await?
    }))
}

/// The relay's position for `tenant_id` (`None` before its first relay).
pub async fn relay_position(db: &Db, tenant_id: &str) -> Result<Option<i64>, sqlx::Error> {
    Ok(with_db!(db, pool => {
        sqlx::query_scalar("SELECT relayed_seq FROM event_relay_positions WHERE tenant_id = $1")
            .bind(tenant_id)
            .fetch_optional(pool)
            .await?
    }))
}

/// A tenant's relay position, held while one batch is relayed.
pub struct RelayClaim {
    /// On PostgreSQL, the transaction holding the position row locked.
    tx: Option<Tx>,
    /// The tenant.
    pub tenant_id: String,
    /// Every event up to this `seq` is relayed.
    pub relayed_seq: i64,
}

/// Takes `tenant_id`'s position for one batch, or `None` when another kernel
/// holds it (PostgreSQL). The position row is created first if missing.
///
/// On PostgreSQL the row stays locked (`FOR UPDATE SKIP LOCKED`) until
/// [`relay_advance`] or [`relay_release`]: of several kernels on one database
/// only one relays a tenant at a time, so its events reach the stream in `seq`
/// order; a kernel that dies mid-batch releases the lock with its connection.
/// SQLite serves one kernel, and a transaction held across the calls to NATS
/// would hold the database's only write lock: there the position is read
/// without one, and [`relay_advance`] only ever moves it up.
pub async fn relay_claim(
    db: &Db,
    tenant_id: &str,
    exists: bool,
) -> Result<Option<RelayClaim>, sqlx::Error> {
    if !exists {
        with_db!(db, pool => {
            sqlx::query(
                "INSERT INTO event_relay_positions (tenant_id, relayed_seq, updated_at) \
                 VALUES ($1, 0, $2) ON CONFLICT (tenant_id) DO NOTHING",
            )
            .bind(tenant_id)
            .bind(timestamp::now_text())
            .execute(pool)
            .await
            .map(|_| ())?
        });
    }
    match db {
        Db::Postgres(pool) => {
            let mut tx = pool.begin().await?;
            let position: Option<i64> = sqlx::query_scalar(
                "SELECT relayed_seq FROM event_relay_positions WHERE tenant_id = $1 \
                 FOR UPDATE SKIP LOCKED",
            )
            .bind(tenant_id)
            .fetch_optional(&mut *tx)
            .await?;
            match position {
                Some(relayed_seq) => Ok(Some(RelayClaim {
                    tx: Some(Tx::Postgres(tx)),
                    tenant_id: tenant_id.to_owned(),
                    relayed_seq,
                })),
                None => {
                    tx.rollback().await?;
                    Ok(None)
                }
            }
        }
        Db::Sqlite(_) => Ok(relay_position(db, tenant_id)
            .await?
            .map(|relayed_seq| RelayClaim {
                tx: None,
                tenant_id: tenant_id.to_owned(),
                relayed_seq,
            })),
    }
}

/// Moves the claimed position up to `relayed_seq` (never down) and lets it go.
pub async fn relay_advance(
    db: &Db,
    mut claim: RelayClaim,
    relayed_seq: i64,
) -> Result<(), sqlx::Error> {
    const SQL: &str = "UPDATE event_relay_positions SET relayed_seq = $2, updated_at = $3 \
                       WHERE tenant_id = $1 AND relayed_seq < $2";
    let now = timestamp::now_text();
    match claim.tx.take() {
        Some(mut tx) => {
            with_tx!(&mut tx, conn => {
                sqlx::query(SQL)
                    .bind(&claim.tenant_id)
                    .bind(relayed_seq)
                    .bind(&now)
                    .execute(&mut *conn)
                    .await
                    .map(|_| ())?
            });
            tx.commit().await
        }
        None => {
            with_db!(db, pool => {
                sqlx::query(SQL)
                    .bind(&claim.tenant_id)
                    .bind(relayed_seq)
                    .bind(&now)
                    .execute(pool)
                    .await
                    .map(|_| ())?
            });
            Ok(())
        }
    }
}

/// Lets the claimed position go unchanged.
pub async fn relay_release(mut claim: RelayClaim) -> Result<(), sqlx::Error> {
    match claim.tx.take() {
        Some(tx) => tx.rollback().await,
        None => Ok(()),
    }
}

/// Events deleted per statement by the retention purge (a bound on one
/// statement's locks and on how long it keeps SQLite's writer).
const PURGE_CHUNK_EVENTS: i64 = 10_000;

/// What bounds a tenant's purge: the positions of those still owed events,
/// and the tenant's oldest and newest events.
#[derive(FromRow)]
struct Floors {
    subscriptions: Option<i64>,
    pending: Option<i64>,
    relayed: Option<i64>,
    lowest: Option<i64>,
    head: Option<i64>,
}

/// Deletes `tenant_id`'s events that are older than `cutoff` and owed to no
/// one: every enabled subscription's cursor is past them, no pending delivery
/// (a retry beside the stream) names them, and, when `relay` is on, the NATS
/// relay has taken them. Returns how many were deleted.
///
/// It walks the tenant's events in `seq` order from the oldest, a chunk at a
/// time, and stops at the first chunk that keeps an event (one not yet older
/// than the cutoff): times follow `seq` order, so what comes after is newer.
/// No index on time is needed, and no more is read than is deleted plus a chunk.
pub async fn purge_tenant(
    db: &Db,
    tenant_id: &str,
    cutoff: &str,
    relay: bool,
) -> Result<u64, sqlx::Error> {
    let floors: Floors = with_db!(db, pool => {
        sqlx::query_as(
            "SELECT (SELECT MIN(delivered_seq) FROM webhook_subscriptions WHERE tenant_id = $1 AND enabled) \
                        AS subscriptions, \
                    (SELECT MIN(event_seq) - 1 FROM webhook_deliveries WHERE tenant_id = $1 AND status = 'pending') \
                        AS pending, \
                    (SELECT relayed_seq FROM event_relay_positions WHERE tenant_id = $1) AS relayed, \
                    (SELECT MIN(seq) FROM events WHERE tenant_id = $1) AS lowest, \
                    (SELECT last_seq FROM event_heads WHERE tenant_id = $1) AS head",
        )
        .bind(tenant_id)
        .fetch_one(pool)
        .await?
    });
    let (Some(lowest), Some(head)) = (floors.lowest, floors.head) else {
        return Ok(0);
    };
    let mut floor = head;
    for owed in [floors.subscriptions, floors.pending] {
        floor = floor.min(owed.unwrap_or(i64::MAX));
    }
    if relay {
        floor = floor.min(floors.relayed.unwrap_or(0));
    }
    let mut deleted = 0;
    let mut from = lowest - 1;
    while from < floor {
        let to = floor.min(from + PURGE_CHUNK_EVENTS);
        deleted += with_db!(db, pool => {
            sqlx::query("DELETE FROM events WHERE tenant_id = $1 AND seq > $2 AND seq <= $3 AND occurred_at < $4")
                .bind(tenant_id)
                .bind(from)
                .bind(to)
                .bind(cutoff)
                .execute(pool)
                .await?
                .rows_affected()
        });
        let kept: Option<i64> = with_db!(db, pool => {
            sqlx::query_scalar("SELECT seq FROM events WHERE tenant_id = $1 AND seq > $2 AND seq <= $3 LIMIT 1")
                .bind(tenant_id)
                .bind(from)
                .bind(to)
                .fetch_optional(pool)
                .await?
        });
        if kept.is_some() {
            break;
        }
        from = to;
    }
    Ok(deleted)
}

/// Tenants that have events, at most `limit`, after `after` in id order.
pub async fn tenants_with_events(
    db: &Db,
    after: &str,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    Ok(with_db!(db, pool => {
        sqlx::query_scalar("SELECT tenant_id FROM event_heads WHERE tenant_id > $1 ORDER BY tenant_id LIMIT $2")
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
    }))
}

/// Deletes finished webhook deliveries (and, by cascade, their attempts) last
/// changed before `cutoff`, at most [`PURGE_CHUNK_EVENTS`]; returns how many.
pub async fn purge_delivery_history(db: &Db, cutoff: &str) -> Result<u64, sqlx::Error> {
    Ok(with_db!(db, pool => {
        sqlx::query(
            "DELETE FROM webhook_deliveries WHERE id IN ( \
                 SELECT id FROM webhook_deliveries WHERE status <> 'pending' AND updated_at < $1 LIMIT $2)",
        )
        .bind(cutoff)
        .bind(PURGE_CHUNK_EVENTS)
        .execute(pool)
        .await?
        .rows_affected()
    }))
}

/// Events committed after the cursors of the enabled webhook subscriptions,
/// summed over subscriptions (what the delivery worker still has to look at,
/// matching its filters or not): the outbox's depth.
pub async fn outbox_depth(db: &Db) -> Result<i64, sqlx::Error> {
    let depth: Option<i64> = with_db!(db, pool => {
        sqlx::query_scalar(
            "SELECT CAST(SUM(h.last_seq - s.delivered_seq) AS BIGINT) FROM webhook_subscriptions s \
             JOIN event_heads h ON h.tenant_id = s.tenant_id WHERE s.enabled AND h.last_seq > s.delivered_seq",
        )
        .fetch_one(pool)
        .await?
    });
    Ok(depth.unwrap_or(0))
}
