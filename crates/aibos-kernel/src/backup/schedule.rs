//! Backups taken by `aibos serve` itself every `backup.interval_seconds`,
//! then retention; the last success, the duration and the outcome of each run
//! are in `/metrics` for the backup-age alert.
//!
//! The configuration is read at every turn, so a reload changes the schedule
//! (or turns it off) without a restart.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// How often a turned-off schedule looks at the configuration again.
const IDLE_CHECK: Duration = Duration::from_secs(30);

/// Runs until `stop`.
pub async fn run(state: AppState, stop: CancellationToken) {
    let metrics = state.metrics();
    // The timestamp and duration gauges are registered (and so exported) at
    // the first backup, not here: at 0 the last success would read as 1970,
    // and the backup-age alert would fire on every kernel without a schedule.
    let last_success = || metrics.gauge("aibos_backup_last_success_timestamp_seconds", &[]);
    let last_duration = || metrics.gauge("aibos_backup_last_duration_seconds", &[]);
    let ok = metrics.counter("aibos_backup_runs_total", &[("outcome", "ok".to_owned())]);
    let failed = metrics.counter(
        "aibos_backup_runs_total",
        &[("outcome", "failed".to_owned())],
    );
    loop {
        let interval = state.config_ref().backup.interval_seconds;
        let wait = if interval == 0 {
            IDLE_CHECK
        } else {
            Duration::from_secs(interval)
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let config = state.config();
        if config.backup.interval_seconds == 0 {
            continue;
        }
        let started = std::time::Instant::now();
        let key_id = Some(state.master_keys().current().id().to_owned());
        // A backup that outlives the stop signal is abandoned: its
        // `.<id>.partial` folder stays behind, ignored by `backup list`,
        // retention and restore, and the next start takes a fresh one.
        let taken = tokio::select! {
            () = stop.cancelled() => return,
            taken = super::run(state.db(), &config.backup.dir, key_id, Arc::new(super::Silent)) => taken,
        };
        last_duration().set(started.elapsed().as_secs_f64());
        match taken {
            Ok((manifest, path)) => {
                tracing::info!(id = %manifest.id, path = %path.display(), seconds = started.elapsed().as_secs_f64(), "scheduled backup taken");
                let keep_last = usize::try_from(config.backup.keep_last)
                    .ok()
                    .filter(|n| *n > 0);
                let keep_days = u32::try_from(config.backup.keep_days)
                    .ok()
                    .filter(|n| *n > 0);
                match super::prune(
                    &config.backup.dir,
                    keep_last,
                    keep_days,
                    crate::timestamp::now(),
                ) {
                    Ok(removed) if !removed.is_empty() => {
                        tracing::info!(removed = ?removed, "old backups removed by retention");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "backup retention failed"),
                }
                // After retention, so a scrape never sees a success whose
                // retention is still to come.
                ok.increment(1);
                last_success().set(crate::timestamp::now().unix_timestamp() as f64);
            }
            Err(e) => {
                failed.increment(1);
                tracing::error!(error = %e, "scheduled backup failed");
            }
        }
    }
}
