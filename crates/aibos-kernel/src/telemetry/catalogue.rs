//! Every metric the kernel exports: its name, kind, labels and help, in one list.
//!
//! `Metrics::new` describes each one from here (the `# HELP`/`# TYPE` lines of
//! `/metrics`) and registers the unlabelled counters and histograms at zero, so
//! a series exists from the first scrape: `increase()` then sees the first
//! event, and alerts need no `absent()`. Gauges are left to their owners,
//! because a gauge at 0 claims something (a database down, a backup made in
//! 1970); each owner sets its gauge once it knows the value.
//!
//! Two tests keep this list true: every `"aibos_…"` metric name written in the
//! kernel's sources is here, and every metric that `deploy/`'s Grafana
//! dashboard and Prometheus rules query is here (or is Prometheus's own `up`).
//! `Metrics::counter`/`gauge`/`histogram` also assert it in debug builds.

use metrics::Unit;

/// The Prometheus type of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (`_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in the kernel's buckets (`_bucket`, `_sum`, `_count`).
    Histogram,
}

/// One metric the kernel exports.
#[derive(Debug, Clone, Copy)]
pub struct MetricSpec {
    /// The name, `aibos_<thing>_<unit>[_total]`.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// The unit, where it has one.
    pub unit: Option<Unit>,
    /// The names of its labels (empty: one series).
    pub labels: &'static [&'static str],
    /// The `# HELP` text.
    pub help: &'static str,
}

const fn counter(
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
) -> MetricSpec {
    MetricSpec {
        name,
        kind: MetricKind::Counter,
        unit: None,
        labels,
        help,
    }
}

const fn gauge(
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
) -> MetricSpec {
    MetricSpec {
        name,
        kind: MetricKind::Gauge,
        unit: None,
        labels,
        help,
    }
}

const fn seconds_gauge(name: &'static str, help: &'static str) -> MetricSpec {
    MetricSpec {
        name,
        kind: MetricKind::Gauge,
        unit: Some(Unit::Seconds),
        labels: &[],
        help,
    }
}

const fn histogram(
    name: &'static str,
    unit: Option<Unit>,
    labels: &'static [&'static str],
    help: &'static str,
) -> MetricSpec {
    MetricSpec {
        name,
        kind: MetricKind::Histogram,
        unit,
        labels,
        help,
    }
}

const SECONDS: Option<Unit> = Some(Unit::Seconds);

/// Every metric the kernel exports, grouped by the module that records it.
pub const CATALOGUE: &[MetricSpec] = &[
    // The HTTP edge (http/edge.rs) and the process.
    counter(
        "aibos_http_requests_total",
        &["route", "method", "status"],
        "HTTP requests answered, by matched route, method and status.",
    ),
    histogram(
        "aibos_http_request_duration_seconds",
        SECONDS,
        &["route", "method", "status"],
        "HTTP request latency, by matched route, method and status.",
    ),
    gauge(
        "aibos_build_info",
        &["version", "rustc"],
        "Always 1; labels carry the build's version.",
    ),
    counter(
        "aibos_config_reloads_total",
        &["outcome"],
        "Configuration reloads, by outcome (applied, failed).",
    ),
    // The database (health/).
    gauge(
        "aibos_db_pool_connections",
        &["state"],
        "Database pool connections, by state (idle, in_use), read at scrape time.",
    ),
    gauge(
        "aibos_database_up",
        &[],
        "1 when the database answered the last periodic probe (a real query within the health timeout), 0 when it did not.",
    ),
    // Identity.
    counter(
        "aibos_logins_total",
        &["outcome"],
        "Password logins, by outcome (success, failure).",
    ),
    // The gateway (gateway/telemetry.rs).
    counter(
        "aibos_gateway_calls_total",
        &["canon", "route", "outcome"],
        "Gateway calls, by canon, route and outcome (ok, cell_error, unavailable, timeout, circuit_open, unhealthy).",
    ),
    counter(
        "aibos_gateway_retries_total",
        &["canon"],
        "Gateway retries after connection errors, by canon.",
    ),
    histogram(
        "aibos_gateway_upstream_duration_seconds",
        SECONDS,
        &["canon", "route"],
        "Time from sending a gateway call to the cell's response headers, by canon and route.",
    ),
    gauge(
        "aibos_gateway_circuit_state",
        &["canon"],
        "Circuit breaker per canon: 0 closed, 1 half-open, 2 open.",
    ),
    gauge(
        "aibos_gateway_canon_healthy",
        &["canon"],
        "Active health check per canon: 1 healthy, 0 unhealthy, -1 unknown.",
    ),
    // Rate limits (ratelimit/).
    counter(
        "aibos_rate_limited_total",
        &["scope"],
        "Requests refused with 429 by a rate limit, by the refusing policy's scope (user, tenant, address, route).",
    ),
    counter(
        "aibos_ratelimit_fallback_decisions_total",
        &[],
        "Rate-limit decisions made in process because Redis was unreachable or slow.",
    ),
    counter(
        "aibos_ratelimit_backend_transitions_total",
        &["to"],
        "Changes of the Redis rate-limit backend, by new state (degraded, restored).",
    ),
    histogram(
        "aibos_ratelimit_redis_duration_seconds",
        SECONDS,
        &[],
        "One rate-limit decision on Redis (one script call).",
    ),
    gauge(
        "aibos_ratelimit_backend_degraded",
        &[],
        "1 while rate limits fall back to per-instance budgets, else 0.",
    ),
    // Idempotency (idempotency/).
    counter(
        "aibos_idempotency_executions_total",
        &[],
        "Requests with an Idempotency-Key executed (the key taken and the request run once).",
    ),
    counter(
        "aibos_idempotency_replays_total",
        &[],
        "Requests answered with a stored response (Idempotent-Replayed: true).",
    ),
    counter(
        "aibos_idempotency_in_flight_conflicts_total",
        &[],
        "Requests refused with 409 because their key was still executing.",
    ),
    counter(
        "aibos_idempotency_mismatches_total",
        &[],
        "Requests refused with 422 because their key was used with another request.",
    ),
    counter(
        "aibos_idempotency_released_total",
        &["reason"],
        "Keys released without storing an answer, by reason (server_error, transport, …).",
    ),
    counter(
        "aibos_idempotency_oversized_passthroughs_total",
        &[],
        "Answers too large to store, passed through without being kept.",
    ),
    counter(
        "aibos_idempotency_purged_total",
        &[],
        "Expired idempotency records deleted.",
    ),
    // Events (events/).
    counter(
        "aibos_events_published_total",
        &[],
        "Events committed by the publisher.",
    ),
    histogram(
        "aibos_event_publish_batch_size",
        None,
        &[],
        "Events committed together in one group commit of the publisher.",
    ),
    counter(
        "aibos_events_purged_total",
        &[],
        "Events deleted by the retention purge.",
    ),
    counter(
        "aibos_events_relayed_total",
        &[],
        "Events relayed to NATS JetStream and acknowledged.",
    ),
    counter(
        "aibos_events_relay_duplicates_total",
        &[],
        "Relayed events JetStream reported as duplicates (sent again after a failure or restart).",
    ),
    gauge(
        "aibos_events_relay_lag_events",
        &[],
        "Events committed but not yet relayed to JetStream, over all tenants.",
    ),
    // Webhooks (events/webhook/).
    counter(
        "aibos_webhook_attempts_total",
        &["outcome"],
        "Webhook delivery attempts, by outcome (delivered, rejected, timeout, connection_failed, refused_address).",
    ),
    counter(
        "aibos_webhook_dead_letters_total",
        &[],
        "Webhook deliveries dead-lettered after the last attempt of the schedule.",
    ),
    counter(
        "aibos_webhook_subscriptions_disabled_total",
        &[],
        "Webhook subscriptions disabled after failing for events.webhook_disable_after_hours.",
    ),
    counter(
        "aibos_webhook_deliveries_purged_total",
        &[],
        "Finished webhook deliveries deleted by the retention purge.",
    ),
    histogram(
        "aibos_webhook_attempt_duration_seconds",
        SECONDS,
        &[],
        "Webhook delivery attempts, from sending to the end of the (bounded) answer.",
    ),
    histogram(
        "aibos_webhook_delivery_lag_seconds",
        SECONDS,
        &[],
        "Time from an event's publication to its delivery to a webhook receiver.",
    ),
    gauge(
        "aibos_webhook_outbox_events",
        &[],
        "Events some enabled subscription has not taken yet (the webhook outbox's depth).",
    ),
    // The periodic audit verification (audit/verify.rs).
    counter(
        "aibos_audit_verify_runs_total",
        &["outcome"],
        "Runs of the periodic audit verification, by outcome: intact (every entry checked so far verified), broken (a chain did not verify), error (the database could not be read).",
    ),
    counter(
        "aibos_audit_verified_entries_total",
        &[],
        "Audit entries recomputed by the periodic verification.",
    ),
    gauge(
        "aibos_audit_entries",
        &[],
        "Entries in the audit trail, all tenants (the sum of every chain's head), read from the database with each database probe (every 5 s).",
    ),
    gauge(
        "aibos_audit_chains_broken",
        &[],
        "Audit chains (tenants) whose last verification found a break; 0 when every chain verified.",
    ),
    seconds_gauge(
        "aibos_audit_verify_last_success_timestamp_seconds",
        "Unix time at which the periodic verification last completed a pass over every audit chain with none broken; absent until the first pass completes.",
    ),
    // Scheduled backups (backup/schedule.rs; SPEC §10).
    seconds_gauge(
        "aibos_backup_last_success_timestamp_seconds",
        "Unix time of the last successful scheduled backup; absent until this kernel has taken one.",
    ),
    counter(
        "aibos_backup_runs_total",
        &["outcome"],
        "Scheduled backups, by outcome (ok, failed).",
    ),
    seconds_gauge(
        "aibos_backup_last_duration_seconds",
        "How long the last scheduled backup took, successful or not; absent until this kernel has run one.",
    ),
];

/// The catalogue's entry for `name`, if any.
pub fn find(name: &str) -> Option<&'static MetricSpec> {
    CATALOGUE.iter().find(|m| m.name == name)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    use super::*;

    /// `aibos_` names in the sources that are not metrics: the PostgreSQL
    /// notification channels and the recorder's target.
    const NOT_METRICS: &[&str] = &["aibos_authz", "aibos_events", "aibos_kernel"];

    fn repository_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// Every `"aibos_…"` string literal of a source text.
    fn quoted_names(text: &str) -> Vec<String> {
        text.split('"')
            .skip(1)
            .step_by(2)
            .filter(|s| {
                s.starts_with("aibos_")
                    && s.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            })
            .map(str::to_owned)
            .collect()
    }

    /// The `aibos_…` literals of the kernel's and the binary's sources, this
    /// file excepted, by file.
    fn names_in_sources() -> Vec<(String, PathBuf)> {
        let root = repository_root();
        let mut files = Vec::new();
        rust_files(&root.join("crates/aibos-kernel/src"), &mut files);
        rust_files(&root.join("crates/aibos/src"), &mut files);
        let this = Path::new(file!()).file_name().unwrap();
        let mut names = Vec::new();
        for file in files {
            if file.file_name() == Some(this) {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            names.extend(quoted_names(&text).into_iter().map(|n| (n, file.clone())));
        }
        names
    }

    #[test]
    fn names_are_unique_well_formed_and_counters_end_in_total() {
        let mut seen = BTreeSet::new();
        for m in CATALOGUE {
            assert!(seen.insert(m.name), "{} is listed twice", m.name);
            assert!(m.name.starts_with("aibos_"), "{}", m.name);
            assert!(
                m.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                m.name
            );
            assert_eq!(
                m.kind == MetricKind::Counter,
                m.name.ends_with("_total"),
                "{}: counters, and only counters, end in _total",
                m.name
            );
            if m.unit == Some(Unit::Seconds) {
                assert!(
                    m.name.ends_with("_seconds"),
                    "{}: the unit comes last",
                    m.name
                );
            }
            assert!(!m.help.is_empty(), "{} has help", m.name);
        }
    }

    #[test]
    fn every_metric_name_in_the_sources_is_catalogued() {
        let names = names_in_sources();
        assert!(
            names.len() >= 30,
            "the scan lost its way: {} names",
            names.len()
        );
        let missing: Vec<String> = names
            .iter()
            .filter(|(n, _)| !NOT_METRICS.contains(&n.as_str()) && find(n).is_none())
            .map(|(n, file)| format!("{n} ({})", file.display()))
            .collect();
        assert!(
            missing.is_empty(),
            "metrics recorded but not in telemetry/catalogue.rs: {missing:?}"
        );
        for name in NOT_METRICS {
            assert!(find(name).is_none(), "{name} is not a metric");
        }
    }

    #[test]
    fn every_catalogued_metric_is_recorded_somewhere() {
        let recorded: BTreeSet<String> = names_in_sources().into_iter().map(|(n, _)| n).collect();
        for m in CATALOGUE {
            assert!(
                recorded.contains(m.name),
                "{} is catalogued but no source records it",
                m.name
            );
        }
    }

    #[test]
    fn quoted_names_finds_literals_only() {
        assert_eq!(
            quoted_names(
                r#"m.counter("aibos_x_total", &[]); let s = "aibos"; "aibos_Bad"; "aibos_y""#
            ),
            ["aibos_x_total", "aibos_y"]
        );
    }

    // --- deploy/: the dashboard and the rules query only exported metrics ---

    /// PromQL words that are not metric names: the binary and grouping
    /// keywords, and the aggregation operators (`sum by (x) (…)` is no call).
    const PROMQL_KEYWORDS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
    ];

    /// The metric names a PromQL expression selects: identifiers that are not
    /// functions (followed by `(`), keywords, label names (inside `{…}` or the
    /// parentheses of `by`, `on`, …), durations or Grafana variables.
    fn metric_names(expr: &str) -> Vec<String> {
        let chars: Vec<char> = expr.chars().collect();
        let mut names = Vec::new();
        let mut i = 0;
        // Whether the parentheses about to open hold label names (after by, on, …).
        let mut label_list_next = false;
        let mut in_label_list = false;
        while i < chars.len() {
            let c = chars[i];
            match c {
                '"' | '\'' | '`' => {
                    // A string: skip to its closing quote.
                    i += 1;
                    while i < chars.len() && chars[i] != c {
                        if chars[i] == '\\' {
                            i += 1;
                        }
                        i += 1;
                    }
                    i += 1;
                }
                '{' => {
                    // Label matchers: skip to the closing brace (strings inside skipped too).
                    i += 1;
                    while i < chars.len() && chars[i] != '}' {
                        if chars[i] == '"' {
                            i += 1;
                            while i < chars.len() && chars[i] != '"' {
                                if chars[i] == '\\' {
                                    i += 1;
                                }
                                i += 1;
                            }
                        }
                        i += 1;
                    }
                    i += 1;
                }
                '[' => {
                    while i < chars.len() && chars[i] != ']' {
                        i += 1;
                    }
                    i += 1;
                }
                '$' => {
                    // A Grafana variable: `$name`, `${name}` or `$__rate_interval`.
                    i += 1;
                    if i < chars.len() && chars[i] == '{' {
                        while i < chars.len() && chars[i] != '}' {
                            i += 1;
                        }
                        i += 1;
                    } else {
                        while i < chars.len()
                            && (chars[i].is_ascii_alphanumeric() || chars[i] == '_')
                        {
                            i += 1;
                        }
                    }
                }
                '(' => {
                    in_label_list = label_list_next;
                    label_list_next = false;
                    i += 1;
                }
                ')' => {
                    in_label_list = false;
                    i += 1;
                }
                c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                    let start = i;
                    while i < chars.len()
                        && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                    {
                        i += 1;
                    }
                    let word: String = chars[start..i].iter().collect();
                    let mut next = i;
                    while next < chars.len() && chars[next].is_whitespace() {
                        next += 1;
                    }
                    let is_call = next < chars.len() && chars[next] == '(';
                    let keyword = PROMQL_KEYWORDS.contains(&word.to_ascii_lowercase().as_str());
                    if [
                        "by",
                        "without",
                        "on",
                        "ignoring",
                        "group_left",
                        "group_right",
                    ]
                    .contains(&word.as_str())
                    {
                        label_list_next = true;
                    } else if !is_call && !keyword && !in_label_list {
                        names.push(word);
                    }
                }
                c if c.is_ascii_digit() || c == '.' => {
                    // A number or a duration (5m, 1h30m, 1e3).
                    while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                        i += 1;
                    }
                }
                _ => i += 1,
            }
        }
        names
    }

    /// A metric name as exported: a histogram's series without their suffix.
    fn base_name(name: &str) -> &str {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && find(base).is_some_and(|m| m.kind == MetricKind::Histogram)
            {
                return base;
            }
        }
        name
    }

    /// The `expr` of every panel target of the dashboard (at any depth: rows
    /// nest panels).
    fn panel_expressions(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                        ("templating", _) => {}
                        _ => panel_expressions(value, out),
                    }
                }
            }
            serde_json::Value::Array(items) => {
                for item in items {
                    panel_expressions(item, out);
                }
            }
            _ => {}
        }
    }

    /// The PromQL of the dashboard's query variables: for
    /// `label_values(selector, label)` the selector, which names a metric
    /// (the label does not).
    fn variable_expressions(dashboard: &serde_json::Value) -> Vec<String> {
        let variables = dashboard["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        variables
            .iter()
            .filter(|v| v["type"] == "query")
            .filter_map(|v| v["query"]["query"].as_str().or_else(|| v["query"].as_str()))
            .map(|query| match query.strip_prefix("label_values(") {
                Some(args) => args
                    .rsplit_once(',')
                    .map_or(args, |(selector, _)| selector)
                    .to_owned(),
                None => query.to_owned(),
            })
            .collect()
    }

    /// The `expr` of every rule of a Prometheus rule file: on one line, or a
    /// block scalar (`expr: |` / `>-`) over the more-indented lines after it.
    fn rule_expressions(yaml: &str) -> Vec<String> {
        let lines: Vec<&str> = yaml.lines().collect();
        let mut exprs = Vec::new();
        let mut i = 0;
        while i < lines.len() {
            let line = lines[i];
            let trimmed = line.trim_start();
            let Some(value) = trimmed
                .strip_prefix("expr:")
                .or_else(|| trimmed.strip_prefix("- expr:"))
            else {
                i += 1;
                continue;
            };
            let indent = line.len() - trimmed.len();
            let value = value.trim();
            if value.starts_with('|') || value.starts_with('>') {
                let mut body = Vec::new();
                i += 1;
                while i < lines.len()
                    && (lines[i].trim().is_empty()
                        || lines[i].len() - lines[i].trim_start().len() > indent)
                {
                    body.push(lines[i].trim());
                    i += 1;
                }
                exprs.push(body.join(" "));
            } else {
                exprs.push(value.trim_matches(['\'', '"']).to_owned());
                i += 1;
            }
        }
        exprs
    }

    fn unknown_metrics(exprs: &[String]) -> Vec<String> {
        let mut unknown = BTreeSet::new();
        for expr in exprs {
            for name in metric_names(expr) {
                if name != "up" && find(base_name(&name)).is_none() {
                    unknown.insert(format!("{name} (in {expr})"));
                }
            }
        }
        unknown.into_iter().collect()
    }

    #[test]
    fn metric_names_are_read_out_of_promql() {
        let check = |expr: &str, expected: &[&str]| {
            assert_eq!(metric_names(expr), expected, "{expr}");
        };
        check("up{job=\"aibos\"} == 0", &["up"]);
        check(
            "sum by (instance) (rate(aibos_http_requests_total{status=~\"5..\"}[5m])) / sum by (instance) (rate(aibos_http_requests_total[5m])) > 0.05",
            &["aibos_http_requests_total", "aibos_http_requests_total"],
        );
        check(
            "histogram_quantile(0.99, sum by (le) (rate(aibos_http_request_duration_seconds_bucket{instance=~\"$instance\"}[$__rate_interval])))",
            &["aibos_http_request_duration_seconds_bucket"],
        );
        check(
            "time() - aibos_backup_last_success_timestamp_seconds > 26 * 3600",
            &["aibos_backup_last_success_timestamp_seconds"],
        );
        check(
            "max_over_time(aibos_gateway_circuit_state[2m]) == 2 and on (canon) nope_total offset 5m",
            &["aibos_gateway_circuit_state", "nope_total"],
        );
        assert_eq!(
            unknown_metrics(&["rate(http_requests_total[5m]) + aibos_database_up".into()]),
            ["http_requests_total (in rate(http_requests_total[5m]) + aibos_database_up)"]
        );
        assert!(unknown_metrics(&["aibos_http_request_duration_seconds_count".into()]).is_empty());
        assert_eq!(
            unknown_metrics(&["aibos_database_up_count".into()]).len(),
            1,
            "only histograms have _count series"
        );
    }

    #[test]
    fn rule_expressions_are_read_out_of_yaml() {
        let yaml = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up == 0\n        for: 1m\n      - alert: B\n        expr: |\n          sum(rate(x_total[5m]))\n            > 1\n        labels:\n          severity: warning\n      - record: r\n        expr: >-\n          y\n";
        assert_eq!(
            rule_expressions(yaml),
            ["up == 0", "sum(rate(x_total[5m])) > 1", "y"]
        );
    }

    #[test]
    fn the_dashboard_and_the_alert_rules_query_only_exported_metrics() {
        let root = repository_root();
        let dashboard: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("deploy/grafana/aibos-dashboard.json")).unwrap(),
        )
        .expect("the dashboard is JSON");
        let mut panel_exprs = Vec::new();
        panel_expressions(&dashboard, &mut panel_exprs);
        assert!(panel_exprs.len() >= 10, "{panel_exprs:?}");
        let variable_exprs = variable_expressions(&dashboard);
        assert!(!variable_exprs.is_empty(), "the instance variable");
        let rules = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap();
        let rule_exprs = rule_expressions(&rules);
        assert!(rule_exprs.len() >= 7, "{rule_exprs:?}");
        let all: Vec<String> = panel_exprs
            .into_iter()
            .chain(variable_exprs)
            .chain(rule_exprs)
            .collect();
        let unknown = unknown_metrics(&all);
        assert!(
            unknown.is_empty(),
            "deploy/ queries metrics the kernel does not export: {unknown:#?}"
        );
    }
}
