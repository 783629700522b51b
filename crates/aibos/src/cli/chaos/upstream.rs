//! `upstream.down`: the harness runs a small HTTP cell (axum, in process),
//! registers it as a canon with a route, calls it through the gateway, then
//! stops it. Calls must get 503 (never 500), the circuit must open (seen in
//! `aibos_gateway_circuit_state` = 2 in /metrics, and an open circuit answers
//! without calling the cell); when the cell comes back on the same port the
//! gateway must answer 200 again within the health interval plus the
//! breaker's open time (and a margin), without a kernel restart.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::kernel::{Kernel, World, admin_token, metrics, password};
use super::{Context, Verdict, http_client, metric, ms, secs};

const CANON: &str = "chaoscell";
const CALL: &str = "/api/gateway/chaoscell/ping";
/// Seconds between the kernel's health checks of the cell in this scenario.
const HEALTH_INTERVAL_SECONDS: u64 = 1;
/// Outages tried when a health check wins the race against the calls (see
/// `observe`).
const OUTAGE_ATTEMPTS: u32 = 3;
/// Seconds an open circuit refuses calls before a trial call.
const BREAKER_OPEN_SECONDS: u64 = 1;
/// Calls sent at once while the cell is down: more than the breaker's
/// consecutive-failure threshold (5 by default).
const CALLS_WHILE_DOWN: usize = 8;
/// The recovery bound past the health interval and the breaker's open time:
/// slack for the trial call and the harness's polling.
const RECOVERY_SLACK: Duration = Duration::from_secs(2);
/// How long the harness waits for a recovery at most.
const RECOVERY_WAIT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub status_before: u16,
    /// Statuses of the calls sent while the cell was down.
    pub statuses_down: Vec<u16>,
    /// `aibos_gateway_circuit_state` after them (2 = open).
    pub circuit_state: Option<f64>,
    /// The next call's status and latency, and whether it reached the cell.
    pub open_call_status: u16,
    pub open_call_latency: Duration,
    pub open_call_reached_cell: bool,
    /// Time from the cell's return to the first 200, if any.
    pub recovered_after: Option<Duration>,
    pub same_process: bool,
    /// Outages it took to see the breaker (more than one when a health
    /// check won the race against the calls).
    pub outage_attempts: u32,
}

pub fn judge(o: &Observation) -> Verdict {
    let mut failures = Vec::new();
    if o.status_before != 200 {
        failures.push(format!(
            "before the outage the gateway answered {}",
            o.status_before
        ));
    }
    let fivehundreds = o.statuses_down.iter().filter(|s| **s == 500).count();
    let not_503: Vec<u16> = o
        .statuses_down
        .iter()
        .copied()
        .filter(|s| *s != 503)
        .collect();
    if !not_503.is_empty() {
        failures.push(format!(
            "calls to the stopped cell answered {not_503:?} instead of 503"
        ));
    }
    if o.circuit_state != Some(2.0) {
        failures.push(format!(
            "aibos_gateway_circuit_state is {:?} after {} failed calls, not 2 (open)",
            o.circuit_state,
            o.statuses_down.len()
        ));
    }
    if o.open_call_status != 503 || o.open_call_reached_cell {
        failures.push(format!(
            "with the circuit open a call answered {} and reached the cell: {}",
            o.open_call_status, o.open_call_reached_cell
        ));
    }
    let bound =
        Duration::from_secs(HEALTH_INTERVAL_SECONDS + BREAKER_OPEN_SECONDS) + RECOVERY_SLACK;
    match o.recovered_after {
        Some(d) if d <= bound => {}
        Some(d) => failures.push(format!(
            "the gateway answered 200 again {} after the cell returned, over {}",
            secs(d),
            secs(bound)
        )),
        None => failures.push(format!(
            "the gateway did not answer 200 within {} of the cell's return",
            secs(RECOVERY_WAIT)
        )),
    }
    if !o.same_process {
        failures.push("the kernel process exited".into());
    }
    let summary = format!(
        "cell stopped: {} calls answered {:?} ({} of them 500); circuit state {:?} (2 = open); open-circuit answer {} in {} ms without reaching the cell: {}; 200 again {} after the cell returned",
        o.statuses_down.len(),
        distinct(&o.statuses_down),
        fivehundreds,
        o.circuit_state,
        o.open_call_status,
        ms(o.open_call_latency),
        !o.open_call_reached_cell,
        o.recovered_after.map_or_else(|| "never".to_owned(), secs),
    );
    let figures = json!({
        "calls_down": o.statuses_down.len(),
        "statuses_down": distinct(&o.statuses_down),
        "answered_500": fivehundreds,
        "circuit_state": o.circuit_state,
        "open_call_status": o.open_call_status,
        "open_call_ms": ms(o.open_call_latency),
        "open_call_reached_cell": o.open_call_reached_cell,
        "recovered_ms": o.recovered_after.map(ms),
        "recovery_bound_ms": ms(bound),
        "outage_attempts": o.outage_attempts,
    });
    Verdict::judged(summary, figures, failures)
}

fn distinct(statuses: &[u16]) -> Vec<u16> {
    let mut d = statuses.to_vec();
    d.sort_unstable();
    d.dedup();
    d
}

/// The cell: answers `GET /v1/ping` and `GET /v1/health`, counting calls.
/// `aibos drill incident` stops and restarts it too.
pub struct Cell {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Cell {
    pub async fn start(
        addr: SocketAddr,
        calls: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> anyhow::Result<Cell> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("the cell cannot listen on {addr}"))?;
        let addr = listener.local_addr()?;
        let counter = calls;
        let app = axum::Router::new()
            .route(
                "/v1/ping",
                axum::routing::get(move || {
                    let counter = counter.clone();
                    async move {
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        "pong"
                    }
                }),
            )
            .route("/v1/health", axum::routing::get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Cell {
            addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Stops listening and closes its connections (bounded wait).
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

pub async fn run(context: &Context) -> anyhow::Result<Verdict> {
    let mut world = World::create(context, "upstream.down").await?;
    world.settings.set(
        "gateway",
        "health_interval_seconds",
        HEALTH_INTERVAL_SECONDS.to_string(),
    );
    world.settings.set(
        "gateway",
        "breaker_open_seconds",
        BREAKER_OPEN_SECONDS.to_string(),
    );
    if context.sabotage {
        // The harness's own test: a breaker that cannot open within the
        // scenario's calls (1 000 in a row, or every one of 64).
        world
            .settings
            .set("gateway", "breaker_consecutive_failures", "1000");
        world
            .settings
            .set("gateway", "breaker_failure_rate_percent", "100");
        world.settings.set("gateway", "breaker_window_calls", "64");
    }
    let result = observe(&world).await;
    world.remove().await;
    Ok(judge(&result?))
}

async fn observe(world: &World) -> anyhow::Result<Observation> {
    let http = http_client(Duration::from_secs(10))?;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut cell = Cell::start("127.0.0.1:0".parse()?, calls.clone()).await?;
    let cell_addr = cell.addr;
    let mut kernel = world.start_kernel().await?;
    let token = admin_token(&http, &kernel, world, &password(), true).await?;
    register(&http, &kernel, &token, CANON, cell_addr).await?;

    let call = || http.get(kernel.url(CALL)).bearer_auth(&token).send();
    // The route table and the first health check settle: wait for a 200.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status_before = 0;
    while Instant::now() < deadline {
        status_before = call().await?.status().as_u16();
        if status_before == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let labels = format!("{{canon=\"{CANON}\"}}");
    let unhealthy = format!("{{canon=\"{CANON}\",route=\"GET /ping\",outcome=\"unhealthy\"}}");
    let mut attempts = 0;
    let (statuses_down, circuit_state) = loop {
        attempts += 1;
        let refused_unhealthy = metric(
            &metrics(&http, &kernel).await?,
            "aibos_gateway_calls_total",
            &unhealthy,
        );
        cell.stop().await;
        // At once and together: more failures than the breaker's threshold.
        let down = futures_util::future::join_all((0..CALLS_WHILE_DOWN).map(|_| call())).await;
        let statuses_down: Vec<u16> = down
            .into_iter()
            .map(|r| r.map(|r| r.status().as_u16()).unwrap_or(0))
            .collect();
        let text = metrics(&http, &kernel).await?;
        let circuit_state = metric(&text, "aibos_gateway_circuit_state", &labels);
        // A health check that ran between the stop and the calls marked the
        // cell down first: the calls were refused as `unhealthy` without
        // reaching it, which the breaker rightly does not count. That race
        // (seen in the metric, not assumed) says nothing of the breaker:
        // bring the cell back, let a check find it healthy, and try again.
        let raced = metric(&text, "aibos_gateway_calls_total", &unhealthy) != refused_unhealthy;
        if circuit_state == Some(2.0) || !raced || attempts == OUTAGE_ATTEMPTS {
            break (statuses_down, circuit_state);
        }
        cell = Cell::start(cell_addr, calls.clone()).await?;
        let settle = Instant::now() + Duration::from_secs(10);
        while Instant::now() < settle && call().await?.status() != 200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };

    // The cell is back on the same port; the next call must not reach it
    // while the circuit is open.
    let calls_before = calls.load(std::sync::atomic::Ordering::SeqCst);
    cell = Cell::start(cell_addr, calls.clone()).await?;
    let returned = Instant::now();
    let started = Instant::now();
    let open_call_status = call().await?.status().as_u16();
    let open_call_latency = started.elapsed();
    let open_call_reached_cell = calls.load(std::sync::atomic::Ordering::SeqCst) != calls_before;

    let mut recovered_after = None;
    while returned.elapsed() < RECOVERY_WAIT {
        if call().await?.status() == 200 {
            recovered_after = Some(returned.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let same_process = kernel.running();
    kernel.stop().await;
    cell.stop().await;
    Ok(Observation {
        status_before,
        statuses_down,
        circuit_state,
        open_call_status,
        open_call_latency,
        open_call_reached_cell,
        recovered_after,
        same_process,
        outage_attempts: attempts,
    })
}

/// Registers the cell as canon `canon` with a `GET /ping` route any
/// authenticated caller may use (`/api/gateway/{canon}/ping`).
pub async fn register(
    http: &reqwest::Client,
    kernel: &Kernel,
    token: &str,
    canon: &str,
    cell: SocketAddr,
) -> anyhow::Result<()> {
    let canon = http
        .post(kernel.url("/api/kernel/canons"))
        .bearer_auth(token)
        .json(&json!({
            "name": canon,
            "base_url": format!("http://{cell}/v1"),
            "permissions": [{ "name": format!("{canon}.cell.read"), "description": "Calls of the chaos harness's cell" }],
        }))
        .send()
        .await?;
    if canon.status() != 201 {
        bail!(
            "creating the canon answered {}: {}",
            canon.status(),
            canon.text().await?
        );
    }
    let canon: Value = canon.json().await?;
    let route = http
        .post(kernel.url("/api/kernel/routes"))
        .bearer_auth(token)
        .json(&json!({
            "canon_id": canon["id"], "method": "GET", "path": "/ping",
            "required_permissions": [], "public_to_authenticated": true,
        }))
        .send()
        .await?;
    if route.status() != 201 {
        bail!(
            "creating the route answered {}: {}",
            route.status(),
            route.text().await?
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Outcome;
    use super::*;

    fn healthy() -> Observation {
        Observation {
            status_before: 200,
            statuses_down: vec![503; 8],
            circuit_state: Some(2.0),
            open_call_status: 503,
            open_call_latency: Duration::from_millis(2),
            open_call_reached_cell: false,
            recovered_after: Some(Duration::from_millis(1300)),
            same_process: true,
            outage_attempts: 1,
        }
    }

    #[test]
    fn an_open_circuit_and_a_timely_recovery_pass() {
        assert_eq!(judge(&healthy()).outcome, Outcome::Pass);
    }

    #[test]
    fn a_500_a_closed_circuit_or_no_recovery_fail() {
        let mut o = healthy();
        o.statuses_down[3] = 500;
        assert_eq!(judge(&o).outcome, Outcome::Fail);
        let mut o = healthy();
        o.circuit_state = Some(0.0);
        assert_eq!(judge(&o).outcome, Outcome::Fail);
        let mut o = healthy();
        o.open_call_reached_cell = true;
        assert_eq!(judge(&o).outcome, Outcome::Fail);
        let mut o = healthy();
        o.recovered_after = None;
        assert_eq!(judge(&o).outcome, Outcome::Fail);
        let mut o = healthy();
        o.recovered_after = Some(Duration::from_secs(9));
        assert_eq!(judge(&o).outcome, Outcome::Fail);
    }
}
