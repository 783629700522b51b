//! `/api/health/live`, `/api/health`, `/metrics` (on the API's address or on
//! `metrics.bind`), `aibos_database_up`, `/api/openapi.json`.

use std::path::Path;
use std::time::Duration;

use aibos_testkit::hub::free_port;
use aibos_testkit::process::KernelProcess;
use aibos_testkit::{KernelOptions, spawn_kernel, spawn_kernel_with};

/// The value of an unlabelled series in Prometheus text, if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

crate::both_engines! {
    async fn health_reports_a_real_database_round_trip(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let response = kernel.client.get(kernel.url("/api/health")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["status"], "healthy");
        assert_eq!(body["database"]["status"], "up");
        let expected_engine = match engine { aibos_testkit::Engine::Sqlite => "sqlite", aibos_testkit::Engine::Postgres => "postgres" };
        assert_eq!(body["database"]["engine"], expected_engine);
        assert!(body["database"]["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0));
        assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));

        let live = kernel.client.get(kernel.url("/api/health/live")).send().await.unwrap();
        assert_eq!(live.status(), 200);
    }

    async fn metrics_count_requests_by_matched_route(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        for _ in 0..3 {
            kernel.client.get(kernel.url("/api/health/live")).send().await.unwrap();
        }
        kernel.client.get(kernel.url("/no/such/path/12345")).send().await.unwrap();
        let text = kernel.metrics_text().await;
        assert!(text.contains(r#"aibos_http_requests_total{route="/api/health/live",method="GET",status="200"} 3"#), "{text}");
        assert!(text.contains(r#"aibos_http_requests_total{route="unmatched",method="GET",status="404"} 1"#), "{text}");
        // The path itself, not its digits: a latency or a byte count may well
        // contain "12345" (this assertion once failed on one).
        assert!(!text.contains("/no/such/path"), "unmatched paths never become labels: {text}");
        assert!(text.contains("aibos_http_request_duration_seconds_bucket"), "{text}");
        assert!(text.contains("aibos_build_info{version="), "{text}");
        assert!(text.contains("aibos_db_pool_connections"), "{text}");
    }

    async fn the_database_probe_exports_database_up_and_unlabelled_counters_exist_from_the_start(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        // The probe's first tick is at start; give it a moment on a busy machine.
        let mut text = kernel.metrics_text().await;
        for _ in 0..50 {
            if sample(&text, "aibos_database_up").is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            text = kernel.metrics_text().await;
        }
        assert_eq!(sample(&text, "aibos_database_up"), Some(1.0), "{text}");
        // Registered at zero, so that increase() sees the first dead letter.
        assert_eq!(sample(&text, "aibos_webhook_dead_letters_total"), Some(0.0), "{text}");
        assert_eq!(sample(&text, "aibos_events_relayed_total"), Some(0.0), "{text}");
        assert!(text.contains("# TYPE aibos_database_up gauge"), "{text}");
        // A gauge claims something: none before its owner knows the value.
        assert!(!text.contains("aibos_audit_verify_last_success_timestamp_seconds "), "{text}");
        assert!(!text.contains("aibos_backup_last_success_timestamp_seconds "), "no schedule, no backup age: {text}");
        assert!(text.contains(r#"aibos_backup_runs_total{outcome="failed"} 0"#), "{text}");

        // /api/health sets it too, from its own query.
        kernel.client.get(kernel.url("/api/health")).send().await.unwrap();
        assert_eq!(sample(&kernel.metrics_text().await, "aibos_database_up"), Some(1.0));
    }

    async fn the_database_probe_counts_the_audit_entries_of_every_tenant(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        // The probe reads the count every 5 s: wait (bounded) until it passes `above`.
        let count_above = |above: f64| {
            let kernel = &kernel;
            async move {
                for _ in 0..150 {
                    if let Some(n) = sample(&kernel.metrics_text().await, "aibos_audit_entries").filter(|n| *n > above) {
                        return n;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                panic!("aibos_audit_entries never went above {above}: {}", kernel.metrics_text().await);
            }
        };
        let platform = kernel.platform_admin().await;
        let first = count_above(0.0).await;
        // A tenant of its own: entries in another chain count too.
        kernel.tenant_with_admin(&platform, "counted").await;
        let second = count_above(first).await;
        assert!(second >= first + 1.0, "{first} then {second}");
        assert!(kernel.metrics_text().await.contains("# TYPE aibos_audit_entries gauge"));
    }

    async fn with_metrics_bind_metrics_are_served_there_only_and_stop_with_the_kernel(engine: Engine) {
        let kernel = spawn_kernel_with(engine, KernelOptions {
            env: vec![("AIBOS_METRICS__BIND".into(), "127.0.0.1:0".into())],
            ..Default::default()
        }).await.unwrap();
        let metrics_addr = kernel.metrics_addr.expect("a metrics listener");
        assert_ne!(metrics_addr, kernel.addr);
        kernel.client.get(kernel.url("/api/health/live")).send().await.unwrap();

        let scrape = kernel.client.get(format!("http://{metrics_addr}/metrics")).send().await.unwrap();
        assert_eq!(scrape.status(), 200);
        assert!(scrape.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
        assert!(scrape.headers().contains_key("x-correlation-id"), "the same edge as the API");
        let text = scrape.text().await.unwrap();
        assert!(text.contains(r#"aibos_http_requests_total{route="/api/health/live",method="GET",status="200"} 1"#), "{text}");

        // The API's address no longer serves it, and the metrics listener serves nothing else.
        let main = kernel.client.get(kernel.url("/metrics")).send().await.unwrap();
        assert_eq!(main.status(), 404);
        assert_eq!(main.headers()["content-type"], "application/problem+json");
        let other = kernel.client.get(format!("http://{metrics_addr}/api/health")).send().await.unwrap();
        assert_eq!(other.status(), 404);
        // Nor does the API's OpenAPI document list it.
        let doc: serde_json::Value = kernel.client.get(kernel.url("/api/openapi.json")).send().await.unwrap().json().await.unwrap();
        assert!(doc["paths"]["/metrics"].is_null(), "{}", doc["paths"]["/metrics"]);

        let client = kernel.client.clone();
        tokio::time::timeout(Duration::from_secs(15), kernel.shutdown()).await.expect("the kernel stops").unwrap();
        assert!(
            client.get(format!("http://{metrics_addr}/metrics")).send().await.is_err(),
            "the metrics listener is closed with the kernel"
        );
    }
}

#[test]
fn metrics_bind_must_be_an_address_other_than_the_api_s() {
    let dir = tempfile::tempdir().unwrap();
    let load = |env: &[(&str, &str)]| {
        aibos_kernel::config::Config::load(&aibos_kernel::config::ConfigSources::new(
            dir.path(),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        ))
    };
    let config = load(&[]).unwrap();
    assert_eq!(config.metrics.bind, None, "on the API's address by default");
    let config = load(&[("AIBOS_METRICS__BIND", "127.0.0.1:9464")]).unwrap();
    assert_eq!(config.metrics.bind, Some("127.0.0.1:9464".parse().unwrap()));
    for bad in ["9464", "127.0.0.1:3001"] {
        let err = load(&[("AIBOS_METRICS__BIND", bad)]).unwrap_err();
        assert_eq!(err.problems()[0].key, "metrics.bind", "{bad}: {err}");
    }
}

/// The real binary: `serve` logs the metrics address, serves `/metrics` there
/// only, and closes that socket too when SIGTERM stops it.
#[tokio::test]
async fn the_binary_serves_metrics_on_metrics_bind_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_address = format!("127.0.0.1:{}", free_port());
    let database = format!("sqlite://{}/aibos.db", dir.path().display());
    let mut kernel = KernelProcess::start(
        Path::new(env!("CARGO_BIN_EXE_aibos")),
        dir.path(),
        &[
            ("AIBOS_SERVER__BIND", "127.0.0.1:0"),
            ("AIBOS_METRICS__BIND", &metrics_address),
            ("AIBOS_DATABASE__URL", &database),
        ],
    )
    .await
    .unwrap();
    let line = kernel
        .wait_for_log("\"listening\"", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        line.contains(&format!("\"metrics_address\":\"{metrics_address}\"")),
        "{line}"
    );
    let client = reqwest::Client::new();
    let scrape = client
        .get(format!("http://{metrics_address}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(scrape.status(), 200);
    assert!(scrape.text().await.unwrap().contains("aibos_build_info"));
    let main = client
        .get(format!("{}/metrics", kernel.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(main.status(), 404);

    kernel.signal("TERM").await;
    let status = tokio::time::timeout(Duration::from_secs(30), kernel.child.wait())
        .await
        .expect("the kernel exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        std::net::TcpStream::connect(&metrics_address).is_err(),
        "nothing listens on the metrics address any more"
    );
}

#[tokio::test]
async fn the_openapi_document_lists_every_endpoint_and_the_problem_codes() {
    let kernel = spawn_kernel(aibos_testkit::Engine::Sqlite).await.unwrap();
    let doc: serde_json::Value = kernel
        .client
        .get(kernel.url("/api/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    for path in [
        "/api/health",
        "/api/health/live",
        "/metrics",
        "/api/openapi.json",
    ] {
        assert!(
            doc["paths"][path]["get"].is_object(),
            "{path} is documented"
        );
        assert!(
            doc["paths"][path]["get"]["responses"]["500"].is_object(),
            "{path} lists its problem responses"
        );
    }
    let codes: Vec<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("ErrorCode is an enum schema")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for code in aibos_wire::ErrorCode::ALL {
        assert!(codes.contains(&code.as_str()), "{code} is listed");
    }
}

/// The served document validates against the OpenAPI 3.1 schema (client
/// generators refuse one that does not), with `openapi-spec-validator`, which
/// `.ci/run` installs from PyPI.
#[tokio::test]
async fn the_openapi_document_validates_against_the_openapi_3_1_schema() {
    use std::io::Write;
    let kernel = spawn_kernel(aibos_testkit::Engine::Sqlite).await.unwrap();
    let doc = kernel
        .client
        .get(kernel.url("/api/openapi.json"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys\n\
             from openapi_spec_validator import validate\n\
             validate(json.load(sys.stdin))\n\
             print('valid')",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child.stdin.take().unwrap().write_all(&doc).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the document does not validate: {}",
        stderr
            .chars()
            .rev()
            .take(3000)
            .collect::<String>()
            .chars()
            .rev()
            .collect::<String>()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "valid");
}

/// The front door answers the liveness probe itself unless CORS is configured
/// (`http::front`); both ways give the same answer, and only `GET` is served.
#[tokio::test]
async fn the_liveness_probe_answers_alike_through_the_door_and_the_router() {
    let door = spawn_kernel(aibos_testkit::Engine::Sqlite).await.unwrap();
    let routed = aibos_testkit::spawn_kernel_with(
        aibos_testkit::Engine::Sqlite,
        aibos_testkit::KernelOptions {
            env: vec![(
                "AIBOS_SERVER__CORS_ALLOWED_ORIGINS".into(),
                "[\"https://console.example\"]".into(),
            )],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut answers = Vec::new();
    for kernel in [&door, &routed] {
        let r = kernel
            .client
            .get(kernel.url("/api/health/live"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut headers: Vec<(String, String)> = r
            .headers()
            .iter()
            .filter(|(name, _)| {
                !["date", "x-correlation-id", "vary"].contains(&name.as_str())
                    && !name.as_str().starts_with("access-control-")
            })
            .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
            .collect();
        headers.sort();
        answers.push((headers, r.text().await.unwrap()));
        let r = kernel
            .client
            .post(kernel.url("/api/health/live"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "only GET is the probe");
        let r = kernel
            .client
            .get(kernel.url("/api/health/live/x"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0].1, r#"{"status":"alive"}"#);
}
