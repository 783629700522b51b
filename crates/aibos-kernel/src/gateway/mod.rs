//! The API gateway: `/api/gateway/{canon}/{*path}` in front of the cells.
//!
//! A call is matched against the in-memory [`table::RouteTable`] (rebuilt from
//! the registry on every change, never queried per request), authenticated and
//! authorized like any kernel call, checked against the canon's health and
//! circuit breaker, and forwarded with a signed identity over a pooled client,
//! bodies streamed both ways.
//!
//! - [`table`]: the compiled route table and matcher.
//! - [`path`]: splitting and refusing dangerous paths.
//! - [`forward`]: the headers a cell receives, and the assertion.
//! - [`proxy`]: the handler.
//! - [`client`]: the upstream HTTP client (one per event loop).
//! - [`state`]: breaker, health and retry budget per canon.
//! - [`health`]: the active health checks.
//! - [`telemetry`]: metric handles.

pub mod client;
pub mod forward;
pub mod health;
pub mod path;
pub mod proxy;
pub mod state;
pub mod table;
pub mod telemetry;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use self::state::CanonState;
use self::table::RouteTable;
use crate::db::Db;
use crate::registry::store;
use crate::telemetry::Metrics;

/// The gateway's shared state: the current route table and what outlives it.
pub struct Gateway {
    table: ArcSwap<RouteTable>,
    /// Breaker, health and budget per canon id; touched only when the table is
    /// rebuilt (requests reach their canon's state through the table).
    states: Mutex<HashMap<String, Arc<CanonState>>>,
    /// Rebuilds run one at a time, each reading the registry after the change
    /// that triggered it committed, so the last one always wins with the latest.
    rebuilding: tokio::sync::Mutex<()>,
    /// Wakes the health checks when the table changed (a new canon is checked at once).
    changed: tokio::sync::Notify,
}

impl Default for Gateway {
    fn default() -> Gateway {
        Gateway {
            table: ArcSwap::from_pointee(RouteTable::default()),
            states: Mutex::default(),
            rebuilding: tokio::sync::Mutex::new(()),
            changed: tokio::sync::Notify::new(),
        }
    }
}

impl Gateway {
    /// The route table in force (a cheap snapshot).
    pub fn table(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.table.load()
    }

    /// Rebuilds the route table from the registry and swaps it in.
    pub async fn rebuild(
        &self,
        db: &Db,
        master: &crate::secrets::MasterKeys,
        metrics: &Metrics,
    ) -> Result<(), sqlx::Error> {
        let _one_at_a_time = self.rebuilding.lock().await;
        let snapshot = store::snapshot(db, master).await?;
        let table = {
            let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
            RouteTable::compile(snapshot, &mut states, metrics)
        };
        self.table.store(Arc::new(table));
        self.changed.notify_one();
        Ok(())
    }

    /// Completes after the next rebuild.
    pub async fn table_changed(&self) {
        self.changed.notified().await;
    }

    /// The state of canon `id`, if it is routed.
    pub fn canon_state(&self, id: &str) -> Option<Arc<CanonState>> {
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }
}
