//! Write transactions that a client hanging up cannot cut in half.
//!
//! axum drops a handler's future when the client goes away. A transaction begun
//! in that future could be dropped mid-`BEGIN` or mid-change (sqlx 0.9's
//! PostgreSQL `begin()` is not cancel-safe). [`Db::write`] therefore runs the
//! whole transaction — the change, its audit entry, its notifications — in a
//! spawned task that runs to commit or rollback whatever happens to the request.

use std::future::Future;
use std::pin::Pin;

use sqlx::{Postgres, Sqlite, Transaction};

use super::{Db, DbError};

/// An open write transaction on either engine.
pub enum Tx {
    /// SQLite, begun with `BEGIN IMMEDIATE` (takes the write lock up front, so a
    /// read-then-write transaction cannot fail with "database is locked" midway).
    Sqlite(Transaction<'static, Sqlite>),
    /// PostgreSQL.
    Postgres(Transaction<'static, Postgres>),
}

/// Runs the same body against the transaction's connection; `$conn` is a
/// `&mut` connection of the concrete driver in each arm.
#[macro_export]
macro_rules! with_tx {
    ($tx:expr, $conn:ident => $body:expr) => {
        match $tx {
            $crate::db::tx::Tx::Sqlite(t) => {
                let $conn = &mut **t;
                $body
            }
            $crate::db::tx::Tx::Postgres(t) => {
                let $conn = &mut **t;
                $body
            }
        }
    };
}

/// The future a [`Db::write`] body returns.
pub type TxFuture<'t, T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 't>>;

impl Tx {
    /// Commits.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.commit().await,
            Tx::Postgres(t) => t.commit().await,
        }
    }

    /// Rolls back.
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.rollback().await,
            Tx::Postgres(t) => t.rollback().await,
        }
    }

    /// Sends a NOTIFY on `channel`, delivered when this transaction commits.
    /// SQLite has no NOTIFY: there the payload is appended to
    /// `invalidation_log` in the same transaction, which every kernel on the
    /// file polls — so a change written by the offline command line, another
    /// process, reaches a running kernel too (`authz::listener::poll_log`).
    pub async fn notify(&mut self, channel: &str, payload: &str) -> Result<(), sqlx::Error> {
        match self {
            Tx::Postgres(t) => {
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(channel)
                    .bind(payload)
                    .execute(&mut **t)
                    .await?;
            }
            Tx::Sqlite(t) => {
                sqlx::query("INSERT INTO invalidation_log (payload, created_at) VALUES ($1, $2)")
                    .bind(payload)
                    .bind(crate::timestamp::now_text())
                    .execute(&mut **t)
                    .await?;
            }
        }
        Ok(())
    }

    /// Whether this is PostgreSQL (for the few statements that differ).
    pub fn is_postgres(&self) -> bool {
        matches!(self, Tx::Postgres(_))
    }
}

impl Db {
    /// Begins a write transaction. Prefer [`Db::write`], which is cancel-safe.
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        match self {
            Db::Sqlite(sqlite) => Ok(Tx::Sqlite(sqlite.pool.begin_with("BEGIN IMMEDIATE").await?)),
            Db::Postgres(pool) => Ok(Tx::Postgres(pool.begin().await?)),
        }
    }

    /// Runs `body` in one transaction that a caller hanging up cannot cut: it
    /// commits when the body succeeds and rolls back when it fails, even if the
    /// caller stops waiting; `Ok` means committed. On SQLite the body runs in
    /// the group-commit writer's next batch, under a savepoint of its own
    /// (`group.rs`); on PostgreSQL in a transaction of its own in a spawned task.
    pub async fn write<T, E, F>(&self, body: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
        F: for<'t> FnOnce(&'t mut Tx) -> TxFuture<'t, T, E> + Send + 'static,
    {
        if let Db::Sqlite(sqlite) = self {
            return sqlite.writer.write(body).await;
        }
        let db = self.clone();
        let task = tokio::spawn(async move {
            let mut tx = db.begin().await.map_err(|e| E::from(DbError::Query(e)))?;
            match body(&mut tx).await {
                Ok(value) => {
                    tx.commit().await.map_err(|e| E::from(DbError::Query(e)))?;
                    Ok(value)
                }
                Err(e) => {
                    // Dropping the transaction would roll back too; say so explicitly
                    // so the connection goes back to the pool clean right away.
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
