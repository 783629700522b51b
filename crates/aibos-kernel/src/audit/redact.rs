//! Redaction of secret-looking values before anything is stored or logged.

use serde_json::Value;

/// The replacement for every redacted value.
pub const REDACTED: &str = "[REDACTED]";

/// Replaces the value of every key that names one of `keys` (case-insensitive),
/// at any depth. A key names `secret` when it is `secret` or has it as an
/// underscore- or hyphen-separated word (`client_secret`, `secret-key`), so
/// `pan` catches `card_pan` but not `company`.
pub fn redact(value: Value, keys: &[String]) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let lower = k.to_ascii_lowercase();
                    if keys.iter().any(|s| names(&lower, s)) {
                        (k, Value::String(REDACTED.to_owned()))
                    } else {
                        (k, redact(v, keys))
                    }
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(|v| redact(v, keys)).collect()),
        other => other,
    }
}

fn names(key: &str, secret: &str) -> bool {
    key.split(['_', '-', '.'])
        .collect::<Vec<_>>()
        .windows(secret.split('_').count())
        .any(|w| w.join("_") == secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys() -> Vec<String> {
        [
            "password",
            "secret",
            "token",
            "authorization",
            "api_key",
            "card_number",
            "pan",
            "cvv",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn words_not_substrings() {
        assert!(names("client_secret", "secret"));
        assert!(names("x-api-key", "api_key"));
        assert!(names("api_key", "api_key"));
        assert!(!names("company", "pan"));
        assert!(!names("tokenizer", "token"));
        assert!(names("refresh_token", "token"));
    }

    #[test]
    fn secret_looking_keys_are_redacted_at_any_depth() {
        let v = redact(
            json!({"email": "a@b.c", "Password": "hunter2", "nested": {"client_secret": "s", "list": [{"cvv": "123"}]}, "reason": "ok"}),
            &keys(),
        );
        assert_eq!(
            v,
            json!({"email": "a@b.c", "Password": REDACTED, "nested": {"client_secret": REDACTED, "list": [{"cvv": REDACTED}]}, "reason": "ok"})
        );
    }
}
