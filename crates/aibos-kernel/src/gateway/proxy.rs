//! `/api/gateway/{canon}/{*path}`: match, authenticate, authorize, idempotency
//! (a keyed call: `crate::idempotency::gateway`), protect, forward.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, Uri, header, request::Parts};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use super::client::{SendFailure, UpstreamClient};
use super::forward::{self, Identity};
use super::path;
use super::state::{Admission, BreakerSettings, Health};
use super::table::{CanonEntry, RouteEntry};
use super::telemetry::Outcome;
use aibos_wire::correlation::TRACEPARENT_LEN;

use crate::audit::AuditEvent;
use crate::authz::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::http::edge::RequestContext;
use crate::state::{AppState, EventLoopLocal};

/// The gateway as the OpenAPI document shows it. The handler serves every method
/// on `/api/gateway/{canon}/{*path}`; this only describes it.
#[utoipa::path(method(get, post, put, patch, delete), path = "/api/gateway/{canon}/{path}", tag = "gateway",
    security(("bearer" = [])),
    params(("canon" = String, Path, description = "The canon's name"),
           ("path" = String, Path, description = "The path under the canon, matched against its routes and forwarded with the query string"),
           ("Idempotency-Key" = Option<String>, Header, description = "1–255 printable ASCII characters, on POST, PUT, PATCH or DELETE of a route whose idempotency is optional or required: the cell is called once per key and tenant; a repeat gets the stored answer with `Idempotent-Replayed: true` (docs/idempotency.md)")),
    responses(
        (status = 200, description = "The cell's own answer, any status, passed through unchanged; a stored one with `Idempotent-Replayed: true`"),
        (status = 400, description = "VALIDATION_ERROR: a path with '..', encoded '/' or '\\', ';' or '%3B', or double encoding, or a malformed Idempotency-Key; IDEMPOTENCY_KEY_REQUIRED: a route whose idempotency is required, called without a key"),
        (status = 401, description = "UNAUTHORIZED"),
        (status = 403, description = "FORBIDDEN: the route's required permissions are missing"),
        (status = 404, description = "ROUTE_NOT_FOUND"),
        (status = 429, description = "RATE_LIMITED: the route's, the user's or the tenant's limit, with Retry-After"),
        (status = 409, description = "IDEMPOTENCY_IN_FLIGHT: the call with this Idempotency-Key is still executing; retry with the same key after Retry-After"),
        (status = 422, description = "IDEMPOTENCY_KEY_REUSED: the Idempotency-Key was used for another method, path or body, or by another principal"),
        (status = 503, description = "UPSTREAM_UNAVAILABLE: refused, reset, unhealthy, or circuit open (with Retry-After)"),
        (status = 504, description = "UPSTREAM_TIMEOUT")))]
#[allow(dead_code)]
fn gateway_call() {}

/// The OpenAPI description of the gateway.
#[derive(utoipa::OpenApi)]
#[openapi(paths(gateway_call))]
pub struct GatewayApi;

/// Forwards one call to its cell.
pub async fn proxy(
    State(state): State<AppState>,
    Extension(event_loop): Extension<Arc<EventLoopLocal>>,
    request: Request,
) -> Response {
    forward(&state, &event_loop, request).await
}

/// Forwards one call to its cell on behalf of the event loop `local` (the
/// front door's direct path; [`proxy`] is the router's).
pub async fn forward(state: &AppState, local: &Arc<EventLoopLocal>, request: Request) -> Response {
    let mut rate_headers = None;
    let mut response = match forward_call(state, local, request, &mut rate_headers).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    if let Some(headers) = rate_headers {
        headers.apply(response.headers_mut());
    }
    response
}

fn route_not_found(detail: &str) -> ApiError {
    ApiError::new(ErrorCode::RouteNotFound, detail)
}

async fn forward_call(
    state: &AppState,
    local: &Arc<EventLoopLocal>,
    request: Request,
    rate_headers: &mut Option<crate::ratelimit::RateHeaders>,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let uri = parts.uri.clone();
    let (canon_name, raw_rest) =
        path::split(uri.path()).ok_or_else(|| route_not_found("Not a gateway path."))?;
    let table = state.gateway().table();
    let Some(canon) = table.canon(canon_name).cloned() else {
        // Checked only once the lookup failed: a registered name never holds one.
        if canon_name.contains(';') || canon_name.contains("%3B") || canon_name.contains("%3b") {
            return Err(ApiError::invalid_field("path", path::SEMICOLON));
        }
        return Err(route_not_found("No canon of that name is registered."));
    };
    drop(table);
    let matched =
        path::decode_checked(raw_rest).map_err(|why| ApiError::invalid_field("path", why))?;
    let route = canon
        .route(&parts.method, &matched)
        .ok_or_else(|| route_not_found("No route of this canon matches the method and path."))?;

    let caller = Caller::authenticate(&parts, state, Some(&local.auth)).await?;
    caller.require(state, &route.required_permissions).await?;
    let limits = state
        .rate_limiter()
        .gateway_call(state, &caller, route)
        .await;
    limits.admit(rate_headers)?;

    // Idempotency (SPEC §8): a keyed call is run once, in a task of its own.
    if let Some(key) = crate::idempotency::gateway::key_for(route.idempotency, &parts)? {
        let (canon, caller) = (canon.clone(), caller);
        return Ok(crate::idempotency::gateway::serve(
            state, local, canon, route, caller, parts, body, key,
        )
        .await);
    }
    let call_audit = route
        .audit_calls
        .then(|| CallAudit::new(&caller, &canon, route, &parts.method, None));
    let response = send_to_cell(
        state,
        &local.upstream,
        &canon,
        route,
        &caller,
        (&uri, raw_rest),
        parts,
        body,
    )
    .await?;
    if let Some(call_audit) = call_audit {
        call_audit.record_alone(state, response.status()).await;
    }
    Ok(response)
}

/// The `gateway.call` entry of a call on a route with `audit_calls`: what the
/// cell was asked (canon, route, method, path pattern, idempotency key) and
/// what it answered (status, latency), in the caller's tenant chain under the
/// request's correlation id. Taken before the call; written once the cell's
/// answer head is in, before the client sees it. A call the cell never
/// answered is audited as `gateway.upstream_error` instead.
pub(crate) struct CallAudit {
    context: crate::audit::AuditContext,
    canon_id: String,
    details: serde_json::Value,
    started: Instant,
}

impl CallAudit {
    pub(crate) fn new(
        caller: &Caller,
        canon: &CanonEntry,
        route: &RouteEntry,
        method: &Method,
        idempotency_key: Option<&str>,
    ) -> CallAudit {
        CallAudit {
            context: caller.audit_context(),
            canon_id: canon.id.clone(),
            details: serde_json::json!({
                "canon": canon.name,
                "route_id": route.id,
                "route": route.path,
                "method": method.as_str(),
                "idempotency_key": idempotency_key,
            }),
            started: Instant::now(),
        }
    }

    /// The entry for the cell's answer `status`: a success below 400, a
    /// failure from 400 (a warning from 500).
    pub(crate) fn event(
        self,
        status: axum::http::StatusCode,
    ) -> (crate::audit::AuditContext, AuditEvent) {
        let mut details = self.details;
        details["status"] = status.as_u16().into();
        details["latency_ms"] = u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .into();
        let event = AuditEvent::new("gateway.call")
            .outcome(if status.as_u16() < 400 {
                "success"
            } else {
                "failure"
            })
            .severity(if status.is_server_error() {
                "warning"
            } else {
                "info"
            })
            .resource("canon", &self.canon_id)
            .details(details);
        (self.context, event)
    }

    /// Writes the entry in a transaction of its own. A failure is logged, not
    /// answered: the cell has acted, and the client must hear what it said.
    pub(crate) async fn record_alone(self, state: &AppState, status: axum::http::StatusCode) {
        let (context, event) = self.event(status);
        if let Err(e) = state.audit_alone(context, event).await {
            tracing::error!(error = ?e.code(), "could not audit a gateway call");
        }
    }
}

/// The call to the cell, after the route matched and the caller was
/// authorised: health, breaker, assertion, the upstream request with its
/// retries, and the answer streamed back. `target` is the request's URI and
/// the path under the canon within it.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn send_to_cell(
    state: &AppState,
    client: &UpstreamClient,
    canon: &CanonEntry,
    route: &RouteEntry,
    caller: &Caller,
    (uri, raw_rest): (&Uri, &str),
    mut parts: Parts,
    body: Body,
) -> Result<Response, ApiError> {
    let config = state.config_ref();
    let gateway = &config.gateway;
    if canon.state.health() == Health::Unhealthy {
        route.metrics.call(Outcome::Unhealthy);
        let failure = Failure {
            kind: "unhealthy",
            status: None,
            latency: Duration::ZERO,
        };
        audit_failure(state, caller, canon, route, &failure).await;
        return Err(ApiError::new(
            ErrorCode::UpstreamUnavailable,
            "The service behind this route fails its health checks; try again later.",
        )
        .with_header(
            header::RETRY_AFTER,
            retry_after_value(Duration::from_secs(gateway.health_interval_seconds)),
        ));
    }
    let mut traceparent_text = [0; TRACEPARENT_LEN];
    let traceparent = match parts.extensions.get::<RequestContext>() {
        Some(context) => context.trace.encode(&mut traceparent_text),
        None => "",
    };
    let mut forwarded = String::with_capacity(canon.base.path_prefix.len() + raw_rest.len() + 64);
    forwarded.push_str(&canon.base.path_prefix);
    forwarded.push_str(raw_rest);
    if let Some(query) = uri.query() {
        forwarded.push('?');
        forwarded.push_str(query);
    }
    let identity = Identity {
        tenant_id: caller.tenant_id(),
        subject: caller.subject_id(),
        id_headers: &caller.principal.id_headers,
        actor_type: caller.principal.actor_type,
        correlation_id: &caller.correlation_id,
        client_ip: caller.client_ip,
        traceparent,
    };
    let signer = canon.signer.as_ref().ok_or_else(|| {
        ApiError::internal(anyhow::anyhow!(
            "canon {} has no active assertion secret",
            canon.name
        ))
    })?;
    let assertion = forward::sign_assertion(
        signer,
        &canon.name,
        &identity,
        parts.method.as_str(),
        &forwarded,
    );
    let retryable = is_safe_to_repeat(&parts) && gateway.retry_max > 0;
    // The headers of the next attempt. A retry needs them again: the pool
    // hands back a request it could not send; for other clients a copy is
    // kept before sending. Without them there is no retry.
    let mut headers = Some(forward::upstream_headers(
        std::mem::take(&mut parts.headers),
        &identity,
        route.forward_cookies,
        Some(assertion),
    ));
    let upstream_uri = Uri::try_from(forwarded)
        .map_err(|e| ApiError::invalid_field("path", format!("cannot be forwarded: {e}")))?;
    let timeout = route
        .timeout
        .or(canon.timeout)
        .unwrap_or(Duration::from_millis(gateway.default_timeout_ms));
    let deadline = tokio::time::Instant::now() + timeout;
    canon.state.budget.deposit(gateway.retry_budget_percent);

    // A request that may be retried keeps its body to send again; others stream it.
    let mut body = if retryable && axum::body::HttpBody::is_end_stream(&body) {
        Payload::Kept(Bytes::new())
    } else if retryable {
        match body.collect().await {
            Ok(collected) => Payload::Kept(collected.to_bytes()),
            Err(e) => return Err(body_error(e)),
        }
    } else {
        Payload::Streamed(Some(body))
    };
    // Admission comes last, after everything that can fail before the call: a
    // half-open circuit's one trial must always end in a recorded outcome.
    let settings = BreakerSettings::from_config(gateway);
    let trial = match canon.state.breaker.admit(&settings) {
        Admission::Allowed { trial } => trial,
        Admission::Refused { retry_after } => {
            route.metrics.call(Outcome::CircuitOpen);
            let failure = Failure {
                kind: "circuit_open",
                status: None,
                latency: Duration::ZERO,
            };
            audit_failure(state, caller, canon, route, &failure).await;
            return Err(ApiError::new(
                ErrorCode::UpstreamUnavailable,
                "The service behind this route is failing; its circuit is open.",
            )
            .with_header(header::RETRY_AFTER, retry_after_value(retry_after)));
        }
    };

    let mut outcome_to_record = BreakerCall {
        breaker: &canon.state.breaker,
        settings,
        trial,
        recorded: false,
    };

    let (retry_max, backoff_base, backoff_max) = (
        gateway.retry_max,
        gateway.retry_backoff_base_ms,
        gateway.retry_backoff_max_ms,
    );
    drop(config);

    let started = Instant::now();
    let mut attempt = 0u32;
    let gives_back_unsent = UpstreamClient::gives_back_unsent(&canon.base, canon.h2c);
    let outcome = loop {
        let (Some(next_body), Some(mut these_headers)) = (body.next(), headers.take()) else {
            break Err("unavailable");
        };
        if attempt > 0 {
            // Every attempt carries an assertion of its own (a new `jti`): a
            // cell's replay cache refuses one it has seen, and an attempt the
            // gateway counts as failed may still have reached the cell.
            let path_and_query = upstream_uri.path_and_query().map_or("/", |pq| pq.as_str());
            let fresh = forward::sign_assertion(
                signer,
                &canon.name,
                &identity,
                parts.method.as_str(),
                path_and_query,
            );
            forward::set_assertion(&mut these_headers, fresh);
        }
        if body.may_repeat() && attempt < retry_max && !gives_back_unsent {
            headers = Some(these_headers.clone());
        }
        let mut upstream = axum::http::Request::new(next_body);
        *upstream.method_mut() = parts.method.clone();
        *upstream.uri_mut() = upstream_uri.clone();
        *upstream.headers_mut() = these_headers;
        match tokio::time::timeout_at(
            deadline,
            client.send(&canon.base, canon.h2c, canon.tls.as_ref(), upstream),
        )
        .await
        {
            Ok(Ok(response)) => break Ok(response),
            Ok(Err(SendFailure { error: e, unsent })) => {
                if let Some(unsent) = unsent {
                    headers = Some(unsent.into_parts().0.headers);
                }
                let may_retry = matches!(body, Payload::Kept(_))
                    && attempt < retry_max
                    && e.is_connect()
                    && headers.is_some();
                if may_retry && canon.state.budget.withdraw() {
                    attempt += 1;
                    canon.state.metrics.retries.increment(1);
                    let pause = full_jitter(backoff_base, backoff_max, attempt);
                    if tokio::time::Instant::now() + pause >= deadline {
                        break Err("timeout");
                    }
                    tokio::time::sleep(pause).await;
                    continue;
                }
                tracing::warn!(canon = %canon.name, error = %e, "upstream call failed");
                break Err("unavailable");
            }
            Err(_) => break Err("timeout"),
        }
    };
    let latency = started.elapsed();
    match outcome {
        Ok(response) => {
            route.metrics.upstream_latency(latency);
            let status = response.status();
            let failed = status.is_server_error();
            note_breaker(canon, outcome_to_record.record(!failed));
            if failed {
                route.metrics.call(Outcome::CellError);
                let failure = Failure {
                    kind: "status",
                    status: Some(status.as_u16()),
                    latency,
                };
                audit_failure(state, caller, canon, route, &failure).await;
            } else {
                route.metrics.call(Outcome::Ok);
            }
            let (mut head, body) = response.into_parts();
            forward::strip_hop_by_hop(&mut head.headers);
            Ok(Response::from_parts(head, body))
        }
        Err(kind) => {
            note_breaker(canon, outcome_to_record.record(false));
            let (outcome, code, detail) = if kind == "timeout" {
                (
                    Outcome::Timeout,
                    ErrorCode::UpstreamTimeout,
                    "The service behind this route did not answer in time.",
                )
            } else {
                (
                    Outcome::Unavailable,
                    ErrorCode::UpstreamUnavailable,
                    "The service behind this route is unreachable.",
                )
            };
            route.metrics.call(outcome);
            let failure = Failure {
                kind,
                status: None,
                latency,
            };
            audit_failure(state, caller, canon, route, &failure).await;
            Err(ApiError::new(code, detail))
        }
    }
}

/// A request body: kept for retries, or streamed once.
enum Payload {
    Kept(Bytes),
    Streamed(Option<Body>),
}

impl Payload {
    fn may_repeat(&self) -> bool {
        matches!(self, Payload::Kept(_))
    }

    fn next(&mut self) -> Option<Body> {
        match self {
            Payload::Kept(bytes) => Some(Body::from(bytes.clone())),
            Payload::Streamed(body) => body.take(),
        }
    }
}

/// GET, HEAD, PUT, DELETE, or anything carrying an `Idempotency-Key` (SPEC §6).
fn is_safe_to_repeat(parts: &Parts) -> bool {
    matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE
    ) || parts.headers.contains_key("idempotency-key")
}

/// Full jitter: a random wait in [0, min(max, base × 2^attempt)).
fn full_jitter(base_ms: u64, max_ms: u64, attempt: u32) -> Duration {
    let ceiling = base_ms
        .saturating_mul(1u64 << attempt.min(20))
        .min(max_ms)
        .max(1);
    let random = uuid::Uuid::new_v4().as_u128() as u64;
    Duration::from_millis(random % ceiling)
}

fn retry_after_value(wait: Duration) -> HeaderValue {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    HeaderValue::from(seconds.max(1))
}

/// The problem for a request body that could not be read: 413 over the limit.
pub(crate) fn body_error(e: axum::Error) -> ApiError {
    let limit_hit =
        std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
    if limit_hit {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            "The request body exceeds the configured limit.",
        )
    } else {
        ApiError::invalid_field("body", "the request body could not be read")
    }
}

fn note_breaker(canon: &CanonEntry, change: Option<&'static str>) {
    if let Some(state) = change {
        canon.state.metrics.circuit.set(match state {
            "open" => 2.0,
            "half_open" => 1.0,
            _ => 0.0,
        });
        tracing::warn!(canon = %canon.name, circuit = state, "circuit breaker changed state");
    }
}

/// What went wrong with a gateway call.
struct Failure {
    kind: &'static str,
    status: Option<u16>,
    latency: Duration,
}

/// `gateway.upstream_error` in the caller's tenant chain. A failure to write it
/// is logged, not answered: the client's answer is the upstream failure.
async fn audit_failure(
    state: &AppState,
    caller: &Caller,
    canon: &CanonEntry,
    route: &RouteEntry,
    failure: &Failure,
) {
    let event = AuditEvent::new("gateway.upstream_error")
        .outcome("failure")
        .severity("warning")
        .resource("canon", &canon.id)
        .details(serde_json::json!({
            "canon": canon.name,
            "route_id": route.id,
            "route": route.path,
            "kind": failure.kind,
            "status": failure.status,
            "latency_ms": u64::try_from(failure.latency.as_millis()).unwrap_or(u64::MAX),
        }));
    if let Err(e) = state.audit_alone(caller.audit_context(), event).await {
        tracing::error!(error = ?e.code(), canon = %canon.name, "could not audit a gateway failure");
    }
}

/// One admitted call's pending breaker outcome. If the call never completes (the
/// client hung up and the handler was dropped), a half-open trial counts as a
/// failure, so the circuit re-opens instead of staying half-open for ever.
struct BreakerCall<'a> {
    breaker: &'a super::state::Breaker,
    settings: BreakerSettings,
    trial: bool,
    recorded: bool,
}

impl BreakerCall<'_> {
    fn record(&mut self, success: bool) -> Option<&'static str> {
        self.recorded = true;
        self.breaker.record(&self.settings, success, self.trial)
    }
}

impl Drop for BreakerCall<'_> {
    fn drop(&mut self) {
        if !self.recorded && self.trial {
            self.breaker.record(&self.settings, false, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::state::Breaker;

    #[test]
    fn an_abandoned_trial_reopens_the_circuit() {
        let breaker = Breaker::new();
        let settings = BreakerSettings {
            consecutive_failures: 1,
            failure_rate_percent: 50,
            window_calls: 20,
            open_for: Duration::from_millis(10),
        };
        assert_eq!(breaker.record(&settings, false, false), Some("open"));
        std::thread::sleep(Duration::from_millis(15));
        assert_eq!(breaker.admit(&settings), Admission::Allowed { trial: true });
        drop(BreakerCall {
            breaker: &breaker,
            settings,
            trial: true,
            recorded: false,
        });
        assert_eq!(breaker.state_name(), "open", "not stuck half-open");
        std::thread::sleep(Duration::from_millis(15));
        let mut call = BreakerCall {
            breaker: &breaker,
            settings,
            trial: true,
            recorded: false,
        };
        assert_eq!(breaker.admit(&settings), Admission::Allowed { trial: true });
        assert_eq!(call.record(true), Some("closed"));
        drop(call);
        assert_eq!(
            breaker.state_name(),
            "closed",
            "a recorded call changes nothing on drop"
        );
    }

    #[test]
    fn full_jitter_stays_under_its_ceiling() {
        for attempt in 1..6 {
            for _ in 0..100 {
                let wait = full_jitter(25, 1000, attempt);
                assert!(wait < Duration::from_millis((25u64 << attempt).min(1000)));
            }
        }
        assert_eq!(retry_after_value(Duration::from_millis(1)), "1");
        assert_eq!(retry_after_value(Duration::from_millis(29_001)), "30");
    }
}
