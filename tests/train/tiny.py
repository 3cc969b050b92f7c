"""Tiny diffusers FLUX Fill transformer, VAE and edit datasets for the training tests (random weights)."""

from __future__ import annotations

import json
import os

import torch
from PIL import Image

LATENT_CHANNELS = 4
VAE_SCALE = 2  # two VAE blocks: one 2x downsample
TINY_FLUX_FILL = {
    "patch_size": 1,
    "in_channels": 8 * LATENT_CHANNELS + 4 * VAE_SCALE * VAE_SCALE,
    "out_channels": 4 * LATENT_CHANNELS,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 16,
    "guidance_embeds": True,
    "axes_dims_rope": [4, 6, 6],
}


def tiny_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**TINY_FLUX_FILL)
    with torch.no_grad():  # diffusers zero-initialises some output layers; make every path non-trivial
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.02)
    return model


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
        shift_factor=0.1,
    )


def save_tiny_models(folder: str) -> tuple[str, str]:
    t, v = os.path.join(folder, "transformer"), os.path.join(folder, "vae")
    if not os.path.isdir(t):
        tiny_transformer().save_pretrained(t)
        tiny_vae().save_pretrained(v)
    return t, v


def _image(rng: torch.Generator, h: int, w: int) -> Image.Image:
    base = torch.rand(3, 1, 1, generator=rng)
    noise = torch.rand(3, h, w, generator=rng) * 0.3
    arr = ((base + noise).clamp(0, 1) * 255).byte().permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr)


def make_manifest(folder: str, n: int = 8, tasks=(1, 2), size=(40, 48), seed: int = 0, bad: int = 0) -> str:
    """A JSONL manifest of n random edit pairs (tasks cycled); ``bad`` extra records point to broken files."""
    os.makedirs(folder, exist_ok=True)
    rng = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        src, tgt = f"src_{i}.png", f"tgt_{i}.png"
        _image(rng, *size).save(os.path.join(folder, src))
        _image(rng, *size).save(os.path.join(folder, tgt))
        task = tasks[i % len(tasks)]
        lines.append({"source": src, "target": tgt, "instruction": f"make it style {task}", "task": task})
    for j in range(bad):
        with open(os.path.join(folder, f"broken_{j}.png"), "wb") as fh:
            fh.write(b"not a png")
        lines.append(
            {"source": f"broken_{j}.png", "target": "tgt_0.png", "instruction": "x", "task": tasks[0]}
        )
    path = os.path.join(folder, "manifest.jsonl")
    with open(path, "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
    return path
