#!/usr/bin/env bash
# The project's test command (README): format, lints for both targets, the
# filters built for wasm32-wasip1, then every test. Exits non-zero on the
# first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "tools and services"
# python3, Node.js; Redis, NATS and PostgreSQL on loopback (installed from
# Debian and started when missing; nothing happens when they run).
scripts/ensure-deps.sh tools --node
scripts/ensure-deps.sh services
# tansu, the Kafka-protocol broker the sidecar's Kafka tests start (one per
# test): built from crates.io once (~10 min on two cores), then cached.
TANSU=$(scripts/ensure-deps.sh kafka)
export TANSU

step "toolchain"
rustup show active-toolchain
rustup target add wasm32-wasip1 >/dev/null
rustup component add rustfmt clippy >/dev/null

wasm=$(scripts/wasm-crates.sh filters | tr '\n' ' ')
cores=$(scripts/wasm-crates.sh cores | tr '\n' ' ')
excl=$(echo "$wasm" | sed 's/-p /--exclude /g')

step "cargo fmt --check"
cargo fmt --all -- --check

step "clippy (native)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "clippy (wasm32-wasip1)"
# shellcheck disable=SC2086
cargo clippy --target wasm32-wasip1 --release --locked $wasm $cores -- -D warnings

step "build filters (wasm32-wasip1)"
scripts/build-filters.sh --locked

step "deployment files"
# envoy/envoy.yaml against Envoy's v3 API, k8s/ against Kubernetes' and
# Istio's schemas, no drift between them; the filters packaged as OCI images,
# the sidecar's image built (static, x86_64-unknown-linux-musl: ~2.5 min on
# two cores from nothing; musl-tools and podman installed when missing) and
# run with podman (/healthz, /readyz, its UID, SIGTERM), the layouts
# verified. Installs its own venv (target/venv-deploy).
scripts/package-oci.sh
scripts/test-image.sh
scripts/check-deploy.sh

step "monitoring files"
# k8s/monitoring against the Prometheus Operator's CRD schemas, the alerts
# through promtool (check rules, and the unit tests of
# k8s/monitoring/tests), every dashboard query through promtool, every
# metric and label they name against the code's metric catalogue
# (devstack's metric-catalog). Installs Debian's prometheus for promtool
# when missing (its server stays stopped).
scripts/check-monitoring.sh

step "tests"
# shellcheck disable=SC2086
cargo test --workspace $excl --locked

step "the dev stack on Kafka"
# The end-to-end tests again, the stack's sidecar on the Kafka bus with the
# demo publisher producing to the curve topic (scripts/dev.sh --kafka): a
# broker on 127.0.0.1:9092, started when none runs.
scripts/ensure-deps.sh kafka --start >/dev/null
E2E_KAFKA=127.0.0.1:9092 cargo test -p devstack --test e2e --locked

if [ -n "$cores" ]; then
  step "core crates on wasm32 (wasm-bindgen-test under Node)"
  # 32-bit usize, no clock, no randomness: the core crates' unit tests run
  # compiled for wasm32 too. The runner must match the wasm-bindgen version
  # in Cargo.lock.
  rustup target add wasm32-unknown-unknown >/dev/null
  want=$(python3 -c '
import re
lock = open("Cargo.lock").read()
m = re.search(r"name = \"wasm-bindgen\"\nversion = \"([^\"]+)\"", lock)
print(m.group(1) if m else "")')
  if ! wasm-bindgen-test-runner --version 2>/dev/null | grep -q " $want\b"; then
    cargo install wasm-bindgen-cli --version "$want"
  fi
  # shellcheck disable=SC2086
  CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
    cargo test --target wasm32-unknown-unknown --lib --locked $cores
fi

step "core crates on wasm32-wasip1 (libtest under wasmtime)"
# The same unit tests built for the filters' own target and libc
# (wasi-libc's memcmp, memchr, malloc), under PyPI's wasmtime in a venv of
# its own under the target directory.
scripts/wasip1-tests.sh --locked

step "fuzzing (smoke)"
# Every fuzz target (fuzz/README.md) for a few seconds, on the stable
# toolchain; a crash fails the run and prints its reproducer.
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
scripts/fuzz.sh --smoke 4
