//! Schema migrations: per-engine, reversible, recorded with checksums.
//!
//! The SQL lives in `migrations/sqlite/` and `migrations/postgres/` as
//! `NNNN_name.up.sql` / `NNNN_name.down.sql` pairs with the same numbers in both,
//! embedded in the binary. sqlx records each applied migration with a SHA-384
//! checksum in `_sqlx_migrations`; an applied migration whose SQL changed since
//! is refused before anything runs.

use serde::Serialize;
use sqlx::migrate::{Migrate, MigrateError, Migrator};

use super::Db;
use crate::config::Engine;
use crate::limits;
use crate::with_db;

/// The SQLite migrations, embedded at build time.
pub static SQLITE: Migrator = sqlx::migrate!("../../migrations/sqlite");
/// The PostgreSQL migrations, embedded at build time.
pub static POSTGRES: Migrator = sqlx::migrate!("../../migrations/postgres");

/// The embedded migrations for `engine`.
pub fn embedded(engine: Engine) -> &'static Migrator {
    match engine {
        Engine::Sqlite => &SQLITE,
        Engine::Postgres => &POSTGRES,
    }
}

/// One migration and whether the database has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationStatus {
    /// Version number (the file's prefix).
    pub version: i64,
    /// The file's name after the number.
    pub description: String,
    /// `applied`, `pending`, or `modified` (applied, but the SQL changed since).
    pub state: MigrationState,
}

/// Where one migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationState {
    /// Recorded in the database with the same checksum.
    Applied,
    /// Not yet run.
    Pending,
    /// Recorded, but the embedded SQL no longer matches the recorded checksum.
    Modified,
    /// Recorded in the database but unknown to this binary (a newer binary ran).
    Unknown,
}

/// Why a migration command failed, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// An applied migration's file changed after it was applied.
    #[error(
        "migration {0} was applied with different SQL than this binary carries: its file was edited after it ran. Restore the original file; schema changes belong in a new migration"
    )]
    Modified(i64),
    /// The database has migrations this binary does not know.
    #[error(
        "the database has migration {0}, which this binary does not know: it was migrated by a newer version"
    )]
    UnknownApplied(i64),
    /// A migration failed to run; nothing of it was kept.
    #[error("migration {version} failed and was rolled back: {source}")]
    Failed {
        /// Which migration.
        version: i64,
        /// The database error.
        source: sqlx::Error,
    },
    /// `--steps` out of range.
    #[error("--steps must be between 1 and {max}", max = limits::MIGRATE_DOWN_STEPS_MAX)]
    Steps,
    /// Any other database error.
    #[error("migration failed: {0}")]
    Other(#[source] MigrateError),
}

impl From<MigrateError> for MigrationError {
    fn from(e: MigrateError) -> MigrationError {
        match e {
            MigrateError::VersionMismatch(v) => MigrationError::Modified(v),
            MigrateError::VersionMissing(v) => MigrationError::UnknownApplied(v),
            MigrateError::ExecuteMigration(source, version) => {
                MigrationError::Failed { version, source }
            }
            other => MigrationError::Other(other),
        }
    }
}

impl From<sqlx::Error> for MigrationError {
    fn from(e: sqlx::Error) -> MigrationError {
        MigrationError::Other(MigrateError::Execute(e))
    }
}

/// Lists every migration, embedded or recorded, with its state, in version order.
pub async fn status(db: &Db, migrator: &Migrator) -> Result<Vec<MigrationStatus>, MigrationError> {
    let applied = with_db!(db, pool => {
        let mut conn = pool.acquire().await?;
        conn.ensure_migrations_table("_sqlx_migrations").await?;
        conn.list_applied_migrations("_sqlx_migrations").await?
    });
    let mut out: Vec<MigrationStatus> = migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| {
            let state = match applied.iter().find(|a| a.version == m.version) {
                Some(a) if a.checksum == m.checksum => MigrationState::Applied,
                Some(_) => MigrationState::Modified,
                None => MigrationState::Pending,
            };
            MigrationStatus {
                version: m.version,
                description: m.description.to_string(),
                state,
            }
        })
        .collect();
    for a in &applied {
        if !out.iter().any(|s| s.version == a.version) {
            out.push(MigrationStatus {
                version: a.version,
                description: String::new(),
                state: MigrationState::Unknown,
            });
        }
    }
    out.sort_by_key(|s| s.version);
    Ok(out)
}

/// Applies every pending migration; returns the versions applied.
pub async fn up(db: &Db, migrator: &Migrator) -> Result<Vec<i64>, MigrationError> {
    let before = status(db, migrator).await?;
    with_db!(db, pool => migrator.run(pool).await)?;
    Ok(before
        .iter()
        .filter(|s| s.state == MigrationState::Pending)
        .map(|s| s.version)
        .collect())
}

/// Reverts the last `steps` applied migrations, newest first; returns the versions reverted.
pub async fn down(db: &Db, migrator: &Migrator, steps: u32) -> Result<Vec<i64>, MigrationError> {
    if steps == 0 || steps > limits::MIGRATE_DOWN_STEPS_MAX {
        return Err(MigrationError::Steps);
    }
    let current = status(db, migrator).await?;
    if let Some(m) = current.iter().find(|s| s.state == MigrationState::Modified) {
        return Err(MigrationError::Modified(m.version));
    }
    let mut applied: Vec<i64> = current
        .iter()
        .filter(|s| s.state == MigrationState::Applied)
        .map(|s| s.version)
        .collect();
    applied.sort_unstable_by(|a, b| b.cmp(a));
    let steps = usize::try_from(steps)
        .unwrap_or(usize::MAX)
        .min(applied.len());
    let reverted: Vec<i64> = applied[..steps].to_vec();
    // `undo(target)` reverts every applied migration newer than `target`.
    let target = applied.get(steps).copied().unwrap_or(0);
    if !reverted.is_empty() {
        with_db!(db, pool => migrator.undo(pool, target).await)?;
    }
    Ok(reverted)
}

/// Records every migration as applied without running it, for a database whose
/// schema was created by other means; returns the versions recorded.
pub async fn baseline(db: &Db, migrator: &Migrator) -> Result<Vec<i64>, MigrationError> {
    let before = status(db, migrator).await?;
    with_db!(db, pool => migrator.skip(pool, None).await)?;
    Ok(before
        .iter()
        .filter(|s| s.state == MigrationState::Pending)
        .map(|s| s.version)
        .collect())
}
