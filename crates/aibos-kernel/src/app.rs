//! Building and running the kernel: the one place where everything is wired.
//!
//! `aibos serve` and every integration test go through [`App::build`] and
//! [`App::run_until_stopped`]; there is no other way to start a kernel.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigSources};
use crate::db::{Db, DbError, migrate};
use crate::http;
use crate::limits;
use crate::state::AppState;
use crate::telemetry::{LogControl, Metrics};

/// How to build an app beyond its configuration.
pub struct AppOptions {
    /// Apply pending migrations at start (`serve --no-migrate` turns this off).
    pub migrate: bool,
    /// Where the configuration came from; a reload reads these again.
    pub sources: ConfigSources,
    /// Log-level control for reloads.
    pub log: LogControl,
    /// Routes merged beside the kernel's own (the test kit uses this for probes).
    pub extra_routes: Option<Router<AppState>>,
}

impl AppOptions {
    /// Defaults: migrate, no log control, no extra routes.
    pub fn new(sources: ConfigSources) -> AppOptions {
        AppOptions {
            migrate: true,
            sources,
            log: LogControl::detached(),
            extra_routes: None,
        }
    }
}

/// Why the kernel could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database could not be opened.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Migrations failed or were refused.
    #[error(transparent)]
    Migration(#[from] migrate::MigrationError),
    /// Pending migrations and `--no-migrate`.
    #[error(
        "the database lacks {0} migration(s); run `aibos migrate up` or start without --no-migrate"
    )]
    MigrationsPending(usize),
    /// The token-signing keys could not be loaded or created.
    #[error("cannot load the token-signing keys: {0}")]
    Keys(String),
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The IO error.
        source: std::io::Error,
    },
}

/// A built kernel, bound to its port and ready to serve.
pub struct App {
    listener: TcpListener,
    router: Router,
    state: AppState,
}

impl App {
    /// Opens the database, migrates it (unless told not to), binds the socket
    /// (port 0 picks a free one) and wires every route.
    pub async fn build(config: Config, options: AppOptions) -> Result<App, StartError> {
        let db = Db::connect(&config.database).await?;
        let migrator = migrate::embedded(db.engine());
        if options.migrate {
            let applied = migrate::up(&db, migrator).await?;
            if !applied.is_empty() {
                tracing::info!(?applied, engine = %db.engine(), "migrations applied");
            }
        } else {
            let pending = migrate::status(&db, migrator)
                .await?
                .iter()
                .filter(|s| s.state != migrate::MigrationState::Applied)
                .count();
            if pending > 0 {
                return Err(StartError::MigrationsPending(pending));
            }
        }

        let listener = TcpListener::bind(config.server.bind)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.server.bind,
                source,
            })?;

        let (routes, mut openapi) = http::api_routes().split_for_parts();
        http::openapi::add_common_problems(&mut openapi);
        let openapi_json = openapi.to_json().unwrap_or_else(|_| "{}".to_owned());
        let keys = crate::identity::admin::load_key_ring(&db, &config.auth)
            .await
            .map_err(StartError::Keys)?;
        let state = AppState::new(
            db,
            config.clone(),
            options.sources,
            options.log,
            Metrics::new(),
            openapi_json,
            keys,
        );
        let routes = match options.extra_routes {
            Some(extra) => routes.merge(extra),
            None => routes,
        };
        let router = http::finish(routes, state.clone(), &config);
        Ok(App {
            listener,
            router,
            state,
        })
    }

    /// The address actually bound (the port is real even when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The state, for reloads and tests.
    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish for
    /// up to `server.shutdown_grace_seconds` before closing the database.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let App {
            listener,
            router,
            state,
        } = self;
        let stop = CancellationToken::new();
        let mut background = spawn_background(&state, stop.clone());

        let stop_serving = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop_serving.cancel();
        });

        let server = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop.clone().cancelled_owned());
        let mut server = tokio::spawn(async move { server.await });

        let result = tokio::select! {
            served = &mut server => served.unwrap_or_else(|e| Err(std::io::Error::other(e))),
            () = async {
                stop.cancelled().await;
                tracing::info!(grace_seconds = state.config().server.shutdown_grace_seconds, "shutting down: finishing in-flight requests");
                tokio::time::sleep(state.config().shutdown_grace()).await;
            } => {
                tracing::warn!("shutdown grace period elapsed; closing remaining connections");
                server.abort();
                Ok(())
            }
        };
        stop.cancel();
        background.abort_all();
        state.db().close().await;
        tracing::info!("stopped");
        result
    }
}

/// Periodic housekeeping and the invalidation listener, stopped with the server.
fn spawn_background(state: &AppState, stop: CancellationToken) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let metrics = state.metrics().clone();
    let upkeep_stop = stop.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(limits::METRICS_UPKEEP_SECONDS));
        loop {
            tokio::select! {
                _ = tick.tick() => metrics.run_upkeep(),
                () = upkeep_stop.cancelled() => break,
            }
        }
    });
    // Keys rotated by `aibos keys rotate` (or another instance) are picked up here.
    let keys_state = state.clone();
    let keys_stop = stop.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(limits::KEY_REFRESH_SECONDS));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => keys_state.refresh_keys().await,
                () = keys_stop.cancelled() => break,
            }
        }
    });
    if let crate::db::Db::Postgres(pool) = state.db() {
        tasks.spawn(crate::authz::listener::run(
            pool.clone(),
            state.clone(),
            stop,
        ));
    }
    tasks
}
