//! Signed checkpoints: proof that a chain's head was what it was at a time, even
//! against someone who can rewrite the database and recompute every hash.
//!
//! A checkpoint signs the canonical JSON of `{tenant_id, seq, head_hash, signed_at}`
//! with the kernel's active Ed25519 key. `aibos audit verify --checkpoint FILE`
//! checks the signature with the public key in the file (which must be one of
//! the kernel's keys, as published at `/.well-known/jwks.json`), then recomputes
//! the chain up to `seq` and compares the hash there with `head_hash`.

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

/// Checks the signature, then that the chain up to `seq` still ends in `head_hash`.
/// `known_public_keys` are the kernel's keys (base64url), so a file signed by
/// some other key is refused.
pub async fn verify(
    db: &Db,
    checkpoint: &Checkpoint,
    known_public_keys: &[String],
) -> Result<CheckpointVerification, CheckpointError> {
    if !known_public_keys.contains(&checkpoint.public_key) {
        return Err(CheckpointError::Signature(
            "the public key is not one of this kernel's keys".to_owned(),
        ));
    }
    let public: [u8; 32] = URL_SAFE_NO_PAD
        .decode(&checkpoint.public_key)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| CheckpointError::Signature("malformed public key".to_owned()))?;
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
        return Err(CheckpointError::Signature(
            "the signature does not match the checkpoint's content".to_owned(),
        ));
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
