//! The kernel under test: `aibos serve` as a child process of the harness,
//! in a throwaway folder with a configuration file the harness writes, on a
//! throwaway database (a SQLite file in the folder, or a PostgreSQL database
//! created for the scenario and dropped after it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aibos_kernel::secrets::MasterKey;
use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{ChaosEngine, Context, free_port, http_client, require_postgres_url};

/// How long a starting kernel has to answer its liveness probe.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a kernel sent SIGTERM has to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts at binding a free port (another process may take the one picked).
const START_ATTEMPTS: u32 = 3;

/// The kernel's configuration file, section by section; values are TOML
/// literals. Everything is in the file (nothing in the environment), so that
/// a SIGHUP re-reads exactly what the harness wrote.
#[derive(Debug, Clone, Default)]
pub struct Settings(BTreeMap<&'static str, BTreeMap<&'static str, String>>);

impl Settings {
    pub fn set(&mut self, section: &'static str, key: &'static str, literal: impl Into<String>) {
        self.0
            .entry(section)
            .or_default()
            .insert(key, literal.into());
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (section, keys) in &self.0 {
            out.push_str(&format!("[{section}]\n"));
            for (key, value) in keys {
                out.push_str(&format!("{key} = {value}\n"));
            }
            out.push('\n');
        }
        out
    }
}

/// A TOML string literal.
pub fn quoted(text: &str) -> String {
    Value::String(text.to_owned()).to_string()
}

/// A scenario's throwaway world: its folder, its database, the kernel's
/// settings and the bootstrap key.
pub struct World {
    pub folder: tempfile::TempDir,
    pub settings: Settings,
    pub bootstrap_key: String,
    /// The database as the harness reaches it (the kernel may be given a
    /// proxy in front of it instead).
    pub database_url: String,
    postgres: Option<(String, String)>,
}

impl World {
    /// A fresh folder and database, and settings a scenario adjusts before
    /// starting its kernel: quiet JSON logs, limits high enough for the
    /// harness's own load (its clients are one user from one address).
    pub async fn create(context: &Context, scenario: &str) -> anyhow::Result<World> {
        let folder = tempfile::Builder::new()
            .prefix("aibos-chaos-")
            .tempdir()
            .context("cannot create the scenario's folder")?;
        let (database_url, postgres) = match context.engine {
            ChaosEngine::Sqlite => (
                format!("sqlite://{}/aibos.db", folder.path().display()),
                None,
            ),
            ChaosEngine::Postgres => {
                let admin_url = context
                    .postgres_url
                    .clone()
                    .context("--engine postgres needs --postgres-url")?;
                require_postgres_url(&admin_url)?;
                let name = format!(
                    "aibos_chaos_{}_{}",
                    scenario.replace('.', "_"),
                    uuid::Uuid::new_v4().simple()
                );
                let admin = aibos_kernel::db::admin::Admin::connect(&admin_url)
                    .await
                    .context("cannot reach --postgres-url")?;
                admin.create_database(&name).await?;
                admin.close().await;
                let mut url = reqwest::Url::parse(&admin_url).context("--postgres-url")?;
                url.set_path(&format!("/{name}"));
                (url.to_string(), Some((admin_url, name)))
            }
        };
        let (_, master_key) = MasterKey::generate();
        let bootstrap_key = uuid::Uuid::new_v4().simple().to_string();
        let mut settings = Settings::default();
        settings.set("database", "url", quoted(&database_url));
        settings.set("auth", "bootstrap_key", quoted(&bootstrap_key));
        settings.set("auth", "master_key", quoted(&master_key));
        settings.set("log", "level", quoted("warn"));
        settings.set("log", "format", quoted("json"));
        for key in [
            "user_per_minute",
            "user_burst",
            "tenant_per_minute",
            "tenant_burst",
            "address_per_minute",
            "address_burst",
        ] {
            settings.set("rate_limit", key, "100000000");
        }
        Ok(World {
            folder,
            settings,
            bootstrap_key,
            database_url,
            postgres,
        })
    }

    pub fn path(&self) -> &Path {
        self.folder.path()
    }

    pub fn config_file(&self) -> PathBuf {
        self.path().join("aibos.toml")
    }

    /// Writes the configuration file and starts `aibos serve` on it.
    pub async fn start_kernel(&self) -> anyhow::Result<Kernel> {
        Kernel::start(self).await
    }

    /// Runs another `aibos` command on the scenario's configuration (e.g.
    /// `audit verify`), returning its exit code and output.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<(i32, String)> {
        let mut command = Command::new(current_exe()?);
        command
            .arg("--config")
            .arg(self.config_file())
            .args(args)
            .current_dir(self.path());
        without_aibos_environment(&mut command);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await?
            .context("cannot run the aibos command")?;
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        Ok((output.status.code().unwrap_or(-1), text))
    }

    /// Drops the PostgreSQL database (the folder goes with `self`).
    pub async fn remove(self) {
        if let Some((admin_url, name)) = self.postgres
            && let Ok(admin) = aibos_kernel::db::admin::Admin::connect(&admin_url).await
        {
            if let Err(e) = admin.drop_database(&name).await {
                eprintln!("warning: could not drop the chaos database {name}: {e}");
            }
            admin.close().await;
        }
    }
}

fn current_exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find the aibos executable")
}

/// The child sees none of the harness's own `AIBOS_*` variables: its
/// configuration is the file, whole.
fn without_aibos_environment(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AIBOS_") {
            command.env_remove(key);
        }
    }
}

/// A running `aibos serve`.
pub struct Kernel {
    child: Child,
    pub base: String,
    log: PathBuf,
}

impl Kernel {
    async fn start(world: &World) -> anyhow::Result<Kernel> {
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_port()?;
            let mut settings = world.settings.clone();
            settings.set("server", "bind", quoted(&format!("127.0.0.1:{port}")));
            std::fs::write(world.config_file(), settings.render())
                .context("cannot write the kernel's configuration")?;
            let log = world.path().join("kernel.log");
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?;
            let mut command = Command::new(current_exe()?);
            command
                .arg("--config")
                .arg(world.config_file())
                .arg("serve")
                .current_dir(world.path())
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out);
            without_aibos_environment(&mut command);
            let child = command.spawn().context("cannot start aibos serve")?;
            let mut kernel = Kernel {
                child,
                base: format!("http://127.0.0.1:{port}"),
                log,
            };
            match kernel.wait_live().await {
                Ok(()) => return Ok(kernel),
                Err(e) => {
                    kernel.kill9().await;
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("the kernel did not start")))
    }

    async fn wait_live(&mut self) -> anyhow::Result<()> {
        let http = http_client(Duration::from_secs(2))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the kernel exited at start ({status}): {}", self.log_tail());
            }
            if let Ok(r) = http.get(self.url("/api/health/live")).send().await
                && r.status() == 200
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the kernel did not answer within {START_TIMEOUT:?}: {}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs (not restarted, not crashed).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, and reap it.
    pub async fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (e.g. `HUP`) with kill(1).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .context("cannot run kill")?;
        if !status.success() {
            bail!("kill -{signal} {} failed", self.pid());
        }
        Ok(())
    }

    /// SIGTERM, a bounded wait, then SIGKILL.
    pub async fn stop(mut self) {
        if self.signal("TERM").is_ok() {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if !self.running() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.kill9().await;
    }

    /// The last lines of the kernel's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub const ADMIN_EMAIL: &str = "chaos@example.com";

/// Bootstraps the platform administrator (first call only) and logs in.
pub async fn admin_token(
    http: &reqwest::Client,
    kernel: &Kernel,
    world: &World,
    password: &str,
    bootstrap: bool,
) -> anyhow::Result<String> {
    let bootstrap_key = bootstrap.then_some(world.bootstrap_key.as_str());
    bootstrap_and_login(http, &kernel.base, bootstrap_key, ADMIN_EMAIL, password).await
}

/// On the kernel at `base`: bootstraps the platform administrator `email`
/// with `bootstrap_key` (when given), then logs in to the system tenant; the
/// access token. The chaos harness's and the drills' way in.
pub async fn bootstrap_and_login(
    http: &reqwest::Client,
    base: &str,
    bootstrap_key: Option<&str>,
    email: &str,
    password: &str,
) -> anyhow::Result<String> {
    if let Some(key) = bootstrap_key {
        let created = http
            .post(format!("{base}/api/kernel/bootstrap"))
            .header("x-bootstrap-key", key)
            .json(&json!({ "email": email, "password": password, "name": "Administrator" }))
            .send()
            .await?;
        if !created.status().is_success() {
            bail!(
                "bootstrap answered {}: {}",
                created.status(),
                created.text().await?
            );
        }
    }
    let login: Value = http
        .post(format!("{base}/api/kernel/auth/login"))
        .json(&json!({ "tenant": "system", "email": email, "password": password }))
        .send()
        .await?
        .json()
        .await?;
    login["access_token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("login gave no token: {login}"))
}

/// A fresh administrator password.
pub fn password() -> String {
    format!("chaos {}", uuid::Uuid::new_v4().simple())
}

/// Publishes one event; the status and, on 201, the event's id.
pub async fn publish(
    http: &reqwest::Client,
    kernel_base: &str,
    token: &str,
    n: u64,
) -> Result<(u16, Option<String>), reqwest::Error> {
    let response = http
        .post(format!("{kernel_base}/api/kernel/events/publish"))
        .bearer_auth(token)
        .json(&json!({ "type": "chaos.payment.processed", "payload": { "n": n, "amount_minor": n * 100 } }))
        .send()
        .await?;
    let status = response.status().as_u16();
    let id = if status == 201 {
        response
            .json::<Value>()
            .await
            .ok()
            .and_then(|b| b["id"].as_str().map(str::to_owned))
    } else {
        None
    };
    Ok((status, id))
}

/// `GET /metrics` as text.
pub async fn metrics(http: &reqwest::Client, kernel: &Kernel) -> anyhow::Result<String> {
    Ok(http
        .get(kernel.url("/metrics"))
        .send()
        .await?
        .text()
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_render_as_toml_sections() {
        let mut s = Settings::default();
        s.set("log", "level", quoted("warn"));
        s.set("database", "url", quoted("sqlite://x \"y\""));
        assert_eq!(
            s.render(),
            "[database]\nurl = \"sqlite://x \\\"y\\\"\"\n\n[log]\nlevel = \"warn\"\n\n"
        );
    }
}
