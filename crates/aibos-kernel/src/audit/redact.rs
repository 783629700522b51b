//! Redaction of secret-looking values before anything is stored or logged.
//!
//! How a key is matched against the configured words (`audit.redact_keys`):
//!
//! - The key is split into words at `_`, `-`, `.`, spaces and camelCase humps,
//!   and lowercased: `clientSecret`, `client-secret`, `CLIENT_SECRET` and
//!   `ClientSecret` are all the words `client`, `secret`. A run of capitals is
//!   one word (`X-API-Key`, `APIKey` → `x`, `api`, `key` / `api`, `key`).
//! - A configured entry is split the same way. It matches when its words appear
//!   consecutively in the key's, compared with the separators removed, so
//!   `api_key` matches `X-Api-Key`, `apiKey` and `apikey`, and `secret` matches
//!   `client_secret` and `secretKey`. Whole words only: `pan` does not catch
//!   `company` or `span`, `token` does not catch `tokenizer`.
//! - One more, deliberate, over-redaction: an undivided word that *ends with* an
//!   entry of five letters or more matches (`clientsecret`, `accesstoken`,
//!   `xapikey`), because all-lowercase compounds are common in headers and
//!   third-party JSON, and a value redacted by mistake costs a reader a detail
//!   while a secret kept in clear in an append-only trail cannot be taken back.
//!   Short entries (`pan`, `cvv`) stay whole-word so `span` and `japan` stay readable.

use serde_json::Value;

/// The replacement for every redacted value.
pub const REDACTED: &str = "[REDACTED]";

/// Shortest entry matched as the end of an undivided word (see the module doc).
const SUFFIX_MATCH_MIN_CHARS: usize = 5;

/// Replaces the value of every key that names one of `keys`, at any depth
/// (matching rules in the module documentation).
pub fn redact(value: Value, keys: &[String]) -> Value {
    let entries: Vec<String> = keys.iter().map(|k| words(k).concat()).collect();
    redact_with(value, &entries)
}

fn redact_with(value: Value, entries: &[String]) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    if names_any(&k, entries) {
                        (k, Value::String(REDACTED.to_owned()))
                    } else {
                        (k, redact_with(v, entries))
                    }
                })
                .collect(),
        ),
        Value::Array(items) => {
            Value::Array(items.into_iter().map(|v| redact_with(v, entries)).collect())
        }
        other => other,
    }
}

/// Whether `key` names the configured word `secret` (either spelt as configured).
pub fn names(key: &str, secret: &str) -> bool {
    names_any(key, &[words(secret).concat()])
}

/// `entries` are configured words already normalised (their words joined).
fn names_any(key: &str, entries: &[String]) -> bool {
    let parts = words(key);
    entries.iter().filter(|e| !e.is_empty()).any(|entry| {
        (0..parts.len()).any(|start| {
            let mut joined = String::new();
            for part in &parts[start..] {
                joined.push_str(part);
                if joined.len() >= entry.len() {
                    return joined == *entry;
                }
            }
            false
        }) || (entry.len() >= SUFFIX_MATCH_MIN_CHARS
            && parts.iter().any(|p| p.ends_with(entry.as_str())))
    })
}

/// The lowercase words of a key: split at separators and at camelCase humps.
pub fn words(key: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let chars: Vec<char> = key.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if !c.is_alphanumeric() {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            continue;
        }
        if c.is_uppercase() && !current.is_empty() {
            let prev = chars[i - 1];
            let next_is_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            // `apiKey`: a capital after a lowercase letter or digit starts a word;
            // `APIKey`: the last capital of a run starts one when a lowercase follows.
            if !prev.is_uppercase() || next_is_lower {
                out.push(std::mem::take(&mut current));
            }
        }
        current.extend(c.to_lowercase());
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn keys() -> Vec<String> {
        [
            "password",
            "secret",
            "token",
            "authorization",
            "api_key",
            "client_secret",
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
        assert!(!names("span", "pan"));
        assert!(!names("japan", "pan"));
        assert!(!names("tokenizer", "token"));
        assert!(!names("secretary_name", "secret"));
        assert!(names("refresh_token", "token"));
        assert!(names("card_pan", "pan"));
    }

    #[test]
    fn case_and_separators_do_not_matter() {
        for key in [
            "clientSecret",
            "client-secret",
            "CLIENT_SECRET",
            "ClientSecret",
            "client.secret",
            "client secret",
        ] {
            assert!(names(key, "client_secret"), "{key}");
        }
        for key in [
            "api-key",
            "apiKey",
            "X-Api-Key",
            "X-API-KEY",
            "APIKey",
            "api_key",
            "apikey",
            "xApiKey",
        ] {
            assert!(names(key, "api_key"), "{key}");
        }
        // The entry may be configured in any spelling too.
        assert!(names("client_secret", "clientSecret"));
        assert!(names("accessToken", "token"));
        assert!(names("refresh_token", "refreshToken"));
        assert!(names("cardNumber", "card_number"));
        assert!(!names("cardholder", "card_number"));
    }

    #[test]
    fn undivided_compounds_of_long_entries_are_redacted() {
        assert!(names("clientsecret", "secret"));
        assert!(names("accesstoken", "token"));
        assert!(names("xapikey", "api_key"));
        assert!(names("dbpassword", "password"));
        // Short entries stay whole-word.
        assert!(!names("cvvs", "cvv"));
        assert!(!names("xcvv", "cvv"));
    }

    #[test]
    fn words_split_at_humps_and_runs_of_capitals() {
        assert_eq!(words("clientSecret"), ["client", "secret"]);
        assert_eq!(words("X-API-Key"), ["x", "api", "key"]);
        assert_eq!(words("APIKey"), ["api", "key"]);
        assert_eq!(words("oauth2Token"), ["oauth2", "token"]);
        assert_eq!(words("__a__"), ["a"]);
        assert!(words("").is_empty());
    }

    #[test]
    fn secret_looking_keys_are_redacted_at_any_depth() {
        let v = redact(
            json!({"email": "a@b.c", "Password": "hunter2", "nested": {"clientSecret": "s", "api-key": "k", "list": [{"cvv": "123"}]}, "reason": "ok", "company": "ACME"}),
            &keys(),
        );
        assert_eq!(
            v,
            json!({"email": "a@b.c", "Password": REDACTED, "nested": {"clientSecret": REDACTED, "api-key": REDACTED, "list": [{"cvv": REDACTED}]}, "reason": "ok", "company": "ACME"})
        );
    }

    fn render(parts: &[String], style: usize) -> String {
        let cap = |w: &str| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        };
        match style {
            0 => parts.join("_"),
            1 => parts.join("-"),
            2 => parts.join("_").to_uppercase(),
            3 => parts
                .iter()
                .enumerate()
                .map(|(i, w)| if i == 0 { w.clone() } else { cap(w) })
                .collect(),
            4 => parts.iter().map(|w| cap(w)).collect(),
            _ => parts.iter().map(|w| cap(w)).collect::<Vec<_>>().join("-"),
        }
    }

    proptest! {
        /// However a key is spelt (snake, kebab, SCREAMING, camel, Pascal,
        /// Train-Case), it splits into the same words and so gets the same
        /// decision; a key holding a configured entry's words is always redacted.
        #[test]
        fn the_spelling_of_a_key_does_not_change_the_decision(
            parts in proptest::collection::vec("[a-z]{2,8}", 1..5),
            entry in 0usize..9,
            insert_at in 0usize..5,
        ) {
            let keys = keys();
            let reference = redact(json!({ parts.join("_"): 1 }), &keys);
            for style in 0..6 {
                let key = render(&parts, style);
                prop_assert_eq!(words(&key), parts.clone(), "{}", key);
                let got = redact(json!({ key.clone(): 1 }), &keys);
                prop_assert_eq!(got.as_object().unwrap().values().next(), reference.as_object().unwrap().values().next(), "{}", key);
            }
            let mut with_secret = parts.clone();
            let at = insert_at.min(with_secret.len());
            for (i, w) in keys[entry].split('_').enumerate() {
                with_secret.insert(at + i, w.to_owned());
            }
            for style in 0..6 {
                let key = render(&with_secret, style);
                prop_assert_eq!(redact(json!({ key.clone(): 1 }), &keys), json!({ key: REDACTED }));
            }
        }
    }
}
