//! The one place where errors become HTTP responses.
//!
//! Domain modules return their own `thiserror` enums; each converts into
//! [`ApiError`], and [`ApiError`]'s `IntoResponse` writes the RFC 9457 body.
//! 5xx causes are logged with their whole chain and never serialised.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

pub use aibos_wire::{ErrorCode, FieldError, Problem};

use crate::http::edge::CURRENT_REQUEST;

/// An error on its way to becoming a problem+json response. Boxed: it travels
/// in every handler's `Result`, which should stay one pointer wide.
#[derive(Debug)]
pub struct ApiError(Box<Details>);

#[derive(Debug)]
struct Details {
    code: ErrorCode,
    detail: String,
    errors: Vec<FieldError>,
    missing_permissions: Vec<String>,
    /// OAuth 2.0 error code (RFC 6749 §5.2) for the token endpoint.
    oauth_error: Option<&'static str>,
    /// Extra response headers (`Retry-After`, `WWW-Authenticate`).
    headers: Vec<(header::HeaderName, HeaderValue)>,
    /// The internal cause of a 5xx; logged, never sent.
    cause: Option<anyhow::Error>,
}

impl ApiError {
    /// An error of `code` with a detail for the client.
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> ApiError {
        ApiError(Box::new(Details {
            code,
            detail: detail.into(),
            errors: Vec::new(),
            missing_permissions: Vec::new(),
            oauth_error: None,
            headers: Vec::new(),
            cause: None,
        }))
    }

    /// 400 with one invalid field.
    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        let message = message.into();
        ApiError::new(ErrorCode::ValidationError, message.clone()).with_field(field, message)
    }

    /// 404 for a path that names nothing (or another tenant's object).
    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::NotFound, detail)
    }

    /// 500 with an internal cause that is logged, not shown.
    pub fn internal(cause: impl Into<anyhow::Error>) -> ApiError {
        let mut e = ApiError::new(
            ErrorCode::InternalError,
            "An internal error occurred; quote the correlation id when reporting it.",
        );
        e.0.cause = Some(cause.into());
        e
    }

    /// 503 for an unavailable dependency, with the cause logged.
    pub fn unavailable(cause: impl Into<anyhow::Error>) -> ApiError {
        let mut e = ApiError::new(
            ErrorCode::ServiceUnavailable,
            "A dependency of the kernel is unavailable; retry shortly.",
        );
        e.0.cause = Some(cause.into());
        e
    }

    /// 401 with `WWW-Authenticate: Bearer`.
    pub fn unauthorized(detail: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Unauthorized, detail)
            .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
    }

    /// 403 naming the permissions the caller lacks.
    pub fn forbidden(missing: Vec<String>) -> ApiError {
        let mut e = ApiError::new(
            ErrorCode::Forbidden,
            "The caller lacks a permission this request needs.",
        );
        e.0.missing_permissions = missing;
        e
    }

    /// The same error with another detail for the client.
    pub fn with_detail(mut self, detail: impl Into<String>) -> ApiError {
        self.0.detail = detail.into();
        self
    }

    /// 409 with a detail.
    pub fn conflict(detail: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Conflict, detail)
    }

    /// 429 with `Retry-After` in whole seconds (at least 1).
    pub fn rate_limited(detail: impl Into<String>, retry_after: std::time::Duration) -> ApiError {
        let seconds = retry_after.as_secs().max(1);
        ApiError::new(ErrorCode::RateLimited, detail).with_header(
            header::RETRY_AFTER,
            HeaderValue::from_str(&seconds.to_string()).unwrap_or(HeaderValue::from_static("1")),
        )
    }

    /// Adds one invalid field to a validation error.
    pub fn with_field(mut self, field: impl Into<String>, message: impl Into<String>) -> ApiError {
        self.0.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
        self
    }

    /// Adds the OAuth 2.0 `error` member (`invalid_client`, …).
    pub fn with_oauth_error(mut self, error: &'static str) -> ApiError {
        self.0.oauth_error = Some(error);
        self
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> ApiError {
        self.0.headers.push((name, value));
        self
    }

    /// The error's code.
    pub fn code(&self) -> ErrorCode {
        self.0.code
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> ApiError {
        match e {
            crate::db::DbError::Timeout(_) | crate::db::DbError::Unavailable(_) => {
                ApiError::unavailable(e)
            }
            crate::db::DbError::Query(inner) => ApiError::from(inner),
            other => ApiError::internal(other),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    /// Unique-constraint violations are the client's conflict; anything else is ours.
    fn from(e: sqlx::Error) -> ApiError {
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                ApiError::conflict("A resource with the same unique value already exists.")
            }
            // PostgreSQL's data exceptions (SQLSTATE class 22: a character it
            // cannot store, a value out of range, text that is not a number…)
            // come from a request's values, not from the kernel: a second line
            // behind the extractors' checks, never a 500.
            sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("22")) => {
                tracing::warn!(sqlstate = ?db.code(), error = %db, "a value the database cannot store");
                ApiError::new(
                    ErrorCode::ValidationError,
                    "A value in the request cannot be stored.",
                )
            }
            // The database is away, slow past its timeouts or locked by
            // another process: 503, to be retried (`db::is_unavailable`).
            _ if crate::db::is_unavailable(&e) => ApiError::unavailable(e),
            _ => ApiError::internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let this = *self.0;
        let status =
            StatusCode::from_u16(this.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let correlation_id = CURRENT_REQUEST
            .try_with(|r| r.correlation_id.to_string())
            .ok();
        if let Some(cause) = &this.cause {
            tracing::error!(code = %this.code, error = ?cause, "request failed");
        }
        let problem = Problem {
            correlation_id,
            errors: this.errors,
            missing_permissions: this.missing_permissions,
            error: this.oauth_error.map(str::to_owned),
            ..Problem::new(this.code, this.detail)
        };
        let mut response = (status, problem_body(&problem)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(aibos_wire::error::PROBLEM_CONTENT_TYPE),
        );
        for (name, value) in this.headers {
            headers.insert(name, value);
        }
        response
    }
}

fn problem_body(problem: &Problem) -> String {
    // Serialising a struct of strings and numbers cannot fail; fall back to a fixed body anyway.
    serde_json::to_string(problem).unwrap_or_else(|_| {
        r#"{"type":"about:blank","title":"An internal error occurred","status":500,"detail":"","code":"INTERNAL_ERROR"}"#.to_owned()
    })
}

/// Result alias for handlers.
pub type ApiResult<T> = Result<T, ApiError>;
