//! `aibos version`

use clap::Args;

use super::{EXIT_OK, print_json};

#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Print machine-readable JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: VersionArgs) -> u8 {
    let version = env!("CARGO_PKG_VERSION");
    if args.json {
        print_json(&serde_json::json!({ "name": "aibos", "version": version }));
    } else {
        println!("aibos {version}");
    }
    EXIT_OK
}
