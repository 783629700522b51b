//! The `payment-hub` binary: exit codes and a clean stop on SIGTERM.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_payment-hub");

fn hub_command() -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars() {
        if name.starts_with("AIBOS_") || name.starts_with("PAYMENT_HUB_") {
            command.env_remove(name);
        }
    }
    command.env("RUST_LOG", "info");
    command
}

#[test]
fn a_configuration_error_lists_every_problem_exits_78_and_prints_no_secret() {
    let output = hub_command()
        .env("PAYMENT_HUB_BIND", "not-an-address")
        .env("PAYMENT_HUB_SERVICE_ACCOUNTS", "broken-sas_topsecret")
        .env("PAYMENT_HUB_DATABASE_URL", "mysql://u:hunter2@db/x")
        .output()
        .expect("the binary runs");
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "PAYMENT_HUB_BIND",
        "AIBOS_ASSERTION_SECRETS",
        "PAYMENT_HUB_SERVICE_ACCOUNTS",
        "PAYMENT_HUB_DATABASE_URL",
    ] {
        assert!(stderr.contains(expected), "{stderr}");
    }
    for secret in ["topsecret", "hunter2"] {
        assert!(!stderr.contains(secret), "{stderr}");
    }
}

#[test]
fn the_binary_serves_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = probe.local_addr().expect("address");
    drop(probe);
    let mut child = hub_command()
        .env("PAYMENT_HUB_BIND", address.to_string())
        .env(
            "PAYMENT_HUB_DATABASE_URL",
            format!("sqlite://{}", dir.path().join("nested/hub.db").display()),
        )
        .env(
            "AIBOS_ASSERTION_SECRETS",
            "kas_0123456789abcdef_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().expect("stdout");
    // Wait for the "listening" line rather than sleeping.
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = lines
            .next()
            .expect("a log line before exit")
            .expect("utf-8");
        if line.contains("payment hub listening") {
            break;
        }
        assert!(Instant::now() < deadline, "the hub never said it listens");
    }
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    use std::io::{Read as _, Write as _};
    stream
        .write_all(b"GET /ping HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#"{"message":"pong"}"#), "{answer}");
    assert!(
        dir.path().join("nested/hub.db").exists(),
        "the file and its folder are created"
    );

    let killed = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = child.wait().expect("the hub exits");
    assert_eq!(status.code(), Some(0));
}
