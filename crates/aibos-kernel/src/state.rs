//! The one application state: cheap handles, built once in [`crate::app::App::build`].

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::audit::{self, AuditContext, AuditEvent};
use crate::authz::cache::{AuthCache, Invalidation, LoopAuthCache, Principal};
use crate::config::{Config, ConfigError, ConfigSources};
use crate::db::Db;
use crate::error::ApiError;
use crate::identity::throttle::LoginThrottle;
use crate::identity::tokens::{KeyRing, SharedKeyRing};
use crate::secrets::MasterKeys;
use crate::telemetry::{LogControl, Metrics};

/// Shared by every handler; clone freely (everything inside is an `Arc` or a pool handle).
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    /// The database pool, on either engine.
    db: Db,
    /// PostgreSQL: the group-commit writer of [`AppState::write_grouped`]
    /// (SQLite's `Db::write` is grouped already).
    grouped_writer: Option<crate::db::group::GroupCommit>,
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
    /// Signing and verifying keys; swapped whole after a rotation.
    keys: SharedKeyRing,
    /// The master keys that seal and open stored secrets (read once at start).
    master_keys: Arc<MasterKeys>,
    /// Verified tokens and session principals.
    auth: AuthCache,
    /// Login-failure counts.
    login_throttle: LoginThrottle,
    /// `server.trusted_proxies`, read once at start (a restart key), so the
    /// client address of a request costs no configuration load.
    trusted_proxies: Box<[ipnet::IpNet]>,
    /// Argon2, bounded to one hash per core.
    hasher: crate::identity::password::Hasher,
    /// The gateway's route table and per-canon state.
    gateway: crate::gateway::Gateway,
    /// The event bus: group-commit publisher, commit signal, open streams.
    events: crate::events::EventBus,
    /// Wakes the webhook delivery worker.
    webhooks: Arc<crate::events::webhook::worker::Webhooks>,
    /// Rate limits: in process, or on Redis with its degraded mode.
    rate_limiter: crate::ratelimit::RateLimiter,
    /// Completed idempotency records cached, and their metrics.
    idempotency: crate::idempotency::Idempotency,
}

/// What one event loop owns, handed to its router as an extension: its upstream
/// client and its front cache of authenticated tokens. Never shared with another
/// loop's thread, so the locks inside are never contended.
pub struct EventLoopLocal {
    /// This loop's upstream HTTP client and keep-alive pool.
    pub upstream: crate::gateway::client::UpstreamClient,
    /// This loop's tokens already resolved to principals.
    pub auth: LoopAuthCache,
    /// Connections the dealer asks this loop to close (`http::dealer`).
    pub shedding: crate::http::dealer::Shedding,
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
        (keys, master_keys): (KeyRing, Arc<MasterKeys>),
    ) -> AppState {
        let trusted_proxies = config.server.trusted_proxies.clone().into_boxed_slice();
        let rate_limiter = crate::ratelimit::RateLimiter::new(&config, &metrics);
        let idempotency = crate::idempotency::Idempotency::new(&metrics);
        AppState {
            inner: Arc::new(Inner {
                trusted_proxies,
                grouped_writer: match &db {
                    Db::Postgres(pool) => Some(crate::db::group::GroupCommit::start(
                        crate::db::group::WriterPool::Postgres(pool.clone()),
                    )),
                    Db::Sqlite(_) => None,
                },
                db,
                config: ArcSwap::from_pointee(config),
                sources,
                log,
                metrics,
                started_at: Instant::now(),
                openapi_json: openapi_json.into(),
                keys: Arc::new(ArcSwap::from_pointee(keys)),
                master_keys,
                auth: AuthCache::default(),
                login_throttle: LoginThrottle::default(),
                hasher: crate::identity::password::Hasher::per_core(),
                gateway: crate::gateway::Gateway::default(),
                events: crate::events::EventBus::new(),
                webhooks: Arc::default(),
                rate_limiter,
                idempotency,
            }),
        }
    }

    /// The keys in force.
    pub fn keys(&self) -> arc_swap::Guard<Arc<KeyRing>> {
        self.inner.keys.load()
    }

    /// Replaces the key ring (after a rotation was seen in the database).
    pub fn set_keys(&self, ring: KeyRing) {
        self.inner.keys.store(Arc::new(ring));
        self.inner.auth.invalidate(&Invalidation::All);
    }

    /// Re-reads the signing keys; a changed set replaces the ring.
    pub async fn refresh_keys(&self) {
        let auth = self.config().auth.clone();
        match crate::identity::admin::load_key_ring(self.db(), &auth, &self.inner.master_keys).await
        {
            Ok(ring) => {
                if ring.jwks() != self.keys().jwks() {
                    tracing::info!("token-signing keys changed; new ring in force");
                    self.set_keys(ring);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot refresh the token-signing keys"),
        }
    }

    /// The master keys that seal and open stored secrets.
    pub fn master_keys(&self) -> &Arc<MasterKeys> {
        &self.inner.master_keys
    }

    /// Password hashing.
    pub fn hasher(&self) -> &crate::identity::password::Hasher {
        &self.inner.hasher
    }

    /// The proxies whose `X-Forwarded-For` is believed.
    pub fn trusted_proxies(&self) -> &[ipnet::IpNet] {
        &self.inner.trusted_proxies
    }

    /// The login throttle.
    pub fn login_throttle(&self) -> &LoginThrottle {
        &self.inner.login_throttle
    }

    /// Idempotency keys: the cache of completed records and the metrics.
    pub fn idempotency(&self) -> &crate::idempotency::Idempotency {
        &self.inner.idempotency
    }

    /// The authorization caches.
    pub fn auth_cache(&self) -> &AuthCache {
        &self.inner.auth
    }

    /// Applies an invalidation to this kernel's caches (other instances get it by NOTIFY).
    pub fn invalidate(&self, what: &Invalidation) {
        self.inner.auth.invalidate(what);
    }

    /// Verifies a bearer token and resolves its session; 401 for anything that
    /// does not hold. `front` is the calling event loop's own cache, tried first.
    pub async fn authenticate(
        &self,
        token: &[u8],
        front: Option<&LoopAuthCache>,
    ) -> Result<Arc<Principal>, ApiError> {
        let now = crate::timestamp::now();
        let cache = &self.inner.auth;
        // Read before anything is resolved: an invalidation landing meanwhile
        // keeps what is resolved now out of both caches.
        let generation = cache.generation();
        if let Some(principal) = front.and_then(|f| f.get(token, now, generation)) {
            return Ok(principal);
        }
        let token = std::str::from_utf8(token)
            .map_err(|_| ApiError::unauthorized("The access token is not valid."))?;
        let claims = match cache.verified_claims(token, now.unix_timestamp()) {
            Some(claims) => claims,
            None => {
                let claims = self
                    .keys()
                    .verify(token, now.unix_timestamp())
                    .map_err(|e| {
                        tracing::debug!(error = %e, "access token refused");
                        ApiError::unauthorized("The access token is not valid.")
                    })?;
                let claims = Arc::new(claims);
                cache.store_verified(token, claims.clone());
                claims
            }
        };
        let principal = match cache.principal(&claims.sid, now) {
            Some(principal) => principal,
            None => {
                // Boxed: a cache miss's queries are rare, and their large future
                // would otherwise sit in every authenticated request's.
                let principal =
                    Box::pin(crate::authz::store::load_principal(self.db(), &claims, now))
                        .await?
                        .ok_or_else(|| ApiError::unauthorized("The session has ended."))?;
                let principal = Arc::new(principal);
                cache.store_principal(generation, principal.clone());
                principal
            }
        };
        if let Some(front) = front {
            front.insert(token.as_bytes(), &claims, principal.clone(), generation);
        }
        Ok(principal)
    }

    /// Keys whose values are redacted from audit details.
    pub fn redact_keys(&self) -> Vec<String> {
        self.config_ref().audit.redact_keys.clone()
    }

    /// Writes one audit entry in a transaction of its own (denials, failed logins).
    ///
    /// The write is boxed: these entries are written on rare paths (a denial, a
    /// failed call) of hot handlers, and a database transaction's future would
    /// otherwise sit in every one of their futures, copied whole at each move.
    pub async fn audit_alone(&self, ctx: AuditContext, event: AuditEvent) -> Result<(), ApiError> {
        let keys = self.redact_keys();
        // Grouped: denials and gateway failures come in bursts, all moving
        // one tenant's chain head.
        Box::pin(self.write_grouped(move |tx| {
            Box::pin(async move {
                audit::record(tx, &ctx, event, &keys).await?;
                Ok::<_, ApiError>(())
            })
        }))
        .await
    }

    /// The event bus.
    pub fn events(&self) -> &crate::events::EventBus {
        &self.inner.events
    }

    /// The webhook delivery worker's handle.
    pub fn webhooks(&self) -> &Arc<crate::events::webhook::worker::Webhooks> {
        &self.inner.webhooks
    }

    /// The rate limiter.
    pub fn rate_limiter(&self) -> &crate::ratelimit::RateLimiter {
        &self.inner.rate_limiter
    }

    /// The gateway.
    pub fn gateway(&self) -> &crate::gateway::Gateway {
        &self.inner.gateway
    }

    /// Rebuilds the gateway's route table from the registry (after a registry
    /// change here, or a NOTIFY from another instance).
    pub async fn rebuild_gateway(&self) -> Result<(), ApiError> {
        self.inner
            .gateway
            .rebuild(&self.inner.db, &self.inner.master_keys, &self.inner.metrics)
            .await
            .map_err(ApiError::from)
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// [`Db::write`] for writes that take a hot row lock, on every call, and
    /// are many: each gateway call's `gateway.call` audit entry moves its
    /// tenant's chain head. On PostgreSQL they share transactions (each under
    /// a savepoint of its own, `db/group.rs`), so the head's lock is taken and
    /// the log flushed once per batch instead of once per call, one call after
    /// the other; on SQLite every write is grouped already.
    pub async fn write_grouped<T, E, F>(&self, body: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<crate::db::DbError> + Send + 'static,
        F: for<'t> FnOnce(&'t mut crate::db::Tx) -> crate::db::TxFuture<'t, T, E> + Send + 'static,
    {
        match &self.inner.grouped_writer {
            Some(writer) => writer.write(body).await,
            None => self.inner.db.write(body).await,
        }
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
    pub async fn reload(&self) -> Result<ReloadOutcome, ConfigError> {
        let result = self.swap_config();
        let ctx = AuditContext::system(crate::identity::SYSTEM_TENANT_ID);
        let event = match &result {
            Ok(outcome) => AuditEvent::new("config.reloaded").details(serde_json::json!({
                "applied": outcome.applied, "restart_required": outcome.restart_required
            })),
            Err(e) => AuditEvent::new("config.reload_failed")
                .outcome("failure")
                .severity("warning")
                .details(serde_json::json!({
                    "problems": e.problems()
                })),
        };
        if let Err(e) = self.audit_alone(ctx, event).await {
            tracing::error!(error = ?e, "the configuration reload could not be audited");
        }
        result
    }

    fn swap_config(&self) -> Result<ReloadOutcome, ConfigError> {
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
        "server.cors_allowed_origins",
        "server.event_loops",
        // The listener's connection timeouts and cap are set when serving starts.
        "server.header_read_timeout_seconds",
        "server.keep_alive_idle_seconds",
        "server.max_pending_connections_per_address",
        "database.",
        "auth.jwt_algorithm",
        // The master keys are read once at start (a changed key shows here
        // only as a changed file path: secrets compare as equal).
        "auth.master_key",
        "auth.previous_master_key",
        "events.",
        "rate_limit.redis_url",
        // The metrics listener is bound, and the audit verification scheduled, at start.
        "metrics.bind",
        "audit.verify_",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_applies_request_time_keys_and_names_those_read_at_start() {
        let old = Config::defaults();
        let mut new = old.clone();
        new.server.shutdown_grace_seconds += 1;
        new.server.event_loops = 1;
        new.server.cors_allowed_origins = vec!["https://app.example".into()];
        new.http.max_body_bytes += 1;
        let outcome = diff(&old, &new);
        let mut applied = outcome.applied.clone();
        applied.sort();
        assert_eq!(
            applied,
            ["http.max_body_bytes", "server.shutdown_grace_seconds"]
        );
        let mut restart = outcome.restart_required.clone();
        restart.sort();
        assert_eq!(
            restart,
            ["server.cors_allowed_origins", "server.event_loops"],
            "the socket's loops and the router's CORS layer are built at start"
        );
        let unchanged = diff(&old, &old.clone());
        assert!(unchanged.applied.is_empty() && unchanged.restart_required.is_empty());
    }
}
