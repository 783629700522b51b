//! The hub's boundaries, checked against its own source tree.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable folder") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_hub_is_built_on_the_cell_sdk_alone_never_on_the_kernel() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .expect("manifest");
    for forbidden in [
        "aibos-kernel",
        "aibos-testkit",
        "aibos_kernel",
        "aibos_testkit",
    ] {
        assert!(
            !manifest.contains(forbidden),
            "payment-hub must not depend on {forbidden}"
        );
    }
    assert!(manifest.contains("aibos-cell.workspace = true"));
}

#[test]
fn only_db_rs_and_store_rs_run_sql() {
    let mut files = Vec::new();
    rust_files(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")),
        &mut files,
    );
    assert!(files.len() > 5, "the source tree was found");
    for file in files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name == "db.rs" || name == "store.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("source");
        for needle in ["sqlx::query", "query_as(", "query_scalar("] {
            assert!(
                !text.contains(needle),
                "{} runs SQL ({needle})",
                file.display()
            );
        }
    }
}
