#!/usr/bin/env bash
# Prints `-p <name>` for workspace crates of one kind:
#   (no argument) / filters : proxy-wasm filters (crate-type cdylib)
#   cores                   : pure core crates also tested on wasm32
#                             (a dev-dependency on wasm-bindgen-test)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
kind = sys.argv[1]
meta = json.load(sys.stdin)
for p in meta["packages"]:
    cdylib = any("cdylib" in t["crate_types"] for t in p["targets"])
    core = any(d["name"] == "wasm-bindgen-test" for d in p["dependencies"])
    if (kind == "filters" and cdylib) or (kind == "cores" and core):
        print("-p", p["name"])
' "${1:-filters}"
