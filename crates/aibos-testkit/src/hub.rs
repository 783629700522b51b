//! The payment hub's binary (`payment-hub`, the reference cell) as a child
//! process, for the end-to-end tests that run the kernel and the hub as two
//! programs talking over HTTP, as they are deployed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a test waits for the hub to answer `/ping`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The `payment-hub` binary beside the test's own build (target/<profile>/),
/// built first if this test run has not built it (`cargo test -p aibos`
/// builds only the aibos package's binaries; `cargo test --workspace` builds it).
pub fn hub_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test> → target/<profile>/payment-hub
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lies in target/<profile>/deps");
    let binary = profile_dir.join("payment-hub");
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = std::process::Command::new(cargo)
            .args(["build", "-q", "-p", "payment-hub", "--bin", "payment-hub"])
            .status()
            .expect("run cargo build -p payment-hub");
        assert!(status.success(), "cargo build -p payment-hub failed");
    }
    binary
}

/// A free port on the loopback interface (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running `payment-hub` and everything it logged so far.
pub struct HubProcess {
    /// The child process (killed on drop).
    pub child: Child,
    /// Where it listens.
    pub address: SocketAddr,
    /// `http://ADDR`.
    pub base_url: String,
    /// Every stderr and stdout line so far.
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl HubProcess {
    /// Runs the hub on `address` with only `env` (plus PATH) and waits until
    /// `/ping` answers. `Err` carries the logs when it does not.
    pub async fn start(address: SocketAddr, env: &[(&str, &str)]) -> Result<HubProcess, String> {
        let mut command = Command::new(hub_binary());
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PAYMENT_HUB_BIND", address.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start payment-hub: {e}"))?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let sink = logs.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    sink.lock().expect("log sink").push(line);
                }
            });
        }
        let base_url = format!("http://{address}");
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(response) = client.get(format!("{base_url}/ping")).send().await
                && response.status().is_success()
            {
                return Ok(HubProcess {
                    child,
                    address,
                    base_url,
                    logs,
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "payment-hub exited with {status}:\n{}",
                    logs.lock().expect("log sink").join("\n")
                ));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "payment-hub did not answer /ping:\n{}",
                    logs.lock().expect("log sink").join("\n")
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything logged so far.
    pub fn all_logs(&self) -> String {
        self.logs.lock().expect("log sink").join("\n")
    }

    /// Stops it with SIGTERM and waits for it (bounded); its exit status.
    pub async fn stop(mut self) -> Option<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}
