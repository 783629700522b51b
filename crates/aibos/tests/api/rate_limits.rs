//! Rate limits (SPEC §9, docs/rate-limits.md): bursts refused with 429 and the
//! IETF headers, on the kernel's API and through the gateway, per client
//! address for anonymous requests, limits changed by a reload, and budgets
//! shared on Redis, which may go away and come back.

use std::time::{Duration, Instant};

use aibos_testkit::api::{PASSWORD, Session};
use aibos_testkit::redis::{OwnRedis, shared_url, unique_prefix};
use aibos_testkit::upstream::Upstream;
use aibos_testkit::{Engine, KernelOptions, TestKernel, spawn_kernel_with};
use reqwest::Method;
use serde_json::{Value, json};

use crate::{both_engines, expect_problem};

/// 100 a minute: one request every 0.6 s once the burst is spent.
const USER_INTERVAL: Duration = Duration::from_millis(600);

/// Environment of a kernel whose users get 100 a minute with a burst of 20,
/// and whose tenant and address budgets leave room.
fn user_limits(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("AIBOS_RATE_LIMIT__USER_PER_MINUTE", "100"),
        ("AIBOS_RATE_LIMIT__USER_BURST", "20"),
        ("AIBOS_RATE_LIMIT__TENANT_PER_MINUTE", "1000000"),
        ("AIBOS_RATE_LIMIT__TENANT_BURST", "1000000"),
        ("AIBOS_RATE_LIMIT__ADDRESS_PER_MINUTE", "1000000"),
        ("AIBOS_RATE_LIMIT__ADDRESS_BURST", "1000000"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push(((*k).to_owned(), (*v).to_owned()));
    }
    env
}

async fn kernel(engine: Engine, env: Vec<(String, String)>) -> Option<TestKernel> {
    spawn_kernel_with(
        engine,
        KernelOptions {
            env,
            ..KernelOptions::default()
        },
    )
    .await
}

/// What came back from a burst of requests.
struct Burst {
    admitted: usize,
    refused: usize,
}

/// Sends `n` requests at once (`request(i)`), checks every answer carries the
/// rate-limit headers (and every refusal is a 429 `RATE_LIMITED` with
/// `Retry-After`), and counts them. `policy` is the expected `RateLimit-Policy`.
async fn burst(
    n: usize,
    policy: &str,
    request: impl Fn(usize) -> reqwest::RequestBuilder,
) -> Burst {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        tasks.spawn(request(i).send());
    }
    let (mut admitted, mut refused) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        let response = done.unwrap().unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        assert_eq!(headers["ratelimit-policy"], policy, "status {status}");
        let state = headers["ratelimit"].to_str().unwrap().to_owned();
        if status == 429 {
            refused += 1;
            let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=60).contains(&retry), "Retry-After {retry}");
            assert!(state.contains(";r=0;t="), "{state}");
            let body = expect_problem(response, 429, "RATE_LIMITED").await;
            assert!(body["detail"].as_str().unwrap().contains("limit"), "{body}");
        } else {
            assert!(status < 500, "an admitted request is served: {status}");
            assert!(state.contains(";r=") && state.contains(";t="), "{state}");
            admitted += 1;
        }
    }
    Burst { admitted, refused }
}

/// Asserts `admitted` (including `before` requests made earlier) is the GCRA
/// bound: the whole burst, plus at most what `elapsed` replenished.
fn assert_burst_bound(
    admitted: usize,
    before: usize,
    burst: u32,
    interval: Duration,
    since: Instant,
) {
    let elapsed = since.elapsed();
    let replenished = (elapsed.as_secs_f64() / interval.as_secs_f64()).floor() as usize;
    let total = admitted + before;
    assert!(
        total >= burst as usize && total <= burst as usize + replenished,
        "{admitted} admitted after {before}: the burst of {burst}, plus at most {replenished} in {elapsed:?}"
    );
}

/// A tenant `acme` with an administrator and two users who log in.
async fn tenant_users(k: &TestKernel) -> (Session, Session, Session, Instant) {
    let root = k.platform_admin().await;
    let admin = k.tenant_with_admin(&root, "acme").await;
    k.user(&admin, "one@acme.example").await;
    k.user(&admin, "two@acme.example").await;
    let started = Instant::now();
    let one = k.login("acme", "one@acme.example", PASSWORD).await.unwrap();
    let two = k.login("acme", "two@acme.example", PASSWORD).await.unwrap();
    (root, one, two, started)
}

both_engines! {
    async fn a_users_burst_beyond_the_limit_is_refused_with_the_three_headers_and_spares_other_users(engine: Engine) {
        let Some(k) = kernel(engine, user_limits(&[])).await else { return };
        let (_root, one, two, started) = tenant_users(&k).await;
        let policy = "\"user\";q=100;w=60, \"tenant\";q=1000000;w=60";
        let result = burst(160, policy, |_| k.as_(&one, Method::GET, "/api/kernel/auth/me")).await;
        // The login's own `me` call was the first of the user's budget.
        assert_burst_bound(result.admitted, 1, 20, USER_INTERVAL, started);
        assert_eq!(result.admitted + result.refused, 160);

        // Another user of the tenant is not affected.
        let response = k.as_(&two, Method::GET, "/api/kernel/auth/me").send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["ratelimit-policy"], policy);
        // Its login's `me` and this call spent two of its 20 (one may have come back since).
        let state = response.headers()["ratelimit"].to_str().unwrap().to_owned();
        assert!(state.starts_with("\"user\";r=18;") || state.starts_with("\"user\";r=19;"), "{state}");

        // Probes and the scrape are never limited, nor do they carry the headers.
        for path in ["/api/health/live", "/api/health", "/metrics"] {
            let response = k.as_(&one, Method::GET, path).send().await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
            assert!(response.headers().get("ratelimit").is_none(), "{path}");
        }
        let metrics = k.metrics_text().await;
        assert!(metrics.contains(&format!("aibos_rate_limited_total{{scope=\"user\"}} {}", result.refused)), "{metrics}");
    }

    async fn a_burst_through_the_gateway_is_limited_after_the_permission_check_and_a_routes_own_limit_replaces_the_users(engine: Engine) {
        let upstream = Upstream::start().await;
        let Some(k) = kernel(engine, user_limits(&[])).await else { return };
        let root = k.platform_admin().await;
        let (canon_id, _) = k.canon(&root, "payments", &upstream.base_url, &["finance.payment.read"]).await;
        k.route(&root, &canon_id, "GET", "/payments/{id}", &["finance.payment.read"], json!({})).await;
        k.route(&root, &canon_id, "GET", "/quotes/{id}", &["finance.payment.read"],
            json!({ "rate_limit": { "per_minute": 30, "burst": 5 } })).await;
        let admin = k.tenant_with_admin(&root, "acme").await;
        let role = k.role(&admin, "readers", &["finance.payment.read"]).await;
        let user_id = k.user(&admin, "payer@acme.example").await;
        k.assign(&admin, &user_id, &role).await;
        k.user(&admin, "nobody@acme.example").await;
        let started = Instant::now();
        let user = k.login("acme", "payer@acme.example", PASSWORD).await.unwrap();
        let nobody = k.login("acme", "nobody@acme.example", PASSWORD).await.unwrap();

        let policy = "\"user\";q=100;w=60, \"tenant\";q=1000000;w=60";
        let result = burst(160, policy, |i| k.as_(&user, Method::GET, &format!("/api/gateway/payments/payments/{i}"))).await;
        assert_burst_bound(result.admitted, 1, 20, USER_INTERVAL, started);
        assert_eq!(upstream.received().len(), result.admitted, "refused calls never reach the cell");

        // A route with its own limit counts the user apart, on that route only.
        let route_started = Instant::now();
        let route_policy = "\"route\";q=30;w=60, \"tenant\";q=1000000;w=60";
        let on_route = burst(12, route_policy, |i| k.as_(&user, Method::GET, &format!("/api/gateway/payments/quotes/{i}"))).await;
        assert_burst_bound(on_route.admitted, 0, 5, Duration::from_secs(2), route_started);

        // The permission check comes first: a caller without it gets 403, not 429.
        let response = k.as_(&nobody, Method::GET, "/api/gateway/payments/payments/1").send().await.unwrap();
        expect_problem(response, 403, "FORBIDDEN").await;
        let metrics = k.metrics_text().await;
        assert!(metrics.contains(&format!("aibos_rate_limited_total{{scope=\"route\"}} {}", on_route.refused)), "{metrics}");
    }

    async fn anonymous_requests_are_limited_per_client_address_which_only_a_trusted_proxy_may_name(engine: Engine) {
        let env = user_limits(&[
            ("AIBOS_RATE_LIMIT__ADDRESS_PER_MINUTE", "60"),
            ("AIBOS_RATE_LIMIT__ADDRESS_BURST", "5"),
        ]);
        // Failed logins, each for another account (so the login throttle,
        // five failures per account, stays out of the way): 401 when admitted.
        let login = |k: &TestKernel, forwarded: &str| {
            let email = format!("{}@nowhere.example", uuid::Uuid::new_v4().simple());
            k.client
                .post(k.url("/api/kernel/auth/login"))
                .header("x-forwarded-for", forwarded)
                .json(&json!({ "tenant": "nowhere", "email": email, "password": PASSWORD }))
        };
        let policy = "\"address\";q=60;w=60";

        // Without trusted proxies the peer is the client, whatever it claims.
        let Some(k) = kernel(engine, env.clone()).await else { return };
        let started = Instant::now();
        let mut admitted = 0;
        for i in 0..8 {
            let response = login(&k, &format!("198.51.100.{i}")).send().await.unwrap();
            assert_eq!(response.headers()["ratelimit-policy"], policy);
            if response.status() != 429 {
                admitted += 1;
            }
        }
        assert_burst_bound(admitted, 0, 5, Duration::from_secs(1), started);

        // Behind a trusted proxy, X-Forwarded-For names the client.
        let mut env = env;
        env.push(("AIBOS_SERVER__TRUSTED_PROXIES".into(), "[\"127.0.0.0/8\"]".into()));
        let Some(k) = kernel(engine, env).await else { return };
        let started = Instant::now();
        let first = burst(8, policy, |_| login(&k, "198.51.100.7")).await;
        assert_burst_bound(first.admitted, 0, 5, Duration::from_secs(1), started);
        let other = login(&k, "198.51.100.8").send().await.unwrap();
        assert_ne!(other.status(), 429, "another client behind the proxy has its own budget");
        // IPv6 clients are counted by their /64.
        let started = Instant::now();
        let v6 = burst(8, policy, |i| login(&k, &format!("2001:db8:1:2::{i:x}"))).await;
        assert_burst_bound(v6.admitted, 0, 5, Duration::from_secs(1), started);
    }

    async fn a_reloaded_limit_applies_to_the_next_request(engine: Engine) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("aibos.toml");
        let write = |burst: u32| {
            std::fs::write(&file, format!("[rate_limit]\nuser_per_minute = 1\nuser_burst = {burst}\n")).unwrap();
        };
        write(100);
        let options = KernelOptions {
            env: vec![("AIBOS_RATE_LIMIT__TENANT_PER_MINUTE".into(), "1000000".into())],
            config_file: Some(file.clone()),
            ..KernelOptions::default()
        };
        let Some(k) = spawn_kernel_with(engine, options).await else { return };
        let root = k.platform_admin().await;
        let me = || k.as_(&root, Method::GET, "/api/kernel/auth/me");
        assert_eq!(me().send().await.unwrap().status(), 200);
        let before = me().send().await.unwrap();
        assert!(before.headers()["ratelimit-policy"].to_str().unwrap().starts_with("\"user\";q=1;w=60"));

        // Root has used 3 of its burst: a burst of 3 leaves nothing.
        write(3);
        let outcome = k.state.reload().await.expect("the new file is valid");
        assert!(outcome.applied.contains(&"rate_limit.user_burst".to_owned()), "{outcome:?}");
        let response = me().send().await.unwrap();
        assert_eq!(response.status(), 429);
        assert!(response.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() > 1);
    }

    async fn two_kernels_sharing_redis_together_admit_no_more_than_the_limit(engine: Engine) {
        let Some(url) = shared_url().await else { return };
        let prefix = unique_prefix();
        let env = user_limits(&[
            ("AIBOS_RATE_LIMIT__REDIS_URL", url.as_str()),
            ("AIBOS_RATE_LIMIT__REDIS_PREFIX", prefix.as_str()),
            ("AIBOS_RATE_LIMIT__INSTANCES", "2"),
            ("AIBOS_RATE_LIMIT__REDIS_TIMEOUT_MS", "1000"),
        ]);
        let Some(first) = kernel(engine, env.clone()).await else { return };
        let second = spawn_kernel_with(engine, KernelOptions {
            env,
            database_url: Some(first.db.url().to_owned()),
            ..KernelOptions::default()
        }).await.unwrap();
        for k in [&first, &second] {
            let health: Value = k.client.get(k.url("/api/health")).send().await.unwrap().json().await.unwrap();
            assert_eq!(health["rate_limit"], json!({ "backend": "redis", "status": "ok" }));
        }
        let (_root, one, _two, started) = tenant_users(&first).await;
        let policy = "\"user\";q=100;w=60, \"tenant\";q=1000000;w=60";
        // One burst, every other request to the other kernel.
        let result = burst(160, policy, |i| {
            let k = if i % 2 == 0 { &first } else { &second };
            k.as_(&one, Method::GET, "/api/kernel/auth/me")
        })
        .await;
        assert_burst_bound(result.admitted, 1, 20, USER_INTERVAL, started);
        let metrics = first.metrics_text().await;
        assert!(metrics.contains("aibos_ratelimit_redis_duration_seconds_count"), "{metrics}");
    }

    async fn redis_stopped_mid_run_degrades_to_per_instance_limits_without_a_500_and_is_audited_both_ways(engine: Engine) {
        let Some(mut redis) = OwnRedis::spawn().await else { return };
        let url = redis.url();
        let env = user_limits(&[
            ("AIBOS_RATE_LIMIT__REDIS_URL", url.as_str()),
            ("AIBOS_RATE_LIMIT__INSTANCES", "2"),
            ("AIBOS_RATE_LIMIT__REDIS_TIMEOUT_MS", "200"),
        ]);
        let Some(k) = kernel(engine, env).await else { return };
        let health = || async {
            let response = k.client.get(k.url("/api/health")).send().await.unwrap();
            assert_eq!(response.status(), 200, "Redis never makes the kernel unhealthy");
            response.json::<Value>().await.unwrap()["rate_limit"]["status"].as_str().unwrap().to_owned()
        };
        let wait_for = |wanted: &'static str| {
            let health = &health;
            async move {
                let deadline = Instant::now() + Duration::from_secs(15);
                while health().await != wanted {
                    assert!(Instant::now() < deadline, "the rate limiter never became {wanted}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert_eq!(health().await, "ok");
        let (root, one, _two, _) = tenant_users(&k).await;
        let policy = "\"user\";q=100;w=60, \"tenant\";q=1000000;w=60";
        let shared = burst(30, policy, |_| k.as_(&one, Method::GET, "/api/kernel/auth/me")).await;
        assert!(shared.admitted >= 19 && shared.refused > 0);

        redis.stop().await;
        // Requests go on, never a 500; the first may meet the outage itself.
        let degraded_policy = "\"user\";q=50;w=60, \"tenant\";q=500000;w=60";
        let mut statuses = Vec::new();
        for _ in 0..5 {
            let response = k.as_(&root, Method::GET, "/api/kernel/auth/me").send().await.unwrap();
            statuses.push(response.status().as_u16());
        }
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        wait_for("degraded").await;
        // Each instance now takes its share: a burst of 10 for a fresh user budget.
        let started = Instant::now();
        let two = k.login("acme", "two@acme.example", PASSWORD).await.unwrap();
        let alone = burst(30, degraded_policy, |_| k.as_(&two, Method::GET, "/api/kernel/auth/me")).await;
        assert_burst_bound(alone.admitted, 1, 10, 2 * USER_INTERVAL, started);
        let degraded = k.audit(&root, "action=ratelimit.backend_degraded").await;
        assert_eq!(degraded.len(), 1, "one entry per transition: {degraded:?}");

        redis.start().await;
        wait_for("ok").await;
        // The transition is audited right after it is made: wait (bounded) for the entry.
        let mut restored = k.audit(&root, "action=ratelimit.backend_restored").await;
        for _ in 0..50 {
            if !restored.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            restored = k.audit(&root, "action=ratelimit.backend_restored").await;
        }
        assert_eq!(restored.len(), 1, "{restored:?}");
        assert_eq!(k.audit(&root, "action=ratelimit.backend_degraded").await.len(), 1);
        let response = k.as_(&root, Method::GET, "/api/kernel/auth/me").send().await.unwrap();
        assert_eq!(response.headers()["ratelimit-policy"], policy, "whole budgets again");
        let metrics = k.metrics_text().await;
        assert!(metrics.contains("aibos_ratelimit_backend_transitions_total{to=\"degraded\"} 1"), "{metrics}");
        assert!(metrics.contains("aibos_ratelimit_backend_transitions_total{to=\"restored\"} 1"), "{metrics}");
    }
}
