//! The API gateway: `/api/gateway/{canon}/{*path}` in front of the cells.
//!
//! A call is matched against the in-memory [`table::RouteTable`] (rebuilt from
//! the registry on every change, never queried per request), authenticated and
//! authorized like any kernel call, checked against the canon's health and
//! circuit breaker, and forwarded with a signed identity over a pooled client,
//! bodies streamed both ways. A keyed mutation on a route whose `idempotency`
//! is not `off` is run once per key by `crate::idempotency::gateway`.
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
    /// What the table in force leaves out ([`RouteTable::compile`]): a registry
    /// change may not add to it.
    problems: Mutex<Vec<String>>,
    /// Rebuilds run one at a time, each reading the registry after the change
    /// that triggered it committed, so the last one always wins with the latest.
    /// A registry change holds it from its transaction's start to the swap.
    rebuilding: tokio::sync::Mutex<()>,
    /// Wakes the health checks when the table changed (a new canon is checked at once).
    changed: tokio::sync::Notify,
}

/// A route table built but not in force, with the canon states it would keep.
pub struct Candidate {
    table: RouteTable,
    states: HashMap<String, Arc<CanonState>>,
    problems: Vec<String>,
}

/// Proof of holding the gateway's rebuild lock ([`Gateway::exclusive`]).
pub struct Exclusive<'a> {
    _guard: tokio::sync::MutexGuard<'a, ()>,
}

impl Default for Gateway {
    fn default() -> Gateway {
        Gateway {
            table: ArcSwap::from_pointee(RouteTable::default()),
            states: Mutex::default(),
            problems: Mutex::default(),
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

    /// Rebuilds the route table from the registry and swaps it in (at start,
    /// and on another instance's change). What it leaves out is logged.
    pub async fn rebuild(
        &self,
        db: &Db,
        master: &crate::secrets::MasterKeys,
        metrics: &Metrics,
    ) -> Result<(), sqlx::Error> {
        let one_at_a_time = self.exclusive().await;
        let snapshot = store::snapshot(db, master).await?;
        let candidate = self.candidate(snapshot, metrics);
        for problem in &candidate.problems {
            tracing::error!(problem = %problem, "the gateway's route table leaves something out");
        }
        self.install(&one_at_a_time, candidate);
        Ok(())
    }

    /// Keeps every other rebuild out until dropped: a registry change holds it
    /// from its transaction to [`install`](Self::install), so no rebuild
    /// reading the registry before its commit can swap in a table after it.
    pub async fn exclusive(&self) -> Exclusive<'_> {
        Exclusive {
            _guard: self.rebuilding.lock().await,
        }
    }

    /// A table compiled from `snapshot`, not in force yet. Nothing shared
    /// changes: the canons' states are those in force, with new ones for new
    /// canons, kept only if the candidate is installed.
    pub fn candidate(&self, snapshot: store::Snapshot, metrics: &Metrics) -> Candidate {
        let mut states = self
            .states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (table, problems) = RouteTable::compile(snapshot, &mut states, metrics);
        Candidate {
            table,
            states,
            problems,
        }
    }

    /// What `candidate` leaves out that the table in force does not: a
    /// registry change that would add any is refused.
    pub fn new_problems(&self, candidate: &Candidate) -> Vec<String> {
        let in_force = self.problems.lock().unwrap_or_else(|p| p.into_inner());
        candidate
            .problems
            .iter()
            .filter(|p| !in_force.contains(p))
            .cloned()
            .collect()
    }

    /// Swaps `candidate` in.
    pub fn install(&self, _exclusive: &Exclusive<'_>, candidate: Candidate) {
        *self.states.lock().unwrap_or_else(|p| p.into_inner()) = candidate.states;
        *self.problems.lock().unwrap_or_else(|p| p.into_inner()) = candidate.problems;
        self.table.store(Arc::new(candidate.table));
        self.changed.notify_one();
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
