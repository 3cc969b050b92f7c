"""Synthetic task suite (CPU, minutes): four procedural edits, each preset trained on a tiny FLUX Fill.

Tasks (with X2Edit task ids as labels): recolour the square (5 color_change), invert the colours
(11 tone_change), flip horizontally (12 camera_move), shift right by a quarter (7 action_change).
Images are generated (a background, a square and a disc). The transformer and VAE are tiny and
random; only the adapters learn, so the numbers show what each adapter design can learn, not
image quality.

Each seed draws its own data and its own random base model; every model is trained once per seed.
Printed per model, as mean +- spread (standard deviation over the seeds): trainable parameters,
training seconds, flow loss at the start/end of training (means of the first/last tenth of the
steps), held-out edit error (latent MSE of the edited half after Euler sampling from noise) before
and after training, X2Edit's contrastive loss (the training loss's exact form) of double-block
features of a fixed set of training samples and of the held-out set before/after training, and
routing purity per task: the share of a task's tokens whose top-k experts include the task's most
used expert (counts summed over the MoE layers; 1.0 = one expert per task).

The plain LoRA baseline sits on X2Edit's sites (q/k/v everywhere, the attention output projection
in double blocks) with its rank chosen to match the x2edit model's parameter count.

``--text blind`` encodes every prompt as the same fixed sentence, so the instruction no longer tells the
model the task and only the task-aware model (through its task embedding) knows it; by default
(``instruction``) the text names the task as plainly as the label does.

Two checks close the run: the task-aware x2edit model must beat the parameter-matched plain LoRA on
held-out edit error by more than the spread (the larger of the two standard deviations), and its
contrastive loss on the training samples must fall in every seed.

    OMP_NUM_THREADS=1 python benchmarks/synthetic_tasks.py     # 3 seeds x 3 models, 10-15 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from train.config import make_config  # noqa: E402
from train.data import BadRecordTracker, EditData, HashTextEncoder, read_sources  # noqa: E402
from train.model import pack_latents  # noqa: E402
from train.trainer import Trainer, euler_edit  # noqa: E402
from x2edit_core.losses import contrastive_loss_over_blocks  # noqa: E402

# task id -> phrasings of its instruction (records cycle through them, so the wording varies while
# the task label stays clean, as with X2Edit's classifier)
TASKS = {
    5: ("recolour the square green", "make the red box green", "paint the square in green", "green square"),
    11: (
        "invert the colours",
        "make a negative of the picture",
        "swap every colour for its opposite",
        "negative",
    ),
    12: (
        "flip the image horizontally",
        "mirror the picture",
        "mirror left and right",
        "make it a mirror image",
    ),
    7: (
        "shift everything to the right",
        "move the picture right",
        "slide the scene to the right",
        "pan left",
    ),
}
LATENT_CHANNELS, VAE_SCALE = 4, 2


def transformer(width: int, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    heads = max(1, width // 16)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=8 * LATENT_CHANNELS + 4 * VAE_SCALE * VAE_SCALE,
        out_channels=4 * LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=heads,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    with torch.no_grad():  # diffusers zero-inits some output layers; give every path a signal
        for p in model.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=32,
    )


class BlindTextEncoder(HashTextEncoder):
    """Every prompt encodes as the same sentence: the text carries no task."""

    def encode(self, prompts: list[str]):
        return super().encode(["an edit"] * len(prompts))


def make_scene(gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image [3, S, S] in 0..1, square mask [S, S])."""
    img = torch.rand(3, 1, 1, generator=gen).expand(3, size, size).clone() * 0.6
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = int(torch.randint(size // 8, size // 4, (1,), generator=gen))
    cy, cx = (int(v) for v in torch.randint(r, size - r, (2,), generator=gen))
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img[:, disc] = torch.rand(3, 1, generator=gen)
    s = int(torch.randint(size // 6, size // 3, (1,), generator=gen))
    y0, x0 = (int(v) for v in torch.randint(0, size - s, (2,), generator=gen))
    square = torch.zeros(size, size, dtype=torch.bool)
    square[y0 : y0 + s, x0 : x0 + s] = True
    img[:, square] = torch.tensor([0.9, 0.2, 0.2]).view(3, 1)
    return img, square


def apply_task(task: int, img: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
    if task == 5:
        out = img.clone()
        out[:, square] = torch.tensor([0.1, 0.85, 0.2]).view(3, 1)
        return out
    if task == 11:
        return 1.0 - img
    if task == 12:
        return img.flip(-1)
    return img.roll(img.shape[-1] // 4, dims=-1)


def write_split(folder: str, per_task: int, size: int, seed: int) -> str:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    lines = []
    for task, phrasings in TASKS.items():
        for i in range(per_task):
            text = phrasings[i % len(phrasings)]
            img, square = make_scene(gen, size)
            tgt = apply_task(task, img, square)
            names = []
            for kind, x in (("src", img), ("tgt", tgt)):
                name = f"{kind}_{task}_{i}.png"
                arr = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
                Image.fromarray(arr).save(os.path.join(folder, name))
                names.append(name)
            lines.append({"source": names[0], "target": names[1], "instruction": text, "task": task})
    path = os.path.join(folder, "manifest.jsonl")
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(x) + "\n" for x in lines)
    return path


def model_configs(args) -> dict[str, dict]:
    r = args.rank
    common = dict(rank=r, num_experts=args.experts, plain_rank=r)
    return {
        "icedit": dict(preset="icedit", **common),
        "x2edit": dict(preset="x2edit", **common),
        # filled in once the x2edit parameter count is known
        "plain LoRA": dict(
            preset="custom",
            router="forced",
            num_experts=1,
            moe_targets=[
                "transformer_blocks.*.attn.to_q",
                "transformer_blocks.*.attn.to_k",
                "transformer_blocks.*.attn.to_v",
                "transformer_blocks.*.attn.to_out.0@output",
                "single_transformer_blocks.*.attn.to_q",
                "single_transformer_blocks.*.attn.to_k",
                "single_transformer_blocks.*.attn.to_v",
            ],
            plain_rank=0,
            contrastive_weight=0.0,
        ),
    }


@torch.no_grad()
def probe_contrastive(trainer: Trainer, data: EditData, indices: list[int], batch_size: int) -> float:
    """X2Edit's contrastive loss of the double-block features of ``indices`` (one fixed draw of noise and
    timesteps), all samples as one global batch."""
    model = trainer.model
    was_training = model.training
    model.eval()
    feats_all, tasks_all = None, []
    for start in range(0, len(indices), batch_size):
        batch = data.load_batch(indices[start : start + batch_size])
        inputs = trainer.model_inputs(batch, first_sample=-(10**7) + start)
        probe = {k: v for k, v in inputs.items() if k not in ("target", "latent_hw")}
        _, feats = model(**probe, capture=True)
        feats_all = feats if feats_all is None else [torch.cat([a, b]) for a, b in zip(feats_all, feats)]
        tasks_all.append(batch["tasks"])
    model.train(was_training)
    tau = trainer.cfg.contrastive_tau
    return contrastive_loss_over_blocks(feats_all, torch.cat(tasks_all), None, tau).item()


@torch.no_grad()
def evaluate(trainer: Trainer, held: EditData, batch_size: int, steps: int) -> dict:
    model = trainer.model
    model.eval()
    err, n = 0.0, 0
    feats_all, tasks_all = None, []
    ctx = model.context
    ctx.usage = None
    for start in range(0, len(held), batch_size):
        idx = list(range(start, min(start + batch_size, len(held))))
        batch = held.load_batch(idx)
        inputs = trainer.model_inputs(batch, first_sample=-(10**6) + start)
        mask = inputs["token_mask"]
        x0 = pack_latents(batch["x0"]).to(inputs["hidden_states"].device)
        out = euler_edit(model, inputs, x0.shape[-1], steps)
        err += ((out - x0)[:, mask] ** 2).mean(dim=(1, 2)).sum().item()
        n += len(idx)
        ctx.record_usage = True
        probe = {k: v for k, v in inputs.items() if k not in ("target", "latent_hw")}
        _, feats = model(**probe, capture=True)
        ctx.record_usage = False
        feats_all = feats if feats_all is None else [torch.cat([a, b]) for a, b in zip(feats_all, feats)]
        tasks_all.append(batch["tasks"])
    tasks = torch.cat(tasks_all)
    con = contrastive_loss_over_blocks(feats_all, tasks, None, trainer.cfg.contrastive_tau).item()
    purity = {}
    if ctx.usage is not None:
        routed = [a.moe.config for a in model.moe_adapters() if a.moe.config.router != "forced"]
        k = routed[0].top_k if routed else 1
        for t in TASKS:
            row = ctx.usage[t]
            if row.sum() > 0:  # share of the task's tokens whose top-k includes its most used expert
                purity[t] = (row.max() / row.sum() * k).item()
    model.train()
    return {"edit_error": err / n, "contrastive": con, "purity": purity}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--size", type=int, default=32, help="panel side in pixels")
    ap.add_argument("--train-per-task", type=int, default=48)
    ap.add_argument("--held-per-task", type=int, default=16)
    ap.add_argument("--probe-per-task", type=int, default=8, help="training samples per task in the probe")
    ap.add_argument("--sample-steps", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None, help="subset of models to run")
    ap.add_argument(
        "--text",
        default="instruction",
        choices=("instruction", "blind"),
        help="blind: every prompt encodes as one fixed sentence (the task label is the only task signal)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = []
    for seed in args.seeds:
        work = tempfile.mkdtemp(prefix="x2edit-synth-")
        try:
            rows += _run(args, work, seed)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    summary = report(args, rows, time.time() - t0)
    return {"rows": rows, "summary": summary}


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def report(args, rows: list[dict], seconds: float) -> dict:
    """Print the table over seeds and the two checks; returns the checks' numbers."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    print(
        f"synthetic tasks: {args.steps} steps x batch {args.batch}, width {args.width}, rank {args.rank}, "
        f"seeds {args.seeds}, text {args.text}, {torch.get_num_threads()} threads, "
        f"{seconds / 60:.1f} min in all"
    )
    print("mean +- spread (standard deviation over the seeds)")
    cols = [
        ("params", "params", "{:.0f}"),
        ("seconds", "train s", "{:.0f}"),
        ("flow_start", "flow start", "{:.4f}"),
        ("flow_end", "flow end", "{:.4f}"),
        ("err_before", "edit err untrained", "{:.4f}"),
        ("err_after", "edit err trained", "{:.4f}"),
        ("probe_con_before", "train con before", "{:.3f}"),
        ("probe_con_after", "train con after", "{:.3f}"),
        ("con_before", "held con before", "{:.3f}"),
        ("con_after", "held con after", "{:.3f}"),
    ]
    print(f"{'model':11} " + " ".join(f"{title:>19}" for _, title, _ in cols))
    stats = {}
    for m in models:
        mine = [r for r in rows if r["model"] == m]
        stats[m] = {}
        cells = []
        for key, _, fmt in cols:
            vals = [r[key] for r in mine]
            mean, spread = statistics.fmean(vals), _spread(vals)
            stats[m][key] = (mean, spread)
            cells.append(f"{fmt.format(mean)} +- {fmt.format(spread)}")
        print(f"{m:11} " + " ".join(f"{c:>19}" for c in cells))
    print("during training (mean of the first > last tenth of the logged steps, per seed):")
    for r in rows:
        purity = " ".join(f"{t}:{p:.2f}" for t, p in r["purity"].items()) or "-"
        print(
            f"  seed {r['seed']} {r['model']:11} contrastive {r['train_con_start']:.3f} > "
            f"{r['train_con_end']:.3f}"
            f"  flow {r['flow_start']:.4f} > {r['flow_end']:.4f}  purity {purity}"
        )
    summary = {}
    if "x2edit" in stats and "plain LoRA" in stats:
        (mx, sx), (mp, sp) = stats["x2edit"]["err_after"], stats["plain LoRA"]["err_after"]
        margin, spread = mp - mx, max(sx, sp)
        paired = [
            p["err_after"] - x["err_after"]
            for x in rows
            if x["model"] == "x2edit"
            for p in rows
            if p["model"] == "plain LoRA" and p["seed"] == x["seed"]
        ]
        ok = margin > spread
        summary["edit_error"] = {"margin": margin, "spread": spread, "paired": paired, "ok": ok}
        print(
            f"check 1: held-out edit error, plain LoRA - x2edit = {margin:.4f} (per seed: "
            + ", ".join(f"{d:.4f}" for d in paired)
            + f"); spread {spread:.4f}: {'PASS' if ok else 'FAIL'} "
            "(x2edit must be lower by more than the spread)"
        )
    if "x2edit" in stats:
        mine = [r for r in rows if r["model"] == "x2edit"]
        drops = [r["probe_con_before"] - r["probe_con_after"] for r in mine]
        ok = all(d > 0 for d in drops)
        summary["contrastive"] = {"drops": drops, "ok": ok}
        print(
            "check 2: x2edit contrastive loss on training samples, before - after = "
            + ", ".join(f"{d:.3f}" for d in drops)
            + f" per seed: {'PASS' if ok else 'FAIL'} (must fall in every seed)"
        )
    return summary


def _run(args, work: str, seed: int) -> list[dict]:
    train_manifest = write_split(os.path.join(work, "train"), args.train_per_task, args.size, seed)
    held_manifest = write_split(os.path.join(work, "held"), args.held_per_task, args.size, seed + 1000)
    configs = model_configs(args)
    rows, x2edit_params = [], None
    for name, extra in configs.items():
        if args.only and name not in args.only:
            continue
        if name == "plain LoRA":
            if x2edit_params is None:  # size it from an x2edit model without training it
                probe = make_config(data=[train_manifest], **configs["x2edit"])
                t = transformer(args.width, seed)
                from train.model import EditModel
                from train.presets import resolve_placement

                x2edit_params = sum(
                    p.numel() for p in EditModel(t, resolve_placement(probe, t)).trainable_parameters()
                )
            t = transformer(args.width, seed)
            sites = sum(
                m.in_features + m.out_features
                for n, m in t.named_modules()
                if isinstance(m, torch.nn.Linear)
                and n.split(".")[-1] in ("to_q", "to_k", "to_v", "0")
                and "attn" in n
            )
            extra = dict(extra, rank=max(1, round(x2edit_params / sites)))
        cfg = make_config(
            data=[train_manifest],
            resolution=args.size,
            text_encoder="hash",
            batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=args.lr,
            checkpoint_every=0,
            log_every=0,
            usage_every=0,
            tensorboard=False,
            progress=False,
            seed=seed,
            output_dir=os.path.join(work, "run-" + name.replace(" ", "_")),
            **extra,
        )
        enc = HashTextEncoder(32, 16) if args.text == "instruction" else BlindTextEncoder(32, 16)
        trainer = Trainer(cfg, transformer=transformer(args.width, seed), vae=vae(seed), text_encoder=enc)
        tracker = BadRecordTracker()
        held = EditData(
            read_sources([held_manifest], tracker=tracker),
            args.size,
            False,
            trainer.latent_encoder,
            enc,
            tracker,
        )
        train_records = read_sources([train_manifest], tracker=tracker)
        probe_idx = _probe_indices(args.train_per_task, args.probe_per_task)
        probe_data = EditData(
            [train_records[i] for i in probe_idx], args.size, False, trainer.latent_encoder, enc, tracker
        )
        probe_idx = list(range(len(probe_idx)))
        trainer.cfg.text_dropout, dropout = 0.0, trainer.cfg.text_dropout  # no dropout while evaluating
        before = evaluate(trainer, held, args.batch, args.sample_steps)
        probe_before = probe_contrastive(trainer, probe_data, probe_idx, args.batch)
        trainer.cfg.text_dropout = dropout
        t0 = time.time()
        result = trainer.run()
        seconds = time.time() - t0
        trainer.cfg.text_dropout = 0.0
        after = evaluate(trainer, held, args.batch, args.sample_steps)
        probe_after = probe_contrastive(trainer, probe_data, probe_idx, args.batch)
        if name == "x2edit":
            x2edit_params = trainer.num_trainable
        hist = result["history"]
        k = max(1, len(hist) // 10)
        rows.append(
            {
                "model": name,
                "seed": seed,
                "params": trainer.num_trainable,
                "seconds": seconds,
                "err_before": before["edit_error"],
                "err_after": after["edit_error"],
                "con_before": before["contrastive"],
                "con_after": after["contrastive"],
                "probe_con_before": probe_before,
                "probe_con_after": probe_after,
                "train_con_start": sum(h["contrastive"] for h in hist[:k]) / k,
                "train_con_end": sum(h["contrastive"] for h in hist[-k:]) / k,
                "flow_start": sum(h["flow"] for h in hist[:k]) / k,
                "flow_end": sum(h["flow"] for h in hist[-k:]) / k,
                "purity": after["purity"],
            }
        )
    return rows


def _probe_indices(per_task_total: int, per_task: int) -> list[int]:
    """The first ``per_task`` training records of each task (write_split writes tasks in blocks)."""
    n = min(per_task, per_task_total)
    return [t * per_task_total + i for t in range(len(TASKS)) for i in range(n)]


if __name__ == "__main__":
    main()
