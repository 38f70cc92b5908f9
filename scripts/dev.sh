#!/usr/bin/env bash
# The local stack in the foreground; Ctrl-C stops all of it.
#
#   scripts/dev.sh [--kafka]
#
# Builds the filters (wasm32-wasip1) and the stack, then starts:
#   - the gateway on 127.0.0.1:10000: Envoy (`func-e run -c envoy/envoy.yaml`)
#     when func-e is on PATH or ACCESS_PROXY=envoy, else the embedded dev
#     proxy (ACCESS_PROXY=embedded forces it): the same filters, plugin
#     configurations, routes and clusters, run in the host emulator. The
#     embedded proxy is a stand-in for development, not a production proxy;
#   - the dev identity provider on 127.0.0.1:8090 (JWKS, OIDC discovery,
#     scripts/token.sh), the demo upstream on 127.0.0.1:8080, the sidecar on
#     127.0.0.1:8081 (rate limit service on 127.0.0.1:8082), and the demo
#     publisher (curve updates every second).
#
# --kafka (or ACCESS_KAFKA=1): the sidecar on the Kafka bus instead of the
# embedded one, with a local Kafka-protocol broker (tansu, built once by
# scripts/ensure-deps.sh kafka: about 10 minutes the first time) on
# 127.0.0.1:9092; the demo publisher produces the curve updates to
# 254carbon.pricing.curve.updates.v1 (key: market.contract, e.g.
# EU-ETS.DEC26), which the sidecar maps to pricing.curves.<key>.
# ACCESS_KAFKA=host:port uses that broker instead.
#
# ACCESS_WASM_RUNTIME=wasmtime runs Envoy's filters on wasmtime instead of V8.
# Extra sidecar flags: DEVSTACK_ARGS="--sidecar-arg=--usage-postgres=host=127.0.0.1 user=postgres dbname=test"
set -euo pipefail
cd "$(dirname "$0")/.."

proxy="${ACCESS_PROXY:-auto}"
if [ "$proxy" = auto ]; then
    if command -v func-e >/dev/null 2>&1; then proxy=envoy; else proxy=embedded; fi
fi
case "$proxy" in
    envoy|embedded) ;;
    *) echo "dev.sh: ACCESS_PROXY must be envoy, embedded or auto" >&2; exit 2 ;;
esac
runtime="${ACCESS_WASM_RUNTIME:-v8}"
case "$runtime" in
    v8|wasmtime) ;;
    *) echo "dev.sh: ACCESS_WASM_RUNTIME must be v8 or wasmtime" >&2; exit 2 ;;
esac

kafka="${ACCESS_KAFKA:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --kafka) kafka=1 ;;
        *) echo "usage: $0 [--kafka]" >&2; exit 2 ;;
    esac
    shift
done
case "$kafka" in
    ""|0) kafka="" ;;
    1) ;;
    *:*) ;;
    *) echo "dev.sh: ACCESS_KAFKA must be 1 or host:port" >&2; exit 2 ;;
esac

scripts/ensure-deps.sh tools
if [ "$kafka" = 1 ]; then
    scripts/ensure-deps.sh kafka --start >/dev/null
    kafka=127.0.0.1:9092
fi
rustup target add wasm32-wasip1 >/dev/null 2>&1 || true
echo "== building the filters and the stack (on a fresh machine the first build" >&2
echo "   takes several minutes: wasmtime and the filters; later runs, seconds)" >&2
scripts/build-filters.sh >/dev/null
# cargo's own progress (a bar on a terminal, Compiling lines otherwise).
cargo build -p devstack
target=$(scripts/target-dir.sh)

kafka_args=()
if [ -n "$kafka" ]; then kafka_args=(--kafka "$kafka"); fi

pids=()
stop() {
    trap - INT TERM EXIT
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap stop INT TERM EXIT

# shellcheck disable=SC2086
if [ "$proxy" = envoy ]; then
    mkdir -p "$target/dev"
    # The filters from cargo's target directory (CARGO_TARGET_DIR when set).
    sed -e "s/envoy\.wasm\.runtime\.v8/envoy.wasm.runtime.$runtime/" \
        -e "s|filename: target/|filename: $target/|" envoy/envoy.yaml >"$target/dev/envoy.yaml"
    "$target/debug/devstack" --no-proxy "${kafka_args[@]}" ${DEVSTACK_ARGS:-} &
    pids+=($!)
    sleep 1
    func-e run -c "$target/dev/envoy.yaml" --concurrency 2 &
    pids+=($!)
    gateway="Envoy (func-e, runtime $runtime)"
else
    "$target/debug/devstack" "${kafka_args[@]}" ${DEVSTACK_ARGS:-} &
    pids+=($!)
    gateway="the embedded dev proxy (not a production proxy)"
fi

cat >&2 <<EOF

== the local stack is starting; Ctrl-C stops it
  gateway            http://127.0.0.1:10000   ($gateway)
  identity provider  http://127.0.0.1:8090/realms/254carbon/.well-known/openid-configuration
  demo upstream      http://127.0.0.1:8080
  sidecar            http://127.0.0.1:8081/metrics${kafka:+   (Kafka bus: $kafka)}

  TOKEN=\$(scripts/token.sh --sub alice --tenant acme --roles trader --markets EU-ETS,CAISO)
  curl -H "authorization: Bearer \$TOKEN" http://127.0.0.1:10000/api/v1/curves/EU-ETS/latest
  scripts/ws.py --token "\$TOKEN" pricing.curves.EU-ETS.DEC26

EOF
wait -n "${pids[@]}"
