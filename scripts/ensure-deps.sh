#!/usr/bin/env bash
# Makes sure what the scripts need is there, on a fresh Debian machine with
# Rust installed; does nothing when it already is.
#
#   scripts/ensure-deps.sh tools      python3, curl (and Node.js with --node;
#                                     musl-gcc, for C code in the sidecar's
#                                     static build, with --musl; podman and
#                                     runc, to run its image, with --podman)
#   scripts/ensure-deps.sh services   Redis 127.0.0.1:6379 (and redis-server,
#                                     redis-cli, redis-sentinel for the tests'
#                                     own), NATS 127.0.0.1:4222, PostgreSQL
#                                     127.0.0.1:5432 (trust, database `test`)
#   scripts/ensure-deps.sh kafka      tansu, a Kafka-protocol broker, built once
#                                     from crates.io into ~/.cache/254carbon
#                                     (about 10 minutes); prints its path. With
#                                     --start it also runs one on 127.0.0.1:9092
#                                     (data in /tmp/254carbon-kafka), for the
#                                     dev stack; the tests start their own.
#   scripts/ensure-deps.sh promtool   promtool (Debian's prometheus package), for
#                                     scripts/check-monitoring.sh; the package's
#                                     own Prometheus server is stopped and
#                                     disabled (nothing here needs it); prints
#                                     its path
#
# Missing pieces are installed from Debian's packages (apt-get; root or
# sudo needed) and started on loopback. Without root it says what is missing.
set -euo pipefail

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "ensure-deps: need root to run: $*" >&2; return 1; fi
}

updated=""
apt_install() {
    if [ -z "$updated" ]; then as_root apt-get update -qq; updated=1; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {
    for _ in $(seq 50); do listening "$1" && return 0; sleep 0.2; done
    echo "ensure-deps: $2 did not start on 127.0.0.1:$1" >&2
    return 1
}

tools() {
    local missing=()
    command -v python3 >/dev/null || missing+=(python3)
    command -v curl >/dev/null || missing+=(curl)
    for opt in "$@"; do
        case "$opt" in
            --node) command -v node >/dev/null || missing+=(nodejs) ;;
            --musl) command -v musl-gcc >/dev/null || missing+=(musl-tools) ;;
            --podman)
                command -v podman >/dev/null || missing+=(podman)
                command -v runc >/dev/null || missing+=(runc) ;;
            *) echo "ensure-deps: tools: unknown option $opt" >&2; return 2 ;;
        esac
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "ensure-deps: installing ${missing[*]}" >&2
        apt_install "${missing[@]}"
    fi
}

services() {
    # The binaries too: the sidecar's tests start their own servers,
    # sentinels and clusters on free ports (sidecar/tests/common/redis.rs).
    # The redis-sentinel package may start a sentinel of its own on 26379;
    # the tests never use a fixed port, so it is in nobody's way.
    local redis=()
    command -v redis-server >/dev/null || redis+=(redis-server)
    command -v redis-cli >/dev/null || redis+=(redis-tools)
    command -v redis-sentinel >/dev/null || redis+=(redis-sentinel)
    if [ ${#redis[@]} -gt 0 ]; then
        echo "ensure-deps: installing ${redis[*]}" >&2
        apt_install "${redis[@]}"
    fi
    if ! listening 6379; then
        echo "ensure-deps: starting Redis on 127.0.0.1:6379" >&2
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no >/dev/null
        wait_for 6379 Redis
    fi
    if ! listening 4222; then
        echo "ensure-deps: starting NATS (JetStream) on 127.0.0.1:4222" >&2
        command -v nats-server >/dev/null || apt_install nats-server
        mkdir -p /tmp/254carbon-nats
        setsid nats-server -a 127.0.0.1 -p 4222 -js -sd /tmp/254carbon-nats >/tmp/254carbon-nats/log 2>&1 < /dev/null &
        wait_for 4222 NATS
    fi
    if ! listening 5432; then
        echo "ensure-deps: starting PostgreSQL on 127.0.0.1:5432" >&2
        command -v pg_ctlcluster >/dev/null || apt_install postgresql
        local v
        v=$(ls /etc/postgresql | sort -n | tail -1)
        [ -d "/etc/postgresql/$v/main" ] || as_root pg_createcluster "$v" main >/dev/null
        local hba="/etc/postgresql/$v/main/pg_hba.conf"
        if ! as_root grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
            # Trust on loopback only, ahead of the packaged rules.
            as_root sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
        fi
        as_root pg_ctlcluster "$v" main start || as_root pg_ctlcluster "$v" main reload
        wait_for 5432 PostgreSQL
    fi
    if command -v psql >/dev/null &&
        ! psql -h 127.0.0.1 -U postgres -Atc "SELECT 1 FROM pg_database WHERE datname = 'test'" postgres 2>/dev/null | grep -q 1; then
        echo "ensure-deps: creating database test" >&2
        psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE test" postgres
    fi
}

TANSU_VERSION=0.6.0
tansu_bin() {
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/254carbon/tansu-$TANSU_VERSION/bin/tansu"
}

kafka() {
    local bin
    bin=$(tansu_bin)
    if [ ! -x "$bin" ]; then
        echo "ensure-deps: building tansu $TANSU_VERSION (a Kafka-protocol broker) into ${bin%/bin/tansu}" >&2
        local root=${bin%/bin/tansu}
        # C code in its dependencies (SQLite, aws-lc) may build with cmake.
        command -v cmake >/dev/null || apt_install cmake
        # Its own target directory: the project's CARGO_TARGET_DIR must not
        # fill with a broker's build, and a rebuild of ours must not lose it.
        CARGO_TARGET_DIR="$root.build" cargo install tansu --version "$TANSU_VERSION" \
            --features libsql --locked --quiet --root "$root.tmp" >&2
        rm -rf "$root" && mv "$root.tmp" "$root" && rm -rf "$root.build"
    fi
    echo "$bin"
    if [ "${1:-}" = --start ] && ! listening 9092; then
        echo "ensure-deps: starting tansu on 127.0.0.1:9092" >&2
        mkdir -p /tmp/254carbon-kafka
        # The storage URL is relative to the working directory.
        (cd /tmp/254carbon-kafka && setsid "$bin" broker \
            --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 \
            --storage-engine sqlite://tansu.db >log 2>&1 < /dev/null &)
        wait_for 9092 tansu
    fi
}

promtool_dep() {
    if ! command -v promtool >/dev/null; then
        echo "ensure-deps: installing prometheus (for promtool)" >&2
        # The package's postinst starts its server where it can (systemd, or
        # its init script through invoke-rc.d); a policy-rc.d that refuses
        # keeps it from starting during the install, and it is disabled after.
        local policy=/usr/sbin/policy-rc.d made=""
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
            as_root chmod +x "$policy"
            made=1
        fi
        apt_install prometheus || { [ -n "$made" ] && as_root rm -f "$policy"; return 1; }
        [ -n "$made" ] && as_root rm -f "$policy"
        if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
            as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
        elif [ -x /etc/init.d/prometheus ]; then
            as_root /etc/init.d/prometheus stop >/dev/null 2>&1 || true
            command -v update-rc.d >/dev/null && as_root update-rc.d prometheus disable >/dev/null 2>&1 || true
        fi
    fi
    command -v promtool
}

case "${1:-}" in
    tools) shift; tools "$@" ;;
    services) services ;;
    kafka) shift; kafka "$@" ;;
    promtool) promtool_dep ;;
    *) echo "usage: $0 tools [--node] [--musl] [--podman] | services | kafka [--start] | promtool" >&2; exit 2 ;;
esac
