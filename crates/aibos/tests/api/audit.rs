//! The audit trail: append-only, tamper-evident, checkpointed, concurrent.

use std::path::Path;

use aibos_kernel::audit::{AuditContext, AuditEvent, chain};
use aibos_kernel::db::Db;
use aibos_kernel::identity::SYSTEM_TENANT_ID;
use aibos_testkit::api::PASSWORD;
use aibos_testkit::process::KernelProcess;
use aibos_testkit::{Engine, TestKernel, spawn_kernel};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use reqwest::Method;

const BINARY: &str = env!("CARGO_BIN_EXE_aibos");

async fn write_entries(kernel: &TestKernel, tenant: &str, n: usize) {
    for i in 0..n {
        let event = AuditEvent::new("test.written")
            .details(serde_json::json!({ "n": i, "note": "naïve ✓" }));
        kernel
            .state
            .audit_alone(AuditContext::system(tenant), event)
            .await
            .unwrap();
    }
}

async fn exec(db: &Db, sql: &str) -> Result<u64, sqlx::Error> {
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    match db {
        Db::Sqlite(aibos_kernel::db::SqliteDb { pool, .. }) => sqlx::raw_sql(sql)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()),
        Db::Postgres(pool) => sqlx::raw_sql(sql)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()),
    }
}

async fn drop_triggers(db: &Db) {
    let sql = match db {
        Db::Sqlite(_) => "DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete;",
        Db::Postgres(_) => {
            "DROP TRIGGER audit_log_no_update_delete ON audit_log; DROP TRIGGER audit_log_no_truncate ON audit_log;"
        }
    };
    exec(db, sql).await.unwrap();
}

/// `aibos audit verify --json` against the kernel's database: (exit code, report).
fn cli_verify(kernel: &TestKernel, extra: &[&str]) -> (i32, serde_json::Value) {
    let out = cli_verify_output(kernel, extra);
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), report)
}

/// `aibos audit verify --json` against the kernel's database, as it ran.
fn cli_verify_output(kernel: &TestKernel, extra: &[&str]) -> std::process::Output {
    let cwd = tempfile::tempdir().unwrap();
    let mut args = vec!["audit", "verify", "--json"];
    args.extend_from_slice(extra);
    std::process::Command::new(BINARY)
        .args(&args)
        .current_dir(cwd.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AIBOS_DATABASE__URL", kernel.db.url())
        .output()
        .unwrap()
}

fn system_report(report: &serde_json::Value) -> serde_json::Value {
    report["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant_id"] == SYSTEM_TENANT_ID)
        .cloned()
        .unwrap()
}

async fn entries(db: &Db) -> Vec<aibos_kernel::audit::AuditEntry> {
    aibos_kernel::audit::store::list(db, SYSTEM_TENANT_ID, &Default::default(), 0, 1000)
        .await
        .unwrap()
}

crate::both_engines! {
    async fn the_database_refuses_to_update_or_delete_audit_entries(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        write_entries(&kernel, SYSTEM_TENANT_ID, 3).await;
        let db = kernel.state.db();
        for sql in ["UPDATE audit_log SET action = 'x.edited' WHERE seq = 1", "DELETE FROM audit_log WHERE seq = 2", "DELETE FROM audit_log"] {
            let err = exec(db, sql).await.expect_err(sql);
            assert!(err.to_string().contains("append-only"), "{sql}: {err}");
        }
        if engine == Engine::Postgres {
            let err = exec(db, "TRUNCATE audit_log").await.unwrap_err();
            assert!(err.to_string().contains("append-only"), "{err}");
            // ENABLE ALWAYS: replica mode does not switch the triggers off.
            let err = exec(db, "SET session_replication_role = replica; DELETE FROM audit_log;").await.unwrap_err();
            assert!(err.to_string().contains("append-only"), "{err}");
        }
        assert_eq!(entries(db).await.len(), 3);
        let (code, report) = cli_verify(&kernel, &[]);
        assert_eq!(code, 0, "{report}");
    }

    async fn tampering_is_found_and_named_by_its_first_seq(engine: Engine) {
        // (name, SQL run with the triggers dropped, first bad seq)
        let scenarios: [(&str, &str, i64); 4] = [
            ("edited", "UPDATE audit_log SET details = '{\"n\":99}' WHERE seq = 3", 3),
            ("deleted", "DELETE FROM audit_log WHERE seq = 3", 3),
            ("swapped", "UPDATE audit_log SET seq = 1002 WHERE seq = 2; UPDATE audit_log SET seq = 2 WHERE seq = 3; UPDATE audit_log SET seq = 3 WHERE seq = 1002;", 2),
            ("tail removed", "DELETE FROM audit_log WHERE seq >= 5", 5),
        ];
        for (name, sql, first_bad) in scenarios {
            let kernel = spawn_kernel(engine).await.unwrap();
            write_entries(&kernel, SYSTEM_TENANT_ID, 6).await;
            drop_triggers(kernel.state.db()).await;
            exec(kernel.state.db(), sql).await.unwrap();
            let (code, report) = cli_verify(&kernel, &["--tenant", "system"]);
            assert_eq!(code, 1, "{name}: {report}");
            assert_eq!(system_report(&report)["first_bad_seq"], first_bad, "{name}: {report}");
        }

        // An inserted entry, made consistent with its predecessor: the next one no longer links.
        let kernel = spawn_kernel(engine).await.unwrap();
        write_entries(&kernel, SYSTEM_TENANT_ID, 6).await;
        let db = kernel.state.db();
        drop_triggers(db).await;
        let all = entries(db).await;
        exec(db, "UPDATE audit_log SET seq = seq + 100 WHERE seq >= 4").await.unwrap();
        exec(db, "UPDATE audit_log SET seq = seq - 99 WHERE seq >= 100").await.unwrap();
        let mut forged = all[2].clone();
        forged.id = uuid::Uuid::now_v7().to_string();
        forged.seq = 4;
        forged.action = "payment.approved".into();
        forged.prev_hash = all[2].hash.clone();
        forged.hash = chain::compute_hash(&forged);
        let insert = format!(
            "INSERT INTO audit_log (id, tenant_id, seq, occurred_at, actor_type, actor_id, action, resource_type, resource_id, outcome, severity, client_ip, user_agent, correlation_id, details, prev_hash, hash) \
             VALUES ('{}', '{}', 4, '{}', 'system', NULL, '{}', NULL, NULL, 'success', 'info', NULL, NULL, NULL, '{}', '{}', '{}')",
            forged.id, SYSTEM_TENANT_ID, forged.occurred_at, forged.action, forged.details, forged.prev_hash, forged.hash
        );
        exec(db, &insert).await.unwrap();
        let (code, report) = cli_verify(&kernel, &["--tenant", "system"]);
        assert_eq!(code, 1, "{report}");
        assert_eq!(system_report(&report)["first_bad_seq"], 5, "{report}");
    }

    async fn a_signed_checkpoint_catches_a_chain_rewritten_with_fresh_hashes(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        write_entries(&kernel, SYSTEM_TENANT_ID, 5).await;
        let db = kernel.state.db();
        let key = aibos_kernel::identity::admin::checkpoint_key(db, kernel.state.master_keys()).await.unwrap();
        let checkpoint = aibos_kernel::audit::checkpoint::make(db, &key, SYSTEM_TENANT_ID).await.unwrap();
        assert_eq!(checkpoint.seq, 5);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), serde_json::to_string(&checkpoint).unwrap()).unwrap();
        let path = file.path().to_string_lossy().into_owned();
        write_entries(&kernel, SYSTEM_TENANT_ID, 2).await;
        let (code, report) = cli_verify(&kernel, &["--checkpoint", &path]);
        assert_eq!(code, 0, "later entries do not disturb an earlier checkpoint: {report}");

        // A DBA edits entry 3 and recomputes every hash from there on.
        drop_triggers(db).await;
        let mut all = entries(db).await;
        all[2].details = serde_json::json!({ "n": 1000 });
        for i in 2..all.len() {
            if i > 2 {
                all[i].prev_hash = all[i - 1].hash.clone();
            }
            all[i].hash = chain::compute_hash(&all[i]);
            let sql = format!("UPDATE audit_log SET details = '{}', prev_hash = '{}', hash = '{}' WHERE tenant_id = '{}' AND seq = {}", all[i].details, all[i].prev_hash, all[i].hash, SYSTEM_TENANT_ID, all[i].seq);
            exec(db, &sql).await.unwrap();
        }
        exec(db, &format!("UPDATE audit_heads SET hash = '{}' WHERE tenant_id = '{}'", all.last().unwrap().hash, SYSTEM_TENANT_ID)).await.unwrap();
        let (code, report) = cli_verify(&kernel, &["--tenant", "system"]);
        assert_eq!(code, 0, "the rewritten chain is self-consistent: {report}");
        let (code, report) = cli_verify(&kernel, &["--checkpoint", &path]);
        assert_eq!(code, 1, "{report}");
        assert_eq!(report["valid"], false);
        assert!(report["reason"].as_str().unwrap().contains("differs from the checkpoint"), "{report}");

        // A checkpoint whose signature does not match its content is refused too.
        let mut forged = checkpoint.clone();
        forged.head_hash = all[4].hash.clone();
        std::fs::write(file.path(), serde_json::to_string(&forged).unwrap()).unwrap();
        let (code, _) = cli_verify(&kernel, &["--checkpoint", &path]);
        assert_eq!(code, 1);
    }

    async fn a_checkpoint_verifies_under_a_pinned_key_and_a_forger_s_stored_key_does_not_pass_it(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        write_entries(&kernel, SYSTEM_TENANT_ID, 3).await;
        let db = kernel.state.db();
        let key = aibos_kernel::identity::admin::checkpoint_key(db, kernel.state.master_keys()).await.unwrap();
        let checkpoint = aibos_kernel::audit::checkpoint::make(db, &key, SYSTEM_TENANT_ID).await.unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), serde_json::to_string(&checkpoint).unwrap()).unwrap();
        let path = file.path().to_string_lossy().into_owned();

        // The auditor pinned the kernel's key as published: the JWK, its `x`, or hex.
        let jwks: serde_json::Value = kernel.client.get(kernel.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
        let jwk = jwks["keys"].as_array().unwrap().iter().find(|k| k["kid"] == key.kid.as_str()).unwrap().clone();
        let hex: String = key.public.iter().map(|b| format!("{b:02x}")).collect();
        for pin in [jwk.to_string(), jwk["x"].as_str().unwrap().to_owned(), hex] {
            let (code, report) = cli_verify(&kernel, &["--checkpoint", &path, &format!("--public-key={pin}")]);
            assert_eq!(code, 0, "{pin}: {report}");
            assert_eq!(report["valid"], true);
        }

        // Another key: refused with a clear message.
        let other = aibos_kernel::identity::tokens::StoredKey::generate();
        let out = cli_verify_output(&kernel, &["--checkpoint", &path, &format!("--public-key={}", other.public_text())]);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("does not verify under the pinned public key"), "{stderr}");
        let out = cli_verify_output(&kernel, &["--checkpoint", &path, "--public-key=not-a-key"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("--public-key"));

        // A forger with database write access stores a key of their own and signs
        // a checkpoint of the (rewritten) chain with it, naming their key in the file.
        let forger = aibos_kernel::identity::tokens::StoredKey::generate();
        let insert = format!(
            "INSERT INTO signing_keys (kid, algorithm, private_key, public_key, status, created_at) VALUES ('{}', 'EdDSA', 'x', '{}', 'retired', '{}')",
            forger.kid, forger.public_text(), aibos_kernel::timestamp::now_text()
        );
        exec(db, &insert).await.unwrap();
        let forged = aibos_kernel::audit::checkpoint::make(db, &forger, SYSTEM_TENANT_ID).await.unwrap();
        std::fs::write(file.path(), serde_json::to_string(&forged).unwrap()).unwrap();
        let (code, report) = cli_verify(&kernel, &["--checkpoint", &path]);
        assert_eq!(code, 0, "without a pin, a key stored in the database is trusted: {report}");
        let out = cli_verify_output(&kernel, &["--checkpoint", &path, &format!("--public-key={jwk}")]);
        assert_eq!(out.status.code(), Some(1), "the pinned key refuses the forgery");
    }

    async fn audit_pages_never_skip_or_repeat_and_filters_apply(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let admin = kernel.platform_admin().await;
        write_entries(&kernel, SYSTEM_TENANT_ID, 11).await;
        let all = kernel.audit(&admin, "").await;
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor { Some(c) => format!("/api/kernel/audit?limit=3&cursor={c}"), None => "/api/kernel/audit?limit=3".to_owned() };
            let page: serde_json::Value = kernel.as_(&admin, Method::GET, &path).send().await.unwrap().json().await.unwrap();
            seen.extend(page["items"].as_array().unwrap().iter().map(|e| e["seq"].as_i64().unwrap()));
            match page["next_cursor"].as_str() { Some(c) => cursor = Some(c.to_owned()), None => break }
        }
        let expected: Vec<i64> = all.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
        assert_eq!(seen, expected);
        assert_eq!(expected, (1..=expected.len() as i64).collect::<Vec<_>>(), "gap-free from 1");
        assert_eq!(kernel.audit(&admin, "action=test.written").await.len(), 11);
        assert_eq!(kernel.audit(&admin, "action=test.written&outcome=failure").await.len(), 0);
        let from = all[3]["occurred_at"].as_str().unwrap();
        assert!(kernel.audit(&admin, &format!("from={from}")).await.len() <= all.len() - 3);
        let verify: serde_json::Value = kernel.as_(&admin, Method::GET, "/api/kernel/audit/verify").send().await.unwrap().json().await.unwrap();
        assert_eq!(verify["valid"], true);
        let bad = kernel.as_(&admin, Method::GET, "/api/kernel/audit?from=yesterday").send().await.unwrap();
        crate::expect_problem(bad, 400, "VALIDATION_ERROR").await;
    }
}

/// Any interleaving of concurrent writes in several tenants yields chains that
/// verify with gap-free `seq` (both engines).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_audit_writes_in_several_tenants_chain_correctly() {
    let mut engines = vec![Engine::Sqlite];
    if Engine::postgres_admin_url().is_some() {
        engines.push(Engine::Postgres);
    }
    for engine in engines {
        let kernel = spawn_kernel(engine).await.unwrap();
        let mut runner = proptest::test_runner::TestRunner::default();
        let strategy = prop::collection::vec(1usize..12, 1..4);
        let cases: Vec<Vec<usize>> = (0..6)
            .map(|_| strategy.new_tree(&mut runner).unwrap().current())
            .collect();
        for (case, writes) in cases.into_iter().enumerate() {
            let mut tenants = Vec::new();
            for t in 0..writes.len() {
                let slug = format!("p{case}-t{t}");
                let ctx = AuditContext::system(SYSTEM_TENANT_ID);
                let tenant = aibos_kernel::change::write(&kernel.state, ctx, move |tx, c| {
                    Box::pin(async move {
                        aibos_kernel::identity::admin::create_tenant(tx, c, &slug, "t").await
                    })
                })
                .await
                .unwrap();
                tenants.push(tenant.id);
            }
            let mut tasks = tokio::task::JoinSet::new();
            for (tenant, n) in tenants.iter().zip(&writes) {
                for i in 0..*n {
                    let state = kernel.state.clone();
                    let tenant = tenant.clone();
                    tasks.spawn(async move {
                        state
                            .audit_alone(
                                AuditContext::system(tenant),
                                AuditEvent::new("test.concurrent")
                                    .details(serde_json::json!({ "i": i })),
                            )
                            .await
                    });
                }
            }
            while let Some(done) = tasks.join_next().await {
                done.unwrap().unwrap();
            }
            for (tenant, n) in tenants.iter().zip(&writes) {
                let v = aibos_kernel::audit::store::verify_tenant(kernel.state.db(), tenant, None)
                    .await
                    .unwrap();
                assert!(v.valid, "{engine:?} case {case}: {v:?}");
                assert_eq!(
                    v.entries as usize, *n,
                    "{engine:?}: gap-free, every write present"
                );
            }
        }
    }
}

/// Passwords sent in bodies reach neither the audit trail nor any log line.
#[tokio::test]
async fn passwords_never_reach_the_audit_trail_or_the_logs() {
    let cwd = tempfile::tempdir().unwrap();
    let key = "bootstrap-key-for-the-log-test-0";
    let env = [
        ("AIBOS_SERVER__BIND", "127.0.0.1:0"),
        ("AIBOS_LOG__LEVEL", "debug"),
        ("AIBOS_AUTH__BOOTSTRAP_KEY", key),
    ];
    let kernel = KernelProcess::start(Path::new(BINARY), cwd.path(), &env)
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", kernel.base_url);
    let secret_password = "Sup3r-secret-passphrase-for-logs";
    let r = client.post(url("/api/kernel/bootstrap")).header("x-bootstrap-key", key)
        .json(&serde_json::json!({"email": "root@example.com", "password": secret_password, "name": "Root"})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let wrong = client.post(url("/api/kernel/auth/login")).json(&serde_json::json!({"tenant": "system", "email": "root@example.com", "password": "wrong-but-also-secret-123"})).send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let login: serde_json::Value = client.post(url("/api/kernel/auth/login")).json(&serde_json::json!({"tenant": "system", "email": "root@example.com", "password": secret_password})).send().await.unwrap().json().await.unwrap();
    let token = login["access_token"].as_str().unwrap();
    let r = client
        .post(url("/api/kernel/users"))
        .bearer_auth(token)
        .json(&serde_json::json!({"email": "u@example.com", "name": "U", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    let user: serde_json::Value = r.json().await.unwrap();
    let r = client
        .post(url(&format!(
            "/api/kernel/users/{}/password",
            user["id"].as_str().unwrap()
        )))
        .bearer_auth(token)
        .json(&serde_json::json!({"password": "a-new-password-nobody-sees"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let audit: serde_json::Value = client
        .get(url("/api/kernel/audit?limit=1000"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let audit_text = audit.to_string();
    assert!(
        audit_text.contains("user.password_changed") && audit_text.contains("auth.login_failed"),
        "{audit_text}"
    );
    for entry in audit["items"].as_array().unwrap() {
        assert!(
            entry["correlation_id"].is_string() || entry["actor_type"] == "system",
            "{entry}"
        );
    }
    kernel
        .wait_for_log("request completed", std::time::Duration::from_secs(5))
        .await;
    let logs = kernel.all_logs();
    assert!(
        logs.contains("request completed"),
        "debug logs were captured"
    );
    for line in logs.lines().filter(|l| l.contains("request completed")) {
        assert!(
            line.contains("\"correlation_id\":\"") && line.contains("\"trace_id\":\""),
            "every request's log line carries its ids: {line}"
        );
    }
    for secret in [
        secret_password,
        "wrong-but-also-secret-123",
        "a-new-password-nobody-sees",
        PASSWORD,
        key,
        token,
    ] {
        assert!(
            !audit_text.contains(secret),
            "the audit trail holds a secret"
        );
        assert!(
            !logs.contains(secret),
            "a log line holds a secret: {secret}"
        );
    }
}

/// An auditor's own implementation (tools/verify_audit.py, Python's standard
/// library) verifies the chain from the API's output alone.
#[tokio::test]
async fn an_independent_implementation_verifies_the_api_output() {
    let kernel = spawn_kernel(Engine::Sqlite).await.unwrap();
    let admin = kernel.platform_admin().await;
    kernel.tenant_with_admin(&admin, "acme").await;
    let page = kernel
        .as_(&admin, Method::GET, "/api/kernel/audit?limit=1000")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &page).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/verify_audit.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(file.path())
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("ok:"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // And it notices an edit.
    let mut doc: serde_json::Value = serde_json::from_str(&page).unwrap();
    doc["items"][1]["details"] = serde_json::json!({"edited": true});
    std::fs::write(file.path(), doc.to_string()).unwrap();
    let out = std::process::Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/verify_audit.py"))
        .arg(file.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("BROKEN at seq 2"));
}

/// The value of an unlabelled series in Prometheus text, if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `aibos_audit_verify_runs_total{outcome="…"}`.
fn runs(text: &str, outcome: &str) -> f64 {
    sample(
        text,
        &format!("aibos_audit_verify_runs_total{{outcome=\"{outcome}\"}}"),
    )
    .unwrap_or(0.0)
}

crate::both_engines! {
    async fn the_periodic_verification_spans_runs_and_finds_an_entry_rehashed_between_two(engine: Engine) {
        use aibos_kernel::audit::verify::{RunOutcome, Sweep};
        let kernel = spawn_kernel(engine).await.unwrap();
        let admin = kernel.platform_admin().await;
        kernel.tenant_with_admin(&admin, "acme").await;
        write_entries(&kernel, SYSTEM_TENANT_ID, 10).await;
        let db = kernel.state.db();
        let tenants = aibos_kernel::audit::store::tenants_with_entries(db).await.unwrap();
        assert!(tenants.len() >= 2, "{tenants:?}");
        let mut total = 0;
        for tenant in &tenants {
            total += aibos_kernel::audit::store::verify_tenant(db, tenant, None).await.unwrap().entries;
        }
        let mut sweep = Sweep::new(kernel.state.metrics());
        let text = kernel.metrics_text().await;
        assert_eq!(sample(&text, "aibos_audit_verify_last_success_timestamp_seconds"), None, "{text}");

        // A pass at 4 entries a run: every chain, every entry, over several runs.
        let mut verified = 0;
        let mut run_count = 0;
        loop {
            let report = sweep.run(db, 4).await;
            assert_eq!(report.outcome, RunOutcome::Intact, "{report:?}");
            assert!(report.entries <= 4, "{report:?}");
            verified += report.entries;
            run_count += 1;
            assert!(run_count < 100, "the pass never ends");
            if report.pass_completed {
                break;
            }
            let text = kernel.metrics_text().await;
            assert_eq!(sample(&text, "aibos_audit_verify_last_success_timestamp_seconds"), None, "not before the pass ends: {text}");
        }
        assert_eq!(verified, total);
        assert!(run_count as u64 >= total.div_ceil(4), "{run_count} runs for {total} entries");
        let text = kernel.metrics_text().await;
        let success = sample(&text, "aibos_audit_verify_last_success_timestamp_seconds").expect("set by the pass");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!((now - success).abs() < 60.0, "{success} is now");
        assert_eq!(sample(&text, "aibos_audit_chains_broken"), Some(0.0));
        assert_eq!(sample(&text, "aibos_audit_verified_entries_total"), Some(total as f64));
        assert_eq!(runs(&text, "intact"), run_count as f64);

        // The next pass stops after the system chain's entry 4 (its tenant id sorts first)…
        assert_eq!(tenants[0], SYSTEM_TENANT_ID);
        let report = sweep.run(db, 4).await;
        assert_eq!((report.outcome, report.entries), (RunOutcome::Intact, 4));
        // …then a DBA edits entry 4 and gives it a matching hash: the next run,
        // resuming there, finds that entry 5 no longer links to it.
        drop_triggers(db).await;
        let mut fourth = entries(db).await.into_iter().find(|e| e.seq == 4).unwrap();
        fourth.details = serde_json::json!({ "n": 1000 });
        fourth.hash = chain::compute_hash(&fourth);
        exec(db, &format!("UPDATE audit_log SET details = '{}', hash = '{}' WHERE tenant_id = '{}' AND seq = 4", fourth.details, fourth.hash, SYSTEM_TENANT_ID)).await.unwrap();
        let report = sweep.run(db, 4).await;
        assert_eq!(report.outcome, RunOutcome::Broken, "{report:?}");
        let text = kernel.metrics_text().await;
        assert_eq!(sample(&text, "aibos_audit_chains_broken"), Some(1.0), "{text}");
        assert_eq!(runs(&text, "broken"), 1.0);
        assert_eq!(
            sample(&text, "aibos_audit_verify_last_success_timestamp_seconds"),
            Some(success),
            "a broken pass is no success"
        );
        // `aibos audit verify` names the same entry.
        let (code, report) = cli_verify(&kernel, &["--tenant", "system"]);
        assert_eq!(code, 1, "{report}");
        assert_eq!(system_report(&report)["first_bad_seq"], 5, "{report}");

        // The pass goes on to the other chains, and ends without a success.
        let mut report = sweep.run(db, 4).await;
        while !report.pass_completed {
            assert_eq!(report.outcome, RunOutcome::Broken, "the break is remembered: {report:?}");
            report = sweep.run(db, 4).await;
        }
        let text = kernel.metrics_text().await;
        assert_eq!(sample(&text, "aibos_audit_chains_broken"), Some(1.0), "{text}");
        assert_eq!(sample(&text, "aibos_audit_verify_last_success_timestamp_seconds"), Some(success));
    }

    async fn the_kernel_verifies_its_chains_on_its_own_and_exports_a_break(engine: Engine) {
        let kernel = aibos_testkit::spawn_kernel_with(engine, aibos_testkit::KernelOptions {
            env: vec![("AIBOS_AUDIT__VERIFY_INTERVAL_SECONDS".into(), "1".into())],
            ..Default::default()
        }).await.unwrap();
        write_entries(&kernel, SYSTEM_TENANT_ID, 6).await;
        let wait_for = |name: &'static str, want: fn(Option<f64>) -> bool| {
            let kernel = &kernel;
            async move {
                for _ in 0..150 {
                    let text = kernel.metrics_text().await;
                    if want(sample(&text, name)) {
                        return text;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                panic!("{name} never came: {}", kernel.metrics_text().await);
            }
        };
        let text = wait_for("aibos_audit_verify_last_success_timestamp_seconds", |v| v.is_some()).await;
        assert_eq!(sample(&text, "aibos_audit_chains_broken"), Some(0.0), "{text}");

        drop_triggers(kernel.state.db()).await;
        exec(kernel.state.db(), &format!("UPDATE audit_log SET details = '{{\"n\":99}}' WHERE tenant_id = '{SYSTEM_TENANT_ID}' AND seq = 3")).await.unwrap();
        let text = wait_for("aibos_audit_chains_broken", |v| v == Some(1.0)).await;
        assert!(runs(&text, "broken") >= 1.0, "{text}");
    }
}
