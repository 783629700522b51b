//! `aibos status`: asks the kernel at `server.bind` (or `--url`) for `/api/health`.

use std::time::Duration;

use aibos_kernel::config::ConfigSources;
use clap::Args;

use super::{EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, load_config, print_json};

/// How long `status` waits for the kernel's answer.
const STATUS_TIMEOUT_SECONDS: u64 = 5;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Base URL of the kernel; defaults to http://<server.bind>.
    #[arg(long)]
    url: Option<String>,
    /// Print machine-readable JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(sources: ConfigSources, args: StatusArgs) -> u8 {
    let base = match args.url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => match load_config(&sources, args.json) {
            Ok(config) => format!("http://{}", config.server.bind),
            Err(code) => return code,
        },
    };
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(STATUS_TIMEOUT_SECONDS))
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILURE;
        }
    };
    let url = format!("{base}/api/health");
    let response = match client.get(&url).send().await {
        Ok(response) => response,
        Err(e) => {
            if args.json {
                print_json(
                    &serde_json::json!({ "status": "unreachable", "url": url, "error": e.to_string() }),
                );
            } else {
                eprintln!("error: no kernel answers at {url}: {e}");
            }
            return EXIT_UNAVAILABLE;
        }
    };
    let healthy = response.status().is_success();
    let body: serde_json::Value = response.json().await.unwrap_or(serde_json::Value::Null);
    if args.json {
        print_json(&body);
    } else {
        let field = |path: &[&str]| {
            path.iter()
                .fold(&body, |v, k| &v[*k])
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| "?".to_owned())
        };
        println!("kernel:   {} ({})", field(&["status"]), base);
        println!("version:  {}", field(&["version"]));
        println!(
            "database: {} ({})",
            field(&["database", "status"]),
            field(&["database", "engine"])
        );
        if let Some(ms) = body["database"]["latency_ms"].as_f64() {
            println!("latency:  {ms:.3} ms");
        }
    }
    if healthy { EXIT_OK } else { EXIT_FAILURE }
}
