//! The kernel's integration tests: one test binary, a module per area.
//!
//! Each test starts a real kernel on a random port with its own fresh database.
//! `both_engines!` writes every storage test twice, `…::sqlite` and
//! `…::postgres`; the PostgreSQL one runs when `AIBOS_TEST_DATABASE_URL` is set
//! and fails (instead of skipping) when `AIBOS_REQUIRE_POSTGRES=1` without it.

mod architecture;
mod audit;
mod authz;
mod backup;
mod cancellation;
mod chaos;
mod cli;
mod concurrency;
mod connections;
mod conventions;
mod docs;
mod drill;
mod e2e;
mod escalation;
mod events;
mod gateway;
mod health;
mod idempotency;
mod identity;
mod kernel_events;
mod migrations;
mod pg_outage;
mod rate_limits;
mod registry;
mod relay;
mod secrets;
mod shutdown;
mod tls;
mod webhooks;

/// Writes `async fn name(engine: Engine) { … }` as one test per engine.
#[macro_export]
macro_rules! both_engines {
    ($( $(#[$meta:meta])* async fn $name:ident($engine:ident: Engine) $body:block )*) => {
        $(
            $(#[$meta])*
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                async fn run($engine: aibos_testkit::Engine) $body

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    run(aibos_testkit::Engine::Sqlite).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    if aibos_testkit::Engine::postgres_admin_url().is_none() {
                        eprintln!("skipped: AIBOS_TEST_DATABASE_URL is not set");
                        return;
                    }
                    run(aibos_testkit::Engine::Postgres).await;
                }
            }
        )*
    };
}

/// Checks that a response is a problem+json of `status` and `code` whose
/// `correlation_id` equals the echoed header; returns the body.
pub async fn expect_problem(
    response: reqwest::Response,
    status: u16,
    code: &str,
) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status, "status");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let echoed = response
        .headers()
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: serde_json::Value = response.json().await.expect("a JSON problem body");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert!(
        body["type"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert!(
        body["title"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert!(body["detail"].is_string(), "{body}");
    let correlation_id = body["correlation_id"]
        .as_str()
        .expect("a correlation_id in the problem");
    assert_eq!(
        Some(correlation_id.to_owned()),
        echoed,
        "the body and the header carry the same correlation id"
    );
    body
}
