//! `aibos drill incident`: a cell outage rehearsed from start to end, so that
//! a team sees what its on-call would see. On throwaway data the drill starts
//! a kernel (`aibos serve`, as the chaos harness does) and two cells it runs
//! itself, registers them as canons, and puts load on both through the
//! gateway. Then it stops one cell for `--outage-seconds` and brings it back
//! on the same address, while a monitor samples `/metrics` and `/api/health`.
//!
//! From what the clients got, what the monitor saw and what the audit trail
//! recorded it writes a timeline (T from the fault) and judges the kernel:
//! the outage is detected within a health interval, calls to the failed cell
//! fail fast with 503 `UPSTREAM_UNAVAILABLE` (never 500, never a hang), the
//! other cell and the kernel itself are untouched, the gateway recovers by
//! itself soon after the repair, both health changes are audited and the
//! audit chain verifies. The report is Markdown, for the incident review;
//! `--json` prints the same as one object. Exit 1 if any check fails.
//!
//! The judge (`analyse`) is a pure function of the observations, unit-tested
//! with broken ones below; the integration test breaks the kernel on purpose
//! (the hidden `--break`) and sees the verdict fail.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::cli::chaos::kernel::{Kernel, World, admin_token, password};
use crate::cli::chaos::upstream::{Cell, register};
use crate::cli::chaos::{ChaosEngine, Context, http_client, metric, ms};
use crate::cli::{EXIT_FAILURE, EXIT_OK};

/// The canon whose cell the drill stops.
const FAILING: &str = "incidentcell";
/// A second canon, called throughout: the outage must not reach it.
const BYSTANDER: &str = "bystandercell";
/// Seconds between the kernel's health checks of its cells in the drill.
const HEALTH_INTERVAL_SECONDS: u64 = 1;
/// Seconds an open circuit refuses calls before a trial call.
const BREAKER_OPEN_SECONDS: u64 = 1;
/// Load before the fault, and after the recovery.
const STEADY: Duration = Duration::from_secs(2);
/// One client's pause between calls: enough load to see every phase, and no
/// flood when an open circuit answers in a millisecond.
const CALL_PACING: Duration = Duration::from_millis(20);
/// How often the monitor reads `/metrics` and `/api/health`.
const MONITOR_INTERVAL: Duration = Duration::from_millis(100);
/// A client's patience for one call; an unanswered call counts as a failure.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Detection must come within a health interval and this.
const DETECTION_SLACK: Duration = Duration::from_secs(2);
/// Recovery must come within a health interval, the breaker's open time and
/// this, after the repair.
const RECOVERY_SLACK: Duration = Duration::from_secs(2);
/// How long the drill waits for a recovery at most.
const RECOVERY_WAIT: Duration = Duration::from_secs(20);
/// Failed calls must fail fast: their 95th percentile latency under this.
const FAIL_FAST_P95: Duration = Duration::from_secs(1);
/// Calls one client records at most (the drill lasts seconds; a bound all
/// the same).
const SAMPLES_MAX: usize = 200_000;

#[derive(Debug, Args)]
pub struct IncidentArgs {
    /// The engine of the kernel under drill.
    #[arg(long, value_enum, default_value_t = ChaosEngine::Sqlite)]
    engine: ChaosEngine,
    /// A PostgreSQL server on which the drill creates (and then drops) its
    /// throwaway database; required with `--engine postgres`.
    #[arg(long, env = "AIBOS_DRILL_POSTGRES_URL", hide_env_values = true)]
    postgres_url: Option<String>,
    /// How long the cell stays down.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(2..=600))]
    outage_seconds: u64,
    /// Clients calling the failing cell through the gateway (one more calls
    /// the other cell).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    clients: u64,
    /// Where to write the Markdown report; by default
    /// `incident-drill-<UTC time>.md` in the current folder.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Print one JSON object with the verdict, the checks and the timeline.
    #[arg(long)]
    json: bool,
    /// For the drill's own tests only: a kernel that does not recover by
    /// itself (health checks a minute apart, an open circuit that waits an
    /// hour), so that the verdict must be FAIL.
    #[arg(long = "break", hide = true)]
    sabotage: bool,
}

pub async fn run(args: IncidentArgs) -> u8 {
    if args.engine == ChaosEngine::Postgres && args.postgres_url.is_none() {
        eprintln!(
            "error: --engine postgres needs --postgres-url (or AIBOS_DRILL_POSTGRES_URL), a server on which the drill creates a throwaway database"
        );
        return EXIT_FAILURE;
    }
    let started = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let path = args
        .report
        .clone()
        .unwrap_or_else(|| default_report_path(started));
    let result = drill(&args).await.and_then(|observation| {
        let analysis = analyse(&observation);
        std::fs::write(&path, markdown(&observation, &analysis, started))
            .with_context(|| format!("cannot write the report {}", path.display()))?;
        Ok(analysis)
    });
    match result {
        Ok(analysis) => {
            if args.json {
                println!("{}", analysis.json(&path));
            } else {
                print_summary(&analysis, &path);
            }
            if analysis.passed() {
                EXIT_OK
            } else {
                EXIT_FAILURE
            }
        }
        Err(e) => {
            if args.json {
                println!("{}", json!({ "ok": false, "error": format!("{e:#}") }));
            } else {
                eprintln!("error: the drill could not run: {e:#}");
            }
            EXIT_FAILURE
        }
    }
}

fn default_report_path(started: OffsetDateTime) -> PathBuf {
    let stamp = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        started.year(),
        u8::from(started.month()),
        started.day(),
        started.hour(),
        started.minute(),
        started.second()
    );
    PathBuf::from(format!("incident-drill-{stamp}.md"))
}

fn print_summary(analysis: &Analysis, path: &std::path::Path) {
    println!(
        "incident drill: {} ({} of {} checks passed)",
        if analysis.passed() {
            "PASSED"
        } else {
            "FAILED"
        },
        analysis.checks.iter().filter(|c| c.ok).count(),
        analysis.checks.len()
    );
    for (at, what, _) in &analysis.timeline {
        println!("  {:>9}  {what}", signed_seconds(*at));
    }
    for check in analysis.checks.iter().filter(|c| !c.ok) {
        println!("  FAILED {}: {}", check.name, check.detail);
    }
    println!("report: {}", path.display());
}

/// One call through the gateway, as its client saw it.
#[derive(Debug, Clone)]
struct Call {
    /// When it was sent, from the start of the load.
    at: Duration,
    /// 0 when no answer came (connection error or the client's timeout).
    status: u16,
    /// The problem's `code` when the answer was an error.
    code: Option<String>,
    latency: Duration,
}

/// One sample of the monitor.
#[derive(Debug, Clone)]
struct Probe {
    at: Duration,
    /// `aibos_gateway_circuit_state` of the failing canon (2 = open).
    circuit_state: Option<f64>,
    /// `aibos_gateway_canon_healthy` of the failing canon.
    canon_healthy: Option<f64>,
    /// `/api/health`'s status (0 when it did not answer).
    kernel_health: u16,
}

/// A `canon.health_changed` entry of the failing canon.
#[derive(Debug, Clone)]
struct AuditChange {
    /// When it occurred, from the start of the load (`None` if before).
    at: Option<Duration>,
    seq: i64,
    from: String,
    to: String,
}

/// Everything the drill saw; times are from the start of the load.
#[derive(Debug, Clone)]
struct Observation {
    engine: &'static str,
    clients: u64,
    outage: Duration,
    calls: Vec<Call>,
    bystander: Vec<Call>,
    probes: Vec<Probe>,
    /// The cell had stopped (its listener closed) at this point.
    fault_at: Duration,
    /// The cell listened again at this point.
    repair_at: Duration,
    end_at: Duration,
    audit_changes: Vec<AuditChange>,
    audit_verify_exit: i32,
    same_process: bool,
}

#[derive(Debug, Clone)]
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

/// The verdict: the checks, the timeline (ms from the fault, what
/// happened, the evidence) and the figures.
#[derive(Debug, Clone)]
struct Analysis {
    checks: Vec<Check>,
    timeline: Vec<(i64, String, String)>,
    detected_after: Option<Duration>,
    recovered_after: Option<Duration>,
    phases: Vec<Phase>,
    figures: Value,
}

impl Analysis {
    fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    fn json(&self, path: &std::path::Path) -> Value {
        json!({
            "ok": self.passed(),
            "report": path.display().to_string(),
            "detected_ms": self.detected_after.map(ms),
            "recovered_ms": self.recovered_after.map(ms),
            "checks": self.checks.iter().map(|c| json!({ "name": c.name, "ok": c.ok, "detail": c.detail })).collect::<Vec<_>>(),
            "timeline": self.timeline.iter().map(|(at, what, evidence)| json!({ "at_ms": at, "event": what, "evidence": evidence })).collect::<Vec<_>>(),
            "phases": self.phases.iter().map(Phase::json).collect::<Vec<_>>(),
            "figures": self.figures,
        })
    }
}

/// The calls to the failing canon sent within one phase.
#[derive(Debug, Clone)]
struct Phase {
    name: &'static str,
    from: Duration,
    to: Duration,
    calls: usize,
    /// (status, code, count), most frequent first.
    answers: Vec<(u16, Option<String>, usize)>,
    p50: Duration,
    p95: Duration,
}

impl Phase {
    /// The calls sent from `from` that were answered before `to`: a call
    /// that straddles a boundary (sent before the fault, answered after it)
    /// belongs to neither side.
    fn of(name: &'static str, calls: &[Call], from: Duration, to: Duration) -> Phase {
        let inside: Vec<&Call> = calls
            .iter()
            .filter(|c| c.at >= from && c.at + c.latency < to)
            .collect();
        let mut answers: Vec<(u16, Option<String>, usize)> = Vec::new();
        for call in &inside {
            match answers
                .iter_mut()
                .find(|(s, c, _)| *s == call.status && *c == call.code)
            {
                Some(entry) => entry.2 += 1,
                None => answers.push((call.status, call.code.clone(), 1)),
            }
        }
        answers.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
        let mut latencies: Vec<Duration> = inside.iter().map(|c| c.latency).collect();
        latencies.sort_unstable();
        Phase {
            name,
            from,
            to,
            calls: inside.len(),
            answers,
            p50: percentile(&latencies, 50),
            p95: percentile(&latencies, 95),
        }
    }

    fn answers_text(&self) -> String {
        if self.answers.is_empty() {
            return "none".to_owned();
        }
        self.answers
            .iter()
            .map(|(status, code, n)| match (status, code) {
                (0, _) => format!("{n} × no answer"),
                (s, Some(c)) => format!("{n} × {s} {c}"),
                (s, None) => format!("{n} × {s}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn json(&self) -> Value {
        json!({
            "phase": self.name,
            "from_ms": ms(self.from),
            "to_ms": ms(self.to),
            "calls": self.calls,
            "answers": self.answers.iter().map(|(s, c, n)| json!({ "status": s, "code": c, "count": n })).collect::<Vec<_>>(),
            "p50_ms": self.p50.as_secs_f64() * 1000.0,
            "p95_ms": self.p95.as_secs_f64() * 1000.0,
        })
    }
}

/// The `p`th percentile of sorted latencies (nearest rank); zero if none.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (sorted.len() * p).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Milliseconds from the fault (negative before it).
fn from_fault(at: Duration, fault_at: Duration) -> i64 {
    let (at, fault) = (ms(at) as i64, ms(fault_at) as i64);
    at - fault
}

fn signed_seconds(ms_from_fault: i64) -> String {
    let sign = if ms_from_fault < 0 { "-" } else { "+" };
    format!(
        "T{sign}{:.2} s",
        ms_from_fault.unsigned_abs() as f64 / 1000.0
    )
}

fn analyse(o: &Observation) -> Analysis {
    let mut checks = Vec::new();
    let mut timeline: Vec<(i64, String, String)> = Vec::new();
    let t = |at: Duration| from_fault(at, o.fault_at);

    timeline.push((
        t(Duration::ZERO),
        format!(
            "Load starts: {} clients call `{FAILING}` through the gateway, one calls `{BYSTANDER}`",
            o.clients
        ),
        format!("a call every {} ms per client", CALL_PACING.as_millis()),
    ));
    timeline.push((
        0,
        format!("Fault: the cell behind `{FAILING}` stops (its listener closes)"),
        format!("injected by the drill, for {:.0} s", o.outage.as_secs_f64()),
    ));
    timeline.push((
        t(o.repair_at),
        "Repair: the cell listens again on the same address".to_owned(),
        "by the drill".to_owned(),
    ));

    // Before the fault: the baseline must be healthy, or the drill proves nothing.
    let before = Phase::of("before the fault", &o.calls, Duration::ZERO, o.fault_at);
    let baseline_ok = before.calls > 0 && before.answers.iter().all(|(s, _, _)| *s == 200);
    checks.push(Check {
        name: "baseline",
        ok: baseline_ok,
        detail: format!(
            "before the fault {} calls: {}",
            before.calls,
            before.answers_text()
        ),
    });

    // Detection: the kernel's own view of the cell changes.
    let after_fault = |p: &&Probe| p.at >= o.fault_at && p.at < o.repair_at;
    let unhealthy = o
        .probes
        .iter()
        .filter(after_fault)
        .find(|p| p.canon_healthy == Some(0.0));
    let opened = o
        .probes
        .iter()
        .filter(after_fault)
        .find(|p| p.circuit_state == Some(2.0));
    if let Some(p) = unhealthy {
        timeline.push((
            t(p.at),
            format!("Detected: a health check marks `{FAILING}` unhealthy"),
            format!("/metrics: aibos_gateway_canon_healthy{{canon=\"{FAILING}\"}} 0"),
        ));
    }
    if let Some(p) = opened {
        timeline.push((
            t(p.at),
            format!(
                "Mitigated: the circuit to `{FAILING}` opens; calls are refused without reaching it"
            ),
            format!("/metrics: aibos_gateway_circuit_state{{canon=\"{FAILING}\"}} 2"),
        ));
    }
    let detected_at = [unhealthy.map(|p| p.at), opened.map(|p| p.at)]
        .into_iter()
        .flatten()
        .min();
    let detected_after = detected_at.map(|at| at.saturating_sub(o.fault_at));
    let detection_bound = Duration::from_secs(HEALTH_INTERVAL_SECONDS) + DETECTION_SLACK;
    checks.push(Check {
        name: "detected",
        ok: detected_after.is_some_and(|d| d <= detection_bound),
        detail: match detected_after {
            Some(d) => format!(
                "the kernel saw the outage {} after the fault (bound {})",
                crate::cli::chaos::secs(d),
                crate::cli::chaos::secs(detection_bound)
            ),
            None => format!(
                "in {:.0} s of outage the kernel neither marked `{FAILING}` unhealthy nor opened its circuit",
                o.outage.as_secs_f64()
            ),
        },
    });

    // Degradation: every call to the failed cell fails fast and cleanly.
    let outage = Phase::of("outage", &o.calls, o.fault_at, o.repair_at);
    if let Some(first) = o
        .calls
        .iter()
        .filter(|c| c.at >= o.fault_at && c.status != 200)
        .min_by_key(|c| c.at)
    {
        timeline.push((
            t(first.at),
            "First failed call".to_owned(),
            format!(
                "{} {} in {} ms",
                first.status,
                first.code.as_deref().unwrap_or("(no problem code)"),
                ms(first.latency)
            ),
        ));
    }
    let unclean: usize = outage
        .answers
        .iter()
        .filter(|(s, c, _)| !(*s == 503 && c.as_deref() == Some("UPSTREAM_UNAVAILABLE")))
        .map(|(_, _, n)| n)
        .sum();
    checks.push(Check {
        name: "failed cleanly",
        ok: outage.calls > 0 && unclean == 0,
        detail: format!(
            "during the outage {} calls: {} ({unclean} not 503 UPSTREAM_UNAVAILABLE)",
            outage.calls,
            outage.answers_text()
        ),
    });
    checks.push(Check {
        name: "failed fast",
        ok: outage.calls > 0 && outage.p95 <= FAIL_FAST_P95,
        detail: format!(
            "failed calls answered in {:.1} ms at the median, {:.1} ms at p95 (bound {} ms)",
            outage.p50.as_secs_f64() * 1000.0,
            outage.p95.as_secs_f64() * 1000.0,
            FAIL_FAST_P95.as_millis()
        ),
    });
    let five_hundreds = o
        .calls
        .iter()
        .chain(&o.bystander)
        .filter(|c| c.status == 500)
        .count();
    checks.push(Check {
        name: "no 500",
        ok: five_hundreds == 0,
        detail: format!("{five_hundreds} answers were 500 over the whole drill"),
    });

    // Blast radius: the other cell and the kernel itself.
    let bystander_calls = o.bystander.len();
    let bystander_outage = o
        .bystander
        .iter()
        .filter(|c| c.at >= o.fault_at && c.at < o.repair_at)
        .count();
    let bystander_failed = o.bystander.iter().filter(|c| c.status != 200).count();
    checks.push(Check {
        name: "contained",
        ok: bystander_outage > 0 && bystander_failed == 0,
        detail: format!(
            "`{BYSTANDER}`: {bystander_calls} calls ({bystander_outage} during the outage), {bystander_failed} not 200"
        ),
    });
    let unhealthy_kernel = o.probes.iter().filter(|p| p.kernel_health != 200).count();
    checks.push(Check {
        name: "kernel healthy",
        ok: !o.probes.is_empty() && unhealthy_kernel == 0 && o.same_process,
        detail: format!(
            "/api/health answered 200 to {} of {} probes; the kernel process {}",
            o.probes.len() - unhealthy_kernel,
            o.probes.len(),
            if o.same_process {
                "ran throughout"
            } else {
                "exited"
            }
        ),
    });

    // Recovery: the first success after the repair, then stability.
    let recovered = o
        .calls
        .iter()
        .filter(|c| c.at >= o.repair_at && c.status == 200)
        .min_by_key(|c| c.at);
    let recovered_after = recovered.map(|c| (c.at + c.latency).saturating_sub(o.repair_at));
    if let Some(c) = recovered {
        timeline.push((
            t(c.at + c.latency),
            format!("Recovered: calls to `{FAILING}` succeed again"),
            format!("first 200 after the repair, in {} ms", ms(c.latency)),
        ));
    }
    let recovery_bound =
        Duration::from_secs(HEALTH_INTERVAL_SECONDS + BREAKER_OPEN_SECONDS) + RECOVERY_SLACK;
    checks.push(Check {
        name: "recovered",
        ok: recovered_after.is_some_and(|d| d <= recovery_bound),
        detail: match recovered_after {
            Some(d) => format!(
                "200 again {} after the repair, without a restart (bound {})",
                crate::cli::chaos::secs(d),
                crate::cli::chaos::secs(recovery_bound)
            ),
            None => format!(
                "no call succeeded within {} of the repair",
                crate::cli::chaos::secs(RECOVERY_WAIT)
            ),
        },
    });
    // The recovery's first answered success opens the last phase (calls
    // sent while it was in flight may still meet a half-open circuit's
    // refusal); the phase lasts as long as the calls in flight when the load
    // stopped.
    let recovered_from = recovered.map_or(o.end_at, |c| c.at + c.latency);
    let recovering = Phase::of("recovering", &o.calls, o.repair_at, recovered_from);
    let mut after = Phase::of(
        "after the recovery",
        &o.calls,
        recovered_from,
        Duration::MAX,
    );
    after.to = o.end_at;
    let after_failed: usize = after
        .answers
        .iter()
        .filter(|(s, _, _)| *s != 200)
        .map(|(_, _, n)| n)
        .sum();
    let last = o.probes.last();
    let closed = last.is_some_and(|p| p.circuit_state != Some(2.0) && p.canon_healthy == Some(1.0));
    if let Some(p) = o
        .probes
        .iter()
        .filter(|p| p.at >= o.repair_at && p.canon_healthy == Some(1.0))
        .find(|p| p.circuit_state != Some(2.0))
        .filter(|_| unhealthy.is_some() || opened.is_some())
    {
        timeline.push((
            t(p.at),
            format!("The kernel sees `{FAILING}` healthy, its circuit closed"),
            format!(
                "/metrics: aibos_gateway_canon_healthy 1, aibos_gateway_circuit_state {}",
                p.circuit_state.unwrap_or(0.0)
            ),
        ));
    }
    checks.push(Check {
        name: "stable after recovery",
        ok: after.calls > 0 && after_failed == 0 && closed,
        detail: format!(
            "after the recovery {} calls: {}; at the end the canon is {} and its circuit {}",
            after.calls,
            after.answers_text(),
            match last.and_then(|p| p.canon_healthy) {
                Some(1.0) => "healthy",
                Some(_) => "unhealthy",
                None => "unknown",
            },
            match last.and_then(|p| p.circuit_state) {
                Some(2.0) => "open",
                Some(1.0) => "half-open",
                Some(_) => "closed",
                None => "unknown",
            }
        ),
    });

    // The record: both changes audited, the chain intact.
    for change in &o.audit_changes {
        if let Some(at) = change.at {
            timeline.push((
                t(at),
                format!(
                    "Audited: canon.health_changed {} → {}",
                    change.from, change.to
                ),
                format!("audit entry seq {}", change.seq),
            ));
        }
    }
    let went_down = o
        .audit_changes
        .iter()
        .find(|c| c.to == "unhealthy" && c.at.is_some_and(|at| at >= o.fault_at));
    let came_back = o.audit_changes.iter().find(|c| {
        c.to == "healthy"
            && c.at.is_some_and(|at| at >= o.repair_at)
            && went_down.is_some_and(|d| c.seq > d.seq)
    });
    checks.push(Check {
        name: "audited",
        ok: went_down.is_some() && came_back.is_some() && o.audit_verify_exit == 0,
        detail: format!(
            "canon.health_changed to unhealthy: {}; back to healthy: {}; `aibos audit verify` exit {}",
            went_down.map_or_else(|| "missing".to_owned(), |c| format!("seq {}", c.seq)),
            came_back.map_or_else(|| "missing".to_owned(), |c| format!("seq {}", c.seq)),
            o.audit_verify_exit
        ),
    });
    timeline.push((
        t(o.end_at),
        "Load ends".to_owned(),
        format!(
            "{} calls to `{FAILING}`, {bystander_calls} to `{BYSTANDER}`",
            o.calls.len()
        ),
    ));
    timeline.sort_by_key(|(at, _, _)| *at);

    let failed_calls = o.calls.iter().filter(|c| c.status != 200).count();
    let figures = json!({
        "engine": o.engine,
        "clients": o.clients,
        "outage_ms": ms(o.outage),
        "calls": o.calls.len(),
        "failed_calls": failed_calls,
        "bystander_calls": bystander_calls,
        "bystander_failed": bystander_failed,
        "answered_500": five_hundreds,
        "probes": o.probes.len(),
        "kernel_unhealthy_probes": unhealthy_kernel,
        "detection_bound_ms": ms(detection_bound),
        "recovery_bound_ms": ms(recovery_bound),
        "audit_changes": o.audit_changes.len(),
        "audit_verify_exit": o.audit_verify_exit,
    });
    Analysis {
        checks,
        timeline,
        detected_after,
        recovered_after,
        phases: vec![before, outage, recovering, after],
        figures,
    }
}

/// The report, for the incident review.
fn markdown(o: &Observation, a: &Analysis, started: OffsetDateTime) -> String {
    let when = started
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "?".to_owned());
    let passed = a.checks.iter().filter(|c| c.ok).count();
    let mut out = String::new();
    let _ = writeln!(out, "# Incident drill: a cell outage\n");
    let _ = writeln!(
        out,
        "- **Verdict:** {} ({passed} of {} checks passed)",
        if a.passed() { "PASSED" } else { "FAILED" },
        a.checks.len()
    );
    let _ = writeln!(
        out,
        "- **When:** {when}, `aibos` {} on {}, throwaway data",
        env!("CARGO_PKG_VERSION"),
        o.engine
    );
    let _ = writeln!(
        out,
        "- **Scenario:** the cell behind canon `{FAILING}` stops for {:.0} s while {} clients call it through the gateway and one calls canon `{BYSTANDER}`. The kernel checks its cells' health every {HEALTH_INTERVAL_SECONDS} s; an open circuit tries a call again after {BREAKER_OPEN_SECONDS} s.\n",
        o.outage.as_secs_f64(),
        o.clients
    );

    let _ = writeln!(out, "## Summary\n");
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(
        out,
        "| Time to detect | {} |",
        a.detected_after.map_or_else(
            || "not detected".to_owned(),
            |d| format!("{:.2} s", d.as_secs_f64())
        )
    );
    let _ = writeln!(
        out,
        "| Time to recover, from the repair | {} |",
        a.recovered_after.map_or_else(
            || "not recovered".to_owned(),
            |d| format!("{:.2} s", d.as_secs_f64())
        )
    );
    let failed = o.calls.iter().filter(|c| c.status != 200).count();
    let _ = writeln!(
        out,
        "| Calls to `{FAILING}` that failed | {failed} of {} |",
        o.calls.len()
    );
    let _ = writeln!(
        out,
        "| Calls to `{BYSTANDER}` | {}, {} not 200 |",
        o.bystander.len(),
        o.bystander.iter().filter(|c| c.status != 200).count()
    );
    let _ = writeln!(
        out,
        "| Kernel health probes | {} of {} answered 200 |\n",
        o.probes.iter().filter(|p| p.kernel_health == 200).count(),
        o.probes.len()
    );

    let _ = writeln!(out, "## Timeline\n");
    let _ = writeln!(out, "| T (from the fault) | What happened | Evidence |");
    let _ = writeln!(out, "|---:|---|---|");
    for (at, what, evidence) in &a.timeline {
        let _ = writeln!(out, "| {} | {what} | {evidence} |", signed_seconds(*at));
    }
    let _ = writeln!(out);

    let _ = writeln!(out, "## Calls to `{FAILING}`, phase by phase\n");
    let _ = writeln!(out, "| Phase | From | To | Calls | Answers | p50 | p95 |");
    let _ = writeln!(out, "|---|---:|---:|---:|---|---:|---:|");
    for phase in &a.phases {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.1} ms | {:.1} ms |",
            phase.name,
            signed_seconds(from_fault(phase.from, o.fault_at)),
            signed_seconds(from_fault(phase.to, o.fault_at)),
            phase.calls,
            phase.answers_text(),
            phase.p50.as_secs_f64() * 1000.0,
            phase.p95.as_secs_f64() * 1000.0
        );
    }
    let _ = writeln!(out);

    let _ = writeln!(out, "## Checks\n");
    for check in &a.checks {
        let _ = writeln!(
            out,
            "- {} **{}**: {}",
            if check.ok { "PASS" } else { "FAIL" },
            check.name,
            check.detail
        );
    }
    let _ = writeln!(out);

    let _ = writeln!(out, "## For the review\n");
    let _ = writeln!(
        out,
        "- In production the alerts `AibosGatewayFailing` (more than 10 % of a canon's calls failing for 10 minutes) and `AibosCircuitOpen` (open in every 2-minute window for 3 minutes) of `deploy/prometheus/alerts.yml` page for an outage that lasts; this one lasted {:.0} s, so they would not have fired. Their runbook sections are in `docs/ops/incident-response.md`.",
        o.outage.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "- The audit trail holds the kernel's side of the story: `GET /api/kernel/audit?action=canon.health_changed` as a platform administrator."
    );
    let _ = writeln!(
        out,
        "- Reproduce: `aibos drill incident --engine {} --outage-seconds {:.0} --clients {}`.",
        o.engine,
        o.outage.as_secs_f64(),
        o.clients
    );
    out
}

/// Starts the world, runs the outage, stops everything; the observations.
async fn drill(args: &IncidentArgs) -> anyhow::Result<Observation> {
    let context = Context {
        engine: args.engine,
        postgres_url: args.postgres_url.clone(),
        sabotage: args.sabotage,
    };
    let mut world = World::create(&context, "incident").await?;
    // Broken on purpose (`--break`, for the drill's own tests): a kernel
    // that does not recover by itself, with health checks a minute apart
    // and an open circuit that waits an hour before a trial call.
    let (health_interval, breaker_open) = if args.sabotage {
        (60, 3_600)
    } else {
        (HEALTH_INTERVAL_SECONDS, BREAKER_OPEN_SECONDS)
    };
    world.settings.set(
        "gateway",
        "health_interval_seconds",
        health_interval.to_string(),
    );
    world
        .settings
        .set("gateway", "breaker_open_seconds", breaker_open.to_string());
    let result = observe(&world, args).await;
    world.remove().await;
    result
}

async fn observe(world: &World, args: &IncidentArgs) -> anyhow::Result<Observation> {
    let http = http_client(CALL_TIMEOUT)?;
    let mut failing = Cell::start("127.0.0.1:0".parse()?, Arc::default()).await?;
    let failing_addr = failing.addr;
    let mut bystander = Cell::start("127.0.0.1:0".parse()?, Arc::default()).await?;
    let mut kernel = world.start_kernel().await?;
    let result = outage(
        world,
        args,
        &http,
        &kernel,
        &mut failing,
        failing_addr,
        &bystander,
    )
    .await;
    let same_process = kernel.running();
    kernel.stop().await;
    failing.stop().await;
    bystander.stop().await;
    let mut observation = result?;
    observation.same_process = same_process;
    // After the kernel stopped: the CLI reads the same database.
    let (exit, output) = world.cli(&["audit", "verify"]).await?;
    if exit != 0 {
        eprintln!("aibos audit verify: {output}");
    }
    observation.audit_verify_exit = exit;
    Ok(observation)
}

#[allow(clippy::too_many_arguments)]
async fn outage(
    world: &World,
    args: &IncidentArgs,
    http: &reqwest::Client,
    kernel: &Kernel,
    failing: &mut Cell,
    failing_addr: SocketAddr,
    bystander: &Cell,
) -> anyhow::Result<Observation> {
    let token = admin_token(http, kernel, world, &password(), true).await?;
    register(http, kernel, &token, FAILING, failing_addr).await?;
    register(http, kernel, &token, BYSTANDER, bystander.addr).await?;
    let failing_url = kernel.url(&format!("/api/gateway/{FAILING}/ping"));
    let bystander_url = kernel.url(&format!("/api/gateway/{BYSTANDER}/ping"));
    for url in [&failing_url, &bystander_url] {
        wait_for_200(http, url, &token).await?;
    }

    let origin = Instant::now();
    let origin_wall = OffsetDateTime::now_utc();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        clients.push(tokio::spawn(call_until(
            http.clone(),
            failing_url.clone(),
            token.clone(),
            origin,
            stop.clone(),
        )));
    }
    let bystander_client = tokio::spawn(call_until(
        http.clone(),
        bystander_url,
        token.clone(),
        origin,
        stop.clone(),
    ));
    let monitor = tokio::spawn(probe_until(
        http.clone(),
        kernel.base.clone(),
        origin,
        stop.clone(),
    ));

    tokio::time::sleep(STEADY).await;
    let fault_at = origin.elapsed();
    failing.stop().await;
    let outage = Duration::from_secs(args.outage_seconds);
    tokio::time::sleep(outage.saturating_sub(origin.elapsed() - fault_at)).await;
    let repair_at = origin.elapsed();
    *failing = Cell::start(failing_addr, Arc::default()).await?;
    // Until a call succeeds (or the wait ends), then a steady stretch.
    let http_probe = http.clone();
    let deadline = Instant::now() + RECOVERY_WAIT;
    let probe_url = kernel.url(&format!("/api/gateway/{FAILING}/ping"));
    while Instant::now() < deadline {
        let ok = http_probe
            .get(&probe_url)
            .bearer_auth(&token)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(STEADY).await;
    stop.store(true, Ordering::SeqCst);
    let end_at = origin.elapsed();

    let mut calls = Vec::new();
    for client in clients {
        calls.extend(client.await.context("a drill client failed")?);
    }
    calls.sort_by_key(|c| c.at);
    let bystander_calls = bystander_client.await.context("a drill client failed")?;
    let probes = monitor.await.context("the drill's monitor failed")?;
    let audit_changes = health_changes(http, kernel, &token, origin_wall).await?;
    Ok(Observation {
        engine: match args.engine {
            ChaosEngine::Sqlite => "sqlite",
            ChaosEngine::Postgres => "postgres",
        },
        clients: args.clients,
        outage,
        calls,
        bystander: bystander_calls,
        probes,
        fault_at,
        repair_at,
        end_at,
        audit_changes,
        audit_verify_exit: -1,
        same_process: true,
    })
}

/// Waits until the route table and the first health check let a call through.
async fn wait_for_200(http: &reqwest::Client, url: &str, token: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = http.get(url).bearer_auth(token).send().await?.status();
        if status == 200 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} answered {status} instead of 200 before the drill began");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One client: calls `url` until told to stop, recording each call.
async fn call_until(
    http: reqwest::Client,
    url: String,
    token: String,
    origin: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Call> {
    let mut calls = Vec::new();
    while !stop.load(Ordering::SeqCst) && calls.len() < SAMPLES_MAX {
        let at = origin.elapsed();
        let sent = Instant::now();
        let (status, code) = match http.get(&url).bearer_auth(&token).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let code = if status == 200 {
                    None
                } else {
                    response
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|body| body["code"].as_str().map(str::to_owned))
                };
                (status, code)
            }
            Err(_) => (0, None),
        };
        calls.push(Call {
            at,
            status,
            code,
            latency: sent.elapsed(),
        });
        tokio::time::sleep(CALL_PACING).await;
    }
    calls
}

/// The monitor: the failing canon's health and circuit, and the kernel's health.
async fn probe_until(
    http: reqwest::Client,
    base: String,
    origin: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Probe> {
    let labels = format!("{{canon=\"{FAILING}\"}}");
    let mut probes = Vec::new();
    while !stop.load(Ordering::SeqCst) && probes.len() < SAMPLES_MAX {
        let at = origin.elapsed();
        let text = match http.get(format!("{base}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let kernel_health = http
            .get(format!("{base}/api/health"))
            .send()
            .await
            .map_or(0, |r| r.status().as_u16());
        probes.push(Probe {
            at,
            circuit_state: metric(&text, "aibos_gateway_circuit_state", &labels),
            canon_healthy: metric(&text, "aibos_gateway_canon_healthy", &labels),
            kernel_health,
        });
        tokio::time::sleep(MONITOR_INTERVAL).await;
    }
    probes
}

/// The failing canon's `canon.health_changed` audit entries, in order.
async fn health_changes(
    http: &reqwest::Client,
    kernel: &Kernel,
    token: &str,
    origin_wall: OffsetDateTime,
) -> anyhow::Result<Vec<AuditChange>> {
    let response = http
        .get(
            kernel
                .url("/api/kernel/audit?action=canon.health_changed&resource_type=canon&limit=100"),
        )
        .bearer_auth(token)
        .send()
        .await?;
    if response.status() != 200 {
        bail!(
            "the audit trail answered {}: {}",
            response.status(),
            response.text().await?
        );
    }
    let body: Value = response.json().await?;
    let mut changes = Vec::new();
    for item in body["items"].as_array().into_iter().flatten() {
        if item["details"]["canon"] != FAILING {
            continue;
        }
        let occurred = item["occurred_at"]
            .as_str()
            .and_then(|s| {
                OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
            })
            .context("an audit entry without a readable occurred_at")?;
        let at = Duration::try_from(occurred - origin_wall).ok();
        changes.push(AuditChange {
            at,
            seq: item["seq"].as_i64().unwrap_or(-1),
            from: item["details"]["from"].as_str().unwrap_or("?").to_owned(),
            to: item["details"]["to"].as_str().unwrap_or("?").to_owned(),
        });
    }
    changes.sort_by_key(|c| c.seq);
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn call(at: f64, status: u16) -> Call {
        Call {
            at: secs(at),
            status,
            code: (status == 503).then(|| "UPSTREAM_UNAVAILABLE".to_owned()),
            latency: Duration::from_millis(3),
        }
    }

    fn probe(at: f64, healthy: f64, circuit: f64) -> Probe {
        Probe {
            at: secs(at),
            circuit_state: Some(circuit),
            canon_healthy: Some(healthy),
            kernel_health: 200,
        }
    }

    /// A good outage: 2 s of load, the fault at 2 s, the repair at 7 s.
    fn healthy() -> Observation {
        // A call every 50 ms: down from 2.0 s to 8.5 s (1.5 s after the repair).
        let mut calls = Vec::new();
        let mut bystander = Vec::new();
        for i in 0..220 {
            let t = f64::from(i) * 0.05;
            let down = (40..170).contains(&i);
            calls.push(call(t, if down { 503 } else { 200 }));
            bystander.push(call(t, 200));
        }
        // A probe every 100 ms: unhealthy and open from 2.9 s to 8.6 s.
        let probes = (0..110)
            .map(|i| {
                let t = f64::from(i) * 0.1;
                if (29..86).contains(&i) {
                    probe(t, 0.0, 2.0)
                } else {
                    probe(t, 1.0, 0.0)
                }
            })
            .collect();
        Observation {
            engine: "sqlite",
            clients: 4,
            outage: secs(5.0),
            calls,
            bystander,
            probes,
            fault_at: secs(2.0),
            repair_at: secs(7.0),
            end_at: secs(11.0),
            audit_changes: vec![
                AuditChange {
                    at: Some(secs(2.9)),
                    seq: 10,
                    from: "healthy".into(),
                    to: "unhealthy".into(),
                },
                AuditChange {
                    at: Some(secs(8.5)),
                    seq: 12,
                    from: "unhealthy".into(),
                    to: "healthy".into(),
                },
            ],
            audit_verify_exit: 0,
            same_process: true,
        }
    }

    fn failed(o: &Observation) -> Vec<&'static str> {
        analyse(o)
            .checks
            .into_iter()
            .filter(|c| !c.ok)
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn a_detected_contained_and_recovered_outage_passes_with_its_timeline() {
        let o = healthy();
        let a = analyse(&o);
        assert!(a.passed(), "{:#?}", a.checks);
        let detected = ms(a.detected_after.unwrap());
        assert!((850..950).contains(&detected), "{detected}");
        let recovered = ms(a.recovered_after.unwrap());
        assert!((1500..1600).contains(&recovered), "{recovered}");
        let events: Vec<&str> = a.timeline.iter().map(|(_, w, _)| w.as_str()).collect();
        assert!(events[0].starts_with("Load starts"), "{events:?}");
        assert!(events.iter().any(|e| e.starts_with("Detected")));
        assert!(events.iter().any(|e| e.starts_with("Mitigated")));
        assert!(events.iter().any(|e| e.starts_with("Recovered")));
        assert_eq!(events.last(), Some(&"Load ends"));
        assert!(a.timeline.windows(2).all(|w| w[0].0 <= w[1].0), "in order");
        let report = markdown(&o, &a, OffsetDateTime::UNIX_EPOCH);
        assert!(
            report.contains("**Verdict:** PASSED (10 of 10 checks passed)"),
            "{report}"
        );
        assert!(report.contains("| T+0.90 s | Detected"), "{report}");
        assert!(report.contains("| T-2.00 s | Load starts"), "{report}");
    }

    #[test]
    fn each_broken_behaviour_fails_its_own_check() {
        let mut o = healthy();
        o.probes.iter_mut().for_each(|p| {
            p.canon_healthy = Some(1.0);
            p.circuit_state = Some(0.0);
        });
        assert!(failed(&o).contains(&"detected"));

        let mut o = healthy();
        o.calls[60].status = 500;
        o.calls[60].code = Some("INTERNAL".into());
        assert_eq!(failed(&o), ["failed cleanly", "no 500"]);

        let mut o = healthy();
        o.calls
            .iter_mut()
            .filter(|c| c.status == 503)
            .for_each(|c| c.latency = secs(1.5));
        assert_eq!(failed(&o), ["failed fast"]);

        let mut o = healthy();
        o.bystander[70].status = 503;
        assert_eq!(failed(&o), ["contained"]);

        let mut o = healthy();
        o.probes[40].kernel_health = 503;
        assert_eq!(failed(&o), ["kernel healthy"]);

        let mut o = healthy();
        o.calls
            .iter_mut()
            .filter(|c| c.at >= secs(7.0))
            .for_each(|c| c.status = 503);
        assert!(failed(&o).contains(&"recovered"));

        let mut o = healthy();
        o.calls.last_mut().unwrap().status = 503;
        assert_eq!(failed(&o), ["stable after recovery"]);

        let mut o = healthy();
        o.audit_changes.pop();
        assert_eq!(failed(&o), ["audited"]);
        let mut o = healthy();
        o.audit_verify_exit = 1;
        assert_eq!(failed(&o), ["audited"]);

        let mut o = healthy();
        o.calls.retain(|c| c.at >= secs(2.0));
        assert_eq!(failed(&o), ["baseline"]);
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&d, 50), Duration::from_millis(50));
        assert_eq!(percentile(&d, 95), Duration::from_millis(95));
        assert_eq!(percentile(&[], 95), Duration::ZERO);
        assert_eq!(signed_seconds(-2000), "T-2.00 s");
        assert_eq!(signed_seconds(1234), "T+1.23 s");
    }
}
