#!/usr/bin/env bash
# WebSocket fan-out, side by side in one run: the sidecar and nginx with
# nchan (Debian's libnginx-mod-nchan, installed here if missing) on the same
# scenarios, driven by the same load tool (tools/wsload), loopback only.
#
#   scripts/bench-fanout.sh [--quick] [--runs N]
#   scripts/bench-fanout.sh --buses [--quick] [--runs N]
#
# --buses: the sidecar alone on its three buses instead, same scenarios
# (1,000 × 100 msg/s, 5,000 × 10), same publisher (POST /publish): the
# embedded bus, NATS (127.0.0.1:4222) and Kafka (a fresh tansu per run,
# scripts/ensure-deps.sh kafka); server CPU per delivery and p99 against
# the embedded bus' in the same run. The brokers' own CPU is not counted.
# The Kafka sidecar fetches with a 10 ms wait: tansu answers a fetch that
# finds nothing new after the whole wait, not when a record arrives (as
# Kafka does), so delivery latency there is about the wait.
# Then the consume rate of one replica: a topic of 3 partitions filled
# with 300,000 records (1,000 channels), read into the hub as the start-up
# snapshot (records/s, seconds to ready, RSS).
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
buses=
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) runs=1; duration=3; warmup=1; idle_duration=3; quick=1 ;;
        --runs) runs="$2"; shift ;;
        --buses) buses=1 ;;
        *) echo "usage: $0 [--buses] [--quick] [--runs N]" >&2; exit 2 ;;
    esac
    shift
done

if [ -n "$buses" ]; then
    scripts/ensure-deps.sh services
    tansu=$(scripts/ensure-deps.sh kafka)
elif ! command -v nginx >/dev/null || [ ! -e /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
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
kafka_fill=$tdir/release/kafka-fill

# One process may hold as many sockets as the hard limit allows.
ulimit -n "$(ulimit -Hn)"
fds=$(ulimit -n)
big=$(( fds - 500 ))
[ "$big" -gt 20000 ] && big=20000

work=$(mktemp -d)
server_pid=""
broker_pid=""
stop_server() {
    if [ -n "$broker_pid" ]; then
        kill "$broker_pid" 2>/dev/null || true
        wait "$broker_pid" 2>/dev/null || true
        broker_pid=""
    fi
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
kafka_port=19092

# A fresh Kafka-protocol broker (tansu, SQLite storage in $work) on
# $kafka_port; sets broker_pid.
start_broker() {
    local dir="$work/kafka.$RANDOM"
    mkdir -p "$dir"
    (cd "$dir" && exec "$tansu" broker --listener-url "tcp://127.0.0.1:$kafka_port" \
        --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
        --storage-engine sqlite://tansu.db >"$dir/log" 2>&1) &
    broker_pid=$!
    wait_port "$kafka_port"
}

# Waits until the sidecar on port $1 answers /readyz 200 (at most $2 s).
wait_ready() {
    local tries=$(( ${2:-30} * 20 ))
    for _ in $(seq "$tries"); do
        curl -fs "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "the sidecar on $1 was not ready in ${2:-30} s" >&2
    curl -s "http://127.0.0.1:$1/readyz" >&2 || true
    return 1
}
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
        sidecar|sidecar-nats|sidecar-kafka)
            local bus=()
            case "$1" in
                sidecar-nats) bus=(--bus nats --nats-prefix "bench$RANDOM") ;;
                sidecar-kafka)
                    start_broker
                    "$kafka_fill" --brokers "127.0.0.1:$kafka_port" --topic bench.live --partitions 1
                    bus=(--bus kafka --kafka-brokers "127.0.0.1:$kafka_port" --kafka-bus-topic bench.live
                        --kafka-snapshot-messages 0 --kafka-fetch-wait-ms 10) ;;
            esac
            for _ in $(seq "$n"); do
                "$sidecar" --listen "127.0.0.1:$sidecar_port" --reuse-port --identity-proof none \
                    --policy scripts/bench/fanout-policy.json "${bus[@]}" \
                    --max-connections "$fds" --client-rate 100 >>"$work/sidecar.log" 2>&1 &
                server_pid="$server_pid $!"
            done
            port=$sidecar_port
            wait_port "$port"
            wait_ready "$port"
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
targets=(sidecar nchan)
if [ -n "$buses" ]; then
    scenarios=("1000 100" "5000 10")
    targets=(sidecar sidecar-nats sidecar-kafka)
fi
for scenario in "${scenarios[@]}"; do
    read -r subs rate <<<"$scenario"
    for run in $(seq "$runs"); do
        for target in "${targets[@]}"; do
            start_server "$target"
            label="${subs}x${rate}"
            [ "$rate" = 0 ] && label="${subs} idle"
            echo "run $run: $target $label" >&2
            # The load tool speaks "sidecar" whatever the bus; the row is
            # named after the target.
            if "$wsload" --target "${target%%-*}" --server "127.0.0.1:$port" --subscribers "$subs" \
                --rate "$rate" --duration "$duration" --warmup "$warmup" --sources 4 \
                --pid "$pids" --label "$label" >"$work/row.json"; then
                sed "s/\"target\":\"sidecar\"/\"target\":\"$target\"/" "$work/row.json" >>"$results"
            else
                echo "  (run failed)" >&2
            fi
            stop_server
        done
    done
done

# The consume rate of one replica: a filled topic read into the hub as
# its start-up snapshot.
consume_records=300000
[ -n "$quick" ] && consume_records=60000
if [ -n "$buses" ]; then
    for run in $(seq "$runs"); do
        stop_server
        start_broker
        echo "run $run: sidecar-kafka consume ($consume_records records)" >&2
        "$kafka_fill" --brokers "127.0.0.1:$kafka_port" --topic bench.curves --partitions 3 \
            --records "$consume_records" --channels 1000
        t0=$(date +%s.%N)
        "$sidecar" --listen "127.0.0.1:$sidecar_port" --identity-proof none \
            --policy scripts/bench/fanout-policy.json --bus kafka \
            --kafka-brokers "127.0.0.1:$kafka_port" --kafka-topic 'bench.curves=pricing.curves.{key}' \
            --kafka-snapshot-messages "$consume_records" --kafka-snapshot-timeout 600 \
            >>"$work/sidecar.log" 2>&1 &
        server_pid=$!
        wait_port "$sidecar_port"
        wait_ready "$sidecar_port" 600 || true
        t1=$(date +%s.%N)
        curl -s "http://127.0.0.1:$sidecar_port/metrics" >"$work/metrics.txt"
        rss=$(awk '/^VmRSS/ {print $2}' "/proc/$server_pid/status")
        python3 - "$t0" "$t1" "$rss" "$consume_records" "$work/metrics.txt" >>"$results" <<'PY'
import json, re, sys
t0, t1, rss, want = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = open(sys.argv[5]).read()
def val(name):
    x = re.search(r"^" + re.escape(name) + r"(?:\{[^}]*\})? ([0-9.e+-]+)$", m, re.M)
    return float(x.group(1)) if x else float("nan")
secs, n = val("sidecar_kafka_snapshot_seconds"), val("sidecar_kafka_snapshot_messages")
print(json.dumps({"label": "consume", "target": "sidecar-kafka", "records": n, "expected": want,
                  "snapshot_seconds": secs, "records_per_second": n / secs if secs else None,
                  "seconds_to_ready": t1 - t0, "channels": val("sidecar_channels"), "rss_kib": rss}))
PY
        stop_server
    done
fi

# 50,000 idle connections. One process may hold about $big sockets here
# (the open-files hard limit), so the sidecar runs as several processes
# sharing the port, nginx with as many workers, and as many load tools.
idle=50000
[ -n "$quick" ] && idle=10000
procs=$(( (idle + big - 1) / big ))
idle_runs=$runs
[ -n "$buses" ] && idle_runs=0
for run in $(seq "$idle_runs"); do
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
out_json=$tdir/bench/fanout.json
[ -n "$buses" ] && out_json=$tdir/bench/fanout-buses.json
python3 - "$results" "$out_json" "$runs" "$fds" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
runs, fds = int(sys.argv[3]), int(sys.argv[4])
def med(xs):
    xs = [x for x in xs if x is not None and x == x]
    return statistics.median(xs) if xs else float("nan")
def rng(xs):
    xs = [x for x in xs if x is not None and x == x]
    return [min(xs), max(xs)] if xs else None
consume = [r for r in rows if r["label"] == "consume"]
rows = [r for r in rows if r["label"] != "consume"]
labels = list(dict.fromkeys(r["label"] for r in rows))
targets = list(dict.fromkeys(r["target"] for r in rows))
buses = "nchan" not in targets
out = {"runs": runs, "open_files_limit": fds, "scenarios": []}
if buses:
    print(f"\n### WebSocket fan-out: the sidecar's buses (median of {runs} run(s), min..max, same machine, same run)\n")
else:
    print(f"\n### WebSocket fan-out: sidecar vs nginx+nchan (median of {runs} run(s), same machine, same run)\n")
print("| scenario | server | delivered/s | loss | p50 ms | p99 ms | p99.9 ms | server CPU µs/delivery | RSS KiB/conn |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for label in labels:
    entry = {"scenario": label}
    for target in targets:
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
        rg = lambda k: f" ({m['ranges'][k][0]:.2f}..{m['ranges'][k][1]:.2f})" if buses and m["ranges"][k] else ""
        name = "sidecar (memory)" if buses and target == "sidecar" else target
        print(f"| {label} | {name} | {f(m['delivered_per_second'], 0)} | {f(m['loss'] * 100, 2)}% | {f(m['p50_ms'])} | {f(m['p99_ms'])}{rg('p99_ms')} | {f(m['p999_ms'])} | {f(m['cpu_us_per_delivery'], 2)}{rg('cpu_us_per_delivery')} | {f(m['rss_kib_per_connection'], 2)} |")
    ratio = lambda a, b, k: a[k] / b[k] if b[k] and b[k] == b[k] and a[k] == a[k] else float("nan")
    keys = ("cpu_us_per_delivery", "p99_ms", "rss_kib_per_connection")
    if buses:
        base = entry.get("sidecar")
        for other in ("sidecar-nats", "sidecar-kafka"):
            o = entry.get(other)
            if base and o:
                entry["ratio_" + other.replace("-", "_") + "_over_memory"] = {k: ratio(o, base, k) for k in keys}
    else:
        s, n = entry.get("sidecar"), entry.get("nchan")
        if s and n:
            entry["ratio_sidecar_over_nchan"] = {k: ratio(s, n, k) for k in keys}
    out["scenarios"].append(entry)
if buses:
    print("\nagainst the embedded (memory) bus, same run:")
    for e in out["scenarios"]:
        for other in ("sidecar_nats", "sidecar_kafka"):
            r = e.get("ratio_" + other + "_over_memory")
            if r:
                print(f"- {e['scenario']}, {other.replace('_', '-')}: CPU per delivery {r['cpu_us_per_delivery']:.2f}×, p99 {r['p99_ms']:.2f}×")
if consume:
    rates = [c["records_per_second"] for c in consume if c.get("records_per_second")]
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    print(f"\n### Kafka: consume rate of one replica (the start-up snapshot; median of {len(consume)} run(s), min..max)\n")
    print("| records | channels | records/s | snapshot s | start to ready s | RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    c = consume[0]
    rr = f" ({min(rates):,.0f}..{max(rates):,.0f})" if rates else ""
    print(f"| {c['records']:,.0f} | {c['channels']:,.0f} | {med(rates):,.0f}{rr} | "
          f"{med([x['snapshot_seconds'] for x in consume]):.2f} | {med([x['seconds_to_ready'] for x in consume]):.2f} | "
          f"{med([x['rss_kib'] for x in consume]) / 1024:.1f} |")
    out["consume"] = consume
if not buses:
    print("\nsidecar / nchan:")
for e in out["scenarios"]:
    r = e.get("ratio_sidecar_over_nchan")
    if r:
        print(f"- {e['scenario']}: CPU per delivery {r['cpu_us_per_delivery']:.2f}×, p99 {r['p99_ms']:.2f}×, RSS per connection {r['rss_kib_per_connection']:.2f}×")
out["raw"] = rows
json.dump(out, open(sys.argv[2], "w"), indent=1)
print(f"\nwrote {sys.argv[2]}")
PY
