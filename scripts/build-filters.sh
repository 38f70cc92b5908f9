#!/usr/bin/env bash
# Builds every proxy-wasm filter of the workspace for wasm32-wasip1 (release
# profile: lto, one codegen unit, panic=abort, stripped). Output:
# <target>/wasm32-wasip1/release/<name>.wasm, <target> being cargo's target
# directory (target/, or CARGO_TARGET_DIR: scripts/target-dir.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip1 >/dev/null 2>&1 || true
# shellcheck disable=SC2046
cargo build --release --target wasm32-wasip1 $(scripts/wasm-crates.sh) "$@"
ls -l "$(scripts/target-dir.sh)"/wasm32-wasip1/release/*.wasm
