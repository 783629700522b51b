//! The hub's database on either engine, in the kernel's manner: an enum of two
//! concrete pools, one SQL text (`$1` placeholders) run against either through
//! `with_read!` / `with_tx!`, and per-engine migrations embedded in the binary.
//!
//! SQLite serialises writers anyway, so the hub keeps **one writer connection**
//! (every write transaction queues for it in the pool, in Rust, instead of
//! spinning on `SQLITE_BUSY`) beside a pool of readers (WAL lets them read
//! while the writer writes).

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Postgres, Sqlite, Transaction};

use crate::limits::{DB_ACQUIRE_TIMEOUT, SQLITE_BUSY_TIMEOUT};

/// The SQLite migrations.
pub static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
/// The PostgreSQL migrations.
pub static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// Which engine a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// `sqlite:` URLs.
    Sqlite,
    /// `postgres://` or `postgresql://` URLs.
    Postgres,
}

impl Engine {
    /// The engine of `url`, or `None` for anything else.
    pub fn of_url(url: &str) -> Option<Engine> {
        if url.starts_with("sqlite:") {
            Some(Engine::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Engine::Postgres)
        } else {
            None
        }
    }
}

/// The hub's pools. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Db {
    /// SQLite in WAL mode, `synchronous=FULL`, foreign keys on.
    Sqlite {
        /// Exactly one connection: all write transactions.
        writer: SqlitePool,
        /// Reads.
        reader: SqlitePool,
    },
    /// PostgreSQL: one pool for both.
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the pool reads use.
macro_rules! with_read {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Db::Sqlite { reader: $pool, .. } => $body,
            $crate::db::Db::Postgres($pool) => $body,
        }
    };
}
pub(crate) use with_read;

/// Runs `$body` with `$conn` bound to the transaction's connection.
macro_rules! with_tx {
    ($tx:expr, $conn:ident => $body:expr) => {
        match $tx {
            $crate::db::Tx::Sqlite(t) => {
                let $conn = &mut **t;
                $body
            }
            $crate::db::Tx::Postgres(t) => {
                let $conn = &mut **t;
                $body
            }
        }
    };
}
pub(crate) use with_tx;

/// An open write transaction.
pub enum Tx {
    /// SQLite, begun with `BEGIN IMMEDIATE` on the writer.
    Sqlite(Transaction<'static, Sqlite>),
    /// PostgreSQL.
    Postgres(Transaction<'static, Postgres>),
}

/// The future a [`Db::write`] body returns.
pub type TxFuture<'t, T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 't>>;

/// Why the database could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL names no supported engine.
    #[error("the database URL must start with sqlite: or postgres://")]
    UnsupportedUrl,
    /// The SQLite file's folder could not be created.
    #[error("cannot create the database folder {path}: {source}")]
    CreateFolder {
        /// The folder.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// The driver refused the URL or the connection.
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    /// Migrating failed.
    #[error("cannot migrate the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A statement failed.
    #[error(transparent)]
    Query(#[from] sqlx::Error),
    /// A transaction's task panicked or was aborted; it was rolled back.
    #[error("a database transaction did not complete: {0}")]
    TaskFailed(String),
}

impl Db {
    /// Opens the pools for `url` (creating a SQLite file and its folder) and
    /// applies the embedded migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, DbError> {
        match Engine::of_url(url).ok_or(DbError::UnsupportedUrl)? {
            Engine::Sqlite => {
                let options = SqliteConnectOptions::from_str(url)
                    .map_err(DbError::Connect)?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .foreign_keys(true)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT);
                if let Some(folder) = options
                    .get_filename()
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                {
                    std::fs::create_dir_all(folder).map_err(|source| DbError::CreateFolder {
                        path: folder.display().to_string(),
                        source,
                    })?;
                }
                let writer = SqlitePoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .acquire_timeout(DB_ACQUIRE_TIMEOUT)
                    .connect_with(options.clone())
                    .await
                    .map_err(DbError::Connect)?;
                SQLITE_MIGRATIONS.run(&writer).await?;
                let reader = SqlitePoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(DB_ACQUIRE_TIMEOUT)
                    .connect_with(options)
                    .await
                    .map_err(DbError::Connect)?;
                Ok(Db::Sqlite { writer, reader })
            }
            Engine::Postgres => {
                let options = PgConnectOptions::from_str(url)
                    .map_err(DbError::Connect)?
                    .application_name("payment-hub");
                let pool = PgPoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(DB_ACQUIRE_TIMEOUT)
                    .connect_with(options)
                    .await
                    .map_err(DbError::Connect)?;
                POSTGRES_MIGRATIONS.run(&pool).await?;
                Ok(Db::Postgres(pool))
            }
        }
    }

    /// Which engine this is.
    pub fn engine(&self) -> Engine {
        match self {
            Db::Sqlite { .. } => Engine::Sqlite,
            Db::Postgres(_) => Engine::Postgres,
        }
    }

    /// A `SELECT 1` within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let round_trip = async {
            with_read!(self, pool => sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(pool).await)
        };
        matches!(tokio::time::timeout(timeout, round_trip).await, Ok(Ok(1)))
    }

    /// Closes every connection.
    pub async fn close(&self) {
        match self {
            Db::Sqlite { writer, reader } => {
                writer.close().await;
                reader.close().await;
            }
            Db::Postgres(pool) => pool.close().await,
        }
    }

    async fn begin(&self) -> Result<Tx, sqlx::Error> {
        match self {
            // IMMEDIATE takes the write lock up front: a read-then-write
            // transaction cannot fail midway with "database is locked".
            Db::Sqlite { writer, .. } => {
                Ok(Tx::Sqlite(writer.begin_with("BEGIN IMMEDIATE").await?))
            }
            Db::Postgres(pool) => Ok(Tx::Postgres(pool.begin().await?)),
        }
    }

    /// Runs `body` in one transaction inside a spawned task, so that a client
    /// hanging up cannot cut it in half: it commits when the body returns `Ok`
    /// and rolls back otherwise, whatever happens to the caller's future.
    pub async fn write<T, E, F>(&self, body: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
        F: for<'t> FnOnce(&'t mut Tx) -> TxFuture<'t, T, E> + Send + 'static,
    {
        let db = self.clone();
        let task = tokio::spawn(async move {
            let mut tx = db.begin().await.map_err(|e| E::from(DbError::Query(e)))?;
            match body(&mut tx).await {
                Ok(value) => {
                    tx.commit().await.map_err(|e| E::from(DbError::Query(e)))?;
                    Ok(value)
                }
                Err(e) => {
                    // Explicit, so the connection returns to the pool clean at once.
                    let _ = tx.rollback().await;
                    Err(e)
                }
            }
        });
        match task.await {
            Ok(result) => result,
            Err(join) => Err(E::from(DbError::TaskFailed(join.to_string()))),
        }
    }
}

impl Tx {
    async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.commit().await,
            Tx::Postgres(t) => t.commit().await,
        }
    }

    async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.rollback().await,
            Tx::Postgres(t) => t.rollback().await,
        }
    }
}

/// Whether `error` is a unique-constraint violation (a lost race on a key).
pub fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Whether `error` means the database is unreachable, busy or overloaded, so
/// that trying again may succeed (answered 503) rather than a bug (answered 500).
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::WorkerCrashed => true,
        // A FATAL error ends the session: the server refused or dropped the
        // connection (a database gone, a login refused, a shutdown).
        sqlx::Error::Database(db)
            if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some_and(|pg| {
                    matches!(
                        pg.severity(),
                        sqlx::postgres::PgSeverity::Fatal | sqlx::postgres::PgSeverity::Panic
                    )
                }) =>
        {
            true
        }
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // SQLite: SQLITE_BUSY (5) and SQLITE_LOCKED (6) and their extended
            // codes (another process held the file past the busy timeout).
            // PostgreSQL: connection exceptions (08), transaction rollbacks such
            // as serialization failures and deadlocks (40), insufficient
            // resources (53) and operator intervention like a shutdown (57).
            let code = code.as_ref();
            matches!(code, "5" | "6" | "261" | "262" | "517")
                || ["08", "40", "53", "57"]
                    .iter()
                    .any(|class| code.starts_with(class))
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_failures_count_as_unavailable() {
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(is_unavailable(&sqlx::Error::Io(std::io::Error::other(
            "reset"
        ))));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
        assert!(!is_unavailable(&sqlx::Error::Protocol("bug".into())));
    }

    #[test]
    fn urls_name_their_engine() {
        assert_eq!(Engine::of_url("sqlite://data/hub.db"), Some(Engine::Sqlite));
        assert_eq!(Engine::of_url("sqlite::memory:"), Some(Engine::Sqlite));
        assert_eq!(Engine::of_url("postgres://u@h/db"), Some(Engine::Postgres));
        assert_eq!(
            Engine::of_url("postgresql://u@h/db"),
            Some(Engine::Postgres)
        );
        assert_eq!(Engine::of_url("mysql://u@h/db"), None);
    }

    #[tokio::test]
    async fn sqlite_opens_in_wal_with_full_sync_foreign_keys_and_one_writer() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("a/b/hub.db").display());
        let db = Db::connect(&url, 4).await.expect("opens and migrates");
        let Db::Sqlite { writer, reader } = &db else {
            panic!("sqlite")
        };
        assert_eq!(writer.options().get_max_connections(), 1);
        assert_eq!(reader.options().get_max_connections(), 4);
        for pool in [writer, reader] {
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(pool)
                .await
                .expect("pragma");
            assert_eq!(mode, "wal");
            let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(pool)
                .await
                .expect("pragma");
            assert_eq!(sync, 2, "FULL");
            let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
                .fetch_one(pool)
                .await
                .expect("pragma");
            assert_eq!(fk, 1);
            let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
                .fetch_one(pool)
                .await
                .expect("pragma");
            assert_eq!(busy, 5_000);
        }
        assert!(db.ping(Duration::from_secs(1)).await);
        // A second start finds the migrations applied.
        db.close().await;
        let again = Db::connect(&url, 4).await.expect("reopens");
        again.close().await;
    }
}
