//! Compact JWS (RFC 7515) signed JWTs (RFC 7519) for the two algorithms the
//! kernel uses: EdDSA over Ed25519 (RFC 8037), for access tokens, and HS256, for
//! access tokens with `auth.jwt_secret` and for `x-kernel-assertion`.
//!
//! Our own code rather than `jsonwebtoken`: that crate reaches its signature
//! code only through a process-wide `CryptoProvider` (a `OnceLock` that locks in
//! a panicking provider if anything signs before one is installed), and its one
//! pure-Rust provider, `rust_crypto`, pulls the `rsa` crate (RUSTSEC-2023-0071)
//! although no RSA key is ever used. Here the key decides the algorithm, nothing
//! is global, and the format fits in this file.
//!
//! What [`verify`] checks, in order, each refusal its own [`JwsError`]:
//!
//! 1. three base64url segments (unpadded, canonical), a JSON header;
//! 2. `alg` is the key's algorithm (so `none`, and HS256 made with a public key,
//!    are refused before any signature code runs), and no `crit`;
//! 3. the signature (Ed25519 in its strict form; HMAC compared in constant time);
//! 4. the claims are a JSON object; `exp`, `iss` and `aud` are present, `iss`
//!    equals the expected issuer and `aud` names the expected audience;
//! 5. `exp` (and `nbf` when asked) against the caller's clock, with the leeway;
//! 6. the claims deserialise into the caller's type.
//!
//! The caller picks the key (by `kid`, from [`decode_header`]) and caps the
//! token's size before calling: both depend on where the token came from.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::Sha256;

/// The signature algorithms this module signs and verifies: every other `alg`,
/// `none` included, is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Ed25519 signatures (RFC 8037), `"alg":"EdDSA"`.
    EdDSA,
    /// HMAC-SHA256 (RFC 7518 §3.2), `"alg":"HS256"`.
    HS256,
}

impl Algorithm {
    /// The `alg` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::EdDSA => "EdDSA",
            Algorithm::HS256 => "HS256",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A key that signs: an Ed25519 private key or an HMAC secret.
///
/// `Debug` names the algorithm only, never the key.
#[derive(Clone)]
pub enum SigningKey {
    /// An Ed25519 private key.
    Ed25519(ed25519_dalek::SigningKey),
    /// An HMAC-SHA256 secret, already keyed (cloned per signature).
    Hs256(Hmac<Sha256>),
}

impl SigningKey {
    /// The Ed25519 key of a 32-byte seed (RFC 8032's private key).
    pub fn ed25519_from_seed(seed: &[u8; 32]) -> SigningKey {
        SigningKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(seed))
    }

    /// An HS256 key: `secret`'s bytes are the HMAC key, whatever their length.
    pub fn hs256(secret: &[u8]) -> SigningKey {
        SigningKey::Hs256(keyed_hmac(secret))
    }

    /// The algorithm this key signs with.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            SigningKey::Ed25519(_) => Algorithm::EdDSA,
            SigningKey::Hs256(_) => Algorithm::HS256,
        }
    }

    /// The raw signature of a JWS signing input (`base64url(header) "." base64url(payload)`).
    pub fn signature(&self, signing_input: &[u8]) -> Vec<u8> {
        match self {
            SigningKey::Ed25519(key) => {
                use ed25519_dalek::Signer as _;
                key.sign(signing_input).to_bytes().to_vec()
            }
            SigningKey::Hs256(mac) => {
                let mut mac = mac.clone();
                mac.update(signing_input);
                mac.finalize().into_bytes().to_vec()
            }
        }
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}, [REDACTED])", self.algorithm())
    }
}

/// A key that verifies: an Ed25519 public key or an HMAC secret.
///
/// `Debug` names the algorithm only: an HMAC secret is as secret as a private key.
#[derive(Clone)]
pub enum VerifyingKey {
    /// An Ed25519 public key.
    Ed25519(ed25519_dalek::VerifyingKey),
    /// An HMAC-SHA256 secret, already keyed (cloned per verification).
    Hs256(Hmac<Sha256>),
}

impl VerifyingKey {
    /// The Ed25519 public key of 32 bytes, refused if they are not a point of the curve.
    pub fn ed25519(public: &[u8; 32]) -> Result<VerifyingKey, JwsError> {
        ed25519_dalek::VerifyingKey::from_bytes(public)
            .map(VerifyingKey::Ed25519)
            .map_err(|_| JwsError::InvalidKey)
    }

    /// An HS256 key: `secret`'s bytes are the HMAC key, whatever their length.
    pub fn hs256(secret: &[u8]) -> VerifyingKey {
        VerifyingKey::Hs256(keyed_hmac(secret))
    }

    /// The only algorithm this key accepts.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            VerifyingKey::Ed25519(_) => Algorithm::EdDSA,
            VerifyingKey::Hs256(_) => Algorithm::HS256,
        }
    }

    fn verifies(&self, signing_input: &[u8], signature: &[u8]) -> bool {
        match self {
            VerifyingKey::Ed25519(key) => {
                let Ok(signature) = ed25519_dalek::Signature::from_slice(signature) else {
                    return false;
                };
                // Strict: refuses small-order keys and non-canonical signatures,
                // so a token has exactly one valid signature.
                key.verify_strict(signing_input, &signature).is_ok()
            }
            VerifyingKey::Hs256(mac) => {
                let mut mac = mac.clone();
                mac.update(signing_input);
                // Constant time, and the full 32 bytes (no truncated MACs).
                mac.verify_slice(signature).is_ok()
            }
        }
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({}, [REDACTED])", self.algorithm())
    }
}

fn keyed_hmac(secret: &[u8]) -> Hmac<Sha256> {
    // HMAC is defined for keys of every length (RFC 2104 §2); this never fails.
    <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length")
}

/// The JOSE header members read before anything is trusted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Header {
    /// The algorithm the token claims; [`verify`] accepts only its key's.
    pub alg: String,
    /// Which key signed it.
    pub kid: Option<String>,
    /// Critical extensions (RFC 7515 §4.1.11): none is understood, so any is refused.
    pub crit: Option<Value>,
}

/// What [`verify`] requires of the claims besides the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    /// The only `iss` accepted.
    pub issuer: String,
    /// The audience that `aud` must name (equal to it, or one of an array).
    pub audience: String,
    /// Tolerated clock difference on `exp` and `nbf`, in seconds.
    pub leeway_seconds: u64,
    /// Whether `exp` is checked against the clock. It is always required; a
    /// caller that checks time itself (to name the claim in its own errors)
    /// turns this off.
    pub check_exp: bool,
    /// Whether `nbf` is required and checked against the clock.
    pub check_nbf: bool,
}

impl Validation {
    /// Requires `iss` = `issuer`, `aud` naming `audience`, and an unexpired `exp`
    /// (no leeway, `nbf` not checked).
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Validation {
        Validation {
            issuer: issuer.into(),
            audience: audience.into(),
            leeway_seconds: 0,
            check_exp: true,
            check_nbf: false,
        }
    }
}

/// Why a token was refused. For logs: the client of a token is told only that it
/// was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    /// Not three base64url segments, or a header or claims that are not JSON objects.
    #[error("not a well-formed JWS: {0}")]
    Malformed(&'static str),
    /// The header's `alg` is not the key's algorithm (`none` included). Holds at
    /// most 32 printable characters of what was sent.
    #[error("algorithm {0:?} is not accepted")]
    AlgorithmNotAccepted(String),
    /// The header lists critical extensions.
    #[error("critical header extensions are not supported")]
    CriticalHeader,
    /// The signature does not verify with the key.
    #[error("the signature does not verify")]
    BadSignature,
    /// A required registered claim is absent.
    #[error("claim {0} is missing")]
    MissingClaim(&'static str),
    /// A registered claim has the wrong type (`exp` not an integer, `aud` not a string…).
    #[error("claim {0} is not valid")]
    InvalidClaim(&'static str),
    /// `iss` is not the expected issuer.
    #[error("the token was issued by someone else")]
    WrongIssuer,
    /// `aud` does not name the expected audience.
    #[error("the token is meant for another audience")]
    WrongAudience,
    /// `exp` has passed, beyond the leeway.
    #[error("the token expired at {exp}, it is now {now}")]
    Expired {
        /// The signed expiry (seconds since the epoch).
        exp: i64,
        /// The verifier's clock.
        now: i64,
    },
    /// `nbf` is still in the future, beyond the leeway.
    #[error("the token is not valid before {nbf}, it is now {now}")]
    NotYetValid {
        /// The signed start of validity (seconds since the epoch).
        nbf: i64,
        /// The verifier's clock.
        now: i64,
    },
    /// The claims do not have the shape the caller expects.
    #[error("the claims do not have the expected shape: {0}")]
    Claims(String),
    /// A public key that is not a point of Ed25519.
    #[error("the key is not a valid Ed25519 public key")]
    InvalidKey,
}

/// Signs `claims` as a compact JWS with `key`'s algorithm, naming `kid` in the header.
///
/// Fails only if `claims` does not serialise to JSON (a map with non-string keys).
pub fn sign<T: Serialize + ?Sized>(
    claims: &T,
    key: &SigningKey,
    kid: Option<&str>,
) -> Result<String, serde_json::Error> {
    #[derive(Serialize)]
    struct OutHeader<'a> {
        alg: &'static str,
        typ: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        kid: Option<&'a str>,
    }
    let header = serde_json::to_vec(&OutHeader {
        alg: key.algorithm().as_str(),
        typ: "JWT",
        kid,
    })?;
    let payload = serde_json::to_vec(claims)?;
    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(payload, &mut token);
    let signature = key.signature(token.as_bytes());
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut token);
    Ok(token)
}

/// The token's three segments: header, payload and signature (still encoded).
fn segments(token: &str) -> Result<[&str; 3], JwsError> {
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(header), Some(payload), Some(signature), None) => Ok([header, payload, signature]),
        _ => Err(JwsError::Malformed("not a compact JWS of three segments")),
    }
}

/// Reads the JOSE header, to pick the key its `kid` names. Nothing in it is
/// trusted until [`verify`] has checked the signature.
pub fn decode_header(token: &str) -> Result<Header, JwsError> {
    let [header, _, _] = segments(token)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| JwsError::Malformed("header is not base64url"))?;
    serde_json::from_slice(&bytes).map_err(|_| JwsError::Malformed("header is not a JOSE header"))
}

/// Verifies `token` with `key` and `validation` at `now_seconds` (seconds since
/// the epoch), and returns its claims as a `T`. See the module's documentation
/// for the order of the checks.
pub fn verify<T: DeserializeOwned>(
    token: &str,
    key: &VerifyingKey,
    validation: &Validation,
    now_seconds: i64,
) -> Result<T, JwsError> {
    let header = decode_header(token)?;
    if header.alg != key.algorithm().as_str() {
        return Err(JwsError::AlgorithmNotAccepted(printable_prefix(
            &header.alg,
        )));
    }
    if header.crit.is_some() {
        return Err(JwsError::CriticalHeader);
    }
    let [encoded_header, encoded_payload, encoded_signature] = segments(token)?;
    let signature = URL_SAFE_NO_PAD
        .decode(encoded_signature)
        .map_err(|_| JwsError::Malformed("signature is not base64url"))?;
    // The signing input is the first two segments as sent, dot included.
    let signing_input = &token.as_bytes()[..encoded_header.len() + 1 + encoded_payload.len()];
    if !key.verifies(signing_input, &signature) {
        return Err(JwsError::BadSignature);
    }

    let payload = URL_SAFE_NO_PAD
        .decode(encoded_payload)
        .map_err(|_| JwsError::Malformed("payload is not base64url"))?;
    // Parsed once: the checks below and the caller's type see the same members
    // (a duplicated member cannot mean one thing to each).
    let claims: Map<String, Value> = serde_json::from_slice(&payload)
        .map_err(|_| JwsError::Malformed("claims are not a JSON object"))?;
    check_claims(&claims, validation, now_seconds)?;
    serde_json::from_value(Value::Object(claims)).map_err(|e| JwsError::Claims(e.to_string()))
}

/// The registered-claim checks (RFC 7519 §4.1) of `validation`.
fn check_claims(
    claims: &Map<String, Value>,
    validation: &Validation,
    now_seconds: i64,
) -> Result<(), JwsError> {
    let leeway = i64::try_from(validation.leeway_seconds).unwrap_or(i64::MAX);
    let exp = numeric_date(claims, "exp")?.ok_or(JwsError::MissingClaim("exp"))?;
    let nbf = numeric_date(claims, "nbf")?;

    match claims.get("iss") {
        None => return Err(JwsError::MissingClaim("iss")),
        Some(Value::String(iss)) if *iss == validation.issuer => {}
        Some(Value::String(_)) => return Err(JwsError::WrongIssuer),
        Some(_) => return Err(JwsError::InvalidClaim("iss")),
    }
    // RFC 7519 §4.1.3: one string, or an array of strings one of which must be ours.
    let names_us = match claims.get("aud") {
        None => return Err(JwsError::MissingClaim("aud")),
        Some(Value::String(aud)) => *aud == validation.audience,
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => items
            .iter()
            .any(|item| item.as_str() == Some(validation.audience.as_str())),
        Some(_) => return Err(JwsError::InvalidClaim("aud")),
    };
    if !names_us {
        return Err(JwsError::WrongAudience);
    }

    // A signed time can be absurd; saturate rather than overflow.
    if validation.check_exp && exp.saturating_add(leeway) < now_seconds {
        return Err(JwsError::Expired {
            exp,
            now: now_seconds,
        });
    }
    if validation.check_nbf {
        let nbf = nbf.ok_or(JwsError::MissingClaim("nbf"))?;
        if nbf.saturating_sub(leeway) > now_seconds {
            return Err(JwsError::NotYetValid {
                nbf,
                now: now_seconds,
            });
        }
    }
    Ok(())
}

/// A NumericDate claim as whole seconds; `None` when absent. The kernel only
/// ever signs integers, so a fraction or a string is refused.
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, JwsError> {
    match claims.get(name) {
        None => Ok(None),
        Some(value) => value.as_i64().map(Some).ok_or(JwsError::InvalidClaim(name)),
    }
}

/// Up to 32 printable ASCII characters of an attacker-supplied value, for logs.
fn printable_prefix(text: &str) -> String {
    text.chars()
        .filter(char::is_ascii_graphic)
        .take(32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_750_000_000;
    const ISSUER: &str = "aibos-kernel";
    const AUDIENCE: &str = "aibos";

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn claims() -> Value {
        json!({ "iss": ISSUER, "aud": AUDIENCE, "sub": "u", "iat": NOW, "nbf": NOW, "exp": NOW + 900 })
    }

    fn validation() -> Validation {
        let mut validation = Validation::new(ISSUER, AUDIENCE);
        validation.leeway_seconds = 30;
        validation.check_nbf = true;
        validation
    }

    fn ed25519_pair(seed: u8) -> (SigningKey, VerifyingKey) {
        let signing = SigningKey::ed25519_from_seed(&[seed; 32]);
        let SigningKey::Ed25519(inner) = &signing else {
            unreachable!("an Ed25519 key")
        };
        let verifying = VerifyingKey::ed25519(inner.verifying_key().as_bytes()).expect("a point");
        (signing, verifying)
    }

    fn check(token: &str, key: &VerifyingKey) -> Result<Value, JwsError> {
        verify(token, key, &validation(), NOW)
    }

    /// A token with `header` (JSON text, sent as is) over `claims`, signed with `key`.
    fn token_with_header(header: &str, claims: &Value, key: &SigningKey) -> String {
        let input = format!(
            "{}.{}",
            b64(header.as_bytes()),
            b64(&serde_json::to_vec(claims).expect("json"))
        );
        format!("{input}.{}", b64(&key.signature(input.as_bytes())))
    }

    /// RFC 8037 Appendix A.4: the Ed25519 example JWS, byte for byte.
    #[test]
    fn the_rfc_8037_ed25519_example_signs_and_verifies_identically() {
        let seed: [u8; 32] = URL_SAFE_NO_PAD
            .decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
            .expect("base64url")
            .try_into()
            .expect("32 bytes");
        let public: [u8; 32] = URL_SAFE_NO_PAD
            .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .expect("base64url")
            .try_into()
            .expect("32 bytes");
        let signing_input = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc";
        let expected = "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";
        let signature = SigningKey::ed25519_from_seed(&seed).signature(signing_input.as_bytes());
        assert_eq!(b64(&signature), expected);
        let key = VerifyingKey::ed25519(&public).expect("the RFC's key");
        assert!(key.verifies(signing_input.as_bytes(), &signature));
        assert!(!key.verifies(b"eyJhbGciOiJFZERTQSJ9.X", &signature));
    }

    /// RFC 7515 Appendix A.1: the HS256 example JWS, with its odd header bytes.
    #[test]
    fn the_rfc_7515_hs256_example_verifies() {
        let key = URL_SAFE_NO_PAD
            .decode("AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow")
            .expect("base64url");
        let token = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        // The example has no `aud`: the signature verifies, then the claim check refuses.
        let validation = Validation::new("joe", "anyone");
        assert_eq!(
            verify::<Value>(
                token,
                &VerifyingKey::hs256(&key),
                &validation,
                1_300_819_000
            ),
            Err(JwsError::MissingClaim("aud"))
        );
        let (input, signature) = token.rsplit_once('.').expect("three segments");
        assert_eq!(
            b64(&SigningKey::hs256(&key).signature(input.as_bytes())),
            signature
        );
        let other = VerifyingKey::hs256(b"another key");
        assert_eq!(
            verify::<Value>(token, &other, &validation, 1_300_819_000),
            Err(JwsError::BadSignature)
        );
    }

    #[test]
    fn signed_tokens_round_trip_on_both_algorithms_and_name_their_kid() {
        let (ed_signing, ed_verifying) = ed25519_pair(7);
        let hs_signing = SigningKey::hs256(b"secret");
        let hs_verifying = VerifyingKey::hs256(b"secret");
        for (signing, verifying) in [(ed_signing, ed_verifying), (hs_signing, hs_verifying)] {
            let token = sign(&claims(), &signing, Some("k1")).expect("signs");
            assert_eq!(check(&token, &verifying), Ok(claims()), "{signing:?}");
            let header = decode_header(&token).expect("a header");
            assert_eq!(header.alg, signing.algorithm().as_str());
            assert_eq!(header.kid.as_deref(), Some("k1"));
            assert_eq!(header.crit, None);
        }
        let anonymous = sign(&claims(), &SigningKey::hs256(b"s"), None).expect("signs");
        assert_eq!(decode_header(&anonymous).expect("a header").kid, None);
    }

    #[test]
    fn a_token_of_another_key_or_with_a_changed_payload_is_refused() {
        let (signing, verifying) = ed25519_pair(1);
        let (other_signing, _) = ed25519_pair(2);
        let foreign = sign(&claims(), &other_signing, None).expect("signs");
        assert_eq!(check(&foreign, &verifying), Err(JwsError::BadSignature));

        let token = sign(&claims(), &signing, None).expect("signs");
        let [header, _, signature] = segments(&token).expect("three segments");
        let mut changed = claims();
        changed["sub"] = json!("admin");
        let payload = b64(&serde_json::to_vec(&changed).expect("json"));
        let forged = format!("{header}.{payload}.{signature}");
        assert_eq!(check(&forged, &verifying), Err(JwsError::BadSignature));

        let hs = sign(&claims(), &SigningKey::hs256(b"one"), None).expect("signs");
        assert_eq!(
            check(&hs, &VerifyingKey::hs256(b"two")),
            Err(JwsError::BadSignature)
        );
        // A truncated MAC is not a MAC.
        let (input, mac) = hs.rsplit_once('.').expect("three segments");
        let mac = URL_SAFE_NO_PAD.decode(mac).expect("base64url");
        let truncated = format!("{input}.{}", b64(&mac[..16]));
        assert_eq!(
            check(&truncated, &VerifyingKey::hs256(b"one")),
            Err(JwsError::BadSignature)
        );
    }

    #[test]
    fn alg_none_and_algorithm_confusion_are_refused_before_any_signature_check() {
        let (_, verifying) = ed25519_pair(3);
        let payload = b64(&serde_json::to_vec(&claims()).expect("json"));
        let none = format!("{}.{payload}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
        assert_eq!(
            check(&none, &verifying),
            Err(JwsError::AlgorithmNotAccepted("none".into()))
        );
        assert_eq!(
            check(&none, &VerifyingKey::hs256(b"s")),
            Err(JwsError::AlgorithmNotAccepted("none".into()))
        );

        // HS256 keyed with the Ed25519 public key (the classic confusion).
        let VerifyingKey::Ed25519(public) = &verifying else {
            unreachable!("an Ed25519 key")
        };
        let confused = sign(&claims(), &SigningKey::hs256(public.as_bytes()), None).expect("signs");
        assert_eq!(
            check(&confused, &verifying),
            Err(JwsError::AlgorithmNotAccepted("HS256".into()))
        );
        // EdDSA presented to an HMAC key, and other HMAC algorithms: refused by name.
        let (ed, _) = ed25519_pair(4);
        let eddsa = sign(&claims(), &ed, None).expect("signs");
        assert_eq!(
            check(&eddsa, &VerifyingKey::hs256(b"s")),
            Err(JwsError::AlgorithmNotAccepted("EdDSA".into()))
        );
        for alg in [
            "HS384", "HS512", "RS256", "PS256", "ES256", "hs256", "EDDSA",
        ] {
            let header = format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#);
            let token = token_with_header(&header, &claims(), &SigningKey::hs256(b"s"));
            assert_eq!(
                check(&token, &VerifyingKey::hs256(b"s")),
                Err(JwsError::AlgorithmNotAccepted(alg.into())),
                "{alg}"
            );
        }
        // What is echoed into logs is bounded and printable.
        let long = format!(r#"{{"alg":"{}\n"}}"#, "A".repeat(100));
        let token = token_with_header(&long, &claims(), &SigningKey::hs256(b"s"));
        assert_eq!(
            check(&token, &VerifyingKey::hs256(b"s")),
            Err(JwsError::AlgorithmNotAccepted("A".repeat(32)))
        );
    }

    #[test]
    fn critical_header_extensions_are_refused() {
        let key = SigningKey::hs256(b"s");
        let token = token_with_header(r#"{"alg":"HS256","crit":["exp"]}"#, &claims(), &key);
        assert_eq!(
            check(&token, &VerifyingKey::hs256(b"s")),
            Err(JwsError::CriticalHeader)
        );
    }

    #[test]
    fn time_is_checked_with_the_leeway_at_both_edges() {
        let key = SigningKey::hs256(b"s");
        let verifying = VerifyingKey::hs256(b"s");
        let with = |name: &str, value: i64| {
            let mut c = claims();
            c[name] = json!(value);
            sign(&c, &key, None).expect("signs")
        };
        assert!(check(&with("exp", NOW - 30), &verifying).is_ok());
        assert_eq!(
            check(&with("exp", NOW - 31), &verifying),
            Err(JwsError::Expired {
                exp: NOW - 31,
                now: NOW
            })
        );
        assert!(check(&with("nbf", NOW + 30), &verifying).is_ok());
        assert_eq!(
            check(&with("nbf", NOW + 31), &verifying),
            Err(JwsError::NotYetValid {
                nbf: NOW + 31,
                now: NOW
            })
        );
        // Absurd signed times saturate instead of overflowing.
        assert!(check(&with("exp", i64::MAX), &verifying).is_ok());
        assert!(matches!(
            check(&with("exp", i64::MIN), &verifying),
            Err(JwsError::Expired { .. })
        ));

        // Time checks off: the caller checks time itself, but exp must still be there.
        let mut relaxed = validation();
        relaxed.check_exp = false;
        relaxed.check_nbf = false;
        let stale = with("exp", NOW - 10_000);
        assert!(verify::<Value>(&stale, &verifying, &relaxed, NOW).is_ok());
        let mut no_nbf = claims();
        no_nbf.as_object_mut().expect("object").remove("nbf");
        let token = sign(&no_nbf, &key, None).expect("signs");
        assert!(verify::<Value>(&token, &verifying, &relaxed, NOW).is_ok());
        assert_eq!(
            check(&token, &verifying),
            Err(JwsError::MissingClaim("nbf"))
        );
    }

    #[test]
    fn registered_claims_are_required_typed_and_matched() {
        let key = SigningKey::hs256(b"s");
        let verifying = VerifyingKey::hs256(b"s");
        let edited = |edit: &dyn Fn(&mut Map<String, Value>)| {
            let mut c = claims();
            edit(c.as_object_mut().expect("object"));
            check(&sign(&c, &key, None).expect("signs"), &verifying)
        };
        for name in ["exp", "iss", "aud"] {
            assert_eq!(
                edited(&|c| {
                    c.remove(name);
                }),
                Err(JwsError::MissingClaim(name)),
                "{name}"
            );
        }
        assert_eq!(
            edited(&|c| {
                c.insert("exp".into(), json!("tomorrow"));
            }),
            Err(JwsError::InvalidClaim("exp"))
        );
        assert_eq!(
            edited(&|c| {
                c.insert("exp".into(), json!(1.5e9));
            }),
            Err(JwsError::InvalidClaim("exp"))
        );
        assert_eq!(
            edited(&|c| {
                c.insert("nbf".into(), json!(null));
            }),
            Err(JwsError::InvalidClaim("nbf"))
        );
        assert_eq!(
            edited(&|c| {
                c.insert("iss".into(), json!("someone-else"));
            }),
            Err(JwsError::WrongIssuer)
        );
        assert_eq!(
            edited(&|c| {
                c.insert("iss".into(), json!([ISSUER]));
            }),
            Err(JwsError::InvalidClaim("iss"))
        );
        assert_eq!(
            edited(&|c| {
                c.insert("aud".into(), json!("another-service"));
            }),
            Err(JwsError::WrongAudience)
        );
        assert_eq!(
            edited(&|c| {
                c.insert("aud".into(), json!(["x", "y"]));
            }),
            Err(JwsError::WrongAudience)
        );
        assert_eq!(
            edited(&|c| {
                c.insert("aud".into(), json!(["x", AUDIENCE]));
            }),
            Ok({
                let mut c = claims();
                c["aud"] = json!(["x", AUDIENCE]);
                c
            }),
            "an array naming us is accepted (RFC 7519 §4.1.3)"
        );
        assert_eq!(
            edited(&|c| {
                c.insert("aud".into(), json!([AUDIENCE, 3]));
            }),
            Err(JwsError::InvalidClaim("aud"))
        );
        assert_eq!(
            edited(&|c| {
                c.insert("aud".into(), json!([1, 2]));
            }),
            Err(JwsError::InvalidClaim("aud"))
        );
        assert_eq!(
            edited(&|c| {
                c.insert("aud".into(), json!({ "aud": AUDIENCE }));
            }),
            Err(JwsError::InvalidClaim("aud"))
        );
    }

    #[test]
    fn claims_of_the_wrong_shape_are_refused_after_the_signature() {
        #[derive(Debug, Deserialize)]
        struct Needs {
            #[allow(dead_code)]
            tid: String,
        }
        let key = SigningKey::hs256(b"s");
        let token = sign(&claims(), &key, None).expect("signs");
        assert!(matches!(
            verify::<Needs>(&token, &VerifyingKey::hs256(b"s"), &validation(), NOW),
            Err(JwsError::Claims(_))
        ));
        let array = token_with_header(r#"{"alg":"HS256"}"#, &json!([1, 2]), &key);
        assert_eq!(
            check(&array, &VerifyingKey::hs256(b"s")),
            Err(JwsError::Malformed("claims are not a JSON object"))
        );
    }

    #[test]
    fn garbled_tokens_are_malformed() {
        let key = SigningKey::hs256(b"s");
        let token = sign(&claims(), &key, None).expect("signs");
        let [header, payload, signature] = segments(&token).expect("three segments");
        let verifying = VerifyingKey::hs256(b"s");
        for garbled in [
            String::new(),
            "a.b".into(),
            "a.b.c.d".into(),
            "!!!.e30.".into(),
            format!("{header}.{payload}.{signature}."),
            // Padding and the standard alphabet are not base64url as JWS writes it.
            format!("{header}=.{payload}.{signature}"),
            format!("{header}.{payload}.+{}", &signature[1..]),
            format!("{}.{payload}.{signature}", b64(b"not json")),
            format!("{}.{payload}.{signature}", b64(br#"{"alg":1}"#)),
            format!(
                "{}.{payload}.{signature}",
                b64(br#"{"alg":"HS256","alg":"HS256"}"#)
            ),
        ] {
            let result = check(&garbled, &verifying);
            assert!(
                matches!(
                    result,
                    Err(JwsError::Malformed(_)) | Err(JwsError::BadSignature)
                ),
                "{garbled:?}: {result:?}"
            );
        }
        // A payload that is not base64url, under a valid signature, is still malformed.
        let bad_payload = format!("{header}.%%%%");
        let signed = format!(
            "{bad_payload}.{}",
            b64(&key.signature(bad_payload.as_bytes()))
        );
        assert_eq!(
            check(&signed, &verifying),
            Err(JwsError::Malformed("payload is not base64url"))
        );
    }

    proptest::proptest! {
        /// Any one character of a signed token changed (to another base64url
        /// character or a dot) and the token no longer verifies.
        #[test]
        fn changing_any_character_of_a_token_refuses_it(
            position in proptest::sample::select((0usize..400).collect::<Vec<_>>()),
            replacement in proptest::sample::select(
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.".chars().collect::<Vec<_>>()
            ),
            eddsa in proptest::bool::ANY,
        ) {
            let (signing, verifying) = if eddsa {
                ed25519_pair(5)
            } else {
                (SigningKey::hs256(b"s"), VerifyingKey::hs256(b"s"))
            };
            let token = sign(&claims(), &signing, Some("k")).expect("signs");
            let position = position % token.len();
            let original = token.as_bytes()[position] as char;
            proptest::prop_assume!(original != replacement);
            let mut changed = token.clone().into_bytes();
            changed[position] = replacement as u8;
            let changed = String::from_utf8(changed).expect("ASCII");
            proptest::prop_assert!(check(&token, &verifying).is_ok());
            proptest::prop_assert!(check(&changed, &verifying).is_err(), "{changed}");
        }
    }

    #[test]
    fn keys_never_print_their_secret() {
        let hs = SigningKey::hs256(b"super-secret");
        let (ed, ed_verifying) = ed25519_pair(9);
        for printed in [
            format!("{hs:?}"),
            format!("{ed:?}"),
            format!("{:?}", VerifyingKey::hs256(b"super-secret")),
            format!("{ed_verifying:?}"),
        ] {
            assert!(printed.contains("[REDACTED]"), "{printed}");
            assert!(!printed.contains("super"), "{printed}");
        }
    }

    #[test]
    fn a_public_key_off_the_curve_is_refused() {
        // y = 2 is not the y-coordinate of any Ed25519 point.
        let mut bytes = [0u8; 32];
        bytes[0] = 2;
        assert_eq!(
            VerifyingKey::ed25519(&bytes).map(|_| ()),
            Err(JwsError::InvalidKey)
        );
    }
}
