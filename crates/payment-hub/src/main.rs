//! `payment-hub`: read the environment, build the hub, serve until SIGINT or SIGTERM.
//! Exit 78 on a configuration error (every problem listed), 1 on any other failure.

use std::process::ExitCode;

use payment_hub::{Hub, HubConfig, HubStartError};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = match HubConfig::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(78);
        }
    };
    let hub = match Hub::build(config).await {
        Ok(hub) => hub,
        Err(error @ HubStartError::Config(_)) => {
            eprintln!("{error}");
            return ExitCode::from(78);
        }
        Err(error) => {
            eprintln!("payment-hub could not start: {error}");
            return ExitCode::from(1);
        }
    };
    match hub.run_until_stopped(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("payment-hub stopped with an error: {error}");
            ExitCode::from(1)
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}
