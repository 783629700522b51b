//! What a canon or a route may look like. Every check answers with the field it
//! concerns, so a client sees all that is wrong with one request.

use std::collections::HashSet;

use super::{CanonPermission, CanonTlsInput, IDEMPOTENCY_MODES, ROUTE_METHODS, RouteRateLimit};
use crate::authz::is_permission_name;
use crate::limits;

/// A problem with one field.
pub type FieldProblem = (&'static str, String);

/// Canon names are slugs, like tenant slugs: `^[a-z0-9][a-z0-9-]{1,62}$`.
pub fn canon_name(name: &str) -> Result<(), FieldProblem> {
    let ok = (2..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err((
            "name",
            "must match ^[a-z0-9][a-z0-9-]{1,62}$ (lowercase letters, digits, '-')".into(),
        ))
    }
}

/// `http` or `https`, a host, an optional port and path; no user-info, query or
/// fragment. Returned without a trailing `/`, so `base_url + path` joins cleanly.
pub fn base_url(text: &str) -> Result<String, FieldProblem> {
    let bad = |why: &str| Err(("base_url", why.to_owned()));
    if text.len() > limits::URL_BYTES_MAX {
        return bad("is too long");
    }
    if text.contains(['#', '?', '\\']) || text.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return bad("must have no query, fragment, backslash or whitespace");
    }
    let Ok(uri) = text.parse::<http::Uri>() else {
        return bad("is not a URL");
    };
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return bad("must start with http:// or https://");
    }
    let Some(authority) = uri.authority() else {
        return bad("must name a host");
    };
    if authority.as_str().contains('@') {
        return bad("must not carry user-info (credentials in URLs end up in logs)");
    }
    if authority.host().is_empty() {
        return bad("must name a host");
    }
    let path = uri.path();
    if path
        .split('/')
        .any(|s| s == "." || s == ".." || s.contains('%'))
    {
        return bad("must have a plain path (no '.', '..' or percent-encoding)");
    }
    Ok(text.trim_end_matches('/').to_owned())
}

/// `http1`, or `h2c` for an `http://` cell only (over TLS, HTTP/2 is negotiated).
pub fn protocol(text: &str, base_url: &str) -> Result<(), FieldProblem> {
    if !super::PROTOCOLS.contains(&text) {
        return Err((
            "protocol",
            format!("must be one of {}", super::PROTOCOLS.join(", ")),
        ));
    }
    if text == "h2c" && !base_url.starts_with("http://") {
        return Err((
            "protocol",
            "h2c is for http:// cells; https cells negotiate HTTP/2 themselves".into(),
        ));
    }
    Ok(())
}

/// An absolute path for health checks (`/health`), optionally with a query.
pub fn health_path(text: &str) -> Result<(), FieldProblem> {
    let ok = text.starts_with('/')
        && text.len() <= limits::ROUTE_PATH_BYTES_MAX
        && !text.contains(['#', '\\'])
        && !text.chars().any(|c| c.is_whitespace() || c.is_control())
        && !text.split(['/', '?']).any(|s| s == "..");
    if ok {
        Ok(())
    } else {
        Err((
            "health_path",
            "must be an absolute path such as /health, without '..', '#', '\\' or whitespace"
                .into(),
        ))
    }
}

/// A canon's own TLS settings: for `https` cells only, bounded, a client
/// certificate only with its key, and usable as the gateway would build them.
pub fn tls(input: &CanonTlsInput, base_url: &str) -> Result<(), FieldProblem> {
    if !base_url.starts_with("https://") {
        return Err(("tls", "is only for https:// cells".into()));
    }
    let fields = [
        ("tls.ca_bundle_pem", &input.ca_bundle_pem),
        ("tls.client_cert_pem", &input.client_cert_pem),
        ("tls.client_key_pem", &input.client_key_pem),
    ];
    if fields.iter().all(|(_, v)| v.is_none()) {
        return Err((
            "tls",
            "names none of ca_bundle_pem, client_cert_pem, client_key_pem; send null to remove it"
                .into(),
        ));
    }
    for (field, value) in fields {
        if value
            .as_ref()
            .is_some_and(|v| v.len() > limits::CANON_TLS_PEM_BYTES_MAX)
        {
            return Err((
                field,
                format!("is longer than {} bytes", limits::CANON_TLS_PEM_BYTES_MAX),
            ));
        }
    }
    let client = match (&input.client_cert_pem, &input.client_key_pem) {
        (Some(cert), Some(key)) => Some((cert.as_str(), key.as_str())),
        (None, None) => None,
        (Some(_), None) => {
            return Err((
                "tls.client_key_pem",
                "is required with client_cert_pem".into(),
            ));
        }
        (None, Some(_)) => {
            return Err((
                "tls.client_cert_pem",
                "is required with client_key_pem".into(),
            ));
        }
    };
    crate::gateway::client::tls_config(input.ca_bundle_pem.as_deref(), client).map(|_| ())
}

/// Upstream timeouts: 1 ms to ten minutes.
pub fn timeout_ms(field: &'static str, value: Option<i64>) -> Result<(), FieldProblem> {
    match value {
        Some(v) if !(1..=limits::UPSTREAM_TIMEOUT_MS_MAX as i64).contains(&v) => Err((
            field,
            format!("must be between 1 and {}", limits::UPSTREAM_TIMEOUT_MS_MAX),
        )),
        _ => Ok(()),
    }
}

/// Permissions a canon defines: canonical names outside `kernel.`, unique,
/// described, bounded in number.
pub fn canon_permissions(list: &[CanonPermission]) -> Result<(), FieldProblem> {
    if list.len() > limits::CANON_PERMISSIONS_MAX {
        return Err((
            "permissions",
            format!("at most {} permissions", limits::CANON_PERMISSIONS_MAX),
        ));
    }
    let mut seen = HashSet::new();
    for p in list {
        if !is_permission_name(&p.name) {
            return Err((
                "permissions",
                format!(
                    "{:?} is not a canonical permission name (such as finance.payment.execute)",
                    shorten(&p.name)
                ),
            ));
        }
        if p.name.starts_with("kernel.") {
            return Err((
                "permissions",
                format!("{} is in the kernel's namespace", p.name),
            ));
        }
        if !(1..=limits::DESCRIPTION_CHARS_MAX).contains(&p.description.chars().count()) {
            return Err((
                "permissions",
                format!(
                    "{}: the description must be 1 to {} characters",
                    p.name,
                    limits::DESCRIPTION_CHARS_MAX
                ),
            ));
        }
        if !seen.insert(p.name.as_str()) {
            return Err(("permissions", format!("{} is listed twice", p.name)));
        }
    }
    Ok(())
}

/// A route's method, upper-cased.
pub fn route_method(text: &str) -> Result<String, FieldProblem> {
    let upper = text.to_ascii_uppercase();
    if ROUTE_METHODS.contains(&upper.as_str()) {
        Ok(upper)
    } else {
        Err((
            "method",
            format!("must be one of {}", ROUTE_METHODS.join(", ")),
        ))
    }
}

/// A route path: `/`, or `/`-separated segments, each a literal of URL path
/// characters or a `{param}`; no empty, `.` or `..` segment, no percent-encoding,
/// no repeated parameter name. Returns its shape, with every parameter written
/// `{}`: two routes of one canon and method with the same shape match the same
/// requests, which the database refuses.
pub fn route_path(text: &str) -> Result<String, FieldProblem> {
    let bad = |why: String| Err(("path", why));
    if !text.starts_with('/') {
        return bad("must start with '/'".into());
    }
    if text.len() > limits::ROUTE_PATH_BYTES_MAX {
        return bad(format!(
            "must be at most {} bytes",
            limits::ROUTE_PATH_BYTES_MAX
        ));
    }
    if text == "/" {
        return Ok("/".into());
    }
    let segments: Vec<&str> = text[1..].split('/').collect();
    if segments.len() > limits::ROUTE_SEGMENTS_MAX {
        return bad(format!(
            "must have at most {} segments",
            limits::ROUTE_SEGMENTS_MAX
        ));
    }
    let mut params = HashSet::new();
    let mut shape = String::with_capacity(text.len());
    for segment in segments {
        shape.push('/');
        if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            let ok = name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !ok {
                return bad(format!(
                    "{{{}}}: parameter names are lowercase letters, digits and '_'",
                    shorten(name)
                ));
            }
            if !params.insert(name) {
                return bad(format!("{{{name}}} appears twice"));
            }
            shape.push_str("{}");
        } else {
            if segment.is_empty() {
                return bad("must not contain empty segments ('//') or end with '/'".into());
            }
            if segment == "." || segment == ".." {
                return bad("must not contain '.' or '..' segments".into());
            }
            if !segment.chars().all(is_path_char) {
                return bad(format!(
                    "{:?}: segments are letters, digits and -._~!$&'()*+,=:@ (no '%', ';', '{{' or '}}' inside a segment)",
                    shorten(segment)
                ));
            }
            shape.push_str(segment);
        }
    }
    Ok(shape)
}

/// RFC 3986 `pchar` without percent-encoding, and without `;`: the gateway
/// refuses every path holding one (`gateway::path`), so such a route could
/// never be called.
fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()*+,=:@".contains(c)
}

/// Permissions a route requires: exact canonical names, unique, bounded.
pub fn required_permissions(list: &[String]) -> Result<(), FieldProblem> {
    if list.len() > limits::PERMISSIONS_PER_GRANT_MAX {
        return Err((
            "required_permissions",
            format!("at most {} permissions", limits::PERMISSIONS_PER_GRANT_MAX),
        ));
    }
    if let Some(bad) = list.iter().find(|p| !is_permission_name(p)) {
        return Err((
            "required_permissions",
            format!("{:?} is not a canonical permission name", shorten(bad)),
        ));
    }
    Ok(())
}

/// Who may call a route: the holders of its permissions, or, only when said
/// explicitly, every authenticated caller of every tenant. A route created
/// without permissions by oversight would otherwise be open to all of them.
pub fn route_access(
    required_permissions: &[String],
    public_to_authenticated: bool,
) -> Result<(), FieldProblem> {
    match (required_permissions.is_empty(), public_to_authenticated) {
        (true, false) => Err((
            "required_permissions",
            "must name at least one permission; a route open to every authenticated caller \
             of every tenant sets \"public_to_authenticated\": true instead"
                .to_owned(),
        )),
        (false, true) => Err((
            "public_to_authenticated",
            "a route open to every authenticated caller requires no permission; \
             remove required_permissions or set it false"
                .to_owned(),
        )),
        _ => Ok(()),
    }
}

/// `off`, `optional` or `required`.
pub fn idempotency(text: &str) -> Result<(), FieldProblem> {
    if IDEMPOTENCY_MODES.contains(&text) {
        Ok(())
    } else {
        Err((
            "idempotency",
            format!("must be one of {}", IDEMPOTENCY_MODES.join(", ")),
        ))
    }
}

/// A per-route rate limit: 1 to a million per minute, burst at most that.
pub fn rate_limit(limit: &Option<RouteRateLimit>) -> Result<(), FieldProblem> {
    match limit {
        Some(l) if !(1..=limits::RATE_PER_MINUTE_MAX).contains(&u64::from(l.per_minute)) => Err((
            "rate_limit",
            format!(
                "per_minute must be between 1 and {}",
                limits::RATE_PER_MINUTE_MAX
            ),
        )),
        Some(RouteRateLimit { burst: Some(b), .. })
            if !(1..=limits::RATE_PER_MINUTE_MAX).contains(&u64::from(*b)) =>
        {
            Err((
                "rate_limit",
                format!(
                    "burst must be between 1 and {}",
                    limits::RATE_PER_MINUTE_MAX
                ),
            ))
        }
        _ => Ok(()),
    }
}

fn shorten(text: &str) -> String {
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(
            base_url("http://127.0.0.1:4000/").unwrap(),
            "http://127.0.0.1:4000"
        );
        assert_eq!(
            base_url("https://pay.internal/v1").unwrap(),
            "https://pay.internal/v1"
        );
        for bad in [
            "ftp://x",
            "http://user:pw@host",
            "http://host/#frag",
            "http://host/?q=1",
            "//host",
            "host:80",
            "http://host/a/../b",
            "http://host/%2e%2e",
            "http:///path",
            "javascript:alert(1)",
            "http://host/a b",
        ] {
            assert!(base_url(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn route_paths_and_shapes() {
        assert_eq!(route_path("/").unwrap(), "/");
        assert_eq!(route_path("/payments").unwrap(), "/payments");
        assert_eq!(
            route_path("/payments/{id}/refunds/{refund_id}").unwrap(),
            "/payments/{}/refunds/{}"
        );
        assert_eq!(route_path("/a/{x}").unwrap(), route_path("/a/{y}").unwrap());
        for bad in [
            "payments",
            "/a//b",
            "/a/",
            "/a/../b",
            "/a/./b",
            "/a/%2e%2e",
            "/a/{X}",
            "/a/{x}/{x}",
            "/a/{}",
            "/a/b{x}",
            "/a/{x",
            "/a\\b",
            "/a b",
            "/a/{*rest}",
            "/reports/export;x",
            "/a;v=1/b",
        ] {
            assert!(route_path(bad).is_err(), "{bad} was accepted");
        }
        assert!(route_path(&format!("/{}", "a/".repeat(40).trim_end_matches('/'))).is_err());
    }

    #[test]
    fn a_route_names_a_permission_or_says_it_is_public() {
        let some = ["finance.payment.read".to_owned()];
        assert!(route_access(&some, false).is_ok());
        assert!(route_access(&[], true).is_ok());
        assert_eq!(
            route_access(&[], false).unwrap_err().0,
            "required_permissions"
        );
        assert_eq!(
            route_access(&some, true).unwrap_err().0,
            "public_to_authenticated"
        );
    }

    #[test]
    fn names_methods_and_permissions() {
        assert!(canon_name("payment-hub").is_ok());
        assert!(canon_name("Payment").is_err());
        assert!(canon_name("-x").is_err());
        assert!(canon_name("a").is_err());
        assert_eq!(route_method("get").unwrap(), "GET");
        assert!(route_method("TRACE").is_err());
        let p = |n: &str| CanonPermission {
            name: n.into(),
            description: "d".into(),
        };
        assert!(canon_permissions(&[p("finance.payment.execute")]).is_ok());
        assert!(canon_permissions(&[p("kernel.user.read")]).is_err());
        assert!(canon_permissions(&[p("Finance.x")]).is_err());
        assert!(canon_permissions(&[p("finance.x"), p("finance.x")]).is_err());
        assert!(required_permissions(&["finance.*".into()]).is_err());
        assert!(idempotency("required").is_ok() && idempotency("always").is_err());
        assert!(
            timeout_ms("timeout_ms", Some(0)).is_err() && timeout_ms("timeout_ms", None).is_ok()
        );
        assert!(
            health_path("/health").is_ok()
                && health_path("health").is_err()
                && health_path("/../x").is_err()
        );
    }
}
