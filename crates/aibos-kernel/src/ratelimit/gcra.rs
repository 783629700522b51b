//! The Generic Cell Rate Algorithm, as plain arithmetic on one number per key.
//!
//! A key's whole state is its *theoretical arrival time* (TAT): the moment its
//! bucket would be empty again if no request came. A request is admitted when,
//! after adding its own emission interval `T = window / quota`, the TAT is no
//! more than `burst × T` ahead of now; then the TAT moves there. An absent key
//! (or a TAT in the past) is a full bucket: `burst` requests at once, then one
//! every `T`. Over any span `s` at most `burst + s / T` are admitted.
//!
//! The same arithmetic runs in process (nanoseconds, `local.rs`) and inside
//! Redis (microseconds, the Lua script of `redis.rs`): the unit is the caller's.

/// One policy's parameters, in the caller's time unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Time between two requests at the steady rate (`T`).
    pub interval: u64,
    /// Requests admitted at once from a full bucket.
    pub burst: u32,
}

impl Quota {
    /// `per_minute` requests a minute, `burst` at once, with `unit_per_minute`
    /// units of time in a minute (6e10 for nanoseconds, 6e7 for microseconds).
    pub fn per_minute(per_minute: u32, burst: u32, unit_per_minute: u64) -> Quota {
        Quota {
            interval: (unit_per_minute / u64::from(per_minute.max(1))).max(1),
            burst: burst.max(1),
        }
    }

    /// How far ahead of now the TAT may be.
    fn tolerance(self) -> u64 {
        self.interval.saturating_mul(u64::from(self.burst))
    }
}

/// What one policy says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Whether this policy admits the request.
    pub admitted: bool,
    /// The key's TAT if the request is admitted (by every policy of the request).
    pub new_tat: u64,
    /// Requests still admitted at once after this one (when admitted), or now (when not).
    pub remaining: u32,
    /// Time until the bucket is full again, counting this request if admitted.
    pub reset: u64,
    /// Time until one more request would be admitted (0 when admitted).
    pub retry_after: u64,
}

impl Outcome {
    /// The same outcome when another policy of the request refused it, so
    /// this one consumed nothing: one more remains than if it had.
    pub fn not_consumed(self, quota: Quota, now: u64) -> Outcome {
        if !self.admitted {
            return self;
        }
        let previous = self.new_tat - quota.interval;
        Outcome {
            remaining: (self.remaining + 1).min(quota.burst),
            reset: previous.saturating_sub(now),
            ..self
        }
    }
}

/// Decides one request against a key whose TAT is `tat` (0 for a new key).
pub fn decide(tat: u64, now: u64, quota: Quota) -> Outcome {
    let tolerance = quota.tolerance();
    let base = tat.max(now);
    let new_tat = base.saturating_add(quota.interval);
    let ahead = new_tat - now;
    if ahead <= tolerance {
        Outcome {
            admitted: true,
            new_tat,
            remaining: u32::try_from((tolerance - ahead) / quota.interval).unwrap_or(u32::MAX),
            reset: ahead,
            retry_after: 0,
        }
    } else {
        Outcome {
            admitted: false,
            new_tat: tat,
            remaining: 0,
            reset: base - now,
            retry_after: ahead - tolerance,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECOND: u64 = 1_000_000_000;
    const MINUTE: u64 = 60 * SECOND;

    #[test]
    fn a_full_bucket_admits_its_burst_at_once_then_one_per_interval() {
        let quota = Quota::per_minute(100, 20, MINUTE);
        assert_eq!(quota.interval, 600_000_000, "100 a minute: one per 0.6 s");
        let now = 1_000 * SECOND;
        let mut tat = 0;
        for i in 0..20 {
            let o = decide(tat, now, quota);
            assert!(o.admitted, "request {i} of the burst");
            assert_eq!(o.remaining, 19 - i);
            tat = o.new_tat;
        }
        let refused = decide(tat, now, quota);
        assert!(!refused.admitted);
        assert_eq!(refused.remaining, 0);
        assert_eq!(
            refused.retry_after, quota.interval,
            "one interval to the next"
        );
        assert_eq!(
            refused.reset,
            20 * quota.interval,
            "the whole burst to refill"
        );
        assert_eq!(refused.new_tat, tat, "a refusal moves nothing");
        // One interval later exactly one more is admitted.
        let later = now + quota.interval;
        let o = decide(tat, later, quota);
        assert!(o.admitted);
        assert_eq!(o.remaining, 0);
        assert!(!decide(o.new_tat, later, quota).admitted);
    }

    #[test]
    fn a_bucket_idle_long_enough_is_full_again() {
        let quota = Quota::per_minute(60, 5, MINUTE);
        let o = decide(0, MINUTE, quota);
        let idle = decide(o.new_tat, 10 * MINUTE, quota);
        assert_eq!(idle, decide(0, 10 * MINUTE, quota));
        assert_eq!(idle.remaining, 4);
        assert_eq!(idle.reset, SECOND);
    }

    #[test]
    fn a_request_refused_by_another_policy_consumes_nothing_here() {
        let quota = Quota::per_minute(100, 20, MINUTE);
        let now = MINUTE;
        let first = decide(0, now, quota);
        let unconsumed = first.not_consumed(quota, now);
        assert_eq!(unconsumed.remaining, 20);
        assert_eq!(unconsumed.reset, 0);
    }

    #[test]
    fn extreme_rates_neither_overflow_nor_divide_by_zero() {
        let fast = Quota::per_minute(1_000_000, 1_000_000, 60_000_000);
        assert_eq!(fast.interval, 60, "60 µs at a million a minute");
        assert!(decide(0, u64::MAX / 2, fast).admitted);
        let zero = Quota::per_minute(0, 0, MINUTE);
        assert_eq!(zero.burst, 1);
        assert!(decide(u64::MAX, 0, zero).retry_after > 0);
    }

    proptest! {
        /// Over any sequence of requests, the admitted ones never exceed
        /// burst + elapsed / interval (the GCRA bound), and a refusal's
        /// retry_after is exactly when the next one would be admitted.
        #[test]
        fn never_admits_more_than_burst_plus_elapsed_times_rate(
            per_minute in 1u32..5_000,
            burst in 1u32..50,
            gaps in proptest::collection::vec(0u64..2 * SECOND, 1..400),
        ) {
            let quota = Quota::per_minute(per_minute, burst, MINUTE);
            let start = 10 * MINUTE;
            let mut now = start;
            let mut tat = 0;
            let mut admitted = 0u64;
            for gap in gaps {
                now += gap;
                let o = decide(tat, now, quota);
                if o.admitted {
                    admitted += 1;
                    tat = o.new_tat;
                } else {
                    prop_assert!(decide(tat, now + o.retry_after, quota).admitted);
                    prop_assert!(o.retry_after == 0 || !decide(tat, now + o.retry_after - 1, quota).admitted);
                }
                let bound = u64::from(burst) + (now - start) / quota.interval;
                prop_assert!(admitted <= bound, "{admitted} admitted, bound {bound}");
            }
        }
    }
}
