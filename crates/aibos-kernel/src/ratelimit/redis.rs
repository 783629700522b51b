//! The Redis backend: every policy of a request decided in one script call.
//!
//! The script is `gcra.rs` in Lua, on Redis's own clock (`TIME`, so the
//! instances' clocks never disagree), in microseconds: it reads each key's
//! TAT, decides, and writes the new TATs only if every policy admits the
//! request, with a TTL of the time the bucket takes to fill again (an expired
//! key is a full bucket). A script runs atomically, so two kernels sharing the
//! budget admit no more than it. One round trip per decision; the multiplexed
//! `ConnectionManager` pipelines concurrent ones on one connection and
//! reconnects by itself.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::gcra::{Outcome, Quota};
use super::local::POLICIES_MAX;

/// Microseconds in a minute, the unit of quotas sent to the script.
pub const MICROS_PER_MINUTE: u64 = 60_000_000;

/// KEYS: one per policy. ARGV: per policy, its interval and burst. Returns
/// `{admitted, then per policy: admitted, remaining, reset_us, retry_after_us}`.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local admitted = 1
local state = {}
for i = 1, n do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = interval * tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  local base = math.max(tat, now)
  local new_tat = base + interval
  local ahead = new_tat - now
  if ahead <= tolerance then
    state[i] = {1, math.floor((tolerance - ahead) / interval), ahead, 0, new_tat, interval}
  else
    admitted = 0
    state[i] = {0, 0, base - now, ahead - tolerance, tat, interval}
  end
end
local out = {admitted}
for i = 1, n do
  local s = state[i]
  if admitted == 1 then
    redis.call('SET', KEYS[i], string.format('%d', s[5]), 'PX', math.ceil(s[3] / 1000) + 1)
  elseif s[1] == 1 then
    -- Refused by another policy: this one consumed nothing.
    s[2] = s[2] + 1
    s[3] = s[3] - s[6]
  end
  out[#out + 1] = s[1]
  out[#out + 1] = s[2]
  out[#out + 1] = s[3]
  out[#out + 1] = s[4]
end
return out
";

/// Whether Redis decides right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not yet connected (start-up): decisions are made in process, unaudited.
    Starting,
    /// Redis answers: it decides.
    Up,
    /// Redis failed or was too slow: decisions are made in process with each
    /// budget divided by `rate_limit.instances`, until a probe gets an answer.
    Degraded,
}

/// The connection, the script and the backend's state.
pub struct RedisBackend {
    connection: ConnectionManager,
    script: redis::Script,
    status: AtomicU8,
}

/// Why a decision could not be made by Redis.
#[derive(Debug, thiserror::Error)]
pub enum RedisFailure {
    /// No answer within `rate_limit.redis_timeout_ms`.
    #[error("no answer within the timeout")]
    Timeout,
    /// An error from the connection or the server.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// An answer of the wrong shape (a script of another version?).
    #[error("unexpected answer from the rate-limit script")]
    Shape,
}

impl RedisBackend {
    /// A backend on `url`, connecting lazily (the probe makes the first
    /// connection, so a Redis down at start never stops the kernel). Needs a
    /// Tokio runtime (the connection's task is spawned on it).
    pub fn new(url: &str, timeout: Duration) -> Result<RedisBackend, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // The probe retries every RATE_LIMIT_PROBE_MS; the manager itself
            // need not keep a failing decision waiting on reconnections.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        Ok(RedisBackend {
            connection: ConnectionManager::new_lazy_with_config(client, config)?,
            script: redis::Script::new(SCRIPT),
            status: AtomicU8::new(Status::Starting as u8),
        })
    }

    /// The state in force.
    pub fn status(&self) -> Status {
        match self.status.load(Ordering::Acquire) {
            1 => Status::Up,
            2 => Status::Degraded,
            _ => Status::Starting,
        }
    }

    /// Moves to `next`; the previous state when it changed, `None` when it was
    /// already there (so only one caller acts on each transition).
    pub fn transition(&self, next: Status) -> Option<Status> {
        let previous = self.status.swap(next as u8, Ordering::AcqRel);
        let previous = match previous {
            1 => Status::Up,
            2 => Status::Degraded,
            _ => Status::Starting,
        };
        (previous != next).then_some(previous)
    }

    /// Decides one request by `policies` (full Redis key, quota in µs),
    /// writing each policy's outcome into `out`.
    pub async fn decide(
        &self,
        policies: &[(String, Quota)],
        timeout: Duration,
        out: &mut [Outcome],
    ) -> Result<bool, RedisFailure> {
        debug_assert!(policies.len() <= POLICIES_MAX);
        let mut invocation = self.script.prepare_invoke();
        for (key, quota) in policies {
            invocation.key(key).arg(quota.interval).arg(quota.burst);
        }
        let mut connection = self.connection.clone();
        let answer: Vec<i64> =
            tokio::time::timeout(timeout, invocation.invoke_async(&mut connection))
                .await
                .map_err(|_| RedisFailure::Timeout)??;
        if answer.len() != 1 + 4 * policies.len() {
            return Err(RedisFailure::Shape);
        }
        let to_u64 = |v: i64| u64::try_from(v).unwrap_or(0);
        for (chunk, outcome) in answer[1..].chunks_exact(4).zip(out.iter_mut()) {
            *outcome = Outcome {
                admitted: chunk[0] == 1,
                new_tat: 0,
                remaining: u32::try_from(chunk[1]).unwrap_or(0),
                reset: to_u64(chunk[2]),
                retry_after: to_u64(chunk[3]),
            };
        }
        Ok(answer[0] == 1)
    }

    /// One PING within `timeout`: whether Redis answers.
    pub async fn ping(&self, timeout: Duration) -> Result<(), RedisFailure> {
        let mut connection = self.connection.clone();
        let pong: String =
            tokio::time::timeout(timeout, redis::cmd("PING").query_async(&mut connection))
                .await
                .map_err(|_| RedisFailure::Timeout)??;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(RedisFailure::Shape)
        }
    }
}
