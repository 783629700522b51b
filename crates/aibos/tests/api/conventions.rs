//! SPEC §3 conventions, applied by the edge to every endpoint.
//!
//! Body handling is exercised through a probe route that uses the kernel's own
//! `AppJson` extractor inside the real middleware stack.

use aibos_testkit::axum_free::{AppJson, Router};
use aibos_testkit::{Engine, KernelOptions, TestKernel, spawn_kernel_with};

use crate::expect_problem;

#[derive(serde::Deserialize, serde::Serialize)]
struct Probe {
    name: String,
    amount_minor: i64,
}

async fn probe_kernel(env: Vec<(String, String)>) -> TestKernel {
    let routes: Router = Router::new()
        .route(
            "/api/test/probe",
            axum::routing::post(|AppJson(body): AppJson<Probe>| async move { AppJson(body) }),
        )
        .route("/api/test/panic", axum::routing::get(panicking_handler));
    spawn_kernel_with(
        Engine::Sqlite,
        KernelOptions {
            env,
            extra_routes: Some(routes),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

async fn panicking_handler() -> &'static str {
    let values: Vec<u8> = Vec::new();
    // Indexing out of bounds: the kind of bug CatchPanic exists for.
    if values[0] == 0 {
        "unreachable"
    } else {
        "also unreachable"
    }
}

#[tokio::test]
async fn a_valid_json_body_reaches_the_handler() {
    let kernel = probe_kernel(vec![]).await;
    let response = kernel
        .client
        .post(kernel.url("/api/test/probe"))
        .json(&serde_json::json!({"name": "x", "amount_minor": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap()["amount_minor"],
        5
    );
}

#[tokio::test]
async fn malformed_json_is_a_400_problem() {
    let kernel = probe_kernel(vec![]).await;
    let response = kernel
        .client
        .post(kernel.url("/api/test/probe"))
        .header("content-type", "application/json")
        .body("{\"name\": \"x\", ")
        .send()
        .await
        .unwrap();
    let body = expect_problem(response, 400, "VALIDATION_ERROR").await;
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{body}"
    );
}

#[tokio::test]
async fn wrong_types_and_huge_values_name_the_field() {
    let kernel = probe_kernel(vec![]).await;
    for (payload, field) in [
        (r#"{"name": "x", "amount_minor": "ten"}"#, "amount_minor"),
        (r#"{"name": "x", "amount_minor": 1e400}"#, "amount_minor"),
        (
            r#"{"name": "x", "amount_minor": 99999999999999999999999}"#,
            "amount_minor",
        ),
        (r#"{"name": 7, "amount_minor": 1}"#, "name"),
        (r#"{"amount_minor": 1}"#, "body"),
        (r#"["' OR 1=1 --"]"#, "body"),
    ] {
        let response = kernel
            .client
            .post(kernel.url("/api/test/probe"))
            .header("content-type", "application/json")
            .body(payload)
            .send()
            .await
            .unwrap();
        let body = expect_problem(response, 400, "VALIDATION_ERROR").await;
        assert_eq!(body["errors"][0]["field"], field, "{payload}: {body}");
    }
}

#[tokio::test]
async fn a_form_encoded_body_is_a_415_problem() {
    let kernel = probe_kernel(vec![]).await;
    let response = kernel
        .client
        .post(kernel.url("/api/test/probe"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("name=x&amount_minor=5")
        .send()
        .await
        .unwrap();
    expect_problem(response, 415, "UNSUPPORTED_MEDIA_TYPE").await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413_problem_declared_or_streamed() {
    let kernel = probe_kernel(vec![]).await;
    let two_mib = vec![b' '; 2 * 1024 * 1024];
    let head = |framing: &str| {
        format!(
            "POST /api/test/probe HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n{framing}\r\nconnection: close\r\n\r\n",
            kernel.addr
        )
    };
    // A declared length over the limit is refused from the head alone, before
    // any of the body is sent. (A client sending the body anyway may see its
    // write fail once the server has answered and closed: that race is the
    // client's, so only the head is sent.)
    let declared = head(&format!("content-length: {}", two_mib.len()));
    let declared = kernel.raw_exchange(&declared, None).await;
    // Without Content-Length (chunked), the limit trips while reading.
    let chunked = head("transfer-encoding: chunked");
    let chunked = kernel.raw_exchange(&chunked, Some(&two_mib)).await;
    for response in [declared, chunked] {
        assert!(
            response.starts_with("HTTP/1.1 413"),
            "{}",
            &response[..response.len().min(200)]
        );
        assert!(response.contains("application/problem+json"));
        assert!(response.contains("PAYLOAD_TOO_LARGE"));
    }
}

#[tokio::test]
async fn the_body_limit_is_configurable() {
    let kernel = probe_kernel(vec![("AIBOS_HTTP__MAX_BODY_BYTES".into(), "16".into())]).await;
    let response = kernel
        .client
        .post(kernel.url("/api/test/probe"))
        .json(&serde_json::json!({"name": "a longer name", "amount_minor": 5}))
        .send()
        .await
        .unwrap();
    expect_problem(response, 413, "PAYLOAD_TOO_LARGE").await;
}

#[tokio::test]
async fn correlation_ids_are_validated_generated_and_echoed() {
    let kernel = probe_kernel(vec![]).await;

    let response = kernel
        .client
        .get(kernel.url("/api/health/live"))
        .header("x-correlation-id", "not-a-uuid")
        .send()
        .await
        .unwrap();
    let body = expect_problem(response, 400, "VALIDATION_ERROR").await;
    assert_eq!(body["errors"][0]["field"], "header:x-correlation-id");

    let response = kernel
        .client
        .get(kernel.url("/api/health/live"))
        .send()
        .await
        .unwrap();
    let generated = response.headers()["x-correlation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
    let again = kernel
        .client
        .get(kernel.url("/api/health/live"))
        .send()
        .await
        .unwrap();
    assert_ne!(
        again.headers()["x-correlation-id"].to_str().unwrap(),
        generated,
        "each request gets its own id"
    );

    let mine = "0190f3c4-7e2a-7c4e-9d1a-2b3c4d5e6f70";
    let response = kernel
        .client
        .get(kernel.url("/api/health/live"))
        .header("x-correlation-id", mine)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-correlation-id"], mine);

    // Errors carry the client's id too.
    let response = kernel
        .client
        .get(kernel.url("/api/nothing"))
        .header("x-correlation-id", mine)
        .send()
        .await
        .unwrap();
    let body = expect_problem(response, 404, "NOT_FOUND").await;
    assert_eq!(body["correlation_id"], mine);
}

#[tokio::test]
async fn unknown_paths_and_methods_are_problems() {
    let kernel = probe_kernel(vec![]).await;
    let response = kernel
        .client
        .get(kernel.url("/api/kernel/../../etc/passwd"))
        .send()
        .await
        .unwrap();
    expect_problem(response, 404, "NOT_FOUND").await;
    let response = kernel
        .client
        .delete(kernel.url("/api/health"))
        .send()
        .await
        .unwrap();
    expect_problem(response, 405, "METHOD_NOT_ALLOWED").await;
}

#[tokio::test]
async fn a_panicking_handler_is_a_500_problem_and_the_kernel_keeps_serving() {
    let kernel = probe_kernel(vec![]).await;
    let response = kernel
        .client
        .get(kernel.url("/api/test/panic"))
        .send()
        .await
        .unwrap();
    let body = expect_problem(response, 500, "INTERNAL_ERROR").await;
    assert!(
        !body.to_string().contains("index out of bounds"),
        "the panic message stays in the log: {body}"
    );
    let live = kernel
        .client
        .get(kernel.url("/api/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
}

#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let kernel = probe_kernel(vec![]).await;
    for path in ["/api/health", "/api/nothing", "/metrics"] {
        let response = kernel
            .client
            .get(kernel.url(path))
            .header("x-correlation-id", "bad")
            .send()
            .await
            .unwrap();
        let h = response.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert_eq!(
            h["content-security-policy"], "default-src 'none'; frame-ancestors 'none'",
            "{path}"
        );
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
    }
}

#[tokio::test]
async fn cors_answers_only_allowed_origins() {
    let kernel = probe_kernel(vec![(
        "AIBOS_SERVER__CORS_ALLOWED_ORIGINS".into(),
        "[\"https://app.example.com\"]".into(),
    )])
    .await;
    let preflight = |origin: &'static str| {
        kernel
            .client
            .request(reqwest::Method::OPTIONS, kernel.url("/api/health"))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .send()
    };
    let allowed = preflight("https://app.example.com").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let denied = preflight("https://evil.example.com").await.unwrap();
    assert!(
        denied
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

/// Every field of every endpoint, from the OpenAPI document: a NUL character or
/// a lone surrogate escape in any string field, path parameter or query
/// parameter gets a 4xx problem, never a 5xx, on either engine.
mod hostile_text {
    use aibos_testkit::api::Session;
    use aibos_testkit::{TestKernel, spawn_kernel};
    use reqwest::Method;
    use serde_json::{Map, Value, json};

    const HOSTILE: [&str; 2] = [r#""a\u0000b""#, r#""a\ud800b""#];
    /// Path parameters: `%00` and an encoded lone surrogate (not UTF-8).
    const HOSTILE_PATH: [&str; 2] = ["a%00b", "a%ED%A0%80b"];

    /// The properties of a request body schema with a plain value of each
    /// one's type, following `$ref`s, so that a body with one hostile field
    /// gets past the others' validation to the handler.
    fn properties(doc: &Value, schema: &Value) -> Vec<(String, Value)> {
        if let Some(reference) = schema["$ref"].as_str() {
            let name = reference.rsplit('/').next().unwrap_or_default();
            return properties(doc, &doc["components"]["schemas"][name]);
        }
        let plain = |s: &Value| -> Value {
            let s = match s["$ref"].as_str() {
                Some(r) => &doc["components"]["schemas"][r.rsplit('/').next().unwrap_or_default()],
                None => s,
            };
            let kind = s["type"].as_str().or_else(|| {
                s["type"]
                    .as_array()
                    .and_then(|t| t.iter().find_map(|t| t.as_str().filter(|t| *t != "null")))
            });
            match kind {
                Some("integer") | Some("number") => json!(1),
                Some("boolean") => json!(false),
                Some("array") => json!([]),
                Some("object") => json!({}),
                _ => json!("plain text 01"),
            }
        };
        let mut fields: Vec<(String, Value)> = schema["properties"]
            .as_object()
            .map(|p| p.iter().map(|(k, v)| (k.clone(), plain(v))).collect())
            .unwrap_or_default();
        for part in ["allOf", "oneOf", "anyOf"] {
            for sub in schema[part].as_array().into_iter().flatten() {
                fields.extend(properties(doc, sub));
            }
        }
        fields
    }

    async fn send(
        kernel: &TestKernel,
        session: &Session,
        method: &Method,
        path: &str,
        body: Option<String>,
    ) -> (u16, String) {
        let mut request = kernel.as_(session, method.clone(), path);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), format!("{} {path}", method))
    }

    crate::both_engines! {
        async fn no_text_of_any_endpoint_yields_a_5xx(engine: Engine) {
            let kernel = spawn_kernel(engine).await.unwrap();
            let root = kernel.platform_admin().await;
            let admin = kernel.tenant_with_admin(&root, "acme").await;
            let doc: Value = kernel.client.get(kernel.url("/api/openapi.json")).send().await.unwrap().json().await.unwrap();
            let mut tried = 0;
            let mut server_errors = Vec::new();
            for (template, item) in doc["paths"].as_object().unwrap() {
                for (method, op) in item.as_object().unwrap() {
                    let Ok(method) = method.to_uppercase().parse::<Method>() else { continue };
                    // Logout ends the session the rest of the run needs.
                    if template.ends_with("/auth/logout") {
                        continue;
                    }
                    let params: Vec<&str> = op["parameters"].as_array().into_iter().flatten()
                        .filter(|p| p["in"] == "path").filter_map(|p| p["name"].as_str()).collect();
                    let with = |value: &str| params.iter().fold(template.clone(), |path, name| path.replace(&format!("{{{name}}}"), value));
                    let schema = &op["requestBody"]["content"]["application/json"]["schema"];
                    let fields = properties(&doc, schema);
                    for session in [&root, &admin] {
                        for hostile in HOSTILE {
                            // Each field of the body in turn.
                            for (field, _) in &fields {
                                let mut body: Map<String, Value> = fields.iter().cloned().collect();
                                body.insert(field.clone(), json!("HOSTILE"));
                                let text = serde_json::to_string(&body).unwrap().replace("\"HOSTILE\"", hostile);
                                let (status, what) = send(&kernel, session, &method, &with("00000000-0000-7000-8000-00000000abcd"), Some(text)).await;
                                tried += 1;
                                if status >= 500 { server_errors.push(format!("{what} {field}={hostile}: {status}")); }
                            }
                            // A query parameter.
                            let query = format!("{}?limit=10&action={}", with("00000000-0000-7000-8000-00000000abcd"), if hostile.contains("u0000") { "a%00" } else { "a%ED%A0%80" });
                            let (status, what) = send(&kernel, session, &method, &query, None).await;
                            tried += 1;
                            if status >= 500 { server_errors.push(format!("{what}: {status}")); }
                        }
                        // Each path parameter hostile.
                        if !params.is_empty() {
                            for hostile in HOSTILE_PATH {
                                let body = (!fields.is_empty()).then(|| json!({}).to_string());
                                let (status, what) = send(&kernel, session, &method, &with(hostile), body).await;
                                tried += 1;
                                if status >= 500 { server_errors.push(format!("{what}: {status}")); }
                            }
                        }
                    }
                }
            }
            // Unauthenticated endpoints read their bodies before any token.
            for (path, field) in [("/api/kernel/auth/login", "email"), ("/api/kernel/auth/refresh", "refresh_token"), ("/api/kernel/auth/token", "client_id"), ("/api/kernel/bootstrap", "email")] {
                for hostile in HOSTILE {
                    let body = format!(r#"{{"{field}": {hostile}, "tenant": "system", "password": "x", "grant_type": "client_credentials", "client_secret": "x", "name": "x"}}"#);
                    let r = kernel.client.post(kernel.url(path)).header("content-type", "application/json").body(body).send().await.unwrap();
                    tried += 1;
                    if r.status().as_u16() >= 500 { server_errors.push(format!("POST {path} {field}={hostile}: {}", r.status())); }
                }
            }
            assert!(tried > 300, "the document drove {tried} requests only");
            assert!(server_errors.is_empty(), "{} of {tried} requests answered 5xx: {server_errors:#?}", server_errors.len());
        }
    }
}
