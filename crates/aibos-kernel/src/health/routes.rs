//! `GET /api/health/live`, `GET /api/health`, `GET /metrics`.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

/// The probes. `/metrics` is apart ([`metrics_router`]): it is served on the
/// API's address, or on `metrics.bind` alone.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(live))
        .routes(routes!(health))
}

/// `GET /metrics`.
pub fn metrics_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics))
}

/// Liveness: the process is running and serving HTTP.
#[derive(Debug, Serialize, ToSchema)]
pub struct Liveness {
    /// Always `alive`.
    pub status: &'static str,
}

/// Readiness: the kernel and the dependencies it needs.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `healthy` or `unhealthy`.
    pub status: &'static str,
    /// The kernel's version.
    pub version: &'static str,
    /// Seconds since this kernel started.
    pub uptime_seconds: u64,
    /// The database and its last round trip.
    pub database: DatabaseHealth,
    /// The rate limiter's backend; `degraded` (Redis unreachable) does not make
    /// the kernel unhealthy: it limits in process meanwhile.
    pub rate_limit: crate::ratelimit::BackendHealth,
}

/// The database as seen by one round trip ([`crate::db::Db::ping`]).
#[derive(Debug, Serialize, ToSchema)]
pub struct DatabaseHealth {
    /// `up` or `down`.
    pub status: &'static str,
    /// `sqlite` or `postgres`.
    pub engine: String,
    /// The round trip's time, when up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Why it is down: `timeout` or `unreachable` (details are in the log).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
}

/// Answers 200 while the process runs, whatever its dependencies do.
#[utoipa::path(get, path = "/api/health/live", tag = "health",
    responses((status = 200, description = "The process is running.", body = Liveness)))]
pub async fn live() -> Response {
    liveness()
}

/// The liveness answer, for the router's handler and the front door's direct
/// path (`http::front`) alike.
pub fn liveness() -> Response {
    Json(Liveness { status: "alive" }).into_response()
}

/// Answers 200 when the database answers a real query within a second, 503 otherwise.
#[utoipa::path(get, path = "/api/health", tag = "health",
    responses(
        (status = 200, description = "Healthy: the database answered.", body = Health),
        (status = 503, description = "Unhealthy: the database did not answer; the body says how.", body = Health),
    ))]
pub async fn health(State(state): State<AppState>) -> Response {
    let db = state.db();
    let ping = super::probe::probe(&state).await;
    let (status, database) = match ping {
        Ok(latency) => (
            StatusCode::OK,
            DatabaseHealth {
                status: "up",
                engine: db.engine().to_string(),
                latency_ms: Some((latency.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0),
                error: None,
            },
        ),
        Err(e) => {
            tracing::warn!(error = %e, "health check: the database is down");
            let kind = if matches!(e, crate::db::DbError::Timeout(_)) {
                "timeout"
            } else {
                "unreachable"
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                DatabaseHealth {
                    status: "down",
                    engine: db.engine().to_string(),
                    latency_ms: None,
                    error: Some(kind),
                },
            )
        }
    };
    let body = Health {
        status: if status == StatusCode::OK {
            "healthy"
        } else {
            "unhealthy"
        },
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.uptime().as_secs(),
        database,
        rate_limit: state.rate_limiter().health(),
    };
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Prometheus text exposition of the kernel's metrics.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format 0.0.4.", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let (idle, in_use) = state.db().pool_state();
    state.metrics().db_pool(idle, in_use);
    let body = state.metrics().render();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}
