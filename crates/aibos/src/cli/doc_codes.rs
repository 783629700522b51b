//! Every error `code` docs/troubleshooting.md names exists, and is listed under
//! the status it is answered with: a renamed or removed code breaks a test, not
//! a reader's search for it.

use std::path::Path;

use aibos_wire::ErrorCode;

/// The payment hub's own codes (crates/payment-hub, SPEC §11),
/// with their statuses. The hub is a separate crate that this binary does not
/// depend on, so they are listed here and checked against its sources below.
const HUB_CODES: &[(&str, u16)] = &[
    ("ACCOUNT_NOT_FOUND", 404),
    ("PAYMENT_NOT_FOUND", 404),
    ("CELL_NOT_FOUND", 404),
    ("INSUFFICIENT_FUNDS", 422),
    ("CURRENCY_MISMATCH", 422),
    ("LEDGER_DOWN", 503),
    ("PROCESSOR_DOWN", 503),
    ("GATEWAY_DOWN", 503),
];

/// Upper-case words in backticks that are not error codes.
const NOT_CODES: &[&str] = &["GET", "SIGHUP"];

fn repository_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn troubleshooting() -> String {
    std::fs::read_to_string(repository_root().join("docs/troubleshooting.md"))
        .expect("docs/troubleshooting.md is readable")
}

/// The status a code is answered with, from the kernel's catalogue or the hub's list.
fn status_of(code: &str) -> Option<u16> {
    ErrorCode::parse(code).map(ErrorCode::status).or_else(|| {
        HUB_CODES
            .iter()
            .find(|(hub_code, _)| *hub_code == code)
            .map(|(_, status)| *status)
    })
}

/// Every `UPPER_SNAKE` word in backticks, but environment variables (`AIBOS_…`)
/// and the words of [`NOT_CODES`].
fn backticked_codes(text: &str) -> Vec<&str> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|word| {
            word.len() > 1
                && word.starts_with(|c: char| c.is_ascii_uppercase())
                && word
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .filter(|word| !word.starts_with("AIBOS_") && !NOT_CODES.contains(word))
        .collect()
}

#[test]
fn every_code_the_troubleshooting_guide_names_exists() {
    let text = troubleshooting();
    let codes = backticked_codes(&text);
    let unknown: Vec<&&str> = codes.iter().filter(|c| status_of(c).is_none()).collect();
    assert!(unknown.is_empty(), "codes that exist nowhere: {unknown:?}");
    assert!(codes.len() >= 20, "only {} codes found", codes.len());
}

#[test]
fn each_code_is_described_under_its_status() {
    let text = troubleshooting();
    let mut status: Option<u16> = None;
    let mut described = 0;
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            status = heading
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok());
            continue;
        }
        // A code is described by a table row `| `CODE` …` or a paragraph `` `CODE`: … ``.
        let described_code = line
            .strip_prefix("| `")
            .or_else(|| line.strip_prefix('`'))
            .and_then(|rest| rest.split_once('`'))
            .map(|(code, _)| code)
            .filter(|code| !backticked_codes(&format!("`{code}`")).is_empty());
        if let (Some(heading_status), Some(code)) = (status, described_code) {
            described += 1;
            assert_eq!(
                status_of(code),
                Some(heading_status),
                "{code} is described under {heading_status}"
            );
        }
    }
    assert!(described >= 20, "only {described} codes described");
}

/// The hub's codes above must be the hub's: each appears in its sources, as
/// the wire string or as an enum variant of it (`LEDGER_DOWN` or `LedgerDown`).
///
/// crates/payment-hub is built in a parallel branch (issue 22); until it is
/// merged this test has nothing to read. THE LEAD SHOULD MAKE IT UNCONDITIONAL
/// (drop the early return) after merging the hub, so that the list cannot drift.
#[test]
fn the_hub_codes_are_in_the_hub_sources() {
    let dir = repository_root().join("crates/payment-hub/src");
    let mut sources = String::new();
    let mut pending = vec![dir];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("the hub's sources are readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                sources.push_str(&std::fs::read_to_string(&path).expect("a source file"));
            }
        }
    }
    for (code, _) in HUB_CODES {
        let camel: String = code
            .split('_')
            .map(|word| {
                let mut chars = word.chars();
                chars.next().map_or(String::new(), |first| {
                    first.to_string() + &chars.as_str().to_ascii_lowercase()
                })
            })
            .collect();
        assert!(
            sources.contains(code) || sources.contains(&camel),
            "{code} ({camel}) is not in crates/payment-hub/src"
        );
    }
}

#[test]
fn codes_are_told_from_other_upper_case_words() {
    assert_eq!(
        backticked_codes(
            "`LEDGER_DOWN`, `AIBOS_CLIENT_ID`, `SIGHUP`, `x`, `Forbidden`, `FORBIDDEN`"
        ),
        ["LEDGER_DOWN", "FORBIDDEN"]
    );
    assert_eq!(status_of("LEDGER_DOWN"), Some(503));
    assert_eq!(status_of("CONFLICT"), Some(409));
    assert_eq!(status_of("NO_SUCH_CODE"), None);
}
