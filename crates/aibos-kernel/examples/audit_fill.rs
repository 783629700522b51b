//! Fills the system tenant's audit chain with N entries (bulk, already hashed)
//! and writes their canonical forms, one per line, to FILE: the bytes that
//! `sha256sum` hashes as the anchor of `bench/audit_verify.sh`.
//!
//!     cargo run --release -p aibos-kernel --example audit_fill -- sqlite://x.db 1000000 canonical.txt

mod support;

use std::io::Write;

use aibos_kernel::audit::{chain, store};
use aibos_kernel::config::{Config, ConfigSources};
use aibos_kernel::db::{Db, migrate};
use aibos_kernel::identity::SYSTEM_TENANT_ID;

/// Entries committed per transaction.
const BATCH_ENTRIES: usize = 20_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (url, count, out) = match (
        args.get(1),
        args.get(2).and_then(|n| n.parse::<i64>().ok()),
        args.get(3),
    ) {
        (Some(u), Some(n), Some(o)) => (u.clone(), n, o.clone()),
        _ => return Err("usage: audit_fill DATABASE_URL COUNT OUTPUT_FILE".into()),
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
    let mut file = std::io::BufWriter::new(std::fs::File::create(&out)?);
    let target = seq + count;
    while seq < target {
        let mut batch = Vec::with_capacity(BATCH_ENTRIES);
        while seq < target && batch.len() < BATCH_ENTRIES {
            seq += 1;
            let e = support::chained_entry(seq, &prev);
            writeln!(file, "{}", chain::canonical_form(&e))?;
            prev.clone_from(&e.hash);
            batch.push(e);
        }
        db.write(move |tx| {
            Box::pin(async move {
                store::append_verbatim(tx, &batch)
                    .await
                    .map_err(aibos_kernel::db::DbError::Query)
            })
        })
        .await?;
    }
    file.flush()?;
    db.close().await;
    println!("{seq}");
    Ok(())
}
