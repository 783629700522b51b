//! The HTTP edge: the router that merges every domain's routes, the middleware
//! stack that applies SPEC §3 to all of them, and our own extractors.
//!
//! Request path, outermost first: `edge` (correlation id, trace context, log
//! span, body limit, security headers, metrics) → `CatchPanic` → CORS (only
//! when origins are configured) → `Idempotency-Key` on kernel mutations
//! (`idempotency::kernel`) → the route's handler, or the problem+json
//! fallbacks for unknown paths and methods.

pub mod conn;
pub mod dealer;
pub mod edge;
pub mod extract;
pub mod front;
pub mod openapi;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa_axum::router::OpenApiRouter;

use crate::config::Config;
use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

/// Every domain's routes, with their OpenAPI description. `/metrics` is among
/// them unless `metrics.bind` gives it a listener of its own ([`metrics_routes`]).
pub fn api_routes(config: &Config) -> OpenApiRouter<AppState> {
    let routes = OpenApiRouter::with_openapi(openapi::base_document());
    let routes = match config.metrics.bind {
        None => routes.merge(crate::health::routes::metrics_router()),
        Some(_) => routes,
    };
    routes
        .routes(utoipa_axum::routes!(openapi::serve))
        .merge(crate::health::routes::router())
        .merge(crate::identity::routes::router())
        .merge(crate::authz::routes::router())
        .merge(crate::audit::routes::router())
        .merge(crate::events::routes::router())
        .merge(crate::registry::routes::router())
        .merge(crate::events::webhook::routes::router())
        .route(
            front::GATEWAY_CANON_ROUTE,
            axum::routing::any(crate::gateway::proxy::proxy),
        )
        .route(
            front::GATEWAY_PATH_ROUTE,
            axum::routing::any(crate::gateway::proxy::proxy),
        )
}

/// What the `metrics.bind` listener serves: `/metrics` alone, behind the same
/// edge (correlation id, security headers, request metrics) and fallbacks.
pub fn metrics_routes(state: AppState, config: &Config) -> Router {
    let (routes, _) = crate::health::routes::metrics_router().split_for_parts();
    finish(routes, state, config)
}

/// Wraps the routes in the middleware stack and the problem+json fallbacks.
pub fn finish(routes: Router<AppState>, state: AppState, config: &Config) -> Router {
    routes
        .fallback(unknown_path)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(
            ServiceBuilder::new()
                .layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    edge::edge,
                ))
                .layer(CatchPanicLayer::custom(edge::panic_to_problem))
                // Without allowed origins there is nothing to answer: skip the layer
                // rather than add `Vary` and `Access-Control-*` to every response.
                .option_layer(
                    (!config.server.cors_allowed_origins.is_empty())
                        .then(|| cors(&config.server.cors_allowed_origins)),
                )
                // `Idempotency-Key` on kernel API mutations (idempotency/kernel.rs).
                .layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    crate::idempotency::kernel::middleware,
                )),
        )
        .with_state(state)
}

fn cors(origins: &[String]) -> CorsLayer {
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::IF_MATCH,
            HeaderName::from_static("x-correlation-id"),
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("traceparent"),
        ])
        .expose_headers([
            header::ETAG,
            header::RETRY_AFTER,
            HeaderName::from_static("x-correlation-id"),
            HeaderName::from_static("ratelimit"),
            HeaderName::from_static("ratelimit-policy"),
            HeaderName::from_static("idempotent-replayed"),
        ])
        .max_age(std::time::Duration::from_secs(600))
}

async fn unknown_path(uri: axum::http::Uri) -> Response {
    // Quote a bounded prefix of the path: it is client input.
    let path: String = uri.path().chars().take(200).collect();
    ApiError::new(ErrorCode::NotFound, format!("No endpoint at {path}.")).into_response()
}

async fn method_not_allowed(method: Method) -> Response {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("{method} is not allowed on this path."),
    )
    .into_response()
}
