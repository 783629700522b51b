//! The service registry: canons (the cells behind the gateway), their assertion
//! secrets, and their routes.
//!
//! Canons and routes are platform resources: every tenant's calls go through
//! them, so only the system tenant's administrators manage them
//! ([`crate::authz::perm::PLATFORM`]). Every change is audited in the same
//! transaction, in which the gateway's route table is built from the changed
//! registry (a change it cannot build is refused); after the commit that table
//! is in force here and, on PostgreSQL, rebuilt in every other instance (NOTIFY).
//!
//! - [`validate`]: what a canon or route may look like.
//! - [`store`]: the SQL.
//! - [`routes`]: the HTTP endpoints.

pub mod routes;
pub mod store;
pub mod validate;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A permission a canon defines (`finance.payment.execute`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CanonPermission {
    /// Canonical dotted name, outside the `kernel.` namespace.
    pub name: String,
    /// What holding it allows.
    pub description: String,
}

/// A canon as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Canon {
    /// UUIDv7.
    pub id: String,
    /// Slug; the `{canon}` of `/api/gateway/{canon}/…` and the `aud` of its assertions.
    pub name: String,
    /// Where the cell listens (`http` or `https`, no user-info, query or fragment).
    pub base_url: String,
    /// Path the active health checks call.
    pub health_path: String,
    /// `http1` (HTTP/1.1, or HTTP/2 by ALPN for https), or `h2c`: HTTP/2 with
    /// prior knowledge to a plain-http cell.
    pub protocol: String,
    /// Upstream timeout; `null` uses `gateway.default_timeout_ms`.
    pub timeout_ms: Option<i64>,
    /// The permissions this canon defines.
    pub permissions: Vec<CanonPermission>,
    /// The canon's own TLS settings (https cells); `null`: the public roots, no client certificate.
    pub tls: Option<CanonTls>,
    /// `healthy`, `unhealthy` or `unknown` (not checked yet), as this kernel instance sees it.
    pub status: String,
    /// The circuit breaker: `closed`, `open` or `half_open`.
    pub circuit: String,
    /// Optimistic-concurrency version.
    pub version: i64,
    /// Creation time.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
}

/// A canon's own TLS settings as sent (https cells only). At least one field.
#[derive(Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CanonTlsInput {
    /// PEM certificates that verify the cell's certificate instead of the public roots.
    pub ca_bundle_pem: Option<String>,
    /// PEM certificate chain the kernel presents to the cell (mutual TLS), with `client_key_pem`.
    pub client_cert_pem: Option<String>,
    /// PEM private key of `client_cert_pem` (PKCS#8, PKCS#1 or SEC1). Stored sealed
    /// under the master key; never shown again, audited or logged.
    pub client_key_pem: Option<String>,
}

impl std::fmt::Debug for CanonTlsInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CanonTlsInput")
            .field("ca_bundle_pem", &self.ca_bundle_pem.is_some())
            .field("client_cert_pem", &self.client_cert_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// A canon's own TLS settings as shown: never the private key.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CanonTls {
    /// The CA bundle that replaces the public roots, if any.
    pub ca_bundle_pem: Option<String>,
    /// The client certificate chain for mutual TLS, if any.
    pub client_cert_pem: Option<String>,
    /// Whether a client key is stored (it is never shown).
    pub client_key: bool,
}

/// How the gateway speaks to a canon.
pub const PROTOCOLS: [&str; 2] = ["http1", "h2c"];

/// How a route treats `Idempotency-Key`.
pub const IDEMPOTENCY_MODES: [&str; 3] = ["off", "optional", "required"];

/// Methods a route may name; `ANY` matches every method a more specific route
/// of the same path does not.
pub const ROUTE_METHODS: [&str; 6] = ["GET", "POST", "PUT", "PATCH", "DELETE", "ANY"];

/// A per-route rate limit override.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteRateLimit {
    /// Requests per minute per user on this route.
    pub per_minute: u32,
    /// Requests a user may send at once above the steady rate.
    pub burst: Option<u32>,
}

/// A gateway route as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Route {
    /// UUIDv7.
    pub id: String,
    /// The canon it forwards to.
    pub canon_id: String,
    /// `GET`, `POST`, `PUT`, `PATCH`, `DELETE` or `ANY`.
    pub method: String,
    /// Path under the canon, with `{param}` segments (`/payments/{id}`).
    pub path: String,
    /// Permissions the caller must all hold; at least one unless
    /// `public_to_authenticated`.
    pub required_permissions: Vec<String>,
    /// The route names no permission on purpose: every authenticated caller of
    /// every tenant may call it. Never true together with `required_permissions`.
    pub public_to_authenticated: bool,
    /// `off`, `optional` or `required`.
    pub idempotency: String,
    /// Per-route rate limit, overriding the user default.
    pub rate_limit: Option<RouteRateLimit>,
    /// Upstream timeout; `null` uses the canon's.
    pub timeout_ms: Option<i64>,
    /// Whether the client's `Cookie` header reaches the cell (off by default).
    pub forward_cookies: bool,
    /// Every call through the route leaves a `gateway.call` entry in the
    /// caller's tenant audit chain (off by default; meant for routes that move
    /// money). With an `Idempotency-Key` the entry is written in the transaction
    /// that stores the answer.
    pub audit_calls: bool,
    /// Optimistic-concurrency version.
    pub version: i64,
    /// Creation time.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
}

/// An assertion secret as listed: never the secret itself.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AssertionSecretInfo {
    /// Names the secret in the assertion's JWT header.
    pub kid: String,
    /// `active` (the kernel signs with it) or `inactive`.
    pub state: String,
    /// Creation time.
    pub created_at: String,
    /// When it was last made the active one.
    pub activated_at: Option<String>,
}

/// A new assertion secret, shown once.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NewAssertionSecret {
    /// Names the secret in the assertion's JWT header.
    pub kid: String,
    /// `kas_<kid>_<random>`: the HMAC key of the canon's assertions. Shown only now.
    pub secret: String,
}

/// A fresh assertion secret: `kas_<16 hex kid>_<43 base64url characters>`.
pub fn new_assertion_secret() -> NewAssertionSecret {
    use base64::Engine as _;
    let mut kid = [0u8; 8];
    let mut random = [0u8; 32];
    getrandom::fill(&mut kid).expect("the operating system's random source");
    getrandom::fill(&mut random).expect("the operating system's random source");
    let kid: String = kid.iter().map(|b| format!("{b:02x}")).collect();
    let random = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random);
    NewAssertionSecret {
        secret: format!("{}{kid}_{random}", aibos_wire::assertion::SECRET_PREFIX),
        kid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_secrets_parse_back_to_their_kid_and_differ() {
        let a = new_assertion_secret();
        let b = new_assertion_secret();
        assert_eq!(
            aibos_wire::assertion::secret_kid(&a.secret),
            Some(a.kid.as_str())
        );
        assert_ne!(a.secret, b.secret);
        assert_ne!(a.kid, b.kid);
    }
}
