//! `aibos drill backup-restore`: proves a restore instead of asserting it. On
//! throwaway data it starts a kernel, puts it under load (clients publishing
//! keyed events and making audited changes), takes a backup while they write,
//! restores it into a fresh database of the other engine, and compares the
//! two: every dataset's row count and SHA-256 and every audit chain head, by
//! backing up the restored database and diffing the manifests. It prints the
//! recovery time (RTO: the restore, start to commit, with its verification)
//! and the recovery point (RPO: what was acknowledged after the snapshot and
//! so is not in the backup), and exits non-zero if anything differs.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aibos_kernel::backup::{self, RestoreOptions, Silent};
use aibos_kernel::config::{Config, ConfigSources, DatabaseUrl};
use aibos_kernel::db::Db;
use aibos_kernel::secrets::{MasterKey, MasterKeys};
use aibos_kernel::{App, AppOptions};
use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};

use crate::cli::{EXIT_FAILURE, EXIT_OK};

#[derive(Debug, Args)]
pub struct BackupRestoreArgs {
    /// The engine the kernel runs on; the restore goes to the other one.
    #[arg(long, value_enum, default_value_t = DrillEngine::Sqlite)]
    from: DrillEngine,
    /// A PostgreSQL server on which the drill creates (and then drops) its
    /// throwaway databases; e.g. postgres://postgres@127.0.0.1:5432/postgres.
    #[arg(long, env = "AIBOS_DRILL_POSTGRES_URL", hide_env_values = true)]
    postgres_url: String,
    /// Seconds of load before the backup (and as many after it).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Concurrent clients writing.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    clients: u64,
    /// Print one JSON object with the verdict and the figures.
    #[arg(long)]
    json: bool,
}

/// Which engine the drill's kernel runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DrillEngine {
    Sqlite,
    Postgres,
}

pub async fn run(sources: ConfigSources, args: BackupRestoreArgs) -> u8 {
    let json = args.json;
    match backup_restore(&sources, &args).await {
        Ok(report) => {
            let ok = report["ok"] == true;
            if json {
                println!("{report}");
            } else {
                print_report(&report);
            }
            if ok { EXIT_OK } else { EXIT_FAILURE }
        }
        Err(e) => {
            if json {
                println!("{}", json!({ "ok": false, "error": format!("{e:#}") }));
            } else {
                eprintln!("error: the drill could not run: {e:#}");
            }
            EXIT_FAILURE
        }
    }
}

fn print_report(report: &Value) {
    println!(
        "backup-restore drill: {} → {}",
        report["from"].as_str().unwrap_or("?"),
        report["to"].as_str().unwrap_or("?")
    );
    println!(
        "  load: {} clients, {} writes acknowledged ({} before the backup's snapshot)",
        report["clients"], report["writes_acknowledged"], report["writes_in_backup"]
    );
    println!(
        "  backup {}: {} rows in {:.2} s",
        report["backup_id"].as_str().unwrap_or("?"),
        report["rows"],
        report["backup_seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  RTO: {:.2} s (restore into a fresh {} database, every hash and audit chain verified)",
        report["rto_seconds"].as_f64().unwrap_or(0.0),
        report["to"].as_str().unwrap_or("?")
    );
    println!(
        "  RPO: {} writes, {:.2} s of load after the snapshot are not in the backup (bounded by backup.interval_seconds)",
        report["rpo_writes"],
        report["rpo_seconds"].as_f64().unwrap_or(0.0)
    );
    match report["differences"].as_array() {
        Some(d) if !d.is_empty() => {
            println!("  FAILED: the restored database differs:");
            for line in d {
                println!("    {}", line.as_str().unwrap_or("?"));
            }
        }
        _ => println!(
            "  PASSED: {} datasets and {} audit chain heads identical after the restore",
            report["datasets"], report["audit_chains"]
        ),
    }
}

/// A throwaway database: a SQLite file in the drill's folder, or a PostgreSQL
/// database dropped at the end.
struct Throwaway {
    url: String,
    postgres: Option<(String, String)>,
}

impl Throwaway {
    async fn create(
        engine: DrillEngine,
        folder: &Path,
        admin_url: &str,
        role: &str,
    ) -> anyhow::Result<Throwaway> {
        match engine {
            DrillEngine::Sqlite => Ok(Throwaway {
                url: format!("sqlite://{}/{role}.db", folder.display()),
                postgres: None,
            }),
            DrillEngine::Postgres => {
                let name = format!("aibos_drill_{role}_{}", uuid::Uuid::new_v4().simple());
                let admin = admin_database(admin_url).await?;
                admin.create_database(&name).await?;
                admin.close().await;
                let url = with_database(admin_url, &name)?;
                Ok(Throwaway {
                    url,
                    postgres: Some((admin_url.to_owned(), name)),
                })
            }
        }
    }

    async fn drop_database(self) {
        if let Some((admin_url, name)) = self.postgres
            && let Ok(admin) = admin_database(&admin_url).await
        {
            if let Err(e) = admin.drop_database(&name).await {
                eprintln!("warning: could not drop the drill's database {name}: {e}");
            }
            admin.close().await;
        }
    }
}

/// The admin connection, through the kernel's own database layer.
async fn admin_database(url: &str) -> anyhow::Result<aibos_kernel::db::admin::Admin> {
    aibos_kernel::db::admin::Admin::connect(url)
        .await
        .with_context(|| "cannot reach --postgres-url")
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let Some(slash) = base
        .rfind('/')
        .filter(|i| base[..*i].contains("://") && *i > base.find("://").unwrap_or(0) + 2)
    else {
        bail!(
            "--postgres-url must name a database, e.g. postgres://postgres@127.0.0.1:5432/postgres"
        );
    };
    let mut out = format!("{}/{name}", &base[..slash]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

async fn backup_restore(
    sources: &ConfigSources,
    args: &BackupRestoreArgs,
) -> anyhow::Result<Value> {
    if !(args.postgres_url.starts_with("postgres://")
        || args.postgres_url.starts_with("postgresql://"))
    {
        bail!("--postgres-url must be a postgres:// URL");
    }
    let folder = tempfile::Builder::new()
        .prefix("aibos-drill-")
        .tempdir()
        .context("cannot create the drill's folder")?;
    let (to_engine, from_name, to_name) = match args.from {
        DrillEngine::Sqlite => (DrillEngine::Postgres, "sqlite", "postgres"),
        DrillEngine::Postgres => (DrillEngine::Sqlite, "postgres", "sqlite"),
    };
    let source = Throwaway::create(args.from, folder.path(), &args.postgres_url, "source").await?;
    let target = Throwaway::create(to_engine, folder.path(), &args.postgres_url, "target").await?;
    let result = run_drill(sources, args, folder.path(), &source.url, &target.url).await;
    source.drop_database().await;
    target.drop_database().await;
    let mut report = result?;
    if let Some(object) = report.as_object_mut() {
        object.insert("from".into(), json!(from_name));
        object.insert("to".into(), json!(to_name));
        object.insert("clients".into(), json!(args.clients));
    }
    Ok(report)
}

async fn run_drill(
    sources: &ConfigSources,
    args: &BackupRestoreArgs,
    folder: &Path,
    source_url: &str,
    target_url: &str,
) -> anyhow::Result<Value> {
    let (master_key, master_key_text) = MasterKey::generate();
    let bootstrap_key = uuid::Uuid::new_v4().simple().to_string();
    let mut env = sources.env.clone();
    for (key, value) in [
        ("AIBOS_DATABASE__URL", source_url.to_owned()),
        ("AIBOS_SERVER__BIND", "127.0.0.1:0".to_owned()),
        ("AIBOS_AUTH__BOOTSTRAP_KEY", bootstrap_key.clone()),
        ("AIBOS_AUTH__MASTER_KEY", master_key_text.clone()),
        ("AIBOS_LOG__LEVEL", "error".to_owned()),
        ("AIBOS_BACKUP__INTERVAL_SECONDS", "0".to_owned()),
        // The drill's clients are one user from one address.
        ("AIBOS_RATE_LIMIT__USER_PER_MINUTE", "100000000".to_owned()),
        ("AIBOS_RATE_LIMIT__USER_BURST", "100000000".to_owned()),
        (
            "AIBOS_RATE_LIMIT__TENANT_PER_MINUTE",
            "100000000".to_owned(),
        ),
        ("AIBOS_RATE_LIMIT__TENANT_BURST", "100000000".to_owned()),
        (
            "AIBOS_RATE_LIMIT__ADDRESS_PER_MINUTE",
            "100000000".to_owned(),
        ),
        ("AIBOS_RATE_LIMIT__ADDRESS_BURST", "100000000".to_owned()),
    ] {
        env.insert(key.into(), value);
    }
    let drill_sources = ConfigSources::new(folder, env);
    let config = Config::load(&drill_sources).map_err(|e| anyhow::anyhow!("{e}"))?;
    let app = App::build(config.clone(), AppOptions::new(drill_sources))
        .await
        .map_err(|e| anyhow::anyhow!("the drill's kernel could not start: {e}"))?;
    let base = format!("http://{}", app.local_addr());
    let state = app.state();
    let (stop_kernel, stopping) = tokio::sync::watch::channel(false);
    let kernel = tokio::spawn(app.run_until_stopped(async move {
        let mut stopping = stopping;
        let _ = stopping.wait_for(|s| *s).await;
    }));

    let outcome = async {
        let http = reqwest::Client::builder().no_proxy().build()?;
        let token = admin_token(&http, &base, &bootstrap_key).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicU64::new(0));
        let clients: Vec<_> = (0..args.clients)
            .map(|client| {
                let (http, base, token, stop, acknowledged) = (
                    http.clone(),
                    base.clone(),
                    token.clone(),
                    stop.clone(),
                    acknowledged.clone(),
                );
                tokio::spawn(async move {
                    write_until(&http, &base, &token, client, &stop, &acknowledged).await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;

        // The backup, while the clients keep writing. Every write acknowledged
        // before it starts is in its snapshot.
        let in_backup = acknowledged.load(Ordering::SeqCst);
        let snapshot_at = Instant::now();
        let backups = folder.join("backups");
        let started = Instant::now();
        let (manifest, _) = backup::run(
            state.db(),
            &backups,
            Some(master_key.id().to_owned()),
            Arc::new(Silent),
        )
        .await
        .context("the backup under load failed")?;
        let backup_seconds = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        // The incident: the source is lost now; what it acknowledged since the
        // snapshot is the recovery point's loss.
        stop.store(true, Ordering::SeqCst);
        let mut failures = Vec::new();
        for client in clients {
            if let Err(e) = client.await? {
                failures.push(format!("{e:#}"));
            }
        }
        if let Some(first) = failures.first() {
            bail!("a client's write failed under load: {first}");
        }
        let total = acknowledged.load(Ordering::SeqCst);
        let rpo_seconds = snapshot_at.elapsed().as_secs_f64();

        // Restore into a fresh database of the other engine.
        let target_config = database_config(&config, target_url)?;
        let target = Db::connect(&target_config).await?;
        let keys =
            MasterKeys::single(MasterKey::parse(&master_key_text).map_err(|e| anyhow::anyhow!(e))?);
        let report = backup::restore(
            &target,
            &backups,
            &manifest.id,
            Some(&keys),
            RestoreOptions::default(),
            Arc::new(Silent),
        )
        .await
        .context("the restore failed")?;
        // Compare by backing up what was restored: the same data gives the same bytes.
        let (restored, _) = backup::run(
            &target,
            &backups,
            Some(master_key.id().to_owned()),
            Arc::new(Silent),
        )
        .await
        .context("the restored database could not be backed up for the comparison")?;
        target.close().await;
        let differences = compare(&manifest, &restored);
        Ok::<Value, anyhow::Error>(json!({
            "ok": differences.is_empty(),
            "backup_id": manifest.id,
            "rows": backup::Summary::of(&manifest).rows,
            "datasets": manifest.datasets.len(),
            "audit_chains": manifest.audit_heads.len(),
            "backup_seconds": backup_seconds,
            "rto_seconds": report.seconds,
            "writes_acknowledged": total,
            "writes_in_backup": in_backup,
            "rpo_writes": total.saturating_sub(in_backup),
            "rpo_seconds": rpo_seconds,
            "differences": differences,
        }))
    }
    .await;
    let _ = stop_kernel.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(15), kernel).await;
    state.db().close().await;
    outcome
}

fn database_config(
    config: &Config,
    url: &str,
) -> anyhow::Result<aibos_kernel::config::DatabaseConfig> {
    let mut database = config.database.clone();
    database.url = DatabaseUrl::parse(url).map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    Ok(database)
}

/// Every way the restored database's backup differs from the original's.
fn compare(
    original: &backup::format::Manifest,
    restored: &backup::format::Manifest,
) -> Vec<String> {
    let mut differences = Vec::new();
    for dataset in &original.datasets {
        match restored.datasets.iter().find(|d| d.name == dataset.name) {
            None => differences.push(format!("{}: missing after the restore", dataset.name)),
            Some(r) if r.rows != dataset.rows => {
                differences.push(format!(
                    "{}: {} rows, {} after the restore",
                    dataset.name, dataset.rows, r.rows
                ));
            }
            Some(r) if r.sha256 != dataset.sha256 => {
                differences.push(format!(
                    "{}: its SHA-256 differs after the restore",
                    dataset.name
                ));
            }
            Some(_) => {}
        }
    }
    if restored.datasets.len() != original.datasets.len() {
        differences.push(format!(
            "{} datasets, {} after the restore",
            original.datasets.len(),
            restored.datasets.len()
        ));
    }
    if restored.audit_heads != original.audit_heads {
        differences.push("the audit chain heads differ after the restore".to_owned());
    }
    differences
}

const DRILL_EMAIL: &str = "drill@example.com";

/// Bootstraps the drill's administrator and logs in.
async fn admin_token(
    http: &reqwest::Client,
    base: &str,
    bootstrap_key: &str,
) -> anyhow::Result<String> {
    let password = format!("drill {}", uuid::Uuid::new_v4().simple());
    crate::cli::chaos::kernel::bootstrap_and_login(
        http,
        base,
        Some(bootstrap_key),
        DRILL_EMAIL,
        &password,
    )
    .await
}

/// One client: a keyed event publish and an audited change per turn, until `stop`.
async fn write_until(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    client: u64,
    stop: &AtomicBool,
    acknowledged: &AtomicU64,
) -> anyhow::Result<()> {
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let published = http
            .post(format!("{base}/api/kernel/events/publish"))
            .bearer_auth(token)
            .header("idempotency-key", format!("drill-{client}-{n}"))
            .json(&json!({ "type": "drill.payment.processed", "payload": { "client": client, "n": n, "amount_minor": n * 100 } }))
            .send()
            .await?;
        if published.status() != 201 {
            bail!(
                "publish answered {}: {}",
                published.status(),
                published.text().await?
            );
        }
        acknowledged.fetch_add(1, Ordering::SeqCst);
        let role = http
            .post(format!("{base}/api/kernel/roles"))
            .bearer_auth(token)
            .json(&json!({ "name": format!("drill-{client}-{n}"), "permissions": ["kernel.event.read"] }))
            .send()
            .await?;
        if role.status() != 201 {
            bail!(
                "role creation answered {}: {}",
                role.status(),
                role.text().await?
            );
        }
        acknowledged.fetch_add(1, Ordering::SeqCst);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_is_replaced_and_the_rest_kept() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "x").unwrap(),
            "postgres://u:p@h:5432/x?sslmode=disable"
        );
        assert!(with_database("postgres://h", "x").is_err());
    }

    #[test]
    fn identical_manifests_have_no_differences_and_any_change_is_named() {
        let dataset = |rows, sha: &str| backup::format::DatasetManifest {
            name: "events".into(),
            file: "01-events.ndjson.zst".into(),
            columns: vec![],
            order_by: vec![],
            rows,
            sha256: sha.into(),
            bytes: 0,
            compressed_bytes: 0,
        };
        let manifest = |d| backup::format::Manifest {
            format: "aibos-backup".into(),
            format_version: 1,
            id: "x".into(),
            kernel_version: "0".into(),
            schema_version: 13,
            engine: "sqlite".into(),
            started_at: String::new(),
            finished_at: String::new(),
            master_key_id: None,
            datasets: vec![d],
            audit_heads: vec![],
        };
        let a = manifest(dataset(3, "aa"));
        assert!(compare(&a, &manifest(dataset(3, "aa"))).is_empty());
        assert_eq!(
            compare(&a, &manifest(dataset(2, "aa"))),
            ["events: 3 rows, 2 after the restore"]
        );
        assert_eq!(
            compare(&a, &manifest(dataset(3, "bb"))),
            ["events: its SHA-256 differs after the restore"]
        );
    }
}
