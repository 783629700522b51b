//! `Idempotency-Key` on the kernel's own API: a middleware on every
//! `/api/kernel/…` POST, PUT, PATCH and DELETE that carries the header.
//!
//! It authenticates the bearer token as `Caller` does, for the tenant and the
//! principal; a request that does not authenticate goes on to its handler,
//! which answers 401 as always. The endpoints that authenticate by credentials
//! in the body ([`BODY_CREDENTIAL_PATHS`]) ignore the key: they have no tenant
//! until the handler has checked those credentials, and repeating them is safe
//! (a login or a refresh is no change a client needs exactly once).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{IDEMPOTENCY_KEY, IdempotencyKey, Keyed};
use crate::authz::Caller;
use crate::state::{AppState, EventLoopLocal};

/// The kernel API's prefix.
const KERNEL_PREFIX: &str = "/api/kernel/";

/// Endpoints whose credentials are in the body: the key is ignored.
pub const BODY_CREDENTIAL_PATHS: [&str; 4] = [
    "/api/kernel/auth/login",
    "/api/kernel/auth/token",
    "/api/kernel/auth/refresh",
    "/api/kernel/bootstrap",
];

/// The middleware; see the module documentation.
pub async fn middleware(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !wants_key(&request) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let front = parts
        .extensions
        .get::<Arc<EventLoopLocal>>()
        .map(|local| &local.auth);
    let Ok(caller) = Caller::authenticate(&parts, &state, front).await else {
        return next.run(Request::from_parts(parts, body)).await;
    };
    let Some(value) = parts.headers.get(IDEMPOTENCY_KEY) else {
        return next.run(Request::from_parts(parts, body)).await;
    };
    let key = match IdempotencyKey::parse(value) {
        Ok(key) => key,
        Err(e) => return e.into_response(),
    };
    let (keyed, bytes) = match Keyed::read(&parts, body, &caller, key).await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    let lock = Duration::from_secs(state.config_ref().idempotency.lock_timeout_seconds);
    let request = Request::from_parts(parts, Body::from(bytes));
    super::execute(&state, keyed, lock, next.run(request)).await
}

/// A mutation of the kernel API carrying `Idempotency-Key`, other than the
/// endpoints of [`BODY_CREDENTIAL_PATHS`].
fn wants_key(request: &Request) -> bool {
    let path = request.uri().path();
    super::concerns(request.method())
        && path.starts_with(KERNEL_PREFIX)
        && request.headers().contains_key(IDEMPOTENCY_KEY)
        && !BODY_CREDENTIAL_PATHS.contains(&path)
}
