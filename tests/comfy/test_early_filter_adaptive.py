"""Adaptive selection of the early filter and X2Edit Early Filter (Advanced) on the real ComfyUI server:
drawing stops at the threshold, NFE is reported, the advanced node runs with any guider (CFG, Kontext
reference latents) and its winner equals a plain SamplerCustomAdvanced run of the winning seed."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from comfy_harness import ComfyExecutionError, tiny_dev_txt2img_prompt
from safetensors.torch import load_file
from test_early_filter import filter_prompt, judged_brightness, outputs, scripted_judge, winning_seed


def adaptive(prompt: dict, threshold: float, node: str = "41") -> dict:
    prompt[node]["inputs"].update(selection="adaptive", threshold=threshold)
    return prompt


def scores_of(previews: torch.Tensor) -> list[float]:
    """The scripted judge's score of each candidate: right-panel brightness / 25.5."""
    return [judged_brightness(p) / 25.5 for p in previews]


def test_adaptive_stops_at_the_threshold_and_reports_nfe(comfy):
    # Threshold 10: nothing stops early, every candidate is drawn and scored.
    everything = outputs(
        comfy,
        comfy.run(adaptive(filter_prompt(comfy, scripted_judge("brighter"), candidates=4, batch_size=1,
                                         prefix="efa/all"), 10.0)),
    )  # fmt: skip
    values = scores_of(everything["previews"])
    assert len(values) == 4 and len(set(values)) == 4
    assert winning_seed(everything["report"]) == 10 + int(np.argmax(values))
    assert "drew 4 of 4 candidate(s); NFE spent 12" in everything["report"]  # 4 + 4*2
    # A threshold the best candidate reaches: drawing stops at the first candidate at or above it.
    threshold = math.floor(max(values) * 100) / 100
    first = next(i for i, v in enumerate(values) if v >= threshold)
    got = outputs(
        comfy,
        comfy.run(adaptive(filter_prompt(comfy, scripted_judge("brighter"), candidates=4, batch_size=1,
                                         prefix="efa/stop"), threshold)),
    )  # fmt: skip
    drawn = first + 1
    assert got["previews"].shape[0] == drawn
    torch.testing.assert_close(got["previews"], everything["previews"][:drawn], atol=0, rtol=0)
    assert winning_seed(got["report"]) == 10 + first
    assert f"drew {drawn} of 4 candidate(s); NFE spent {4 + 2 * drawn} " in got["report"]
    assert f"NFE {4 + 2 * drawn} =" in got["report"]  # the plan line counts what was spent
    # The winner is still a plain n-step run of its seed.
    torch.testing.assert_close(got["latent"], got["plain"], atol=1e-5, rtol=0)


def test_adaptive_resume_mode_with_batches(comfy):
    prompt = filter_prompt(
        comfy, scripted_judge("darker"), mode="resume", candidates=4, early_steps=2, total_steps=5,
        batch_size=2, prefix="efa/resume",
    )  # fmt: skip
    got = outputs(comfy, comfy.run(adaptive(prompt, 0.0)))  # every score reaches 0: stop at once
    assert got["previews"].shape[0] == 2  # the whole first batch was sampled
    assert winning_seed(got["report"]) == 10  # judging stopped at the first candidate
    assert "drew 2 of 4 candidate(s); NFE spent 7" in got["report"]  # 2*2 + 5 - 2
    assert "Judge calls: 1," in got["report"]
    assert (got["latent"] - got["plain"]).abs().max().item() <= 1e-4


def test_adaptive_with_unusable_scores_is_an_error(comfy):
    prompt = adaptive(
        filter_prompt(comfy, scripted_judge("unusable"), candidates=2, prefix="efa/unusable"), 5.0
    )
    with pytest.raises(ComfyExecutionError, match="No scoring call .* gave a usable score"):
        comfy.run(prompt)


def _advanced(prompt: dict, *, mode: str, candidates: int, early_steps: int, total_steps: int,
              batch_size: int, model: str, positive, negative, latent, cfg: float = 1.0) -> dict:  # fmt: skip
    """Replace the filter "41" with the advanced node fed by RandomNoise "60", CFGGuider "61",
    KSamplerSelect "62", BasicScheduler "63" (n steps) and "64" (m steps, paper mode)."""
    prompt["60"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 10}}
    prompt["61"] = {
        "class_type": "CFGGuider",
        "inputs": {"model": [model, 0], "positive": positive, "negative": negative, "cfg": cfg},
    }
    prompt["62"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    prompt["63"] = {
        "class_type": "BasicScheduler",
        "inputs": {"model": [model, 0], "scheduler": "simple", "steps": total_steps, "denoise": 1.0},
    }
    prompt["64"] = {
        "class_type": "BasicScheduler",
        "inputs": {"model": [model, 0], "scheduler": "simple", "steps": early_steps, "denoise": 1.0},
    }
    prompt["41"] = {
        "class_type": "X2EditEarlyFilterAdvanced",
        "inputs": {
            "noise": ["60", 0],
            "guider": ["61", 0],
            "sampler": ["62", 0],
            "sigmas": ["63", 0],
            "latent_image": latent,
            "vae": ["2", 0],
            "source_image": ["5", 0],
            "instruction": "make it red",
            "judge": ["40", 0],
            "candidates": candidates,
            "early_steps": early_steps,
            "mode": mode,
            "batch_size": batch_size,
            "judge_view": "right_panel",
            **({"early_sigmas": ["64", 0]} if mode == "paper" else {}),
        },
    }
    # What the winner must equal: SamplerCustomAdvanced with the winning noise, same guider and sigmas.
    prompt["65"] = {
        "class_type": "SamplerCustomAdvanced",
        "inputs": {
            "noise": ["41", 1],
            "guider": ["61", 0],
            "sampler": ["62", 0],
            "sigmas": ["63", 0],
            "latent_image": latent,
        },
    }
    prompt["66"] = {
        "class_type": "X2EditTestSaveTensors",
        "inputs": {"filename_prefix": "efa/custom", "latent": ["65", 0]},
    }
    return prompt


def _custom(comfy, entry) -> torch.Tensor:
    (path,) = comfy.output_files(entry, node_id="66", kind="tensors")
    return load_file(path)["latent"]


@pytest.mark.parametrize(("mode", "selection"), [("resume", "pairwise"), ("paper", "adaptive")])
def test_advanced_node_equals_the_plain_filter_and_sampler_custom_advanced(comfy, mode, selection):
    settings = dict(mode=mode, candidates=3, early_steps=2, total_steps=4, batch_size=2)
    plain_filter = filter_prompt(comfy, scripted_judge("brighter"), prefix=f"efa/ref_{mode}", **settings)
    if selection == "adaptive":
        adaptive(plain_filter, 10.0)
    reference = outputs(comfy, comfy.run(plain_filter))
    prompt = filter_prompt(comfy, scripted_judge("brighter"), prefix=f"efa/adv_{mode}", **settings)
    _advanced(prompt, model="1", positive=["9", 0], negative=["9", 1], latent=["9", 2], **settings)
    if selection == "adaptive":
        adaptive(prompt, 10.0)
    entry = comfy.run(prompt)
    got = outputs(comfy, entry)
    assert winning_seed(got["report"]) == winning_seed(reference["report"])
    torch.testing.assert_close(got["previews"], reference["previews"], atol=1e-4, rtol=0)
    torch.testing.assert_close(got["latent"], reference["latent"], atol=1e-4, rtol=0)
    torch.testing.assert_close(got["latent"], _custom(comfy, entry), atol=1e-4, rtol=0)


def test_advanced_node_with_kontext_reference_latents_and_real_cfg(comfy):
    """A Kontext-style edit: reference latents in the conditioning, CFG 2 with a negative prompt."""
    prompt = tiny_dev_txt2img_prompt(
        comfy.models, width=64, height=64, model_key="kontext", prefix="efa/kontext"
    )
    prompt["20"] = {
        "class_type": "X2EditTestNoiseImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1, "seed": 7},
    }
    prompt["21"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["2", 0]}}
    prompt["22"] = {
        "class_type": "ReferenceLatent",
        "inputs": {"conditioning": ["3", 0], "latent": ["21", 0]},
    }
    prompt["40"] = scripted_judge("brighter")
    prompt["5"] = prompt.pop("20")  # the advanced node's source image is "5"
    prompt["21"]["inputs"]["pixels"] = ["5", 0]
    prompt["30"] = {
        "class_type": "EmptySD3LatentImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1},
    }
    _advanced(
        prompt, mode="resume", candidates=3, early_steps=2, total_steps=4, batch_size=3, model="1",
        positive=["22", 0], negative=["4", 0], latent=["30", 0], cfg=2.0,
    )  # fmt: skip
    prompt["41"]["inputs"]["judge_view"] = "whole"
    prompt["42"] = {
        "class_type": "X2EditTestSaveTensors",
        "inputs": {"filename_prefix": "efa/kontext_filter", "latent": ["41", 2], "image": ["41", 3]},
    }
    for unused in ("6", "7", "8", "9"):
        prompt.pop(unused)
    entry = comfy.run(prompt)
    (path,) = comfy.output_files(entry, node_id="42", kind="tensors")
    saved = load_file(path)
    report = entry["outputs"]["41"]["text"][0]
    values = [float((np.clip(p.numpy(), 0, 1) * 255 + 0.5).astype(np.uint8).mean()) for p in saved["image"]]
    assert saved["image"].shape[0] == 3 and len(set(values)) == 3
    assert winning_seed(report) == 10 + int(np.argmax(values))
    assert re.search(r"NFE 8 = ", report)  # resume: 3*2 + 4 - 2
    torch.testing.assert_close(saved["latent"], _custom(comfy, entry), atol=1e-4, rtol=0)


def test_advanced_node_refuses_paper_mode_without_early_sigmas(comfy):
    settings = dict(mode="paper", candidates=2, early_steps=2, total_steps=4, batch_size=1)
    prompt = filter_prompt(comfy, scripted_judge("first"), prefix="efa/bad", **settings)
    _advanced(prompt, model="1", positive=["9", 0], negative=["9", 1], latent=["9", 2], **settings)
    del prompt["41"]["inputs"]["early_sigmas"]
    with pytest.raises(ComfyExecutionError, match="connect early_sigmas"):
        comfy.run(prompt)
    prompt = filter_prompt(comfy, scripted_judge("first"), prefix="efa/bad2", **settings)
    _advanced(prompt, model="1", positive=["9", 0], negative=["9", 1], latent=["9", 2], **settings)
    prompt["41"]["inputs"]["early_steps"] = 3
    with pytest.raises(ComfyExecutionError, match="early_sigmas has 2 step"):
        comfy.run(prompt)
    prompt = filter_prompt(comfy, scripted_judge("first"), prefix="efa/bad3", **settings)
    _advanced(prompt, model="1", positive=["9", 0], negative=["9", 1], latent=["9", 2], **settings)
    prompt["60"] = {"class_type": "DisableNoise", "inputs": {}}
    with pytest.raises(ComfyExecutionError, match="is the same for every seed"):
        comfy.run(prompt)
