//! The hub's database on either engine, in the kernel's manner: an enum of two
//! concrete pools, one SQL text (`$1` placeholders) run against either through
//! `with_read!` / `with_tx!`, and per-engine migrations embedded in the binary.
//!
//! SQLite serialises writers anyway, so the hub keeps **one writer connection**
//! beside a pool of readers (WAL lets them read while the writer writes). The
//! connection belongs to one writer task that runs the write jobs queued for
//! it in **group commits** (see [`Db::write`]): many jobs, each in its own
//! savepoint, share one transaction and so one fsync of the WAL, which is what
//! bounded the hub's payment rate with one transaction per payment.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot};

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Postgres, Sqlite, Transaction};

use crate::limits::{
    DB_ACQUIRE_TIMEOUT, GROUP_COMMIT_JOBS_MAX, GROUP_COMMIT_QUEUE_JOBS_MAX, SQLITE_BUSY_TIMEOUT,
};

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
        /// Exactly one connection: the migrations, then the writer task's
        /// group commits.
        writer: SqlitePool,
        /// Reads.
        reader: SqlitePool,
        /// The writer task's queue of write jobs.
        jobs: mpsc::Sender<Job>,
        /// Group commits made so far (tests and operators compare it with
        /// the writes made).
        commits: Arc<AtomicU64>,
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

/// Answers a job whose body succeeded, once its batch's COMMIT is known:
/// `None` means committed (the caller gets its value), `Some` is the COMMIT's
/// error (the caller gets an error: nothing of the batch was committed).
type Completion = Box<dyn FnOnce(Option<&sqlx::Error>) + Send>;

/// What running a job leads to: `Some` when its body succeeded and waits for
/// the COMMIT; `None` when the job already answered its caller (its body
/// failed, or the batch failed before it could run).
type JobFuture<'t> = Pin<Box<dyn Future<Output = Option<Completion>> + Send + 't>>;

/// One [`Db::write`] on SQLite, its types erased so that one queue carries
/// every caller's body: given the batch's transaction it runs the body; given
/// the batch's error it answers that at once without running anything.
pub type Job = Box<dyn for<'t> FnOnce(Result<&'t mut Tx, &'t sqlx::Error>) -> JobFuture<'t> + Send>;

/// Gives a closure the higher-ranked signature of a [`Job`] (inferred from a
/// bound, which a plain `Box::new` coercion does not do).
fn job<C>(run: C) -> Job
where
    C: for<'t> FnOnce(Result<&'t mut Tx, &'t sqlx::Error>) -> JobFuture<'t> + Send + 'static,
{
    Box::new(run)
}

/// The error each caller of a failed batch gets: `sqlx::Error` is not `Clone`,
/// so the shared error is rebuilt, keeping the one thing callers act on (a
/// transient failure answers 503, anything else 500).
fn shared_error(error: &sqlx::Error) -> DbError {
    if is_unavailable(error) {
        DbError::Query(sqlx::Error::Io(std::io::Error::other(format!(
            "the group commit failed: {error}"
        ))))
    } else {
        DbError::GroupCommit(error.to_string())
    }
}

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
    /// The SQLite group commit this write was part of failed; nothing of it
    /// was committed.
    #[error("the database transaction failed: {0}")]
    GroupCommit(String),
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
                let (jobs, queue) = mpsc::channel(GROUP_COMMIT_QUEUE_JOBS_MAX);
                let commits = Arc::new(AtomicU64::new(0));
                // The task ends when the last `Db` clone (the last sender) is gone.
                tokio::spawn(run_writer(writer.clone(), queue, commits.clone()));
                Ok(Db::Sqlite {
                    writer,
                    reader,
                    jobs,
                    commits,
                })
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
            Db::Sqlite { writer, reader, .. } => {
                writer.close().await;
                reader.close().await;
            }
            Db::Postgres(pool) => pool.close().await,
        }
    }

    /// How many group commits the SQLite writer has made (`None` on
    /// PostgreSQL): fewer than the writes made when batching works.
    pub fn group_commits(&self) -> Option<u64> {
        match self {
            Db::Sqlite { commits, .. } => Some(commits.load(Ordering::Relaxed)),
            Db::Postgres(_) => None,
        }
    }

    /// Runs `body` in a transaction the caller cannot cut in half: the body
    /// runs to its end whatever happens to the caller's future, its changes
    /// commit when it returns `Ok` and are undone when it fails, and `Ok`
    /// comes back only once they are committed.
    ///
    /// On PostgreSQL each call is its own transaction in a spawned task (the
    /// server already shares WAL flushes between concurrent commits). On
    /// SQLite the body is queued for the writer task, which runs it in a
    /// savepoint of a group commit: bodies still run one at a time on one
    /// connection, so each sees every earlier one's changes, exactly as under
    /// a global write lock.
    pub async fn write<T, E, F>(&self, body: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
        F: for<'t> FnOnce(&'t mut Tx) -> TxFuture<'t, T, E> + Send + 'static,
    {
        match self {
            Db::Sqlite { jobs, .. } => write_grouped(jobs, body).await,
            Db::Postgres(pool) => {
                let pool = pool.clone();
                let task = tokio::spawn(async move {
                    let mut tx =
                        Tx::Postgres(pool.begin().await.map_err(|e| E::from(DbError::Query(e)))?);
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
    }
}

/// [`Db::write`] on SQLite: queues `body` as a job and waits for its answer.
async fn write_grouped<T, E, F>(jobs: &mpsc::Sender<Job>, body: F) -> Result<T, E>
where
    T: Send + 'static,
    E: From<DbError> + Send + 'static,
    F: for<'t> FnOnce(&'t mut Tx) -> TxFuture<'t, T, E> + Send + 'static,
{
    let (answer, answered) = oneshot::channel::<Result<T, E>>();
    let queued = job(move |tx| {
        Box::pin(async move {
            let tx = match tx {
                Ok(tx) => tx,
                Err(error) => {
                    // The caller may have hung up: nobody to tell is fine.
                    let _ = answer.send(Err(E::from(shared_error(error))));
                    return None;
                }
            };
            match body(tx).await {
                // The value waits for the COMMIT: `Ok` must mean durable.
                Ok(value) => Some(Box::new(move |commit_error: Option<&sqlx::Error>| {
                    let _ = answer.send(match commit_error {
                        None => Ok(value),
                        Some(error) => Err(E::from(shared_error(error))),
                    });
                }) as Completion),
                Err(error) => {
                    // Its changes are rolled back to its savepoint right after;
                    // nothing of them can ever commit, so answer now.
                    let _ = answer.send(Err(error));
                    None
                }
            }
        })
    });
    // Only the queueing can be cancelled by the caller, and a job not queued
    // has not begun. A full queue for this long is the old "no connection
    // within the acquire timeout": the same 503.
    match tokio::time::timeout(DB_ACQUIRE_TIMEOUT, jobs.send(queued)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            return Err(E::from(DbError::TaskFailed(
                "the SQLite writer has stopped".to_owned(),
            )));
        }
        Err(_) => return Err(E::from(DbError::Query(sqlx::Error::PoolTimedOut))),
    }
    // A dropped sender means the body panicked (its future, holding the
    // sender, was dropped by the writer) and its savepoint was rolled back.
    answered.await.unwrap_or_else(|_| {
        Err(E::from(DbError::TaskFailed(
            "the transaction's body panicked; its changes were rolled back".to_owned(),
        )))
    })
}

/// The savepoint every job of a group commit runs in.
const SAVEPOINT: &str = "SAVEPOINT group_commit";
const RELEASE: &str = "RELEASE group_commit";
/// Ends a job's savepoint and opens the next job's in one round trip to
/// sqlx's SQLite worker thread (a hand-off per statement is what the
/// writer spends its time on).
const RELEASE_AND_NEXT: &str = "RELEASE group_commit; SAVEPOINT group_commit";
const ROLLBACK_TO: &str = "ROLLBACK TO group_commit";

/// The SQLite writer task: takes every job already queued (at most
/// [`GROUP_COMMIT_JOBS_MAX`]) and runs them as one group commit, then the next.
/// While a batch runs, the next one queues, so the batch size follows the load.
async fn run_writer(writer: SqlitePool, mut queue: mpsc::Receiver<Job>, commits: Arc<AtomicU64>) {
    let mut batch = Vec::with_capacity(GROUP_COMMIT_JOBS_MAX);
    while queue.recv_many(&mut batch, GROUP_COMMIT_JOBS_MAX).await > 0 {
        run_batch(&writer, batch.drain(..), &commits).await;
    }
}

/// One group commit: BEGIN IMMEDIATE, each job in its own savepoint, one
/// COMMIT, then the answers of the jobs that succeeded.
async fn run_batch(writer: &SqlitePool, batch: impl Iterator<Item = Job>, commits: &AtomicU64) {
    let mut batch = batch.peekable();
    // IMMEDIATE takes the write lock up front: a read-then-write body cannot
    // fail midway with "database is locked" (another process may hold it).
    let mut tx = match writer.begin_with("BEGIN IMMEDIATE").await {
        Ok(tx) => Tx::Sqlite(tx),
        Err(error) => {
            for job in batch {
                job(Err(&error)).await;
            }
            return;
        }
    };
    let mut succeeded: Vec<Completion> = Vec::with_capacity(GROUP_COMMIT_JOBS_MAX);
    if let Err(error) = execute(&mut tx, SAVEPOINT).await {
        return abort_batch(tx, succeeded, batch, &error).await;
    }
    // Each job starts with its savepoint open and ends by releasing it (and
    // opening the next job's, when there is one).
    while let Some(job) = batch.next() {
        // A panicking body fails only itself: its future (and with it its
        // caller's answer) is dropped and its changes are rolled back below.
        let ran = AssertUnwindSafe(job(Ok(&mut tx))).catch_unwind().await;
        let end = if batch.peek().is_some() {
            RELEASE_AND_NEXT
        } else {
            RELEASE
        };
        let kept = match ran {
            Ok(Some(completion)) => {
                succeeded.push(completion);
                execute(&mut tx, end).await
            }
            Ok(None) | Err(_) => match execute(&mut tx, ROLLBACK_TO).await {
                Ok(()) => execute(&mut tx, end).await,
                Err(error) => Err(error),
            },
        };
        if let Err(error) = kept {
            // The transaction is in an unknown state (SQLite may already have
            // rolled it back, e.g. on a full disk): give it up entirely.
            return abort_batch(tx, succeeded, batch, &error).await;
        }
    }
    match tx.commit().await {
        Ok(()) => {
            commits.fetch_add(1, Ordering::Relaxed);
            for completion in succeeded {
                completion(None);
            }
        }
        Err(error) => {
            // Deferred constraints are checked here; no body the hub runs
            // leaves one unmet (a payment updates both accounts before `Ok`),
            // but if one did, the whole batch fails rather than half of it.
            for completion in succeeded {
                completion(Some(&error));
            }
        }
    }
}

/// Rolls the whole batch back and answers every job with `error`: those whose
/// body already succeeded and those not run yet.
async fn abort_batch(
    tx: Tx,
    succeeded: Vec<Completion>,
    not_run: impl Iterator<Item = Job>,
    error: &sqlx::Error,
) {
    let _ = tx.rollback().await;
    for completion in succeeded {
        completion(Some(error));
    }
    for job in not_run {
        job(Err(error)).await;
    }
}

/// One statement of the writer's own bookkeeping.
async fn execute(tx: &mut Tx, sql: &'static str) -> Result<(), sqlx::Error> {
    // `raw_sql`: the text may hold two statements, and there is nothing to bind.
    with_tx!(tx, conn => sqlx::raw_sql(sql).execute(conn).await.map(|_| ()))
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
        let Db::Sqlite { writer, reader, .. } = &db else {
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

    /// A SQLite hub database in a temp folder, with a scratch table `t`.
    async fn scratch() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("hub.db").display());
        let db = Db::connect(&url, 4).await.expect("opens and migrates");
        db.write(|tx| {
            Box::pin(async move {
                with_tx!(tx, conn => sqlx::query("CREATE TABLE t (v INTEGER NOT NULL UNIQUE)")
                    .execute(conn).await.map(|_| ()))?;
                Ok::<(), DbError>(())
            })
        })
        .await
        .expect("scratch table");
        (dir, db)
    }

    /// Inserts `v` into `t`, then fails when `fail` (after writing).
    async fn insert(db: &Db, v: i64, fail: bool) -> Result<i64, DbError> {
        db.write(move |tx| {
            Box::pin(async move {
                with_tx!(tx, conn => sqlx::query("INSERT INTO t (v) VALUES ($1)")
                    .bind(v).execute(conn).await.map(|_| ()))?;
                if fail {
                    return Err(DbError::TaskFailed(format!("body {v} refused")));
                }
                Ok(v)
            })
        })
        .await
    }

    async fn stored(db: &Db) -> Vec<i64> {
        with_read!(db, pool => sqlx::query_scalar("SELECT v FROM t ORDER BY v")
            .fetch_all(pool).await)
        .expect("read t")
    }

    /// Occupies the writer for `hold`, so that writes queued meanwhile form
    /// the next batch together.
    fn hold_writer(db: &Db, hold: Duration) -> tokio::task::JoinHandle<()> {
        let db = db.clone();
        tokio::spawn(async move {
            db.write(move |_tx| {
                Box::pin(async move {
                    tokio::time::sleep(hold).await;
                    Ok::<(), DbError>(())
                })
            })
            .await
            .expect("holding write");
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_all_commit_in_fewer_commits_than_writes() {
        let (_dir, db) = scratch().await;
        let before = db.group_commits().expect("sqlite");
        let writes: Vec<_> = (0..200)
            .map(|v| {
                let db = db.clone();
                tokio::spawn(async move { insert(&db, v, false).await })
            })
            .collect();
        for (v, write) in writes.into_iter().enumerate() {
            assert_eq!(write.await.expect("task").expect("committed"), v as i64);
        }
        // Every `Ok` was answered after its commit: all are visible to readers.
        assert_eq!(stored(&db).await, (0..200).collect::<Vec<i64>>());
        let commits = db.group_commits().expect("sqlite") - before;
        assert!(commits >= 1);
        assert!(commits < 200, "200 writes took {commits} commits");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_body_in_a_batch_rolls_back_only_itself() {
        let (_dir, db) = scratch().await;
        let before = db.group_commits().expect("sqlite");
        let holder = hold_writer(&db, Duration::from_millis(400));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let writes: Vec<_> = [(1, false), (2, true), (3, false)]
            .into_iter()
            .map(|(v, fail)| {
                let db = db.clone();
                tokio::spawn(async move { insert(&db, v, fail).await })
            })
            .collect();
        holder.await.expect("holder");
        let mut answers = Vec::new();
        for write in writes {
            answers.push(write.await.expect("task"));
        }
        assert_eq!(answers[0].as_ref().expect("1 committed"), &1);
        assert!(
            matches!(&answers[1], Err(DbError::TaskFailed(m)) if m == "body 2 refused"),
            "{:?}",
            answers[1]
        );
        assert_eq!(answers[2].as_ref().expect("3 committed"), &3);
        assert_eq!(stored(&db).await, vec![1, 3]);
        // The holder's batch, then one batch for the three queued behind it.
        assert_eq!(db.group_commits().expect("sqlite") - before, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_body_fails_only_itself_and_the_writer_goes_on() {
        let (_dir, db) = scratch().await;
        let holder = hold_writer(&db, Duration::from_millis(400));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let first = tokio::spawn({
            let db = db.clone();
            async move { insert(&db, 1, false).await }
        });
        let panicking = tokio::spawn({
            let db = db.clone();
            async move {
                db.write(|tx| {
                    Box::pin(async move {
                        with_tx!(tx, conn => sqlx::query("INSERT INTO t (v) VALUES (2)")
                            .execute(conn).await.map(|_| ()))?;
                        panic!("a bug in a body");
                        #[allow(unreachable_code)]
                        Ok::<(), DbError>(())
                    })
                })
                .await
            }
        });
        let last = tokio::spawn({
            let db = db.clone();
            async move { insert(&db, 3, false).await }
        });
        holder.await.expect("holder");
        assert_eq!(first.await.expect("task").expect("committed"), 1);
        assert!(matches!(
            panicking.await.expect("the caller does not panic"),
            Err(DbError::TaskFailed(_))
        ));
        assert_eq!(last.await.expect("task").expect("committed"), 3);
        assert_eq!(insert(&db, 4, false).await.expect("writer alive"), 4);
        assert_eq!(stored(&db).await, vec![1, 3, 4]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_hanging_up_does_not_cancel_its_body() {
        let (_dir, db) = scratch().await;
        let write = db.write(|tx| {
            Box::pin(async move {
                // Still running long after the caller is gone.
                tokio::time::sleep(Duration::from_millis(200)).await;
                with_tx!(tx, conn => sqlx::query("INSERT INTO t (v) VALUES (7)")
                    .execute(conn).await.map(|_| ()))?;
                Ok::<(), DbError>(())
            })
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(20), write)
                .await
                .is_err(),
            "the caller gave up first"
        );
        // Queued behind the abandoned body: once answered, that one has ended.
        assert_eq!(insert(&db, 8, false).await.expect("committed"), 8);
        assert_eq!(stored(&db).await, vec![7, 8]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_unique_violation_fails_only_its_job_and_later_jobs_see_earlier_rows() {
        let (_dir, db) = scratch().await;
        let holder = hold_writer(&db, Duration::from_millis(400));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Same value twice in one batch: the second sees the first's row,
        // as a second request with the same key sees the first's payment.
        let writes: Vec<_> = [5, 5, 6]
            .into_iter()
            .map(|v| {
                let db = db.clone();
                tokio::spawn(async move { insert(&db, v, false).await })
            })
            .collect();
        holder.await.expect("holder");
        let mut answers = Vec::new();
        for write in writes {
            answers.push(write.await.expect("task"));
        }
        // Whichever of the two ran first won; the other saw its row.
        let (won, lost) = match (&answers[0], &answers[1]) {
            (Ok(v), Err(e)) | (Err(e), Ok(v)) => (*v, e),
            other => panic!("exactly one 5 commits: {other:?}"),
        };
        assert_eq!(won, 5);
        assert!(
            matches!(lost, DbError::Query(e) if is_unique_violation(e)),
            "{lost:?}"
        );
        assert_eq!(answers[2].as_ref().expect("6"), &6);
        assert_eq!(stored(&db).await, vec![5, 6]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_fails_every_job_of_its_batch_and_the_next_batch_commits() {
        let (_dir, db) = scratch().await;
        db.write(|tx| {
            Box::pin(async move {
                with_tx!(tx, conn => sqlx::query(
                    "CREATE TABLE child (parent INTEGER NOT NULL REFERENCES t (v) DEFERRABLE INITIALLY DEFERRED)")
                    .execute(conn).await.map(|_| ()))?;
                Ok::<(), DbError>(())
            })
        })
        .await
        .expect("child table");
        let holder = hold_writer(&db, Duration::from_millis(400));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let good = tokio::spawn({
            let db = db.clone();
            async move { insert(&db, 1, false).await }
        });
        // Succeeds as a body, but leaves a deferred violation for the COMMIT.
        let dangling = tokio::spawn({
            let db = db.clone();
            async move {
                db.write(|tx| {
                    Box::pin(async move {
                        with_tx!(tx, conn => sqlx::query("INSERT INTO child (parent) VALUES (99)")
                            .execute(conn).await.map(|_| ()))?;
                        Ok::<(), DbError>(())
                    })
                })
                .await
            }
        });
        holder.await.expect("holder");
        // `Ok` means committed: neither may answer it.
        assert!(matches!(
            good.await.expect("task"),
            Err(DbError::GroupCommit(_))
        ));
        assert!(matches!(
            dangling.await.expect("task"),
            Err(DbError::GroupCommit(_))
        ));
        assert_eq!(stored(&db).await, Vec::<i64>::new());
        // The failed transaction was rolled back: the writer goes on.
        assert_eq!(insert(&db, 2, false).await.expect("committed"), 2);
        assert_eq!(stored(&db).await, vec![2]);
    }
}
