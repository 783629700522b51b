//! What crosses the wire between the kernel, its clients and its cells.
//!
//! This crate does no IO and has no async code: it is the vocabulary that the
//! kernel, the cell SDK and the test kit share, so that an error code or a page
//! shape cannot drift between them.
//!
//! - [`assertion`]: the identity headers the gateway forwards and the signed
//!   assertion a cell verifies.
//! - [`error`]: the stable error codes and the RFC 9457 problem body.
//! - [`correlation`]: correlation ids and W3C trace context.
//! - [`page`]: the `{items, next_cursor}` list envelope.
//! - [`jws`]: signing and verifying the compact JWTs of access tokens (EdDSA or
//!   HS256) and assertions (HS256), claims checks included.

pub mod assertion;
pub mod correlation;
pub mod error;
pub mod jws;
pub mod page;

pub use correlation::{CorrelationId, TraceParent};
pub use error::{ErrorCode, FieldError, Problem};
pub use page::Page;
