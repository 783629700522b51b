//! Outgoing webhook URLs are an attack surface (SSRF): a tenant could point a
//! subscription at the cloud metadata service, the kernel's own loopback port
//! or a private network, and read the answers back in the delivery history.
//!
//! Two checks, both refusing loopback, private (RFC 1918, CGNAT, ULA),
//! link-local, unspecified, multicast, broadcast and reserved addresses, and
//! the IPv4-mapped, -compatible, NAT64 and 6to4 IPv6 forms of them, unless
//! `events.webhook_allow_private_networks` is on:
//! - [`check_url`] when a subscription is created or its URL changed: the URL's
//!   shape (http or https, a host, no user-info, no fragment), and every address
//!   its host resolves to now (a 400 the tenant can act on);
//! - [`GuardedConnector`] at every connection the delivery client opens: it
//!   resolves the host itself, drops forbidden addresses and connects only to
//!   those left. The address checked is the address connected to, so a DNS
//!   answer that changes between the two checks (DNS rebinding) gains nothing.
//!
//! hyper's `HttpConnector` does not call its resolver for a host that is an IP
//! literal, so the connector checks literals itself before handing them on.
//! Nothing here reads a proxy from the environment, and the client built over
//! the connector never follows redirects (a 3xx is a failed attempt).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::limits;

/// Why an address may not be connected to, in words for a problem body.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, _, _] = ip.octets();
    match (a, b) {
        (0, _) => Some("an unspecified (0.0.0.0/8) address"),
        (10, _) => Some("a private (RFC 1918) address"),
        (100, 64..=127) => Some("a shared (CGNAT, 100.64.0.0/10) address"),
        (127, _) => Some("a loopback address"),
        (169, 254) => Some("a link-local address (169.254.0.0/16, cloud metadata included)"),
        (172, 16..=31) => Some("a private (RFC 1918) address"),
        (192, 168) => Some("a private (RFC 1918) address"),
        (224..=239, _) => Some("a multicast address"),
        // 240.0.0.0/4 is reserved, and holds the broadcast address.
        (240..=255, _) => Some("a reserved or broadcast address"),
        _ => None,
    }
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("the unspecified address (::)");
    }
    if ip.is_loopback() {
        return Some("a loopback address");
    }
    let segments = ip.segments();
    // IPv4 embedded in IPv6 reaches the IPv4 address on a dual-stack host
    // (mapped ::ffff:a.b.c.d, the deprecated compatible ::a.b.c.d) or through a
    // translator (NAT64 64:ff9b::/96): judge the IPv4 address.
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if segments[..5] == [0, 0, 0, 0, 0] && (segments[5] == 0xffff || segments[5] == 0) {
        return forbidden_v4(embedded(segments[6], segments[7]));
    }
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return forbidden_v4(embedded(segments[6], segments[7]));
    }
    // 6to4 (2002::/16) carries the IPv4 address of its relay in bits 16–47.
    if segments[0] == 0x2002 {
        return forbidden_v4(embedded(segments[1], segments[2]));
    }
    match segments[0] {
        s if s & 0xfe00 == 0xfc00 => Some("a unique local (fc00::/7) address"),
        s if s & 0xffc0 == 0xfe80 => Some("a link-local (fe80::/10) address"),
        s if s & 0xffc0 == 0xfec0 => Some("a site-local (fec0::/10) address"),
        s if s & 0xff00 == 0xff00 => Some("a multicast address"),
        _ => None,
    }
}

/// What is wrong with a webhook URL, as a message for its `url` field.
pub type UrlProblem = String;

/// Checks a webhook URL's shape and, unless private networks are allowed, every
/// address its host resolves to now. Returns the URL as it will be called.
///
/// A host that does not resolve (yet) is accepted: the receiver may not be in
/// DNS yet, and the connector checks the address at every delivery anyway.
pub async fn check_url(text: &str, allow_private: bool) -> Result<Uri, UrlProblem> {
    let uri = check_shape(text)?;
    if allow_private {
        return Ok(uri);
    }
    let host = host_of(&uri).to_owned();
    if let Ok(ip) = host.parse::<IpAddr>() {
        return match forbidden(ip) {
            Some(why) => Err(format!(
                "names {why}, which webhooks may not call (events.webhook_allow_private_networks is off)"
            )),
            None => Ok(uri),
        };
    }
    let port = port_of(&uri);
    let lookup = tokio::net::lookup_host((host.as_str(), port));
    let resolved = tokio::time::timeout(
        Duration::from_millis(limits::WEBHOOK_URL_RESOLVE_TIMEOUT_MS),
        lookup,
    )
    .await;
    if let Ok(Ok(addrs)) = resolved {
        for addr in addrs {
            if let Some(why) = forbidden(addr.ip()) {
                return Err(format!(
                    "resolves to {} ({why}), which webhooks may not call (events.webhook_allow_private_networks is off)",
                    addr.ip()
                ));
            }
        }
    }
    Ok(uri)
}

/// The URL's shape alone: `http` or `https`, a host, no user-info, no fragment,
/// no whitespace, within [`limits::URL_BYTES_MAX`].
pub fn check_shape(text: &str) -> Result<Uri, UrlProblem> {
    if text.len() > limits::URL_BYTES_MAX {
        return Err(format!("is longer than {} bytes", limits::URL_BYTES_MAX));
    }
    if text.contains(['#', '\\']) || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must have no fragment, backslash or whitespace".to_owned());
    }
    let uri = text
        .parse::<Uri>()
        .map_err(|_| "is not an absolute URL".to_owned())?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("must start with http:// or https://".to_owned());
    }
    let Some(authority) = uri.authority() else {
        return Err("must name a host".to_owned());
    };
    if authority.as_str().contains('@') {
        return Err(
            "must not carry user-info (credentials in URLs end up in logs and histories)"
                .to_owned(),
        );
    }
    if authority.host().is_empty() {
        return Err("must name a host".to_owned());
    }
    Ok(uri)
}

/// The host without IPv6 brackets.
fn host_of(uri: &Uri) -> &str {
    let host = uri.host().unwrap_or("");
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

fn port_of(uri: &Uri) -> u16 {
    uri.port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        })
}

/// A connection refused because every address of the host is forbidden.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves only to addresses webhooks may not call ({why})")]
pub struct ForbiddenAddress {
    /// The host as the URL names it.
    pub host: String,
    /// What the (first) refused address is.
    pub why: &'static str,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The resolver of [`GuardedConnector`]: the system's resolver, then the
/// forbidden addresses dropped (unless allowed).
#[derive(Clone)]
pub struct GuardedResolver {
    allow_private: bool,
}

impl tower::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            // Port 0: HttpConnector puts the URL's port on each address itself.
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let (allowed, first_refusal) = filter(resolved, allow_private);
            if allowed.is_empty() {
                return Err(Box::new(ForbiddenAddress {
                    host,
                    why: first_refusal.unwrap_or("no address"),
                }) as BoxError);
            }
            Ok(allowed.into_iter())
        })
    }
}

/// Splits resolved addresses into those that may be connected to, and the
/// reason the first refused one was.
fn filter(addrs: Vec<SocketAddr>, allow_private: bool) -> (Vec<SocketAddr>, Option<&'static str>) {
    if allow_private {
        return (addrs, None);
    }
    let mut first_refusal = None;
    let allowed = addrs
        .into_iter()
        .filter(|a| match forbidden(a.ip()) {
            Some(why) => {
                first_refusal.get_or_insert(why);
                false
            }
            None => true,
        })
        .collect();
    (allowed, first_refusal)
}

/// The TCP connector of webhook deliveries: IP-literal hosts are checked here,
/// names through [`GuardedResolver`]; both before any connection is opened.
#[derive(Clone)]
pub struct GuardedConnector {
    inner: HttpConnector<GuardedResolver>,
    allow_private: bool,
}

impl GuardedConnector {
    /// A connector that refuses forbidden addresses unless `allow_private`.
    pub fn new(allow_private: bool, connect_timeout: Duration) -> GuardedConnector {
        let mut inner = HttpConnector::new_with_resolver(GuardedResolver { allow_private });
        // TLS is layered on top by hyper-rustls, which hands https URLs down.
        inner.enforce_http(false);
        inner.set_nodelay(true);
        inner.set_connect_timeout(Some(connect_timeout));
        GuardedConnector {
            inner,
            allow_private,
        }
    }
}

impl tower::Service<Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        if !self.allow_private
            && let Ok(ip) = host_of(&uri).parse::<IpAddr>()
            && let Some(why) = forbidden(ip)
        {
            let host = ip.to_string();
            return Box::pin(
                async move { Err(Box::new(ForbiddenAddress { host, why }) as BoxError) },
            );
        }
        let connecting = self.inner.call(uri);
        Box::pin(async move { connecting.await.map_err(Into::into) })
    }
}

/// Whether an error (of the client, the TLS layer or the connector) was a
/// forbidden address: such an attempt is recorded as `refused_address`.
pub fn is_forbidden_address(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<ForbiddenAddress>() {
            return true;
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(text: &str) -> IpAddr {
        IpAddr::V4(text.parse().unwrap())
    }

    fn v6(text: &str) -> IpAddr {
        IpAddr::V6(text.parse().unwrap())
    }

    #[test]
    fn private_loopback_link_local_and_unspecified_addresses_are_forbidden() {
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.255.0.9",
            "169.254.169.254",
            "169.254.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(forbidden(v4(ip)).is_some(), "{ip} must be refused");
        }
        for ip in [
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            // IPv4-mapped and -compatible forms of forbidden IPv4 addresses.
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "::ffff:0.0.0.0",
            // NAT64 and 6to4 embeddings of them.
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
        ] {
            assert!(forbidden(v6(ip)).is_some(), "{ip} must be refused");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "169.253.0.1",
            "192.167.1.1",
            "223.255.255.255",
            "93.184.216.34",
        ] {
            assert_eq!(forbidden(v4(ip)), None, "{ip} is public");
        }
        for ip in [
            "2001:4860:4860::8888",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "fbff::1",
        ] {
            assert_eq!(forbidden(v6(ip)), None, "{ip} is public");
        }
    }

    #[test]
    fn url_shapes_are_checked() {
        for (url, ok) in [
            ("https://hooks.example.com/in", true),
            ("http://hooks.example.com:8080/in?token=abc", true),
            ("http://[2001:db8::1]/in", true),
            ("ftp://hooks.example.com/in", false),
            ("hooks.example.com/in", false),
            ("/in", false),
            ("https://user:pw@hooks.example.com/in", false),
            ("https://user@hooks.example.com/in", false),
            ("https://hooks.example.com/in#frag", false),
            ("https://hooks.example.com/a b", false),
            ("https:///in", false),
            ("javascript:alert(1)", false),
        ] {
            assert_eq!(check_shape(url).is_ok(), ok, "{url}");
        }
        let long = format!("https://h.example/{}", "a".repeat(limits::URL_BYTES_MAX));
        assert!(check_shape(&long).is_err());
    }

    #[tokio::test]
    async fn literal_and_resolved_private_hosts_are_refused_unless_allowed() {
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1/",
            "http://[::1]:8080/",
            "http://[::ffff:127.0.0.1]/",
            "http://localhost:9/",
            // Numeric forms the system resolver reads as 127.0.0.1.
            "http://2130706433/",
            "http://127.1/",
        ] {
            let refused = check_url(url, false).await;
            assert!(refused.is_err(), "{url} must be refused: {refused:?}");
            assert!(
                check_url(url, true).await.is_ok(),
                "{url} is allowed with the switch on"
            );
        }
        assert!(check_url("https://93.184.216.34/in", false).await.is_ok());
    }

    #[tokio::test]
    async fn the_connector_refuses_forbidden_addresses_before_connecting() {
        use tower::Service as _;
        // A listener on loopback: a connection would succeed if it were tried.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        for host in [
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
            "[::ffff:127.0.0.1]".to_owned(),
        ] {
            let uri: Uri = format!("http://{host}:{port}/").parse().unwrap();
            let mut guarded = GuardedConnector::new(false, Duration::from_secs(2));
            let refused = guarded.call(uri.clone()).await;
            let error = refused.err().unwrap_or_else(|| panic!("{host}: connected"));
            assert!(is_forbidden_address(error.as_ref()), "{host}: {error}");
            let mut open = GuardedConnector::new(true, Duration::from_secs(2));
            if host.starts_with('[') {
                continue; // IPv6 may be unavailable here; the refusal above is what matters.
            }
            assert!(
                open.call(uri).await.is_ok(),
                "{host}: allowed with the switch on"
            );
        }
    }

    #[test]
    fn resolved_addresses_are_filtered_one_by_one() {
        let addrs: Vec<SocketAddr> = vec![
            "127.0.0.1:0".parse().unwrap(),
            "93.184.216.34:0".parse().unwrap(),
            "[fe80::1]:0".parse().unwrap(),
        ];
        let (allowed, why) = filter(addrs.clone(), false);
        assert_eq!(
            allowed,
            vec!["93.184.216.34:0".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(why, Some("a loopback address"));
        assert_eq!(filter(addrs.clone(), true).0, addrs);
    }
}
