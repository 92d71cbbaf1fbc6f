#!/usr/bin/env bash
# Install what fedkube needs on a fresh Debian/Ubuntu machine, idempotently:
#   - redis-server (Debian package), used by `fedkube run` and the integration tests
#   - a virtual environment in .venv with fedkube (editable) and its dev tools
# pip keeps its wheel cache in ~/.cache/pip, so a second run is fast.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

if ! command -v redis-server >/dev/null; then
  echo "setup: installing redis-server"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  if ! "$PY" -m venv .venv 2>/dev/null; then
    # Debian's system Python ships venv separately.
    rm -rf .venv
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    "$PY" -m venv .venv
  fi
fi

# Strict editable mode: a link tree under build/ maps core/, aggregator/,
# workers/ and operator/ to fedkube.*; it must be rebuilt when files are added
# or removed, so the stamp records the list of package files.
files=$(find core aggregator workers operator -name '*.py' | sort | sha256sum | cut -c1-16)
stamp=.venv/.fedkube-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing fedkube and its dependencies into .venv (torch is large; cached after the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]' --config-settings editable_mode=strict
  echo "$files" > "$stamp"
elif [ "$(cat "$stamp")" != "$files" ]; then
  echo "setup: package files changed; relinking the editable install"
  .venv/bin/python -m pip install -q --no-deps -e . --config-settings editable_mode=strict
  echo "$files" > "$stamp"
fi
echo "setup: ready (.venv/bin/fedkube)"
