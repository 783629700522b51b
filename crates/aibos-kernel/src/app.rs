//! Building and running the kernel: the one place where everything is wired.
//!
//! `aibos serve` and every integration test go through [`App::build`] and
//! [`App::run_until_stopped`]; there is no other way to start a kernel.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigSources};
use crate::db::{Db, DbError, migrate};
use crate::http;
use crate::http::dealer::DealtConnections;
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
    /// No usable master key, or stored secrets that do not open with it.
    #[error("secrets at rest: {0}")]
    MasterKey(#[from] crate::secrets::source::MasterKeyError),
    /// The token-signing keys could not be loaded or created.
    #[error("cannot load the token-signing keys: {0}")]
    Keys(String),
    /// The service registry could not be read into the gateway's route table.
    #[error("cannot load the gateway's route table: {0}")]
    Registry(sqlx::Error),
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
    /// The listening socket; its connections are dealt to the event loops.
    listener: std::net::TcpListener,
    router: Router,
    state: AppState,
    /// With `metrics.bind`: the metrics listener and what it serves (`/metrics` alone).
    metrics: Option<(std::net::TcpListener, Router)>,
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

        let listener = bind(config.server.bind).map_err(|source| StartError::Bind {
            addr: config.server.bind,
            source,
        })?;

        let metrics_listener = match config.metrics.bind {
            Some(addr) => Some(bind(addr).map_err(|source| StartError::Bind { addr, source })?),
            None => None,
        };

        let (routes, mut openapi) = http::api_routes(&config).split_for_parts();
        openapi.merge(<crate::gateway::proxy::GatewayApi as utoipa::OpenApi>::openapi());
        http::openapi::add_common_problems(&mut openapi);
        let openapi_json = openapi.to_json().unwrap_or_else(|_| "{}".to_owned());
        let master_keys = std::sync::Arc::new(
            crate::secrets::source::load(
                &config.auth,
                &config.database,
                &options.sources.base_dir,
                &db,
            )
            .await?,
        );
        let sealed = crate::secrets::source::seal_and_check(&db, &master_keys).await?;
        if sealed > 0 {
            tracing::info!(
                sealed,
                key_id = master_keys.current().id(),
                "sealed secrets stored in clear by an older kernel"
            );
        }
        let keys = crate::identity::admin::load_key_ring(&db, &config.auth, &master_keys)
            .await
            .map_err(StartError::Keys)?;
        let state = AppState::new(
            db,
            config.clone(),
            options.sources,
            options.log,
            Metrics::new(),
            openapi_json,
            (keys, master_keys),
        );
        state
            .gateway()
            .rebuild(state.db(), state.master_keys(), state.metrics())
            .await
            .map_err(StartError::Registry)?;
        // Redis, when configured: reachable now → shared budgets from the first request.
        state.rate_limiter().connect(&state).await;
        let routes = match options.extra_routes {
            Some(extra) => routes.merge(extra),
            None => routes,
        };
        let router = http::finish(routes, state.clone(), &config);
        let metrics = metrics_listener
            .map(|listener| (listener, http::metrics_routes(state.clone(), &config)));
        Ok(App {
            listener,
            router,
            state,
            metrics,
        })
    }

    /// The address actually bound (the port is real even when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The address of the `metrics.bind` listener, when there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .as_ref()
            .and_then(|(listener, _)| listener.local_addr().ok())
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
            metrics,
        } = self;
        // Before anything is started: a failure here leaves nothing running.
        let metrics = match metrics {
            Some((listener, routes)) => {
                Some((tokio::net::TcpListener::from_std(listener)?, routes))
            }
            None => None,
        };
        let stop = CancellationToken::new();
        let mut background = spawn_background(&state, stop.clone());
        // The webhook worker runs on a thread and current-thread runtime of its
        // own, as the event loops do: an attempt, its connection's task and the
        // pool's bookkeeping then wake each other on one thread instead of
        // across the shared runtime's workers. At shutdown it is given time
        // to write what it delivered and give its leases back.
        let (webhooks_done, webhooks) = tokio::sync::oneshot::channel::<()>();
        let (worker_state, worker_stop) = (state.clone(), stop.clone());
        std::thread::Builder::new()
            .name("aibos-webhooks".to_owned())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(crate::events::webhook::worker::run(
                        worker_state,
                        worker_stop,
                    )),
                    Err(e) => tracing::error!(error = %e, "cannot start the webhook worker's runtime; no webhook is delivered"),
                }
                let _ = webhooks_done.send(());
            })?;

        let stop_serving = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop_serving.cancel();
        });

        // Event loops (one per core unless `server.event_loops` says otherwise):
        // a connection lives on one thread from accept to close, with no
        // wake-ups between threads (what the work-stealing runtime cost on the
        // hot path; see docs/performance.md). The acceptor deals connections to
        // the loops by how busy they are (http::dealer); it and the background
        // work stay on the caller's runtime.
        let event_loops = state.config_ref().server.event_loop_count();
        let runtimes = (0..event_loops)
            .map(|_| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let server = state.config_ref().server.clone();
        let pending =
            crate::http::conn::PendingByAddress::new(server.max_pending_connections_per_address);
        let timeouts = crate::http::conn::ConnectionTimeouts::from_config(&server);
        let (dealer, dealt) = crate::http::dealer::deal(
            listener,
            runtimes.iter().map(|r| r.metrics()).collect(),
            pending,
        )?;
        let acceptor = tokio::spawn(dealer.run(stop.clone()));
        let mut servers = Vec::with_capacity(dealt.len());
        for (index, (connections, runtime)) in dealt.into_iter().zip(runtimes).enumerate() {
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<std::io::Result<()>>();
            // Each event loop gets its own upstream client (see gateway::client),
            // its own front cache of authenticated tokens, and its dealer's
            // requests to shed connections.
            let local = std::sync::Arc::new(crate::state::EventLoopLocal {
                upstream: crate::gateway::client::build(&state.config_ref().gateway),
                auth: crate::authz::cache::LoopAuthCache::default(),
                shedding: connections.shedding(),
            });
            let router = router.clone().layer(axum::Extension(local.clone()));
            let door = crate::http::front::FrontDoorMaker::new(router, state.clone(), local);
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("aibos-http-{index}"))
                .spawn(move || {
                    let result = serve_on_this_thread(&runtime, connections, door, timeouts, stop);
                    let _ = done_tx.send(result);
                })?;
            servers.push(done_rx);
        }
        // The metrics listener, when `metrics.bind` is set: a plain axum server
        // on this runtime (a scrape every few seconds needs no event loop of
        // its own), stopped with the others.
        let metrics_server = match metrics {
            Some((listener, routes)) => {
                let stop = stop.clone();
                Some(tokio::spawn(async move {
                    axum::serve(
                        listener,
                        routes.into_make_service_with_connect_info::<SocketAddr>(),
                    )
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
                }))
            }
            None => None,
        };
        let all_done = async {
            let mut result = Ok(());
            for server in servers {
                if let Ok(Err(e)) = server.await {
                    result = Err(e);
                }
            }
            result
        };
        tokio::pin!(all_done);

        let result = tokio::select! {
            served = &mut all_done => served,
            () = async {
                stop.cancelled().await;
                tracing::info!(grace_seconds = state.config().server.shutdown_grace_seconds, "shutting down: finishing in-flight requests");
                tokio::time::sleep(state.config().shutdown_grace()).await;
            } => {
                // The event loops end with their last connection; the process exit ends them sooner.
                tracing::warn!("shutdown grace period elapsed; closing remaining connections");
                Ok(())
            }
        };
        stop.cancel();
        acceptor.abort();
        if let Some(mut server) = metrics_server {
            let drain = Duration::from_secs(limits::METRICS_LISTENER_DRAIN_SECONDS);
            match tokio::time::timeout(drain, &mut server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "the metrics listener failed"),
                Ok(Err(e)) => tracing::error!(error = %e, "the metrics listener's task failed"),
                Err(_) => {
                    tracing::warn!("a /metrics connection outlived the shutdown; closing it");
                    server.abort();
                    let _ = server.await;
                }
            }
        }
        // Bounded by the worker itself (one attempt's timeout and a little);
        // the bound here only guards against a bug there.
        let webhook_drain = Duration::from_secs(limits::WEBHOOK_TIMEOUT_SECONDS_MAX + 5);
        if tokio::time::timeout(webhook_drain, webhooks).await.is_err() {
            tracing::warn!("the webhook worker did not stop in time");
        }
        background.abort_all();
        state.db().close().await;
        tracing::info!("stopped");
        result
    }
}

/// Serves the connections dealt to this loop on its single-threaded runtime,
/// on this thread, until `stop`, then lets its in-flight requests finish.
fn serve_on_this_thread(
    runtime: &tokio::runtime::Runtime,
    connections: DealtConnections,
    door: crate::http::front::FrontDoorMaker,
    timeouts: crate::http::conn::ConnectionTimeouts,
    stop: CancellationToken,
) -> std::io::Result<()> {
    runtime.block_on(crate::http::conn::serve(connections, door, timeouts, stop))
}

/// Binds the listening socket (port 0 picks a free one).
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit it: a response is never held back waiting for
    // the client's delayed ACK of the previous one (Nagle).
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(limits::LISTEN_BACKLOG)?;
    Ok(socket.into())
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
    tasks.spawn(crate::gateway::health::run(state.clone(), stop.clone()));
    // `aibos_database_up`, current whether or not anyone calls /api/health.
    tasks.spawn(crate::health::probe::run(state.clone(), stop.clone()));
    // The audit chains, verified in bounded runs (`audit.verify_interval_seconds`, 0: off).
    if state.config_ref().audit.verify_interval_seconds > 0 {
        tasks.spawn(crate::audit::verify::run(state.clone(), stop.clone()));
    }
    tasks.spawn(crate::ratelimit::run(state.clone(), stop.clone()));
    // Events: the retention purge, the group-commit writers, and open streams
    // ended at shutdown.
    tasks.spawn(crate::events::retention::run(state.clone(), stop.clone()));
    tasks.spawn(crate::idempotency::purge::run(state.clone(), stop.clone()));
    // Scheduled backups (`backup.interval_seconds`; idle while it is 0).
    tasks.spawn(crate::backup::schedule::run(state.clone(), stop.clone()));
    tasks.spawn(crate::events::retention::gauge_outbox(
        state.clone(),
        stop.clone(),
    ));
    state
        .events()
        .start(state.db().clone(), state.metrics().clone(), &mut tasks);
    // The JetStream relay, only with `events.nats_url` set (read at start).
    if state.config_ref().events.nats_url.is_some() {
        tasks.spawn(crate::events::relay::run(state.clone(), stop.clone()));
    }
    let events_state = state.clone();
    let events_stop = stop.clone();
    tasks.spawn(async move {
        events_stop.cancelled().await;
        events_state.events().stop();
    });
    match state.db() {
        crate::db::Db::Postgres(pool) => {
            tasks.spawn(crate::events::listener::run(
                pool.clone(),
                state.clone(),
                stop.clone(),
            ));
            tasks.spawn(crate::authz::listener::run(
                pool.clone(),
                state.clone(),
                stop,
            ));
        }
        crate::db::Db::Sqlite(_) => {
            tasks.spawn(crate::authz::listener::poll_log(state.clone(), stop));
        }
    }
    tasks
}
