//! Group commit for SQLite: one writer task runs every [`Db::write`] body, many
//! to a transaction.
//!
//! SQLite in WAL mode with `synchronous=FULL` ends every committed transaction
//! with an fsync of the log (0.3–0.8 ms on the machines we measure on), and
//! takes one writer at a time: with a transaction per write, writes per second
//! are capped by the fsync, and concurrent writers wait on SQLite's lock in its
//! busy handler, which sleeps. Here the writer takes every job queued when it
//! starts a batch, runs each body under a `SAVEPOINT` (a failing body undoes only
//! its own changes), commits once, and only then answers the jobs: one fsync
//! for the batch, and a caller's `Ok` still means "durable". Bodies run one at a
//! time on one connection, exactly as under the write lock before, so each sees
//! the earlier ones' changes.
//!
//! On PostgreSQL, concurrent commits already share WAL flushes, so `Db::write`
//! keeps a transaction per call there; but writes that all take one hot row
//! lock — a tenant's audit chain head, which every audited gateway call moves
//! — hold it through their commit's flush one after the other.
//! [`AppState::write_grouped`](crate::state::AppState::write_grouped) sends
//! those through a group-commit writer of their own, so the lock is taken and
//! the log flushed once per batch.
//!
//! [`Db::write`]: super::Db::write

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::FutureExt as _;
use sqlx::{PgPool, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::{DbError, Tx, TxFuture};
use crate::limits;

/// What the writer hands a job's completion: `None` once its batch committed,
/// or the reason the batch did not commit.
type CommitOutcome<'a> = Option<&'a sqlx::Error>;

/// A job's answer, sent once the batch's fate is known.
type Completion = Box<dyn for<'a> FnOnce(CommitOutcome<'a>) + Send>;

/// A job run by the writer: the caller's body, given the batch's transaction
/// (or the error that left no transaction); `Some(completion)` when the body
/// succeeded and waits for the commit, `None` when it has answered already.
type JobFuture<'t> = Pin<Box<dyn Future<Output = Option<Completion>> + Send + 't>>;
type Job = Box<dyn for<'t> FnOnce(Result<&'t mut Tx, &'t sqlx::Error>) -> JobFuture<'t> + Send>;

/// The handle [`Db`](super::Db) keeps: the writer's queue. Cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Job>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("batches", &self.stats.batches.load(Ordering::Relaxed))
            .field("jobs", &self.stats.jobs.load(Ordering::Relaxed))
            .finish()
    }
}

/// Counts for tests and metrics: how many commits served how many writes.
#[derive(Default)]
struct Stats {
    batches: AtomicU64,
    jobs: AtomicU64,
}

/// The connections a writer takes its transactions from.
#[derive(Clone)]
pub enum WriterPool {
    /// `BEGIN IMMEDIATE`: the write lock up front.
    Sqlite(SqlitePool),
    /// An ordinary transaction.
    Postgres(PgPool),
}

impl WriterPool {
    async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            WriterPool::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
            WriterPool::Postgres(pool) => Tx::Postgres(pool.begin().await?),
        })
    }
}

impl GroupCommit {
    /// Starts the writer on the current runtime; it ends when every handle is gone.
    pub fn start(pool: WriterPool) -> GroupCommit {
        let (queue, jobs) = mpsc::channel(limits::GROUP_COMMIT_QUEUE_MAX);
        let stats = Arc::new(Stats::default());
        tokio::spawn(run(pool, jobs, stats.clone()));
        GroupCommit { queue, stats }
    }

    /// `(batches committed or failed, jobs run)` so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.stats.batches.load(Ordering::Relaxed),
            self.stats.jobs.load(Ordering::Relaxed),
        )
    }

    /// Runs `body` in the writer's next batch; its result once the batch committed.
    pub async fn write<T, E, F>(&self, body: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
        F: for<'t> FnOnce(&'t mut Tx) -> TxFuture<'t, T, E> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<Result<T, E>>();
        let job: Job = Box::new(move |tx| {
            Box::pin(async move {
                let tx = match tx {
                    Ok(tx) => tx,
                    Err(e) => {
                        let _ = reply.send(Err(E::from(copy_error(e))));
                        return None;
                    }
                };
                match body(tx).await {
                    Ok(value) => {
                        let completion: Completion = Box::new(move |outcome| {
                            let _ = reply.send(match outcome {
                                None => Ok(value),
                                Some(e) => Err(E::from(copy_error(e))),
                            });
                        });
                        Some(completion)
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        None
                    }
                }
            })
        });
        self.queue.send(job).await.map_err(|_| {
            E::from(DbError::TaskFailed(
                "the database writer has stopped".to_owned(),
            ))
        })?;
        answer.await.unwrap_or_else(|_| {
            // The body panicked (its savepoint was rolled back) or the writer stopped.
            Err(E::from(DbError::TaskFailed(
                "the write failed inside the database writer".to_owned(),
            )))
        })
    }
}

/// The batch's error, once per job that waited on it (`sqlx::Error` is not
/// `Clone`), keeping whether the database was unavailable (a 503) or not.
fn copy_error(e: &sqlx::Error) -> DbError {
    let text = format!("the transaction did not commit: {e}");
    if super::is_unavailable(e) {
        DbError::Unavailable(text)
    } else {
        DbError::Query(sqlx::Error::Protocol(text))
    }
}

async fn run(pool: WriterPool, mut queue: mpsc::Receiver<Job>, stats: Arc<Stats>) {
    let mut batch = Vec::with_capacity(limits::GROUP_COMMIT_JOBS_MAX);
    while queue
        .recv_many(&mut batch, limits::GROUP_COMMIT_JOBS_MAX)
        .await
        > 0
    {
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.jobs.fetch_add(batch.len() as u64, Ordering::Relaxed);
        run_batch(&pool, &mut batch, &mut queue).await;
        batch.clear();
    }
}

/// One transaction for `jobs`; every job is answered before this returns.
///
/// Each job runs under the savepoint `group_commit`: a failed one is rolled
/// back to it at once, and the next job's `RELEASE …; SAVEPOINT …` goes in one
/// round trip. COMMIT releases the last one.
///
/// When the transaction cannot even begin because the database is
/// unavailable (no connection within `database.acquire_timeout_ms`, or
/// SQLite's lock held elsewhere past `database.busy_timeout_ms`), the jobs
/// queued meanwhile are refused with the batch: they have waited behind the
/// same wall, and a batch of their own would wait that long again, so a
/// request would take a multiple of the timeout to hear a 503.
async fn run_batch(pool: &WriterPool, jobs: &mut Vec<Job>, queue: &mut mpsc::Receiver<Job>) {
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => {
            if super::is_unavailable(&e) {
                while let Ok(job) = queue.try_recv() {
                    jobs.push(job);
                }
            }
            for job in jobs.drain(..) {
                job(Err(&e)).await;
            }
            return;
        }
    };
    let mut waiting: Vec<Completion> = Vec::with_capacity(jobs.len());
    let mut jobs = jobs.drain(..);
    let mut broken = None;
    let mut first = true;
    for job in jobs.by_ref() {
        let opened = if first {
            statements(&mut tx, "SAVEPOINT group_commit").await
        } else {
            statements(&mut tx, "RELEASE group_commit; SAVEPOINT group_commit").await
        };
        first = false;
        if let Err(e) = opened {
            broken = Some((e, Some(job)));
            break;
        }
        let done = AssertUnwindSafe(job(Ok(&mut tx))).catch_unwind().await;
        match done {
            Ok(Some(completion)) => waiting.push(completion),
            // Failed (answered already) or panicked (its sender dropped: the caller
            // hears of a failure): only its own changes are undone.
            Ok(None) | Err(_) => {
                if let Err(e) = statements(&mut tx, "ROLLBACK TO group_commit").await {
                    broken = Some((e, None));
                    break;
                }
            }
        }
    }
    if let Some((e, unrun)) = broken {
        tracing::error!(error = %e, "a group-commit savepoint failed; the whole batch is rolled back");
        let _ = tx.rollback().await;
        for completion in waiting {
            completion(Some(&e));
        }
        for job in unrun.into_iter().chain(jobs) {
            job(Err(&e)).await;
        }
        return;
    }
    drop(jobs);
    match tx.commit().await {
        Ok(()) => {
            for completion in waiting {
                completion(None);
            }
        }
        Err(e) => {
            for completion in waiting {
                completion(Some(&e));
            }
        }
    }
}

/// Runs `sql` (one or several statements, no parameters) in one round trip.
async fn statements(tx: &mut Tx, sql: &'static str) -> Result<(), sqlx::Error> {
    match tx {
        Tx::Sqlite(t) => sqlx::raw_sql(sql).execute(&mut **t).await.map(|_| ()),
        Tx::Postgres(t) => sqlx::raw_sql(sql).execute(&mut **t).await.map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    async fn pool() -> (tempfile::TempDir, SqlitePool) {
        let dir = tempfile::tempdir().unwrap();
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(&format!(
            "sqlite://{}",
            dir.path().join("g.db").display()
        ))
        .unwrap()
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (n INTEGER PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        (dir, pool)
    }

    async fn insert(writer: &GroupCommit, n: i64) -> Result<i64, DbError> {
        writer
            .write(move |tx| {
                Box::pin(async move {
                    let Tx::Sqlite(t) = tx else {
                        unreachable!("SQLite")
                    };
                    sqlx::query("INSERT INTO t (n) VALUES ($1)")
                        .bind(n)
                        .execute(&mut **t)
                        .await?;
                    Ok::<_, DbError>(n)
                })
            })
            .await
    }

    async fn rows(pool: &SqlitePool) -> Vec<i64> {
        sqlx::query_scalar("SELECT n FROM t ORDER BY n")
            .fetch_all(pool)
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_all_commit_in_fewer_transactions_than_writes() {
        let (_dir, pool) = pool().await;
        let writer = GroupCommit::start(WriterPool::Sqlite(pool.clone()));
        let writes: Vec<_> = (0..200)
            .map(|n| {
                let writer = writer.clone();
                tokio::spawn(async move { insert(&writer, n).await })
            })
            .collect();
        for (n, write) in writes.into_iter().enumerate() {
            assert_eq!(write.await.unwrap().unwrap(), n as i64);
        }
        assert_eq!(rows(&pool).await, (0..200).collect::<Vec<_>>());
        let (batches, jobs) = writer.counts();
        assert_eq!(jobs, 200);
        assert!(batches < jobs, "{batches} batches for {jobs} writes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_or_panicking_body_undoes_only_itself() {
        let (_dir, pool) = pool().await;
        let writer = GroupCommit::start(WriterPool::Sqlite(pool.clone()));
        // Hold the writer in a slow body so the next ones share a batch.
        let slow = {
            let writer = writer.clone();
            tokio::spawn(async move {
                writer
                    .write(|_tx| {
                        Box::pin(async {
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                            Ok::<_, DbError>(())
                        })
                    })
                    .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let ok_before = tokio::spawn({
            let w = writer.clone();
            async move { insert(&w, 1).await }
        });
        let duplicate_after_own_insert = tokio::spawn({
            let w = writer.clone();
            async move {
                w.write(|tx| {
                    Box::pin(async move {
                        let Tx::Sqlite(t) = tx else {
                            unreachable!("SQLite")
                        };
                        sqlx::query("INSERT INTO t (n) VALUES (2)")
                            .execute(&mut **t)
                            .await?;
                        // The primary key refuses this one: the body fails after a change.
                        sqlx::query("INSERT INTO t (n) VALUES (2)")
                            .execute(&mut **t)
                            .await?;
                        Ok::<_, DbError>(())
                    })
                })
                .await
            }
        });
        let panicking = tokio::spawn({
            let w = writer.clone();
            async move {
                w.write(|tx| {
                    Box::pin(async move {
                        let Tx::Sqlite(t) = tx else {
                            unreachable!("SQLite")
                        };
                        sqlx::query("INSERT INTO t (n) VALUES (3)")
                            .execute(&mut **t)
                            .await?;
                        panic!("a body that panics");
                        #[allow(unreachable_code)]
                        Ok::<_, DbError>(())
                    })
                })
                .await
            }
        });
        let ok_after = tokio::spawn({
            let w = writer.clone();
            async move { insert(&w, 4).await }
        });
        slow.await.unwrap().unwrap();
        assert_eq!(ok_before.await.unwrap().unwrap(), 1);
        assert!(duplicate_after_own_insert.await.unwrap().is_err());
        assert!(panicking.await.unwrap().is_err());
        assert_eq!(ok_after.await.unwrap().unwrap(), 4);
        assert_eq!(
            rows(&pool).await,
            vec![1, 4],
            "only the failed bodies' rows are gone"
        );
        // The writer keeps serving after a panic.
        assert_eq!(insert(&writer, 5).await.unwrap(), 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_stops_waiting_does_not_cancel_its_write() {
        let (_dir, pool) = pool().await;
        let writer = GroupCommit::start(WriterPool::Sqlite(pool.clone()));
        let abandoned = tokio::spawn({
            let w = writer.clone();
            async move {
                w.write(|tx| {
                    Box::pin(async move {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        let Tx::Sqlite(t) = tx else {
                            unreachable!("SQLite")
                        };
                        sqlx::query("INSERT INTO t (n) VALUES (7)")
                            .execute(&mut **t)
                            .await?;
                        Ok::<_, DbError>(())
                    })
                })
                .await
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        abandoned.abort();
        // A later write is answered only after the abandoned one's batch.
        assert_eq!(insert(&writer, 8).await.unwrap(), 8);
        assert_eq!(rows(&pool).await, vec![7, 8]);
    }
}
