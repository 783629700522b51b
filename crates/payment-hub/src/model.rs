//! Requests turned into commands (parse, don't validate): below a handler's
//! first line nothing re-checks an amount, a currency or an id.

use aibos_wire::FieldError;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::HubError;
use crate::limits::{
    ACCOUNT_NAME_CHARS_MAX, AMOUNT_MINOR_MAX, AMOUNT_MINOR_MIN, IDEMPOTENCY_KEY_BYTES_MAX,
    REFERENCE_CHARS_MAX,
};

/// `POST /payments/process` as sent. Numbers are kept as JSON numbers so that a
/// huge or fractional amount gets a field error rather than a parse error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentBody {
    amount_minor: Option<serde_json::Number>,
    currency: Option<String>,
    payer_account: Option<String>,
    payee_account: Option<String>,
    reference: Option<String>,
}

/// `POST /ledger/accounts` as sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountBody {
    name: Option<String>,
    currency: Option<String>,
    opening_balance_minor: Option<serde_json::Number>,
}

/// A valid payment request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentCommand {
    /// 1 ..= [`AMOUNT_MINOR_MAX`].
    pub amount_minor: i64,
    /// `^[A-Z]{3}$`.
    pub currency: String,
    /// Hyphenated lowercase UUID.
    pub payer_account: String,
    /// Hyphenated lowercase UUID, not the payer.
    pub payee_account: String,
    /// 1 ..= 140 characters, no control characters, stored verbatim.
    pub reference: String,
}

/// A valid account opening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountCommand {
    /// 1 ..= 200 characters, no control characters.
    pub name: String,
    /// `^[A-Z]{3}$`.
    pub currency: String,
    /// 0 ..= [`AMOUNT_MINOR_MAX`].
    pub opening_balance_minor: i64,
}

fn field(errors: &mut Vec<FieldError>, name: &str, message: impl Into<String>) {
    errors.push(FieldError {
        field: name.to_owned(),
        message: message.into(),
    });
}

fn amount(
    errors: &mut Vec<FieldError>,
    name: &str,
    value: Option<&serde_json::Number>,
    min: i64,
) -> i64 {
    let message = format!("must be an integer from {min} to {AMOUNT_MINOR_MAX} (minor units)");
    match value.and_then(serde_json::Number::as_i64) {
        Some(n) if (min..=AMOUNT_MINOR_MAX).contains(&n) => n,
        _ => {
            field(errors, name, message);
            0
        }
    }
}

fn currency(errors: &mut Vec<FieldError>, value: Option<String>) -> String {
    match value {
        Some(c) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()) => c,
        _ => {
            field(
                errors,
                "currency",
                "must be three capital letters (ISO 4217), such as EUR",
            );
            String::new()
        }
    }
}

fn text(
    errors: &mut Vec<FieldError>,
    name: &str,
    value: Option<String>,
    max_chars: usize,
) -> String {
    let message = format!("must be 1 to {max_chars} characters without control characters");
    match value {
        Some(t)
            if !t.is_empty()
                && t.chars().count() <= max_chars
                && !t.chars().any(char::is_control) =>
        {
            t
        }
        _ => {
            field(errors, name, message);
            String::new()
        }
    }
}

fn account_id(errors: &mut Vec<FieldError>, name: &str, value: Option<&str>) -> String {
    match value.and_then(parse_uuid) {
        Some(id) => id,
        None => {
            field(errors, name, "must be an account id (a UUID)");
            String::new()
        }
    }
}

/// A UUID in its canonical form (hyphenated, lowercase), or `None`.
pub fn parse_uuid(text: &str) -> Option<String> {
    // Only the hyphenated form: `Uuid::parse_str` also takes braces and URNs,
    // which would make two spellings of one id.
    if text.len() != 36 {
        return None;
    }
    Uuid::try_parse(text)
        .ok()
        .map(|id| id.hyphenated().to_string())
}

impl PaymentBody {
    /// The command, or every problem at once.
    pub fn parse(self) -> Result<PaymentCommand, HubError> {
        let mut errors = Vec::new();
        let amount_minor = amount(
            &mut errors,
            "amount_minor",
            self.amount_minor.as_ref(),
            AMOUNT_MINOR_MIN,
        );
        let currency = currency(&mut errors, self.currency);
        let payer_account = account_id(&mut errors, "payer_account", self.payer_account.as_deref());
        let payee_account = account_id(&mut errors, "payee_account", self.payee_account.as_deref());
        if !payer_account.is_empty() && payer_account == payee_account {
            field(
                &mut errors,
                "payee_account",
                "must differ from payer_account",
            );
        }
        let reference = text(
            &mut errors,
            "reference",
            self.reference,
            REFERENCE_CHARS_MAX,
        );
        if !errors.is_empty() {
            return Err(HubError::validation(errors));
        }
        Ok(PaymentCommand {
            amount_minor,
            currency,
            payer_account,
            payee_account,
            reference,
        })
    }
}

impl AccountBody {
    /// The command, or every problem at once.
    pub fn parse(self) -> Result<AccountCommand, HubError> {
        let mut errors = Vec::new();
        let name = text(&mut errors, "name", self.name, ACCOUNT_NAME_CHARS_MAX);
        let currency = currency(&mut errors, self.currency);
        let opening_balance_minor = match self.opening_balance_minor {
            None => 0,
            Some(n) => amount(&mut errors, "opening_balance_minor", Some(&n), 0),
        };
        if !errors.is_empty() {
            return Err(HubError::validation(errors));
        }
        Ok(AccountCommand {
            name,
            currency,
            opening_balance_minor,
        })
    }
}

/// Feeds one length-prefixed field: no two different requests share a
/// fingerprint by moving text from one field into the next.
fn feed(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
}

fn hex(digest: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(digest.len() * 2);
    for byte in digest {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

impl PaymentCommand {
    /// SHA-256 (hex) of the request as parsed: the same payment sent with other
    /// whitespace or member order has the same fingerprint.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        feed(&mut hasher, b"payment/v1");
        feed(&mut hasher, &self.amount_minor.to_be_bytes());
        feed(&mut hasher, self.currency.as_bytes());
        feed(&mut hasher, self.payer_account.as_bytes());
        feed(&mut hasher, self.payee_account.as_bytes());
        feed(&mut hasher, self.reference.as_bytes());
        hex(&hasher.finalize())
    }
}

impl AccountCommand {
    /// SHA-256 (hex) of the opening as parsed.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        feed(&mut hasher, b"account/v1");
        feed(&mut hasher, self.name.as_bytes());
        feed(&mut hasher, self.currency.as_bytes());
        feed(&mut hasher, &self.opening_balance_minor.to_be_bytes());
        hex(&hasher.finalize())
    }
}

/// Checks an `Idempotency-Key` value: 1 to 255 printable ASCII characters
/// (0x20–0x7E, as the kernel's gateway checks them).
pub fn parse_idempotency_key(value: &http::HeaderValue) -> Result<String, HubError> {
    let bytes = value.as_bytes();
    if bytes.is_empty()
        || bytes.len() > IDEMPOTENCY_KEY_BYTES_MAX
        || !bytes.iter().all(|b| (0x20..=0x7e).contains(b))
    {
        return Err(HubError::invalid(
            "header:idempotency-key",
            format!(
                "must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} printable ASCII characters without spaces"
            ),
        ));
    }
    // All printable ASCII: valid UTF-8.
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const A: &str = "0197a1b2-0000-7000-8000-00000000000a";
    const B: &str = "0197a1b2-0000-7000-8000-00000000000b";

    fn payment(body: serde_json::Value) -> Result<PaymentCommand, Vec<String>> {
        let body: PaymentBody = serde_json::from_value(body).map_err(|e| vec![e.to_string()])?;
        body.parse().map_err(|e| match e {
            HubError::Refused { errors, .. } => errors.into_iter().map(|e| e.field).collect(),
            other => vec![other.to_string()],
        })
    }

    fn good() -> serde_json::Value {
        json!({"amount_minor": 1250, "currency": "EUR", "payer_account": A, "payee_account": B, "reference": "Invoice 7"})
    }

    #[test]
    fn a_good_payment_parses() {
        let command = payment(good()).expect("valid");
        assert_eq!(command.amount_minor, 1250);
        assert_eq!(command.payer_account, A);
    }

    #[test]
    fn each_bad_field_is_named() {
        let check = |patch: serde_json::Value, fields: &[&str]| {
            let mut body = good();
            for (k, v) in patch.as_object().expect("object") {
                body[k] = v.clone();
            }
            assert_eq!(payment(body).expect_err("invalid"), fields, "{patch}");
        };
        check(json!({"amount_minor": 0}), &["amount_minor"]);
        check(json!({"amount_minor": -5}), &["amount_minor"]);
        check(json!({"amount_minor": 12.5}), &["amount_minor"]);
        check(
            json!({"amount_minor": 1_000_000_000_000_000_001i64}),
            &["amount_minor"],
        );
        check(json!({"amount_minor": 1e30}), &["amount_minor"]);
        check(json!({"currency": "eur"}), &["currency"]);
        check(json!({"currency": "EURO"}), &["currency"]);
        check(json!({"payer_account": "not-a-uuid"}), &["payer_account"]);
        check(
            json!({"payer_account": format!("{{{A}}}")}),
            &["payer_account"],
        );
        check(json!({"payee_account": A}), &["payee_account"]);
        check(json!({"reference": ""}), &["reference"]);
        check(json!({"reference": "a\u{0007}b"}), &["reference"]);
        check(json!({"reference": "é".repeat(141)}), &["reference"]);
        check(
            json!({"amount_minor": null, "currency": null}),
            &["amount_minor", "currency"],
        );
        // 140 multi-byte characters are fine: the limit is in characters.
        assert!(
            payment({
                let mut b = good();
                b["reference"] = json!("é".repeat(140));
                b
            })
            .is_ok()
        );
        // The largest amount is accepted.
        assert!(
            payment({
                let mut b = good();
                b["amount_minor"] = json!(AMOUNT_MINOR_MAX);
                b
            })
            .is_ok()
        );
    }

    #[test]
    fn unknown_members_and_wrong_types_are_refused() {
        assert!(payment(json!({"amount_minor": 1, "extra": true})).is_err());
        assert!(payment(json!({"amount_minor": "12"})).is_err());
    }

    #[test]
    fn the_fingerprint_depends_on_every_field_and_nothing_else() {
        let base = payment(good()).expect("valid");
        assert_eq!(
            base.fingerprint(),
            payment(good()).expect("valid").fingerprint()
        );
        assert_eq!(base.fingerprint().len(), 64);
        let mut other = base.clone();
        other.amount_minor += 1;
        assert_ne!(base.fingerprint(), other.fingerprint());
        let mut other = base.clone();
        other.reference.push(' ');
        assert_ne!(base.fingerprint(), other.fingerprint());
        // Text moved between fields does not collide.
        let mut x = base.clone();
        x.currency = "EUR".into();
        x.reference = "ab".into();
        let mut y = x.clone();
        y.reference = "a".into();
        y.payee_account.push('b');
        assert_ne!(x.fingerprint(), y.fingerprint());
    }

    #[test]
    fn idempotency_keys_are_printable_ascii_within_bounds() {
        let ok = http::HeaderValue::from_static("order 42; 'quoted'");
        assert_eq!(
            parse_idempotency_key(&ok).expect("valid"),
            "order 42; 'quoted'"
        );
        let tab = http::HeaderValue::from_bytes(b"a\tb").expect("header");
        assert!(parse_idempotency_key(&tab).is_err());
        for bad in ["", &"k".repeat(256)] {
            let value = http::HeaderValue::from_str(bad).expect("header");
            assert!(parse_idempotency_key(&value).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn accounts_parse_with_a_default_opening_of_zero() {
        let body: AccountBody =
            serde_json::from_value(json!({"name": "Alice", "currency": "EUR"})).expect("json");
        assert_eq!(body.parse().expect("valid").opening_balance_minor, 0);
        let body: AccountBody = serde_json::from_value(
            json!({"name": "", "currency": "eu", "opening_balance_minor": -1}),
        )
        .expect("json");
        match body.parse() {
            Err(HubError::Refused { errors, .. }) => assert_eq!(errors.len(), 3),
            other => panic!("{other:?}"),
        }
    }
}
