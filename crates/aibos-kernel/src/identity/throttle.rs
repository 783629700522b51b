//! Throttling of repeated login failures, per (tenant, email) and per address.
//!
//! In memory, per kernel instance: a count of failures within a fixed window
//! opened by the first one. An attempt holds a place in the budget *while its
//! password is verified* ([`LoginThrottle::reserve`]): failures already counted
//! plus attempts in flight never exceed it. So fifty guesses sent at once meet
//! the same budget as fifty sent one by one (five are verified, the rest wait
//! for them, then get 429), while concurrent logins with the right password
//! only wait their turn, since a success gives its place back. A client that
//! hangs up mid-verification has still spent its try. Successful logins do not
//! count and do not reset the address count.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use quick_cache::sync::Cache;
use tokio::sync::Notify;

use crate::authz::caller::address_key;
use crate::limits;

/// Failure counts; both maps are bounded (oldest forgotten first).
pub struct LoginThrottle {
    accounts: Cache<(String, String), Failures>,
    addresses: Cache<IpAddr, Failures>,
    /// Attempts being verified now, by key; serialises every read-modify-write
    /// of a count. Held for nanoseconds, never across an await. Entries go
    /// when their count reaches zero, so it holds at most the attempts in flight.
    in_flight: Mutex<InFlight>,
    /// Woken whenever an attempt ends, for those waiting on a full budget.
    ended: Notify,
}

#[derive(Default)]
struct InFlight {
    accounts: HashMap<(String, String), u32>,
    addresses: HashMap<IpAddr, u32>,
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
            in_flight: Mutex::new(InFlight::default()),
            ended: Notify::new(),
        }
    }
}

fn window() -> Duration {
    Duration::from_secs(limits::LOGIN_FAILURE_WINDOW_SECONDS)
}

/// Failures counted within the window at `now`.
fn counted(f: Option<Failures>, now: Instant) -> Option<Failures> {
    f.filter(|f| now.duration_since(f.window_start) < window())
}

/// `f` with one more failure (a new window when the last one ended).
fn bumped(f: Option<Failures>, now: Instant) -> Failures {
    match counted(f, now) {
        Some(f) => Failures {
            count: f.count.saturating_add(1),
            ..f
        },
        None => Failures {
            count: 1,
            window_start: now,
        },
    }
}

/// Where one key's budget stands for a new attempt.
enum Room {
    /// A place is free.
    Free,
    /// Taken by attempts in flight: one may give its place back.
    Busy,
    /// Spent by failures: wait this long.
    Spent(RetryAfter),
}

fn room(f: Option<Failures>, in_flight: u32, max: u32, now: Instant) -> Room {
    match counted(f, now) {
        Some(f) if f.count >= max => {
            Room::Spent(RetryAfter(window() - now.duration_since(f.window_start)))
        }
        f if f.map_or(0, |f| f.count).saturating_add(in_flight) >= max => Room::Busy,
        _ => Room::Free,
    }
}

fn take<K: Hash + Eq>(map: &mut HashMap<K, u32>, key: K) {
    *map.entry(key).or_default() += 1;
}

fn give_back<K: Hash + Eq>(map: &mut HashMap<K, u32>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// One login attempt holding a place in its budgets. [`Attempt::succeeded`]
/// gives the place back; dropped otherwise (a wrong password, an error, a
/// client that hung up), it is counted as a failure.
#[must_use = "an attempt not marked as succeeded counts as a failure"]
pub struct Attempt<'a> {
    throttle: &'a LoginThrottle,
    account: (String, String),
    address: Option<IpAddr>,
    succeeded: bool,
}

impl LoginThrottle {
    fn lock(&self) -> MutexGuard<'_, InFlight> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves one attempt for (tenant, email) from `address`: at once when
    /// both budgets have room, after the attempts in flight end when they fill
    /// it (at most [`limits::LOGIN_ATTEMPT_WAIT_MS`]), or not at all, with how
    /// long to wait, when failures spent it. `tenant` should be the tenant's id
    /// when it exists, so that its slug and its id are one bucket.
    pub async fn reserve(
        &self,
        tenant: &str,
        email: &str,
        address: Option<IpAddr>,
    ) -> Result<Attempt<'_>, RetryAfter> {
        let account = (tenant.to_owned(), email.to_owned());
        let address = address.map(address_key);
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(limits::LOGIN_ATTEMPT_WAIT_MS);
        loop {
            // Registered before looking, so an attempt ending in between wakes us.
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let busy = {
                let now = Instant::now();
                let mut in_flight = self.lock();
                let by_account = room(
                    self.accounts.get(&account),
                    in_flight.accounts.get(&account).copied().unwrap_or(0),
                    limits::LOGIN_FAILURES_PER_ACCOUNT_MAX,
                    now,
                );
                let by_address = address.map(|a| {
                    room(
                        self.addresses.get(&a),
                        in_flight.addresses.get(&a).copied().unwrap_or(0),
                        limits::LOGIN_FAILURES_PER_ADDRESS_MAX,
                        now,
                    )
                });
                match (by_account, by_address) {
                    (Room::Spent(a), Some(Room::Spent(b))) => return Err(a.max_by(b)),
                    (Room::Spent(r), _) | (_, Some(Room::Spent(r))) => return Err(r),
                    (Room::Busy, _) | (_, Some(Room::Busy)) => true,
                    _ => {
                        take(&mut in_flight.accounts, account.clone());
                        if let Some(a) = address {
                            take(&mut in_flight.addresses, a);
                        }
                        false
                    }
                }
            };
            if !busy {
                return Ok(Attempt {
                    throttle: self,
                    account,
                    address,
                    succeeded: false,
                });
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                // Still full after the wait: as good as spent, for now.
                return Err(RetryAfter(Duration::from_secs(1)));
            }
        }
    }
}

impl RetryAfter {
    fn max_by(self, other: RetryAfter) -> RetryAfter {
        if self.0 >= other.0 { self } else { other }
    }
}

impl Attempt<'_> {
    /// The login succeeded: it does not count.
    pub fn succeeded(mut self) {
        self.succeeded = true;
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let t = self.throttle;
        let now = Instant::now();
        {
            let mut in_flight = t.lock();
            give_back(&mut in_flight.accounts, &self.account);
            if let Some(a) = &self.address {
                give_back(&mut in_flight.addresses, a);
            }
            if !self.succeeded {
                t.accounts.insert(
                    self.account.clone(),
                    bumped(t.accounts.get(&self.account), now),
                );
                if let Some(a) = self.address {
                    t.addresses.insert(a, bumped(t.addresses.get(&a), now));
                }
            }
        }
        t.ended.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn five_failures_throttle_the_account_but_not_another() {
        let t = LoginThrottle::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..5 {
            drop(
                t.reserve("acme", "a@x.io", Some(ip))
                    .await
                    .expect("within the budget"),
            );
        }
        let retry = t.reserve("acme", "a@x.io", Some(ip)).await.err().unwrap();
        assert!(retry.0 > Duration::from_secs(800));
        assert!(t.reserve("acme", "b@x.io", Some(ip)).await.is_ok());
        assert!(t.reserve("other", "a@x.io", Some(ip)).await.is_ok());
    }

    #[tokio::test]
    async fn attempts_in_flight_hold_the_budget_and_successes_give_it_back() {
        let t = std::sync::Arc::new(LoginThrottle::default());
        let in_flight: Vec<_> = {
            let mut v = Vec::new();
            for _ in 0..5 {
                v.push(t.reserve("acme", "a@x.io", None).await.unwrap());
            }
            v
        };
        // A sixth waits for a place: it gets one when a success gives it back.
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move {
                t.reserve("acme", "a@x.io", None)
                    .await
                    .map(Attempt::succeeded)
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "the budget is full while five are verified"
        );
        let mut in_flight = in_flight.into_iter();
        in_flight.next().unwrap().succeeded();
        assert!(waiter.await.unwrap().is_ok());
        // Four wrong passwords and the one success above: a place is left, then none.
        drop(in_flight);
        drop(t.reserve("acme", "a@x.io", None).await.unwrap());
        assert!(t.reserve("acme", "a@x.io", None).await.is_err());
    }

    #[tokio::test]
    async fn waiters_are_refused_once_failures_spend_the_budget() {
        let t = std::sync::Arc::new(LoginThrottle::default());
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(t.reserve("acme", "a@x.io", None).await.unwrap());
        }
        let waiters: Vec<_> = (0..10)
            .map(|_| {
                let t = t.clone();
                tokio::spawn(async move { t.reserve("acme", "a@x.io", None).await.is_ok() })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held); // five wrong passwords
        for w in waiters {
            assert!(!w.await.unwrap(), "no sixth verification");
        }
    }

    #[tokio::test]
    async fn ipv6_addresses_count_by_their_64() {
        let t = LoginThrottle::default();
        for i in 0..limits::LOGIN_FAILURES_PER_ADDRESS_MAX {
            let ip: IpAddr = format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap();
            drop(
                t.reserve("acme", &format!("u{i}@x.io"), Some(ip))
                    .await
                    .unwrap(),
            );
        }
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(t.reserve("acme", "new@x.io", Some(same_64)).await.is_err());
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(t.reserve("acme", "new@x.io", Some(other_64)).await.is_ok());
        assert_eq!(
            address_key("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
