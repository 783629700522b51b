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

/// The newest released version in a Keep a Changelog document: the first
/// `## [x.y.z]` heading, skipping `## [Unreleased]`.
#[cfg(test)]
fn newest_released_version(changelog: &str) -> Option<&str> {
    changelog
        .lines()
        .filter_map(|line| line.strip_prefix("## ["))
        .filter_map(|rest| rest.split_once(']').map(|(version, _)| version))
        .find(|version| !version.eq_ignore_ascii_case("unreleased"))
}

#[cfg(test)]
mod tests {
    use super::newest_released_version;

    #[test]
    fn the_version_printed_is_the_newest_release_in_the_changelog() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../CHANGELOG.md");
        let changelog = std::fs::read_to_string(path).expect("CHANGELOG.md is readable");
        assert_eq!(
            newest_released_version(&changelog),
            Some(env!("CARGO_PKG_VERSION")),
            "CHANGELOG.md's newest release heading must name the workspace version \
             (Cargo.toml), which `aibos version` prints"
        );
    }

    #[test]
    fn the_newest_release_skips_unreleased_and_takes_the_first() {
        let check = |text: &str, expected: Option<&str>| {
            assert_eq!(newest_released_version(text), expected, "{text}");
        };
        check(
            "# Changelog\n\n## [Unreleased]\n\n## [0.2.0] - 2027-01-02\n\n## [0.1.0] - 2026-12-06\n",
            Some("0.2.0"),
        );
        check(
            "## [1.0.0] - 2027-01-02\n### Added\n## [0.9.0]\n",
            Some("1.0.0"),
        );
        check("# Changelog\n\n## [Unreleased]\n- nothing yet\n", None);
        check("[0.1.0]: https://example.com/compare\n", None);
    }
}
