#!/usr/bin/env bash
# A separate virtual environment with Flower's simulation engine, for
# benchmarks/vs_flower.py (benchmarks/flower_side.py runs in it). Flower is not a
# dependency of fedkube, and flwr[simulation] pins its own ray, so it lives
# apart from .venv, in .cache/flower-venv (git-ignored). Idempotent: does
# nothing when the venv already has this Flower version. pip keeps its wheel
# cache in ~/.cache/pip, so a rebuild is fast.
set -euo pipefail
cd "$(dirname "$0")/.."

FLWR_VERSION=1.42.0
VENV=.cache/flower-venv
PY=${PYTHON:-python3}

if [ -x "$VENV/bin/python" ] && [ -f "$VENV/.flwr-installed" ] \
  && [ "$(cat "$VENV/.flwr-installed")" = "$FLWR_VERSION" ]; then
  echo "flower-venv: ready ($VENV, flwr $FLWR_VERSION)"
  exit 0
fi

mkdir -p .cache
if [ ! -x "$VENV/bin/python" ]; then
  echo "flower-venv: creating $VENV"
  "$PY" -m venv "$VENV"
fi
echo "flower-venv: installing flwr[simulation]==$FLWR_VERSION into $VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "flwr[simulation]==$FLWR_VERSION" numpy psutil
echo "$FLWR_VERSION" > "$VENV/.flwr-installed"
echo "flower-venv: ready ($VENV, flwr $FLWR_VERSION)"
