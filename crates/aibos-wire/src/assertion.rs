//! The identity the gateway forwards to a cell, and the assertion that proves it.
//!
//! The kernel signs, per proxied request, a compact HS256 JWT with the canon's own
//! assertion secret and sends it as [`ASSERTION_HEADER`] beside the plain identity
//! headers. The cell SDK verifies it; any language's JWT library can too, with the
//! secret string (UTF-8 bytes) as the HMAC key. The claims bind the call to one
//! canon (`aud`), one tenant and caller, one correlation id, and one method and
//! path (`htm`/`htu`, in the manner of RFC 9449), for [`ASSERTION_LIFETIME_SECONDS`].

use serde::{Deserialize, Serialize};

/// The signed assertion header.
pub const ASSERTION_HEADER: &str = "x-kernel-assertion";
/// The caller's tenant id (from the token's `tid`).
pub const TENANT_HEADER: &str = "x-tenant-id";
/// The caller's subject: user or service-account id (from the token's `sub`).
pub const USER_HEADER: &str = "x-user-sub";
/// `user` or `service`.
pub const ACTOR_TYPE_HEADER: &str = "x-actor-type";
/// The client address as the kernel saw it.
pub const FORWARDED_FOR_HEADER: &str = "x-forwarded-for";

/// Every header the gateway sets on a forwarded request. Client-supplied copies
/// are removed before forwarding, so a cell can trust them when the assertion verifies.
pub const FORWARDED_IDENTITY_HEADERS: [&str; 7] = [
    TENANT_HEADER,
    USER_HEADER,
    ACTOR_TYPE_HEADER,
    crate::correlation::CORRELATION_HEADER,
    FORWARDED_FOR_HEADER,
    crate::correlation::TRACEPARENT_HEADER,
    ASSERTION_HEADER,
];

/// How long an assertion is valid after it is signed.
pub const ASSERTION_LIFETIME_SECONDS: i64 = 60;

/// The JWT `alg` of assertions; verifiers must pin it.
pub const ASSERTION_ALGORITHM: &str = "HS256";

/// The claims of an `x-kernel-assertion`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssertionClaims {
    /// The kernel's issuer name (`aibos-kernel`).
    pub iss: String,
    /// The canon's name: an assertion for one canon is refused by every other.
    pub aud: String,
    /// Tenant id.
    pub tid: String,
    /// User or service-account id.
    pub sub: String,
    /// Actor type: `user` or `service`.
    pub act: String,
    /// Correlation id of the call.
    pub cid: String,
    /// HTTP method as forwarded (`GET`, `POST`, …).
    pub htm: String,
    /// Path and query as the cell receives them (`/payments/42?expand=ledger`).
    pub htu: String,
    /// Signed at (seconds since the epoch).
    pub iat: i64,
    /// Expires at (`iat` + [`ASSERTION_LIFETIME_SECONDS`]).
    pub exp: i64,
    /// Unique id of this assertion.
    pub jti: String,
}

/// The prefix of assertion secrets: `kas_<kid>_<random>`.
pub const SECRET_PREFIX: &str = "kas_";

/// Length of a kid: 16 lowercase hex characters.
pub const KID_LEN: usize = 16;

/// Splits an assertion secret into its kid and the whole secret, which is the
/// HMAC key. The kid is part of the secret's text so that a cell configured with
/// several secrets during a rotation can pick the one a token's `kid` names.
pub fn secret_kid(secret: &str) -> Option<&str> {
    let rest = secret.strip_prefix(SECRET_PREFIX)?;
    let (kid, random) = rest.split_once('_')?;
    let kid_ok = kid.len() == KID_LEN
        && kid
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let random_ok = random.len() >= 32
        && random
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (kid_ok && random_ok).then_some(kid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_names_its_kid() {
        let secret = "kas_0123456789abcdef_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_xyz";
        assert_eq!(secret_kid(secret), Some("0123456789abcdef"));
        assert_eq!(secret_kid("kas_0123456789abcdef_short"), None);
        assert_eq!(
            secret_kid("kas_0123456789ABCDEF_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"),
            None
        );
        assert_eq!(
            secret_kid("whsec_0123456789abcdef_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"),
            None
        );
        assert_eq!(secret_kid("kas_0123456789abcdef"), None);
        assert_eq!(secret_kid(""), None);
    }

    #[test]
    fn claims_use_the_documented_member_names() {
        let claims = AssertionClaims {
            iss: "aibos-kernel".into(),
            aud: "payments".into(),
            tid: "t".into(),
            sub: "u".into(),
            act: "user".into(),
            cid: "c".into(),
            htm: "GET".into(),
            htu: "/x?y=1".into(),
            iat: 1,
            exp: 61,
            jti: "j".into(),
        };
        let json = serde_json::to_value(&claims).unwrap();
        let mut keys: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "act", "aud", "cid", "exp", "htm", "htu", "iat", "iss", "jti", "sub", "tid"
            ]
        );
    }
}
