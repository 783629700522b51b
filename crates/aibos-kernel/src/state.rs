//! The one application state: cheap handles, built once in [`crate::app::App::build`].

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::config::{Config, ConfigError, ConfigSources};
use crate::db::Db;
use crate::telemetry::{LogControl, Metrics};

/// Shared by every handler; clone freely (everything inside is an `Arc` or a pool handle).
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    /// The database pool, on either engine.
    db: Db,
    /// The configuration in force; swapped whole by [`AppState::reload`].
    config: ArcSwap<Config>,
    /// Where the configuration came from, so a reload reads the same layers.
    sources: ConfigSources,
    /// Changes the process log level on reload (a no-op for embedded kernels).
    log: LogControl,
    /// This kernel's metrics recorder.
    metrics: Metrics,
    /// When this kernel started, for `uptime_seconds`.
    started_at: Instant,
    /// The OpenAPI document, rendered once at start (it cannot change while running).
    openapi_json: Arc<str>,
}

/// What a successful reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// Keys whose new value is in force now.
    pub applied: Vec<String>,
    /// Keys whose new value waits for a restart (listening socket, database pool).
    pub restart_required: Vec<String>,
}

impl AppState {
    pub(crate) fn new(
        db: Db,
        config: Config,
        sources: ConfigSources,
        log: LogControl,
        metrics: Metrics,
        openapi_json: String,
    ) -> AppState {
        AppState {
            inner: Arc::new(Inner {
                db,
                config: ArcSwap::from_pointee(config),
                sources,
                log,
                metrics,
                started_at: Instant::now(),
                openapi_json: openapi_json.into(),
            }),
        }
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// The configuration in force right now (a cheap snapshot).
    pub fn config(&self) -> Arc<Config> {
        self.inner.config.load_full()
    }

    /// A guard on the configuration in force, cheaper than [`AppState::config`]
    /// on the hot path (no reference count touched); do not hold it across an await.
    pub fn config_ref(&self) -> arc_swap::Guard<Arc<Config>> {
        self.inner.config.load()
    }

    /// This kernel's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Time since start.
    pub fn uptime(&self) -> std::time::Duration {
        self.inner.started_at.elapsed()
    }

    /// The rendered OpenAPI document.
    pub fn openapi_json(&self) -> Arc<str> {
        self.inner.openapi_json.clone()
    }

    /// Re-reads every configuration layer through the same path as start-up. A valid
    /// configuration is swapped in atomically; an invalid one is refused and the old
    /// one stays in force.
    pub fn reload(&self) -> Result<ReloadOutcome, ConfigError> {
        let next = match Config::load(&self.inner.sources) {
            Ok(next) => next,
            Err(e) => {
                self.inner.metrics.config_reload("failed");
                tracing::error!(problems = ?e.problems(), "configuration reload refused; the previous configuration stays in force");
                return Err(e);
            }
        };
        let current = self.config();
        let outcome = diff(&current, &next);
        if let Err(message) = self.inner.log.set_level(&next.log.level) {
            // Validation already accepted the filter, so this is the subscriber refusing it.
            self.inner.metrics.config_reload("failed");
            tracing::error!(%message, "configuration reload refused: the log level could not be applied");
            return Err(ConfigError::Invalid(vec![crate::config::ConfigProblem {
                key: "log.level".to_owned(),
                message,
            }]));
        }
        self.inner.config.store(Arc::new(next));
        self.inner.metrics.config_reload("applied");
        tracing::info!(applied = ?outcome.applied, restart_required = ?outcome.restart_required, "configuration reloaded");
        Ok(outcome)
    }
}

/// Compares two configurations key by key through their redacted TOML form
/// (secrets compare as equal; a changed secret is still applied).
fn diff(old: &Config, new: &Config) -> ReloadOutcome {
    const RESTART_SECTIONS: &[&str] = &[
        "server.bind",
        "database.",
        "auth.jwt_algorithm",
        "events.",
        "rate_limit.redis_url",
    ];
    let flatten = |c: &Config| -> Vec<(String, String)> {
        let value: toml::Value =
            toml::Value::try_from(c).unwrap_or(toml::Value::Table(Default::default()));
        let mut out = Vec::new();
        if let toml::Value::Table(sections) = value {
            for (section, keys) in sections {
                if let toml::Value::Table(keys) = keys {
                    for (key, v) in keys {
                        out.push((format!("{section}.{key}"), v.to_string()));
                    }
                }
            }
        }
        out
    };
    let (old, new) = (flatten(old), flatten(new));
    let mut outcome = ReloadOutcome {
        applied: Vec::new(),
        restart_required: Vec::new(),
    };
    for (key, value) in &new {
        if old.iter().any(|(k, v)| k == key && v == value) {
            continue;
        }
        if RESTART_SECTIONS
            .iter()
            .any(|prefix| key.starts_with(prefix))
        {
            outcome.restart_required.push(key.clone());
        } else {
            outcome.applied.push(key.clone());
        }
    }
    outcome
}
