//! The delivery client: one keep-alive pool per kernel instance over the
//! SSRF-guarded connector (`ssrf::GuardedConnector`), TLS by rustls (ring,
//! public roots), no proxy, no redirects. Each attempt is bounded in time
//! (`events.webhook_timeout_seconds`, from connecting to the last byte read)
//! and in bytes read ([`limits::WEBHOOK_RESPONSE_EXCERPT_BYTES`] of the answer,
//! kept as the attempt's excerpt; a longer answer is not read further and its
//! connection is dropped instead of drained).

use std::time::{Duration, Instant};

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::ssrf::{self, GuardedConnector};
use crate::limits;

type Connector = hyper_rustls::HttpsConnector<GuardedConnector>;

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer: delivered.
    Delivered,
    /// Any other status (a 3xx too: redirects are not followed).
    Rejected,
    /// No whole answer within the attempt's time limit.
    Timeout,
    /// The connection could not be made or broke (refused, reset, TLS, DNS).
    ConnectionFailed,
    /// Every address of the receiver is one webhooks may not call.
    RefusedAddress,
}

impl Outcome {
    /// The name recorded in attempts and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Rejected => "rejected",
            Outcome::Timeout => "timeout",
            Outcome::ConnectionFailed => "connection_failed",
            Outcome::RefusedAddress => "refused_address",
        }
    }
}

/// One attempt's result, as recorded in `webhook_attempts`.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// How it ended.
    pub outcome: Outcome,
    /// The receiver's status, when it answered.
    pub status: Option<u16>,
    /// From sending to the end of the (bounded) read, or to the failure.
    pub latency: Duration,
    /// The first bytes of the answer, as text.
    pub excerpt: Option<String>,
    /// The receiver's `Retry-After`, on 429 and 503 only.
    pub retry_after: Option<Duration>,
    /// What went wrong, for the history (never a secret: no header is quoted).
    pub error: Option<String>,
}

/// What one attempt sends, besides the body.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    /// `webhook-id`.
    pub id: &'a str,
    /// `webhook-timestamp`.
    pub timestamp: i64,
    /// `webhook-signature`.
    pub signature: &'a str,
    /// The event's correlation id, carried as `x-correlation-id`.
    pub correlation_id: Option<&'a str>,
}

/// The pooled delivery client of one kernel instance. Cheap to clone.
#[derive(Clone)]
pub struct DeliveryClient {
    client: Client<Connector, Full<Bytes>>,
    timeout: Duration,
}

static USER_AGENT: &str = concat!("aibos-webhooks/", env!("CARGO_PKG_VERSION"));

impl DeliveryClient {
    /// A client refusing forbidden addresses unless `allow_private`.
    pub fn new(allow_private: bool, timeout: Duration) -> DeliveryClient {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .expect("ring supports the default TLS versions")
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(GuardedConnector::new(allow_private, timeout));
        let client = Client::builder(TokioExecutor::new())
            // Without a timer the idle timeout is never enforced (linkerd2-proxy #4004).
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(limits::WEBHOOK_POOL_IDLE_SECONDS))
            .pool_max_idle_per_host(limits::WEBHOOK_POOL_IDLE_PER_HOST)
            .build(connector);
        DeliveryClient { client, timeout }
    }

    /// Makes one attempt: POST `body` to `url` with the Standard Webhooks headers.
    pub async fn send(&self, url: &Uri, message: &Message<'_>, body: Bytes) -> Attempt {
        let started = Instant::now();
        let request = match build_request(url, message, body) {
            Ok(r) => r,
            Err(e) => {
                return failed(
                    Outcome::ConnectionFailed,
                    started,
                    format!("cannot build the request: {e}"),
                );
            }
        };
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let retry_after = match status {
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => response
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, time::OffsetDateTime::now_utc())),
                _ => None,
            };
            let excerpt = read_excerpt(response.into_body()).await;
            Ok::<_, hyper_util::client::legacy::Error>((status, retry_after, excerpt))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok((status, retry_after, excerpt))) => Attempt {
                outcome: if status.is_success() {
                    Outcome::Delivered
                } else {
                    Outcome::Rejected
                },
                status: Some(status.as_u16()),
                latency: started.elapsed(),
                excerpt: Some(excerpt),
                retry_after,
                error: (!status.is_success()).then(|| {
                    if status.is_redirection() {
                        format!("answered {status}; redirects are not followed")
                    } else {
                        format!("answered {status}")
                    }
                }),
            },
            Ok(Err(e)) => {
                let outcome = if ssrf::is_forbidden_address(&e) {
                    Outcome::RefusedAddress
                } else {
                    Outcome::ConnectionFailed
                };
                failed(outcome, started, describe(&e))
            }
            Err(_) => failed(
                Outcome::Timeout,
                started,
                format!("no whole answer within {} s", self.timeout.as_secs()),
            ),
        }
    }
}

fn failed(outcome: Outcome, started: Instant, error: String) -> Attempt {
    Attempt {
        outcome,
        status: None,
        latency: started.elapsed(),
        excerpt: None,
        retry_after: None,
        error: Some(error),
    }
}

fn build_request(
    url: &Uri,
    message: &Message<'_>,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, http::Error> {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(url.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, USER_AGENT)
        .header(HeaderName::from_static("webhook-id"), message.id)
        .header(
            HeaderName::from_static("webhook-timestamp"),
            HeaderValue::from(message.timestamp),
        )
        .header(
            HeaderName::from_static("webhook-signature"),
            message.signature,
        );
    if let Some(id) = message.correlation_id {
        builder = builder.header(HeaderName::from_static("x-correlation-id"), id);
    }
    builder.body(Full::new(body))
}

/// The error and its causes on one line (hyper-util's own message is terse).
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text.chars().take(limits::TEXT_CHARS_MAX).collect()
}

/// Reads at most [`limits::WEBHOOK_RESPONSE_EXCERPT_BYTES`] of a body, as text
/// (invalid UTF-8 and NUL, which PostgreSQL cannot store, become U+FFFD). A
/// body that ends within the bound leaves its connection to the pool; a longer
/// one is dropped unread.
async fn read_excerpt(mut body: hyper::body::Incoming) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < limits::WEBHOOK_RESPONSE_EXCERPT_BYTES {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let room = limits::WEBHOOK_RESPONSE_EXCERPT_BYTES - bytes.len();
                    bytes.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            Some(Err(_)) | None => break,
        }
    }
    String::from_utf8_lossy(&bytes).replace('\0', "\u{FFFD}")
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3), at most
/// [`limits::WEBHOOK_RETRY_AFTER_SECONDS_MAX`]; a date in the past is no wait.
pub fn parse_retry_after(value: &str, now: time::OffsetDateTime) -> Option<Duration> {
    let value = value.trim();
    let seconds = if let Ok(seconds) = value.parse::<u64>() {
        seconds
    } else {
        let date = parse_http_date(value)?;
        u64::try_from((date - now).whole_seconds()).unwrap_or(0)
    };
    Some(Duration::from_secs(
        seconds.min(limits::WEBHOOK_RETRY_AFTER_SECONDS_MAX),
    ))
}

/// IMF-fixdate, the one HTTP-date form senders must use: `Sun, 06 Nov 1994 08:49:37 GMT`.
fn parse_http_date(value: &str) -> Option<time::OffsetDateTime> {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::PrimitiveDateTime::parse(value, format)
        .ok()
        .map(|t| t.assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates_and_is_capped() {
        let now = time::macros::datetime!(1994-11-06 08:49:00 UTC);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(37))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:48:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past is no wait"
        );
        assert_eq!(
            parse_retry_after("99999999", now),
            Some(Duration::from_secs(limits::WEBHOOK_RETRY_AFTER_SECONDS_MAX))
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    /// A one-connection receiver answering `answer` (status line to body) to every request.
    async fn receiver(answer: &'static str) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    // One request per connection is enough for these tests.
                    let _ = socket.read(&mut buf).await;
                    let _ = socket.write_all(answer.as_bytes()).await;
                    if answer.contains("hang") {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                });
            }
        });
        addr
    }

    fn message() -> Message<'static> {
        Message {
            id: "msg_1",
            timestamp: 1,
            signature: "v1,x",
            correlation_id: None,
        }
    }

    #[tokio::test]
    async fn a_2xx_is_delivered_and_a_3xx_is_not_followed() {
        let client = DeliveryClient::new(true, Duration::from_secs(5));
        let ok = receiver("HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n").await;
        let url: Uri = format!("http://{ok}/in").parse().unwrap();
        let attempt = client
            .send(&url, &message(), Bytes::from_static(b"{}"))
            .await;
        assert_eq!(attempt.outcome, Outcome::Delivered, "{attempt:?}");
        assert_eq!(attempt.status, Some(204));

        let redirect = receiver("HTTP/1.1 307 Temporary Redirect\r\nlocation: http://169.254.169.254/\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
        let url: Uri = format!("http://{redirect}/in").parse().unwrap();
        let attempt = client
            .send(&url, &message(), Bytes::from_static(b"{}"))
            .await;
        assert_eq!(attempt.outcome, Outcome::Rejected);
        assert_eq!(attempt.status, Some(307));
        assert!(
            attempt
                .error
                .unwrap()
                .contains("redirects are not followed")
        );
    }

    #[tokio::test]
    async fn the_excerpt_is_bounded_and_retry_after_is_read_on_429() {
        let client = DeliveryClient::new(true, Duration::from_secs(5));
        let big: &'static str = Box::leak(
            format!(
                "HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: 100000\r\nconnection: close\r\n\r\n{}",
                "x".repeat(100_000)
            )
            .into_boxed_str(),
        );
        let addr = receiver(big).await;
        let url: Uri = format!("http://{addr}/in").parse().unwrap();
        let attempt = client
            .send(&url, &message(), Bytes::from_static(b"{}"))
            .await;
        assert_eq!(attempt.outcome, Outcome::Rejected);
        assert_eq!(attempt.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(
            attempt.excerpt.unwrap().len(),
            limits::WEBHOOK_RESPONSE_EXCERPT_BYTES
        );
    }

    #[tokio::test]
    async fn a_receiver_that_never_finishes_is_a_timeout() {
        let client = DeliveryClient::new(true, Duration::from_secs(1));
        let addr = receiver("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhang").await;
        let url: Uri = format!("http://{addr}/in").parse().unwrap();
        let attempt = client
            .send(&url, &message(), Bytes::from_static(b"{}"))
            .await;
        assert_eq!(attempt.outcome, Outcome::Timeout, "{attempt:?}");
        assert!(attempt.latency >= Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_forbidden_receiver_is_refused_without_the_switch() {
        let client = DeliveryClient::new(false, Duration::from_secs(2));
        let addr = receiver("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        for host in [addr.to_string(), format!("localhost:{}", addr.port())] {
            let url: Uri = format!("http://{host}/in").parse().unwrap();
            let attempt = client
                .send(&url, &message(), Bytes::from_static(b"{}"))
                .await;
            assert_eq!(
                attempt.outcome,
                Outcome::RefusedAddress,
                "{host}: {attempt:?}"
            );
        }
    }
}
