"""X2Edit MoE-LoRA Loader on a real headless ComfyUI with tiny FLUX models (dev, Fill, Kontext).

Outputs are compared as sampled latents (core SaveLatent) of a 3-step euler run, so every check goes
through ComfyUI's own model loading, patching, sampling and unpatching.
"""

import copy
import json
import os
import urllib.error
import urllib.request

import pytest
import torch
from comfy_harness import ComfyExecutionError, tiny_dev_txt2img_prompt, tiny_fill_inpaint_prompt
from lora_files import icedit_state_dict, write_x2edit_dir
from safetensors.torch import load_file
from test_early_filter import filter_prompt

TINY = dict(hidden=64, num_double=2, num_single=2, dtype=torch.float32, std=0.05)
MOE_MODULES = [
    "transformer_blocks.0.ff.net.2",
    "transformer_blocks.1.ff.net.2",
    "single_transformer_blocks.0.proj_out",
    "single_transformer_blocks.1.proj_out",
]


def _latent(comfy, entry, node_id="13"):
    (path,) = comfy.output_files(entry, node_id=node_id, kind="latents")
    return load_file(path)["latent_tensor"]


def _fill_prompt(comfy, prefix, loaders=()):
    """Tiny Fill inpainting with model loaders chained between UNETLoader ("1") and KSampler ("10")."""
    prompt = tiny_fill_inpaint_prompt(comfy.models, prefix=f"moe/{prefix}")
    source = ["1", 0]
    for i, (class_type, inputs) in enumerate(loaders):
        node = str(40 + i)
        prompt[node] = {"class_type": class_type, "inputs": {"model": source, **inputs}}
        source = [node, 0]
    prompt["10"]["inputs"]["model"] = source
    return prompt


def _moe(name, strength=1.0, routing="native", expert_index=0, expert_weights=""):
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


def _core_lora(name, strength=1.0):
    return ("LoraLoaderModelOnly", {"lora_name": name, "strength_model": strength})


def _run(comfy, prefix, loaders=()):
    return _latent(comfy, comfy.run(_fill_prompt(comfy, prefix, loaders)))


@pytest.fixture(scope="module")
def icedit(comfy):
    """Names of ICEdit-layout files for the tiny Fill model, and the raw state dict."""
    sd = icedit_state_dict(experts=4, rank=4, x_embedder_in=384, seed=11, **TINY)
    names = {"moe": comfy.add_lora("tiny_icedit_moe.safetensors", sd)}
    for j in (0, 3):  # expert j written as a plain LoRA, with the file's plain parts
        plain = {k: v for k, v in sd.items() if "expert_" not in k and "lora_route" not in k}
        for m in MOE_MODULES:
            plain[f"transformer.{m}.lora_A.weight"] = sd[f"transformer.{m}.lora_A.expert_{j}.weight"]
            plain[f"transformer.{m}.lora_B.weight"] = sd[f"transformer.{m}.lora_B.expert_{j}.weight"]
        names[f"plain_expert_{j}"] = comfy.add_lora(f"tiny_icedit_expert{j}_plain.safetensors", plain)
    same = dict(sd)
    for m in MOE_MODULES:
        for j in range(1, 4):
            for ab in ("A", "B"):
                same[f"transformer.{m}.lora_{ab}.expert_{j}.weight"] = sd[
                    f"transformer.{m}.lora_{ab}.expert_0.weight"
                ].clone()
    names["identical"] = comfy.add_lora("tiny_icedit_identical_experts.safetensors", same)
    names["other"] = comfy.add_lora(
        "tiny_icedit_other.safetensors",
        icedit_state_dict(experts=4, rank=4, x_embedder_in=384, seed=12, **TINY),
    )
    return names


@pytest.fixture(scope="module")
def baseline(comfy):
    return _run(comfy, "baseline")


def test_loader_listed_with_tooltips(comfy, icedit):
    info = comfy.object_info("X2EditMoELoRALoader")
    assert info["display_name"] == "X2Edit MoE-LoRA Loader"
    required = info["input"]["required"]
    spec = required["lora_name"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]  # V3 nodes list combos as "COMBO"
    assert icedit["moe"] in options
    for name, spec in required.items():
        assert spec[1].get("tooltip"), f"input {name} has no tooltip"
    assert info["output"] == ["MODEL", "STRING"]


def test_nodes_use_the_versioned_comfy_api_where_the_host_has_one(comfy):
    versioned = (comfy.server.install.root / "comfy_api" / "v0_0_2").is_dir()
    expected = "comfy_api.v0_0_2" if versioned else "comfy_api.latest"
    assert f"x2edit: nodes on {expected}" in comfy.log()


def test_strength_zero_is_exactly_no_lora(comfy, icedit, baseline):
    assert torch.equal(_run(comfy, "s0", [_moe(icedit["moe"], strength=0.0)]), baseline)


@pytest.mark.parametrize("expert", [0, 3])
def test_forced_expert_equals_core_lora_loader(comfy, icedit, expert):
    ours = _run(comfy, f"forced{expert}", [_moe(icedit["moe"], routing="single expert", expert_index=expert)])
    core = _run(comfy, f"core{expert}", [_core_lora(icedit[f"plain_expert_{expert}"])])
    assert torch.equal(ours, core)


def test_routed_experts_equal_merged_when_experts_are_identical(comfy, icedit, baseline):
    """Token routing (dynamic forward patches) vs the same expert merged by ComfyUI: same maths."""
    routed = _run(comfy, "identical_native", [_moe(icedit["identical"])])
    merged = _run(comfy, "identical_forced", [_moe(icedit["identical"], routing="single expert")])
    assert not torch.equal(routed, baseline)
    torch.testing.assert_close(routed, merged, rtol=1e-4, atol=1e-4)


def test_native_routing_differs_from_every_single_expert(comfy, icedit, baseline):
    native = _run(comfy, "native", [_moe(icedit["moe"])])
    assert not torch.allclose(native, baseline, atol=1e-4)
    for j in range(4):
        forced = _run(comfy, f"native_vs_{j}", [_moe(icedit["moe"], routing="single expert", expert_index=j)])
        assert not torch.allclose(native, forced, atol=1e-5)


def test_ordinary_lora_on_same_layers_still_applies_before_or_after(comfy, icedit, baseline):
    lora = comfy.models["fill_lora"]  # plain LoRA on all ICEdit targets, ff.net.2 / proj_out included
    moe_only = _run(comfy, "stack_moe", [_moe(icedit["moe"])])
    lora_only = _run(comfy, "stack_lora", [_core_lora(lora)])
    before = _run(comfy, "stack_before", [_core_lora(lora), _moe(icedit["moe"])])
    after = _run(comfy, "stack_after", [_moe(icedit["moe"]), _core_lora(lora)])
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-5)
    for other in (moe_only, lora_only, baseline):
        assert not torch.allclose(before, other, atol=1e-5)


def test_queued_prompts_with_different_settings_do_not_affect_each_other(comfy, icedit, baseline):
    settings = {
        "a": [_moe(icedit["moe"])],
        "b": [_moe(icedit["other"], strength=0.5)],
        "none": [],
        "c": [_moe(icedit["moe"], routing="mean of experts")],
    }
    ids = {k: comfy.queue(_fill_prompt(comfy, f"queue_{k}", v)) for k, v in settings.items()}
    queued = {k: _latent(comfy, comfy.wait(pid)) for k, pid in ids.items()}
    assert torch.equal(queued["none"], baseline)  # a stale MoE patch must not leak into a plain run
    for k, loaders in settings.items():
        alone = _run(comfy, f"alone_{k}", loaders)
        assert torch.equal(queued[k], alone), k
    assert not torch.allclose(queued["a"], queued["b"], atol=1e-5)


@pytest.mark.parametrize("variant", ["dev", "kontext"])
def test_dev_and_kontext_models(comfy, variant):
    sd = icedit_state_dict(experts=4, rank=4, x_embedder_in=64, seed=5, **TINY)
    name = comfy.add_lora("tiny_icedit_dev.safetensors", sd)
    prompt = tiny_dev_txt2img_prompt(comfy.models, model_key=variant, prefix=f"moe/{variant}_none")
    plain = _latent(comfy, comfy.run(prompt), "9")
    patched_prompt = copy.deepcopy(prompt)
    patched_prompt["40"] = {
        "class_type": "X2EditMoELoRALoader",
        "inputs": {"model": ["1", 0], **_moe(name)[1]},
    }
    patched_prompt["6"]["inputs"]["model"] = ["40", 0]
    patched_prompt["9"]["inputs"]["filename_prefix"] = f"moe/{variant}_moe"
    patched = _latent(comfy, comfy.run(patched_prompt), "9")
    assert torch.isfinite(patched).all() and not torch.allclose(plain, patched, atol=1e-5)


def test_x2edit_checkpoint_folder_routes_by_task(comfy, baseline):
    """X2Edit folder: task-aware q/k/v adapters (fused rows) and the residual proj adapter, dynamic path.

    With zero gates every expert gets softmax weight 1/E and top-2 keeps two of them; with identical
    experts that is exactly a forced mix of 2/E on one expert (merged by ComfyUI for q/k/v).
    """
    folder = comfy.loras_dir / "tiny_x2edit"
    write_x2edit_dir(folder, hidden=64, num_double=2, num_single=2, experts=3, rank=2, seed=3, std=0.05)
    lora_path = folder / "lora.safetensors"
    sd = load_file(str(lora_path))
    for k in list(sd):
        if k.endswith("gate.weight"):
            sd[k] = torch.zeros_like(sd[k])
        elif ".experts." in k:
            j = k.split(".experts.")[1].split(".")[0]
            sd[k] = sd[k.replace(f".experts.{j}.", ".experts.0.")].clone()
    from safetensors.torch import save_file

    save_file(sd, str(lora_path))
    name = os.path.join("tiny_x2edit", "lora.safetensors")
    native = _run(comfy, "x2_native", [_moe(name)])
    mixed = _run(
        comfy, "x2_mix", [_moe(name, routing="custom mix", expert_weights="0.6666666666666666, 0, 0")]
    )
    assert not torch.allclose(native, baseline, atol=1e-4)
    torch.testing.assert_close(native, mixed, rtol=1e-4, atol=1e-4)


# -- bad input: a clear error in ComfyUI, and the server keeps working --------------------------------


def _expect_error(comfy, name, *needles):
    with pytest.raises(ComfyExecutionError) as info:
        comfy.run(_fill_prompt(comfy, "bad", [_moe(name)]))
    message = str(info.value)
    for needle in needles:
        assert needle in message, message


def test_bad_files_give_clear_errors_and_the_server_survives(comfy, icedit, baseline, tmp_path):
    good = comfy.loras_dir / icedit["moe"]
    data = good.read_bytes()
    (comfy.loras_dir / "bad_truncated.safetensors").write_bytes(data[: len(data) // 2])
    _expect_error(comfy, "bad_truncated.safetensors", "truncated")
    (comfy.loras_dir / "bad_random.safetensors").write_bytes(os.urandom(3000))
    _expect_error(comfy, "bad_random.safetensors", "safetensors")

    wide = icedit_state_dict(experts=4, rank=4, x_embedder_in=384, hidden=96, num_double=2, num_single=2)
    comfy.add_lora("bad_width.safetensors", wide)
    _expect_error(comfy, "bad_width.safetensors", "another model width")

    sdxl = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
    }
    comfy.add_lora("bad_sdxl.safetensors", sdxl)
    _expect_error(comfy, "bad_sdxl.safetensors", "another architecture")

    sd = icedit_state_dict(experts=4, rank=4, x_embedder_in=384, **TINY)
    sd["transformer.transformer_blocks.0.ff.net.2.lora_B.expert_2.weight"] = torch.zeros(64, 5)
    comfy.add_lora("bad_expert_shapes.safetensors", sd)
    _expect_error(comfy, "bad_expert_shapes.safetensors", "expert_2")

    folder = comfy.loras_dir / "bad_x2edit_pickle"
    write_x2edit_dir(folder, hidden=64, num_double=2, num_single=2, experts=2, rank=2)
    (folder / "task_embeddings.bin").write_bytes(
        b"\x80\x04\x95\x1e\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06getcwd\x94\x93\x94)R\x94."
    )
    _expect_error(comfy, os.path.join("bad_x2edit_pickle", "lora.safetensors"), "weights_only")

    assert "X2EditMoELoRALoader" in comfy.object_info()
    assert torch.equal(_run(comfy, "after_errors", []), baseline)


# -- bad file choices: refused when the prompt is queued (HTTP 400), before anything loads --------------


def _post_prompt(comfy, prompt):
    """(HTTP status, body) of POST /prompt."""
    data = json.dumps({"prompt": prompt, "client_id": comfy.client_id}).encode()
    request = urllib.request.Request(
        f"{comfy.url}/prompt", data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_bad_file_choices_are_refused_at_queue_time_and_nothing_loads(comfy, icedit):
    # A diffusion model file no prompt has loaded: loading it would log its weight dtype.
    unet = comfy.add_file(
        "diffusion_models",
        "x2edit_queue_check_fill.safetensors",
        comfy.models_dir / "diffusion_models" / (comfy.models["fill"]),
    )

    def fill(loaders):
        prompt = _fill_prompt(comfy, "queue_check", loaders)
        prompt["1"]["inputs"]["unet_name"] = unet
        return prompt

    judge = {
        "class_type": "X2EditLocalVLMJudge",
        "inputs": {
            "folder": "x2edit_no_such_vlm",
            "dtype": "float32",
            "device": "cpu",
            "max_new_tokens": 4,
            "max_image_side": 64,
        },
    }
    judged = filter_prompt(comfy, judge, candidates=2, prefix="queue_check/judge")
    judged["1"]["inputs"]["unet_name"] = unet
    router = (
        "X2EditTaskRouter",
        {
            "instruction": "remove the cup",
            "mode": "auto",
            "lm_folder": str(comfy.models_dir / "x2edit_no_such_lm"),
            "expert_map": "",
            "num_experts": 4,
        },
    )
    cases = {
        "missing lora": (fill([_moe("x2edit_no_such_lora.safetensors")]), "not in the loras folder"),
        "lora outside loras": (fill([_moe(f"../diffusion_models/{unet}")]), "not in the loras folder"),
        "missing judge folder": (judged, "x2edit_no_such_vlm"),
        "missing LM folder": (fill([_moe(icedit["moe"]), router]), "does not exist"),
    }
    history = set(comfy.get("/history"))
    offset = comfy.log_offset()
    for case, (prompt, needle) in cases.items():
        status, body = _post_prompt(comfy, prompt)
        assert status == 400 and needle in body, f"{case}: HTTP {status}: {body}"
    queue = comfy.get("/queue")
    assert not queue["queue_running"] and not queue["queue_pending"]
    assert set(comfy.get("/history")) == history
    assert "model weight dtype" not in comfy.log(offset)  # the diffusion model never loaded

    comfy.run(fill([_moe(icedit["moe"])]))  # the same prompt with a good file loads the model
    assert "model weight dtype" in comfy.log(offset)
