#!/usr/bin/env bash
# Makes DIR a Python venv holding exactly the pinned packages: created on
# first use (needs PyPI once), reused while the pins are unchanged (a stamp,
# DIR/.pins), made anew when they change. Debian's python3 comes without
# ensurepip: python3-venv is installed from Debian when root, else named.
#
#   scripts/ensure-venv.sh DIR PACKAGE==VERSION...    then DIR/bin/python
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: ensure-venv.sh DIR PACKAGE==VERSION..." >&2
  exit 2
fi
venv=$1
shift
pins=("$@")
stamp="$venv/.pins"
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${pins[*]}" ]; then
  exit 0
fi

rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
if ! python3 -m venv "$venv" >/dev/null 2>&1; then
  rm -rf "$venv"
  echo "ensure-venv: python3 -m venv failed; installing python3-venv" >&2
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    echo "ensure-venv: install python3-venv (apt-get install python3-venv)" >&2
    exit 1
  fi
  python3 -m venv "$venv"
fi
echo "ensure-venv: installing ${pins[*]} into $venv" >&2
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}"
echo "${pins[*]}" > "$stamp"
