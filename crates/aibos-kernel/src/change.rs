//! One audited change, one helper.
//!
//! Every change of the kernel's own resources writes, besides itself, three
//! things that must stand or fall with it: its audit entry (SPEC §5), the
//! `kernel.<resource>.<past participle>` event that announces it (SPEC §7),
//! and the invalidation that makes every instance see it on the next request
//! (a NOTIFY to the other instances, delivered on commit, and this instance's
//! caches dropped after the commit). [`write`] runs them in one transaction
//! that a client hanging up cannot cut ([`Db::write`] detaches it), so that a
//! handler states only what changed:
//!
//! ```text
//! let role = change::write(&state, caller.audit_context(), move |tx, c| {
//!     Box::pin(async move {
//!         let role = store::insert_role(tx, &id, &tenant_id, &name, &grants, false).await?;
//!         c.audit(AuditEvent::new("role.created").resource("role", &role.id).details(json!({ … })))
//!             .publish("kernel.role.created");
//!         Ok(role)
//!     })
//! })
//! .await?;
//! ```
//!
//! What the body records is written after it returns `Ok` (or earlier, at
//! [`Change::flush`]): its audit entries in order, then its events, then the
//! NOTIFYs. A body that returns `Err` writes nothing: the transaction rolls
//! back, no entry, no event, no invalidation. A kernel event's payload is its
//! audit entry's details, redacted with the same keys, so no secret or
//! password hash that the audit trail keeps out can reach an event either; its
//! subject is the entry's resource id, and it goes to the tenant whose chain
//! receives the entry (platform resources: the system tenant).

use crate::audit::{self, AuditContext, AuditEvent};
use crate::authz::cache::{Invalidation, NOTIFY_CHANNEL};
use crate::db::{Db, Tx, TxFuture};
use crate::error::{ApiError, ApiResult};
use crate::events::{self, NewEvent};
use crate::state::AppState;

/// What a change records beside itself, written into its transaction.
pub struct Change {
    /// Who acts, from where, and whose chain (and event sequence) receives it.
    ctx: AuditContext,
    /// The audit redaction keys, also applied to event payloads.
    redact_keys: Vec<String>,
    /// Audit entries not written yet, in order.
    entries: Vec<AuditEvent>,
    /// Kernel events not written yet, in order.
    events: Vec<NewEvent>,
    /// What caches must drop once the change commits, without repeats.
    invalidations: Vec<Invalidation>,
    /// Whether events were appended: readers of this instance are woken after commit.
    published: bool,
}

/// An audit entry just recorded, which may also be announced as kernel events.
pub struct Audited<'c> {
    change: &'c mut Change,
}

/// What a committed change leaves for this instance to do.
#[must_use = "apply it to this instance's state once the change has committed"]
pub struct Done {
    invalidations: Vec<Invalidation>,
    published: bool,
}

impl Change {
    /// A change made in `ctx`, its audit details redacted with `redact_keys`.
    pub fn new(ctx: AuditContext, redact_keys: Vec<String>) -> Change {
        Change {
            ctx,
            redact_keys,
            entries: Vec::new(),
            events: Vec::new(),
            invalidations: Vec::new(),
            published: false,
        }
    }

    /// Changes the context, for a change whose tenant and actor are known only
    /// inside the transaction (a refresh token's session); before anything is
    /// recorded, which the new context would otherwise move to another chain.
    pub fn set_context(&mut self, ctx: AuditContext) {
        assert!(
            self.entries.is_empty() && self.events.is_empty(),
            "the context of a change is set before it records anything"
        );
        self.ctx = ctx;
    }

    /// Records an audit entry in the context's chain; `.publish(…)` on the
    /// answer announces it as a kernel event too.
    pub fn audit(&mut self, entry: AuditEvent) -> Audited<'_> {
        self.entries.push(entry);
        Audited { change: self }
    }

    /// Makes every instance drop what `what` names: by NOTIFY, delivered when
    /// the change commits, and here after the commit.
    pub fn invalidate(&mut self, what: Invalidation) {
        if !self.invalidations.contains(&what) {
            self.invalidations.push(what);
        }
    }

    /// Writes the audit entries and events recorded so far into `tx` (the
    /// helper does it after the body anyway; call it where a later statement
    /// of the body must come after the entry, as the registry's does).
    pub async fn flush(&mut self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        for entry in std::mem::take(&mut self.entries) {
            audit::record(tx, &self.ctx, entry, &self.redact_keys).await?;
        }
        let events = std::mem::take(&mut self.events);
        if !events.is_empty() {
            events::store::append(tx, &self.ctx.tenant_id, &events).await?;
            self.published = true;
        }
        Ok(())
    }

    /// Flushes, then sends the NOTIFYs; what is left to do after the commit.
    async fn finish(mut self, tx: &mut Tx) -> Result<Done, sqlx::Error> {
        self.flush(tx).await?;
        for what in &self.invalidations {
            tx.notify(NOTIFY_CHANNEL, &what.payload()).await?;
        }
        Ok(Done {
            invalidations: self.invalidations,
            published: self.published,
        })
    }
}

impl Audited<'_> {
    /// Announces the entry as the kernel event `event_type`
    /// (`kernel.<resource>.<past participle>`, listed in `docs/events.md`):
    /// subject the entry's resource id, payload its redacted details.
    pub fn publish(self, event_type: &'static str) -> Self {
        debug_assert!(
            event_type.starts_with("kernel.") && events::check_type(event_type).is_ok(),
            "{event_type} is not a kernel event type"
        );
        let change = &mut *self.change;
        if let Some(entry) = change.entries.last() {
            debug_assert!(
                entry.resource_id.is_some() && entry.details.is_object(),
                "{event_type}: a kernel event needs the entry's resource and object details"
            );
            let payload = audit::redact::redact(entry.details.clone(), &change.redact_keys);
            let subject = entry.resource_id.as_deref().unwrap_or_default();
            change
                .events
                .push(NewEvent::kernel(&change.ctx, event_type, subject, &payload));
        }
        self
    }
}

impl Done {
    /// Drops this instance's cached state the change invalidated, and wakes
    /// its event readers if the change published.
    pub fn apply(self, state: &AppState) {
        for what in &self.invalidations {
            state.invalidate(what);
        }
        if self.published {
            state.events().committed();
        }
    }
}

/// Runs `body` and what it records in one detached transaction on `db`; the
/// caller applies the answer's [`Done`] once it holds the value (the offline
/// command line has no running state to apply it to).
pub async fn write_db<T, F>(
    db: &Db,
    ctx: AuditContext,
    redact_keys: Vec<String>,
    body: F,
) -> Result<(T, Done), ApiError>
where
    T: Send + 'static,
    F: for<'t> FnOnce(&'t mut Tx, &'t mut Change) -> TxFuture<'t, T, ApiError> + Send + 'static,
{
    db.write(move |tx| {
        Box::pin(async move {
            let mut change = Change::new(ctx, redact_keys);
            let value = body(&mut *tx, &mut change).await?;
            let done = change.finish(tx).await?;
            Ok((value, done))
        })
    })
    .await
}

/// Runs `body` and what it records in one detached transaction, then applies
/// the invalidations to this instance — in a task of its own too, so that a
/// client hanging up between the commit and the invalidation cannot leave
/// this instance serving what the change revoked.
pub async fn write<T, F>(state: &AppState, ctx: AuditContext, body: F) -> ApiResult<T>
where
    T: Send + 'static,
    F: for<'t> FnOnce(&'t mut Tx, &'t mut Change) -> TxFuture<'t, T, ApiError> + Send + 'static,
{
    let state = state.clone();
    let task = tokio::spawn(async move {
        let (value, done) = write_db(state.db(), ctx, state.redact_keys(), body).await?;
        done.apply(&state);
        Ok(value)
    });
    task.await
        .map_err(|e| ApiError::internal(anyhow::anyhow!("a change's task failed: {e}")))?
}
