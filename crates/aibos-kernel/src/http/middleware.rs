//! Cross-cutting middleware: security headers, metrics, body limit, panics.

use std::any::Any;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::Limited;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

/// Adds the security headers every response carries (SPEC §3).
pub async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Counts every answered request and its latency by matched route, method and status.
pub async fn record_metrics(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    // Unmatched paths share one label: a scanner must not grow the label set.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let method = request.method().clone();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let route = route.as_deref().unwrap_or("unmatched");
    state
        .metrics()
        .http_request(route, method.as_str(), status, elapsed);
    tracing::debug!(
        status,
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        route,
        "request completed"
    );
    response
}

/// Refuses bodies over `http.max_body_bytes` (read live, so a reload applies it):
/// at once when `Content-Length` says so, otherwise when reading crosses the limit.
pub async fn limit_body(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.config().http.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return payload_too_large(limit).into_response();
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let request = request.map(|body| Body::new(Limited::new(body, limit)));
    next.run(request).await
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
