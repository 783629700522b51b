//! Throttling of repeated login failures, per (tenant, email) and per address.
//!
//! In memory, per kernel instance: a sliding count of failures within the
//! window. Successful logins do not count and do not reset the address count.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use quick_cache::sync::Cache;

use crate::limits;

/// Failure counts; both maps are bounded (oldest forgotten first).
pub struct LoginThrottle {
    accounts: Cache<(String, String), Failures>,
    addresses: Cache<IpAddr, Failures>,
    /// Serialises the read-modify-write of one count; held for nanoseconds, never across an await.
    update: Mutex<()>,
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    window_start: Instant,
}

/// When throttled: how long until the client may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl Default for LoginThrottle {
    fn default() -> LoginThrottle {
        LoginThrottle {
            accounts: Cache::new(limits::LOGIN_THROTTLE_KEYS_MAX),
            addresses: Cache::new(limits::LOGIN_THROTTLE_KEYS_MAX),
            update: Mutex::new(()),
        }
    }
}

fn window() -> Duration {
    Duration::from_secs(limits::LOGIN_FAILURE_WINDOW_SECONDS)
}

fn check(f: Option<Failures>, max: u32, now: Instant) -> Option<RetryAfter> {
    let f = f?;
    let elapsed = now.duration_since(f.window_start);
    (elapsed < window() && f.count >= max).then(|| RetryAfter(window() - elapsed))
}

impl LoginThrottle {
    /// `Some` when this login must be refused before any password is checked.
    pub fn check(&self, tenant: &str, email: &str, address: Option<IpAddr>) -> Option<RetryAfter> {
        let now = Instant::now();
        let account = check(
            self.accounts.get(&(tenant.to_owned(), email.to_owned())),
            limits::LOGIN_FAILURES_PER_ACCOUNT_MAX,
            now,
        );
        let by_address = address.and_then(|a| {
            check(
                self.addresses.get(&a),
                limits::LOGIN_FAILURES_PER_ADDRESS_MAX,
                now,
            )
        });
        match (account, by_address) {
            (Some(a), Some(b)) => Some(if a.0 >= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// Counts one failed login.
    pub fn record_failure(&self, tenant: &str, email: &str, address: Option<IpAddr>) {
        let now = Instant::now();
        let bump = |f: Option<Failures>| match f {
            Some(f) if now.duration_since(f.window_start) < window() => Failures {
                count: f.count + 1,
                ..f
            },
            _ => Failures {
                count: 1,
                window_start: now,
            },
        };
        let _guard = self.update.lock().unwrap_or_else(|p| p.into_inner());
        let key = (tenant.to_owned(), email.to_owned());
        self.accounts
            .insert(key.clone(), bump(self.accounts.get(&key)));
        if let Some(a) = address {
            self.addresses.insert(a, bump(self.addresses.get(&a)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_failures_throttle_the_account_but_not_another() {
        let t = LoginThrottle::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..5 {
            assert!(t.check("acme", "a@x.io", Some(ip)).is_none());
            t.record_failure("acme", "a@x.io", Some(ip));
        }
        let retry = t.check("acme", "a@x.io", Some(ip)).unwrap();
        assert!(retry.0 > Duration::from_secs(800));
        assert!(t.check("acme", "b@x.io", Some(ip)).is_none());
        assert!(t.check("other", "a@x.io", Some(ip)).is_none());
    }
}
