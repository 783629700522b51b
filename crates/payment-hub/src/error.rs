//! The hub's errors: one [`HubError`] inside, one RFC 9457 problem at the edge.
//!
//! The hub has codes of its own (`INSUFFICIENT_FUNDS`, `LEDGER_DOWN`, …) beside
//! the kernel's shared ones, so its problem body is written here with a `code`
//! string; the `type` URI is `https://aibos.dev/problems/payment-hub/<kebab-code>`.

use aibos_wire::FieldError;
use aibos_wire::correlation::CORRELATION_HEADER;
use aibos_wire::error::PROBLEM_CONTENT_TYPE;
use axum::Json;
use axum::response::{IntoResponse, Response};
use http::header::CONTENT_TYPE;
use http::{HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

use crate::db::DbError;

/// The base of every problem `type` URI the hub answers.
pub const PROBLEM_TYPE_BASE: &str = "https://aibos.dev/problems/payment-hub/";

macro_rules! hub_codes {
    ($( $(#[$doc:meta])* $variant:ident = ($status:expr, $code:literal, $title:literal), )+) => {
        /// A stable error code of the hub (UPPER_SNAKE on the wire).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum HubCode { $( $(#[$doc])* $variant, )+ }

        impl HubCode {
            /// Every code, in the README's order.
            pub const ALL: &'static [HubCode] = &[ $( HubCode::$variant, )+ ];
            /// The HTTP status it is always answered with.
            pub const fn status(self) -> u16 { match self { $( HubCode::$variant => $status, )+ } }
            /// The wire form.
            pub const fn as_str(self) -> &'static str { match self { $( HubCode::$variant => $code, )+ } }
            /// A fixed summary.
            pub const fn title(self) -> &'static str { match self { $( HubCode::$variant => $title, )+ } }
        }
    };
}

hub_codes! {
    /// A field, header, path or query value is not valid; `errors` lists each.
    ValidationError = (400, "VALIDATION_ERROR", "The request is not valid"),
    /// `POST /payments/process` without `Idempotency-Key`.
    IdempotencyKeyRequired = (400, "IDEMPOTENCY_KEY_REQUIRED", "This endpoint requires an Idempotency-Key"),
    /// No verified kernel assertion (answered by the cell SDK).
    Unauthorized = (401, "UNAUTHORIZED", "Authentication is required"),
    /// The account does not exist in the caller's tenant.
    AccountNotFound = (404, "ACCOUNT_NOT_FOUND", "The account does not exist"),
    /// The payment does not exist in the caller's tenant.
    PaymentNotFound = (404, "PAYMENT_NOT_FOUND", "The payment does not exist"),
    /// The chaos cell is not gateway, processor or ledger.
    CellNotFound = (404, "CELL_NOT_FOUND", "No such cell"),
    /// No route matches the path.
    NotFound = (404, "NOT_FOUND", "The resource does not exist"),
    /// The path exists but not with this method.
    MethodNotAllowed = (405, "METHOD_NOT_ALLOWED", "The method is not allowed on this resource"),
    /// More tenants than `CHAOS_TENANTS_MAX` have a part failed at once.
    ChaosLimitReached = (409, "CHAOS_LIMIT_REACHED", "Too many tenants have a part failed"),
    /// The body is larger than the hub reads.
    PayloadTooLarge = (413, "PAYLOAD_TOO_LARGE", "The request body is too large"),
    /// The body is not `application/json`.
    UnsupportedMediaType = (415, "UNSUPPORTED_MEDIA_TYPE", "The request body must be application/json"),
    /// The idempotency key was used before with another request.
    IdempotencyKeyReused = (422, "IDEMPOTENCY_KEY_REUSED", "The idempotency key was used for another request"),
    /// The payer's balance would go below zero.
    InsufficientFunds = (422, "INSUFFICIENT_FUNDS", "The payer's balance is too low"),
    /// The payer's, the payee's and the payment's currencies differ.
    CurrencyMismatch = (422, "CURRENCY_MISMATCH", "The currencies do not match"),
    /// The payee's (or a funding account's) balance would leave the 64-bit range.
    BalanceLimitExceeded = (422, "BALANCE_LIMIT_EXCEEDED", "The balance would exceed its limit"),
    /// An unexpected failure; details are in the hub's log under the correlation id.
    InternalError = (500, "INTERNAL_ERROR", "An internal error occurred"),
    /// The hub's gateway cell is failed (chaos).
    GatewayDown = (503, "GATEWAY_DOWN", "The payment gateway is down"),
    /// The hub's processor cell is failed (chaos).
    ProcessorDown = (503, "PROCESSOR_DOWN", "The payment processor is down"),
    /// The hub's ledger cell is failed (chaos), or its database does not answer.
    LedgerDown = (503, "LEDGER_DOWN", "The ledger is down"),
}

impl HubCode {
    /// The code in kebab case, as in the `type` URI.
    pub fn kebab(self) -> String {
        self.as_str().to_ascii_lowercase().replace('_', "-")
    }
}

/// The problem body the hub answers (RFC 9457 plus `code`, `correlation_id`, `errors`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubProblem {
    /// `https://aibos.dev/problems/payment-hub/<kebab-code>`.
    #[serde(rename = "type")]
    pub problem_type: String,
    /// The code's fixed title.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// This occurrence.
    pub detail: String,
    /// The stable code.
    pub code: String,
    /// The request's correlation id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Every invalid field, for `VALIDATION_ERROR`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// Everything a hub handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A refusal with its code and detail (and field errors for validation).
    #[error("{code:?}: {detail}")]
    Refused {
        /// The code.
        code: HubCode,
        /// What went wrong.
        detail: String,
        /// Field errors (validation only).
        errors: Vec<FieldError>,
    },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for HubError {
    fn from(error: sqlx::Error) -> HubError {
        HubError::Db(DbError::Query(error))
    }
}

impl HubError {
    /// A refusal without field errors.
    pub fn new(code: HubCode, detail: impl Into<String>) -> HubError {
        HubError::Refused {
            code,
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    /// A `VALIDATION_ERROR` listing `errors`.
    pub fn validation(errors: Vec<FieldError>) -> HubError {
        let detail = match errors.as_slice() {
            [one] => format!("{}: {}", one.field, one.message),
            _ => format!("{} fields are not valid.", errors.len()),
        };
        HubError::Refused {
            code: HubCode::ValidationError,
            detail,
            errors,
        }
    }

    /// One invalid field.
    pub fn invalid(field: &str, message: impl Into<String>) -> HubError {
        HubError::validation(vec![FieldError {
            field: field.to_owned(),
            message: message.into(),
        }])
    }

    /// The code this error is answered with.
    pub fn code(&self) -> HubCode {
        match self {
            HubError::Refused { code, .. } => *code,
            HubError::Db(DbError::Query(e)) if crate::db::is_unavailable(e) => HubCode::LedgerDown,
            HubError::Db(_) => HubCode::InternalError,
        }
    }

    /// The problem body for this error; a 5xx cause is logged here and never serialised.
    pub fn into_problem(self, correlation_id: Option<&str>) -> HubProblem {
        let code = self.code();
        let (detail, errors) = match self {
            HubError::Refused { detail, errors, .. } => (detail, errors),
            HubError::Db(error) => {
                tracing::error!(error = %error, correlation_id, "database failure");
                let detail = if code == HubCode::LedgerDown {
                    "The ledger's database does not answer; nothing was written. Try again shortly."
                } else {
                    "An internal error occurred; nothing was written. Quote the correlation id when asking for help."
                };
                (detail.to_owned(), Vec::new())
            }
        };
        problem(code, detail, errors, correlation_id)
    }

    /// The response for this error.
    pub fn into_response_with(self, correlation_id: Option<&str>) -> Response {
        problem_response(self.into_problem(correlation_id))
    }
}

/// Builds a problem body.
pub fn problem(
    code: HubCode,
    detail: String,
    errors: Vec<FieldError>,
    correlation_id: Option<&str>,
) -> HubProblem {
    HubProblem {
        problem_type: format!("{PROBLEM_TYPE_BASE}{}", code.kebab()),
        title: code.title().to_owned(),
        status: code.status(),
        detail,
        code: code.as_str().to_owned(),
        correlation_id: correlation_id.map(str::to_owned),
        errors,
    }
}

/// A problem as a response with `application/problem+json` and the correlation header.
pub fn problem_response(problem: HubProblem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let correlation = problem
        .correlation_id
        .as_deref()
        .and_then(|id| HeaderValue::from_str(id).ok());
    let mut response = (
        status,
        [(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_CONTENT_TYPE))],
        Json(problem),
    )
        .into_response();
    if let Some(value) = correlation {
        response.headers_mut().insert(CORRELATION_HEADER, value);
    }
    response
}

impl IntoResponse for HubError {
    fn into_response(self) -> Response {
        self.into_response_with(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_upper_snake_with_error_statuses_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for &code in HubCode::ALL {
            let s = code.as_str();
            assert!(s.chars().all(|c| c.is_ascii_uppercase() || c == '_'), "{s}");
            assert!((400..600).contains(&code.status()), "{s}");
            assert!(seen.insert(s), "{s} twice");
        }
    }

    #[test]
    fn a_problem_names_its_code_in_the_type_uri_and_carries_the_correlation_id() {
        let problem = HubError::new(HubCode::InsufficientFunds, "too low")
            .into_problem(Some("0197a1b2-0000-7000-8000-0000000000c1"));
        assert_eq!(
            problem.problem_type,
            "https://aibos.dev/problems/payment-hub/insufficient-funds"
        );
        assert_eq!(problem.status, 422);
        assert_eq!(problem.code, "INSUFFICIENT_FUNDS");
        let json = serde_json::to_value(&problem).expect("json");
        assert_eq!(
            json["correlation_id"],
            "0197a1b2-0000-7000-8000-0000000000c1"
        );
        assert!(json.get("errors").is_none(), "empty lists are left out");
    }

    #[test]
    fn validation_problems_list_every_field() {
        let error = HubError::validation(vec![
            FieldError {
                field: "currency".into(),
                message: "three capitals".into(),
            },
            FieldError {
                field: "reference".into(),
                message: "empty".into(),
            },
        ]);
        let problem = error.into_problem(None);
        assert_eq!(problem.code, "VALIDATION_ERROR");
        assert_eq!(problem.status, 400);
        assert_eq!(problem.errors.len(), 2);
        assert_eq!(problem.detail, "2 fields are not valid.");
    }

    #[test]
    fn a_database_failure_never_reaches_the_body() {
        let problem =
            HubError::from(sqlx::Error::Protocol("secret table name".into())).into_problem(None);
        assert_eq!(problem.code, "INTERNAL_ERROR");
        assert!(!problem.detail.contains("secret"), "{}", problem.detail);
        let problem = HubError::from(sqlx::Error::PoolTimedOut).into_problem(None);
        assert_eq!(problem.code, "LEDGER_DOWN");
        assert_eq!(problem.status, 503);
    }
}
