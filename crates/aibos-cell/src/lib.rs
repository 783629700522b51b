//! The cell SDK: the one dependency a Rust cell needs to sit behind the AI-BOS
//! kernel's gateway.
//!
//! A *cell* is an HTTP service registered with the kernel as a *canon*. The
//! kernel authenticates and authorises every call, then forwards it with the
//! caller's identity in plain headers and in a signed `x-kernel-assertion` (a
//! 60-second HS256 JWT bound to this canon, one tenant and caller, and one method
//! and path). This crate checks that assertion, hands the verified caller to
//! axum handlers, and lets the cell call the kernel back as its own service
//! account. It depends on [`aibos_wire`] (re-exported) and never on the kernel.
//!
//! Modules, in reading order:
//!
//! - [`assertion`]: [`AssertionVerifier`] checks an `x-kernel-assertion` against
//!   the canon's secrets and the request, yielding a [`KernelCall`] or a precise
//!   [`AssertionError`] for the logs.
//! - [`extract`]: [`KernelCall`] as an axum extractor; a refused call gets a
//!   uniform 401 problem+json ([`KernelCallRejection`]).
//! - [`client`]: [`KernelClient`], service-account tokens (cached) and
//!   [`KernelClient::publish_event`], [`KernelClient::whoami`] (the account's tenant).
//! - [`config`]: the environment variables read by the `from_env` constructors
//!   and [`ConfigError`].
//!
//! A minimal cell:
//!
//! ```no_run
//! use aibos_cell::{AssertionVerifier, KernelCall};
//! use axum::{Json, Router, routing::get};
//!
//! async fn whoami(call: KernelCall) -> Json<serde_json::Value> {
//!     Json(serde_json::json!({ "tenant": call.tenant_id, "subject": call.subject }))
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let verifier = AssertionVerifier::from_env()?; // AIBOS_CANON_NAME, AIBOS_ASSERTION_SECRETS
//! let app = Router::new().route("/whoami", get(whoami)).with_state(verifier);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:4000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! `docs/cell-integration-guide.md` covers registration with the kernel, secret
//! rotation, and verifying the assertion from other languages;
//! `examples/minimal_cell.rs` is a complete cell.

pub mod assertion;
pub mod client;
pub mod config;
pub mod extract;

pub use aibos_wire;
pub use aibos_wire::assertion::AssertionClaims;
pub use aibos_wire::{CorrelationId, ErrorCode, Problem};
pub use assertion::{ActorType, AssertionError, AssertionVerifier, KernelCall};
pub use client::{ClientError, KernelClient, NewEvent, PublishedEvent, ServiceIdentity};
pub use config::ConfigError;
pub use extract::KernelCallRejection;

#[cfg(test)]
mod tests {
    #[test]
    fn the_integration_guide_carries_the_compiled_example_verbatim() {
        let guide = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/cell-integration-guide.md"
        ))
        .expect("docs/cell-integration-guide.md exists");
        let example = include_str!("../examples/minimal_cell.rs");
        assert!(
            guide.contains(&format!("```rust\n{example}```")),
            "docs/cell-integration-guide.md must contain examples/minimal_cell.rs unchanged"
        );
    }
}
