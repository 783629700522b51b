//! The real `aibos` binary as a child process, with its log lines captured.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a test waits for the kernel to say it is listening.
const LISTENING_TIMEOUT_SECONDS: u64 = 30;

/// A running `aibos serve` and everything it logged so far.
pub struct KernelProcess {
    /// The child process (killed on drop).
    pub child: Child,
    /// `http://ADDR` as logged by the kernel.
    pub base_url: String,
    /// Every stderr line so far.
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl KernelProcess {
    /// Runs `binary serve` in `cwd` with only `env` (plus PATH) and waits for its
    /// "listening" log line. `Err` carries the exit status and logs when it exits first.
    pub async fn start(
        binary: &Path,
        cwd: &Path,
        env: &[(&str, &str)],
    ) -> Result<KernelProcess, String> {
        let mut command = Command::new(binary);
        command
            .arg("serve")
            .current_dir(cwd)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AIBOS_LOG__FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // As in `spawn_kernel_with`: limits that never refuse, unless the test sets its own.
        if !env.iter().any(|(k, _)| k.starts_with("AIBOS_RATE_LIMIT__")) {
            for (k, v) in crate::GENEROUS_RATE_LIMITS {
                command.env(k, v);
            }
        }
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let sink = logs.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut addr_tx = Some(addr_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = listening_address(&line)
                    && let Some(tx) = addr_tx.take()
                {
                    let _ = tx.send(addr);
                }
                sink.lock().expect("log sink").push(line);
            }
        });
        match tokio::time::timeout(Duration::from_secs(LISTENING_TIMEOUT_SECONDS), addr_rx).await {
            Ok(Ok(addr)) => Ok(KernelProcess {
                child,
                base_url: format!("http://{addr}"),
                logs,
            }),
            _ => {
                let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                Err(format!(
                    "the kernel did not start: {status:?}\n{}",
                    logs.lock().expect("log sink").join("\n")
                ))
            }
        }
    }

    /// Sends a signal (`TERM`, `HUP`, …) with the system's `kill`.
    pub async fn signal(&self, name: &str) {
        let pid = self.child.id().expect("the child is running");
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .await
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// Waits until a log line contains `needle` (bounded), returning it.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .logs
                .lock()
                .expect("log sink")
                .iter()
                .find(|l| l.contains(needle))
            {
                return Some(line.clone());
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until at least `count` log lines contain `needle` (bounded).
    pub async fn wait_for_log_count(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.count_logs(needle) < count {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// How many log lines contain `needle`.
    pub fn count_logs(&self, needle: &str) -> usize {
        self.logs
            .lock()
            .expect("log sink")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Every log line joined, for failure messages.
    pub fn all_logs(&self) -> String {
        self.logs.lock().expect("log sink").join("\n")
    }
}

fn listening_address(line: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    if value["message"] != "listening" {
        return None;
    }
    value["address"].as_str().map(str::to_owned)
}
