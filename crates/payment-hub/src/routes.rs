//! The hub's HTTP surface: probes, payments, the ledger and chaos switches.
//!
//! Every handler but the probes takes a [`KernelCall`]: the assertion is
//! verified once, by that extractor, and the tenant, the actor and the
//! correlation id come only from it.

use std::sync::Arc;

use aibos_cell::{AssertionVerifier, KernelCall};
use aibos_wire::correlation::CORRELATION_HEADER;
use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRef, Path, RawQuery, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::Notify;

use crate::chaos::{Cell, Chaos};
use crate::db::Db;
use crate::error::{HubCode, HubError, problem, problem_response};
use crate::limits::{BODY_BYTES_MAX, HEALTH_DB_TIMEOUT, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX};
use crate::model::{AccountBody, PaymentBody, parse_idempotency_key, parse_uuid};
use crate::store::{self, Caller, Written};

/// The header that marks a replayed answer.
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "idempotent-replayed";
/// The request header naming an idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// The state every handler shares: cheap handles, built once in `Hub::build`.
#[derive(Clone, FromRef)]
pub struct HubState {
    /// Checks `x-kernel-assertion` (the `KernelCall` extractor finds it by `FromRef`).
    pub verifier: AssertionVerifier,
    /// The database.
    pub db: Db,
    /// The failure switches.
    pub chaos: Arc<Chaos>,
    /// Wakes the outbox publisher after a payment commits.
    pub outbox_wake: Arc<Notify>,
}

/// The router with every endpoint.
pub fn router(state: HubState) -> Router {
    Router::new()
        .route("/ping", get(ping))
        .route("/health", get(health))
        .route("/payments/process", post(process_payment))
        .route("/payments/status/{id}", get(payment_status))
        .route("/payments", get(list_payments))
        .route("/ledger/accounts", post(open_account).get(list_accounts))
        .route("/ledger/accounts/{id}", get(get_account))
        .route("/ledger/trial-balance", get(trial_balance))
        .route("/chaos/fail/{cell}", post(chaos_fail))
        .route("/chaos/recover/{cell}", post(chaos_recover))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(common_headers))
        .with_state(state)
}

/// Echoes the request's `x-correlation-id` (when a handler has not set one)
/// and adds the headers every API response carries.
async fn common_headers(request: Request, next: Next) -> Response {
    let correlation = request.headers().get(CORRELATION_HEADER).cloned();
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    if let Some(value) = correlation {
        headers.entry(CORRELATION_HEADER).or_insert(value);
    }
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn not_found() -> Response {
    problem_response(problem(
        HubCode::NotFound,
        "No endpoint at this path.".into(),
        Vec::new(),
        None,
    ))
}

async fn method_not_allowed() -> Response {
    problem_response(problem(
        HubCode::MethodNotAllowed,
        "This path does not take this method.".into(),
        Vec::new(),
        None,
    ))
}

async fn ping() -> Json<serde_json::Value> {
    Json(json!({"message": "pong"}))
}

/// A probe: without an assertion (the kernel's health checks) it reports the
/// hub's own state (the database); with one that verifies (a tenant's call
/// through the gateway) the calling tenant's chaos switches as well, so one
/// tenant's failed ledger never makes the kernel stop routing to the hub.
async fn health(
    State(state): State<HubState>,
    call: Result<KernelCall, aibos_cell::KernelCallRejection>,
) -> Response {
    let tenant = call.ok().map(|c| c.tenant_id);
    let database_answers = state.db.ping(HEALTH_DB_TIMEOUT).await;
    let mut cells = serde_json::Map::new();
    let mut healthy = true;
    for cell in Cell::ALL {
        let switched = tenant
            .as_deref()
            .is_some_and(|t| state.chaos.is_failed(t, cell));
        let failed = switched || (cell == Cell::Ledger && !database_answers);
        healthy &= !failed;
        cells.insert(
            cell.as_str().to_owned(),
            json!({"status": if failed { "failed" } else { "healthy" }}),
        );
    }
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "service": "payment-hub",
            "status": if healthy { "healthy" } else { "degraded" },
            "cells": cells,
        })),
    )
        .into_response()
}

/// A verified call, with its correlation id as text for bodies and headers.
struct Call {
    caller: Caller,
}

impl Call {
    fn new(call: KernelCall) -> Call {
        Call {
            caller: Caller {
                correlation_id: call.correlation_id.to_string(),
                tenant_id: call.tenant_id,
                actor: call.subject,
            },
        }
    }

    fn cid(&self) -> Option<&str> {
        Some(&self.caller.correlation_id)
    }

    fn fail(&self, error: HubError) -> Response {
        error.into_response_with(self.cid())
    }

    /// Refuses with `code` when `cell` is failed.
    fn require(&self, state: &HubState, cell: Cell, code: HubCode) -> Result<(), HubError> {
        if state.chaos.is_failed(&self.caller.tenant_id, cell) {
            return Err(HubError::new(
                code,
                format!(
                    "The hub's {} is failed; nothing was done. Try again after it recovers.",
                    cell.as_str()
                ),
            ));
        }
        Ok(())
    }

    /// A JSON answer with the correlation id header.
    fn answer(&self, status: StatusCode, body: impl serde::Serialize) -> Response {
        let mut response = (status, Json(body)).into_response();
        if let Ok(value) = HeaderValue::from_str(&self.caller.correlation_id) {
            response.headers_mut().insert(CORRELATION_HEADER, value);
        }
        response
    }
}

/// Reads a JSON body of at most [`BODY_BYTES_MAX`] bytes sent as `application/json`.
async fn json_body<T: DeserializeOwned>(headers: &HeaderMap, body: Body) -> Result<T, HubError> {
    let is_json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(HubError::new(
            HubCode::UnsupportedMediaType,
            "Send the body as application/json.",
        ));
    }
    let bytes: Bytes = axum::body::to_bytes(body, BODY_BYTES_MAX)
        .await
        .map_err(|_| {
            HubError::new(
                HubCode::PayloadTooLarge,
                format!("The body is larger than {BODY_BYTES_MAX} bytes (or was cut off)."),
            )
        })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        // serde's message names the line, column and expected type: no internals.
        HubError::invalid("body", format!("not a valid request body: {e}"))
    })
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, HubError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(HubError::invalid(
            "header:idempotency-key",
            "must be sent once",
        ));
    }
    parse_idempotency_key(value).map(Some)
}

fn created(call: &Call, location: String, replayed: bool, body: impl serde::Serialize) -> Response {
    let mut response = call.answer(StatusCode::CREATED, body);
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(LOCATION, value);
    }
    if replayed {
        response.headers_mut().insert(
            HeaderName::from_static(IDEMPOTENT_REPLAYED_HEADER),
            HeaderValue::from_static("true"),
        );
    }
    response
}

async fn process_payment(
    State(state): State<HubState>,
    call: KernelCall,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let call = Call::new(call);
    let result = async {
        call.require(&state, Cell::Gateway, HubCode::GatewayDown)?;
        call.require(&state, Cell::Processor, HubCode::ProcessorDown)?;
        call.require(&state, Cell::Ledger, HubCode::LedgerDown)?;
        let key = idempotency_key(&headers)?.ok_or_else(|| {
            HubError::new(
                HubCode::IdempotencyKeyRequired,
                "Send an Idempotency-Key header so that a retried payment moves money once.",
            )
        })?;
        let command = json_body::<PaymentBody>(&headers, body).await?.parse()?;
        store::process_payment(&state.db, call.caller.clone(), key, command).await
    }
    .await;
    match result {
        Ok(Written::Created(view)) => {
            state.outbox_wake.notify_one();
            let location = format!("/payments/status/{}", view.transaction_id);
            created(&call, location, false, view)
        }
        Ok(Written::Replayed(view)) => {
            let location = format!("/payments/status/{}", view.transaction_id);
            created(&call, location, true, view)
        }
        Err(error) => call.fail(error),
    }
}

fn path_id(text: &str, field: &str) -> Result<String, HubError> {
    parse_uuid(text).ok_or_else(|| HubError::invalid(field, "must be a UUID"))
}

/// A path segment, or a problem (axum's own rejection is plain text).
fn segment(path: Result<Path<String>, PathRejection>) -> Result<String, HubError> {
    path.map(|Path(text)| text)
        .map_err(|_| HubError::invalid("path", "is not valid UTF-8 after percent-decoding"))
}

async fn payment_status(
    State(state): State<HubState>,
    call: KernelCall,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let call = Call::new(call);
    let result = async {
        call.require(&state, Cell::Gateway, HubCode::GatewayDown)?;
        let id = path_id(&segment(path)?, "path:id")?;
        store::get_payment(&state.db, &call.caller.tenant_id, &id)
            .await?
            .ok_or_else(|| HubError::new(HubCode::PaymentNotFound, "No such payment."))
    }
    .await;
    match result {
        Ok(view) => call.answer(StatusCode::OK, view),
        Err(error) => call.fail(error),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

/// `(limit, cursor)` from `?limit=&cursor=`.
fn page(query: Option<&str>) -> Result<(u32, Option<String>), HubError> {
    let query: ListQuery = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| HubError::invalid("query", format!("not a valid query string: {e}")))?;
    let limit = match query.limit.as_deref() {
        None => LIST_LIMIT_DEFAULT,
        Some(text) => match text.parse::<u32>() {
            Ok(n) if (1..=LIST_LIMIT_MAX).contains(&n) => n,
            _ => {
                return Err(HubError::invalid(
                    "query:limit",
                    format!("must be a whole number from 1 to {LIST_LIMIT_MAX}"),
                ));
            }
        },
    };
    let cursor = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(text) => Some(path_id(text, "query:cursor")?),
    };
    Ok((limit, cursor))
}

async fn list_payments(
    State(state): State<HubState>,
    call: KernelCall,
    RawQuery(query): RawQuery,
) -> Response {
    let call = Call::new(call);
    let result = async {
        call.require(&state, Cell::Gateway, HubCode::GatewayDown)?;
        let (limit, cursor) = page(query.as_deref())?;
        store::list_payments(&state.db, &call.caller.tenant_id, limit, cursor.as_deref()).await
    }
    .await;
    match result {
        Ok((items, next_cursor)) => call.answer(
            StatusCode::OK,
            json!({"items": items, "next_cursor": next_cursor}),
        ),
        Err(error) => call.fail(error),
    }
}

async fn open_account(
    State(state): State<HubState>,
    call: KernelCall,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let call = Call::new(call);
    let result = async {
        call.require(&state, Cell::Gateway, HubCode::GatewayDown)?;
        call.require(&state, Cell::Ledger, HubCode::LedgerDown)?;
        let key = idempotency_key(&headers)?;
        let command = json_body::<AccountBody>(&headers, body).await?.parse()?;
        store::open_account(&state.db, call.caller.clone(), key, command).await
    }
    .await;
    match result {
        Ok(Written::Created(view)) => {
            let location = format!("/ledger/accounts/{}", view.id);
            created(&call, location, false, view)
        }
        Ok(Written::Replayed(view)) => {
            let location = format!("/ledger/accounts/{}", view.id);
            created(&call, location, true, view)
        }
        Err(error) => call.fail(error),
    }
}

async fn get_account(
    State(state): State<HubState>,
    call: KernelCall,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let call = Call::new(call);
    let result = async {
        call.require(&state, Cell::Gateway, HubCode::GatewayDown)?;
        call.require(&state, Cell::Ledger, HubCode::LedgerDown)?;
        let id = path_id(&segment(path)?, "path:id")?;
        store::get_account(&state.db, &call.caller.tenant_id, &id)
            .await?
            .ok_or_else(|| HubError::new(HubCode::AccountNotFound, "No such account."))
    }
    .await;
    match result {
        Ok(view) => call.answer(StatusCode::OK, view),
        Err(error) => call.fail(error),
    }
}

async fn list_accounts(
    State(state): State<HubState>,
    call: KernelCall,
    RawQuery(query): RawQuery,
) -> Response {
    let call = Call::new(call);
    let result = async {
        call.require(&state, Cell::Gateway, HubCode::GatewayDown)?;
        call.require(&state, Cell::Ledger, HubCode::LedgerDown)?;
        let (limit, cursor) = page(query.as_deref())?;
        store::list_accounts(&state.db, &call.caller.tenant_id, limit, cursor.as_deref()).await
    }
    .await;
    match result {
        Ok((items, next_cursor)) => call.answer(
            StatusCode::OK,
            json!({"items": items, "next_cursor": next_cursor}),
        ),
        Err(error) => call.fail(error),
    }
}

async fn trial_balance(State(state): State<HubState>, call: KernelCall) -> Response {
    let call = Call::new(call);
    let result = async {
        call.require(&state, Cell::Gateway, HubCode::GatewayDown)?;
        call.require(&state, Cell::Ledger, HubCode::LedgerDown)?;
        let balance = store::trial_balance(&state.db, &call.caller.tenant_id).await?;
        // Paired with the balance checks inside each transaction: a ledger that
        // does not balance is our bug, and worth a loud log line.
        if !balance.balanced {
            tracing::error!(tenant_id = %call.caller.tenant_id, "the trial balance does not balance");
        }
        Ok::<_, HubError>(balance)
    }
    .await;
    match result {
        Ok(balance) => call.answer(StatusCode::OK, balance),
        Err(error) => call.fail(error),
    }
}

async fn set_cell(
    state: HubState,
    call: KernelCall,
    path: Result<Path<String>, PathRejection>,
    failed: bool,
) -> Response {
    let call = Call::new(call);
    let cell = match segment(path) {
        Ok(cell) => cell,
        Err(error) => return call.fail(error),
    };
    let Some(cell) = Cell::parse(&cell) else {
        return call.fail(HubError::new(
            HubCode::CellNotFound,
            "The cell must be gateway, processor or ledger.",
        ));
    };
    if state
        .chaos
        .set_failed(&call.caller.tenant_id, cell, failed)
        .is_err()
    {
        return call.fail(HubError::new(
            HubCode::ChaosLimitReached,
            "Too many tenants have a part failed; recover some first.",
        ));
    }
    tracing::warn!(
        cell = cell.as_str(),
        failed,
        actor = %call.caller.actor,
        tenant_id = %call.caller.tenant_id,
        correlation_id = %call.caller.correlation_id,
        "chaos switch flipped"
    );
    call.answer(
        StatusCode::OK,
        json!({"cell": cell.as_str(), "status": if failed { "failed" } else { "healthy" }}),
    )
}

async fn chaos_fail(
    State(state): State<HubState>,
    call: KernelCall,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    set_cell(state, call, path, true).await
}

async fn chaos_recover(
    State(state): State<HubState>,
    call: KernelCall,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    set_cell(state, call, path, false).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_default_and_refuse_out_of_range_limits() {
        assert_eq!(page(None).expect("valid"), (LIST_LIMIT_DEFAULT, None));
        assert_eq!(page(Some("limit=1000")).expect("valid").0, 1000);
        for bad in ["limit=0", "limit=1001", "limit=x", "cursor=nope"] {
            assert!(page(Some(bad)).is_err(), "{bad}");
        }
        let cursor = "0197a1b2-0000-7000-8000-00000000000a";
        assert_eq!(
            page(Some(&format!("cursor={cursor}")))
                .expect("valid")
                .1
                .as_deref(),
            Some(cursor)
        );
    }
}
