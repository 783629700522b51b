//! Group commit for published events.
//!
//! Each publish waits for its event to be durable. Committing one event per
//! transaction would make every publisher pay a full durable write (an fsync
//! on SQLite, a WAL flush on PostgreSQL) and, within a tenant, wait for the
//! previous publisher's commit too (the head row lock, see `store::append`).
//! Instead, publishes queue here; a writer takes everything queued (up to
//! [`PUBLISH_BATCH_MAX`]), appends it in one transaction and answers every
//! publisher of the batch after the commit. While one batch commits the next
//! one gathers, so the batch grows with the load.
//!
//! The writer runs in its own task: a publisher that hangs up after queuing
//! cannot cut the batch in half. Its event is stored (and delivered to
//! subscribers) even though nobody hears its `201`.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot, watch};

use super::{Appended, NewEvent, store};
use crate::db::{Db, DbError};
use crate::telemetry::Metrics;

/// Publishes waiting to be written; a full queue answers 503.
pub const PUBLISH_QUEUE_MAX: usize = 8_192;

/// Most events one group commit writes.
pub const PUBLISH_BATCH_MAX: usize = 512;

/// Why a publish did not complete.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The queue is full: the database is not keeping up.
    #[error("too many events are waiting to be written")]
    Overloaded,
    /// The batch's transaction failed; nothing of it was stored.
    #[error("the event could not be stored: {0}")]
    Failed(Arc<str>),
    /// The kernel is stopping.
    #[error("the kernel is stopping")]
    Stopped,
}

struct Pending {
    tenant_id: String,
    event: NewEvent,
    reply: oneshot::Sender<Result<Appended, Arc<str>>>,
}

/// The group-commit queue.
pub struct Publisher {
    queue: mpsc::Sender<Pending>,
    /// Taken by [`Publisher::start`].
    receiver: std::sync::Mutex<Option<mpsc::Receiver<Pending>>>,
}

impl Publisher {
    pub(super) fn new() -> Publisher {
        let (queue, receiver) = mpsc::channel(PUBLISH_QUEUE_MAX);
        Publisher {
            queue,
            receiver: std::sync::Mutex::new(Some(receiver)),
        }
    }

    /// Stores `event` in `tenant_id`'s sequence; returns once it is durable.
    pub async fn publish(
        &self,
        tenant_id: String,
        event: NewEvent,
    ) -> Result<Appended, PublishError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Pending {
                tenant_id,
                event,
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => PublishError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => PublishError::Stopped,
            })?;
        match answer.await {
            Ok(Ok(appended)) => Ok(appended),
            Ok(Err(cause)) => Err(PublishError::Failed(cause)),
            Err(_) => Err(PublishError::Stopped),
        }
    }

    /// Starts the writers (once; later calls start nothing). On PostgreSQL two
    /// writers overlap one batch's round trips with the other's commit; SQLite
    /// has one writer at a time anyway, and a second would only meet its lock.
    pub fn start(
        &self,
        db: Db,
        committed: Arc<watch::Sender<u64>>,
        metrics: Metrics,
        tasks: &mut tokio::task::JoinSet<()>,
    ) {
        let taken = match self.receiver.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some(receiver) = taken else {
            return;
        };
        let writers = match db.engine() {
            crate::config::Engine::Postgres => 2,
            crate::config::Engine::Sqlite => 1,
        };
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..writers {
            tasks.spawn(write_batches(
                receiver.clone(),
                db.clone(),
                committed.clone(),
                metrics.clone(),
            ));
        }
    }
}

/// Takes what is queued, writes it in one transaction, answers; until the queue closes.
async fn write_batches(
    receiver: Arc<Mutex<mpsc::Receiver<Pending>>>,
    db: Db,
    committed: Arc<watch::Sender<u64>>,
    metrics: Metrics,
) {
    let published = metrics.counter("aibos_events_published_total", &[]);
    let batch_sizes = metrics.histogram("aibos_event_publish_batch_size", &[]);
    let mut batch = Vec::with_capacity(PUBLISH_BATCH_MAX);
    loop {
        {
            let mut receiver = receiver.lock().await;
            if receiver.recv_many(&mut batch, PUBLISH_BATCH_MAX).await == 0 {
                return;
            }
        }
        // Publishers that hung up before their turn are still written: their
        // request was accepted, and the event may have been acted upon.
        let size = batch.len();
        let result = write(&db, &mut batch).await;
        match result {
            Ok(answers) => {
                committed.send_modify(|n| *n = n.wrapping_add(1));
                published.increment(size as u64);
                batch_sizes.record(size as f64);
                for (pending, appended) in batch.drain(..).zip(answers) {
                    let _ = pending.reply.send(Ok(appended));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, events = size, "an event batch could not be stored");
                let cause: Arc<str> = e.to_string().into();
                for pending in batch.drain(..) {
                    let _ = pending.reply.send(Err(cause.clone()));
                }
            }
        }
    }
}

/// Appends the batch, tenant by tenant in a fixed order (so two writers, or
/// two instances, never wait on each other's head rows in a cycle); returns
/// each event's place in the batch's order.
async fn write(db: &Db, batch: &mut [Pending]) -> Result<Vec<Appended>, DbError> {
    let mut by_tenant: BTreeMap<String, (Vec<usize>, Vec<NewEvent>)> = BTreeMap::new();
    for (i, pending) in batch.iter_mut().enumerate() {
        let entry = by_tenant.entry(pending.tenant_id.clone()).or_default();
        entry.0.push(i);
        entry
            .1
            .push(std::mem::replace(&mut pending.event, placeholder()));
    }
    let size = batch.len();
    let mut answers: Vec<(usize, Appended)> = db
        .write(move |tx| {
            Box::pin(async move {
                let mut answers = Vec::with_capacity(size);
                for (tenant_id, (places, events)) in &by_tenant {
                    let appended = store::append(tx, tenant_id, events).await?;
                    answers.extend(places.iter().copied().zip(appended));
                }
                Ok::<_, DbError>(answers)
            })
        })
        .await?;
    // Back into the batch's order: the answers are zipped with its entries.
    answers.sort_unstable_by_key(|(place, _)| *place);
    Ok(answers.into_iter().map(|(_, a)| a).collect())
}

/// What a pending entry holds once its event moved into the batch.
fn placeholder() -> NewEvent {
    NewEvent {
        event_type: String::new(),
        version: 0,
        source: String::new(),
        subject: None,
        actor_type: String::new(),
        actor_id: None,
        correlation_id: None,
        payload: String::new(),
    }
}
