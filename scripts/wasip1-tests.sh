#!/usr/bin/env bash
# Runs the pure core crates' unit tests (scripts/wasm-crates.sh cores)
# compiled for wasm32-wasip1, the filters' own target and libc, under
# wasmtime: PyPI's `wasmtime` in a venv of its own, <target dir>/venv-wasmtime
# (scripts/ensure-venv.sh: needs PyPI once, reused while the pin is
# unchanged), with scripts/wasi_run.py as cargo's runner. Part of the test
# command.
#
#   scripts/wasip1-tests.sh [CARGO TEST ARGS...]   e.g. --locked
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

target=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
venv=$target/venv-wasmtime
scripts/ensure-venv.sh "$venv" wasmtime==50.0.1

# Cargo splits the runner variable on whitespace.
runner="$venv/bin/python $root/scripts/wasi_run.py"
case "$venv$root" in
  *[[:space:]]*)
    echo "wasip1-tests: the runner's paths contain whitespace: $runner" >&2
    exit 1
    ;;
esac

if command -v rustup >/dev/null; then
  rustup target add wasm32-wasip1 >/dev/null
fi
read -r -a cores <<< "$(scripts/wasm-crates.sh cores | tr '\n' ' ')"
if [ ${#cores[@]} -eq 0 ]; then
  echo "wasip1-tests: no core crates (scripts/wasm-crates.sh cores)" >&2
  exit 1
fi

# wasm32-wasip1 panics abort: a failing test ends the module before libtest
# prints the output it captured, so let the panic message through as it
# happens (the cores' tests print nothing else).
export RUST_TEST_NOCAPTURE="${RUST_TEST_NOCAPTURE:-1}"
PYTHONDONTWRITEBYTECODE=1 CARGO_TARGET_WASM32_WASIP1_RUNNER="$runner" \
  exec cargo test --target wasm32-wasip1 --lib "${cores[@]}" "$@"
