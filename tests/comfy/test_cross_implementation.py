"""Cross-implementation proof: trained here, loaded in a real ComfyUI, same output.

A tiny diffusers FLUX.1 Fill transformer is trained for a few steps by our trainer (`train/`, presets
`x2edit` and `icedit`) and exported in our MoE-LoRA format. ComfyUI loads the same base weights from the
diffusers-layout file (its own conversion to the BFL layout) with UNETLoader, and the exported file
with the X2Edit MoE-LoRA Loader; the support node X2EditTestModelForward calls the patched diffusion
model once. On the same inputs its output must equal the trained diffusers model's within 1e-4.
"""

import copy
import sys
from pathlib import Path

# The proof needs the training extra (diffusers, accelerate), which the test command always installs:
# a missing package is an error here, not a skip.
import accelerate  # noqa: E402, F401
import diffusers  # noqa: E402, F401
import pytest
import torch
from safetensors.torch import load_file, save_file

TRAIN_TESTS_DIR = Path(__file__).resolve().parents[1] / "train"
if str(TRAIN_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TRAIN_TESTS_DIR))

from tiny import make_manifest  # noqa: E402  (tests/train helpers)
from tiny_models import flux_axes_dim  # noqa: E402

from train.config import make_config  # noqa: E402
from train.model import EditModel, latent_image_ids, pack_latents, unpack_latents  # noqa: E402
from train.trainer import Trainer  # noqa: E402

TOLERANCE = 1e-4
TASK = 5  # trained task (the manifest cycles tasks 5 and 2)
OTHER_TASK = 2
LATENT_SIZE = 8  # latent side: 4 x 4 = 16 tokens after ComfyUI's 2x2 patching
TEXT_TOKENS = 8
HEAD_DIM = 32

# FLUX.1 Fill layout (384 = 4 x 96 packed input channels), tiny widths. The RoPE split is the one the
# support pack's detection hook gives ComfyUI for this head width.
TINY_FILL = {
    "patch_size": 1,
    "in_channels": 384,
    "out_channels": 64,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": HEAD_DIM,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 16,
    "guidance_embeds": True,
    "axes_dims_rope": flux_axes_dim(HEAD_DIM),
}


def _tiny_fill_transformer(seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**TINY_FILL)
    with torch.no_grad():  # diffusers zero-initialises some output layers; make every path non-trivial
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.02)
    return model.eval()


def _tiny_vae_16ch():
    """Four blocks: 8x downsampling and 16 latent channels, so Fill inputs are 8 * 16 + 4 * 64 = 384."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=32,
    )


def _inputs():
    g = torch.Generator().manual_seed(123)
    return {
        "x": torch.randn(1, 96, LATENT_SIZE, LATENT_SIZE, generator=g),
        "timestep": torch.tensor([0.7]),
        "context": torch.randn(1, TEXT_TOKENS, 32, generator=g),
        "y": torch.randn(1, 16, generator=g),
        "guidance": torch.tensor([3.5]),
    }


def _diffusers_forward(model, inputs, task_ids=None):
    """Diffusers-side call with ComfyUI's packing and RoPE ids; returns [B, 16, H, W].

    `model` is the bare transformer or the trained EditModel (which gives each sample its task's
    embedding through the adapters' shared context)."""
    kwargs = dict(
        hidden_states=pack_latents(inputs["x"]),
        encoder_hidden_states=inputs["context"],
        pooled_projections=inputs["y"],
        timestep=inputs["timestep"],  # diffusers scales timestep and guidance by 1000, as ComfyUI does
        img_ids=latent_image_ids(LATENT_SIZE, LATENT_SIZE),
        txt_ids=torch.zeros(TEXT_TOKENS, 3),
        guidance=inputs["guidance"],
    )
    with torch.no_grad():
        if isinstance(model, EditModel):
            out, _ = model(**kwargs, task_ids=task_ids)
        else:
            out = model(**kwargs, return_dict=False)[0]
    return unpack_latents(out, LATENT_SIZE, LATENT_SIZE)


@pytest.fixture(scope="module")
def cross(comfy, tmp_path_factory):
    """Base + trained diffusers models, their files in ComfyUI, and the fixed inputs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only contend with the server on small CPUs
    folder = tmp_path_factory.mktemp("cross_impl")
    base = _tiny_fill_transformer()
    base_path = folder / "tiny_fill_diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_path))
    unet_name = comfy.add_file("diffusion_models", "x2edit_cross_tiny_fill_diffusers.safetensors", base_path)
    manifest = make_manifest(str(folder / "data"), n=4, tasks=(TASK, OTHER_TASK))
    vae = _tiny_vae_16ch()
    trained, loras = {}, {}
    for preset in ("x2edit", "icedit"):
        cfg = make_config(
            preset=preset,
            data=[manifest],
            output_dir=str(folder / preset),
            max_steps=3,
            batch_size=2,
            resolution=32,
            text_encoder="hash",
            rank=4,
            num_experts=3,
            plain_rank=4,
            learning_rate=1e-2,
            save_dtype="float32",
            checkpoint_every=0,
            progress=False,
        )
        trainer = Trainer(cfg, transformer=copy.deepcopy(base), vae=vae)
        result = trainer.run()
        trained[preset] = trainer.model.eval()
        loras[preset] = comfy.add_lora(f"x2edit_cross_{preset}.safetensors", result["output"])
    inputs = _inputs()
    save_file(inputs, str(Path(comfy.input_dir) / "x2edit_cross_inputs.safetensors"))
    yield {"base": base, "unet": unet_name, "trained": trained, "loras": loras, "inputs": inputs}
    torch.set_num_threads(threads)


def _comfy_forward(comfy, cross, prefix, lora=None, tasks=(TASK,)):
    """Outputs of X2EditTestModelForward for each task id, on UNETLoader (+ MoE-LoRA loader)."""
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": cross["unet"], "weight_dtype": "default"}}
    }
    model = ["1", 0]
    if lora is not None:
        prompt["2"] = {
            "class_type": "X2EditMoELoRALoader",
            "inputs": {
                "model": model,
                "lora_name": lora,
                "strength": 1.0,
                "routing": "native",
                "expert_index": 0,
                "expert_weights": "",
            },
        }
        model = ["2", 0]
    for i, task in enumerate(tasks):
        prompt[str(10 + i)] = {
            "class_type": "X2EditTestModelForward",
            "inputs": {
                "model": model,
                "filename": "x2edit_cross_inputs.safetensors",
                "task": task,
                "filename_prefix": f"cross/{prefix}_task{task}",
            },
        }
    entry = comfy.run(prompt)
    outs = []
    for i in range(len(tasks)):
        (path,) = comfy.output_files(entry, node_id=str(10 + i), kind="tensors")
        outs.append(load_file(path)["output"])
    return outs


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_base_model_matches_diffusers(comfy, cross):
    """No adapters: ComfyUI's conversion of the diffusers file, packing, ids and embeddings agree."""
    (got,) = _comfy_forward(comfy, cross, "base")
    want = _diffusers_forward(cross["base"], cross["inputs"])
    assert got.shape == want.shape == (1, 16, LATENT_SIZE, LATENT_SIZE)
    assert want.abs().max() > 0.1  # a non-trivial output
    diff = _max_diff(got, want)
    print(f"base model: max abs diff ComfyUI vs diffusers {diff:.3e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("preset", ["x2edit", "icedit"])
def test_trained_file_in_comfyui_matches_trained_diffusers_model(comfy, cross, preset):
    """The exported file through X2EditMoELoRALoader gives the trained model's output."""
    tasks = (TASK, OTHER_TASK)
    got = _comfy_forward(comfy, cross, preset, lora=cross["loras"][preset], tasks=tasks)
    model = cross["trained"][preset]
    base = _diffusers_forward(cross["base"], cross["inputs"])
    for task, out in zip(tasks, got):
        want = _diffusers_forward(model, cross["inputs"], torch.tensor([task]))
        diff, effect = _max_diff(out, want), _max_diff(want, base)
        print(f"{preset} task {task}: max abs diff {diff:.3e}, adapters change the output by {effect:.3e}")
        assert diff <= TOLERANCE
        assert effect > 100 * TOLERANCE  # the trained adapters matter
    task_effect = _max_diff(got[0], got[1])
    print(f"{preset}: task {TASK} vs task {OTHER_TASK} in ComfyUI differ by {task_effect:.3e}")
    if preset == "x2edit":  # task-aware routing: the task id changes the output on both sides
        assert task_effect > 10 * TOLERANCE
    else:  # token routing ignores the task id
        assert task_effect <= TOLERANCE
