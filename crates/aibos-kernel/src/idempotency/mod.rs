//! Idempotency keys (SPEC §8), one mechanism for the kernel API
//! ([`kernel`]) and gateway routes ([`gateway`]).
//!
//! A POST, PUT, PATCH or DELETE carrying `Idempotency-Key` is scoped to the
//! caller's tenant (from the token) and the key, and fingerprinted (SHA-256 over
//! method, path and query, and body). [`execute`] then:
//!
//! 1. answers from the in-process cache of completed records when it holds
//!    the key (a replay costs no query);
//! 2. otherwise, in a spawned task (a client hanging up cannot cut it), takes
//!    the key with one atomic upsert (`store::take_in`); the one request that
//!    takes it runs, and its response (status < 500, body ≤ 1 MiB) is stored
//!    and cached; a 5xx, a failure, a timeout or an oversized body releases
//!    the key (deletes the record) instead;
//! 3. a request that does not take the key reads the record: completed with
//!    the same principal and fingerprint → the stored response with
//!    `Idempotent-Replayed: true`; another principal or fingerprint → 422
//!    `IDEMPOTENCY_KEY_REUSED`; in flight → 409 `IDEMPOTENCY_IN_FLIGHT` with
//!    `Retry-After` until its lock ends.
//!
//! An in-flight record left by a kernel that died expires with its lock
//! (`idempotency.lock_timeout_seconds`); [`purge`] deletes expired records.
//! `docs/idempotency.md` is the client's view.

pub mod gateway;
pub mod kernel;
pub mod purge;
pub mod store;

use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::FutureExt;
use http_body_util::BodyExt;
use metrics::Counter;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::error::{ApiError, ErrorCode};
use crate::http::edge::{CURRENT_REQUEST, RequestContext};
use crate::limits;
use crate::secrets::MasterKeys;
use crate::state::AppState;
use crate::telemetry::Metrics;

/// `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// `Idempotent-Replayed: true` marks a stored response served again.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// A cell's list of further response headers to store and replay.
pub const REPLAY_HEADERS: HeaderName = HeaderName::from_static("idempotency-replay-headers");

/// Headers always stored and replayed when present.
const ALWAYS_REPLAYED: [HeaderName; 3] = [header::CONTENT_TYPE, header::LOCATION, header::ETAG];

/// Headers never stored, whatever a cell names: hop-by-hop, framing, cookies
/// (a session must not be handed out twice), and what the edge sets per request.
const NEVER_REPLAYED: [&str; 14] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "set-cookie",
    "x-correlation-id",
    "traceparent",
    "idempotent-replayed",
    "idempotency-replay-headers",
];

/// Whether a request of `method` is concerned by `Idempotency-Key`.
pub fn concerns(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// A valid `Idempotency-Key`: 1–255 printable ASCII characters (0x20–0x7E).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Parses a header value; 400 `VALIDATION_ERROR` naming the header otherwise.
    pub fn parse(value: &HeaderValue) -> Result<IdempotencyKey, ApiError> {
        let bytes = value.as_bytes();
        let invalid = |why: &str| ApiError::invalid_field("header:idempotency-key", why);
        if bytes.is_empty() || bytes.len() > 255 {
            return Err(invalid("must be 1 to 255 characters long"));
        }
        if !bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
            return Err(invalid("must be printable ASCII characters only"));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| invalid("must be ASCII"))?;
        Ok(IdempotencyKey(text.to_owned()))
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// SHA-256 over method, path and query, and body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of one request. Method and path hold no newline, so the
    /// separators make the encoding unambiguous.
    pub fn of(method: &Method, path_and_query: &str, body: &[u8]) -> Fingerprint {
        let mut hash = Sha256::new();
        hash.update(method.as_str().as_bytes());
        hash.update(b"\n");
        hash.update(path_and_query.as_bytes());
        hash.update(b"\n");
        hash.update(body);
        Fingerprint(hash.finalize().into())
    }

    /// Lowercase hex, as stored.
    pub fn hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(64);
        for byte in self.0 {
            out.push(char::from(DIGITS[usize::from(byte >> 4)]));
            out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
        }
        out
    }
}

/// One request with a key, ready for [`execute`].
pub struct Keyed {
    /// The caller's tenant (from the token).
    pub tenant_id: String,
    /// The caller.
    pub subject_id: String,
    /// The key.
    pub key: IdempotencyKey,
    /// The request's fingerprint.
    pub fingerprint: Fingerprint,
    /// The edge's context, re-entered inside the spawned task so that logs
    /// and problems keep the request's correlation id.
    pub context: Option<RequestContext>,
    /// A gateway route with `audit_calls`: its `gateway.call` entry, written
    /// in the transaction that stores the answer (or alone when the answer is
    /// not stored).
    pub(crate) call_audit: Option<crate::gateway::proxy::CallAudit>,
}

impl Keyed {
    /// Reads a keyed request's body (bounded by the edge's limit) and names
    /// its record: the caller's tenant and subject, the key, and the
    /// fingerprint over method, path and query, and body. The body comes back
    /// to be sent on.
    pub async fn read(
        parts: &axum::http::request::Parts,
        body: Body,
        caller: &crate::authz::Caller,
        key: IdempotencyKey,
    ) -> Result<(Keyed, Bytes), Response> {
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => return Err(crate::gateway::proxy::body_error(e).into_response()),
        };
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let keyed = Keyed {
            fingerprint: Fingerprint::of(&parts.method, path_and_query, &bytes),
            tenant_id: caller.tenant_id().to_owned(),
            subject_id: caller.subject_id().to_owned(),
            key,
            context: parts.extensions.get::<RequestContext>().copied(),
            call_audit: None,
        };
        Ok((keyed, bytes))
    }
}

/// A stored response: what a replay answers.
#[derive(Debug)]
pub struct Stored {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

impl Stored {
    /// The response, marked as a replay or not.
    fn response(&self, replayed: bool) -> Response {
        let mut response = Response::new(Body::from(self.body.clone()));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.reserve(self.headers.len() + 1);
        for (name, value) in &self.headers {
            headers.append(name.clone(), value.clone());
        }
        if replayed {
            headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        }
        response
    }

    /// The headers of `head` to replay: [`ALWAYS_REPLAYED`], then those the
    /// response names in `Idempotency-Replay-Headers` (at most
    /// [`limits::IDEMPOTENCY_REPLAY_HEADERS_MAX`]), never [`NEVER_REPLAYED`],
    /// within [`limits::IDEMPOTENCY_HEADER_BYTES_MAX`].
    fn chosen_headers(headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
        let mut names: Vec<HeaderName> = ALWAYS_REPLAYED.to_vec();
        let named = headers
            .get_all(REPLAY_HEADERS)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .filter(|n| !NEVER_REPLAYED.contains(&n.as_str()))
            .take(limits::IDEMPOTENCY_REPLAY_HEADERS_MAX);
        for name in named {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let mut chosen = Vec::new();
        let mut bytes = 0;
        for name in names {
            for value in headers.get_all(&name) {
                bytes += name.as_str().len() + value.len();
                if bytes > limits::IDEMPOTENCY_HEADER_BYTES_MAX {
                    return chosen;
                }
                chosen.push((name.clone(), value.clone()));
            }
        }
        chosen
    }

    /// The headers as stored: a JSON array of `[name, value]` (values that are
    /// not visible ASCII are left out).
    fn headers_json(&self) -> String {
        let pairs: Vec<(&str, &str)> = self
            .headers
            .iter()
            .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str(), v)))
            .collect();
        serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_owned())
    }

    fn weight(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        (self.body.len() + headers + 256) as u64
    }
}

/// A completed record as the cache holds it.
#[derive(Debug)]
struct Completed {
    subject_id: Box<str>,
    fingerprint: Fingerprint,
    expires_at: OffsetDateTime,
    response: Stored,
}

impl Completed {
    /// A completed record read back, its body opened with `keys`; `Err` names
    /// what does not hold.
    fn from_record(
        record: store::Record,
        keys: &MasterKeys,
        place: &str,
    ) -> Result<Completed, String> {
        let sealed = record.response_body.as_deref().ok_or("no body")?;
        let encoded = keys.open(sealed, place).map_err(|e| e.to_string())?;
        let body = URL_SAFE_NO_PAD.decode(encoded).map_err(|e| e.to_string())?;
        Completed::parse(record, body).ok_or_else(|| "a field does not parse".to_owned())
    }

    fn parse(record: store::Record, body: Vec<u8>) -> Option<Completed> {
        let status = StatusCode::from_u16(u16::try_from(record.response_status?).ok()?).ok()?;
        let pairs: Vec<(String, String)> =
            serde_json::from_str(record.response_headers.as_deref()?).ok()?;
        let headers = pairs
            .into_iter()
            .filter_map(|(n, v)| {
                Some((
                    HeaderName::from_bytes(n.as_bytes()).ok()?,
                    HeaderValue::from_str(&v).ok()?,
                ))
            })
            .collect();
        Some(Completed {
            fingerprint: parse_hex(&record.fingerprint)?,
            subject_id: record.subject_id.into(),
            expires_at: crate::timestamp::parse(&record.expires_at)?,
            response: Stored {
                status,
                headers,
                body: Bytes::from(body),
            },
        })
    }
}

fn parse_hex(text: &str) -> Option<Fingerprint> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let nibble = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(Fingerprint(out))
}

/// The cache's key: tenant and idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    tenant_id: Box<str>,
    key: Box<str>,
}

/// A borrowed [`CacheKey`], so that a lookup allocates nothing; hashes as
/// `CacheKey` does (a `Box<str>` hashes as its `str`).
struct CacheKeyRef<'a> {
    tenant_id: &'a str,
    key: &'a str,
}

impl Hash for CacheKeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.tenant_id.hash(state);
        self.key.hash(state);
    }
}

impl quick_cache::Equivalent<CacheKey> for CacheKeyRef<'_> {
    fn equivalent(&self, key: &CacheKey) -> bool {
        *self.tenant_id == *key.tenant_id && *self.key == *key.key
    }
}

/// Weighs a cached record by its bytes.
#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<CacheKey, Arc<Completed>> for ByBytes {
    fn weight(&self, key: &CacheKey, value: &Arc<Completed>) -> u64 {
        (key.tenant_id.len() + key.key.len()) as u64 + value.response.weight()
    }
}

/// Why a key was released.
#[derive(Debug, Clone, Copy)]
enum Release {
    ServerError,
    Transport,
    Oversized,
    Timeout,
    Panic,
}

/// This kernel's idempotency state: the cache of completed records and the
/// metric handles. One per [`AppState`].
pub struct Idempotency {
    /// Completed records by tenant and key: immutable until they expire
    /// (checked on every hit), so no other kernel's change can make one stale.
    /// Never holds an in-flight record.
    completed: quick_cache::sync::Cache<CacheKey, Arc<Completed>, ByBytes>,
    replays: Counter,
    in_flight_conflicts: Counter,
    mismatches: Counter,
    executions: Counter,
    oversized: Counter,
    released: [Counter; 5],
}

impl Idempotency {
    /// An empty cache, its metrics registered in `metrics`.
    pub fn new(metrics: &Metrics) -> Idempotency {
        let released = |reason: &'static str| {
            metrics.counter(
                "aibos_idempotency_released_total",
                &[("reason", reason.to_owned())],
            )
        };
        Idempotency {
            completed: quick_cache::sync::Cache::with_weighter(
                limits::IDEMPOTENCY_CACHE_ITEMS_ESTIMATE,
                limits::IDEMPOTENCY_CACHE_BYTES_MAX,
                ByBytes,
            ),
            replays: metrics.counter("aibos_idempotency_replays_total", &[]),
            in_flight_conflicts: metrics
                .counter("aibos_idempotency_in_flight_conflicts_total", &[]),
            mismatches: metrics.counter("aibos_idempotency_mismatches_total", &[]),
            executions: metrics.counter("aibos_idempotency_executions_total", &[]),
            oversized: metrics.counter("aibos_idempotency_oversized_passthroughs_total", &[]),
            released: [
                released("server_error"),
                released("transport"),
                released("oversized"),
                released("timeout"),
                released("panic"),
            ],
        }
    }

    fn cached(&self, tenant_id: &str, key: &str) -> Option<Arc<Completed>> {
        let lookup = CacheKeyRef { tenant_id, key };
        let found = self.completed.get(&lookup)?;
        if found.expires_at <= crate::timestamp::now() {
            self.completed.remove(&lookup);
            return None;
        }
        Some(found)
    }

    fn remember(&self, keyed: &Keyed, completed: Arc<Completed>) {
        self.completed.insert(
            CacheKey {
                tenant_id: keyed.tenant_id.as_str().into(),
                key: keyed.key.as_str().into(),
            },
            completed,
        );
    }

    /// The answer to a request whose key holds a completed record.
    fn answer_completed(&self, keyed: &Keyed, completed: &Completed) -> Response {
        if *completed.subject_id != *keyed.subject_id || completed.fingerprint != keyed.fingerprint
        {
            return self.reused().into_response();
        }
        self.replays.increment(1);
        completed.response.response(true)
    }

    fn reused(&self) -> ApiError {
        self.mismatches.increment(1);
        ApiError::new(
            ErrorCode::IdempotencyKeyReused,
            "This Idempotency-Key was used for another request (method, path or body), or by another principal; send a new key.",
        )
    }

    fn in_flight(&self, retry_after: Duration) -> ApiError {
        self.in_flight_conflicts.increment(1);
        let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        ApiError::new(
            ErrorCode::IdempotencyInFlight,
            "A request with this Idempotency-Key is still being executed; retry with the same key after Retry-After.",
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)))
    }

    fn released(&self, why: Release) {
        self.released[why as usize].increment(1);
    }
}

/// Serves one keyed request: a replay, a refusal, or `run` executed once with
/// its response stored (see the module documentation). `lock` is how long the
/// key stays locked should this kernel die while `run` runs. `run` must be
/// `'static`: it runs in a spawned task that a client hanging up cannot cut.
pub async fn execute<F>(state: &AppState, keyed: Keyed, lock: Duration, run: F) -> Response
where
    F: Future<Output = Response> + Send + 'static,
{
    let idempotency = state.idempotency();
    if let Some(completed) = idempotency.cached(&keyed.tenant_id, keyed.key.as_str()) {
        return idempotency.answer_completed(&keyed, &completed);
    }
    let context = keyed.context;
    let task = take_and_run(state.clone(), keyed, lock, run);
    let handle = match context {
        Some(context) => tokio::spawn(CURRENT_REQUEST.scope(context, task)),
        None => tokio::spawn(task),
    };
    match handle.await {
        Ok(response) => response,
        Err(e) => ApiError::internal(anyhow::anyhow!("an idempotent execution failed: {e}"))
            .into_response(),
    }
}

async fn take_and_run<F>(state: AppState, mut keyed: Keyed, lock: Duration, run: F) -> Response
where
    F: Future<Output = Response> + Send + 'static,
{
    let idempotency = state.idempotency();
    let call_audit = keyed.call_audit.take();
    let fingerprint = keyed.fingerprint.hex();
    for _ in 0..limits::IDEMPOTENCY_TAKE_ATTEMPTS_MAX {
        let now = crate::timestamp::now();
        let now_text = crate::timestamp::format(now);
        let locked_until = crate::timestamp::format(now + lock);
        let claim_id = uuid::Uuid::new_v4().to_string();
        let take = store::Take {
            tenant_id: keyed.tenant_id.clone(),
            key: keyed.key.as_str().to_owned(),
            subject_id: keyed.subject_id.clone(),
            fingerprint: fingerprint.clone(),
            claim_id: claim_id.clone(),
            locked_until,
            now: now_text.clone(),
        };
        // Grouped: every keyed call writes its record twice, and on either
        // engine a batch of them costs one commit instead of one each.
        let taken = state
            .write_grouped(move |tx| {
                Box::pin(
                    async move { Ok::<_, crate::db::DbError>(store::take_in(tx, &take).await?) },
                )
            })
            .await
            .map_err(store::into_sqlx);
        match taken {
            Ok(true) => {
                idempotency.executions.increment(1);
                let deadline = tokio::time::Instant::now() + lock;
                return run_claimed(&state, &keyed, &claim_id, deadline, call_audit, run).await;
            }
            Ok(false) => {}
            Err(e) => return ApiError::unavailable(e).into_response(),
        }
        let record = match store::read(state.db(), &keyed.tenant_id, keyed.key.as_str()).await {
            Ok(Some(record)) => record,
            // Released or purged since: take it again.
            Ok(None) => continue,
            Err(e) => return ApiError::unavailable(e).into_response(),
        };
        if record.expires_at <= now_text {
            continue;
        }
        if record.subject_id != keyed.subject_id || record.fingerprint != fingerprint {
            return idempotency.reused().into_response();
        }
        if record.state == "completed" {
            let place = store::body_place(&keyed.tenant_id, keyed.key.as_str());
            let completed = match Completed::from_record(record, state.master_keys(), &place) {
                Ok(completed) => completed,
                // Not executed again: the record stays until its TTL ends.
                Err(why) => {
                    return ApiError::internal(anyhow::anyhow!(
                        "a stored idempotent answer cannot be read: {why}"
                    ))
                    .into_response();
                }
            };
            let completed = Arc::new(completed);
            idempotency.remember(&keyed, completed.clone());
            return idempotency.answer_completed(&keyed, &completed);
        }
        let wait = record
            .locked_until
            .as_deref()
            .and_then(crate::timestamp::parse)
            .map_or(Duration::from_secs(1), |until| {
                Duration::try_from(until - now).unwrap_or(Duration::from_secs(1))
            });
        return idempotency.in_flight(wait).into_response();
    }
    // The record kept vanishing between take and read: a race with releases
    // the client can wait out like any other in-flight key.
    idempotency
        .in_flight(Duration::from_secs(1))
        .into_response()
}

/// Runs the request that took the key, then stores its response or releases
/// the key.
async fn run_claimed<F>(
    state: &AppState,
    keyed: &Keyed,
    claim_id: &str,
    deadline: tokio::time::Instant,
    call_audit: Option<crate::gateway::proxy::CallAudit>,
    run: F,
) -> Response
where
    F: Future<Output = Response> + Send + 'static,
{
    let idempotency = state.idempotency();
    let release = |why: Release| async move {
        idempotency.released(why);
        let (tenant_id, key, claim) = (
            keyed.tenant_id.clone(),
            keyed.key.as_str().to_owned(),
            claim_id.to_owned(),
        );
        let released = state
            .write_grouped(move |tx| {
                Box::pin(async move {
                    Ok::<_, crate::db::DbError>(
                        store::release_in(tx, &tenant_id, &key, &claim).await?,
                    )
                })
            })
            .await;
        if let Err(e) = released {
            // The record stays in flight until its lock expires; then the key can be used again.
            tracing::error!(error = %e, tenant_id = %keyed.tenant_id, "could not release an idempotency key");
        }
    };
    let response = match AssertUnwindSafe(run).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            release(Release::Panic).await;
            return crate::http::edge::panic_to_problem(panic);
        }
    };
    // An answer that is not stored is audited alone (the entry records what
    // the cell answered, stored or not).
    let audit_alone = |call_audit: Option<crate::gateway::proxy::CallAudit>, status| async move {
        if let Some(call_audit) = call_audit {
            call_audit.record_alone(state, status).await;
        }
    };
    let status = response.status();
    if status.is_server_error() {
        release(Release::ServerError).await;
        audit_alone(call_audit, status).await;
        return response;
    }
    let declared = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limits::IDEMPOTENCY_RESPONSE_BYTES_MAX as u64) {
        idempotency.oversized.increment(1);
        tracing::warn!(tenant_id = %keyed.tenant_id, limit_bytes = limits::IDEMPOTENCY_RESPONSE_BYTES_MAX, "response too large to store for its idempotency key; passed through and the key released");
        release(Release::Oversized).await;
        audit_alone(call_audit, status).await;
        return response;
    }
    let (head, body) = response.into_parts();
    let buffered = match tokio::time::timeout_at(deadline, buffer(body)).await {
        Ok(buffered) => buffered,
        Err(_) => {
            release(Release::Timeout).await;
            audit_alone(call_audit, status).await;
            return ApiError::new(
                ErrorCode::UpstreamTimeout,
                "The response was not complete before its idempotency key's lock ended.",
            )
            .into_response();
        }
    };
    let body = match buffered {
        Buffered::Whole(body) => body,
        Buffered::Oversized { prefix, rest } => {
            idempotency.oversized.increment(1);
            tracing::warn!(tenant_id = %keyed.tenant_id, limit_bytes = limits::IDEMPOTENCY_RESPONSE_BYTES_MAX, "response too large to store for its idempotency key; passed through and the key released");
            release(Release::Oversized).await;
            audit_alone(call_audit, status).await;
            let first = futures_util::stream::once(async move { Ok::<_, axum::Error>(prefix) });
            let stream = futures_util::StreamExt::chain(first, rest.into_data_stream());
            return Response::from_parts(head, Body::from_stream(stream));
        }
        Buffered::Failed(e) => {
            tracing::warn!(error = %e, "the response of an idempotent request could not be read");
            release(Release::Transport).await;
            audit_alone(call_audit, status).await;
            return ApiError::new(
                ErrorCode::UpstreamUnavailable,
                "The response could not be read; retry with the same key.",
            )
            .into_response();
        }
    };
    let stored = Stored {
        status: head.status,
        headers: Stored::chosen_headers(&head.headers),
        body: body.clone(),
    };
    let ttl = state.config_ref().idempotency.ttl_seconds;
    let expires_at = crate::timestamp::now()
        + time::Duration::seconds(i64::try_from(ttl).unwrap_or(i64::MAX / 2));
    let headers_json = stored.headers_json();
    let sealed_body = state.master_keys().seal(
        &URL_SAFE_NO_PAD.encode(&body),
        &store::body_place(&keyed.tenant_id, keyed.key.as_str()),
    );
    let completion = store::Completion {
        status: head.status.as_u16(),
        headers_json: &headers_json,
        sealed_body: &sealed_body,
        expires_at: &crate::timestamp::format(expires_at),
    };
    let completed = complete_with_entry(
        state,
        keyed,
        claim_id,
        &completion,
        call_audit.map(|call_audit| call_audit.event(status)),
    )
    .await;
    match completed {
        Ok(true) => idempotency.remember(
            keyed,
            Arc::new(Completed {
                subject_id: keyed.subject_id.as_str().into(),
                fingerprint: keyed.fingerprint,
                expires_at,
                response: stored,
            }),
        ),
        Ok(false) => {
            tracing::warn!(tenant_id = %keyed.tenant_id, "an idempotency key's lock ended before its response was stored; the key may have been taken again")
        }
        // Left in flight: the key answers 409 until its lock ends rather than
        // execute again at once.
        Err(e) => {
            tracing::error!(error = %e, tenant_id = %keyed.tenant_id, "could not store the response of an idempotent request")
        }
    }
    Response::from_parts(head, Body::from(body))
}

/// Stores the answer of execution `claim_id`, and appends its `gateway.call`
/// entry when the route audits its calls, in one transaction: no stored answer
/// without its entry. False when the record is no longer this execution's
/// (its lock ended and another took the key); the entry is written anyway,
/// since the cell did act.
async fn complete_with_entry(
    state: &AppState,
    keyed: &Keyed,
    claim_id: &str,
    completion: &store::Completion<'_>,
    entry: Option<(crate::audit::AuditContext, crate::audit::AuditEvent)>,
) -> Result<bool, sqlx::Error> {
    let keys = state.redact_keys();
    let (tenant_id, key, claim_id) = (
        keyed.tenant_id.clone(),
        keyed.key.as_str().to_owned(),
        claim_id.to_owned(),
    );
    let owned = store::OwnedCompletion::from(completion);
    state
        .write_grouped(move |tx| {
            Box::pin(async move {
                let stored =
                    store::complete_in(tx, &tenant_id, &key, &claim_id, &owned.borrow()).await?;
                if let Some((context, event)) = entry {
                    crate::audit::record(tx, &context, event, &keys).await?;
                }
                Ok::<_, crate::db::DbError>(stored)
            })
        })
        .await
        .map_err(store::into_sqlx)
}

/// A response body read for storing.
enum Buffered {
    /// The whole body, within the limit.
    Whole(Bytes),
    /// Over the limit: what was read, and the rest unread.
    Oversized { prefix: Bytes, rest: Body },
    /// Reading failed.
    Failed(axum::Error),
}

/// Reads `body` up to [`limits::IDEMPOTENCY_RESPONSE_BYTES_MAX`]. Trailers are
/// not stored (no kernel endpoint or proxied JSON answer has any).
async fn buffer(mut body: Body) -> Buffered {
    let mut read: Vec<u8> = Vec::new();
    let mut only: Option<Bytes> = None;
    loop {
        match body.frame().await {
            None => {
                return Buffered::Whole(match only {
                    Some(bytes) if read.is_empty() => bytes,
                    _ => Bytes::from(read),
                });
            }
            Some(Err(e)) => return Buffered::Failed(e),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                let held = read.len() + only.as_ref().map_or(0, Bytes::len);
                if held + data.len() > limits::IDEMPOTENCY_RESPONSE_BYTES_MAX {
                    if let Some(first) = only.take() {
                        read.extend_from_slice(&first);
                    }
                    read.extend_from_slice(&data);
                    return Buffered::Oversized {
                        prefix: Bytes::from(read),
                        rest: body,
                    };
                }
                // One frame (most answers) is kept as it came, without a copy.
                if only.is_none() && read.is_empty() {
                    only = Some(data);
                } else {
                    if let Some(first) = only.take() {
                        read.extend_from_slice(&first);
                    }
                    read.extend_from_slice(&data);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(bytes: &[u8]) -> Result<IdempotencyKey, ApiError> {
        IdempotencyKey::parse(&HeaderValue::from_bytes(bytes).unwrap())
    }

    #[test]
    fn keys_are_one_to_255_printable_ascii_characters() {
        assert!(key(b"a").is_ok());
        assert!(
            key(b"order 42 / retry #1 ~").is_ok(),
            "space and punctuation are printable"
        );
        assert!(key(&[b'k'; 255]).is_ok());
        assert!(key(&[b'k'; 256]).is_err());
        assert!(key(b"").is_err());
        assert!(key(b"tab\there").is_err());
        assert!(key("caf\u{e9}".as_bytes()).is_err());
    }

    #[test]
    fn the_fingerprint_covers_method_path_and_body() {
        let base = Fingerprint::of(&Method::POST, "/api/kernel/roles", b"{}");
        assert_eq!(
            base,
            Fingerprint::of(&Method::POST, "/api/kernel/roles", b"{}")
        );
        assert_ne!(
            base,
            Fingerprint::of(&Method::PUT, "/api/kernel/roles", b"{}")
        );
        assert_ne!(
            base,
            Fingerprint::of(&Method::POST, "/api/kernel/roles?x=1", b"{}")
        );
        assert_ne!(
            base,
            Fingerprint::of(&Method::POST, "/api/kernel/roles", b"{ }")
        );
        assert_eq!(parse_hex(&base.hex()), Some(base));
        assert_eq!(base.hex().len(), 64);
        assert_eq!(parse_hex("zz"), None);
        // A known vector: SHA-256 of "GET\n/\n".
        assert_eq!(
            Fingerprint::of(&Method::GET, "/", b"").hex(),
            format!("{:x}", Sha256::digest(b"GET\n/\n"))
        );
    }

    #[test]
    fn chosen_headers_are_the_fixed_ones_and_those_a_cell_names_never_cookies() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::LOCATION, HeaderValue::from_static("/v1/payments/1"));
        headers.insert("x-cell-ref", HeaderValue::from_static("ref-1"));
        headers.insert("x-other", HeaderValue::from_static("not named"));
        headers.insert(header::SET_COOKIE, HeaderValue::from_static("s=1"));
        headers.insert(
            REPLAY_HEADERS,
            HeaderValue::from_static("X-Cell-Ref, set-cookie, bad name"),
        );
        let chosen = Stored::chosen_headers(&headers);
        let names: Vec<&str> = chosen.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "location", "x-cell-ref"]);
        let stored = Stored {
            status: StatusCode::CREATED,
            headers: chosen,
            body: Bytes::from_static(b"{}"),
        };
        let json = stored.headers_json();
        let back: Vec<(String, String)> = serde_json::from_str(&json).unwrap();
        assert_eq!(back[2], ("x-cell-ref".to_owned(), "ref-1".to_owned()));
        let replay = stored.response(true);
        assert_eq!(replay.status(), 201);
        assert_eq!(replay.headers()[IDEMPOTENT_REPLAYED], "true");
    }
}
