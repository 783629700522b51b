//! `aibos chaos run`: every scenario passes on a healthy kernel, and fails
//! when its behaviour is broken on purpose (the hidden `--break`, for these
//! tests): the harness can fail. The judges' own checks are unit-tested with
//! broken observations in `src/cli/chaos/`.

use std::process::Output;

use aibos_testkit::Engine;
use serde_json::Value;

use crate::both_engines;

const BINARY: &str = env!("CARGO_BIN_EXE_aibos");

/// Runs one scenario with `--json`, broken on purpose or not; the exit
/// status and the scenario's verdict line (the final summary is checked
/// against it).
fn chaos(engine: Engine, scenario: &str, sabotage: bool) -> (bool, Value) {
    let cwd = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new(BINARY);
    command
        .args(["chaos", "run", "--scenario", scenario, "--json"])
        .current_dir(cwd.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    match engine {
        Engine::Sqlite => {
            command.args(["--engine", "sqlite"]);
        }
        Engine::Postgres => {
            let url = Engine::postgres_admin_url().expect("AIBOS_TEST_DATABASE_URL");
            command
                .args(["--engine", "postgres"])
                .env("AIBOS_CHAOS_POSTGRES_URL", url);
        }
    }
    if sabotage {
        command.args(["--break", scenario]);
    }
    let out: Output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 2, "one verdict and the summary: {stdout}");
    let (verdict, last) = (&lines[0], &lines[1]);
    assert_eq!(verdict["scenario"], scenario);
    assert_eq!(last["scenarios"][0], *verdict);
    assert_eq!(
        last["ok"] == true,
        out.status.success(),
        "the exit status follows the verdicts: {stdout}"
    );
    assert_eq!(
        out.status.success(),
        verdict["verdict"] != "fail",
        "exit 1 exactly when a scenario fails: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), verdict.clone())
}

fn assert_pass(verdict: &Value) {
    assert_eq!(verdict["verdict"], "pass", "{verdict:#}");
    assert_eq!(verdict["failures"], serde_json::json!([]));
}

fn assert_fail(ok: bool, verdict: &Value) {
    assert!(!ok, "a failing scenario exits 1");
    assert_eq!(verdict["verdict"], "fail", "{verdict:#}");
    assert!(
        !verdict["failures"].as_array().unwrap().is_empty(),
        "a FAIL names what failed: {verdict:#}"
    );
}

both_engines! {
    async fn db_down_passes_and_fails_when_writes_wait_for_a_connection(engine: Engine) {
        // On SQLite the harness holds the database file's write lock from
        // another process through the outage.
        let (_, verdict) = chaos(engine, "db.down", false);
        assert_pass(&verdict);
        let f = &verdict["figures"];
        assert!(f["health_503_ms"].as_u64().unwrap() <= 2000, "{f}");
        assert!(f["writes_during_outage"].as_u64().unwrap() > 0, "{f}");
        assert_eq!(f["answered_other_5xx"], 0);
        assert_eq!(f["write_after_recovery"], 201);
        // Broken: database.acquire_timeout_ms (SQLite: busy_timeout_ms) =
        // 30 s, so writes during the outage wait instead of being refused.
        let (ok, verdict) = chaos(engine, "db.down", true);
        assert_fail(ok, &verdict);
        assert!(verdict["figures"]["unanswered"].as_u64().unwrap() > 0, "{verdict:#}");
    }
}

both_engines! {
    async fn db_latency_passes_and_fails_when_requests_queue_on_a_starved_pool(engine: Engine) {
        // On SQLite the harness holds the write lock 500 ms at a time.
        let (_, verdict) = chaos(engine, "db.latency.500ms", false);
        assert_pass(&verdict);
        let f = &verdict["figures"];
        assert!(f["succeeded"].as_u64().unwrap() > 0, "{f}");
        assert_eq!(f["other_statuses"], serde_json::json!([]), "never a 500: {f}");
        assert!(f["health_slowest_ms"].as_u64().unwrap() <= 2000, "{f}");
        let (ok, verdict) = chaos(engine, "db.latency.500ms", true);
        assert_fail(ok, &verdict);
        if engine == Engine::Sqlite {
            // Broken: busy_timeout_ms = 1, so writes the lock only delays
            // are refused.
            assert_eq!(f["refused_503"], 0, "{f}");
            assert!(verdict["figures"]["refused_503"].as_u64().unwrap() > 0, "{verdict:#}");
        } else {
            // Broken: three connections and a minute's acquire timeout.
            assert!(verdict["figures"]["unanswered"].as_u64().unwrap() > 0, "{verdict:#}");
        }
    }
}

both_engines! {
    async fn component_crash_loses_nothing_acknowledged_and_catches_a_loss(engine: Engine) {
        let (_, verdict) = chaos(engine, "component.crash", false);
        assert_pass(&verdict);
        let f = &verdict["figures"];
        assert!(f["acknowledged_events"].as_u64().unwrap() > 0, "{f}");
        assert!(f["acknowledged_roles"].as_u64().unwrap() > 0, "{f}");
        assert_eq!(f["lost_events"], 0);
        assert_eq!(f["audit_verify_exit"], 0);
        // Broken: an id never acknowledged is counted as acknowledged.
        let (ok, verdict) = chaos(engine, "component.crash", true);
        assert_fail(ok, &verdict);
        assert_eq!(verdict["figures"]["lost_events"], 1, "{verdict:#}");
    }
}

both_engines! {
    async fn config_invalid_keeps_the_old_configuration_and_catches_a_change(engine: Engine) {
        let (_, verdict) = chaos(engine, "config.invalid", false);
        assert_pass(&verdict);
        let f = &verdict["figures"];
        assert_eq!(f["user_limit_before"], "543210");
        assert_eq!(f["user_limit_after"], "543210");
        assert_eq!(f["reload_failed_audited"], true);
        // Broken: the file sent with SIGHUP is valid, so the kernel takes
        // its lower limit and audits no failure.
        let (ok, verdict) = chaos(engine, "config.invalid", true);
        assert_fail(ok, &verdict);
        assert_eq!(verdict["figures"]["user_limit_after"], "111", "{verdict:#}");
    }
}

both_engines! {
    async fn upstream_down_opens_the_breaker_and_catches_one_that_does_not(engine: Engine) {
        let (_, verdict) = chaos(engine, "upstream.down", false);
        assert_pass(&verdict);
        let f = &verdict["figures"];
        assert_eq!(f["statuses_down"], serde_json::json!([503]));
        assert_eq!(f["circuit_state"], 2.0);
        assert_eq!(f["open_call_reached_cell"], false);
        assert!(f["recovered_ms"].as_u64().unwrap() <= f["recovery_bound_ms"].as_u64().unwrap());
        // Broken: a breaker that needs 1 000 failures in a row.
        let (ok, verdict) = chaos(engine, "upstream.down", true);
        assert_fail(ok, &verdict);
        assert_eq!(verdict["figures"]["circuit_state"], 0.0, "{verdict:#}");
    }
}

both_engines! {
    async fn redis_down_degrades_as_documented_and_catches_a_kernel_without_redis(engine: Engine) {
        let (ok, verdict) = chaos(engine, "redis.down", false);
        if verdict["verdict"] == "skip" {
            assert!(ok);
            assert!(
                std::env::var("AIBOS_REQUIRE_REDIS").as_deref() != Ok("1"),
                "AIBOS_REQUIRE_REDIS=1 but redis.down was skipped: {verdict:#}"
            );
            eprintln!("skipped: {}", verdict["summary"]);
            return;
        }
        assert_pass(&verdict);
        let f = &verdict["figures"];
        assert_eq!(f["served_down"], f["requests_down"]);
        assert_eq!(f["user_limit_degraded"], "25000");
        assert_eq!(f["user_limit_restored"], "100000");
        // Broken: the kernel is not given the Redis, so nothing degrades.
        let (ok, verdict) = chaos(engine, "redis.down", true);
        assert_fail(ok, &verdict);
    }
}
