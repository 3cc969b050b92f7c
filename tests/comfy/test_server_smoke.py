"""The ComfyUI harness itself: a real server, tiny FLUX models, core-node workflows end to end."""

import copy

import pytest
import torch
from comfy_harness import (
    REPO_ROOT,
    ComfyExecutionError,
    ComfyValidationError,
    tiny_dev_txt2img_prompt,
    tiny_fill_inpaint_prompt,
)
from PIL import Image
from safetensors.torch import load_file

SUPPORT_NODES = [
    "X2EditTestConditioning",
    "X2EditTestNoiseImage",
    "X2EditTestSaveTensors",
    "X2EditTestLoadTensors",
]


def _latent(comfy, entry, node_id):
    (path,) = comfy.output_files(entry, node_id=node_id, kind="latents")
    return load_file(path)["latent_tensor"]


def _image_size(comfy, entry, node_id):
    (path,) = comfy.output_files(entry, node_id=node_id, kind="images")
    with Image.open(path) as image:
        return image.size


def test_support_nodes_and_tiny_models_listed(comfy):
    info = comfy.object_info()
    for node in SUPPORT_NODES + ["UNETLoader", "VAELoader", "InpaintModelConditioning", "SaveLatent"]:
        assert node in info, f"{node} missing from /object_info"
    unet_names = info["UNETLoader"]["input"]["required"]["unet_name"][0]
    for key in ("dev", "kontext", "fill"):
        assert comfy.models[key] in unet_names
    assert comfy.models["vae"] in info["VAELoader"]["input"]["required"]["vae_name"][0]
    assert comfy.object_info("X2EditTestConditioning")["output"] == ["CONDITIONING"]


def test_fill_inpaint_workflow_runs_and_keeps_unmasked_half(comfy):
    # A copy under a name no other test loads: ComfyUI's cache cannot have it, so the load (and its log
    # lines, checked below) happens in this run whatever ran before.
    fresh = comfy.add_file(
        "diffusion_models",
        "x2edit_smoke_fill_copy.safetensors",
        comfy.models_dir / "diffusion_models" / comfy.models["fill"],
    )
    prompt = tiny_fill_inpaint_prompt({**comfy.models, "fill": fresh}, prefix="smoke/fill")
    prompt["20"] = {
        "class_type": "X2EditTestSaveTensors",
        "inputs": {"filename_prefix": "smoke/fill_source", "latent": ["9", 2], "image": ["5", 0]},
    }
    offset = comfy.log_offset()
    entry = comfy.run(prompt)

    assert _image_size(comfy, entry, "12") == (64, 64)
    latent = _latent(comfy, entry, "13")
    assert latent.shape == (1, 16, 8, 8)
    assert torch.isfinite(latent).all()
    (source_path,) = comfy.output_files(entry, node_id="20", kind="tensors")
    source = load_file(source_path)
    assert source["image"].shape == (1, 64, 64, 3)
    # The mask covers the right half; the noise mask keeps the left half at the encoded source.
    torch.testing.assert_close(latent[..., :4], source["latent"][..., :4], atol=1e-5, rtol=1e-5)
    assert (latent[..., 4:] - source["latent"][..., 4:]).abs().max() > 1e-2
    log = comfy.log(offset)
    assert "tiny FLUX detected" in log
    # tiny_models writes exactly the keys ComfyUI's Flux and TAESD modules have.
    for complaint in (
        "unet missing",
        "unet unexpected",
        "left over keys in diffusion model",
        "Missing VAE keys",
    ):
        assert complaint not in log, log


def test_dev_txt2img_workflow_runs(comfy):
    entry = comfy.run(tiny_dev_txt2img_prompt(comfy.models, width=64, height=48, prefix="smoke/dev"))
    assert _image_size(comfy, entry, "8") == (64, 48)
    latent = _latent(comfy, entry, "9")
    assert latent.shape == (1, 16, 6, 8)
    assert torch.isfinite(latent).all() and latent.std() > 0.1


def test_kontext_reference_latent_changes_output(comfy):
    base = tiny_dev_txt2img_prompt(comfy.models, model_key="kontext", prefix="smoke/kontext_plain")
    with_ref = tiny_dev_txt2img_prompt(comfy.models, model_key="kontext", prefix="smoke/kontext_ref")
    with_ref["20"] = {
        "class_type": "X2EditTestNoiseImage",
        "inputs": {"width": 64, "height": 48, "batch_size": 1, "seed": 3},
    }
    with_ref["21"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["2", 0]}}
    with_ref["22"] = {
        "class_type": "ReferenceLatent",
        "inputs": {"conditioning": ["3", 0], "latent": ["21", 0]},
    }
    with_ref["6"]["inputs"]["positive"] = ["22", 0]
    plain = _latent(comfy, comfy.run(base), "9")
    referenced = _latent(comfy, comfy.run(with_ref), "9")
    assert plain.shape == referenced.shape == (1, 16, 6, 8)
    assert not torch.equal(plain, referenced)


def test_same_prompt_twice_is_bit_identical(comfy):
    prompt = tiny_fill_inpaint_prompt(comfy.models, prefix="smoke/determinism")
    first = _latent(comfy, comfy.run(prompt), "13")
    second = _latent(comfy, comfy.run(copy.deepcopy(prompt)), "13")
    assert torch.equal(first, second)

    other_seed = tiny_fill_inpaint_prompt(comfy.models, seed=1, prefix="smoke/determinism_seed1")
    assert not torch.equal(first, _latent(comfy, comfy.run(other_seed), "13"))


def test_diffusers_lora_applies_to_every_target(comfy):
    prompt = tiny_fill_inpaint_prompt(comfy.models, prefix="smoke/lora")
    prompt["30"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["1", 0], "lora_name": comfy.models["fill_lora"], "strength_model": 1.0},
    }
    prompt["10"]["inputs"]["model"] = ["30", 0]
    offset = comfy.log_offset()
    with_lora = _latent(comfy, comfy.run(prompt), "13")
    log = comfy.log(offset)
    assert "lora key not loaded" not in log, log
    without = _latent(comfy, comfy.run(tiny_fill_inpaint_prompt(comfy.models, prefix="smoke/nolora")), "13")
    assert not torch.equal(with_lora, without)


def test_lora_with_unknown_key_is_reported_in_log(comfy):
    state = load_file(comfy.loras_dir / comfy.models["fill_lora"])
    state["transformer.no_such_module.lora_A.weight"] = torch.zeros(4, 64)
    state["transformer.no_such_module.lora_B.weight"] = torch.zeros(64, 4)
    name = comfy.add_lora("smoke_bad_key_lora.safetensors", state)
    prompt = tiny_fill_inpaint_prompt(comfy.models, prefix="smoke/lora_bad_key")
    prompt["30"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["1", 0], "lora_name": name, "strength_model": 1.0},
    }
    prompt["10"]["inputs"]["model"] = ["30", 0]
    offset = comfy.log_offset()
    comfy.run(prompt)
    assert "lora key not loaded: transformer.no_such_module" in comfy.log(offset)


def test_x2edit_pack_imports(comfy):
    assert (REPO_ROOT / "__init__.py").is_file(), "the pack has no ComfyUI entry (__init__.py)"
    failures = comfy.custom_node_import_failures()
    assert "x2edit" not in failures, f"x2edit pack failed to import: {failures['x2edit']}\n{comfy.log()}"
    assert "x2edit_test_support" not in failures
    assert any(
        name.startswith("X2Edit") and not name.startswith("X2EditTest") for name in comfy.object_info()
    )


def test_validation_error_carries_server_text(comfy):
    prompt = tiny_dev_txt2img_prompt(comfy.models)
    prompt["1"]["inputs"]["unet_name"] = "no_such_model.safetensors"
    with pytest.raises(ComfyValidationError, match="no_such_model.safetensors"):
        comfy.queue(prompt)


def test_execution_error_carries_server_text(comfy):
    prompt = {
        "1": {"class_type": "X2EditTestLoadTensors", "inputs": {"filename": "missing.safetensors"}},
        "2": {
            "class_type": "X2EditTestSaveTensors",
            "inputs": {"filename_prefix": "smoke/err", "image": ["1", 0]},
        },
    }
    with pytest.raises(ComfyExecutionError, match="X2EditTestLoadTensors") as raised:
        comfy.run(prompt)
    assert "missing.safetensors" in str(raised.value)
