//! `aibos`: the command line over the kernel library.
//!
//! This binary parses arguments, captures the process environment once, calls
//! into `aibos-kernel`, and maps errors to exit codes. All behaviour lives in
//! the library.

mod cli;

// mimalloc: about 10 % more gateway throughput than glibc's allocator, whose
// malloc/free (with `malloc_consolidate`) took ~8 % of the CPU of a proxied call.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::EXIT_FAILURE);
        }
    };
    let code = runtime.block_on(cli::run(cli));
    // Do not wait for stray blocking tasks (a slow DNS lookup) at exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    ExitCode::from(code)
}
