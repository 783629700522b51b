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
use crate::json_text::push_string;

/// `prev_hash` of a tenant's first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The members of an entry that the hash covers, borrowed: verification builds
/// this straight from the rows it reads, without an owned entry per row.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    /// `id`
    pub id: &'a str,
    /// `tenant_id`
    pub tenant_id: &'a str,
    /// `seq`
    pub seq: i64,
    /// `occurred_at`
    pub occurred_at: &'a str,
    /// `actor_type`
    pub actor_type: &'a str,
    /// `actor_id`
    pub actor_id: Option<&'a str>,
    /// `action`
    pub action: &'a str,
    /// `resource_type`
    pub resource_type: Option<&'a str>,
    /// `resource_id`
    pub resource_id: Option<&'a str>,
    /// `outcome`
    pub outcome: &'a str,
    /// `severity`
    pub severity: &'a str,
    /// `client_ip`
    pub client_ip: Option<&'a str>,
    /// `user_agent`
    pub user_agent: Option<&'a str>,
    /// `correlation_id`
    pub correlation_id: Option<&'a str>,
    /// `details`
    pub details: &'a serde_json::Value,
    /// `prev_hash`
    pub prev_hash: &'a str,
}

impl<'a> From<&'a AuditEntry> for Fields<'a> {
    fn from(e: &'a AuditEntry) -> Fields<'a> {
        Fields {
            id: &e.id,
            tenant_id: &e.tenant_id,
            seq: e.seq,
            occurred_at: &e.occurred_at,
            actor_type: &e.actor_type,
            actor_id: e.actor_id.as_deref(),
            action: &e.action,
            resource_type: e.resource_type.as_deref(),
            resource_id: e.resource_id.as_deref(),
            outcome: &e.outcome,
            severity: &e.severity,
            client_ip: e.client_ip.as_deref(),
            user_agent: e.user_agent.as_deref(),
            correlation_id: e.correlation_id.as_deref(),
            details: &e.details,
            prev_hash: &e.prev_hash,
        }
    }
}

/// The RFC 8785 canonical JSON of `entry` without its `hash` member.
pub fn canonical_form(entry: &AuditEntry) -> String {
    let mut out = Vec::with_capacity(640);
    write_canonical(&mut out, &Fields::from(entry));
    // Only UTF-8 text and ASCII punctuation were written.
    String::from_utf8(out).unwrap_or_default()
}

/// Appends the canonical form of `f` to `out`.
pub fn write_canonical(out: &mut Vec<u8>, f: &Fields<'_>) {
    // Members in JCS order: keys sorted by UTF-16 code unit (all ours are ASCII).
    out.extend_from_slice(b"{\"action\":");
    push_string(out, f.action);
    out.extend_from_slice(b",\"actor_id\":");
    push_optional(out, f.actor_id);
    out.extend_from_slice(b",\"actor_type\":");
    push_string(out, f.actor_type);
    out.extend_from_slice(b",\"client_ip\":");
    push_optional(out, f.client_ip);
    out.extend_from_slice(b",\"correlation_id\":");
    push_optional(out, f.correlation_id);
    out.extend_from_slice(b",\"details\":");
    write_details(out, f.details);
    out.extend_from_slice(b",\"id\":");
    push_string(out, f.id);
    out.extend_from_slice(b",\"occurred_at\":");
    push_string(out, f.occurred_at);
    out.extend_from_slice(b",\"outcome\":");
    push_string(out, f.outcome);
    out.extend_from_slice(b",\"prev_hash\":");
    push_string(out, f.prev_hash);
    out.extend_from_slice(b",\"resource_id\":");
    push_optional(out, f.resource_id);
    out.extend_from_slice(b",\"resource_type\":");
    push_optional(out, f.resource_type);
    out.extend_from_slice(b",\"seq\":");
    out.extend_from_slice(f.seq.to_string().as_bytes());
    out.extend_from_slice(b",\"severity\":");
    push_string(out, f.severity);
    out.extend_from_slice(b",\"tenant_id\":");
    push_string(out, f.tenant_id);
    out.extend_from_slice(b",\"user_agent\":");
    push_optional(out, f.user_agent);
    out.push(b'}');
}

/// `details` in RFC 8785 form. serde_json's own compact output is already that
/// form when the value has no floating-point numbers and no integer beyond 2^53
/// (those print the same)
/// and no key holds a character from U+E000 up (where the UTF-16 order JCS sorts
/// by differs from the code-point order of serde_json's sorted maps): then it is
/// written directly; otherwise a full RFC 8785 implementation runs.
fn write_details(out: &mut Vec<u8>, details: &serde_json::Value) {
    fn simple(v: &serde_json::Value) -> bool {
        match v {
            // RFC 8785 numbers are IEEE doubles: integers beyond 2^53 lose digits there.
            serde_json::Value::Number(n) => {
                const EXACT_MAX: u64 = 1 << 53;
                n.as_u64().is_some_and(|u| u <= EXACT_MAX)
                    || n.as_i64().is_some_and(|i| i.unsigned_abs() <= EXACT_MAX)
            }
            serde_json::Value::Array(items) => items.iter().all(simple),
            serde_json::Value::Object(map) => map
                .iter()
                .all(|(k, v)| k.chars().all(|c| c < '\u{e000}') && simple(v)),
            _ => true,
        }
    }
    if simple(details) && serde_json::to_writer(&mut *out, details).is_ok() {
        return;
    }
    match serde_json_canonicalizer::to_vec(details) {
        Ok(bytes) => out.extend_from_slice(&bytes),
        // Only non-finite numbers fail, and serde_json cannot hold them.
        Err(_) => out.extend_from_slice(b"null"),
    }
}

/// Whether `stored` (lowercase hex) is the hash of `f`; `buffer` is reused between calls.
pub fn hash_matches(f: &Fields<'_>, stored: &str, buffer: &mut Vec<u8>) -> bool {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    buffer.clear();
    write_canonical(buffer, f);
    let digest = Sha256::digest(buffer.as_slice());
    let mut hex_buf = [0u8; 64];
    for (i, b) in digest.iter().enumerate() {
        hex_buf[2 * i] = DIGITS[usize::from(b >> 4)];
        hex_buf[2 * i + 1] = DIGITS[usize::from(b & 0x0f)];
    }
    stored.as_bytes() == hex_buf
}

fn push_optional(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(s) => push_string(out, s),
        None => out.extend_from_slice(b"null"),
    }
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

    /// Continues a chain at `next_seq`, after an entry whose hash is
    /// `prev_hash` and which was verified before (a run of the periodic
    /// verification picking up where the last one stopped).
    pub fn resume(tenant_id: impl Into<String>, next_seq: i64, prev_hash: &str) -> Verifier {
        assert!(next_seq >= 1, "seq counts from 1");
        Verifier {
            tenant_id: tenant_id.into(),
            expected_seq: next_seq,
            prev_hash: prev_hash.to_owned(),
            entries: 0,
            broken: None,
        }
    }

    /// Checks the next entry; returns `false` once the chain is broken.
    pub fn push(&mut self, entry: &AuditEntry) -> bool {
        let hash_ok = compute_hash(entry) == entry.hash;
        self.push_hashed(entry, hash_ok)
    }

    /// Like [`Verifier::push`], with the hash check already done (in parallel, by the caller).
    pub fn push_hashed(&mut self, entry: &AuditEntry, hash_ok: bool) -> bool {
        self.push_checked(
            entry.seq,
            &entry.tenant_id,
            &entry.prev_hash,
            &entry.hash,
            hash_ok,
        )
    }

    /// The link checks of one entry whose own hash was checked (`hash_ok`) elsewhere.
    pub fn push_checked(
        &mut self,
        seq: i64,
        tenant_id: &str,
        prev_hash: &str,
        hash: &str,
        hash_ok: bool,
    ) -> bool {
        if self.broken.is_some() {
            return false;
        }
        let problem = if seq != self.expected_seq {
            Some(if seq > self.expected_seq {
                format!(
                    "seq {} is missing (next entry is seq {seq}): an entry was deleted",
                    self.expected_seq
                )
            } else {
                format!("seq {seq} appears out of order or twice")
            })
        } else if tenant_id != self.tenant_id {
            Some("the entry belongs to another tenant".to_owned())
        } else if prev_hash != self.prev_hash {
            Some("prev_hash does not match the previous entry's hash: an entry was inserted, removed or reordered".to_owned())
        } else if !hash_ok {
            Some("the hash does not match the entry's content: the entry was edited".to_owned())
        } else {
            None
        };
        match problem {
            Some(reason) => {
                self.broken = Some((self.expected_seq.min(seq), reason));
                false
            }
            None => {
                self.entries += 1;
                self.expected_seq += 1;
                hash.clone_into(&mut self.prev_hash);
                true
            }
        }
    }

    /// The tenant whose chain this walks.
    pub fn tenant(&self) -> &str {
        &self.tenant_id
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
