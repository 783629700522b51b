//! The event bus (SPEC §7).
//!
//! - [`webhook`]: webhook subscriptions and their signed, at-least-once, in-order delivery.

pub mod webhook;
