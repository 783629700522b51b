//! Every shell command the documentation shows is run (issue 22, item 6), so
//! the documents cannot rot: a renamed field, a moved endpoint or a step that
//! no longer follows from the one before fails here, not in a reader's terminal.
//!
//! The convention (also in docs/api-conventions.md, "Commands in the documents"):
//!
//! - A document's ```` ```sh ```` blocks are one session: they run in order, in
//!   one `bash -euo pipefail`, each using what the blocks before it defined
//!   (`TOKEN`, `CANON_ID`, …). The session's directory is a fresh one, with a
//!   link to the repository's `tools/`.
//! - The test starts the real `aibos` binary (`aibos serve` on SQLite) for
//!   each document, and rewrites the addresses the text shows:
//!   `127.0.0.1:3001` becomes that kernel's address and `127.0.0.1:4000` the
//!   cell's. The cell is a stand-in upstream the test runs (answering 200 to
//!   anything), except where the document starts one itself (the cell
//!   integration guide starts the real `payment-hub`). `cargo run --release --`
//!   becomes the built `aibos` and `cargo run --release -p payment-hub` the
//!   built `payment-hub`, both on the session's `PATH`, which also has the
//!   kernel's configuration (`AIBOS_SERVER__BIND`), so `aibos status` finds it.
//!   The kernel has the test kit's generous rate limits: a script is faster
//!   than a reader, and the guide's whole setup as one administrator, pasted
//!   at once, would meet the default user burst (20) at its route registrations.
//! - The other documents build on README's first steps (its platform
//!   administrator `root@example.com`, the tenant `acme` and acme's
//!   administrator `admin@acme.example`): their session runs README's block
//!   under "First steps" before their own.
//! - `curl` fails the block on an HTTP error status (the test adds
//!   `--fail-with-body`): a call that was refused does not pass by printing its
//!   problem. A line that shows a refusal on purpose checks the status itself.
//!   (So the documents write `curl -s`, never `-f`: curl refuses both at once.)
//! - ```` ```console ```` blocks are transcripts and are not run. A shell block
//!   that cannot run here (the demo, which runs until Ctrl-C; a live stream; a
//!   benchmark; a NATS server) says so with `<!-- not run: the reason -->` on
//!   the line before it. The test lists those, and fails when a document skips
//!   more blocks than it runs.
//!
//! Needs `curl`, `jq` and `python3` (`.ci/run` installs them).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use aibos_testkit::hub::{free_port, hub_binary};
use aibos_testkit::process::KernelProcess;
use aibos_testkit::upstream::Upstream;

const AIBOS: &str = env!("CARGO_BIN_EXE_aibos");

/// The kernel's address as the documents show it.
const DOC_KERNEL_ADDRESS: &str = "127.0.0.1:3001";
/// A cell's address as the documents show it.
const DOC_CELL_ADDRESS: &str = "127.0.0.1:4000";
/// The heading above README's first steps, which the other documents build on.
const FIRST_STEPS_HEADING: &str = "### First steps";
/// How long one document's session may take: its blocks wait at most a few
/// seconds each (the hub's health check, its outbox), so this bounds a hang.
const SESSION_TIMEOUT: Duration = Duration::from_secs(90);
/// Printed before each block, so a failure names the block that failed.
const BLOCK_MARKER: &str = "==> docs block ";

/// Every document, with what the test provides before its first block.
const DOCUMENTS: &[Document] = &[
    Document {
        path: "README.md",
        readme_first_steps: false,
        cell: Cell::StandIn,
    },
    Document {
        path: "docs/audit-format.md",
        readme_first_steps: true,
        cell: Cell::StandIn,
    },
    Document {
        path: "docs/cell-integration-guide.md",
        readme_first_steps: true,
        cell: Cell::StartedByTheDocument,
    },
    Document {
        path: "docs/events.md",
        readme_first_steps: true,
        cell: Cell::StandIn,
    },
    Document {
        path: "docs/troubleshooting.md",
        readme_first_steps: true,
        cell: Cell::StandIn,
    },
    Document {
        path: "docs/ops/backup-and-restore.md",
        readme_first_steps: true,
        cell: Cell::StandIn,
    },
    Document {
        path: "docs/ops/chaos.md",
        readme_first_steps: false,
        cell: Cell::StandIn,
    },
    Document {
        path: "docs/ops/configuration-promotion.md",
        readme_first_steps: true,
        cell: Cell::StandIn,
    },
    Document {
        path: "docs/ops/incident-response.md",
        readme_first_steps: true,
        cell: Cell::StandIn,
    },
    Document {
        path: "docs/ops/key-and-secret-rotation.md",
        readme_first_steps: true,
        cell: Cell::StandIn,
    },
    Document {
        path: "docs/ops/migrations.md",
        readme_first_steps: true,
        cell: Cell::StandIn,
    },
];

/// What listens where the document shows `127.0.0.1:4000`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cell {
    /// The test kit's upstream, answering every call.
    StandIn,
    /// Nothing: the document starts its cell there itself.
    StartedByTheDocument,
}

struct Document {
    /// Relative to the repository's root.
    path: &'static str,
    /// Whether the session runs README's first steps before the document's blocks.
    readme_first_steps: bool,
    cell: Cell,
}

/// One ```` ```sh ```` block.
#[derive(Debug, PartialEq, Eq)]
struct ShellBlock {
    /// The line of its opening fence (1-based).
    line: usize,
    /// Its text, with the fence's indentation removed.
    text: String,
    /// `Some(reason)` when marked `<!-- not run: reason -->`.
    not_run: Option<String>,
}

fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The ```` ```sh ```` blocks of a document, in order.
fn shell_blocks(text: &str) -> Vec<ShellBlock> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut index = 0;
    while index < lines.len() {
        let line = lines[index];
        let trimmed = line.trim_start();
        let Some(info) = trimmed.strip_prefix("```") else {
            index += 1;
            continue;
        };
        let indent = line.len() - trimmed.len();
        let language = info.split_whitespace().next().unwrap_or("");
        let start = index;
        index += 1;
        let mut body = Vec::new();
        while index < lines.len() && !lines[index].trim_start().starts_with("```") {
            let content = lines[index];
            body.push(content.get(indent..).unwrap_or(content.trim_start()));
            index += 1;
        }
        index += 1; // the closing fence
        if language != "sh" {
            continue;
        }
        let not_run = lines[..start]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .and_then(|l| l.trim().strip_prefix("<!-- not run:"))
            .and_then(|l| l.strip_suffix("-->"))
            .map(|reason| reason.trim().to_owned());
        blocks.push(ShellBlock {
            line: start + 1,
            text: body.join("\n"),
            not_run,
        });
    }
    blocks
}

/// The block as the test runs it: the documents' addresses and build commands
/// replaced by the test's.
fn rewrite(text: &str, kernel_address: &str, cell_address: &str) -> String {
    text.replace(DOC_KERNEL_ADDRESS, kernel_address)
        .replace(DOC_CELL_ADDRESS, cell_address)
        .replace("cargo run --release -p payment-hub", "payment-hub")
        .replace("cargo run --release -- ", "aibos ")
}

/// What every session starts with: background jobs (a cell the document
/// starts) end with it, and curl fails on an error status.
const SESSION_PRELUDE: &str = r#"exec 2>&1
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
curl() { command curl --fail-with-body "$@"; }
"#;

/// README's block under "First steps".
fn readme_first_steps(root: &Path) -> ShellBlock {
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md is readable");
    let heading = readme
        .lines()
        .position(|l| l.starts_with(FIRST_STEPS_HEADING))
        .unwrap_or_else(|| panic!("README.md has a heading {FIRST_STEPS_HEADING:?}"));
    shell_blocks(&readme)
        .into_iter()
        .find(|b| b.line > heading && b.not_run.is_none())
        .expect("a shell block after README's first steps heading")
}

fn require_tools() {
    for tool in ["curl", "jq", "python3"] {
        let found = std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is needed to run the documents' commands (.ci/run installs it)"
        );
    }
}

/// Runs one document's shell blocks against a kernel of its own.
async fn run_document(path: &str) {
    require_tools();
    let document = DOCUMENTS
        .iter()
        .find(|d| d.path == path)
        .expect("a listed document");
    let root = repository_root();
    let text = std::fs::read_to_string(root.join(path)).expect("the document is readable");
    let blocks = shell_blocks(&text);
    let (run, skipped): (Vec<&ShellBlock>, Vec<&ShellBlock>) =
        blocks.iter().partition(|b| b.not_run.is_none());
    for block in &skipped {
        eprintln!(
            "{path}:{}: not run: {}",
            block.line,
            block.not_run.as_deref().unwrap_or_default()
        );
    }
    eprintln!(
        "{path}: {} shell blocks run, {} not run",
        run.len(),
        skipped.len()
    );
    assert!(!run.is_empty(), "{path} has no shell block to run");
    assert!(
        skipped.len() <= run.len(),
        "{path} skips more shell blocks ({}) than it runs ({}): make them runnable",
        skipped.len(),
        run.len()
    );

    let dir = tempfile::tempdir().expect("a temporary directory");
    std::os::unix::fs::symlink(root.join("tools"), dir.path().join("tools")).expect("link tools/");
    let kernel_address = format!("127.0.0.1:{}", free_port());
    let cell_address = format!("127.0.0.1:{}", free_port());
    // The kernel's configuration, shared by `aibos serve` and the session's
    // `aibos` commands. Health checks every second: the guide waits for one.
    let config: Vec<(String, String)> = vec![
        ("AIBOS_SERVER__BIND".into(), kernel_address.clone()),
        ("AIBOS_GATEWAY__HEALTH_INTERVAL_SECONDS".into(), "1".into()),
    ];
    let config_refs: Vec<(&str, &str)> = config
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let kernel = KernelProcess::start(Path::new(AIBOS), dir.path(), &config_refs)
        .await
        .expect("the kernel starts");
    let _stand_in = match document.cell {
        Cell::StandIn => Some(Upstream::start_on(cell_address.parse().expect("an address")).await),
        Cell::StartedByTheDocument => None,
    };

    // (where, text) of every block the session runs, in order.
    let mut session_blocks: Vec<(String, String)> = Vec::new();
    if document.readme_first_steps {
        let first_steps = readme_first_steps(&root);
        session_blocks.push((format!("README.md:{}", first_steps.line), first_steps.text));
    }
    for block in &run {
        session_blocks.push((format!("{path}:{}", block.line), block.text.clone()));
    }
    let mut script = String::from(SESSION_PRELUDE);
    for (number, (place, text)) in session_blocks.iter().enumerate() {
        script.push_str(&format!(
            "printf '\\n{BLOCK_MARKER}{number} ({place})\\n'\n"
        ));
        script.push_str(&rewrite(text, &kernel_address, &cell_address));
        script.push('\n');
    }
    script.push_str(&format!("printf '\\n{BLOCK_MARKER}end\\n'\n"));
    let script_path = dir.path().join("session.sh");
    std::fs::write(&script_path, &script).expect("write the session");

    let hub = hub_binary();
    let binaries = [
        Path::new(AIBOS).parent().expect("the binary's folder"),
        hub.parent().expect("the hub's folder"),
    ];
    let mut search_path = std::env::join_paths(binaries).expect("a PATH");
    if let Some(system) = std::env::var_os("PATH") {
        let mut joined = search_path;
        joined.push(":");
        joined.push(system);
        search_path = joined;
    }
    let output_path = dir.path().join("session.out");
    let output_file = std::fs::File::create(&output_path).expect("the session's output");
    let mut session = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail"])
        .arg(&script_path)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", search_path)
        .env("HOME", dir.path())
        .envs(config.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(output_file)
        .stderr(Stdio::null())
        // A group of its own, so that what it started in the background (the
        // guide's hub) is stopped with it even when it hangs.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("run bash");
    let group = session.id().expect("the session runs");
    let status = tokio::time::timeout(SESSION_TIMEOUT, session.wait()).await;
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .stderr(Stdio::null())
        .status();
    let output = std::fs::read_to_string(&output_path).unwrap_or_default();
    let succeeded = matches!(status, Ok(Ok(s)) if s.success());
    if !succeeded {
        // The block that failed is the last one that started.
        let last = output
            .rfind(BLOCK_MARKER)
            .map(|at| &output[at..])
            .unwrap_or(&output);
        let failed = last
            .strip_prefix(BLOCK_MARKER)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| session_blocks.get(n));
        panic!(
            "{path}: a shell block failed ({status:?})\n--- the block ({}) ---\n{}\n--- its output ---\n{last}\n--- the kernel's log (last lines) ---\n{}",
            failed.map(|(place, _)| place.as_str()).unwrap_or("?"),
            failed.map(|(_, text)| text.as_str()).unwrap_or("(none)"),
            kernel
                .all_logs()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert!(
        output.contains(&format!("{BLOCK_MARKER}end")),
        "{path}: the session ended early:\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme() {
    run_document("README.md").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_format() {
    run_document("docs/audit-format.md").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cell_integration_guide() {
    run_document("docs/cell-integration-guide.md").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events() {
    run_document("docs/events.md").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn troubleshooting() {
    run_document("docs/troubleshooting.md").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_backup_and_restore() {
    run_document("docs/ops/backup-and-restore.md").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_chaos() {
    run_document("docs/ops/chaos.md").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_configuration_promotion() {
    run_document("docs/ops/configuration-promotion.md").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_incident_response() {
    run_document("docs/ops/incident-response.md").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_key_and_secret_rotation() {
    run_document("docs/ops/key-and-secret-rotation.md").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_migrations() {
    run_document("docs/ops/migrations.md").await;
}

/// A document that gains a shell block is run too: it must be listed above.
#[test]
fn every_document_with_shell_blocks_is_run() {
    let root = repository_root();
    let mut paths = vec!["README.md".to_owned()];
    // docs/ and its runbooks, docs/ops/.
    for folder in ["docs", "docs/ops"] {
        let mut docs: Vec<String> = std::fs::read_dir(root.join(folder))
            .unwrap_or_else(|e| panic!("{folder}/ is readable: {e}"))
            .map(|e| {
                e.expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|name| name.ends_with(".md"))
            .map(|name| format!("{folder}/{name}"))
            .collect();
        docs.sort();
        paths.extend(docs);
    }
    for path in paths {
        let text = std::fs::read_to_string(root.join(&path)).expect("readable");
        if !shell_blocks(&text).is_empty() {
            assert!(
                DOCUMENTS.iter().any(|d| d.path == path),
                "{path} has ```sh blocks: add it to DOCUMENTS in tests/api/docs.rs"
            );
        }
    }
}

#[test]
fn blocks_are_found_with_their_marks() {
    let text = "intro\n\n```sh\necho one\n```\n\n<!-- not run: runs forever -->\n\n```sh\nsleep 9\n```\n\n```console\n$ x\n```\n\n1. step\n\n   ```sh\n   echo two\n     indented\n   ```\n";
    let blocks = shell_blocks(text);
    assert_eq!(
        blocks,
        vec![
            ShellBlock {
                line: 3,
                text: "echo one".into(),
                not_run: None
            },
            ShellBlock {
                line: 9,
                text: "sleep 9".into(),
                not_run: Some("runs forever".into())
            },
            ShellBlock {
                line: 19,
                text: "echo two\n  indented".into(),
                not_run: None
            },
        ]
    );
    assert_eq!(
        rewrite(
            "curl http://127.0.0.1:3001/x http://127.0.0.1:4000 && cargo run --release -- serve",
            "127.0.0.1:9",
            "127.0.0.1:8"
        ),
        "curl http://127.0.0.1:9/x http://127.0.0.1:8 && aibos serve"
    );
}
