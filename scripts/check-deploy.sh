#!/usr/bin/env bash
# Validates the deployment files (envoy/envoy.yaml, k8s/) in a venv of its
# own, <target>/venv-deploy (<target>: cargo's target directory), created on
# first use (needs PyPI once; reused
# while the pins below are unchanged). What is checked: scripts/check_deploy.py.
#
#   scripts/check-deploy.sh                 check; exits non-zero on any error
#   scripts/check-deploy.sh --sync          regenerate k8s' generated files first
#   scripts/check-deploy.sh --sync --pin    ... taking the image digests from
#                                           <target>/oci (scripts/package-oci.sh)
#   scripts/check-deploy.sh --envoy FILE    check FILE instead of envoy/envoy.yaml
set -euo pipefail
cd "$(dirname "$0")/.."

# envoy-data-plane: Envoy's v3 API as betterproto2 classes (strict parsing);
# betterproto2 and pydantic pinned because the strict parser wraps
# betterproto2 internals; kubernetes-validate ships Kubernetes' JSON schemas
# (offline); jsonschema for the Istio CRDs' openAPIV3Schema.
pins=(
  envoy-data-plane==2.2.0
  betterproto2==0.9.1
  pydantic==2.14.4
  PyYAML==6.0.4
  jsonschema==4.26.0
  kubernetes-validate==1.37.0
)
# Cargo's target directory (CARGO_TARGET_DIR, a cargo config, or target/):
# the venv and the OCI layouts live there; check_deploy.py reads TARGET_DIR.
TARGET_DIR=$(scripts/target-dir.sh)
export TARGET_DIR
venv=$TARGET_DIR/venv-deploy
scripts/ensure-venv.sh "$venv" "${pins[@]}"

PYTHONDONTWRITEBYTECODE=1 exec "$venv/bin/python" scripts/check_deploy.py "$@"
