#!/usr/bin/env bash
# Create or update the project's .venv: CPU torch 2.13.0 first (so nothing pulls a multi-GB CUDA build),
# then the package in editable mode with its training and dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.x2edit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -c <(echo torch==2.13.0) -e ".[train,dev]"
  touch "$stamp"
fi
