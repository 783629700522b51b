//! Liveness, readiness and metrics: what an orchestrator and Prometheus scrape.

pub mod routes;
