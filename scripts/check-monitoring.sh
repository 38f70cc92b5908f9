#!/usr/bin/env bash
# Checks k8s/monitoring (PodMonitors, the PrometheusRule and its unit tests,
# the Grafana dashboards) against the code's metric catalogue, the
# Prometheus Operator's CRD schemas and promtool, in a venv of its own,
# <target>/venv-monitoring (<target>: cargo's target directory), created on
# first use (needs PyPI once). promtool is installed from Debian when
# missing (scripts/ensure-deps.sh promtool). What is checked:
# scripts/check_monitoring.py.
#
#   scripts/check-monitoring.sh     check; exits non-zero on any error
set -euo pipefail
cd "$(dirname "$0")/.."

# The same pins as check-deploy.sh's for what both use.
pins=(
  PyYAML==6.0.4
  jsonschema==4.26.0
  kubernetes-validate==1.37.0
)
TARGET_DIR=$(scripts/target-dir.sh)
export TARGET_DIR
venv=$TARGET_DIR/venv-monitoring
scripts/ensure-venv.sh "$venv" "${pins[@]}"
PROMTOOL=$(scripts/ensure-deps.sh promtool)
export PROMTOOL

PYTHONDONTWRITEBYTECODE=1 exec "$venv/bin/python" scripts/check_monitoring.py "$@"
