//! Liveness, readiness and metrics: what an orchestrator and Prometheus scrape.
//! `routes.rs` serves them; `probe.rs` checks the database in the background
//! so that `aibos_database_up` is current whether or not anyone asks.

pub mod probe;
pub mod routes;
