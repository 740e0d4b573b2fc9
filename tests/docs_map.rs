//! The map kept true: `docs/architecture.md`'s crate table names every workspace crate, and
//! its "depends on" column lists exactly the kvpool crates each `Cargo.toml` depends on
//! (normal dependencies, then dev-dependencies after "tests:"). A dependency added without
//! updating the map fails here, naming the crate and both lists.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The workspace members, from the root `Cargo.toml`'s `members = [...]` line.
fn members(root: &Path) -> BTreeSet<String> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("root Cargo.toml");
    let line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("a members line");
    line.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The `kvpool-*` crates (short names) a manifest section lists.
fn section_deps(manifest: &str, section: &str) -> BTreeSet<String> {
    let mut inside = false;
    let mut out = BTreeSet::new();
    for line in manifest.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            inside = t == section;
            continue;
        }
        if inside {
            if let Some(rest) = t.strip_prefix("kvpool-") {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .collect();
                out.insert(name);
            }
        }
    }
    out
}

/// The crate short names mentioned in a table cell.
fn named(cell: &str, crates: &BTreeSet<String>) -> BTreeSet<String> {
    cell.split(|c: char| !c.is_ascii_alphanumeric() && c != '-')
        .filter(|w| crates.contains(*w))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_architecture_table_lists_every_crate_and_its_kvpool_dependencies() {
    let root = root();
    let dirs = members(&root);
    let map = std::fs::read_to_string(root.join("docs/architecture.md")).expect("the map");
    let mut seen = BTreeSet::new();
    let mut wrong = Vec::new();
    for row in map.lines().filter(|l| l.starts_with("| `kvpool-")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // | crate | dir | job | depends on |
        // `dir/`, or `dir/` (its own workspace) for a crate outside the main one (fuzz).
        let dir = cells[2]
            .split('`')
            .nth(1)
            .unwrap_or("")
            .trim_end_matches('/')
            .to_owned();
        let own_workspace = cells[2].contains("its own workspace");
        assert!(
            dirs.contains(&dir) || own_workspace,
            "the map names {dir}/, not a workspace member"
        );
        let manifest = std::fs::read_to_string(root.join(&dir).join("Cargo.toml")).unwrap();
        let (normal, dev) = cells[4].split_once("tests:").unwrap_or((cells[4], ""));
        let said = (named(normal, &dirs), named(dev, &dirs));
        let real = (
            section_deps(&manifest, "[dependencies]"),
            section_deps(&manifest, "[dev-dependencies]"),
        );
        if said != real {
            wrong.push(format!(
                "{dir}: the map says {said:?}, Cargo.toml has {real:?}"
            ));
        }
        seen.insert(dir);
    }
    assert!(
        wrong.is_empty(),
        "docs/architecture.md drifted:\n{}",
        wrong.join("\n")
    );
    let missing: Vec<_> = dirs.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "crates missing from the map: {missing:?}"
    );
}
