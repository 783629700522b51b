//! Metric handles of the gateway, registered once per route and canon when the
//! route table is compiled, so a proxied request only increments atomics.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};

use crate::telemetry::Metrics;

/// How a gateway call ended, as counted in `aibos_gateway_calls_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The cell answered below 500.
    Ok,
    /// The cell answered 5xx (passed through unchanged).
    CellError,
    /// Connection refused or reset.
    Unavailable,
    /// No response headers within the timeout.
    Timeout,
    /// Refused by an open circuit without calling the cell.
    CircuitOpen,
    /// Refused because the health checks mark the cell unhealthy.
    Unhealthy,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Ok,
        Outcome::CellError,
        Outcome::Unavailable,
        Outcome::Timeout,
        Outcome::CircuitOpen,
        Outcome::Unhealthy,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::CellError => "cell_error",
            Outcome::Unavailable => "unavailable",
            Outcome::Timeout => "timeout",
            Outcome::CircuitOpen => "circuit_open",
            Outcome::Unhealthy => "unhealthy",
        }
    }
}

/// One route's series.
pub struct RouteMetrics {
    calls: [Counter; 6],
    upstream_latency: Histogram,
}

impl RouteMetrics {
    /// Registers the series of `method path` on canon `canon`.
    pub fn new(metrics: &Metrics, canon: &str, method: &str, path: &str) -> RouteMetrics {
        let labels = |outcome: Outcome| {
            [
                ("canon", canon.to_owned()),
                ("route", format!("{method} {path}")),
                ("outcome", outcome.as_str().to_owned()),
            ]
        };
        RouteMetrics {
            calls: Outcome::ALL.map(|o| metrics.counter("aibos_gateway_calls_total", &labels(o))),
            upstream_latency: metrics.histogram(
                "aibos_gateway_upstream_duration_seconds",
                &[
                    ("canon", canon.to_owned()),
                    ("route", format!("{method} {path}")),
                ],
            ),
        }
    }

    /// Counts a call.
    pub fn call(&self, outcome: Outcome) {
        let index = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.calls[index].increment(1);
    }

    /// Records the time to the cell's response headers.
    pub fn upstream_latency(&self, elapsed: Duration) {
        self.upstream_latency.record(elapsed.as_secs_f64());
    }
}

/// One canon's series.
pub struct CanonMetrics {
    /// Retries after connection errors.
    pub retries: Counter,
    /// 0 closed, 1 half-open, 2 open.
    pub circuit: Gauge,
    /// 1 healthy, 0 unhealthy, -1 unknown.
    pub healthy: Gauge,
}

impl CanonMetrics {
    /// Registers the series of canon `canon`.
    pub fn new(metrics: &Metrics, canon: &str) -> CanonMetrics {
        let labels = [("canon", canon.to_owned())];
        let m = CanonMetrics {
            retries: metrics.counter("aibos_gateway_retries_total", &labels),
            circuit: metrics.gauge("aibos_gateway_circuit_state", &labels),
            healthy: metrics.gauge("aibos_gateway_canon_healthy", &labels),
        };
        m.healthy.set(-1.0);
        m.circuit.set(0.0);
        m
    }
}
