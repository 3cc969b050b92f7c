"""Shipped configs parse; the benchmarks run end to end at toy size."""

import glob
import os

import pytest
import yaml
from conftest import ROOT

from train.config import load_yaml, make_config, parse_config
from x2edit_core.errors import ConfigError


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "train", "configs", "*.yaml"))))
def test_example_run_configs_parse(path):
    cfg = make_config(**load_yaml(path))
    assert cfg.preset in ("icedit", "x2edit") and cfg.rank > 0


def test_accelerate_configs_are_valid_yaml():
    paths = sorted(glob.glob(os.path.join(ROOT, "train", "accelerate_configs", "*.yaml")))
    kinds = {yaml.safe_load(open(p))["distributed_type"] for p in paths}
    assert kinds == {"NO", "MULTI_GPU", "DEEPSPEED", "FSDP"}


def test_precedence_preset_yaml_flags(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("preset: x2edit\nrank: 8\nlearning_rate: 0.001\ndata: [a.jsonl]\n")
    cfg = parse_config(["--config", str(p), "--rank", "16"])
    assert (cfg.rank, cfg.alpha, cfg.learning_rate, cfg.num_experts, cfg.top_k) == (16, 16.0, 0.001, 12, 2)
    assert cfg.contrastive_weight == 0.2 and cfg.shared_expert == "yes"
    p.write_text("preset: x2edit\nbogus_option: 1\n")
    with pytest.raises(ConfigError, match="bogus_option"):
        parse_config(["--config", str(p)])
    with pytest.raises(ConfigError, match="custom preset"):
        make_config(preset="custom")


def test_train_step_benchmark_runs():
    from benchmarks.train_step import main

    rows = main(
        [
            "--width",
            "32",
            "--heads",
            "2",
            "--double",
            "1",
            "--single",
            "1",
            "--tokens",
            "32",
            "--text-tokens",
            "4",
            "--text-dim",
            "16",
            "--steps",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "1",
        ]
    )
    assert [r[0] for r in rows] == ["icedit", "x2edit"] and all(r[6] > 0 and len(r[7]) == 1 for r in rows)
    assert rows[1][1] == 64 * 3  # x2edit active rank: top-2 + shared


def test_synthetic_suite_runs():
    from benchmarks.synthetic_tasks import main

    result = main(
        [
            "--steps",
            "2",
            "--train-per-task",
            "2",
            "--held-per-task",
            "1",
            "--probe-per-task",
            "2",
            "--batch",
            "4",
            "--sample-steps",
            "2",
            "--seeds",
            "0",
            "1",
            "--only",
            "x2edit",
            "plain LoRA",
        ]
    )
    rows = result["rows"]
    assert [(r["model"], r["seed"]) for r in rows] == [
        ("x2edit", 0),
        ("plain LoRA", 0),
        ("x2edit", 1),
        ("plain LoRA", 1),
    ]
    assert abs(rows[0]["params"] - rows[1]["params"]) / rows[0]["params"] < 0.1
    assert set(rows[0]["purity"]) == {5, 11, 12, 7} and rows[1]["purity"] == {}
    assert rows[0]["err_before"] != rows[2]["err_before"]  # each seed has its own data and base model
    summary = result["summary"]
    assert len(summary["edit_error"]["paired"]) == 2 and len(summary["contrastive"]["drops"]) == 2
