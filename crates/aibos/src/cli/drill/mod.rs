//! `aibos drill …`: readiness drills that prove a recovery instead of
//! asserting it. Each runs on throwaway data, measures, judges, and exits
//! non-zero when an expectation fails.
//!
//! - `backup-restore` (`backup_restore.rs`): a backup under load restored
//!   into the other engine, compared dataset by dataset; RTO and RPO.
//! - `incident` (`incident.rs`): a cell outage's detection, degradation and
//!   recovery, written as a timeline in a Markdown report.

mod backup_restore;
mod incident;

use aibos_kernel::config::ConfigSources;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum DrillCommand {
    /// Backup under load, restore into the other engine, compare, print RTO and RPO.
    BackupRestore(backup_restore::BackupRestoreArgs),
    /// A cell outage under load: detection, degradation and recovery as a
    /// timeline, written as a Markdown report.
    Incident(incident::IncidentArgs),
}

pub async fn drill(sources: ConfigSources, command: DrillCommand) -> u8 {
    match command {
        DrillCommand::BackupRestore(args) => backup_restore::run(sources, args).await,
        DrillCommand::Incident(args) => incident::run(args).await,
    }
}
