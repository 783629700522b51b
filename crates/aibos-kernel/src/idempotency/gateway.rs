//! `Idempotency-Key` on gateway routes: the route's `idempotency` mode, and
//! the call to the cell run once per key (`gateway::proxy` calls this after
//! authentication, authorization and the rate limit).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};

use super::{IDEMPOTENCY_KEY, IdempotencyKey, Keyed};
use crate::authz::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::gateway::table::{CanonEntry, RouteEntry};
use crate::state::{AppState, EventLoopLocal};

/// A route's `idempotency` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The key is ignored (forwarded to the cell as any header).
    Off,
    /// A key is honoured when sent.
    Optional,
    /// POST, PUT, PATCH and DELETE without a key are refused.
    Required,
}

impl Mode {
    /// The mode of a stored route (validated on the way in; anything else is off).
    pub fn parse(text: &str) -> Mode {
        match text {
            "optional" => Mode::Optional,
            "required" => Mode::Required,
            _ => Mode::Off,
        }
    }
}

/// The key of a call on a route of `mode`: `None` when the call goes to the
/// cell as usual (mode off, a method the key does not concern, or no key on
/// an optional route); 400 for a missing key on a required route or a bad key.
pub fn key_for(mode: Mode, parts: &Parts) -> Result<Option<IdempotencyKey>, ApiError> {
    if mode == Mode::Off || !super::concerns(&parts.method) {
        return Ok(None);
    }
    match parts.headers.get(IDEMPOTENCY_KEY) {
        Some(value) => IdempotencyKey::parse(value).map(Some),
        None if mode == Mode::Required => Err(ApiError::new(
            ErrorCode::IdempotencyKeyRequired,
            "This route requires an Idempotency-Key header on POST, PUT, PATCH and DELETE.",
        )),
        None => Ok(None),
    }
}

/// Serves a keyed call: a replay, a refusal, or the call to the cell made once
/// in a task of its own (`gateway::proxy::send_to_cell`), its answer stored.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    state: &AppState,
    local: &Arc<EventLoopLocal>,
    canon: Arc<CanonEntry>,
    route: &RouteEntry,
    caller: Caller,
    parts: Parts,
    body: Body,
    key: IdempotencyKey,
) -> Response {
    let (mut keyed, bytes) = match Keyed::read(&parts, body, &caller, key).await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    if route.audit_calls {
        keyed.call_audit = Some(crate::gateway::proxy::CallAudit::new(
            &caller,
            &canon,
            route,
            &parts.method,
            Some(keyed.key.as_str()),
        ));
    }
    // The key stays locked at least as long as the call may take.
    let config = state.config_ref();
    let call_timeout = route
        .timeout
        .or(canon.timeout)
        .unwrap_or(Duration::from_millis(config.gateway.default_timeout_ms));
    let lock = Duration::from_secs(config.idempotency.lock_timeout_seconds)
        .max(call_timeout + Duration::from_secs(5));
    drop(config);
    let (task_state, local) = (state.clone(), local.clone());
    let run = async move {
        let uri = parts.uri.clone();
        let Some((_, raw_rest)) = crate::gateway::path::split(uri.path()) else {
            return ApiError::new(ErrorCode::RouteNotFound, "Not a gateway path.").into_response();
        };
        // The same canon entry as matched before: the same route.
        let route = crate::gateway::path::decode_checked(raw_rest)
            .ok()
            .and_then(|matched| canon.route(&parts.method, &matched));
        let Some(route) = route else {
            return ApiError::new(ErrorCode::RouteNotFound, "No route matches.").into_response();
        };
        crate::gateway::proxy::send_to_cell(
            &task_state,
            &local.upstream,
            &canon,
            route,
            &caller,
            (&uri, raw_rest),
            parts,
            Body::from(bytes),
        )
        .await
        .unwrap_or_else(IntoResponse::into_response)
    };
    super::execute(state, keyed, lock, run).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{Method, Request};

    fn parts(method: Method, key: Option<&str>) -> Parts {
        let mut request = Request::builder().method(method).uri("/api/gateway/c/p");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn each_mode_treats_the_key_as_documented() {
        let code = |r: Result<Option<IdempotencyKey>, ApiError>| r.err().map(|e| e.code());
        assert_eq!(Mode::parse("required"), Mode::Required);
        assert_eq!(Mode::parse("anything"), Mode::Off);
        assert!(
            key_for(Mode::Off, &parts(Method::POST, Some("k")))
                .unwrap()
                .is_none()
        );
        assert!(
            key_for(Mode::Optional, &parts(Method::POST, None))
                .unwrap()
                .is_none()
        );
        assert_eq!(
            key_for(Mode::Optional, &parts(Method::POST, Some("k")))
                .unwrap()
                .unwrap()
                .as_str(),
            "k"
        );
        assert_eq!(
            code(key_for(Mode::Required, &parts(Method::POST, None))),
            Some(ErrorCode::IdempotencyKeyRequired)
        );
        assert_eq!(
            code(key_for(Mode::Required, &parts(Method::DELETE, None))),
            Some(ErrorCode::IdempotencyKeyRequired)
        );
        assert!(
            key_for(Mode::Required, &parts(Method::GET, None))
                .unwrap()
                .is_none(),
            "GET ignores the key"
        );
        assert_eq!(
            code(key_for(
                Mode::Optional,
                &parts(Method::PUT, Some(&"k".repeat(256)))
            )),
            Some(ErrorCode::ValidationError)
        );
    }
}
