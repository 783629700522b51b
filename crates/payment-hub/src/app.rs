//! [`Hub`]: build (open the database, migrate, bind) and run until stopped.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use aibos_cell::{AssertionVerifier, KernelClient};
use axum::Router;
use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::chaos::Chaos;
use crate::config::{HubConfig, redact_url};
use crate::db::{Db, DbError};
use crate::limits::SHUTDOWN_PUBLISHER_WAIT;
use crate::outbox::Publisher;
use crate::routes::{HubState, router};

/// Why the hub could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum HubStartError {
    /// The configuration is not usable (no secret is quoted).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The database could not be opened or migrated.
    #[error("database {url}: {source}")]
    Database {
        /// The URL without its password.
        url: String,
        /// What failed.
        source: DbError,
    },
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The IO error.
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("the server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// A built hub: database open and migrated, port bound, not yet serving.
pub struct Hub {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: Router,
    db: Db,
    publisher: Option<Publisher>,
}

impl Hub {
    /// Opens the database (creating a SQLite file), migrates it and binds `config.bind`.
    pub async fn build(config: HubConfig) -> Result<Hub, HubStartError> {
        let verifier =
            AssertionVerifier::new(config.canon_name.clone(), config.assertion_secrets.clone())
                .map_err(|e| HubStartError::Config(e.to_string()))?;
        let clients = match &config.kernel_url {
            None => Vec::new(),
            Some(url) => config
                .service_accounts
                .iter()
                .map(|account| KernelClient::new(url, &account.client_id, &account.client_secret))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| HubStartError::Config(e.to_string()))?,
        };
        let db = Db::connect(&config.database_url, config.database_max_connections)
            .await
            .map_err(|source| HubStartError::Database {
                url: redact_url(&config.database_url),
                source,
            })?;
        let listener =
            TcpListener::bind(config.bind)
                .await
                .map_err(|source| HubStartError::Bind {
                    addr: config.bind,
                    source,
                })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| HubStartError::Bind {
                addr: config.bind,
                source,
            })?;
        let outbox_wake = Arc::new(Notify::new());
        let state = HubState {
            verifier,
            db: db.clone(),
            chaos: Arc::new(Chaos::default()),
            outbox_wake: outbox_wake.clone(),
        };
        // Without a kernel URL nothing can be published: rows wait in the outbox.
        let publisher = config
            .kernel_url
            .is_some()
            .then(|| Publisher::new(db.clone(), outbox_wake, clients));
        if publisher.is_none() {
            tracing::warn!(
                "AIBOS_KERNEL_URL is not set: payment events wait in the outbox unpublished"
            );
        }
        Ok(Hub {
            listener,
            local_addr,
            router: router(state),
            db,
            publisher,
        })
    }

    /// The bound address (the real port when `bind` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves, then stops gracefully: no new
    /// connections, in-flight requests finish, the publisher finishes its pass
    /// in hand (at most [`SHUTDOWN_PUBLISHER_WAIT`]), the pools close.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), HubStartError> {
        let stop = CancellationToken::new();
        let publisher = self.publisher.map(|p| tokio::spawn(p.run(stop.clone())));
        tracing::info!(address = %self.local_addr, "payment hub listening");
        // No Nagle delay on small JSON answers over kept-alive connections.
        let listener = self.listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let served = axum::serve(listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await;
        stop.cancel();
        if let Some(task) = publisher
            && tokio::time::timeout(SHUTDOWN_PUBLISHER_WAIT, task)
                .await
                .is_err()
        {
            tracing::warn!(
                "the outbox publisher did not stop in time; unpublished rows stay for the next start"
            );
        }
        self.db.close().await;
        served.map_err(HubStartError::Serve)
    }
}
