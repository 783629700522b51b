//! Webhook subscriptions and their delivery (SPEC §7, Standard Webhooks).
//!
//! A tenant subscribes a URL to event types (exact, or `prefix.*`); the kernel
//! POSTs each matching event of the tenant to it, signed, at least once and in
//! `seq` order, retrying on the configured schedule, then dead-lettering.
//!
//! - [`config`]: the `events.webhook_*` keys.
//! - [`ssrf`]: what a webhook URL may be, and the connector that checks every
//!   address it connects to.
//! - [`signature`]: `whsec_` secrets and the `webhook-signature` header.
//! - [`client`]: the pooled, bounded delivery client.
//! - [`store`]: the SQL of subscriptions, deliveries and attempts.
//! - [`routes`]: the endpoints under `/api/kernel/subscriptions`.
//! - [`worker`]: the background delivery of each subscription's stream.

pub mod client;
pub mod config;
pub mod routes;
pub mod signature;
pub mod ssrf;
pub mod store;
pub mod worker;

use serde::Serialize;
use utoipa::ToSchema;

/// A subscription as the API shows it: never its secret.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Subscription {
    /// UUIDv7.
    pub id: String,
    /// Where events are POSTed.
    pub url: String,
    /// Exact event types, or `prefix.*` for every type under a prefix.
    pub event_types: Vec<String>,
    /// Free text for people.
    pub description: String,
    /// Whether events are delivered. A disabled subscription keeps its place
    /// in the stream and resumes from it when enabled again.
    pub enabled: bool,
    /// `failing` when the kernel disabled it after failing for
    /// `events.webhook_disable_after_hours`; `null` otherwise.
    pub disabled_reason: Option<String>,
    /// Every event of the tenant up to this `seq` has been delivered,
    /// dead-lettered, or did not match.
    pub delivered_seq: i64,
    /// Since when deliveries have failed without a success; `null` when the last attempt succeeded.
    pub failing_since: Option<String>,
    /// Until when deliveries also carry the signature of the secret before the
    /// last rotation; `null` outside a rotation's grace period.
    pub previous_secret_expires_at: Option<String>,
    /// Optimistic-concurrency version.
    pub version: i64,
    /// Creation time.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
}

/// A created subscription, with its signing secret (shown only now).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CreatedSubscription {
    /// The subscription.
    #[serde(flatten)]
    pub subscription: Subscription,
    /// `whsec_…`: verifies the `webhook-signature` of every delivery. Shown only now.
    pub secret: String,
}

/// A rotated secret, shown once.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RotatedSecret {
    /// The new `whsec_…` secret; deliveries are signed with it from now on.
    pub secret: String,
    /// Until then deliveries carry the old secret's signature too.
    pub previous_secret_expires_at: String,
}

/// One event sent (or to be sent) to one subscription, with its attempts.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Delivery {
    /// UUIDv7.
    pub id: String,
    /// The subscription.
    pub subscription_id: String,
    /// The event; also the `webhook-id` of every attempt.
    pub event_id: String,
    /// The event's `seq` in its tenant.
    pub event_seq: i64,
    /// The event's type.
    pub event_type: String,
    /// `pending` (an attempt is due at `next_attempt_at`), `delivered`,
    /// `dead_letter` (the last attempt of the schedule failed) or `cancelled`
    /// (a replay sent the event again as a new delivery).
    pub status: String,
    /// Asked for through `retry`: sent beside the subscription's ordered stream.
    pub out_of_band: bool,
    /// When the next attempt is due, while `pending`.
    pub next_attempt_at: Option<String>,
    /// The attempts so far, oldest first.
    pub attempts: Vec<DeliveryAttempt>,
    /// Creation time.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
}

/// One HTTP request to the receiver.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeliveryAttempt {
    /// 1 for the first attempt of the delivery.
    pub number: i64,
    /// When it was sent.
    pub attempted_at: String,
    /// `delivered` (a 2xx), `rejected` (another status; redirects are not
    /// followed), `timeout`, `connection_failed` or `refused_address` (the
    /// receiver's address is one webhooks may not call).
    pub outcome: String,
    /// The receiver's status, when it answered.
    pub response_status: Option<i64>,
    /// From sending to the end of the answer (read up to the excerpt's bound).
    pub latency_ms: i64,
    /// The first bytes of the answer, as text.
    pub response_excerpt: Option<String>,
    /// What went wrong, when it did.
    pub error: Option<String>,
}

/// Checks the event-type filters of a subscription: 1 to
/// [`crate::events::TYPE_FILTER_ENTRIES_MAX`] of them, each a dotted event type
/// (`finance.payment.processed`), a prefix of one followed by `.*`
/// (`finance.*`), or `*` for every type (as `crate::events::TypeFilter` reads
/// them); duplicates are dropped, the order is kept.
pub fn parse_event_types(types: &[String]) -> Result<Vec<String>, String> {
    if types.is_empty() {
        return Err("must list at least one event type, or a prefix such as finance.*".to_owned());
    }
    crate::events::TypeFilter::parse(types.iter().map(String::as_str))?;
    let mut kept: Vec<String> = Vec::with_capacity(types.len());
    for t in types {
        let t = t.trim().to_owned();
        if !kept.contains(&t) {
            kept.push(t);
        }
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_exact_types_or_prefixes() {
        let parse =
            |t: &[&str]| parse_event_types(&t.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            parse(&[
                "finance.payment.processed",
                "kernel.*",
                "finance.payment.processed"
            ])
            .unwrap(),
            vec!["finance.payment.processed", "kernel.*"]
        );
        for bad in [
            &[][..],
            &["finance."],
            &[".x"],
            &["Finance.x"],
            &["a..b"],
            &["a.*.b"],
            &["a b"],
            &["payment"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (0..=crate::events::TYPE_FILTER_ENTRIES_MAX)
            .map(|i| format!("t.n{i}"))
            .collect();
        assert!(parse_event_types(&many).is_err());
    }
}
