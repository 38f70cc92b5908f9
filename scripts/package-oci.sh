#!/usr/bin/env bash
# Packages each built filter (<target>/wasm32-wasip1/release/<name>.wasm,
# <target> being cargo's target directory: scripts/target-dir.sh) as an
# OCI image layout directory, <target>/oci/<name>/ (oci-layout, index.json,
# blobs/sha256/...), in the Wasm image "compat" format Istio pulls: one
# application/vnd.oci.image.layer.v1.tar+gzip layer holding plugin.wasm.
# Prints each image's manifest digest (the sha256 that WasmPlugin,
# TrafficExtension and the EnvoyFilter's remote code take for an oci:// url)
# and the module's own sha256. Offline: bash and python3 only.
#
#   scripts/package-oci.sh [--tag TAG] [name ...]   (default: the four filters)
#
# Push with any OCI tool, e.g. `oras cp --from-oci-layout target/oci/auth:TAG
# REGISTRY/access-layer/auth:TAG`, `skopeo copy oci:target/oci/auth:TAG
# docker://REGISTRY/access-layer/auth:TAG` or `crane push target/oci/auth
# REGISTRY/access-layer/auth:TAG`; the digest stays the same.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=$(python3 -c 'import json; print(json.load(open("k8s/deploy.json"))["images"]["tag"])')
names=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) names+=("$1"); shift ;;
  esac
done
[ ${#names[@]} -gt 0 ] || names=(usage auth entitlements ratelimit)

target=$(scripts/target-dir.sh)
specs=()
for n in "${names[@]}"; do
  wasm=$target/wasm32-wasip1/release/$n.wasm
  if [ ! -f "$wasm" ]; then
    echo "package-oci: $wasm missing; run scripts/build-filters.sh first" >&2
    exit 1
  fi
  specs+=("$n=$wasm")
done
python3 scripts/oci_layout.py pack "$target/oci" "${specs[@]}" --tag "$tag"
