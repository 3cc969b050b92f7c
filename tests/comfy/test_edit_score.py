"""X2Edit Edit Score on the real ComfyUI server: a judge scores a batch of edits, which comes back
sorted best first, with the scripted judge (known quality), the served judge and failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfy_harness import ComfyExecutionError, ComfyValidationError
from safetensors.torch import load_file
from vlm_fixtures import FakeChatServer, ScriptedReply, chat_reply

INSTRUCTION = "make it brighter"


def score_prompt(
    judge_node: dict, *, batch: int = 4, judge_view: str = "whole", prefix: str = "es/run"
) -> dict:
    """Edits "1" (a batch of noise images), source "2", judge "3", the score node "4" and "5" saving
    the sorted batch; "6" previews the report."""
    return {
        "1": {
            "class_type": "X2EditTestNoiseImage",
            "inputs": {"width": 48, "height": 32, "batch_size": batch, "seed": 7},
        },
        "2": {
            "class_type": "X2EditTestNoiseImage",
            "inputs": {"width": 40, "height": 40, "batch_size": 1, "seed": 8},
        },
        "3": judge_node,
        "4": {
            "class_type": "X2EditEditScore",
            "inputs": {
                "images": ["1", 0],
                "source_image": ["2", 0],
                "instruction": INSTRUCTION,
                "judge": ["3", 0],
                "judge_view": judge_view,
            },
        },
        "5": {
            "class_type": "X2EditTestSaveTensors",
            "inputs": {"filename_prefix": f"{prefix}_sorted", "image": ["4", 0]},
        },
        "7": {
            "class_type": "X2EditTestSaveTensors",
            "inputs": {"filename_prefix": f"{prefix}_input", "image": ["1", 0]},
        },
    }


def scripted_judge(prefer: str) -> dict:
    return {"class_type": "X2EditTestScriptedJudge", "inputs": {"prefer": prefer}}


def served_judge(base_url: str) -> dict:
    return {
        "class_type": "X2EditServedJudge",
        "inputs": {
            "base_url": base_url,
            "model": "tiny-judge",
            "api_key_env": "",
            "timeout": 30.0,
            "retries": 0,
            "max_image_side": 256,
            "prompt": "",
        },
    }


def brightness(image: torch.Tensor) -> float:
    """The scripted judge's quality: the image as 8-bit RGB, averaged."""
    return float((np.clip(image.numpy(), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).astype(np.float64).mean())


def saved(comfy, entry, node_id: str) -> torch.Tensor:
    (path,) = comfy.output_files(entry, node_id=node_id, kind="tensors")
    return load_file(path)["image"]


def test_edit_score_node_listed(comfy):
    spec = comfy.object_info("X2EditEditScore")
    assert spec["output"] == ["IMAGE", "FLOAT", "INT", "STRING"]
    assert spec["output_is_list"] == [False, True, True, False]
    assert spec["input"]["required"]["judge"][0] == "X2EDIT_JUDGE"
    assert spec["display_name"] == "X2Edit Edit Score"
    for node in ("X2EditEditScore", "X2EditEarlyFilterAdvanced", "X2EditEarlyFilter"):
        inputs = comfy.object_info(node)["input"]
        for name, entry in {**inputs["required"], **inputs.get("optional", {})}.items():
            assert entry[1].get("tooltip"), f"{node} input {name} has no tooltip"


@pytest.mark.parametrize("prefer", ["brighter", "darker"])
def test_scripted_judge_sorts_the_batch_best_first(comfy, prefer):
    entry = comfy.run(score_prompt(scripted_judge(prefer), prefix=f"es/{prefer}"))
    edits, ranked = saved(comfy, entry, "7"), saved(comfy, entry, "5")
    values = [brightness(edits[i]) for i in range(edits.shape[0])]
    assert len(set(values)) == 4, "the edits should differ"
    order = sorted(range(4), key=lambda i: -values[i] if prefer == "brighter" else values[i])
    torch.testing.assert_close(ranked, edits[order], atol=0, rtol=0)
    report = entry["outputs"]["4"]["text"][0]
    assert "Judge calls: 4, unusable answers: 0, judge errors: 0" in report
    lines = [line for line in report.splitlines() if line[:2] in ("1.", "2.", "3.", "4.")]
    assert [int(line.split()[2].rstrip(":")) for line in lines] == order
    best = values[order[0]] / 25.5
    assert f"O {(best if prefer == 'brighter' else 10 - best):.2f}" in lines[0]


def test_served_judge_scores_and_unusable_answers_sort_last(comfy):
    replies = [
        chat_reply('{"SC": [4, 6], "PQ": 9, "reason": "weak"}'),
        chat_reply("no idea"),
        chat_reply("SC: 9\nPQ: 8\nstrong edit"),
        chat_reply("score 5/10"),
    ]
    with FakeChatServer(replies) as server:
        entry = comfy.run(score_prompt(served_judge(server.base_url), prefix="es/served"))
        requests = list(server.requests)
    assert len(requests) == 4
    parts = requests[0].body["messages"][0]["content"]
    assert [p["text"] for p in parts if p["type"] == "text"][:2] == ["Source image:", "Edited image:"]
    assert INSTRUCTION in parts[-1]["text"] and '"SC"' in parts[-1]["text"]
    edits, ranked = saved(comfy, entry, "7"), saved(comfy, entry, "5")
    torch.testing.assert_close(ranked, edits[[2, 0, 3, 1]], atol=0, rtol=0)
    report = entry["outputs"]["4"]["text"][0]
    assert "1. edit 2: O 8.49 (SC 9, PQ 8)" in report
    assert "2. edit 0: O 6.00 (SC 4, PQ 9): weak" in report
    assert "3. edit 3: O 5.00: score 5/10" in report
    assert "4. edit 1: unusable answer: 'no idea'" in report
    assert report.startswith("WARNING: unusable judge answer (edit 1), left unscored: 'no idea'")


def test_every_call_failing_stops_with_the_server_message(comfy):
    with FakeChatServer([ScriptedReply(500, {"error": {"message": "model overloaded"}})]) as server:
        with pytest.raises(
            ComfyExecutionError,
            match="No scoring call to served judge tiny-judge.*gave a usable score.*model overloaded",
        ):
            comfy.run(score_prompt(served_judge(server.base_url), batch=2, prefix="es/fail"))


def test_an_empty_instruction_is_refused_at_queue_time(comfy):
    prompt = score_prompt(scripted_judge("brighter"), prefix="es/empty")
    prompt["4"]["inputs"]["instruction"] = "  "
    with pytest.raises(ComfyValidationError, match="instruction is empty"):
        comfy.run(prompt)


def test_per_edit_sources_and_right_panel_view(comfy):
    prompt = score_prompt(scripted_judge("brighter"), batch=3, judge_view="right_panel", prefix="es/paired")
    prompt["2"]["inputs"]["batch_size"] = 3
    entry = comfy.run(prompt)
    edits, ranked = saved(comfy, entry, "7"), saved(comfy, entry, "5")
    values = [brightness(edits[i, :, 24:]) for i in range(3)]  # the judge saw the right halves
    torch.testing.assert_close(ranked, edits[sorted(range(3), key=lambda i: -values[i])], atol=0, rtol=0)
    prompt = score_prompt(scripted_judge("brighter"), batch=3, prefix="es/mismatch")
    prompt["2"]["inputs"]["batch_size"] = 2
    with pytest.raises(ComfyExecutionError, match="2 source images for 3 edits"):
        comfy.run(prompt)
