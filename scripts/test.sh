#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run calls exactly this).
# Sets up .venv if needed (CPU torch 2.13.0 first, so nothing pulls a CUDA build), then lints and runs
# pytest. The ComfyUI tier runs when a checkout is found (COMFYUI_ROOT, else /opt/ComfyUI) and says
# clearly when it is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.x2edit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -c <(echo torch==2.13.0) -e ".[train,dev]"
  touch "$stamp"
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
