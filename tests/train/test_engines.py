"""Engines: FSDP (two CPU processes over gloo) against one process, and a DeepSpeed ZeRO-2 dry run."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from tiny import tiny_transformer, tiny_vae

from train.config import make_config
from train.trainer import Trainer
from x2edit_core.formats import load_adapters

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(ROOT, "train", "accelerate_configs")
COMMON = dict(
    preset="x2edit",
    # The contrastive term's gradient is compared across process counts in test_train_run.py; here it
    # stays off so that the two runs follow the same maths whatever that term's gradient convention.
    contrastive_weight=0.0,
    resolution=32,
    text_encoder="hash",
    rank=4,
    num_experts=4,
    progress=False,
    log_every=1,
    max_steps=2,
    checkpoint_every=1,
    keep_last=5,
    save_dtype="float32",
    learning_rate=1e-2,
    adam_eps=1e-3,  # Adam's update near a zero gradient scales rounding differences by 1/eps
    num_workers=0,
    tensorboard=False,
)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    return env


def test_fsdp_two_processes_export_equal_one_process(tmp_path, tiny_dir):
    """FSDP2 shards every block over two processes; the exported adapter, the checkpoint's adapter
    tensors and the losses equal a one-process run on the same global batches, and the preview is
    sampled with the sharded model."""
    import yaml

    cfg = {
        "transformer": tiny_dir["transformer"],
        "vae": tiny_dir["vae"],
        "data": [tiny_dir["manifest"]],
        "batch_size": 2,
        "cpu": True,
        "sample_every": 2,
        "sample_steps": 2,
        **COMMON,
    }
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(cfg))
    out2 = str(tmp_path / "fsdp")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29571",
            os.path.join(HERE, "engine_entry.py"),
            os.path.join(CONFIGS, "fsdp.yaml"),
            "--",
            "--config",
            str(run_yaml),
            "--output-dir",
            out2,
            "--mixed-precision",
            "no",
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isdir(os.path.join(out2, "checkpoints", "step-00000001", "engine"))  # sharded state
    assert os.listdir(os.path.join(out2, "samples")) == ["step-00000002.png"]
    import json

    single = make_config(
        **{**cfg, "batch_size": 4, "cpu": False, "sample_every": 0, "output_dir": str(tmp_path / "one")}
    )
    one = Trainer(single, transformer=tiny_transformer(), vae=tiny_vae()).run()

    with open(os.path.join(out2, "metrics.jsonl")) as fh:
        two = [json.loads(line) for line in fh]
    for a, b in zip(one["history"], two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert len(two) == len(one["history"]) == 2
    x = load_adapters(one["output"])
    y = load_adapters(os.path.join(out2, "x2edit_moe_lora.safetensors"))
    assert len(x.moe) == len(y.moe) > 0 and any(a.moe.lora_B.abs().sum() > 0 for a in y.moe)
    for a, b in zip(x.moe, y.moe):
        assert a.module == b.module
        for name in ("lora_A", "lora_B", "router_weight", "shared_A", "shared_B"):
            assert torch.allclose(getattr(a.moe, name), getattr(b.moe, name), atol=1e-5, rtol=1e-4), name
    assert torch.allclose(x.task_embedding, y.task_embedding, atol=1e-5, rtol=1e-4)
    ca = load_file(os.path.join(tmp_path, "one", "checkpoints", "step-00000001", "adapters.safetensors"))
    cb = load_file(os.path.join(out2, "checkpoints", "step-00000001", "adapters.safetensors"))
    assert ca.keys() == cb.keys()
    assert all(torch.allclose(ca[k], cb[k], atol=1e-5, rtol=1e-4) for k in ca)


def _run_yaml(tmp_path, tiny_dir, **extra):
    import yaml

    cfg = {"transformer": tiny_dir["transformer"], "vae": tiny_dir["vae"], "data": [tiny_dir["manifest"]]}
    cfg.update(COMMON, **extra)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), cfg


def test_deepspeed_zero2_dry_run(tmp_path, tiny_dir):
    """The shipped ZeRO-2 config wraps the model in a DeepSpeed engine (one CPU process: accelerate
    does not run DeepSpeed over several CPU processes), trains, checkpoints through the engine and
    exports what a plain run exports."""
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the engine is unavailable here
        reason = f"deepspeed does not import on this machine ({type(e).__name__}: {e})"
        print(f"skipped: {reason}")
        pytest.skip(reason)
    run_yaml, cfg = _run_yaml(tmp_path, tiny_dir, batch_size=4)
    out = str(tmp_path / "ds")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29573"]
    cmd += [os.path.join(HERE, "engine_entry.py"), os.path.join(CONFIGS, "deepspeed_zero2.yaml"), "--"]
    cmd += ["--config", run_yaml, "--output-dir", out, "--mixed-precision", "no"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    engine = os.path.join(out, "checkpoints", "step-00000001", "engine")
    assert any("optim_states" in f for _, _, files in os.walk(engine) for f in files)  # ZeRO's own files
    plain = Trainer(
        make_config(**{**cfg, "output_dir": str(tmp_path / "plain")}),
        transformer=tiny_transformer(),
        vae=tiny_vae(),
    ).run()
    import json

    with open(os.path.join(out, "metrics.jsonl")) as fh:
        ds = [json.loads(line) for line in fh]
    assert [m["loss"] for m in ds] == pytest.approx([h["loss"] for h in plain["history"]], rel=1e-5)
    x = load_adapters(plain["output"])
    y = load_adapters(os.path.join(out, "x2edit_moe_lora.safetensors"))
    for a, b in zip(x.moe, y.moe):
        assert torch.allclose(a.moe.lora_B, b.moe.lora_B, atol=1e-5, rtol=1e-4)
