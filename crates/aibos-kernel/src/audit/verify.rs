//! The kernel's own periodic verification of every audit chain
//! (`audit.verify_interval_seconds`), so a tampered entry raises an alert
//! without anyone running `aibos audit verify`.
//!
//! It is the same check as that command without a checkpoint (the same
//! [`store::verify_tenant_range`]), spread over bounded runs: a *pass* walks
//! every tenant's chain from seq 1 to the head it has when the pass reaches
//! it, and each run continues the pass where the last one stopped, for at most
//! `audit.verify_entries_per_run` entries. A run resumes a chain at the entry
//! it stopped after, as stored, and checks that entry's hash again, so an entry
//! changed between two runs is found either there or by the next entry's link.
//! Each pass starts again from seq 1, because an old entry can be edited as
//! well as a new one; a chain rewritten from some entry to its head with fresh
//! hashes is what signed checkpoints are for (`aibos audit verify --checkpoint`).
//!
//! What it exports (telemetry/catalogue.rs): `aibos_audit_chains_broken`, the
//! chains whose latest verification found a break (set after every run, so 0
//! means "none broken among those verified"), and
//! `aibos_audit_verify_last_success_timestamp_seconds`, set when a pass ends
//! with no chain broken; absent until the first such pass, so that a kernel
//! that never completes one is seen as stale, not as fine. The sweep's
//! position is kept in memory: a restart begins a new pass.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge};
use tokio_util::sync::CancellationToken;

use super::store;
use crate::db::Db;
use crate::limits;
use crate::state::AppState;
use crate::telemetry::Metrics;

/// How a run of the sweep ended, as counted in `aibos_audit_verify_runs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// Every chain verified so far is intact.
    Intact,
    /// At least one chain's latest verification found a break.
    Broken,
    /// The database could not be read; the next run retries from the same place.
    Error,
}

impl RunOutcome {
    const ALL: [RunOutcome; 3] = [RunOutcome::Intact, RunOutcome::Broken, RunOutcome::Error];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Intact => "intact",
            RunOutcome::Broken => "broken",
            RunOutcome::Error => "error",
        }
    }
}

/// What one run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// How it ended.
    pub outcome: RunOutcome,
    /// Entries recomputed.
    pub entries: u64,
    /// Whether it ended a pass (every chain verified to its head).
    pub pass_completed: bool,
}

struct SweepMetrics {
    runs: [Counter; 3],
    entries: Counter,
    chains_broken: Gauge,
    /// For `aibos_audit_verify_last_success_timestamp_seconds`, registered
    /// (and so exported) only once a pass succeeds.
    recorder: Metrics,
}

/// The state of the sweep between runs.
pub struct Sweep {
    /// Tenants still to verify in this pass, in order; the first is under way.
    remaining: VecDeque<String>,
    /// The last verified `seq` of the first of `remaining` (0: not begun).
    after_seq: i64,
    /// Whether a pass is under way (`remaining` may be empty at its start).
    in_pass: bool,
    /// Chains whose latest verification found a break: tenant → first bad seq.
    broken: BTreeMap<String, i64>,
    metrics: SweepMetrics,
}

impl Sweep {
    /// A sweep that begins a pass on its first run; its series registered in `metrics`.
    pub fn new(metrics: &Metrics) -> Sweep {
        let runs = RunOutcome::ALL.map(|o| {
            metrics.counter(
                "aibos_audit_verify_runs_total",
                &[("outcome", o.as_str().to_owned())],
            )
        });
        Sweep {
            remaining: VecDeque::new(),
            after_seq: 0,
            in_pass: false,
            broken: BTreeMap::new(),
            metrics: SweepMetrics {
                runs,
                entries: metrics.counter("aibos_audit_verified_entries_total", &[]),
                chains_broken: metrics.gauge("aibos_audit_chains_broken", &[]),
                recorder: metrics.clone(),
            },
        }
    }

    /// One run: continues the pass (or begins one) for at most `budget` entries.
    pub async fn run(&mut self, db: &Db, budget: u64) -> RunReport {
        assert!(budget > 0, "a run verifies something");
        let mut entries = 0u64;
        let result = self.advance(db, budget, &mut entries).await;
        self.metrics.entries.increment(entries);
        self.metrics.chains_broken.set(self.broken.len() as f64);
        let (outcome, pass_completed) = match result {
            Err(e) => {
                tracing::warn!(error = %e, "audit verification: cannot read the audit trail; the next run retries");
                (RunOutcome::Error, false)
            }
            Ok(completed) => {
                if completed && self.broken.is_empty() {
                    self.metrics
                        .recorder
                        .gauge("aibos_audit_verify_last_success_timestamp_seconds", &[])
                        .set(unix_seconds_now());
                }
                let outcome = if self.broken.is_empty() {
                    RunOutcome::Intact
                } else {
                    RunOutcome::Broken
                };
                (outcome, completed)
            }
        };
        let index = RunOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        self.metrics.runs[index].increment(1);
        RunReport {
            outcome,
            entries,
            pass_completed,
        }
    }

    /// Verifies up to `budget` entries; `Ok(true)` when that ended the pass.
    async fn advance(
        &mut self,
        db: &Db,
        budget: u64,
        entries: &mut u64,
    ) -> Result<bool, sqlx::Error> {
        if !self.in_pass {
            self.remaining = store::tenants_with_entries(db).await?.into();
            self.after_seq = 0;
            self.in_pass = true;
        }
        let mut left = i64::try_from(budget).unwrap_or(i64::MAX);
        while left > 0 {
            let Some(tenant_id) = self.remaining.front().cloned() else {
                break;
            };
            let until = self.after_seq.saturating_add(left);
            let (verification, chain_last) =
                store::verify_tenant_range(db, &tenant_id, self.after_seq, Some(until)).await?;
            *entries += verification.entries;
            // At least one, so that a run always moves on.
            left -= i64::try_from(verification.entries)
                .unwrap_or(i64::MAX)
                .max(1);
            let verified_to = self
                .after_seq
                .saturating_add(i64::try_from(verification.entries).unwrap_or(i64::MAX));
            if let Some(seq) = verification.first_bad_seq {
                if self.broken.insert(tenant_id.clone(), seq) != Some(seq) {
                    tracing::error!(
                        tenant_id,
                        first_bad_seq = seq,
                        reason = verification.reason.as_deref().unwrap_or_default(),
                        "audit verification: the chain is broken; run `aibos audit verify --tenant {tenant_id}` (docs/ops/incident-response.md)"
                    );
                }
                self.next_chain();
            } else if verified_to >= chain_last {
                self.broken.remove(&tenant_id);
                self.next_chain();
            } else {
                self.after_seq = verified_to;
            }
        }
        if self.remaining.is_empty() {
            self.in_pass = false;
            tracing::info!(
                broken = self.broken.len(),
                "audit verification: a pass over every chain is complete"
            );
            return Ok(true);
        }
        Ok(false)
    }

    fn next_chain(&mut self) {
        self.remaining.pop_front();
        self.after_seq = 0;
    }
}

/// Runs the sweep every `audit.verify_interval_seconds` (read at start) until `stop`.
pub async fn run(state: AppState, stop: CancellationToken) {
    let (interval, budget) = {
        let config = state.config_ref();
        (
            Duration::from_secs(config.audit.verify_interval_seconds),
            config.audit.verify_entries_per_run,
        )
    };
    if interval.is_zero() {
        return;
    }
    let mut sweep = Sweep::new(state.metrics());
    let mut wait = interval.min(Duration::from_secs(
        limits::AUDIT_VERIFY_FIRST_DELAY_SECONDS,
    ));
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
        tokio::select! {
            report = sweep.run(state.db(), budget) => {
                tracing::debug!(?report, "audit verification run");
            }
            () = stop.cancelled() => return,
        }
        // From the end of a run: a slow run never overlaps the next.
        wait = interval;
    }
}

fn unix_seconds_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
