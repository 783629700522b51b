//! Architecture invariants of ARCHITECTURE.md, checked against the source tree.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn crate_src(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
        .join("src")
}

#[test]
fn only_db_and_store_files_run_sql() {
    let mut files = Vec::new();
    rust_files(&crate_src("aibos-kernel"), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let allowed = file.components().any(|c| c.as_os_str() == "db")
            || file.file_name().is_some_and(|n| n == "store.rs");
        if !allowed {
            for needle in ["sqlx::query", "query_as(", "query_scalar("] {
                assert!(
                    !text.contains(needle),
                    "{} runs SQL ({needle}); SQL belongs in db/ or a store.rs",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn the_wire_crate_does_no_io_and_the_library_never_reads_the_environment() {
    let manifest = std::fs::read_to_string(crate_src("aibos-wire").join("../Cargo.toml")).unwrap();
    for forbidden in ["tokio", "sqlx", "reqwest", "hyper", "axum"] {
        assert!(
            !manifest.contains(forbidden),
            "aibos-wire must not depend on {forbidden}"
        );
    }
    let mut files = Vec::new();
    rust_files(&crate_src("aibos-kernel"), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for needle in ["std::env::var", "env::vars()", "println!", "process::exit"] {
            assert!(
                !text.contains(needle),
                "{} uses {needle}: the library reads no process-global state and never prints",
                file.display()
            );
        }
    }
}
