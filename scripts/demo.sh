#!/usr/bin/env bash
# The main job, self-contained on CPU: set up .venv, then train a tiny task-aware MoE-LoRA (X2Edit
# recipe: experts + shared expert, task embedding, contrastive loss) on generated edit pairs with
# x2edit-train, and read the exported file back as the ComfyUI loader node does.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python scripts/demo.py "$@"
