#!/usr/bin/env bash
# Prints `-p <name>` for every workspace crate built as a proxy-wasm filter
# (crate-type cdylib). Used by the build, lint and test scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
meta = json.load(sys.stdin)
for p in meta["packages"]:
    if any("cdylib" in t["crate_types"] for t in p["targets"]):
        print("-p", p["name"])
'
