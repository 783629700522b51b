//! `aibos drill incident`: a cell outage under load passes every check and
//! leaves a Markdown report with its timeline; a kernel that does not
//! recover by itself (the hidden `--break`) fails it, naming the checks. The
//! judge's own checks are unit-tested with broken observations in
//! `src/cli/drill/incident.rs`. (`drill backup-restore` is in `backup.rs`.)

use aibos_testkit::Engine;
use serde_json::Value;

use crate::both_engines;

const BINARY: &str = env!("CARGO_BIN_EXE_aibos");

/// Runs the drill with `--json`; its exit status, its JSON line, its report.
fn incident(engine: Engine, sabotage: bool) -> (bool, Value, String) {
    let cwd = tempfile::tempdir().unwrap();
    let report = cwd.path().join("incident.md");
    let mut command = std::process::Command::new(BINARY);
    command
        .args([
            "drill",
            "incident",
            "--outage-seconds",
            "2",
            "--json",
            "--report",
        ])
        .arg(&report)
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
                .env("AIBOS_DRILL_POSTGRES_URL", url);
        }
    }
    if sabotage {
        command.arg("--break");
    }
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout} {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(
        out.status.success(),
        line["ok"] == true,
        "the exit status follows the verdict: {line:#}"
    );
    let markdown = std::fs::read_to_string(&report).unwrap_or_default();
    (out.status.success(), line, markdown)
}

fn failed_checks(line: &Value) -> Vec<String> {
    line["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] != true)
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

both_engines! {
    async fn a_cell_outage_is_detected_contained_recovered_and_reported(engine: Engine) {
        let (ok, line, markdown) = incident(engine, false);
        assert!(ok, "{line:#}");
        assert_eq!(failed_checks(&line), Vec::<String>::new());
        assert_eq!(line["checks"].as_array().unwrap().len(), 10);
        assert!(line["detected_ms"].as_u64().unwrap() <= 3_000, "{line:#}");
        assert!(line["recovered_ms"].as_u64().unwrap() <= 4_000, "{line:#}");
        let f = &line["figures"];
        assert!(f["failed_calls"].as_u64().unwrap() > 0, "the outage was felt: {f}");
        assert_eq!(f["answered_500"], 0);
        assert_eq!(f["bystander_failed"], 0);
        assert_eq!(f["audit_changes"], 2, "down and back up: {f}");
        let events: Vec<&str> = line["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        for needle in ["Fault", "First failed call", "Detected", "Repair", "Recovered", "Audited"] {
            assert!(events.iter().any(|e| e.starts_with(needle)), "{needle}: {events:?}");
        }
        let at: Vec<i64> = line["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["at_ms"].as_i64().unwrap())
            .collect();
        assert!(at.windows(2).all(|w| w[0] <= w[1]), "in order: {at:?}");
        assert!(markdown.starts_with("# Incident drill: a cell outage"), "{markdown}");
        assert!(markdown.contains("**Verdict:** PASSED (10 of 10 checks passed)"), "{markdown}");
        assert!(markdown.contains("## Timeline"), "{markdown}");
        assert!(markdown.contains("| T+0.00 s | Fault: "), "{markdown}");
        let engine_name = if engine == Engine::Sqlite { "sqlite" } else { "postgres" };
        assert!(markdown.contains(&format!("on {engine_name}")), "{markdown}");
    }
}

both_engines! {
    async fn a_kernel_that_does_not_recover_by_itself_fails_the_drill(engine: Engine) {
        let (ok, line, markdown) = incident(engine, true);
        assert!(!ok, "{line:#}");
        let failed = failed_checks(&line);
        assert!(failed.contains(&"recovered".to_owned()), "{failed:?}");
        assert!(failed.contains(&"audited".to_owned()), "{failed:?}");
        assert!(line["recovered_ms"].is_null(), "{line:#}");
        assert!(markdown.contains("**Verdict:** FAILED"), "{markdown}");
        assert!(markdown.contains("- FAIL **recovered**"), "{markdown}");
    }
}
