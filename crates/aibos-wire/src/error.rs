//! Stable error codes and the RFC 9457 `application/problem+json` body.
//!
//! Every error the kernel answers carries one [`ErrorCode`]. The code, its HTTP
//! status and its title are defined here, once; `docs/errors.md` is checked
//! against [`ErrorCode::ALL`] by a test so the catalogue cannot drift.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The media type of every error body.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// Base of the `type` URI of each problem; the code in kebab case follows it.
pub const PROBLEM_TYPE_BASE: &str = "https://aibos.dev/problems/";

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = ($status:expr, $code:literal, $title:literal), )+) => {
        /// A stable, machine-readable error code (UPPER_SNAKE on the wire).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )+
        }

        impl ErrorCode {
            /// Every code, in declaration order (the order of `docs/errors.md`).
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$variant, )+ ];

            /// The HTTP status this code is always answered with.
            pub const fn status(self) -> u16 {
                match self { $( ErrorCode::$variant => $status, )+ }
            }

            /// The code as it appears on the wire, e.g. `VALIDATION_ERROR`.
            pub const fn as_str(self) -> &'static str {
                match self { $( ErrorCode::$variant => $code, )+ }
            }

            /// A short, human-readable summary that does not change between occurrences.
            pub const fn title(self) -> &'static str {
                match self { $( ErrorCode::$variant => $title, )+ }
            }

            /// Parses a wire code back into the enum (used by clients and the cell SDK).
            pub fn parse(code: &str) -> Option<ErrorCode> {
                match code { $( $code => Some(ErrorCode::$variant), )+ _ => None }
            }
        }
    };
}

error_codes! {
    /// The request is malformed: bad JSON, a field out of range, a bad header value.
    ValidationError = (400, "VALIDATION_ERROR", "The request is not valid"),
    /// No credentials, or credentials that do not verify.
    Unauthorized = (401, "UNAUTHORIZED", "Authentication is required"),
    /// The caller is known but lacks a permission.
    Forbidden = (403, "FORBIDDEN", "The caller lacks a required permission"),
    /// The caller's tenant is suspended.
    TenantSuspended = (403, "TENANT_SUSPENDED", "The tenant is suspended"),
    /// The resource does not exist, or belongs to another tenant.
    NotFound = (404, "NOT_FOUND", "The resource does not exist"),
    /// No route of the canon matches the method and path of a gateway call.
    RouteNotFound = (404, "ROUTE_NOT_FOUND", "No route matches this request"),
    /// The method is not served on this path.
    MethodNotAllowed = (405, "METHOD_NOT_ALLOWED", "The method is not allowed on this resource"),
    /// The request conflicts with the current state (a duplicate, an existing administrator).
    Conflict = (409, "CONFLICT", "The request conflicts with the current state"),
    /// `If-Match` named a version that is not the current one.
    PreconditionFailed = (412, "PRECONDITION_FAILED", "The resource has changed since it was read"),
    /// The request body exceeds the configured limit.
    PayloadTooLarge = (413, "PAYLOAD_TOO_LARGE", "The request body is too large"),
    /// The request body is not `application/json`.
    UnsupportedMediaType = (415, "UNSUPPORTED_MEDIA_TYPE", "The request body must be application/json"),
    /// A POST, PUT, PATCH or DELETE on a gateway route with `idempotency: required` came without `Idempotency-Key`.
    IdempotencyKeyRequired = (400, "IDEMPOTENCY_KEY_REQUIRED", "This route requires an Idempotency-Key"),
    /// The request with this `Idempotency-Key` is still being executed; retry with the same key after `Retry-After`.
    IdempotencyInFlight = (409, "IDEMPOTENCY_IN_FLIGHT", "A request with this idempotency key is in flight"),
    /// The `Idempotency-Key` was used with another method, path or body, or by another principal.
    IdempotencyKeyReused = (422, "IDEMPOTENCY_KEY_REUSED", "The idempotency key was used for another request"),
    /// An update without `If-Match` where `http.require_if_match` makes it mandatory.
    PreconditionRequired = (428, "PRECONDITION_REQUIRED", "If-Match is required on updates"),
    /// Too many requests; see `Retry-After`.
    RateLimited = (429, "RATE_LIMITED", "Too many requests"),
    /// An unexpected failure inside the kernel; details are in the kernel's log under the correlation id.
    InternalError = (500, "INTERNAL_ERROR", "An internal error occurred"),
    /// A dependency the kernel needs (its database) is unavailable.
    ServiceUnavailable = (503, "SERVICE_UNAVAILABLE", "The service is temporarily unavailable"),
    /// The cell behind a gateway route refused or dropped the connection, is
    /// marked unhealthy, or its circuit is open (then with `Retry-After`).
    UpstreamUnavailable = (503, "UPSTREAM_UNAVAILABLE", "The upstream service is unavailable"),
    /// The cell behind a gateway route did not answer within the route's timeout.
    UpstreamTimeout = (504, "UPSTREAM_TIMEOUT", "The upstream service did not answer in time"),
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One invalid field of a request, as listed in a validation problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    /// The field's path in the request (`email`, `body`, `header:x-correlation-id`).
    pub field: String,
    /// What is wrong with it, in words a client developer can act on.
    pub message: String,
}

/// An RFC 9457 problem details body, with the kernel's extension members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type; stable per [`ErrorCode`].
    #[serde(rename = "type")]
    pub problem_type: String,
    /// The code's fixed title.
    pub title: String,
    /// The HTTP status, repeated in the body.
    pub status: u16,
    /// What went wrong in this occurrence.
    pub detail: String,
    /// The stable machine-readable code.
    pub code: ErrorCode,
    /// The request's correlation id, to quote when asking for help.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// For validation problems: every invalid field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// For authorization problems: the permissions the caller lacks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_permissions: Vec<String>,
    /// For the OAuth token endpoint: the RFC 6749 error code (`invalid_client`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Problem {
    /// A problem of `code` with the given detail and nothing else.
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Problem {
        Problem {
            problem_type: format!(
                "{PROBLEM_TYPE_BASE}{}",
                code.as_str().to_ascii_lowercase().replace('_', "-")
            ),
            title: code.title().to_owned(),
            status: code.status(),
            detail: detail.into(),
            code,
            correlation_id: None,
            errors: Vec::new(),
            missing_permissions: Vec::new(),
            error: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_wire_form() {
        for &code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, serde_json::Value::String(code.as_str().to_owned()));
        }
    }

    #[test]
    fn codes_are_upper_snake_and_statuses_are_errors() {
        for &code in ErrorCode::ALL {
            let s = code.as_str();
            assert!(s.chars().all(|c| c.is_ascii_uppercase() || c == '_'), "{s}");
            assert!((400..600).contains(&code.status()), "{s}");
        }
    }

    #[test]
    fn the_catalogue_document_lists_every_code() {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/errors.md"))
                .unwrap();
        let rows: Vec<&str> = doc.lines().filter(|l| l.starts_with("| `")).collect();
        assert_eq!(rows.len(), ErrorCode::ALL.len(), "one row per code");
        for (row, code) in rows.iter().zip(ErrorCode::ALL) {
            let expected = format!("| `{}` | {} |", code.as_str(), code.status());
            assert!(
                row.starts_with(&expected),
                "{row} should start with {expected} (same order as the enum)"
            );
        }
    }

    #[test]
    fn problem_type_names_the_code() {
        let p = Problem::new(ErrorCode::PayloadTooLarge, "too big");
        assert_eq!(
            p.problem_type,
            "https://aibos.dev/problems/payload-too-large"
        );
        assert_eq!(p.status, 413);
        let json = serde_json::to_value(&p).unwrap();
        assert!(json.get("errors").is_none(), "empty lists are omitted");
    }
}
