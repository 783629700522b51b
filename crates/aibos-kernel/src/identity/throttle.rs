//! Throttling of repeated login failures, per (tenant, email) and per address.
//!
//! In memory, per kernel instance: a count of failures within a fixed window
//! opened by the first one. An attempt is counted *before* its password is
//! verified ([`LoginThrottle::reserve`]) and forgiven only when it succeeds, so
//! fifty guesses sent at once meet the same budget as fifty sent one by one,
//! and a client that hangs up mid-verification has still spent its try.
//! Successful logins do not count and do not reset the address count.

use std::net::{IpAddr, Ipv6Addr};
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

/// The key an address is counted under: IPv6 by its /64, the block one
/// subscriber usually holds whole (counting each of its 2^64 addresses apart
/// would let one client rotate through them).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let [a, b, c, d, ..] = v6.segments();
            IpAddr::V6(Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// `Some` when `f` is at `max` within its window.
fn throttled(f: Option<Failures>, max: u32, now: Instant) -> Option<RetryAfter> {
    let f = f?;
    let elapsed = now.duration_since(f.window_start);
    (elapsed < window() && f.count >= max).then(|| RetryAfter(window() - elapsed))
}

/// `f` with one more failure (a new window when the last one ended).
fn bumped(f: Option<Failures>, now: Instant) -> Failures {
    match f {
        Some(f) if now.duration_since(f.window_start) < window() => Failures {
            count: f.count.saturating_add(1),
            ..f
        },
        _ => Failures {
            count: 1,
            window_start: now,
        },
    }
}

/// One login attempt, counted as a failure from the moment it was reserved:
/// [`Attempt::succeeded`] forgives it; dropped otherwise, it stays counted.
#[must_use = "an attempt not marked as succeeded counts as a failure"]
pub struct Attempt<'a> {
    throttle: &'a LoginThrottle,
    account: (String, String),
    address: Option<IpAddr>,
    at: Instant,
}

impl LoginThrottle {
    /// Reserves one attempt for (tenant, email) from `address`, or says how
    /// long to wait when either count is spent. `tenant` should be the
    /// tenant's id when it exists, so that its slug and its id are one bucket.
    pub fn reserve(
        &self,
        tenant: &str,
        email: &str,
        address: Option<IpAddr>,
    ) -> Result<Attempt<'_>, RetryAfter> {
        let now = Instant::now();
        let account = (tenant.to_owned(), email.to_owned());
        let address = address.map(address_key);
        let _guard = self.update.lock().unwrap_or_else(|p| p.into_inner());
        let by_account = throttled(
            self.accounts.get(&account),
            limits::LOGIN_FAILURES_PER_ACCOUNT_MAX,
            now,
        );
        let by_address = address.and_then(|a| {
            throttled(
                self.addresses.get(&a),
                limits::LOGIN_FAILURES_PER_ADDRESS_MAX,
                now,
            )
        });
        if let Some(retry) = by_account.into_iter().chain(by_address).max_by_key(|r| r.0) {
            return Err(retry);
        }
        self.accounts
            .insert(account.clone(), bumped(self.accounts.get(&account), now));
        if let Some(a) = address {
            self.addresses
                .insert(a, bumped(self.addresses.get(&a), now));
        }
        Ok(Attempt {
            throttle: self,
            account,
            address,
            at: now,
        })
    }
}

impl Attempt<'_> {
    /// The login succeeded: it does not count.
    pub fn succeeded(self) {
        let t = self.throttle;
        let forgive = |f: Option<Failures>| {
            // Only within the window it was counted in; a window opened since
            // did not count it.
            f.filter(|f| f.window_start <= self.at && f.count > 0)
                .map(|f| Failures {
                    count: f.count - 1,
                    ..f
                })
        };
        let _guard = t.update.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = forgive(t.accounts.get(&self.account)) {
            t.accounts.insert(self.account.clone(), f);
        }
        if let Some(a) = self.address
            && let Some(f) = forgive(t.addresses.get(&a))
        {
            t.addresses.insert(a, f);
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
            drop(
                t.reserve("acme", "a@x.io", Some(ip))
                    .expect("within the budget"),
            );
        }
        let retry = t.reserve("acme", "a@x.io", Some(ip)).err().unwrap();
        assert!(retry.0 > Duration::from_secs(800));
        assert!(t.reserve("acme", "b@x.io", Some(ip)).is_ok());
        assert!(t.reserve("other", "a@x.io", Some(ip)).is_ok());
    }

    #[test]
    fn attempts_in_flight_spend_the_budget_and_successes_give_it_back() {
        let t = LoginThrottle::default();
        // Five guesses in flight at once: the sixth is refused before any is verified.
        let in_flight: Vec<_> = (0..5)
            .map(|_| t.reserve("acme", "a@x.io", None).unwrap())
            .collect();
        assert!(t.reserve("acme", "a@x.io", None).is_err());
        // Successes do not count.
        for attempt in in_flight {
            attempt.succeeded();
        }
        for _ in 0..5 {
            t.reserve("acme", "a@x.io", None).unwrap().succeeded();
        }
        assert!(t.reserve("acme", "a@x.io", None).is_ok());
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        let t = LoginThrottle::default();
        for i in 0..limits::LOGIN_FAILURES_PER_ADDRESS_MAX {
            let ip: IpAddr = format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap();
            drop(t.reserve("acme", &format!("u{i}@x.io"), Some(ip)).unwrap());
        }
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(t.reserve("acme", "new@x.io", Some(same_64)).is_err());
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(t.reserve("acme", "new@x.io", Some(other_64)).is_ok());
        assert_eq!(
            address_key("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
