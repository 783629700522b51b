//! The one place where errors become HTTP responses.
//!
//! Domain modules return their own `thiserror` enums; each converts into
//! [`ApiError`], and [`ApiError`]'s `IntoResponse` writes the RFC 9457 body.
//! 5xx causes are logged with their whole chain and never serialised.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

pub use aibos_wire::{ErrorCode, FieldError, Problem};

use crate::http::edge::CURRENT_CORRELATION_ID;

/// An error on its way to becoming a problem+json response.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    detail: String,
    errors: Vec<FieldError>,
    missing_permissions: Vec<String>,
    /// Extra response headers (`Retry-After`, `WWW-Authenticate`).
    headers: Vec<(header::HeaderName, HeaderValue)>,
    /// The internal cause of a 5xx; logged, never sent.
    cause: Option<anyhow::Error>,
}

impl ApiError {
    /// An error of `code` with a detail for the client.
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> ApiError {
        ApiError {
            code,
            detail: detail.into(),
            errors: Vec::new(),
            missing_permissions: Vec::new(),
            headers: Vec::new(),
            cause: None,
        }
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
        ApiError {
            cause: Some(cause.into()),
            ..ApiError::new(
                ErrorCode::InternalError,
                "An internal error occurred; quote the correlation id when reporting it.",
            )
        }
    }

    /// 503 for an unavailable dependency, with the cause logged.
    pub fn unavailable(cause: impl Into<anyhow::Error>) -> ApiError {
        ApiError {
            cause: Some(cause.into()),
            ..ApiError::new(
                ErrorCode::ServiceUnavailable,
                "A dependency of the kernel is unavailable; retry shortly.",
            )
        }
    }

    /// Adds one invalid field to a validation error.
    pub fn with_field(mut self, field: impl Into<String>, message: impl Into<String>) -> ApiError {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
        self
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> ApiError {
        self.headers.push((name, value));
        self
    }

    /// The error's code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> ApiError {
        match e {
            crate::db::DbError::Timeout(_) => ApiError::unavailable(e),
            crate::db::DbError::Query(
                sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_),
            ) => ApiError::unavailable(e),
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let correlation_id = CURRENT_CORRELATION_ID.try_with(|id| id.to_string()).ok();
        if let Some(cause) = &self.cause {
            tracing::error!(code = %self.code, error = ?cause, "request failed");
        }
        let problem = Problem {
            correlation_id,
            errors: self.errors,
            missing_permissions: self.missing_permissions,
            ..Problem::new(self.code, self.detail)
        };
        let mut response = (status, problem_body(&problem)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(aibos_wire::error::PROBLEM_CONTENT_TYPE),
        );
        for (name, value) in self.headers {
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
