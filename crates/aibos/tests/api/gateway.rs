//! The gateway against real upstream servers started by the tests: what reaches
//! the cell, what never does, and how failures look to the caller.

use std::path::Path;
use std::time::{Duration, Instant};

use aibos_cell::AssertionVerifier;
use aibos_testkit::api::{PASSWORD, Session};
use aibos_testkit::process::KernelProcess;
use aibos_testkit::upstream::{BIG_RESPONSE_BYTES, Upstream};
use aibos_testkit::{Engine, KernelOptions, TestDb, TestKernel, spawn_kernel, spawn_kernel_with};
use reqwest::Method;
use serde_json::{Value, json};

use crate::{both_engines, expect_problem};

const BINARY: &str = env!("CARGO_BIN_EXE_aibos");

/// A kernel with a canon `payments` in front of `upstream` (under `/v1`), routes
/// `GET /payments/{id}` and `POST /payments` needing `finance.payment.read` /
/// `finance.payment.execute`, and a user of tenant `acme` holding both.
struct Fixture {
    k: TestKernel,
    root: Session,
    user: Session,
    canon_id: String,
    secret: String,
}

/// [`fixture`] on a kernel of `engine` started with extra configuration `env`
/// (environment variables, as an operator would set them).
async fn fixture_configured(engine: Engine, upstream: &Upstream, env: &[(&str, &str)]) -> Fixture {
    let options = KernelOptions {
        env: env
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect(),
        ..KernelOptions::default()
    };
    let k = spawn_kernel_with(engine, options).await.unwrap();
    fixture(k, upstream).await
}

async fn fixture(k: TestKernel, upstream: &Upstream) -> Fixture {
    let root = k.platform_admin().await;
    let (canon_id, secret) = k
        .canon(
            &root,
            "payments",
            &format!("{}/v1", upstream.base_url),
            &["finance.payment.read", "finance.payment.execute"],
        )
        .await;
    k.route(
        &root,
        &canon_id,
        "GET",
        "/payments/{id}",
        &["finance.payment.read"],
        json!({}),
    )
    .await;
    k.route(
        &root,
        &canon_id,
        "POST",
        "/payments",
        &["finance.payment.execute"],
        json!({}),
    )
    .await;
    let admin = k.tenant_with_admin(&root, "acme").await;
    let role = k
        .role(
            &admin,
            "payers",
            &["finance.payment.read", "finance.payment.execute"],
        )
        .await;
    let user_id = k.user(&admin, "payer@acme.example").await;
    k.assign(&admin, &user_id, &role).await;
    let user = k
        .login("acme", "payer@acme.example", PASSWORD)
        .await
        .expect("the payer logs in");
    Fixture {
        k,
        root,
        user,
        canon_id,
        secret,
    }
}

both_engines! {
    async fn a_proxied_call_carries_exactly_the_forwarded_identity(engine: Engine) {
        let upstream = Upstream::start().await;
        let Some(k) = spawn_kernel(engine).await else { return };
        let Fixture { k, user, secret, root, .. } = fixture(k, &upstream).await;
        let correlation = "0190f3c4-7e2a-7c4e-9d1a-2b3c4d5e6f70";
        let response = k
            .as_(&user, Method::GET, "/api/gateway/payments/payments/42?expand=ledger&note=a%20b")
            .header("x-tenant-id", "someone-else")
            .header("x-user-sub", "root")
            .header("x-actor-type", "service")
            .header("x-kernel-assertion", "forged")
            .header("x-forwarded-for", "10.9.9.9")
            .header("cookie", "session=secret")
            .header("x-correlation-id", correlation)
            .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-correlation-id"], correlation);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["path"], "/v1/payments/42?expand=ledger&note=a%20b");

        let received = upstream.received();
        assert_eq!(received.len(), 1);
        let call = &received[0];
        assert_eq!(call.method, "GET");
        assert_eq!(call.version, "HTTP/1.1");
        assert_eq!(call.path_and_query, "/v1/payments/42?expand=ledger&note=a%20b");
        let h = &call.headers;
        assert!(h.get("authorization").is_none(), "no Authorization reaches the cell");
        assert!(h.get("cookie").is_none(), "no cookie unless the route allows it");
        assert_eq!(h["x-tenant-id"], user.tenant_id.as_str());
        assert_eq!(h["x-user-sub"], user.subject_id.as_str());
        assert_eq!(h["x-actor-type"], "user");
        assert_eq!(h["x-correlation-id"], correlation);
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert!(h.get_all("x-tenant-id").iter().count() == 1 && h.get_all("x-forwarded-for").iter().count() == 1);
        let traceparent = h["traceparent"].to_str().unwrap();
        assert!(traceparent.starts_with("00-0af7651916cd43dd8448eb211c80319c-"), "the trace continues: {traceparent}");
        assert_ne!(traceparent, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "with the kernel's own span");

        // The cell SDK accepts the assertion for this call, and only for it.
        let verifier = AssertionVerifier::new("payments", [secret.clone()]).unwrap();
        let verified = verifier.verify(&http::Method::GET, &call.path_and_query, h).expect("the SDK accepts the kernel's assertion");
        assert_eq!(verified.tenant_id, user.tenant_id);
        assert_eq!(verified.subject, user.subject_id);
        assert!(verifier.verify(&http::Method::GET, "/v1/payments/43", h).is_err(), "replayed on another path");
        assert!(verifier.verify(&http::Method::DELETE, &call.path_and_query, h).is_err(), "replayed with another method");
        let (_, other_secret) = k.canon(&root, "ledger", &upstream.base_url, &[]).await;
        let wrong_canon = AssertionVerifier::new("payments", [other_secret.clone()]).unwrap();
        assert!(wrong_canon.verify(&http::Method::GET, &call.path_and_query, h).is_err(), "signed with another canon's secret");
        let as_ledger = AssertionVerifier::new("ledger", [other_secret]).unwrap();
        assert!(as_ledger.verify(&http::Method::GET, &call.path_and_query, h).is_err(), "meant for another canon");
        let mut tampered = h.clone();
        let token = h["x-kernel-assertion"].to_str().unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims: Value = serde_json::from_slice(&base64_url(parts[1])).unwrap();
        claims["tid"] = json!(uuid::Uuid::now_v7().to_string());
        let forged = format!("{}.{}.{}", parts[0], base64_url_encode(&serde_json::to_vec(&claims).unwrap()), parts[2]);
        tampered.insert("x-kernel-assertion", forged.parse().unwrap());
        tampered.insert("x-tenant-id", claims["tid"].as_str().unwrap().parse().unwrap());
        assert!(verifier.verify(&http::Method::GET, &call.path_and_query, &tampered).is_err(), "a tampered assertion");
    }

    async fn calls_are_refused_before_the_cell_when_they_should_be(engine: Engine) {
        let upstream = Upstream::start().await;
        let Some(k) = spawn_kernel(engine).await else { return };
        let Fixture { k, root, user, .. } = fixture(k, &upstream).await;
        let tenant_admin = k.login("acme", "admin@acme.example", PASSWORD).await.unwrap();
        k.user(&tenant_admin, "clerk@acme.example").await;
        let clerk = k.login("acme", "clerk@acme.example", PASSWORD).await.unwrap();
        expect_problem(k.client.get(k.url("/api/gateway/payments/payments/1")).send().await.unwrap(), 401, "UNAUTHORIZED").await;
        let denied = expect_problem(k.as_(&clerk, Method::GET, "/api/gateway/payments/payments/1").send().await.unwrap(), 403, "FORBIDDEN").await;
        assert_eq!(denied["missing_permissions"], json!(["finance.payment.read"]));
        expect_problem(k.as_(&user, Method::GET, "/api/gateway/nope/payments/1").send().await.unwrap(), 404, "ROUTE_NOT_FOUND").await;
        expect_problem(k.as_(&user, Method::GET, "/api/gateway/payments/refunds/1").send().await.unwrap(), 404, "ROUTE_NOT_FOUND").await;
        expect_problem(k.as_(&user, Method::DELETE, "/api/gateway/payments/payments/1").send().await.unwrap(), 404, "ROUTE_NOT_FOUND").await;
        assert!(upstream.received().is_empty(), "none of these reached the cell");
        let denials = k.audit(&tenant_admin, "action=authz.deny").await;
        assert!(denials.iter().any(|d| d["details"]["missing_permissions"] == json!(["finance.payment.read"])), "{denials:?}");

        // A route change is in force on the next call (the table is rebuilt, no restart).
        let routes: Value = k.as_(&root, Method::GET, "/api/kernel/routes?limit=10").send().await.unwrap().json().await.unwrap();
        let get_route = routes["items"].as_array().unwrap().iter().find(|r| r["method"] == "GET").unwrap()["id"].as_str().unwrap().to_owned();
        assert_eq!(k.as_(&user, Method::GET, "/api/gateway/payments/payments/1").send().await.unwrap().status(), 200);
        assert_eq!(k.as_(&root, Method::DELETE, &format!("/api/kernel/routes/{get_route}")).send().await.unwrap().status(), 204);
        expect_problem(k.as_(&user, Method::GET, "/api/gateway/payments/payments/1").send().await.unwrap(), 404, "ROUTE_NOT_FOUND").await;
        // The cell's own answers pass through unchanged, bodies both ways.
        let posted = k.as_(&user, Method::POST, "/api/gateway/payments/payments").json(&json!({ "amount_minor": 100 })).send().await.unwrap();
        assert_eq!(posted.status(), 200);
        assert_eq!(posted.json::<Value>().await.unwrap()["method"], "POST");
    }

    async fn a_rotated_secret_keeps_calls_verifying_throughout(engine: Engine) {
        let upstream = Upstream::start().await;
        let Some(k) = spawn_kernel(engine).await else { return };
        let Fixture { k, root, user, canon_id, secret } = fixture(k, &upstream).await;
        let base = format!("/api/kernel/canons/{canon_id}/assertion-secrets");
        let new: Value = k.as_(&root, Method::POST, &base).send().await.unwrap().json().await.unwrap();
        let (new_kid, new_secret) = (new["kid"].as_str().unwrap().to_owned(), new["secret"].as_str().unwrap().to_owned());
        // The cell is redeployed with both secrets before the switch.
        let cell = AssertionVerifier::new("payments", [secret.clone(), new_secret.clone()]).unwrap();
        let old_only = AssertionVerifier::new("payments", [secret.clone()]).unwrap();
        let call = |n: u32| {
            let k = &k;
            let user = &user;
            async move {
                let r = k.as_(user, Method::GET, &format!("/api/gateway/payments/payments/{n}")).send().await.unwrap();
                assert_eq!(r.status(), 200);
            }
        };
        call(1).await;
        let activated = k.as_(&root, Method::POST, &format!("{base}/{new_kid}/activate")).send().await.unwrap();
        assert_eq!(activated.status(), 200);
        call(2).await;
        let old_kid = aibos_wire::assertion::secret_kid(&secret).unwrap().to_owned();
        assert_eq!(k.as_(&root, Method::DELETE, &format!("{base}/{old_kid}")).send().await.unwrap().status(), 204);
        call(3).await;
        let received = upstream.received();
        assert_eq!(received.len(), 3);
        for (i, r) in received.iter().enumerate() {
            cell.verify(&http::Method::GET, &r.path_and_query, &r.headers).unwrap_or_else(|e| panic!("call {i}: {e}"));
        }
        assert!(old_only.verify(&http::Method::GET, &received[0].path_and_query, &received[0].headers).is_ok());
        assert!(old_only.verify(&http::Method::GET, &received[1].path_and_query, &received[1].headers).is_err(), "signed with the new secret after activation");
    }
}

fn base64_url(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .unwrap()
}

fn base64_url_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Sends a request line exactly as written (no client-side path normalisation)
/// and returns the status code.
async fn raw_status(k: &TestKernel, method: &str, target: &str, token: &str) -> u16 {
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n",
        k.addr
    );
    let answer = k.raw_exchange(&head, None).await;
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn traversal_attempts_never_reach_the_cell() {
    let upstream = Upstream::start().await;
    let k = spawn_kernel(Engine::Sqlite).await.unwrap();
    let Fixture {
        k,
        root,
        user,
        canon_id,
        ..
    } = fixture(k, &upstream).await;
    k.route(
        &root,
        &canon_id,
        "GET",
        "/public/{file}",
        &["finance.payment.read"],
        json!({}),
    )
    .await;
    for target in [
        "/api/gateway/payments/public/../../admin",
        "/api/gateway/payments/public/../payments/1",
        "/api/gateway/payments/public/%2e%2e/payments/1",
        "/api/gateway/payments/public/%2E%2E%2Fpayments%2F1",
        "/api/gateway/payments/public/..%2fadmin",
        "/api/gateway/payments/public/%252e%252e%252fadmin",
        "/api/gateway/payments/public/%252e%252e",
        "/api/gateway/payments/public/..\\admin",
        "/api/gateway/payments/public/%5c..%5cadmin",
        "/api/gateway/payments/public/.",
        "/api/gateway/payments/./payments/1",
        "/api/gateway/payments//payments/1",
        "/api/gateway/payments/payments/1%2f..%2f2",
        "/api/gateway/payments/public/%00",
    ] {
        let status = raw_status(&k, "GET", target, &user.access_token).await;
        assert!(status == 400 || status == 404, "{target} answered {status}");
    }
    assert!(
        upstream.received().is_empty(),
        "the cell never saw a traversal: {:?}",
        upstream.received()
    );
    // A plain call through the same route does arrive.
    assert_eq!(
        raw_status(
            &k,
            "GET",
            "/api/gateway/payments/public/report.pdf",
            &user.access_token
        )
        .await,
        200
    );
    assert_eq!(upstream.received().len(), 1);
    assert_eq!(
        upstream.received()[0].path_and_query,
        "/v1/public/report.pdf"
    );
}

both_engines! {
    /// `/reports/export;x` would match `/reports/{id}` (and its permission) here,
    /// while Spring, Tomcat and others serve it as `/reports/export`: a `;`
    /// anywhere in the path, plain or encoded, is refused before any route is
    /// matched, and the cell never sees it.
    async fn a_semicolon_in_the_path_is_refused_before_matching(engine: Engine) {
        let upstream = Upstream::start().await;
        let Some(k) = spawn_kernel(engine).await else { return };
        let Fixture { k, root, user, canon_id, .. } = fixture(k, &upstream).await;
        k.route(&root, &canon_id, "GET", "/reports/{id}", &["finance.payment.read"], json!({})).await;
        for path in [
            "/api/gateway/payments/reports/export;x",
            "/api/gateway/payments/reports/export%3Bx",
            "/api/gateway/payments/reports/export%3bx",
            "/api/gateway/payments/reports;x/export",
            "/api/gateway/payments/reports/export;",
            "/api/gateway/payments;x/reports/export",
            "/api/gateway/payments%3B/reports/export",
        ] {
            let problem = expect_problem(k.as_(&user, Method::GET, path).send().await.unwrap(), 400, "VALIDATION_ERROR").await;
            assert!(problem.to_string().contains("';'"), "{path}: {problem}");
            // Not even a caller without the permission learns more than 400.
            let status = raw_status(&k, "GET", path, "not-a-token").await;
            assert_eq!(status, 400, "{path} before authentication");
        }
        assert!(upstream.received().is_empty(), "the cell never saw a ';': {:?}", upstream.received());
        let plain = k.as_(&user, Method::GET, "/api/gateway/payments/reports/export").send().await.unwrap();
        assert_eq!(plain.status(), 200);
        assert_eq!(upstream.received()[0].path_and_query, "/v1/reports/export");
    }
}

both_engines! {
    /// Headers that would make the cell serve another method or path than the
    /// one the gateway matched and authorized never reach it, however spelled.
    async fn method_and_url_overrides_never_reach_the_cell(engine: Engine) {
        let upstream = Upstream::start().await;
        let Some(k) = spawn_kernel(engine).await else { return };
        let Fixture { k, user, .. } = fixture(k, &upstream).await;
        let overrides = [
            ("X-HTTP-Method-Override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("X-Method-Override", "PUT"),
            ("X-Original-URL", "/admin/purge"),
            ("x-rewrite-url", "/admin/purge"),
            ("X-Forwarded-Prefix", "/evil"),
        ];
        let mut head = format!(
            "POST /api/gateway/payments/payments HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nConnection: close\r\nContent-Length: 2\r\nContent-Type: application/json\r\nX-Keep-Me: yes\r\n",
            k.addr, user.access_token
        );
        for (name, value) in overrides {
            head.push_str(&format!("{name}: {value}\r\n{}: {value}\r\n", name.to_ascii_uppercase()));
        }
        head.push_str("\r\n{}");
        let answer = k.raw_exchange(&head, None).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let received = upstream.received();
        assert_eq!(received.len(), 1);
        assert_eq!(received[0].method, "POST");
        let h = &received[0].headers;
        for (name, _) in overrides {
            assert!(h.get(name).is_none(), "{name} reached the cell");
        }
        assert_eq!(h["x-keep-me"], "yes", "other client headers still do");
    }
}

both_engines! {
    /// Fail closed: the route table is built from the registry a change leaves,
    /// before it commits; if that table would leave something out the table in
    /// force serves, the change rolls back and is refused, never answered 2xx
    /// with the old table serving.
    async fn a_change_whose_route_table_cannot_be_built_is_refused(engine: Engine) {
        let upstream = Upstream::start().await;
        let Some(k) = spawn_kernel(engine).await else { return };
        let Fixture { k, root, user, canon_id, .. } = fixture(k, &upstream).await;
        // Someone empties a route's permissions in the database by hand; the
        // table in force, built before, still requires them.
        let db = k.state.db();
        aibos_kernel::with_db!(db, pool => sqlx::query("UPDATE routes SET required_permissions = '[]' WHERE path = '/payments/{id}'")
            .execute(pool).await.unwrap().rows_affected());
        let refunds = json!({ "canon_id": canon_id, "method": "GET", "path": "/refunds/{id}", "required_permissions": ["finance.payment.read"] });
        let create = || k.as_(&root, Method::POST, "/api/kernel/routes").json(&refunds).send();
        let problem = expect_problem(create().await.unwrap(), 409, "CONFLICT").await;
        assert!(problem["detail"].as_str().unwrap().contains("GET /payments/{id} names no permission"), "{problem}");
        // Rolled back: no route, no audit entry; the table in force is unchanged.
        let routes: Value = k.as_(&root, Method::GET, "/api/kernel/routes?limit=10").send().await.unwrap().json().await.unwrap();
        assert_eq!(routes["items"].as_array().unwrap().len(), 2, "{routes}");
        assert_eq!(k.audit(&root, "action=route.created").await.len(), 2);
        expect_problem(k.as_(&user, Method::GET, "/api/gateway/payments/refunds/1").send().await.unwrap(), 404, "ROUTE_NOT_FOUND").await;
        let tenant_admin = k.login("acme", "admin@acme.example", PASSWORD).await.unwrap();
        k.user(&tenant_admin, "clerk@acme.example").await;
        let clerk = k.login("acme", "clerk@acme.example", PASSWORD).await.unwrap();
        expect_problem(k.as_(&clerk, Method::GET, "/api/gateway/payments/payments/1").send().await.unwrap(), 403, "FORBIDDEN").await;
        assert!(upstream.received().is_empty());

        // Repairing the row through the API is a change that builds; then the refused one goes through.
        let broken = routes["items"].as_array().unwrap().iter().find(|r| r["path"] == "/payments/{id}").unwrap()["id"].as_str().unwrap().to_owned();
        let repaired = k.as_(&root, Method::PATCH, &format!("/api/kernel/routes/{broken}"))
            .json(&json!({ "required_permissions": ["finance.payment.read"] })).send().await.unwrap();
        assert_eq!(repaired.status(), 200);
        assert_eq!(create().await.unwrap().status(), 201);
        assert_eq!(k.as_(&user, Method::GET, "/api/gateway/payments/refunds/1").send().await.unwrap().status(), 200);
    }
}

both_engines! {
    async fn failures_timeouts_and_the_circuit_breaker(engine: Engine) {
        let upstream = Upstream::start().await;
        let Fixture {
            k,
            root,
            user,
            canon_id,
            ..
        } = fixture_configured(engine, &upstream, &[("AIBOS_GATEWAY__BREAKER_OPEN_SECONDS", "1")])
            .await;
        k.route(
            &root,
            &canon_id,
            "GET",
            "/slow",
            &[],
            json!({ "timeout_ms": 1000, "public_to_authenticated": true }),
        )
        .await;
        k.route(&root, &canon_id, "GET", "/flaky", &[], json!({ "public_to_authenticated": true }))
            .await;

        // 3 s upstream, 1 s timeout → 504 in 1–1.5 s.
        let started = Instant::now();
        let slow = k
            .as_(&user, Method::GET, "/api/gateway/payments/slow")
            .send()
            .await
            .unwrap();
        let took = started.elapsed();
        expect_problem(slow, 504, "UPSTREAM_TIMEOUT").await;
        assert!(
            took >= Duration::from_millis(1000) && took < Duration::from_millis(1500),
            "took {took:?}"
        );

        // The cell's 500s pass through unchanged, and five in a row open the circuit.
        upstream.set_flaky_status(500);
        for _ in 0..4 {
            let r = k
                .as_(&user, Method::GET, "/api/gateway/payments/flaky")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 500);
            assert_ne!(
                r.headers().get("content-type").map(|v| v.to_str().unwrap()),
                Some("application/problem+json")
            );
        }
        let reached = upstream.received().len();
        let started = Instant::now();
        let refused = k
            .as_(&user, Method::GET, "/api/gateway/payments/flaky")
            .send()
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(refused.status(), 503);
        assert!(refused.headers().contains_key("retry-after"));
        expect_problem(refused, 503, "UPSTREAM_UNAVAILABLE").await;
        assert!(
            took < Duration::from_millis(50),
            "an open circuit answers at once: {took:?}"
        );
        assert_eq!(
            upstream.received().len(),
            reached,
            "an open circuit does not call the cell"
        );
        let circuit = canon_json(&k, &root, &canon_id).await;
        assert_eq!(circuit["circuit"], "open");

        // After the half-open delay a healthy cell is used again.
        upstream.set_flaky_status(200);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            k.as_(&user, Method::GET, "/api/gateway/payments/flaky")
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(
            k.as_(&user, Method::GET, "/api/gateway/payments/flaky")
                .send()
                .await
                .unwrap()
                .status(),
            200
        );

        // A cell that is down → 503 at once.
        upstream.stop();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let down = k
            .as_(&user, Method::GET, "/api/gateway/payments/payments/1")
            .send()
            .await
            .unwrap();
        expect_problem(down, 503, "UPSTREAM_UNAVAILABLE").await;

        // Every failure is in the caller's tenant's audit trail, with its kind.
        let admin = k
            .login("acme", "admin@acme.example", PASSWORD)
            .await
            .unwrap();
        let errors = k.audit(&admin, "action=gateway.upstream_error").await;
        let kinds: Vec<&str> = errors
            .iter()
            .filter_map(|e| e["details"]["kind"].as_str())
            .collect();
        for kind in ["timeout", "status", "circuit_open", "unavailable"] {
            assert!(kinds.contains(&kind), "{kind} missing in {kinds:?}");
        }
        let status_entry = errors
            .iter()
            .find(|e| e["details"]["kind"] == "status")
            .unwrap();
        assert_eq!(status_entry["details"]["status"], 500);
        assert_eq!(status_entry["details"]["canon"], "payments");
        assert!(status_entry["details"]["latency_ms"].is_u64());
        let metrics = k.metrics_text().await;
        assert!(metrics.contains("aibos_gateway_calls_total{canon=\"payments\",route=\"GET /flaky\",outcome=\"circuit_open\"} 1"), "{metrics}");
    }
}

both_engines! {
    async fn health_checks_mark_a_failing_cell_and_bring_it_back(engine: Engine) {
        let upstream = Upstream::start().await;
        let Fixture {
            k,
            root,
            user,
            canon_id,
            ..
        } = fixture_configured(engine, &upstream, &[("AIBOS_GATEWAY__HEALTH_INTERVAL_SECONDS", "1")])
            .await;
        wait_for_status(&k, &root, &canon_id, "healthy").await;
        assert!(upstream.health_checks() >= 1);
        upstream.set_healthy(false);
        wait_for_status(&k, &root, &canon_id, "unhealthy").await;
        let before = upstream.received().len();
        let refused = k
            .as_(&user, Method::GET, "/api/gateway/payments/payments/1")
            .send()
            .await
            .unwrap();
        expect_problem(refused, 503, "UPSTREAM_UNAVAILABLE").await;
        assert_eq!(
            upstream.received().len(),
            before,
            "an unhealthy cell is not called"
        );
        upstream.set_healthy(true);
        wait_for_status(&k, &root, &canon_id, "healthy").await;
        assert_eq!(
            k.as_(&user, Method::GET, "/api/gateway/payments/payments/1")
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        let moves = health_moves(&k, &root).await;
        assert_eq!(
            moves,
            [["healthy", "unhealthy"], ["unhealthy", "healthy"]],
            "the first success after start is not news"
        );
        let metrics = k.metrics_text().await;
        assert!(
            metrics.contains("aibos_gateway_canon_healthy{canon=\"payments\"} 1"),
            "{metrics}"
        );
    }
}

both_engines! {
    async fn several_instances_audit_one_change_of_health_once(engine: Engine) {
        let upstream = Upstream::start().await;
        let every_second = [("AIBOS_GATEWAY__HEALTH_INTERVAL_SECONDS", "1")];
        let Fixture { k, root, canon_id, .. } =
            fixture_configured(engine, &upstream, &every_second).await;
        // A second instance on the same database, as behind a load balancer.
        let second = spawn_kernel_with(
            engine,
            KernelOptions {
                env: every_second
                    .iter()
                    .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                    .collect(),
                database_url: Some(k.db.url().to_owned()),
                ..KernelOptions::default()
            },
        )
        .await
        .unwrap();
        let (k_ref, second_ref, root_ref, canon_ref) = (&k, &second, &root, canon_id.as_str());
        let both_see = |want| async move {
            wait_for_status(k_ref, root_ref, canon_ref, want).await;
            wait_for_status(second_ref, root_ref, canon_ref, want).await;
        };
        both_see("healthy").await;
        upstream.set_healthy(false);
        both_see("unhealthy").await;
        upstream.set_healthy(true);
        both_see("healthy").await;
        // Each instance has had a check since, which records nothing new.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let moves = health_moves(&k, &root).await;
        assert_eq!(
            moves,
            [["healthy", "unhealthy"], ["unhealthy", "healthy"]],
            "one entry per change, whichever instance saw it first"
        );
    }
}

both_engines! {
    async fn a_restarted_kernel_remembers_a_canon_that_was_down(engine: Engine) {
        let upstream = Upstream::start().await;
        let db = TestDb::create(engine).await.unwrap();
        let on_the_database = || KernelOptions {
            env: vec![("AIBOS_GATEWAY__HEALTH_INTERVAL_SECONDS".to_owned(), "1".to_owned())],
            database_url: Some(db.url().to_owned()),
            ..KernelOptions::default()
        };
        let first = spawn_kernel_with(engine, on_the_database()).await.unwrap();
        let Fixture { k, root, canon_id, .. } = fixture(first, &upstream).await;
        wait_for_status(&k, &root, &canon_id, "healthy").await;
        upstream.set_healthy(false);
        wait_for_status(&k, &root, &canon_id, "unhealthy").await;
        k.shutdown().await.unwrap();

        // The cell is still down when the kernel comes back: nothing new to
        // record. Its recovery is a change from the failure recorded before.
        let restarted = spawn_kernel_with(engine, on_the_database()).await.unwrap();
        wait_for_status(&restarted, &root, &canon_id, "unhealthy").await;
        upstream.set_healthy(true);
        wait_for_status(&restarted, &root, &canon_id, "healthy").await;
        let moves = health_moves(&restarted, &root).await;
        assert_eq!(moves, [["healthy", "unhealthy"], ["unhealthy", "healthy"]]);
    }
}

both_engines! {
    async fn a_stale_record_left_by_a_stopped_instance_does_not_hide_a_new_failure(engine: Engine) {
        let upstream = Upstream::start().await;
        let Fixture { k, root, canon_id, .. } =
            fixture_configured(engine, &upstream, &[("AIBOS_GATEWAY__HEALTH_INTERVAL_SECONDS", "1")]).await;
        wait_for_status(&k, &root, &canon_id, "healthy").await;
        // An instance that stopped long ago recorded a failure, and the canon
        // recovered after it had gone: the record says unhealthy, from then.
        let db = k.state.db();
        let recorded = aibos_kernel::with_db!(db, pool => sqlx::query(
            "UPDATE canon_health SET status = 'unhealthy', changed_at = '2020-01-01T00:00:00.000Z' WHERE canon_id = $1",
        )
        .bind(&canon_id)
        .execute(pool)
        .await
        .map(|done| done.rows_affected())
        .unwrap());
        assert_eq!(recorded, 1, "the first healthy check was recorded");
        upstream.set_healthy(false);
        wait_for_status(&k, &root, &canon_id, "unhealthy").await;
        // Recorded within the same check: the entry is there once the status is.
        assert_eq!(
            health_moves(&k, &root).await,
            [["healthy", "unhealthy"]],
            "the failure this instance saw is audited"
        );
    }
}

/// The `[from, to]` of every `canon.health_changed` entry, oldest first.
async fn health_moves(instance: &TestKernel, root: &Session) -> Vec<[String; 2]> {
    let changes = instance.audit(root, "action=canon.health_changed").await;
    changes
        .iter()
        .map(|c| {
            let word = |field: &str| c["details"][field].as_str().unwrap().to_owned();
            [word("from"), word("to")]
        })
        .collect()
}

/// `GET /api/kernel/canons/{canon_id}` on `instance`, as JSON.
async fn canon_json(instance: &TestKernel, root: &Session, canon_id: &str) -> Value {
    instance
        .as_(root, Method::GET, &format!("/api/kernel/canons/{canon_id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits (up to 5 s) until `instance` reports the canon's health as `want`.
async fn wait_for_status(instance: &TestKernel, root: &Session, canon_id: &str, want: &str) {
    for _ in 0..50 {
        if canon_json(instance, root, canon_id).await["status"] == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} never saw the canon {want}", instance.base_url);
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn big_and_live_streams_pass_through_without_buffering() {
    let upstream = Upstream::start().await;
    let cwd = tempfile::tempdir().unwrap();
    let key = "bootstrap-key-for-the-stream-test";
    let env = [
        ("AIBOS_SERVER__BIND", "127.0.0.1:0"),
        ("AIBOS_AUTH__BOOTSTRAP_KEY", key),
    ];
    let kernel = KernelProcess::start(Path::new(BINARY), cwd.path(), &env)
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", kernel.base_url);
    let r = client
        .post(url("/api/kernel/bootstrap"))
        .header("x-bootstrap-key", key)
        .json(&json!({"email": "root@example.com", "password": PASSWORD, "name": "Root"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let login: Value = client
        .post(url("/api/kernel/auth/login"))
        .json(&json!({"tenant": "system", "email": "root@example.com", "password": PASSWORD}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["access_token"].as_str().unwrap().to_owned();
    let canon: Value = client
        .post(url("/api/kernel/canons"))
        .bearer_auth(&token)
        .json(&json!({"name": "files", "base_url": upstream.base_url}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in ["/big", "/events"] {
        let r = client
            .post(url("/api/kernel/routes"))
            .bearer_auth(&token)
            .json(&json!({"canon_id": canon["id"], "method": "GET", "path": path, "public_to_authenticated": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let pid = kernel.child.id().unwrap();
    // Warm up allocator and pools with one small call, then measure the peak.
    let _ = client
        .get(url("/api/kernel/auth/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let before = peak_rss_kib(pid);
    let mut big = client
        .get(url("/api/gateway/files/big"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 200);
    let mut total = 0usize;
    while let Some(chunk) = big.chunk().await.unwrap() {
        total += chunk.len();
    }
    assert_eq!(total, BIG_RESPONSE_BYTES);
    let grew_kib = peak_rss_kib(pid).saturating_sub(before);
    assert!(
        grew_kib < 8 * 1024,
        "the kernel's peak memory grew by {grew_kib} KiB for a 20 MiB response"
    );

    // Server-Sent Events arrive as they are sent: the first event comes through
    // while the cell still holds the second back.
    let mut events = client
        .get(url("/api/gateway/files/events"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let first = tokio::time::timeout(Duration::from_secs(5), events.chunk())
        .await
        .expect("the first event arrives live")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"data: one\n\n");
    upstream.release_events();
    let second = tokio::time::timeout(Duration::from_secs(5), events.chunk())
        .await
        .expect("the second event arrives")
        .unwrap()
        .unwrap();
    assert_eq!(&second[..], b"data: two\n\n");
}

#[tokio::test]
async fn an_h2c_canon_is_called_over_http2_with_prior_knowledge() {
    let upstream = Upstream::start().await;
    let k = spawn_kernel(Engine::Sqlite).await.unwrap();
    let root = k.platform_admin().await;
    let response = k
        .as_(&root, Method::POST, "/api/kernel/canons")
        .json(&json!({ "name": "fast", "base_url": upstream.base_url, "protocol": "h2c" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let canon: Value = response.json().await.unwrap();
    assert_eq!(canon["protocol"], "h2c");
    k.route(
        &root,
        canon["id"].as_str().unwrap(),
        "POST",
        "/echo",
        &[],
        json!({ "public_to_authenticated": true }),
    )
    .await;
    let answer = k
        .as_(&root, Method::POST, "/api/gateway/fast/echo")
        .json(&json!({ "n": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let received = upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].version, "HTTP/2.0");
    assert_eq!(received[0].path_and_query, "/echo");
    // h2c is for plain http only.
    let refused = k
        .as_(&root, Method::POST, "/api/kernel/canons")
        .json(&json!({ "name": "tls", "base_url": "https://cell.internal", "protocol": "h2c" }))
        .send()
        .await
        .unwrap();
    let problem = expect_problem(refused, 400, "VALIDATION_ERROR").await;
    assert_eq!(problem["errors"][0]["field"], "protocol");
}

/// Gateway calls skip the router (`http::front`), not the edge: they get the
/// same correlation id, security headers, body limit and request metrics as
/// every other endpoint, and a bad request there never reaches the cell.
#[tokio::test]
async fn gateway_calls_pass_the_same_edge_as_every_endpoint() {
    let upstream = Upstream::start().await;
    let k = spawn_kernel(Engine::Sqlite).await.unwrap();
    let Fixture { k, user, .. } = fixture(k, &upstream).await;

    let ok = k
        .as_(&user, Method::GET, "/api/gateway/payments/payments/7")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let h = ok.headers();
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["referrer-policy"], "no-referrer");
    let generated = h["x-correlation-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(generated).is_ok(), "{generated}");
    assert_eq!(
        upstream.received()[0].headers["x-correlation-id"],
        generated,
        "the cell sees the id the client is answered with"
    );

    let unknown = k
        .as_(&user, Method::GET, "/api/gateway/payments/nowhere")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.headers()["x-frame-options"], "DENY");
    expect_problem(unknown, 404, "ROUTE_NOT_FOUND").await;

    let bad_id = k
        .as_(&user, Method::GET, "/api/gateway/payments/payments/7")
        .header("x-correlation-id", "'; DROP TABLE audit_log; --")
        .send()
        .await
        .unwrap();
    expect_problem(bad_id, 400, "VALIDATION_ERROR").await;

    let head = format!(
        "POST /api/gateway/payments/payments HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        k.addr,
        user.access_token,
        64 * 1024 * 1024
    );
    let answer = k.raw_exchange(&head, None).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(
        upstream.received().len(),
        1,
        "only the first call reached the cell"
    );

    let metrics = k.metrics_text().await;
    let gateway_requests = metrics
        .lines()
        .filter(|l| {
            l.starts_with("aibos_http_requests_total{")
                && l.contains("route=\"/api/gateway/{canon}/{*path}\"")
        })
        .count();
    assert!(
        gateway_requests >= 3,
        "gateway calls are counted under the router's pattern: {metrics}"
    );
}

/// With CORS configured, gateway calls go through the router so that its CORS
/// layer answers a browser's preflight and marks the cell's answers.
#[tokio::test]
async fn with_cors_configured_gateway_calls_get_cors_answers() {
    let upstream = Upstream::start().await;
    let Fixture { k, user, .. } = fixture_configured(
        Engine::Sqlite,
        &upstream,
        &[(
            "AIBOS_SERVER__CORS_ALLOWED_ORIGINS",
            "[\"https://app.example.com\"]",
        )],
    )
    .await;
    let preflight = k
        .client
        .request(Method::OPTIONS, k.url("/api/gateway/payments/payments/7"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let call = k
        .as_(&user, Method::GET, "/api/gateway/payments/payments/7")
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(call.status(), 200);
    assert_eq!(
        call.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(call.headers()["x-frame-options"], "DENY");
    assert_eq!(
        upstream.received().len(),
        1,
        "the preflight never reaches the cell"
    );
}

both_engines! {
    /// A safe request whose cell refuses the connection is retried, after a
    /// jittered wait, within the retry budget; the retry carries everything the
    /// first attempt did (identity headers and a valid assertion), and is counted.
    async fn a_refused_connection_is_retried_with_the_same_identity(engine: Engine) {
        let upstream = Upstream::start().await;
        let configuration = [
            // No periodic health check marks the stopped cell unhealthy mid-test.
            ("AIBOS_GATEWAY__HEALTH_INTERVAL_SECONDS", "3600"),
            ("AIBOS_GATEWAY__RETRY_MAX", "5"),
            ("AIBOS_GATEWAY__RETRY_BACKOFF_BASE_MS", "200"),
            ("AIBOS_GATEWAY__RETRY_BACKOFF_MAX_MS", "1000"),
        ];
        let Fixture {
            k, user, secret, ..
        } = fixture_configured(engine, &upstream, &configuration).await;
        let call = || {
            k.as_(&user, Method::GET, "/api/gateway/payments/payments/7")
                .send()
        };
        assert_eq!(call().await.unwrap().status(), 200);
        let retries = || async {
            let text = k.metrics_text().await;
            text.lines()
                .find(|l| l.starts_with("aibos_gateway_retries_total{canon=\"payments\"}"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        assert_eq!(retries().await, 0.0);

        // The cell goes away: its port refuses connections.
        let addr = upstream.stop();
        let refused = async {
            while tokio::net::TcpStream::connect(addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), refused)
            .await
            .expect("the stopped cell's port refuses connections");

        // A GET while it is away: the first attempt is refused and a retry waits;
        // the cell comes back on its port before the retries run out.
        let pending = tokio::spawn(call());
        let first_retry = async {
            while retries().await < 1.0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), first_retry)
            .await
            .expect("a refused connection is retried");
        let back = Upstream::start_on(addr).await;
        let answer = pending.await.unwrap().unwrap();
        assert_eq!(answer.status(), 200, "a retry reached the cell");
        let received = back.received();
        assert_eq!(received.len(), 1, "one attempt reached the cell");
        let h = &received[0].headers;
        assert_eq!(h["x-tenant-id"], user.tenant_id.as_str());
        assert_eq!(h["x-user-sub"], user.subject_id.as_str());
        assert!(h.get("authorization").is_none());
        let verifier = AssertionVerifier::new("payments", [secret]).unwrap();
        verifier
            .verify(&http::Method::GET, &received[0].path_and_query, h)
            .expect("the retried call's assertion verifies");
        assert!(retries().await >= 1.0);
    }
}
