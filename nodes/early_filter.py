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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..x2edit_core.early_filter import EarlyFilterPlan, format_filter_report
from ..x2edit_core.errors import ConfigError
from ..x2edit_core.judges import Judge, LocalVLMJudge, image_to_pil
from ..x2edit_core.selection import select_best, to_judge_image

__all__ = ["EarlyFilterResult", "run_early_filter", "schedule_sigmas"]


@dataclass
class EarlyFilterResult:
    winner_index: int
    winner_seed: int
    winner_latent: dict
    previews: torch.Tensor  # IMAGE batch, one per candidate in seed order
    report: str
    timings: dict[str, float]  # wall seconds per phase: candidates, previews, judge, winner
    cpu_timings: dict[str, float]  # this process's CPU seconds per phase (robust to a busy machine)


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
    base = comfy.samplers.sampler_object(sampler_name)
    if start_x is None and capture is None:
        return base
    if not isinstance(base, comfy.samplers.KSAMPLER):
        raise ConfigError(
            f"The sampler {sampler_name!r} cannot be split at step m for resume mode: use paper mode "
            "or a k-diffusion sampler such as euler."
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
        self.wall[phase] = time.perf_counter() - self.started[0]
        self.cpu[phase] = time.process_time() - self.started[1]


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
) -> EarlyFilterResult:
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    if latent_image.shape[0] != 1:
        raise ConfigError(
            "The early filter edits one image at a time, but the latent is a batch of "
            f"{latent_image.shape[0]}: split the batch (e.g. with Latent From Batch) and filter each "
            "image on its own."
        )
    noise_mask = latent.get("noise_mask")
    seeds = plan.seeds
    judge_calls = (plan.candidates - 1) * (2 if swap_check else 1)
    progress = _Progress(plan.progress_total(judge_calls))
    timings: dict[str, float] = {}
    cpu_timings: dict[str, float] = {}
    clock = _PhaseClock(timings, cpu_timings)
    original = _judge_original(source_image)  # fails early, before any sampling

    # --- candidates, in batches ---
    clock.start()
    candidate_sigmas = schedule_sigmas(model, sampler_name, scheduler, plan.candidate_schedule_steps)
    if plan.mode == "resume":
        candidate_sigmas = candidate_sigmas[: plan.early_steps + 1]
    early_latents: list[torch.Tensor] = []  # paper: finished m-step latents; resume: x0 at step m
    resume_states: list[torch.Tensor] = []  # resume: the sampler's internal latent after step m
    done_steps = 0
    for batch in plan.batches:
        batch_seeds = [seeds[i] for i in batch]
        last_x0: list[torch.Tensor] = []

        def keep_last_x0(step, x0, total_steps, last_x0=last_x0):
            if step == total_steps - 1:
                last_x0.append(x0.detach())

        capture: list[torch.Tensor] = []
        sampler = _sampler(sampler_name, capture=capture if plan.mode == "resume" else None)
        samples = _sample(
            model,
            _noise(latent_image, batch_seeds),
            candidate_sigmas,
            sampler,
            cfg,
            positive,
            negative,
            _repeat_batch(latent_image, len(batch)),
            noise_mask,
            batch_seeds[0],
            progress.sampling_callback(
                done_steps, len(batch), keep_last_x0 if plan.mode == "resume" else None
            ),
        )
        done_steps += len(batch) * plan.early_steps
        if plan.mode == "paper":
            early_latents.append(samples)
        else:
            x0 = model.model.process_latent_out(last_x0[-1].to(torch.float32))
            early_latents.append(x0.to(comfy.model_management.intermediate_device()))
            resume_states.append(capture[-1].to(torch.float32).cpu())
    clock.stop("candidates")

    # --- previews ---
    clock.start()
    early = torch.cat(early_latents, dim=0)
    # One at a time: ComfyUI sizes decode batches by free memory, which on CPU underestimates the peak
    # (6 diptychs of 1024x512 at once went past 24 GB); decoding is per image anyway.
    decoded = []
    for i in range(early.shape[0]):
        decoded.append(_decode(vae, early[i : i + 1]))
        progress.set(done_steps + i + 1)
    previews = torch.cat(decoded, dim=0)
    done_steps += plan.candidates  # one progress unit per decoded preview
    clock.stop("previews")

    # --- judge ---
    clock.start()
    candidates = [to_judge_image(previews[i : i + 1], judge_view) for i in range(plan.candidates)]
    try:
        _free_memory_for_judge(judge)
        selection = select_best(
            candidates,
            original,
            instruction,
            judge,
            swap_check=swap_check,
            labels=[f"seed {s}" for s in seeds],
            progress=lambda done, total: progress.set(done_steps + done),
            should_stop=comfy.model_management.throw_exception_if_processing_interrupted,
            deadline_s=judge_deadline_s,
            keep_first_on_failure=keep_first_on_failure,
        )
    finally:
        judge.release()
    clock.stop("judge")
    winner = selection.winner_index
    base = done_steps + judge_calls
    progress.set(base)

    # --- winner ---
    clock.start()
    winner_noise = _noise(latent_image, [seeds[winner]])
    if plan.mode == "paper":
        sigmas = schedule_sigmas(model, sampler_name, scheduler, plan.total_steps)
        sampler = _sampler(sampler_name)
    else:
        sigmas = schedule_sigmas(model, sampler_name, scheduler, plan.total_steps)[plan.early_steps :]
        batch_number, position = _batch_position(plan, winner)
        start_x = resume_states[batch_number][position : position + 1]
        sampler = _sampler(sampler_name, start_x=start_x)
    samples = _sample(
        model,
        winner_noise,
        sigmas,
        sampler,
        cfg,
        positive,
        negative,
        latent_image,
        noise_mask,
        seeds[winner],
        progress.sampling_callback(base, 1),
    )
    clock.stop("winner")
    progress.set(progress.total)

    winner_latent = latent.copy()
    winner_latent["samples"] = samples
    report = format_filter_report(plan, winner, selection.report, timings, warnings=selection.warnings)
    return EarlyFilterResult(winner, seeds[winner], winner_latent, previews, report, timings, cpu_timings)


def _batch_position(plan: EarlyFilterPlan, index: int) -> tuple[int, int]:
    """(batch number, position inside the batch) of candidate `index`."""
    return index // plan.batch_size, index % plan.batch_size
