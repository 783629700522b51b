//! Seeding the demo through the kernel's public HTTP API, as an operator's
//! script would: every step is an ordinary, audited API call, and each one
//! first looks for what an earlier run made, so a second run changes nothing.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A call to the kernel that did not answer as the demo needs.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("{step}: the kernel answered {status}: {body}")]
    Refused {
        step: &'static str,
        status: StatusCode,
        body: String,
    },
    #[error("{step}: the kernel could not be reached: {source}")]
    Unreachable {
        step: &'static str,
        source: reqwest::Error,
    },
    #[error("{step}: {message}")]
    Unexpected { step: &'static str, message: String },
}

/// The kernel's API as the demo calls it.
pub struct KernelApi {
    http: reqwest::Client,
    base: String,
}

/// An answer: status and JSON body (`Value::Null` when empty).
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

impl Answer {
    /// The body's text field `name`, or an error naming `step`.
    pub fn text(&self, step: &'static str, name: &str) -> Result<String, SeedError> {
        self.body
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| SeedError::Unexpected {
                step,
                message: format!("the answer has no `{name}`"),
            })
    }
}

impl KernelApi {
    pub fn new(base: &str) -> KernelApi {
        KernelApi {
            // Loopback only: no proxy from the environment.
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    /// One call; `token` as bearer, `body` as JSON, `headers` added.
    pub async fn call(
        &self,
        step: &'static str,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Answer, SeedError> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request
            .send()
            .await
            .map_err(|source| SeedError::Unreachable { step, source })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|source| SeedError::Unreachable { step, source })?;
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok(Answer { status, body })
    }

    /// A call that must answer one of `expected`.
    pub async fn expect(
        &self,
        step: &'static str,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        expected: &[StatusCode],
    ) -> Result<Answer, SeedError> {
        let answer = self.call(step, method, path, token, body, &[]).await?;
        if expected.contains(&answer.status) {
            Ok(answer)
        } else {
            Err(SeedError::Refused {
                step,
                status: answer.status,
                body: answer.body.to_string(),
            })
        }
    }

    /// Logs in; the access token.
    pub async fn login(
        &self,
        tenant: &str,
        email: &str,
        password: &str,
    ) -> Result<String, SeedError> {
        let body = json!({"tenant": tenant, "email": email, "password": password});
        self.expect(
            "log in",
            Method::POST,
            "/api/kernel/auth/login",
            None,
            Some(&body),
            &[StatusCode::OK],
        )
        .await?
        .text("log in", "access_token")
    }

    /// Every item of a list endpoint (`path` without query), following cursors.
    pub async fn list_all(
        &self,
        step: &'static str,
        path: &str,
        token: &str,
    ) -> Result<Vec<Value>, SeedError> {
        // The demo's lists are short; this bounds a misbehaving server.
        const PAGES_MAX: usize = 100;
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..PAGES_MAX {
            let separator = if path.contains('?') { '&' } else { '?' };
            let url = match &cursor {
                Some(c) => format!("{path}{separator}limit=1000&cursor={c}"),
                None => format!("{path}{separator}limit=1000"),
            };
            let page = self
                .expect(
                    step,
                    Method::GET,
                    &url,
                    Some(token),
                    None,
                    &[StatusCode::OK],
                )
                .await?;
            if let Some(page_items) = page.body.get("items").and_then(Value::as_array) {
                items.extend(page_items.iter().cloned());
            }
            match page.body.get("next_cursor").and_then(Value::as_str) {
                Some(next) => cursor = Some(next.to_owned()),
                None => return Ok(items),
            }
        }
        Ok(items)
    }

    /// The first item of a list whose `field` equals `value`.
    pub async fn find(
        &self,
        step: &'static str,
        path: &str,
        token: &str,
        field: &str,
        value: &str,
    ) -> Result<Option<Value>, SeedError> {
        Ok(self
            .list_all(step, path, token)
            .await?
            .into_iter()
            .find(|item| item.get(field).and_then(Value::as_str) == Some(value)))
    }
}
