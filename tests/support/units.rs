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

/// The crate's `ExecReload=` command, as cargo built it for the integration tests.
pub const RELOAD_CMD: &str = env!("CARGO_BIN_EXE_handover-reload");

/// Where the shipped units expect the reload command.
pub const SHIPPED_RELOAD_CMD: &str = "/usr/local/bin/handover-reload";

/// The value of the last (uncommented) non-empty `key=` line.
pub fn get_key<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    unit.lines()
        .rev()
        .filter_map(|l| l.trim_start().strip_prefix(prefix.as_str()))
        .find(|v| !v.trim().is_empty())
}

/// Points every `ExecReload=` line that runs the shipped `handover-reload` at the built one,
/// keeping its arguments; at least one must exist.
pub fn with_built_reload_command(unit: &str) -> String {
    let reload = get_key(unit, "ExecReload").expect("the unit has an ExecReload= line");
    let args = reload
        .strip_prefix(SHIPPED_RELOAD_CMD)
        .unwrap_or_else(|| panic!("ExecReload={reload} does not run {SHIPPED_RELOAD_CMD}"));
    set_key(unit, "ExecReload", &format!("{RELOAD_CMD}{args}"))
}

/// The shipped `units/hello.socket`, listening on 127.0.0.1:`port`, and `units/<service>`
/// running `exec` (a command line) with its `handover-reload` pointed at the built one: the
/// shipped files otherwise unchanged.
pub fn hello_units(service: &str, exec: &str, port: u16) -> (String, String) {
    let socket = set_key(
        &repo_unit("hello.socket"),
        "ListenStream",
        &format!("127.0.0.1:{port}"),
    );
    let service = with_built_reload_command(&set_key(&repo_unit(service), "ExecStart", exec));
    (socket, service)
}
