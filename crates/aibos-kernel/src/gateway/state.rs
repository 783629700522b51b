//! What the gateway remembers about each canon between calls: its circuit
//! breaker, its health as the active checks see it, and its retry budget. All of
//! it is atomics: a proxied request takes no lock.

use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::telemetry::CanonMetrics;
use crate::config::GatewayConfig;
use crate::telemetry::Metrics;

/// The state of one canon, kept across route-table rebuilds.
pub struct CanonState {
    /// The canon's circuit breaker.
    pub breaker: Breaker,
    /// Retries this canon may still spend.
    pub budget: RetryBudget,
    health: AtomicU8,
    /// Cached metric handles.
    pub metrics: CanonMetrics,
}

/// What the active health checks last saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not checked yet (the cell is called).
    Unknown,
    /// The health path answered 2xx.
    Healthy,
    /// It did not: the cell is not called until it does.
    Unhealthy,
}

impl Health {
    /// The API's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

impl CanonState {
    /// A fresh state: closed circuit, unknown health, a full budget.
    pub fn new(metrics: &Metrics, canon: &str) -> CanonState {
        CanonState {
            breaker: Breaker::new(),
            budget: RetryBudget::new(),
            health: AtomicU8::new(0),
            metrics: CanonMetrics::new(metrics, canon),
        }
    }

    /// The current health.
    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Acquire) {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    /// Records a health check's result.
    pub fn set_health(&self, health: Health) {
        let code = match health {
            Health::Unknown => 0,
            Health::Healthy => 1,
            Health::Unhealthy => 2,
        };
        self.metrics.healthy.set(match health {
            Health::Unknown => -1.0,
            Health::Healthy => 1.0,
            Health::Unhealthy => 0.0,
        });
        self.health.store(code, Ordering::Release);
    }
}

/// Breaker thresholds, read from the configuration on each call (reloadable).
#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    /// Consecutive failures that open the circuit.
    pub consecutive_failures: u32,
    /// Failure share (percent) over a full window that opens it.
    pub failure_rate_percent: u32,
    /// Calls in the window (at most 64).
    pub window_calls: u32,
    /// How long it stays open before one trial call.
    pub open_for: Duration,
}

impl BreakerSettings {
    /// From `[gateway]`.
    pub fn from_config(g: &GatewayConfig) -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: g.breaker_consecutive_failures,
            failure_rate_percent: g.breaker_failure_rate_percent,
            window_calls: g.breaker_window_calls.clamp(1, 64),
            open_for: Duration::from_secs(g.breaker_open_seconds),
        }
    }
}

const CLOSED: u8 = 0;
const HALF_OPEN: u8 = 1;
const OPEN: u8 = 2;

/// Whether a call may go to the cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Call it. `trial` is the one call of a half-open circuit, whose outcome
    /// closes or re-opens it.
    Allowed {
        /// Whether this is the half-open trial.
        trial: bool,
    },
    /// Do not: answer 503 with this `Retry-After`.
    Refused {
        /// Until the next trial may be made.
        retry_after: Duration,
    },
}

/// A circuit breaker: closed → open after N consecutive failures or a failure
/// share over the last calls; open → half-open (one trial call) after a delay;
/// the trial's outcome closes or re-opens it.
pub struct Breaker {
    state: AtomicU8,
    /// Milliseconds since `epoch` when the circuit last opened.
    opened_at_ms: AtomicU64,
    consecutive: AtomicU32,
    /// The last calls' outcomes, newest in bit 0, 1 = failure.
    window_bits: AtomicU64,
    /// How many calls the window holds (up to the configured size).
    window_len: AtomicU32,
    epoch: Instant,
}

impl Default for Breaker {
    fn default() -> Breaker {
        Breaker::new()
    }
}

impl Breaker {
    /// A closed breaker.
    pub fn new() -> Breaker {
        Breaker {
            state: AtomicU8::new(CLOSED),
            opened_at_ms: AtomicU64::new(0),
            consecutive: AtomicU32::new(0),
            window_bits: AtomicU64::new(0),
            window_len: AtomicU32::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// `closed`, `open` or `half_open`.
    pub fn state_name(&self) -> &'static str {
        match self.state.load(Ordering::Acquire) {
            OPEN => "open",
            HALF_OPEN => "half_open",
            _ => "closed",
        }
    }

    /// Whether a call may go through now.
    pub fn admit(&self, settings: &BreakerSettings) -> Admission {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Admission::Allowed { trial: false },
            OPEN => {
                let open_ms = u64::try_from(settings.open_for.as_millis()).unwrap_or(u64::MAX);
                let elapsed = self
                    .now_ms()
                    .saturating_sub(self.opened_at_ms.load(Ordering::Acquire));
                if elapsed < open_ms {
                    return Admission::Refused {
                        retry_after: Duration::from_millis(open_ms - elapsed),
                    };
                }
                // One caller wins the trial; the others keep being refused until it ends.
                match self.state.compare_exchange(
                    OPEN,
                    HALF_OPEN,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => Admission::Allowed { trial: true },
                    Err(_) => Admission::Refused {
                        retry_after: Duration::from_secs(1),
                    },
                }
            }
            _ => Admission::Refused {
                retry_after: Duration::from_secs(1),
            },
        }
    }

    /// Records a call's outcome; returns the new state's name when it changed.
    pub fn record(
        &self,
        settings: &BreakerSettings,
        success: bool,
        trial: bool,
    ) -> Option<&'static str> {
        if trial {
            self.reset();
            if success {
                self.state.store(CLOSED, Ordering::Release);
                return Some("closed");
            }
            self.open();
            return Some("open");
        }
        if self.state.load(Ordering::Acquire) != CLOSED {
            // A call admitted before the circuit opened: its outcome changes nothing.
            return None;
        }
        let window = settings.window_calls.clamp(1, 64);
        let mask = if window == 64 {
            u64::MAX
        } else {
            (1u64 << window) - 1
        };
        if success {
            // The common case writes nothing: no failures remembered, window full.
            if self.consecutive.load(Ordering::Relaxed) != 0 {
                self.consecutive.store(0, Ordering::Relaxed);
            }
            if self.window_bits.load(Ordering::Relaxed) == 0
                && self.window_len.load(Ordering::Relaxed) >= window
            {
                return None;
            }
        } else {
            self.consecutive.fetch_add(1, Ordering::AcqRel);
        }
        let fail = u64::from(!success);
        let bits = self
            .window_bits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some(((b << 1) | fail) & mask)
            })
            .map(|b| ((b << 1) | fail) & mask)
            .unwrap_or(0);
        let len = self
            .window_len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                Some((l + 1).min(window))
            })
            .map(|l| (l + 1).min(window))
            .unwrap_or(window);
        if success {
            return None;
        }
        let consecutive = self.consecutive.load(Ordering::Acquire);
        let failures = bits.count_ones();
        let rate_tripped =
            len >= window && failures * 100 >= settings.failure_rate_percent * window;
        if (consecutive >= settings.consecutive_failures || rate_tripped)
            && self
                .state
                .compare_exchange(CLOSED, OPEN, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.opened_at_ms.store(self.now_ms(), Ordering::Release);
            self.reset();
            return Some("open");
        }
        None
    }

    fn open(&self) {
        self.opened_at_ms.store(self.now_ms(), Ordering::Release);
        self.state.store(OPEN, Ordering::Release);
    }

    fn reset(&self) {
        self.consecutive.store(0, Ordering::Release);
        self.window_bits.store(0, Ordering::Release);
        self.window_len.store(0, Ordering::Release);
    }
}

/// Retries a canon may spend: every call earns `percent`/100 of a retry, up to
/// [`RETRY_BUDGET_CAP`] banked, so that retries cannot multiply the load on a
/// cell that is already failing.
pub struct RetryBudget {
    milli_tokens: AtomicI64,
}

/// Most retries banked per canon (also the starting balance, so a quiet canon can retry).
pub const RETRY_BUDGET_CAP: i64 = 10;

impl Default for RetryBudget {
    fn default() -> RetryBudget {
        RetryBudget::new()
    }
}

impl RetryBudget {
    /// A full budget.
    pub fn new() -> RetryBudget {
        RetryBudget {
            milli_tokens: AtomicI64::new(RETRY_BUDGET_CAP * 1000),
        }
    }

    /// A call was made: earn `percent` per cent of a retry.
    pub fn deposit(&self, percent: u32) {
        let cap = RETRY_BUDGET_CAP * 1000;
        if self.milli_tokens.load(Ordering::Relaxed) >= cap {
            return;
        }
        let earned = i64::from(percent) * 10;
        let _ = self
            .milli_tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some((t + earned).min(cap))
            });
    }

    /// Takes one retry if the budget allows.
    pub fn withdraw(&self) -> bool {
        self.milli_tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t >= 1000).then_some(t - 1000)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 5,
            failure_rate_percent: 50,
            window_calls: 20,
            open_for: Duration::from_millis(50),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_then_half_opens_and_closes() {
        let b = Breaker::new();
        let s = settings();
        for _ in 0..4 {
            assert_eq!(b.admit(&s), Admission::Allowed { trial: false });
            assert_eq!(b.record(&s, false, false), None);
        }
        assert_eq!(b.record(&s, false, false), Some("open"));
        assert!(matches!(b.admit(&s), Admission::Refused { .. }));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.admit(&s), Admission::Allowed { trial: true });
        assert!(
            matches!(b.admit(&s), Admission::Refused { .. }),
            "one trial at a time"
        );
        assert_eq!(b.record(&s, true, true), Some("closed"));
        assert_eq!(b.admit(&s), Admission::Allowed { trial: false });
    }

    #[test]
    fn a_failed_trial_reopens() {
        let b = Breaker::new();
        let s = settings();
        for _ in 0..5 {
            b.record(&s, false, false);
        }
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.admit(&s), Admission::Allowed { trial: true });
        assert_eq!(b.record(&s, false, true), Some("open"));
        assert_eq!(b.state_name(), "open");
    }

    #[test]
    fn opens_on_the_failure_rate_over_a_full_window() {
        let b = Breaker::new();
        let s = settings();
        // Alternating outcomes never make 5 in a row, but half of 20 calls fail.
        let mut opened = None;
        for i in 0..20 {
            opened = b.record(&s, i % 2 == 0, false).or(opened);
        }
        assert_eq!(opened, Some("open"));
        // Successes alone keep it closed.
        let b = Breaker::new();
        for _ in 0..100 {
            assert_eq!(b.record(&s, true, false), None);
        }
        assert_eq!(b.state_name(), "closed");
    }

    #[test]
    fn the_retry_budget_is_earned_and_spent() {
        let budget = RetryBudget::new();
        for _ in 0..RETRY_BUDGET_CAP {
            assert!(budget.withdraw());
        }
        assert!(!budget.withdraw());
        for _ in 0..4 {
            budget.deposit(20);
        }
        assert!(
            !budget.withdraw(),
            "four calls at 20% earn less than one retry"
        );
        budget.deposit(20);
        assert!(budget.withdraw());
    }
}
