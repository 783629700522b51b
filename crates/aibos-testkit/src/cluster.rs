//! A throwaway PostgreSQL cluster of a test's own, to stop and start at will
//! without touching the machine's shared server.

use std::path::PathBuf;
use std::process::Command;

/// A cluster in a temporary folder on a free loopback port; stopped on drop.
pub struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// The folder holding `initdb` and `pg_ctl`, if PostgreSQL's server binaries are installed.
    pub fn binaries() -> Option<PathBuf> {
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("pg_ctl").is_file() && bin.join("initdb").is_file())
            .collect();
        versions.sort();
        versions.pop()
    }

    /// Creates and starts a cluster; `Err` says why it could not.
    pub fn start() -> Result<Cluster, String> {
        let bin = Cluster::binaries()
            .ok_or("PostgreSQL server binaries not found under /usr/lib/postgresql")?;
        let dir = tempfile::Builder::new()
            .prefix("aibos-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        let port = free_port()?;
        // initdb refuses to run as root: hand the folder to the postgres user.
        let as_root = run("id", &["-u"])
            .map(|uid| uid.trim() == "0")
            .unwrap_or(false);
        if as_root {
            run(
                "chown",
                &["-R", "postgres:postgres", &dir.path().to_string_lossy()],
            )?;
        }
        let cluster = Cluster {
            bin,
            data,
            port,
            _dir: dir,
        };
        cluster.pg(
            as_root,
            "initdb",
            &[
                "-D",
                &cluster.data.to_string_lossy(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        )?;
        cluster.start_server()?;
        Ok(cluster)
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast mode: open connections are cut, as in an outage).
    pub fn stop_server(&self) -> Result<(), String> {
        self.pg(
            self.as_root(),
            "pg_ctl",
            &[
                "-D",
                &self.data.to_string_lossy(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        )
        .map(|_| ())
    }

    /// Starts the server again on the same port and waits until it accepts connections.
    pub fn start_server(&self) -> Result<(), String> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.data.parent().unwrap_or(&self.data).display()
        );
        let log = self.data.parent().unwrap_or(&self.data).join("server.log");
        self.pg(
            self.as_root(),
            "pg_ctl",
            &[
                "-D",
                &self.data.to_string_lossy(),
                "-o",
                &options,
                "-l",
                &log.to_string_lossy(),
                "-w",
                "start",
            ],
        )
        .map(|_| ())
    }

    fn as_root(&self) -> bool {
        run("id", &["-u"])
            .map(|uid| uid.trim() == "0")
            .unwrap_or(false)
    }

    fn pg(&self, as_root: bool, tool: &str, args: &[&str]) -> Result<String, String> {
        let path = self.bin.join(tool);
        let path = path.to_string_lossy();
        if as_root {
            let mut full = vec!["-u", "postgres", "--", path.as_ref()];
            full.extend_from_slice(args);
            run("runuser", &full)
        } else {
            run(&path, args)
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg(
            self.as_root(),
            "pg_ctl",
            &[
                "-D",
                &self.data.to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}
