//! What the fill examples (`audit_fill`, `backup_fill`) share: the audit
//! entries they write in bulk, already chained and hashed. Not an example of
//! its own (cargo takes `examples/*.rs` and `examples/*/main.rs`).

use aibos_kernel::audit::{AuditEntry, chain};
use aibos_kernel::identity::SYSTEM_TENANT_ID;

/// Entry `seq` of the system tenant's chain after `prev` (the previous
/// entry's hash, or the genesis hash): a payment approval, as a finance
/// tenant's trail is mostly made of, hashed.
pub fn chained_entry(seq: i64, prev: &str) -> AuditEntry {
    let mut entry = AuditEntry {
        id: uuid::Uuid::now_v7().to_string(),
        tenant_id: SYSTEM_TENANT_ID.to_owned(),
        seq,
        occurred_at: aibos_kernel::timestamp::now_text(),
        actor_type: "user".to_owned(),
        actor_id: Some(uuid::Uuid::now_v7().to_string()),
        action: "payment.approved".to_owned(),
        resource_type: Some("payment".to_owned()),
        resource_id: Some(uuid::Uuid::now_v7().to_string()),
        outcome: "success".to_owned(),
        severity: "info".to_owned(),
        client_ip: Some("10.1.2.3".to_owned()),
        user_agent: Some("bench/1.0".to_owned()),
        correlation_id: Some(uuid::Uuid::now_v7().to_string()),
        details: serde_json::json!({ "amount_minor": seq * 7, "currency": "EUR", "reference": format!("INV-{seq}") }),
        prev_hash: prev.to_owned(),
        hash: String::new(),
    };
    entry.hash = chain::compute_hash(&entry);
    entry
}
