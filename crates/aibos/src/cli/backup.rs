//! `aibos backup run | list | verify` and `aibos restore` (SPEC §10): thin
//! commands over the kernel's `backup` module, with progress bars on a
//! terminal and JSON lines with `--json`, the last line holding the result.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use aibos_kernel::backup::{self, BackupError, Progress, RestoreOptions};
use aibos_kernel::config::{Config, ConfigSources, DatabaseUrl};
use aibos_kernel::db::{Db, migrate};
use aibos_kernel::secrets::source as secrets_source;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use super::{EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, load_config};

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Take a consistent online backup of every dataset.
    Run {
        #[command(flatten)]
        place: Place,
        /// Then keep only the N newest backups (with --keep-days: those kept by either rule).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        keep_last: Option<u32>,
        /// Then keep only backups younger than D days (with --keep-last: those kept by either rule).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=36_500))]
        keep_days: Option<u32>,
    },
    /// List the backups in the folder.
    List(Place),
    /// Re-read a backup whole: every dataset's hash and row count, every audit chain inside it.
    Verify {
        /// The backup's id (`backup list`).
        #[arg(long)]
        id: String,
        #[command(flatten)]
        place: Place,
    },
}

/// Where the backups are, and how to print.
#[derive(Debug, Args)]
pub struct Place {
    /// The backups' folder (default: `backup.dir`, `data/backups`).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print JSON lines; the last one holds the result.
    #[arg(long)]
    json: bool,
}

/// `aibos restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup's id (`backup list`).
    #[arg(long)]
    id: String,
    /// The database to restore into (default: `database.url`); either engine.
    #[arg(long, env = "AIBOS_RESTORE_TARGET_URL", hide_env_values = true)]
    target_url: Option<String>,
    /// Verify the backup and say what would change; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Replace a target that holds data (a backup of it is taken first).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    place: Place,
}

pub async fn backup(sources: ConfigSources, command: BackupCommand) -> u8 {
    match command {
        BackupCommand::Run {
            place,
            keep_last,
            keep_days,
        } => run(&sources, &place, keep_last, keep_days).await,
        BackupCommand::List(place) => list(&sources, &place),
        BackupCommand::Verify { id, place } => verify(&sources, &place, &id).await,
    }
}

fn dir_of(config: &Config, place: &Place) -> PathBuf {
    place
        .dir
        .clone()
        .unwrap_or_else(|| config.backup.dir.clone())
}

async fn run(
    sources: &ConfigSources,
    place: &Place,
    keep_last: Option<u32>,
    keep_days: Option<u32>,
) -> u8 {
    let Ok(config) = load_config(sources, place.json) else {
        return EXIT_CONFIG;
    };
    let dir = dir_of(&config, place);
    let db = match Db::connect(&config.database).await {
        Ok(db) => db,
        Err(e) => return failed(place.json, &e.to_string(), None),
    };
    let key_id =
        match secrets_source::load(&config.auth, &config.database, &sources.base_dir, &db).await {
            Ok(keys) => Some(keys.current().id().to_owned()),
            Err(e) => return failed(place.json, &e.to_string(), None),
        };
    let started = std::time::Instant::now();
    let progress = Arc::new(CliProgress::new(place.json));
    let taken = backup::run(&db, &dir, key_id, progress).await;
    db.close().await;
    let (manifest, path) = match taken {
        Ok(taken) => taken,
        Err(e) => return failed(place.json, &e.to_string(), e.dataset()),
    };
    let removed = match backup::prune(
        &dir,
        keep_last.map(|n| n as usize),
        keep_days,
        time::OffsetDateTime::now_utc(),
    ) {
        Ok(removed) => removed,
        Err(e) => {
            return failed(
                place.json,
                &format!(
                    "the backup {} was taken, but retention failed: {e}",
                    manifest.id
                ),
                None,
            );
        }
    };
    let summary = backup::Summary::of(&manifest);
    let seconds = started.elapsed().as_secs_f64();
    if place.json {
        println!(
            "{}",
            json!({
                "ok": true, "id": manifest.id, "path": path.display().to_string(),
                "engine": summary.engine, "rows": summary.rows, "bytes": summary.bytes,
                "seconds": seconds, "removed": removed,
            })
        );
    } else {
        println!(
            "backup {} taken in {seconds:.1} s: {} rows, {} bytes, {} datasets, at {}",
            manifest.id,
            summary.rows,
            summary.bytes,
            manifest.datasets.len(),
            path.display()
        );
        for id in removed {
            println!("removed {id} (retention)");
        }
    }
    EXIT_OK
}

fn list(sources: &ConfigSources, place: &Place) -> u8 {
    let Ok(config) = load_config(sources, place.json) else {
        return EXIT_CONFIG;
    };
    let dir = dir_of(&config, place);
    let listed = match backup::list(&dir) {
        Ok(listed) => listed,
        Err(e) => return failed(place.json, &e.to_string(), None),
    };
    if place.json {
        println!(
            "{}",
            json!({ "ok": true, "dir": dir.display().to_string(), "backups": listed })
        );
        return EXIT_OK;
    }
    if listed.is_empty() {
        println!("no backups in {}", dir.display());
        return EXIT_OK;
    }
    println!(
        "{:<23}  {:<8}  {:>6}  {:>10}  {:>12}  finished",
        "id", "engine", "schema", "rows", "bytes"
    );
    for b in &listed {
        match &b.summary {
            Some(s) => println!(
                "{:<23}  {:<8}  {:>6}  {:>10}  {:>12}  {}",
                b.id, s.engine, s.schema_version, s.rows, s.bytes, s.finished_at
            ),
            None => println!(
                "{:<23}  unreadable: {}",
                b.id,
                b.problem.as_deref().unwrap_or("no manifest")
            ),
        }
    }
    EXIT_OK
}

async fn verify(sources: &ConfigSources, place: &Place, id: &str) -> u8 {
    let Ok(config) = load_config(sources, place.json) else {
        return EXIT_CONFIG;
    };
    let dir = dir_of(&config, place);
    let started = std::time::Instant::now();
    match backup::verify(&dir, id, Arc::new(CliProgress::new(place.json))).await {
        Ok(manifest) => {
            let summary = backup::Summary::of(&manifest);
            if place.json {
                println!(
                    "{}",
                    json!({
                        "ok": true, "id": id, "rows": summary.rows, "datasets": manifest.datasets.len(),
                        "audit_chains": manifest.audit_heads.len(), "seconds": started.elapsed().as_secs_f64(),
                    })
                );
            } else {
                println!(
                    "backup {id} verifies: {} datasets, {} rows, {} audit chains",
                    manifest.datasets.len(),
                    summary.rows,
                    manifest.audit_heads.len()
                );
            }
            EXIT_OK
        }
        Err(e) => failed(
            place.json,
            &format!("backup {id} does not verify: {e}"),
            e.dataset(),
        ),
    }
}

pub async fn restore(sources: ConfigSources, args: RestoreArgs) -> u8 {
    let json = args.place.json;
    let Ok(mut config) = load_config(&sources, json) else {
        return EXIT_CONFIG;
    };
    let dir = dir_of(&config, &args.place);
    if let Some(url) = &args.target_url {
        match DatabaseUrl::parse(url) {
            Ok(url) => config.database.url = url,
            Err(e) => {
                return failed(json, &format!("--target-url {e}"), None);
            }
        }
    }
    let target = match Db::connect(&config.database).await {
        Ok(db) => db,
        Err(e) => return failed(json, &e.to_string(), None),
    };
    // The schema first: the master key's check reads the sealed columns.
    if let Err(e) = migrate::up(&target, migrate::embedded(target.engine())).await {
        return failed(json, &e.to_string(), None);
    }
    let keys = match secrets_source::load(
        &config.auth,
        &config.database,
        &sources.base_dir,
        &target,
    )
    .await
    {
        Ok(keys) => keys,
        Err(e) => return failed(json, &e.to_string(), None),
    };
    let options = RestoreOptions {
        dry_run: args.dry_run,
        force: args.force,
    };
    let restored = backup::restore(
        &target,
        &dir,
        &args.id,
        Some(&keys),
        options,
        Arc::new(CliProgress::new(json)),
    )
    .await;
    target.close().await;
    let report = match restored {
        Ok(report) => report,
        Err(e) => {
            let refused = matches!(e, BackupError::TargetNotEmpty(_));
            let verb = if refused { "refused" } else { "failed" };
            return failed(
                json,
                &format!("restore of {} {verb}: {e}", args.id),
                e.dataset(),
            );
        }
    };
    if json {
        let mut value = serde_json::to_value(&report).unwrap_or_default();
        if let Some(object) = value.as_object_mut() {
            object.insert("ok".to_owned(), json!(true));
            object.insert("target".to_owned(), json!(config.database.url.redacted()));
        }
        println!("{value}");
        return EXIT_OK;
    }
    let rows: u64 = report.datasets.iter().map(|d| d.rows).sum();
    let before: u64 = report.datasets.iter().map(|d| d.target_rows_before).sum();
    if report.dry_run {
        println!(
            "dry run: backup {} verifies; restoring it into {} would replace {before} rows with {rows} rows:",
            report.id,
            config.database.url.redacted()
        );
        for d in &report.datasets {
            if d.rows != 0 || d.target_rows_before != 0 {
                println!(
                    "  {:<28} {:>10} -> {:>10}",
                    d.name, d.target_rows_before, d.rows
                );
            }
        }
    } else {
        if let Some(safety) = &report.safety_backup {
            println!("the target's data was backed up first as {safety}");
        }
        println!(
            "restored backup {} into {}: {rows} rows in {:.2} s; its audit chains verified",
            report.id,
            config.database.url.redacted(),
            report.seconds
        );
    }
    EXIT_OK
}

/// Prints a failure (a JSON line with `--json`, holding `ok: false`) and returns the exit code.
fn failed(json: bool, message: &str, dataset: Option<&str>) -> u8 {
    if json {
        println!(
            "{}",
            json!({ "ok": false, "error": message, "dataset": dataset })
        );
    } else {
        eprintln!("error: {message}");
    }
    EXIT_FAILURE
}

/// Progress bars on a terminal's standard error; JSON lines with `--json`;
/// nothing otherwise.
struct CliProgress {
    json: bool,
    bar: Mutex<Option<ProgressBar>>,
    draw: bool,
}

impl CliProgress {
    fn new(json: bool) -> CliProgress {
        CliProgress {
            json,
            bar: Mutex::new(None),
            draw: !json && std::io::stderr().is_terminal(),
        }
    }

    fn with_bar(&self, f: impl FnOnce(&mut Option<ProgressBar>)) {
        let mut slot = match self.bar.lock() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut slot);
    }
}

impl Progress for CliProgress {
    fn dataset_started(&self, name: &str, rows: u64) {
        if !self.draw {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(rows), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{prefix:>28} [{bar:30}] {pos}/{len} rows {per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(name.to_owned());
        self.with_bar(|slot| *slot = Some(bar));
    }

    fn rows_done(&self, rows: u64) {
        self.with_bar(|slot| {
            if let Some(bar) = slot {
                bar.inc(rows);
            }
        });
    }

    fn dataset_finished(&self, name: &str, rows: u64) {
        if self.json {
            println!(
                "{}",
                json!({ "event": "dataset", "name": name, "rows": rows })
            );
        }
        self.with_bar(|slot| {
            if let Some(bar) = slot.take() {
                bar.finish();
            }
        });
    }
}
