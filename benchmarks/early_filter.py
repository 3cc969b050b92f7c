"""Early filter: what each selection buys per NFE (simulated), then each mode's wall time over one plain
n-step run beside its NFE ratio (real sampling).

    /opt/ComfyUI/.venv/bin/python benchmarks/early_filter.py [--steps-scale 0.2] [--batch-sizes 1,2,6]
    .venv/bin/python benchmarks/early_filter.py --simulate-only      # the simulation, no ComfyUI

Simulation, with the project's real selection code (select_best, select_adaptive) and scripted judges:
each candidate's true final quality is q ~ N(6, 1.5) clipped to [0, 10] (an overall VIEScore-like
score); its early result shows q blurred by N(0, 0.7) (what m of n steps reveal), and each judge look
adds N(0, 0.3). The pairwise judge prefers the higher look; the scoring judge answers SC = PQ = the
look. Printed per policy, over --trials edits with M=6, m=10, n=50: expected NFE and its ratio to one
plain run, candidates drawn, judge calls, the chosen candidate's mean true quality and how often it
is at least 7. paper and resume choose alike here (both early views are assumed equally informative);
they differ in NFE. adaptive/paper re-runs the winner (n + K*m), adaptive/resume continues it
(K*m + n - m).

Runs inside one Python process that imports ComfyUI directly (COMFYUI_ROOT, default /opt/ComfyUI), so
the times are clean of HTTP and queueing. Model: a random FLUX Fill with hidden 256, 2 double + 2
single blocks (written with tests/tiny_models.py; the test support pack's detection hook loads it),
a tiny TAESD-layout VAE, a 512x512 source as a 1024x512 diptych (latent 128x64 = 2048 image tokens)
and 512 text tokens. Settings: M=6, m=10, n=50 (scaled by --steps-scale), euler / simple, cfg 1.

Printed: plain run time; per mode (paper NFE ratio 2.2, resume 2.0, and adaptive resume with a judge
that scores every candidate 9 of 10, so it stops after the first batch) the sampling time (candidates +
winner) over the plain run, the preview decoding and the judge (a trivial judge that always keeps the
current best) separately, and the total; then the candidate phase at each batch size against one by
one (the gain). Target: sampling ratio within 5% of the NFE ratio; batched no slower than one by one.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT", "/opt/ComfyUI")
sys.path[:0] = [COMFYUI_ROOT, os.path.join(ROOT, "tests")]
sys.path.append(ROOT)  # x2edit_core for the simulation (after ComfyUI, whose `nodes` must win)


def simulate(trials: int, candidates: int = 6, early: int = 10, total: int = 50, seed: int = 0) -> None:
    """Fixed best-of-M (pairwise running winner) against adaptive stopping, with the real selection code."""
    import random

    from x2edit_core.early_filter import nfe, plan_batches
    from x2edit_core.judges import Judge, JudgeVerdict
    from x2edit_core.judges.scoring import edit_score_from_answer
    from x2edit_core.selection import select_adaptive, select_best

    rng = random.Random(seed)
    look_noise = 0.3

    class Candidate:
        def __init__(self):
            self.quality = min(10.0, max(0.0, rng.gauss(6.0, 1.5)))
            self.early = self.quality + rng.gauss(0.0, 0.7)

        def look(self) -> float:
            return self.early + rng.gauss(0.0, look_noise)

    class PairwiseJudge(Judge):
        def compare(self, original, candidate_1, candidate_2, instruction):
            choice = 1 if candidate_1.look() >= candidate_2.look() else 2
            return JudgeVerdict(choice, "scripted", str(choice))

    class ScoringJudge(Judge):
        def score(self, source, edited, instruction, *, prompt_template=None):
            value = min(10.0, max(0.0, edited.look()))
            return edit_score_from_answer(f"SC: {value:.3f}, PQ: {value:.3f}")

    thresholds = (6.5, 7.0, 7.5)
    policies = [("plain (1 noise)", "plain", None, 1), ("oracle best of 6", "oracle", None, 1)]
    policies += [(f"{mode} best of {candidates}", mode, None, 1) for mode in ("paper", "resume")]
    policies += [(f"adaptive/paper t={t:g}", "paper", t, 1) for t in thresholds]
    policies += [(f"adaptive/resume t={t:g}", "resume", t, 1) for t in thresholds]
    policies += [("adaptive/resume t=7 b=2", "resume", 7.0, 2)]
    totals = {name: [0.0, 0.0, 0.0, 0.0, 0] for name, *_ in policies}  # nfe, drawn, calls, quality, >=7
    pairwise, scoring = PairwiseJudge(), ScoringJudge()
    for _ in range(trials):
        pool = [Candidate() for _ in range(candidates)]
        for name, mode, threshold, batch in policies:
            if mode == "plain":
                chosen, drawn, calls, spent = pool[0], 1, 0, total
            elif mode == "oracle":
                chosen, drawn, calls = max(pool, key=lambda c: c.quality), candidates, 0
                spent = nfe("paper", candidates, early, total)
            elif threshold is None:
                result = select_best(pool, None, "edit", pairwise)
                chosen, drawn, calls = pool[result.winner_index], candidates, result.judge_calls
                spent = nfe(mode, candidates, early, total)
            else:
                result = select_adaptive(
                    plan_batches(candidates, batch),
                    lambda indices, pool=pool: [pool[i] for i in indices],
                    None,
                    "edit",
                    scoring,
                    threshold=threshold,
                )
                chosen, drawn, calls = pool[result.winner_index], result.drawn, result.judge_calls
                spent = nfe(mode, drawn, early, total)
            row = totals[name]
            row[0] += spent
            row[1] += drawn
            row[2] += calls
            row[3] += chosen.quality
            row[4] += chosen.quality >= 7.0
    print(
        f"Simulated selection, {trials} edits, M={candidates}, m={early}, n={total}; true quality "
        "N(6, 1.5) clipped to 0-10, early look +N(0, 0.7), each judge look +N(0, 0.3)"
    )
    print(
        f"{'policy':26} {'NFE':>6} {'ratio':>6} {'drawn':>6} {'judge calls':>11} {'quality':>8} "
        f"{'P(q>=7)':>8}"
    )
    for name, *_ in policies:
        spent, drawn, calls, quality, good = (value / trials for value in totals[name])
        ratio = spent / total
        print(f"{name:26} {spent:6.1f} {ratio:6.2f} {drawn:6.2f} {calls:11.2f} {quality:8.3f} {good:8.3f}")


def load_module(name: str, path: str, package_dir: str | None = None):
    locations = [package_dir] if package_dir else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=locations)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--simulate-only", action="store_true", help="only the selection simulation")
    parser.add_argument("--trials", type=int, default=2000, help="simulated edits per policy")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale m and n (0.2: m=2, n=10)")
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2, help="candidates per batch in the mode runs")
    parser.add_argument("--batch-sizes", default="1,2,6", help="candidate-phase batch sizes to compare")
    parser.add_argument("--panel", type=int, default=512, help="source side in pixels (diptych 2x wide)")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--gpu", action="store_true", help="use the GPU when there is one (default CPU)")
    parser.add_argument(
        "--comfy-cpu-attention", action="store_true", help="keep ComfyUI's CPU attention (sub-quadratic)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default). 1 keeps CPU time a clean measure on a shared machine: "
        "with more, waiting threads spin and count as CPU time.",
    )
    args = parser.parse_args()
    simulate(args.trials)
    if args.simulate_only:
        return
    print()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import comfy.cli_args  # library import: defaults, no argv parsing

    comfy.cli_args.args.cpu = not (args.gpu and torch.cuda.is_available())
    # PyTorch SDPA attention, what ComfyUI picks by default on NVIDIA; its CPU default (sub-quadratic
    # attention) is several times slower and would only scale all runs alike.
    comfy.cli_args.args.use_pytorch_cross_attention = not args.comfy_cpu_attention
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.utils

    import nodes as comfy_nodes  # ComfyUI's nodes.py (InpaintModelConditioning)

    # The support pack's hook reads tiny FLUX widths from the tensor shapes.
    load_module("x2edit_test_support", os.path.join(ROOT, "tests", "comfy", "support_pack", "__init__.py"))
    pack = load_module("x2edit", os.path.join(ROOT, "__init__.py"), ROOT)
    del pack
    import tiny_models
    from x2edit.nodes.early_filter import run_early_filter, schedule_sigmas
    from x2edit.x2edit_core.early_filter import make_plan, nfe
    from x2edit.x2edit_core.judges import EditScore, Judge, JudgeVerdict

    class KeepFirstJudge(Judge):
        """A trivial judge: always keeps the current best, instantly (judge time is not the subject)."""

        def compare(self, original, candidate_1, candidate_2, instruction):
            return JudgeVerdict(1, "trivial judge", "1")

        def score(self, source, edited, instruction, *, prompt_template=None):
            return EditScore(9.0, 9.0, 9.0, "trivial judge", "SC: 9, PQ: 9")  # adaptive stops at once

        def describe(self):
            return "trivial judge"

    early = max(1, round(10 * args.steps_scale))
    total = max(early + 1, round(50 * args.steps_scale))
    M = args.candidates

    with tempfile.TemporaryDirectory() as tmp:
        unet_path = tiny_models.write_tiny_flux(
            os.path.join(tmp, "fill.safetensors"),
            variant="fill",
            seed=3,
            hidden_size=256,
            num_heads=4,
            depth=2,
            depth_single_blocks=2,
        )
        vae_path = tiny_models.write_tiny_vae(os.path.join(tmp, "vae.safetensors"), seed=4)
        model = comfy.sd.load_diffusion_model(str(unet_path))
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae_path)))

    config = model.model.model_config.unet_config
    generator = torch.Generator().manual_seed(0)
    cond = torch.randn((1, args.text_tokens, config["context_in_dim"]), generator=generator)
    pooled = torch.randn((1, config["vec_in_dim"]), generator=generator)
    positive = [[cond, {"pooled_output": pooled, "guidance": 50.0}]]
    negative = [[torch.zeros_like(cond), {"pooled_output": torch.zeros_like(pooled), "guidance": 50.0}]]
    side = args.panel
    source = torch.rand((1, side, side, 3), generator=generator)
    diptych = torch.cat([source, torch.zeros_like(source)], dim=2)
    mask = torch.zeros((1, side, 2 * side))
    mask[:, :, side:] = 1.0
    positive, negative, latent = comfy_nodes.InpaintModelConditioning().encode(
        positive, negative, diptych, vae, mask, noise_mask=True
    )
    latent_image = latent["samples"]
    tokens = (latent_image.shape[-1] // 2) * (latent_image.shape[-2] // 2)
    print(
        f"FLUX Fill hidden {config['hidden_size']}, {config['depth']} double + "
        f"{config['depth_single_blocks']} single blocks; diptych {2 * side}x{side}, latent "
        f"{tuple(latent_image.shape)}, {tokens} image + {args.text_tokens} text tokens; M={M}, m={early}, "
        f"n={total}; device {comfy.model_management.get_torch_device()}, "
        f"torch threads {torch.get_num_threads()}"
    )

    def plain_run(steps: int, seed: int = 0):
        sigmas = schedule_sigmas(model, "euler", "simple", steps)
        sampler = comfy.samplers.sampler_object("euler")
        noise = comfy.sample.prepare_noise(latent_image, seed)
        return comfy.sample.sample_custom(
            model, noise, 1.0, sampler, sigmas, positive, negative, latent_image,
            noise_mask=latent["noise_mask"], disable_pbar=True, seed=seed,
        )  # fmt: skip

    def timed_plain() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        plain_run(total)
        return time.perf_counter() - wall, time.process_time() - cpu

    plain_run(2)  # warm-up: model load, first-call allocations
    plain_before = timed_plain()

    judge = KeepFirstJudge()
    common = dict(
        model=model, positive=positive, negative=negative, latent=latent, vae=vae, source_image=source,
        instruction="make it red", judge=judge, cfg=1.0, sampler_name="euler", scheduler="simple",
    )  # fmt: skip
    runs = {}
    for mode, selection in (("paper", "pairwise"), ("resume", "pairwise"), ("resume", "adaptive")):
        plan = make_plan(mode, M, early, total, args.batch_size, 0)
        wall = time.perf_counter()
        result = run_early_filter(plan, selection=selection, threshold=8.0, **common)
        name = mode if selection == "pairwise" else "adapt."
        runs[name] = (nfe(mode, result.drawn, early, total), result, time.perf_counter() - wall)
    plain_after = timed_plain()
    plain_wall = (plain_before[0] + plain_after[0]) / 2
    plain_cpu = (plain_before[1] + plain_after[1]) / 2
    print(
        f"\nplain {total}-step run (before / after the modes): wall {plain_before[0]:.2f} / "
        f"{plain_after[0]:.2f} s, CPU {plain_before[1]:.2f} / {plain_after[1]:.2f} s "
        f"({plain_wall / total * 1000:.0f} ms wall per step)"
    )
    print(
        "\nsampling = candidates + winner run, over the plain run (mean of before/after); overhead = "
        "ratio / NFE ratio - 1.\nCPU time is this process's; it is robust to other load on the machine, "
        "wall time is not."
    )
    print(
        f"{'mode':7} {'NFE':>4} {'NFE ratio':>9} | {'wall':>7} {'ratio':>6} {'overhead':>8} | "
        f"{'CPU':>7} {'ratio':>6} {'overhead':>8} | {'previews':>8} {'judge':>6} {'total':>7} "
        f"{'total ratio':>11}"
    )
    for mode, (spent, result, wall) in runs.items():
        sampling_wall = result.timings["candidates"] + result.timings["winner"]
        sampling_cpu = result.cpu_timings["candidates"] + result.cpu_timings["winner"]
        wall_ratio, cpu_ratio = sampling_wall / plain_wall, sampling_cpu / plain_cpu
        nfe_ratio = spent / total
        print(
            f"{mode:7} {spent:4d} {nfe_ratio:9.2f} | {sampling_wall:6.1f}s {wall_ratio:6.2f} "
            f"{(wall_ratio / nfe_ratio - 1) * 100:+7.1f}% | {sampling_cpu:6.1f}s {cpu_ratio:6.2f} "
            f"{(cpu_ratio / nfe_ratio - 1) * 100:+7.1f}% | {result.timings['previews']:7.1f}s "
            f"{result.timings['judge']:5.3f}s {wall:6.1f}s {wall / plain_wall:11.2f}"
        )

    print(f"\ncandidate phase ({M} x {early} steps of the paper schedule) by batch size:")
    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    times = {}
    for size in sizes:
        plan = make_plan("paper", M, early, early, size, 0)  # n = m: a short winner run, not timed here
        result = run_early_filter(plan, **common)
        times[size] = (result.timings["candidates"], result.cpu_timings["candidates"])
    base = times.get(1)
    for size, (wall, cpu) in times.items():
        gain = f"  gain over one by one: wall {base[0] / wall:.2f}x, CPU {base[1] / cpu:.2f}x" if base else ""
        print(f"  batch {size}: wall {wall:7.2f} s, CPU {cpu:7.2f} s{gain}")
    comfy.model_management.unload_all_models()


if __name__ == "__main__":
    import torch

    with torch.inference_mode():  # as ComfyUI's executor runs nodes; else autograd keeps activations
        main()
