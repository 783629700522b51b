//! The database handle over two engines.
//!
//! [`Db`] is an enum of two concrete pools rather than sqlx's `Any` driver: each
//! arm compiles against its own driver (so PostgreSQL keeps `LISTEN/NOTIFY` and
//! real types), while the SQL text is shared through [`with_db!`]. Engine-specific
//! DDL lives in `migrations/sqlite/` and `migrations/postgres/`.
//!
//! *Architecture invariant*: only this module and files named `store.rs` contain SQL.

pub mod admin;
pub mod group;
pub mod migrate;
pub mod tx;

pub use tx::{Tx, TxFuture};

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::config::{DatabaseConfig, Engine};

/// A pooled connection to the kernel's database, on either engine. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Db {
    /// Embedded SQLite (WAL, `synchronous=FULL`, foreign keys on).
    Sqlite(SqliteDb),
    /// PostgreSQL.
    Postgres(PgPool),
}

/// SQLite's pool, and the group-commit writer that runs its [`Db::write`]s.
#[derive(Clone, Debug)]
pub struct SqliteDb {
    /// Reads, and the few writes that take no transaction.
    pub pool: SqlitePool,
    /// Every [`Db::write`] transaction (`group.rs`).
    pub writer: group::GroupCommit,
}

/// Runs the same body against whichever pool `db` holds; `$pool` is bound to the
/// concrete pool in each arm, so the body compiles once per driver.
#[macro_export]
macro_rules! with_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Db::Sqlite($crate::db::SqliteDb { pool: $pool, .. }) => $body,
            $crate::db::Db::Postgres($pool) => $body,
        }
    };
}

/// Why the database could not be reached or used.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The SQLite file's folder could not be created.
    #[error("cannot create the database folder {path}: {source}")]
    CreateFolder {
        /// The folder.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// The driver refused the URL or the connection.
    #[error("cannot connect to the database ({engine}): {source}")]
    Connect {
        /// Which engine.
        engine: Engine,
        /// The driver error.
        source: sqlx::Error,
    },
    /// A query failed.
    #[error(transparent)]
    Query(#[from] sqlx::Error),
    /// The database did not answer in time.
    #[error("the database did not answer within {0} ms")]
    Timeout(u64),
    /// The database is unreachable or refused its lock (see [`is_unavailable`]),
    /// passed on by the group-commit writer to every write of the batch.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// A transaction's task panicked or was cancelled by shutdown; it was rolled back.
    #[error("a database transaction did not complete: {0}")]
    TaskFailed(String),
}

impl Db {
    /// Opens a pool for `config.url`, creating a SQLite file and its folder if missing.
    pub async fn connect(config: &DatabaseConfig) -> Result<Db, DbError> {
        let url = config.url.expose();
        let acquire_timeout = Duration::from_millis(config.acquire_timeout_ms);
        match config.url.engine() {
            Engine::Sqlite => {
                let options = SqliteConnectOptions::from_str(url)
                    .map_err(|source| DbError::Connect {
                        engine: Engine::Sqlite,
                        source,
                    })?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .foreign_keys(true)
                    .busy_timeout(Duration::from_millis(config.busy_timeout_ms));
                if let Some(folder) = options
                    .get_filename()
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                {
                    create_folder(folder)?;
                }
                let pool = SqlitePoolOptions::new()
                    .max_connections(config.max_connections)
                    .min_connections(config.min_connections)
                    .acquire_timeout(acquire_timeout)
                    .connect_with(options)
                    .await
                    .map_err(|source| DbError::Connect {
                        engine: Engine::Sqlite,
                        source,
                    })?;
                let writer = group::GroupCommit::start(group::WriterPool::Sqlite(pool.clone()));
                Ok(Db::Sqlite(SqliteDb { pool, writer }))
            }
            Engine::Postgres => {
                let options = PgConnectOptions::from_str(url)
                    .map_err(|source| DbError::Connect {
                        engine: Engine::Postgres,
                        source,
                    })?
                    .options([("statement_timeout", config.statement_timeout_ms.to_string())])
                    .application_name("aibos");
                let pool = PgPoolOptions::new()
                    .max_connections(config.max_connections)
                    .min_connections(config.min_connections)
                    .acquire_timeout(acquire_timeout)
                    .connect_with(options)
                    .await
                    .map_err(|source| DbError::Connect {
                        engine: Engine::Postgres,
                        source,
                    })?;
                Ok(Db::Postgres(pool))
            }
        }
    }

    /// Which engine this handle talks to.
    pub fn engine(&self) -> Engine {
        match self {
            Db::Sqlite(_) => Engine::Sqlite,
            Db::Postgres(_) => Engine::Postgres,
        }
    }

    /// A real round trip bounded by `timeout`; returns its latency.
    ///
    /// PostgreSQL: `SELECT 1` on a pooled connection. SQLite: `SELECT 1`
    /// never touches the file, so it would pass while another process holds
    /// the database's lock or the disk refuses it; the probe goes through
    /// the group-commit writer as a write does — it takes the write lock
    /// (`BEGIN IMMEDIATE`) and reads the schema's first page — and commits
    /// nothing (no log frame, no fsync). A probe that times out is only a
    /// caller that stopped waiting: the writer finishes its batch as always.
    pub async fn ping(&self, timeout: Duration) -> Result<Duration, DbError> {
        let started = Instant::now();
        let round_trip = async {
            match self {
                Db::Sqlite(sqlite) => {
                    sqlite
                        .writer
                        .write(|tx| {
                            Box::pin(async move {
                                crate::with_tx!(tx, conn => sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sqlite_schema WHERE rowid = 1").fetch_one(&mut *conn).await)
                                    .map_err(DbError::Query)?;
                                Ok::<_, DbError>(())
                            })
                        })
                        .await
                }
                Db::Postgres(pool) => sqlx::query_scalar::<_, i32>("SELECT 1")
                    .fetch_one(pool)
                    .await
                    .map(|_| ())
                    .map_err(DbError::Query),
            }
        };
        match tokio::time::timeout(timeout, round_trip).await {
            Ok(Ok(())) => Ok(started.elapsed()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DbError::Timeout(
                u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            )),
        }
    }

    /// `(idle, in_use)` connections of the pool right now.
    pub fn pool_state(&self) -> (u32, u32) {
        let (size, idle) = with_db!(self, pool => (pool.size(), u32::try_from(pool.num_idle()).unwrap_or(u32::MAX)));
        (idle, size.saturating_sub(idle))
    }

    /// Closes every connection; pending acquires fail.
    pub async fn close(&self) {
        with_db!(self, pool => pool.close().await);
    }
}

/// Whether a driver error says the database is unavailable rather than
/// the statement wrong: a 503 to be retried, not a 500.
///
/// - the pool gave no connection in time, or is closed; the connection broke;
/// - PostgreSQL cancelled the statement (SQLSTATE 57014): it ran past
///   `database.statement_timeout_ms`, typically waiting for a lock behind a
///   slow database (`aibos chaos run --scenario db.latency.500ms` found the 500);
/// - SQLite's `SQLITE_BUSY` or `SQLITE_LOCKED` (primary codes 5 and 6, with
///   their extended codes): the write lock stayed taken past
///   `database.busy_timeout_ms`, by another process (an operator's `sqlite3`
///   shell in a transaction, a copying tool) (`aibos chaos run --scenario
///   db.down --engine sqlite` found the 500).
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    const SQLITE_BUSY: i64 = 5;
    const SQLITE_LOCKED: i64 = 6;
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => {
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                db.code()
                    .and_then(|code| code.parse::<i64>().ok())
                    .is_some_and(|code| matches!(code & 0xff, SQLITE_BUSY | SQLITE_LOCKED))
            } else {
                db.code().as_deref() == Some("57014")
            }
        }
        _ => false,
    }
}

/// Whether `name` is a lowercase ASCII word of at most 63 bytes (PostgreSQL's
/// identifier limit) not starting with a digit: the only names the kernel's
/// tools put into SQL text (tables, columns, databases), so they need no
/// quoting rules of either engine.
pub fn is_plain_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
}

fn create_folder(folder: &Path) -> Result<(), DbError> {
    std::fs::create_dir_all(folder).map_err(|source| DbError::CreateFolder {
        path: folder.display().to_string(),
        source,
    })
}
