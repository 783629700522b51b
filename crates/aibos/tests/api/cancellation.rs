//! A client hanging up mid-request cuts nothing in half: every change has its
//! audit entry and no pooled connection is left inside a transaction.

use std::time::{Duration, Instant};

use aibos_kernel::db::{Db, Tx};
use aibos_testkit::{TestKernel, spawn_kernel};
use reqwest::Method;

/// `(roles named role-…, role.created entries)` now.
async fn counts(kernel: &TestKernel) -> (i64, i64) {
    let db = kernel.state.db();
    let roles: i64 = aibos_kernel::with_db!(db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM roles WHERE name LIKE 'role-%'").fetch_one(pool).await.unwrap());
    let entries: i64 = aibos_kernel::with_db!(db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'role.created'").fetch_one(pool).await.unwrap());
    (roles, entries)
}

/// [`counts`] once they stop changing (detached transactions finish on their
/// own; bounded wait).
async fn settled_counts(kernel: &TestKernel) -> (i64, i64) {
    let counts = || counts(kernel);
    let mut last = counts().await;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let now = counts().await;
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// Sends `POST /api/kernel/roles` for `role-{i}` with a client that gives up
/// after `timeout`; `Ok(status)` or `Err(())` when the client hung up.
fn create_role_impatiently(
    kernel: &TestKernel,
    token: &str,
    i: u64,
    timeout: Duration,
) -> impl Future<Output = Result<u16, ()>> + use<> {
    let client = reqwest::Client::builder().timeout(timeout).build().unwrap();
    let request = client
        .request(Method::POST, kernel.url("/api/kernel/roles"))
        .bearer_auth(token)
        .json(&serde_json::json!({ "name": format!("role-{i}"), "permissions": ["kernel.user.read"] }));
    async move {
        request
            .send()
            .await
            .map(|r| r.status().as_u16())
            .map_err(|_| ())
    }
}

/// Takes the write path the kernel's role creation needs, on a connection of
/// the test's own: SQLite's one write lock (`BEGIN IMMEDIATE`), or on
/// PostgreSQL a lock on `roles` that lets reads through but no insert.
async fn hold_role_writes(db: &Db) -> Tx {
    let mut tx = db.begin().await.unwrap();
    if let Tx::Postgres(t) = &mut tx {
        sqlx::query("LOCK TABLE roles IN EXCLUSIVE MODE")
            .execute(&mut **t)
            .await
            .unwrap();
    }
    tx
}

crate::both_engines! {
    async fn aborted_requests_leave_changes_and_audit_entries_together(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let admin = kernel.platform_admin().await;
        // Warm the caller's principal into the cache: the requests below then
        // read nothing the held lock could stop before their handler writes.
        assert_eq!(kernel.as_(&admin, Method::GET, "/api/kernel/roles").send().await.unwrap().status(), 200);

        // 1. Aborts that land inside the handler, for certain: while the test
        // holds the write lock no role can be written, so every request is
        // still in its handler (waiting in `Db::write`) when its client hangs
        // up. Released afterwards, each change commits whole, with its entry:
        // the transaction runs detached from the request.
        let held = hold_role_writes(kernel.state.db()).await;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..6u64 {
            let request = create_role_impatiently(&kernel, &admin.access_token, i, Duration::from_millis(400));
            tasks.spawn(async move { (i, request.await) });
        }
        let mut hung_up = 0;
        while let Some(joined) = tasks.join_next().await {
            let (i, result) = joined.unwrap();
            assert!(result.is_err(), "role-{i} cannot have been answered while its write was held: {result:?}");
            hung_up += 1;
        }
        assert_eq!(hung_up, 6);
        held.rollback().await.unwrap();
        // SQLite's busy handler retries every 100 ms by now: wait for the
        // expected count (bounded) rather than for the counts to stand still.
        let deadline = Instant::now() + Duration::from_secs(10);
        while counts(&kernel).await != (6, 6) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(counts(&kernel).await, (6, 6), "each of the six hung-up requests had reached its handler and committed whole after its client left");

        // 2. Aborts at every moment of a request, from before the handler to
        // after the commit: clients that give up after a tenth of what one
        // lone request takes here up to fifty times as long (sixty at once
        // take turns on the machine's cores).
        let started = Instant::now();
        assert_eq!(create_role_impatiently(&kernel, &admin.access_token, 99, Duration::from_secs(10)).await, Ok(201));
        let whole = started.elapsed();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 100..160u64 {
            let request = create_role_impatiently(&kernel, &admin.access_token, i, whole.mul_f64(1.12f64.powi(i as i32 - 125)));
            tasks.spawn(request);
        }
        let (mut aborted, mut answered) = (0, 0);
        while let Some(result) = tasks.join_next().await {
            match result.unwrap() {
                Ok(_) => answered += 1,
                Err(()) => aborted += 1,
            }
        }
        assert!(aborted > 0 && answered > 0, "some requests were cut off by their client, some answered: {aborted} and {answered}");
        let (roles, entries) = settled_counts(&kernel).await;
        assert_eq!(roles, entries, "every role has its audit entry and no entry lacks its role");
        let db = kernel.state.db();
        let v = aibos_kernel::audit::store::verify_tenant(db, aibos_kernel::identity::SYSTEM_TENANT_ID, None).await.unwrap();
        assert!(v.valid, "{v:?}");

        // 3. No transaction was left open by a hung-up request.
        match db {
            Db::Postgres(pool) => {
                let stuck: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'")
                    .fetch_one(pool).await.unwrap();
                assert_eq!(stuck, 0, "no pooled connection is left inside a transaction");
            }
            Db::Sqlite(_) => {
                // A leaked transaction would hold SQLite's one write lock for
                // ever: a connection of its own takes it within two seconds.
                // Not at once: a hung-up request's detached write may still be
                // asleep in SQLite's busy handler (up to 100 ms between
                // tries) after the counts looked settled, and take the lock
                // for a moment after the test looked.
                use sqlx::Connection as _;
                let options = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(kernel.db.url()).unwrap()
                    .busy_timeout(Duration::from_secs(2));
                let mut other = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
                sqlx::query("BEGIN IMMEDIATE").execute(&mut other).await.expect("the write lock is free: no transaction was left open");
                sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
                other.close().await.unwrap();
            }
        }
        // The kernel writes at once (a held lock would make it wait out its busy timeout).
        let started = Instant::now();
        let response = kernel.as_(&admin, Method::POST, "/api/kernel/roles")
            .json(&serde_json::json!({ "name": "after-the-aborts", "permissions": ["kernel.user.read"] })).send().await.unwrap();
        assert_eq!(response.status(), 201);
        assert!(started.elapsed() < Duration::from_secs(2), "the write took {:?}", started.elapsed());
    }
}
