//! The edge: one middleware that every request passes first, applying SPEC §3.
//!
//! In order: check `x-correlation-id` (a malformed
//! one is a 400; a missing one is generated) and continue or start the W3C trace;
//! refuse a body over `http.max_body_bytes` (413 at once when `Content-Length`
//! says so, otherwise while reading); apply the rate limits (`ratelimit`: not
//! to probes, `/metrics` or gateway calls, which the proxy limits after its
//! permission check); run the route; then add the security headers, echo the
//! correlation id and record the request's metrics.
//!
//! It is one function rather than a stack of small layers because each layer
//! costs an allocation and a service clone per request, and this is the hot path
//! of every call, the gateway's included.

use std::any::Any;
use std::future::Future;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::Limited;

use aibos_wire::correlation::{CORRELATION_HEADER, TRACEPARENT_HEADER};
use aibos_wire::{CorrelationId, TraceParent};

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

tokio::task_local! {
    /// The request being served on this task, so that every problem body and log
    /// line carries its correlation and trace ids without threading them through.
    pub static CURRENT_REQUEST: RequestContext;
}

/// The correlation and trace header names, parsed once (a `&str` name is parsed
/// on every use); the gateway forwards both under these names too.
pub const CORRELATION: HeaderName = HeaderName::from_static(CORRELATION_HEADER);
/// See [`CORRELATION`].
pub const TRACEPARENT: HeaderName = HeaderName::from_static(TRACEPARENT_HEADER);

/// What the edge learned about a request, for handlers and upstream calls.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext {
    /// The request's correlation id (client-supplied or generated).
    pub correlation_id: CorrelationId,
    /// This hop's trace context: the client's trace with a new span, or a new trace.
    pub trace: TraceParent,
}

/// The edge middleware; see the module documentation.
pub async fn edge(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().cloned();
    // Unmatched paths share one label: a scanner must not grow the label set.
    let label = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    around(&state, request, label, |request| next.run(request)).await
}

/// The edge around `inner`, for the axum middleware above and for the front
/// door's direct path to the gateway (`http::front`). `route` labels the
/// request's metrics: the matched route pattern, never the raw path.
pub async fn around<Inner, Served>(
    state: &AppState,
    mut request: Request,
    route: &str,
    inner: Inner,
) -> Response
where
    Inner: FnOnce(Request) -> Served,
    Served: Future<Output = Response>,
{
    let started = Instant::now();
    let random: u128 = rand_u128();
    let supplied = request
        .headers()
        .get(&CORRELATION)
        .map(|v| v.to_str().ok().and_then(CorrelationId::parse));
    let (correlation_id, bad_correlation_id) = match supplied {
        None => (CorrelationId::generate(), false),
        Some(Some(id)) => (id, false),
        Some(None) => (CorrelationId::generate(), true),
    };
    let trace = trace_context(request.headers(), random);
    let method = request.method().clone();

    // No tracing span per request: the log formatter reads the ids from the
    // task-local below (telemetry::WithRequestIds), so a request that logs
    // nothing formats nothing.
    let path_for_log =
        tracing::enabled!(tracing::Level::DEBUG).then(|| request.uri().path().to_owned());

    let limit = state.config_ref().http.max_body_bytes;
    let declared_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());

    let context = RequestContext {
        correlation_id,
        trace,
    };
    let mut response = CURRENT_REQUEST
        .scope(context, async move {
            if bad_correlation_id {
                return ApiError::invalid_field(
                    format!("header:{CORRELATION_HEADER}"),
                    "must be a UUID such as 0190f3c4-7e2a-7c4e-9d1a-2b3c4d5e6f70",
                )
                .into_response();
            }
            if declared_length.is_some_and(|len| len > limit) {
                return payload_too_large(limit).into_response();
            }
            request.extensions_mut().insert(context);
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            let request = request.map(|body| Body::new(Limited::new(body, limit)));
            // Rate limits (SPEC §9): probes and gateway calls pass untouched.
            crate::ratelimit::around_edge(state, request, route, inner).await
        })
        .await;

    let headers = response.headers_mut();
    // Room for everything added below at once: a proxied response's map is
    // sized for the cell's headers, and growing it one insert at a time
    // rehashes it more than once.
    headers.reserve(SECURITY_HEADERS.len() + 1);
    add_security_headers(headers);
    if let Ok(value) = HeaderValue::from_str(correlation_id.encode(&mut [0; 36])) {
        headers.insert(CORRELATION, value);
    }

    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    state
        .metrics()
        .http_request(route, &method, status, elapsed);
    if let Some(path) = path_for_log {
        CURRENT_REQUEST.sync_scope(context, || {
            tracing::debug!(%method, path, route, status, latency_ms = elapsed.as_secs_f64() * 1000.0, "request completed")
        });
    }
    response
}

/// The security headers every response carries (SPEC §3). A `static`: the
/// values are static bytes, so each response's copy is a pointer, not text.
static SECURITY_HEADERS: [(HeaderName, HeaderValue); 4] = [
    (
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    ),
    (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    (
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    ),
    (
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    ),
];

fn add_security_headers(headers: &mut HeaderMap) {
    for (name, value) in &SECURITY_HEADERS {
        headers.insert(name.clone(), value.clone());
    }
}

/// Continues a valid `traceparent` with a new span id, or starts a new trace.
fn trace_context(headers: &HeaderMap, random: u128) -> TraceParent {
    let bytes = random.to_le_bytes();
    let mut span_seed = [0u8; 8];
    span_seed.copy_from_slice(&bytes[..8]);
    match headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse)
    {
        Some(parent) => parent.child(span_seed),
        None => TraceParent::root(bytes, span_seed),
    }
}

fn rand_u128() -> u128 {
    // uuid's "fast-rng" draws from a thread-local generator: no system call per request.
    uuid::Uuid::new_v4().as_u128()
}

/// The 413 every oversized body gets.
pub fn payload_too_large(limit: u64) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("The request body exceeds the limit of {limit} bytes."),
    )
}

/// Turns a panic inside a handler into a logged 500 problem instead of a dropped connection.
pub fn panic_to_problem(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(non-string panic payload)");
    ApiError::internal(anyhow::anyhow!("handler panicked: {message}")).into_response()
}
