//! A complete minimal cell behind the AI-BOS kernel.
//!
//! Environment:
//! - `AIBOS_CANON_NAME`, `AIBOS_ASSERTION_SECRETS`: verify the kernel's assertions.
//! - `AIBOS_KERNEL_URL`, `AIBOS_CLIENT_ID`, `AIBOS_CLIENT_SECRET`: publish events
//!   as the cell's own service account.
//! - `CELL_BIND`: where to listen (default `127.0.0.1:4100`).
//!
//! Run with `cargo run -p aibos-cell --example minimal_cell`.

use aibos_cell::aibos_wire::error::PROBLEM_CONTENT_TYPE;
use aibos_cell::{
    AssertionVerifier, ErrorCode, KernelCall, KernelClient, NewEvent, Problem, PublishedEvent,
};
use axum::extract::{FromRef, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

/// The cell's state. `FromRef` lets the `KernelCall` extractor find the verifier.
#[derive(Clone, FromRef)]
struct AppState {
    verifier: AssertionVerifier,
    kernel: KernelClient,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Refused calls are logged at `warn` with the precise reason; without a
    // subscriber those lines go nowhere.
    tracing_subscriber::fmt().init();
    let state = AppState {
        verifier: AssertionVerifier::from_env()?,
        kernel: KernelClient::from_env()?,
    };
    let app = Router::new()
        // The kernel's health checks: no caller, so no KernelCall.
        .route(
            "/health",
            get(|| async { Json(json!({ "status": "healthy" })) }),
        )
        .route("/whoami", get(whoami))
        .route("/notes", post(create_note))
        .with_state(state);
    let bind = std::env::var("CELL_BIND").unwrap_or_else(|_| "127.0.0.1:4100".to_owned());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

/// Taking `KernelCall` is the whole authentication: without a valid assertion
/// the handler never runs and the caller gets 401.
async fn whoami(call: KernelCall) -> Json<Value> {
    Json(json!({
        "tenant_id": call.tenant_id,
        "subject": call.subject,
        "actor_type": call.actor_type.as_str(),
        "correlation_id": call.correlation_id.to_string(),
    }))
}

#[derive(Deserialize)]
struct NewNote {
    text: String,
}

/// Records a note (here: only as an event) in the caller's tenant.
async fn create_note(
    State(kernel): State<KernelClient>,
    call: KernelCall,
    headers: HeaderMap,
    Json(note): Json<NewNote>,
) -> Response {
    let mut event = NewEvent::new(
        "notes.note.created",
        json!({ "text": note.text, "author": call.subject }),
    )
    .with_correlation_id(call.correlation_id);
    if let Some(traceparent) = call.traceparent {
        event = event.with_traceparent(traceparent);
    }
    // Reuse the client's idempotency key, scoped by tenant, so that a retried
    // request does not publish the event twice.
    if let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        event = event.with_idempotency_key(format!("{}:{key}", call.tenant_id));
    }
    match kernel.publish_event(&event).await {
        Ok(PublishedEvent { id, seq }) => (
            StatusCode::CREATED,
            Json(json!({ "tenant_id": call.tenant_id, "event_id": id, "event_seq": seq })),
        )
            .into_response(),
        Err(error) => {
            tracing::error!(%error, correlation_id = %call.correlation_id, "could not publish");
            let mut problem = Problem::new(
                ErrorCode::ServiceUnavailable,
                "The note could not be recorded; try again.",
            );
            problem.correlation_id = Some(call.correlation_id.to_string());
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(CONTENT_TYPE, PROBLEM_CONTENT_TYPE)],
                Json(problem),
            )
                .into_response()
        }
    }
}
