//! A client hanging up mid-request cuts nothing in half: every change has its
//! audit entry and no pooled connection is left inside a transaction.

use std::time::Duration;

use aibos_kernel::db::Db;
use aibos_testkit::spawn_kernel;
use reqwest::Method;

crate::both_engines! {
    async fn aborted_requests_leave_changes_and_audit_entries_together(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let admin = kernel.platform_admin().await;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..60u64 {
            let client = reqwest::Client::builder().timeout(Duration::from_micros(300 + i * 97)).build().unwrap();
            let request = client
                .request(Method::POST, kernel.url("/api/kernel/roles"))
                .bearer_auth(&admin.access_token)
                .json(&serde_json::json!({ "name": format!("role-{i}"), "permissions": ["kernel.user.read"] }));
            tasks.spawn(async move { request.send().await.map(|r| r.status().as_u16()) });
        }
        let mut aborted = 0;
        while let Some(result) = tasks.join_next().await {
            if result.unwrap().is_err() {
                aborted += 1;
            }
        }
        assert!(aborted > 0, "some requests were cut off by their client");

        // Detached transactions finish on their own; wait (bounded) until the counts settle.
        let db = kernel.state.db();
        let counts = || async {
            let roles: i64 = aibos_kernel::with_db!(db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM roles WHERE name LIKE 'role-%'").fetch_one(pool).await.unwrap());
            let entries: i64 = aibos_kernel::with_db!(db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'role.created'").fetch_one(pool).await.unwrap());
            (roles, entries)
        };
        let mut last = counts().await;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            let now = counts().await;
            if now == last {
                break;
            }
            last = now;
        }
        let (roles, entries) = last;
        assert_eq!(roles, entries, "every role has its audit entry and no entry lacks its role");
        let v = aibos_kernel::audit::store::verify_tenant(db, aibos_kernel::identity::SYSTEM_TENANT_ID, None).await.unwrap();
        assert!(v.valid, "{v:?}");

        if let Db::Postgres(pool) = db {
            let stuck: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'")
                .fetch_one(pool).await.unwrap();
            assert_eq!(stuck, 0, "no pooled connection is left inside a transaction");
        }
        // The pool still serves: a normal request works.
        assert_eq!(kernel.as_(&admin, Method::GET, "/api/kernel/roles").send().await.unwrap().status(), 200);
    }
}
