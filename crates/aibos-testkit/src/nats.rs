//! The NATS server of the relay tests, and reading what the relay stored.
//!
//! Tests run against a real `nats-server -js`: `AIBOS_TEST_NATS_URL`, else
//! `nats://127.0.0.1:4222`. When it cannot be reached the relay tests skip,
//! saying so, unless `AIBOS_REQUIRE_NATS=1` (CI), which makes them fail.
//! Tests share the server and its stream: each reads only the subjects of its
//! own tenants (`aibos.<unique slug>.>`), so parallel tests never see each
//! other's messages.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;

/// The server tests use when `AIBOS_TEST_NATS_URL` is not set.
const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// A connection to the test NATS server.
pub struct TestNats {
    /// Its URL, for `AIBOS_EVENTS__NATS_URL`.
    pub url: String,
    /// A JetStream context on it.
    pub jetstream: jetstream::Context,
}

/// A NATS server of the test's own: killed, and its storage removed, on drop.
pub struct OwnNats {
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

/// One message the relay stored, as a consumer reads it.
#[derive(Debug, Clone)]
pub struct Relayed {
    /// Its subject.
    pub subject: String,
    /// Its `Nats-Msg-Id` header.
    pub msg_id: Option<String>,
    /// Its body, parsed.
    pub body: serde_json::Value,
    /// Its place in the stream.
    pub stream_seq: u64,
}

impl TestNats {
    /// Connects; `None` (after saying why) when no server answers, unless
    /// `AIBOS_REQUIRE_NATS=1`, which panics instead: CI must not skip silently.
    pub async fn connect() -> Option<TestNats> {
        let url = std::env::var("AIBOS_TEST_NATS_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        let required = std::env::var("AIBOS_REQUIRE_NATS").as_deref() == Ok("1");
        let connected = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(url.as_str())
            .await;
        match connected {
            Ok(client) => Some(TestNats {
                url,
                jetstream: jetstream::new(client),
            }),
            Err(e) => {
                assert!(
                    !required,
                    "AIBOS_REQUIRE_NATS=1 but NATS at {url} cannot be reached: {e}"
                );
                eprintln!("skipped: NATS at {url} cannot be reached ({e})");
                None
            }
        }
    }

    /// Starts a NATS server of the test's own (`nats-server -js` on a free
    /// port, storing in a temporary folder), for tests that change its streams;
    /// stopped when the returned [`OwnNats`] is dropped. `None` (after saying
    /// why) when the binary is missing, unless `AIBOS_REQUIRE_NATS=1`.
    pub async fn spawn_own() -> Option<(TestNats, OwnNats)> {
        let required = std::env::var("AIBOS_REQUIRE_NATS").as_deref() == Ok("1");
        let Some(binary) = crate::installed_binary([
            "nats-server",
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
        ]) else {
            assert!(
                !required,
                "AIBOS_REQUIRE_NATS=1 but no nats-server binary is installed"
            );
            eprintln!("skipped: no nats-server binary is installed");
            return None;
        };
        let dir = tempfile::tempdir().expect("a temporary folder");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = tokio::process::Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start nats-server");
        let url = format!("nats://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = async_nats::connect(url.as_str()).await {
                let nats = TestNats {
                    url,
                    jetstream: jetstream::new(client),
                };
                return Some((
                    nats,
                    OwnNats {
                        _child: child,
                        _dir: dir,
                    },
                ));
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server did not start on {port}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every message stored on subjects matching `filter` (e.g.
    /// `aibos.<slug>.>`), in stream order, read with an ephemeral consumer.
    pub async fn messages(&self, filter: &str) -> Vec<Relayed> {
        let name = self
            .jetstream
            .stream_by_subject(filter)
            .await
            .expect("a stream captures the subjects");
        let stream = self.jetstream.get_stream(&name).await.expect("the stream");
        let mut consumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: filter.to_owned(),
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .expect("an ephemeral consumer");
        let pending = consumer.info().await.expect("consumer info").num_pending as usize;
        let mut out = Vec::with_capacity(pending);
        while out.len() < pending {
            let mut batch = consumer
                .fetch()
                .max_messages(pending - out.len())
                .expires(Duration::from_secs(5))
                .messages()
                .await
                .expect("fetch");
            let before = out.len();
            while let Some(message) = batch.next().await {
                let message = message.expect("a message");
                let stream_seq = message.info().expect("message info").stream_sequence;
                out.push(Relayed {
                    subject: message.subject.to_string(),
                    msg_id: message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Msg-Id"))
                        .map(|v| v.as_str().to_owned()),
                    body: serde_json::from_slice(&message.payload).expect("a JSON body"),
                    stream_seq,
                });
            }
            assert!(
                out.len() > before,
                "no message within 5 s; {before} of {pending}"
            );
        }
        out
    }

    /// The configuration of the stream that captures `subject`.
    pub async fn stream_config(&self, subject: &str) -> jetstream::stream::Config {
        let name = self
            .jetstream
            .stream_by_subject(subject)
            .await
            .expect("a stream captures the subject");
        let mut stream = self.jetstream.get_stream(&name).await.expect("the stream");
        stream.info().await.expect("stream info").config.clone()
    }
}
