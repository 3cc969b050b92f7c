"""Cost of one X2Edit transformer step (noisy + condition tokens) against a plain FLUX step, on CPU.

    <ComfyUI env>/bin/python benchmarks/x2edit_step.py [--size 512] [--hidden 256] [--repeats 5]

Imports ComfyUI's own FLUX model (COMFYUI_ROOT, default /opt/ComfyUI) with random weights (hidden 256,
2 double + 4 single blocks by default) and times, in one process and interleaved, the token-level
forward of:

- plain FLUX: [text | noisy] through ComfyUI's ``forward_orig``;
- X2Edit: [text | noisy | condition] through ``x2edit_core.condition_stream.x2edit_forward`` over the
  same modules (condition tokens at timestep 0, their own RoPE rows);
- plain FLUX on a latent twice as wide (as many image tokens as noisy + condition), which separates the
  cost of the extra tokens from the stream's own overhead.

Both at the same output size (``--size`` pixels square, 512 text tokens). Printed: each time (fastest of
the repeats), the ratio X2Edit / plain, and the token ratio for reference (the linear layers scale with
the tokens, attention with their square, so the time ratio lies between the two).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT", "/opt/ComfyUI")
sys.path[:0] = [COMFYUI_ROOT, ROOT, os.path.join(ROOT, "tests")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512, help="output side in pixels (multiple of 16)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument(
        "--comfy-cpu-attention", action="store_true", help="keep ComfyUI's CPU attention (sub-quadratic)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: clean on a shared machine)")
    args = parser.parse_args()

    sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI reads its own command line at import
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    # PyTorch's attention for both (ComfyUI's CPU default is chunked, depending on free memory)
    comfy.cli_args.args.use_pytorch_cross_attention = not args.comfy_cpu_attention
    import comfy.ldm.flux.layers
    import comfy.ldm.flux.math
    import comfy.ldm.flux.model
    import comfy.ops
    from tiny_models import flux_axes_dim

    from x2edit_core.condition_stream import (
        StreamInputs,
        condition_ids,
        grid_ids,
        pack_latent,
        x2edit_forward,
    )

    torch.manual_seed(0)
    head_dim = args.hidden // args.heads
    params = dict(
        in_channels=16,
        out_channels=16,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=args.hidden,
        mlp_ratio=4.0,
        num_heads=args.heads,
        depth=args.double,
        depth_single_blocks=args.single,
        axes_dim=flux_axes_dim(head_dim),
        theta=10000,
        patch_size=2,
        qkv_bias=True,
        guidance_embed=True,
    )
    try:
        dm = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, **params)
    except TypeError:  # newer releases add fields to FluxParams
        dm = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, txt_ids_dims=[], **params)
    with torch.no_grad():
        for p in dm.parameters():
            p.normal_(0, 0.02)
    dm.eval()

    side = args.size // 8
    x = torch.randn(1, 16, side, side)
    cond = torch.randn(1, 16, side, side)
    txt = torch.randn(1, args.text_tokens, 4096)
    y, t, g = torch.randn(1, 768), torch.tensor([0.7]), torch.tensor([3.5])
    img, img_ids = pack_latent(x), grid_ids(side // 2, side // 2, 1)
    txt_ids = torch.zeros(1, args.text_tokens, 3)
    inputs = StreamInputs(
        img, img_ids, pack_latent(cond), condition_ids(side, side, 1, 128), txt, txt_ids, t, y, g
    )

    def embed(v):
        return comfy.ldm.flux.layers.timestep_embedding(v, 256, time_factor=1.0)

    def attention(q, k, v, pe):
        return comfy.ldm.flux.math.attention(q, k, v, pe=pe)

    def plain():
        return dm.forward_orig(img, img_ids, txt, txt_ids, t, y, g)

    def x2edit():
        return x2edit_forward(dm, inputs, embed, attention)

    wide = pack_latent(torch.randn(1, 16, side, 2 * side))  # as many image tokens as noisy + condition
    wide_ids = grid_ids(side // 2, side, 1)

    def plain_same_tokens():
        return dm.forward_orig(wide, wide_ids, txt, txt_ids, t, y, g)

    runs = {"plain FLUX": plain, "X2Edit": x2edit, "plain same tokens": plain_same_tokens}
    best = dict.fromkeys(runs, float("inf"))
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)

    n = img.shape[1]
    plain_tokens, x2edit_tokens = args.text_tokens + n, args.text_tokens + 2 * n
    print(
        f"output {args.size}x{args.size} ({n} noisy tokens, {args.text_tokens} text tokens), "
        f"hidden {args.hidden}, {args.double} double + {args.single} single blocks, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(f"plain FLUX step: {best['plain FLUX'] * 1000:8.1f} ms  ({plain_tokens} tokens)")
    print(f"X2Edit step:     {best['X2Edit'] * 1000:8.1f} ms  ({x2edit_tokens} tokens)")
    print(f"plain FLUX with as many image tokens as X2Edit: {best['plain same tokens'] * 1000:8.1f} ms")
    print(
        f"ratio X2Edit / plain: {best['X2Edit'] / best['plain FLUX']:.2f}x  "
        f"(tokens {x2edit_tokens / plain_tokens:.2f}x, squared {(x2edit_tokens / plain_tokens) ** 2:.2f}x)"
    )

    print(
        f"ratio X2Edit / plain FLUX with as many tokens: {best['X2Edit'] / best['plain same tokens']:.2f}x "
        "(the stream's own overhead: two modulations per block, concatenations)"
    )


if __name__ == "__main__":
    main()
