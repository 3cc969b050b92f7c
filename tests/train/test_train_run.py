"""End-to-end runs: each preset, the CLI, two processes, kill-and-resume, bad data."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from tiny import make_manifest, tiny_transformer, tiny_vae

from train.config import make_config
from train.trainer import Trainer
from x2edit_core.formats import load_adapters

COMMON = dict(
    resolution=32, text_encoder="hash", rank=4, num_experts=4, plain_rank=4, progress=False, log_every=1
)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    return env


def _yaml(tiny_dir, path, **extra):
    import yaml

    cfg = {
        "transformer": tiny_dir["transformer"],
        "vae": tiny_dir["vae"],
        "data": [tiny_dir["manifest"]],
        **{k: v for k, v in COMMON.items()},
        **extra,
    }
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh)
    return str(path)


def _metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.parametrize("preset", ["icedit", "x2edit", "custom"])
def test_preset_trains_and_exports(tmp_path, tiny_dir, preset):
    extra = {}
    if preset == "custom":
        extra = dict(
            moe_targets=["single_transformer_blocks.*.proj_mlp"],
            plain_targets=["x_embedder"],
            router="token",
            gradient_accumulation_steps=2,
        )
    cfg = make_config(
        preset=preset,
        data=[tiny_dir["manifest"]],
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        batch_size=4,
        checkpoint_every=2,
        keep_last=1,
        usage_every=1,
        sample_every=3,
        sample_steps=2,
        learning_rate=1e-2,
        **COMMON,
        **extra,
    )
    trainer = Trainer(cfg, transformer=tiny_transformer(), vae=tiny_vae())
    result = trainer.run()
    hist = result["history"]
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert ("usage" in hist[0]) and hist[0]["usage"].sum() > 0
    if preset == "x2edit":
        assert any(h["contrastive"] > 0 for h in hist)
    else:
        assert all(h["contrastive"] == 0 for h in hist)
    loaded = load_adapters(result["output"])
    assert loaded.format == "x2edit_moe_lora" and loaded.metadata["x2edit.preset"] == preset
    assert any(a.moe.lora_B.abs().sum() > 0 for a in loaded.moe)  # it trained
    ckpts = os.listdir(tmp_path / "out" / "checkpoints")
    assert ckpts == ["step-00000003"]  # keep_last=1, atomic renames leave no .tmp
    assert os.listdir(tmp_path / "out" / "samples") == ["step-00000003.png"]
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "out" / "logs"))


def test_cli_help_lists_every_option():
    out = subprocess.run(
        [sys.executable, "-m", "train", "--help"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in (
        "--preset",
        "--contrastive-weight",
        "--checkpoint-every",
        "--keep-last",
        "--resume",
        "--max-bad-fraction",
    ):
        assert flag in out


def test_cli_yaml_with_flag_override(tmp_path, tiny_dir):
    cfg = _yaml(tiny_dir, tmp_path / "run.yaml", preset="icedit", max_steps=5, batch_size=2)
    out = str(tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--config", cfg, "--max-steps", "2", "--output-dir", out],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    assert os.path.isfile(os.path.join(out, "x2edit_moe_lora.safetensors"))


def test_cli_reports_too_much_bad_data(tmp_path, tiny_dir):
    manifest = make_manifest(str(tmp_path / "data"), n=4, bad=2)
    cfg = _yaml(tiny_dir, tmp_path / "run.yaml", preset="icedit", max_steps=4, batch_size=2, data=[manifest])
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--config", cfg, "--output-dir", str(tmp_path / "o1")],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "max_bad_fraction" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--config",
            cfg,
            "--output-dir",
            str(tmp_path / "o2"),
            "--max-bad-fraction",
            "0.5",
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "o2" / "train.log") as fh:
        assert "bad records skipped" in fh.read()


def test_two_processes_gather_the_contrastive_loss(tmp_path, tiny_dir):
    """2 processes x batch 2 give the same first-step losses as 1 process x batch 4: same global batch, and
    each process's positives/negatives include the other process's samples."""
    cfg = _yaml(tiny_dir, tmp_path / "run.yaml", preset="x2edit", max_steps=2, batch_size=2, cpu=True)
    out2 = str(tmp_path / "two")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29561",
            "-m",
            "train",
            "--config",
            cfg,
            "--output-dir",
            out2,
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out2, "train.log")) as fh:
        assert "2 processes" in fh.read()
    two = _metrics(out2)
    single = make_config(
        preset="x2edit",
        data=[tiny_dir["manifest"]],
        output_dir=str(tmp_path / "one"),
        max_steps=1,
        batch_size=4,
        checkpoint_every=0,
        **COMMON,
    )
    one = Trainer(single, transformer=tiny_transformer(), vae=tiny_vae()).run()["history"]
    assert two[0]["contrastive"] > 0
    assert two[0]["contrastive"] == pytest.approx(one[0]["contrastive"], rel=1e-5)
    assert two[0]["flow"] == pytest.approx(one[0]["flow"], rel=1e-5)
    assert load_adapters(os.path.join(out2, "x2edit_moe_lora.safetensors")).task_embedding is not None


def test_sigkill_and_resume_reach_the_same_loss(tmp_path, tiny_dir):
    cfg = _yaml(
        tiny_dir, tmp_path / "run.yaml", preset="x2edit", batch_size=2, keep_last=100, learning_rate=3e-3
    )
    base = [sys.executable, "-m", "train", "--config", cfg]
    full = str(tmp_path / "full")
    proc = subprocess.run(
        base + ["--output-dir", full, "--max-steps", "6", "--checkpoint-every", "3"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    killed = str(tmp_path / "killed")
    ckpt = os.path.join(killed, "checkpoints", "step-00000003")
    victim = subprocess.Popen(
        base + ["--output-dir", killed, "--max-steps", "100000", "--checkpoint-every", "3"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not os.path.isfile(os.path.join(ckpt, "state.json")):
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    before = len(_metrics(killed))
    proc = subprocess.run(
        base + ["--output-dir", killed, "--max-steps", "6", "--resume", ckpt],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = _metrics(killed)[before:]
    assert [m["step"] for m in resumed] == [4, 5, 6]
    want = {m["step"]: m for m in _metrics(full)}
    for m in resumed:
        assert m["loss"] == pytest.approx(want[m["step"]]["loss"], rel=1e-5, abs=1e-7)
        assert m["contrastive"] == pytest.approx(want[m["step"]]["contrastive"], rel=1e-5, abs=1e-7)
    a = load_adapters(os.path.join(full, "x2edit_moe_lora.safetensors"))
    b = load_adapters(os.path.join(killed, "x2edit_moe_lora.safetensors"))
    for x, y in zip(a.moe, b.moe):
        assert torch.allclose(x.moe.lora_B.float(), y.moe.lora_B.float(), atol=1e-2)
