#!/usr/bin/env bash
# Validates the deployment files (envoy/envoy.yaml, k8s/) in a venv of its
# own, target/venv-deploy, created on first use (needs PyPI once; reused
# while the pins below are unchanged). What is checked: scripts/check_deploy.py.
#
#   scripts/check-deploy.sh                 check; exits non-zero on any error
#   scripts/check-deploy.sh --sync          regenerate k8s' generated files first
#   scripts/check-deploy.sh --sync --pin    ... taking the image digests from
#                                           target/oci (scripts/package-oci.sh)
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
venv=target/venv-deploy
stamp="$venv/.pins"

if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]; then
  rm -rf "$venv"
  mkdir -p target
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian's python3 comes without ensurepip; python3-venv brings it.
    rm -rf "$venv"
    echo "check-deploy: python3 -m venv failed; installing python3-venv" >&2
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
      echo "check-deploy: install python3-venv (apt-get install python3-venv)" >&2
      exit 1
    fi
    python3 -m venv "$venv"
  fi
  echo "check-deploy: installing ${pins[*]} into $venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}"
  echo "${pins[*]}" > "$stamp"
fi

PYTHONDONTWRITEBYTECODE=1 exec "$venv/bin/python" scripts/check_deploy.py "$@"
