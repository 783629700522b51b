//! What a cell receives: the client's headers minus everything that is not the
//! client's to say, plus the identity the kernel vouches for and its assertion.

use std::net::IpAddr;

use aibos_wire::assertion::{
    ACTOR_TYPE_HEADER, ASSERTION_HEADER, ASSERTION_LIFETIME_SECONDS, FORWARDED_FOR_HEADER,
    FORWARDED_IDENTITY_HEADERS, TENANT_HEADER, USER_HEADER,
};
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};

use super::table::Signer;
use crate::authz::cache::IdHeaders;
use crate::identity::tokens::ISSUER;
use crate::json_text::push_string;

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded in either direction.
/// A `static`: a `const` array would be built and dropped at every use.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Client headers that claim things about the connection or the caller; the
/// kernel says these itself or not at all. `x-forwarded-prefix` makes Spring
/// and others rebuild their own URLs (redirects, links) under a prefix the
/// client chose.
const SPOOFABLE: [&str; 6] = [
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-real-ip",
];

/// Client headers that change, at the cell, the method or the path the
/// gateway matched and authorized: a `POST` to a route open for `POST` that
/// Spring's `HiddenHttpMethodFilter`-style filters, Symfony, Laravel or IIS
/// would then serve as a `DELETE`, or as another URL altogether. Header names
/// are lowercase in a `HeaderMap`, so the comparison is case-insensitive.
const OVERRIDES: [&str; 5] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
];

/// The forwarded identity's header names, parsed once (a `&str` name is
/// parsed again on every insert).
mod names {
    use super::*;

    pub const TENANT: HeaderName = HeaderName::from_static(TENANT_HEADER);
    pub const USER: HeaderName = HeaderName::from_static(USER_HEADER);
    pub const ACTOR_TYPE: HeaderName = HeaderName::from_static(ACTOR_TYPE_HEADER);
    pub use crate::http::edge::{CORRELATION, TRACEPARENT};
    pub const FORWARDED_FOR: HeaderName = HeaderName::from_static(FORWARDED_FOR_HEADER);
    pub const ASSERTION: HeaderName = HeaderName::from_static(ASSERTION_HEADER);
}

/// Who is calling, as the kernel established it.
pub struct Identity<'a> {
    /// From the token's `tid`.
    pub tenant_id: &'a str,
    /// From the token's `sub`.
    pub subject: &'a str,
    /// Both as header values, made once per session.
    pub id_headers: &'a IdHeaders,
    /// `user` or `service`.
    pub actor_type: &'static str,
    /// The request's correlation id.
    pub correlation_id: &'a str,
    /// The client's address.
    pub client_ip: Option<IpAddr>,
    /// This hop's `traceparent`.
    pub traceparent: &'a str,
}

/// Replaces the assertion in headers made by [`upstream_headers`] (a retry's).
pub fn set_assertion(headers: &mut HeaderMap, assertion: String) {
    if let Ok(value) = HeaderValue::try_from(assertion) {
        headers.insert(names::ASSERTION, value);
    }
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
/// One pass finds the few present (a cell's response usually has one, its own
/// `Connection`), so that only those are removed: each removal hashes its name.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed = listed_by_connection(headers);
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name) || is_listed(&listed, name))
        .cloned()
        .collect();
    for name in &present {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name == header::UPGRADE
}

/// The header names the `Connection` header's values list (hop-by-hop by that
/// listing), lowercased, leaving out `keep-alive`, hop-by-hop anyway. Read once
/// per message: usually there are none (`Connection: keep-alive`), and then
/// nothing is allocated and no header is compared against them.
fn listed_by_connection(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty() && !token.eq_ignore_ascii_case("keep-alive"))
        .map(str::to_ascii_lowercase)
        .collect()
}

/// Whether `name` is among the `listed` names (header names are lowercase).
fn is_listed(listed: &[String], name: &HeaderName) -> bool {
    listed.iter().any(|token| token == name.as_str())
}

/// Whether a client header may reach the cell. One pass over the client's
/// headers with this test is cheaper than removing each forbidden name (every
/// removal hashes it), and a proxied request has few headers.
fn forwardable(name: &HeaderName, forward_cookies: bool, listed: &[String]) -> bool {
    if is_hop_by_hop(name)
        || name == header::HOST
        || name == header::AUTHORIZATION
        || (name == header::COOKIE && !forward_cookies)
        || is_listed(listed, name)
    {
        return false;
    }
    let text = name.as_str();
    // Every name of the three lists but `forwarded` and `traceparent` starts
    // with `x-`; most of a client's headers do not, and skip the comparisons.
    if !text.starts_with("x-") {
        return !(text == "forwarded" || text == "traceparent");
    }
    !(FORWARDED_IDENTITY_HEADERS.contains(&text)
        || SPOOFABLE.contains(&text)
        || OVERRIDES.contains(&text))
}

/// Turns the client's headers into the cell's. The assertion is taken by value:
/// its text becomes the header's bytes without a copy.
pub fn upstream_headers(
    headers: HeaderMap,
    identity: &Identity<'_>,
    forward_cookies: bool,
    assertion: Option<String>,
) -> HeaderMap {
    // Read before the map is consumed below.
    let listed = listed_by_connection(&headers);
    let mut out = HeaderMap::with_capacity(headers.len() + 8);
    let mut current: Option<HeaderName> = None;
    for (name, value) in headers {
        // `into_iter` names a header once, then yields its further values with `None`.
        if let Some(name) = name {
            current = forwardable(&name, forward_cookies, &listed).then_some(name);
        }
        if let Some(name) = &current {
            out.append(name.clone(), value);
        }
    }
    let mut set = |name: &HeaderName, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            out.insert(name.clone(), v);
        }
    };
    set(&names::CORRELATION, identity.correlation_id);
    set(&names::TRACEPARENT, identity.traceparent);
    out.insert(names::TENANT, identity.id_headers.tenant.clone());
    out.insert(names::USER, identity.id_headers.subject.clone());
    // A fixed word (`user` or `service`): no copy.
    out.insert(
        names::ACTOR_TYPE,
        HeaderValue::from_static(identity.actor_type),
    );
    if let Some(ip) = identity.client_ip {
        out.insert(names::FORWARDED_FOR, address_value(ip));
    }
    if let Some(value) = assertion.and_then(|a| HeaderValue::try_from(a).ok()) {
        out.insert(names::ASSERTION, value);
    }
    out
}

/// The client's address as a header value. IPv4, every proxied call's usual
/// case, is written digit by digit: `Display` goes through the formatting
/// machinery and a `String` first.
fn address_value(ip: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::try_from(ip.to_string())
            .expect("an IPv6 address's text is a valid header value");
    };
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            text[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            text[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        text[len] = b'0' + octet % 10;
        len += 1;
    }
    HeaderValue::from_bytes(&text[..len]).expect("digits and dots are a valid header value")
}

/// [`AssertionClaims`] by reference: signing allocates no copies of the values.
/// Written as JSON by hand ([`BorrowedClaims::write_json`]); a property test
/// keeps the text identical to serde's for the shared claims.
///
/// [`AssertionClaims`]: aibos_wire::assertion::AssertionClaims
struct BorrowedClaims<'a> {
    iss: &'a str,
    aud: &'a str,
    tid: &'a str,
    sub: &'a str,
    act: &'a str,
    cid: &'a str,
    htm: &'a str,
    htu: &'a str,
    iat: i64,
    exp: i64,
    jti: &'a str,
}

impl BorrowedClaims<'_> {
    /// The claims as compact JSON in serde's field order, appended to `out`.
    /// By hand because this runs once per proxied call, where serde's
    /// serializer state machine and its byte-by-byte escaping of every value
    /// cost more than the rest of the payload's making (`json_text`).
    fn write_json(&self, out: &mut Vec<u8>) {
        let strings = [
            ("{\"iss\":", self.iss),
            (",\"aud\":", self.aud),
            (",\"tid\":", self.tid),
            (",\"sub\":", self.sub),
            (",\"act\":", self.act),
            (",\"cid\":", self.cid),
            (",\"htm\":", self.htm),
            (",\"htu\":", self.htu),
        ];
        for (key, value) in strings {
            out.extend_from_slice(key.as_bytes());
            push_string(out, value);
        }
        let mut digits = itoa::Buffer::new();
        out.extend_from_slice(b",\"iat\":");
        out.extend_from_slice(digits.format(self.iat).as_bytes());
        out.extend_from_slice(b",\"exp\":");
        out.extend_from_slice(digits.format(self.exp).as_bytes());
        out.extend_from_slice(b",\"jti\":");
        push_string(out, self.jti);
        out.push(b'}');
    }
}

/// The most a proxied call's claims take beyond the variable values: field
/// names, quotes, two timestamps and a UUID.
const CLAIMS_FIXED_BYTES: usize = 192;

/// Signs the assertion for one forwarded call.
pub fn sign_assertion(
    signer: &Signer,
    canon: &str,
    identity: &Identity<'_>,
    method: &str,
    path_and_query: &str,
) -> String {
    // One clock read for both; and no `Uuid::now_v7()`, whose counter sits
    // behind a process-wide mutex (see `CorrelationId::generate`).
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let now = i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX);
    let jti = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        since_epoch.as_secs(),
        since_epoch.subsec_nanos(),
    ));
    let mut jti_text = uuid::Uuid::encode_buffer();
    let claims = BorrowedClaims {
        iss: ISSUER,
        aud: canon,
        tid: identity.tenant_id,
        sub: identity.subject,
        act: identity.actor_type,
        cid: identity.correlation_id,
        htm: method,
        htu: path_and_query,
        iat: now,
        exp: now.saturating_add(ASSERTION_LIFETIME_SECONDS),
        jti: jti.hyphenated().encode_lower(&mut jti_text),
    };
    let mut payload = Vec::with_capacity(
        CLAIMS_FIXED_BYTES
            + canon.len()
            + identity.tenant_id.len()
            + identity.subject.len()
            + identity.correlation_id.len()
            + path_and_query.len(),
    );
    claims.write_json(&mut payload);
    signer.sign(&payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aibos_wire::assertion::AssertionClaims;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn addresses_are_written_as_display_writes_them(v4 in any::<u32>(), v6 in any::<u128>()) {
            for ip in [IpAddr::from(std::net::Ipv4Addr::from(v4)), IpAddr::from(std::net::Ipv6Addr::from(v6))] {
                let value = address_value(ip);
                prop_assert_eq!(value.to_str().unwrap(), ip.to_string());
            }
        }
    }

    proptest! {
        /// Any values, control characters, quotes, backslashes and non-ASCII
        /// text included: the hand-written JSON is serde's, byte for byte.
        #[test]
        fn claims_are_written_as_serde_writes_the_shared_claims(
            values in proptest::collection::vec(any::<String>(), 9),
            iat in any::<i64>(),
            exp in any::<i64>(),
        ) {
            let owned = AssertionClaims {
                iss: values[0].clone(),
                aud: values[1].clone(),
                tid: values[2].clone(),
                sub: values[3].clone(),
                act: values[4].clone(),
                cid: values[5].clone(),
                htm: values[6].clone(),
                htu: values[7].clone(),
                iat,
                exp,
                jti: values[8].clone(),
            };
            let borrowed = BorrowedClaims {
                iss: &values[0],
                aud: &values[1],
                tid: &values[2],
                sub: &values[3],
                act: &values[4],
                cid: &values[5],
                htm: &values[6],
                htu: &values[7],
                iat,
                exp,
                jti: &values[8],
            };
            let mut written = Vec::new();
            borrowed.write_json(&mut written);
            prop_assert_eq!(String::from_utf8(written).unwrap(), serde_json::to_string(&owned).unwrap());
        }
    }

    #[test]
    fn the_shortcut_for_names_without_x_misses_no_stripped_name() {
        let all = FORWARDED_IDENTITY_HEADERS
            .iter()
            .chain(&SPOOFABLE)
            .chain(&OVERRIDES);
        for name in all {
            let parsed = HeaderName::from_static(name);
            assert!(
                !forwardable(&parsed, true, &[]),
                "{name} would be forwarded"
            );
        }
        for kept in ["content-type", "accept", "x-request-id", "idempotency-key"] {
            assert!(
                forwardable(&HeaderName::from_static(kept), true, &[]),
                "{kept}"
            );
        }
    }

    #[test]
    fn a_cells_hop_by_hop_headers_never_reach_the_client() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "close, X-Cell-Hop"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("x-cell-hop", "1"),
            ("content-type", "application/json"),
            ("x-request-id", "r1"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-type", "x-request-id"]);
        let mut plain = HeaderMap::new();
        plain.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        plain.append(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut plain);
        assert_eq!(
            plain.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["content-length"]
        );
    }

    #[test]
    fn client_claims_and_hop_by_hop_headers_never_reach_the_cell() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer secret"),
            ("cookie", "session=1"),
            ("x-tenant-id", "someone-else"),
            ("x-user-sub", "admin"),
            ("x-actor-type", "service"),
            ("x-kernel-assertion", "forged"),
            ("x-forwarded-for", "10.0.0.1"),
            ("forwarded", "for=10.0.0.1"),
            ("x-forwarded-prefix", "/admin"),
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("connection", "keep-alive, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("host", "kernel.example"),
            ("content-type", "application/json"),
            ("idempotency-key", "k1"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let ids = IdHeaders::new("t1", "u1").unwrap();
        let identity = Identity {
            tenant_id: "t1",
            subject: "u1",
            id_headers: &ids,
            actor_type: "user",
            correlation_id: "c1",
            client_ip: Some("127.0.0.1".parse().unwrap()),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        };
        let h = upstream_headers(h, &identity, false, Some("signed".to_owned()));
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "content-type",
                "idempotency-key",
                "traceparent",
                "x-actor-type",
                "x-correlation-id",
                "x-forwarded-for",
                "x-kernel-assertion",
                "x-tenant-id",
                "x-user-sub"
            ]
        );
        assert_eq!(h["x-tenant-id"], "t1");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-kernel-assertion"], "signed");
        let mut with_cookies = HeaderMap::new();
        with_cookies.append(header::COOKIE, HeaderValue::from_static("b=2"));
        with_cookies.append(header::COOKIE, HeaderValue::from_static("a=1"));
        let with_cookies = upstream_headers(with_cookies, &identity, true, None);
        let cookies: Vec<_> = with_cookies.get_all(header::COOKIE).iter().collect();
        assert_eq!(
            cookies,
            ["b=2", "a=1"],
            "every value of a kept header is kept"
        );
    }
}
