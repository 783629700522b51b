//! The route table: the registry compiled into matchers held in memory and
//! swapped whole on every change, so a proxied request never queries the database.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::uri::{Authority, Scheme};
use axum::http::{HeaderValue, Method};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::client::{CanonTls, PoolKey};
use super::state::CanonState;
use super::telemetry::RouteMetrics;
use crate::registry::Route;
use crate::registry::store::Snapshot;
use crate::telemetry::Metrics;

/// Every canon by name.
#[derive(Default)]
pub struct RouteTable {
    /// Keyed by names an administrator chose, never by a client: a fast hash
    /// without DoS hardening (looked up on every proxied call).
    canons: foldhash::HashMap<String, Arc<CanonEntry>>,
}

impl RouteTable {
    /// The canon called `name`.
    pub fn canon(&self, name: &str) -> Option<&Arc<CanonEntry>> {
        self.canons.get(name)
    }

    /// Every canon (health checks walk these).
    pub fn canons(&self) -> impl Iterator<Item = &Arc<CanonEntry>> {
        self.canons.values()
    }

    /// Compiles a registry snapshot. `states` keeps each canon's breaker, health
    /// and budget across rebuilds (a route change must not close an open circuit);
    /// states of canons that no longer exist are dropped from it.
    ///
    /// What cannot be routed is left out of the table (fail closed: a canon
    /// whose base URL does not parse or whose routes conflict, a route that
    /// names no permission without being public) and named in the returned
    /// problems: a registry change refuses to add one (`registry_write`), a
    /// rebuild at start or on another instance's change logs them.
    pub fn compile(
        snapshot: Snapshot,
        states: &mut HashMap<String, Arc<CanonState>>,
        metrics: &Metrics,
    ) -> (RouteTable, Vec<String>) {
        let mut problems = Vec::new();
        let mut secrets: HashMap<String, (String, String)> = snapshot
            .active_secrets
            .into_iter()
            .map(|(canon, kid, secret)| (canon, (kid, secret)))
            .collect();
        let mut client_keys: HashMap<String, String> =
            snapshot.tls_client_keys.into_iter().collect();
        let mut routes_by_canon: HashMap<String, Vec<Route>> = HashMap::new();
        for route in snapshot.routes {
            routes_by_canon
                .entry(route.canon_id.clone())
                .or_default()
                .push(route);
        }
        states.retain(|id, _| snapshot.canons.iter().any(|c| &c.id == id));
        let mut canons = foldhash::HashMap::with_capacity_and_hasher(
            snapshot.canons.len(),
            foldhash::fast::RandomState::default(),
        );
        for row in snapshot.canons {
            let Some(base) = BaseUrl::parse(&row.base_url) else {
                // Validated on the way in; a row edited by hand is skipped.
                problems.push(format!(
                    "canon {}: its base_url is unusable; it is not routed",
                    row.name
                ));
                continue;
            };
            let state = states
                .entry(row.id.clone())
                .or_insert_with(|| Arc::new(CanonState::new(metrics, &row.name)))
                .clone();
            let signer = secrets
                .remove(&row.id)
                .map(|(kid, secret)| Signer::new(kid, &secret));
            let client_key = client_keys.remove(&row.id);
            let tls = if row.tls_ca_pem.is_some() || row.tls_client_cert_pem.is_some() {
                let client = row
                    .tls_client_cert_pem
                    .as_deref()
                    .zip(client_key.as_deref());
                match super::client::tls_config(row.tls_ca_pem.as_deref(), client) {
                    Ok(config) => Some(CanonTls {
                        canon_id: row.id.as_str().into(),
                        config: Arc::new(config),
                    }),
                    Err((field, why)) => {
                        // Validated on the way in; a row edited by hand is
                        // left out, and a change that would leave it out refused.
                        problems.push(format!(
                            "canon {}: its TLS settings are unusable ({field}: {why}); it is not routed",
                            row.name
                        ));
                        continue;
                    }
                }
            } else {
                None
            };
            let mut routes = routes_by_canon.remove(&row.id).unwrap_or_default();
            // Checked on the way in (and old rows marked public by migration
            // 0006); a row edited by hand would otherwise open the route to
            // every authenticated caller of every tenant.
            routes.retain(|r| {
                let open = r.required_permissions.is_empty() && !r.public_to_authenticated;
                if open {
                    problems.push(format!(
                        "canon {}: route {} {} names no permission and is not public_to_authenticated; it is not routed",
                        row.name, r.method, r.path
                    ));
                }
                !open
            });
            let matcher = match Matcher::build(&routes) {
                Ok(m) => m,
                Err(e) => {
                    problems.push(format!(
                        "canon {}: its routes conflict ({e}); it is not routed",
                        row.name
                    ));
                    continue;
                }
            };
            let entries = routes
                .into_iter()
                .map(|r| RouteEntry {
                    metrics: RouteMetrics::new(metrics, &row.name, &r.method, &r.path),
                    id: r.id,
                    path: r.path,
                    required_permissions: r.required_permissions,
                    timeout: r.timeout_ms.and_then(millis),
                    forward_cookies: r.forward_cookies,
                    audit_calls: r.audit_calls,
                    rate_limit: r.rate_limit,
                    idempotency: crate::idempotency::gateway::Mode::parse(&r.idempotency),
                })
                .collect();
            canons.insert(
                row.name.clone(),
                Arc::new(CanonEntry {
                    id: row.id,
                    name: row.name,
                    base,
                    health_path: row.health_path,
                    h2c: row.protocol == "h2c",
                    timeout: row.timeout_ms.and_then(millis),
                    signer,
                    tls,
                    state,
                    routes: entries,
                    matcher,
                }),
            );
        }
        (RouteTable { canons }, problems)
    }
}

fn millis(ms: i64) -> Option<Duration> {
    u64::try_from(ms).ok().map(Duration::from_millis)
}

/// One canon, ready to route to.
pub struct CanonEntry {
    /// UUIDv7.
    pub id: String,
    /// The slug in gateway paths.
    pub name: String,
    /// Where the cell listens.
    pub base: BaseUrl,
    /// Path of active health checks.
    pub health_path: String,
    /// HTTP/2 with prior knowledge (`h2c`) instead of HTTP/1.1.
    pub h2c: bool,
    /// The canon's own timeout, if set.
    pub timeout: Option<Duration>,
    /// Signs assertions with the active secret; `None` only if a DBA removed it.
    pub signer: Option<Signer>,
    /// The canon's own TLS settings (https cells), if it has any.
    pub tls: Option<CanonTls>,
    /// Breaker, health, retry budget and metrics, kept across rebuilds.
    pub state: Arc<CanonState>,
    routes: Vec<RouteEntry>,
    matcher: Matcher,
}

impl CanonEntry {
    /// The route for `method` and the decoded `path` (which starts with `/`).
    pub fn route(&self, method: &Method, path: &str) -> Option<&RouteEntry> {
        self.matcher.find(method, path).map(|i| &self.routes[i])
    }
}

/// One route, ready to serve.
pub struct RouteEntry {
    /// UUIDv7.
    pub id: String,
    /// The route's path pattern (for metrics and audit).
    pub path: String,
    /// Permissions the caller must all hold.
    pub required_permissions: Vec<String>,
    /// The route's own timeout, if set.
    pub timeout: Option<Duration>,
    /// Whether `Cookie` reaches the cell.
    pub forward_cookies: bool,
    /// Every call leaves a `gateway.call` audit entry (`gateway::proxy::CallAudit`).
    pub audit_calls: bool,
    /// The route's own per-user rate limit, replacing `rate_limit.user_*`.
    pub rate_limit: Option<crate::registry::RouteRateLimit>,
    /// How `Idempotency-Key` is treated (`idempotency::gateway`).
    pub idempotency: crate::idempotency::gateway::Mode,
    /// Cached metric handles.
    pub metrics: RouteMetrics,
}

/// A canon's base URL, split once for building upstream URIs.
pub struct BaseUrl {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and port.
    pub authority: Authority,
    /// Path prefix without a trailing `/` (often empty).
    pub path_prefix: String,
    /// `Host` of HTTP/1.1 requests to the cell.
    pub host_header: HeaderValue,
    /// The cell's key in the event loops' connection pools.
    pub pool_key: PoolKey,
}

impl BaseUrl {
    /// Parses a validated base URL.
    pub fn parse(text: &str) -> Option<BaseUrl> {
        let uri: axum::http::Uri = text.parse().ok()?;
        let scheme = uri.scheme()?.clone();
        let authority = uri.authority()?.clone();
        Some(BaseUrl {
            scheme,
            host_header: HeaderValue::from_str(authority.as_str()).ok()?,
            pool_key: PoolKey::of(&authority),
            authority,
            path_prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

/// Signs `x-kernel-assertion` (a compact HS256 JWS) with a canon's active
/// secret. The encoded header and the keyed HMAC state are computed once per
/// table build, so a signature costs two base64 encodings and the SHA-256
/// compressions of a few blocks.
pub struct Signer {
    /// `base64url({"alg":"HS256","typ":"JWT","kid":…})` followed by `.`.
    header_b64: String,
    /// HMAC-SHA256 already keyed with the secret; cloned per signature.
    mac: Hmac<Sha256>,
}

impl Signer {
    /// A signer for secret `secret` named `kid`.
    pub fn new(kid: String, secret: &str) -> Signer {
        let header = serde_json::json!({ "alg": "HS256", "typ": "JWT", "kid": kid });
        let mut header_b64 = URL_SAFE_NO_PAD.encode(header.to_string());
        header_b64.push('.');
        Signer {
            header_b64,
            mac: Hmac::<Sha256>::new_from_slice(secret.as_bytes())
                .expect("HMAC takes keys of any length"),
        }
    }

    /// The compact JWS of `payload`, the claims as JSON (the gateway writes
    /// them itself, `gateway::forward`).
    pub fn sign(&self, payload: &[u8]) -> String {
        // Encoded straight into the token's buffer (`encode_string` goes through a
        // chunked writer that checks every chunk is UTF-8); checked once at the end.
        let mut token = Vec::with_capacity(self.header_b64.len() + payload.len() * 4 / 3 + 48);
        token.extend_from_slice(self.header_b64.as_bytes());
        append_base64url(&mut token, payload);
        let mut mac = self.mac.clone();
        mac.update(&token);
        let signature = mac.finalize().into_bytes();
        token.push(b'.');
        append_base64url(&mut token, &signature);
        String::from_utf8(token).expect("base64url and the JWS header are ASCII")
    }
}

/// Appends the unpadded base64url of `bytes` to `out`.
fn append_base64url(out: &mut Vec<u8>, bytes: &[u8]) {
    let start = out.len();
    let encoded =
        base64::encoded_len(bytes.len(), false).expect("a signed token is far below usize");
    out.resize(start + encoded, 0);
    let written = URL_SAFE_NO_PAD
        .encode_slice(bytes, &mut out[start..])
        .expect("the buffer is exactly the encoded length");
    out.truncate(start + written);
}

/// Method-specific matchers first, then `ANY`. `HEAD` falls back to `GET`.
#[derive(Default)]
struct Matcher {
    /// A fast hash: the keys are the route table's methods, looked up per call.
    by_method: foldhash::HashMap<Method, matchit::Router<usize>>,
    any: matchit::Router<usize>,
}

impl Matcher {
    /// Builds the matcher of one canon's routes; an error names a conflict.
    fn build(routes: &[Route]) -> Result<Matcher, String> {
        let mut matcher = Matcher::default();
        for (index, route) in routes.iter().enumerate() {
            let pattern = positional_pattern(&route.path);
            let router = if route.method == "ANY" {
                &mut matcher.any
            } else {
                let method =
                    Method::from_bytes(route.method.as_bytes()).map_err(|e| e.to_string())?;
                matcher.by_method.entry(method).or_default()
            };
            router
                .insert(pattern, index)
                .map_err(|e| format!("{} {}: {e}", route.method, route.path))?;
        }
        Ok(matcher)
    }

    fn find(&self, method: &Method, path: &str) -> Option<usize> {
        let specific = self.by_method.get(method).or_else(|| {
            (method == Method::HEAD)
                .then(|| self.by_method.get(&Method::GET))
                .flatten()
        });
        specific
            .and_then(|r| r.at(path).ok())
            .or_else(|| self.any.at(path).ok())
            .map(|m| *m.value)
    }
}

/// `/payments/{id}/refunds/{rid}` → `/payments/{p0}/refunds/{p1}`: matchit
/// refuses two routes whose parameters differ only by name at one position,
/// and the gateway needs which route matched, not the values.
fn positional_pattern(path: &str) -> String {
    let mut n = 0;
    path.split('/')
        .map(|segment| {
            if segment.starts_with('{') {
                n += 1;
                format!("{{p{}}}", n - 1)
            } else {
                segment.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Whether `candidate` can join `existing` routes of a canon without a conflict
/// the matcher would refuse.
pub fn check_routes(existing: &[Route], candidate: &Route) -> Result<(), String> {
    let mut all: Vec<Route> = existing
        .iter()
        .filter(|r| r.id != candidate.id)
        .cloned()
        .collect();
    all.push(candidate.clone());
    Matcher::build(&all).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(id: &str, method: &str, path: &str) -> Route {
        Route {
            id: id.into(),
            canon_id: "c".into(),
            method: method.into(),
            path: path.into(),
            required_permissions: vec![],
            public_to_authenticated: true,
            idempotency: "off".into(),
            rate_limit: None,
            timeout_ms: None,
            forward_cookies: false,
            audit_calls: false,
            version: 1,
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    fn canon(id: &str, name: &str, base_url: &str) -> crate::registry::store::CanonRow {
        crate::registry::store::CanonRow {
            id: id.into(),
            name: name.into(),
            base_url: base_url.into(),
            health_path: "/health".into(),
            protocol: "http1".into(),
            timeout_ms: None,
            permissions: "[]".into(),
            tls_ca_pem: None,
            tls_client_cert_pem: None,
            tls_client_key: None,
            version: 1,
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    #[test]
    fn what_cannot_be_routed_is_left_out_and_named() {
        let mut open = route("r2", "GET", "/open");
        open.canon_id = "c1".into();
        open.public_to_authenticated = false;
        let mut fine = route("r1", "GET", "/fine");
        fine.canon_id = "c1".into();
        fine.required_permissions = vec!["finance.payment.read".into()];
        let snapshot = Snapshot {
            canons: vec![
                canon("c1", "pay", "http://127.0.0.1:9"),
                canon("c2", "broken", "not a url"),
            ],
            active_secrets: vec![],
            tls_client_keys: vec![],
            routes: vec![fine, open],
        };
        let mut states = HashMap::new();
        let (table, problems) = RouteTable::compile(snapshot, &mut states, &Metrics::new());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("GET /open names no permission"),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("canon broken: its base_url is unusable"),
            "{problems:?}"
        );
        let pay = table.canon("pay").expect("the rest of the canon is routed");
        assert!(pay.route(&Method::GET, "/fine").is_some());
        assert!(pay.route(&Method::GET, "/open").is_none(), "fail closed");
        assert!(table.canon("broken").is_none());
    }

    #[test]
    fn methods_params_any_and_head() {
        let routes = vec![
            route("1", "GET", "/payments/{id}"),
            route("2", "POST", "/payments"),
            route("3", "ANY", "/payments/{payment_id}"),
            route("4", "GET", "/payments/{id}/refunds/{rid}"),
            route("5", "GET", "/"),
        ];
        let m = Matcher::build(&routes).unwrap();
        assert_eq!(m.find(&Method::GET, "/payments/42"), Some(0));
        assert_eq!(m.find(&Method::HEAD, "/payments/42"), Some(0));
        assert_eq!(m.find(&Method::POST, "/payments"), Some(1));
        assert_eq!(m.find(&Method::DELETE, "/payments/42"), Some(2));
        assert_eq!(m.find(&Method::GET, "/payments/42/refunds/7"), Some(3));
        assert_eq!(m.find(&Method::GET, "/"), Some(4));
        assert_eq!(m.find(&Method::GET, "/payments"), None);
        assert_eq!(m.find(&Method::GET, "/payments/42/x"), None);
        assert_eq!(m.find(&Method::GET, "/other"), None);
    }

    /// The signer is hand-tuned; the cell SDK's verifier (`aibos_wire::jws`,
    /// checked against the RFC 7515 example) must accept what it writes.
    #[test]
    fn signatures_verify_with_the_cells_jws_verifier() {
        use aibos_wire::jws;
        let secret = "kas_0123456789abcdef_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_xyz";
        let signer = Signer::new("0123456789abcdef".into(), secret);
        let claims = serde_json::json!({ "iss": "aibos-kernel", "aud": "payments", "exp": 4_000_000_000u64, "sub": "u" });
        let token = signer.sign(&serde_json::to_vec(&claims).unwrap());
        let validation = jws::Validation::new("aibos-kernel", "payments");
        let key = jws::VerifyingKey::hs256(secret.as_bytes());
        let verified: serde_json::Value =
            jws::verify(&token, &key, &validation, 1_750_000_000).unwrap();
        assert_eq!(verified, claims);
        let header = jws::decode_header(&token).unwrap();
        assert_eq!(header.alg, "HS256");
        assert_eq!(header.kid.as_deref(), Some("0123456789abcdef"));
        let other = jws::VerifyingKey::hs256(b"another secret");
        assert_eq!(
            jws::verify::<serde_json::Value>(&token, &other, &validation, 1_750_000_000),
            Err(jws::JwsError::BadSignature)
        );
    }

    #[test]
    fn same_shape_different_names_conflict() {
        let existing = vec![route("1", "GET", "/a/{x}")];
        assert!(check_routes(&existing, &route("2", "GET", "/a/{y}")).is_err());
        assert!(check_routes(&existing, &route("2", "POST", "/a/{y}")).is_ok());
        assert!(check_routes(&existing, &route("2", "GET", "/a/b")).is_ok());
        assert!(
            check_routes(&existing, &route("1", "GET", "/a/{y}")).is_ok(),
            "a route may replace itself"
        );
    }
}
