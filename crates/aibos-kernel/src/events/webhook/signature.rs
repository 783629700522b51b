//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>).
//!
//! A secret is `whsec_` followed by the standard base64 of 24 to 64 random
//! bytes; the HMAC key is those bytes (the base64 is decoded, not used as
//! text). Each delivery attempt carries:
//! - `webhook-id`: the message id, the same on every attempt of one event;
//! - `webhook-timestamp`: the attempt's time in Unix seconds;
//! - `webhook-signature`: `v1,<base64 of HMAC-SHA256 over "{id}.{timestamp}.{body}">`,
//!   space-separated when several secrets sign (a rotation's grace period), so
//!   a receiver holding either secret verifies the attempt.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::limits;

/// The prefix of every webhook signing secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// One secret's keyed HMAC state, computed once and cloned per message.
#[derive(Clone)]
pub struct SigningKey {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey([REDACTED])")
    }
}

/// Why a secret's text is not a Standard Webhooks secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// No `whsec_` prefix.
    #[error("does not start with whsec_")]
    Prefix,
    /// The rest is not standard base64.
    #[error("is not base64 after whsec_")]
    Base64,
    /// Too short to be a key, or longer than the specification allows.
    #[error("must hold 24 to 64 bytes")]
    Length,
}

impl SigningKey {
    /// Parses `whsec_<base64>`.
    pub fn parse(secret: &str) -> Result<SigningKey, SecretError> {
        let encoded = secret
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::Prefix)?;
        let mut bytes = STANDARD.decode(encoded).map_err(|_| SecretError::Base64)?;
        if !(limits::WEBHOOK_SECRET_BYTES_MIN..=limits::WEBHOOK_SECRET_BYTES_MAX)
            .contains(&bytes.len())
        {
            return Err(SecretError::Length);
        }
        let mac = Hmac::<Sha256>::new_from_slice(&bytes).map_err(|_| SecretError::Length)?;
        bytes.fill(0);
        Ok(SigningKey { mac })
    }

    /// `v1,<base64 signature>` of one message.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = self.mac.clone();
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(itoa::Buffer::new().format(timestamp).as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// A new secret: `whsec_` + base64 of [`limits::WEBHOOK_SECRET_BYTES`] random bytes.
pub fn new_secret() -> String {
    let mut bytes = [0u8; limits::WEBHOOK_SECRET_BYTES];
    getrandom::fill(&mut bytes).expect("the operating system's random source works");
    let secret = format!("{SECRET_PREFIX}{}", STANDARD.encode(bytes));
    bytes.fill(0);
    secret
}

/// The `webhook-signature` header value: one `v1,…` per key, space-separated.
pub fn signature_header(keys: &[SigningKey], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|k| k.sign(msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether any `v1` signature of `header` is the one `key` makes, compared in
/// constant time (the receiver's side; the kernel's tests and tools use it).
pub fn verify(key: &SigningKey, header: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    let expected = key.sign(msg_id, timestamp, body);
    header.split(' ').fold(false, |found, candidate| {
        let same: bool = candidate.as_bytes().ct_eq(expected.as_bytes()).into();
        found | same
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector of the Standard Webhooks reference libraries' own tests.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: i64 = 1_614_265_330;
    const SPEC_BODY: &str = r#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_the_specification_vector() {
        let key = SigningKey::parse(SPEC_SECRET).unwrap();
        assert_eq!(
            key.sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY.as_bytes()),
            SPEC_SIGNATURE
        );
        assert!(verify(
            &key,
            SPEC_SIGNATURE,
            SPEC_ID,
            SPEC_TIMESTAMP,
            SPEC_BODY.as_bytes()
        ));
    }

    #[test]
    fn any_change_to_id_timestamp_or_body_breaks_the_signature() {
        let key = SigningKey::parse(SPEC_SECRET).unwrap();
        let body = SPEC_BODY.as_bytes();
        assert!(!verify(
            &key,
            SPEC_SIGNATURE,
            "msg_other",
            SPEC_TIMESTAMP,
            body
        ));
        assert!(!verify(
            &key,
            SPEC_SIGNATURE,
            SPEC_ID,
            SPEC_TIMESTAMP + 1,
            body
        ));
        assert!(!verify(
            &key,
            SPEC_SIGNATURE,
            SPEC_ID,
            SPEC_TIMESTAMP,
            br#"{"test": 2432232315}"#
        ));
        let other = SigningKey::parse(&new_secret()).unwrap();
        assert!(!verify(
            &other,
            SPEC_SIGNATURE,
            SPEC_ID,
            SPEC_TIMESTAMP,
            body
        ));
    }

    #[test]
    fn during_a_rotation_both_signatures_are_sent_and_each_verifies() {
        let old = SigningKey::parse(SPEC_SECRET).unwrap();
        let new = SigningKey::parse(&new_secret()).unwrap();
        let header = signature_header(
            &[new.clone(), old.clone()],
            SPEC_ID,
            SPEC_TIMESTAMP,
            SPEC_BODY.as_bytes(),
        );
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1], SPEC_SIGNATURE);
        assert!(verify(
            &old,
            &header,
            SPEC_ID,
            SPEC_TIMESTAMP,
            SPEC_BODY.as_bytes()
        ));
        assert!(verify(
            &new,
            &header,
            SPEC_ID,
            SPEC_TIMESTAMP,
            SPEC_BODY.as_bytes()
        ));
    }

    #[test]
    fn new_secrets_parse_differ_and_hold_the_chosen_length() {
        let a = new_secret();
        let b = new_secret();
        assert_ne!(a, b);
        assert!(a.starts_with(SECRET_PREFIX));
        let decoded = STANDARD.decode(&a[SECRET_PREFIX.len()..]).unwrap();
        assert_eq!(decoded.len(), limits::WEBHOOK_SECRET_BYTES);
        assert!(SigningKey::parse(&a).is_ok());
    }

    #[test]
    fn malformed_secrets_are_refused() {
        assert_eq!(
            SigningKey::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
            SecretError::Prefix
        );
        assert_eq!(
            SigningKey::parse("whsec_!!!").unwrap_err(),
            SecretError::Base64
        );
        assert_eq!(
            SigningKey::parse("whsec_c2hvcnQ=").unwrap_err(),
            SecretError::Length
        );
        let long = format!("whsec_{}", STANDARD.encode([7u8; 65]));
        assert_eq!(SigningKey::parse(&long).unwrap_err(), SecretError::Length);
    }
}
