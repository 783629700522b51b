//! Identity and tenancy: tenants, users, service accounts, sessions and tokens.
//!
//! - [`routes`]: bootstrap, tenants, users, login/refresh/logout/me, the
//!   client-credentials grant, service accounts, JWKS.
//! - [`store`]: their SQL.
//! - [`tokens`]: signing keys and JWT issue/verification.
//! - [`password`]: Argon2id. [`throttle`]: login-failure throttling.
//! - [`admin`]: operations shared by the API and the offline CLI.

pub mod admin;
pub mod password;
pub mod routes;
pub mod store;
pub mod throttle;
pub mod tokens;

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// The system tenant's fixed id (created by the first migration).
pub const SYSTEM_TENANT_ID: &str = "00000000-0000-7000-8000-000000000001";

/// Checks a tenant slug: `^[a-z0-9][a-z0-9-]{1,62}$`.
pub fn parse_slug(slug: &str) -> Result<String, String> {
    let ok = (2..=63).contains(&slug.len())
        && slug
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && slug
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(slug.to_owned())
    } else {
        Err("must match ^[a-z0-9][a-z0-9-]{1,62}$".to_owned())
    }
}

/// Checks and lowercases an email address (one `@`, something on each side, no spaces).
pub fn parse_email(email: &str) -> Result<String, String> {
    let email = email.trim();
    let valid = email.len() <= 254
        && !email.contains(char::is_whitespace)
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && domain.contains('.')
                && !domain.contains('@')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        });
    if valid {
        Ok(email.to_ascii_lowercase())
    } else {
        Err("is not an email address".to_owned())
    }
}

/// Checks a display name: 1–200 characters, no control characters.
pub fn parse_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        Err("must be 1 to 200 characters without control characters".to_owned())
    } else {
        Ok(name.to_owned())
    }
}

/// A fresh 256-bit secret, base64url, with a prefix naming its kind (`kcs_`, `krt_`).
pub fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source works");
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// SHA-256 of a high-entropy secret (refresh tokens, client secrets), lowercase hex.
/// Enough for 256-bit random values; passwords get Argon2id instead.
pub fn secret_hash(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_and_emails_table() {
        for ok in ["acme", "a1", "acme-corp-2"] {
            assert!(parse_slug(ok).is_ok(), "{ok}");
        }
        for bad in [
            "a",
            "-acme",
            "Acme",
            "acme_corp",
            "' OR 1=1",
            &"a".repeat(64),
        ] {
            assert!(parse_slug(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_email(" Alice@Example.COM ").unwrap(),
            "alice@example.com"
        );
        for bad in ["alice", "@x.io", "a@b", "a b@x.io", "a@x.io@y.io", "a@.io"] {
            assert!(parse_email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_are_random_and_prefixed() {
        let a = new_secret("kcs_");
        assert!(a.starts_with("kcs_") && a.len() == 4 + 43);
        assert_ne!(a, new_secret("kcs_"));
        assert_eq!(secret_hash("x").len(), 64);
    }
}
