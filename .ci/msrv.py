"""Checks that no dependency of the library (normal and build dependencies,
default features, as resolved in Cargo.lock) asks for a newer Rust than the
crate's own `rust-version`. Together with clippy's `incompatible_msrv` lint,
which flags standard-library items newer than `rust-version` in our own code,
this keeps the MSRV in Cargo.toml honest without a second toolchain.

Reads `cargo metadata --format-version 1` on stdin."""
import json
import sys


def version(v):
    parts = [int(x) for x in v.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


meta = json.load(sys.stdin)
packages = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
root = next(p for p in meta["packages"] if p["name"] == "handover")
msrv = version(root["rust_version"])

seen, todo = set(), [root["id"]]
while todo:
    pid = todo.pop()
    if pid in seen:
        continue
    seen.add(pid)
    for dep in nodes[pid]["deps"]:
        if any(k["kind"] in (None, "build") for k in dep["dep_kinds"]):
            todo.append(dep["pkg"])
seen.discard(root["id"])

newer = sorted(
    (packages[p]["name"], packages[p]["rust_version"])
    for p in seen
    if packages[p].get("rust_version") and version(packages[p]["rust_version"]) > msrv
)
if newer:
    for name, rv in newer:
        print(f"{name} needs Rust {rv}, above rust-version {root['rust_version']}", file=sys.stderr)
    sys.exit(1)
print(f"MSRV {root['rust_version']}: the {len(seen)} library dependencies ask for no newer Rust")
