#!/usr/bin/env bash
# The project's test command (README): format, lints for both targets, the
# filters built for wasm32-wasip1, then every test. Exits non-zero on the
# first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "toolchain"
rustup show active-toolchain
rustup target add wasm32-wasip1 >/dev/null
rustup component add rustfmt clippy >/dev/null

wasm=$(scripts/wasm-crates.sh | tr '\n' ' ')
excl=$(echo "$wasm" | sed 's/-p /--exclude /g')

step "cargo fmt --check"
cargo fmt --all -- --check

step "clippy (native)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "clippy (wasm32-wasip1)"
# shellcheck disable=SC2086
cargo clippy --target wasm32-wasip1 --release --locked $wasm -- -D warnings

step "build filters (wasm32-wasip1)"
scripts/build-filters.sh --locked

step "tests"
# shellcheck disable=SC2086
cargo test --workspace $excl --locked
