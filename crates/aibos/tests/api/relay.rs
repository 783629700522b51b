//! The NATS JetStream relay (`events.nats_url`): every committed event once in
//! the stream, per tenant in seq order, `Nats-Msg-Id` = event id; across a
//! restart mid-stream, with the position lost, with NATS unreachable, and with
//! two kernels relaying one database. Against a real `nats-server -js`
//! (`aibos_testkit::nats`); each test reads only its own tenant's subjects.

use std::time::Duration;

use aibos_kernel::db::Db;
use aibos_kernel::events::store;
use aibos_testkit::api::{PASSWORD, Session};
use aibos_testkit::nats::{Relayed, TestNats};
use aibos_testkit::{Engine, KernelOptions, TestDb, TestKernel, spawn_kernel_with};
use reqwest::Method;
use serde_json::{Value, json};

/// How long a test waits for the relay to catch up.
const CATCH_UP_SECONDS: u64 = 30;

/// A slug no other test (or earlier run on the shared server) uses.
fn unique_slug() -> String {
    format!("relay-{}", uuid::Uuid::new_v4().simple())
}

/// A kernel on `db` relaying to `nats_url`.
async fn kernel(engine: Engine, db: &TestDb, nats_url: &str) -> TestKernel {
    spawn_kernel_with(
        engine,
        KernelOptions {
            env: vec![("AIBOS_EVENTS__NATS_URL".to_owned(), nats_url.to_owned())],
            database_url: Some(db.url().to_owned()),
            ..KernelOptions::default()
        },
    )
    .await
    .expect("the kernel starts")
}

async fn publish(kernel: &TestKernel, session: &Session, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let r = kernel
            .as_(session, Method::POST, "/api/kernel/events/publish")
            .json(&json!({"type": "finance.payment.processed", "payload": {"n": i}, "subject": format!("payment/{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "publish {i}");
        let body: Value = r.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    ids
}

/// Waits until the relay's position for `tenant_id` reaches its head; returns the head.
async fn caught_up(db: &Db, tenant_id: &str) -> i64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(CATCH_UP_SECONDS);
    loop {
        let head = store::head(db, tenant_id).await.unwrap();
        let position = store::relay_position(db, tenant_id).await.unwrap();
        if head > 0 && position == Some(head) {
            return head;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay did not catch up within {CATCH_UP_SECONDS} s: position {position:?}, head {head}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks that `messages` are the tenant's events 1..=head, each once, in seq
/// order, on `aibos.<slug>.<type>`, with `Nats-Msg-Id` = id; returns their ids.
fn exactly_once_in_order(
    messages: &[Relayed],
    slug: &str,
    tenant_id: &str,
    head: i64,
) -> Vec<String> {
    let seqs: Vec<i64> = messages
        .iter()
        .map(|m| m.body["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=head).collect::<Vec<_>>(),
        "each event once, in seq order"
    );
    for m in messages {
        assert_eq!(m.body["tenant_id"], tenant_id);
        let id = m.body["id"].as_str().unwrap();
        assert_eq!(m.msg_id.as_deref(), Some(id), "Nats-Msg-Id is the event id");
        assert_eq!(
            m.subject,
            format!("aibos.{slug}.{}", m.body["type"].as_str().unwrap())
        );
    }
    assert!(
        messages
            .windows(2)
            .all(|w| w[0].stream_seq < w[1].stream_seq)
    );
    messages
        .iter()
        .map(|m| m.body["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The value of an unlabelled metric in the Prometheus text, if present.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

crate::both_engines! {
    async fn each_published_event_is_stored_once_in_jetstream_in_seq_order_with_its_id(engine: Engine) {
        let Some(nats) = TestNats::connect().await else { return };
        let db = TestDb::create(engine).await.unwrap();
        let kernel = kernel(engine, &db, &nats.url).await;
        let platform = kernel.platform_admin().await;
        let slug = unique_slug();
        let acme = kernel.tenant_with_admin(&platform, &slug).await;
        // The tenant's creation published kernel events into its sequence first.
        let base = store::head(kernel.state.db(), &acme.tenant_id).await.unwrap();
        let ids = publish(&kernel, &acme, 40).await;

        let head = caught_up(kernel.state.db(), &acme.tenant_id).await;
        assert_eq!(head, base + 40);
        let messages = nats.messages(&format!("aibos.{slug}.>")).await;
        let relayed = exactly_once_in_order(&messages, &slug, &acme.tenant_id, head);
        for id in &ids {
            assert!(relayed.contains(id), "published event {id} is in the stream");
        }
        // The body is the envelope the API serves for the event.
        let last = messages.last().unwrap();
        let served: Value = kernel
            .as_(&acme, Method::GET, &format!("/api/kernel/events/{}", ids.last().unwrap()))
            .send().await.unwrap().json().await.unwrap();
        assert_eq!(last.body, served);
        assert_eq!(last.subject, format!("aibos.{slug}.finance.payment.processed"));

        // The stream the relay made: file storage, the duplicate window it counts on.
        let config = nats.stream_config(&format!("aibos.{slug}.x.y")).await;
        assert_eq!(config.storage, async_nats::jetstream::stream::StorageType::File);
        assert_eq!(config.duplicate_window, Duration::from_secs(aibos_kernel::limits::RELAY_DUPLICATE_WINDOW_SECONDS));

        // Metrics: what was relayed, and no lag once caught up (every tenant).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(CATCH_UP_SECONDS);
        loop {
            let text = kernel.metrics_text().await;
            let relayed_total = metric(&text, "aibos_events_relayed_total").unwrap_or(0.0);
            let lag = metric(&text, "aibos_events_relay_lag_events");
            if relayed_total >= head as f64 && lag == Some(0.0) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "relayed {relayed_total}, lag {lag:?}\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn a_restart_with_the_relay_position_lost_stores_each_event_once(engine: Engine) {
        let Some(nats) = TestNats::connect().await else { return };
        let db = TestDb::create(engine).await.unwrap();
        let first = kernel(engine, &db, &nats.url).await;
        let platform = first.platform_admin().await;
        let slug = unique_slug();
        let acme = first.tenant_with_admin(&platform, &slug).await;
        let base = store::head(first.state.db(), &acme.tenant_id).await.unwrap();
        publish(&first, &acme, 60).await;
        // Wait until the relay has stored something, then publish more and
        // stop the kernel while it relays them: the relay task is aborted
        // wherever it is.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(CATCH_UP_SECONDS);
        while store::relay_position(first.state.db(), &acme.tenant_id).await.unwrap().unwrap_or(0) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "the relay never moved");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        publish(&first, &acme, 150).await;
        let stopped_at = store::relay_position(first.state.db(), &acme.tenant_id).await.unwrap().unwrap();
        first.shutdown().await.unwrap();

        // A crash after JetStream stored events but before their position was
        // written, as far back as it goes: the position is lost entirely.
        let raw = connect(&db).await;
        match &raw {
            Db::Sqlite(aibos_kernel::db::SqliteDb { pool, .. }) => { sqlx::query("UPDATE event_relay_positions SET relayed_seq = 0 WHERE tenant_id = $1").bind(&acme.tenant_id).execute(pool).await.unwrap(); }
            Db::Postgres(pool) => { sqlx::query("UPDATE event_relay_positions SET relayed_seq = 0 WHERE tenant_id = $1").bind(&acme.tenant_id).execute(pool).await.unwrap(); }
        }
        raw.close().await;

        let second = kernel(engine, &db, &nats.url).await;
        let acme = second.login(&slug, &format!("admin@{slug}.example"), PASSWORD).await.unwrap();
        publish(&second, &acme, 20).await;
        let head = caught_up(second.state.db(), &acme.tenant_id).await;
        assert_eq!(head, base + 230);
        let messages = nats.messages(&format!("aibos.{slug}.>")).await;
        exactly_once_in_order(&messages, &slug, &acme.tenant_id, head);
        // What the first kernel had relayed was sent again and absorbed.
        let duplicates = metric(&second.metrics_text().await, "aibos_events_relay_duplicates_total").unwrap_or(0.0);
        assert!(duplicates >= stopped_at as f64, "{duplicates} duplicates acknowledged, {stopped_at} resent");
    }

    async fn with_nats_unreachable_the_kernel_serves_the_position_stays_and_a_later_relay_catches_up(engine: Engine) {
        let Some(nats) = TestNats::connect().await else { return };
        // A port nothing listens on.
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let db = TestDb::create(engine).await.unwrap();
        let down = kernel(engine, &db, &format!("nats://127.0.0.1:{closed}")).await;
        let platform = down.platform_admin().await;
        let slug = unique_slug();
        let acme = down.tenant_with_admin(&platform, &slug).await;
        let ids = publish(&down, &acme, 25).await;
        assert_eq!(ids.len(), 25, "publishing works without NATS");

        // The relay has looked (its lag gauge counts every unrelayed event)
        // and moved nothing.
        let expected_lag = store::relay_lag(down.state.db()).await.unwrap();
        assert!(expected_lag >= 25);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(CATCH_UP_SECONDS);
        loop {
            let text = down.metrics_text().await;
            if metric(&text, "aibos_events_relay_lag_events") == Some(expected_lag as f64) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "lag gauge never reached {expected_lag}\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(store::relay_position(down.state.db(), &acme.tenant_id).await.unwrap(), None);
        assert_eq!(metric(&down.metrics_text().await, "aibos_events_relayed_total").unwrap_or(0.0), 0.0);
        let r = down.as_(&acme, Method::GET, "/api/kernel/events?limit=1").send().await.unwrap();
        assert_eq!(r.status(), 200, "the kernel keeps serving");
        down.shutdown().await.unwrap();

        // With NATS reachable, everything stored meanwhile is relayed, once.
        let up = kernel(engine, &db, &nats.url).await;
        let head = caught_up(up.state.db(), &acme.tenant_id).await;
        let messages = nats.messages(&format!("aibos.{slug}.>")).await;
        let relayed = exactly_once_in_order(&messages, &slug, &acme.tenant_id, head);
        assert!(ids.iter().all(|id| relayed.contains(id)));
    }

    async fn two_kernels_on_one_database_store_each_event_once_in_seq_order(engine: Engine) {
        let Some(nats) = TestNats::connect().await else { return };
        let db = TestDb::create(engine).await.unwrap();
        let a = kernel(engine, &db, &nats.url).await;
        let b = kernel(engine, &db, &nats.url).await;
        let platform = a.platform_admin().await;
        let slug = unique_slug();
        let on_a = a.tenant_with_admin(&platform, &slug).await;
        let on_b = b.login(&slug, &format!("admin@{slug}.example"), PASSWORD).await.unwrap();
        let (from_a, from_b) = tokio::join!(publish(&a, &on_a, 60), publish(&b, &on_b, 60));
        let head = caught_up(a.state.db(), &on_a.tenant_id).await;
        let messages = nats.messages(&format!("aibos.{slug}.>")).await;
        let relayed = exactly_once_in_order(&messages, &slug, &on_a.tenant_id, head);
        assert!(from_a.iter().chain(&from_b).all(|id| relayed.contains(id)));
    }
}

/// A connection of the test's own to the kernels' database.
async fn connect(db: &TestDb) -> Db {
    let dir = tempfile::tempdir().unwrap();
    let sources = aibos_kernel::config::ConfigSources::new(
        dir.path(),
        [("AIBOS_DATABASE__URL".to_owned(), db.url().to_owned())],
    );
    Db::connect(
        &aibos_kernel::config::Config::load(&sources)
            .unwrap()
            .database,
    )
    .await
    .unwrap()
}

crate::both_engines! {
    async fn events_jetstream_refuses_stay_unrelayed_and_go_once_it_takes_them(engine: Engine) {
        let Some((nats, _server)) = TestNats::spawn_own().await else { return };
        // An operator's stream, which the relay uses as it is; once the kernel
        // events of the set-up are in, it takes 10 more messages and refuses the rest.
        let mut stream = nats.jetstream.create_stream(async_nats::jetstream::stream::Config {
            name: "OPERATORS".to_owned(),
            subjects: vec!["aibos.>".to_owned()],
            discard: async_nats::jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        }).await.unwrap();
        let db = TestDb::create(engine).await.unwrap();
        let kernel = kernel(engine, &db, &nats.url).await;
        let platform = kernel.platform_admin().await;
        let slug = unique_slug();
        let acme = kernel.tenant_with_admin(&platform, &slug).await;
        let base = caught_up(kernel.state.db(), &acme.tenant_id).await;
        caught_up(kernel.state.db(), aibos_kernel::identity::SYSTEM_TENANT_ID).await;
        let before = stream.info().await.unwrap().state.messages;
        let relayed_before = metric(&kernel.metrics_text().await, "aibos_events_relayed_total").unwrap();
        let mut limited = stream.info().await.unwrap().config.clone();
        limited.max_messages = before as i64 + 10;
        nats.jetstream.update_stream(limited).await.unwrap();
        publish(&kernel, &acme, 25).await;

        // The position moves past the ten acknowledged events, and no further.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(CATCH_UP_SECONDS);
        while store::relay_position(kernel.state.db(), &acme.tenant_id).await.unwrap() != Some(base + 10) {
            assert!(tokio::time::Instant::now() < deadline, "position {:?}", store::relay_position(kernel.state.db(), &acme.tenant_id).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Something that must not happen: given the relay's first retries
        // (250, 500 and 1000 ms apart) to happen in.
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        assert_eq!(store::relay_position(kernel.state.db(), &acme.tenant_id).await.unwrap(), Some(base + 10));
        assert_eq!(stream.info().await.unwrap().state.messages, before + 10);
        let text = kernel.metrics_text().await;
        assert_eq!(metric(&text, "aibos_events_relayed_total"), Some(relayed_before + 10.0), "{text}");
        assert_eq!(metric(&text, "aibos_events_relay_lag_events"), Some(15.0), "{text}");

        // Once the stream takes more, the relay resumes from its position.
        let mut config = stream.info().await.unwrap().config.clone();
        config.max_messages = -1;
        nats.jetstream.update_stream(config).await.unwrap();
        let head = caught_up(kernel.state.db(), &acme.tenant_id).await;
        assert_eq!(head, base + 25);
        let messages = nats.messages(&format!("aibos.{slug}.>")).await;
        exactly_once_in_order(&messages, &slug, &acme.tenant_id, head);
    }
}
