//! The upstream HTTP client: pooled keep-alive connections, HTTP/1.1 to plain
//! `http` cells (HTTP/2 with prior knowledge to canons registered with
//! `protocol: "h2c"`), HTTP/2 or 1.1 by ALPN to `https` ones, request and
//! response bodies streamed without buffering.
//!
//! Each event loop owns one client (handed to its router as an extension), so
//! its connection pool is never shared between threads: the pool's lock is
//! uncontended and a connection's task runs on the loop that uses it.

use std::time::Duration;

use axum::body::Body;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::GatewayConfig;

/// One HTTP client.
pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

/// The clients of one event loop: HTTP/1.1 (and HTTP/2 by ALPN over TLS), and
/// HTTP/2 with prior knowledge for `h2c` canons.
#[derive(Clone)]
pub struct UpstreamClient {
    http1: HttpClient,
    h2c: HttpClient,
}

impl UpstreamClient {
    /// The client for a canon.
    pub fn for_canon(&self, h2c: bool) -> &HttpClient {
        if h2c { &self.h2c } else { &self.http1 }
    }
}

/// Builds the clients with the configured pool and connect timeout.
pub fn build(config: &GatewayConfig) -> UpstreamClient {
    UpstreamClient {
        http1: build_one(config, false),
        h2c: build_one(config, true),
    }
}

fn build_one(config: &GatewayConfig, http2_only: bool) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_millis(config.connect_timeout_ms)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .expect("ring supports the default TLS versions")
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        // Without a timer the idle timeout is never enforced (linkerd2-proxy #4004).
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(config.pool_idle_timeout_seconds))
        .pool_max_idle_per_host(
            usize::try_from(config.pool_max_idle_per_host).unwrap_or(usize::MAX),
        )
        .http2_only(http2_only)
        .build(connector)
}
