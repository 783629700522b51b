//! `aibos config validate | show`

use aibos_kernel::config::ConfigSources;
use clap::{Args, Subcommand};

use super::{EXIT_OK, load_config, print_json};

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load and validate every layer; list every problem (exit 78 when invalid).
    Validate(JsonFlag),
    /// Print the effective configuration with secrets redacted.
    Show(JsonFlag),
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print machine-readable JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(sources: ConfigSources, command: ConfigCommand) -> u8 {
    match command {
        ConfigCommand::Validate(JsonFlag { json }) => match load_config(&sources, json) {
            Ok(_) => {
                if json {
                    print_json(&serde_json::json!({ "valid": true, "problems": [] }));
                } else {
                    println!("configuration is valid");
                }
                EXIT_OK
            }
            Err(code) => code,
        },
        ConfigCommand::Show(JsonFlag { json }) => match load_config(&sources, json) {
            Ok(config) => {
                if json {
                    print_json(&config);
                } else {
                    print!("{}", config.to_redacted_toml());
                }
                EXIT_OK
            }
            Err(code) => code,
        },
    }
}
