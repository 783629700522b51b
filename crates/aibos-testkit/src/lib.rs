//! Test kit: a real kernel on a random port with a fresh database per test.
//!
//! - [`Engine`]: which database a test runs on; PostgreSQL needs
//!   `AIBOS_TEST_DATABASE_URL`, and with `AIBOS_REQUIRE_POSTGRES=1` its absence
//!   fails the test instead of skipping it.
//! - [`TestDb`]: a new SQLite file, or a new PostgreSQL database dropped afterwards.
//! - [`spawn_kernel`]: builds the app through the real configuration loader and
//!   serves it on `127.0.0.1:0` until the returned [`TestKernel`] is dropped.
//! - [`process::KernelProcess`]: the real binary as a child process, logs captured.
//! - [`hub::HubProcess`]: the payment hub's binary as a child process.
//! - [`cluster::Cluster`]: a throwaway PostgreSQL cluster to stop and start.
//! - [`nats::TestNats`]: the NATS server of the relay tests, and what the relay stored.
//! - [`redis`]: the rate-limit tests' Redis (shared, or one of a test's own to stop and start).
//! - [`receiver::Receiver`]: a webhook receiver recording every attempt, answering as told.

pub mod api;
pub mod cluster;
mod db;
pub mod hub;
pub mod nats;
pub mod process;
pub mod receiver;
pub mod redis;
pub mod upstream;

use std::net::SocketAddr;

use aibos_kernel::config::{Config, ConfigSources};
use aibos_kernel::state::AppState;
use aibos_kernel::{App, AppOptions};
use axum_free::Router;
use tokio_util::sync::CancellationToken;

pub use db::{Engine, TestDb};

/// Re-export so tests can add probe routes without naming axum themselves.
/// The first of `candidates` (a name on `PATH`, or a path) that runs with
/// `--version`: the server binary a test starts a private copy of.
pub(crate) fn installed_binary(candidates: [&'static str; 3]) -> Option<&'static str> {
    candidates.into_iter().find(|binary| {
        std::process::Command::new(binary)
            .arg("--version")
            .output()
            .is_ok()
    })
}

pub mod axum_free {
    pub use aibos_kernel::http::extract::AppJson;
    pub type Router = axum::Router<aibos_kernel::state::AppState>;
}

/// The master key of test kernels that do not choose one (32 bytes of 0x2a,
/// base64): test data only, never a real deployment's.
pub const TEST_MASTER_KEY: &str = "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=";

/// Rate limits of test kernels that do not choose their own: the largest the
/// configuration accepts, so that no test is refused by accident.
pub const GENEROUS_RATE_LIMIT_VALUE: &str = "1000000";
pub(crate) const GENEROUS_RATE_LIMITS: [(&str, &str); 6] = [
    (
        "AIBOS_RATE_LIMIT__USER_PER_MINUTE",
        GENEROUS_RATE_LIMIT_VALUE,
    ),
    ("AIBOS_RATE_LIMIT__USER_BURST", GENEROUS_RATE_LIMIT_VALUE),
    (
        "AIBOS_RATE_LIMIT__TENANT_PER_MINUTE",
        GENEROUS_RATE_LIMIT_VALUE,
    ),
    ("AIBOS_RATE_LIMIT__TENANT_BURST", GENEROUS_RATE_LIMIT_VALUE),
    (
        "AIBOS_RATE_LIMIT__ADDRESS_PER_MINUTE",
        GENEROUS_RATE_LIMIT_VALUE,
    ),
    ("AIBOS_RATE_LIMIT__ADDRESS_BURST", GENEROUS_RATE_LIMIT_VALUE),
];

/// How to start a test kernel beyond the defaults.
#[derive(Default)]
pub struct KernelOptions {
    /// Extra `AIBOS_*` configuration variables.
    pub env: Vec<(String, String)>,
    /// Probe routes merged beside the kernel's own.
    pub extra_routes: Option<Router>,
    /// A database of the test's own instead of a fresh one (e.g. a throwaway cluster).
    pub database_url: Option<String>,
    /// A configuration file (`--config`), which a test may rewrite before
    /// `state.reload()` (the environment layer cannot change while running).
    pub config_file: Option<std::path::PathBuf>,
}

/// A running kernel; stopped (and its database dropped) when this is dropped.
pub struct TestKernel {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    /// The `metrics.bind` listener's address, when the test set one.
    pub metrics_addr: Option<SocketAddr>,
    /// A client without a timeout of its own; tests set one where they need it.
    pub client: reqwest::Client,
    /// The kernel's state, for reloads and direct database checks.
    pub state: AppState,
    /// The database under it.
    pub db: TestDb,
    stop: CancellationToken,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestKernel {
    /// `base_url + path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// The Prometheus text served at `/metrics` (on `metrics.bind` when set).
    pub async fn metrics_text(&self) -> String {
        let url = match self.metrics_addr {
            Some(addr) => format!("http://{addr}/metrics"),
            None => self.url("/metrics"),
        };
        let response = self.client.get(url).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET /metrics");
        response.text().await.unwrap()
    }

    /// Starts graceful shutdown and waits until the server has stopped.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.stop.cancel();
        match self.server.take() {
            Some(server) => server
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e))),
            None => Ok(()),
        }
    }

    /// Asks for shutdown without waiting (to test in-flight requests).
    pub fn begin_shutdown(&self) {
        self.stop.cancel();
    }

    /// Sends `head` (request line and headers, exactly as written: no client-side
    /// path normalisation; it should say `connection: close`), then `chunked_body`
    /// in `transfer-encoding: chunked` framing if given, and returns the raw
    /// answer read until the server closes, within 10 s. A server that answers
    /// and closes before the body is all sent is not an error: that is what a
    /// body limit does.
    pub async fn raw_exchange(&self, head: &str, chunked_body: Option<&[u8]>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        if let Some(body) = chunked_body {
            for chunk in body.chunks(64 * 1024) {
                let frame = format!("{:x}\r\n", chunk.len());
                if stream.write_all(frame.as_bytes()).await.is_err()
                    || stream.write_all(chunk).await.is_err()
                    || stream.write_all(b"\r\n").await.is_err()
                {
                    break;
                }
            }
            let _ = stream.write_all(b"0\r\n\r\n").await;
        }
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            stream.read_to_end(&mut answer),
        )
        .await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// The server task, to await after [`TestKernel::begin_shutdown`].
    pub fn take_server(&mut self) -> Option<tokio::task::JoinHandle<std::io::Result<()>>> {
        self.server.take()
    }
}

impl Drop for TestKernel {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// Starts a kernel on `engine` with default options; `None` when the engine is
/// not available here (PostgreSQL without `AIBOS_TEST_DATABASE_URL`).
pub async fn spawn_kernel(engine: Engine) -> Option<TestKernel> {
    spawn_kernel_with(engine, KernelOptions::default()).await
}

/// Starts a kernel on `engine` with `options`.
pub async fn spawn_kernel_with(engine: Engine, options: KernelOptions) -> Option<TestKernel> {
    let db = TestDb::create(engine).await?;
    let config_dir = tempfile::tempdir().expect("create a temporary configuration folder");
    let mut env = vec![
        ("AIBOS_SERVER__BIND".to_owned(), "127.0.0.1:0".to_owned()),
        (
            "AIBOS_DATABASE__URL".to_owned(),
            options
                .database_url
                .clone()
                .unwrap_or_else(|| db.url().to_owned()),
        ),
        (
            "AIBOS_SERVER__SHUTDOWN_GRACE_SECONDS".to_owned(),
            "10".to_owned(),
        ),
    ];
    // Several kernels of one test share a database (and so must share the
    // master key) but not a working directory, where a generated key file would
    // land with PostgreSQL: every test kernel gets the same fixed key unless the
    // test chooses its own (tests/api/secrets.rs covers generation).
    if !options
        .env
        .iter()
        .any(|(k, _)| k.starts_with("AIBOS_AUTH__MASTER_KEY"))
    {
        env.push((
            "AIBOS_AUTH__MASTER_KEY".to_owned(),
            TEST_MASTER_KEY.to_owned(),
        ));
    }
    // Tests of other areas send more than a user's default burst in a
    // moment: their kernels get limits that never refuse, unless the test
    // sets any rate-limit key itself (tests/api/rate_limits.rs).
    if !options
        .env
        .iter()
        .any(|(k, _)| k.starts_with("AIBOS_RATE_LIMIT__"))
    {
        env.extend(
            GENEROUS_RATE_LIMITS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
    }
    env.extend(options.env);
    let mut sources = ConfigSources::new(config_dir.path(), env);
    sources.config_file = options.config_file;
    let config = Config::load(&sources).expect("the test configuration is valid");
    let app_options = AppOptions {
        extra_routes: options.extra_routes,
        ..AppOptions::new(sources)
    };
    let app = App::build(config, app_options)
        .await
        .expect("the kernel starts");
    let addr = app.local_addr();
    let metrics_addr = app.metrics_addr();
    let state = app.state();
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let server = tokio::spawn(async move {
        // Keep the configuration folder alive as long as the server.
        let _config_dir = config_dir;
        app.run_until_stopped(async move { stopped.cancelled().await })
            .await
    });
    Some(TestKernel {
        addr,
        base_url: format!("http://{addr}"),
        metrics_addr,
        client: reqwest::Client::new(),
        state,
        db,
        stop,
        server: Some(server),
    })
}
