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

/// Crates with a RustSec advisory that has no fixed version: none may be in the
/// lock file, even unused (an unused crate is still built, shipped and flagged by
/// every audit). `deny.toml` bans the same names for `cargo deny check bans`.
const CRATES_WITH_UNFIXED_ADVISORIES: [(&str, &str); 1] = [(
    "rsa",
    "RUSTSEC-2023-0071 (Marvin: key recovery through decryption timing, no fixed version); \
     it came with jsonwebtoken's rust_crypto feature, and JWTs are now aibos_wire::jws",
)];

/// The package names in the workspace's Cargo.lock: everything any build of any
/// member, tests included, on any platform, can compile. Cargo brings the lock
/// file up to date with the manifests before it builds this test.
fn locked_package_names() -> Vec<String> {
    let lock_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.lock");
    let text = std::fs::read_to_string(&lock_path).unwrap();
    let lock: toml::Table = text.parse().unwrap();
    let packages = lock["package"].as_array().unwrap();
    packages
        .iter()
        .map(|package| package["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn no_crate_with_an_unfixed_advisory_is_in_the_dependency_tree() {
    let names = locked_package_names();
    // The lock file was read for real: the workspace's own crates are in it.
    assert!(names.iter().any(|n| n == "aibos-kernel"), "{names:?}");
    assert!(names.iter().any(|n| n == "ed25519-dalek"), "{names:?}");
    for (banned, why) in CRATES_WITH_UNFIXED_ADVISORIES {
        assert!(
            !names.iter().any(|n| n == banned),
            "`{banned}` is in Cargo.lock: {why}. `cargo tree --workspace --target all -e all -i {banned}` \
             shows what brings it in."
        );
    }
}
