//! Access tokens: signing keys, JWT issue and verification, the JWKS document.
//!
//! EdDSA (Ed25519) by default: the kernel generates a key pair on first start and
//! keeps it in `signing_keys`; the private half never leaves the process in any
//! response or log. `aibos keys rotate` adds a new key; older keys keep verifying
//! until every token they signed has expired. HS256 with `auth.jwt_secret` is the
//! alternative. Verification pins the algorithm, requires a known `kid`, and
//! checks `iss`, `aud`, `exp` and `nbf` with 30 s of leeway.

use std::collections::HashMap;
use std::sync::Arc;

use aibos_wire::jws::{self, Algorithm, JwsError, SigningKey, Validation, VerifyingKey};
use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, JwtAlgorithm};
use crate::limits;

/// `iss` of every token this kernel signs.
pub const ISSUER: &str = "aibos-kernel";
/// `aud` of access tokens for the kernel's API.
pub const AUDIENCE: &str = "aibos";
/// `kid` of the HS256 secret.
const HS256_KID: &str = "hs256";
/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECONDS: u64 = 30;

/// The claims of an access token (SPEC §4).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Issuer: [`ISSUER`].
    pub iss: String,
    /// Audience: [`AUDIENCE`].
    pub aud: String,
    /// The user or service account.
    pub sub: String,
    /// The tenant: the only source of a request's tenant.
    pub tid: String,
    /// The session.
    pub sid: String,
    /// `user` or `service`.
    pub act: String,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// Expires.
    pub exp: i64,
    /// Token id.
    pub jti: String,
}

/// One stored Ed25519 key: a 32-byte seed and its public key.
#[derive(Clone)]
pub struct StoredKey {
    /// Key id, in every token's header.
    pub kid: String,
    /// The private seed (base64), as stored.
    pub seed: [u8; 32],
    /// The public key.
    pub public: [u8; 32],
    /// Whether new tokens are signed with it.
    pub active: bool,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("kid", &self.kid)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl StoredKey {
    /// A new random key.
    pub fn generate() -> StoredKey {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("the operating system's random source works");
        StoredKey::from_seed(
            format!("ed25519-{}", uuid::Uuid::now_v7().simple()),
            seed,
            true,
        )
    }

    /// A key from its stored seed.
    pub fn from_seed(kid: String, seed: [u8; 32], active: bool) -> StoredKey {
        let public = ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .to_bytes();
        StoredKey {
            kid,
            seed,
            public,
            active,
        }
    }

    /// The seed as stored in the database.
    pub fn seed_text(&self) -> String {
        STANDARD.encode(self.seed)
    }

    /// The public key as stored and published (base64url, no padding).
    pub fn public_text(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.public)
    }

    /// Signs arbitrary bytes (audit checkpoints).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer;
        ed25519_dalek::SigningKey::from_bytes(&self.seed)
            .sign(message)
            .to_bytes()
    }

    fn signing_key(&self) -> SigningKey {
        SigningKey::ed25519_from_seed(&self.seed)
    }
}

/// Verifies an Ed25519 signature with a raw public key.
pub fn verify_signature(public: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    use ed25519_dalek::Verifier;
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(public) else {
        return false;
    };
    key.verify(message, &ed25519_dalek::Signature::from_bytes(signature))
        .is_ok()
}

/// Why a token was refused (the client sees only 401).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Header unreadable, algorithm not the pinned one, or unknown `kid`.
    #[error("token header refused: {0}")]
    Header(String),
    /// Signature, `exp`, `nbf`, `iss` or `aud` failed.
    #[error("token refused: {0}")]
    Invalid(#[from] JwsError),
}

/// The keys in force: which signs, which verify. Swapped whole on rotation.
pub struct KeyRing {
    algorithm: Algorithm,
    signing_kid: String,
    signing: SigningKey,
    verifying: HashMap<String, VerifyingKey>,
    validation: Validation,
    jwks: serde_json::Value,
    /// The active Ed25519 key, for checkpoint signatures.
    active_key: Option<StoredKey>,
}

impl KeyRing {
    /// A ring from the configuration and the stored Ed25519 keys (ignored for HS256).
    pub fn new(auth: &AuthConfig, keys: &[StoredKey]) -> Result<KeyRing, String> {
        let (algorithm, signing_kid, signing, verifying, jwks, active_key) = match auth
            .jwt_algorithm
        {
            JwtAlgorithm::HS256 => {
                let secret = auth
                    .jwt_secret
                    .as_ref()
                    .ok_or("auth.jwt_secret is required for HS256")?;
                let mut verifying = HashMap::new();
                verifying.insert(
                    HS256_KID.to_owned(),
                    VerifyingKey::hs256(secret.expose().as_bytes()),
                );
                (
                    Algorithm::HS256,
                    HS256_KID.to_owned(),
                    SigningKey::hs256(secret.expose().as_bytes()),
                    verifying,
                    serde_json::json!({ "keys": [] }),
                    None,
                )
            }
            JwtAlgorithm::EdDSA => {
                let active = keys
                    .iter()
                    .find(|k| k.active)
                    .ok_or("no active signing key")?;
                let mut verifying = HashMap::new();
                let mut published = Vec::new();
                for key in keys {
                    let verifying_key = VerifyingKey::ed25519(&key.public)
                        .map_err(|e| format!("signing key {}: {e}", key.kid))?;
                    verifying.insert(key.kid.clone(), verifying_key);
                    published.push(serde_json::json!({
                        "kty": "OKP", "crv": "Ed25519", "x": key.public_text(), "kid": key.kid, "alg": "EdDSA", "use": "sig"
                    }));
                }
                (
                    Algorithm::EdDSA,
                    active.kid.clone(),
                    active.signing_key(),
                    verifying,
                    serde_json::json!({ "keys": published }),
                    Some(active.clone()),
                )
            }
        };
        // `sub` and `iat` are required too: `Claims` has no optional member.
        let mut validation = Validation::new(ISSUER, AUDIENCE);
        validation.leeway_seconds = LEEWAY_SECONDS;
        validation.check_exp = true;
        validation.check_nbf = true;
        Ok(KeyRing {
            algorithm,
            signing_kid,
            signing,
            verifying,
            validation,
            jwks,
            active_key,
        })
    }

    /// Signs `claims` with the active key.
    pub fn sign(&self, claims: &Claims) -> Result<String, serde_json::Error> {
        jws::sign(claims, &self.signing, Some(&self.signing_kid))
    }

    /// Verifies a token at `now_seconds` (seconds since the epoch): pinned
    /// algorithm, known `kid`, signature, registered claims.
    pub fn verify(&self, token: &str, now_seconds: i64) -> Result<Claims, TokenError> {
        if token.len() > limits::ACCESS_TOKEN_BYTES_MAX {
            return Err(TokenError::Header("token too long".to_owned()));
        }
        let header = jws::decode_header(token).map_err(|e| TokenError::Header(e.to_string()))?;
        if header.alg != self.algorithm.as_str() {
            // The key checks this too; refusing here keeps the kid lookup for real tokens.
            return Err(TokenError::Header(
                JwsError::AlgorithmNotAccepted(header.alg.chars().take(32).collect()).to_string(),
            ));
        }
        let kid = header
            .kid
            .ok_or_else(|| TokenError::Header("no kid".to_owned()))?;
        let key = self
            .verifying
            .get(&kid)
            .ok_or_else(|| TokenError::Header("unknown kid".to_owned()))?;
        Ok(jws::verify::<Claims>(
            token,
            key,
            &self.validation,
            now_seconds,
        )?)
    }

    /// `GET /.well-known/jwks.json`.
    pub fn jwks(&self) -> &serde_json::Value {
        &self.jwks
    }

    /// The active Ed25519 key (none with HS256).
    pub fn active_key(&self) -> Option<&StoredKey> {
        self.active_key.as_ref()
    }
}

/// The ring in force, swappable after a rotation.
pub type SharedKeyRing = Arc<ArcSwap<KeyRing>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn claims(now: i64) -> Claims {
        Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: "u".into(),
            tid: "t".into(),
            sid: "s".into(),
            act: "user".into(),
            iat: now,
            nbf: now,
            exp: now + 900,
            jti: "j".into(),
        }
    }

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    #[test]
    fn eddsa_tokens_verify_and_forgeries_do_not() {
        let config = Config::defaults();
        let ring = KeyRing::new(&config.auth, &[StoredKey::generate()]).unwrap();
        let token = ring.sign(&claims(now())).unwrap();
        assert_eq!(ring.verify(&token, now()).unwrap().tid, "t");

        // A token of another kernel's key (same kid made up) fails.
        let other = KeyRing::new(&config.auth, &[StoredKey::generate()]).unwrap();
        assert!(matches!(
            ring.verify(&other.sign(&claims(now())).unwrap(), now()),
            Err(TokenError::Header(_))
        ));

        // alg: none.
        let parts: Vec<&str> = token.split('.').collect();
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        assert!(matches!(
            ring.verify(&format!("{none_header}.{}.", parts[1]), now()),
            Err(TokenError::Header(message)) if message.contains("\"none\" is not accepted")
        ));

        // A changed payload with the old signature.
        let mut c = claims(now());
        c.tid = "other".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap());
        assert!(matches!(
            ring.verify(
                &format!("{}.{forged_payload}.{}", parts[0], parts[2]),
                now()
            ),
            Err(TokenError::Invalid(JwsError::BadSignature))
        ));

        // Expired beyond the leeway, and not yet valid beyond it; the edges hold.
        let mut c = claims(now());
        c.exp = now() - 31;
        assert!(matches!(
            ring.verify(&ring.sign(&c).unwrap(), now()),
            Err(TokenError::Invalid(JwsError::Expired { .. }))
        ));
        c.exp = now() - 30;
        assert!(ring.verify(&ring.sign(&c).unwrap(), now()).is_ok());
        let mut c = claims(now());
        c.nbf = now() + 120;
        assert!(matches!(
            ring.verify(&ring.sign(&c).unwrap(), now()),
            Err(TokenError::Invalid(JwsError::NotYetValid { .. }))
        ));

        // Wrong audience, wrong issuer.
        let mut c = claims(now());
        c.aud = "someone-else".into();
        assert!(matches!(
            ring.verify(&ring.sign(&c).unwrap(), now()),
            Err(TokenError::Invalid(JwsError::WrongAudience))
        ));
        let mut c = claims(now());
        c.iss = "another-kernel".into();
        assert!(matches!(
            ring.verify(&ring.sign(&c).unwrap(), now()),
            Err(TokenError::Invalid(JwsError::WrongIssuer))
        ));

        // A claim the kernel always signs, missing.
        let mut partial = serde_json::to_value(claims(now())).unwrap();
        partial.as_object_mut().unwrap().remove("sid");
        let kid = ring.signing_kid.clone();
        let token = jws::sign(&partial, &ring.signing, Some(&kid)).unwrap();
        assert!(matches!(
            ring.verify(&token, now()),
            Err(TokenError::Invalid(JwsError::Claims(_)))
        ));
    }

    #[test]
    fn hs256_tokens_verify_with_the_configured_secret_only() {
        let mut config = Config::defaults();
        config.auth.jwt_algorithm = JwtAlgorithm::HS256;
        config.auth.jwt_secret = Some(
            serde_json::from_value(serde_json::json!("a-secret-of-at-least-32-bytes-long!!"))
                .unwrap(),
        );
        let ring = KeyRing::new(&config.auth, &[]).unwrap();
        let token = ring.sign(&claims(now())).unwrap();
        assert_eq!(ring.verify(&token, now()).unwrap(), claims(now()));
        assert_eq!(ring.jwks(), &serde_json::json!({ "keys": [] }));

        config.auth.jwt_secret = Some(
            serde_json::from_value(serde_json::json!("another-secret-of-at-least-32-bytes!"))
                .unwrap(),
        );
        let other = KeyRing::new(&config.auth, &[]).unwrap();
        assert!(matches!(
            ring.verify(&other.sign(&claims(now())).unwrap(), now()),
            Err(TokenError::Invalid(JwsError::BadSignature))
        ));
        // An EdDSA token is refused by an HS256 ring, whatever its signature.
        let eddsa = KeyRing::new(&Config::defaults().auth, &[StoredKey::generate()]).unwrap();
        assert!(matches!(
            ring.verify(&eddsa.sign(&claims(now())).unwrap(), now()),
            Err(TokenError::Header(_))
        ));
    }

    #[test]
    fn hs256_signed_with_the_public_key_is_refused() {
        let config = Config::defaults();
        let key = StoredKey::generate();
        let ring = KeyRing::new(&config.auth, std::slice::from_ref(&key)).unwrap();
        for public in [key.public_text().into_bytes(), key.public.to_vec()] {
            let confused =
                jws::sign(&claims(now()), &SigningKey::hs256(&public), Some(&key.kid)).unwrap();
            assert!(matches!(
                ring.verify(&confused, now()),
                Err(TokenError::Header(message)) if message.contains("\"HS256\" is not accepted")
            ));
        }
    }

    #[test]
    fn checkpoint_signatures_verify_with_the_public_key_only() {
        let key = StoredKey::generate();
        let signature = key.sign(b"message");
        assert!(verify_signature(&key.public, b"message", &signature));
        assert!(!verify_signature(&key.public, b"messagE", &signature));
        let reloaded = StoredKey::from_seed(key.kid.clone(), key.seed, true);
        assert_eq!(reloaded.public, key.public);
    }
}
