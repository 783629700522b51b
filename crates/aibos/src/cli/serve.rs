//! `aibos serve`

use aibos_kernel::config::ConfigSources;
use aibos_kernel::telemetry;
use aibos_kernel::{App, AppOptions};
use clap::Args;

use super::{EXIT_FAILURE, EXIT_OK, load_config};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Do not apply pending migrations at start (refuse to start if any are pending).
    #[arg(long)]
    no_migrate: bool,
}

pub async fn run(sources: ConfigSources, args: ServeArgs) -> u8 {
    let config = match load_config(&sources, false) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let log = telemetry::init_logging(&config.log);
    let options = AppOptions {
        migrate: !args.no_migrate,
        log,
        ..AppOptions::new(sources)
    };
    let app = match App::build(config, options).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "the kernel could not start");
            eprintln!("error: {e}");
            return EXIT_FAILURE;
        }
    };
    let stop_signal = shutdown_signal();
    let state = app.state();
    match app.metrics_addr() {
        Some(metrics_address) => {
            tracing::info!(address = %app.local_addr(), %metrics_address, engine = %state.db().engine(), event_loops = state.config_ref().server.event_loop_count(), version = env!("CARGO_PKG_VERSION"), "listening");
        }
        None => {
            tracing::info!(address = %app.local_addr(), engine = %state.db().engine(), event_loops = state.config_ref().server.event_loop_count(), version = env!("CARGO_PKG_VERSION"), "listening");
        }
    }
    tokio::spawn(reload_on_sighup(state));
    match app.run_until_stopped(stop_signal).await {
        Ok(()) => EXIT_OK,
        Err(e) => {
            tracing::error!(error = %e, "the server failed");
            EXIT_FAILURE
        }
    }
}

/// Listens for SIGTERM and SIGINT from the moment it is called (the handlers
/// are installed before it returns, so a signal sent right after, say, a
/// "ready" line is not the default action's kill); the future completes on
/// the first of them.
pub(super) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (terminate, interrupt) {
            (Ok(mut terminate), Ok(mut interrupt)) => tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM received"),
                _ = interrupt.recv() => tracing::info!("SIGINT received"),
            },
            (Err(e), Ok(mut interrupt)) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
                interrupt.recv().await;
            }
            (Ok(mut terminate), Err(e)) => {
                tracing::error!(error = %e, "cannot listen for SIGINT; only SIGTERM stops the server");
                terminate.recv().await;
            }
            (Err(e), Err(_)) => {
                tracing::error!(error = %e, "cannot listen for signals; the server stops only when killed");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Reloads the configuration on every SIGHUP (the library logs the outcome).
async fn reload_on_sighup(state: aibos_kernel::AppState) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot listen for SIGHUP; configuration reload is unavailable");
        return;
    };
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP received: reloading the configuration");
        // The outcome (applied or refused, and why) is logged and counted by reload itself.
        let _ = state.reload().await;
    }
}
