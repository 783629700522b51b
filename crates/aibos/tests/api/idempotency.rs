//! `Idempotency-Key` (SPEC §8) through the gateway and on the kernel API: one
//! execution per tenant and key, under concurrency, across restarts, kernels
//! and crashes; stored answers replayed; mismatches, releases and bad keys.

use std::path::Path;
use std::time::Duration;

use aibos_testkit::api::{PASSWORD, Session};
use aibos_testkit::process::KernelProcess;
use aibos_testkit::upstream::{BIG_RESPONSE_BYTES, Upstream};
use aibos_testkit::{Engine, KernelOptions, TestDb, TestKernel, spawn_kernel, spawn_kernel_with};
use reqwest::Method;
use serde_json::{Value, json};

use crate::{both_engines, expect_problem};

const BINARY: &str = env!("CARGO_BIN_EXE_aibos");

/// A kernel with a canon `payments` in front of `upstream`, whose POST routes
/// are open to every authenticated caller: `/charge`, `/flaky`, `/slow` and
/// `/big` with `idempotency: optional`, `/strict/charge` with `required`,
/// `/loose/charge` with `off`; tenants `acme` (its administrator and a second
/// user) and `globex` (its administrator).
struct Fixture {
    k: TestKernel,
    acme: Session,
    acme_other: Session,
    globex: Session,
}

async fn routes(k: &TestKernel, root: &Session, upstream: &Upstream) {
    let (canon_id, _) = k
        .canon(root, "payments", &format!("{}/v1", upstream.base_url), &[])
        .await;
    for (path, mode) in [
        ("/charge", "optional"),
        ("/flaky", "optional"),
        ("/slow", "optional"),
        ("/big", "optional"),
        ("/strict/charge", "required"),
        ("/loose/charge", "off"),
    ] {
        k.route(
            root,
            &canon_id,
            "POST",
            path,
            &[],
            json!({"public_to_authenticated": true, "idempotency": mode}),
        )
        .await;
    }
}

async fn fixture(k: TestKernel, upstream: &Upstream) -> Fixture {
    let root = k.platform_admin().await;
    routes(&k, &root, upstream).await;
    let acme = k.tenant_with_admin(&root, "acme").await;
    k.user(&acme, "other@acme.example").await;
    let acme_other = k
        .login("acme", "other@acme.example", PASSWORD)
        .await
        .unwrap();
    let globex = k.tenant_with_admin(&root, "globex").await;
    Fixture {
        k,
        acme,
        acme_other,
        globex,
    }
}

/// `POST /api/gateway/payments{path}` with `key` and `body`.
fn post(
    k: &TestKernel,
    session: &Session,
    path: &str,
    key: Option<&str>,
    body: &Value,
) -> reqwest::RequestBuilder {
    let request = k
        .as_(
            session,
            Method::POST,
            &format!("/api/gateway/payments{path}"),
        )
        .json(body);
    match key {
        Some(key) => request.header("idempotency-key", key),
        None => request,
    }
}

/// Calls of the cell at paths ending in `suffix`.
fn cell_calls(upstream: &Upstream, suffix: &str) -> usize {
    upstream
        .received()
        .iter()
        .filter(|r| r.path_and_query.ends_with(suffix))
        .count()
}

/// What a client sees: status, the headers that matter here, body text.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    status: u16,
    replayed: bool,
    location: Option<String>,
    cell_ref: Option<String>,
    not_replayed: Option<String>,
    retry_after: Option<u64>,
    body: String,
}

async fn answer(response: reqwest::Response) -> Answer {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (status, replayed) = (
        response.status().as_u16(),
        header("idempotent-replayed").as_deref() == Some("true"),
    );
    let (location, cell_ref, not_replayed) = (
        header("location"),
        header("x-cell-ref"),
        header("x-not-replayed"),
    );
    let retry_after = header("retry-after").and_then(|v| v.parse().ok());
    Answer {
        status,
        replayed,
        location,
        cell_ref,
        not_replayed,
        retry_after,
        body: response.text().await.unwrap(),
    }
}

/// Sends every request at once; their answers in order.
async fn all(requests: Vec<reqwest::RequestBuilder>) -> Vec<Answer> {
    let sent: Vec<_> = requests
        .into_iter()
        .map(|r| tokio::spawn(async move { answer(r.send().await.unwrap()).await }))
        .collect();
    let mut answers = Vec::with_capacity(sent.len());
    for answered in sent {
        answers.push(answered.await.unwrap());
    }
    answers
}

/// Checks that `replay` is `first` served again from storage.
fn assert_replay_of(replay: &Answer, first: &Answer) {
    assert_eq!(replay.status, first.status, "{replay:?}");
    assert!(replay.replayed, "marked as a replay: {replay:?}");
    assert_eq!(replay.body, first.body, "the stored body");
    assert_eq!(replay.location, first.location, "Location is replayed");
    assert_eq!(
        replay.cell_ref, first.cell_ref,
        "a header the cell named is replayed"
    );
    assert_eq!(
        replay.not_replayed, None,
        "a header the cell did not name is not"
    );
}

both_engines! {
    /// The "done when" of SPEC §8: 50 identical POSTs at once, one key.
    async fn fifty_concurrent_posts_with_one_key_reach_the_cell_once(engine: Engine) {
        let upstream = Upstream::start().await;
        let Some(k) = spawn_kernel(engine).await else { return };
        let Fixture { k, acme, .. } = fixture(k, &upstream).await;
        let answers = all((0..50)
            .map(|_| post(&k, &acme, "/charge", Some("order-50"), &json!({"amount_minor": 1250})))
            .collect()).await;
        assert_eq!(cell_calls(&upstream, "/charge"), 1, "exactly one call reached the cell");
        let stored: Vec<&Answer> = answers.iter().filter(|a| a.status == 201).collect();
        assert!(!stored.is_empty(), "{answers:?}");
        let original = stored.iter().find(|a| !a.replayed).expect("the one execution's own answer");
        assert!(original.body.contains("\"charge\":1"), "{original:?}");
        for a in &answers {
            match a.status {
                201 => assert_eq!(a.body, original.body, "every stored answer is the same"),
                409 => {
                    assert!(a.body.contains("IDEMPOTENCY_IN_FLIGHT"), "{a:?}");
                    assert!(a.retry_after.is_some_and(|s| s >= 1), "with Retry-After: {a:?}");
                }
                other => panic!("unexpected {other}: {a:?}"),
            }
        }
        let replay = answer(post(&k, &acme, "/charge", Some("order-50"), &json!({"amount_minor": 1250})).send().await.unwrap()).await;
        assert_replay_of(&replay, original);
        assert_eq!(cell_calls(&upstream, "/charge"), 1, "the replay did not reach the cell");
        let metrics = k.metrics_text().await;
        assert!(metrics.contains("aibos_idempotency_executions_total 1"), "{metrics}");
        assert!(metrics.lines().any(|l| l.starts_with("aibos_idempotency_replays_total ")), "{metrics}");
    }

    /// Restarted on the same database, the kernel replays what it stored before.
    async fn a_stored_answer_is_replayed_after_a_restart(engine: Engine) {
        let upstream = Upstream::start().await;
        let Some(db) = TestDb::create(engine).await else { return };
        let on_the_database = || KernelOptions { database_url: Some(db.url().to_owned()), ..KernelOptions::default() };
        let first = spawn_kernel_with(engine, on_the_database()).await.unwrap();
        let Fixture { k, acme, .. } = fixture(first, &upstream).await;
        let original = answer(post(&k, &acme, "/charge", Some("restart-1"), &json!({"n": 1})).send().await.unwrap()).await;
        assert_eq!((original.status, original.replayed), (201, false), "{original:?}");
        let db = k.state.db();
        let stored: String = aibos_kernel::with_db!(db, pool => sqlx::query_scalar(
            "SELECT response_body FROM idempotency_records WHERE idempotency_key = 'restart-1'",
        ).fetch_one(pool).await.unwrap());
        assert!(stored.starts_with("enc:v1:") && !stored.contains("charge"), "the stored body is sealed at rest: {stored}");
        k.shutdown().await.unwrap();

        let restarted = spawn_kernel_with(engine, on_the_database()).await.unwrap();
        let replay = answer(post(&restarted, &acme, "/charge", Some("restart-1"), &json!({"n": 1})).send().await.unwrap()).await;
        assert_replay_of(&replay, &original);
        assert_eq!(cell_calls(&upstream, "/charge"), 1);
    }

    /// Same key with another body, by another user of the tenant, and in
    /// another tenant.
    async fn a_key_answers_only_its_own_request_principal_and_tenant(engine: Engine) {
        let upstream = Upstream::start().await;
        let Some(k) = spawn_kernel(engine).await else { return };
        let Fixture { k, acme, acme_other, globex } = fixture(k, &upstream).await;
        let first = answer(post(&k, &acme, "/charge", Some("k-1"), &json!({"amount_minor": 100})).send().await.unwrap()).await;
        assert_eq!(first.status, 201);

        let other_body = post(&k, &acme, "/charge", Some("k-1"), &json!({"amount_minor": 999})).send().await.unwrap();
        expect_problem(other_body, 422, "IDEMPOTENCY_KEY_REUSED").await;
        let other_path = post(&k, &acme, "/loose/charge", Some("k-1"), &json!({"amount_minor": 100})).send().await.unwrap();
        assert_eq!(other_path.status(), 201, "a route with idempotency off ignores the key");
        let other_user = post(&k, &acme_other, "/charge", Some("k-1"), &json!({"amount_minor": 100})).send().await.unwrap();
        let problem = expect_problem(other_user, 422, "IDEMPOTENCY_KEY_REUSED").await;
        assert!(!problem.to_string().contains("\"charge\""), "nothing of the first principal's answer: {problem}");
        assert_eq!(cell_calls(&upstream, "/charge"), 2, "the first call and the route without idempotency");

        let globex_answer = answer(post(&k, &globex, "/charge", Some("k-1"), &json!({"amount_minor": 100})).send().await.unwrap()).await;
        assert_eq!((globex_answer.status, globex_answer.replayed), (201, false), "another tenant's key is another key");
        assert_eq!(cell_calls(&upstream, "/charge"), 3);
        assert_ne!(globex_answer.body, first.body);
        let again = answer(post(&k, &globex, "/charge", Some("k-1"), &json!({"amount_minor": 100})).send().await.unwrap()).await;
        assert_replay_of(&again, &globex_answer);
        let metrics = k.metrics_text().await;
        assert!(metrics.contains("aibos_idempotency_mismatches_total 2"), "{metrics}");
    }

    /// A 5xx or an answer too large to store releases the key: the next try
    /// reaches the cell again.
    async fn failures_and_oversized_answers_release_the_key(engine: Engine) {
        let upstream = Upstream::start().await;
        let Some(k) = spawn_kernel(engine).await else { return };
        let Fixture { k, acme, .. } = fixture(k, &upstream).await;
        upstream.set_flaky_status(500);
        let failed = post(&k, &acme, "/flaky", Some("retry-me"), &json!({})).send().await.unwrap();
        assert_eq!(failed.status(), 500);
        upstream.set_flaky_status(200);
        let retried = answer(post(&k, &acme, "/flaky", Some("retry-me"), &json!({})).send().await.unwrap()).await;
        assert_eq!((retried.status, retried.replayed), (200, false), "executed again: {retried:?}");
        assert_eq!(cell_calls(&upstream, "/flaky"), 2);
        let replay = answer(post(&k, &acme, "/flaky", Some("retry-me"), &json!({})).send().await.unwrap()).await;
        assert_eq!((replay.status, replay.replayed), (200, true));
        assert_eq!(cell_calls(&upstream, "/flaky"), 2);

        for round in 1..=2 {
            let big = post(&k, &acme, "/big", Some("too-big"), &json!({})).send().await.unwrap();
            assert_eq!(big.status(), 200);
            assert!(big.headers().get("idempotent-replayed").is_none());
            assert_eq!(big.bytes().await.unwrap().len(), BIG_RESPONSE_BYTES, "passed through whole");
            assert_eq!(cell_calls(&upstream, "/big"), round, "each try reaches the cell");
        }
        let metrics = k.metrics_text().await;
        assert!(metrics.contains("aibos_idempotency_oversized_passthroughs_total 2"), "{metrics}");
        assert!(metrics.contains("aibos_idempotency_released_total{reason=\"server_error\"} 1"), "{metrics}");
        assert!(metrics.contains("aibos_idempotency_released_total{reason=\"oversized\"} 2"), "{metrics}");
    }

    /// `required` refuses a mutation without a key; malformed keys are 400.
    async fn required_routes_refuse_calls_without_a_key_and_bad_keys_are_refused(engine: Engine) {
        let upstream = Upstream::start().await;
        let Some(k) = spawn_kernel(engine).await else { return };
        let Fixture { k, acme, .. } = fixture(k, &upstream).await;
        let without = post(&k, &acme, "/strict/charge", None, &json!({})).send().await.unwrap();
        expect_problem(without, 400, "IDEMPOTENCY_KEY_REQUIRED").await;
        let long = "k".repeat(256);
        for bad in [long.as_bytes(), b"tab\there".as_slice(), "caf\u{e9}".as_bytes()] {
            let value = reqwest::header::HeaderValue::from_bytes(bad).unwrap();
            let r = post(&k, &acme, "/strict/charge", None, &json!({})).header("idempotency-key", value).send().await.unwrap();
            let problem = expect_problem(r, 400, "VALIDATION_ERROR").await;
            assert_eq!(problem["errors"][0]["field"], "header:idempotency-key", "{problem}");
        }
        assert_eq!(cell_calls(&upstream, "/charge"), 0, "nothing reached the cell");
        let ok = post(&k, &acme, "/strict/charge", Some(&"k".repeat(255)), &json!({})).send().await.unwrap();
        assert_eq!(ok.status(), 201);
        let ok = post(&k, &acme, "/strict/charge", Some(" a key with spaces "), &json!({})).send().await.unwrap();
        assert_eq!(ok.status(), 201);
    }

    /// A client that hangs up while the cell works leaves the record
    /// completed: its retry is a replay.
    async fn a_client_hanging_up_still_leaves_the_answer_stored(engine: Engine) {
        let upstream = Upstream::start().await;
        let Some(k) = spawn_kernel(engine).await else { return };
        let Fixture { k, acme, .. } = fixture(k, &upstream).await;
        let impatient = reqwest::Client::builder().timeout(Duration::from_millis(150)).build().unwrap();
        let hung_up = impatient
            .post(k.url("/api/gateway/payments/charge"))
            .bearer_auth(&acme.access_token)
            .header("idempotency-key", "hang-up")
            .json(&json!({"n": 1}))
            .send()
            .await;
        assert!(hung_up.is_err(), "the client gave up before the cell answered");
        let mut replay = None;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let a = answer(post(&k, &acme, "/charge", Some("hang-up"), &json!({"n": 1})).send().await.unwrap()).await;
            if a.status != 409 {
                replay = Some(a);
                break;
            }
        }
        let replay = replay.expect("the key completed");
        assert_eq!((replay.status, replay.replayed), (201, true), "{replay:?}");
        assert!(replay.body.contains("\"charge\":1"));
        assert_eq!(cell_calls(&upstream, "/charge"), 1);
    }

    /// Expired records are purged, after which the key is new.
    async fn the_purge_deletes_expired_records(engine: Engine) {
        let upstream = Upstream::start().await;
        let Some(k) = spawn_kernel_with(engine, KernelOptions { env: vec![("AIBOS_IDEMPOTENCY__TTL_SECONDS".into(), "1".into())], ..KernelOptions::default() }).await else { return };
        let Fixture { k, acme, .. } = fixture(k, &upstream).await;
        assert_eq!(post(&k, &acme, "/charge", Some("short"), &json!({})).send().await.unwrap().status(), 201);
        let later = aibos_kernel::timestamp::now() + time::Duration::seconds(5);
        let purged = aibos_kernel::idempotency::purge::purge(&k.state, later).await.unwrap();
        assert_eq!(purged, 1);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let again = answer(post(&k, &acme, "/charge", Some("short"), &json!({})).send().await.unwrap()).await;
        assert_eq!((again.status, again.replayed), (201, false), "after its TTL the key is new: {again:?}");
        assert_eq!(cell_calls(&upstream, "/charge"), 2);
    }

    /// The "done when" for the kernel API: one role, one audit entry,
    /// one event; the second answer identical, marked as a replay.
    async fn a_kernel_mutation_replayed_writes_nothing_twice(engine: Engine) {
        let Some(k) = spawn_kernel(engine).await else { return };
        let root = k.platform_admin().await;
        let acme = k.tenant_with_admin(&root, "acme").await;
        let head = event_head(&k, &acme).await;
        let create = || k.as_(&acme, Method::POST, "/api/kernel/roles")
            .header("idempotency-key", "role-once")
            .json(&json!({"name": "clerks", "permissions": ["kernel.user.read"]}));
        let first = create().send().await.unwrap();
        assert_eq!(first.status(), 201);
        assert!(first.headers().get("idempotent-replayed").is_none());
        let etag = first.headers().get("etag").cloned();
        let first_body = first.text().await.unwrap();
        let second = create().send().await.unwrap();
        assert_eq!(second.status(), 201);
        assert_eq!(second.headers()["idempotent-replayed"], "true");
        assert_eq!(second.headers().get("etag").cloned(), etag);
        assert_eq!(second.headers()["content-type"], "application/json");
        assert_eq!(second.text().await.unwrap(), first_body, "the identical answer");
        let role_id = serde_json::from_str::<Value>(&first_body).unwrap()["id"].as_str().unwrap().to_owned();

        let roles: Value = k.as_(&acme, Method::GET, "/api/kernel/roles?limit=1000").send().await.unwrap().json().await.unwrap();
        let clerks = roles["items"].as_array().unwrap().iter().filter(|r| r["name"] == "clerks").count();
        assert_eq!(clerks, 1, "one role");
        let entries = k.audit(&acme, "action=role.created").await;
        assert_eq!(entries.iter().filter(|e| e.to_string().contains(&role_id)).count(), 1, "one audit entry");
        let events = events_after(&k, &acme, head).await;
        let created: Vec<&Value> = events.iter().filter(|e| e["type"] == "kernel.role.created").collect();
        assert_eq!(created.len(), 1, "one event: {events:?}");

        // Another body under the same key, another principal, a bad key.
        let other = k.as_(&acme, Method::POST, "/api/kernel/roles").header("idempotency-key", "role-once")
            .json(&json!({"name": "tellers", "permissions": []})).send().await.unwrap();
        expect_problem(other, 422, "IDEMPOTENCY_KEY_REUSED").await;
        let bad = k.as_(&acme, Method::POST, "/api/kernel/roles").header("idempotency-key", "")
            .json(&json!({"name": "tellers", "permissions": []})).send().await.unwrap();
        expect_problem(bad, 400, "VALIDATION_ERROR").await;

        // Publishing with a key publishes once.
        let head = event_head(&k, &acme).await;
        for _ in 0..2 {
            let r = k.as_(&acme, Method::POST, "/api/kernel/events/publish").header("idempotency-key", "publish-once")
                .json(&json!({"type": "finance.payment.processed", "payload": {"n": 1}})).send().await.unwrap();
            assert_eq!(r.status(), 201);
        }
        let published = events_after(&k, &acme, head).await;
        assert_eq!(published.iter().filter(|e| e["type"] == "finance.payment.processed").count(), 1, "{published:?}");

        // Login carries its credentials in the body: the key is ignored.
        for _ in 0..2 {
            let r = k.client.post(k.url("/api/kernel/auth/login")).header("idempotency-key", "login")
                .json(&json!({"tenant": "acme", "email": "admin@acme.example", "password": PASSWORD})).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert!(r.headers().get("idempotent-replayed").is_none());
        }
        // Without a token the handler answers, as without a key.
        let anonymous = k.client.post(k.url("/api/kernel/roles")).header("idempotency-key", "anon")
            .json(&json!({"name": "x", "permissions": []})).send().await.unwrap();
        expect_problem(anonymous, 401, "UNAUTHORIZED").await;
    }
}

/// The highest `seq` of `session`'s tenant's events.
async fn event_head(k: &TestKernel, session: &Session) -> i64 {
    events_after(k, session, 0)
        .await
        .iter()
        .filter_map(|e| e["seq"].as_i64())
        .max()
        .unwrap_or(0)
}

async fn events_after(k: &TestKernel, session: &Session, after: i64) -> Vec<Value> {
    let page: Value = k
        .as_(
            session,
            Method::GET,
            &format!("/api/kernel/events?after_seq={after}&limit=1000"),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    page["items"].as_array().unwrap().clone()
}

/// Two kernels on one PostgreSQL database admit one execution of a key, and
/// each replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_kernels_on_one_postgres_execute_a_key_once() {
    let upstream = Upstream::start().await;
    let Some(db) = TestDb::create(Engine::Postgres).await else {
        eprintln!("skipped: AIBOS_TEST_DATABASE_URL is not set");
        return;
    };
    let on_the_database = || KernelOptions {
        database_url: Some(db.url().to_owned()),
        ..KernelOptions::default()
    };
    let first = spawn_kernel_with(Engine::Postgres, on_the_database())
        .await
        .unwrap();
    let second = spawn_kernel_with(Engine::Postgres, on_the_database())
        .await
        .unwrap();
    let Fixture { k: first, acme, .. } = fixture(first, &upstream).await;
    // The second kernel learns the new routes by NOTIFY.
    for _ in 0..50 {
        let r = post(&second, &acme, "/flaky", None, &json!({}))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answers = all((0..40)
        .map(|i| {
            let k = if i % 2 == 0 { &first } else { &second };
            post(
                k,
                &acme,
                "/charge",
                Some("two-kernels"),
                &json!({"amount_minor": 5}),
            )
        })
        .collect())
    .await;
    assert_eq!(
        cell_calls(&upstream, "/charge"),
        1,
        "one execution across both kernels"
    );
    let original = answers
        .iter()
        .find(|a| a.status == 201 && !a.replayed)
        .expect("the execution's answer")
        .clone();
    for a in &answers {
        assert!(
            a.status == 409 || (a.status == 201 && a.body == original.body),
            "{a:?}"
        );
    }
    for k in [&first, &second] {
        let replay = answer(
            post(
                k,
                &acme,
                "/charge",
                Some("two-kernels"),
                &json!({"amount_minor": 5}),
            )
            .send()
            .await
            .unwrap(),
        )
        .await;
        assert_replay_of(&replay, &original);
    }
    assert_eq!(cell_calls(&upstream, "/charge"), 1);
}

both_engines! {
    /// `kill -9` while a keyed call waits on a slow cell: the key answers 409
    /// until its lock ends, then can be used again.
    async fn a_key_left_in_flight_by_a_killed_kernel_can_be_used_after_its_lock(engine: Engine) {
        let upstream = Upstream::start().await;
        let cwd = tempfile::tempdir().unwrap();
        let test_db = match engine { Engine::Sqlite => None, Engine::Postgres => match TestDb::create(engine).await { Some(db) => Some(db), None => return } };
        let key = "bootstrap-key-for-the-idempotency-kill-test";
        // The call's timeout (1 s) plus 5 s locks the key: 6 s.
        let mut env = vec![
            ("AIBOS_SERVER__BIND", "127.0.0.1:0"),
            ("AIBOS_AUTH__BOOTSTRAP_KEY", key),
            ("AIBOS_IDEMPOTENCY__LOCK_TIMEOUT_SECONDS", "2"),
            ("AIBOS_GATEWAY__DEFAULT_TIMEOUT_MS", "1000"),
        ];
        if let Some(db) = &test_db {
            env.push(("AIBOS_DATABASE__URL", db.url()));
        }
        let client = reqwest::Client::new();
        let mut first = KernelProcess::start(Path::new(BINARY), cwd.path(), &env).await.unwrap();
        let r = client.post(format!("{}/api/kernel/bootstrap", first.base_url)).header("x-bootstrap-key", key)
            .json(&json!({"email": "root@example.com", "password": PASSWORD, "name": "Root"})).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let login: Value = client.post(format!("{}/api/kernel/auth/login", first.base_url))
            .json(&json!({"tenant": "system", "email": "root@example.com", "password": PASSWORD}))
            .send().await.unwrap().json().await.unwrap();
        let token = login["access_token"].as_str().unwrap().to_owned();
        let canon: Value = client.post(format!("{}/api/kernel/canons", first.base_url)).bearer_auth(&token)
            .json(&json!({"name": "payments", "base_url": upstream.base_url})).send().await.unwrap().json().await.unwrap();
        let r = client.post(format!("{}/api/kernel/routes", first.base_url)).bearer_auth(&token)
            .json(&json!({"canon_id": canon["id"], "method": "POST", "path": "/slow", "public_to_authenticated": true, "idempotency": "required"}))
            .send().await.unwrap();
        assert_eq!(r.status(), 201);

        let call = |base: String| client.post(format!("{base}/api/gateway/payments/slow")).bearer_auth(&token)
            .header("idempotency-key", "crash").json(&json!({"n": 1})).send();
        let in_flight = tokio::spawn(call(first.base_url.clone()));
        for _ in 0..100 {
            if cell_calls(&upstream, "/slow") == 1 { break; }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(cell_calls(&upstream, "/slow"), 1, "the call reached the cell");
        first.child.kill().await.unwrap(); // SIGKILL
        assert!(in_flight.await.unwrap().is_err(), "the killed kernel never answered");

        let second = KernelProcess::start(Path::new(BINARY), cwd.path(), &env).await.unwrap();
        let blocked = call(second.base_url.clone()).await.unwrap();
        let retry_after: u64 = blocked.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
        let problem = expect_problem(blocked, 409, "IDEMPOTENCY_IN_FLIGHT").await;
        assert!((1..=6).contains(&retry_after), "Retry-After until the lock ends: {retry_after} {problem}");
        assert_eq!(cell_calls(&upstream, "/slow"), 1, "a 409 does not reach the cell");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let r = call(second.base_url.clone()).await.unwrap();
            if r.status() != 409 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the key stayed locked past its lock timeout");
        }
        assert_eq!(cell_calls(&upstream, "/slow"), 2, "after the lock the key is used again and reaches the cell");
    }
}

both_engines! {
    /// A route with `audit_calls`: every call the cell answers leaves one
    /// `gateway.call` entry under the request's correlation id; a keyed call's
    /// entry is written with its stored answer, and a replay writes none.
    async fn a_route_with_audit_calls_records_each_call_once_in_the_tenant_chain(engine: Engine) {
        let upstream = Upstream::start().await;
        let Some(k) = spawn_kernel(engine).await else { return };
        let root = k.platform_admin().await;
        let (canon_id, _) = k.canon(&root, "payments", &format!("{}/v1", upstream.base_url), &[]).await;
        for path in ["/charge", "/flaky"] {
            k.route(&root, &canon_id, "POST", path, &[],
                json!({"public_to_authenticated": true, "idempotency": "optional", "audit_calls": true})).await;
        }
        let acme = k.tenant_with_admin(&root, "acme").await;
        let call = |path: &str, key: Option<&str>, correlation: &str| {
            post(&k, &acme, path, key, &json!({"amount_minor": 700})).header("x-correlation-id", correlation)
        };
        let entries = |correlation: &'static str| {
            let (k, acme) = (&k, &acme);
            async move {
                k.audit(acme, &format!("action=gateway.call&correlation_id={correlation}")).await
            }
        };

        const PLAIN: &str = "0197a1b2-0000-7000-8000-000000000001";
        assert_eq!(call("/charge", None, PLAIN).send().await.unwrap().status(), 201);
        let plain = entries(PLAIN).await;
        assert_eq!(plain.len(), 1, "{plain:?}");
        let entry = &plain[0];
        assert_eq!((entry["outcome"].as_str(), entry["severity"].as_str()), (Some("success"), Some("info")));
        assert_eq!(entry["resource_type"], "canon");
        assert_eq!(entry["details"]["route"], "/charge");
        assert_eq!(entry["details"]["method"], "POST");
        assert_eq!(entry["details"]["status"], 201);
        assert_eq!(entry["details"]["idempotency_key"], Value::Null);
        assert_eq!(entry["actor_id"], acme.subject_id.as_str());

        const KEYED: &str = "0197a1b2-0000-7000-8000-000000000002";
        const REPLAY: &str = "0197a1b2-0000-7000-8000-000000000003";
        assert_eq!(call("/charge", Some("audited-1"), KEYED).send().await.unwrap().status(), 201);
        let replay = call("/charge", Some("audited-1"), REPLAY).send().await.unwrap();
        assert_eq!(replay.headers()["idempotent-replayed"], "true");
        assert_eq!(cell_calls(&upstream, "/charge"), 2);
        let keyed = entries(KEYED).await;
        assert_eq!(keyed.len(), 1, "{keyed:?}");
        assert_eq!(keyed[0]["details"]["idempotency_key"], "audited-1");
        assert!(entries(REPLAY).await.is_empty(), "a replay did not call the cell");

        const FAILED: &str = "0197a1b2-0000-7000-8000-000000000004";
        upstream.set_flaky_status(503);
        assert_eq!(call("/flaky", Some("audited-2"), FAILED).send().await.unwrap().status(), 503);
        let failed = entries(FAILED).await;
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!((failed[0]["outcome"].as_str(), failed[0]["severity"].as_str()), (Some("failure"), Some("warning")));
        assert_eq!(failed[0]["details"]["status"], 503);

        let verified: Value = k.as_(&acme, Method::GET, "/api/kernel/audit/verify").send().await.unwrap().json().await.unwrap();
        assert_eq!(verified["valid"], true, "{verified}");
    }
}
