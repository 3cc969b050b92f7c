#!/usr/bin/env bash
# The CUDA paths in one command (one NVIDIA GPU, about 5 minutes on an H200, under 8):
#   1. the device and the Python packages (exit 2 at once when torch sees no CUDA device);
#   2. a bf16 training step of each preset with gradient checkpointing at FLUX width, every routed MoE
#      layer under torch.cuda.set_sync_debug_mode("error") (scripts/gpu_check.py train-steps);
#   3. MoE forward ratios in bf16 at FLUX widths, each routed case first run under sync debug mode
#      "error" (benchmarks/moe_forward.py --device cuda);
#   4. training step time of each preset against a peft LoRA of the same active rank, bf16
#      (benchmarks/train_step.py --device cuda);
#   5. the ComfyUI tier's loader tests (tests/comfy/test_moe_loader.py) with ComfyUI on the GPU.
# Every figure is printed; the exit status is non-zero when a step failed.
#
# Usage: bash scripts/gpu_check.sh [--cpu] [--wheels DIR]
#   PYTHON        interpreter with CUDA torch, diffusers, accelerate, peft, pytest (default: .venv/bin/python
#                 when its torch sees a GPU, else python3)
#   --wheels DIR  install the wheels in DIR (e.g. diffusers, which GPU images often lack) into a private
#                 folder first, without the network
#   COMFYUI_ROOT  a ComfyUI checkout for step 5; its Python is COMFYUI_PYTHON (default
#                 COMFYUI_ROOT/.venv/bin/python, else PYTHON) and needs CUDA torch and ComfyUI's
#                 requirements (the same --wheels folder may bring them). Without a usable one step 5
#                 is skipped and the reason printed.
#   --cpu         run steps 2-4 at toy size on CPU (checks this script's plumbing; no GPU needed).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

CPU=0
WHEELS=${X2EDIT_WHEELS:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --wheels) WHEELS=$2; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 64 ;;
  esac
  shift
done

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

has_torch() { "$1" -c 'import torch' 2>/dev/null; }

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in .venv/bin/python python3; do
    command -v "$cand" >/dev/null || continue
    if has_cuda "$cand" || { [ $CPU = 1 ] && has_torch "$cand"; }; then PY=$cand; break; fi
  done
  if [ -z "$PY" ]; then
    echo "== 1. device"
    for cand in .venv/bin/python python3; do
      command -v "$cand" >/dev/null || continue
      echo "  $cand: $("$cand" -c 'import torch; print("torch", torch.__version__, "cuda available:", torch.cuda.is_available())' 2>/dev/null || echo "no torch")"
    done
    echo "gpu_check: FAILED: no CUDA device (no Python here has a torch that sees one). Run this on a machine with an" \
      "NVIDIA GPU, set PYTHON to an interpreter with CUDA torch, or use --cpu for the toy run." >&2
    exit 2
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$WHEELS" ]; then
  SITE=/tmp/x2edit-gpu-check-site
  echo "== installing the wheels in $WHEELS into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$ROOT:$SITE"
fi
export PYTHONUNBUFFERED=1

echo "== 1. device"
if [ $CPU = 1 ]; then
  "$PY" scripts/gpu_check.py env
  echo "(--cpu: continuing without a GPU, toy sizes)"
else
  "$PY" scripts/gpu_check.py env
  rc=$?
  if [ $rc = 2 ]; then
    echo "gpu_check: FAILED: no CUDA device. Run this on a machine with an NVIDIA GPU (or --cpu for the toy run)." >&2
    exit 2
  fi
  [ $rc = 0 ] || { echo "gpu_check: FAILED: the environment is incomplete (see above)" >&2; exit 1; }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
fi

declare -a RESULTS
run_step() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo
  echo "== $name"
  timeout "$limit" "$@"
  local rc=$?
  local verdict=ok
  if [ $rc = 3 ]; then  # the benchmarks' status for a ratio over its target: a figure, not a crash
    verdict="ran; some ratios missed their targets (see above)"
    [ $CPU = 1 ] && verdict="ran (toy size: the targets do not apply)"
  elif [ $rc != 0 ]; then
    verdict="FAILED (exit $rc$([ $rc = 124 ] && echo ", over ${limit}s"))"
  fi
  RESULTS+=("$name: $verdict, $((SECONDS - t0)) s")
}

if [ $CPU = 1 ]; then
  run_step "2. training steps (toy, CPU)" 300 "$PY" scripts/gpu_check.py train-steps --cpu
  run_step "3. MoE forward ratios (CPU, few tokens)" 300 \
    "$PY" benchmarks/moe_forward.py --tokens 32 --repeats 1 --skip-memory
  run_step "4. training step vs peft (toy, CPU)" 300 "$PY" benchmarks/train_step.py --width 32 --heads 2 \
    --double 1 --single 1 --tokens 32 --text-tokens 4 --text-dim 16 --steps 1 --rounds 1 --warmup 1
else
  run_step "2. bf16 training steps with gradient checkpointing" 150 "$PY" scripts/gpu_check.py train-steps
  run_step "3. MoE forward ratios, bf16, sync debug mode 'error'" 120 \
    "$PY" benchmarks/moe_forward.py --device cuda --dtype bfloat16 --tokens 8192 --repeats 20 --skip-memory
  run_step "4. training step vs peft LoRA, bf16" 150 "$PY" benchmarks/train_step.py --device cuda \
    --dtype bfloat16 --width 3072 --heads 24 --double 2 --single 4 --tokens 2048 --text-tokens 512 \
    --text-dim 4096 --batch 2 --rounds 5 --steps 3
fi

echo
echo "== 5. ComfyUI tier loader tests on the GPU"
skip=""
if [ $CPU = 1 ]; then
  skip="--cpu run"
elif [ -z "${COMFYUI_ROOT:-}" ]; then
  skip="COMFYUI_ROOT is not set (a ComfyUI checkout whose Python has CUDA torch and ComfyUI's requirements)"
else
  CPY=${COMFYUI_PYTHON:-$COMFYUI_ROOT/.venv/bin/python}
  [ -x "$CPY" ] || CPY=$PY
  if [ ! -f "$COMFYUI_ROOT/main.py" ]; then
    skip="$COMFYUI_ROOT has no main.py"
  elif ! has_cuda "$CPY"; then
    skip="ComfyUI's Python $CPY has no CUDA torch"
  elif ! (cd "$COMFYUI_ROOT" && "$CPY" -c 'import comfy.model_management' >/dev/null 2>&1); then
    skip="ComfyUI's Python $CPY lacks ComfyUI's requirements (import comfy.model_management failed)"
  fi
fi
if [ -n "$skip" ]; then
  echo "skipped: $skip"
  RESULTS+=("5. ComfyUI tier on the GPU: skipped ($skip)")
else
  COMFYUI_PYTHON=$CPY X2EDIT_COMFYUI_GPU=1 X2EDIT_REQUIRE_COMFYUI=1 \
    run_step "5. ComfyUI tier loader tests on the GPU" 200 "$PY" -m pytest -q -rs tests/comfy/test_moe_loader.py
fi

echo
echo "== summary ($SECONDS s)"
failed=0
for r in "${RESULTS[@]}"; do
  echo "  $r"
  case "$r" in *FAILED*) failed=1 ;; esac
done
exit $failed
