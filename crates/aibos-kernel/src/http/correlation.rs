//! Correlation ids and trace context: validated, generated, echoed, logged.
//!
//! Outermost middleware of every request. It rejects a malformed
//! `x-correlation-id` with 400, generates one when absent, echoes it on every
//! response, opens the request's log span with it, and makes it available to
//! [`crate::error::ApiError`] through a task-local so every problem body carries it.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;
use uuid::Uuid;

use aibos_wire::correlation::{CORRELATION_HEADER, TRACEPARENT_HEADER};
use aibos_wire::{CorrelationId, TraceParent};

use crate::error::ApiError;

tokio::task_local! {
    /// The correlation id of the request being served on this task.
    pub static CURRENT_CORRELATION_ID: CorrelationId;
}

/// What the edge learned about a request, for handlers and upstream calls.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext {
    /// The request's correlation id (client-supplied or generated).
    pub correlation_id: CorrelationId,
    /// This hop's trace context: the client's trace with a new span, or a new trace.
    pub trace: TraceParent,
}

/// The middleware; see the module documentation.
pub async fn correlate(mut request: Request, next: Next) -> Response {
    let supplied = request
        .headers()
        .get(CORRELATION_HEADER)
        .map(|v| v.to_str().ok().and_then(CorrelationId::parse));
    let (correlation_id, rejected) = match supplied {
        None => (CorrelationId::generate(), false),
        Some(Some(id)) => (id, false),
        Some(None) => (CorrelationId::generate(), true),
    };

    let span_seed = span_seed();
    let trace = request
        .headers()
        .get(TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse)
        .map(|parent| parent.child(span_seed))
        .unwrap_or_else(|| TraceParent::root(*Uuid::new_v4().as_bytes(), span_seed));

    let span = tracing::info_span!(
        "request",
        correlation_id = %correlation_id,
        trace_id = %trace.trace_id_hex(),
        method = %request.method(),
        path = %request.uri().path(),
    );

    let response = CURRENT_CORRELATION_ID
        .scope(correlation_id, async move {
            if rejected {
                return ApiError::invalid_field(
                    format!("header:{CORRELATION_HEADER}"),
                    "must be a UUID such as 0190f3c4-7e2a-7c4e-9d1a-2b3c4d5e6f70",
                )
                .into_response();
            }
            request.extensions_mut().insert(RequestContext {
                correlation_id,
                trace,
            });
            next.run(request).await
        })
        .instrument(span)
        .await;

    let mut response = response;
    if let Ok(value) = HeaderValue::from_str(&correlation_id.to_string()) {
        response.headers_mut().insert(CORRELATION_HEADER, value);
    }
    response
}

fn span_seed() -> [u8; 8] {
    let bytes = *Uuid::new_v4().as_bytes();
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&bytes[..8]);
    seed
}
