//! The payment hub: the reference cell behind the AI-BOS kernel.
//!
//! It moves money between accounts of one tenant as double-entry postings,
//! idempotent by `Idempotency-Key`, refuses overdrafts, and publishes
//! `finance.payment.processed` to the kernel through a transactional outbox.
//! It trusts only calls whose `x-kernel-assertion` verifies (the cell SDK,
//! [`aibos_cell`]) and takes the tenant from it alone. It is built only on
//! `aibos-cell` and `aibos-wire`, as a team outside the kernel would build it.
//!
//! Modules, in reading order:
//!
//! - [`config`]: [`HubConfig`] from the environment, every problem listed.
//! - [`app`]: [`Hub::build`] and [`Hub::run_until_stopped`].
//! - [`routes`]: the endpoints; the assertion is verified once per request.
//! - [`model`]: request bodies parsed into commands; the idempotency fingerprint.
//! - [`store`]: all SQL: the payment transaction, accounts, trial balance, outbox.
//! - [`db`]: the two engines behind one enum, migrations, cancel-safe writes.
//! - [`outbox`]: the background publisher.
//! - [`chaos`]: the failure switches of the three simulated parts.
//! - [`error`]: codes and the problem body.
//! - [`limits`]: every cap, with its reason.

pub mod app;
pub mod chaos;
pub mod config;
pub mod db;
pub mod error;
pub mod limits;
pub mod model;
pub mod outbox;
pub mod routes;
pub mod store;

pub use app::{Hub, HubStartError};
pub use config::{HubConfig, HubConfigError, ServiceAccountCredentials};
