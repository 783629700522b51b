//! `/api/health/live`, `/api/health`, `/metrics`, `/api/openapi.json`.

use aibos_testkit::spawn_kernel;

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
