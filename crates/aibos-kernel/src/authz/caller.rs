//! The authenticated caller, as an axum extractor.
//!
//! `Caller` authenticates the bearer token (signature once per token, then a
//! cache hit), resolves the session to a cached [`Principal`], and refuses
//! revoked sessions, suspended users and suspended tenants. The tenant of every
//! request comes from here and nowhere else.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::header::{self, HeaderName};
use axum::http::request::Parts;
use ipnet::IpNet;

use super::cache::{LoopAuthCache, Principal};
use crate::audit::{AuditContext, AuditEvent};
use crate::error::{ApiError, ErrorCode};
use crate::http::edge::RequestContext;
use crate::limits;
use crate::state::{AppState, EventLoopLocal};

/// Who is calling, and from where.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The session's principal (tenant, subject, permissions).
    pub principal: Arc<Principal>,
    /// The request's correlation id.
    pub correlation_id: String,
    /// The client's address.
    pub client_ip: Option<IpAddr>,
    /// The client's `User-Agent`, truncated.
    pub user_agent: Option<String>,
}

/// The principal of a request the edge already authenticated (for its rate
/// limits), put in the request's extensions there so that the `Caller`
/// extractor does not resolve the token twice. Only the kernel inserts
/// extensions; a client cannot supply one.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Arc<Principal>);

/// Client address, user agent and correlation id of any request, for audit
/// entries of unauthenticated endpoints (login, bootstrap).
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// The client's address.
    pub client_ip: Option<IpAddr>,
    /// The client's `User-Agent`, truncated.
    pub user_agent: Option<String>,
    /// The request's correlation id.
    pub correlation_id: String,
}

impl ClientInfo {
    /// The audit context of an anonymous request in `tenant_id`'s chain.
    pub fn audit_context(
        &self,
        tenant_id: &str,
        actor_type: &'static str,
        actor_id: Option<String>,
    ) -> AuditContext {
        AuditContext {
            tenant_id: tenant_id.to_owned(),
            actor_type,
            actor_id,
            client_ip: self.client_ip.map(|ip| ip.to_string()),
            user_agent: self.user_agent.clone(),
            correlation_id: Some(self.correlation_id.clone()),
        }
    }
}

/// A user agent cut to [`limits::USER_AGENT_CHARS_MAX`] characters. One that
/// has no more bytes than that (nearly all) is copied whole, without walking
/// its characters.
fn truncated_user_agent(ua: &str) -> String {
    if ua.len() <= limits::USER_AGENT_CHARS_MAX {
        return ua.to_owned();
    }
    match ua.char_indices().nth(limits::USER_AGENT_CHARS_MAX) {
        Some((end, _)) => ua[..end].to_owned(),
        None => ua.to_owned(),
    }
}

impl FromRequestParts<AppState> for ClientInfo {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(client_info(parts, state.trusted_proxies()))
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The client's address as SPEC §4 defines it: the peer's, or, when the peer
/// is a trusted proxy, the last hop of `X-Forwarded-For` (all its lines, in
/// order) that is not one. Hops are read from the right, at most
/// [`limits::FORWARDED_HOPS_MAX`]; a hop that is not an address stops the walk
/// at the last trusted one (what a client wrote left of it is not believed).
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let mut current = peer.to_canonical();
    if trusted.is_empty() || !is_trusted(&current) {
        return current;
    }
    let lines: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let hops = lines
        .iter()
        .rev()
        .flat_map(|line| line.rsplit(','))
        .take(limits::FORWARDED_HOPS_MAX);
    for hop in hops {
        let hop = hop.trim();
        let parsed = hop
            .parse::<IpAddr>()
            .or_else(|_| hop.parse::<SocketAddr>().map(|s| s.ip()));
        let Ok(ip) = parsed.map(|ip| ip.to_canonical()) else {
            return current;
        };
        if !is_trusted(&ip) {
            return ip;
        }
        current = ip;
    }
    current
}

/// The key a client address is counted under (login throttling, pending
/// connections): IPv4 by address, IPv6 by its /64, the block one subscriber
/// usually holds whole (counting each of its 2^64 addresses apart would let
/// one client rotate through them).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let [a, b, c, d, ..] = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

fn client_info(parts: &Parts, trusted: &[IpNet]) -> ClientInfo {
    let client_ip = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| client_address(c.0.ip(), &parts.headers, trusted));
    let user_agent = parts
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(truncated_user_agent);
    let correlation_id = parts
        .extensions
        .get::<RequestContext>()
        .map(|c| c.correlation_id.encode(&mut [0; 36]).to_owned())
        .unwrap_or_default();
    ClientInfo {
        client_ip,
        user_agent,
        correlation_id,
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        // The event loop's own front cache, when served by one (not in oneshot tests).
        let front = parts
            .extensions
            .get::<Arc<EventLoopLocal>>()
            .map(|local| &local.auth);
        Caller::authenticate(parts, state, front).await
    }
}

impl Caller {
    /// The caller of a request, its token looked up in `front` first when the
    /// request is served by an event loop.
    pub async fn authenticate(
        parts: &Parts,
        state: &AppState,
        front: Option<&LoopAuthCache>,
    ) -> Result<Caller, ApiError> {
        // The edge's rate limiter may have authenticated this request already.
        let principal = match parts.extensions.get::<Authenticated>() {
            Some(known) => known.0.clone(),
            None => {
                let token = parts
                    .headers
                    .get(header::AUTHORIZATION)
                    .and_then(bearer_token)
                    .ok_or_else(|| {
                        ApiError::unauthorized(
                            "Send an access token as `Authorization: Bearer <token>`.",
                        )
                    })?;
                state.authenticate(token, front).await?
            }
        };
        if principal.tenant_suspended {
            return Err(ApiError::new(
                ErrorCode::TenantSuspended,
                "The tenant is suspended.",
            ));
        }
        let info = client_info(parts, state.trusted_proxies());
        Ok(Caller {
            principal,
            correlation_id: info.correlation_id,
            client_ip: info.client_ip,
            user_agent: info.user_agent,
        })
    }
}

/// The token of `Authorization: Bearer <token>`, as bytes: a token the event
/// loop has seen is found by its bytes alone, and only one that is not is
/// checked to be text (`AppState::authenticate`), which spares every repeated
/// call a pass over its few hundred bytes.
pub(crate) fn bearer_token(value: &axum::http::HeaderValue) -> Option<&[u8]> {
    let value = value.as_bytes();
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, token) = (&value[..space], value[space + 1..].trim_ascii());
    (scheme.eq_ignore_ascii_case(b"bearer") && !token.is_empty()).then_some(token)
}

impl Caller {
    /// The caller's tenant (from the token, confirmed by the session).
    pub fn tenant_id(&self) -> &str {
        &self.principal.tenant_id
    }

    /// The user or service account.
    pub fn subject_id(&self) -> &str {
        &self.principal.subject_id
    }

    /// Whether the caller holds `permission` right now.
    pub fn holds(&self, permission: &str) -> bool {
        self.principal.permissions.contains(permission)
    }

    /// Succeeds when the caller holds every one of `permissions`; otherwise writes
    /// an `authz.deny` audit entry and answers 403 with `missing_permissions`.
    pub async fn require<P>(&self, state: &AppState, permissions: &[P]) -> Result<(), ApiError>
    where
        P: AsRef<str> + serde::Serialize + Sync,
    {
        let missing: Vec<String> = permissions
            .iter()
            .map(AsRef::as_ref)
            .filter(|p| !self.holds(p))
            .map(str::to_owned)
            .collect();
        self.deny_if_missing(state, permissions, missing).await
    }

    /// The one check of every path that gives rights (role create and update,
    /// assignment, service-account roles, delegation): everything `grants`
    /// gives must be within the caller's grantable set — what it holds through
    /// its own roles, never through a delegation or break-glass; a `prefix.*`
    /// only for a holder of that prefix or a wider one. Otherwise 403 with
    /// `missing_permissions` and an `authz.deny` entry.
    pub async fn require_grantable(
        &self,
        state: &AppState,
        grants: &super::PermissionSet,
    ) -> Result<(), ApiError> {
        let missing = grants.outside(&self.principal.grantable);
        self.deny_if_missing(state, &grants.grants(), missing).await
    }

    /// Acting on another subject of the tenant (password reset, suspension,
    /// role removal, session revocation, secret rotation) is allowed only when
    /// everything it holds is within the caller's grantable set: otherwise a
    /// user manager could take over an administrator's account. Acting on
    /// oneself gains nothing and is not checked.
    pub async fn require_over(&self, state: &AppState, subject_id: &str) -> Result<(), ApiError> {
        if subject_id == self.subject_id() {
            return Ok(());
        }
        let held = Box::pin(super::store::subject_permissions(
            state.db(),
            self.tenant_id(),
            subject_id,
            crate::timestamp::now(),
        ))
        .await?;
        let missing = held.all.outside(&self.principal.grantable);
        self.deny_if_missing(state, &held.all.grants(), missing)
            .await
    }

    async fn deny_if_missing<P>(
        &self,
        state: &AppState,
        required: &[P],
        missing: Vec<String>,
    ) -> Result<(), ApiError>
    where
        P: serde::Serialize + Sync,
    {
        if missing.is_empty() {
            return Ok(());
        }
        let event = AuditEvent::new("authz.deny")
            .outcome("deny")
            .severity("warning")
            .details(serde_json::json!({ "required_permissions": required, "missing_permissions": missing }));
        state.audit_alone(self.audit_context(), event).await?;
        Err(ApiError::forbidden(missing))
    }

    /// Like [`Caller::require`] for platform resources (tenants, canons, routes):
    /// the caller must also be of the system tenant, where platform
    /// administrators live. Elsewhere the answer is the same 403.
    pub async fn require_platform(
        &self,
        state: &AppState,
        permissions: &[&str],
    ) -> Result<(), ApiError> {
        self.require(state, permissions).await?;
        if self.tenant_id() != crate::identity::SYSTEM_TENANT_ID {
            return Err(ApiError::forbidden(
                permissions.iter().map(|p| p.to_string()).collect(),
            ));
        }
        Ok(())
    }

    /// Refuses a body that names another tenant: 400, and a `security.cross_tenant_attempt` entry.
    pub async fn refuse_foreign_tenant(
        &self,
        state: &AppState,
        body_tenant_id: Option<&str>,
    ) -> Result<(), ApiError> {
        match body_tenant_id {
            Some(named) if named != self.tenant_id() => {
                let event = AuditEvent::new("security.cross_tenant_attempt")
                    .outcome("deny")
                    .severity("critical")
                    .details(serde_json::json!({ "named_tenant_id": named.chars().take(64).collect::<String>() }));
                state.audit_alone(self.audit_context(), event).await?;
                Err(ApiError::invalid_field(
                    "tenant_id",
                    "must be the caller's own tenant (the tenant comes from the token)",
                ))
            }
            _ => Ok(()),
        }
    }

    /// The audit context of this request.
    pub fn audit_context(&self) -> AuditContext {
        AuditContext {
            tenant_id: self.principal.tenant_id.clone(),
            actor_type: self.principal.actor_type,
            actor_id: Some(self.principal.subject_id.clone()),
            client_ip: self.client_ip.map(|ip| ip.to_string()),
            user_agent: self.user_agent.clone(),
            correlation_id: Some(self.correlation_id.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for line in lines {
            h.append(X_FORWARDED_FOR, line.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_client_address_believes_only_trusted_proxies() {
        let trusted: Vec<IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::1/128".parse().unwrap(),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let proxy = ip("10.1.2.3");
        let spoofed = headers(&["6.6.6.6"]);
        // An untrusted peer is the client, whatever it claims.
        assert_eq!(
            client_address(ip("203.0.113.9"), &spoofed, &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_address(proxy, &spoofed, &[]),
            proxy,
            "no trusted proxies: the peer"
        );
        // A trusted peer: the last hop that is not trusted, from the right.
        assert_eq!(
            client_address(proxy, &headers(&["6.6.6.6, 198.51.100.7"]), &trusted),
            ip("198.51.100.7")
        );
        assert_eq!(
            client_address(
                proxy,
                &headers(&["6.6.6.6, 198.51.100.7, 10.9.9.9"]),
                &trusted
            ),
            ip("198.51.100.7")
        );
        assert_eq!(
            client_address(
                proxy,
                &headers(&["6.6.6.6", "198.51.100.7", "10.9.9.9"]),
                &trusted
            ),
            ip("198.51.100.7"),
            "several header lines"
        );
        assert_eq!(
            client_address(proxy, &headers(&["[2001:db8::7]:443"]), &trusted),
            ip("2001:db8::7")
        );
        assert_eq!(
            client_address(
                ip("2001:db8::1"),
                &headers(&["198.51.100.7:5000"]),
                &trusted
            ),
            ip("198.51.100.7")
        );
        // Garbage stops the walk at the last trusted hop; no header leaves the proxy.
        assert_eq!(
            client_address(proxy, &headers(&["6.6.6.6, not-an-ip, 10.9.9.9"]), &trusted),
            ip("10.9.9.9")
        );
        assert_eq!(client_address(proxy, &HeaderMap::new(), &trusted), proxy);
        // A mapped IPv4 peer is the IPv4 address.
        assert_eq!(
            client_address(ip("::ffff:203.0.113.9"), &spoofed, &trusted),
            ip("203.0.113.9")
        );
        // Thousands of hops cost no more than the cap.
        let long = vec!["10.0.0.1"; 5000].join(",");
        assert_eq!(
            client_address(proxy, &headers(&[&long]), &trusted),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn user_agents_are_cut_by_characters() {
        let max = limits::USER_AGENT_CHARS_MAX;
        assert_eq!(truncated_user_agent("curl/8.5"), "curl/8.5");
        assert_eq!(truncated_user_agent(&"a".repeat(max + 10)), "a".repeat(max));
        let accented = "é".repeat(max - 10);
        assert_eq!(
            truncated_user_agent(&accented),
            accented,
            "more bytes than the limit, fewer characters"
        );
        assert_eq!(truncated_user_agent(&"é".repeat(max + 10)), "é".repeat(max));
    }
}
