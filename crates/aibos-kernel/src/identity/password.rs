//! Password hashing: Argon2id with OWASP's parameters (19 MiB, 2 passes, 1 lane).
//!
//! Hashing is CPU-bound for tens of milliseconds, so it runs on dedicated worker
//! threads, never on the event loops. An unknown user is verified against a dummy hash made with the same
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

/// Argon2 on dedicated worker threads, one per core, fed by a bounded queue.
///
/// Each worker owns its 19 MiB of Argon2 memory and takes the next queued job the
/// moment it finishes one, so the cores never idle between hashes waiting for an
/// async task to be woken (a semaphore over `spawn_blocking` lost ~10% of login
/// throughput to that hand-off). More concurrent hashes than cores would only add
/// latency, and a fixed set of threads keeps resident memory at workers × 19 MiB
/// however many logins arrive at once.
pub struct Hasher {
    jobs: tokio::sync::mpsc::Sender<Job>,
}

enum Job {
    Hash {
        password: Password,
        reply: tokio::sync::oneshot::Sender<Result<String, String>>,
    },
    Verify {
        password: Password,
        phc: Option<String>,
        reply: tokio::sync::oneshot::Sender<bool>,
    },
}

impl Hasher {
    /// `workers` threads (the core count for a server, 1 for the CLI). The threads
    /// end when the `Hasher` is dropped.
    pub fn new(workers: usize) -> Hasher {
        let (jobs, queue) = tokio::sync::mpsc::channel(limits::PASSWORD_HASH_QUEUE);
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..workers.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("aibos-argon2-{n}"))
                .spawn(move || work(&queue))
                .expect("spawning a password hashing thread");
        }
        Hasher { jobs }
    }

    /// As many workers as the machine has cores.
    pub fn per_core() -> Hasher {
        Hasher::new(
            std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(2),
        )
    }

    /// Hashes a new password; returns the PHC string.
    pub async fn hash(&self, password: Password) -> Result<String, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Job::Hash { password, reply })
            .await
            .map_err(|_| "the password hashing workers have stopped".to_owned())?;
        answer
            .await
            .map_err(|_| "the password hashing worker failed".to_owned())?
    }

    /// Verifies; `None` as the hash verifies against a dummy hash of the same
    /// cost and always fails.
    pub async fn verify(&self, password: Password, phc: Option<String>) -> bool {
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self
            .jobs
            .send(Job::Verify {
                password,
                phc,
                reply,
            })
            .await
            .is_err()
        {
            return false;
        }
        answer.await.unwrap_or(false)
    }
}

/// A worker's loop: one job at a time until the queue closes.
fn work(queue: &Mutex<tokio::sync::mpsc::Receiver<Job>>) {
    let mut memory = Vec::new();
    loop {
        // The lock is held only while waiting for the next job; the hash runs unlocked.
        let job = queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .blocking_recv();
        match job {
            None => return,
            // A request whose client hung up while queued is not worth a hash.
            Some(Job::Verify { reply, .. }) if reply.is_closed() => {}
            Some(Job::Verify {
                password,
                phc,
                reply,
            }) => {
                let ok = verify_reusing(password.0.as_bytes(), phc.as_deref(), &mut memory);
                let _ = reply.send(ok);
            }
            Some(Job::Hash { password, reply }) => {
                let _ = reply.send(hash_now(password.0.as_bytes()));
            }
        }
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
