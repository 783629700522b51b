//! The hash chain: canonical form, hash, and verification.
//!
//! `hash = hex(SHA-256(JCS(entry without "hash")))`, where JCS is RFC 8785. The
//! top-level members are fixed, so [`canonical_form`] writes them directly in
//! JCS order (keys sorted by UTF-16 code unit; all ours are ASCII) and hands only
//! `details` to a general RFC 8785 implementation. A property test checks the
//! result equals the general implementation on the whole entry.

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::AuditEntry;

/// `prev_hash` of a tenant's first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The RFC 8785 canonical JSON of `entry` without its `hash` member.
pub fn canonical_form(entry: &AuditEntry) -> String {
    let mut out = String::with_capacity(640);
    // Members in JCS order: keys sorted by UTF-16 code unit (all ours are ASCII).
    out.push_str("{\"action\":");
    push_json_string(&mut out, &entry.action);
    out.push_str(",\"actor_id\":");
    push_optional(&mut out, entry.actor_id.as_deref());
    out.push_str(",\"actor_type\":");
    push_json_string(&mut out, &entry.actor_type);
    out.push_str(",\"client_ip\":");
    push_optional(&mut out, entry.client_ip.as_deref());
    out.push_str(",\"correlation_id\":");
    push_optional(&mut out, entry.correlation_id.as_deref());
    out.push_str(",\"details\":");
    match serde_json_canonicalizer::to_string(&entry.details) {
        Ok(details) => out.push_str(&details),
        // Only non-finite numbers fail, and serde_json cannot hold them.
        Err(_) => out.push_str("null"),
    }
    out.push_str(",\"id\":");
    push_json_string(&mut out, &entry.id);
    out.push_str(",\"occurred_at\":");
    push_json_string(&mut out, &entry.occurred_at);
    out.push_str(",\"outcome\":");
    push_json_string(&mut out, &entry.outcome);
    out.push_str(",\"prev_hash\":");
    push_json_string(&mut out, &entry.prev_hash);
    out.push_str(",\"resource_id\":");
    push_optional(&mut out, entry.resource_id.as_deref());
    out.push_str(",\"resource_type\":");
    push_optional(&mut out, entry.resource_type.as_deref());
    out.push_str(",\"seq\":");
    out.push_str(&entry.seq.to_string());
    out.push_str(",\"severity\":");
    push_json_string(&mut out, &entry.severity);
    out.push_str(",\"tenant_id\":");
    push_json_string(&mut out, &entry.tenant_id);
    out.push_str(",\"user_agent\":");
    push_optional(&mut out, entry.user_agent.as_deref());
    out.push('}');
    out
}

fn push_optional(out: &mut String, value: Option<&str>) {
    match value {
        Some(s) => push_json_string(out, s),
        None => out.push_str("null"),
    }
}

/// A JSON string as RFC 8785 writes it (which is also how serde_json writes it):
/// `"` and `\` escaped, control characters as `\b \t \n \f \r` or `\u00xx`.
fn push_json_string(out: &mut String, s: &str) {
    // serde_json's string escaping is the JCS one; reuse it rather than re-implement.
    let mut buf = Vec::with_capacity(s.len() + 2);
    let _ = s.serialize(&mut serde_json::Serializer::new(&mut buf));
    out.push_str(std::str::from_utf8(&buf).unwrap_or("\"\""));
}

/// The hash of `entry` as it should be stored.
pub fn compute_hash(entry: &AuditEntry) -> String {
    hex(&Sha256::digest(canonical_form(entry).as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    s
}

/// The outcome of verifying one tenant's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Verification {
    /// The tenant.
    pub tenant_id: String,
    /// Entries checked.
    pub entries: u64,
    /// `true` when every entry verified.
    pub valid: bool,
    /// The first `seq` that does not verify, when any.
    pub first_bad_seq: Option<i64>,
    /// Why it does not verify.
    pub reason: Option<String>,
    /// The hash of the last verified entry.
    pub head_hash: String,
}

/// Walks one tenant's entries in `seq` order and stops at the first break.
pub struct Verifier {
    tenant_id: String,
    expected_seq: i64,
    prev_hash: String,
    entries: u64,
    broken: Option<(i64, String)>,
}

impl Verifier {
    /// Starts at `seq` 1 with the genesis hash.
    pub fn new(tenant_id: impl Into<String>) -> Verifier {
        Verifier {
            tenant_id: tenant_id.into(),
            expected_seq: 1,
            prev_hash: GENESIS_HASH.to_owned(),
            entries: 0,
            broken: None,
        }
    }

    /// Checks the next entry; returns `false` once the chain is broken.
    pub fn push(&mut self, entry: &AuditEntry) -> bool {
        if self.broken.is_some() {
            return false;
        }
        let problem = if entry.seq != self.expected_seq {
            Some(if entry.seq > self.expected_seq {
                format!(
                    "seq {} is missing (next entry is seq {}): an entry was deleted",
                    self.expected_seq, entry.seq
                )
            } else {
                format!("seq {} appears out of order or twice", entry.seq)
            })
        } else if entry.tenant_id != self.tenant_id {
            Some("the entry belongs to another tenant".to_owned())
        } else if entry.prev_hash != self.prev_hash {
            Some("prev_hash does not match the previous entry's hash: an entry was inserted, removed or reordered".to_owned())
        } else if compute_hash(entry) != entry.hash {
            Some("the hash does not match the entry's content: the entry was edited".to_owned())
        } else {
            None
        };
        match problem {
            Some(reason) => {
                self.broken = Some((self.expected_seq.min(entry.seq), reason));
                false
            }
            None => {
                self.entries += 1;
                self.expected_seq += 1;
                self.prev_hash.clone_from(&entry.hash);
                true
            }
        }
    }

    /// The hash of the last good entry so far.
    pub fn head_hash(&self) -> &str {
        &self.prev_hash
    }

    /// The last good `seq` so far.
    pub fn head_seq(&self) -> i64 {
        self.expected_seq - 1
    }

    /// Ends the walk. `recorded_head` is the chain head the database says it has
    /// (`None` for no entries): fewer entries than that means the tail was removed.
    pub fn finish(mut self, recorded_head: Option<i64>) -> Verification {
        if self.broken.is_none()
            && let Some(head) = recorded_head
            && head > self.head_seq()
        {
            self.broken = Some((
                self.expected_seq,
                format!(
                    "entries after seq {} are missing: the chain's head is seq {head}",
                    self.head_seq()
                ),
            ));
        }
        let (first_bad_seq, reason) = match self.broken {
            Some((seq, reason)) => (Some(seq), Some(reason)),
            None => (None, None),
        };
        Verification {
            tenant_id: self.tenant_id,
            entries: self.entries,
            valid: first_bad_seq.is_none(),
            first_bad_seq,
            reason,
            head_hash: self.prev_hash,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(seq: i64, prev_hash: &str, details: serde_json::Value) -> AuditEntry {
        let mut e = AuditEntry {
            id: format!("0190f3c4-7e2a-7c4e-9d1a-{seq:012}"),
            tenant_id: "t".into(),
            seq,
            occurred_at: "2026-11-23T01:02:03.456Z".into(),
            actor_type: "user".into(),
            actor_id: Some("u".into()),
            action: "user.created".into(),
            resource_type: Some("user".into()),
            resource_id: None,
            outcome: "success".into(),
            severity: "info".into(),
            client_ip: Some("127.0.0.1".into()),
            user_agent: None,
            correlation_id: None,
            details,
            prev_hash: prev_hash.into(),
            hash: String::new(),
        };
        e.hash = compute_hash(&e);
        e
    }

    fn general_jcs(e: &AuditEntry) -> String {
        let mut v = serde_json::to_value(e).unwrap();
        v.as_object_mut().unwrap().remove("hash");
        serde_json_canonicalizer::to_string(&v).unwrap()
    }

    #[test]
    fn the_fast_canonical_form_is_rfc_8785() {
        let e = entry(
            1,
            GENESIS_HASH,
            serde_json::json!({"b": 1.5e3, "a": ["x\u{1}", "é€"], "z": null, "m": {"y": true, "x": -0.0}}),
        );
        assert_eq!(canonical_form(&e), general_jcs(&e));
    }

    #[test]
    fn a_chain_verifies_and_each_kind_of_tampering_names_the_first_bad_seq() {
        let mut chain = Vec::new();
        let mut prev = GENESIS_HASH.to_owned();
        for seq in 1..=5 {
            let e = entry(seq, &prev, serde_json::json!({"n": seq}));
            prev = e.hash.clone();
            chain.push(e);
        }
        let verify = |entries: &[AuditEntry], head: i64| {
            let mut v = Verifier::new("t");
            for e in entries {
                if !v.push(e) {
                    break;
                }
            }
            v.finish(Some(head))
        };
        assert!(verify(&chain, 5).valid);

        let mut edited = chain.clone();
        edited[2].details = serde_json::json!({"n": 99});
        assert_eq!(verify(&edited, 5).first_bad_seq, Some(3));

        let mut deleted = chain.clone();
        deleted.remove(1);
        assert_eq!(verify(&deleted, 5).first_bad_seq, Some(2));

        let mut swapped = chain.clone();
        swapped.swap(1, 2);
        assert_eq!(verify(&swapped, 5).first_bad_seq, Some(2));

        let truncated = &chain[..3];
        assert_eq!(verify(truncated, 5).first_bad_seq, Some(4));

        // Re-hashing an edited entry is caught by the next entry's prev_hash.
        let mut rehashed = chain.clone();
        rehashed[2].details = serde_json::json!({"n": 99});
        rehashed[2].hash = compute_hash(&rehashed[2]);
        assert_eq!(verify(&rehashed, 5).first_bad_seq, Some(4));
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            (-1e15f64..1e15).prop_map(|f| serde_json::json!(f)),
            ".{0,12}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                prop::collection::btree_map("[a-zA-Z_é]{1,6}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn canonical_form_matches_the_general_implementation(details in json_value(), agent in proptest::option::of(".{0,20}")) {
            let mut e = entry(7, GENESIS_HASH, details);
            e.user_agent = agent;
            prop_assert_eq!(canonical_form(&e), general_jcs(&e));
        }
    }
}
