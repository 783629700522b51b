//! A quick in-process load on SQLite (or PostgreSQL): `CLIENTS` concurrent
//! clients post payments through the store (no HTTP) for `SECONDS`, then the
//! rate, the latency percentiles and the ledger's balance are printed. It
//! shows what the writer path alone allows, before and after a change to it;
//! `bench/payments.sh` measures the real service end to end.
//!
//! `cargo run -p payment-hub --example sqlite_payments_load [clients] [seconds]`
//!
//! With `AIBOS_LOAD_ENGINE=postgres` it runs on a fresh database created on
//! the server of `AIBOS_TEST_DATABASE_URL` (dropped afterwards). With
//! `AIBOS_LOAD_ACCOUNTS=n` every payment goes between two random accounts of
//! `n` (as `bench/payments.sh` does: contended rows, opposite payments)
//! instead of each client's own pair. `AIBOS_LOAD_CONNECTIONS` sizes the
//! PostgreSQL pool.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection;

use payment_hub::db::Db;
use payment_hub::model::{AccountCommand, PaymentCommand};
use payment_hub::store::{self, Caller, Written};

/// Clients when none is given: the figure `bench/payments.sh` uses.
const CLIENTS_DEFAULT: usize = 100;
/// Seconds of load when none is given.
const SECONDS_DEFAULT: u64 = 10;
/// Readers beside the writer, as the hub's default pool.
const READERS: u32 = 16;
/// PostgreSQL connections: the hub's default pool, unless
/// `AIBOS_LOAD_CONNECTIONS` says otherwise.
const POSTGRES_CONNECTIONS: u32 = 8;
/// Latency samples kept per client (a bound on the example's memory).
const SAMPLES_PER_CLIENT_MAX: usize = 100_000;

/// `url` with its database path replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| i + scheme_end);
    let mut out = format!("{}/{}", &base[..path_start], name);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

fn caller(tenant: &str) -> Caller {
    Caller {
        tenant_id: tenant.to_owned(),
        actor: "load".to_owned(),
        correlation_id: uuid::Uuid::now_v7().to_string(),
    }
}

async fn open(db: &Db, tenant: &str, name: &str, balance: i64) -> String {
    let command = AccountCommand {
        name: name.to_owned(),
        currency: "EUR".to_owned(),
        opening_balance_minor: balance,
    };
    match store::open_account(db, caller(tenant), None, command).await {
        Ok(Written::Created(view) | Written::Replayed(view)) => view.id,
        Err(error) => panic!("opening {name}: {error}"),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let clients: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(CLIENTS_DEFAULT);
    let seconds: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(SECONDS_DEFAULT);
    let dir = tempfile::tempdir().expect("temp dir");
    let postgres = std::env::var("AIBOS_LOAD_ENGINE").as_deref() == Ok("postgres");
    let mut scratch = None;
    let db = if postgres {
        let admin = std::env::var("AIBOS_TEST_DATABASE_URL").expect("AIBOS_TEST_DATABASE_URL");
        let name = format!("payment_hub_load_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin).await.expect("connect");
        // Our own prefix and a hex UUID: nothing to inject.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .expect("create database");
        let connections = std::env::var("AIBOS_LOAD_CONNECTIONS")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(POSTGRES_CONNECTIONS);
        let db = Db::connect(&with_database(&admin, &name), connections)
            .await
            .expect("database");
        scratch = Some((conn, name));
        db
    } else {
        let url = format!("sqlite://{}", dir.path().join("hub.db").display());
        Db::connect(&url, READERS).await.expect("database")
    };
    let tenant = uuid::Uuid::now_v7().to_string();
    let shared: usize = std::env::var("AIBOS_LOAD_ACCOUNTS")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    // One payer and one payee per client, as independent customers would be;
    // or, with shared accounts, every client draws from all of them.
    let mut accounts = Vec::new();
    for i in 0..shared {
        accounts.push(open(&db, &tenant, &format!("shared {i}"), 1_000_000_000).await);
    }
    let accounts = Arc::new(accounts);
    let mut pairs = Vec::with_capacity(clients);
    for i in 0..clients {
        if shared >= 2 {
            pairs.push((String::new(), String::new()));
            continue;
        }
        let payer = open(&db, &tenant, &format!("payer {i}"), 1_000_000_000).await;
        let payee = open(&db, &tenant, &format!("payee {i}"), 0).await;
        pairs.push((payer, payee));
    }
    let commits_before = db.group_commits();
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::with_capacity(clients);
    for (client, (payer, payee)) in pairs.into_iter().enumerate() {
        let (db, tenant, done, failed) = (db.clone(), tenant.clone(), done.clone(), failed.clone());
        let accounts = accounts.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            // xorshift64, seeded per client: reproducible draws, no dependency.
            let mut seed = 0x9E37_79B9_7F4A_7C15_u64 ^ (client as u64 + 1);
            let mut draw = move |bound: usize| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % bound as u64) as usize
            };
            let mut latencies = Vec::with_capacity(1024);
            while Instant::now() < deadline {
                n += 1;
                let (payer, payee) = if accounts.len() >= 2 {
                    let from = draw(accounts.len());
                    let to = (from + 1 + draw(accounts.len() - 1)) % accounts.len();
                    (accounts[from].clone(), accounts[to].clone())
                } else {
                    (payer.clone(), payee.clone())
                };
                let command = PaymentCommand {
                    amount_minor: 1,
                    currency: "EUR".to_owned(),
                    payer_account: payer,
                    payee_account: payee,
                    reference: "load".to_owned(),
                };
                let key = format!("load-{client}-{n}");
                let sent = Instant::now();
                match store::process_payment(&db, caller(&tenant), key, command).await {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                if latencies.len() < SAMPLES_PER_CLIENT_MAX {
                    latencies.push(sent.elapsed());
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("client"));
    }
    latencies.sort_unstable();
    let percentile = |p: usize| {
        latencies
            .get((latencies.len() * p / 100).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let elapsed = started.elapsed().as_secs_f64();
    let done = done.load(Ordering::Relaxed);
    let balance = store::trial_balance(&db, &tenant)
        .await
        .expect("trial balance");
    let commits = match (commits_before, db.group_commits()) {
        (Some(before), Some(after)) => format!("{}", after - before),
        _ => "n/a".to_owned(),
    };
    println!(
        "engine={} clients={clients} shared_accounts={shared} seconds={elapsed:.1} payments={done} failed={} payments_per_s={:.0} p50_ms={:.1} p95_ms={:.1} p99_ms={:.1} commits={commits} balanced={}",
        if postgres { "postgres" } else { "sqlite" },
        failed.load(Ordering::Relaxed),
        done as f64 / elapsed,
        percentile(50),
        percentile(95),
        percentile(99),
        balance.balanced
    );
    db.close().await;
    if let Some((mut conn, name)) = scratch {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await
        .expect("drop database");
    }
}
