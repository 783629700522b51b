//! Signed checkpoints: proof that a chain's head was what it was at a time, even
//! against someone who can rewrite the database and recompute every hash.
//!
//! A checkpoint signs the canonical JSON of `{tenant_id, seq, head_hash, signed_at}`
//! with the kernel's active Ed25519 key. `aibos audit verify --checkpoint FILE`
//! checks the signature, then recomputes the chain up to `seq` and compares the
//! hash there with `head_hash`. Which key the signature must verify under:
//! - with `--public-key KEY`, that key, pinned outside the database (taken from
//!   `/.well-known/jwks.json` or `aibos keys rotate --json` when it was made and
//!   kept with the checkpoints). Someone who can write the database can add a
//!   key of their own to `signing_keys` and re-sign a forged checkpoint; they
//!   cannot make it verify under a key they do not hold.
//! - without it, the public key in the file, which must be one of the keys in
//!   the database: this catches a changed chain, not a forger who also wrote
//!   their key into the database.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use super::store;
use crate::db::Db;
use crate::identity::tokens::{StoredKey, verify_signature};
use crate::timestamp;

/// A signed checkpoint, as written to a file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    /// The tenant whose chain it covers.
    pub tenant_id: String,
    /// The last `seq` it covers.
    pub seq: i64,
    /// The hash of entry `seq`.
    pub head_hash: String,
    /// When it was signed.
    pub signed_at: String,
    /// The signing key's id.
    pub kid: String,
    /// The signing key's public half (base64url).
    pub public_key: String,
    /// Ed25519 signature (base64url) over [`Checkpoint::signed_message`].
    pub signature: String,
}

impl Checkpoint {
    /// The bytes that are signed: RFC 8785 JSON of the four covered members.
    pub fn signed_message(tenant_id: &str, seq: i64, head_hash: &str, signed_at: &str) -> Vec<u8> {
        let value = serde_json::json!({ "tenant_id": tenant_id, "seq": seq, "head_hash": head_hash, "signed_at": signed_at });
        serde_json_canonicalizer::to_vec(&value).unwrap_or_default()
    }
}

/// Why a checkpoint could not be made or does not hold.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The chain is already broken; a checkpoint would certify a forgery.
    #[error(
        "the chain of tenant {tenant} does not verify (first bad seq {seq}); no checkpoint was made"
    )]
    Broken {
        /// The tenant.
        tenant: String,
        /// First bad seq.
        seq: i64,
    },
    /// The signature does not verify, or the key is not one of the kernel's.
    #[error("the checkpoint's signature does not verify: {0}")]
    Signature(String),
    /// Database error.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Verifies the tenant's chain and signs its head.
pub async fn make(
    db: &Db,
    key: &StoredKey,
    tenant_id: &str,
) -> Result<Checkpoint, CheckpointError> {
    let verification = store::verify_tenant(db, tenant_id, None).await?;
    if let Some(seq) = verification.first_bad_seq {
        return Err(CheckpointError::Broken {
            tenant: tenant_id.to_owned(),
            seq,
        });
    }
    let seq = i64::try_from(verification.entries).unwrap_or(i64::MAX);
    let signed_at = timestamp::now_text();
    let message = Checkpoint::signed_message(tenant_id, seq, &verification.head_hash, &signed_at);
    Ok(Checkpoint {
        tenant_id: tenant_id.to_owned(),
        seq,
        head_hash: verification.head_hash,
        signed_at,
        kid: key.kid.clone(),
        public_key: key.public_text(),
        signature: URL_SAFE_NO_PAD.encode(key.sign(&message)),
    })
}

/// The outcome of checking a chain against a checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointVerification {
    /// Whether the chain still matches the checkpoint.
    pub valid: bool,
    /// The checkpoint's tenant and seq.
    pub tenant_id: String,
    /// The checkpoint's seq.
    pub seq: i64,
    /// Why not, when not.
    pub reason: Option<String>,
    /// The first bad seq when the chain itself is broken below the checkpoint.
    pub first_bad_seq: Option<i64>,
}

/// Which public key a checkpoint's signature must verify under.
#[derive(Debug, Clone)]
pub enum TrustedKeys {
    /// The kernel's keys as stored in the database (base64url): the file's key must be one.
    Database(Vec<String>),
    /// One key given by the verifier, from outside the database.
    Pinned([u8; 32]),
}

/// Parses a pinned Ed25519 public key: the JWK the kernel publishes
/// (`{"kty":"OKP","crv":"Ed25519","x":…}`), or the 32 raw bytes as base64url
/// (a JWK's `x`), standard base64, or 64 hex digits.
pub fn parse_public_key(text: &str) -> Result<[u8; 32], String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE};
    let text = text.trim();
    let raw = if text.starts_with('{') {
        let jwk: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not a JWK: {e}"))?;
        if jwk["kty"] != "OKP" || jwk["crv"] != "Ed25519" {
            return Err("the JWK is not an Ed25519 key (kty OKP, crv Ed25519)".to_owned());
        }
        jwk["x"].as_str().ok_or("the JWK has no \"x\"")?.to_owned()
    } else {
        text.to_owned()
    };
    let bytes = if raw.len() == 64 && raw.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&raw[i * 2..i * 2 + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()
    } else {
        [URL_SAFE_NO_PAD, URL_SAFE, STANDARD, STANDARD_NO_PAD]
            .iter()
            .find_map(|e| e.decode(&raw).ok())
    };
    bytes
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| "an Ed25519 public key is 32 bytes: give the JWK, its \"x\" (base64url) or 64 hex digits".to_owned())
}

/// Checks the signature under `trusted`, then that the chain up to `seq` still
/// ends in `head_hash`.
pub async fn verify(
    db: &Db,
    checkpoint: &Checkpoint,
    trusted: &TrustedKeys,
) -> Result<CheckpointVerification, CheckpointError> {
    let public: [u8; 32] = match trusted {
        TrustedKeys::Database(known) => {
            if !known.contains(&checkpoint.public_key) {
                return Err(CheckpointError::Signature(
                    "the public key is not one of this kernel's keys".to_owned(),
                ));
            }
            URL_SAFE_NO_PAD
                .decode(&checkpoint.public_key)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| CheckpointError::Signature("malformed public key".to_owned()))?
        }
        // The file's own `public_key` is not looked at: a forger writes what they like there.
        TrustedKeys::Pinned(key) => *key,
    };
    let signature: [u8; 64] = URL_SAFE_NO_PAD
        .decode(&checkpoint.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| CheckpointError::Signature("malformed signature".to_owned()))?;
    let message = Checkpoint::signed_message(
        &checkpoint.tenant_id,
        checkpoint.seq,
        &checkpoint.head_hash,
        &checkpoint.signed_at,
    );
    if !verify_signature(&public, &message, &signature) {
        return Err(CheckpointError::Signature(match trusted {
            TrustedKeys::Pinned(_) => "it does not verify under the pinned public key: the checkpoint was altered, or signed by another key".to_owned(),
            TrustedKeys::Database(_) => "the signature does not match the checkpoint's content".to_owned(),
        }));
    }
    let verification =
        store::verify_tenant(db, &checkpoint.tenant_id, Some(checkpoint.seq)).await?;
    let (valid, reason) = if let Some(seq) = verification.first_bad_seq {
        (
            false,
            format!(
                "the chain is broken at seq {seq}: {}",
                verification.reason.clone().unwrap_or_default()
            ),
        )
    } else if i64::try_from(verification.entries).unwrap_or(0) < checkpoint.seq {
        (
            false,
            format!(
                "the chain has only {} entries; the checkpoint covers {}",
                verification.entries, checkpoint.seq
            ),
        )
    } else if verification.head_hash != checkpoint.head_hash {
        (
            false,
            format!(
                "the hash at seq {} differs from the checkpoint's: entries up to it were changed and re-hashed",
                checkpoint.seq
            ),
        )
    } else {
        (true, String::new())
    };
    Ok(CheckpointVerification {
        valid,
        tenant_id: checkpoint.tenant_id.clone(),
        seq: checkpoint.seq,
        reason: (!valid).then_some(reason),
        first_bad_seq: verification.first_bad_seq,
    })
}
