"""scripts/gpu_check.sh: a clear failure without a GPU, and its Python parts at toy size on CPU."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env.pop("COMFYUI_ROOT", None)
    return env


def test_without_cuda_it_fails_at_once_with_the_reason():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the no-GPU failure cannot be shown here")
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr
    assert "== 2." not in proc.stdout  # nothing else ran


def test_training_steps_run_at_toy_size_on_cpu():
    from scripts.gpu_check import main

    assert main(["train-steps", "--cpu", "--presets", "icedit", "x2edit"]) == 0
