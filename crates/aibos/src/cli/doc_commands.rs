//! Every `aibos …` command line the documentation shows parses with the real
//! command line, so a renamed flag or subcommand breaks a test, not a reader.
//!
//! Scope: README.md, docs/*.md and the runbooks docs/ops/*.md, inside ```sh, ```bash, ```shell and
//! ```console blocks (in `console` blocks only the lines after a `$ ` prompt).
//! A command is a pipeline segment that starts, after any `NAME=value`
//! environment assignments, with `aibos ` or `cargo run --release -- `; each is
//! handed to clap's `try_parse_from` on [`Cli`]. Commands that need a live
//! server (the `curl` lines) are exercised by the end-to-end tests instead.

use std::path::{Path, PathBuf};

use clap::Parser;

use super::Cli;

/// One command line found in a document.
#[derive(Debug, PartialEq, Eq)]
struct DocCommand {
    /// Where it was found, `README.md:12`.
    place: String,
    /// The arguments after the program name.
    args: Vec<String>,
}

/// The languages of the code blocks whose lines are commands.
const SHELL_LANGUAGES: &[&str] = &["sh", "bash", "shell", "console"];

/// The repository's root, two levels above this crate.
fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// README.md, every docs/*.md and every docs/ops/*.md, in a stable order.
fn documents() -> Vec<(String, String)> {
    let root = repository_root();
    let mut paths = vec![root.join("README.md")];
    for folder in ["docs", "docs/ops"] {
        let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join(folder))
            .unwrap_or_else(|e| panic!("{folder}/ is readable: {e}"))
            .map(|entry| entry.expect("a docs/ entry is readable").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
            .collect();
        docs.sort();
        paths.extend(docs);
    }
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{} is readable: {e}", path.display()));
            let name = path
                .strip_prefix(&root)
                .unwrap_or(&path)
                .display()
                .to_string();
            (name, text)
        })
        .collect()
}

/// The command lines of one document.
fn commands_in(name: &str, text: &str) -> Vec<DocCommand> {
    let mut commands = Vec::new();
    // The language of the code block we are in, if any ("" for a block without one).
    let mut block: Option<String> = None;
    // A command whose line ended in `\`: its first line number and its text so far.
    let mut pending: Option<(usize, String)> = None;
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with("```") {
            block = match block {
                Some(_) => None,
                None => Some(
                    trimmed
                        .trim_start_matches('`')
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_owned(),
                ),
            };
            pending = None;
            continue;
        }
        let Some(language) = block.as_deref() else {
            continue;
        };
        if !SHELL_LANGUAGES.contains(&language) {
            continue;
        }
        let (start, mut logical) = match pending.take() {
            Some((start, logical)) => (start, logical + " "),
            None if language == "console" => match trimmed.strip_prefix("$ ") {
                Some(_) => (index + 1, String::new()),
                // Output lines carry no prompt.
                None => continue,
            },
            None => (index + 1, String::new()),
        };
        let text = if logical.is_empty() && language == "console" {
            trimmed.trim_start_matches("$ ")
        } else {
            trimmed
        };
        match text.strip_suffix('\\') {
            Some(head) => {
                logical.push_str(head);
                pending = Some((start, logical));
            }
            None => {
                logical.push_str(text);
                for args in aibos_invocations(&logical) {
                    commands.push(DocCommand {
                        place: format!("{name}:{start}"),
                        args,
                    });
                }
            }
        }
    }
    commands
}

/// A piece of a shell line.
#[derive(Debug, PartialEq, Eq)]
enum Token {
    /// A word, quotes and backslashes resolved.
    Word(String),
    /// A list or pipeline operator: `|`, `||`, `&&`, `;`, `&`.
    Separator,
    /// A redirection (`>`, `>>`, `2>`, `<`, `2>&`…); the next word is its target.
    Redirection,
}

/// Splits a shell line into tokens, honouring quotes and backslashes, dropping
/// a trailing `#` comment. Enough shell for documentation: no expansion
/// (`$VAR` stays as written, which is what clap then sees as a value).
fn shell_tokens(line: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    word.push(q);
                }
            }
            '"' => {
                in_word = true;
                while let Some(q) = chars.next() {
                    match q {
                        '"' => break,
                        '\\' => word.extend(chars.next()),
                        _ => word.push(q),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.extend(chars.next());
            }
            '#' if !in_word => break,
            '<' | '>' => {
                // `2>`: the digits before a redirection are its descriptor, not a word.
                if in_word && !word.chars().all(|d| d.is_ascii_digit()) {
                    tokens.push(Token::Word(std::mem::take(&mut word)));
                }
                word.clear();
                in_word = false;
                while chars.next_if(|&n| matches!(n, '<' | '>' | '&')).is_some() {}
                tokens.push(Token::Redirection);
            }
            '|' | '&' | ';' => {
                if in_word {
                    tokens.push(Token::Word(std::mem::take(&mut word)));
                    in_word = false;
                }
                while chars.next_if(|&n| matches!(n, '|' | '&')).is_some() {}
                tokens.push(Token::Separator);
            }
            c if c.is_whitespace() => {
                if in_word {
                    tokens.push(Token::Word(std::mem::take(&mut word)));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        tokens.push(Token::Word(word));
    }
    tokens
}

/// The arguments of every `aibos` invocation on a shell line: each pipeline or
/// list segment that starts (after `NAME=value` assignments) with `aibos` or
/// `cargo run --release --`. Redirections and their targets are dropped.
fn aibos_invocations(line: &str) -> Vec<Vec<String>> {
    let mut invocations = Vec::new();
    let mut segment: Vec<String> = Vec::new();
    let mut tokens = shell_tokens(line).into_iter();
    while let Some(token) = tokens.next() {
        match token {
            Token::Word(word) => segment.push(word),
            Token::Redirection => {
                tokens.next();
            }
            Token::Separator => {
                invocations.extend(invocation(&segment));
                segment.clear();
            }
        }
    }
    invocations.extend(invocation(&segment));
    invocations
}

/// The arguments after the program of one segment, if it runs `aibos`.
fn invocation(segment: &[String]) -> Option<Vec<String>> {
    let is_assignment = |w: &String| {
        w.split_once('=').is_some_and(|(name, _)| {
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit())
        })
    };
    let rest: Vec<&String> = segment.iter().skip_while(|w| is_assignment(w)).collect();
    let args = match rest.as_slice() {
        [program, args @ ..] if program.as_str() == "aibos" => args,
        [cargo, run, release, dashes, args @ ..]
            if cargo.as_str() == "cargo"
                && run.as_str() == "run"
                && release.as_str() == "--release"
                && dashes.as_str() == "--" =>
        {
            args
        }
        _ => return None,
    };
    Some(args.iter().map(|w| (*w).clone()).collect())
}

/// The subcommand of an argument list: the first word that is neither an
/// option nor the value of the global `--config`.
fn subcommand(args: &[String]) -> Option<&str> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--config" {
            args.next();
        } else if !arg.starts_with('-') {
            return Some(arg);
        }
    }
    None
}

/// Parses one documented command; `Err` holds clap's complaint.
fn check(command: &DocCommand) -> Result<(), String> {
    let argv = std::iter::once("aibos".to_owned()).chain(command.args.iter().cloned());
    Cli::try_parse_from(argv)
        .map(|_| ())
        .map_err(|e| e.render().to_string())
}

#[test]
fn every_aibos_command_in_the_readme_and_docs_parses() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for (name, text) in documents() {
        for command in commands_in(&name, &text) {
            checked += 1;
            if let Err(complaint) = check(&command) {
                failures.push(format!(
                    "{}: aibos {}\n{complaint}",
                    command.place,
                    command.args.join(" ")
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "documented commands that do not parse:\n\n{}",
        failures.join("\n")
    );
    // The README and docs show a handful at least (first steps, troubleshooting,
    // configuration); finding none would mean this test lost its way.
    assert!(checked >= 5, "only {checked} documented commands found");
}

#[test]
fn commands_are_found_in_shell_blocks_only() {
    let text = "\
aibos serve --outside-a-block
```sh
# a comment
echo 'pass phrase' | cargo run --release -- admin create --email a@b.c --password-stdin
AIBOS_LOG__LEVEL=debug aibos audit verify \\
  --tenant acme   # trailing comment
aibos status --json > out.json && aibos version
aibos audit checkpoint --tenant acme 2>/dev/null
cargo run -p aibos-cell --example minimal_cell
curl -s http://127.0.0.1:3001/api/health
```
```console
$ aibos config validate
aibos output line, not a command
```
```rust
aibos inside rust
```
";
    let found: Vec<(String, String)> = commands_in("x.md", text)
        .into_iter()
        .map(|c| (c.place, c.args.join(" ")))
        .collect();
    let expected = [
        ("x.md:4", "admin create --email a@b.c --password-stdin"),
        ("x.md:5", "audit verify --tenant acme"),
        ("x.md:7", "status --json"),
        ("x.md:7", "version"),
        ("x.md:8", "audit checkpoint --tenant acme"),
        ("x.md:13", "config validate"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(place, args)| ((*place).to_owned(), (*args).to_owned()))
        .collect();
    assert_eq!(found, expected);
}

#[test]
fn a_command_the_cli_does_not_know_is_reported() {
    let bad = DocCommand {
        place: "x.md:1".to_owned(),
        args: vec!["serve".to_owned(), "--no-such-flag".to_owned()],
    };
    assert!(check(&bad).is_err());
    let good = DocCommand {
        place: "x.md:2".to_owned(),
        args: vec![
            "--config".to_owned(),
            "a.toml".to_owned(),
            "serve".to_owned(),
        ],
    };
    assert_eq!(check(&good), Ok(()));
    assert_eq!(subcommand(&good.args), Some("serve"));
}
