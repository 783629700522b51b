//! `redis.down`: the kernel shares its rate-limit budgets on a Redis of the
//! harness's own (`redis-server` on a free port), which is killed and later
//! restarted. As docs/rate-limits.md documents: requests keep being served
//! (never a 500), `aibos_ratelimit_backend_degraded` is 1 and health says
//! `degraded` while it is gone, each limit is the budget divided by
//! `rate_limit.instances`, both transitions are audited, and shared limits
//! come back when Redis does. SKIP when `redis-server` is not installed.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::kernel::{Kernel, World, admin_token, metrics, password, quoted};
use super::{Context, Verdict, free_port, http_client, metric, ms, secs};

/// The user budget per minute, and the instances sharing it.
const USER_PER_MINUTE: u64 = 100_000;
const INSTANCES: u64 = 4;
/// Requests sent while Redis is gone.
const REQUESTS_WHILE_DOWN: usize = 20;
/// How long a transition (degraded, restored) may take to show: the
/// 100 ms decision timeout and the 500 ms probe, with a margin.
const TRANSITION_BOUND: Duration = Duration::from_secs(3);
/// How long the harness waits for one at most.
const TRANSITION_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub degraded_before: Option<f64>,
    pub user_limit_before: String,
    pub statuses_down: Vec<u16>,
    pub degraded_after: Option<Duration>,
    pub health_down: u16,
    pub health_rate_limit_down: String,
    pub user_limit_down: String,
    pub restored_after: Option<Duration>,
    pub user_limit_restored: String,
    pub audited_degraded: bool,
    pub audited_restored: bool,
}

pub fn judge(o: &Observation) -> Verdict {
    let mut failures = Vec::new();
    let full = USER_PER_MINUTE.to_string();
    let share = (USER_PER_MINUTE / INSTANCES).to_string();
    if o.degraded_before != Some(0.0) || o.user_limit_before != full {
        failures.push(format!(
            "before the outage: degraded {:?}, user limit {} (expected 0 and {full})",
            o.degraded_before, o.user_limit_before
        ));
    }
    let not_served: Vec<u16> = o
        .statuses_down
        .iter()
        .copied()
        .filter(|s| *s != 200)
        .collect();
    if o.statuses_down.is_empty() || !not_served.is_empty() {
        failures.push(format!(
            "requests while Redis was gone answered {not_served:?} instead of 200"
        ));
    }
    match o.degraded_after {
        Some(d) if d <= TRANSITION_BOUND => {}
        other => failures.push(format!(
            "aibos_ratelimit_backend_degraded did not turn 1 within {} (after {other:?})",
            secs(TRANSITION_BOUND)
        )),
    }
    if o.health_down != 200 || o.health_rate_limit_down != "degraded" {
        failures.push(format!(
            "health while degraded: {} with rate_limit status {:?} (expected 200 and \"degraded\")",
            o.health_down, o.health_rate_limit_down
        ));
    }
    if o.user_limit_down != share {
        failures.push(format!(
            "the user limit while degraded is {}, not the per-instance share {share} ({full} ÷ {INSTANCES})",
            o.user_limit_down
        ));
    }
    match o.restored_after {
        Some(d) if d <= TRANSITION_BOUND => {}
        other => failures.push(format!(
            "shared limits did not come back within {} of Redis's return (after {other:?})",
            secs(TRANSITION_BOUND)
        )),
    }
    if o.user_limit_restored != full {
        failures.push(format!(
            "the user limit after the return is {}, not {full}",
            o.user_limit_restored
        ));
    }
    if !o.audited_degraded || !o.audited_restored {
        failures.push(format!(
            "audit trail: ratelimit.backend_degraded {}, ratelimit.backend_restored {}",
            o.audited_degraded, o.audited_restored
        ));
    }
    let summary = format!(
        "Redis killed: {} of {} requests served; degraded after {}; user limit {} → {} per instance; health {} ({}); restored {} after Redis returned, limit {}; audited degraded/restored: {}/{}",
        o.statuses_down.iter().filter(|s| **s == 200).count(),
        o.statuses_down.len(),
        o.degraded_after.map_or_else(|| "never".to_owned(), secs),
        o.user_limit_before,
        o.user_limit_down,
        o.health_down,
        o.health_rate_limit_down,
        o.restored_after.map_or_else(|| "never".to_owned(), secs),
        o.user_limit_restored,
        o.audited_degraded,
        o.audited_restored
    );
    let figures = json!({
        "requests_down": o.statuses_down.len(),
        "served_down": o.statuses_down.iter().filter(|s| **s == 200).count(),
        "degraded_ms": o.degraded_after.map(ms),
        "user_limit_before": o.user_limit_before,
        "user_limit_degraded": o.user_limit_down,
        "instances": INSTANCES,
        "health_down": o.health_down,
        "restored_ms": o.restored_after.map(ms),
        "user_limit_restored": o.user_limit_restored,
        "audited_degraded": o.audited_degraded,
        "audited_restored": o.audited_restored,
    });
    Verdict::judged(summary, figures, failures)
}

/// A `redis-server` of the harness's own, without persistence.
struct RedisServer(Child);

impl RedisServer {
    async fn start(port: u16) -> anyhow::Result<RedisServer> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server")?;
        let server = RedisServer(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("redis-server did not listen on {port}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(server)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redis_server_installed() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub async fn run(context: &Context) -> anyhow::Result<Verdict> {
    if !redis_server_installed() {
        return Ok(Verdict::skipped(
            "redis-server is not installed: there is no Redis of the harness's own to take away",
        ));
    }
    let port = free_port()?;
    let mut world = World::create(context, "redis.down").await?;
    if !context.sabotage {
        // The harness's own test leaves it out: a kernel that does not use
        // the Redis cannot degrade, shrink its limits or restore them.
        world.settings.set(
            "rate_limit",
            "redis_url",
            quoted(&format!("redis://127.0.0.1:{port}")),
        );
    }
    world
        .settings
        .set("rate_limit", "user_per_minute", USER_PER_MINUTE.to_string());
    world
        .settings
        .set("rate_limit", "instances", INSTANCES.to_string());
    let result = observe(&world, port).await;
    world.remove().await;
    Ok(judge(&result?))
}

async fn observe(world: &World, port: u16) -> anyhow::Result<Observation> {
    let http = http_client(Duration::from_secs(5))?;
    let mut redis = RedisServer::start(port).await?;
    let kernel = world.start_kernel().await?;
    let token = admin_token(&http, &kernel, world, &password(), true).await?;
    // The first connection to Redis.
    wait_for(&http, &kernel, 0.0, TRANSITION_WAIT).await?;
    let degraded_before = degraded(&http, &kernel).await?;
    let user_limit_before = user_limit(&http, &kernel, &token).await?;

    redis.kill();
    let killed = Instant::now();
    let mut statuses_down = Vec::new();
    for _ in 0..REQUESTS_WHILE_DOWN {
        statuses_down.push(
            http.get(kernel.url("/api/kernel/roles?limit=1"))
                .bearer_auth(&token)
                .send()
                .await
                .map_or(0, |r| r.status().as_u16()),
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let degraded_after = wait_for(&http, &kernel, 1.0, TRANSITION_WAIT)
        .await?
        .map(|_| killed.elapsed());
    let health: Value = http
        .get(kernel.url("/api/health"))
        .send()
        .await?
        .json()
        .await
        .unwrap_or_default();
    let health_down = http
        .get(kernel.url("/api/health"))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16());
    let health_rate_limit_down = health["rate_limit"]["status"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    let user_limit_down = user_limit(&http, &kernel, &token).await?;

    let _redis = RedisServer::start(port).await?;
    let returned = Instant::now();
    let restored_after = wait_for(&http, &kernel, 0.0, TRANSITION_WAIT)
        .await?
        .map(|_| returned.elapsed());
    let user_limit_restored = user_limit(&http, &kernel, &token).await?;
    let audited_degraded = audited(&http, &kernel, &token, "ratelimit.backend_degraded").await?;
    let audited_restored = audited(&http, &kernel, &token, "ratelimit.backend_restored").await?;
    kernel.stop().await;
    Ok(Observation {
        degraded_before,
        user_limit_before,
        statuses_down,
        degraded_after,
        health_down,
        health_rate_limit_down,
        user_limit_down,
        restored_after,
        user_limit_restored,
        audited_degraded,
        audited_restored,
    })
}

async fn degraded(http: &reqwest::Client, kernel: &Kernel) -> anyhow::Result<Option<f64>> {
    Ok(metric(
        &metrics(http, kernel).await?,
        "aibos_ratelimit_backend_degraded",
        "",
    ))
}

/// Polls the degraded gauge until it is `value`; `Some(())` if it got there.
async fn wait_for(
    http: &reqwest::Client,
    kernel: &Kernel,
    value: f64,
    wait: Duration,
) -> anyhow::Result<Option<()>> {
    let started = Instant::now();
    while started.elapsed() < wait {
        if degraded(http, kernel).await? == Some(value) {
            return Ok(Some(()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(None)
}

/// The `q` of the user policy on an authenticated request.
async fn user_limit(
    http: &reqwest::Client,
    kernel: &Kernel,
    token: &str,
) -> anyhow::Result<String> {
    let response = http
        .get(kernel.url("/api/kernel/roles?limit=1"))
        .bearer_auth(token)
        .send()
        .await?;
    let policy = response
        .headers()
        .get("ratelimit-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Ok(policy
        .split(',')
        .find(|part| part.trim().starts_with("\"user\""))
        .and_then(|part| part.split(';').find_map(|kv| kv.trim().strip_prefix("q=")))
        .unwrap_or("?")
        .to_owned())
}

async fn audited(
    http: &reqwest::Client,
    kernel: &Kernel,
    token: &str,
    action: &str,
) -> anyhow::Result<bool> {
    let body: Value = http
        .get(kernel.url(&format!("/api/kernel/audit?action={action}&limit=10")))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?;
    Ok(body["items"]
        .as_array()
        .is_some_and(|items| !items.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::super::Outcome;
    use super::*;

    fn healthy() -> Observation {
        Observation {
            degraded_before: Some(0.0),
            user_limit_before: "100000".into(),
            statuses_down: vec![200; 20],
            degraded_after: Some(Duration::from_millis(150)),
            health_down: 200,
            health_rate_limit_down: "degraded".into(),
            user_limit_down: "25000".into(),
            restored_after: Some(Duration::from_millis(600)),
            user_limit_restored: "100000".into(),
            audited_degraded: true,
            audited_restored: true,
        }
    }

    #[test]
    fn degraded_mode_as_documented_passes() {
        assert_eq!(judge(&healthy()).outcome, Outcome::Pass);
    }

    #[test]
    fn a_refused_request_a_whole_budget_per_instance_or_no_restore_fail() {
        let mut o = healthy();
        o.statuses_down[5] = 500;
        assert_eq!(judge(&o).outcome, Outcome::Fail);
        let mut o = healthy();
        o.user_limit_down = "100000".into();
        assert_eq!(judge(&o).outcome, Outcome::Fail);
        let mut o = healthy();
        o.degraded_after = None;
        assert_eq!(judge(&o).outcome, Outcome::Fail);
        let mut o = healthy();
        o.restored_after = None;
        assert_eq!(judge(&o).outcome, Outcome::Fail);
        let mut o = healthy();
        o.health_rate_limit_down = "ok".into();
        assert_eq!(judge(&o).outcome, Outcome::Fail);
        let mut o = healthy();
        o.audited_restored = false;
        assert_eq!(judge(&o).outcome, Outcome::Fail);
    }
}
