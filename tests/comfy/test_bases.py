"""The bases users run, each through its real loader: bf16 files, fp8 weights (UNETLoader), GGUF Q8_0 /
Q5_0 / Q4_0 (ComfyUI-GGUF's UnetLoaderGGUF, files written here with the `gguf` package), and a FLUX at
real width loaded by ComfyUI's unmodified detection.

On every base the X2Edit MoE-LoRA Loader applies ICEdit's MoE file (routed experts + plain parts) in
every routing mode, stacked with a core LoRA before and after it, and an X2Edit folder. The support node
X2EditTestModelForward calls each patched diffusion model once on fixed inputs. The adapter's effect
(output with it minus output without it) must agree with its effect on the full-precision base: cosine
similarity above the bound measured for that base type (printed with the relative error). X2Edit's
condition stream with an X2Edit folder is checked the same way on a tiny FLUX.1-dev as GGUF Q8_0 and fp8.
"""

import os
import subprocess

import pytest
import tiny_models
import torch
from comfy_harness import SUPPORT_PACK_DIR, ComfyClient, ComfyServer
from lora_files import icedit_state_dict, write_x2edit_dir
from safetensors.torch import load_file, save_file

gguf = pytest.importorskip("gguf", reason="the GGUF bases need the gguf package (dev extra)")

TASK = 5
INPUTS = "x2edit_bases_inputs.safetensors"
# Lowest cosine similarity between an adapter's effect on this base and on the full-precision base,
# set a little below the lowest value measured on both tested ComfyUI releases. fp8 is lowest because
# ComfyUI merges LoRA patches into fp8 weights with stochastic rounding (its own LoRA loader too); GGUF
# adds the patches to the dequantized weights at full precision, so only the base's rounding counts.
EFFECT_COSINE_BOUND = {
    "bf16": 0.995,
    "fp8_e4m3fn": 0.9,
    "gguf_Q8_0": 0.999,
    "gguf_Q5_0": 0.98,
    "gguf_Q4_0": 0.93,
}


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


def _core_lora(name):
    return ("LoraLoaderModelOnly", {"lora_name": name, "strength_model": 1.0})


def adapter_chains(files):
    """{name: loaders chained after the base loader}; "none" is the bare base."""
    moe, lora, x2 = files["icedit"], files["lora"], files["x2edit"]
    return {
        "none": [],
        "icedit_native": [_moe(moe)],
        "icedit_mean": [_moe(moe, "mean of experts")],
        "icedit_single": [_moe(moe, "single expert", expert_index=2)],
        "icedit_custom": [_moe(moe, "custom mix", expert_weights="0.1, 0.2, 0.3, 0.4")],
        "core_lora_only": [_core_lora(lora)],  # ComfyUI's own LoRA on this base, for comparison
        "lora_before_moe": [_core_lora(lora), _moe(moe)],
        "lora_after_moe": [_moe(moe), _core_lora(lora)],
        "x2edit_native": [_moe(x2)],
        "x2edit_mean": [_moe(x2, "mean of experts")],
    }


def run_forwards(client, base_loader, chains, prefix, extra_nodes=None, inputs_file=INPUTS):
    """One prompt: the base loader, every chain on it, one X2EditTestModelForward each -> {name: output}.
    ``extra_nodes``: more prompt nodes the chains link to (ids from 90 to 99); ``inputs_file``: the forward's
    inputs file."""
    prompt = {"1": base_loader, **(extra_nodes or {})}
    node = 100
    for i, (name, chain) in enumerate(chains.items()):
        source = ["1", 0]
        for class_type, inputs in chain:
            node += 1
            prompt[str(node)] = {"class_type": class_type, "inputs": {"model": source, **inputs}}
            source = [str(node), 0]
        prompt[str(10 + i)] = {
            "class_type": "X2EditTestModelForward",
            "inputs": {
                "model": source,
                "filename": inputs_file,
                "task": TASK,
                "filename_prefix": f"bases/{prefix}_{name}",
            },
        }
    entry = client.run(prompt, timeout=600)
    outputs = {}
    for i, name in enumerate(chains):
        (path,) = client.output_files(entry, node_id=str(10 + i), kind="tensors")
        outputs[name] = load_file(path)["output"]
        assert torch.isfinite(outputs[name]).all(), name
    return outputs


def agreement(effect, reference):
    """(cosine similarity, relative error) of an effect against the full-precision one."""
    e, r = effect.flatten().double(), reference.flatten().double()
    return float(e @ r / (e.norm() * r.norm())), float((e - r).norm() / r.norm())


def assert_adapters_act(outputs):
    for name, out in outputs.items():
        effect = (out - outputs["none"]).norm() / outputs["none"].norm()
        assert name == "none" or effect > 1e-2, f"{name}: the adapter barely acts ({effect:.2e})"


def check_effects(label, outputs, reference, bound):
    worst = 1.0
    for name in outputs:
        if name == "none":
            continue
        cos, rel = agreement(outputs[name] - outputs["none"], reference[name] - reference["none"])
        print(f"{label} {name}: effect cosine {cos:.6f}, relative error {rel:.3e}")
        worst = min(worst, cos)
    print(f"{label}: lowest effect cosine {worst:.6f} (bound {bound})")
    assert worst > bound, f"{label}: an adapter's effect departs from full precision (cosine {worst:.6f})"


def forward_inputs(channels, context_dim, pooled_dim, latent=4, tokens=4, seed=123):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(1, channels, latent, latent, generator=g),
        "timestep": torch.tensor([0.7]),
        "context": torch.randn(1, tokens, context_dim, generator=g),
        "y": torch.randn(1, pooled_dim, generator=g),
        "guidance": torch.tensor([3.5]),
    }


# --- tiny widths: bf16, fp8 and GGUF bases against the fp32 file of the same weights -----------------

TINY_SEED = 21
GGUF_TYPES = ("Q8_0", "Q5_0", "Q4_0")


@pytest.fixture(scope="module")
def tiny(comfy):
    config = tiny_models.tiny_flux_config("fill")
    state = tiny_models.tiny_flux_state_dict(config, seed=TINY_SEED)
    folder = comfy.models_dir / "diffusion_models"
    names = {"fp32": "x2edit_bases_fill_fp32.safetensors", "bf16": "x2edit_bases_fill_bf16.safetensors"}
    save_file(state, str(folder / names["fp32"]))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(folder / names["bf16"]))
    for qtype in GGUF_TYPES:
        names[qtype] = f"x2edit_bases_fill_{qtype}.gguf"
        tiny_models.write_flux_gguf(folder / names[qtype], state, qtype)
    files = {
        "icedit": comfy.add_lora(
            "x2edit_bases_icedit.safetensors",
            icedit_state_dict(
                hidden=64,
                num_double=2,
                num_single=2,
                experts=4,
                rank=4,
                x_embedder_in=384,
                seed=13,
                dtype=torch.float32,
                std=0.05,
            ),
        ),
        "lora": comfy.add_lora(
            "x2edit_bases_lora.safetensors", tiny_models.tiny_flux_lora_state_dict(config, seed=14)
        ),
    }
    write_x2edit_dir(
        comfy.loras_dir / "x2edit_bases_x2",
        hidden=64,
        num_double=2,
        num_single=2,
        experts=3,
        rank=2,
        seed=15,
        std=0.2,
    )
    files["x2edit"] = os.path.join("x2edit_bases_x2", "lora.safetensors")
    save_file(forward_inputs(96, 32, 16), str(comfy.input_dir / INPUTS))
    chains = adapter_chains(files)
    reference = run_forwards(comfy, _unet(names["fp32"]), chains, "fp32")
    assert_adapters_act(reference)
    return {"names": names, "chains": chains, "reference": reference}


def _unet(name, weight_dtype="default"):
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": weight_dtype}}


def _gguf(name):
    return {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": name}}


@pytest.mark.parametrize("base", ["bf16", "fp8_e4m3fn", *(f"gguf_{q}" for q in GGUF_TYPES)])
def test_adapters_on_base_match_full_precision(comfy, tiny, base):
    names = tiny["names"]
    if base == "bf16":
        loader = _unet(names["bf16"])
    elif base == "fp8_e4m3fn":
        loader = _unet(names["fp32"], "fp8_e4m3fn")
    else:
        if "UnetLoaderGGUF" not in comfy.object_info():
            pytest.fail("ComfyUI-GGUF is not installed in this ComfyUI (scripts/setup_hosts.sh adds it)")
        loader = _gguf(names[base.split("_", 1)[1]])
    outputs = run_forwards(comfy, loader, tiny["chains"], base)
    check_effects(base, outputs, tiny["reference"], EFFECT_COSINE_BOUND[base])


# --- X2Edit's condition stream on quantized FLUX.1-dev bases ----------------------------------------

# Lowest cosine similarity between the effect of the condition stream with X2Edit's adapter (output
# minus the plain base's output) on this base and on the fp32 base; a little below the lowest value
# measured on both tested ComfyUI releases (Q8_0 0.99978; fp8 0.987, its merged experts rounded
# stochastically into the fp8 weights).
STREAM_COSINE_BOUND = {"gguf_Q8_0": 0.999, "fp8_e4m3fn": 0.97}
STREAM_SOURCE = "x2edit_bases_stream_source.safetensors"
STREAM_INPUTS = "x2edit_bases_stream_inputs.safetensors"


@pytest.fixture(scope="module")
def tiny_dev_stream(comfy):
    """A tiny FLUX.1-dev (fp32 file and GGUF Q8_0 of the same weights), an X2Edit folder, a source latent,
    and the fp32 base's outputs for: the plain base, condition stream + routed experts, condition stream +
    experts merged (mean of experts)."""
    state = tiny_models.tiny_flux_state_dict(tiny_models.tiny_flux_config("dev"), seed=TINY_SEED + 1)
    folder = comfy.models_dir / "diffusion_models"
    names = {"fp32": "x2edit_bases_dev_fp32.safetensors", "Q8_0": "x2edit_bases_dev_Q8_0.gguf"}
    save_file(state, str(folder / names["fp32"]))
    tiny_models.write_flux_gguf(folder / names["Q8_0"], state, "Q8_0")
    write_x2edit_dir(
        comfy.loras_dir / "x2edit_bases_stream_x2",
        hidden=64,
        num_double=2,
        num_single=2,
        experts=3,
        rank=2,
        seed=16,
        std=0.2,
    )
    x2 = os.path.join("x2edit_bases_stream_x2", "lora.safetensors")
    g = torch.Generator().manual_seed(17)
    save_file({"latent": torch.randn(1, 16, 4, 4, generator=g)}, str(comfy.input_dir / STREAM_SOURCE))
    save_file(forward_inputs(16, 32, 16), str(comfy.input_dir / STREAM_INPUTS))
    source = {"90": {"class_type": "X2EditTestLoadTensors", "inputs": {"filename": STREAM_SOURCE}}}
    stream = ("X2EditConditionStream", {"source": ["90", 1], "offset": 128, "reference_rounding": False})
    chains = {
        "none": [],
        "stream_native": [_moe(x2), stream],
        "stream_mean": [_moe(x2, "mean of experts"), stream],
    }
    reference = run_stream_forwards(comfy, _unet(names["fp32"]), chains, source, "dev_fp32")
    assert_adapters_act(reference)
    return {"names": names, "chains": chains, "source": source, "reference": reference}


def run_stream_forwards(client, loader, chains, source, prefix):
    return run_forwards(client, loader, chains, prefix, extra_nodes=source, inputs_file=STREAM_INPUTS)


@pytest.mark.parametrize("base", ["gguf_Q8_0", "fp8_e4m3fn"])
def test_condition_stream_on_quantized_base_matches_fp32(comfy, tiny_dev_stream, base):
    names = tiny_dev_stream["names"]
    if base == "fp8_e4m3fn":
        loader = _unet(names["fp32"], "fp8_e4m3fn")
    else:
        if "UnetLoaderGGUF" not in comfy.object_info():
            pytest.fail("ComfyUI-GGUF is not installed in this ComfyUI (scripts/setup_hosts.sh adds it)")
        loader = _gguf(names["Q8_0"])
    outputs = run_stream_forwards(
        comfy, loader, tiny_dev_stream["chains"], tiny_dev_stream["source"], f"dev_{base}"
    )
    check_effects(
        f"condition stream on {base}", outputs, tiny_dev_stream["reference"], STREAM_COSINE_BOUND[base]
    )


# --- real FLUX width, through ComfyUI's unmodified model detection -----------------------------------

REAL = dict(
    in_channels=96,  # FLUX.1 Fill: 384 packed input channels
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    num_heads=24,
    depth=1,
    depth_single_blocks=1,
)


def test_detection_hook_leaves_real_width_to_comfyui(comfy_install):
    """The support pack's hook returns ComfyUI's own detection unchanged for FLUX.1's widths."""
    shapes = tiny_models.flux_key_shapes(tiny_models.tiny_flux_config("fill", **REAL))
    support = str(SUPPORT_PACK_DIR / "__init__.py")
    code = (
        "import sys, torch, importlib.util\n"
        "sys.argv = ['main.py', '--cpu']\n"
        "import comfy.options; comfy.options.enable_args_parsing()\n"
        "import comfy.model_detection as md\n"
        "original = md.detect_unet_config\n"
        f"spec = importlib.util.spec_from_file_location('x2edit_test_support', {support!r}, "
        f"submodule_search_locations=[{str(SUPPORT_PACK_DIR)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)\n"
        f"sd = {{k: torch.empty(s, device='meta') for k, s in {shapes!r}.items()}}\n"
        "ours, theirs = md.detect_unet_config(sd, ''), original(sd, '')\n"
        "assert md.detect_unet_config is not original\n"
        "assert ours == theirs, (ours, theirs)\n"
        "assert theirs['hidden_size'] == 3072 and theirs['num_heads'] == 24, theirs\n"
        "print('unchanged', theirs['hidden_size'], theirs['num_heads'], theirs['context_in_dim'])\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [str(comfy_install.python), "-c", code],
        cwd=comfy_install.root,
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0 and "unchanged 3072 24 4096" in out.stdout, out.stdout + out.stderr


def _expert_as_plain_lora(sd, expert):
    """An ICEdit MoE file's plain parts plus one expert written as a plain LoRA (what routing 'single
    expert' must equal, applied by core LoraLoaderModelOnly)."""
    plain = {k: v for k, v in sd.items() if ".expert_" not in k and "lora_route" not in k}
    for key in sd:
        if key.endswith(f".expert_{expert}.weight"):
            plain[key.replace(f".expert_{expert}.weight", ".weight")] = sd[key]
    return plain


@pytest.fixture(scope="module")
def plain_detection(comfy_install, tmp_path_factory):
    """A second server whose support pack leaves ComfyUI's model detection alone, with a FLUX.1 Fill of
    real width (one double and one single block, bf16 file) and adapters of that width."""
    server = ComfyServer(comfy_install, tmp_path_factory.mktemp("comfyui_plain_detection"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("X2EDIT_TEST_FLUX_DETECTION_HOOK", "0")
        server.start()
    client = ComfyClient(server)
    try:
        assert "x2edit test support: FLUX detection hook off" in client.log()
        config = tiny_models.tiny_flux_config("fill", **REAL)
        unet = "x2edit_real_width_fill_bf16.safetensors"
        tiny_models.write_tiny_flux(
            client.models_dir / "diffusion_models" / unet, "fill", seed=31, dtype=torch.bfloat16, **REAL
        )
        icedit = icedit_state_dict(
            hidden=3072, num_double=1, num_single=1, experts=4, rank=4, x_embedder_in=384, seed=32,
            dtype=torch.float32, std=0.02,
        )  # fmt: skip
        moe = client.add_lora("x2edit_real_icedit.safetensors", icedit)
        expert_2 = client.add_lora("x2edit_real_icedit_expert2.safetensors", _expert_as_plain_lora(icedit, 2))
        lora = client.add_lora(
            "x2edit_real_lora.safetensors", tiny_models.tiny_flux_lora_state_dict(config, seed=33, scale=0.2)
        )
        write_x2edit_dir(
            client.loras_dir / "x2edit_real_x2", hidden=3072, num_double=1, num_single=1, experts=3, rank=2,
            seed=34, std=0.06,
        )  # fmt: skip
        x2 = os.path.join("x2edit_real_x2", "lora.safetensors")
        save_file(forward_inputs(96, 4096, 768), str(client.input_dir / INPUTS))
        chains = {
            "none": [],
            "icedit_native": [_moe(moe)],
            "icedit_single": [_moe(moe, "single expert", expert_index=2)],
            "core_lora_expert_2": [_core_lora(expert_2)],
            "lora_before_moe": [_core_lora(lora), _moe(moe)],
            "x2edit_native": [_moe(x2)],
        }
        yield client, unet, chains
    finally:
        server.stop()


def test_real_width_fill_through_unmodified_detection(plain_detection):
    """FLUX.1 Fill widths (hidden 3072, 24 heads, text 4096, 384 input channels), detected by ComfyUI
    alone. The bf16 file computes in fp32 on CPU, so it is its own full-precision reference: here the
    checks are that every adapter acts and that a forced expert equals ComfyUI's LoRA loader bit for bit.
    (fp8 and GGUF agreement is measured at tiny widths above: at this width, ComfyUI's stochastic
    rounding of patched fp8 weights takes minutes on a small CPU.)"""
    client, unet, chains = plain_detection
    offset = client.log_offset()
    out = run_forwards(client, _unet(unet), chains, "real_default")
    log = client.log(offset)
    assert "model weight dtype" in log and "tiny FLUX detected" not in log and "widths left" not in log
    assert all(o.shape == (1, 16, 4, 4) for o in out.values())
    assert_adapters_act(out)
    assert torch.equal(out["icedit_single"], out["core_lora_expert_2"])
    for name in ("icedit_native", "lora_before_moe", "x2edit_native"):
        effect = (out[name] - out["none"]).norm() / out["none"].norm()
        print(f"real width {name}: effect {effect:.3e} of the output")
