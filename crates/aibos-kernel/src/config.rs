//! Configuration: layered loading, whole-document validation, redacted display.
//!
//! Start-up and SIGHUP reload both call [`Config::load`]: the same layers, the
//! same validation, the same typed result. Nothing here reads the process
//! environment; the binary captures it once into [`ConfigSources`] so tests can
//! build many kernels with different settings in one process.
//!
//! Layers, each overriding the one before:
//! 1. `config/aibos.default.toml`, embedded in the binary (it documents every key);
//! 2. `aibos.toml` in the working directory, or the file given by `--config`;
//! 3. `config/environments/<AIBOS_ENV>.toml` when `AIBOS_ENV` is set;
//! 4. the secrets file: `AIBOS_SECRETS_FILE`, else `config/secrets.toml` when present;
//! 5. environment variables `AIBOS_<SECTION>__<KEY>`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize, Serializer};

use crate::limits;

/// The embedded defaults: the first layer and the reference for every key.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../../config/aibos.default.toml");

/// Prefix of configuration environment variables (`AIBOS_SERVER__BIND`).
const ENV_PREFIX: &str = "AIBOS_";
/// Separator between section and key in an environment variable name.
const ENV_SEPARATOR: &str = "__";

/// Everything [`Config::load`] reads, captured once so loading is a pure function.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// `--config FILE`; when `None`, `aibos.toml` in `base_dir` is used if it exists.
    pub config_file: Option<PathBuf>,
    /// Directory that relative paths (`aibos.toml`, `config/…`) are resolved against.
    pub base_dir: PathBuf,
    /// The process environment (only `AIBOS_*` variables are looked at).
    pub env: BTreeMap<String, String>,
}

impl ConfigSources {
    /// Sources from an explicit environment, resolved against `base_dir`.
    pub fn new(
        base_dir: impl Into<PathBuf>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> ConfigSources {
        ConfigSources {
            config_file: None,
            base_dir: base_dir.into(),
            env: env.into_iter().collect(),
        }
    }

    /// Uses `file` instead of `aibos.toml`.
    pub fn with_config_file(mut self, file: Option<PathBuf>) -> ConfigSources {
        self.config_file = file;
        self
    }

    fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base_dir.join(path)
        }
    }
}

/// One thing wrong with a configuration, naming the key that has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigProblem {
    /// Dotted key, e.g. `server.bind`.
    pub key: String,
    /// What is wrong, and what would be right.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Every problem found; the process exits with code 78 (EX_CONFIG).
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigProblem>),
}

impl ConfigError {
    /// The problems, for display or JSON output.
    pub fn problems(&self) -> &[ConfigProblem] {
        match self {
            ConfigError::Invalid(problems) => problems,
        }
    }
}

/// A secret value: never printed, never serialised in clear.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[REDACTED]")
    }
}

/// The storage engine a database URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Embedded SQLite, the zero-set-up default.
    Sqlite,
    /// PostgreSQL, for several instances and larger loads.
    Postgres,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
        })
    }
}

/// A database URL; its password is redacted whenever it is displayed.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    url: String,
    engine: Engine,
}

impl DatabaseUrl {
    /// Parses a `sqlite:` or `postgres:`/`postgresql:` URL.
    pub fn parse(url: &str) -> Result<DatabaseUrl, String> {
        let engine = if url.starts_with("sqlite:") {
            Engine::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Engine::Postgres
        } else {
            return Err("must start with sqlite:// or postgres://".to_owned());
        };
        if engine == Engine::Sqlite
            && url
                .trim_start_matches("sqlite:")
                .trim_start_matches("//")
                .is_empty()
        {
            return Err("names no database file".to_owned());
        }
        Ok(DatabaseUrl {
            url: url.to_owned(),
            engine,
        })
    }

    /// The engine this URL selects.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The URL in clear, for the driver only.
    pub fn expose(&self) -> &str {
        &self.url
    }

    /// The URL with any password replaced by `[REDACTED]`.
    pub fn redacted(&self) -> String {
        redact_url_password(&self.url)
    }
}

fn redact_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => {
            format!(
                "{}{}:[REDACTED]{}",
                &url[..scheme_end + 3],
                &authority[..colon],
                &rest[at..]
            )
        }
        _ => url.to_owned(),
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for DatabaseUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
    /// Text on a terminal, JSON otherwise.
    Auto,
}

/// Signing algorithm of access tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    /// Ed25519 with a key pair kept by the kernel (default).
    EdDSA,
    /// HMAC-SHA256 with `auth.jwt_secret`.
    HS256,
}

/// The validated configuration. Every field has passed [`Config::load`]'s checks.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// `[server]`
    pub server: ServerConfig,
    /// `[database]`
    pub database: DatabaseConfig,
    /// `[auth]`
    pub auth: AuthConfig,
    /// `[http]`
    pub http: HttpConfig,
    /// `[rate_limit]`
    pub rate_limit: RateLimitConfig,
    /// `[idempotency]`
    pub idempotency: IdempotencyConfig,
    /// `[gateway]`
    pub gateway: GatewayConfig,
    /// `[events]`
    pub events: EventsConfig,
    /// `[audit]`
    pub audit: AuditConfig,
    /// `[metrics]`
    pub metrics: MetricsConfig,
    /// `[backup]`
    pub backup: BackupConfig,
    /// `[log]`
    pub log: LogConfig,
}

/// `[backup]`: where backups go, and the schedule `serve` keeps.
#[derive(Debug, Clone, Serialize)]
pub struct BackupConfig {
    /// The backups' folder.
    pub dir: std::path::PathBuf,
    /// Seconds between scheduled backups; 0 for none.
    pub interval_seconds: u64,
    /// Keep the N newest after a scheduled backup; 0 for no count rule.
    pub keep_last: u64,
    /// Keep those younger than D days; 0 for no age rule.
    pub keep_days: u64,
}

/// `[audit]`
#[derive(Debug, Clone, Serialize)]
pub struct AuditConfig {
    /// Lowercase words whose values are redacted from audit details and logs.
    pub redact_keys: Vec<String>,
    /// Seconds between runs of the periodic verification of the audit chains
    /// (`audit/verify.rs`); 0 turns it off.
    pub verify_interval_seconds: u64,
    /// Entries one run recomputes at most; a pass over larger chains spans runs.
    pub verify_entries_per_run: u64,
}

/// `[metrics]`: where `GET /metrics` is served.
#[derive(Debug, Clone, Serialize)]
pub struct MetricsConfig {
    /// A listener of its own for `/metrics` (and only there); `None`: on `server.bind`.
    pub bind: Option<SocketAddr>,
}

/// `[server]`: the listening socket and its lifecycle.
#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    /// Address the HTTP API listens on.
    pub bind: SocketAddr,
    /// Time in-flight requests get to finish after SIGTERM/SIGINT.
    pub shutdown_grace_seconds: u64,
    /// Browser origins allowed by CORS.
    pub cors_allowed_origins: Vec<String>,
    /// HTTP event loops; 0 means one per core.
    pub event_loops: u64,
    /// Proxies whose `X-Forwarded-For` is believed (SPEC §4, **Client address**).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Time a new connection has to send its first request's head.
    pub header_read_timeout_seconds: u64,
    /// Time an HTTP/1.1 connection may sit with no request in flight, and the
    /// most the head of each later request may take.
    pub keep_alive_idle_seconds: u64,
    /// Connections from one client address (IPv6: its /64) still waiting for
    /// their first request's head; more are closed at accept.
    pub max_pending_connections_per_address: u64,
}

impl ServerConfig {
    /// How many HTTP event loops to run: `event_loops`, or one per core when 0,
    /// within [`limits::HTTP_EVENT_LOOPS_MAX`].
    pub fn event_loop_count(&self) -> usize {
        let wanted = match usize::try_from(self.event_loops) {
            Ok(0) | Err(_) => std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1),
            Ok(n) => n,
        };
        wanted.clamp(1, limits::HTTP_EVENT_LOOPS_MAX)
    }
}

/// `[database]`: the engine and its pool.
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseConfig {
    /// Which database, and so which engine.
    pub url: DatabaseUrl,
    /// Upper bound of pooled connections.
    pub max_connections: u32,
    /// Connections kept open while idle.
    pub min_connections: u32,
    /// Wait for a free connection before failing.
    pub acquire_timeout_ms: u64,
    /// PostgreSQL `statement_timeout`.
    pub statement_timeout_ms: u64,
    /// SQLite `busy_timeout`.
    pub busy_timeout_ms: u64,
}

/// `[auth]`: bootstrap and tokens.
#[derive(Debug, Clone, Serialize)]
pub struct AuthConfig {
    /// Enables `POST /api/kernel/bootstrap` when set.
    pub bootstrap_key: Option<Secret>,
    /// Access-token signature algorithm.
    pub jwt_algorithm: JwtAlgorithm,
    /// HS256 secret (required when `jwt_algorithm = "HS256"`).
    pub jwt_secret: Option<Secret>,
    /// Access-token lifetime.
    pub access_token_ttl_seconds: u64,
    /// The master key that seals stored secrets (base64 or hex of 32 bytes);
    /// wins over `master_key_file`.
    pub master_key: Option<Secret>,
    /// The file holding the master key; unset: `master.key` beside the SQLite
    /// database, or `data/master.key` in the working directory for PostgreSQL
    /// (see `secrets::source`). Generated there on first start when missing.
    pub master_key_file: Option<PathBuf>,
    /// During a rotation: the old master key, which opens values but never seals.
    pub previous_master_key: Option<Secret>,
}

/// `[http]`: request handling limits.
#[derive(Debug, Clone, Serialize)]
pub struct HttpConfig {
    /// Largest accepted request body.
    pub max_body_bytes: u64,
    /// Updates of versioned resources must carry `If-Match` (else 428).
    pub require_if_match: bool,
}

/// `[rate_limit]`: GCRA budgets.
#[derive(Debug, Clone, Serialize)]
pub struct RateLimitConfig {
    /// Per authenticated user.
    pub user_per_minute: u32,
    /// Burst above the user's steady rate.
    pub user_burst: u32,
    /// Per tenant.
    pub tenant_per_minute: u32,
    /// Per client address, unauthenticated endpoints.
    pub address_per_minute: u32,
    /// Shared budget store; in-process when unset.
    pub redis_url: Option<Secret>,
    // Rate limits (ratelimit/): the bursts of the tenant and address policies,
    // the instances sharing a Redis budget, and Redis's per-decision deadline.
    /// Burst above the tenant's steady rate.
    pub tenant_burst: u32,
    /// Burst above an address's steady rate.
    pub address_burst: u32,
    /// Kernel instances sharing the budget: each takes this share of it while Redis is unreachable.
    pub instances: u32,
    /// How long one decision may wait for Redis before it is made in process.
    pub redis_timeout_ms: u64,
    /// Prefix of the Redis keys, so deployments (and tests) sharing a Redis do not collide.
    pub redis_prefix: String,
}

/// `[idempotency]`
#[derive(Debug, Clone, Serialize)]
pub struct IdempotencyConfig {
    /// Retention of stored responses.
    pub ttl_seconds: u64,
    /// How long an in-flight key stays locked when its kernel dies; a gateway
    /// call whose upstream timeout is longer locks its key that much longer.
    pub lock_timeout_seconds: u64,
}

/// `[gateway]`
#[derive(Debug, Clone, Serialize)]
pub struct GatewayConfig {
    /// Interval between active health checks.
    pub health_interval_seconds: u64,
    /// How long a health check may take before it counts as failed.
    pub health_timeout_ms: u64,
    /// Upstream timeout when neither the route nor the canon sets one.
    pub default_timeout_ms: u64,
    /// How long opening a connection to a cell may take.
    pub connect_timeout_ms: u64,
    /// Consecutive failures that open a canon's circuit.
    pub breaker_consecutive_failures: u32,
    /// Failure share (percent) over the last `breaker_window_calls` that opens it.
    pub breaker_failure_rate_percent: u32,
    /// Calls in the breaker's sliding window.
    pub breaker_window_calls: u32,
    /// How long an open circuit refuses calls before one trial call.
    pub breaker_open_seconds: u64,
    /// Retries of a safe request after a connection error.
    pub retry_max: u32,
    /// Base of the full-jitter exponential backoff between retries.
    pub retry_backoff_base_ms: u64,
    /// Cap of one backoff.
    pub retry_backoff_max_ms: u64,
    /// Retries allowed per canon as a percentage of its calls (the retry budget).
    pub retry_budget_percent: u32,
    /// Idle keep-alive connections kept per cell and event loop.
    pub pool_max_idle_per_host: u32,
    /// How long an idle upstream connection is kept.
    pub pool_idle_timeout_seconds: u64,
}

/// `[events]`
#[derive(Debug, Clone, Serialize)]
pub struct EventsConfig {
    /// JetStream relay target; none when unset.
    pub nats_url: Option<Secret>,
    /// Events older than this many days are purged, except those still owed
    /// to a subscriber or the relay.
    pub retention_days: u64,
    /// The JetStream stream the relay creates when none captures `aibos.>`.
    pub nats_stream: String,
    /// `events.webhook_*`: webhook delivery.
    #[serde(flatten)]
    pub webhook: crate::events::webhook::config::WebhookConfig,
}

/// `[log]`
#[derive(Debug, Clone, Serialize)]
pub struct LogConfig {
    /// A tracing filter directive.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

// The raw document as deserialised from the layers: numbers are signed and
// addresses are text so that a wrong value is a listed problem, not a serde
// error that hides every other one.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    database: RawDatabase,
    auth: RawAuth,
    http: RawHttp,
    rate_limit: RawRateLimit,
    idempotency: RawIdempotency,
    gateway: RawGateway,
    events: RawEvents,
    audit: RawAudit,
    metrics: RawMetrics,
    backup: RawBackup,
    log: RawLog,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackup {
    dir: String,
    interval_seconds: i64,
    keep_last: i64,
    keep_days: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    redact_keys: Vec<String>,
    verify_interval_seconds: i64,
    verify_entries_per_run: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    bind: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    bind: String,
    shutdown_grace_seconds: i64,
    cors_allowed_origins: Vec<String>,
    event_loops: i64,
    trusted_proxies: Vec<String>,
    header_read_timeout_seconds: i64,
    keep_alive_idle_seconds: i64,
    max_pending_connections_per_address: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: String,
    max_connections: i64,
    min_connections: i64,
    acquire_timeout_ms: i64,
    statement_timeout_ms: i64,
    busy_timeout_ms: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    bootstrap_key: Option<Secret>,
    jwt_algorithm: String,
    jwt_secret: Option<Secret>,
    access_token_ttl_seconds: i64,
    master_key: Option<Secret>,
    master_key_file: Option<String>,
    previous_master_key: Option<Secret>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    max_body_bytes: i64,
    require_if_match: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    user_per_minute: i64,
    user_burst: i64,
    tenant_per_minute: i64,
    address_per_minute: i64,
    redis_url: Option<Secret>,
    tenant_burst: i64,
    address_burst: i64,
    instances: i64,
    redis_timeout_ms: i64,
    redis_prefix: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdempotency {
    ttl_seconds: i64,
    lock_timeout_seconds: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    health_interval_seconds: i64,
    health_timeout_ms: i64,
    default_timeout_ms: i64,
    connect_timeout_ms: i64,
    breaker_consecutive_failures: i64,
    breaker_failure_rate_percent: i64,
    breaker_window_calls: i64,
    breaker_open_seconds: i64,
    retry_max: i64,
    retry_backoff_base_ms: i64,
    retry_backoff_max_ms: i64,
    retry_budget_percent: i64,
    pool_max_idle_per_host: i64,
    pool_idle_timeout_seconds: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvents {
    nats_url: Option<Secret>,
    retention_days: i64,
    nats_stream: String,
    webhook_retry_schedule_seconds: crate::events::webhook::config::RawSchedule,
    webhook_secret_grace_seconds: i64,
    webhook_disable_after_hours: f64,
    webhook_allow_private_networks: bool,
    webhook_timeout_seconds: i64,
    webhook_max_concurrent_deliveries: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: String,
    format: String,
}

impl Config {
    /// Loads every layer, then validates the whole document; every problem is listed.
    pub fn load(sources: &ConfigSources) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let figment = layers(sources, &mut problems);
        let raw: RawConfig = match figment.extract() {
            Ok(raw) => raw,
            Err(errors) => {
                problems.extend(errors.into_iter().map(|e| ConfigProblem {
                    key: if e.path.is_empty() {
                        "(document)".to_owned()
                    } else {
                        e.path.join(".")
                    },
                    message: describe_figment_error(&e),
                }));
                return Err(ConfigError::Invalid(problems));
            }
        };
        let config = validate(raw, &mut problems);
        match config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => {
                // validate() yields no config only after recording why.
                assert!(
                    !problems.is_empty(),
                    "configuration refused without a problem"
                );
                Err(ConfigError::Invalid(problems))
            }
        }
    }

    /// The defaults alone (the embedded file), for tests and tooling.
    pub fn defaults() -> Config {
        Config::load(&ConfigSources::default())
            .expect("the embedded default configuration is valid")
    }

    /// The effective configuration as TOML, secrets and database passwords redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }

    /// The shutdown grace period.
    pub fn shutdown_grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.server.shutdown_grace_seconds)
    }
}

fn layers(sources: &ConfigSources, problems: &mut Vec<ConfigProblem>) -> Figment {
    let mut figment = Figment::from(Toml::string(DEFAULT_CONFIG_TOML));

    match &sources.config_file {
        Some(file) => {
            let path = sources.resolve(file);
            if path.is_file() {
                figment = figment.merge(Toml::file_exact(path));
            } else {
                problems.push(ConfigProblem {
                    key: "--config".to_owned(),
                    message: format!("file {} does not exist", path.display()),
                });
            }
        }
        None => {
            let path = sources.resolve(Path::new("aibos.toml"));
            if path.is_file() {
                figment = figment.merge(Toml::file_exact(path));
            }
        }
    }

    if let Some(env_name) = sources.env.get("AIBOS_ENV").filter(|e| !e.is_empty()) {
        let valid_name = env_name.len() <= 64
            && env_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        let path =
            sources.resolve(&Path::new("config/environments").join(format!("{env_name}.toml")));
        if !valid_name {
            problems.push(ConfigProblem {
                key: "AIBOS_ENV".to_owned(),
                message: "must be letters, digits, '-' or '_' (at most 64)".to_owned(),
            });
        } else if path.is_file() {
            figment = figment.merge(Toml::file_exact(path));
        } else {
            problems.push(ConfigProblem {
                key: "AIBOS_ENV".to_owned(),
                message: format!("environment file {} does not exist", path.display()),
            });
        }
    }

    match sources
        .env
        .get("AIBOS_SECRETS_FILE")
        .filter(|f| !f.is_empty())
    {
        Some(file) => {
            let path = sources.resolve(Path::new(file));
            if path.is_file() {
                figment = figment.merge(Toml::file_exact(path));
            } else {
                problems.push(ConfigProblem {
                    key: "AIBOS_SECRETS_FILE".to_owned(),
                    message: format!("secrets file {} does not exist", path.display()),
                });
            }
        }
        None => {
            let path = sources.resolve(Path::new("config/secrets.toml"));
            if path.is_file() {
                figment = figment.merge(Toml::file_exact(path));
            }
        }
    }

    figment.merge(EnvLayer::new(&sources.env))
}

/// The environment-variable layer: `AIBOS_SECTION__KEY=value` → `section.key`.
///
/// Values are parsed (numbers, booleans, `[a, b]` arrays) only where the default
/// of that key is not text, so a secret made only of digits stays a string.
struct EnvLayer {
    dict: Dict,
}

impl EnvLayer {
    fn new(env: &BTreeMap<String, String>) -> EnvLayer {
        let defaults = Figment::from(Toml::string(DEFAULT_CONFIG_TOML));
        let mut dict = Dict::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            // Variables without a section separator (AIBOS_ENV, AIBOS_SECRETS_FILE,
            // AIBOS_TEST_DATABASE_URL, …) are not configuration keys.
            let Some((section, key)) = rest.split_once(ENV_SEPARATOR) else {
                continue;
            };
            let (section, key) = (
                section.to_ascii_lowercase(),
                key.to_ascii_lowercase().replace(ENV_SEPARATOR, "."),
            );
            let path = format!("{section}.{key}");
            let parsed = match defaults.find_value(&path) {
                Ok(Value::String(..)) | Err(_) => Value::from(value.clone()),
                Ok(_) => value
                    .parse::<Value>()
                    .unwrap_or_else(|never| match never {}),
            };
            let nested = figment::util::nest(&path, parsed);
            if let Value::Dict(_, entries) = nested {
                merge_dict(&mut dict, entries);
            }
        }
        EnvLayer { dict }
    }
}

fn merge_dict(into: &mut Dict, from: Dict) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Dict(_, existing)), Value::Dict(_, incoming)) => {
                merge_dict(existing, incoming)
            }
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable(s) AIBOS_<SECTION>__<KEY>")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

fn describe_figment_error(e: &figment::Error) -> String {
    let source = e.metadata.as_ref().map(|m| {
        let file = e
            .metadata
            .as_ref()
            .and_then(|m| m.source.as_ref())
            .map(|s| s.to_string());
        match file {
            Some(file) => format!(" (from {} {file})", m.name),
            None => format!(" (from {})", m.name),
        }
    });
    format!("{}{}", e.kind, source.unwrap_or_default())
}

fn validate(raw: RawConfig, problems: &mut Vec<ConfigProblem>) -> Option<Config> {
    let mut problem = |key: &str, message: String| {
        problems.push(ConfigProblem {
            key: key.to_owned(),
            message,
        })
    };

    let bind = match raw.server.bind.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            problem(
                "server.bind",
                format!(
                    "{:?} is not an address:port such as 127.0.0.1:3001",
                    truncate(&raw.server.bind)
                ),
            );
            None
        }
    };
    let shutdown_grace_seconds = in_range(
        &mut problem,
        "server.shutdown_grace_seconds",
        raw.server.shutdown_grace_seconds,
        0,
        limits::SHUTDOWN_GRACE_SECONDS_MAX,
    );
    let event_loops = in_range(
        &mut problem,
        "server.event_loops",
        raw.server.event_loops,
        0,
        limits::HTTP_EVENT_LOOPS_MAX as u64,
    );
    let header_read_timeout_seconds = in_range(
        &mut problem,
        "server.header_read_timeout_seconds",
        raw.server.header_read_timeout_seconds,
        limits::HEADER_READ_TIMEOUT_SECONDS_MIN,
        limits::HEADER_READ_TIMEOUT_SECONDS_MAX,
    );
    let keep_alive_idle_seconds = in_range(
        &mut problem,
        "server.keep_alive_idle_seconds",
        raw.server.keep_alive_idle_seconds,
        limits::KEEP_ALIVE_IDLE_SECONDS_MIN,
        limits::KEEP_ALIVE_IDLE_SECONDS_MAX,
    );
    let max_pending_connections_per_address = in_range(
        &mut problem,
        "server.max_pending_connections_per_address",
        raw.server.max_pending_connections_per_address,
        1,
        limits::PENDING_CONNECTIONS_PER_ADDRESS_MAX,
    );
    for origin in &raw.server.cors_allowed_origins {
        let ok = (origin.starts_with("http://") || origin.starts_with("https://"))
            && !origin.trim_end_matches('/').contains(['?', '#', ' '])
            && http::HeaderValue::from_str(origin).is_ok();
        if !ok {
            problem(
                "server.cors_allowed_origins",
                format!(
                    "{:?} is not an origin such as https://app.example.com",
                    truncate(origin)
                ),
            );
        }
    }

    if raw.server.trusted_proxies.len() > limits::TRUSTED_PROXIES_MAX {
        problem(
            "server.trusted_proxies",
            format!("at most {} ranges", limits::TRUSTED_PROXIES_MAX),
        );
    }
    let mut trusted_proxies = Vec::new();
    for range in &raw.server.trusted_proxies {
        // A bare address is a range of one.
        let parsed = range
            .parse::<ipnet::IpNet>()
            .or_else(|_| range.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match parsed {
            Ok(net) => trusted_proxies.push(net.trunc()),
            Err(_) => problem(
                "server.trusted_proxies",
                format!(
                    "{:?} is not an address or a CIDR range such as 10.0.0.0/8",
                    truncate(range)
                ),
            ),
        }
    }

    let url = match DatabaseUrl::parse(&raw.database.url) {
        Ok(url) => Some(url),
        Err(message) => {
            problem("database.url", message);
            None
        }
    };
    let max_connections = in_range(
        &mut problem,
        "database.max_connections",
        raw.database.max_connections,
        1,
        limits::DB_CONNECTIONS_MAX,
    );
    let min_connections = in_range(
        &mut problem,
        "database.min_connections",
        raw.database.min_connections,
        0,
        limits::DB_CONNECTIONS_MAX,
    );
    if let (Some(min), Some(max)) = (min_connections, max_connections)
        && min > max
    {
        problem(
            "database.min_connections",
            format!("{min} exceeds database.max_connections ({max})"),
        );
    }
    let acquire_timeout_ms = in_range(
        &mut problem,
        "database.acquire_timeout_ms",
        raw.database.acquire_timeout_ms,
        1,
        limits::DB_TIMEOUT_MS_MAX,
    );
    let statement_timeout_ms = in_range(
        &mut problem,
        "database.statement_timeout_ms",
        raw.database.statement_timeout_ms,
        1,
        limits::DB_TIMEOUT_MS_MAX,
    );
    let busy_timeout_ms = in_range(
        &mut problem,
        "database.busy_timeout_ms",
        raw.database.busy_timeout_ms,
        0,
        limits::DB_TIMEOUT_MS_MAX,
    );

    let jwt_algorithm = match raw.auth.jwt_algorithm.as_str() {
        "EdDSA" => Some(JwtAlgorithm::EdDSA),
        "HS256" => Some(JwtAlgorithm::HS256),
        other => {
            problem(
                "auth.jwt_algorithm",
                format!("{:?} is not one of EdDSA, HS256", truncate(other)),
            );
            None
        }
    };
    if jwt_algorithm == Some(JwtAlgorithm::HS256) {
        match &raw.auth.jwt_secret {
            None => problem(
                "auth.jwt_secret",
                "is required when auth.jwt_algorithm = \"HS256\"".to_owned(),
            ),
            Some(secret) if secret.expose().len() < limits::JWT_SECRET_BYTES_MIN => problem(
                "auth.jwt_secret",
                format!("must be at least {} bytes", limits::JWT_SECRET_BYTES_MIN),
            ),
            Some(_) => {}
        }
    }
    // Parsed here only to report a malformed key with the others; the key is
    // parsed again where it is used and never kept in the configuration in clear.
    for (name, key) in [
        ("auth.master_key", &raw.auth.master_key),
        ("auth.previous_master_key", &raw.auth.previous_master_key),
    ] {
        if let Some(key) = key
            && let Err(why) = crate::secrets::MasterKey::parse(key.expose())
        {
            problem(name, why);
        }
    }
    if raw.auth.master_key.is_some() && raw.auth.master_key_file.is_some() {
        problem(
            "auth.master_key_file",
            "set auth.master_key or auth.master_key_file, not both".to_owned(),
        );
    }
    if raw
        .auth
        .master_key_file
        .as_deref()
        .is_some_and(|f| f.trim().is_empty())
    {
        problem("auth.master_key_file", "must name a file".to_owned());
    }
    if let Some(key) = &raw.auth.bootstrap_key
        && key.expose().len() < limits::BOOTSTRAP_KEY_BYTES_MIN
    {
        problem(
            "auth.bootstrap_key",
            format!("must be at least {} bytes", limits::BOOTSTRAP_KEY_BYTES_MIN),
        );
    }
    let access_token_ttl_seconds = in_range(
        &mut problem,
        "auth.access_token_ttl_seconds",
        raw.auth.access_token_ttl_seconds,
        1,
        limits::ACCESS_TOKEN_TTL_SECONDS_MAX,
    );

    let max_body_bytes = in_range(
        &mut problem,
        "http.max_body_bytes",
        raw.http.max_body_bytes,
        1,
        limits::BODY_BYTES_MAX,
    );

    let user_per_minute = in_range(
        &mut problem,
        "rate_limit.user_per_minute",
        raw.rate_limit.user_per_minute,
        1,
        limits::RATE_PER_MINUTE_MAX,
    );
    let user_burst = in_range(
        &mut problem,
        "rate_limit.user_burst",
        raw.rate_limit.user_burst,
        1,
        limits::RATE_PER_MINUTE_MAX,
    );
    let tenant_per_minute = in_range(
        &mut problem,
        "rate_limit.tenant_per_minute",
        raw.rate_limit.tenant_per_minute,
        1,
        limits::RATE_PER_MINUTE_MAX,
    );
    let address_per_minute = in_range(
        &mut problem,
        "rate_limit.address_per_minute",
        raw.rate_limit.address_per_minute,
        1,
        limits::RATE_PER_MINUTE_MAX,
    );
    if let Some(url) = &raw.rate_limit.redis_url
        && !(url.expose().starts_with("redis://") || url.expose().starts_with("rediss://"))
    {
        problem(
            "rate_limit.redis_url",
            "must start with redis:// or rediss://".to_owned(),
        );
    }
    // The rate limiter's further keys (ratelimit/).
    let r = &raw.rate_limit;
    let mut rate_key = |key: &str, value: i64, max: u64| {
        in_range(&mut problem, &format!("rate_limit.{key}"), value, 1, max)
    };
    let tenant_burst = rate_key("tenant_burst", r.tenant_burst, limits::RATE_PER_MINUTE_MAX);
    let address_burst = rate_key(
        "address_burst",
        r.address_burst,
        limits::RATE_PER_MINUTE_MAX,
    );
    let rate_instances = rate_key("instances", r.instances, limits::RATE_LIMIT_INSTANCES_MAX);
    let redis_timeout_ms = rate_key(
        "redis_timeout_ms",
        r.redis_timeout_ms,
        limits::RATE_LIMIT_REDIS_TIMEOUT_MS_MAX,
    );
    let redis_prefix = crate::ratelimit::valid_prefix(&r.redis_prefix)
        .map_err(|why| problem("rate_limit.redis_prefix", why))
        .ok();

    let idempotency_ttl_seconds = in_range(
        &mut problem,
        "idempotency.ttl_seconds",
        raw.idempotency.ttl_seconds,
        1,
        limits::IDEMPOTENCY_TTL_SECONDS_MAX,
    );
    let idempotency_lock_timeout_seconds = in_range(
        &mut problem,
        "idempotency.lock_timeout_seconds",
        raw.idempotency.lock_timeout_seconds,
        1,
        limits::IDEMPOTENCY_LOCK_TIMEOUT_SECONDS_MAX,
    );
    let health_interval_seconds = in_range(
        &mut problem,
        "gateway.health_interval_seconds",
        raw.gateway.health_interval_seconds,
        1,
        limits::HEALTH_INTERVAL_SECONDS_MAX,
    );
    let webhook = crate::events::webhook::config::validate(
        crate::events::webhook::config::RawWebhook {
            webhook_retry_schedule_seconds: raw.events.webhook_retry_schedule_seconds,
            webhook_secret_grace_seconds: raw.events.webhook_secret_grace_seconds,
            webhook_disable_after_hours: raw.events.webhook_disable_after_hours,
            webhook_allow_private_networks: raw.events.webhook_allow_private_networks,
            webhook_timeout_seconds: raw.events.webhook_timeout_seconds,
            webhook_max_concurrent_deliveries: raw.events.webhook_max_concurrent_deliveries,
        },
        &mut problem,
    );
    let g = &raw.gateway;
    let mut gateway_key = |key: &str, value: i64, min: u64, max: u64| {
        in_range(&mut problem, &format!("gateway.{key}"), value, min, max)
    };
    let health_timeout_ms = gateway_key(
        "health_timeout_ms",
        g.health_timeout_ms,
        1,
        limits::UPSTREAM_TIMEOUT_MS_MAX,
    );
    let default_timeout_ms = gateway_key(
        "default_timeout_ms",
        g.default_timeout_ms,
        1,
        limits::UPSTREAM_TIMEOUT_MS_MAX,
    );
    let connect_timeout_ms = gateway_key(
        "connect_timeout_ms",
        g.connect_timeout_ms,
        1,
        limits::UPSTREAM_TIMEOUT_MS_MAX,
    );
    let breaker_consecutive_failures = gateway_key(
        "breaker_consecutive_failures",
        g.breaker_consecutive_failures,
        1,
        1_000,
    );
    let breaker_failure_rate_percent = gateway_key(
        "breaker_failure_rate_percent",
        g.breaker_failure_rate_percent,
        1,
        100,
    );
    let breaker_window_calls = gateway_key(
        "breaker_window_calls",
        g.breaker_window_calls,
        1,
        limits::BREAKER_WINDOW_MAX,
    );
    let breaker_open_seconds =
        gateway_key("breaker_open_seconds", g.breaker_open_seconds, 1, 3_600);
    let retry_max = gateway_key("retry_max", g.retry_max, 0, limits::GATEWAY_RETRIES_MAX);
    let retry_backoff_base_ms =
        gateway_key("retry_backoff_base_ms", g.retry_backoff_base_ms, 1, 60_000);
    let retry_backoff_max_ms =
        gateway_key("retry_backoff_max_ms", g.retry_backoff_max_ms, 1, 60_000);
    let retry_budget_percent = gateway_key("retry_budget_percent", g.retry_budget_percent, 0, 100);
    let pool_max_idle_per_host = gateway_key(
        "pool_max_idle_per_host",
        g.pool_max_idle_per_host,
        0,
        10_000,
    );
    let pool_idle_timeout_seconds = gateway_key(
        "pool_idle_timeout_seconds",
        g.pool_idle_timeout_seconds,
        1,
        3_600,
    );
    let event_retention_days = in_range(
        &mut problem,
        "events.retention_days",
        raw.events.retention_days,
        1,
        limits::EVENT_RETENTION_DAYS_MAX,
    );
    if let Some(url) = &raw.events.nats_url
        && !(url.expose().starts_with("nats://") || url.expose().starts_with("tls://"))
    {
        problem(
            "events.nats_url",
            "must start with nats:// or tls://".to_owned(),
        );
    }
    if let Err(m) = crate::events::relay::check_stream_name(&raw.events.nats_stream) {
        problem("events.nats_stream", m.to_owned());
    }

    for key in &raw.audit.redact_keys {
        if key.is_empty()
            || key.len() > 64
            || !key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            problem(
                "audit.redact_keys",
                format!("{:?} must be a lowercase snake_case word", truncate(key)),
            );
        }
    }

    let verify_interval_seconds = in_range(
        &mut problem,
        "audit.verify_interval_seconds",
        raw.audit.verify_interval_seconds,
        0,
        limits::AUDIT_VERIFY_INTERVAL_SECONDS_MAX,
    );
    let verify_entries_per_run = in_range(
        &mut problem,
        "audit.verify_entries_per_run",
        raw.audit.verify_entries_per_run,
        limits::AUDIT_VERIFY_ENTRIES_PER_RUN_MIN,
        limits::AUDIT_VERIFY_ENTRIES_PER_RUN_MAX,
    );

    // `None` inside: not set. `None` outside: set but invalid (a problem is recorded).
    let metrics_bind = match raw.metrics.bind.as_deref().map(str::parse::<SocketAddr>) {
        None => Some(None),
        Some(Ok(addr)) if bind == Some(addr) && addr.port() != 0 => {
            problem(
                "metrics.bind",
                format!(
                    "{addr} is server.bind itself; name another port, or leave metrics.bind unset to serve /metrics there"
                ),
            );
            None
        }
        Some(Ok(addr)) => Some(Some(addr)),
        Some(Err(_)) => {
            problem(
                "metrics.bind",
                format!(
                    "{:?} is not an address:port such as 127.0.0.1:9464",
                    truncate(raw.metrics.bind.as_deref().unwrap_or_default())
                ),
            );
            None
        }
    };

    if raw.backup.dir.trim().is_empty() {
        problem("backup.dir", "must name a folder".to_owned());
    }
    let backup_interval = in_range(
        &mut problem,
        "backup.interval_seconds",
        raw.backup.interval_seconds,
        0,
        limits::BACKUP_INTERVAL_SECONDS_MAX,
    )
    .and_then(|v| {
        if v != 0 && v < limits::BACKUP_INTERVAL_SECONDS_MIN {
            problem(
                "backup.interval_seconds",
                format!(
                    "must be 0 (no schedule) or at least {}",
                    limits::BACKUP_INTERVAL_SECONDS_MIN
                ),
            );
            None
        } else {
            Some(v)
        }
    });
    let backup_keep_last = in_range(
        &mut problem,
        "backup.keep_last",
        raw.backup.keep_last,
        0,
        limits::BACKUP_LIST_MAX as u64,
    );
    let backup_keep_days = in_range(
        &mut problem,
        "backup.keep_days",
        raw.backup.keep_days,
        0,
        36_500,
    );

    if let Err(message) = crate::telemetry::check_filter(&raw.log.level) {
        problem("log.level", message);
    }
    let format = match raw.log.format.as_str() {
        "json" => Some(LogFormat::Json),
        "text" => Some(LogFormat::Text),
        "auto" => Some(LogFormat::Auto),
        other => {
            problem(
                "log.format",
                format!("{:?} is not one of json, text, auto", truncate(other)),
            );
            None
        }
    };

    Some(Config {
        server: ServerConfig {
            bind: bind?,
            shutdown_grace_seconds: shutdown_grace_seconds?,
            cors_allowed_origins: raw.server.cors_allowed_origins,
            event_loops: event_loops?,
            trusted_proxies,
            header_read_timeout_seconds: header_read_timeout_seconds?,
            keep_alive_idle_seconds: keep_alive_idle_seconds?,
            max_pending_connections_per_address: max_pending_connections_per_address?,
        },
        database: DatabaseConfig {
            url: url?,
            max_connections: u32::try_from(max_connections?).ok()?,
            min_connections: u32::try_from(min_connections?).ok()?,
            acquire_timeout_ms: acquire_timeout_ms?,
            statement_timeout_ms: statement_timeout_ms?,
            busy_timeout_ms: busy_timeout_ms?,
        },
        auth: AuthConfig {
            bootstrap_key: raw.auth.bootstrap_key,
            jwt_algorithm: jwt_algorithm?,
            jwt_secret: raw.auth.jwt_secret,
            access_token_ttl_seconds: access_token_ttl_seconds?,
            master_key: raw.auth.master_key,
            master_key_file: raw.auth.master_key_file.map(PathBuf::from),
            previous_master_key: raw.auth.previous_master_key,
        },
        http: HttpConfig {
            max_body_bytes: max_body_bytes?,
            require_if_match: raw.http.require_if_match,
        },
        rate_limit: RateLimitConfig {
            user_per_minute: u32::try_from(user_per_minute?).ok()?,
            user_burst: u32::try_from(user_burst?).ok()?,
            tenant_per_minute: u32::try_from(tenant_per_minute?).ok()?,
            address_per_minute: u32::try_from(address_per_minute?).ok()?,
            redis_url: raw.rate_limit.redis_url,
            tenant_burst: u32::try_from(tenant_burst?).ok()?,
            address_burst: u32::try_from(address_burst?).ok()?,
            instances: u32::try_from(rate_instances?).ok()?,
            redis_timeout_ms: redis_timeout_ms?,
            redis_prefix: redis_prefix?,
        },
        idempotency: IdempotencyConfig {
            ttl_seconds: idempotency_ttl_seconds?,
            lock_timeout_seconds: idempotency_lock_timeout_seconds?,
        },
        gateway: GatewayConfig {
            health_interval_seconds: health_interval_seconds?,
            health_timeout_ms: health_timeout_ms?,
            default_timeout_ms: default_timeout_ms?,
            connect_timeout_ms: connect_timeout_ms?,
            breaker_consecutive_failures: u32::try_from(breaker_consecutive_failures?).ok()?,
            breaker_failure_rate_percent: u32::try_from(breaker_failure_rate_percent?).ok()?,
            breaker_window_calls: u32::try_from(breaker_window_calls?).ok()?,
            breaker_open_seconds: breaker_open_seconds?,
            retry_max: u32::try_from(retry_max?).ok()?,
            retry_backoff_base_ms: retry_backoff_base_ms?,
            retry_backoff_max_ms: retry_backoff_max_ms?,
            retry_budget_percent: u32::try_from(retry_budget_percent?).ok()?,
            pool_max_idle_per_host: u32::try_from(pool_max_idle_per_host?).ok()?,
            pool_idle_timeout_seconds: pool_idle_timeout_seconds?,
        },
        events: EventsConfig {
            nats_url: raw.events.nats_url,
            retention_days: event_retention_days?,
            nats_stream: raw.events.nats_stream,
            webhook: webhook?,
        },
        audit: AuditConfig {
            redact_keys: raw.audit.redact_keys,
            verify_interval_seconds: verify_interval_seconds?,
            verify_entries_per_run: verify_entries_per_run?,
        },
        metrics: MetricsConfig {
            bind: metrics_bind?,
        },
        backup: BackupConfig {
            dir: std::path::PathBuf::from(raw.backup.dir),
            interval_seconds: backup_interval?,
            keep_last: backup_keep_last?,
            keep_days: backup_keep_days?,
        },
        log: LogConfig {
            level: raw.log.level,
            format: format?,
        },
    })
}

fn in_range(
    problem: &mut impl FnMut(&str, String),
    key: &str,
    value: i64,
    min: u64,
    max: u64,
) -> Option<u64> {
    match u64::try_from(value) {
        Ok(v) if (min..=max).contains(&v) => Some(v),
        _ => {
            problem(
                key,
                format!("{value} is out of range: must be between {min} and {max}"),
            );
            None
        }
    }
}

/// Shortens a user-supplied value quoted back in a message.
fn truncate(value: &str) -> String {
    const QUOTED_CHARS_MAX: usize = 80;
    value.chars().take(QUOTED_CHARS_MAX).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let sources = ConfigSources::new(
            dir.path(),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        );
        Config::load(&sources)
    }

    /// Every key of the embedded default file (commented-out optional keys too),
    /// with its default value as written there (`None` for commented-out keys).
    fn default_file_keys() -> Vec<(String, Option<String>)> {
        let mut section = String::new();
        let mut keys = Vec::new();
        for line in DEFAULT_CONFIG_TOML.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
                continue;
            }
            let (commented, text) = match line.strip_prefix("# ") {
                Some(rest) => (true, rest),
                None => (false, line),
            };
            let Some((key, value)) = text.split_once(" = ") else {
                continue;
            };
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                continue;
            }
            let value = value.trim().trim_matches('"').to_owned();
            keys.push((format!("{section}.{key}"), (!commented).then_some(value)));
        }
        keys
    }

    #[test]
    fn the_configuration_document_lists_every_key_with_its_default() {
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/configuration.md"
        ))
        .unwrap();
        let keys = default_file_keys();
        assert!(keys.len() >= 20, "{keys:?}");
        let rows: Vec<&str> = doc.lines().filter(|l| l.starts_with("| `")).collect();
        assert_eq!(rows.len(), keys.len(), "one documented row per key");
        for (key, default) in keys {
            let (section, name) = key.split_once('.').unwrap();
            let env = format!(
                "`AIBOS_{}__{}`",
                section.to_uppercase(),
                name.to_uppercase()
            );
            let row = rows
                .iter()
                .find(|r| r.starts_with(&format!("| `{key}` |")))
                .unwrap_or_else(|| panic!("{key} is not documented"));
            assert!(row.contains(&env), "{key}: the row names {env}");
            match default {
                Some(default) => assert!(
                    row.contains(&format!("| `{default}` |")),
                    "{key}: the row gives the default {default}"
                ),
                None => assert!(
                    row.contains("| none"),
                    "{key}: an unset key is documented as none"
                ),
            }
        }
    }

    #[test]
    fn the_embedded_defaults_are_valid_and_match_the_spec() {
        let config = Config::defaults();
        assert_eq!(config.server.bind.to_string(), "127.0.0.1:3001");
        assert_eq!(config.database.url.expose(), "sqlite://data/aibos.db");
        assert_eq!(config.auth.access_token_ttl_seconds, 900);
        assert_eq!(config.http.max_body_bytes, 1_048_576);
        assert_eq!(config.rate_limit.user_per_minute, 100);
        assert_eq!(config.rate_limit.user_burst, 20);
        assert_eq!(config.rate_limit.tenant_per_minute, 1000);
        assert_eq!(config.rate_limit.address_per_minute, 300);
        assert_eq!(config.idempotency.ttl_seconds, 86_400);
        assert_eq!(
            config.idempotency.lock_timeout_seconds,
            limits::IDEMPOTENCY_LOCK_TIMEOUT_SECONDS_DEFAULT
        );
        assert_eq!(config.gateway.health_interval_seconds, 10);
        assert_eq!(config.log.level, "info");
        assert_eq!(config.log.format, LogFormat::Auto);
        assert!(config.auth.bootstrap_key.is_none());
    }

    #[test]
    fn environment_variables_override_nested_keys() {
        let config = load(&[
            ("AIBOS_SERVER__BIND", "127.0.0.1:0"),
            (
                "AIBOS_AUTH__BOOTSTRAP_KEY",
                "12345678901234567890123456789012",
            ),
            ("AIBOS_HTTP__MAX_BODY_BYTES", "2048"),
            ("AIBOS_ENV_UNRELATED", "ignored"),
            ("AIBOS_TEST_DATABASE_URL", "postgres://x"),
        ])
        .unwrap();
        assert_eq!(config.server.bind.port(), 0);
        assert_eq!(config.http.max_body_bytes, 2048);
        // A digits-only secret stays text.
        assert_eq!(
            config.auth.bootstrap_key.unwrap().expose(),
            "12345678901234567890123456789012"
        );
    }

    #[test]
    fn every_problem_is_listed_with_its_key() {
        let err = load(&[
            ("AIBOS_SERVER__BIND", "not an address"),
            ("AIBOS_AUTH__ACCESS_TOKEN_TTL_SECONDS", "-5"),
            ("AIBOS_LOG__FORMAT", "yaml"),
        ])
        .unwrap_err();
        let keys: Vec<_> = err.problems().iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["server.bind", "auth.access_token_ttl_seconds", "log.format"]
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused() {
        let err = load(&[("AIBOS_SERVER__BINDD", "x")]).unwrap_err();
        assert!(err.to_string().contains("bindd"), "{err}");
        let err = load(&[("AIBOS_HTTP__MAX_BODY_BYTES", "lots")]).unwrap_err();
        assert_eq!(err.problems()[0].key, "http.max_body_bytes");
    }

    #[test]
    fn the_relay_s_nats_url_and_stream_name_are_checked() {
        let config = load(&[]).unwrap();
        assert!(
            config.events.nats_url.is_none(),
            "no relay unless configured"
        );
        assert_eq!(config.events.nats_stream, "AIBOS_EVENTS");
        let config = load(&[
            ("AIBOS_EVENTS__NATS_URL", "tls://nats.example:4222"),
            ("AIBOS_EVENTS__NATS_STREAM", "events-prod"),
        ])
        .unwrap();
        assert_eq!(config.events.nats_stream, "events-prod");
        let err = load(&[
            ("AIBOS_EVENTS__NATS_URL", "http://nats.example:4222"),
            ("AIBOS_EVENTS__NATS_STREAM", "aibos.events"),
        ])
        .unwrap_err();
        let keys: Vec<_> = err.problems().iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["events.nats_url", "events.nats_stream"]);
    }

    #[test]
    fn event_loops_default_to_one_per_core_and_are_bounded() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let default = load(&[]).unwrap();
        assert_eq!(default.server.event_loops, 0);
        assert_eq!(
            default.server.event_loop_count(),
            cores.clamp(1, limits::HTTP_EVENT_LOOPS_MAX)
        );
        let one = load(&[("AIBOS_SERVER__EVENT_LOOPS", "1")]).unwrap();
        assert_eq!(one.server.event_loop_count(), 1);
        let many = load(&[("AIBOS_SERVER__EVENT_LOOPS", "64")]).unwrap();
        assert_eq!(many.server.event_loop_count(), 64);
        for bad in ["-1", "65", "99999999999"] {
            let err = load(&[("AIBOS_SERVER__EVENT_LOOPS", bad)]).unwrap_err();
            assert_eq!(err.problems()[0].key, "server.event_loops", "{bad}");
        }
    }

    #[test]
    fn hs256_needs_a_long_secret() {
        let err = load(&[("AIBOS_AUTH__JWT_ALGORITHM", "HS256")]).unwrap_err();
        assert_eq!(err.problems()[0].key, "auth.jwt_secret");
        let err = load(&[
            ("AIBOS_AUTH__JWT_ALGORITHM", "HS256"),
            ("AIBOS_AUTH__JWT_SECRET", "short"),
        ])
        .unwrap_err();
        assert!(err.problems()[0].message.contains("32"));
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("config/environments")).unwrap();
        std::fs::write(
            dir.path().join("aibos.toml"),
            "[log]\nlevel = \"debug\"\n[http]\nmax_body_bytes = 10\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("config/environments/staging.toml"),
            "[log]\nlevel = \"warn\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("config/secrets.toml"),
            "[auth]\nbootstrap_key = \"from-the-secrets-file-0123456789\"\n",
        )
        .unwrap();
        let env = [
            ("AIBOS_ENV".to_owned(), "staging".to_owned()),
            ("AIBOS_HTTP__MAX_BODY_BYTES".to_owned(), "20".to_owned()),
        ];
        let config = Config::load(&ConfigSources::new(dir.path(), env)).unwrap();
        assert_eq!(config.log.level, "warn");
        assert_eq!(config.http.max_body_bytes, 20);
        assert_eq!(
            config.auth.bootstrap_key.unwrap().expose(),
            "from-the-secrets-file-0123456789"
        );
    }

    #[test]
    fn a_missing_environment_file_is_a_problem() {
        let err = load(&[("AIBOS_ENV", "nowhere")]).unwrap_err();
        assert_eq!(err.problems()[0].key, "AIBOS_ENV");
    }

    #[test]
    fn show_redacts_secrets_and_database_passwords() {
        let config = load(&[
            (
                "AIBOS_AUTH__BOOTSTRAP_KEY",
                "super-secret-bootstrap-key-0123456789",
            ),
            (
                "AIBOS_DATABASE__URL",
                "postgres://aibos:hunter2@db.internal:5432/aibos",
            ),
        ])
        .unwrap();
        let shown = config.to_redacted_toml();
        assert!(!shown.contains("super-secret"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("postgres://aibos:[REDACTED]@db.internal:5432/aibos"),
            "{shown}"
        );
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
