//! A PostgreSQL server's administration, for tools that make throwaway
//! databases of their own (`aibos drill`, `aibos chaos`): create and drop;
//! and a SQLite database's write lock held from outside the kernel, the
//! chaos harness's database faults on SQLite.

use std::str::FromStr as _;

use std::time::Duration;

use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

use super::DbError;
use crate::config::Engine;

/// A connection to a PostgreSQL server's maintenance database.
pub struct Admin {
    pool: PgPool,
}

/// Names this module accepts for databases (see [`super::is_plain_identifier`]).
fn check_name(name: &str) -> Result<&str, DbError> {
    if super::is_plain_identifier(name) {
        Ok(name)
    } else {
        Err(DbError::Query(sqlx::Error::Protocol(format!(
            "{name:?} is not a database name these tools make"
        ))))
    }
}

impl Admin {
    /// Connects with one connection to `url` (a `postgres://` URL).
    pub async fn connect(url: &str) -> Result<Admin, DbError> {
        let options = PgConnectOptions::from_str(url).map_err(|source| DbError::Connect {
            engine: Engine::Postgres,
            source,
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(|source| DbError::Connect {
                engine: Engine::Postgres,
                source,
            })?;
        Ok(Admin { pool })
    }

    /// `CREATE DATABASE name`.
    pub async fn create_database(&self, name: &str) -> Result<(), DbError> {
        let sql = format!("CREATE DATABASE \"{}\"", check_name(name)?);
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&self.pool)
            .await
            .map_err(DbError::Query)?;
        Ok(())
    }

    /// `DROP DATABASE IF EXISTS name WITH (FORCE)`: its sessions are ended.
    pub async fn drop_database(&self, name: &str) -> Result<(), DbError> {
        let sql = format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            check_name(name)?
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&self.pool)
            .await
            .map_err(DbError::Query)?;
        Ok(())
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.pool.close().await;
    }
}

/// How long [`SqliteLock::hold`] waits for a writer that has the lock: the
/// kernel's own writes are short.
const SQLITE_LOCK_WAIT: Duration = Duration::from_secs(30);

/// A connection of its own to a SQLite database file that takes and gives
/// back its write lock, as another process would (an operator's `sqlite3`
/// shell left in a transaction, a copying tool). In WAL mode readers go on;
/// every writer waits `database.busy_timeout_ms` and is then refused.
pub struct SqliteLock {
    connection: SqliteConnection,
    held: bool,
}

impl SqliteLock {
    /// Opens `url` (an existing `sqlite://` database; never creates one).
    pub async fn open(url: &str) -> Result<SqliteLock, DbError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|source| DbError::Connect {
                engine: Engine::Sqlite,
                source,
            })?
            .create_if_missing(false)
            .busy_timeout(SQLITE_LOCK_WAIT);
        let connection = SqliteConnection::connect_with(&options)
            .await
            .map_err(|source| DbError::Connect {
                engine: Engine::Sqlite,
                source,
            })?;
        Ok(SqliteLock {
            connection,
            held: false,
        })
    }

    /// Takes the write lock (`BEGIN IMMEDIATE`) and keeps it.
    pub async fn hold(&mut self) -> Result<(), DbError> {
        if !self.held {
            sqlx::raw_sql("BEGIN IMMEDIATE")
                .execute(&mut self.connection)
                .await?;
            self.held = true;
        }
        Ok(())
    }

    /// Gives the lock back (the transaction wrote nothing).
    pub async fn release(&mut self) -> Result<(), DbError> {
        if self.held {
            sqlx::raw_sql("ROLLBACK")
                .execute(&mut self.connection)
                .await?;
            self.held = false;
        }
        Ok(())
    }

    /// Releases the lock if held, and closes the connection.
    pub async fn close(mut self) {
        let _ = self.release().await;
        let _ = self.connection.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DatabaseConfig, DatabaseUrl};
    use crate::db::Db;
    use crate::error::{ApiError, ErrorCode};

    /// A write meeting SQLite's lock held by another connection past
    /// `busy_timeout_ms` is a 503 (`UNAVAILABLE`), never a 500; so is every
    /// write queued behind it, at once; and writes work again once the lock
    /// is given back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_locked_elsewhere_is_unavailable_then_back() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/locked.db", dir.path().display());
        let db = Db::connect(&DatabaseConfig {
            url: DatabaseUrl::parse(&url).unwrap(),
            max_connections: 4,
            min_connections: 0,
            acquire_timeout_ms: 3_000,
            statement_timeout_ms: 5_000,
            busy_timeout_ms: 200,
        })
        .await
        .unwrap();
        let write = |db: Db| async move {
            db.write(|tx| {
                Box::pin(async move {
                    crate::with_tx!(tx, conn => sqlx::raw_sql("CREATE TABLE IF NOT EXISTS t (n INTEGER)").execute(&mut *conn).await.map(|_| ()))
                        .map_err(DbError::Query)?;
                    Ok::<_, ApiError>(())
                })
            })
            .await
        };
        write(db.clone()).await.unwrap();
        db.ping(Duration::from_secs(1)).await.unwrap();

        let mut lock = SqliteLock::open(&url).await.unwrap();
        lock.hold().await.unwrap();
        let started = std::time::Instant::now();
        let writes: Vec<_> = (0..8).map(|_| tokio::spawn(write(db.clone()))).collect();
        for w in writes {
            let error = w.await.unwrap().unwrap_err();
            assert_eq!(error.code(), ErrorCode::ServiceUnavailable, "{error:?}");
        }
        assert!(
            started.elapsed() < Duration::from_millis(1_500),
            "refused together, not one busy timeout after another: {:?}",
            started.elapsed()
        );
        assert!(
            db.ping(Duration::from_secs(1)).await.is_err(),
            "the probe sees the lock"
        );

        lock.release().await.unwrap();
        write(db.clone()).await.unwrap();
        db.ping(Duration::from_secs(1)).await.unwrap();
        lock.close().await;
    }
}
