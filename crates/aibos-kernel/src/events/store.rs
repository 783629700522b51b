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
            // In-process: one prepared statement per row costs no round trip.
            for (event, at) in events.iter().zip(&appended) {
                sqlx::query(
                    "INSERT INTO events (id, tenant_id, seq, event_type, version, source, subject, \
                     actor_type, actor_id, correlation_id, occurred_at, payload) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                )
                .bind(&at.id)
                .bind(tenant_id)
                .bind(at.seq)
                .bind(&event.event_type)
                .bind(event.version)
                .bind(&event.source)
                .bind(&event.subject)
                .bind(&event.actor_type)
                .bind(&event.actor_id)
                .bind(&event.correlation_id)
                .bind(&occurred_at)
                .bind(&event.payload)
                .execute(&mut **t)
                .await?;
            }
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
