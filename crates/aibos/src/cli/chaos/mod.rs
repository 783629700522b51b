//! `aibos chaos run`: failure scenarios against a kernel the harness starts
//! itself, as a child process (`aibos serve`) on throwaway data, so that it
//! can cut its database, slow it down, `kill -9` it, send it SIGHUP with a
//! broken configuration, stop its upstream cell and its Redis. Each scenario
//! measures what the kernel does and judges the observations with a pure
//! function (`judge`, one per scenario, unit-tested with broken
//! observations); it prints a verdict line with the figures, and the run
//! exits 1 if any scenario fails.
//!
//! A scenario that cannot apply says so (`SKIP` with the reason: no
//! `redis-server` on the machine); it never passes without having measured.

mod crash;
mod database;
pub(super) mod kernel;
mod proxy;
mod redis;
mod reload;
pub(super) mod upstream;

use std::time::Duration;

use aibos_kernel::config::ConfigSources;
use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use super::{EXIT_FAILURE, EXIT_OK};

#[derive(Debug, Subcommand)]
pub enum ChaosCommand {
    /// Run failure scenarios against a kernel started on throwaway data.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The scenarios to run (repeatable); all of them by default.
    #[arg(long = "scenario", value_enum, value_name = "NAME")]
    scenarios: Vec<Scenario>,
    /// The engine of the kernel under test.
    #[arg(long, value_enum, default_value_t = ChaosEngine::Sqlite)]
    engine: ChaosEngine,
    /// A PostgreSQL server on which the harness creates (and then drops) one
    /// throwaway database per scenario; required with `--engine postgres`.
    #[arg(long, env = "AIBOS_CHAOS_POSTGRES_URL", hide_env_values = true)]
    postgres_url: Option<String>,
    /// Print one JSON object per scenario and a final `{ok, scenarios}` line.
    #[arg(long)]
    json: bool,
    /// For the harness's own tests only: misconfigure the kernel (or, for
    /// component.crash, the harness's bookkeeping) so that this scenario's
    /// behaviour is broken and its verdict must be FAIL.
    #[arg(long = "break", value_enum, hide = true)]
    sabotage: Vec<Scenario>,
}

/// The failure scenarios, in the order a full run takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    #[value(name = "db.down")]
    DbDown,
    #[value(name = "db.latency.500ms")]
    DbLatency,
    #[value(name = "component.crash")]
    ComponentCrash,
    #[value(name = "config.invalid")]
    ConfigInvalid,
    #[value(name = "upstream.down")]
    UpstreamDown,
    #[value(name = "redis.down")]
    RedisDown,
}

impl Scenario {
    const ALL: [Scenario; 6] = [
        Scenario::DbDown,
        Scenario::DbLatency,
        Scenario::ComponentCrash,
        Scenario::ConfigInvalid,
        Scenario::UpstreamDown,
        Scenario::RedisDown,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::DbDown => "db.down",
            Scenario::DbLatency => "db.latency.500ms",
            Scenario::ComponentCrash => "component.crash",
            Scenario::ConfigInvalid => "config.invalid",
            Scenario::UpstreamDown => "upstream.down",
            Scenario::RedisDown => "redis.down",
        }
    }
}

/// Which engine the kernel under test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ChaosEngine {
    Sqlite,
    Postgres,
}

impl ChaosEngine {
    fn name(self) -> &'static str {
        match self {
            ChaosEngine::Sqlite => "sqlite",
            ChaosEngine::Postgres => "postgres",
        }
    }
}

/// PASS, FAIL or SKIP (not applicable here, with the reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

/// One scenario's verdict: the outcome, a one-line summary of the measured
/// figures, the figures themselves, and every failed expectation.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub outcome: Outcome,
    pub summary: String,
    pub figures: Value,
    pub failures: Vec<String>,
}

impl Verdict {
    /// PASS when `failures` is empty, FAIL otherwise.
    pub fn judged(summary: String, figures: Value, failures: Vec<String>) -> Verdict {
        Verdict {
            outcome: if failures.is_empty() {
                Outcome::Pass
            } else {
                Outcome::Fail
            },
            summary,
            figures,
            failures,
        }
    }

    pub fn skipped(reason: impl Into<String>) -> Verdict {
        Verdict {
            outcome: Outcome::Skip,
            summary: reason.into(),
            figures: json!({}),
            failures: Vec::new(),
        }
    }

    fn failed_to_run(error: &anyhow::Error) -> Verdict {
        Verdict {
            outcome: Outcome::Fail,
            summary: "the scenario could not run".into(),
            figures: json!({}),
            failures: vec![format!("{error:#}")],
        }
    }
}

/// What a scenario gets: the engine, where to make throwaway databases, and
/// whether its behaviour is to be broken on purpose.
pub struct Context {
    pub engine: ChaosEngine,
    pub postgres_url: Option<String>,
    pub sabotage: bool,
}

pub async fn chaos(_sources: ConfigSources, command: ChaosCommand) -> u8 {
    let ChaosCommand::Run(args) = command;
    if args.engine == ChaosEngine::Postgres && args.postgres_url.is_none() {
        eprintln!(
            "error: --engine postgres needs --postgres-url (or AIBOS_CHAOS_POSTGRES_URL), a server on which the harness creates throwaway databases"
        );
        return EXIT_FAILURE;
    }
    let scenarios: Vec<Scenario> = if args.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        Scenario::ALL
            .into_iter()
            .filter(|s| args.scenarios.contains(s))
            .collect()
    };
    let mut results = Vec::new();
    let mut ok = true;
    for scenario in scenarios {
        let context = Context {
            engine: args.engine,
            postgres_url: args.postgres_url.clone(),
            sabotage: args.sabotage.contains(&scenario),
        };
        let verdict = match run_scenario(scenario, &context).await {
            Ok(v) => v,
            Err(e) => Verdict::failed_to_run(&e),
        };
        ok &= verdict.outcome != Outcome::Fail;
        let line = verdict_json(scenario, args.engine, &verdict);
        if args.json {
            println!("{line}");
        } else {
            print_verdict(scenario, args.engine, &verdict);
        }
        results.push(line);
    }
    if args.json {
        println!("{}", json!({ "ok": ok, "scenarios": results }));
    } else {
        println!(
            "chaos: {}",
            if ok {
                "every scenario passed or was skipped"
            } else {
                "FAILED"
            }
        );
    }
    if ok { EXIT_OK } else { EXIT_FAILURE }
}

async fn run_scenario(scenario: Scenario, context: &Context) -> anyhow::Result<Verdict> {
    match scenario {
        Scenario::DbDown => database::down(context).await,
        Scenario::DbLatency => database::latency(context).await,
        Scenario::ComponentCrash => crash::run(context).await,
        Scenario::ConfigInvalid => reload::run(context).await,
        Scenario::UpstreamDown => upstream::run(context).await,
        Scenario::RedisDown => redis::run(context).await,
    }
}

fn verdict_json(scenario: Scenario, engine: ChaosEngine, verdict: &Verdict) -> Value {
    json!({
        "scenario": scenario.name(),
        "engine": engine.name(),
        "verdict": match verdict.outcome {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Skip => "skip",
        },
        "summary": verdict.summary,
        "figures": verdict.figures,
        "failures": verdict.failures,
    })
}

fn print_verdict(scenario: Scenario, engine: ChaosEngine, verdict: &Verdict) {
    let word = match verdict.outcome {
        Outcome::Pass => "PASS",
        Outcome::Fail => "FAIL",
        Outcome::Skip => "SKIP",
    };
    println!(
        "{word} {} ({}): {}",
        scenario.name(),
        engine.name(),
        verdict.summary
    );
    for failure in &verdict.failures {
        println!("  - {failure}");
    }
}

/// Seconds with two decimals, for verdict lines.
pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Milliseconds rounded, for figures.
pub fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The HTTP client of the harness: no proxy from the environment (the
/// kernel is on loopback), and a patience of `timeout` per request.
pub fn http_client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .context("cannot build the harness's HTTP client")
}

/// A metric's value in Prometheus text: the first sample whose line starts
/// with `name` followed by `labels` (e.g. `{canon="x"}`, or empty).
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{labels} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

/// A free loopback port: bound, read and released (a port is picked again
/// if the kernel cannot bind it).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// `bail!` unless `url` is a PostgreSQL URL.
fn require_postgres_url(url: &str) -> anyhow::Result<()> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        bail!("--postgres-url must be a postgres:// URL");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_read_by_name_and_labels() {
        let text = "# HELP x\naibos_gateway_circuit_state{canon=\"c\"} 2\naibos_build_info 1\n";
        assert_eq!(
            metric(text, "aibos_gateway_circuit_state", "{canon=\"c\"}"),
            Some(2.0)
        );
        assert_eq!(metric(text, "aibos_build_info", ""), Some(1.0));
        assert_eq!(metric(text, "aibos_gateway_circuit_state", ""), None);
    }

    #[test]
    fn a_verdict_passes_only_without_failures() {
        assert_eq!(
            Verdict::judged("x".into(), json!({}), vec![]).outcome,
            Outcome::Pass
        );
        assert_eq!(
            Verdict::judged("x".into(), json!({}), vec!["no".into()]).outcome,
            Outcome::Fail
        );
    }
}
