//! Command-line definition and dispatch. One file per command.

mod backup;
mod chaos;
mod config;
mod demo;
mod drill;
mod migrate;
mod ops;
mod serve;
mod status;
mod version;

use std::path::PathBuf;

use aibos_kernel::config::{Config, ConfigError, ConfigSources};
use clap::{Parser, Subcommand};

/// Success.
pub const EXIT_OK: u8 = 0;
/// A command failed (a refused migration, an unhealthy kernel).
pub const EXIT_FAILURE: u8 = 1;
/// The kernel could not be reached (`status`), sysexits EX_UNAVAILABLE.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// The configuration is invalid, sysexits EX_CONFIG.
pub const EXIT_CONFIG: u8 = 78;

/// AI-BOS Kernel: identity, access, gateway, events and audit for finance services.
#[derive(Debug, Parser)]
#[command(name = "aibos", version, about, propagate_version = true)]
pub struct Cli {
    /// Configuration file to use instead of ./aibos.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the kernel's HTTP API until SIGTERM or SIGINT; SIGHUP reloads the configuration.
    Serve(serve::ServeArgs),
    /// Run the kernel and the payment hub on the embedded database, seeded to
    /// try a payment through the gateway; Ctrl-C stops both.
    Demo(demo::DemoArgs),
    /// Inspect and change the database schema.
    #[command(subcommand)]
    Migrate(migrate::MigrateCommand),
    /// Check or print the effective configuration.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Platform administrators, offline.
    #[command(subcommand)]
    Admin(ops::AdminCommand),
    /// Tenants, offline.
    #[command(subcommand)]
    Tenant(ops::TenantCommand),
    /// Token-signing keys.
    #[command(subcommand)]
    Keys(ops::KeysCommand),
    /// Verify the audit trail, and sign checkpoints of it.
    #[command(subcommand)]
    Audit(ops::AuditCommand),
    /// Backups that restore across engines: take, list, verify.
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// Restore a backup into an empty database of either engine.
    Restore(backup::RestoreArgs),
    /// Readiness drills that prove a recovery instead of asserting it.
    #[command(subcommand)]
    Drill(drill::DrillCommand),
    /// Failure scenarios against a kernel started on throwaway data.
    #[command(subcommand)]
    Chaos(chaos::ChaosCommand),
    /// Ask a running kernel for its health.
    Status(status::StatusArgs),
    /// Print the version.
    Version(version::VersionArgs),
}

/// Runs one command and returns its exit code.
pub async fn run(cli: Cli) -> u8 {
    let sources = sources(cli.config);
    match cli.command {
        Command::Serve(args) => serve::run(sources, args).await,
        Command::Demo(args) => demo::run(sources, args).await,
        Command::Migrate(command) => migrate::run(sources, command).await,
        Command::Config(command) => config::run(sources, command),
        Command::Status(args) => status::run(sources, args).await,
        Command::Admin(command) => ops::admin(sources, command).await,
        Command::Tenant(command) => ops::tenant(sources, command).await,
        Command::Keys(command) => ops::keys(sources, command).await,
        Command::Audit(command) => ops::audit(sources, command).await,
        Command::Backup(command) => backup::backup(sources, command).await,
        Command::Restore(args) => backup::restore(sources, args).await,
        Command::Drill(command) => drill::drill(sources, command).await,
        Command::Chaos(command) => chaos::chaos(sources, command).await,
        Command::Version(args) => version::run(args),
    }
}

/// The configuration sources of this process: the working directory, the
/// `--config` file and the environment, captured once.
fn sources(config_file: Option<PathBuf>) -> ConfigSources {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    ConfigSources::new(cwd, std::env::vars()).with_config_file(config_file)
}

/// Loads the configuration or prints every problem; `Err` carries the exit code.
fn load_config(sources: &ConfigSources, json: bool) -> Result<Config, u8> {
    Config::load(sources).map_err(|e| {
        report_config_error(&e, json);
        EXIT_CONFIG
    })
}

fn report_config_error(e: &ConfigError, json: bool) {
    if json {
        let body = serde_json::json!({ "valid": false, "problems": e.problems() });
        println!("{body}");
    } else {
        eprintln!("error: {e}");
    }
}

/// Prints a value as pretty JSON on stdout.
fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("error: cannot render JSON: {e}"),
    }
}

#[cfg(test)]
mod doc_codes;
#[cfg(test)]
mod doc_commands;
