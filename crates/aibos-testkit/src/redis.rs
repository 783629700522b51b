//! Redis for the rate-limit tests.
//!
//! Tests that share budgets run against the machine's Redis:
//! `AIBOS_TEST_REDIS_URL`, else `redis://127.0.0.1:6379`, each under a key
//! prefix of its own ([`unique_prefix`]) so parallel tests never share a
//! budget. When it cannot be reached they skip, saying so, unless
//! `AIBOS_REQUIRE_REDIS=1` (CI), which makes them fail. Tests that stop and
//! restart Redis start one of their own ([`OwnRedis`]).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The server tests use when `AIBOS_TEST_REDIS_URL` is not set.
const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

fn required() -> bool {
    std::env::var("AIBOS_REQUIRE_REDIS").as_deref() == Ok("1")
}

/// `host:port` of a `redis://host:port[/db]` URL.
fn address(url: &str) -> String {
    let rest = url
        .trim_start_matches("redis://")
        .rsplit('@')
        .next()
        .unwrap_or_default();
    let host_port = rest.split('/').next().unwrap_or_default();
    if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:6379")
    }
}

/// Whether a Redis answers `PING` at `url` within a second.
pub async fn answers(url: &str) -> bool {
    let ping = async {
        let mut stream = tokio::net::TcpStream::connect(address(url)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 7];
        stream.read_exact(&mut buf).await.ok()?;
        (&buf == b"+PONG\r\n").then_some(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), ping).await,
        Ok(Some(()))
    )
}

/// The shared test Redis's URL; `None` (after saying why) when it does not
/// answer, unless `AIBOS_REQUIRE_REDIS=1`, which panics instead.
pub async fn shared_url() -> Option<String> {
    let url = std::env::var("AIBOS_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_URL.to_owned());
    if answers(&url).await {
        return Some(url);
    }
    assert!(
        !required(),
        "AIBOS_REQUIRE_REDIS=1 but Redis at {url} does not answer"
    );
    eprintln!("skipped: Redis at {url} does not answer");
    None
}

/// A key prefix of this test's own (`rate_limit.redis_prefix`).
pub fn unique_prefix() -> String {
    format!("aibos-test-{}", uuid::Uuid::new_v4().simple())
}

/// A `redis-server` of the test's own on a free port, without persistence;
/// it can be stopped and started again on the same port. Killed on drop.
pub struct OwnRedis {
    binary: &'static str,
    port: u16,
    child: Option<tokio::process::Child>,
}

impl OwnRedis {
    /// Starts one; `None` (after saying why) when `redis-server` is not
    /// installed, unless `AIBOS_REQUIRE_REDIS=1`.
    pub async fn spawn() -> Option<OwnRedis> {
        let Some(binary) = crate::installed_binary([
            "redis-server",
            "/usr/bin/redis-server",
            "/usr/sbin/redis-server",
        ]) else {
            assert!(
                !required(),
                "AIBOS_REQUIRE_REDIS=1 but no redis-server binary is installed"
            );
            eprintln!("skipped: no redis-server binary is installed");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut own = OwnRedis {
            binary,
            port,
            child: None,
        };
        own.start().await;
        Some(own)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port and waits until it answers.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = tokio::process::Command::new(self.binary)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !answers(&self.url()).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the server and waits until it is gone (the port is free again).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}
