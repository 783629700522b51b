//! The listener against clients that hold connections without using them: a
//! connection that sends nothing or drips its headers is closed after the
//! header-read timeout, an idle keep-alive connection after the idle timeout,
//! and one address cannot hold more than its cap of connections that have not
//! sent a request. Timeouts are short and waits generous, so load on the test
//! machine can only make a close later, never make an assertion flaky.

use std::time::{Duration, Instant};

use aibos_testkit::{Engine, KernelOptions, TestKernel, spawn_kernel_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::both_engines;

/// Longest any expected close may take on a loaded machine.
const GENEROUS: Duration = Duration::from_secs(15);

async fn kernel(engine: Engine, env: &[(&str, &str)]) -> Option<TestKernel> {
    let options = KernelOptions {
        env: env
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect(),
        ..KernelOptions::default()
    };
    spawn_kernel_with(engine, options).await
}

/// Reads until the kernel closes the connection (end of stream or reset);
/// panics if it is still open after `within`. Returns what was read.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => panic!("the connection is still open after {within:?}"),
            Ok(Ok(0) | Err(_)) => return seen,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends one keep-alive request for `/api/health/live` and reads its whole
/// response; returns the status line.
async fn exchange(stream: &mut TcpStream, k: &TestKernel) -> String {
    let request = format!("GET /api/health/live HTTP/1.1\r\nHost: {}\r\n\r\n", k.addr);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(GENEROUS, stream.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(
            n > 0,
            "closed before answering: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("a content-length");
            if seen.len() >= end + 4 + length {
                return text.lines().next().unwrap().to_owned();
            }
        }
    }
}

both_engines! {
    async fn a_connection_that_sends_no_request_head_in_time_is_closed(engine: Engine) {
        let Some(k) = kernel(engine, &[("AIBOS_SERVER__HEADER_READ_TIMEOUT_SECONDS", "1"), ("AIBOS_SERVER__KEEP_ALIVE_IDLE_SECONDS", "30")]).await else { return };

        // Nothing at all.
        let started = Instant::now();
        let mut silent = TcpStream::connect(k.addr).await.unwrap();
        let answer = closed_within(&mut silent, GENEROUS).await;
        assert!(started.elapsed() >= Duration::from_millis(900), "not before the timeout: {:?}", started.elapsed());
        assert!(answer.is_empty() || String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408"), "{answer:?}");

        // A request line, then one header line at a time, never the blank line:
        // still open at the timeout (a longer one, 30 s, bounds later heads only).
        let started = Instant::now();
        let mut dripping = TcpStream::connect(k.addr).await.unwrap();
        dripping.write_all(b"GET /api/health/live HTTP/1.1\r\n").await.unwrap();
        let drip = async {
            for n in 0.. {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if dripping.write_all(format!("X-Drip-{n}: 1\r\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut probe = [0u8; 1];
                if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(1), dripping.read(&mut probe)).await {
                    return;
                }
            }
        };
        tokio::time::timeout(GENEROUS, drip).await.expect("a dripping client is cut off");
        assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());

        // A client that sends its request in time is served as ever.
        let mut prompt = TcpStream::connect(k.addr).await.unwrap();
        assert!(exchange(&mut prompt, &k).await.starts_with("HTTP/1.1 200"));
    }

    async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(engine: Engine) {
        let Some(k) = kernel(engine, &[("AIBOS_SERVER__HEADER_READ_TIMEOUT_SECONDS", "1"), ("AIBOS_SERVER__KEEP_ALIVE_IDLE_SECONDS", "4")]).await else { return };
        let mut stream = TcpStream::connect(k.addr).await.unwrap();
        assert!(exchange(&mut stream, &k).await.starts_with("HTTP/1.1 200"));
        // Idle longer than the header-read timeout, shorter than the idle one:
        // the connection still serves (the first timeout is the first request's).
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        assert!(exchange(&mut stream, &k).await.starts_with("HTTP/1.1 200"));
        let idle_from = Instant::now();
        closed_within(&mut stream, GENEROUS).await;
        assert!(idle_from.elapsed() >= Duration::from_millis(3_500), "closed after {:?} idle", idle_from.elapsed());

        // A later request whose head drips in is no activity: bytes read alone
        // do not keep a connection open.
        let mut dripping = TcpStream::connect(k.addr).await.unwrap();
        assert!(exchange(&mut dripping, &k).await.starts_with("HTTP/1.1 200"));
        let started = Instant::now();
        dripping.write_all(b"GET /api/health/live HTTP/1.1\r\n").await.unwrap();
        let drip = async {
            for n in 0.. {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if dripping.write_all(format!("X-Drip-{n}: 1\r\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut probe = [0u8; 1];
                if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(1), dripping.read(&mut probe)).await {
                    return;
                }
            }
        };
        tokio::time::timeout(GENEROUS, drip).await.expect("a later head dripping in is cut off");
        assert!(started.elapsed() >= Duration::from_millis(3_500), "{:?}", started.elapsed());
    }

    async fn a_slow_request_is_not_cut_by_the_idle_timeout(engine: Engine) {
        let upstream = aibos_testkit::upstream::Upstream::start().await;
        let Some(k) = kernel(engine, &[("AIBOS_SERVER__KEEP_ALIVE_IDLE_SECONDS", "1")]).await else { return };
        let root = k.platform_admin().await;
        let (canon_id, _) = k.canon(&root, "slowpoke", &upstream.base_url, &[]).await;
        k.route(&root, &canon_id, "GET", "/slow", &[], serde_json::json!({ "public_to_authenticated": true, "timeout_ms": 10_000 })).await;
        let started = Instant::now();
        let answer = k.as_(&root, reqwest::Method::GET, "/api/gateway/slowpoke/slow").send().await.unwrap();
        assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
        assert!(started.elapsed() >= Duration::from_millis(1_500), "the cell took its time: {:?}", started.elapsed());
    }

    async fn one_address_holds_at_most_its_cap_of_connections_without_a_request(engine: Engine) {
        let Some(k) = kernel(engine, &[("AIBOS_SERVER__MAX_PENDING_CONNECTIONS_PER_ADDRESS", "3"), ("AIBOS_SERVER__HEADER_READ_TIMEOUT_SECONDS", "60")]).await else { return };
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(TcpStream::connect(k.addr).await.unwrap());
        }
        // The fourth and fifth are closed as they are accepted.
        for _ in 0..2 {
            let mut refused = TcpStream::connect(k.addr).await.unwrap();
            let answer = closed_within(&mut refused, GENEROUS).await;
            assert!(answer.is_empty(), "{answer:?}");
        }
        // One of them sends a request: no longer pending, so a new connection is taken.
        assert!(exchange(&mut held[0], &k).await.starts_with("HTTP/1.1 200"));
        let mut fresh = TcpStream::connect(k.addr).await.unwrap();
        assert!(exchange(&mut fresh, &k).await.starts_with("HTTP/1.1 200"));
        // A third pending one fills the cap again…
        let extra = TcpStream::connect(k.addr).await.unwrap();
        let mut refused = TcpStream::connect(k.addr).await.unwrap();
        assert!(closed_within(&mut refused, GENEROUS).await.is_empty());
        // …and closing it gives its place back.
        drop(extra);
        let after_close = async {
            loop {
                let mut stream = TcpStream::connect(k.addr).await.unwrap();
                let request = format!("GET /api/health/live HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", k.addr);
                let _ = stream.write_all(request.as_bytes()).await;
                let answer = closed_within(&mut stream, GENEROUS).await;
                if answer.starts_with(b"HTTP/1.1 200") {
                    return;
                }
                // The kernel may not have seen the close yet.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(GENEROUS, after_close).await.expect("the closed connection's place is free again");
        for stream in &mut held[1..] {
            assert!(exchange(stream, &k).await.starts_with("HTTP/1.1 200"));
        }
    }
}
