#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run calls exactly this): set up .venv if
# needed, lint, then pytest. The ComfyUI tier runs when a checkout is found (COMFYUI_ROOT, else
# /opt/ComfyUI) and says clearly when it is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
