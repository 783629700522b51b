//! Password hashing: Argon2id with OWASP's parameters (19 MiB, 2 passes, 1 lane).
//!
//! Hashing is CPU-bound for tens of milliseconds, so it runs on tokio's blocking
//! pool. An unknown user is verified against a dummy hash made with the same
//! parameters, so every failed login costs the same time.

use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::limits;

/// OWASP's minimum for Argon2id: m = 19 MiB, t = 2, p = 1.
pub fn hasher() -> Argon2<'static> {
    let params = Params::new(19_456, 2, 1, None).expect("OWASP Argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// A password that passed the length checks. Never printed.
#[derive(Clone)]
pub struct Password(String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password([REDACTED])")
    }
}

impl Password {
    /// At least 12 characters, at most 1 KiB.
    pub fn parse(text: String) -> Result<Password, String> {
        if text.chars().count() < limits::PASSWORD_CHARS_MIN {
            return Err(format!(
                "must be at least {} characters",
                limits::PASSWORD_CHARS_MIN
            ));
        }
        if text.len() > limits::PASSWORD_BYTES_MAX {
            return Err(format!(
                "must be at most {} bytes",
                limits::PASSWORD_BYTES_MAX
            ));
        }
        Ok(Password(text))
    }

    /// For verification only: any length (a wrong password of any size is just wrong).
    pub fn candidate(text: String) -> Password {
        Password(text)
    }
}

/// Hashes on the blocking pool; returns the PHC string.
pub async fn hash(password: Password) -> Result<String, String> {
    tokio::task::spawn_blocking(move || hash_now(password.0.as_bytes()))
        .await
        .map_err(|e| e.to_string())?
}

/// Hashes on the current thread (CLI and benchmarks).
pub fn hash_now(password: &[u8]) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| e.to_string())?;
    hasher()
        .hash_password_with_salt(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Verifies on the blocking pool. `None` as the hash verifies against a dummy
/// hash of the same cost and always fails.
pub async fn verify(password: Password, phc: Option<String>) -> bool {
    tokio::task::spawn_blocking(move || verify_now(password.0.as_bytes(), phc.as_deref()))
        .await
        .unwrap_or(false)
}

/// Verifies on the current thread.
pub fn verify_now(password: &[u8], phc: Option<&str>) -> bool {
    // Same parameters as real hashes, so a miss costs what a hit costs.
    const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$1rMuKZ4w0yn6FZVm3rRXpsFm0OdXMDY5DkU1pO1j7Ks";
    let (phc, real) = match phc {
        Some(p) => (p, true),
        None => (DUMMY, false),
    };
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    hasher().verify_password(password, &parsed).is_ok() && real
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_the_dummy_never_does() {
        let phc = hash_now(b"correct horse battery").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify_now(b"correct horse battery", Some(&phc)));
        assert!(!verify_now(b"wrong horse battery", Some(&phc)));
        assert!(!verify_now(b"anything at all", None));
        assert!(!verify_now(b"x", Some("not a phc string")));
    }

    #[test]
    fn short_and_huge_passwords_are_refused() {
        assert!(Password::parse("short".into()).is_err());
        assert!(Password::parse("x".repeat(2000)).is_err());
        assert!(Password::parse("twelve chars".into()).is_ok());
    }
}
