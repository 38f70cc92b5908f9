#!/usr/bin/env bash
# Builds the sidecar as a static binary (x86_64-unknown-linux-musl) and
# writes its container image as an OCI image layout, <target>/oci/sidecar/
# (<target>: cargo's target directory, scripts/target-dir.sh), for
# linux/amd64: one layer with the binary (/usr/local/bin/sidecar), the
# PostgreSQL migrations (/usr/share/access-sidecar/migrations/), /etc/passwd
# and /etc/group naming 65532 `nonroot`, and /tmp; the config runs the binary
# as 65532:65532 and exposes 8081 and 8082. Prints the image's manifest
# digest (what k8s/base/sidecar.yaml pins: scripts/check-deploy.sh --sync --pin).
#
#   scripts/package-sidecar.sh [--tag TAG] [--no-build]
#
# Installs what it needs (the musl target through rustup; Debian's musl-tools
# when musl-gcc is missing, for the C code of ring). The build remaps the
# checkout, cargo home, rustup home and target directory out of the binary,
# so where they are does not change it. The layout is reproducible (fixed
# tar metadata, sorted entries, gzip mtime 0): the same binary gives the same
# digest. --no-build packages the binary already built.
#
# Push: `skopeo copy oci:target/oci/sidecar:TAG docker://REGISTRY/access-layer/sidecar:TAG`
# (or `oras cp --from-oci-layout`, `crane push`); the digest stays the same.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=$(python3 -c 'import json; print(json.load(open("k8s/deploy.json"))["images"]["tag"])')
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag=$2; shift 2 ;;
    --no-build) build=""; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "package-sidecar: unknown argument $1" >&2; exit 2 ;;
  esac
done

triple=x86_64-unknown-linux-musl
target=$(scripts/target-dir.sh)
bin=$target/$triple/release-sidecar/sidecar

if [ -n "$build" ]; then
  scripts/ensure-deps.sh tools --musl
  rustup target add "$triple" >/dev/null 2>&1 || rustup target add "$triple"

  real() { (cd "$1" 2>/dev/null && pwd -P) || echo "$1"; }
  root=$(pwd -P)
  cargo_home=$(real "${CARGO_HOME:-$HOME/.cargo}")
  rustup_home=$(real "${RUSTUP_HOME:-$HOME/.rustup}")
  mkdir -p "$target"
  tdir=$(real "$target")
  # The last matching prefix wins: the target directory may lie inside the checkout.
  remap=("$cargo_home=/cargo" "$rustup_home=/rustup" "$root=/src" "$tdir=/target")
  flags=(-C target-feature=+crt-static)
  cflags=""
  for m in "${remap[@]}"; do
    flags+=("--remap-path-prefix=$m")
    cflags+=" -ffile-prefix-map=$m"
  done
  # The image's flags alone (a user's RUSTFLAGS would change the binary);
  # with --target they do not reach build scripts or proc macros.
  unset RUSTFLAGS
  CARGO_ENCODED_RUSTFLAGS=$(IFS=$'\x1f'; echo "${flags[*]}")
  export CARGO_ENCODED_RUSTFLAGS
  export CC_x86_64_unknown_linux_musl=musl-gcc
  export CFLAGS_x86_64_unknown_linux_musl="-O2${cflags}"
  start=$(date +%s)
  cargo build --profile release-sidecar --locked --target "$triple" -p sidecar
  echo "package-sidecar: cargo build (musl) took $(( $(date +%s) - start )) s" >&2
fi

if [ ! -f "$bin" ]; then
  echo "package-sidecar: $bin missing; run scripts/package-sidecar.sh without --no-build" >&2
  exit 1
fi
read -r version source < <(cargo metadata --no-deps --format-version 1 --offline | python3 -c '
import json, sys
p = next(p for p in json.load(sys.stdin)["packages"] if p["name"] == "sidecar")
print(p["version"], p.get("repository") or "")')
python3 scripts/oci_layout.py sidecar "$target/oci/sidecar" "$bin" sidecar/migrations \
  --tag "$tag" --version "$version" --source "$source"
