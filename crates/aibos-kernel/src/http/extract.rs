//! Our own extractors, so that a rejected request gets the same problem body as
//! every other error (axum's built-in rejections answer `text/plain`).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

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
        let bytes = json_body(request, state).await?;
        parse_json(&bytes).map(AppJson)
    }
}

/// [`AppJson`] that lets text holding a NUL character through, for the one
/// handler that must audit what it refuses (login); it refuses such text itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct AppJsonKeepingNul<T>(pub T);

impl<T, S> FromRequest<S> for AppJsonKeepingNul<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = json_body(request, state).await?;
        parse_json_keeping_nul(&bytes).map(AppJsonKeepingNul)
    }
}

/// The body of a JSON request: 415 unless `application/json`, 413 over the limit.
async fn json_body<S: Send + Sync>(request: Request, state: &S) -> Result<Bytes, ApiError> {
    if !is_json(request.headers().get(header::CONTENT_TYPE)) {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "Send the body as application/json with a Content-Type header saying so.",
        ));
    }
    Bytes::from_request(request, state)
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
        })
}

/// Parses JSON, reporting the path of the first field that failed. Text
/// holding a NUL character (`\u0000`) is refused here, at the one boundary
/// every JSON body passes, naming the field: PostgreSQL can store it in
/// neither `text` nor `jsonb`, and no field of this API has a use for it.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if let Some(field) = nul_field(bytes) {
        return Err(nul_refused(&field));
    }
    parse_json_keeping_nul(bytes)
}

/// The 400 for text that holds a NUL character.
pub fn nul_refused(field: &str) -> ApiError {
    ApiError::new(ErrorCode::ValidationError, "The request is not valid.")
        .with_field(field, "must not contain the NUL character (U+0000)")
}

/// The path of the first string or key holding a NUL character, when the body
/// has one. The body is read as a document only when its bytes hold the escape
/// (a raw NUL is not valid JSON anyway), so other bodies cost one byte scan.
fn nul_field(bytes: &[u8]) -> Option<String> {
    let escaped = bytes
        .windows(6)
        .any(|w| w[0] == b'\\' && w[1] == b'u' && w[2..].eq_ignore_ascii_case(b"0000"));
    if !escaped {
        return None;
    }
    let document: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    fn walk(value: &serde_json::Value, path: &str) -> Option<String> {
        let here = || {
            if path.is_empty() {
                "body".to_owned()
            } else {
                path.to_owned()
            }
        };
        match value {
            serde_json::Value::String(s) if s.contains('\0') => Some(here()),
            serde_json::Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, v)| walk(v, &format!("{}[{i}]", here()))),
            serde_json::Value::Object(members) => members.iter().find_map(|(k, v)| {
                let key: String = k.replace('\0', "\u{FFFD}").chars().take(64).collect();
                let inner = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                if k.contains('\0') {
                    Some(inner)
                } else {
                    walk(v, &inner)
                }
            }),
            _ => None,
        }
    }
    walk(&document, "")
}

/// [`parse_json`] without the NUL refusal, for the one handler that must see
/// such text to audit it (a failed login is audited whatever it held).
pub fn parse_json_keeping_nul<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
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
    fn text_holding_nul_is_refused_by_its_path() {
        assert_eq!(nul_field(br#"{"a":"x\u0000"}"#).as_deref(), Some("a"));
        assert_eq!(
            nul_field(br#"{"a":{"b":["ok","\u0000"]}}"#).as_deref(),
            Some("a.b[1]")
        );
        assert_eq!(
            nul_field(br#"{"k\u0000ey":1}"#).as_deref(),
            Some("k\u{FFFD}ey")
        );
        assert_eq!(
            nul_field(br#""\U0000""#),
            None,
            "not an escape JSON knows: malformed, refused later"
        );
        assert_eq!(
            nul_field(br#"{"a":"\\u0000"}"#),
            None,
            "an escaped backslash, then text"
        );
        assert_eq!(nul_field(br#"{"a":"plain"}"#), None);
        let err = parse_json::<Body>(br#"{"name":"\u0000","count":1}"#).unwrap_err();
        assert_eq!(err.into_response().status(), 400);
        assert!(parse_json_keeping_nul::<Body>(br#"{"name":"\u0000","count":1}"#).is_ok());
        assert!(url_pairs("a=1&b=%00").is_err());
        assert_eq!(url_pairs("a=1&b=2").unwrap().len(), 2);
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

/// `?limit=&cursor=` of every list: limit 1–1000 (default 50), an opaque cursor.
#[derive(Debug, Clone)]
pub struct ListQuery {
    /// Page size.
    pub limit: u32,
    /// The last key of the previous page (decoded cursor), empty for the first page.
    pub after: String,
}

impl ListQuery {
    /// Builds the page envelope: `limit + 1` rows were fetched; the extra one only
    /// says that there is a next page, whose cursor is the last kept row's key.
    pub fn page<T>(&self, mut rows: Vec<T>, key: impl Fn(&T) -> String) -> aibos_wire::Page<T> {
        let limit = usize::try_from(self.limit).unwrap_or(usize::MAX);
        let next_cursor = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(|r| encode_cursor(&key(r)))
        } else {
            None
        };
        aibos_wire::Page {
            items: rows,
            next_cursor,
        }
    }

    /// How many rows to fetch: one more than the page, to know if another follows.
    pub fn fetch(&self) -> u32 {
        self.limit + 1
    }
}

/// Cursor text: base64url of the last key.
pub fn encode_cursor(key: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.as_bytes())
}

fn decode_cursor(cursor: &str) -> Option<String> {
    use base64::Engine as _;
    if cursor.len() > crate::limits::CURSOR_CHARS_MAX {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    String::from_utf8(bytes).ok()
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ListQuery {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let mut limit = crate::limits::LIST_LIMIT_DEFAULT;
        let mut after = String::new();
        for (key, value) in url_pairs(query)? {
            match key.as_str() {
                "limit" => {
                    limit = value
                        .parse::<u32>()
                        .ok()
                        .filter(|l| (1..=crate::limits::LIST_LIMIT_MAX).contains(l))
                        .ok_or_else(|| {
                            ApiError::invalid_field(
                                "limit",
                                format!("must be between 1 and {}", crate::limits::LIST_LIMIT_MAX),
                            )
                        })?;
                }
                "cursor" => {
                    after = decode_cursor(&value).ok_or_else(|| {
                        ApiError::invalid_field("cursor", "is not a cursor this API returned")
                    })?;
                }
                _ => {}
            }
        }
        Ok(ListQuery { limit, after })
    }
}

/// Decoded `key=value` pairs of a query string; a key or value holding a NUL
/// character (`%00`) is a 400 naming it (see [`parse_json`]).
pub fn url_pairs(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    let pairs = serde_urlencoded::from_str::<Vec<(String, String)>>(query).unwrap_or_default();
    match pairs
        .iter()
        .find(|(k, v)| k.contains('\0') || v.contains('\0'))
    {
        Some((key, _)) => {
            let field: String = key.replace('\0', "\u{FFFD}").chars().take(64).collect();
            Err(nul_refused(&field))
        }
        None => Ok(pairs),
    }
}

/// `If-Match: "<version>"`, when sent; a malformed value is a 400. Absent on
/// an update (PATCH, PUT, DELETE) while `http.require_if_match` is on: 428.
#[derive(Debug, Clone, Copy)]
pub struct IfMatch(pub Option<i64>);

impl axum::extract::FromRequestParts<AppState> for IfMatch {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(header::IF_MATCH) else {
            let is_update = matches!(
                parts.method,
                axum::http::Method::PATCH | axum::http::Method::PUT | axum::http::Method::DELETE
            );
            if is_update && state.config_ref().http.require_if_match {
                return Err(ApiError::new(
                    ErrorCode::PreconditionRequired,
                    "This kernel requires If-Match on updates: read the resource and send its ETag, such as If-Match: \"3\".",
                ));
            }
            return Ok(IfMatch(None));
        };
        parse_if_match(value)
    }
}

fn parse_if_match(value: &header::HeaderValue) -> Result<IfMatch, ApiError> {
    let text = value.to_str().unwrap_or("").trim();
    let text = text.strip_prefix("W/").unwrap_or(text);
    text.trim_matches('"')
        .parse::<i64>()
        .ok()
        .filter(|v| *v >= 1)
        .map(|v| IfMatch(Some(v)))
        .ok_or_else(|| {
            ApiError::invalid_field(
                "header:if-match",
                "must be an ETag this API returned, such as \"3\"",
            )
        })
}

/// Parses a path id: a UUID, else 400 (never a database lookup with junk).
pub fn parse_id(field: &str, text: &str) -> Result<String, ApiError> {
    uuid::Uuid::try_parse(text)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| ApiError::invalid_field(field, "must be a UUID"))
}

/// Marks a response that carries credentials or secrets as never to be cached.
pub fn no_store(response: impl IntoResponse) -> Response {
    let mut response = response.into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
        .headers_mut()
        .insert(header::PRAGMA, header::HeaderValue::from_static("no-cache"));
    response
}

/// A JSON response with `ETag: "<version>"`.
pub fn with_etag<T: Serialize>(status: axum::http::StatusCode, body: &T, version: i64) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    if let Ok(value) = header::HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}
