"""Caching as users have it: one loaded model, many MoE settings, queued in varying orders.

The session server runs with ComfyUI's default caching (classic on older releases, RAM-pressure caching
on newer ones), so the UNETLoader's model is loaded once and every prompt patches that same cached model:
routing modes, strengths, task-router tasks and no MoE at all, queued forwards, backwards and
interleaved. Each result must be bit-identical to the same prompt run alone: the reference server runs
with --cache-none, so every one of its prompts loads the model from the file again and nothing a
previous prompt did can reach it.
"""

import os

import pytest
import torch
from comfy_harness import ComfyClient, ComfyServer, tiny_fill_inpaint_prompt
from lora_files import icedit_state_dict, write_x2edit_dir
from safetensors.torch import load_file

STEPS = 2


def _moe(name, routing="native", strength=1.0, expert_index=0, expert_weights=""):
    return (
        "X2EditMoELoRALoader",
        {
            "lora_name": name,
            "strength": strength,
            "routing": routing,
            "expert_index": expert_index,
            "expert_weights": expert_weights,
        },
    )


def _router(mode, expert_map="", num_experts=4):
    return (
        "X2EditTaskRouter",
        {
            "instruction": "",
            "mode": mode,
            "lm_folder": "",
            "expert_map": expert_map,
            "num_experts": num_experts,
        },
    )


def settings(files):
    moe, x2 = files["icedit"], files["x2edit"]
    return {
        "none": [],
        "native": [_moe(moe)],
        "native_half": [_moe(moe, strength=0.5)],
        "mean": [_moe(moe, "mean of experts")],
        "single_2": [_moe(moe, "single expert", expert_index=2)],
        "custom": [_moe(moe, "custom mix", expert_weights="0.4, 0.3, 0.2, 0.1")],
        "x2edit_remove": [_moe(x2), _router("remove_subject")],
        "x2edit_style": [_moe(x2), _router("style_change")],
        "icedit_task_expert": [_moe(moe), _router("color_change", "color_change:1, *:3")],
        "router_only": [_router("style_change")],  # a task on an unpatched model changes nothing
    }


def prompt_for(client, loaders, seed, prefix):
    """Tiny FLUX Fill inpainting (UNETLoader "1" ... KSampler "10"), loaders chained in between."""
    prompt = tiny_fill_inpaint_prompt(client.models, steps=STEPS, seed=seed, prefix=f"cache/{prefix}")
    source = ["1", 0]
    for i, (class_type, inputs) in enumerate(loaders):
        node = str(40 + i)
        prompt[node] = {"class_type": class_type, "inputs": {"model": source, **inputs}}
        source = [node, 0]
    prompt["10"]["inputs"]["model"] = source
    return prompt


def latent(client, entry):
    (path,) = client.output_files(entry, node_id="13", kind="latents")
    return load_file(path)["latent_tensor"]


def add_files(client):
    files = {
        "icedit": client.add_lora(
            "x2edit_cache_icedit.safetensors",
            icedit_state_dict(
                hidden=64,
                num_double=2,
                num_single=2,
                experts=4,
                rank=4,
                x_embedder_in=384,
                seed=41,
                dtype=torch.float32,
                std=0.05,
            ),
        )
    }
    write_x2edit_dir(
        client.loras_dir / "x2edit_cache_x2",
        hidden=64,
        num_double=2,
        num_single=2,
        experts=3,
        rank=2,
        seed=42,
    )
    files["x2edit"] = os.path.join("x2edit_cache_x2", "lora.safetensors")
    return files


@pytest.fixture(scope="module")
def alone(comfy_install, tmp_path_factory):
    """A second server that caches nothing: each prompt there runs alone, from the files."""
    server = ComfyServer(
        comfy_install, tmp_path_factory.mktemp("comfyui_cache_none"), extra_args=["--cache-none"]
    )
    server.start()
    try:
        client = ComfyClient(server)
        yield client, add_files(client)
    finally:
        server.stop()


def test_settings_queued_in_any_order_on_a_cached_model_equal_each_run_alone(comfy, alone):
    alone_client, alone_files = alone
    files = add_files(comfy)
    ours, theirs = settings(files), settings(alone_files)
    names = list(ours)
    order = [(n, 0) for n in names]  # forwards
    order += [(n, 0) for n in reversed(names)]  # backwards: every setting again after all others
    mixed = [n for pair in zip(names[::2], reversed(names[1::2])) for n in pair]
    order += [(n, 1) for n in mixed]  # another seed: the sampler runs again on every setting
    order += [(n, 1) for n in mixed[::3]]

    expected = {}
    for name, seed in dict.fromkeys(order):
        entry = alone_client.run(prompt_for(alone_client, theirs[name], seed, f"alone_{name}_{seed}"))
        expected[name, seed] = latent(alone_client, entry)

    ids = [
        (name, seed, comfy.queue(prompt_for(comfy, ours[name], seed, f"queued_{i}_{name}_{seed}")))
        for i, (name, seed) in enumerate(order)
    ]
    mismatches = []
    for name, seed, prompt_id in ids:
        got = latent(comfy, comfy.wait(prompt_id))
        if not torch.equal(got, expected[name, seed]):
            diff = (got - expected[name, seed]).abs().max().item()
            mismatches.append(f"{name} seed {seed}: max abs diff {diff:.3e}")
    print(f"{len(ids)} queued prompts, {len(expected)} settings run alone, {len(mismatches)} differ")
    assert not mismatches, "\n".join(mismatches)

    for seed in (0, 1):  # the settings really differ, so equality above means something
        plain = expected["none", seed]
        assert torch.equal(expected["router_only", seed], plain)
        for name in names:
            if name not in ("none", "router_only") and (name, seed) in expected:
                assert not torch.equal(expected[name, seed], plain), name
    assert not torch.equal(expected["x2edit_remove", 0], expected["x2edit_style", 0])
