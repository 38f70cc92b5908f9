#!/usr/bin/env bash
# Every hot path measured side by side, in one go (the harness of issue 9;
# rows are added as the parts land):
#   1. one request through each filter in the emulator, against a no-op
#      filter, and the same cores natively;
#   2. WebSocket fan-out, the sidecar and nginx+nchan in the same run;
#   3. usage ingestion: records/s aggregated in memory and persisted to
#      PostgreSQL (127.0.0.1:5432);
#   4. the local stack end to end under load: the embedded dev proxy with the
#      full chain against the same path without filters (needs DESIGN.md's
#      ports free: stop scripts/dev.sh first).
#
#   scripts/bench.sh [--quick]
#
# Each bench prints its own table; at the end one summary table,
# <target>/bench/all.json with every figure (min/median/max per row), and
# <target>/bench/chart.svg (the spread of every row's samples, and the fan-out
# latency percentiles); <target> is cargo's target directory (target/, or
# CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=""
case "${1:-}" in
    --quick) quick="--quick" ;;
    "") ;;
    *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac

scripts/build-filters.sh >/dev/null
bench="$(scripts/target-dir.sh)/bench"
mkdir -p "$bench"
rm -f "$bench"/*.json

benches=(
    "wasm-host stream"
    "filter-tests auth"
    "filter-tests entitlements"
    "filter-tests ratelimit"
    "filter-tests chain"
    "entitlements-core decision"
    "ratelimit-core admit"
    "auth-core verify"
    "sidecar usage"
    "devstack e2e"
)
for b in "${benches[@]}"; do
    read -r package bench <<<"$b"
    echo "== cargo bench -p $package --bench $bench $quick" >&2
    # shellcheck disable=SC2086
    cargo bench -q -p "$package" --bench "$bench" -- $quick 2>&1 | grep -v '^wrote '
done

echo "== scripts/bench-fanout.sh $quick" >&2
# shellcheck disable=SC2086
scripts/bench-fanout.sh $quick | grep -v '^wrote '

python3 - "$bench" <<'PY'
import glob, json, os, sys
bench = sys.argv[1]
out = {"benches": []}
print("\n## Summary (medians; µs per call unless noted)\n")
print("| bench | case | min | median | max |")
print("|---|---|---:|---:|---:|")
for f in sorted(glob.glob(os.path.join(bench, "*.json"))):
    name = os.path.basename(f)[:-5]
    if name in ("all", "fanout"):
        continue
    d = json.load(open(f))
    d["_file"] = name
    out["benches"].append(d)
    for r in d.get("rows", []):
        print(f"| {name} | {r['name']} | {r['min']:.2f} | {r['median']:.2f} | {r['max']:.2f} |")
fanout = os.path.join(bench, "fanout.json")
if os.path.exists(fanout):
    d = json.load(open(fanout))
    out["fanout"] = d
    print("\n| fan-out scenario | server | CPU µs/delivery | p99 ms | KiB/conn |")
    print("|---|---|---:|---:|---:|")
    for e in d["scenarios"]:
        for t in ("sidecar", "nchan"):
            m = e.get(t)
            if m:
                f = lambda v: "–" if v is None or v != v else f"{v:.2f}"
                print(f"| {e['scenario']} | {t} | {f(m['cpu_us_per_delivery'])} | {f(m['p99_ms'])} | {f(m['rss_kib_per_connection'])} |")
def med(bench, case):
    for b in out["benches"]:
        if b.get("bench") == bench or b.get("_file") == bench:
            for r in b.get("rows", []):
                if r["name"] == case:
                    return r["median"]
    return None
ratios = []
def ratio(label, a, b, sub_a=None, sub_b=None):
    va, vb = med(*a), med(*b)
    if va is None or vb is None:
        return
    if sub_a:
        sa = med(*sub_a)
        if sa is None:
            return
        va -= sa
    if sub_b:
        sb = med(*sub_b)
        if sb is None:
            return
        vb -= sb
    if vb > 0:
        ratios.append((label, va, vb, va / vb))
noop = ("entitlements-emulator", "1 no-op filter")
ratio("auth, cold RS256: wasm in the emulator / native", ("auth", "emulator: auth, cold RS256"), ("auth", "native: parse + verify RS256"))
ratio("auth, cold ES256: wasm in the emulator / native", ("auth", "emulator: auth, cold ES256"), ("auth", "native: parse + verify ES256"))
ratio("entitlements, cache hit: filter over a no-op filter / core natively", ("entitlements-emulator", "entitlements, cache hit"), ("entitlements-native", "cache hit: key + lookup"), sub_a=noop)
ratio("entitlements, no caches: filter over a no-op filter / core natively (cache miss)", ("entitlements-emulator", "entitlements, no caches (decode + evaluate)"), ("entitlements-native", "cache miss: key + lookup + evaluate + insert"), sub_a=noop)
ratio("ratelimit, 4 VMs: filter over a no-op filter / core natively", ("ratelimit", "ratelimit, 4 VMs"), ("ratelimit-native", "match + key + admit (GCRA, slot table, in-memory CAS store)"), sub_a=("ratelimit", "1 no-op filter, 4 VMs"))
ratio("full chain / 1 no-op filter (emulator)", ("chain", "full chain: usage, auth (cached), entitlements (200 rules), ratelimit"), ("chain", "1 no-op filter"))
ratio("end to end: full chain / no filters (µs per request)", ("e2e", "gateway, full chain: µs per request (1 / throughput, 16 clients)"), ("e2e", "gateway, no filters: µs per request (1 / throughput, 16 clients)"))
ratio("end to end: full chain / no filters (p99 latency)", ("e2e", "gateway, full chain: latency p99 µs"), ("e2e", "gateway, no filters: latency p99 µs"))
if ratios:
    print("\n| same-run ratio | a (µs) | b (µs) | a / b |")
    print("|---|---:|---:|---:|")
    for label, a, b, r in ratios:
        print(f"| {label} | {a:.2f} | {b:.2f} | {r:.2f}× |")
    out["ratios"] = [{"name": l, "a_us": a, "b_us": b, "ratio": r} for l, a, b, r in ratios]
json.dump(out, open(os.path.join(bench, "all.json"), "w"), indent=1)
print(f"\nwrote {os.path.join(bench, 'all.json')}")
PY
python3 scripts/bench_chart.py "$bench"
