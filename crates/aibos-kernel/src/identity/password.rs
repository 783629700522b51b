//! Password hashing: Argon2id with OWASP's parameters (19 MiB, 2 passes, 1 lane).
//!
//! Hashing is CPU-bound for tens of milliseconds, so it runs on tokio's blocking
//! pool. An unknown user is verified against a dummy hash made with the same
//! parameters, so every failed login costs the same time.

use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use argon2::{Algorithm, Argon2, Params, Version};

use std::sync::{Arc, Mutex};

use argon2::Block;
use subtle::ConstantTimeEq;

use crate::limits;

/// Verified when there is no such user: the same parameters as real hashes, so a
/// miss costs what a hit costs.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$1rMuKZ4w0yn6FZVm3rRXpsFm0OdXMDY5DkU1pO1j7Ks";

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

/// Runs Argon2 on the blocking pool, at most one hash per core at a time.
///
/// The bound matters twice: more concurrent hashes than cores only add latency,
/// and each blocking thread's allocator arena keeps the 19 MiB it last used, so an
/// unbounded burst of logins would leave hundreds of MiB resident.
pub struct Hasher {
    permits: tokio::sync::Semaphore,
    /// Argon2 working memory (19 MiB each), one per permit, reused from hash to
    /// hash: fresh memory per verification cost ~25% of login throughput in page
    /// faults. The lock is held only to take or return a buffer, never across an await.
    memory: Arc<Mutex<Vec<Vec<Block>>>>,
}

impl Hasher {
    /// `parallelism` concurrent hashes (the core count for a server, 1 for the CLI).
    pub fn new(parallelism: usize) -> Hasher {
        Hasher {
            permits: tokio::sync::Semaphore::new(parallelism.max(1)),
            memory: Arc::default(),
        }
    }

    /// As many concurrent hashes as the machine has cores.
    pub fn per_core() -> Hasher {
        Hasher::new(
            std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(2),
        )
    }

    /// Hashes a new password; returns the PHC string.
    pub async fn hash(&self, password: Password) -> Result<String, String> {
        let _permit = self.permits.acquire().await.map_err(|e| e.to_string())?;
        tokio::task::spawn_blocking(move || hash_now(password.0.as_bytes()))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Verifies; `None` as the hash verifies against a dummy hash of the same
    /// cost and always fails.
    pub async fn verify(&self, password: Password, phc: Option<String>) -> bool {
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        let pool = self.memory.clone();
        tokio::task::spawn_blocking(move || {
            let mut memory = pool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
                .unwrap_or_default();
            let ok = verify_reusing(password.0.as_bytes(), phc.as_deref(), &mut memory);
            pool.lock().unwrap_or_else(|p| p.into_inner()).push(memory);
            ok
        })
        .await
        .unwrap_or(false)
    }
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

/// Verifies like [`verify_now`], computing in `memory` (grown on first use and
/// kept by the caller) instead of fresh allocations.
pub fn verify_reusing(password: &[u8], phc: Option<&str>, memory: &mut Vec<Block>) -> bool {
    let (phc, real) = match phc {
        Some(p) => (p, true),
        None => (DUMMY_HASH, false),
    };
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
        return false;
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    if memory.len() != params.block_count() {
        memory.clear();
        memory.resize(params.block_count(), Block::default());
    }
    let mut out = vec![0u8; expected.as_bytes().len()];
    if argon
        .hash_password_into_with_memory(password, salt.as_ref(), &mut out, memory.as_mut_slice())
        .is_err()
    {
        return false;
    }
    bool::from(out.as_slice().ct_eq(expected.as_bytes())) && real
}

/// Verifies on the current thread.
pub fn verify_now(password: &[u8], phc: Option<&str>) -> bool {
    let (phc, real) = match phc {
        Some(p) => (p, true),
        None => (DUMMY_HASH, false),
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
        let mut memory = Vec::new();
        assert!(verify_reusing(
            b"correct horse battery",
            Some(&phc),
            &mut memory
        ));
        assert!(!verify_reusing(
            b"wrong horse battery",
            Some(&phc),
            &mut memory
        ));
        assert!(!verify_reusing(b"anything at all", None, &mut memory));
        assert!(
            verify_reusing(b"correct horse battery", Some(&phc), &mut memory),
            "reused memory gives the same result"
        );
    }

    #[test]
    fn short_and_huge_passwords_are_refused() {
        assert!(Password::parse("short".into()).is_err());
        assert!(Password::parse("x".repeat(2000)).is_err());
        assert!(Password::parse("twelve chars".into()).is_ok());
    }
}
