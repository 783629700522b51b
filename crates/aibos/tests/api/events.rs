//! The event bus: publishing (the seed's Day 3 gate), reading from a position,
//! Server-Sent Events, and the ordering guarantee under concurrent publishers.

use std::collections::BTreeSet;
use std::time::Duration;

use aibos_testkit::api::{PASSWORD, Session};
use aibos_testkit::{Engine, TestKernel, spawn_kernel};
use reqwest::Method;
use serde_json::{Value, json};

use crate::expect_problem;

/// A tenant administrator of `slug` (who holds every tenant permission,
/// `kernel.event.*` included).
async fn tenant(kernel: &TestKernel, slug: &str) -> Session {
    let platform = kernel.platform_admin().await;
    kernel.tenant_with_admin(&platform, slug).await
}

async fn publish(kernel: &TestKernel, session: &Session, body: Value) -> reqwest::Response {
    kernel
        .as_(session, Method::POST, "/api/kernel/events/publish")
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn read(kernel: &TestKernel, session: &Session, query: &str) -> Value {
    let r = kernel
        .as_(session, Method::GET, &format!("/api/kernel/events?{query}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "read {query}");
    r.json().await.unwrap()
}

/// Reads a `text/event-stream` body into (id, event, data) messages until
/// `count` events arrived or the stream ended.
async fn sse_messages(
    response: &mut reqwest::Response,
    count: usize,
) -> Vec<(Option<String>, String, String)> {
    let mut text = String::new();
    let mut messages = Vec::new();
    while messages
        .iter()
        .filter(|(_, e, _): &&(Option<String>, String, String)| e != "lagged")
        .count()
        < count
    {
        let chunk = match tokio::time::timeout(Duration::from_secs(20), response.chunk()).await {
            Ok(Ok(Some(chunk))) => chunk,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => panic!("stream failed: {e}"),
            Err(_) => panic!("no event within 20 s; got {} so far", messages.len()),
        };
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let (mut id, mut event, mut data) = (None, String::from("message"), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if id.is_some() || !data.is_empty() {
                messages.push((id, event, data));
            }
        }
    }
    messages
}

crate::both_engines! {
    async fn publishing_is_locked_to_the_token_s_tenant_and_permission(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let acme = kernel.tenant_with_admin(&platform, "acme").await;
        let globex = kernel.tenant_with_admin(&platform, "globex").await;
        let body = json!({"type": "finance.payment.processed", "payload": {"amount_minor": 1250, "currency": "EUR"}, "subject": "payment/42"});

        // No token: 401.
        let r = kernel.client.post(kernel.url("/api/kernel/events/publish")).json(&body).send().await.unwrap();
        expect_problem(r, 401, "UNAUTHORIZED").await;

        // A token without kernel.event.publish: 403, and an authz.deny entry naming it.
        let clerk = kernel.user(&acme, "clerk@acme.example").await;
        let readers = kernel.role(&acme, "event-readers", &["kernel.event.read"]).await;
        kernel.assign(&acme, &clerk, &readers).await;
        let clerk = kernel.login("acme", "clerk@acme.example", PASSWORD).await.unwrap();
        let problem = expect_problem(publish(&kernel, &clerk, body.clone()).await, 403, "FORBIDDEN").await;
        assert_eq!(problem["missing_permissions"], json!(["kernel.event.publish"]));
        let denies = kernel.audit(&acme, "action=authz.deny").await;
        assert_eq!(denies.len(), 1, "{denies:?}");
        assert_eq!(denies[0]["actor_id"], clerk.subject_id.as_str());
        assert_eq!(denies[0]["details"]["required_permissions"], json!(["kernel.event.publish"]));
        assert_eq!(denies[0]["details"]["missing_permissions"], json!(["kernel.event.publish"]));
        assert!(read(&kernel, &clerk, "").await["items"].as_array().unwrap().iter().all(|e| e["type"] != "finance.payment.processed"), "nothing was stored");

        // With the permission: 201 {id, seq}, and the event readable as published.
        let r = publish(&kernel, &acme, body.clone()).await;
        assert_eq!(r.status(), 201);
        let correlation = r.headers()["x-correlation-id"].to_str().unwrap().to_owned();
        let published: Value = r.json().await.unwrap();
        let id = published["id"].as_str().unwrap();
        let seq = published["seq"].as_i64().unwrap();
        let event: Value = kernel.as_(&clerk, Method::GET, &format!("/api/kernel/events/{id}")).send().await.unwrap().json().await.unwrap();
        assert_eq!(event["seq"], seq);
        assert_eq!(event["tenant_id"], acme.tenant_id.as_str());
        assert_eq!(event["type"], "finance.payment.processed");
        assert_eq!(event["payload"], json!({"amount_minor": 1250, "currency": "EUR"}));
        assert_eq!(event["subject"], "payment/42");
        assert_eq!(event["version"], 1);
        assert_eq!(event["actor_type"], "user");
        assert_eq!(event["actor_id"], acme.subject_id.as_str());
        assert_eq!(event["source"], "user");
        assert_eq!(event["correlation_id"], correlation.as_str());
        let page = read(&kernel, &clerk, &format!("after_seq={}", seq - 1)).await;
        assert_eq!(page["items"][0]["id"], id);

        // Another tenant's id in the body: 400 and a security entry; nothing stored.
        let mut foreign = body.clone();
        foreign["tenant_id"] = json!(globex.tenant_id);
        let problem = expect_problem(publish(&kernel, &acme, foreign).await, 400, "VALIDATION_ERROR").await;
        assert_eq!(problem["errors"][0]["field"], "tenant_id");
        let security = kernel.audit(&acme, "action=security.cross_tenant_attempt").await;
        assert_eq!(security.len(), 1);
        assert_eq!(security[0]["details"]["named_tenant_id"], globex.tenant_id.as_str());
        // Its own tenant's id is accepted.
        let mut own = body.clone();
        own["tenant_id"] = json!(acme.tenant_id);
        assert_eq!(publish(&kernel, &acme, own).await.status(), 201);

        // Tenant B reads none of A's events, and cannot fetch one by id.
        let page = read(&kernel, &globex, "").await;
        assert!(page["items"].as_array().unwrap().iter().all(|e| e["tenant_id"] == globex.tenant_id.as_str()), "{page}");
        assert!(page["items"].as_array().unwrap().iter().all(|e| e["type"] != "finance.payment.processed"));
        let r = kernel.as_(&globex, Method::GET, &format!("/api/kernel/events/{id}")).send().await.unwrap();
        expect_problem(r, 404, "NOT_FOUND").await;
        // B's own sequence starts at its own beginning.
        let b: Value = publish(&kernel, &globex, json!({"type": "finance.payment.processed", "payload": {}})).await.json().await.unwrap();
        let b_page = read(&kernel, &globex, "types=finance.*").await;
        assert_eq!(b_page["items"].as_array().unwrap().len(), 1);
        assert_eq!(b_page["items"][0]["id"], b["id"]);
    }

    async fn bad_events_are_refused_with_the_field_named(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let acme = tenant(&kernel, "acme").await;
        for (body, field) in [
            (json!({"type": "Payment", "payload": {}}), "type"),
            (json!({"type": "finance", "payload": {}}), "type"),
            (json!({"type": format!("a.{}", "b".repeat(127)), "payload": {}}), "type"),
            (json!({"type": "finance.x", "payload": [1, 2]}), "payload"),
            (json!({"type": "finance.x", "payload": "text"}), "payload"),
            (json!({"type": "finance.x", "payload": {}, "version": 0}), "version"),
            (json!({"type": "finance.x", "payload": {}, "subject": ""}), "subject"),
            (json!({"type": "finance.x", "payload": {}, "tenant_id": "not-a-tenant' OR 1=1 --"}), "tenant_id"),
        ] {
            let problem = expect_problem(publish(&kernel, &acme, body.clone()).await, 400, "VALIDATION_ERROR").await;
            assert_eq!(problem["errors"][0]["field"], field, "{body}");
        }
        for body in [json!({"payload": {}}), json!({"type": "finance.x"}), json!({"type": "finance.x", "payload": {}, "extra": 1}), json!({"type": 7, "payload": {}})] {
            expect_problem(publish(&kernel, &acme, body).await, 400, "VALIDATION_ERROR").await;
        }
        let big = json!({"type": "finance.x", "payload": {"blob": "x".repeat(256 * 1024)}});
        expect_problem(publish(&kernel, &acme, big).await, 413, "PAYLOAD_TOO_LARGE").await;
        let just_fits = json!({"type": "finance.x", "payload": {"blob": "x".repeat(256 * 1024 - 12)}});
        assert_eq!(publish(&kernel, &acme, just_fits).await.status(), 201);
        for query in ["after_seq=-1", "after_seq=x", "limit=0", "limit=1001", "types=Finance", "types=a"] {
            let r = kernel.as_(&acme, Method::GET, &format!("/api/kernel/events?{query}")).send().await.unwrap();
            expect_problem(r, 400, "VALIDATION_ERROR").await;
        }
        let r = kernel.as_(&acme, Method::GET, "/api/kernel/events/not-a-uuid").send().await.unwrap();
        expect_problem(r, 400, "VALIDATION_ERROR").await;
        let r = kernel.as_(&acme, Method::GET, "/api/kernel/events/0197a1b2-0000-7000-8000-000000000001").send().await.unwrap();
        expect_problem(r, 404, "NOT_FOUND").await;
        // The payload is kept byte for byte: key order and number spelling included.
        let r = kernel.as_(&acme, Method::POST, "/api/kernel/events/publish").header("content-type", "application/json")
            .body(r#"{"type":"finance.raw","payload":{"z":1,"a":1.50,"m":{"y":[true,null]}}}"#).send().await.unwrap();
        let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
        let text = kernel.as_(&acme, Method::GET, &format!("/api/kernel/events/{id}")).send().await.unwrap().text().await.unwrap();
        assert!(text.contains(r#""payload":{"z":1,"a":1.50,"m":{"y":[true,null]}}"#), "{text}");
    }

    async fn types_filter_and_the_position_moves_past_what_it_skipped(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let acme = tenant(&kernel, "acme").await;
        let start = read(&kernel, &acme, "").await["next_after_seq"].as_i64().unwrap();
        for t in ["finance.payment.processed", "finance.payment.failed", "ledger.entry.posted", "finance.refund.issued"] {
            assert_eq!(publish(&kernel, &acme, json!({"type": t, "payload": {}})).await.status(), 201);
        }
        let page = read(&kernel, &acme, &format!("after_seq={start}&types=finance.payment.*,finance.refund.issued")).await;
        let types: Vec<&str> = page["items"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["finance.payment.processed", "finance.payment.failed", "finance.refund.issued"]);
        assert_eq!(page["next_after_seq"], start + 4);
        let page = read(&kernel, &acme, &format!("after_seq={start}&types=ledger.entry.posted&limit=1")).await;
        assert_eq!(page["items"][0]["type"], "ledger.entry.posted");
        assert_eq!(page["next_after_seq"], start + 3);
        assert_eq!(page["has_more"], true);
        // A filter matching nothing still moves the position, so a reader never re-scans.
        let page = read(&kernel, &acme, &format!("after_seq={start}&types=nothing.here")).await;
        assert_eq!(page["items"], json!([]));
        assert_eq!(page["next_after_seq"], start + 4);
        assert_eq!(page["has_more"], false);
        assert_eq!(page["next_cursor"], Value::Null);
        // Paging with limit=1 walks every event once, in order.
        let (mut after, mut seen) = (start, Vec::new());
        loop {
            let page = read(&kernel, &acme, &format!("after_seq={after}&limit=1")).await;
            let items = page["items"].as_array().unwrap();
            if items.is_empty() { break; }
            seen.push(items[0]["seq"].as_i64().unwrap());
            after = page["next_after_seq"].as_i64().unwrap();
        }
        assert_eq!(seen, (start + 1..=start + 4).collect::<Vec<_>>());
    }

    async fn concurrent_publishers_and_a_polling_consumer_agree_exactly(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let acme = tenant(&kernel, "acme").await;
        let start = read(&kernel, &acme, "").await["next_after_seq"].as_i64().unwrap();
        const PUBLISHERS: usize = 8;
        const EACH: usize = 500;
        let publishers: Vec<_> = (0..PUBLISHERS).map(|p| {
            let (client, url, token) = (kernel.client.clone(), kernel.url("/api/kernel/events/publish"), acme.access_token.clone());
            tokio::spawn(async move {
                let mut acknowledged = Vec::with_capacity(EACH);
                for i in 0..EACH {
                    let r = client.post(&url).bearer_auth(&token).json(&json!({"type": "load.test.published", "payload": {"p": p, "i": i}})).send().await.unwrap();
                    assert_eq!(r.status(), 201);
                    let body: Value = r.json().await.unwrap();
                    acknowledged.push((body["seq"].as_i64().unwrap(), body["id"].as_str().unwrap().to_owned()));
                }
                acknowledged
            })
        }).collect();
        // The consumer polls from its last position while the publishers run.
        let mut after = start;
        let mut seen: Vec<(i64, String)> = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while seen.len() < PUBLISHERS * EACH {
            assert!(tokio::time::Instant::now() < deadline, "consumer saw {} of {}", seen.len(), PUBLISHERS * EACH);
            let page = read(&kernel, &acme, &format!("after_seq={after}&limit=1000&types=load.test.published")).await;
            for e in page["items"].as_array().unwrap() {
                seen.push((e["seq"].as_i64().unwrap(), e["id"].as_str().unwrap().to_owned()));
            }
            after = page["next_after_seq"].as_i64().unwrap();
            if page["items"].as_array().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let mut acknowledged = Vec::new();
        for p in publishers {
            acknowledged.extend(p.await.unwrap());
        }
        // Exactly once, in seq order, with no gap.
        let seqs: Vec<i64> = seen.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (start + 1..=start + (PUBLISHERS * EACH) as i64).collect::<Vec<_>>());
        // Every acknowledged event is among them, under the seq it was acknowledged with.
        acknowledged.sort();
        assert_eq!(acknowledged, seen);
        let ids: BTreeSet<&String> = seen.iter().map(|(_, id)| id).collect();
        assert_eq!(ids.len(), PUBLISHERS * EACH);
    }

    async fn the_event_stream_resumes_after_a_forced_reconnect(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let acme = tenant(&kernel, "acme").await;
        let start = read(&kernel, &acme, "").await["next_after_seq"].as_i64().unwrap();
        let stream = |after: Option<i64>| {
            let mut request = kernel.as_(&acme, Method::GET, &format!("/api/kernel/events/stream?types=load.*&after_seq={start}"));
            if let Some(after) = after {
                request = request.header("last-event-id", after.to_string());
            }
            request.send()
        };
        let mut first = stream(None).await.unwrap();
        assert_eq!(first.status(), 200);
        assert!(first.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        const PUBLISHERS: usize = 8;
        const EACH: usize = 100;
        let publishers: Vec<_> = (0..PUBLISHERS).map(|p| {
            let (client, url, token) = (kernel.client.clone(), kernel.url("/api/kernel/events/publish"), acme.access_token.clone());
            tokio::spawn(async move {
                for i in 0..EACH {
                    let r = client.post(&url).bearer_auth(&token).json(&json!({"type": "load.stream.published", "payload": {"p": p, "i": i}})).send().await.unwrap();
                    assert_eq!(r.status(), 201);
                }
            })
        }).collect();
        // Unrelated events are filtered out of the stream.
        assert_eq!(publish(&kernel, &acme, json!({"type": "other.thing.happened", "payload": {}})).await.status(), 201);
        // Read a part, then drop the connection mid-stream and resume by id.
        let part = sse_messages(&mut first, 250).await;
        drop(first);
        let last: i64 = part.last().unwrap().0.as_ref().unwrap().parse().unwrap();
        let mut second = stream(Some(last)).await.unwrap();
        let rest = sse_messages(&mut second, PUBLISHERS * EACH - part.len()).await;
        for p in publishers {
            p.await.unwrap();
        }
        let all: Vec<(i64, Value)> = part.iter().chain(&rest).map(|(id, event, data)| {
            assert_eq!(event, "load.stream.published");
            let envelope: Value = serde_json::from_str(data).unwrap();
            assert_eq!(envelope["seq"].as_i64().unwrap().to_string(), *id.as_ref().unwrap());
            (envelope["seq"].as_i64().unwrap(), envelope)
        }).collect();
        assert_eq!(all.len(), PUBLISHERS * EACH, "every event exactly once across the reconnect");
        let seqs: Vec<i64> = all.iter().map(|(s, _)| *s).collect();
        let mut sorted = seqs.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(seqs, sorted, "in seq order, none twice");
        let payloads: BTreeSet<(i64, i64)> = all.iter().map(|(_, e)| (e["payload"]["p"].as_i64().unwrap(), e["payload"]["i"].as_i64().unwrap())).collect();
        assert_eq!(payloads.len(), PUBLISHERS * EACH);

        // A bad Last-Event-ID is a 400, a stream needs kernel.event.read.
        let r = kernel.as_(&acme, Method::GET, "/api/kernel/events/stream").header("last-event-id", "x").send().await.unwrap();
        expect_problem(r, 400, "VALIDATION_ERROR").await;
        let r = kernel.client.get(kernel.url("/api/kernel/events/stream")).send().await.unwrap();
        expect_problem(r, 401, "UNAUTHORIZED").await;
    }

    async fn a_stream_ends_when_its_session_is_revoked(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let acme = tenant(&kernel, "acme").await;
        let reader = kernel.user(&acme, "reader@acme.example").await;
        let role = kernel.role(&acme, "event-readers", &["kernel.event.read"]).await;
        kernel.assign(&acme, &reader, &role).await;
        let session = kernel.login("acme", "reader@acme.example", PASSWORD).await.unwrap();
        let mut stream = kernel.as_(&session, Method::GET, "/api/kernel/events/stream?types=finance.*").send().await.unwrap();
        assert_eq!(stream.status(), 200);
        assert_eq!(publish(&kernel, &acme, json!({"type": "finance.a.b", "payload": {}})).await.status(), 201);
        assert_eq!(sse_messages(&mut stream, 1).await.len(), 1);
        let r = kernel.as_(&acme, Method::POST, &format!("/api/kernel/users/{reader}/sessions/revoke")).json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(publish(&kernel, &acme, json!({"type": "finance.a.c", "payload": {}})).await.status(), 201);
        // The next page is not sent: the stream ends instead.
        let after = sse_messages(&mut stream, 1).await;
        assert!(after.is_empty(), "a revoked session received {after:?}");
    }
}

crate::both_engines! {
    /// Publishers that hang up at random moments: whatever was stored is a
    /// gap-free run of the sequence holding every acknowledged event, and no
    /// pooled connection is left inside a transaction.
    async fn publishers_hanging_up_cut_nothing_in_half(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let acme = tenant(&kernel, "acme").await;
        let start = read(&kernel, &acme, "").await["next_after_seq"].as_i64().unwrap();
        let tasks: Vec<_> = (0..200u64).map(|i| {
            let (url, token) = (kernel.url("/api/kernel/events/publish"), acme.access_token.clone());
            tokio::spawn(async move {
                // Each its own connection; the odd ones abandoned after 0–120 ms
                // (some before their request is read, some while it is written),
                // the even ones waiting for their answer.
                let mut client = reqwest::Client::builder();
                if i % 2 == 1 {
                    client = client.timeout(Duration::from_micros(i * 7_919 % 120_000));
                }
                let client = client.build().unwrap();
                match client.post(url).bearer_auth(token).json(&json!({"type": "hangup.test.published", "payload": {"i": i}})).send().await {
                    Ok(r) if r.status() == 201 => r.json::<Value>().await.ok().map(|b| b["id"].as_str().unwrap().to_owned()),
                    _ => None,
                }
            })
        }).collect();
        let mut acknowledged = Vec::new();
        for t in tasks {
            acknowledged.extend(t.await.unwrap());
        }
        // Wait for the batches in flight to land, then read everything.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut stored = Vec::new();
        let mut after = start;
        loop {
            let page = read(&kernel, &acme, &format!("after_seq={after}&limit=1000")).await;
            let items = page["items"].as_array().unwrap().clone();
            if items.is_empty() { break; }
            after = page["next_after_seq"].as_i64().unwrap();
            stored.extend(items);
        }
        let seqs: Vec<i64> = stored.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
        assert_eq!(seqs, (start + 1..=start + stored.len() as i64).collect::<Vec<_>>(), "gap-free");
        let ids: BTreeSet<&str> = stored.iter().map(|e| e["id"].as_str().unwrap()).collect();
        for id in &acknowledged {
            assert!(ids.contains(id.as_str()), "acknowledged {id} is stored");
        }
        assert!(stored.len() >= acknowledged.len());
        eprintln!("{} acknowledged, {} stored of 200", acknowledged.len(), stored.len());
        assert!((100..200).contains(&acknowledged.len()), "every patient publisher got its answer, some others hung up first");
        if let aibos_kernel::db::Db::Postgres(pool) = kernel.state.db() {
            let stuck: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'")
                .fetch_one(pool).await.unwrap();
            assert_eq!(stuck, 0, "no pooled connection is left inside a transaction");
        }
        // The kernel still publishes.
        assert_eq!(publish(&kernel, &acme, json!({"type": "hangup.test.after", "payload": {}})).await.status(), 201);
    }

    /// `kill -9` while four publishers run: after a restart on the same
    /// database every event that got 201 is there under its seq, the sequence
    /// has no gap, and the audit chain verifies.
    async fn a_killed_kernel_keeps_every_acknowledged_event(engine: Engine) {
        use aibos_testkit::process::KernelProcess;
        const BINARY: &str = env!("CARGO_BIN_EXE_aibos");
        let cwd = tempfile::tempdir().unwrap();
        let test_db = match engine { Engine::Sqlite => None, Engine::Postgres => aibos_testkit::TestDb::create(engine).await };
        let key = "bootstrap-key-for-the-kill-test";
        let mut env = vec![("AIBOS_SERVER__BIND", "127.0.0.1:0"), ("AIBOS_AUTH__BOOTSTRAP_KEY", key)];
        if let Some(db) = &test_db {
            env.push(("AIBOS_DATABASE__URL", db.url()));
        }
        let client = reqwest::Client::new();
        let login = |base: String| {
            let client = client.clone();
            async move {
                let body: Value = client.post(format!("{base}/api/kernel/auth/login"))
                    .json(&json!({"tenant": "system", "email": "root@example.com", "password": PASSWORD}))
                    .send().await.unwrap().json().await.unwrap();
                body["access_token"].as_str().unwrap().to_owned()
            }
        };
        let mut first = KernelProcess::start(std::path::Path::new(BINARY), cwd.path(), &env).await.unwrap();
        let r = client.post(format!("{}/api/kernel/bootstrap", first.base_url)).header("x-bootstrap-key", key)
            .json(&json!({"email": "root@example.com", "password": PASSWORD, "name": "Root"})).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let token = login(first.base_url.clone()).await;
        let publishers: Vec<_> = (0..4).map(|p| {
            let (client, url, token) = (client.clone(), format!("{}/api/kernel/events/publish", first.base_url), token.clone());
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for i in 0.. {
                    match client.post(&url).bearer_auth(&token).json(&json!({"type": "kill.test.published", "payload": {"p": p, "i": i}})).send().await {
                        Ok(r) if r.status() == 201 => {
                            let body: Value = r.json().await.unwrap();
                            acknowledged.push((body["seq"].as_i64().unwrap(), body["id"].as_str().unwrap().to_owned()));
                        }
                        _ => return acknowledged,
                    }
                }
                acknowledged
            })
        }).collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        first.child.kill().await.unwrap(); // SIGKILL
        let mut acknowledged = Vec::new();
        for p in publishers {
            acknowledged.extend(p.await.unwrap());
        }
        assert!(acknowledged.len() > 20, "the publishers were running ({} acknowledged)", acknowledged.len());

        let second = KernelProcess::start(std::path::Path::new(BINARY), cwd.path(), &env).await.unwrap();
        let token = login(second.base_url.clone()).await;
        let mut stored = std::collections::BTreeMap::new();
        let mut after = 0;
        loop {
            // Every type: the bootstrap's kernel events come first in the sequence.
            let page: Value = client.get(format!("{}/api/kernel/events?after_seq={after}&limit=1000", second.base_url))
                .bearer_auth(&token).send().await.unwrap().json().await.unwrap();
            for e in page["items"].as_array().unwrap() {
                stored.insert(e["seq"].as_i64().unwrap(), e["id"].as_str().unwrap().to_owned());
            }
            if page["has_more"] != true { break; }
            after = page["next_after_seq"].as_i64().unwrap();
        }
        for (seq, id) in &acknowledged {
            assert_eq!(stored.get(seq), Some(id), "acknowledged event {seq} survived the kill");
        }
        let seqs: Vec<i64> = stored.keys().copied().collect();
        assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "gap-free after the restart");
        let verify: Value = client.get(format!("{}/api/kernel/audit/verify", second.base_url)).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
        assert_eq!(verify["valid"], true, "{verify}");
        // And it publishes on from where it was.
        let r: Value = client.post(format!("{}/api/kernel/events/publish", second.base_url)).bearer_auth(&token)
            .json(&json!({"type": "kill.test.published", "payload": {}})).send().await.unwrap().json().await.unwrap();
        assert_eq!(r["seq"].as_i64().unwrap(), seqs.len() as i64 + 1);
    }

    /// The cell SDK's `KernelClient::publish_event` against the real kernel.
    async fn the_cell_sdk_publishes_through_the_kernel(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let acme = tenant(&kernel, "acme").await;
        let publishers = kernel.role(&acme, "publishers", &["kernel.event.publish"]).await;
        let created: Value = kernel.as_(&acme, Method::POST, "/api/kernel/service-accounts")
            .json(&json!({"name": "payment-hub", "role_ids": [publishers]})).send().await.unwrap().json().await.unwrap();
        let client = aibos_cell::KernelClient::new(&kernel.base_url, created["client_id"].as_str().unwrap(), created["client_secret"].as_str().unwrap()).unwrap();
        let first = client.publish_event(&aibos_cell::NewEvent::new("finance.payment.processed", json!({"amount_minor": 1250})).with_subject("payment/42").with_version(2)).await.unwrap();
        let second = client.publish_event(&aibos_cell::NewEvent::new("finance.payment.processed", json!({"amount_minor": 99}))).await.unwrap();
        assert_eq!(second.seq, first.seq + 1);
        let event: Value = kernel.as_(&acme, Method::GET, &format!("/api/kernel/events/{}", first.id)).send().await.unwrap().json().await.unwrap();
        assert_eq!(event["source"], "payment-hub");
        assert_eq!(event["actor_type"], "service");
        assert_eq!(event["actor_id"], created["id"]);
        assert_eq!(event["version"], 2);
        assert_eq!(event["subject"], "payment/42");
        assert_eq!(event["payload"], json!({"amount_minor": 1250}));
        // A bad type comes back as the kernel's problem.
        let refused = client.publish_event(&aibos_cell::NewEvent::new("NotDotted", json!({}))).await;
        assert!(refused.is_err(), "{refused:?}");
    }
}

crate::both_engines! {
    /// Retention removes old events, but never one an enabled subscription
    /// has not reached yet; a disabled subscription holds nothing back.
    async fn retention_keeps_what_a_subscriber_is_still_owed(engine: Engine) {
        let options = aibos_testkit::KernelOptions {
            env: vec![("AIBOS_EVENTS__WEBHOOK_ALLOW_PRIVATE_NETWORKS".into(), "true".into()), ("AIBOS_EVENTS__RETENTION_DAYS".into(), "7".into())],
            ..Default::default()
        };
        let kernel = aibos_testkit::spawn_kernel_with(engine, options).await.unwrap();
        let platform = kernel.platform_admin().await;
        let acme = kernel.tenant_with_admin(&platform, "acme").await;
        let other = kernel.tenant_with_admin(&platform, "globex").await;
        // A subscription whose receiver refuses every connection: its first
        // event waits for a retry, and its cursor stays before it.
        let created: Value = kernel.as_(&acme, Method::POST, "/api/kernel/subscriptions")
            .json(&json!({"url": "http://127.0.0.1:9/hook", "event_types": ["old.*"], "description": "behind"}))
            .send().await.unwrap().json().await.unwrap();
        let subscription = created["id"].as_str().unwrap().to_owned();
        let mut first_owed = None;
        for i in 0..10 {
            let r = publish(&kernel, &acme, json!({"type": "old.event.published", "payload": {"i": i}})).await;
            assert_eq!(r.status(), 201);
            first_owed.get_or_insert(r.json::<Value>().await.unwrap()["seq"].as_i64().unwrap());
            assert_eq!(publish(&kernel, &other, json!({"type": "old.event.published", "payload": {"i": i}})).await.status(), 201);
        }
        let head = read(&kernel, &acme, "types=none.at.all").await["next_after_seq"].as_i64().unwrap();
        let other_head = read(&kernel, &other, "types=none.at.all").await["next_after_seq"].as_i64().unwrap();
        // Wait for the first failed attempt.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let deliveries: Value = kernel.as_(&acme, Method::GET, &format!("/api/kernel/subscriptions/{subscription}/deliveries")).send().await.unwrap().json().await.unwrap();
            if deliveries["items"].as_array().is_some_and(|d| !d.is_empty()) { break; }
            assert!(tokio::time::Instant::now() < deadline, "no delivery attempt: {deliveries}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The stuck backlog shows as the outbox's depth (read every 5 s).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let text = kernel.metrics_text().await;
            let depth = text.lines().find_map(|l| l.strip_prefix("aibos_webhook_outbox_events ")).and_then(|v| v.trim().parse::<f64>().ok());
            if depth.is_some_and(|d| d >= 10.0) { break; }
            assert!(tokio::time::Instant::now() < deadline, "outbox depth {depth:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Everything so far is a year old.
        aibos_kernel::with_db!(kernel.state.db(), pool => {
            sqlx::query("UPDATE events SET occurred_at = $1").bind("2025-12-01T00:00:00.000Z").execute(pool).await.unwrap();
        });
        assert_eq!(publish(&kernel, &acme, json!({"type": "new.event.published", "payload": {}})).await.status(), 201);

        let purged = aibos_kernel::events::retention::purge(&kernel.state, time::OffsetDateTime::now_utc()).await.unwrap();
        let seqs = |page: Value| page["items"].as_array().unwrap().iter().map(|e| e["seq"].as_i64().unwrap()).collect::<Vec<_>>();
        assert_eq!(seqs(read(&kernel, &acme, "limit=1000").await), (first_owed.unwrap()..=head + 1).collect::<Vec<_>>(), "what the subscription is owed, and the new event, stay");
        // The other tenant owes no one: all its old events go.
        assert_eq!(read(&kernel, &other, "limit=1000").await["items"], json!([]));
        // (and the system tenant's kernel events of the set-up, as old)
        assert!(purged.events > first_owed.unwrap() as u64 - 1 + other_head as u64, "{purged:?}");

        // Without the subscription nothing is owed any more.
        let r = kernel.as_(&acme, Method::DELETE, &format!("/api/kernel/subscriptions/{subscription}")).header("if-match", format!("\"{}\"", created["version"])).send().await.unwrap();
        assert_eq!(r.status(), 204);
        aibos_kernel::events::retention::purge(&kernel.state, time::OffsetDateTime::now_utc()).await.unwrap();
        // (that event, and the deletion's own kernel.subscription.deleted)
        assert_eq!(seqs(read(&kernel, &acme, "limit=1000").await), [head + 1, head + 2], "only the events newer than the retention stay");
        // A reader at an old position simply continues after the gap.
        let page = read(&kernel, &acme, "after_seq=0&types=new.event.published").await;
        assert_eq!(page["items"][0]["seq"], head + 1);
    }
}
