"""Main-job demo: generated edit pairs -> x2edit-train (x2edit preset) -> our file -> the loader's reader.

    python scripts/demo.py [--out runs/demo] [--steps 40]

Everything is made here (no download): four procedural edit tasks on generated pictures, a tiny random
diffusers FLUX Fill transformer and VAE, and a hashed text encoder. The point is the pipeline, not
image quality: the printed losses, expert usage and the summary of the exported file show each part at
work. With real models, point --transformer/--vae/--text-encoder flux at local FLUX.1-Fill files (see
train/configs/x2edit.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from train.cli import main as train_main  # noqa: E402
from x2edit_core.formats import load_adapters  # noqa: E402

# X2Edit task ids (x2edit_core.tasks): 5 color change, 11 tone change, 12 camera move, 7 action change
TASKS = {
    5: "recolour the square green",
    11: "invert the colours",
    12: "flip the image horizontally",
    7: "shift everything to the right",
}


def scene(gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.rand(3, 1, 1, generator=gen).expand(3, size, size).clone() * 0.6
    square = torch.zeros(size, size, dtype=torch.bool)
    s = int(torch.randint(size // 5, size // 3, (1,), generator=gen))
    y0, x0 = (int(v) for v in torch.randint(0, size - s, (2,), generator=gen))
    square[y0 : y0 + s, x0 : x0 + s] = True
    img[:, square] = torch.rand(3, 1, generator=gen)
    return img, square


def edit(task: int, img: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
    if task == 5:
        out = img.clone()
        out[:, square] = torch.tensor([0.1, 0.9, 0.1]).view(3, 1)
        return out
    if task == 11:
        return 1 - img
    if task == 12:
        return img.flip(-1)
    return img.roll(img.shape[-1] // 4, dims=-1)


def write_dataset(folder: str, n_per_task: int, size: int) -> str:
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    lines = []
    for task, instruction in TASKS.items():
        for i in range(n_per_task):
            img, square = scene(gen, size)
            names = (f"{task}_{i}_src.png", f"{task}_{i}_tgt.png")
            for name, t in zip(names, (img, edit(task, img, square))):
                arr = (t.clamp(0, 1) * 255).byte().permute(1, 2, 0).contiguous().numpy()
                Image.fromarray(arr).save(os.path.join(folder, name))
            lines.append({"source": names[0], "target": names[1], "instruction": instruction, "task": task})
    path = os.path.join(folder, "manifest.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return path


def write_tiny_models(folder: str) -> tuple[str, str]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    latent = 4
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=8 * latent + 4 * 2 * 2,  # packed noise + masked image latents + mask (Fill layout)
        out_channels=4 * latent,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=latent,
        norm_num_groups=4,
        sample_size=32,
    )
    paths = os.path.join(folder, "transformer"), os.path.join(folder, "vae")
    transformer.save_pretrained(paths[0])
    vae.save_pretrained(paths[1])
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"), help="output folder")
    p.add_argument("--steps", type=int, default=40, help="training steps")
    args = p.parse_args(argv)
    manifest = write_dataset(os.path.join(args.out, "data"), n_per_task=6, size=32)
    transformer, vae = write_tiny_models(os.path.join(args.out, "models"))
    print(f"demo: dataset {manifest}, tiny models in {os.path.dirname(transformer)}")
    run_dir = os.path.join(args.out, "run")
    code = train_main(
        [
            "--preset", "x2edit",
            "--transformer", transformer,
            "--vae", vae,
            "--text-encoder", "hash",
            "--data", f"jsonl:{manifest}",
            "--resolution", "32",
            "--num-experts", "4",
            "--rank", "4",
            "--batch-size", "4",
            "--learning-rate", "3e-3",
            "--max-steps", str(args.steps),
            "--checkpoint-every", str(max(1, args.steps // 2)),
            "--usage-every", "10",
            "--log-every", "10",
            "--save-dtype", "float32",
            "--cpu",
            "--output-dir", run_dir,
        ]
    )  # fmt: skip
    if code:
        return code
    path = os.path.join(run_dir, "x2edit_moe_lora.safetensors")
    loaded = load_adapters(path)
    print("\nexported file, as the X2Edit MoE-LoRA Loader node reads it:\n" + loaded.summary())
    print(f"\nPut {path} in ComfyUI's models/loras to load it with the X2Edit MoE-LoRA Loader node.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
