#!/usr/bin/env bash
# Prints cargo's target directory for this workspace (CARGO_TARGET_DIR or a
# cargo config's build.target-dir when set, else <repo>/target), as cargo
# itself reports it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --no-deps --format-version 1 --offline | python3 -c '
import json, sys
print(json.load(sys.stdin)["target_directory"])
'
