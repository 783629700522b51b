//! The `aibos` binary as a user runs it: serve, signals, configuration, migrations.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use aibos_testkit::process::KernelProcess;
use aibos_testkit::{Engine, TestDb};

const BINARY: &str = env!("CARGO_BIN_EXE_aibos");

/// Runs `aibos ARGS` in `cwd` with only `env`.
fn aibos(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = std::process::Command::new(BINARY);
    command
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run aibos")
}

fn database_env(test_db: &Option<TestDb>) -> Vec<(&str, &str)> {
    match test_db {
        Some(db) => vec![("AIBOS_DATABASE__URL", db.url())],
        None => vec![],
    }
}

async fn exit_code_after_sigterm(mut kernel: KernelProcess) -> Option<i32> {
    kernel.signal("TERM").await;
    let status = tokio::time::timeout(Duration::from_secs(15), kernel.child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    status.code()
}

crate::both_engines! {
    async fn serve_answers_healthy_and_sigterm_exits_zero(engine: Engine) {
        let cwd = tempfile::tempdir().unwrap();
        // On SQLite the kernel runs on its embedded default, sqlite://data/aibos.db.
        let test_db = match engine { Engine::Sqlite => None, Engine::Postgres => TestDb::create(engine).await };
        let mut env = vec![("AIBOS_SERVER__BIND", "127.0.0.1:0")];
        env.extend(database_env(&test_db));
        let kernel = KernelProcess::start(Path::new(BINARY), cwd.path(), &env).await.unwrap();

        let response = reqwest::get(format!("{}/api/health", kernel.base_url)).await.unwrap();
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["status"], "healthy");
        assert_eq!(body["database"]["status"], "up");
        if engine == Engine::Sqlite {
            assert!(cwd.path().join("data/aibos.db").is_file(), "the default database file is created with its folder");
            // With no master key configured, one is generated beside the database, private, and its path logged.
            let key_file = cwd.path().join("data/master.key");
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(std::fs::metadata(&key_file).expect("the master key file is generated").permissions().mode() & 0o777, 0o600);
            let logged = kernel.all_logs();
            assert!(logged.contains("generated a new master key") && logged.contains(&*key_file.to_string_lossy()), "{logged}");
            assert!(!logged.contains(std::fs::read_to_string(&key_file).unwrap().trim()), "the key is never logged");
        }
        assert_eq!(exit_code_after_sigterm(kernel).await, Some(0));
    }

    async fn migrate_commands_report_and_change_the_schema(engine: Engine) {
        let cwd = tempfile::tempdir().unwrap();
        let test_db = match engine { Engine::Sqlite => None, Engine::Postgres => TestDb::create(engine).await };
        let env = database_env(&test_db);
        let status = |cwd: &Path| -> serde_json::Value {
            let out = aibos(cwd, &["migrate", "status", "--json"], &env);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            serde_json::from_slice(&out.stdout).unwrap()
        };
        assert_eq!(status(cwd.path())["migrations"][0]["state"], "pending");
        let up = aibos(cwd.path(), &["migrate", "up", "--json"], &env);
        assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&up.stdout).unwrap()["applied"][0], 1);
        assert_eq!(status(cwd.path())["migrations"][0]["state"], "applied");
        let down = aibos(cwd.path(), &["migrate", "down", "--steps", "1"], &env);
        assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
        let all = status(cwd.path());
        let migrations = all["migrations"].as_array().unwrap();
        let newest = migrations.last().unwrap();
        assert!(String::from_utf8_lossy(&down.stdout).contains(&format!("reverted {}", newest["version"])));
        assert_eq!(newest["state"], "pending");
        assert_eq!(migrations[0]["state"], "applied", "only the newest was reverted");
        let steps = migrations.len().to_string();
        let down = aibos(cwd.path(), &["migrate", "down", "--steps", &steps], &env);
        assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
        assert_eq!(status(cwd.path())["migrations"][0]["state"], "pending");
        let baseline = aibos(cwd.path(), &["migrate", "baseline"], &env);
        assert!(baseline.status.success());
        assert_eq!(status(cwd.path())["migrations"][0]["state"], "applied");
    }
}

#[test]
fn an_invalid_configuration_exits_78_naming_every_bad_key() {
    let cwd = tempfile::tempdir().unwrap();
    let env = [
        ("AIBOS_SERVER__BIND", "not-an-address"),
        ("AIBOS_AUTH__ACCESS_TOKEN_TTL_SECONDS", "-5"),
    ];
    let out = aibos(cwd.path(), &["serve"], &env);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.bind"), "{stderr}");
    assert!(stderr.contains("auth.access_token_ttl_seconds"), "{stderr}");
    assert!(
        !cwd.path().join("data").exists(),
        "nothing is created before the configuration is valid"
    );

    let out = aibos(cwd.path(), &["config", "validate", "--json"], &env);
    assert_eq!(out.status.code(), Some(78));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["valid"], false);
    let keys: Vec<&str> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["server.bind", "auth.access_token_ttl_seconds"]);
}

#[test]
fn config_show_redacts_secrets() {
    let cwd = tempfile::tempdir().unwrap();
    let env = [
        (
            "AIBOS_AUTH__BOOTSTRAP_KEY",
            "bootstrap-key-that-must-not-leak",
        ),
        (
            "AIBOS_DATABASE__URL",
            "postgres://aibos:hunter2hunter2@db.example:5432/aibos",
        ),
        (
            "AIBOS_AUTH__MASTER_KEY",
            "bWFzdGVyLWtleS10aGF0LW11c3Qtbm90LWxlYWsuLi4=",
        ),
    ];
    for args in [&["config", "show"][..], &["config", "show", "--json"][..]] {
        let out = aibos(cwd.path(), args, &env);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("[REDACTED]"), "{text}");
        assert!(!text.contains("bootstrap-key-that-must-not-leak"), "{text}");
        assert!(!text.contains("hunter2hunter2"), "{text}");
        assert!(!text.contains("bWFzdGVyLWtleS10aGF0"), "{text}");
    }
    let out = aibos(cwd.path(), &["config", "validate"], &env);
    assert!(out.status.success());

    // A malformed master key is named, never echoed.
    let bad = [("AIBOS_AUTH__MASTER_KEY", "c2hvcnQtYnV0LXNlY3JldA==")];
    let out = aibos(cwd.path(), &["config", "validate"], &bad);
    assert_eq!(out.status.code(), Some(78));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("auth.master_key") && text.contains("32 bytes"),
        "{text}"
    );
    assert!(!text.contains("c2hvcnQtYnV0LXNlY3JldA"), "{text}");
}

#[tokio::test]
async fn sighup_applies_a_valid_file_and_keeps_the_old_configuration_on_an_invalid_one() {
    let cwd = tempfile::tempdir().unwrap();
    let file = cwd.path().join("aibos.toml");
    std::fs::write(
        &file,
        "[server]\nbind = \"127.0.0.1:0\"\n[log]\nlevel = \"info\"\n",
    )
    .unwrap();
    let kernel = KernelProcess::start(Path::new(BINARY), cwd.path(), &[])
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let live = format!("{}/api/health/live", kernel.base_url);

    // At info, a completed request is not logged (it is a debug line).
    client.get(&live).send().await.unwrap();
    assert_eq!(kernel.count_logs("request completed"), 0);

    std::fs::write(
        &file,
        "[server]\nbind = \"127.0.0.1:0\"\n[log]\nlevel = \"debug\"\n",
    )
    .unwrap();
    kernel.signal("HUP").await;
    kernel
        .wait_for_log("configuration reloaded", Duration::from_secs(10))
        .await
        .expect("the reload is logged");
    client.get(&live).send().await.unwrap();
    kernel
        .wait_for_log("request completed", Duration::from_secs(10))
        .await
        .expect("debug lines appear without a restart");

    std::fs::write(
        &file,
        "[server]\nbind = \"127.0.0.1:0\"\n[http]\nmax_body_bytes = -1\n[log]\nlevel = \"info\"\n",
    )
    .unwrap();
    kernel.signal("HUP").await;
    let refused = kernel
        .wait_for_log("reload refused", Duration::from_secs(10))
        .await
        .expect("the refusal is logged");
    assert!(refused.contains("http.max_body_bytes"), "{refused}");
    let before = kernel.count_logs("request completed");
    let response = client.get(&live).send().await.unwrap();
    assert_eq!(response.status(), 200, "the kernel keeps serving");
    // The old level (debug) is still in force: the request is logged.
    assert!(
        kernel
            .wait_for_log_count("request completed", before + 1, Duration::from_secs(10))
            .await,
        "{}",
        kernel.all_logs()
    );
    assert_eq!(exit_code_after_sigterm(kernel).await, Some(0));

    // Both reloads are in the audit trail of the system tenant.
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        cwd.path().join("data/aibos.db").display()
    ))
    .await
    .unwrap();
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE action LIKE 'config.%' ORDER BY seq",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(actions, ["config.reloaded", "config.reload_failed"]);
}

/// SIGTERM while a request is in flight (its body still arriving): the request
/// completes, then the process exits 0.
#[tokio::test]
async fn sigterm_during_a_slow_request_lets_it_finish_then_exits_zero() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cwd = tempfile::tempdir().unwrap();
    let kernel = KernelProcess::start(
        Path::new(BINARY),
        cwd.path(),
        &[("AIBOS_SERVER__BIND", "127.0.0.1:0")],
    )
    .await
    .unwrap();
    let addr = kernel.base_url.trim_start_matches("http://").to_owned();
    let body = br#"{"tenant":"system","email":"nobody@example.com","password":"a slow request's password"}"#;
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/kernel/auth/login HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..10]).await.unwrap();
    // Make sure the server has the request (it is waiting for the rest of the body).
    kernel
        .wait_for_log("listening", Duration::from_secs(1))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    kernel.signal("TERM").await;
    kernel
        .wait_for_log("shutting down", Duration::from_secs(5))
        .await
        .expect("shutdown has begun");
    stream.write_all(&body[10..]).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 401"),
        "the in-flight login was answered: {response}"
    );
    assert!(response.contains("UNAUTHORIZED"));
    let mut kernel = kernel;
    let status = tokio::time::timeout(Duration::from_secs(10), kernel.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn status_reports_a_running_kernel_and_an_unreachable_one() {
    let cwd = tempfile::tempdir().unwrap();
    let kernel = KernelProcess::start(
        Path::new(BINARY),
        cwd.path(),
        &[("AIBOS_SERVER__BIND", "127.0.0.1:0")],
    )
    .await
    .unwrap();
    let url = kernel.base_url.clone();
    let out = tokio::task::spawn_blocking({
        let cwd = cwd.path().to_owned();
        move || aibos(&cwd, &["status", "--json", "--url", &url], &[])
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["status"], "healthy");
    assert_eq!(exit_code_after_sigterm(kernel).await, Some(0));

    // Nothing listens there any more.
    let url = "http://127.0.0.1:9".to_owned();
    let out = aibos(cwd.path(), &["status", "--url", &url], &[]);
    assert_eq!(out.status.code(), Some(69));
}

/// `server.event_loops` sets how many threads serve connections: the kernel
/// runs exactly that many, says so when it starts, and serves clients on all.
#[tokio::test]
async fn serve_runs_the_configured_number_of_event_loops() {
    let cwd = tempfile::tempdir().unwrap();
    let kernel = KernelProcess::start(
        Path::new(BINARY),
        cwd.path(),
        &[
            ("AIBOS_SERVER__BIND", "127.0.0.1:0"),
            ("AIBOS_SERVER__EVENT_LOOPS", "3"),
        ],
    )
    .await
    .unwrap();
    let listening = kernel
        .wait_for_log("listening", Duration::from_secs(5))
        .await
        .expect("the kernel logs that it listens");
    assert!(listening.contains(r#""event_loops":3"#), "{listening}");
    // Six connections at once, dealt over the three loops: every one is served.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..6 {
        calls.spawn(client.get(format!("{}/api/health", kernel.base_url)).send());
    }
    let mut served = 0;
    while let Some(response) = calls.join_next().await {
        assert_eq!(response.unwrap().unwrap().status(), 200);
        served += 1;
    }
    assert_eq!(served, 6);
    // The loops are threads of their own, named by index (started once the
    // socket is bound, so counted after the calls).
    let pid = kernel.child.id().expect("running");
    let mut loops: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| name.starts_with("aibos-http-"))
        .collect();
    loops.sort();
    assert_eq!(loops, ["aibos-http-0", "aibos-http-1", "aibos-http-2"]);
}
