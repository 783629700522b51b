//! Rate limits (SPEC §9, `docs/rate-limits.md`): GCRA per user, per tenant and
//! per client address, per-route overrides, in process or on Redis.
//!
//! - `gcra.rs`: the arithmetic, one number (the TAT) per key.
//! - `local.rs`: the in-process limiter, a bounded sharded map of TATs.
//! - `redis.rs`: the shared limiter, one Lua script call per decision.
//! - here: which policies apply to a request, the decision over all of them at
//!   once, the `RateLimit-Policy`/`RateLimit` headers, the degraded mode and
//!   its probe.
//!
//! Where: the kernel's own API in the edge (`http::edge::around`, after the
//! correlation id, before the handler), the gateway in the proxy after the
//! permission check (SPEC §6: 401, 403, then 429). Probes and `/metrics` are
//! never limited: an orchestrator must not take a busy kernel for a dead one.

mod gcra;
mod local;
mod redis;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use metrics::{Counter, Gauge, Histogram};
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditContext, AuditEvent};
use crate::authz::caller::{Authenticated, address_key, bearer_token, client_address};
use crate::authz::{Caller, cache::Principal};
use crate::config::{Config, RateLimitConfig};
use crate::error::ApiError;
use crate::gateway::table::RouteEntry;
use crate::limits;
use crate::state::{AppState, EventLoopLocal};
use crate::telemetry::Metrics;

pub use gcra::{Outcome, Quota};
pub use local::{LocalLimiter, NANOS_PER_MINUTE, POLICIES_MAX};
pub use redis::{MICROS_PER_MINUTE, RedisBackend, Status};

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-08+).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Matched routes the edge never limits: liveness and readiness probes and the
/// metrics scrape (an orchestrator must not restart a kernel because it was
/// busy, nor lose its metrics when they matter most).
const EXEMPT_ROUTES: [&str; 3] = ["/api/health/live", "/api/health", "/metrics"];

/// Whether the edge leaves requests of the matched `route` unlimited.
pub fn is_exempt(route: &str) -> bool {
    EXEMPT_ROUTES.contains(&route)
}

/// What a policy counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One user or service account (tenant + subject).
    User,
    /// A whole tenant.
    Tenant,
    /// A client address (IPv6 by /64), for requests without a valid token.
    Address,
    /// One user on one gateway route with its own `rate_limit` (replaces `User`).
    Route,
}

impl Scope {
    /// The policy's name in the headers, keys and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Scope::User => "user",
            Scope::Tenant => "tenant",
            Scope::Address => "address",
            Scope::Route => "route",
        }
    }
}

/// The user and tenant budgets in force, (per minute, burst) each: copied out
/// of the configuration, so that no reference count shared by every request
/// is touched (an `Arc<Config>` clone is a cache line all event loops write).
#[derive(Clone, Copy)]
struct Budgets {
    user: (u32, u32),
    tenant: (u32, u32),
}

impl Budgets {
    fn in_force(state: &AppState) -> Budgets {
        let config = state.config_ref();
        let rate: &RateLimitConfig = &config.rate_limit;
        Budgets {
            user: (rate.user_per_minute, rate.user_burst),
            tenant: (rate.tenant_per_minute, rate.tenant_burst),
        }
    }
}

/// One policy applied to one request.
struct Policy<'a> {
    scope: Scope,
    per_minute: u32,
    burst: u32,
    /// What identifies the key inside its scope (tenant, subject, route id, address).
    parts: [&'a [u8]; 3],
    count: usize,
}

impl<'a> Policy<'a> {
    fn new(scope: Scope, (per_minute, burst): (u32, u32), parts: &[&'a [u8]]) -> Policy<'a> {
        let mut all: [&[u8]; 3] = [&[]; 3];
        for (slot, part) in all.iter_mut().zip(parts) {
            *slot = part;
        }
        Policy {
            scope,
            per_minute,
            burst,
            parts: all,
            count: parts.len().min(3),
        }
    }

    fn user(budgets: Budgets, principal: &'a Principal) -> Policy<'a> {
        Policy::new(
            Scope::User,
            budgets.user,
            &[
                principal.tenant_id.as_bytes(),
                principal.subject_id.as_bytes(),
            ],
        )
    }

    fn tenant(budgets: Budgets, principal: &'a Principal) -> Policy<'a> {
        Policy::new(
            Scope::Tenant,
            budgets.tenant,
            &[principal.tenant_id.as_bytes()],
        )
    }

    /// The quota this instance applies: the whole budget, or its share of it
    /// while the shared backend is down.
    fn budget(&self, share: u32) -> (u32, u32) {
        let share = share.max(1);
        (
            (self.per_minute / share).max(1),
            (self.burst / share).max(1),
        )
    }
}

/// The headers of one decision, added to the response whatever it is.
#[derive(Debug, Clone)]
pub struct RateHeaders {
    policy: HeaderValue,
    state: HeaderValue,
}

impl RateHeaders {
    /// Sets `RateLimit-Policy` and `RateLimit` on `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(RATELIMIT_POLICY, self.policy.clone());
        headers.insert(RATELIMIT, self.state.clone());
    }
}

/// What the limiter decided about one request.
#[derive(Debug, Clone)]
pub struct Decision {
    headers: RateHeaders,
    /// The refusing policy and the whole seconds until a request is admitted again.
    refused: Option<(Scope, u64)>,
}

impl Decision {
    /// Whether the request may go on.
    pub fn admitted(&self) -> bool {
        self.refused.is_none()
    }

    /// The headers every answer to this request carries.
    pub fn headers(&self) -> &RateHeaders {
        &self.headers
    }

    /// Stores the headers in `headers_out` (the caller adds them to whatever it
    /// answers) and turns a refusal into the 429.
    pub fn admit(self, headers_out: &mut Option<RateHeaders>) -> Result<(), ApiError> {
        let refusal = self.refusal();
        *headers_out = Some(self.headers);
        refusal.map_or(Ok(()), Err)
    }

    /// The 429 of a refused request (`None` when admitted), with `Retry-After`
    /// and the rate-limit headers.
    pub fn refusal(&self) -> Option<ApiError> {
        let (scope, seconds) = self.refused?;
        let detail = format!(
            "Too many requests for the {} limit; retry after {seconds} s (see the RateLimit header).",
            scope.name()
        );
        Some(
            ApiError::rate_limited(detail, Duration::from_secs(seconds))
                .with_header(RATELIMIT_POLICY, self.headers.policy.clone())
                .with_header(RATELIMIT, self.headers.state.clone()),
        )
    }
}

/// Renders the two headers from the policies applied and their outcomes:
/// `RateLimit-Policy` lists every policy (`"user";q=100;w=60`), `RateLimit`
/// names the one closest to refusing (the refusing one, else the fewest
/// remaining) with its remaining requests and the seconds until it resets.
fn render(
    applied: &[(Scope, u32)],
    outcomes: &[Outcome],
    unit_per_second: u64,
) -> (RateHeaders, Option<(Scope, u64)>) {
    let seconds = |units: u64| units.div_ceil(unit_per_second);
    // Written piece by piece with itoa: `format!` cost ~2 800 instructions per
    // decision, a third of the gateway call's growth with the limits on
    // (callgrind, docs/performance.md).
    let mut policy = String::with_capacity(32 * applied.len());
    for (i, (scope, per_minute)) in applied.iter().enumerate() {
        if i > 0 {
            policy.push_str(", ");
        }
        policy.push('"');
        policy.push_str(scope.name());
        policy.push_str("\";q=");
        policy.push_str(itoa::Buffer::new().format(*per_minute));
        policy.push_str(";w=60");
    }
    let pairs = || applied.iter().zip(outcomes);
    let refused = pairs()
        .filter(|(_, o)| !o.admitted)
        .max_by_key(|(_, o)| o.retry_after);
    let (closest, refused) = match refused {
        Some(((scope, _), o)) => ((scope, o), Some((*scope, seconds(o.retry_after).max(1)))),
        None => {
            let ((scope, _), o) = pairs()
                .min_by_key(|(_, o)| (o.remaining, std::cmp::Reverse(o.reset)))
                .unwrap_or((&applied[0], &outcomes[0]));
            ((scope, o), None)
        }
    };
    let reset = match refused {
        Some((_, retry)) => retry,
        None => seconds(closest.1.reset),
    };
    let mut state = String::with_capacity(40);
    state.push('"');
    state.push_str(closest.0.name());
    state.push_str("\";r=");
    state.push_str(itoa::Buffer::new().format(closest.1.remaining));
    state.push_str(";t=");
    state.push_str(itoa::Buffer::new().format(reset));
    // The text's own buffer becomes the value's (`from_str` would copy it).
    let value = |text: String| {
        HeaderValue::from_maybe_shared(axum::body::Bytes::from(text))
            .unwrap_or_else(|_| HeaderValue::from_static("\"kernel\""))
    };
    (
        RateHeaders {
            policy: value(policy),
            state: value(state),
        },
        refused,
    )
}

/// Metric handles, registered once.
struct RateMetrics {
    /// `aibos_rate_limited_total{scope}`, in `Scope` order.
    limited: [Counter; 4],
    /// `aibos_ratelimit_redis_duration_seconds`.
    redis_latency: Histogram,
    /// `aibos_ratelimit_fallback_decisions_total`: made in process while Redis was out.
    fallbacks: Counter,
    /// `aibos_ratelimit_backend_transitions_total{to}`: degraded, restored.
    degraded: Counter,
    restored: Counter,
    /// `aibos_ratelimit_backend_degraded`: 1 while decisions fall back.
    degraded_now: Gauge,
}

impl RateMetrics {
    fn new(metrics: &Metrics) -> RateMetrics {
        let scope = |s: Scope| {
            metrics.counter(
                "aibos_rate_limited_total",
                &[("scope", s.name().to_owned())],
            )
        };
        let transition = |to: &str| {
            metrics.counter(
                "aibos_ratelimit_backend_transitions_total",
                &[("to", to.to_owned())],
            )
        };
        RateMetrics {
            limited: [
                scope(Scope::User),
                scope(Scope::Tenant),
                scope(Scope::Address),
                scope(Scope::Route),
            ],
            redis_latency: metrics.histogram("aibos_ratelimit_redis_duration_seconds", &[]),
            fallbacks: metrics.counter("aibos_ratelimit_fallback_decisions_total", &[]),
            degraded: transition("degraded"),
            restored: transition("restored"),
            degraded_now: metrics.gauge("aibos_ratelimit_backend_degraded", &[]),
        }
    }
}

/// The kernel's rate limiter: the in-process one, and Redis when configured.
pub struct RateLimiter {
    local: LocalLimiter,
    /// Set when `rate_limit.redis_url` is (read at start).
    redis: Option<redis::RedisBackend>,
    metrics: RateMetrics,
}

/// The backend as `GET /api/health` shows it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct BackendHealth {
    /// `in_process` or `redis`.
    pub backend: &'static str,
    /// `ok`, or `degraded` while Redis is unreachable (decisions are then made
    /// in process with each budget divided by `rate_limit.instances`).
    pub status: &'static str,
}

impl RateLimiter {
    /// The limiter `config` asks for. Must run inside a Tokio runtime when
    /// Redis is configured (its connection's task is spawned there); it
    /// connects later ([`RateLimiter::connect`]).
    pub fn new(config: &Config, metrics: &Metrics) -> RateLimiter {
        let rate = &config.rate_limit;
        let redis = rate.redis_url.as_ref().and_then(|url| {
            let timeout = Duration::from_millis(rate.redis_timeout_ms);
            match redis::RedisBackend::new(url.expose(), timeout) {
                Ok(backend) => Some(backend),
                Err(e) => {
                    // Validation checked the scheme; anything else the client
                    // refuses leaves the kernel limiting in process, loudly.
                    tracing::error!(error = %e, "rate_limit.redis_url is not usable; limiting in process");
                    None
                }
            }
        });
        let metrics = RateMetrics::new(metrics);
        if redis.is_some() {
            metrics.degraded_now.set(1.0);
        }
        RateLimiter {
            local: LocalLimiter::default(),
            redis,
            metrics,
        }
    }

    /// The backend's state for the health endpoint.
    pub fn health(&self) -> BackendHealth {
        match &self.redis {
            None => BackendHealth {
                backend: "in_process",
                status: "ok",
            },
            Some(backend) => BackendHealth {
                backend: "redis",
                status: match backend.status() {
                    Status::Up => "ok",
                    Status::Starting => "starting",
                    Status::Degraded => "degraded",
                },
            },
        }
    }

    /// One probe of Redis (nothing without it): a PING within the decision
    /// timeout, moving the backend to up or degraded (audited once per change).
    pub async fn probe(&self, state: &AppState, timeout: Duration) {
        let Some(backend) = &self.redis else { return };
        match backend.ping(timeout).await {
            Ok(()) => self.restored(state, backend).await,
            Err(e) => self.degrade(state, backend, &e, false).await,
        }
    }

    async fn restored(&self, state: &AppState, backend: &redis::RedisBackend) {
        let Some(previous) = backend.transition(Status::Up) else {
            return;
        };
        self.metrics.degraded_now.set(0.0);
        if previous != Status::Degraded {
            tracing::info!("rate limits: deciding on Redis");
            return;
        }
        self.metrics.restored.increment(1);
        tracing::warn!("rate limits: Redis answers again; budgets are shared again");
        audit_backend(state, "ratelimit.backend_restored", None).await;
    }

    /// Marks Redis degraded after `failure`; the first to see it audits it
    /// (in a task of its own when `spawned`, so a request does not wait).
    async fn degrade(
        &self,
        state: &AppState,
        backend: &redis::RedisBackend,
        failure: &redis::RedisFailure,
        spawned: bool,
    ) {
        if backend.transition(Status::Degraded).is_none() {
            return;
        }
        self.metrics.degraded_now.set(1.0);
        self.metrics.degraded.increment(1);
        let instances = state.config_ref().rate_limit.instances;
        tracing::warn!(error = %failure, instances, "rate limits: Redis unreachable; limiting in process with each budget divided by rate_limit.instances");
        let reason = match failure {
            redis::RedisFailure::Timeout => "timeout",
            redis::RedisFailure::Redis(_) => "error",
            redis::RedisFailure::Shape => "bad_answer",
        };
        if spawned {
            let state = state.clone();
            tokio::spawn(async move {
                audit_backend(&state, "ratelimit.backend_degraded", Some(reason)).await;
            });
        } else {
            audit_backend(state, "ratelimit.backend_degraded", Some(reason)).await;
        }
    }

    /// Drops idle keys of the in-process limiter.
    pub fn sweep(&self) {
        let kept = self.local.sweep();
        tracing::trace!(kept, "rate limits: idle keys swept");
    }

    /// Decides one request by `policies`, all at once.
    async fn decide(&self, state: &AppState, policies: &[Policy<'_>]) -> Decision {
        debug_assert!(!policies.is_empty() && policies.len() <= local::POLICIES_MAX);
        let mut outcomes = [gcra::decide(0, 1, Quota::per_minute(1, 1, 1)); local::POLICIES_MAX];
        let mut share = 1;
        if let Some(backend) = &self.redis {
            if backend.status() == Status::Up {
                match Box::pin(self.decide_on_redis(state, backend, policies, &mut outcomes)).await
                {
                    Ok(admitted) => {
                        return self.finish(policies, 1, &outcomes, admitted, 1_000_000);
                    }
                    Err(e) => self.degrade(state, backend, &e, true).await,
                }
            }
            self.metrics.fallbacks.increment(1);
            share = state.config_ref().rate_limit.instances;
        }
        let mut keyed = [(0u64, Quota::per_minute(1, 1, 1)); local::POLICIES_MAX];
        for (slot, policy) in keyed.iter_mut().zip(policies) {
            let mut parts: [&[u8]; 4] = [policy.scope.name().as_bytes(), &[], &[], &[]];
            parts[1..=policy.count].copy_from_slice(&policy.parts[..policy.count]);
            let (per_minute, burst) = policy.budget(share);
            *slot = (
                self.local.key(&parts[..=policy.count]),
                Quota::per_minute(per_minute, burst, local::NANOS_PER_MINUTE),
            );
        }
        let now = self.local.now();
        let admitted = self
            .local
            .decide(&keyed[..policies.len()], now, &mut outcomes);
        self.finish(policies, share, &outcomes, admitted, 1_000_000_000)
    }

    async fn decide_on_redis(
        &self,
        state: &AppState,
        backend: &redis::RedisBackend,
        policies: &[Policy<'_>],
        outcomes: &mut [Outcome],
    ) -> Result<bool, redis::RedisFailure> {
        let (prefix, timeout) = {
            let config = state.config_ref();
            (
                config.rate_limit.redis_prefix.clone(),
                Duration::from_millis(config.rate_limit.redis_timeout_ms),
            )
        };
        let keyed: Vec<(String, Quota)> = policies
            .iter()
            .map(|p| {
                let mut key = format!("{prefix}:rl:{}", p.scope.name());
                for part in &p.parts[..p.count] {
                    key.push(':');
                    key.push_str(&String::from_utf8_lossy(part));
                }
                let quota = Quota::per_minute(p.per_minute, p.burst, redis::MICROS_PER_MINUTE);
                (key, quota)
            })
            .collect();
        let started = Instant::now();
        let admitted = backend.decide(&keyed, timeout, outcomes).await?;
        self.metrics
            .redis_latency
            .record(started.elapsed().as_secs_f64());
        Ok(admitted)
    }

    fn finish(
        &self,
        policies: &[Policy<'_>],
        share: u32,
        outcomes: &[Outcome],
        admitted: bool,
        unit_per_second: u64,
    ) -> Decision {
        let mut applied = [(Scope::User, 0u32); local::POLICIES_MAX];
        for (slot, policy) in applied.iter_mut().zip(policies) {
            *slot = (policy.scope, policy.budget(share).0);
        }
        let (headers, refused) = render(
            &applied[..policies.len()],
            &outcomes[..policies.len()],
            unit_per_second,
        );
        // A refusal the backend reports must name a refusing policy.
        debug_assert_eq!(admitted, refused.is_none());
        if let Some((scope, _)) = refused {
            self.metrics.limited[scope as usize].increment(1);
        }
        Decision { headers, refused }
    }

    /// The decision for a kernel API request (the edge), or `None` for the
    /// routes never limited and for gateway calls (limited by the proxy after
    /// its permission check). A valid bearer token → its user and tenant
    /// (the principal is left in the request for the `Caller` extractor);
    /// anything else → the client address.
    pub async fn at_edge(
        &self,
        state: &AppState,
        request: &mut Request,
        route: &str,
    ) -> Option<Decision> {
        if is_exempt(route)
            || route == crate::http::front::GATEWAY_CANON_ROUTE
            || route == crate::http::front::GATEWAY_PATH_ROUTE
        {
            return None;
        }
        let token = request.headers().get(axum::http::header::AUTHORIZATION);
        if let Some(token) = token.filter(|t| bearer_token(t).is_some()).cloned() {
            let front = request.extensions().get::<Arc<EventLoopLocal>>().cloned();
            let bytes = bearer_token(&token).unwrap_or_default();
            let authenticated = state
                .authenticate(bytes, front.as_deref().map(|local| &local.auth))
                .await;
            if let Ok(principal) = authenticated {
                let budgets = Budgets::in_force(state);
                let policies = [
                    Policy::user(budgets, &principal),
                    Policy::tenant(budgets, &principal),
                ];
                let decision = self.decide(state, &policies).await;
                request.extensions_mut().insert(Authenticated(principal));
                return Some(decision);
            }
        }
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()?
            .0
            .ip();
        let address = address_key(client_address(
            peer,
            request.headers(),
            state.trusted_proxies(),
        ));
        let (v4, v6);
        let bytes: &[u8] = match address {
            IpAddr::V4(ip) => {
                v4 = ip.octets();
                &v4
            }
            IpAddr::V6(ip) => {
                v6 = ip.octets();
                &v6
            }
        };
        let quota = {
            let config = state.config_ref();
            (
                config.rate_limit.address_per_minute,
                config.rate_limit.address_burst,
            )
        };
        let text = address.to_string();
        let part: &[u8] = if self.redis.is_some() {
            text.as_bytes()
        } else {
            bytes
        };
        Some(
            self.decide(state, &[Policy::new(Scope::Address, quota, &[part])])
                .await,
        )
    }

    /// The decision for a gateway call by `caller` on `route`: the route's own
    /// limit (per user on that route) or the user's, and the tenant's.
    pub async fn gateway_call(
        &self,
        state: &AppState,
        caller: &Caller,
        route: &RouteEntry,
    ) -> Decision {
        let budgets = Budgets::in_force(state);
        let principal = &caller.principal;
        let first = match &route.rate_limit {
            Some(limit) => Policy::new(
                Scope::Route,
                (
                    limit.per_minute,
                    // Without a burst of its own: the user's, never above the route's rate.
                    limit
                        .burst
                        .unwrap_or_else(|| budgets.user.1.min(limit.per_minute)),
                ),
                &[
                    route.id.as_bytes(),
                    principal.tenant_id.as_bytes(),
                    principal.subject_id.as_bytes(),
                ],
            ),
            None => Policy::user(budgets, principal),
        };
        self.decide(state, &[first, Policy::tenant(budgets, principal)])
            .await
    }

    /// Makes the first connection to Redis (bounded), so that a kernel with
    /// Redis reachable decides on it from its first request.
    pub async fn connect(&self, state: &AppState) {
        if self.redis.is_some() {
            let timeout = Duration::from_millis(limits::RATE_LIMIT_REDIS_TIMEOUT_MS_MAX);
            self.probe(state, timeout).await;
        }
    }
}

/// The edge's part: decides, answers 429 for a refusal, else runs `inner`,
/// and adds the headers to the answer either way.
pub async fn around_edge<Inner, Served>(
    state: &AppState,
    mut request: Request,
    route: &str,
    inner: Inner,
) -> Response
where
    Inner: FnOnce(Request) -> Served,
    Served: Future<Output = Response>,
{
    let Some(decision) = state
        .rate_limiter()
        .at_edge(state, &mut request, route)
        .await
    else {
        return inner(request).await;
    };
    let mut response = match decision.refusal() {
        Some(refusal) => refusal.into_response(),
        None => inner(request).await,
    };
    decision.headers.apply(response.headers_mut());
    response
}

/// `ratelimit.backend_degraded` / `_restored` in the system tenant's chain.
async fn audit_backend(state: &AppState, action: &'static str, reason: Option<&'static str>) {
    let ctx = AuditContext::system(crate::identity::SYSTEM_TENANT_ID);
    let mut event = AuditEvent::new(action).details(serde_json::json!({
        "backend": "redis",
        "reason": reason,
        "instances": state.config_ref().rate_limit.instances,
    }));
    if reason.is_some() {
        event = event.outcome("failure").severity("warning");
    }
    if let Err(e) = state.audit_alone(ctx, event).await {
        tracing::error!(error = ?e.code(), action, "could not audit a rate-limit backend change");
    }
}

/// The limiter's housekeeping until `stop`: idle keys swept every
/// `RATE_LIMIT_SWEEP_SECONDS`, Redis probed every `RATE_LIMIT_PROBE_MS`.
pub async fn run(state: AppState, stop: CancellationToken) {
    let mut sweep = tokio::time::interval(Duration::from_secs(limits::RATE_LIMIT_SWEEP_SECONDS));
    let mut probe = tokio::time::interval(Duration::from_millis(limits::RATE_LIMIT_PROBE_MS));
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let probing = state.rate_limiter().redis.is_some();
    loop {
        tokio::select! {
            _ = sweep.tick() => state.rate_limiter().sweep(),
            _ = probe.tick(), if probing => {
                let timeout = Duration::from_millis(state.config_ref().rate_limit.redis_timeout_ms);
                state.rate_limiter().probe(&state, timeout).await;
            }
            () = stop.cancelled() => break,
        }
    }
}

/// Checks `rate_limit.redis_prefix`: 1 to 64 of letters, digits, `-_.:`.
pub fn valid_prefix(prefix: &str) -> Result<String, String> {
    let ok = !prefix.is_empty()
        && prefix.len() <= limits::RATE_LIMIT_PREFIX_CHARS_MAX
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(prefix.to_owned())
    } else {
        Err(format!(
            "must be 1 to {} letters, digits, '-', '_', '.' or ':'",
            limits::RATE_LIMIT_PREFIX_CHARS_MAX
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(remaining: u32, reset: u64) -> Outcome {
        Outcome {
            admitted: true,
            new_tat: 0,
            remaining,
            reset,
            retry_after: 0,
        }
    }

    #[test]
    fn the_headers_list_every_policy_and_report_the_closest_to_its_limit() {
        let applied = [(Scope::User, 100), (Scope::Tenant, 1000)];
        let (headers, refused) =
            render(&applied, &[admitted(12, 1_500), admitted(199, 300)], 1_000);
        assert_eq!(
            headers.policy,
            "\"user\";q=100;w=60, \"tenant\";q=1000;w=60"
        );
        assert_eq!(headers.state, "\"user\";r=12;t=2", "1.5 s rounds up");
        assert_eq!(refused, None);

        let tenant_refuses = Outcome {
            admitted: false,
            new_tat: 0,
            remaining: 0,
            reset: 60_000,
            retry_after: 29_001,
        };
        let (headers, refused) = render(&applied, &[admitted(5, 900), tenant_refuses], 1_000);
        assert_eq!(headers.state, "\"tenant\";r=0;t=30");
        assert_eq!(refused, Some((Scope::Tenant, 30)));

        let (headers, _) = render(&[(Scope::Address, 300)], &[admitted(0, 0)], 1_000);
        assert_eq!(headers.policy, "\"address\";q=300;w=60");
        assert_eq!(headers.state, "\"address\";r=0;t=0");
    }

    #[test]
    fn a_refusal_is_a_429_with_retry_after_and_both_headers() {
        let (headers, refused) = render(
            &[(Scope::Route, 10)],
            &[Outcome {
                admitted: false,
                new_tat: 0,
                remaining: 0,
                reset: 0,
                retry_after: 1,
            }],
            1_000_000_000,
        );
        let decision = Decision { headers, refused };
        assert!(!decision.admitted());
        let response = decision.refusal().expect("refused").into_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "1", "at least a second");
        assert_eq!(
            response.headers()["ratelimit-policy"],
            "\"route\";q=10;w=60"
        );
        assert_eq!(response.headers()["ratelimit"], "\"route\";r=0;t=1");
    }

    #[test]
    fn a_degraded_instance_takes_its_share_of_each_budget() {
        let policy = Policy::new(Scope::User, (100, 20), &[b"t", b"u"]);
        assert_eq!(policy.budget(1), (100, 20));
        assert_eq!(policy.budget(2), (50, 10));
        assert_eq!(policy.budget(1000), (1, 1), "never below one request");
        assert_eq!(policy.budget(0), (100, 20));
    }

    #[test]
    fn redis_prefixes_are_plain_words() {
        assert_eq!(valid_prefix("aibos:prod-1").as_deref(), Ok("aibos:prod-1"));
        assert!(valid_prefix("").is_err());
        assert!(valid_prefix("a b").is_err());
        assert!(valid_prefix(&"a".repeat(65)).is_err());
    }
}
