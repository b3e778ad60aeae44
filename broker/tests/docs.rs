//! The README stays true: its configuration table lists exactly the flags `broker --help`
//! prints, with the same environment variables; its metrics table lists exactly the `broker_*`
//! families a running broker exports; it opens with the two set-up commands, and CI runs the
//! second.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::deploy::repo;
use common::Broker;

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).expect("README.md")
}

/// The first backquoted word of each table row whose first cell starts with `prefix`.
fn table_cells(text: &str, prefix: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| l.starts_with(&format!("| `{prefix}")))
        .map(|l| {
            l.split('|')
                .skip(1)
                .map(|cell| cell.split('`').nth(1).unwrap_or("").to_owned())
                .collect()
        })
        .collect()
}

#[test]
fn the_configuration_table_matches_the_help() {
    let help = Command::new(env!("CARGO_BIN_EXE_broker"))
        .arg("--help")
        .output()
        .expect("broker --help runs");
    let help = String::from_utf8(help.stdout).expect("utf-8");
    // `--flag <VALUE>` lines, each followed (in its paragraph) by `[env: NAME=...]`.
    let mut from_help = BTreeSet::new();
    let mut flag: Option<String> = None;
    for line in help.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("--") {
            let name = rest.split([' ', '<']).next().unwrap_or("");
            flag = (!matches!(name, "help" | "version")).then(|| format!("--{name}"));
        } else if let (Some(f), Some(env)) = (&flag, line.strip_prefix("[env: ")) {
            let env = env.split('=').next().unwrap_or("").to_owned();
            from_help.insert((f.clone(), env));
            flag = None;
        }
    }
    let from_readme: BTreeSet<(String, String)> = table_cells(&readme(), "--")
        .into_iter()
        .map(|cells| (cells[0].clone(), cells[1].clone()))
        .collect();
    assert!(from_help.len() >= 20, "parsed the help: {from_help:?}");
    assert_eq!(
        from_readme, from_help,
        "README configuration table vs broker --help"
    );
}

#[test]
fn the_metrics_table_matches_what_the_broker_exports() {
    let broker = Broker::start(&["--workers", "1"]);
    let (_, text) = broker.http_get("/metrics");
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with("broker_"))
        .map(str::to_owned)
        .collect();
    let documented: BTreeSet<String> = table_cells(&readme(), "broker_")
        .into_iter()
        .map(|cells| cells[0].split('{').next().unwrap_or("").to_owned())
        .collect();
    assert!(exported.len() >= 20, "scraped: {exported:?}");
    assert_eq!(documented, exported, "README metrics table vs /metrics");
}

#[test]
fn the_readme_opens_with_the_setup_commands_and_ci_runs_the_test_one() {
    let text = readme();
    let block: Vec<&str> = text
        .split("```sh\n")
        .nth(1)
        .expect("a shell block first")
        .lines()
        .take(2)
        .collect();
    assert!(block[0].starts_with("scripts/run "), "{block:?}");
    assert!(block[1].starts_with("scripts/test "), "{block:?}");
    let ci = std::fs::read_to_string(repo().join(".ci/run")).expect(".ci/run");
    assert!(ci.lines().any(|l| l.trim() == "exec scripts/test"), "{ci}");
}
