"""ComfyUI-side sampling of ICEdit's early filter: candidates in batches, judging, the winner's run.

Everything goes through ComfyUI's own sampling entry point (`comfy.sample.sample_custom`, i.e. the
CFGGuider that KSampler uses): it loads and patches the model for the run and cleans up afterwards,
also when an interrupt is raised in the middle. The noise of candidate i is
`comfy.sample.prepare_noise(latent, seed_i)` and the sigmas are those `comfy.samplers.KSampler`
computes, so candidate i is exactly a plain KSampler run with seed_i (batched: up to float rounding).

`resume` splits one n-step schedule at step m. KSamplerAdvanced's way (return with leftover noise,
then add no noise) re-blends the inpaint region around the *intermediate* latent and so drifts from a
plain run when the latent has a noise mask. Here the second part instead gets the original noise and
source latent (the inpaint blend sees exactly what a plain run sees) and the sampler function starts
from the captured step-m state in place of the freshly noised latent. For single-step samplers
(euler, heun, ...) the continued winner equals a plain n-step run; multistep samplers restart their
history at step m, and ancestral samplers draw other noise after it, as with KSamplerAdvanced.
With ancestral / SDE samplers the candidates of one batch also share one noise sampler (seeded by the
batch's first seed), so their early results depend on the batch size; the paper-mode winner run is a
plain run of its seed either way.

The advanced node runs the same flow through a GUIDER's own `sample` (what SamplerCustomAdvanced
calls) with the connected SAMPLER and SIGMAS, so any guider works (CFG, basic, Kontext reference
latents in its conditioning); candidate i's noise is the connected NOISE with seed + i. Adaptive
selection interleaves: a batch is sampled and decoded, its candidates are scored, and the next batch is
drawn only if none reached the threshold.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..x2edit_core.early_filter import EarlyFilterPlan, adaptive_nfe_line, format_filter_report
from ..x2edit_core.errors import ConfigError
from ..x2edit_core.judges import Judge, LocalVLMJudge, image_to_pil
from ..x2edit_core.selection import SELECTIONS, select_adaptive, select_best, to_judge_image

__all__ = ["EarlyFilterResult", "run_early_filter", "run_early_filter_advanced", "schedule_sigmas"]


@dataclass
class EarlyFilterResult:
    winner_index: int
    winner_seed: int
    winner_latent: dict
    previews: torch.Tensor  # IMAGE batch, one per candidate drawn, in seed order
    report: str
    timings: dict[str, float]  # wall seconds per phase: candidates, previews, judge, winner
    cpu_timings: dict[str, float]  # this process's CPU seconds per phase (robust to a busy machine)
    drawn: int = 0  # candidates sampled (all M, or fewer when adaptive selection stopped early)
    nfe: int = 0  # sampler steps spent


def schedule_sigmas(model, sampler_name: str, scheduler: str, steps: int) -> torch.Tensor:
    """The sigmas KSampler uses for `steps` (with its discard-penultimate rule for some samplers)."""
    ksampler = comfy.samplers.KSampler(
        model,
        steps=steps,
        device=model.load_device,
        sampler=sampler_name,
        scheduler=scheduler,
        denoise=1.0,
        model_options=model.model_options,
    )
    return ksampler.sigmas.detach().clone()


def _sampler(sampler_name: str, start_x: torch.Tensor | None = None, capture: list | None = None):
    """ComfyUI's sampler `sampler_name`, optionally starting from `start_x` (the sampler's internal
    latent space) and recording its final internal state into `capture`."""
    return _wrap_sampler(
        comfy.samplers.sampler_object(sampler_name), f"The sampler {sampler_name!r}", start_x, capture
    )


def _noise(latent_image: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    # One prepare_noise call per seed on the batch-1 latent: what KSampler draws for that seed.
    return torch.cat([comfy.sample.prepare_noise(latent_image, seed) for seed in seeds], dim=0)


def _repeat_batch(tensor: torch.Tensor, count: int) -> torch.Tensor:
    return tensor.repeat((count,) + (1,) * (tensor.ndim - 1)) if count > 1 else tensor


class _PhaseClock:
    """Wall and CPU seconds of consecutive phases."""

    def __init__(self, wall: dict, cpu: dict):
        self.wall, self.cpu = wall, cpu
        self.started = (0.0, 0.0)

    def start(self) -> None:
        self.started = (time.perf_counter(), time.process_time())

    def stop(self, phase: str) -> None:
        """Add the time since start() to `phase` (phases interleave in adaptive selection)."""
        self.wall[phase] = self.wall.get(phase, 0.0) + time.perf_counter() - self.started[0]
        self.cpu[phase] = self.cpu.get(phase, 0.0) + time.process_time() - self.started[1]


class _Progress:
    """One ComfyUI progress bar over candidate steps, judge calls and the final steps."""

    def __init__(self, total: int):
        self.total = max(1, total)
        self.done = 0
        self.bar = comfy.utils.ProgressBar(self.total)

    def set(self, done: int) -> None:
        self.done = min(self.total, done)
        self.bar.update_absolute(self.done, self.total)

    def sampling_callback(self, base: int, per_step: int, on_step: Callable | None = None):
        def callback(step, x0, x, total_steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if on_step is not None:
                on_step(step, x0, total_steps)
            self.set(base + (step + 1) * per_step)

        return callback


def _sample(model, noise, sigmas, sampler, cfg, positive, negative, latent_image, noise_mask, seed, callback):
    return comfy.sample.sample_custom(
        model,
        noise,
        cfg,
        sampler,
        sigmas,
        positive,
        negative,
        latent_image,
        noise_mask=noise_mask,
        callback=callback,
        disable_pbar=True,
        seed=seed,
    )


def _decode(vae, samples: torch.Tensor) -> torch.Tensor:
    comfy.model_management.throw_exception_if_processing_interrupted()
    images = vae.decode(samples)
    if images.ndim == 5:  # video VAEs give [B, T, H, W, C]
        images = images.reshape(-1, *images.shape[-3:])
    return images


def _judge_original(source_image: torch.Tensor):
    if source_image.ndim != 4 or source_image.shape[0] < 1:
        raise ConfigError(
            f"The source image must be an IMAGE batch [B, H, W, C], got shape {tuple(source_image.shape)}."
        )
    return image_to_pil(source_image[:1])


def _free_memory_for_judge(judge: Judge) -> None:
    """Unload diffusion models from the GPU a local VLM judge is about to use."""
    if not isinstance(judge, LocalVLMJudge):
        return
    try:
        device = judge._device()
    except Exception:  # noqa: BLE001 - a bad device name is reported by the judge itself
        return
    if device.type == "cpu":
        return
    needed = int(judge.estimated_memory_bytes() * 1.25) + 1024**3  # weights + activations, roughly
    comfy.model_management.free_memory(needed, device)
    comfy.model_management.soft_empty_cache()


class _KSamplerBackend:
    """Candidates and winner as plain KSampler runs: model, conditioning, cfg, sampler and scheduler
    by name, noise from comfy.sample.prepare_noise."""

    def __init__(self, model, positive, negative, cfg, sampler_name, scheduler, latent: dict):
        self.model, self.positive, self.negative, self.cfg = model, positive, negative, cfg
        self.sampler_name, self.scheduler = sampler_name, scheduler
        self.latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        self.noise_mask = latent.get("noise_mask")

    def sampler(self, start_x=None, capture=None):
        return _sampler(self.sampler_name, start_x=start_x, capture=capture)

    def sigmas(self, steps: int) -> torch.Tensor:
        return schedule_sigmas(self.model, self.sampler_name, self.scheduler, steps)

    def sample(self, seeds, sigmas, sampler, callback):
        return _sample(
            self.model,
            _noise(self.latent_image, seeds),
            sigmas,
            sampler,
            self.cfg,
            self.positive,
            self.negative,
            _repeat_batch(self.latent_image, len(seeds)),
            self.noise_mask,
            seeds[0],
            callback,
        )

    def process_latent_out(self, x0):
        return self.model.model.process_latent_out(x0)


class _GuiderBackend:
    """Candidates and winner as SamplerCustomAdvanced runs: any GUIDER (CFG, basic, Kontext reference
    latents in its conditioning, ...), a SAMPLER object, given SIGMAS, and a NOISE whose seed is
    candidate 0's (candidate i: a copy of it with seed + i)."""

    def __init__(self, noise, guider, sampler, sigmas, early_sigmas, latent: dict):
        self.noise, self.guider, self.base_sampler = noise, guider, sampler
        self.full_sigmas, self.early_sigmas = sigmas, early_sigmas
        self.latent = latent.copy()
        self.latent_image = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent["samples"])
        self.latent["samples"] = self.latent_image
        self.noise_mask = latent.get("noise_mask")

    def sampler(self, start_x=None, capture=None):
        return _wrap_sampler(self.base_sampler, "the connected sampler", start_x=start_x, capture=capture)

    def sigmas(self, steps: int) -> torch.Tensor:
        if steps == len(self.full_sigmas) - 1:
            return self.full_sigmas
        if self.early_sigmas is not None and steps == len(self.early_sigmas) - 1:
            return self.early_sigmas
        raise ConfigError(f"No {steps}-step sigmas were connected.")  # plans are checked before this

    def noise_for(self, seed: int):
        noise = copy.copy(self.noise)
        noise.seed = seed
        return noise

    def sample(self, seeds, sigmas, sampler, callback):
        noise = torch.cat([self.noise_for(seed).generate_noise(self.latent) for seed in seeds], dim=0)
        samples = self.guider.sample(
            noise,
            _repeat_batch(self.latent_image, len(seeds)),
            sampler,
            sigmas,
            denoise_mask=self.noise_mask,
            callback=callback,
            disable_pbar=True,
            seed=seeds[0],
        )
        return samples.to(comfy.model_management.intermediate_device())

    def process_latent_out(self, x0):
        return self.guider.model_patcher.model.process_latent_out(x0)


def _wrap_sampler(base, name: str, start_x=None, capture=None):
    """`base` optionally starting from `start_x` and recording its final internal state (resume)."""
    if start_x is None and capture is None:
        return base
    if not isinstance(base, comfy.samplers.KSAMPLER):
        raise ConfigError(
            f"{name} cannot be split at step m for resume mode: use paper mode or a k-diffusion sampler "
            "such as euler."
        )
    inner_function = base.sampler_function

    def sampler_function(model, x, sigmas, *args, **kwargs):
        if start_x is not None:
            x = start_x.to(device=x.device, dtype=x.dtype)
        result = inner_function(model, x, sigmas, *args, **kwargs)
        if capture is not None:
            capture.append(result.detach())
        return result

    return comfy.samplers.KSAMPLER(sampler_function, base.extra_options, base.inpaint_options)


def _judge_holds_gpu(judge) -> bool:
    if not isinstance(judge, LocalVLMJudge):
        return False
    try:
        return judge._device().type != "cpu"
    except Exception:  # noqa: BLE001 - a bad device name is reported by the judge itself
        return False


def run_early_filter(
    plan: EarlyFilterPlan,
    *,
    model,
    positive,
    negative,
    latent: dict,
    vae,
    source_image: torch.Tensor,
    instruction: str,
    judge: Judge,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    judge_view: str = "right_panel",
    swap_check: bool = False,
    judge_deadline_s: float | None = None,
    keep_first_on_failure: bool = False,
    selection: str = "pairwise",
    threshold: float = 8.0,
) -> EarlyFilterResult:
    """The early filter with KSampler-style inputs (model, conditioning, sampler and scheduler names)."""
    backend = _KSamplerBackend(model, positive, negative, cfg, sampler_name, scheduler, latent)
    return _run(
        plan, backend, latent, vae, source_image, instruction, judge, judge_view, swap_check,
        judge_deadline_s, keep_first_on_failure, selection, threshold,
    )  # fmt: skip


def run_early_filter_advanced(
    plan: EarlyFilterPlan,
    *,
    noise,
    guider,
    sampler,
    sigmas: torch.Tensor,
    early_sigmas: torch.Tensor | None,
    latent: dict,
    vae,
    source_image: torch.Tensor,
    instruction: str,
    judge: Judge,
    judge_view: str = "right_panel",
    swap_check: bool = False,
    judge_deadline_s: float | None = None,
    keep_first_on_failure: bool = False,
    selection: str = "pairwise",
    threshold: float = 8.0,
) -> EarlyFilterResult:
    """The early filter with SamplerCustomAdvanced's inputs (NOISE, GUIDER, SAMPLER, SIGMAS)."""
    backend = _GuiderBackend(noise, guider, sampler, sigmas, early_sigmas, latent)
    if plan.candidates > 1:
        first, second = (backend.noise_for(seed).generate_noise(backend.latent) for seed in plan.seeds[:2])
        if torch.equal(first, second):
            raise ConfigError(
                f"The connected noise ({type(noise).__name__}) is the same for every seed, so all candidates "
                "would be the same edit: connect RandomNoise."
            )
    return _run(
        plan, backend, latent, vae, source_image, instruction, judge, judge_view, swap_check,
        judge_deadline_s, keep_first_on_failure, selection, threshold,
    )  # fmt: skip


def _run(
    plan: EarlyFilterPlan,
    backend,
    latent: dict,
    vae,
    source_image: torch.Tensor,
    instruction: str,
    judge: Judge,
    judge_view: str,
    swap_check: bool,
    judge_deadline_s: float | None,
    keep_first_on_failure: bool,
    selection: str,
    threshold: float,
) -> EarlyFilterResult:
    if selection not in SELECTIONS:
        raise ConfigError(f"Unknown selection {selection!r}: use one of {', '.join(SELECTIONS)}.")
    latent_image = backend.latent_image
    if latent_image.shape[0] != 1:
        raise ConfigError(
            "The early filter edits one image at a time, but the latent is a batch of "
            f"{latent_image.shape[0]}: split the batch (e.g. with Latent From Batch) and filter each "
            "image on its own."
        )
    adaptive = selection == "adaptive"
    seeds = plan.seeds
    judge_calls = plan.candidates if adaptive else (plan.candidates - 1) * (2 if swap_check else 1)
    progress = _Progress(plan.progress_total(judge_calls))
    timings: dict[str, float] = {}
    cpu_timings: dict[str, float] = {}
    clock = _PhaseClock(timings, cpu_timings)
    original = _judge_original(source_image)  # fails early, before any sampling

    candidate_sigmas = backend.sigmas(plan.candidate_schedule_steps)
    if plan.mode == "resume":
        candidate_sigmas = candidate_sigmas[: plan.early_steps + 1]
    resume_states: dict[int, torch.Tensor] = {}  # resume: the sampler's internal latent after step m
    previews: dict[int, torch.Tensor] = {}  # decoded early result per candidate drawn
    done = {"units": 0, "judged": 0}  # progress units of sampling/decoding, judge calls

    def draw(batch: list[int]) -> list:
        """Sample the candidates of `batch` for m steps and decode them; their images for the judge."""
        clock.start()
        batch_seeds = [seeds[i] for i in batch]
        last_x0: list[torch.Tensor] = []

        def keep_last_x0(step, x0, total_steps):
            if step == total_steps - 1:
                last_x0.append(x0.detach())

        capture: list[torch.Tensor] = []
        samples = backend.sample(
            batch_seeds,
            candidate_sigmas,
            backend.sampler(capture=capture if plan.mode == "resume" else None),
            progress.sampling_callback(
                done["units"] + done["judged"], len(batch), keep_last_x0 if plan.mode == "resume" else None
            ),
        )
        done["units"] += len(batch) * plan.early_steps
        if plan.mode == "resume":
            samples = backend.process_latent_out(last_x0[-1].to(torch.float32))
            samples = samples.to(comfy.model_management.intermediate_device())
            state = capture[-1].to(torch.float32).cpu()
            for position, index in enumerate(batch):
                resume_states[index] = state[position : position + 1]
        clock.stop("candidates")
        clock.start()
        # One at a time: ComfyUI sizes decode batches by free memory, which on CPU underestimates the
        # peak (6 diptychs of 1024x512 at once went past 24 GB); decoding is per image anyway.
        for position, index in enumerate(batch):
            previews[index] = _decode(vae, samples[position : position + 1])
            done["units"] += 1
            progress.set(done["units"] + done["judged"])
        clock.stop("previews")
        if adaptive and _judge_holds_gpu(judge):
            _free_memory_for_judge(judge)
        clock.start()
        return [to_judge_image(previews[i], judge_view) for i in batch]

    def judged(count: int, total: int) -> None:
        done["judged"] = count
        progress.set(done["units"] + count)

    labels = [f"seed {s}" for s in seeds]
    try:
        if adaptive:
            # The judge clock runs from each draw's end to the next draw's start.
            clock.start()
            result = select_adaptive(
                plan.batches,
                lambda batch: _drawn_then_judged(draw, batch, clock, judge),
                original,
                instruction,
                judge,
                threshold=threshold,
                labels=labels,
                progress=judged,
                should_stop=comfy.model_management.throw_exception_if_processing_interrupted,
                deadline_s=judge_deadline_s,
                keep_first_on_failure=keep_first_on_failure,
            )
            clock.stop("judge")
            drawn, warnings = result.drawn, result.warnings
        else:
            candidates = []
            for batch in plan.batches:
                candidates += draw(batch)
            clock.start()
            _free_memory_for_judge(judge)
            result = select_best(
                candidates,
                original,
                instruction,
                judge,
                swap_check=swap_check,
                labels=labels,
                progress=judged,
                should_stop=comfy.model_management.throw_exception_if_processing_interrupted,
                deadline_s=judge_deadline_s,
                keep_first_on_failure=keep_first_on_failure,
            )
            clock.stop("judge")
            drawn, warnings = plan.candidates, result.warnings
    finally:
        judge.release()
    winner = result.winner_index
    base = done["units"] + judge_calls
    progress.set(base)

    # --- winner ---
    clock.start()
    full_sigmas = backend.sigmas(plan.total_steps)
    if plan.mode == "paper":
        sigmas, sampler = full_sigmas, backend.sampler()
    else:
        sigmas, sampler = full_sigmas[plan.early_steps :], backend.sampler(start_x=resume_states[winner])
    samples = backend.sample([seeds[winner]], sigmas, sampler, progress.sampling_callback(base, 1))
    clock.stop("winner")
    progress.set(progress.total)

    winner_latent = latent.copy()
    winner_latent["samples"] = samples
    spent = dataclasses.replace(plan, candidates=drawn)
    extra = [adaptive_nfe_line(plan, drawn, threshold)] if adaptive else []
    report = format_filter_report(
        spent, winner, "\n".join(extra + [result.report]), timings, warnings=warnings
    )
    preview_batch = torch.cat([previews[i] for i in sorted(previews)], dim=0)
    return EarlyFilterResult(
        winner,
        seeds[winner],
        winner_latent,
        preview_batch,
        report,
        timings,
        cpu_timings,
        drawn=drawn,
        nfe=spent.nfe,
    )


def _drawn_then_judged(draw, batch, clock, judge):
    """Adaptive drawing: the judge phase pauses while a batch is sampled and decoded. A local judge on
    the GPU is released first, so the diffusion model gets its memory back."""
    clock.stop("judge")
    if _judge_holds_gpu(judge) and getattr(judge, "loaded", False):
        judge.release()
    return draw(batch)
