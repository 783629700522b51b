//! `aibos migrate status | up | down [--steps N] | baseline`

use aibos_kernel::config::ConfigSources;
use aibos_kernel::db::Db;
use aibos_kernel::db::migrate::{self, MigrationState};
use clap::{Args, Subcommand};

use super::{EXIT_FAILURE, EXIT_OK, load_config, print_json};

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// List every migration and whether it is applied.
    Status(JsonFlag),
    /// Apply every pending migration.
    Up(JsonFlag),
    /// Revert the newest applied migrations.
    Down {
        /// How many migrations to revert, newest first.
        #[arg(long, default_value_t = 1)]
        steps: u32,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Record every migration as applied without running it (for a schema created by other means).
    Baseline(JsonFlag),
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print machine-readable JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(sources: ConfigSources, command: MigrateCommand) -> u8 {
    let json = match &command {
        MigrateCommand::Status(f) | MigrateCommand::Up(f) | MigrateCommand::Baseline(f) => f.json,
        MigrateCommand::Down { json, .. } => json.json,
    };
    let config = match load_config(&sources, json) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let db = match Db::connect(&config.database).await {
        Ok(db) => db,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILURE;
        }
    };
    let migrator = migrate::embedded(db.engine());
    let (verb, result) = match command {
        MigrateCommand::Status(_) => {
            let code = match migrate::status(&db, migrator).await {
                Ok(list) => {
                    if json {
                        print_json(
                            &serde_json::json!({ "engine": db.engine(), "migrations": list }),
                        );
                    } else {
                        println!("engine: {}", db.engine());
                        for m in &list {
                            println!(
                                "{:>6}  {:<9} {}",
                                m.version,
                                state_word(m.state),
                                m.description
                            );
                        }
                    }
                    if list.iter().any(|m| m.state == MigrationState::Modified) {
                        EXIT_FAILURE
                    } else {
                        EXIT_OK
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    EXIT_FAILURE
                }
            };
            db.close().await;
            return code;
        }
        MigrateCommand::Up(_) => ("applied", migrate::up(&db, migrator).await),
        MigrateCommand::Down { steps, .. } => {
            ("reverted", migrate::down(&db, migrator, steps).await)
        }
        MigrateCommand::Baseline(_) => ("recorded", migrate::baseline(&db, migrator).await),
    };
    db.close().await;
    match result {
        Ok(versions) => {
            if json {
                print_json(&serde_json::json!({ verb: versions }));
            } else if versions.is_empty() {
                println!("nothing {verb}");
            } else {
                for v in versions {
                    println!("{verb} {v}");
                }
            }
            EXIT_OK
        }
        Err(e) => {
            if json {
                print_json(&serde_json::json!({ "error": e.to_string() }));
            }
            eprintln!("error: {e}");
            EXIT_FAILURE
        }
    }
}

fn state_word(state: MigrationState) -> &'static str {
    match state {
        MigrationState::Applied => "applied",
        MigrationState::Pending => "pending",
        MigrationState::Modified => "MODIFIED",
        MigrationState::Unknown => "unknown",
    }
}
