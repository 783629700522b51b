//! The AI-BOS kernel library: every server behaviour, organised by domain.
//!
//! Reading order:
//! - [`app`]: `App::build` wires everything and `run_until_stopped` serves; start here.
//! - [`config`]: layered configuration, validated as a whole; [`limits`]: every cap.
//! - [`state`]: the one `AppState` of cheap handles, and configuration reload.
//! - [`http`]: the router, the middleware stack (SPEC §3) and our extractors.
//! - [`error`]: domain errors become RFC 9457 problem+json here, and only here.
//! - [`db`]: the database handle over SQLite and PostgreSQL, and migrations.
//! - [`identity`]: tenants, users, service accounts, login, sessions and tokens.
//! - [`authz`]: permissions, roles, delegation, break-glass, the `Caller` extractor and its cache.
//! - [`change`]: one change, its audit entry, its `kernel.*` event and its invalidation in one transaction.
//! - [`registry`]: canons (cells), their assertion secrets and routes.
//! - [`gateway`]: `/api/gateway/{canon}/…`: the route table, the proxy, breakers and health checks.
//! - [`ratelimit`]: GCRA per user, tenant, address and route, in process or on Redis.
//! - [`events`]: the event bus: webhook subscriptions and their delivery.
//! - [`idempotency`]: `Idempotency-Key` on kernel mutations and gateway routes: one execution per key, stored responses replayed.
//! - [`secrets`]: secrets at rest, sealed under the master key (XChaCha20-Poly1305).
//! - [`audit`]: the tamper-evident audit trail, its verification and signed checkpoints.
//! - [`health`]: liveness, readiness and metrics endpoints.
//! - [`telemetry`]: logs and metrics.
//!
//! The binary `aibos` parses the command line and calls into this crate; this
//! crate never parses argv, never exits the process and reads no process-global
//! state, so tests can run many kernels in one process.

pub mod app;
pub mod audit;
pub mod authz;
pub mod backup;
pub mod change;
pub mod config;
pub mod db;
pub mod error;
pub mod events;
pub mod gateway;
pub mod health;
pub mod http;
pub mod idempotency;
pub mod identity;
pub mod json_text;
pub mod limits;
pub mod ratelimit;
pub mod registry;
pub mod secrets;
pub mod state;
pub mod telemetry;
pub mod timestamp;

pub use app::{App, AppOptions, StartError};
pub use config::{Config, ConfigSources};
pub use state::AppState;
