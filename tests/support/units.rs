//! Reading the unit files shipped in `units/` and adjusting them for a test.
#![allow(dead_code)]

use std::fs;
use std::path::Path;

/// A unit file from `units/`.
pub fn repo_unit(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("units")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Replaces the value of every (uncommented) `key=` line whose value is not
/// empty (an empty one resets a list in a drop-in); at least one must exist.
pub fn set_key(unit: &str, key: &str, value: &str) -> String {
    let prefix = format!("{key}=");
    let mut found = false;
    let mut out: String = unit
        .lines()
        .map(|l| match l.trim_start().strip_prefix(&prefix) {
            Some(v) if !v.trim().is_empty() => {
                found = true;
                format!("{prefix}{value}")
            }
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    out.push('\n');
    assert!(found, "no {key}= line in the unit:\n{unit}");
    out
}
