//! `aibos backup run | list | verify` and `aibos restore` as an operator runs
//! them: a backup taken while clients write, restored from SQLite into
//! PostgreSQL and back with the same datasets, damaged backups refused.

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aibos_testkit::api::Session;
use aibos_testkit::{Engine, TEST_MASTER_KEY, TestDb, TestKernel, spawn_kernel};
use reqwest::Method;
use serde_json::{Value, json};

const BINARY: &str = env!("CARGO_BIN_EXE_aibos");

/// Runs `aibos ARGS` in `cwd` against `database_url` with the test master key.
pub(crate) fn aibos(cwd: &Path, database_url: &str, args: &[&str]) -> Output {
    std::process::Command::new(BINARY)
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AIBOS_DATABASE__URL", database_url)
        .env("AIBOS_AUTH__MASTER_KEY", TEST_MASTER_KEY)
        .env("AIBOS_LOG__LEVEL", "warn")
        .output()
        .expect("run aibos")
}

/// The last JSON line of a `--json` run.
fn result(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no output; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"))
}

pub(crate) fn run_ok(cwd: &Path, database_url: &str, args: &[&str]) -> Value {
    let out = aibos(cwd, database_url, args);
    let value = result(&out);
    assert!(
        out.status.success() && value["ok"] == true,
        "aibos {args:?}: {value} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    value
}

pub(crate) fn manifest(dir: &Path, id: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join(id).join("manifest.json")).unwrap()).unwrap()
}

/// Each dataset's name, row count and hash, in order.
pub(crate) fn datasets(manifest: &Value) -> Vec<(String, u64, String)> {
    manifest["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_owned(),
                d["rows"].as_u64().unwrap(),
                d["sha256"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Four clients publishing events and creating roles (each an audit entry)
/// until `stop`; returns how many writes were acknowledged.
fn writers(
    kernel: &Arc<TestKernel>,
    admin: &Session,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..4)
        .map(|client| {
            let (kernel, admin, stop) = (kernel.clone(), admin.clone(), stop.clone());
            tokio::spawn(async move {
                let mut acknowledged = 0u64;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let published = kernel
                        .as_(&admin, Method::POST, "/api/kernel/events/publish")
                        // Keyed, as a payment is: idempotency records are a dataset too.
                        .header("idempotency-key", format!("load-{client}-{n}"))
                        .json(&json!({ "type": "test.backup.load", "payload": { "client": client, "n": n } }))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(published.status(), 201, "{}", published.text().await.unwrap());
                    let role = kernel
                        .as_(&admin, Method::POST, "/api/kernel/roles")
                        .json(&json!({ "name": format!("load-{client}-{n}"), "permissions": ["kernel.event.read"] }))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(role.status(), 201, "{}", role.text().await.unwrap());
                    acknowledged += 2;
                }
                acknowledged
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_into_postgres_and_back_with_the_same_datasets() {
    let Some(pg_target) = TestDb::create(Engine::Postgres).await else {
        eprintln!("skipped: AIBOS_TEST_DATABASE_URL is not set");
        return;
    };
    let kernel = Arc::new(spawn_kernel(Engine::Sqlite).await.unwrap());
    let platform = kernel.platform_admin().await;
    let admin = kernel.tenant_with_admin(&platform, "backed-up").await;
    let cwd = tempfile::tempdir().unwrap();
    let dir = cwd.path().join("backups");
    let dir_arg = dir.to_str().unwrap().to_owned();
    let source_url = kernel.db.url().to_owned();

    let stop = Arc::new(AtomicBool::new(false));
    let clients = writers(&kernel, &admin, &stop);
    // Let the writers get going, back up while they write, then stop them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taken = {
        let (cwd, url, dir_arg) = (cwd.path().to_owned(), source_url.clone(), dir_arg.clone());
        tokio::task::spawn_blocking(move || {
            run_ok(&cwd, &url, &["backup", "run", "--dir", &dir_arg, "--json"])
        })
        .await
        .unwrap()
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = 0;
    for client in clients {
        acknowledged += client.await.unwrap();
    }
    assert!(
        acknowledged > 20,
        "the clients wrote during the backup ({acknowledged})"
    );

    let id = taken["id"].as_str().unwrap().to_owned();
    assert_eq!(taken["path"], dir.join(&id).to_str().unwrap());
    let first = manifest(&dir, &id);
    assert_eq!(first["engine"], "sqlite");
    let rows = |name: &str| {
        datasets(&first)
            .into_iter()
            .find(|d| d.0 == name)
            .unwrap()
            .1
    };
    assert!(
        rows("events") > 0
            && rows("audit_log") > 0
            && rows("roles") > 0
            && rows("idempotency_records") > 0
    );
    // The snapshot is consistent: the chain head it records is the last entry it holds.
    let heads = first["audit_heads"].as_array().unwrap();
    assert!(
        heads
            .iter()
            .any(|h| h["tenant_id"] == admin.tenant_id.as_str())
    );

    let listed = run_ok(
        cwd.path(),
        &source_url,
        &["backup", "list", "--dir", &dir_arg, "--json"],
    );
    assert_eq!(listed["backups"][0]["id"], id.as_str());
    let verified = run_ok(
        cwd.path(),
        &source_url,
        &["backup", "verify", "--id", &id, "--dir", &dir_arg, "--json"],
    );
    assert_eq!(verified["audit_chains"], heads.len());

    // SQLite → PostgreSQL: a dry run first changes nothing.
    let dry = run_ok(
        cwd.path(),
        pg_target.url(),
        &[
            "restore",
            "--id",
            &id,
            "--dir",
            &dir_arg,
            "--dry-run",
            "--json",
        ],
    );
    assert_eq!(dry["dry_run"], true);
    let restored = run_ok(
        cwd.path(),
        pg_target.url(),
        &["restore", "--id", &id, "--dir", &dir_arg, "--json"],
    );
    assert!(restored["seconds"].as_f64().unwrap() > 0.0);
    assert!(restored["safety_backup"].is_null());
    let audit = aibos(cwd.path(), pg_target.url(), &["audit", "verify"]);
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stdout)
    );

    // The restored database backs up to the same datasets, byte for byte.
    let again = run_ok(
        cwd.path(),
        pg_target.url(),
        &["backup", "run", "--dir", &dir_arg, "--json"],
    );
    let second = manifest(&dir, again["id"].as_str().unwrap());
    assert_eq!(second["engine"], "postgres");
    assert_eq!(datasets(&second), datasets(&first));
    assert_eq!(second["audit_heads"], first["audit_heads"]);

    // A target that holds data is refused, and replaced with --force after a safety backup.
    let refused = aibos(
        cwd.path(),
        pg_target.url(),
        &["restore", "--id", &id, "--dir", &dir_arg, "--json"],
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        result(&refused)["error"]
            .as_str()
            .unwrap()
            .contains("not empty"),
        "{}",
        result(&refused)
    );
    let forced = run_ok(
        cwd.path(),
        pg_target.url(),
        &[
            "restore", "--id", &id, "--dir", &dir_arg, "--force", "--json",
        ],
    );
    let safety = forced["safety_backup"]
        .as_str()
        .expect("a safety backup was taken");
    assert_eq!(datasets(&manifest(&dir, safety)), datasets(&first));

    // PostgreSQL → a new SQLite file (the operator brings the master key along).
    let back = cwd.path().join("back");
    let back_url = format!("sqlite://{}/aibos.db", back.display());
    let again_id = again["id"].as_str().unwrap();
    run_ok(
        cwd.path(),
        &back_url,
        &["restore", "--id", again_id, "--dir", &dir_arg, "--json"],
    );
    let audit = aibos(cwd.path(), &back_url, &["audit", "verify"]);
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stdout)
    );
    let third = run_ok(
        cwd.path(),
        &back_url,
        &["backup", "run", "--dir", &dir_arg, "--json"],
    );
    assert_eq!(
        datasets(&manifest(&dir, third["id"].as_str().unwrap())),
        datasets(&first)
    );
}

crate::both_engines! {
    async fn a_damaged_backup_is_refused_by_verify_and_restore_naming_the_dataset(engine: Engine) {
        let kernel = spawn_kernel(Engine::Sqlite).await.unwrap();
        let platform = kernel.platform_admin().await;
        for n in 0..5 {
            let r = kernel.as_(&platform, Method::POST, "/api/kernel/events/publish")
                .json(&json!({ "type": "test.backup.damage", "payload": { "n": n } }))
                .send().await.unwrap();
            assert_eq!(r.status(), 201);
        }
        let cwd = tempfile::tempdir().unwrap();
        let dir = cwd.path().join("backups");
        let dir_arg = dir.to_str().unwrap();
        let taken = run_ok(cwd.path(), kernel.db.url(), &["backup", "run", "--dir", dir_arg, "--json"]);
        let id = taken["id"].as_str().unwrap();
        let folder = dir.join(id);
        let events_file = folder.join(manifest(&dir, id)["datasets"].as_array().unwrap().iter()
            .find(|d| d["name"] == "events").unwrap()["file"].as_str().unwrap());

        let target = TestDb::create(engine).await.unwrap();
        let target_url = target.url().to_owned();
        let original = std::fs::read(&events_file).unwrap();
        let mut damaged = original.clone();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0x01;
        std::fs::write(&events_file, &damaged).unwrap();

        let verify = aibos(cwd.path(), &target_url, &["backup", "verify", "--id", id, "--dir", dir_arg, "--json"]);
        assert_eq!(verify.status.code(), Some(1));
        let verdict = result(&verify);
        assert_eq!(verdict["ok"], false);
        assert_eq!(verdict["dataset"], "events", "{verdict}");
        let restore = aibos(cwd.path(), &target_url, &["restore", "--id", id, "--dir", dir_arg, "--json"]);
        assert_eq!(restore.status.code(), Some(1));
        assert_eq!(result(&restore)["dataset"], "events", "{}", result(&restore));
        // The restore takes the indexes and keys off while it loads: the
        // failed one left them all as the migrations made them.
        let fresh = TestDb::create(engine).await.unwrap();
        let fresh_db = crate::migrations::connect(&fresh).await;
        aibos_kernel::db::migrate::up(&fresh_db, aibos_kernel::db::migrate::embedded(fresh_db.engine())).await.unwrap();
        let schema = crate::migrations::catalogue(&fresh_db).await;
        let target_db = crate::migrations::connect(&target).await;
        assert_eq!(crate::migrations::catalogue(&target_db).await, schema);
        // Nothing of it was kept: the target is still empty, so an intact backup restores without --force.
        std::fs::write(&events_file, &original).unwrap();
        run_ok(cwd.path(), &target_url, &["restore", "--id", id, "--dir", dir_arg, "--json"]);
        assert_eq!(crate::migrations::catalogue(&target_db).await, schema, "a restore puts back every index and key");

        // A changed manifest is refused too.
        let manifest_file = folder.join("manifest.json");
        let mut changed = manifest(&dir, id);
        changed["datasets"][0]["rows"] = json!(changed["datasets"][0]["rows"].as_u64().unwrap() + 1);
        std::fs::write(&manifest_file, serde_json::to_vec_pretty(&changed).unwrap()).unwrap();
        let verify = aibos(cwd.path(), &target_url, &["backup", "verify", "--id", id, "--dir", dir_arg, "--json"]);
        assert_eq!(verify.status.code(), Some(1));
        assert!(result(&verify)["error"].as_str().unwrap().contains("manifest"), "{}", result(&verify));

        // Ids that are not backup ids never become paths.
        let escape = aibos(cwd.path(), &target_url, &["backup", "verify", "--id", "../backups", "--dir", dir_arg, "--json"]);
        assert_eq!(escape.status.code(), Some(1));
        assert!(result(&escape)["error"].as_str().unwrap().contains("not a backup id"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_show_in_metrics_and_retention_keeps_the_newest() {
    let cwd = tempfile::tempdir().unwrap();
    let dir = cwd.path().join("scheduled");
    let kernel = aibos_testkit::spawn_kernel_with(
        Engine::Sqlite,
        aibos_testkit::KernelOptions {
            env: vec![
                ("AIBOS_BACKUP__DIR".to_owned(), dir.display().to_string()),
                ("AIBOS_BACKUP__INTERVAL_SECONDS".to_owned(), "1".to_owned()),
                ("AIBOS_BACKUP__KEEP_LAST".to_owned(), "2".to_owned()),
            ],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let ok_runs = |text: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with("aibos_backup_runs_total{outcome=\"ok\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = kernel.metrics_text().await;
        if ok_runs(&metrics) >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok_runs(&metrics) >= 3, "{metrics}");
    let last: f64 = metrics
        .lines()
        .find(|l| l.starts_with("aibos_backup_last_success_timestamp_seconds"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - last).abs() < 60.0, "last success {last}, now {now}");
    let kept: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(kept.len() <= 2, "retention keeps the 2 newest: {kept:?}");
    assert!(!kept.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_restore_drill_passes_both_ways_and_reports_rto_and_rpo() {
    let Some(admin_url) = Engine::postgres_admin_url() else {
        eprintln!("skipped: AIBOS_TEST_DATABASE_URL is not set");
        return;
    };
    let cwd = tempfile::tempdir().unwrap();
    for from in ["sqlite", "postgres"] {
        let out = std::process::Command::new(BINARY)
            .args([
                "drill",
                "backup-restore",
                "--from",
                from,
                "--seconds",
                "1",
                "--json",
            ])
            .current_dir(cwd.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AIBOS_DRILL_POSTGRES_URL", &admin_url)
            .output()
            .unwrap();
        let report = result(&out);
        assert!(
            out.status.success() && report["ok"] == true,
            "{report} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(report["from"], from);
        assert_eq!(report["differences"], json!([]));
        assert!(report["rto_seconds"].as_f64().unwrap() > 0.0);
        assert!(
            report["writes_acknowledged"].as_u64().unwrap()
                > report["writes_in_backup"].as_u64().unwrap()
        );
        assert!(
            report["datasets"].as_u64().unwrap() >= 25,
            "every table is a dataset"
        );
    }
}
