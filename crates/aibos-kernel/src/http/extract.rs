//! Our own extractors, so that a rejected request gets the same problem body as
//! every other error (axum's built-in rejections answer `text/plain`).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ErrorCode};

/// A JSON body: 415 unless `application/json`, 413 over the limit, 400 when malformed
/// (naming the field that failed).
#[derive(Debug, Clone, Copy, Default)]
pub struct AppJson<T>(pub T);

impl<T, S> FromRequest<S> for AppJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(request.headers().get(header::CONTENT_TYPE)) {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "Send the body as application/json with a Content-Type header saying so.",
            ));
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        ErrorCode::PayloadTooLarge,
                        "The request body exceeds the configured limit.",
                    )
                } else {
                    ApiError::invalid_field("body", "the body could not be read")
                }
            })?;
        parse_json(&bytes).map(AppJson)
    }
}

/// Parses JSON, reporting the path of the first field that failed.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let deserializer = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() {
            "body".to_owned()
        } else {
            path
        };
        let inner = e.into_inner();
        let message = match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                format!("the body is not valid JSON: {inner}")
            }
            _ => inner.to_string(),
        };
        ApiError::new(ErrorCode::ValidationError, "The request body is not valid.")
            .with_field(field, message)
    })
}

fn is_json(content_type: Option<&header::HeaderValue>) -> bool {
    let Some(value) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

impl<T: Serialize> IntoResponse for AppJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        count: u32,
    }

    #[test]
    fn content_types_table() {
        let check = |ct: Option<&str>, ok: bool| {
            let v = ct.map(|c| header::HeaderValue::from_str(c).unwrap());
            assert_eq!(is_json(v.as_ref()), ok, "{ct:?}");
        };
        check(Some("application/json"), true);
        check(Some("application/json; charset=utf-8"), true);
        check(Some("Application/JSON"), true);
        check(Some("application/merge-patch+json"), true);
        check(Some("application/x-www-form-urlencoded"), false);
        check(Some("text/plain"), false);
        check(None, false);
    }

    #[test]
    fn field_errors_name_the_field() {
        let err = parse_json::<Body>(br#"{"name": "x", "count": "many"}"#).unwrap_err();
        let response = err.into_response();
        assert_eq!(response.status(), 400);
        let err = parse_json::<Body>(br#"{"name": "x", "count": -1}"#).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ValidationError);
        assert!(parse_json::<Body>(b"{not json").is_err());
        assert!(parse_json::<Body>(br#"{"name": "x", "count": 99999999999999999999}"#).is_err());
    }
}
