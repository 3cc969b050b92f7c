"""The CUDA checks of scripts/gpu_check.sh that run in Python (also runnable on CPU at toy size).

    python scripts/gpu_check.py env                       # exit 2 with the reason when torch sees no GPU
    python scripts/gpu_check.py train-steps [--cpu]       # bf16 + gradient checkpointing, every preset

``train-steps`` trains each preset for a few steps on a FLUX-width transformer (fewer blocks than
FLUX, random weights): frozen bf16 base, float32 adapters, bf16 autocast, gradient checkpointing,
the preset's losses (X2Edit's contrastive loss included), gradient clipping and AdamW, as the
trainer runs them. On CUDA every routed MoE layer runs under ``torch.cuda.set_sync_debug_mode("error")``
(so a device-to-host sync there stops the check, the recomputation in the backward pass included);
syncs elsewhere in the step are counted and printed. ``--cpu`` runs the same code at toy size.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

NO_CUDA = 2  # exit status when no CUDA device is usable


def cmd_env(args) -> int:
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA build {torch.version.cuda}")
    if not torch.cuda.is_available():
        print(
            "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); these checks "
            "need one NVIDIA GPU and a CUDA build of torch",
            file=sys.stderr,
        )
        return NO_CUDA
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    missing = []
    for mod in ("diffusers", "accelerate", "peft"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        print(f"gpu_check: missing Python packages {missing} (give --wheels DIR)", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def routed_layers_sync_free(enabled: bool):
    """Every MoELoRA forward under sync debug mode 'error' (restoring the mode around it)."""
    from x2edit_core.moe import MoELoRA

    if not enabled:
        yield
        return
    original = MoELoRA.forward

    def guarded(self, *a, **kw):
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(self, *a, **kw)
        finally:
            torch.cuda.set_sync_debug_mode(before)

    MoELoRA.forward = guarded
    try:
        yield
    finally:
        MoELoRA.forward = original


@contextlib.contextmanager
def counted_syncs(enabled: bool, counter: list):
    """Count CUDA syncs (sync debug mode 'warn') outside the routed layers; appends the count."""
    if not enabled:
        yield
        counter.append(0)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counter.append(sum("synchroniz" in str(w.message) for w in caught))


def build_transformer(args, device, dtype):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    head_dim = args.width // args.heads
    rope = (head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8)
    with torch.device(device):
        t = FluxTransformer2DModel(
            patch_size=1,
            in_channels=384,
            out_channels=64,
            num_layers=args.double,
            num_single_layers=args.single,
            attention_head_dim=head_dim,
            num_attention_heads=args.heads,
            joint_attention_dim=args.text_dim,
            pooled_projection_dim=64,
            guidance_embeds=True,
            axes_dims_rope=rope,
        )
    return t.to(dtype)


def make_inputs(args, device, dtype):
    from train.model import latent_image_ids

    g = torch.Generator().manual_seed(0)
    side = int(round((args.tokens // 2) ** 0.5))
    h, w = 2 * side, 4 * side  # packed grid side x 2*side: a diptych
    n = (h // 2) * (w // 2)
    b = args.batch
    inputs = dict(
        hidden_states=torch.randn(b, n, 384, generator=g),
        encoder_hidden_states=torch.randn(b, args.text_tokens, args.text_dim, generator=g),
        pooled_projections=torch.randn(b, 64, generator=g),
        timestep=torch.rand(b, generator=g),
        img_ids=latent_image_ids(h, w),
        txt_ids=torch.zeros(args.text_tokens, 3),
        guidance=torch.ones(b),
    )
    inputs = {k: v.to(device) for k, v in inputs.items()}
    cols = torch.arange(w // 2).view(1, -1).expand(h // 2, w // 2).reshape(-1)
    mask = (cols >= w // 4).to(device)
    target = torch.randn(b, n, 64, generator=g).to(device)
    tasks = torch.tensor([1, 1, 2, 3][:b] + [4] * max(0, b - 4), device=device)  # task 2, 3: no partner
    return inputs, mask, target, tasks


def train_preset(args, preset, device, inputs, mask, target, tasks) -> dict:
    from train.config import make_config
    from train.model import EditModel
    from train.presets import resolve_placement
    from x2edit_core.losses import gathered_contrastive_loss, masked_mse

    cuda = device.type == "cuda"
    cfg = make_config(preset=preset, data=["unused.jsonl"])
    t = build_transformer(args, device, torch.bfloat16)
    t.enable_gradient_checkpointing()
    model = EditModel(t, resolve_placement(cfg, t), num_tasks=16).to(device)
    model.train()
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    use_con = cfg.contrastive_weight > 0
    syncs: list[int] = []
    out = {}

    def step():
        with counted_syncs(cuda, syncs), routed_layers_sync_free(cuda):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                pred, feats = model(**inputs, task_ids=tasks, token_mask=mask, capture=use_con)
                flow = masked_mse(pred, target, mask)
                con = (
                    gathered_contrastive_loss(
                        feats, tasks, None, 0, cfg.contrastive_tau, cfg.contrastive_variant
                    )
                    if use_con
                    else flow.new_zeros(())
                )
                loss = flow + cfg.contrastive_weight * con
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), flow.detach(), con.detach(), norm

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up
    times, last = [], None
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        last = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    loss, flow, con, norm = (float(v) for v in last)
    if not all(map(lambda v: v == v and abs(v) != float("inf"), (loss, flow, con, norm))):
        raise SystemExit(f"gpu_check: {preset}: a loss or the gradient norm is not finite")
    trained = sum(float(p.detach().float().abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
    if trained == 0:
        raise SystemExit(f"gpu_check: {preset}: the adapters did not move")
    out.update(
        preset=preset,
        checkpointing=bool(getattr(t, "gradient_checkpointing", False)),
        params=sum(p.numel() for p in params),
        step_ms=1e3 * min(times),
        mean_ms=1e3 * sum(times) / len(times),
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        loss=loss,
        flow=flow,
        contrastive=con,
        grad_norm=norm,
        syncs_per_step=max(syncs) if syncs else 0,
    )
    return out


def cmd_train_steps(args) -> int:
    if args.cpu:
        device = torch.device("cpu")
        for k, v in dict(
            width=64, heads=4, double=1, single=1, tokens=32, text_tokens=8, text_dim=32
        ).items():
            setattr(args, k, v)
        args.steps = min(args.steps, 1)
    else:
        if not torch.cuda.is_available():
            print(
                "gpu_check: train-steps needs a CUDA device (or --cpu for the toy-size run)", file=sys.stderr
            )
            return NO_CUDA
        device = torch.device("cuda")
    inputs, mask, target, tasks = make_inputs(args, device, torch.bfloat16)
    print(
        f"training steps: width {args.width}, {args.double} double + {args.single} single blocks, "
        f"{args.tokens} image + {args.text_tokens} text tokens, batch {args.batch}, bf16 base + autocast, "
        f"gradient checkpointing, {device.type}"
    )
    print(
        f"{'preset':8} {'ckpt':>5} {'params':>11} {'step ms':>9} {'mean ms':>9} {'peak GiB':>9} {'loss':>9} "
        f"{'flow':>8} {'contr.':>8} {'|grad|':>8} {'syncs/step (outside routed layers)':>35}"
    )
    for preset in args.presets:
        r = train_preset(args, preset, device, inputs, mask, target, tasks)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the preset's model is gone; hand its memory back before the next
        print(
            f"{r['preset']:8} {str(r['checkpointing']):>5} {r['params']:11d} {r['step_ms']:9.1f} "
            f"{r['mean_ms']:9.1f} {r['peak_gib']:9.2f} {r['loss']:9.4f} {r['flow']:8.4f} "
            f"{r['contrastive']:8.4f} {r['grad_norm']:8.4f} {r['syncs_per_step']:35d}"
        )
        if not r["checkpointing"]:
            print(f"gpu_check: {preset}: gradient checkpointing is not on", file=sys.stderr)
            return 1
    if device.type == "cuda":
        print("routed MoE layers ran under sync debug mode 'error' (forward and recomputation): no sync")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env", help="print the device; exit 2 without CUDA")
    tr = sub.add_parser("train-steps", help="bf16 training steps of each preset with gradient checkpointing")
    tr.add_argument("--cpu", action="store_true", help="toy size on CPU (tests the code path, no GPU needed)")
    tr.add_argument("--presets", nargs="+", default=["icedit", "x2edit"])
    tr.add_argument("--width", type=int, default=3072)
    tr.add_argument("--heads", type=int, default=24)
    tr.add_argument("--double", type=int, default=4)
    tr.add_argument("--single", type=int, default=8)
    tr.add_argument("--tokens", type=int, default=2048, help="image tokens of the diptych")
    tr.add_argument("--text-tokens", type=int, default=512)
    tr.add_argument("--text-dim", type=int, default=4096)
    tr.add_argument("--batch", type=int, default=4)
    tr.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    return {"env": cmd_env, "train-steps": cmd_train_steps}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
