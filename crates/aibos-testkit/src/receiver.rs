//! A webhook receiver for tests: a real HTTP server on `127.0.0.1:0` that
//! records every delivery attempt (headers and body as received) and answers
//! as the test tells it to: 204, failing the first attempts of each message,
//! always failing, asking to come back later (`Retry-After`), or slowly.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How the receiver answers.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// 204 to everything.
    Accept,
    /// 500 to the first `n` attempts of each `webhook-id`, then 204.
    FailFirst(u32),
    /// This status to everything.
    Fail(u16),
    /// `status` with `Retry-After: seconds` to the first attempt of each `webhook-id`, then 204.
    RetryAfterOnce {
        /// 429 or 503.
        status: u16,
        /// The `Retry-After` value.
        seconds: u64,
    },
    /// 204 after a random wait of up to `max_ms` per attempt.
    RandomDelay {
        /// The longest wait.
        max_ms: u64,
    },
}

/// One attempt as received.
#[derive(Debug, Clone)]
pub struct Hook {
    /// `webhook-id`.
    pub id: String,
    /// `webhook-timestamp`.
    pub timestamp: String,
    /// `webhook-signature`.
    pub signature: String,
    /// Every header.
    pub headers: HeaderMap,
    /// The body, byte for byte.
    pub body: Vec<u8>,
    /// What the receiver answered.
    pub answered: u16,
    /// When it arrived.
    pub at: Instant,
}

impl Hook {
    /// The body as JSON (the event envelope).
    pub fn event(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// Whether it was answered 2xx (delivered).
    pub fn delivered(&self) -> bool {
        (200..300).contains(&self.answered)
    }
}

struct Shared {
    hooks: Mutex<Vec<Hook>>,
    behaviour: Mutex<Behaviour>,
    attempts: Mutex<HashMap<String, u32>>,
}

/// A running receiver; stopped when dropped.
pub struct Receiver {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT/hook`, the URL to subscribe.
    pub url: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Receiver {
    /// Starts on a free port, answering as `behaviour` says.
    pub async fn start(behaviour: Behaviour) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("the receiver's address");
        let shared = Arc::new(Shared {
            hooks: Mutex::new(Vec::new()),
            behaviour: Mutex::new(behaviour),
            attempts: Mutex::new(HashMap::new()),
        });
        let stop = CancellationToken::new();
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let until = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(until.cancelled_owned())
                .await;
        });
        Receiver {
            addr,
            url: format!("http://{addr}/hook"),
            shared,
            stop,
        }
    }

    /// Changes how it answers from the next attempt on.
    pub fn set(&self, behaviour: Behaviour) {
        *self
            .shared
            .behaviour
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = behaviour;
    }

    /// Every attempt received so far, in arrival order.
    pub fn hooks(&self) -> Vec<Hook> {
        self.shared
            .hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The attempts answered 2xx, in arrival order.
    pub fn delivered(&self) -> Vec<Hook> {
        self.hooks().into_iter().filter(Hook::delivered).collect()
    }

    /// Waits (bounded) until `done` holds over the attempts received; whether it did.
    pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&[Hook]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(&self.shared.hooks.lock().unwrap_or_else(|p| p.into_inner())) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) until `count` attempts were delivered; whether they were.
    pub async fn wait_for_delivered(&self, count: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |hooks| {
            hooks.iter().filter(|h| h.delivered()).count() >= count
        })
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let at = Instant::now();
    let headers = request.headers().clone();
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let id = text("webhook-id");
    let body = axum::body::to_bytes(request.into_body(), 16 * 1024 * 1024)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default();
    let seen = {
        let mut attempts = shared.attempts.lock().unwrap_or_else(|p| p.into_inner());
        let n = attempts.entry(id.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let behaviour = shared
        .behaviour
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut retry_after = None;
    let status = match behaviour {
        Behaviour::Accept => 204,
        Behaviour::FailFirst(n) if seen <= n => 500,
        Behaviour::FailFirst(_) => 204,
        Behaviour::Fail(status) => status,
        Behaviour::RetryAfterOnce { status, seconds } if seen == 1 => {
            retry_after = Some(seconds);
            status
        }
        Behaviour::RetryAfterOnce { .. } => 204,
        Behaviour::RandomDelay { max_ms } => {
            let wait = u64::from(uuid::Uuid::new_v4().as_u128() as u16) % max_ms.max(1);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            204
        }
    };
    shared
        .hooks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Hook {
            timestamp: text("webhook-timestamp"),
            signature: text("webhook-signature"),
            id,
            headers,
            body,
            answered: status,
            at,
        });
    let mut response = StatusCode::from_u16(status)
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        .into_response();
    if let Some(seconds) = retry_after
        && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}
