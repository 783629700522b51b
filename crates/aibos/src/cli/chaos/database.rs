//! `db.down` and `db.latency.500ms`: the database taken away or slowed down
//! under the kernel's feet.
//!
//! On PostgreSQL the kernel reaches its server through the harness's TCP
//! proxy (proxy.rs), which cuts every connection or delays every round trip.
//! SQLite is a library inside the kernel's process, with no connection to
//! cut; what takes it away is another process holding the database file's
//! write lock (an operator's `sqlite3` shell left in a transaction, a copying
//! tool), and what slows it down is that lock held in bursts. The harness is
//! that other process (`aibos_kernel::db::admin::SqliteLock`): for `db.down`
//! it holds the lock through the outage, for `db.latency.500ms` it holds it
//! 500 ms at a time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;
use tokio::sync::Mutex;

use aibos_kernel::db::admin::SqliteLock;

use super::kernel::{Kernel, World, admin_token, metrics, password, publish, quoted};
use super::proxy::Proxy;
use super::{ChaosEngine, Context, Verdict, http_client, metric, ms, secs};

/// `/api/health` must turn 503 this soon after the database goes.
const HEALTH_BOUND: Duration = Duration::from_secs(2);
/// How long the database stays away.
/// How long the database stays away: long enough for writes made during it
/// to be refused within it, behind a batch that waits first — on SQLite two
/// `database.busy_timeout_ms` (5 s) and a margin.
const OUTAGE_POSTGRES: Duration = Duration::from_secs(8);
const OUTAGE_SQLITE: Duration = Duration::from_secs(14);
/// A write must be answered (refused) within this during the outage: twice
/// the default `database.acquire_timeout_ms` (3 s) on PostgreSQL, or the
/// default `database.busy_timeout_ms` (5 s) on SQLite, since a write may wait
/// for the group-commit batch ahead of it to give up first; and a margin.
const WRITE_PATIENCE_POSTGRES: Duration = Duration::from_secs(7);
const WRITE_PATIENCE_SQLITE: Duration = Duration::from_secs(12);
/// Clients writing in a loop through the outage.
const WRITERS: u64 = 4;
/// How long the harness waits for health to come back.
const RECOVERY_WAIT: Duration = Duration::from_secs(20);

/// One write of the load: when it started and ended (relative to the
/// scenario's clock), and its status (0: no answer within the patience).
#[derive(Debug, Clone, Copy)]
pub struct Write {
    pub started: Duration,
    pub ended: Duration,
    pub status: u16,
}

#[derive(Debug, Clone, Default)]
pub struct DownObservation {
    /// How long a write may take to be answered during the outage.
    pub patience: Duration,
    pub health_before: u16,
    /// When the database went, and when it came back (scenario clock).
    pub cut_at: Duration,
    pub back_at: Duration,
    pub health_503_after: Option<Duration>,
    pub liveness: Vec<u16>,
    pub writes: Vec<Write>,
    pub recovered_after: Option<Duration>,
    pub write_after_recovery: u16,
    pub same_process: bool,
}

pub fn judge_down(o: &DownObservation) -> Verdict {
    let mut failures = Vec::new();
    if o.health_before != 200 {
        failures.push(format!(
            "health answered {} before the outage",
            o.health_before
        ));
    }
    match o.health_503_after {
        Some(d) if d <= HEALTH_BOUND => {}
        Some(d) => failures.push(format!(
            "health turned 503 {} after the outage, over {}",
            secs(d),
            secs(HEALTH_BOUND)
        )),
        None => failures.push("health never answered 503 during the outage".into()),
    }
    let live_bad: Vec<u16> = o.liveness.iter().copied().filter(|s| *s != 200).collect();
    if o.liveness.is_empty() || !live_bad.is_empty() {
        failures.push(format!(
            "liveness answered {live_bad:?} during the outage ({} probes)",
            o.liveness.len()
        ));
    }
    let answered_500 = o
        .writes
        .iter()
        .filter(|w| w.status >= 500 && w.status != 503)
        .count();
    let unanswered = o.writes.iter().filter(|w| w.status == 0).count();
    let during: Vec<&Write> = o
        .writes
        .iter()
        .filter(|w| w.started >= o.cut_at && w.ended <= o.back_at)
        .collect();
    let refused_503 = during.iter().filter(|w| w.status == 503).count();
    if answered_500 > 0 {
        failures.push(format!(
            "{answered_500} writes answered a 5xx other than 503"
        ));
    }
    if unanswered > 0 {
        failures.push(format!(
            "{unanswered} writes got no answer within {}",
            secs(o.patience)
        ));
    }
    if during.is_empty() {
        failures.push("no write was made during the outage: nothing to check".into());
    } else if refused_503 != during.len() {
        let other: Vec<u16> = during
            .iter()
            .map(|w| w.status)
            .filter(|s| *s != 503)
            .collect();
        failures.push(format!(
            "{} of {} writes during the outage were not refused with 503: {other:?}",
            during.len() - refused_503,
            during.len()
        ));
    }
    match o.recovered_after {
        Some(_) => {}
        None => failures.push(format!(
            "health did not answer 200 within {} of the database's return",
            secs(RECOVERY_WAIT)
        )),
    }
    if o.write_after_recovery != 201 {
        failures.push(format!(
            "a write after the recovery answered {}",
            o.write_after_recovery
        ));
    }
    if !o.same_process {
        failures.push("the kernel process exited (recovery must need no restart)".into());
    }
    let summary = format!(
        "health 503 after {}; liveness {} of {} probes 200; {} of {} writes during the outage refused with 503, {} answered another 5xx, {} unanswered; recovered {} after the database returned, next write {}, same process: {}",
        o.health_503_after.map_or_else(|| "never".to_owned(), secs),
        o.liveness.iter().filter(|s| **s == 200).count(),
        o.liveness.len(),
        refused_503,
        during.len(),
        answered_500,
        unanswered,
        o.recovered_after.map_or_else(|| "never".to_owned(), secs),
        o.write_after_recovery,
        o.same_process
    );
    let max_refusal = during
        .iter()
        .map(|w| w.ended - w.started)
        .max()
        .unwrap_or_default();
    let figures = json!({
        "health_503_ms": o.health_503_after.map(ms),
        "liveness_probes": o.liveness.len(),
        "liveness_200": o.liveness.iter().filter(|s| **s == 200).count(),
        "writes": o.writes.len(),
        "writes_during_outage": during.len(),
        "refused_503": refused_503,
        "answered_other_5xx": answered_500,
        "unanswered": unanswered,
        "slowest_refusal_ms": ms(max_refusal),
        "recovered_ms": o.recovered_after.map(ms),
        "write_after_recovery": o.write_after_recovery,
        "same_process": o.same_process,
    });
    Verdict::judged(summary, figures, failures)
}

/// How the scenario takes the database away or slows it down.
enum Fault {
    /// PostgreSQL through the harness's proxy.
    Proxy(Proxy),
    /// SQLite: the harness's own connection to the file holds its write lock
    /// (opened once the kernel has created the database).
    Lock {
        url: String,
        lock: Option<SqliteLock>,
        /// The task holding the lock in bursts (`db.latency.500ms`).
        bursts: Option<(Arc<AtomicBool>, tokio::task::JoinHandle<anyhow::Result<()>>)>,
    },
}

impl Fault {
    /// The fault for the world's engine; the world's settings point the
    /// kernel at the proxy on PostgreSQL.
    async fn prepare(world: &mut World, engine: ChaosEngine) -> anyhow::Result<Fault> {
        Ok(match engine {
            ChaosEngine::Postgres => Fault::Proxy(through_proxy(world).await?),
            ChaosEngine::Sqlite => Fault::Lock {
                url: world.database_url.clone(),
                lock: None,
                bursts: None,
            },
        })
    }

    /// The database is gone: every connection cut, or the lock held.
    async fn take_down(&mut self) -> anyhow::Result<()> {
        match self {
            Fault::Proxy(proxy) => proxy.take_down(),
            Fault::Lock { url, lock, .. } => {
                let mut held = SqliteLock::open(url).await?;
                held.hold().await?;
                *lock = Some(held);
            }
        }
        Ok(())
    }

    async fn bring_back(&mut self) -> anyhow::Result<()> {
        match self {
            Fault::Proxy(proxy) => proxy.bring_back(),
            Fault::Lock { lock, .. } => {
                if let Some(held) = lock.take() {
                    held.close().await;
                }
            }
        }
        Ok(())
    }

    /// Every round trip delayed by [`LATENCY`], or the lock held that long
    /// at a time with [`LOCK_GAP`] between holds.
    async fn slow_down(&mut self) -> anyhow::Result<()> {
        match self {
            Fault::Proxy(proxy) => proxy.set_delay(LATENCY),
            Fault::Lock { url, bursts, .. } => {
                let mut lock = SqliteLock::open(url).await?;
                let stop = Arc::new(AtomicBool::new(false));
                let stopped = stop.clone();
                let task = tokio::spawn(async move {
                    while !stopped.load(Ordering::SeqCst) {
                        lock.hold().await?;
                        tokio::time::sleep(LATENCY).await;
                        lock.release().await?;
                        tokio::time::sleep(LOCK_GAP).await;
                    }
                    lock.close().await;
                    Ok(())
                });
                *bursts = Some((stop, task));
            }
        }
        Ok(())
    }

    async fn speed_up(&mut self) -> anyhow::Result<()> {
        match self {
            Fault::Proxy(proxy) => proxy.set_delay(Duration::ZERO),
            Fault::Lock { bursts, .. } => {
                if let Some((stop, task)) = bursts.take() {
                    stop.store(true, Ordering::SeqCst);
                    task.await.context("the lock-holding task")??;
                }
            }
        }
        Ok(())
    }

    /// What the scenario does, for the verdict line.
    fn describe_latency(&self) -> String {
        match self {
            Fault::Proxy(_) => format!("+{} per round trip", secs(LATENCY)),
            Fault::Lock { .. } => format!(
                "the write lock held {} at a time by another process, {} apart",
                secs(LATENCY),
                secs(LOCK_GAP)
            ),
        }
    }
}

/// A kernel on PostgreSQL through the proxy, with `settings` adjusted.
async fn through_proxy(world: &mut World) -> anyhow::Result<Proxy> {
    let mut url = reqwest::Url::parse(&world.database_url).context("the database URL")?;
    let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = url.port().unwrap_or(5432);
    let proxy = Proxy::start(format!("{host}:{port}")).await?;
    url.set_host(Some("127.0.0.1"))
        .map_err(|e| anyhow::anyhow!("the database URL: {e}"))?;
    url.set_port(Some(proxy.addr.port()))
        .map_err(|()| anyhow::anyhow!("the database URL has no port"))?;
    world.settings.set("database", "url", quoted(url.as_str()));
    Ok(proxy)
}

pub async fn down(context: &Context) -> anyhow::Result<Verdict> {
    let mut world = World::create(context, "db.down").await?;
    let mut fault = Fault::prepare(&mut world, context.engine).await?;
    if context.sabotage {
        // The harness's own test: writes wait 30 s for a connection (or for
        // SQLite's lock) instead of being refused, so they are not answered
        // within the patience.
        let key = match context.engine {
            ChaosEngine::Postgres => "acquire_timeout_ms",
            ChaosEngine::Sqlite => "busy_timeout_ms",
        };
        world.settings.set("database", key, "30000");
    }
    let (patience, outage) = match context.engine {
        ChaosEngine::Postgres => (WRITE_PATIENCE_POSTGRES, OUTAGE_POSTGRES),
        ChaosEngine::Sqlite => (WRITE_PATIENCE_SQLITE, OUTAGE_SQLITE),
    };
    let result = observe_down(&world, &mut fault, patience, outage).await;
    let _ = fault.bring_back().await;
    drop(fault);
    world.remove().await;
    Ok(judge_down(&result?))
}

async fn observe_down(
    world: &World,
    fault: &mut Fault,
    patience: Duration,
    outage: Duration,
) -> anyhow::Result<DownObservation> {
    let http = http_client(Duration::from_secs(5))?;
    let mut kernel = world.start_kernel().await?;
    let token = admin_token(&http, &kernel, world, &password(), true).await?;
    let health_before = status(&http, &kernel, "/api/health").await;

    let clock = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(Mutex::new(Vec::new()));
    let patient = http_client(patience)?;
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let (stop, writes, base, token, patient) = (
                stop.clone(),
                writes.clone(),
                kernel.base.clone(),
                token.clone(),
                patient.clone(),
            );
            tokio::spawn(async move {
                let mut n = writer * 1_000_000;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let started = clock.elapsed();
                    let status = publish(&patient, &base, &token, n)
                        .await
                        .map_or(0, |(s, _)| s);
                    writes.lock().await.push(Write {
                        started,
                        ended: clock.elapsed(),
                        status,
                    });
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    fault.take_down().await?;
    let cut_at = clock.elapsed();
    let cut = Instant::now();
    let mut health_503_after = None;
    while cut.elapsed() < outage {
        if status(&http, &kernel, "/api/health").await == 503 {
            health_503_after = Some(cut.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut liveness = Vec::new();
    while cut.elapsed() < outage {
        liveness.push(status(&http, &kernel, "/api/health/live").await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    fault.bring_back().await?;
    let back_at = clock.elapsed();
    let back = Instant::now();
    let mut recovered_after = None;
    while back.elapsed() < RECOVERY_WAIT {
        if status(&http, &kernel, "/api/health").await == 200 {
            recovered_after = Some(back.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        let _ = writer.await;
    }
    let write_after_recovery = publish(&http, &kernel.base, &token, 0)
        .await
        .map_or(0, |(s, _)| s);
    let same_process = kernel.running();
    kernel.stop().await;
    let writes = std::mem::take(&mut *writes.lock().await);
    Ok(DownObservation {
        patience,
        health_before,
        cut_at,
        back_at,
        health_503_after,
        liveness,
        writes,
        recovered_after,
        write_after_recovery,
        same_process,
    })
}

async fn status(http: &reqwest::Client, kernel: &Kernel, path: &str) -> u16 {
    http.get(kernel.url(path))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// The latency the scenario adds to every round trip.
const LATENCY: Duration = Duration::from_millis(500);
/// Concurrent requests while the database is slow: more than the pool's 10
/// connections, so some must wait for one.
const LATENCY_CLIENTS: usize = 12;
/// Requests each client makes one after the other on SQLite: many
/// group-commit batches, each meeting the lock at another point of its cycle.
const LATENCY_ROUNDS_SQLITE: usize = 4;
/// On SQLite, the pause between two holds of the lock: longer than the
/// 100 ms SQLite's busy handler sleeps between tries once it has waited a
/// while, so a waiting writer gets in.
const LOCK_GAP: Duration = Duration::from_millis(150);
/// The kernel's timeouts in this scenario (its defaults).
const ACQUIRE_TIMEOUT: Duration = Duration::from_millis(3000);
const STATEMENT_TIMEOUT: Duration = Duration::from_millis(5000);
/// `/api/health` gives the database 1 s (`limits::HEALTH_DB_TIMEOUT_MS`);
/// its answer must come within that and a second (a loaded machine), slow
/// database or not.
const HEALTH_PROBE_BOUND: Duration =
    Duration::from_millis(aibos_kernel::limits::HEALTH_DB_TIMEOUT_MS + 1_000);
/// The harness's patience with one request: a request still unanswered then
/// is stuck (no kernel timeout ended it).
const LATENCY_PATIENCE: Duration = Duration::from_secs(30);
/// How long the pool has to give back its connections once the latency goes.
const POOL_DRAIN_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default)]
pub struct LatencyObservation {
    /// What the fault was, for the verdict line.
    pub fault: String,
    /// Whether a request may be refused (503) rather than delayed.
    pub refusals_allowed: bool,
    /// (status, latency) of every request made while the database was slow
    /// (status 0: no answer within the harness's patience).
    pub requests: Vec<(u16, Duration)>,
    /// (status, latency) of the health probes made meanwhile.
    pub health_probes: Vec<(u16, Duration)>,
    /// Connections in use before the latency (the kernel's background tasks
    /// hold some), and once it was gone and the load had stopped.
    pub in_use_before: Option<f64>,
    pub in_use_after: Option<f64>,
    pub drained_after: Option<Duration>,
    pub health_after: u16,
    pub write_after: u16,
}

pub fn judge_latency(o: &LatencyObservation) -> Verdict {
    let mut failures = Vec::new();
    let mut latencies: Vec<Duration> = o.requests.iter().map(|(_, d)| *d).collect();
    latencies.sort_unstable();
    let p50 = latencies
        .get(latencies.len() / 2)
        .copied()
        .unwrap_or_default();
    let max = latencies.last().copied().unwrap_or_default();
    let ok = o
        .requests
        .iter()
        .filter(|(s, _)| (200..300).contains(s))
        .count();
    let refused = o.requests.iter().filter(|(s, _)| *s == 503).count();
    let unanswered = o.requests.iter().filter(|(s, _)| *s == 0).count();
    let other: Vec<u16> = o
        .requests
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| *s != 0 && *s != 503 && !(200..300).contains(s))
        .collect();
    if o.requests.is_empty() {
        failures.push("no request was made while the database was slow".into());
    }
    if ok == 0 {
        failures.push("no request succeeded while the database was slow".into());
    }
    if unanswered > 0 {
        failures.push(format!(
            "{unanswered} requests were still unanswered after {} (no timeout ended them)",
            secs(LATENCY_PATIENCE)
        ));
    }
    if !other.is_empty() {
        failures.push(format!(
            "requests answered {other:?} (only 2xx or 503 are expected)"
        ));
    }
    if refused > 0 && !o.refusals_allowed {
        failures.push(format!(
            "{refused} requests were refused with 503 although the database only delayed them"
        ));
    }
    let slowest_health = o
        .health_probes
        .iter()
        .map(|(_, d)| *d)
        .max()
        .unwrap_or_default();
    let health_late = o
        .health_probes
        .iter()
        .filter(|(s, d)| *s == 0 || *d > HEALTH_PROBE_BOUND)
        .count();
    if o.health_probes.is_empty() || health_late > 0 {
        failures.push(format!(
            "{health_late} of {} health probes were not answered within {} (its 1 s database timeout)",
            o.health_probes.len(),
            secs(HEALTH_PROBE_BOUND)
        ));
    }
    if o.drained_after.is_none() {
        failures.push(format!(
            "{:?} pool connections still in use {} after the latency went, {:?} before it (pool exhaustion)",
            o.in_use_after,
            secs(POOL_DRAIN_WAIT),
            o.in_use_before
        ));
    }
    if o.health_after != 200 || o.write_after != 201 {
        failures.push(format!(
            "after the latency went health answered {} and a write {}",
            o.health_after, o.write_after
        ));
    }
    let summary = format!(
        "{}, {} writes from {LATENCY_CLIENTS} clients at once: {} succeeded, {} refused 503, {} unanswered, p50 {}, slowest {}; {} health probes, slowest {} (bound {}); pool back to {:?} in use ({:?} before) {} after",
        o.fault,
        o.requests.len(),
        ok,
        refused,
        unanswered,
        secs(p50),
        secs(max),
        o.health_probes.len(),
        secs(slowest_health),
        secs(HEALTH_PROBE_BOUND),
        o.in_use_after,
        o.in_use_before,
        o.drained_after.map_or_else(|| "never".to_owned(), secs),
    );
    let figures = json!({
        "latency_ms": ms(LATENCY),
        "requests": o.requests.len(),
        "succeeded": ok,
        "refused_503": refused,
        "unanswered": unanswered,
        "other_statuses": other,
        "p50_ms": ms(p50),
        "max_ms": ms(max),
        "health_probes": o.health_probes.len(),
        "health_slowest_ms": ms(slowest_health),
        "health_bound_ms": ms(HEALTH_PROBE_BOUND),
        "pool_in_use_before": o.in_use_before,
        "pool_in_use_after": o.in_use_after,
        "pool_drained_ms": o.drained_after.map(ms),
        "health_after": o.health_after,
        "write_after": o.write_after,
    });
    Verdict::judged(summary, figures, failures)
}

pub async fn latency(context: &Context) -> anyhow::Result<Verdict> {
    let mut world = World::create(context, "db.latency.500ms").await?;
    let mut fault = Fault::prepare(&mut world, context.engine).await?;
    world.settings.set(
        "database",
        "acquire_timeout_ms",
        ms(ACQUIRE_TIMEOUT).to_string(),
    );
    world.settings.set(
        "database",
        "statement_timeout_ms",
        ms(STATEMENT_TIMEOUT).to_string(),
    );
    if context.sabotage {
        match context.engine {
            // The harness's own test: three connections and a minute's wait
            // for one, so requests queue past the harness's patience.
            ChaosEngine::Postgres => {
                world.settings.set("database", "max_connections", "3");
                world
                    .settings
                    .set("database", "acquire_timeout_ms", "60000");
            }
            // A kernel that gives up on the lock after 1 ms: writes that a
            // 500 ms hold should only delay are refused.
            ChaosEngine::Sqlite => world.settings.set("database", "busy_timeout_ms", "1"),
        }
    }
    let rounds = match context.engine {
        ChaosEngine::Postgres => 1,
        ChaosEngine::Sqlite => LATENCY_ROUNDS_SQLITE,
    };
    let result = observe_latency(&world, &mut fault, rounds).await;
    let _ = fault.speed_up().await;
    drop(fault);
    world.remove().await;
    let mut observation = result?;
    // On SQLite a 500 ms hold is a tenth of `database.busy_timeout_ms`: a
    // write it delays must still succeed. On PostgreSQL a request makes
    // several slow round trips and more requests than connections wait for
    // one, so a refusal (503 after `database.acquire_timeout_ms`) is right.
    observation.refusals_allowed = context.engine == ChaosEngine::Postgres;
    Ok(judge_latency(&observation))
}

async fn in_use(http: &reqwest::Client, kernel: &Kernel) -> anyhow::Result<Option<f64>> {
    Ok(metric(
        &metrics(http, kernel).await?,
        "aibos_db_pool_connections",
        "{state=\"in_use\"}",
    ))
}

async fn observe_latency(
    world: &World,
    fault: &mut Fault,
    rounds: usize,
) -> anyhow::Result<LatencyObservation> {
    let http = http_client(Duration::from_secs(5))?;
    let kernel = world.start_kernel().await?;
    let token = admin_token(&http, &kernel, world, &password(), true).await?;
    publish(&http, &kernel.base, &token, 0).await?;
    let in_use_before = in_use(&http, &kernel).await?;

    fault.slow_down().await?;
    let patient = http_client(LATENCY_PATIENCE)?;
    // `rounds` requests per client, the clients all at once: half event
    // publications, half role creations (audited changes, one transaction
    // each).
    let clients = (0..LATENCY_CLIENTS).map(|client| {
        let (patient, base, token) = (patient.clone(), kernel.base.clone(), token.clone());
        async move {
            let mut answers = Vec::with_capacity(rounds);
            for round in 0..rounds {
                let started = Instant::now();
                let n = u64::try_from(client * rounds + round).unwrap_or(0) + 1;
                let status = if client % 2 == 0 {
                    publish(&patient, &base, &token, n).await.map_or(0, |(s, _)| s)
                } else {
                    patient
                        .post(format!("{base}/api/kernel/roles"))
                        .bearer_auth(&token)
                        .json(&json!({ "name": format!("slow-{client}-{round}"), "permissions": ["kernel.event.read"] }))
                        .send()
                        .await
                        .map_or(0, |r| r.status().as_u16())
                };
                answers.push((status, started.elapsed()));
            }
            answers
        }
    });
    let done = Arc::new(AtomicBool::new(false));
    let prober = {
        let (http, url, done) = (
            http_client(LATENCY_PATIENCE)?,
            kernel.url("/api/health"),
            done.clone(),
        );
        tokio::spawn(async move {
            let mut probes = Vec::new();
            while !done.load(Ordering::SeqCst) {
                let started = Instant::now();
                let status = http
                    .get(&url)
                    .send()
                    .await
                    .map_or(0, |r| r.status().as_u16());
                probes.push((status, started.elapsed()));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            probes
        })
    };
    let requests: Vec<(u16, Duration)> = futures_util::future::join_all(clients)
        .await
        .into_iter()
        .flatten()
        .collect();
    done.store(true, Ordering::SeqCst);
    let health_probes = prober.await.unwrap_or_default();
    fault.speed_up().await?;

    let drain = Instant::now();
    let mut drained_after = None;
    let mut in_use_after = None;
    while drain.elapsed() < POOL_DRAIN_WAIT {
        in_use_after = in_use(&http, &kernel).await?;
        if let (Some(after), Some(before)) = (in_use_after, in_use_before)
            && after <= before
        {
            drained_after = Some(drain.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health_after = status(&http, &kernel, "/api/health").await;
    let write_after = publish(&http, &kernel.base, &token, 0)
        .await
        .map_or(0, |(s, _)| s);
    kernel.stop().await;
    Ok(LatencyObservation {
        fault: fault.describe_latency(),
        refusals_allowed: true,
        requests,
        health_probes,
        in_use_before,
        in_use_after,
        drained_after,
        health_after,
        write_after,
    })
}

#[cfg(test)]
mod tests {
    use super::super::Outcome;
    use super::*;

    fn write(started: u64, ended: u64, status: u16) -> Write {
        Write {
            started: Duration::from_millis(started),
            ended: Duration::from_millis(ended),
            status,
        }
    }

    fn healthy_down() -> DownObservation {
        DownObservation {
            patience: WRITE_PATIENCE_POSTGRES,
            health_before: 200,
            cut_at: Duration::from_millis(300),
            back_at: Duration::from_millis(5300),
            health_503_after: Some(Duration::from_millis(40)),
            liveness: vec![200; 9],
            writes: vec![
                write(0, 10, 201),
                write(400, 900, 503),
                write(1000, 4100, 503),
                write(5400, 5420, 201),
            ],
            recovered_after: Some(Duration::from_millis(800)),
            write_after_recovery: 201,
            same_process: true,
        }
    }

    #[test]
    fn an_outage_met_with_503s_and_a_recovery_passes() {
        assert_eq!(judge_down(&healthy_down()).outcome, Outcome::Pass);
    }

    #[test]
    fn slow_health_a_500_an_unanswered_write_or_no_recovery_fail() {
        let mut o = healthy_down();
        o.health_503_after = Some(Duration::from_millis(2500));
        assert_eq!(judge_down(&o).outcome, Outcome::Fail);
        let mut o = healthy_down();
        o.writes[1].status = 500;
        assert_eq!(judge_down(&o).outcome, Outcome::Fail);
        let mut o = healthy_down();
        o.writes[2].status = 0;
        assert_eq!(judge_down(&o).outcome, Outcome::Fail);
        let mut o = healthy_down();
        o.liveness[3] = 503;
        assert_eq!(judge_down(&o).outcome, Outcome::Fail);
        let mut o = healthy_down();
        o.recovered_after = None;
        assert_eq!(judge_down(&o).outcome, Outcome::Fail);
        let mut o = healthy_down();
        o.same_process = false;
        assert_eq!(judge_down(&o).outcome, Outcome::Fail);
        let mut o = healthy_down();
        o.writes.retain(|w| w.status == 201);
        assert_eq!(judge_down(&o).outcome, Outcome::Fail);
    }

    fn healthy_latency() -> LatencyObservation {
        LatencyObservation {
            fault: "+0.50 s per round trip".into(),
            refusals_allowed: true,
            requests: vec![
                (201, Duration::from_millis(9600)),
                (503, Duration::from_millis(3010)),
                (201, Duration::from_millis(12100)),
            ],
            health_probes: vec![
                (200, Duration::from_millis(600)),
                (503, Duration::from_millis(1004)),
            ],
            in_use_before: Some(4.0),
            in_use_after: Some(2.0),
            drained_after: Some(Duration::from_millis(300)),
            health_after: 200,
            write_after: 201,
        }
    }

    #[test]
    fn slow_but_answered_requests_and_a_drained_pool_pass() {
        assert_eq!(judge_latency(&healthy_latency()).outcome, Outcome::Pass);
    }

    #[test]
    fn a_stuck_request_a_500_a_late_health_probe_or_a_stuck_pool_fail() {
        let mut o = healthy_latency();
        o.requests[0].0 = 0;
        assert_eq!(judge_latency(&o).outcome, Outcome::Fail);
        let mut o = healthy_latency();
        o.requests[1].0 = 500;
        assert_eq!(judge_latency(&o).outcome, Outcome::Fail);
        let mut o = healthy_latency();
        o.health_probes[0].1 = Duration::from_secs(3);
        assert_eq!(judge_latency(&o).outcome, Outcome::Fail);
        let mut o = healthy_latency();
        o.drained_after = None;
        o.in_use_after = Some(10.0);
        assert_eq!(judge_latency(&o).outcome, Outcome::Fail);
    }

    #[test]
    fn on_sqlite_a_write_the_lock_only_delays_must_not_be_refused() {
        let mut o = healthy_latency();
        o.refusals_allowed = false;
        let verdict = judge_latency(&o);
        assert_eq!(verdict.outcome, Outcome::Fail);
        assert!(
            verdict.failures[0].contains("1 requests were refused"),
            "{:?}",
            verdict.failures
        );
        o.requests.retain(|(s, _)| *s != 503);
        assert_eq!(judge_latency(&o).outcome, Outcome::Pass);
    }
}
