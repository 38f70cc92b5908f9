#!/usr/bin/env bash
# The sidecar's image, tested (a step of scripts/test.sh): builds it
# (scripts/package-sidecar.sh: the static musl binary, <target>/oci/sidecar),
# verifies the layout (static entrypoint, non-root user, migrations, ports),
# writes it a second time from the same binary and compares the digests, then
# runs it with podman the way k8s/base/sidecar.yaml does (its own user, a
# read-only root, no capabilities, no privilege escalation), the policy
# mounted: /healthz and /readyz answer 200 and the process is UID 65532; it
# is stopped (SIGTERM) and everything it made is removed. Bounded in time.
#
#   scripts/test-image.sh [--no-build]
#
# podman (and runc) are installed from Debian when missing. Without root
# (rootful podman is what is tested), or with SIDECAR_IMAGE_RUN=binary, the
# binary taken out of the image's layer is run instead, and it says so: the
# same HTTP checks, no container.
set -euo pipefail
cd "$(dirname "$0")/.."

build=(); [ "${1:-}" = --no-build ] && build=(--no-build)
scripts/package-sidecar.sh "${build[@]}"

target=$(scripts/target-dir.sh)
layout=$target/oci/sidecar
tag=$(python3 -c 'import json; print(json.load(open("k8s/deploy.json"))["images"]["tag"])')
policy=$PWD/filters/entitlements/examples/policy.json
work=$(mktemp -d /tmp/sidecar-image.XXXXXX)
cid=""
pid=""
podman_=()

cleanup() {
  if [ -n "$cid" ]; then timeout 20 "${podman_[@]}" rm -f -t 2 "$cid" >/dev/null 2>&1 || true; fi
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# -- the layout, and the digest once more from the same binary
python3 - "$layout" "$work/again" "$tag" <<'EOF'
import io, os, sys, tarfile
sys.path.insert(0, "scripts")
import oci_layout as o
layout, again, tag = sys.argv[1:]
got = o.verify_sidecar(layout)
print(f"test-image: {layout}: static {got['entrypoint']}, user {got['user']}, "
      f"migrations {', '.join(got['migrations'])}")
migrations = o.read_migrations("sidecar/migrations")
want = {n: o.sha256(d) for n, d in migrations.items()}
assert got["migrations"] == want, f"migrations in the image {got['migrations']} != sidecar/migrations {want}"
_, _, config, tar = o.Layout(layout).image()
with tarfile.open(fileobj=io.BytesIO(tar)) as t:
    binary = t.extractfile(o.SIDECAR_BIN.lstrip("/")).read()
labels = config["config"]["Labels"]
_, _, digest = o.sidecar_build(binary, migrations, tag, labels["org.opencontainers.image.version"],
                               labels.get("org.opencontainers.image.source", ""))
assert digest == got["digest"], f"the same binary packaged again gives sha256:{digest}, not sha256:{got['digest']}"
print(f"test-image: reproducible: packaged again, the same digest sha256:{digest}")
os.makedirs(again)
with open(os.path.join(again, "sidecar"), "wb") as f:
    f.write(binary)
os.chmod(os.path.join(again, "sidecar"), 0o755)
EOF

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url=http://127.0.0.1:$port

alive() {  # the sidecar still runs (the container, or the process)
  if [ -n "$cid" ]; then
    [ "$("${podman_[@]}" inspect --format '{{.State.Running}}' "$cid" 2>/dev/null)" = true ]
  else
    case "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" in ""|Z) return 1 ;; esac
  fi
}

wait_healthy() {  # $1: what runs, for the message
  for _ in $(seq 100); do
    if curl -fsS -m 1 "$url/healthz" >/dev/null 2>&1; then return 0; fi
    if ! alive; then echo "test-image: $1 exited before answering $url/healthz" >&2; return 1; fi
    sleep 0.1
  done
  echo "test-image: $1 did not answer $url/healthz within 10 s" >&2
  return 1
}

check_http() {
  local path want body
  for path in /healthz /readyz; do
    want=ok; [ "$path" = /readyz ] && want=ready
    body=$(curl -fsS -m 3 "$url$path")
    if [ "$(echo "$body" | head -1)" != "$want" ]; then
      echo "test-image: GET $path answered $body, not $want" >&2
      return 1
    fi
    echo "test-image: GET $path: 200 $want"
  done
}

uid_of() { awk '/^Uid:/ {print $2}' "/proc/$1/status"; }

mode=${SIDECAR_IMAGE_RUN:-}
if [ -z "$mode" ]; then
  if [ "$(id -u)" = 0 ]; then mode=podman; else mode=binary; fi
fi

if [ "$mode" = podman ]; then
  # Rootful podman with storage of its own in $work (vfs: no overlay mount
  # needed), cgroupfs and file events (no systemd). runc, not crun: crun
  # refuses a hybrid cgroup hierarchy with a controller on cgroup2, which
  # some machines (this one) have. The ulimits are spelled out because
  # podman's defaults (nofile 1048576) exceed what a sandbox may grant.
  scripts/ensure-deps.sh tools --podman
  nofile=$(ulimit -Hn)
  if [ "$nofile" = unlimited ] || [ "$nofile" -gt 65536 ]; then nofile=65536; fi
  podman_=(podman --root "$work/storage" --runroot "$work/run" --storage-driver vfs
    --cgroup-manager cgroupfs --events-backend file --runtime runc)
  run=("${podman_[@]}" run --network host --read-only --cap-drop ALL
    --security-opt no-new-privileges --ulimit "nofile=$nofile:$nofile" --ulimit nproc=4096:4096)
  version=$(timeout 60 "${run[@]}" --rm -q "oci:$layout:$tag" --version)
  echo "test-image: podman run … --version: $version"
  cid=$(timeout 60 "${run[@]}" -d -q -v "$policy:/etc/access-sidecar/policy.json:ro" "oci:$layout:$tag" \
    --listen "127.0.0.1:$port" --policy /etc/access-sidecar/policy.json)
  if ! wait_healthy "the container"; then
    "${podman_[@]}" logs "$cid" >&2 || true
    exit 1
  fi
  check_http
  cpid=$("${podman_[@]}" inspect --format '{{.State.Pid}}' "$cid")
  [ "$(uid_of "$cpid")" = 65532 ] || { echo "test-image: the container runs as UID $(uid_of "$cpid"), not 65532" >&2; exit 1; }
  echo "test-image: the container's process runs as UID 65532"
  timeout 30 "${podman_[@]}" stop -t 10 "$cid" >/dev/null
  code=$("${podman_[@]}" inspect --format '{{.State.ExitCode}}' "$cid")
  timeout 20 "${podman_[@]}" rm "$cid" >/dev/null
  cid=""
  [ "$code" = 0 ] || { echo "test-image: the sidecar exited $code on SIGTERM" >&2; exit 1; }
  echo "test-image: OK (podman: oci:$layout:$tag, stopped by SIGTERM, exit 0)"
else
  echo "test-image: no container (not root, or SIDECAR_IMAGE_RUN=binary): running the binary from the image's layer" >&2
  bin=$work/again/sidecar
  echo "test-image: $("$bin" --version)"
  "$bin" --listen "127.0.0.1:$port" --policy "$policy" >"$work/log" 2>&1 &
  pid=$!
  wait_healthy "the sidecar from the layer" || { cat "$work/log" >&2; exit 1; }
  check_http
  kill -TERM "$pid"
  for _ in $(seq 150); do alive || break; sleep 0.1; done
  if alive; then echo "test-image: the sidecar did not stop within 15 s of SIGTERM" >&2; exit 1; fi
  code=0; wait "$pid" || code=$?
  pid=""
  [ "$code" = 0 ] || { echo "test-image: the sidecar did not stop cleanly on SIGTERM ($code)" >&2; exit 1; }
  echo "test-image: OK (the layer's static binary, stopped by SIGTERM)"
fi
