//! The NATS JetStream relay (SPEC §7, `events.nats_url`): every committed
//! event, per tenant in `seq` order, to subject `aibos.<tenant slug>.<type>`,
//! with `Nats-Msg-Id` = the event's id and the envelope of
//! `GET /api/kernel/events/{id}` as the body.
//!
//! ```text
//! wake (a commit here or, on PostgreSQL, in another kernel; or the poll)
//!  └ backlog: tenants with events after their position, least recently relayed first
//!    └ per tenant: claim the position (PostgreSQL: row lock, SKIP LOCKED)
//!      → read up to RELAY_BATCH_EVENTS_MAX events after it
//!      → publish them all, then await their acks in order
//!      → move the position to the last event before the first failure; release
//! ```
//!
//! The position is stored only after JetStream acknowledged an event, so a
//! relay that stops anywhere (crash, NATS outage, restart) resends from it and
//! loses nothing. What it sends twice carries the same `Nats-Msg-Id`, which the
//! stream's duplicate window absorbs (acknowledged `duplicate`, not stored):
//! each event is stored once. The resend happens at the next attempt, seconds
//! later, well inside the window, unless a kernel dies between a batch's acks
//! and its position and stays down longer than the window (two minutes): then
//! at most one batch is stored again, and consumers that deduplicate by `id`
//! see it once.
//!
//! While NATS is unreachable the relay backs off (doubling up to
//! [`limits::RELAY_BACKOFF_MAX_MS`]), logs the outage once and its end once,
//! and keeps its lag gauge current; the kernel serves and stores events as
//! usual, and the relay catches up when NATS is back.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use tokio_util::sync::CancellationToken;

use super::{TypeFilter, store};
use crate::limits;
use crate::state::AppState;

/// The subjects of the stream the relay publishes into: `aibos.<slug>.<type>`.
pub const SUBJECTS: &str = "aibos.>";

/// Longest stream name accepted in `events.nats_stream` (JetStream stores a
/// stream under a folder of its name, and caps names at 255 characters).
const STREAM_NAME_CHARS_MAX: usize = 255;

/// Checks `events.nats_stream`: what JetStream accepts as a stream name
/// (printable, no whitespace, none of `.`, `*`, `>`, `/`, `\`).
pub fn check_stream_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.chars().count() > STREAM_NAME_CHARS_MAX {
        return Err("must be 1 to 255 characters");
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err("may not hold whitespace, '.', '*', '>', '/' or '\\'");
    }
    Ok(())
}

/// The subject of an event of the tenant `slug`. Slugs (`[a-z0-9-]`) and
/// event types (dotted `[a-z0-9_]` segments) are valid NATS tokens as they are.
pub fn subject(slug: &str, event_type: &str) -> String {
    format!("aibos.{slug}.{event_type}")
}

/// Why a relay pass stopped.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    /// The kernel's database failed; the pass is retried.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// NATS could not be reached, or JetStream refused; retried with backoff.
    #[error("NATS: {0}")]
    Nats(String),
}

/// The relay's metric handles.
struct RelayMetrics {
    /// Events JetStream acknowledged (stored, or absorbed as duplicates).
    relayed: metrics::Counter,
    /// Of those, the acknowledgements that said `duplicate`: resends absorbed.
    duplicates: metrics::Counter,
    /// Events committed but not relayed yet, over all tenants.
    lag: metrics::Gauge,
}

/// Runs until `stop` when `events.nats_url` is set; returns at once otherwise.
/// The URL and stream are read at start (a change needs a restart).
pub async fn run(state: AppState, stop: CancellationToken) {
    let config = state.config();
    let Some(url) = config.events.nats_url.clone() else {
        return;
    };
    let stream_name = config.events.nats_stream.clone();
    drop(config);
    let metrics = RelayMetrics {
        relayed: state.metrics().counter("aibos_events_relayed_total", &[]),
        duplicates: state
            .metrics()
            .counter("aibos_events_relay_duplicates_total", &[]),
        lag: state.metrics().gauge("aibos_events_relay_lag_events", &[]),
    };
    let mut commits = state.events().watch();
    let mut jetstream: Option<jetstream::Context> = None;
    let mut failures: u32 = 0;
    loop {
        let pass = async {
            let backlog =
                store::relay_backlog(state.db(), limits::RELAY_TENANTS_PER_PASS_MAX).await?;
            metrics.lag.set(lag(&state, &backlog).await? as f64);
            if backlog.is_empty() {
                return Ok(0);
            }
            let context = match &jetstream {
                Some(context) => context.clone(),
                None => {
                    let context = connect(url.expose(), &stream_name).await?;
                    jetstream = Some(context.clone());
                    context
                }
            };
            let mut relayed = 0;
            for tenant in &backlog {
                relayed += relay_tenant(&state, &context, tenant, &metrics).await?;
            }
            Ok::<u64, RelayError>(relayed)
        };
        match pass.await {
            Ok(relayed) => {
                if failures > 0 {
                    tracing::info!(attempts = failures, "event relay: relaying again");
                    failures = 0;
                }
                if relayed > 0 {
                    // Look again at once: more may have committed meanwhile,
                    // and the lag gauge is read afresh.
                    continue;
                }
                tokio::select! {
                    () = super::wait_for_commit(&mut commits, Duration::from_millis(limits::EVENT_POLL_MS)) => {}
                    () = stop.cancelled() => return,
                }
            }
            Err(e) => {
                // Once per outage: the rest would only repeat it every few seconds.
                if failures == 0 {
                    tracing::warn!(error = %e, "event relay: cannot relay; retrying with backoff (events wait in the database)");
                } else {
                    tracing::debug!(error = %e, attempt = failures + 1, "event relay: still failing");
                }
                failures = failures.saturating_add(1);
                // The next attempt connects afresh and makes sure of the stream
                // again (an operator may have deleted it, or NATS restarted empty).
                jetstream = None;
                tokio::select! {
                    () = tokio::time::sleep(backoff(failures)) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
    }
}

/// The lag over all tenants: summed from the backlog when it holds them all,
/// else counted by the database.
async fn lag(state: &AppState, backlog: &[store::RelayBacklog]) -> Result<i64, sqlx::Error> {
    if backlog.len() < limits::RELAY_TENANTS_PER_PASS_MAX as usize {
        Ok(backlog
            .iter()
            .map(|t| t.last_seq - t.relayed_seq.unwrap_or(0))
            .sum())
    } else {
        store::relay_lag(state.db()).await
    }
}

/// The pause after `failures` failed attempts in a row: the base doubled per
/// failure, capped.
fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    Duration::from_millis(
        (limits::RELAY_BACKOFF_BASE_MS << doublings).min(limits::RELAY_BACKOFF_MAX_MS),
    )
}

/// Connects to NATS and makes sure a stream captures [`SUBJECTS`]: an existing
/// one is used as it is (an operator's, whatever its name); else `stream_name`
/// is created with file storage and the duplicate window the relay counts on.
async fn connect(url: &str, stream_name: &str) -> Result<jetstream::Context, RelayError> {
    // After this first connection the client reconnects by itself; publishes
    // meanwhile time out and are retried from the position.
    let client = async_nats::ConnectOptions::new()
        .name("aibos-kernel event relay")
        .connection_timeout(Duration::from_millis(limits::RELAY_CONNECT_TIMEOUT_MS))
        .connect(url)
        .await
        .map_err(|e| RelayError::Nats(format!("cannot connect: {e}")))?;
    let context = jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(limits::RELAY_ACK_TIMEOUT_MS))
        .ack_timeout(Duration::from_millis(limits::RELAY_ACK_TIMEOUT_MS))
        .build(client);
    match context.stream_by_subject(SUBJECTS).await {
        Ok(existing) => {
            tracing::info!(stream = %existing, "event relay: relaying into the existing stream");
            return Ok(context);
        }
        Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => {}
        Err(e) => return Err(RelayError::Nats(format!("cannot list streams: {e}"))),
    }
    context
        .get_or_create_stream(stream::Config {
            name: stream_name.to_owned(),
            subjects: vec![SUBJECTS.to_owned()],
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(limits::RELAY_DUPLICATE_WINDOW_SECONDS),
            ..Default::default()
        })
        .await
        .map_err(|e| RelayError::Nats(format!("cannot create stream {stream_name}: {e}")))?;
    tracing::info!(stream = %stream_name, "event relay: created the stream");
    Ok(context)
}

/// Relays one batch of `tenant`'s events; returns how many JetStream acknowledged.
async fn relay_tenant(
    state: &AppState,
    context: &jetstream::Context,
    tenant: &store::RelayBacklog,
    metrics: &RelayMetrics,
) -> Result<u64, RelayError> {
    let db = state.db();
    let Some(claim) =
        store::relay_claim(db, &tenant.tenant_id, tenant.relayed_seq.is_some()).await?
    else {
        return Ok(0); // another kernel is relaying this tenant
    };
    let batch = match store::read_after(
        db,
        &tenant.tenant_id,
        claim.relayed_seq,
        &TypeFilter::default(),
        limits::RELAY_BATCH_EVENTS_MAX,
    )
    .await
    {
        Ok(batch) => batch,
        Err(e) => {
            let _ = store::relay_release(claim).await;
            return Err(e.into());
        }
    };
    // Every publish first, then the acks: one round trip per batch. NATS keeps
    // one connection's messages in order, so the stream stores them in seq order.
    let mut pending = Vec::with_capacity(batch.events.len());
    let mut failure = None;
    for event in &batch.events {
        let body = match serde_json::to_vec(event) {
            Ok(body) => body,
            Err(e) => {
                failure = Some(format!("event {} cannot be serialised: {e}", event.id));
                break;
            }
        };
        let message = PublishMessage::build()
            .payload(body.into())
            .message_id(&event.id);
        match context
            .send_publish(subject(&tenant.slug, &event.event_type), message)
            .await
        {
            Ok(ack) => pending.push((event, ack)),
            Err(e) => {
                failure = Some(format!("publishing event {} failed: {e}", event.id));
                break;
            }
        }
    }
    let mut relayed_to = claim.relayed_seq;
    let mut relayed = 0u64;
    for (event, ack) in pending {
        match ack.await {
            Ok(ack) if failure.is_none() => {
                // The batch is read gap-free from the position: a gap here is our bug.
                debug_assert_eq!(event.seq, relayed_to + 1, "relay batch out of order");
                relayed_to = event.seq;
                relayed += 1;
                if ack.duplicate {
                    metrics.duplicates.increment(1);
                }
            }
            Ok(ack) => {
                if !ack.duplicate {
                    // Stored although an earlier event of the batch was not: it
                    // is now ahead of that one in the stream.
                    tracing::error!(
                        tenant_id = %tenant.tenant_id, seq = event.seq, event_id = %event.id,
                        "event relay: an event was stored after an earlier one of its tenant failed; the stream holds them out of seq order"
                    );
                }
            }
            Err(e) => {
                if failure.is_none() {
                    failure = Some(format!("event {} was not acknowledged: {e}", event.id));
                }
            }
        }
    }
    // Past every acknowledged event, and not one further.
    if relayed_to > claim.relayed_seq {
        store::relay_advance(db, claim, relayed_to).await?;
        metrics.relayed.increment(relayed);
    } else {
        store::relay_release(claim).await?;
    }
    match failure {
        Some(cause) => Err(RelayError::Nats(cause)),
        None => Ok(relayed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_are_what_jetstream_accepts() {
        assert!(check_stream_name("AIBOS_EVENTS").is_ok());
        assert!(check_stream_name("aibos-events-prod").is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>", "a/b", "a\\b", "a\tb"] {
            assert!(check_stream_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_stream_name(&"a".repeat(255)).is_ok());
        assert!(check_stream_name(&"a".repeat(256)).is_err());
    }

    #[test]
    fn subjects_are_prefix_slug_and_type() {
        assert_eq!(
            subject("acme-eu", "finance.payment.processed"),
            "aibos.acme-eu.finance.payment.processed"
        );
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        assert_eq!(
            backoff(1),
            Duration::from_millis(limits::RELAY_BACKOFF_BASE_MS)
        );
        assert_eq!(
            backoff(2),
            Duration::from_millis(2 * limits::RELAY_BACKOFF_BASE_MS)
        );
        assert_eq!(
            backoff(3),
            Duration::from_millis(4 * limits::RELAY_BACKOFF_BASE_MS)
        );
        assert_eq!(
            backoff(40),
            Duration::from_millis(limits::RELAY_BACKOFF_MAX_MS)
        );
        assert_eq!(
            backoff(u32::MAX),
            Duration::from_millis(limits::RELAY_BACKOFF_MAX_MS)
        );
    }
}
