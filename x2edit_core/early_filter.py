"""Planning maths of ICEdit's early filter (inference-time noise selection), without ComfyUI.

ICEdit (section 3.3) samples M noises, runs a short edit of m steps for each, lets a VLM keep the
best early result and runs the winning noise for the full n steps. Two ways to get the early result:

- `paper`: each candidate runs its own complete m-step schedule; the winner is then re-run from its
  noise with the n-step schedule. NFE = n + M*m (the paper's accounting: 6x10 + 50 = 110).
- `resume`: each candidate runs the first m steps of the n-step schedule and is judged on the
  predicted x0 at that point; the winner continues from step m. NFE = M*m + (n - m).

With adaptive selection (x2edit_core.selection.select_adaptive) candidates are drawn batch by batch
and drawing stops once one scores well enough: the NFE above then counts the K <= M candidates
drawn, n + K*m or K*m + n - m.

NFE here counts sampler steps (one model evaluation per step for first-order samplers such as euler;
second-order samplers take more per step, in every mode alike). Candidate i uses seed `seed + i`
(wrapping at 2**64, ComfyUI's seed range), so candidate 0 is the plain run of the given seed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

__all__ = [
    "MODES",
    "SEED_MODULUS",
    "EarlyFilterPlan",
    "adaptive_nfe_line",
    "candidate_seeds",
    "format_filter_report",
    "make_plan",
    "nfe",
    "plain_nfe",
    "plan_batches",
]

MODES = ("paper", "resume")
SEED_MODULUS = 2**64  # ComfyUI seeds are 0 .. 0xFFFF_FFFF_FFFF_FFFF


def nfe(mode: str, candidates: int, early_steps: int, total_steps: int) -> int:
    """Sampler steps of the whole filter: paper n + M*m, resume M*m + n - m."""
    _check_mode(mode)
    if mode == "paper":
        return total_steps + candidates * early_steps
    return candidates * early_steps + total_steps - early_steps


def plain_nfe(total_steps: int) -> int:
    """Sampler steps of one plain run without the filter (the baseline the ratios divide by)."""
    return total_steps


def candidate_seeds(seed: int, candidates: int) -> list[int]:
    """Seeds of the M candidates: seed, seed + 1, ... (wrapping within ComfyUI's 64-bit range)."""
    if candidates < 1:
        raise ConfigError(f"The early filter needs at least 1 candidate, got {candidates}.")
    if not 0 <= seed < SEED_MODULUS:
        raise ConfigError(f"Seed {seed} is outside ComfyUI's range 0 .. {SEED_MODULUS - 1}.")
    return [(seed + i) % SEED_MODULUS for i in range(candidates)]


def plan_batches(candidates: int, batch_size: int) -> list[list[int]]:
    """Candidate indices grouped into model batches of at most `batch_size`, in order."""
    if candidates < 1:
        raise ConfigError(f"The early filter needs at least 1 candidate, got {candidates}.")
    if batch_size < 1:
        raise ConfigError(
            f"The candidate batch size must be at least 1, got {batch_size}: use 1 for one candidate "
            "at a time, or more to send several through the model together."
        )
    return [
        list(range(start, min(start + batch_size, candidates))) for start in range(0, candidates, batch_size)
    ]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"Unknown early-filter mode {mode!r}: use one of {', '.join(MODES)}.")


@dataclass(frozen=True)
class EarlyFilterPlan:
    """What one early-filter run does: candidates, schedules, batches, NFE and progress units."""

    mode: str
    candidates: int
    early_steps: int
    total_steps: int
    batch_size: int
    seed: int

    @property
    def seeds(self) -> list[int]:
        return candidate_seeds(self.seed, self.candidates)

    @property
    def batches(self) -> list[list[int]]:
        return plan_batches(self.candidates, self.batch_size)

    @property
    def candidate_schedule_steps(self) -> int:
        """Length of the sigma schedule the candidates run on (they run its first m steps)."""
        return self.early_steps if self.mode == "paper" else self.total_steps

    @property
    def final_steps(self) -> int:
        """Steps the winner runs after the selection: n (paper re-run) or n - m (resume)."""
        return self.total_steps if self.mode == "paper" else self.total_steps - self.early_steps

    @property
    def nfe(self) -> int:
        return nfe(self.mode, self.candidates, self.early_steps, self.total_steps)

    @property
    def nfe_ratio(self) -> float:
        """NFE relative to one plain n-step run (paper 6x10 of 50: 2.2; resume: 2.0)."""
        return self.nfe / plain_nfe(self.total_steps)

    def progress_total(self, judge_calls: int) -> int:
        """Progress-bar units: one per candidate step, one per preview decode, one per judge call, one
        per final step."""
        return self.candidates * self.early_steps + self.candidates + judge_calls + self.final_steps

    def describe(self) -> str:
        return (
            f"mode {self.mode}: {self.candidates} candidate(s) x {self.early_steps} early step(s)"
            + (" (own schedule)" if self.mode == "paper" else f" (of the {self.total_steps}-step schedule)")
            + f", winner {'re-run for' if self.mode == 'paper' else 'continued for'} {self.final_steps} "
            f"step(s); batches of {self.batch_size}; NFE {self.nfe} = {self.nfe_ratio:.2f}x a plain "
            f"{self.total_steps}-step run"
        )


def make_plan(
    mode: str, candidates: int, early_steps: int, total_steps: int, batch_size: int, seed: int
) -> EarlyFilterPlan:
    """A validated plan; every error says which option to change."""
    _check_mode(mode)
    if candidates < 1:
        raise ConfigError(f"The early filter needs at least 1 candidate, got {candidates}.")
    if early_steps < 1:
        raise ConfigError(f"The early steps m must be at least 1, got {early_steps}.")
    if total_steps < 1:
        raise ConfigError(f"The total steps n must be at least 1, got {total_steps}.")
    if mode == "resume" and early_steps >= total_steps:
        raise ConfigError(
            f"In resume mode the early steps m ({early_steps}) must be fewer than the total steps n "
            f"({total_steps}), since the winner continues from step m: lower m or raise n."
        )
    if mode == "paper" and early_steps > total_steps:
        raise ConfigError(
            f"The early steps m ({early_steps}) exceed the total steps n ({total_steps}): the early "
            "run is meant to be the short one; lower m or raise n."
        )
    plan_batches(candidates, batch_size)  # validates batch_size
    candidate_seeds(seed, candidates)  # validates seed
    return EarlyFilterPlan(mode, candidates, early_steps, total_steps, min(batch_size, candidates), seed)


def format_filter_report(
    plan: EarlyFilterPlan,
    winner_index: int,
    selection_report: str,
    timings: dict[str, float] | None = None,
    warnings: tuple[str, ...] | list[str] = (),
) -> str:
    """The node's STRING report: warnings first, then plan and NFE, the selection's comparisons, the
    winner and timings."""
    seeds = plan.seeds
    lines = [f"WARNING: {warning}" for warning in warnings]
    lines += [
        f"X2Edit early filter, {plan.describe()}.",
        "Candidate seeds: " + ", ".join(f"{i}: {s}" for i, s in enumerate(seeds)) + ".",
        selection_report,
        f"Winning seed: {seeds[winner_index]} (candidate {winner_index}).",
    ]
    if timings:
        lines.append(
            "Time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()) + "."
        )
    return "\n".join(lines)


def adaptive_nfe_line(plan: EarlyFilterPlan, drawn: int, threshold: float) -> str:
    """The adaptive selection's cost: candidates drawn of the budget and NFE spent of the most possible."""
    spent = nfe(plan.mode, drawn, plan.early_steps, plan.total_steps)
    return (
        f"Adaptive selection (threshold {threshold:g}): drew {drawn} of {plan.candidates} candidate(s); NFE "
        f"spent {spent} = {spent / plain_nfe(plan.total_steps):.2f}x a plain run (budget {plan.nfe} = "
        f"{plan.nfe_ratio:.2f}x)."
    )
