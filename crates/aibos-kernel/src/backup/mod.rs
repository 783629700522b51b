//! Backups and restores that cross engines (`aibos backup …`, `aibos restore`).
//!
//! A backup is a consistent snapshot of every table of the kernel's schema
//! (SQLite: one read transaction; PostgreSQL: one repeatable-read, read-only
//! transaction), taken while the kernel keeps serving, and written in the
//! engine-neutral form of [`format`]: per table a zstd-compressed NDJSON
//! stream, and a manifest with each dataset's row count and SHA-256 and every
//! tenant's audit chain head. Nothing is held in memory but bounded chunks, so
//! the size of the database does not matter.
//!
//! [`verify`] re-reads every dataset, recomputes its hash and re-verifies each
//! audit chain inside the backup. [`restore`] loads a backup into an empty
//! database of either engine in one transaction, checking every hash and
//! chain as it reads, so a backup that does not verify leaves the target as it
//! was. Backups are written to `<dir>/.<id>.partial/` and renamed to
//! `<dir>/<id>/` once complete: a crash mid-way never leaves a backup that
//! looks whole.
//!
//! The backup holds what the database holds: signing seeds and secrets sealed
//! by the master key, password hashes. Its folder is created `0700`; a restore
//! needs the master key the manifest names.

pub mod format;
pub mod schedule;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::db::{Db, migrate};
use crate::limits;
use format::{ColumnManifest, DatasetManifest, FormatError, Manifest, NeutralKind};
use store::{Batch, Conn, SourceKind, Table};

/// Why a backup, a verification or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The database refused or failed a statement.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A migration of the restore target failed.
    #[error("{0}")]
    Migration(#[from] migrate::MigrationError),
    /// The backup on disk is damaged or not one this kernel reads.
    #[error("{0}")]
    Format(#[from] FormatError),
    /// The schema holds something a backup cannot carry, or the target's does
    /// not match the backup's.
    #[error("schema: {0}")]
    Schema(String),
    /// A folder could not be created, read or renamed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No backup with that id in the folder.
    #[error("no backup {id} in {dir}")]
    NotFound {
        /// The id asked for.
        id: String,
        /// The folder searched.
        dir: String,
    },
    /// The id is not one `backup run` makes.
    #[error("{0:?} is not a backup id (they look like 20261206T180000Z-1a2b3c)")]
    InvalidId(String),
    /// The restore target holds data of its own.
    #[error(
        "the target database is not empty ({0}); restore into an empty database, or pass --force to replace it after a safety backup"
    )]
    TargetNotEmpty(String),
    /// The target's configuration cannot open the secrets inside the backup.
    #[error("{0}")]
    MasterKey(String),
    /// A worker thread failed.
    #[error("{0}")]
    TaskFailed(String),
}

impl BackupError {
    fn io(path: &Path, source: std::io::Error) -> BackupError {
        BackupError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// The dataset this error names, if any (for `--json` results).
    pub fn dataset(&self) -> Option<&str> {
        match self {
            BackupError::Format(e) => e.dataset_name(),
            _ => None,
        }
    }
}

/// What a long run reports as it goes: the CLI draws progress bars or prints
/// JSON lines; the scheduled backup logs.
pub trait Progress: Send + Sync {
    /// A dataset begins; `rows` is how many it holds (known in advance).
    fn dataset_started(&self, name: &str, rows: u64);
    /// `rows` more rows of the current dataset are done.
    fn rows_done(&self, rows: u64);
    /// The current dataset is done.
    fn dataset_finished(&self, name: &str, rows: u64);
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn dataset_started(&self, _: &str, _: u64) {}
    fn rows_done(&self, _: u64) {}
    fn dataset_finished(&self, _: &str, _: u64) {}
}

/// A backup found in a folder.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    /// Its id.
    pub id: String,
    /// Its folder.
    pub path: String,
    /// Its manifest, when it reads.
    #[serde(flatten)]
    pub summary: Option<Summary>,
    /// Why its manifest does not read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The figures of one backup.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// `sqlite` or `postgres`.
    pub engine: String,
    /// The schema version.
    pub schema_version: i64,
    /// The kernel version that took it.
    pub kernel_version: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it ended (RFC 3339).
    pub finished_at: String,
    /// Rows across datasets.
    pub rows: u64,
    /// Bytes on disk.
    pub bytes: u64,
}

impl Summary {
    /// The figures of `manifest`.
    pub fn of(manifest: &Manifest) -> Summary {
        Summary {
            engine: manifest.engine.clone(),
            schema_version: manifest.schema_version,
            kernel_version: manifest.kernel_version.clone(),
            started_at: manifest.started_at.clone(),
            finished_at: manifest.finished_at.clone(),
            rows: manifest.datasets.iter().map(|d| d.rows).sum(),
            bytes: manifest.datasets.iter().map(|d| d.compressed_bytes).sum(),
        }
    }
}

/// A new backup id: its start time (so ids sort in time) and 24 random bits.
fn new_id(now: time::OffsetDateTime) -> String {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let stamp = now.format(&format).unwrap_or_default();
    let random = uuid::Uuid::new_v4();
    format!("{stamp}-{}", &format::hex(&random.as_bytes()[..3]))
}

/// The start time an id records.
fn started_at(id: &str) -> Option<time::OffsetDateTime> {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    time::PrimitiveDateTime::parse(id.get(..16)?, &format)
        .ok()
        .map(time::PrimitiveDateTime::assume_utc)
}

/// Whether `id` has the shape [`new_id`] gives (and so names no other path).
pub fn is_valid_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 23
        && b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'T'
        && b[9..15].iter().all(u8::is_ascii_digit)
        && b[15] == b'Z'
        && b[16] == b'-'
        && b[17..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// The folder of backup `id` in `dir`, once the id is checked and the backup exists.
pub fn backup_path(dir: &Path, id: &str) -> Result<PathBuf, BackupError> {
    if !is_valid_id(id) {
        return Err(BackupError::InvalidId(id.to_owned()));
    }
    let path = dir.join(id);
    if !path.join(format::MANIFEST_FILE).is_file() {
        return Err(BackupError::NotFound {
            id: id.to_owned(),
            dir: dir.display().to_string(),
        });
    }
    Ok(path)
}

/// The order a dataset's rows are written in: by tenant then position for the
/// audit trail (so each chain verifies as it streams), else by primary key,
/// else by every column.
fn order_of(table: &Table) -> Vec<String> {
    if table.name == "audit_log" {
        return vec!["tenant_id".to_owned(), "seq".to_owned()];
    }
    if table.key.is_empty() {
        table.columns.iter().map(|(n, _)| n.clone()).collect()
    } else {
        table.key.clone()
    }
}

/// Takes a backup of `db` into a new folder of `dir`; returns its manifest and folder.
pub async fn run(
    db: &Db,
    dir: &Path,
    master_key_id: Option<String>,
    progress: Arc<dyn Progress>,
) -> Result<(Manifest, PathBuf), BackupError> {
    create_private_dir(dir)?;
    let started = crate::timestamp::now();
    let id = new_id(started);
    let partial = dir.join(format!(".{id}.partial"));
    create_private_dir(&partial)?;
    let result = write_backup(db, &partial, &id, started, master_key_id, progress).await;
    let manifest = match result {
        Ok(manifest) => manifest,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    let done = dir.join(&id);
    std::fs::rename(&partial, &done).map_err(|e| BackupError::io(&done, e))?;
    sync_dir(dir)?;
    Ok((manifest, done))
}

async fn write_backup(
    db: &Db,
    folder: &Path,
    id: &str,
    started: time::OffsetDateTime,
    master_key_id: Option<String>,
    progress: Arc<dyn Progress>,
) -> Result<Manifest, BackupError> {
    let mut conn = Conn::snapshot(db).await?;
    let schema_version = conn.schema_version().await?;
    let tables = conn.tables().await?;
    let audit_heads = conn.audit_heads().await?;
    let mut datasets = Vec::with_capacity(tables.len());
    for (i, table) in tables.iter().enumerate() {
        let rows_expected = conn.count(&table.name).await?;
        progress.dataset_started(&table.name, rows_expected);
        let file = format!("{:02}-{}.ndjson.zst", i + 1, table.name);
        let path = folder.join(&file);
        let (chunks, mut received) = mpsc::channel::<store::Chunk>(limits::BACKUP_CHUNKS_IN_FLIGHT);
        let writer_progress = progress.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut writer = format::DatasetWriter::create(&path)?;
            while let Some(chunk) = received.blocking_recv() {
                writer.write(&chunk.bytes)?;
                writer_progress.rows_done(chunk.rows);
            }
            writer.finish()
        });
        let order_by = order_of(table);
        let read = conn.read_rows(table, &order_by, &chunks).await;
        drop(chunks);
        let written = writer
            .await
            .map_err(|e| BackupError::TaskFailed(format!("a dataset's writer failed: {e}")))?;
        let rows = read?;
        let written = written?;
        progress.dataset_finished(&table.name, rows);
        datasets.push(DatasetManifest {
            name: table.name.clone(),
            file,
            columns: table
                .columns
                .iter()
                .map(|(name, kind)| ColumnManifest {
                    name: name.clone(),
                    kind: match kind {
                        SourceKind::Text => NeutralKind::Text,
                        SourceKind::Integer | SourceKind::Boolean => NeutralKind::Integer,
                    },
                })
                .collect(),
            order_by,
            rows,
            sha256: written.sha256,
            bytes: written.bytes,
            compressed_bytes: written.compressed_bytes,
        });
    }
    // Read-only: nothing to keep.
    conn.rollback().await;
    let manifest = Manifest {
        format: format::FORMAT_NAME.to_owned(),
        format_version: format::FORMAT_VERSION,
        id: id.to_owned(),
        kernel_version: env!("CARGO_PKG_VERSION").to_owned(),
        schema_version,
        engine: db.engine().to_string(),
        started_at: crate::timestamp::format(started),
        finished_at: crate::timestamp::format(crate::timestamp::now()),
        master_key_id,
        datasets,
        audit_heads,
    };
    format::write_manifest(folder, &manifest)?;
    sync_dir(folder)?;
    Ok(manifest)
}

/// The backups in `dir`, oldest first; one whose manifest does not read is
/// listed with its problem.
pub fn list(dir: &Path) -> Result<Vec<Listed>, BackupError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(BackupError::io(dir, e)),
    };
    let mut ids: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| is_valid_id(name))
        .take(limits::BACKUP_LIST_MAX)
        .collect();
    ids.sort();
    Ok(ids
        .into_iter()
        .map(|id| {
            let path = dir.join(&id);
            let (summary, problem) = match format::read_manifest(&path) {
                Ok(manifest) => (Some(Summary::of(&manifest)), None),
                Err(e) => (None, Some(e.to_string())),
            };
            Listed {
                id,
                path: path.display().to_string(),
                summary,
                problem,
            }
        })
        .collect())
}

/// Re-reads backup `id` whole: every dataset's rows and hash against the
/// manifest, every audit chain inside it. Returns its manifest.
pub async fn verify(
    dir: &Path,
    id: &str,
    progress: Arc<dyn Progress>,
) -> Result<Manifest, BackupError> {
    let folder = backup_path(dir, id)?;
    let manifest = format::read_manifest(&folder)?;
    check_manifest_id(&manifest, id)?;
    let checked = manifest.clone();
    tokio::task::spawn_blocking(move || {
        for dataset in &checked.datasets {
            progress.dataset_started(&dataset.name, dataset.rows);
            let mut pending = 0u64;
            format::read_dataset(&folder, dataset, &checked.audit_heads, |_| {
                pending += 1;
                if pending == 4096 {
                    progress.rows_done(pending);
                    pending = 0;
                }
                Ok(())
            })?;
            progress.rows_done(pending);
            progress.dataset_finished(&dataset.name, dataset.rows);
        }
        Ok::<_, BackupError>(())
    })
    .await
    .map_err(|e| BackupError::TaskFailed(format!("the verification failed: {e}")))??;
    Ok(manifest)
}

fn check_manifest_id(manifest: &Manifest, id: &str) -> Result<(), BackupError> {
    if manifest.id == id {
        Ok(())
    } else {
        Err(FormatError::Manifest(format!(
            "it names backup {}, but its folder is {id}",
            manifest.id
        ))
        .into())
    }
}

/// How a restore went, or would go.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// The backup restored.
    pub id: String,
    /// Nothing was written.
    pub dry_run: bool,
    /// The backup of the target taken first (`--force` on a non-empty target).
    pub safety_backup: Option<String>,
    /// Per dataset: rows in the backup, and in the target before.
    pub datasets: Vec<RestoredDataset>,
    /// Wall time, start to commit.
    pub seconds: f64,
}

/// One dataset of a [`RestoreReport`].
#[derive(Debug, Clone, Serialize)]
pub struct RestoredDataset {
    /// The table.
    pub name: String,
    /// Rows the backup holds (restored, or to restore).
    pub rows: u64,
    /// Rows the target held before (replaced, or to replace).
    pub target_rows_before: u64,
}

/// What a restore may do.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Verify and compare only.
    pub dry_run: bool,
    /// Replace a target that is not empty (after a safety backup).
    pub force: bool,
}

/// Restores backup `id` of `dir` into `target` (either engine): migrates the
/// target, refuses one that is not empty unless forced (then backs it up into
/// `dir` first), and loads every dataset in one transaction that commits only
/// if every hash and every audit chain verified.
pub async fn restore(
    target: &Db,
    dir: &Path,
    id: &str,
    master_keys: Option<&crate::secrets::MasterKeys>,
    options: RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreReport, BackupError> {
    let started = Instant::now();
    let folder = backup_path(dir, id)?;
    let manifest = format::read_manifest(&folder)?;
    check_manifest_id(&manifest, id)?;
    if let (Some(keys), Some(needed)) = (master_keys, manifest.master_key_id.as_deref())
        && !keys.knows(needed)
    {
        return Err(BackupError::MasterKey(format!(
            "the backup's signing seeds and secrets are sealed by master key {needed}, which the target's configuration does not hold: set auth.master_key (or its file) to that key before restoring"
        )));
    }
    let migrator = migrate::embedded(target.engine());
    migrate::up(target, migrator).await?;
    let mut snapshot = Conn::snapshot(target).await?;
    let schema_version = snapshot.schema_version().await?;
    if schema_version != manifest.schema_version {
        snapshot.rollback().await;
        return Err(BackupError::Schema(format!(
            "the backup's schema is version {}, the target's {schema_version}: restore with the kernel version that took it ({}), then upgrade",
            manifest.schema_version, manifest.kernel_version
        )));
    }
    let tables = snapshot.tables().await?;
    let matched = match_tables(&manifest, &tables);
    let mut datasets = Vec::with_capacity(manifest.datasets.len());
    let mut occupied = Vec::new();
    if let Ok(pairs) = &matched {
        for (dataset, table) in pairs {
            let before = snapshot.count(&table.name).await?;
            let own = snapshot.user_rows(&table.name).await?;
            if own > 0 {
                occupied.push(format!("{} has {own} rows", table.name));
            }
            datasets.push(RestoredDataset {
                name: dataset.name.clone(),
                rows: dataset.rows,
                target_rows_before: before,
            });
        }
    }
    snapshot.rollback().await;
    let pairs = matched?;
    if !occupied.is_empty() && !options.force && !options.dry_run {
        return Err(BackupError::TargetNotEmpty(occupied.join(", ")));
    }
    if options.dry_run {
        verify(dir, id, progress).await?;
        return Ok(RestoreReport {
            id: id.to_owned(),
            dry_run: true,
            safety_backup: None,
            datasets,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    let safety_backup = if occupied.is_empty() {
        None
    } else {
        let key_id = master_keys.map(|k| k.current().id().to_owned());
        let (safety, _) = run(target, dir, key_id, Arc::new(Silent)).await?;
        Some(safety.id)
    };
    let mut conn = Conn::load(target).await?;
    let loaded = load(&mut conn, &folder, &manifest, &pairs, progress).await;
    match loaded {
        Ok(()) => conn.commit().await?,
        Err(e) => {
            conn.rollback().await;
            return Err(e);
        }
    }
    Ok(RestoreReport {
        id: id.to_owned(),
        dry_run: false,
        safety_backup,
        datasets,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Pairs each dataset with the target's table of the same name and columns;
/// the target must have exactly the backup's tables.
fn match_tables<'m>(
    manifest: &'m Manifest,
    tables: &[Table],
) -> Result<Vec<(&'m DatasetManifest, Table)>, BackupError> {
    let mut pairs = Vec::with_capacity(manifest.datasets.len());
    for dataset in &manifest.datasets {
        let table = tables
            .iter()
            .find(|t| t.name == dataset.name)
            .ok_or_else(|| {
                BackupError::Schema(format!(
                    "the target has no table {} that the backup holds",
                    dataset.name
                ))
            })?;
        let target: Vec<&str> = table.columns.iter().map(|(n, _)| n.as_str()).collect();
        let backed: Vec<&str> = dataset.columns.iter().map(|c| c.name.as_str()).collect();
        if target != backed {
            return Err(BackupError::Schema(format!(
                "table {} has the columns {} in the target and {} in the backup",
                dataset.name,
                target.join(", "),
                backed.join(", ")
            )));
        }
        pairs.push((dataset, table.clone()));
    }
    if let Some(extra) = tables
        .iter()
        .find(|t| !manifest.datasets.iter().any(|d| d.name == t.name))
    {
        return Err(BackupError::Schema(format!(
            "the target has a table {} that the backup does not hold",
            extra.name
        )));
    }
    Ok(pairs)
}

/// Empties the target's tables and loads every dataset, verifying as it reads.
async fn load(
    conn: &mut Conn,
    folder: &Path,
    manifest: &Manifest,
    pairs: &[(&DatasetManifest, Table)],
    progress: Arc<dyn Progress>,
) -> Result<(), BackupError> {
    let triggers = conn.suspend_triggers().await?;
    for (_, table) in pairs.iter().rev() {
        conn.clear(&table.name).await?;
    }
    let tables: Vec<Table> = pairs.iter().map(|(_, t)| t.clone()).collect();
    let indexes = conn.drop_indexes(&tables).await?;
    for (dataset, table) in pairs {
        progress.dataset_started(&dataset.name, dataset.rows);
        // The reader (decompress, hash, decode, verify the chains) runs on a
        // thread of its own while the loader sends the rows before: neither
        // waits for the other but when the channel is full or empty.
        let (batches, mut received) = mpsc::channel::<Batch>(limits::BACKUP_CHUNKS_IN_FLIGHT);
        let reader = {
            let folder = folder.to_owned();
            let dataset = (*dataset).clone();
            let heads = manifest.audit_heads.clone();
            tokio::task::spawn_blocking(move || {
                let mut batch = Vec::new();
                let mut batch_bytes = 0usize;
                let read = format::read_dataset(&folder, &dataset, &heads, |row| {
                    batch_bytes += row
                        .iter()
                        .map(|v| v.as_text().map_or(8, str::len))
                        .sum::<usize>();
                    batch.push(row);
                    if batch.len() >= limits::BACKUP_INSERT_ROWS_MAX
                        || batch_bytes >= limits::BACKUP_INSERT_BYTES_MAX
                    {
                        batch_bytes = 0;
                        batches
                            .blocking_send(Ok(std::mem::take(&mut batch)))
                            .map_err(|_| stopped(&dataset.name))?;
                    }
                    Ok(())
                })
                .and_then(|()| {
                    if batch.is_empty() {
                        return Ok(());
                    }
                    batches
                        .blocking_send(Ok(batch))
                        .map_err(|_| stopped(&dataset.name))
                });
                match read {
                    Ok(()) => Ok(()),
                    // The loader aborts its COPY and reports the damage.
                    Err(damage) => match batches.blocking_send(Err(damage)) {
                        Ok(()) => Ok(()),
                        Err(mpsc::error::SendError(unsent)) => unsent.map(|_| ()),
                    },
                }
            })
        };
        let columns: Vec<String> = dataset.columns.iter().map(|c| c.name.clone()).collect();
        let inserted = conn
            .insert_batches(table, &columns, &mut received, |rows| {
                progress.rows_done(rows);
            })
            .await;
        drop(received);
        let read = reader
            .await
            .map_err(|e| BackupError::TaskFailed(format!("a dataset's reader failed: {e}")))?;
        // The database's refusal explains more than the reader's "stopped".
        inserted?;
        read?;
        progress.dataset_finished(&dataset.name, dataset.rows);
    }
    conn.rebuild_indexes(indexes).await?;
    for (_, table) in pairs {
        conn.reset_sequences(table).await?;
    }
    conn.restore_triggers(triggers).await?;
    Ok(())
}

fn stopped(dataset: &str) -> FormatError {
    FormatError::Dataset {
        dataset: dataset.to_owned(),
        problem: "the restore stopped while it was being read".to_owned(),
    }
}

/// Which backups retention removes: all but the `keep_last` newest and those
/// younger than `keep_days` (a backup kept by either rule stays). Without
/// either rule nothing is removed. Returns the ids removed.
pub fn prune(
    dir: &Path,
    keep_last: Option<usize>,
    keep_days: Option<u32>,
    now: time::OffsetDateTime,
) -> Result<Vec<String>, BackupError> {
    if keep_last.is_none() && keep_days.is_none() {
        return Ok(Vec::new());
    }
    let listed = list(dir)?;
    let newest_first: Vec<&Listed> = listed.iter().rev().collect();
    let mut removed = Vec::new();
    for (age_rank, backup) in newest_first.iter().enumerate() {
        let kept_by_count = keep_last.is_some_and(|n| age_rank < n);
        // The age comes from the id (its start time), so a backup whose
        // manifest cannot be read is never removed for want of a date.
        let kept_by_age = keep_days.is_some_and(|days| {
            started_at(&backup.id)
                .is_none_or(|started| now - started < Duration::from_secs(u64::from(days) * 86_400))
        });
        if !kept_by_count && !kept_by_age {
            let path = dir.join(&backup.id);
            std::fs::remove_dir_all(&path).map_err(|e| BackupError::io(&path, e))?;
            removed.push(backup.id.clone());
        }
    }
    if !removed.is_empty() {
        sync_dir(dir)?;
    }
    Ok(removed)
}

fn create_private_dir(path: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(BackupError::io(path, e)),
    }
}

fn sync_dir(path: &Path) -> Result<(), BackupError> {
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| BackupError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_what_either_rule_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let now = time::macros::datetime!(2026-12-10 12:00:00 UTC);
        let ids = [
            "20261201T120000Z-aaaaaa",
            "20261205T120000Z-bbbbbb",
            "20261209T120000Z-cccccc",
            "20261210T110000Z-dddddd",
        ];
        for id in ids {
            std::fs::create_dir(dir.path().join(id)).unwrap();
        }
        std::fs::create_dir(dir.path().join(".20261210T115900Z-eeeeee.partial")).unwrap();
        assert!(prune(dir.path(), None, None, now).unwrap().is_empty());
        // The newest one by count, the last 3 days by age.
        let removed = prune(dir.path(), Some(1), Some(3), now).unwrap();
        assert_eq!(
            removed,
            ["20261205T120000Z-bbbbbb", "20261201T120000Z-aaaaaa"]
        );
        let left: Vec<_> = list(dir.path())
            .unwrap()
            .into_iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(left, ["20261209T120000Z-cccccc", "20261210T110000Z-dddddd"]);
        assert_eq!(
            prune(dir.path(), Some(1), None, now).unwrap(),
            ["20261209T120000Z-cccccc"]
        );
        assert!(
            dir.path().join(".20261210T115900Z-eeeeee.partial").is_dir(),
            "partial folders are not retention's"
        );
    }

    #[test]
    fn ids_sort_in_time_and_name_no_other_path() {
        let a = new_id(time::macros::datetime!(2026-12-06 18:00:00 UTC));
        let b = new_id(time::macros::datetime!(2026-12-06 18:00:01 UTC));
        assert!(is_valid_id(&a), "{a}");
        assert!(a < b);
        assert!(a.starts_with("20261206T180000Z-"));
        for bad in [
            "",
            "..",
            "../20261206T180000Z-abcdef",
            "20261206T180000Z-ABCDEF",
            "20261206T180000Z-abcdef/x",
        ] {
            assert!(!is_valid_id(bad), "{bad}");
        }
    }
}
