//! A small client of the kernel's public HTTP API, for a cell acting as its own
//! service account: it obtains and caches a service-account token and publishes
//! events.
//!
//! One [`KernelClient`] per process: it is cheap to clone (an `Arc` inside) and
//! shares one HTTP connection pool and one token among its clones.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use aibos_wire::correlation::{CORRELATION_HEADER, TRACEPARENT_HEADER};
use aibos_wire::{CorrelationId, Problem};
use http::header::AUTHORIZATION;
use http::{HeaderValue, StatusCode};
use reqwest::Url;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::{ConfigError, ENV_CLIENT_ID, ENV_CLIENT_SECRET, ENV_KERNEL_URL, required_env};

/// The longest any single request to the kernel may take, connection included.
/// The kernel answers these endpoints in milliseconds; ten seconds covers a
/// slow database without leaving a cell's handler hanging for a minute.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest the TCP connect may take: a kernel that does not accept within
/// this is down or unreachable, and waiting longer only delays the error.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A cached token is replaced this long before it expires, so a request never
/// leaves with a token that expires in flight or on a slightly fast kernel clock.
pub const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(30);

/// The longest a token is cached, whatever `expires_in` says: bounds the
/// arithmetic and the damage of a misconfigured kernel.
pub const TOKEN_CACHE_MAX: Duration = Duration::from_secs(24 * 60 * 60);

/// The largest response body read from the kernel, in bytes. Tokens, event ids
/// and problem bodies are well under a kilobyte.
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024;

/// The header that makes a publish idempotent at the kernel (SPEC §8).
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

const TOKEN_PATH: &str = "/api/kernel/auth/token";
const PUBLISH_PATH: &str = "/api/kernel/events/publish";
const ME_PATH: &str = "/api/kernel/auth/me";

/// A client of the kernel's API, authenticated as the cell's service account.
///
/// `Debug` shows the kernel URL and the client id, never the client secret or a token.
#[derive(Clone)]
pub struct KernelClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    /// The kernel's base URL as configured, for `Debug` and errors.
    base_url: String,
    /// `{base}/api/kernel/auth/token`.
    token_url: Url,
    /// `{base}/api/kernel/events/publish`.
    publish_url: Url,
    /// `{base}/api/kernel/auth/me`.
    me_url: Url,
    /// The service account's client id.
    client_id: String,
    /// The service account's client secret; sent only to the token endpoint.
    client_secret: String,
    /// Pooled connections, with [`REQUEST_TIMEOUT`] and [`CONNECT_TIMEOUT`].
    http: reqwest::Client,
    /// The current token. A tokio mutex, held across the token request on
    /// purpose: concurrent callers wait for one refresh instead of each starting one.
    token: Mutex<Option<CachedToken>>,
}

struct CachedToken {
    access_token: String,
    /// When to stop using it: `expires_in` minus [`TOKEN_REFRESH_MARGIN`].
    refresh_at: Instant,
}

impl KernelClient {
    /// A client of the kernel at `base_url` (`http://host:port`, optionally with a
    /// path prefix) for the service account `client_id` / `client_secret`.
    ///
    /// No request is made until the first call.
    pub fn new(
        base_url: &str,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
    ) -> Result<KernelClient, ConfigError> {
        let client_id = client_id.into();
        let client_secret = client_secret.into();
        if client_id.trim().is_empty() {
            return Err(ConfigError::InvalidCredentials("the client id is empty"));
        }
        if client_secret.trim().is_empty() {
            return Err(ConfigError::InvalidCredentials(
                "the client secret is empty",
            ));
        }
        let base =
            Url::parse(base_url).map_err(|e| ConfigError::InvalidKernelUrl(e.to_string()))?;
        // This build of reqwest has no TLS; an https URL would fail on every
        // call with a less helpful message, so refuse it here.
        if base.scheme() != "http" {
            return Err(ConfigError::InvalidKernelUrl(format!(
                "scheme {:?} is not supported; use http:// (this client is built without TLS)",
                base.scheme()
            )));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(ConfigError::InvalidKernelUrl(
                "the base URL must not have a query or fragment".to_owned(),
            ));
        }
        let endpoint = |path: &str| {
            let prefix = base.as_str().trim_end_matches('/');
            Url::parse(&format!("{prefix}{path}"))
                .map_err(|e| ConfigError::InvalidKernelUrl(e.to_string()))
        };
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            // A redirect from the kernel's API is never expected; following one
            // could carry the client secret or a token somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ConfigError::HttpClient(e.to_string()))?;
        Ok(KernelClient {
            inner: Arc::new(ClientInner {
                base_url: base_url.to_owned(),
                token_url: endpoint(TOKEN_PATH)?,
                publish_url: endpoint(PUBLISH_PATH)?,
                me_url: endpoint(ME_PATH)?,
                client_id,
                client_secret,
                http,
                token: Mutex::new(None),
            }),
        })
    }

    /// A client from [`ENV_KERNEL_URL`] (`AIBOS_KERNEL_URL`), [`ENV_CLIENT_ID`]
    /// (`AIBOS_CLIENT_ID`) and [`ENV_CLIENT_SECRET`] (`AIBOS_CLIENT_SECRET`).
    pub fn from_env() -> Result<KernelClient, ConfigError> {
        KernelClient::new(
            required_env(ENV_KERNEL_URL)?.trim(),
            required_env(ENV_CLIENT_ID)?.trim(),
            required_env(ENV_CLIENT_SECRET)?.trim(),
        )
    }

    /// A service-account access token: the cached one while it has more than
    /// [`TOKEN_REFRESH_MARGIN`] left, else a new one from
    /// `POST /api/kernel/auth/token` (`grant_type=client_credentials`).
    pub async fn access_token(&self) -> Result<String, ClientError> {
        let mut cached = self.inner.token.lock().await;
        if let Some(token) = cached.as_ref()
            && Instant::now() < token.refresh_at
        {
            return Ok(token.access_token.clone());
        }
        let fresh = self.request_token().await?;
        let access_token = fresh.access_token.clone();
        *cached = Some(fresh);
        Ok(access_token)
    }

    /// Publishes `event` with `POST /api/kernel/events/publish` → `{id, seq}`.
    /// (The kernel serves that endpoint once its event bus lands; before, this
    /// returns the kernel's 404 problem.)
    ///
    /// The tenant and actor are the service account's, taken by the kernel from
    /// the token. A 401 (a token revoked or expired early) drops the token,
    /// gets a new one and retries once; any other failure is returned as is.
    pub async fn publish_event(&self, event: &NewEvent) -> Result<PublishedEvent, ClientError> {
        let token = self.access_token().await?;
        let response = self.send_publish(event, &token).await?;
        let response = if response.status() == StatusCode::UNAUTHORIZED {
            self.forget_token(&token).await;
            let token = self.access_token().await?;
            self.send_publish(event, &token).await?
        } else {
            response
        };
        parse_success(response).await
    }

    /// Who this client's service account is, from `GET /api/kernel/auth/me`:
    /// above all its tenant, which a cell serving several tenants (one service
    /// account each) needs to pick the right client for a tenant's events.
    ///
    /// A 401 drops the token and retries once, as [`publish_event`](Self::publish_event) does.
    pub async fn whoami(&self) -> Result<ServiceIdentity, ClientError> {
        let token = self.access_token().await?;
        let response = self.send_me(&token).await?;
        let response = if response.status() == StatusCode::UNAUTHORIZED {
            self.forget_token(&token).await;
            let token = self.access_token().await?;
            self.send_me(&token).await?
        } else {
            response
        };
        let me: MeResponse = parse_success(response).await?;
        Ok(ServiceIdentity {
            actor_type: me.actor_type,
            subject_id: me.subject.id,
            tenant_id: me.tenant.id,
            tenant_slug: me.tenant.slug,
        })
    }

    async fn send_me(&self, token: &str) -> Result<reqwest::Response, ClientError> {
        Ok(self
            .inner
            .http
            .get(self.inner.me_url.clone())
            .header(AUTHORIZATION, bearer(token)?)
            .send()
            .await?)
    }

    async fn send_publish(
        &self,
        event: &NewEvent,
        token: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let mut request = self
            .inner
            .http
            .post(self.inner.publish_url.clone())
            .header(AUTHORIZATION, bearer(token)?)
            .json(&PublishBody {
                event_type: &event.event_type,
                payload: &event.payload,
                version: event.version,
                subject: event.subject.as_deref(),
            });
        if let Some(key) = &event.idempotency_key {
            let value = HeaderValue::from_str(key).map_err(|_| {
                ClientError::InvalidRequest("the idempotency key is not a valid header value")
            })?;
            request = request.header(IDEMPOTENCY_KEY_HEADER, value);
        }
        if let Some(id) = event.correlation_id {
            request = request.header(CORRELATION_HEADER, id.to_string());
        }
        if let Some(traceparent) = &event.traceparent {
            let value = HeaderValue::from_str(traceparent).map_err(|_| {
                ClientError::InvalidRequest("the traceparent is not a valid header value")
            })?;
            request = request.header(TRACEPARENT_HEADER, value);
        }
        Ok(request.send().await?)
    }

    async fn request_token(&self) -> Result<CachedToken, ClientError> {
        let response = self
            .inner
            .http
            .post(self.inner.token_url.clone())
            .json(&TokenRequest {
                grant_type: "client_credentials",
                client_id: &self.inner.client_id,
                client_secret: &self.inner.client_secret,
            })
            .send()
            .await?;
        let token: TokenResponse = parse_success(response).await?;
        if !token.token_type.eq_ignore_ascii_case("bearer") {
            return Err(ClientError::UnexpectedResponse {
                status: StatusCode::OK.as_u16(),
                reason: "the token endpoint answered a token type other than Bearer",
            });
        }
        // A short-lived token (≤ the margin) is used for this call but is
        // already due for refresh, so the next call gets a new one.
        let lifetime = Duration::from_secs(token.expires_in).min(TOKEN_CACHE_MAX);
        Ok(CachedToken {
            access_token: token.access_token,
            refresh_at: Instant::now() + lifetime.saturating_sub(TOKEN_REFRESH_MARGIN),
        })
    }

    /// Drops the cached token if it is still `stale`: another caller may already
    /// have replaced it, and that newer token must be kept.
    async fn forget_token(&self, stale: &str) {
        let mut cached = self.inner.token.lock().await;
        if cached.as_ref().is_some_and(|t| t.access_token == stale) {
            *cached = None;
        }
    }
}

impl fmt::Debug for KernelClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelClient")
            .field("base_url", &self.inner.base_url)
            .field("client_id", &self.inner.client_id)
            .field("client_secret", &"[REDACTED]")
            .finish_non_exhaustive()
    }
}

fn bearer(token: &str) -> Result<HeaderValue, ClientError> {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        ClientError::UnexpectedResponse {
            status: StatusCode::OK.as_u16(),
            reason: "the access token is not a valid header value",
        }
    })?;
    // Keeps the token out of HTTP/2 header compression tables and some debug output.
    value.set_sensitive(true);
    Ok(value)
}

/// Reads a bounded body; a 2xx becomes `T`, anything else a [`ClientError`].
async fn parse_success<T: for<'de> Deserialize<'de>>(
    response: reqwest::Response,
) -> Result<T, ClientError> {
    let status = response.status();
    let body = read_bounded(response).await?;
    if status.is_success() {
        return serde_json::from_slice(&body).map_err(|_| ClientError::UnexpectedResponse {
            status: status.as_u16(),
            reason: "the success body does not have the documented shape",
        });
    }
    match serde_json::from_slice::<Problem>(&body) {
        Ok(problem) => Err(ClientError::Problem(Box::new(problem))),
        Err(_) => Err(ClientError::UnexpectedResponse {
            status: status.as_u16(),
            reason: "the error body is not a problem+json document",
        }),
    }
}

async fn read_bounded(mut response: reqwest::Response) -> Result<Vec<u8>, ClientError> {
    let status = response.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > RESPONSE_BYTES_MAX {
            return Err(ClientError::UnexpectedResponse {
                status,
                reason: "the response body is larger than RESPONSE_BYTES_MAX",
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[derive(Serialize)]
struct TokenRequest<'a> {
    grant_type: &'static str,
    client_id: &'a str,
    client_secret: &'a str,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: String,
    /// Seconds.
    expires_in: u64,
}

#[derive(Serialize)]
struct PublishBody<'a> {
    #[serde(rename = "type")]
    event_type: &'a str,
    payload: &'a serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
}

/// An event to publish. Build it with [`NewEvent::new`] and the `with_*` methods.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Dotted, past tense: `finance.payment.processed`.
    pub event_type: String,
    /// A JSON object (at most 256 KiB; the kernel checks).
    pub payload: serde_json::Value,
    /// The payload's schema version; the kernel's default when `None`.
    pub version: Option<u32>,
    /// What the event is about, e.g. `payment/0197…`.
    pub subject: Option<String>,
    /// Sent as `Idempotency-Key`: the kernel records the event once per key,
    /// so a publish can be retried safely after a timeout.
    pub idempotency_key: Option<String>,
    /// Sent as `x-correlation-id`: pass the [`KernelCall`](crate::KernelCall)'s
    /// so the event, the kernel's logs and the cell's logs line up.
    pub correlation_id: Option<CorrelationId>,
    /// Sent as `traceparent`, to continue the caller's trace.
    pub traceparent: Option<String>,
}

impl NewEvent {
    /// An event of `event_type` with `payload` and nothing else.
    pub fn new(event_type: impl Into<String>, payload: serde_json::Value) -> NewEvent {
        NewEvent {
            event_type: event_type.into(),
            payload,
            version: None,
            subject: None,
            idempotency_key: None,
            correlation_id: None,
            traceparent: None,
        }
    }

    /// Sets the payload's schema version.
    pub fn with_version(mut self, version: u32) -> NewEvent {
        self.version = Some(version);
        self
    }

    /// Sets the subject.
    pub fn with_subject(mut self, subject: impl Into<String>) -> NewEvent {
        self.subject = Some(subject.into());
        self
    }

    /// Sets the `Idempotency-Key` (1–255 printable ASCII characters).
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> NewEvent {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the correlation id to carry.
    pub fn with_correlation_id(mut self, id: CorrelationId) -> NewEvent {
        self.correlation_id = Some(id);
        self
    }

    /// Sets the `traceparent` to carry.
    pub fn with_traceparent(mut self, traceparent: impl Into<String>) -> NewEvent {
        self.traceparent = Some(traceparent.into());
        self
    }
}

/// Who a service account is, as the kernel's `GET /api/kernel/auth/me` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceIdentity {
    /// `service` for a service account (`user` if a user's token was configured).
    pub actor_type: String,
    /// The service account's id.
    pub subject_id: String,
    /// The tenant the account belongs to: every event it publishes lands there.
    pub tenant_id: String,
    /// The tenant's slug, for logs.
    pub tenant_slug: String,
}

/// The members of `GET /api/kernel/auth/me` this client reads; others are ignored.
#[derive(Deserialize)]
struct MeResponse {
    actor_type: String,
    subject: MeSubject,
    tenant: MeTenant,
}

#[derive(Deserialize)]
struct MeSubject {
    id: String,
}

#[derive(Deserialize)]
struct MeTenant {
    id: String,
    slug: String,
}

/// The kernel's answer to a publish.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PublishedEvent {
    /// The event's id (a UUIDv7).
    pub id: String,
    /// Its position in the tenant's gap-free sequence.
    pub seq: u64,
}

/// Why a call to the kernel failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kernel answered with an RFC 9457 problem (boxed: it is large).
    #[error("the kernel answered {} {}: {}", .0.status, .0.code, .0.detail)]
    Problem(Box<Problem>),
    /// The kernel could not be reached, or did not answer within [`REQUEST_TIMEOUT`].
    #[error("could not reach the kernel")]
    Transport(#[from] reqwest::Error),
    /// The kernel answered something this client does not understand.
    #[error("unexpected answer from the kernel (HTTP {status}): {reason}")]
    UnexpectedResponse {
        /// The HTTP status.
        status: u16,
        /// What was wrong with it.
        reason: &'static str,
    },
    /// The request could not be built from what the caller gave.
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
}

impl ClientError {
    /// The problem body, when the kernel answered with one.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            ClientError::Problem(problem) => Some(problem),
            _ => None,
        }
    }

    /// Whether trying again later may succeed: the kernel was unreachable, slow,
    /// rate-limiting or briefly unavailable. Repeat a publish only with an
    /// idempotency key, or the event may be recorded twice.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Transport(e) => e.is_connect() || e.is_timeout(),
            ClientError::Problem(problem) => matches!(problem.status, 429 | 503 | 504),
            ClientError::UnexpectedResponse { status, .. } => matches!(status, 502..=504),
            ClientError::InvalidRequest(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aibos_wire::ErrorCode;
    use axum::extract::State;
    use axum::http::HeaderMap;
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use axum::{Json, Router};
    use serde_json::{Value, json};
    use std::sync::Mutex as StdMutex;

    const CLIENT_ID: &str = "cell-payments";
    const CLIENT_SECRET: &str = "sas_super_secret_value_0123456789";

    /// A stand-in for the kernel's token and publish endpoints that records what
    /// it received. A std mutex: no `.await` is held across it.
    #[derive(Default)]
    struct FakeKernel {
        state: StdMutex<Recorded>,
    }

    #[derive(Default)]
    struct Recorded {
        token_requests: Vec<Value>,
        publishes: Vec<(HeaderMap, Value)>,
        /// Tokens the publish endpoint accepts (revoking one = removing it).
        valid_tokens: Vec<String>,
        /// `expires_in` of the tokens issued.
        expires_in: u64,
        /// When set, the publish endpoint answers this problem instead.
        publish_problem: Option<Problem>,
        /// When set, the publish endpoint answers this status with a text body.
        publish_plain_status: Option<StatusCode>,
    }

    impl FakeKernel {
        fn with<R>(&self, f: impl FnOnce(&mut Recorded) -> R) -> R {
            f(&mut self.state.lock().expect("not poisoned"))
        }
    }

    fn problem_response(problem: Problem) -> Response {
        let status = StatusCode::from_u16(problem.status).expect("valid status");
        (
            status,
            [("content-type", aibos_wire::error::PROBLEM_CONTENT_TYPE)],
            Json(problem),
        )
            .into_response()
    }

    async fn token_endpoint(
        State(kernel): State<Arc<FakeKernel>>,
        Json(body): Json<Value>,
    ) -> Response {
        kernel.with(|r| {
            r.token_requests.push(body.clone());
            if body["client_secret"] != CLIENT_SECRET {
                let mut problem = Problem::new(ErrorCode::Unauthorized, "bad client credentials");
                problem.error = Some("invalid_client".into());
                return problem_response(problem);
            }
            let token = format!("token-{}", r.token_requests.len());
            r.valid_tokens.push(token.clone());
            Json(json!({"access_token": token, "token_type": "Bearer", "expires_in": r.expires_in}))
                .into_response()
        })
    }

    async fn publish_endpoint(
        State(kernel): State<Arc<FakeKernel>>,
        headers: HeaderMap,
        Json(body): Json<Value>,
    ) -> Response {
        kernel.with(|r| {
            r.publishes.push((headers.clone(), body));
            let authorized = headers
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|t| r.valid_tokens.iter().any(|valid| valid == t));
            if !authorized {
                return problem_response(Problem::new(ErrorCode::Unauthorized, "token revoked"));
            }
            if let Some(problem) = r.publish_problem.clone() {
                return problem_response(problem);
            }
            if let Some(status) = r.publish_plain_status {
                return (status, "upstream hiccup").into_response();
            }
            let seq = r.publishes.len();
            (
                StatusCode::CREATED,
                Json(json!({"id": format!("0197a1b2-0000-7000-8000-{seq:012}"), "seq": seq})),
            )
                .into_response()
        })
    }

    async fn me_endpoint(State(kernel): State<Arc<FakeKernel>>, headers: HeaderMap) -> Response {
        kernel.with(|r| {
            let token = headers
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if !token.is_some_and(|t| r.valid_tokens.iter().any(|valid| valid == t)) {
                return problem_response(Problem::new(ErrorCode::Unauthorized, "token revoked"));
            }
            Json(json!({
                "actor_type": "service",
                "subject": {"id": "sa-1", "name": CLIENT_ID, "email": null},
                "tenant": {"id": "0197a1b2-0000-7000-8000-0000000000aa", "slug": "acme"},
                "session_id": "s-1",
                "permissions": ["kernel.event.publish"],
            }))
            .into_response()
        })
    }

    /// Starts the fake kernel on a free port and a client pointed at it.
    async fn spawn_kernel() -> (Arc<FakeKernel>, KernelClient) {
        let kernel = Arc::new(FakeKernel::default());
        kernel.with(|r| r.expires_in = 900);
        let app = Router::new()
            .route(TOKEN_PATH, post(token_endpoint))
            .route(PUBLISH_PATH, post(publish_endpoint))
            .route(ME_PATH, axum::routing::get(me_endpoint))
            .with_state(kernel.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = KernelClient::new(&format!("http://{address}"), CLIENT_ID, CLIENT_SECRET)
            .expect("valid configuration");
        (kernel, client)
    }

    fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
        headers.get(name).and_then(|v| v.to_str().ok())
    }

    #[tokio::test]
    async fn one_token_serves_several_publishes() {
        let (kernel, client) = spawn_kernel().await;
        let cid = CorrelationId::parse("0197a1b2-0000-7000-8000-0000000000c1").expect("uuid");
        let event = NewEvent::new("finance.payment.processed", json!({"amount_minor": 1250}))
            .with_version(2)
            .with_subject("payment/42")
            .with_idempotency_key("payment-42")
            .with_correlation_id(cid);

        let mut seqs = Vec::new();
        for _ in 0..3 {
            seqs.push(client.publish_event(&event).await.expect("published").seq);
        }
        assert_eq!(seqs, [1, 2, 3]);

        kernel.with(|r| {
            assert_eq!(r.token_requests.len(), 1, "the token is cached");
            assert_eq!(
                r.token_requests[0],
                json!({"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
            );
            for (headers, body) in &r.publishes {
                assert_eq!(header(headers, "authorization"), Some("Bearer token-1"));
                assert_eq!(header(headers, "idempotency-key"), Some("payment-42"));
                assert_eq!(
                    header(headers, "x-correlation-id"),
                    Some("0197a1b2-0000-7000-8000-0000000000c1")
                );
                assert_eq!(
                    body,
                    &json!({
                        "type": "finance.payment.processed",
                        "payload": {"amount_minor": 1250},
                        "version": 2,
                        "subject": "payment/42",
                    })
                );
            }
        });
    }

    #[tokio::test]
    async fn optional_members_and_headers_are_left_out_when_unset() {
        let (kernel, client) = spawn_kernel().await;
        let published = client
            .publish_event(&NewEvent::new("finance.payment.failed", json!({})))
            .await
            .expect("published");
        assert_eq!(
            published,
            PublishedEvent {
                id: "0197a1b2-0000-7000-8000-000000000001".into(),
                seq: 1
            }
        );
        kernel.with(|r| {
            let (headers, body) = &r.publishes[0];
            assert_eq!(
                body,
                &json!({"type": "finance.payment.failed", "payload": {}})
            );
            assert_eq!(header(headers, "idempotency-key"), None);
            assert_eq!(header(headers, "x-correlation-id"), None);
        });
    }

    #[tokio::test]
    async fn whoami_names_the_service_accounts_tenant_and_survives_a_revoked_token() {
        let (kernel, client) = spawn_kernel().await;
        let expected = ServiceIdentity {
            actor_type: "service".into(),
            subject_id: "sa-1".into(),
            tenant_id: "0197a1b2-0000-7000-8000-0000000000aa".into(),
            tenant_slug: "acme".into(),
        };
        assert_eq!(client.whoami().await.expect("identity"), expected);
        kernel.with(|r| r.valid_tokens.clear());
        assert_eq!(
            client.whoami().await.expect("identity after refresh"),
            expected
        );
        kernel.with(|r| assert_eq!(r.token_requests.len(), 2, "one refresh"));
    }

    #[tokio::test]
    async fn a_token_close_to_expiry_is_not_reused() {
        let (kernel, client) = spawn_kernel().await;
        // Exactly the refresh margin: due for refresh as soon as it is issued.
        kernel.with(|r| r.expires_in = TOKEN_REFRESH_MARGIN.as_secs());
        assert_eq!(client.access_token().await.expect("token"), "token-1");
        assert_eq!(client.access_token().await.expect("token"), "token-2");
        kernel.with(|r| assert_eq!(r.token_requests.len(), 2));
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_token_request() {
        let (kernel, client) = spawn_kernel().await;
        let (a, b, c, d) = tokio::join!(
            client.access_token(),
            client.access_token(),
            client.access_token(),
            client.access_token(),
        );
        for token in [a, b, c, d] {
            assert_eq!(token.expect("token"), "token-1");
        }
        kernel.with(|r| assert_eq!(r.token_requests.len(), 1));
    }

    #[tokio::test]
    async fn a_revoked_token_is_replaced_and_the_publish_retried_once() {
        let (kernel, client) = spawn_kernel().await;
        let event = NewEvent::new("finance.payment.processed", json!({"n": 1}))
            .with_idempotency_key("payment-7");
        client.publish_event(&event).await.expect("first publish");
        kernel.with(|r| r.valid_tokens.clear());

        let published = client.publish_event(&event).await.expect("retried publish");
        assert_eq!(
            published.seq, 3,
            "the refused attempt was the second request"
        );
        kernel.with(|r| {
            assert_eq!(r.token_requests.len(), 2);
            let auths: Vec<_> = r
                .publishes
                .iter()
                .map(|(h, _)| header(h, "authorization").map(str::to_owned))
                .collect();
            assert_eq!(
                auths,
                [
                    Some("Bearer token-1".to_owned()),
                    Some("Bearer token-1".to_owned()),
                    Some("Bearer token-2".to_owned())
                ]
            );
            assert_eq!(
                header(&r.publishes[2].0, "idempotency-key"),
                Some("payment-7")
            );
        });
    }

    #[tokio::test]
    async fn a_second_401_is_returned_instead_of_retrying_forever() {
        let (kernel, client) = spawn_kernel().await;
        // Every publish is refused with 401, whatever token it carries.
        kernel.with(|r| {
            r.publish_problem = Some(Problem::new(ErrorCode::Unauthorized, "no publish for you"));
        });
        let error = client
            .publish_event(&NewEvent::new("x.y.z", json!({})))
            .await
            .expect_err("refused");
        let problem = error.problem().expect("a problem body");
        assert_eq!(problem.code, ErrorCode::Unauthorized);
        assert_eq!(problem.detail, "no publish for you");
        kernel.with(|r| {
            assert_eq!(r.publishes.len(), 2, "one attempt and one retry");
            assert_eq!(r.token_requests.len(), 2, "one refresh");
        });
    }

    #[tokio::test]
    async fn problem_answers_are_parsed_into_the_error() {
        let (kernel, client) = spawn_kernel().await;
        let mut validation = Problem::new(ErrorCode::ValidationError, "the event is not valid");
        validation.errors = vec![aibos_wire::FieldError {
            field: "type".into(),
            message: "must be dotted".into(),
        }];
        validation.correlation_id = Some("0197a1b2-0000-7000-8000-0000000000c1".into());
        kernel.with(|r| r.publish_problem = Some(validation.clone()));

        let error = client
            .publish_event(&NewEvent::new("nodots", json!({})))
            .await
            .expect_err("refused");
        assert_eq!(error.problem(), Some(&validation));
        assert!(!error.is_retryable());
        assert_eq!(
            error.to_string(),
            "the kernel answered 400 VALIDATION_ERROR: the event is not valid"
        );
    }

    #[tokio::test]
    async fn wrong_client_credentials_surface_the_oauth_error() {
        let (_kernel, client) = spawn_kernel().await;
        let address = client.inner.base_url.clone();
        let wrong = KernelClient::new(&address, CLIENT_ID, "not-the-secret").expect("valid");
        let error = wrong.access_token().await.expect_err("refused");
        let problem = error.problem().expect("a problem body");
        assert_eq!(problem.status, 401);
        assert_eq!(problem.error.as_deref(), Some("invalid_client"));
    }

    #[tokio::test]
    async fn a_non_problem_error_body_is_an_unexpected_response() {
        let (kernel, client) = spawn_kernel().await;
        kernel.with(|r| r.publish_plain_status = Some(StatusCode::BAD_GATEWAY));
        let error = client
            .publish_event(&NewEvent::new("x.y.z", json!({})))
            .await
            .expect_err("refused");
        assert!(
            matches!(error, ClientError::UnexpectedResponse { status: 502, .. }),
            "{error:?}"
        );
        assert!(error.is_retryable());
    }

    #[tokio::test]
    async fn an_unreachable_kernel_is_a_retryable_transport_error() {
        // Bind a port, then close it: nothing listens there any more.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        drop(listener);
        let client =
            KernelClient::new(&format!("http://{address}"), CLIENT_ID, CLIENT_SECRET).expect("ok");
        let error = client.access_token().await.expect_err("unreachable");
        assert!(matches!(error, ClientError::Transport(_)), "{error:?}");
        assert!(error.is_retryable());
    }

    #[test]
    fn bad_configurations_are_refused() {
        let new =
            |url: &str, id: &str, secret: &str| KernelClient::new(url, id, secret).map(|_| ());
        assert!(matches!(
            new("not a url", CLIENT_ID, CLIENT_SECRET),
            Err(ConfigError::InvalidKernelUrl(_))
        ));
        assert!(matches!(
            new("https://kernel.internal", CLIENT_ID, CLIENT_SECRET),
            Err(ConfigError::InvalidKernelUrl(_))
        ));
        assert_eq!(
            new("http://kernel.internal", "", CLIENT_SECRET),
            Err(ConfigError::InvalidCredentials("the client id is empty"))
        );
        assert_eq!(
            new("http://kernel.internal", CLIENT_ID, " "),
            Err(ConfigError::InvalidCredentials(
                "the client secret is empty"
            ))
        );
    }

    #[test]
    fn endpoints_keep_a_base_path_prefix() {
        let client = KernelClient::new(
            "http://kernel.internal:3001/edge/",
            CLIENT_ID,
            CLIENT_SECRET,
        )
        .expect("valid");
        assert_eq!(
            client.inner.publish_url.as_str(),
            "http://kernel.internal:3001/edge/api/kernel/events/publish"
        );
        assert_eq!(
            client.inner.token_url.as_str(),
            "http://kernel.internal:3001/edge/api/kernel/auth/token"
        );
    }

    #[test]
    fn debug_output_never_shows_the_client_secret() {
        let client =
            KernelClient::new("http://kernel.internal", CLIENT_ID, CLIENT_SECRET).expect("valid");
        let debug = format!("{client:?}");
        assert!(debug.contains(CLIENT_ID), "{debug}");
        assert!(!debug.contains(CLIENT_SECRET), "{debug}");
    }
}
