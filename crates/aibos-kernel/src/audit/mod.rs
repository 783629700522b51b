//! The tamper-evident audit trail (SPEC §5).
//!
//! Every entry is written by [`record`] inside the transaction of the change it
//! describes. Each tenant has its own chain: `seq` counts from 1 without gaps,
//! `prev_hash` is the previous entry's `hash`, and `hash` is SHA-256 over the
//! RFC 8785 canonical JSON of the entry as the API serves it, minus `hash`
//! (see `docs/audit-format.md` and [`chain`]). The table refuses UPDATE, DELETE
//! and TRUNCATE by triggers on both engines. [`verify`] re-verifies every
//! chain in the background, in bounded runs, and exports the result.

pub mod chain;
pub mod checkpoint;
pub mod redact;
pub mod routes;
pub mod store;
pub mod verify;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::db::Tx;

pub use chain::{GENESIS_HASH, Verification};

/// One audit entry, exactly as `GET /api/kernel/audit` serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// UUIDv7.
    pub id: String,
    /// The tenant whose chain holds it.
    pub tenant_id: String,
    /// Position in the tenant's chain, from 1, without gaps.
    pub seq: i64,
    /// RFC 3339 UTC with milliseconds.
    pub occurred_at: String,
    /// `user`, `service`, `system` or `anonymous`.
    pub actor_type: String,
    /// The user or service account, when known.
    pub actor_id: Option<String>,
    /// `<resource>.<past participle>`, e.g. `user.created`.
    pub action: String,
    /// What kind of thing changed.
    pub resource_type: Option<String>,
    /// Which one.
    pub resource_id: Option<String>,
    /// `success`, `failure` or `deny`.
    pub outcome: String,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    /// The client's address.
    pub client_ip: Option<String>,
    /// The client's `User-Agent`, truncated.
    pub user_agent: Option<String>,
    /// The request's correlation id.
    pub correlation_id: Option<String>,
    /// Action-specific facts, secrets redacted.
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    /// The previous entry's `hash`; 64 zeros for a tenant's first entry.
    pub prev_hash: String,
    /// SHA-256 (lowercase hex) over the canonical form of this entry without `hash`.
    pub hash: String,
}

/// Who did it, from where: taken from the authenticated caller and the request.
#[derive(Debug, Clone, Default)]
pub struct AuditContext {
    /// The tenant whose chain receives the entry.
    pub tenant_id: String,
    /// `user`, `service`, `system` or `anonymous`.
    pub actor_type: &'static str,
    /// The acting user or service account.
    pub actor_id: Option<String>,
    /// The client's address.
    pub client_ip: Option<String>,
    /// The client's `User-Agent`.
    pub user_agent: Option<String>,
    /// The request's correlation id.
    pub correlation_id: Option<String>,
}

impl AuditContext {
    /// The kernel itself acting (CLI commands, configuration reloads).
    pub fn system(tenant_id: impl Into<String>) -> AuditContext {
        AuditContext {
            tenant_id: tenant_id.into(),
            actor_type: "system",
            ..AuditContext::default()
        }
    }

    /// The same request, recorded into another tenant's chain.
    pub fn in_tenant(&self, tenant_id: impl Into<String>) -> AuditContext {
        AuditContext {
            tenant_id: tenant_id.into(),
            ..self.clone()
        }
    }
}

/// What happened; [`record`] adds who, when and the chain.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    /// Action name, from the list in `docs/audit-format.md`.
    pub action: &'static str,
    /// Resource kind.
    pub resource_type: Option<&'static str>,
    /// Resource id.
    pub resource_id: Option<String>,
    /// `success`, `failure` or `deny`.
    pub outcome: &'static str,
    /// `info`, `warning` or `critical`.
    pub severity: &'static str,
    /// Facts; redacted before storage.
    pub details: serde_json::Value,
}

impl AuditEvent {
    /// A successful, informational event with no resource and no details.
    pub fn new(action: &'static str) -> AuditEvent {
        AuditEvent {
            action,
            resource_type: None,
            resource_id: None,
            outcome: "success",
            severity: "info",
            details: serde_json::Value::Object(Default::default()),
        }
    }

    /// Names the resource.
    pub fn resource(mut self, kind: &'static str, id: impl Into<String>) -> AuditEvent {
        self.resource_type = Some(kind);
        self.resource_id = Some(id.into());
        self
    }

    /// Sets the outcome.
    pub fn outcome(mut self, outcome: &'static str) -> AuditEvent {
        self.outcome = outcome;
        self
    }

    /// Sets the severity.
    pub fn severity(mut self, severity: &'static str) -> AuditEvent {
        self.severity = severity;
        self
    }

    /// Sets the details.
    pub fn details(mut self, details: serde_json::Value) -> AuditEvent {
        self.details = details;
        self
    }
}

/// Appends `event` to the context's tenant chain inside `tx`. Redaction uses
/// `redact_keys`; the entry commits or rolls back with the rest of `tx`.
pub async fn record(
    tx: &mut Tx,
    ctx: &AuditContext,
    event: AuditEvent,
    redact_keys: &[String],
) -> Result<AuditEntry, sqlx::Error> {
    let details = redact::redact(event.details, redact_keys);
    store::append(
        tx,
        ctx,
        event.action,
        event.resource_type,
        event.resource_id,
        event.outcome,
        event.severity,
        details,
    )
    .await
}
