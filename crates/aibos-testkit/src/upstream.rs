//! A real upstream server standing in for a cell behind the gateway. It records
//! every request it receives (method, path and query as received, headers), so a
//! test can prove what reached it, and what never did.
//!
//! Paths, by their last segment:
//! - `…/slow`: answers 200 after 3 s.
//! - `…/flaky`: answers the status set with [`Upstream::set_flaky_status`] (200 by default).
//! - `…/big`: streams 20 MiB in 64 KiB chunks, produced as they are read.
//! - `…/events`: Server-Sent Events: `one`, then waits for [`Upstream::release_events`], then `two`.
//! - `…/health`: 200, or 503 after [`Upstream::set_healthy`]`(false)`.
//! - `…/charge`: after 500 ms (so that concurrent calls overlap), 201
//!   `{"charge": n, "body": <request body as text>}` where n counts the calls
//!   to `…/charge` so far, with `Location: /charges/n`, `X-Cell-Ref: n` and
//!   `Idempotency-Replay-Headers: x-cell-ref`, and `X-Not-Replayed: n`.
//! - anything else: 200 `{"method", "path"}`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Size of the `…/big` response.
pub const BIG_RESPONSE_BYTES: usize = 20 * 1024 * 1024;
const CHUNK_BYTES: usize = 64 * 1024;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// `GET`, `POST`, …
    pub method: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Path and query exactly as received.
    pub path_and_query: String,
    /// Every header received.
    pub headers: HeaderMap,
}

#[derive(Clone, Default)]
struct Shared {
    received: Arc<Mutex<Vec<Received>>>,
    unhealthy: Arc<AtomicBool>,
    flaky_status: Arc<AtomicU16>,
    events_gate: Arc<tokio::sync::Notify>,
    charges: Arc<std::sync::atomic::AtomicU64>,
}

/// A running upstream; stopped when dropped.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    shared: Shared,
    stop: CancellationToken,
}

impl Upstream {
    /// Starts on a free port.
    pub async fn start() -> Upstream {
        Upstream::start_on("127.0.0.1:0".parse().expect("an address")).await
    }

    /// Starts on `addr` (a stopped upstream's port, to bring it back).
    pub async fn start_on(addr: SocketAddr) -> Upstream {
        let listener = TcpListener::bind(addr).await.expect("bind the upstream");
        let addr = listener.local_addr().expect("the upstream's address");
        let shared = Shared::default();
        let stop = CancellationToken::new();
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let until = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(until.cancelled_owned())
                .await;
        });
        Upstream {
            addr,
            base_url: format!("http://{addr}"),
            shared,
            stop,
        }
    }

    /// Every request received so far, health checks excluded.
    pub fn received(&self) -> Vec<Received> {
        self.shared
            .received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|r| !r.path_and_query.ends_with("/health"))
            .cloned()
            .collect()
    }

    /// Health checks received so far.
    pub fn health_checks(&self) -> usize {
        self.shared
            .received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|r| r.path_and_query.ends_with("/health"))
            .count()
    }

    /// Makes `…/health` answer 200 (true) or 503 (false).
    pub fn set_healthy(&self, healthy: bool) {
        self.shared.unhealthy.store(!healthy, Ordering::SeqCst);
    }

    /// Sets what `…/flaky` answers.
    pub fn set_flaky_status(&self, status: u16) {
        self.shared.flaky_status.store(status, Ordering::SeqCst);
    }

    /// Lets a `…/events` stream send its second event.
    pub fn release_events(&self) {
        self.shared.events_gate.notify_one();
    }

    /// Stops listening (connections refused from now on); returns the address.
    pub fn stop(self) -> SocketAddr {
        self.stop.cancel();
        self.addr
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn handle(State(shared): State<Shared>, request: Request) -> Response {
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let path = request.uri().path().to_owned();
    shared
        .received
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Received {
            method: request.method().to_string(),
            version: format!("{:?}", request.version()),
            path_and_query: path_and_query.clone(),
            headers: request.headers().clone(),
        });
    let last = path.rsplit('/').next().unwrap_or("");
    if last == "charge" {
        let n = shared.charges.fetch_add(1, Ordering::SeqCst) + 1;
        let body = axum::body::to_bytes(request.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let json = serde_json::json!({ "charge": n, "body": String::from_utf8_lossy(&body) });
        return Response::builder()
            .status(StatusCode::CREATED)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::LOCATION, format!("/charges/{n}"))
            .header("x-cell-ref", n.to_string())
            .header("x-not-replayed", n.to_string())
            .header("idempotency-replay-headers", "x-cell-ref")
            .body(Body::from(json.to_string()))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    match last {
        "slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            (StatusCode::OK, "slow").into_response()
        }
        "flaky" => {
            let status = match shared.flaky_status.load(Ordering::SeqCst) {
                0 => 200,
                s => s,
            };
            StatusCode::from_u16(status)
                .unwrap_or(StatusCode::OK)
                .into_response()
        }
        "health" => {
            if shared.unhealthy.load(Ordering::SeqCst) {
                StatusCode::SERVICE_UNAVAILABLE.into_response()
            } else {
                StatusCode::OK.into_response()
            }
        }
        "big" => {
            let chunks = BIG_RESPONSE_BYTES / CHUNK_BYTES;
            let stream = futures_util::stream::iter(0..chunks)
                .map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; CHUNK_BYTES])));
            Response::builder()
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(Body::from_stream(stream))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        "events" => {
            let gate = shared.events_gate.clone();
            let stream = futures_util::stream::unfold(0u8, move |step| {
                let gate = gate.clone();
                async move {
                    match step {
                        0 => Some((
                            Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"data: one\n\n")),
                            1,
                        )),
                        1 => {
                            gate.notified().await;
                            Some((Ok(bytes::Bytes::from_static(b"data: two\n\n")), 2))
                        }
                        _ => None,
                    }
                }
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .header(header::CACHE_CONTROL, "no-cache")
                .body(Body::from_stream(stream))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        _ => axum::Json(
            serde_json::json!({ "method": request.method().as_str(), "path": path_and_query }),
        )
        .into_response(),
    }
}
