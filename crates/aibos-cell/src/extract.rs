//! The axum extractor: a handler that takes a [`KernelCall`] runs only for calls
//! whose assertion verifies.
//!
//! The verifier comes from the router's state through `FromRef`, so a cell either
//! uses [`AssertionVerifier`] as its whole state or derives `FromRef` on its own
//! state struct. A refused call gets one uniform 401 `application/problem+json`:
//! the precise reason goes to the cell's log (at `warn`), never to the caller,
//! who could otherwise probe which check failed. Two exceptions say what they
//! are, since only a call that passed every other check gets them: a replayed
//! assertion (401, [`REPLAYED_DETAIL`]) and a full replay cache (503
//! `SERVICE_UNAVAILABLE`: the cell is over its sized load, not the caller wrong).

use aibos_wire::correlation::CORRELATION_HEADER;
use aibos_wire::error::PROBLEM_CONTENT_TYPE;
use aibos_wire::{CorrelationId, ErrorCode, Problem};
use axum::Json;
use axum::extract::{FromRef, FromRequestParts, OriginalUri};
use axum::response::{IntoResponse, Response};
use http::header::CONTENT_TYPE;
use http::request::Parts;
use http::{HeaderValue, StatusCode};

use crate::assertion::{AssertionError, AssertionVerifier, KernelCall};

/// What a refused caller reads. Deliberately the same for every reason but the two below.
pub const REFUSED_DETAIL: &str = "This service accepts calls only through the AI-BOS kernel.";

/// What the sender of a replayed assertion reads.
pub const REPLAYED_DETAIL: &str = "This call's kernel assertion was already used; each call must come through the AI-BOS kernel anew.";

/// What a caller reads when the replay cache is full.
pub const REPLAY_CACHE_FULL_DETAIL: &str =
    "This service is taking more calls than it can check for replays; try again shortly.";

impl<S> FromRequestParts<S> for KernelCall
where
    AssertionVerifier: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = KernelCallRejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let verifier = AssertionVerifier::from_ref(state);
        // In a nested router axum strips the prefix from `parts.uri`; the kernel
        // signed the path the cell received, which `OriginalUri` still holds.
        let uri = parts
            .extensions
            .get::<OriginalUri>()
            .map_or(&parts.uri, |original| &original.0);
        let path_and_query = uri
            .path_and_query()
            .map_or_else(|| uri.path(), |pq| pq.as_str());
        verifier
            .verify(&parts.method, path_and_query, &parts.headers)
            .map_err(|error| {
                let correlation_id = parts
                    .headers
                    .get(CORRELATION_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(CorrelationId::parse);
                tracing::warn!(
                    reason = %error,
                    method = %parts.method,
                    path = uri.path(),
                    correlation_id = correlation_id.map(tracing::field::display),
                    "refused a call without a valid kernel assertion"
                );
                KernelCallRejection {
                    error,
                    correlation_id,
                }
            })
    }
}

/// Why the [`KernelCall`] extractor refused a request; answers 401 problem+json.
///
/// A handler that wants to answer differently can take
/// `Result<KernelCall, KernelCallRejection>` and inspect [`error`](Self::error).
#[derive(Debug)]
pub struct KernelCallRejection {
    error: AssertionError,
    correlation_id: Option<CorrelationId>,
}

impl KernelCallRejection {
    /// The precise reason, for logs. Never send it to the caller.
    pub fn error(&self) -> &AssertionError {
        &self.error
    }

    /// The request's correlation id, when it carried a well-formed one.
    pub fn correlation_id(&self) -> Option<CorrelationId> {
        self.correlation_id
    }
}

impl IntoResponse for KernelCallRejection {
    fn into_response(self) -> Response {
        let (status, code, detail) = match self.error {
            AssertionError::Replayed => (
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                REPLAYED_DETAIL,
            ),
            AssertionError::ReplayCacheFull { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::ServiceUnavailable,
                REPLAY_CACHE_FULL_DETAIL,
            ),
            _ => (
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                REFUSED_DETAIL,
            ),
        };
        let mut problem = Problem::new(code, detail);
        problem.correlation_id = self.correlation_id.map(|id| id.to_string());
        // `Json` sets `application/json`; the header list after it overrides that.
        let mut response = (
            status,
            [(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_CONTENT_TYPE))],
            Json(problem),
        )
            .into_response();
        if let Some(id) = self.correlation_id
            && let Ok(value) = HeaderValue::from_str(&id.to_string())
        {
            response.headers_mut().insert(CORRELATION_HEADER, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assertion::tests::{SECRET_A, claims_for, gateway_headers, sign};
    use aibos_wire::assertion::AssertionClaims;
    use axum::Router;
    use axum::body::{Body, to_bytes};
    use axum::routing::get;
    use http::{Method, Request};
    use serde_json::{Value, json};
    use tower::ServiceExt as _;

    /// The handler under test echoes what it was given.
    async fn whoami(call: KernelCall) -> Json<Value> {
        Json(json!({
            "tenant_id": call.tenant_id,
            "subject": call.subject,
            "actor_type": call.actor_type.as_str(),
            "correlation_id": call.correlation_id.to_string(),
            "forwarded_for": call.forwarded_for,
            "htu": call.claims.htu,
        }))
    }

    fn verifier() -> AssertionVerifier {
        AssertionVerifier::new("payments", [SECRET_A.to_owned()]).expect("valid configuration")
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .expect("clock after 1970")
    }

    /// A request to `uri` as the kernel would send it, carrying an assertion for `claims`.
    fn request(method: Method, uri: &str, claims: &AssertionClaims) -> Request<Body> {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .expect("request");
        *request.headers_mut() = gateway_headers(claims, &sign(claims, SECRET_A));
        request
    }

    async fn send(app: Router, request: Request<Body>) -> (StatusCode, Option<String>, Value) {
        let response = app.oneshot(request).await.expect("infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = to_bytes(response.into_body(), 64 * 1024)
            .await
            .expect("body");
        let body = serde_json::from_slice(&bytes).expect("json body");
        (status, content_type, body)
    }

    #[tokio::test]
    async fn a_verified_call_reaches_the_handler_with_the_signed_identity() {
        let app = Router::new()
            .route("/payments/{id}", get(whoami))
            .with_state(verifier());
        let claims = claims_for("GET", "/payments/42?expand=ledger", now());
        let (status, _, body) = send(
            app,
            request(Method::GET, "/payments/42?expand=ledger", &claims),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({
                "tenant_id": claims.tid,
                "subject": claims.sub,
                "actor_type": "user",
                "correlation_id": claims.cid,
                "forwarded_for": "203.0.113.7",
                "htu": "/payments/42?expand=ledger",
            })
        );
    }

    #[tokio::test]
    async fn a_refused_call_gets_a_uniform_401_problem_with_its_correlation_id() {
        let app = Router::new()
            .route("/payments/{id}", get(whoami))
            .with_state(verifier());
        // Signed for another payment: replayed on this path.
        let claims = claims_for("GET", "/payments/41", now());
        let (status, content_type, body) =
            send(app.clone(), request(Method::GET, "/payments/42", &claims)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(content_type.as_deref(), Some(PROBLEM_CONTENT_TYPE));
        assert_eq!(body["code"], "UNAUTHORIZED");
        assert_eq!(body["status"], 401);
        assert_eq!(body["detail"], REFUSED_DETAIL);
        assert_eq!(body["correlation_id"], claims.cid.as_str());

        // No assertion and no correlation id at all: the same problem, without an id.
        let bare = Request::builder()
            .uri("/payments/42")
            .body(Body::empty())
            .expect("request");
        let (status, _, body) = send(app, bare).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["detail"], REFUSED_DETAIL);
        assert!(body.get("correlation_id").is_none(), "{body}");
    }

    #[tokio::test]
    async fn a_replayed_call_gets_a_401_that_says_so() {
        let app = Router::new()
            .route("/payments/{id}", get(whoami))
            .with_state(verifier());
        let claims = claims_for("GET", "/payments/42", now());
        let first = request(Method::GET, "/payments/42", &claims);
        let mut replay = request(Method::GET, "/payments/42", &claims);
        *replay.headers_mut() = first.headers().clone();
        assert_eq!(send(app.clone(), first).await.0, StatusCode::OK);
        let (status, content_type, body) = send(app, replay).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(content_type.as_deref(), Some(PROBLEM_CONTENT_TYPE));
        assert_eq!(body["code"], "UNAUTHORIZED");
        assert_eq!(body["detail"], REPLAYED_DETAIL);
        assert_eq!(body["correlation_id"], claims.cid.as_str());
    }

    #[tokio::test]
    async fn a_full_replay_cache_answers_503() {
        let verifier = verifier().with_replay_cache_entries(1).expect("valid");
        let app = Router::new()
            .route("/payments/{id}", get(whoami))
            .with_state(verifier);
        let first = claims_for("GET", "/payments/42", now());
        let mut second = claims_for("GET", "/payments/42", now());
        second.jti = "0197a1b2-0000-7000-8000-0000000000f2".into();
        assert_eq!(
            send(app.clone(), request(Method::GET, "/payments/42", &first))
                .await
                .0,
            StatusCode::OK
        );
        let (status, _, body) = send(app, request(Method::GET, "/payments/42", &second)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["code"], "SERVICE_UNAVAILABLE");
        assert_eq!(body["detail"], REPLAY_CACHE_FULL_DETAIL);
    }

    #[tokio::test]
    async fn a_nested_router_checks_the_full_original_path() {
        let app = Router::new()
            .nest("/v1", Router::new().route("/payments/{id}", get(whoami)))
            .with_state(verifier());

        let claims = claims_for("GET", "/v1/payments/42?expand=ledger", now());
        let (status, _, body) = send(
            app.clone(),
            request(Method::GET, "/v1/payments/42?expand=ledger", &claims),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["htu"], "/v1/payments/42?expand=ledger");

        // An assertion for the stripped path, which the handler alone would see,
        // is not for this request.
        let stripped = claims_for("GET", "/payments/42?expand=ledger", now());
        let (status, _, _) = send(
            app,
            request(Method::GET, "/v1/payments/42?expand=ledger", &stripped),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn a_handler_can_inspect_the_rejection_itself() {
        async fn inspect(call: Result<KernelCall, KernelCallRejection>) -> String {
            match call {
                Ok(_) => "verified".to_owned(),
                Err(rejection) => rejection.error().to_string(),
            }
        }
        let app = Router::new()
            .route("/x", get(inspect))
            .with_state(verifier());
        let response = app
            .oneshot(
                Request::builder()
                    .uri("/x")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("infallible");
        let bytes = to_bytes(response.into_body(), 1024).await.expect("body");
        assert_eq!(&bytes[..], b"no x-kernel-assertion header");
    }
}
