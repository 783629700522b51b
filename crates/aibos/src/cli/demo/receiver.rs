//! The demo's webhook receiver: what a tenant's own service would run to take
//! the kernel's deliveries. It checks each delivery's Standard Webhooks
//! signature with the subscription's secret, refuses one that does not verify
//! (so the kernel retries it), and keeps the last few it accepted for
//! `GET /webhooks`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

/// Deliveries kept for `GET /webhooks`: enough to see a session's payments.
const RECEIVED_KEPT_MAX: usize = 100;
/// Signatures older or newer than this are refused (replayed deliveries), as
/// the Standard Webhooks reference libraries do.
const TIMESTAMP_TOLERANCE_SECONDS: i64 = 300;
/// A delivery's body is one event (the kernel caps payloads at 256 KiB).
const BODY_BYTES_MAX: usize = 512 * 1024;

/// One accepted delivery, as `GET /webhooks` shows it.
#[derive(Clone, Serialize)]
pub struct Received {
    /// `webhook-id`: the event's id.
    pub webhook_id: String,
    /// The event's type.
    pub event_type: String,
    /// The event's correlation id (the payment request's).
    pub correlation_id: Option<String>,
    /// The event's subject (the payment's id).
    pub subject: Option<String>,
    /// Always true: a delivery that does not verify is refused, not kept.
    pub signature_verified: bool,
}

#[derive(Clone)]
struct Shared {
    /// The subscription's secret key (decoded `whsec_…`), set once known.
    key: Arc<RwLock<Option<Vec<u8>>>>,
    received: Arc<Mutex<VecDeque<Received>>>,
    /// Print each delivery on stdout (the text mode of `aibos demo`).
    announce: bool,
}

/// A running receiver.
pub struct Receiver {
    address: SocketAddr,
    shared: Shared,
}

impl Receiver {
    /// Binds `bind` and serves until `shutdown` completes.
    pub async fn start(
        bind: SocketAddr,
        announce: bool,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<(Receiver, tokio::task::JoinHandle<()>)> {
        let shared = Shared {
            key: Arc::new(RwLock::new(None)),
            received: Arc::new(Mutex::new(VecDeque::new())),
            announce,
        };
        let app = Router::new()
            .route("/webhooks", post(deliver).get(list))
            .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(bind).await?;
        let address = listener.local_addr()?;
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "the demo's webhook receiver stopped");
            }
        });
        Ok((Receiver { address, shared }, task))
    }

    /// The URL to subscribe.
    pub fn url(&self) -> String {
        format!("http://{}/webhooks", self.address)
    }

    /// Sets the subscription's secret (`whsec_<base64>`); false if malformed.
    pub fn set_secret(&self, secret: &str) -> bool {
        let Some(key) = decode_secret(secret) else {
            return false;
        };
        match self.shared.key.write() {
            Ok(mut slot) => *slot = Some(key),
            Err(poisoned) => *poisoned.into_inner() = Some(key),
        }
        true
    }
}

fn decode_secret(secret: &str) -> Option<Vec<u8>> {
    STANDARD.decode(secret.strip_prefix("whsec_")?).ok()
}

/// Whether `signatures` (space-separated `v1,<base64>`) holds the HMAC-SHA256
/// of `{id}.{timestamp}.{body}` under `key`; compared in constant time.
fn verifies(key: &[u8], id: &str, timestamp: &str, body: &[u8], signatures: &str) -> bool {
    signatures.split(' ').any(|signature| {
        let Some(encoded) = signature.strip_prefix("v1,") else {
            return false;
        };
        let Ok(expected) = STANDARD.decode(encoded) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
            return false;
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(&expected).is_ok()
    })
}

async fn deliver(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let (id, timestamp, signatures) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let fresh = timestamp.parse::<i64>().is_ok_and(|sent| {
        (time::OffsetDateTime::now_utc().unix_timestamp() - sent).abs()
            <= TIMESTAMP_TOLERANCE_SECONDS
    });
    let key = match shared.key.read() {
        Ok(slot) => slot.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    let Some(key) = key else {
        // Not ready yet: the kernel retries.
        return StatusCode::SERVICE_UNAVAILABLE;
    };
    if id.is_empty() || !fresh || !verifies(&key, id, timestamp, &body, signatures) {
        tracing::warn!(webhook_id = %id, "the demo's receiver refused a delivery whose signature does not verify");
        return StatusCode::UNAUTHORIZED;
    }
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let text = |field: &str| event.get(field).and_then(|v| v.as_str()).map(str::to_owned);
    let received = Received {
        webhook_id: id.to_owned(),
        event_type: text("type").unwrap_or_default(),
        correlation_id: text("correlation_id"),
        subject: text("subject"),
        signature_verified: true,
    };
    if shared.announce {
        println!(
            "webhook received: {} (subject {}, correlation id {}), signature verified",
            received.event_type,
            received.subject.as_deref().unwrap_or("-"),
            received.correlation_id.as_deref().unwrap_or("-"),
        );
    }
    let mut kept = match shared.received.lock() {
        Ok(kept) => kept,
        Err(poisoned) => poisoned.into_inner(),
    };
    // A redelivery of an event already taken (at-least-once) is not kept twice.
    if !kept.iter().any(|r| r.webhook_id == received.webhook_id) {
        if kept.len() == RECEIVED_KEPT_MAX {
            kept.pop_front();
        }
        kept.push_back(received);
    }
    StatusCode::NO_CONTENT
}

async fn list(State(shared): State<Shared>) -> axum::Json<Vec<Received>> {
    let kept = match shared.received.lock() {
        Ok(kept) => kept.iter().cloned().collect(),
        Err(poisoned) => poisoned.into_inner().iter().cloned().collect(),
    };
    axum::Json(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signature computed independently (Python's `hmac` over
    /// `{id}.{timestamp}.{body}` with the decoded secret).
    #[test]
    fn an_independently_made_signature_verifies_and_a_changed_byte_does_not() {
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwC8c3ZQ0ah6c=").unwrap();
        let (id, timestamp) = ("msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330");
        let body = br#"{"test": 2432232314}"#;
        let signature = "v1,jTXeNl13A9CDXfYV8PPapZV4soCzL6FovclV0YiNffE=";
        assert!(verifies(&key, id, timestamp, body, signature));
        assert!(
            verifies(&key, id, timestamp, body, &format!("v1,AAAA {signature}")),
            "any of several"
        );
        assert!(!verifies(
            &key,
            id,
            timestamp,
            br#"{"test": 2432232315}"#,
            signature
        ));
        assert!(!verifies(&key, id, "1614265331", body, signature));
        assert!(!verifies(
            &key,
            id,
            timestamp,
            body,
            "v2,jTXeNl13A9CDXfYV8PPapZV4soCzL6FovclV0YiNffE="
        ));
        assert!(
            decode_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwC8c3ZQ0ah6c=").is_none(),
            "the prefix is required"
        );
    }
}
