//! Fills a kernel database for `bench/backup.sh`: N audit entries in the
//! system tenant's chain (bulk, already hashed) and M events, committed in
//! large batches.
//!
//!     cargo run --release -p aibos-kernel --example backup_fill -- sqlite://x.db 1000000 1000000

mod support;

use aibos_kernel::audit::{chain, store};
use aibos_kernel::config::{Config, ConfigSources};
use aibos_kernel::db::{Db, DbError, migrate};
use aibos_kernel::events::NewEvent;
use aibos_kernel::identity::SYSTEM_TENANT_ID;

/// Rows committed per transaction.
const BATCH_ROWS: usize = 20_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (url, entries, events) = match (
        args.get(1),
        args.get(2).and_then(|n| n.parse::<i64>().ok()),
        args.get(3).and_then(|n| n.parse::<usize>().ok()),
    ) {
        (Some(u), Some(n), Some(m)) => (u.clone(), n, m),
        _ => return Err("usage: backup_fill DATABASE_URL AUDIT_ENTRIES EVENTS".into()),
    };
    let dir = std::env::current_dir()?;
    let config = Config::load(&ConfigSources::new(
        dir,
        [("AIBOS_DATABASE__URL".to_owned(), url)],
    ))?;
    let db = Db::connect(&config.database).await?;
    migrate::up(&db, migrate::embedded(db.engine())).await?;

    let (mut seq, mut prev) = store::head(&db, SYSTEM_TENANT_ID)
        .await?
        .unwrap_or((0, chain::GENESIS_HASH.to_owned()));
    let target = seq + entries;
    while seq < target {
        let mut batch = Vec::with_capacity(BATCH_ROWS);
        while seq < target && batch.len() < BATCH_ROWS {
            seq += 1;
            let e = support::chained_entry(seq, &prev);
            prev.clone_from(&e.hash);
            batch.push(e);
        }
        db.write(move |tx| {
            Box::pin(async move {
                store::append_verbatim(tx, &batch)
                    .await
                    .map_err(DbError::Query)
            })
        })
        .await?;
    }

    let mut written = 0;
    while written < events {
        let size = BATCH_ROWS.min(events - written);
        let batch: Vec<NewEvent> = (written..written + size)
            .map(|n| NewEvent {
                event_type: "finance.payment.processed".to_owned(),
                version: 1,
                source: "payment-hub".to_owned(),
                subject: Some(uuid::Uuid::now_v7().to_string()),
                actor_type: "service".to_owned(),
                actor_id: Some(uuid::Uuid::now_v7().to_string()),
                correlation_id: Some(uuid::Uuid::now_v7().to_string()),
                payload: format!(
                    r#"{{"payment_id":"{}","amount_minor":{},"currency":"EUR","status":"completed"}}"#,
                    uuid::Uuid::now_v7(),
                    n * 3
                ),
            })
            .collect();
        db.write(move |tx| {
            Box::pin(async move {
                aibos_kernel::events::store::append(tx, SYSTEM_TENANT_ID, &batch)
                    .await
                    .map(|_| ())
                    .map_err(DbError::Query)
            })
        })
        .await?;
        written += size;
    }
    db.close().await;
    println!("{seq} audit entries, {written} events");
    Ok(())
}
