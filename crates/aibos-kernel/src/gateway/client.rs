//! The upstream HTTP client: pooled keep-alive connections, request and response
//! bodies streamed without buffering.
//!
//! - Plain `http` cells over HTTP/1.1 — the common case and the hot path — go
//!   through [`Http1Pool`], a small keep-alive pool over hyper's connection API.
//!   It exists because hyper-util's general-purpose client spawns a task per
//!   request to return its connection to the pool, and clones a pool key, a
//!   connector and a boxed future on every call; on a proxied request that does
//!   nothing else, that was a measurable share of the kernel's CPU
//!   (docs/performance.md, gateway).
//! - `https` cells (HTTP/2 or 1.1 by ALPN) and `h2c` canons (HTTP/2 with prior
//!   knowledge) use hyper-util's client, which brings TLS and HTTP/2 multiplexing.
//! - An `https` canon with TLS settings of its own (a CA bundle instead of the
//!   public roots, a client certificate for mutual TLS; [`CanonTls`]) gets a
//!   hyper-util client of its own in each event loop, made on its first call and
//!   replaced when the canon's settings change.
//!
//! Each event loop owns one [`UpstreamClient`] (handed to its router as an
//! extension), so its pools are never shared between threads: their locks are
//! uncontended and a connection's task runs on the loop that uses it.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::uri::{Authority, PathAndQuery, Scheme};
use axum::http::{Request, Response, Uri, header};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::table::BaseUrl;
use crate::config::GatewayConfig;
use crate::limits;

/// hyper-util's client, for `https` and `h2c` cells.
type GeneralClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

/// The clients of one event loop.
#[derive(Clone)]
pub struct UpstreamClient(Arc<Clients>);

struct Clients {
    http1: Arc<Http1Pool>,
    /// `https` cells, HTTP/2 or HTTP/1.1 by ALPN.
    general: GeneralClient,
    /// `h2c` canons: HTTP/2 with prior knowledge.
    h2c: GeneralClient,
    /// Canons with TLS settings of their own, by canon id, with the settings
    /// the client was made from (a rebuilt table brings new ones). Entries of
    /// deleted canons stay until restart: at most `limits::CANONS_MAX`.
    custom: Mutex<foldhash::HashMap<Arc<str>, CustomClient>>,
    /// Pool settings for the custom clients.
    config: GatewayConfig,
}

/// A canon's own client and the TLS settings it was made from.
type CustomClient = (Arc<rustls::ClientConfig>, GeneralClient);

/// A canon's own TLS settings, compiled once per route table.
#[derive(Clone)]
pub struct CanonTls {
    /// The canon's id: its custom client's key.
    pub canon_id: Arc<str>,
    /// Roots (the canon's CA bundle, or the public ones) and client certificate.
    pub config: Arc<rustls::ClientConfig>,
}

/// Why a canon's TLS settings are unusable: the field and the reason.
pub type TlsProblem = (&'static str, String);

/// Builds the TLS client configuration of a canon: `ca_bundle_pem` replaces the
/// public (webpki) roots; `client` is a PEM certificate chain and its PEM
/// private key for mutual TLS. The registry validates with this same function,
/// so what was accepted is what the gateway uses.
pub fn tls_config(
    ca_bundle_pem: Option<&str>,
    client: Option<(&str, &str)>,
) -> Result<rustls::ClientConfig, TlsProblem> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match ca_bundle_pem {
        Some(pem) => {
            let field = "tls.ca_bundle_pem";
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| (field, format!("is not PEM certificates: {e}")))?;
            if certs.is_empty() {
                return Err((field, "holds no CERTIFICATE block".to_owned()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| (field, format!("holds an unusable certificate: {e}")))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ("tls", e.to_string()))?
    .with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    (
                        "tls.client_cert_pem",
                        format!("is not PEM certificates: {e}"),
                    )
                })?;
            if chain.is_empty() {
                return Err((
                    "tls.client_cert_pem",
                    "holds no CERTIFICATE block".to_owned(),
                ));
            }
            // The error never quotes the key.
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| {
                (
                    "tls.client_key_pem",
                    "is not a PEM private key (PKCS#8, PKCS#1 or SEC1)".to_owned(),
                )
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                (
                    "tls.client_key_pem",
                    format!("does not go with tls.client_cert_pem: {e}"),
                )
            })
        }
    }
}

/// Why an upstream call got no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made: nothing was sent, so a retry is safe.
    #[error("connect: {0}")]
    Connect(String),
    /// The connection failed while the request was being sent or answered.
    #[error("request: {0}")]
    Request(String),
}

impl UpstreamError {
    /// Whether the cell never saw the request.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }
}

/// An upstream call that got no response.
#[derive(Debug)]
pub struct SendFailure {
    /// What went wrong.
    pub error: UpstreamError,
    /// The request itself, when it never left and the client could keep it
    /// (plain-`http` cells, see [`UpstreamClient::gives_back_unsent`]): a
    /// retry sends it again without a copy made in advance.
    pub unsent: Option<Request<Body>>,
}

impl From<UpstreamError> for SendFailure {
    fn from(error: UpstreamError) -> SendFailure {
        SendFailure {
            error,
            unsent: None,
        }
    }
}

/// Builds the clients with the configured pool and connect timeout.
pub fn build(config: &GatewayConfig) -> UpstreamClient {
    UpstreamClient(Arc::new(Clients {
        http1: Arc::new(Http1Pool {
            idle: Mutex::new(foldhash::HashMap::default()),
            max_idle_per_host: usize::try_from(config.pool_max_idle_per_host).unwrap_or(usize::MAX),
            idle_timeout: Duration::from_secs(config.pool_idle_timeout_seconds),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            resend_after_idle: Duration::from_millis(limits::UPSTREAM_RESEND_AFTER_IDLE_MS),
        }),
        general: build_general(config, false),
        h2c: build_general(config, true),
        custom: Mutex::default(),
        config: config.clone(),
    }))
}

impl UpstreamClient {
    /// Sends `request`, whose URI is in origin form (path and query), to the cell
    /// at `base`. The response body streams from the cell.
    pub async fn send(
        &self,
        base: &BaseUrl,
        h2c: bool,
        tls: Option<&CanonTls>,
        mut request: Request<Body>,
    ) -> Result<Response<Body>, SendFailure> {
        if Self::gives_back_unsent(base, h2c) {
            request
                .headers_mut()
                .insert(header::HOST, base.host_header.clone());
            return Http1Pool::send(&self.0.http1, base, request).await;
        }
        let path_and_query = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *request.uri_mut() = Uri::builder()
            .scheme(base.scheme.clone())
            .authority(base.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| UpstreamError::Request(e.to_string()))?;
        let custom;
        let client = match tls {
            Some(tls) => {
                custom = self.custom_client(tls);
                &custom
            }
            None if h2c => &self.0.h2c,
            None => &self.0.general,
        };
        match client.request(request).await {
            Ok(response) => Ok(response.map(Body::new)),
            Err(e) if e.is_connect() => Err(UpstreamError::Connect(e.to_string()).into()),
            Err(e) => Err(UpstreamError::Request(e.to_string()).into()),
        }
    }

    /// This event loop's client for a canon with its own TLS settings (cloning
    /// a hyper-util client clones handles to its pool).
    fn custom_client(&self, tls: &CanonTls) -> GeneralClient {
        let mut custom = self.0.custom.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((config, client)) = custom.get(&tls.canon_id)
            && Arc::ptr_eq(config, &tls.config)
        {
            return client.clone();
        }
        let client = build_with_tls(&self.0.config, (*tls.config).clone());
        custom.insert(
            Arc::clone(&tls.canon_id),
            (Arc::clone(&tls.config), client.clone()),
        );
        client
    }

    /// Whether [`send`](Self::send) hands back a request that could not be
    /// sent for want of a connection: true for plain-`http` HTTP/1.1 cells
    /// (our own pool); hyper-util's client, for the others, consumes it.
    pub fn gives_back_unsent(base: &BaseUrl, h2c: bool) -> bool {
        !h2c && base.scheme == Scheme::HTTP
    }
}

fn http_connector(config: &GatewayConfig) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_millis(config.connect_timeout_ms)));
    http
}

fn build_general(config: &GatewayConfig, http2_only: bool) -> GeneralClient {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .expect("ring supports the default TLS versions")
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http_connector(config));
    client_over(config, connector, http2_only)
}

/// A client for one canon's TLS settings (HTTP/2 or 1.1 by ALPN, https only).
fn build_with_tls(config: &GatewayConfig, tls: rustls::ClientConfig) -> GeneralClient {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http_connector(config));
    client_over(config, connector, false)
}

fn client_over(
    config: &GatewayConfig,
    connector: hyper_rustls::HttpsConnector<HttpConnector>,
    http2_only: bool,
) -> GeneralClient {
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

/// Idle HTTP/1.1 keep-alive connections by cell address.
///
/// A connection is checked out for one exchange and checked back in when the
/// response body has been read to its end (a body dropped half-read leaves the
/// connection unusable; hyper closes it). Idle connections are reused newest
/// first among those ready for a request; at most `max_idle_per_host` are kept
/// per address, and one idle longer than `idle_timeout` is dropped (closing it)
/// at the next check-in for its address (or never used: a check-out skips it). Most cells close idle connections
/// sooner themselves; what stays behind for a cell no longer called is bounded
/// by `max_idle_per_host` per address.
struct Http1Pool {
    /// A fast hash: the addresses are the registry's, looked up twice per call.
    idle: Mutex<foldhash::HashMap<PoolKey, Vec<IdleConnection>>>,
    max_idle_per_host: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    /// See [`limits::UPSTREAM_RESEND_AFTER_IDLE_MS`].
    resend_after_idle: Duration,
}

/// A cell's address as the pools' key: its authority's text, lowercased once
/// when the route table is built. (`Authority` itself hashes and compares byte
/// by byte, ignoring case, at every lookup.)
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey(Arc<str>);

impl PoolKey {
    /// The key of the cell at `authority`.
    pub fn of(authority: &Authority) -> PoolKey {
        PoolKey(authority.as_str().to_ascii_lowercase().into())
    }
}

struct IdleConnection {
    sender: SendRequest<Body>,
    since: Instant,
}

impl Http1Pool {
    async fn send(
        pool: &Arc<Http1Pool>,
        base: &BaseUrl,
        mut request: Request<Body>,
    ) -> Result<Response<Body>, SendFailure> {
        // Each reused connection that turns out closed costs one pass; the pool
        // holds at most `max_idle_per_host`, then a fresh connection is made.
        // Until the request is handed to a connection, a failure gives it back.
        let unsent = |error, request| SendFailure {
            error,
            unsent: Some(request),
        };
        loop {
            let (mut sender, idle_for) = match pool.checkout(&base.pool_key) {
                Some((sender, idle_for)) => (sender, Some(idle_for)),
                // Boxed: connecting (resolve, connect, handshake) is rare on
                // a warm pool, and its future would otherwise sit in every call's.
                None => match Box::pin(pool.connect(&base.authority)).await {
                    Ok(sender) => (sender, None),
                    Err(e) => return Err(unsent(e, request)),
                },
            };
            let reused = idle_for.is_some();
            // A connection checked in as its last response ended may still be
            // finishing that exchange; this waits for it (or learns it closed).
            if let Err(e) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(unsent(UpstreamError::Connect(e.to_string()), request));
            }
            // A cell may close a connection idle past its own keep-alive
            // timeout just as the request reaches it, unanswered. A body-less
            // idempotent request may then go out again (RFC 9110 §9.2.2); for
            // that it is copied first, only on a connection idle long enough
            // to be at risk.
            let copy = idle_for
                .is_some_and(|idle| idle >= pool.resend_after_idle)
                .then(|| copy_if_resendable(&request))
                .flatten();
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let release = Release {
                        pool: Arc::clone(pool),
                        key: base.pool_key.clone(),
                        sender,
                    };
                    return Ok(response.map(|incoming| {
                        Body::new(PooledBody {
                            incoming,
                            release: Some(release),
                        })
                    }));
                }
                Err(mut e) => match (e.take_message(), copy) {
                    // The cell closed an idle connection as we picked it: the
                    // request was not sent and goes out on another one.
                    (Some(unsent), _) if reused => request = unsent,
                    (None, Some(copy)) if closed_unanswered(e.error()) => {
                        tracing::debug!(error = %e.error(), "the cell closed an idle connection unanswered; sending again");
                        request = *copy;
                    }
                    _ => return Err(UpstreamError::Request(e.into_error().to_string()).into()),
                },
            }
        }
    }

    /// An idle connection for `key`, and how long it was idle.
    fn checkout(&self, key: &PoolKey) -> Option<(SendRequest<Body>, Duration)> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let connections = idle.get_mut(key)?;
        let now = Instant::now();
        let fresh = |c: &IdleConnection| now - c.since < self.idle_timeout;
        // Newest first among those whose connection task has already finished the
        // previous exchange; else the newest still open, which will be ready in a
        // moment. (Closed and stale entries are swept at check-in.)
        let index = connections
            .iter()
            .rposition(|c| fresh(c) && c.sender.is_ready())
            .or_else(|| {
                connections
                    .iter()
                    .rposition(|c| fresh(c) && !c.sender.is_closed())
            })?;
        // `remove`, not `swap_remove`: the list stays in check-in order (the
        // newest, nearly always the one taken, is last: nothing moves).
        let idle = connections.remove(index);
        Some((idle.sender, now - idle.since))
    }

    fn checkin(&self, key: PoolKey, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        // Looked up before `entry`, which would take the key (a reference
        // count) even when the address is there, as it nearly always is.
        let connections = match idle.get_mut(&key) {
            Some(connections) => connections,
            None => idle.entry(key).or_default(),
        };
        // In check-in order, so the stalest is first: closed and stale entries
        // are swept when that one is stale or the list is full, not at every
        // check-in (a closed one is never checked out meanwhile).
        let sweep = connections.len() >= self.max_idle_per_host
            || connections
                .first()
                .is_some_and(|c| now - c.since >= self.idle_timeout);
        if sweep {
            connections.retain(|c| !c.sender.is_closed() && now - c.since < self.idle_timeout);
        }
        if connections.len() < self.max_idle_per_host {
            connections.push(IdleConnection { sender, since: now });
        }
    }

    async fn connect(&self, authority: &Authority) -> Result<SendRequest<Body>, UpstreamError> {
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(80);
        let stream = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect((host, port)),
        )
        .await
        .map_err(|_| UpstreamError::Connect("timed out".into()))?
        .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        // The connection's I/O runs as a task of this event loop; it ends when
        // the cell or the pool closes the connection.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection closed");
            }
        });
        Ok(sender)
    }
}

/// A copy of `request` to send again, if it is body-less and idempotent.
/// Boxed: the copy is rare, and held across the send it would otherwise
/// enlarge every call's future.
fn copy_if_resendable(request: &Request<Body>) -> Option<Box<Request<Body>>> {
    if !request.method().is_idempotent() || !request.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(Body::empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    Some(Box::new(copy))
}

/// Whether the cell closed or reset the connection before answering.
fn closed_unanswered(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() {
        return true;
    }
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<std::io::Error>())
        .is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            )
        })
}

/// Gives a connection back to its pool.
struct Release {
    pool: Arc<Http1Pool>,
    key: PoolKey,
    sender: SendRequest<Body>,
}

/// A response body that checks its connection back in once read to the end.
struct PooledBody {
    incoming: Incoming,
    release: Option<Release>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(release) = self.release.take() {
            release.pool.checkin(release.key, release.sender);
        }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.incoming).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // The server stops polling a body whose length says it is complete.
        if self.incoming.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::Config;

    /// How the test cell ends each exchange.
    #[derive(Clone, Copy)]
    enum Cell {
        /// Keep-alive, 2-byte body.
        KeepAlive,
        /// `Connection: close`, then closes.
        Closing,
        /// Keep-alive with a 1 MiB body.
        Big,
        /// Keep-alive, closes a connection idle for 20 ms.
        ClosesIdle,
        /// Answers the first request of a connection; at the second, closes
        /// without a word (as a cell closing an idle connection just as the
        /// request arrives does).
        DropsSecond,
    }

    const KEEP_ALIVE_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    const CLOSING_ANSWER: &[u8] =
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok";
    const BIG_ANSWER_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n";

    /// A minimal HTTP/1.1 server counting the connections it accepts.
    async fn cell(kind: Cell) -> (BaseUrl, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = BaseUrl::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 1024];
                    let mut answered = 0;
                    loop {
                        while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                            let read = socket.read(&mut chunk);
                            let read = match kind {
                                Cell::ClosesIdle => {
                                    match tokio::time::timeout(Duration::from_millis(20), read)
                                        .await
                                    {
                                        Ok(read) => read,
                                        Err(_) => return,
                                    }
                                }
                                _ => read.await,
                            };
                            match read {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buffer.clear();
                        answered += 1;
                        let answer = match kind {
                            Cell::DropsSecond if answered == 2 => return,
                            Cell::KeepAlive | Cell::ClosesIdle | Cell::DropsSecond => {
                                KEEP_ALIVE_ANSWER.to_vec()
                            }
                            Cell::Closing => CLOSING_ANSWER.to_vec(),
                            Cell::Big => {
                                let mut answer = BIG_ANSWER_HEAD.to_vec();
                                answer.resize(answer.len() + 1_048_576, b'x');
                                answer
                            }
                        };
                        if socket.write_all(&answer).await.is_err() {
                            return;
                        }
                        if let Cell::Closing = kind {
                            return;
                        }
                    }
                });
            }
        });
        (base, accepted)
    }

    fn get() -> Request<Body> {
        Request::get("/x").body(Body::empty()).unwrap()
    }

    async fn call(client: &UpstreamClient, base: &BaseUrl) -> Bytes {
        let response = client
            .send(base, false, None, get())
            .await
            .expect("an answer");
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn sequential_calls_reuse_one_keep_alive_connection() {
        let (base, accepted) = cell(Cell::KeepAlive).await;
        let client = build(&Config::defaults().gateway);
        for _ in 0..20 {
            assert_eq!(call(&client, &base).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_cell_closes_is_not_reused() {
        let (base, accepted) = cell(Cell::Closing).await;
        let client = build(&Config::defaults().gateway);
        for _ in 0..5 {
            assert_eq!(call(&client, &base).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn an_idle_connection_the_cell_closed_is_passed_over_without_a_failure() {
        let (base, accepted) = cell(Cell::ClosesIdle).await;
        let client = build(&Config::defaults().gateway);
        assert_eq!(call(&client, &base).await, "ok");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(call(&client, &base).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    fn pool_resending_after(idle: Duration) -> Arc<Http1Pool> {
        Arc::new(Http1Pool {
            idle: Mutex::new(foldhash::HashMap::default()),
            max_idle_per_host: 8,
            idle_timeout: Duration::from_secs(90),
            connect_timeout: Duration::from_secs(1),
            resend_after_idle: idle,
        })
    }

    #[tokio::test]
    async fn a_get_dropped_unanswered_on_a_long_idle_connection_goes_out_again() {
        let (base, accepted) = cell(Cell::DropsSecond).await;
        let pool = pool_resending_after(Duration::ZERO);
        let send = |request| Http1Pool::send(&pool, &base, request);
        let body = |response: Response<Body>| async move {
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.unwrap().to_bytes()
        };
        assert_eq!(body(send(get()).await.unwrap()).await, "ok");
        assert_eq!(
            body(send(get()).await.expect("sent again, answered")).await,
            "ok"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // The second connection, whose first request that was, drops its
        // second: a POST, which may have been acted on, is not sent again.
        let post = Request::post("/x").body(Body::from("pay")).unwrap();
        let failure = send(post).await.unwrap_err();
        assert!(!failure.error.is_connect(), "{}", failure.error);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_reused_at_once_costs_no_copy_and_gets_no_resend() {
        let (base, accepted) = cell(Cell::DropsSecond).await;
        let pool = pool_resending_after(Duration::from_secs(60));
        let first = Http1Pool::send(&pool, &base, get()).await.unwrap();
        assert_eq!(first.into_body().collect().await.unwrap().to_bytes(), "ok");
        let failure = Http1Pool::send(&pool, &base, get()).await.unwrap_err();
        assert!(!failure.error.is_connect(), "{}", failure.error);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_half_read_gives_up_its_connection() {
        let (base, accepted) = cell(Cell::Big).await;
        let client = build(&Config::defaults().gateway);
        let response = client.send(&base, false, None, get()).await.unwrap();
        drop(response);
        assert_eq!(call(&client, &base).await.len(), 1_048_576);
        assert_eq!(call(&client, &base).await.len(), 1_048_576);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "a fresh connection after the abandoned body, then reuse"
        );
    }

    #[tokio::test]
    async fn concurrent_calls_open_connections_and_the_pool_keeps_them() {
        let (base, accepted) = cell(Cell::KeepAlive).await;
        let client = build(&Config::defaults().gateway);
        let (a, b, c, d) = tokio::join!(
            call(&client, &base),
            call(&client, &base),
            call(&client, &base),
            call(&client, &base)
        );
        assert!([a, b, c, d].iter().all(|body| body == "ok"));
        let opened = accepted.load(Ordering::SeqCst);
        assert!((1..=4).contains(&opened));
        for _ in 0..8 {
            call(&client, &base).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), opened, "no new connection");
    }

    #[tokio::test]
    async fn stale_connections_are_not_reused_and_the_idle_list_stays_bounded() {
        let (base, accepted) = cell(Cell::KeepAlive).await;
        let pool = Arc::new(Http1Pool {
            idle: Mutex::new(foldhash::HashMap::default()),
            max_idle_per_host: 2,
            idle_timeout: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(1),
            resend_after_idle: Duration::from_secs(1),
        });
        let call = || async {
            let response = Http1Pool::send(&pool, &base, get())
                .await
                .expect("an answer");
            response.into_body().collect().await.unwrap().to_bytes()
        };
        let idle = || pool.idle.lock().unwrap()[&base.pool_key].len();
        assert_eq!(call().await, "ok");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(call().await, "ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the stale one was passed over"
        );
        assert_eq!(idle(), 1, "and swept at the next check-in");
        assert_eq!(call().await, "ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the fresh one is reused"
        );
        let (a, b, c) = tokio::join!(call(), call(), call());
        assert!([a, b, c].iter().all(|body| body == "ok"));
        assert!(idle() <= 2, "never more than max_idle_per_host");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error_that_gives_the_request_back() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = BaseUrl::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        drop(listener);
        let client = build(&Config::defaults().gateway);
        let mut request = get();
        request
            .headers_mut()
            .insert("x-kernel-assertion", "signed".parse().unwrap());
        let failure = client.send(&base, false, None, request).await.unwrap_err();
        assert!(failure.error.is_connect(), "{}", failure.error);
        assert!(UpstreamClient::gives_back_unsent(&base, false));
        let unsent = failure.unsent.expect("the request never left");
        assert_eq!(
            unsent.headers()["x-kernel-assertion"],
            "signed",
            "a retry can send it again as it was"
        );
        // h2c goes through hyper-util's client, which keeps nothing to give back.
        assert!(!UpstreamClient::gives_back_unsent(&base, true));
        let failure = client.send(&base, true, None, get()).await.unwrap_err();
        assert!(failure.error.is_connect(), "{}", failure.error);
        assert!(failure.unsent.is_none());
    }
}
