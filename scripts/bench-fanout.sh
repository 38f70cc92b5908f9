#!/usr/bin/env bash
# WebSocket fan-out, side by side in one run: the sidecar and nginx with
# nchan (Debian's libnginx-mod-nchan, installed here if missing) on the same
# scenarios, driven by the same load tool (tools/wsload), loopback only.
#
#   scripts/bench-fanout.sh [--quick] [--runs N]
#
# Each row is the median over the runs (min..max in the JSON); every run
# starts a fresh server. --quick: one run of 3 s per scenario, 5,000 × 1
# instead of the largest scenario and 10,000 idle connections instead of
# 50,000. Output: a markdown table on stdout and
# <target>/bench/fanout.json (<target>: cargo's target directory, target/ or
# CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3
duration=10
warmup=2
idle_duration=20
quick=
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) runs=1; duration=3; warmup=1; idle_duration=3; quick=1 ;;
        --runs) runs="$2"; shift ;;
        *) echo "usage: $0 [--quick] [--runs N]" >&2; exit 2 ;;
    esac
    shift
done

if ! command -v nginx >/dev/null || [ ! -e /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
    echo "installing nginx and libnginx-mod-nchan (Debian packages)" >&2
    # Keep the package scripts from starting nginx as a service.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx libnginx-mod-nchan >/dev/null
    rm -f /usr/sbin/policy-rc.d
fi

cargo build --release -q -p sidecar -p wsload
tdir=$(scripts/target-dir.sh)
sidecar=$tdir/release/sidecar
wsload=$tdir/release/wsload

# One process may hold as many sockets as the hard limit allows.
ulimit -n "$(ulimit -Hn)"
fds=$(ulimit -n)
big=$(( fds - 500 ))
[ "$big" -gt 20000 ] && big=20000

work=$(mktemp -d)
server_pid=""
stop_server() {
    if [ -n "$server_pid" ]; then
        # shellcheck disable=SC2086
        kill $server_pid 2>/dev/null || true
        for p in $server_pid; do wait "$p" 2>/dev/null || true; done
        server_pid=""
    fi
}
trap 'stop_server; rm -rf "$work"; rm -f /usr/sbin/policy-rc.d' EXIT

sidecar_port=18081
nchan_port=18199
nginx_conf() {
cat > "$work/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_nchan_module.so;
worker_processes $1;
worker_rlimit_nofile $fds;
pid $work/nginx.pid;
error_log $work/error.log warn;
events { worker_connections $fds; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $work/body;
  nchan_shared_memory_size 256M;
  server {
    listen 127.0.0.1:$nchan_port;
    location ~ ^/sub/(.+)\$ { nchan_subscriber websocket; nchan_channel_id \$1; }
    location ~ ^/pub/(.+)\$ {
      nchan_publisher; nchan_channel_id \$1;
      nchan_message_buffer_length 100; nchan_message_timeout 300s;
    }
  }
}
EOF
}

wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listening on $1" >&2
    return 1
}

# Starts a fresh server (sidecar: $2 processes sharing the port; nginx:
# $2 workers, at least 2); sets server_pid, pids (comma separated) and port.
start_server() {
    stop_server
    local n=${2:-1}
    case "$1" in
        sidecar)
            for _ in $(seq "$n"); do
                "$sidecar" --listen "127.0.0.1:$sidecar_port" --reuse-port --identity-proof none \
                    --policy scripts/bench/fanout-policy.json \
                    --max-connections "$fds" --client-rate 100 >>"$work/sidecar.log" 2>&1 &
                server_pid="$server_pid $!"
            done
            port=$sidecar_port
            wait_port "$port"
            pids=$(echo $server_pid | tr ' ' ',')
            ;;
        nchan)
            nginx_conf "$(( n > 2 ? n : 2 ))"
            nginx -p "$work" -c "$work/nginx.conf" -g 'daemon off;' >"$work/nginx.out" 2>&1 &
            server_pid=$!
            port=$nchan_port
            wait_port "$port"
            sleep 0.2
            pids=$(echo "$server_pid" $(pgrep -P "$server_pid") | tr ' ' ',')
            ;;
    esac
}

results="$work/results.jsonl"
: > "$results"
scenarios=("1000 100" "5000 10" "$big 1" "$big 0")
# --quick: smaller (5,000 × 1, 10,000 idle), for a fast signal in under a
# minute or two; the full run is the one to quote.
[ -n "$quick" ] && scenarios=("1000 100" "5000 10" "5000 1")
for scenario in "${scenarios[@]}"; do
    read -r subs rate <<<"$scenario"
    for run in $(seq "$runs"); do
        for target in sidecar nchan; do
            start_server "$target"
            label="${subs}x${rate}"
            [ "$rate" = 0 ] && label="${subs} idle"
            echo "run $run: $target $label" >&2
            if ! "$wsload" --target "$target" --server "127.0.0.1:$port" --subscribers "$subs" \
                --rate "$rate" --duration "$duration" --warmup "$warmup" --sources 4 \
                --pid "$pids" --label "$label" >>"$results"; then
                echo "  (run failed)" >&2
            fi
            stop_server
        done
    done
done

# 50,000 idle connections. One process may hold about $big sockets here
# (the open-files hard limit), so the sidecar runs as several processes
# sharing the port, nginx with as many workers, and as many load tools.
idle=50000
[ -n "$quick" ] && idle=10000
procs=$(( (idle + big - 1) / big ))
for run in $(seq "$runs"); do
    for target in sidecar nchan; do
        start_server "$target" "$procs"
        echo "run $run: $target $idle idle ($procs processes)" >&2
        each=$(( idle / procs ))
        loads=""
        for i in $(seq "$procs"); do
            "$wsload" --target "$target" --server "127.0.0.1:$port" --subscribers "$each" \
                --rate 0 --duration "$idle_duration" --sources 4 --pid "$pids" \
                --label "$idle idle" >"$work/idle.$i.json" &
            loads="$loads $!"
        done
        for p in $loads; do wait "$p" || echo "  (a load tool failed)" >&2; done
        python3 - "$work" "$procs" "$target" "$idle" >>"$results" <<'PY'
import glob, json, sys
work, procs, target, idle = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
parts = []
for f in sorted(glob.glob(f"{work}/idle.*.json")):
    text = open(f).read().strip()
    if text:
        parts.append(json.loads(text))
conns = sum(p["subscribers"] for p in parts)
before = min(p["rss_kib_before"] for p in parts) if parts else 0
after = max(p["rss_kib"] for p in parts) if parts else 0
print(json.dumps({"label": f"{idle} idle", "target": target, "subscribers": conns,
                  "failed_connections": sum(p["failed_connections"] for p in parts),
                  "processes": procs, "rss_kib_before": before, "rss_kib": after,
                  "rss_kib_per_connection": (after - before) / conns if conns else None}))
PY
        rm -f "$work"/idle.*.json
        stop_server
    done
done

mkdir -p "$tdir/bench"
python3 - "$results" "$tdir/bench/fanout.json" "$runs" "$fds" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
runs, fds = int(sys.argv[3]), int(sys.argv[4])
def med(xs):
    xs = [x for x in xs if x is not None and x == x]
    return statistics.median(xs) if xs else float("nan")
def rng(xs):
    xs = [x for x in xs if x is not None and x == x]
    return [min(xs), max(xs)] if xs else None
labels = list(dict.fromkeys(r["label"] for r in rows))
out = {"runs": runs, "open_files_limit": fds, "scenarios": []}
print(f"\n### WebSocket fan-out: sidecar vs nginx+nchan (median of {runs} run(s), same machine, same run)\n")
print("| scenario | server | delivered/s | loss | p50 ms | p99 ms | p99.9 ms | server CPU µs/delivery | RSS KiB/conn |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for label in labels:
    entry = {"scenario": label}
    for target in ("sidecar", "nchan"):
        rs = [r for r in rows if r["label"] == label and r["target"] == target]
        if not rs:
            continue
        lat = lambda k: [r.get("latency_ms", {}).get(k) for r in rs]
        m = {
            "delivered_per_second": med([r.get("delivered_per_second") for r in rs]),
            "loss": med([r.get("loss") for r in rs]),
            "p50_ms": med(lat("p50")), "p99_ms": med(lat("p99")), "p999_ms": med(lat("p999")),
            "cpu_us_per_delivery": med([r.get("server_cpu_us_per_delivery") for r in rs]),
            "rss_kib_per_connection": med([r.get("rss_kib_per_connection", r.get("rss_kib_per_subscriber")) for r in rs]),
            "failed_connections": max(r.get("failed_connections", 0) for r in rs),
        }
        m["ranges"] = {
            "p99_ms": rng(lat("p99")),
            "cpu_us_per_delivery": rng([r.get("server_cpu_us_per_delivery") for r in rs]),
        }
        entry[target] = m
        f = lambda v, d=1: "–" if v != v else f"{v:,.{d}f}"
        print(f"| {label} | {target} | {f(m['delivered_per_second'], 0)} | {f(m['loss'] * 100, 2)}% | {f(m['p50_ms'])} | {f(m['p99_ms'])} | {f(m['p999_ms'])} | {f(m['cpu_us_per_delivery'], 2)} | {f(m['rss_kib_per_connection'], 2)} |")
    s, n = entry.get("sidecar"), entry.get("nchan")
    if s and n:
        ratio = lambda k: s[k] / n[k] if n[k] and n[k] == n[k] and s[k] == s[k] else float("nan")
        entry["ratio_sidecar_over_nchan"] = {k: ratio(k) for k in ("cpu_us_per_delivery", "p99_ms", "rss_kib_per_connection")}
    out["scenarios"].append(entry)
print("\nsidecar / nchan:")
for e in out["scenarios"]:
    r = e.get("ratio_sidecar_over_nchan")
    if r:
        print(f"- {e['scenario']}: CPU per delivery {r['cpu_us_per_delivery']:.2f}×, p99 {r['p99_ms']:.2f}×, RSS per connection {r['rss_kib_per_connection']:.2f}×")
out["raw"] = rows
json.dump(out, open(sys.argv[2], "w"), indent=1)
print(f"\nwrote {sys.argv[2]}")
PY
