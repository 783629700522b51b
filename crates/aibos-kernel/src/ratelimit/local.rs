//! The in-process limiter: GCRA over a bounded, sharded map of TATs.
//!
//! Why not governor: its keyed limiter holds one quota for all its keys and
//! consumes on `check_key`, while a request here is decided by two or three
//! policies at once, all or nothing (a request the tenant refuses must not use
//! up the user's budget), with quotas that change per decision (a reload, a
//! route's override, a budget divided while Redis is down). One `u64` per key
//! and the arithmetic of `gcra.rs` do all of that in ~100 ns.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use super::gcra::{self, Outcome, Quota};
use crate::limits;

/// Nanoseconds in a minute, the unit of this limiter's quotas.
pub const NANOS_PER_MINUTE: u64 = 60_000_000_000;

/// Most policies one request is decided by (user or route, tenant; or address).
pub const POLICIES_MAX: usize = 3;

type Shard = HashMap<u64, u64, foldhash::fast::FixedState>;

/// TATs by key hash, in shards each behind its own lock (held for a few map
/// operations, never across an await).
pub struct LocalLimiter {
    /// Where this limiter's clock starts: TATs are nanoseconds since then.
    epoch: Instant,
    /// Keys are hashed with a seed of this process's own, so that nobody can
    /// choose identifiers that collide.
    hasher: foldhash::quality::RandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl Default for LocalLimiter {
    fn default() -> LocalLimiter {
        LocalLimiter {
            epoch: Instant::now(),
            hasher: foldhash::quality::RandomState::default(),
            shards: (0..limits::RATE_LIMIT_SHARDS)
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
        }
    }
}

const SHARD_KEYS_MAX: usize = limits::RATE_LIMIT_KEYS_MAX / limits::RATE_LIMIT_SHARDS;

impl LocalLimiter {
    /// The hash a key is tracked under; `parts` name it (scope first).
    pub fn key(&self, parts: &[&[u8]]) -> u64 {
        let mut hasher = self.hasher.build_hasher();
        for part in parts {
            std::hash::Hasher::write(&mut hasher, part);
            // A separator, so ("ab", "c") and ("a", "bc") differ.
            std::hash::Hasher::write_u8(&mut hasher, 0xff);
        }
        std::hash::Hasher::finish(&hasher)
    }

    /// Now, in this limiter's nanoseconds.
    pub fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Decides one request by `policies` (key, quota) at once: admitted only if
    /// every policy admits it, and then (only then) each key's TAT moves.
    /// `out[i]` receives policy `i`'s outcome. The shards involved are locked
    /// in index order, so two decisions never wait on each other in a cycle.
    pub fn decide(&self, policies: &[(u64, Quota)], now: u64, out: &mut [Outcome]) -> bool {
        assert!(policies.len() <= POLICIES_MAX && out.len() >= policies.len());
        let shard_of = |key: u64| (key as usize) % self.shards.len();
        let mut order = [usize::MAX; POLICIES_MAX];
        for (slot, (key, _)) in order.iter_mut().zip(policies) {
            *slot = shard_of(*key);
        }
        order.sort_unstable();
        let mut guards: [Option<(usize, MutexGuard<'_, Shard>)>; POLICIES_MAX] = [None, None, None];
        let mut previous = usize::MAX;
        for (slot, index) in guards.iter_mut().zip(order) {
            if index == usize::MAX || index == previous {
                continue;
            }
            previous = index;
            // A poisoned shard holds plain numbers, still valid: go on with it.
            let guard = self.shards[index]
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *slot = Some((index, guard));
        }
        let mut admitted = true;
        for ((key, quota), outcome) in policies.iter().zip(out.iter_mut()) {
            let tat = locked(&mut guards, shard_of(*key))
                .get(key)
                .copied()
                .unwrap_or(0);
            *outcome = gcra::decide(tat, now, *quota);
            admitted &= outcome.admitted;
        }
        if admitted {
            for ((key, _), outcome) in policies.iter().zip(out.iter()) {
                let map = locked(&mut guards, shard_of(*key));
                if map.len() >= SHARD_KEYS_MAX && !map.contains_key(key) {
                    map.retain(|_, tat| *tat > now);
                    if map.len() >= SHARD_KEYS_MAX {
                        continue;
                    }
                }
                map.insert(*key, outcome.new_tat);
            }
        } else {
            for ((_, quota), outcome) in policies.iter().zip(out.iter_mut()) {
                *outcome = outcome.not_consumed(*quota, now);
            }
        }
        admitted
    }

    /// Drops the keys whose bucket is full again (a TAT in the past means the
    /// same as no entry) and gives unused capacity back.
    pub fn sweep(&self) -> usize {
        let now = self.now();
        let mut kept = 0;
        for shard in self.shards.iter() {
            let mut map = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            map.retain(|_, tat| *tat > now);
            if map.capacity() > 2 * map.len() + 16 {
                map.shrink_to_fit();
            }
            kept += map.len();
        }
        kept
    }
}

/// The locked shard `index` among `guards` (every policy's shard is locked
/// before any is read).
fn locked<'a>(
    guards: &'a mut [Option<(usize, MutexGuard<'_, Shard>)>],
    index: usize,
) -> &'a mut Shard {
    guards
        .iter_mut()
        .flatten()
        .find(|(i, _)| *i == index)
        .map(|(_, guard)| &mut **guard)
        .expect("the shard of every policy is locked")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(per_minute: u32, burst: u32) -> Quota {
        Quota::per_minute(per_minute, burst, NANOS_PER_MINUTE)
    }

    #[test]
    fn a_request_is_admitted_only_when_every_policy_admits_it() {
        let limiter = LocalLimiter::default();
        let (user_a, user_b, tenant) = (
            limiter.key(&[b"user", b"t", b"a"]),
            limiter.key(&[b"user", b"t", b"b"]),
            limiter.key(&[b"tenant", b"t"]),
        );
        let now = 1_000;
        let mut out = [Outcome {
            admitted: false,
            new_tat: 0,
            remaining: 0,
            reset: 0,
            retry_after: 0,
        }; POLICIES_MAX];
        // The tenant's burst is 3, each user's 2.
        let policies = |user| [(user, quota(60, 2)), (tenant, quota(60, 3))];
        assert!(limiter.decide(&policies(user_a), now, &mut out));
        assert!(limiter.decide(&policies(user_a), now, &mut out));
        assert!(
            !limiter.decide(&policies(user_a), now, &mut out),
            "a's burst"
        );
        assert!(limiter.decide(&policies(user_b), now, &mut out));
        assert!(
            !limiter.decide(&policies(user_b), now, &mut out),
            "the tenant's burst"
        );
        assert_eq!(
            out[0].remaining, 1,
            "b's own budget was not used by the refusal"
        );
        assert!(!out[1].admitted);
        assert_eq!(limiter.sweep(), 3, "all three keys are still busy");
        let later = limiter.now() + NANOS_PER_MINUTE;
        assert!(limiter.decide(&policies(user_b), later, &mut out));
    }

    proptest::proptest! {
        /// Two users of one tenant sending at random moments: no key is ever
        /// admitted more than its burst plus the elapsed time times its rate,
        /// and the tenant counts exactly what both users were admitted.
        #[test]
        fn never_admits_more_than_burst_plus_elapsed_times_rate(
            user_burst in 1u32..30,
            tenant_burst in 1u32..30,
            requests in proptest::collection::vec((0u64..400_000_000, proptest::bool::ANY), 1..300),
        ) {
            let limiter = LocalLimiter::default();
            let users = [limiter.key(&[b"user", b"a"]), limiter.key(&[b"user", b"b"])];
            let tenant = limiter.key(&[b"tenant", b"t"]);
            let (user_quota, tenant_quota) = (quota(100, user_burst), quota(150, tenant_burst));
            let mut out = [gcra::decide(0, 0, user_quota); POLICIES_MAX];
            let start = 5 * NANOS_PER_MINUTE;
            let mut now = start;
            let mut admitted = [0u64; 2];
            for (gap, second) in requests {
                now += gap;
                let who = usize::from(second);
                if limiter.decide(&[(users[who], user_quota), (tenant, tenant_quota)], now, &mut out) {
                    admitted[who] += 1;
                }
                let elapsed = now - start;
                for count in admitted {
                    proptest::prop_assert!(count <= u64::from(user_burst) + elapsed / user_quota.interval);
                }
                proptest::prop_assert!(admitted[0] + admitted[1] <= u64::from(tenant_burst) + elapsed / tenant_quota.interval);
            }
        }
    }

    #[test]
    fn a_full_shard_drops_idle_keys_then_decides_new_ones_without_storing_them() {
        let limiter = LocalLimiter::default();
        let shards = limits::RATE_LIMIT_SHARDS as u64;
        let one = quota(60, 1);
        let mut out = [gcra::decide(0, 0, one); POLICIES_MAX];
        // Fill shard 0 with busy keys (a burst of one, just spent).
        for i in 0..SHARD_KEYS_MAX as u64 {
            assert!(limiter.decide(&[(i * shards, one)], 0, &mut out));
        }
        let newcomer = SHARD_KEYS_MAX as u64 * shards;
        assert!(limiter.decide(&[(newcomer, one)], 0, &mut out));
        assert!(
            limiter.decide(&[(newcomer, one)], 0, &mut out),
            "not remembered: the limiter fails open rather than refuse what it cannot track"
        );
        assert!(
            !limiter.decide(&[(0, one)], 0, &mut out),
            "the tracked keys still count"
        );
        // A second later every bucket is full again: the next newcomer finds room.
        let later = NANOS_PER_MINUTE / 60;
        assert!(limiter.decide(&[(newcomer, one)], later, &mut out));
        assert!(
            !limiter.decide(&[(newcomer, one)], later, &mut out),
            "now remembered"
        );
    }

    #[test]
    fn the_same_shard_twice_is_locked_once() {
        let limiter = LocalLimiter::default();
        let key = limiter.key(&[b"user", b"x"]);
        let mut out = [gcra::decide(0, 0, quota(1, 1)); POLICIES_MAX];
        // Two policies on one key (and so one shard) must not deadlock.
        assert!(limiter.decide(&[(key, quota(60, 5)), (key, quota(60, 5))], 0, &mut out));
    }
}
