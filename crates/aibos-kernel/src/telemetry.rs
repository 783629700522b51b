//! Logs and metrics.
//!
//! Logs go through `tracing`. The binary installs the one process-wide subscriber
//! with [`init_logging`] and hands the kernel a [`LogControl`] so a reload can
//! change the level; the library itself never installs anything global.
//!
//! Metrics are recorded into a [`Metrics`] value owned by the app (not the
//! `metrics` crate's global recorder), so several kernels in one test process
//! keep separate counts. Every metric is listed, with its kind, labels and
//! help, in [`catalogue`].

pub mod catalogue;

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use arc_swap::ArcSwap;
use axum::http::Method;
use metrics::{Counter, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, reload};

use crate::config::{LogConfig, LogFormat};
use crate::limits;
use catalogue::MetricKind;

/// Checks that `level` is a valid tracing filter, without installing it.
pub fn check_filter(level: &str) -> Result<(), String> {
    if level.trim().is_empty() {
        return Err("must not be empty; use one of trace, debug, info, warn, error".to_owned());
    }
    EnvFilter::try_new(level)
        .map(|_| ())
        .map_err(|e| format!("{level:?} is not a valid level or filter: {e}"))
}

type SetLevel = dyn Fn(&str) -> Result<(), String> + Send + Sync;

/// Changes the log level of the running process (used by configuration reload).
#[derive(Clone)]
pub struct LogControl {
    set_level: Arc<SetLevel>,
}

impl LogControl {
    /// A control that changes nothing: for kernels that do not own the subscriber (tests).
    pub fn detached() -> LogControl {
        LogControl {
            set_level: Arc::new(check_filter),
        }
    }

    /// Applies a new filter; the old one stays when `level` is invalid.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        (self.set_level)(level)
    }
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogControl")
    }
}

/// Installs the process-wide subscriber: JSON when not on a terminal (or when
/// asked), human text on a terminal. Call once, from the binary.
pub fn init_logging(config: &LogConfig) -> LogControl {
    let filter = EnvFilter::try_new(&config.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let json = match config.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if json {
        let format = tracing_subscriber::fmt::format()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false);
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .event_format(WithRequestIds {
                        inner: format,
                        json: true,
                    })
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        let format = tracing_subscriber::fmt::format();
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(WithRequestIds {
                        inner: format,
                        json: false,
                    })
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    if installed.is_err() {
        // A subscriber is already installed (a second kernel in one process): leave it.
        return LogControl::detached();
    }
    LogControl {
        set_level: Arc::new(move |level| {
            let filter = EnvFilter::try_new(level).map_err(|e| format!("{level:?}: {e}"))?;
            handle.reload(filter).map_err(|e| e.to_string())
        }),
    }
}

/// Adds the current request's `correlation_id` and `trace_id` to every log line
/// written while serving it (read from the edge's task-local, so no span has to
/// be formatted for requests that log nothing).
struct WithRequestIds<F> {
    inner: F,
    /// JSON lines get two members; text lines a `key=value` prefix.
    json: bool,
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for WithRequestIds<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let Ok(request) = crate::http::edge::CURRENT_REQUEST.try_with(|r| *r) else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.inner.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        let ids = if self.json {
            format!(
                "\"correlation_id\":\"{}\",\"trace_id\":\"{}\",",
                request.correlation_id,
                request.trace.trace_id_display()
            )
        } else {
            format!(
                "correlation_id={} trace_id={} ",
                request.correlation_id,
                request.trace.trace_id_display()
            )
        };
        match (self.json, line.find('{')) {
            (true, Some(brace)) => line.insert_str(brace + 1, &ids),
            _ => line.insert_str(0, &ids),
        }
        writer.write_str(&line)
    }
}

/// The kernel's metrics: an app-owned Prometheus recorder.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    /// Handles of the per-request series, by route then (method, status). Read on
    /// every request without a lock (an `ArcSwap` load); a new combination copies
    /// the map once. Building a labelled key per request cost ~10% of throughput.
    http_series: Arc<ArcSwap<HashMap<Box<str>, Vec<HttpSeries>>>>,
}

/// The counter and histogram of one (route, method, status).
#[derive(Clone)]
struct HttpSeries {
    method: Method,
    status: u16,
    count: Counter,
    latency: Histogram,
}

static METADATA: Metadata<'static> =
    Metadata::new("aibos_kernel", Level::INFO, Some(module_path!()));

impl Metrics {
    /// A fresh recorder with the kernel's histogram buckets and build info.
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets(limits::LATENCY_BUCKETS_SECONDS)
            .expect("the latency bucket list is not empty")
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(
                    "aibos_event_publish_batch_size".to_owned(),
                ),
                limits::PUBLISH_BATCH_SIZE_BUCKETS,
            )
            .expect("the batch-size bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        let metrics = Metrics {
            recorder: Arc::new(recorder),
            handle,
            http_series: Arc::default(),
        };
        metrics.describe();
        let build = Key::from_parts(
            "aibos_build_info",
            vec![
                Label::new("version", env!("CARGO_PKG_VERSION")),
                Label::new("rustc", rustc_version()),
            ],
        );
        metrics.recorder.register_gauge(&build, &METADATA).set(1.0);
        metrics
    }

    /// Describes every metric of the catalogue, and registers the unlabelled
    /// counters and histograms at zero so that their series exist from the
    /// first scrape (see `catalogue`'s module documentation for why not gauges).
    fn describe(&self) {
        let r = &self.recorder;
        for m in catalogue::CATALOGUE {
            let (name, help) = (m.name.into(), m.help.into());
            match m.kind {
                MetricKind::Counter => r.describe_counter(name, m.unit, help),
                MetricKind::Gauge => r.describe_gauge(name, m.unit, help),
                MetricKind::Histogram => r.describe_histogram(name, m.unit, help),
            }
            if m.labels.is_empty() {
                // The handles are dropped: registering is what makes the series exist.
                let key = Key::from_static_name(m.name);
                match m.kind {
                    MetricKind::Counter => drop(r.register_counter(&key, &METADATA)),
                    MetricKind::Histogram => drop(r.register_histogram(&key, &METADATA)),
                    MetricKind::Gauge => {}
                }
            }
        }
    }

    /// Records one answered HTTP request.
    pub fn http_request(&self, route: &str, method: &Method, status: u16, elapsed: Duration) {
        let series = self.http_series.load();
        let found = series.get(route).and_then(|list| {
            list.iter()
                .find(|s| s.status == status && s.method == method)
        });
        match found {
            Some(s) => {
                s.count.increment(1);
                s.latency.record(elapsed.as_secs_f64());
            }
            None => {
                let created = self.new_http_series(route, method, status);
                created.count.increment(1);
                created.latency.record(elapsed.as_secs_f64());
            }
        }
    }

    fn new_http_series(&self, route: &str, method: &Method, status: u16) -> HttpSeries {
        let labels = vec![
            Label::new("route", route.to_owned()),
            Label::new("method", method.as_str().to_owned()),
            Label::new("status", status.to_string()),
        ];
        let count = Key::from_parts("aibos_http_requests_total", labels.clone());
        let latency = Key::from_parts("aibos_http_request_duration_seconds", labels);
        let created = HttpSeries {
            method: method.clone(),
            status,
            count: self.recorder.register_counter(&count, &METADATA),
            latency: self.recorder.register_histogram(&latency, &METADATA),
        };
        // Bounded by routes × methods × statuses actually seen; unmatched paths share one route label.
        self.http_series.rcu(|current| {
            let mut next = HashMap::clone(current);
            let list = next.entry(route.into()).or_default();
            if !list
                .iter()
                .any(|s| s.status == status && s.method == *method)
            {
                list.push(created.clone());
            }
            next
        });
        created
    }

    /// A counter handle (hold it; registering per event costs a labelled key).
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, String)]) -> Counter {
        debug_assert_catalogued(name, MetricKind::Counter, labels);
        self.recorder
            .register_counter(&Self::key(name, labels), &METADATA)
    }

    /// A histogram handle.
    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, String)]) -> Histogram {
        debug_assert_catalogued(name, MetricKind::Histogram, labels);
        self.recorder
            .register_histogram(&Self::key(name, labels), &METADATA)
    }

    /// A gauge handle.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, String)]) -> metrics::Gauge {
        debug_assert_catalogued(name, MetricKind::Gauge, labels);
        self.recorder
            .register_gauge(&Self::key(name, labels), &METADATA)
    }

    fn key(name: &'static str, labels: &[(&'static str, String)]) -> Key {
        Key::from_parts(
            name,
            labels
                .iter()
                .map(|(k, v)| Label::new(*k, v.clone()))
                .collect::<Vec<_>>(),
        )
    }

    /// Counts one login attempt by outcome (`success`, `failure`).
    pub fn login(&self, outcome: &'static str) {
        let key = Key::from_parts("aibos_logins_total", vec![Label::new("outcome", outcome)]);
        self.recorder.register_counter(&key, &METADATA).increment(1);
    }

    /// Records the database pool's state at scrape time.
    pub fn db_pool(&self, idle: u32, in_use: u32) {
        for (state, value) in [("idle", idle), ("in_use", in_use)] {
            let key = Key::from_parts(
                "aibos_db_pool_connections",
                vec![Label::new("state", state)],
            );
            self.recorder
                .register_gauge(&key, &METADATA)
                .set(f64::from(value));
        }
    }

    /// Records whether the database answered its last probe (`aibos_database_up`).
    pub fn database_up(&self, up: bool) {
        self.recorder
            .register_gauge(&Key::from_static_name("aibos_database_up"), &METADATA)
            .set(if up { 1.0 } else { 0.0 });
    }

    /// Records one configuration reload.
    pub fn config_reload(&self, outcome: &'static str) {
        let key = Key::from_parts(
            "aibos_config_reloads_total",
            vec![Label::new("outcome", outcome)],
        );
        self.recorder.register_counter(&key, &METADATA).increment(1);
    }

    /// The Prometheus text exposition of everything recorded so far.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Folds recent histogram samples; run every few seconds so memory stays flat.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

/// A metric recorded under a name, kind or labels the catalogue does not list
/// is our mistake: found by any test that records it.
fn debug_assert_catalogued(name: &str, kind: MetricKind, labels: &[(&'static str, String)]) {
    if cfg!(debug_assertions) {
        let spec = catalogue::find(name);
        debug_assert!(spec.is_some(), "{name} is not in telemetry/catalogue.rs");
        if let Some(spec) = spec {
            debug_assert_eq!(
                spec.kind, kind,
                "{name}: the catalogue says {:?}",
                spec.kind
            );
            debug_assert!(
                labels.len() == spec.labels.len()
                    && labels.iter().all(|(l, _)| spec.labels.contains(l)),
                "{name}: labels {:?}, the catalogue says {:?}",
                labels.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
                spec.labels
            );
        }
    }
}

fn rustc_version() -> &'static str {
    option_env!("AIBOS_RUSTC_VERSION").unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_sizes_count_events_and_latencies_seconds() {
        let metrics = Metrics::new();
        metrics
            .histogram("aibos_event_publish_batch_size", &[])
            .record(3.0);
        let text = metrics.render();
        assert!(
            text.contains("aibos_event_publish_batch_size_bucket{le=\"4\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("aibos_event_publish_batch_size_bucket{le=\"2\"} 0"),
            "{text}"
        );
        metrics
            .histogram("aibos_webhook_attempt_duration_seconds", &[])
            .record(0.003);
        let text = metrics.render();
        assert!(
            text.contains("aibos_webhook_attempt_duration_seconds_bucket{le=\"0.005\"} 1"),
            "latency histograms keep the latency buckets: {text}"
        );
    }
}
