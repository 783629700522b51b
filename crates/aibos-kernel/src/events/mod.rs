//! The event bus (SPEC §7): durable publishing with one gap-free sequence per
//! tenant, reading from a position, and Server-Sent Events.
//!
//! An event is stored before its publisher hears `201`; its `seq` is assigned
//! in commit order (see `store::append`), so a consumer that reads from its
//! last `seq` never misses one and never sees one twice. Publishes of the API
//! go through the [`publisher`]'s group commit: concurrent publishers share one
//! transaction and one durable write. Kernel changes append their own
//! `kernel.*` events inside the change's transaction. [`webhook`] delivers
//! them to webhook subscriptions.

pub mod listener;
pub mod publisher;
pub mod relay;
pub mod retention;
pub mod routes;
pub mod store;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::audit::AuditContext;
use crate::db::Db;
use crate::telemetry::Metrics;

pub use publisher::Publisher;

/// Longest event type name.
pub const TYPE_CHARS_MAX: usize = 128;

/// The `source` of the events the kernel publishes about its own changes.
pub const KERNEL_SOURCE: &str = "kernel";

/// The channel on which PostgreSQL kernels tell each other that events committed.
pub const NOTIFY_CHANNEL: &str = "aibos_events";

/// One stored event: the envelope of SPEC §7.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Event {
    /// The event's id (UUIDv7).
    pub id: String,
    /// The tenant it belongs to.
    pub tenant_id: String,
    /// Its place in the tenant's gap-free sequence, from 1.
    pub seq: i64,
    /// Dotted, lower-case type, e.g. `finance.payment.processed`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The payload's schema version, from 1.
    pub version: i32,
    /// Who published it: `kernel` for the kernel's own changes, else the
    /// publishing service account's client id or `user`.
    pub source: String,
    /// What it is about (a resource id), if the publisher said.
    pub subject: Option<String>,
    /// `user`, `service` or `system`.
    pub actor_type: String,
    /// The user or service account that published it.
    pub actor_id: Option<String>,
    /// The correlation id of the request that published it.
    pub correlation_id: Option<String>,
    /// When it was published (RFC 3339 UTC, milliseconds).
    pub occurred_at: String,
    /// The JSON object published, byte for byte.
    #[schema(value_type = Object)]
    pub payload: Box<RawValue>,
}

/// An event to append: everything but the id, tenant, seq and time, which the
/// store assigns.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Dotted, lower-case type (checked by [`check_type`] before it gets here).
    pub event_type: String,
    /// The payload's schema version.
    pub version: i32,
    /// Who published it.
    pub source: String,
    /// What it is about.
    pub subject: Option<String>,
    /// `user`, `service` or `system`.
    pub actor_type: String,
    /// The publishing subject.
    pub actor_id: Option<String>,
    /// The request's correlation id.
    pub correlation_id: Option<String>,
    /// A JSON object as text.
    pub payload: String,
}

impl NewEvent {
    /// A `kernel.*` event about a change made in the context `ctx`; `subject`
    /// is the id of the resource changed.
    pub fn kernel(
        ctx: &AuditContext,
        event_type: &str,
        subject: &str,
        payload: &serde_json::Value,
    ) -> NewEvent {
        NewEvent {
            event_type: event_type.to_owned(),
            version: 1,
            source: KERNEL_SOURCE.to_owned(),
            subject: Some(subject.to_owned()),
            actor_type: ctx.actor_type.to_owned(),
            actor_id: ctx.actor_id.clone(),
            correlation_id: ctx.correlation_id.clone(),
            payload: payload.to_string(),
        }
    }
}

/// Where an appended event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The event's id.
    pub id: String,
    /// Its place in the tenant's sequence.
    pub seq: i64,
}

/// Checks an event type: dotted segments of lower-case letters, digits and
/// `_`, each starting with a letter, at least two segments, at most
/// [`TYPE_CHARS_MAX`] characters.
pub fn check_type(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > TYPE_CHARS_MAX {
        return Err("must be 1 to 128 characters");
    }
    let mut segments = 0;
    for segment in name.split('.') {
        segments += 1;
        let mut chars = segment.chars();
        match chars.next() {
            Some(c) if c.is_ascii_lowercase() => {}
            _ => return Err("each dotted segment must start with a lower-case letter"),
        }
        if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            return Err("may hold only lower-case letters, digits, '_' and '.'");
        }
    }
    if segments < 2 {
        return Err("must be dotted, e.g. finance.payment.processed");
    }
    Ok(())
}

/// Which event types a reader or subscription wants: exact names, or
/// `prefix.*` for every type under a prefix. Empty: every type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeFilter {
    exact: Vec<String>,
    /// Prefixes with their trailing dot (`finance.` for `finance.*`).
    prefixes: Vec<String>,
}

/// Most entries in one type filter.
pub const TYPE_FILTER_ENTRIES_MAX: usize = 50;

impl TypeFilter {
    /// Parses entries, each an event type or `prefix.*` (or `*` for all).
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<TypeFilter, String> {
        let mut filter = TypeFilter::default();
        let mut everything = false;
        for (i, entry) in entries.into_iter().enumerate() {
            if i >= TYPE_FILTER_ENTRIES_MAX {
                return Err(format!("at most {TYPE_FILTER_ENTRIES_MAX} types"));
            }
            let entry = entry.trim();
            if entry == "*" {
                everything = true;
            } else if let Some(prefix) = entry.strip_suffix(".*") {
                // A prefix is one or more segments: `finance.*`, `finance.payment.*`.
                check_segments(prefix).map_err(|m| format!("'{}': {m}", clip(entry)))?;
                filter.prefixes.push(format!("{prefix}."));
            } else {
                check_type(entry).map_err(|m| format!("'{}': {m}", clip(entry)))?;
                filter.exact.push(entry.to_owned());
            }
        }
        if everything {
            return Ok(TypeFilter::default());
        }
        Ok(filter)
    }

    /// Whether `event_type` passes.
    pub fn matches(&self, event_type: &str) -> bool {
        (self.exact.is_empty() && self.prefixes.is_empty())
            || self.exact.iter().any(|t| t == event_type)
            || self
                .prefixes
                .iter()
                .any(|p| event_type.starts_with(p.as_str()))
    }

    /// Whether every type passes.
    pub fn is_everything(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }
}

fn check_segments(prefix: &str) -> Result<(), &'static str> {
    if prefix.is_empty() || prefix.len() > TYPE_CHARS_MAX {
        return Err("the prefix must be 1 to 128 characters");
    }
    for segment in prefix.split('.') {
        let mut chars = segment.chars();
        match chars.next() {
            Some(c) if c.is_ascii_lowercase() => {}
            _ => return Err("each dotted segment must start with a lower-case letter"),
        }
        if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            return Err("may hold only lower-case letters, digits, '_' and '.'");
        }
    }
    Ok(())
}

/// The first characters of client text quoted back in an error.
fn clip(text: &str) -> String {
    text.chars().take(64).collect()
}

/// The event bus of one kernel: the group-commit publisher, the signal
/// readers wait on, and the bound on open streams.
pub struct EventBus {
    publisher: Publisher,
    committed: Arc<watch::Sender<u64>>,
    streams: Arc<Semaphore>,
    stopping: CancellationToken,
}

impl EventBus {
    /// A bus whose publisher is started by [`EventBus::start`].
    pub fn new() -> EventBus {
        EventBus {
            publisher: Publisher::new(),
            committed: Arc::new(watch::Sender::new(0)),
            streams: Arc::new(Semaphore::new(crate::limits::SSE_STREAMS_MAX)),
            stopping: CancellationToken::new(),
        }
    }

    /// Starts the publisher's writers.
    pub fn start(&self, db: Db, metrics: Metrics, tasks: &mut tokio::task::JoinSet<()>) {
        self.publisher
            .start(db, self.committed.clone(), metrics, tasks);
    }

    /// The group-commit publisher.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Says that events committed (in this process, or in another one that
    /// told us), waking every reader waiting in [`wait_for_commit`].
    pub fn committed(&self) {
        self.committed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver to wait for commits on.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.committed.subscribe()
    }

    /// A place for one more open stream, if there is one.
    pub fn stream_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.streams.clone().try_acquire_owned().ok()
    }

    /// Cancelled when the kernel stops: open streams end.
    pub fn stopping(&self) -> CancellationToken {
        self.stopping.clone()
    }

    /// Ends open streams (at shutdown).
    pub fn stop(&self) {
        self.stopping.cancel();
    }
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new()
    }
}

/// Waits until events commit or `poll` passes, whichever comes first. The
/// poll covers what no signal announces: another process on the same SQLite
/// file, or a lost PostgreSQL notification.
pub async fn wait_for_commit(receiver: &mut watch::Receiver<u64>, poll: Duration) {
    let _ = tokio::time::timeout(poll, receiver.changed()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_dotted_lower_case() {
        assert!(check_type("finance.payment.processed").is_ok());
        assert!(check_type("kernel.role_assignment.created").is_ok());
        assert!(check_type("a.b2").is_ok());
        for bad in [
            "",
            "payment",
            "Finance.payment",
            "finance..payment",
            "finance.payment.",
            ".finance",
            "finance.2payment",
            "finance.pay-ment",
            "finance.payment\u{0}",
            "finance.pay ment",
            "finance.paymént",
        ] {
            assert!(check_type(bad).is_err(), "{bad:?}");
        }
        assert!(check_type(&format!("a.{}", "b".repeat(126))).is_ok());
        assert!(check_type(&format!("a.{}", "b".repeat(127))).is_err());
    }

    #[test]
    fn filters_match_exact_names_and_prefixes() {
        let filter = TypeFilter::parse(["finance.payment.*", "kernel.user.created"]).unwrap();
        assert!(filter.matches("finance.payment.processed"));
        assert!(filter.matches("finance.payment.refund.issued"));
        assert!(!filter.matches("finance.paymentx.processed"));
        assert!(!filter.matches("finance.payment"));
        assert!(filter.matches("kernel.user.created"));
        assert!(!filter.matches("kernel.user.created2"));
        assert!(TypeFilter::parse(["*"]).unwrap().matches("anything.at.all"));
        assert!(TypeFilter::parse([]).unwrap().is_everything());
        assert!(TypeFilter::parse(["finance"]).is_err());
        assert!(TypeFilter::parse(["Finance.*"]).is_err());
        assert!(TypeFilter::parse([".*"]).is_err());
        let many: Vec<String> = (0..51).map(|i| format!("a.b{i}")).collect();
        assert!(TypeFilter::parse(many.iter().map(String::as_str)).is_err());
    }
}
