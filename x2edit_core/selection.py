"""Running-winner selection of ICEdit's early filter, independent of how candidates were sampled.

ICEdit (section 3.3) compares the early results pairwise with a VLM in a single pass that keeps a
running winner, "like selecting the maximum": M candidates take M - 1 comparisons. In each one the
current best is shown as image 1 and the challenger as image 2. With `swap_check` every pair is
asked twice, the second time in swapped order, and the challenger must win both to take over (this
cancels a judge's preference for a position; it doubles the judge calls).

Policy, stated once: the current best is kept on a tie, on disagreement between the two orders, on
an answer naming no winner (counted as unusable), and when the judge fails to answer (counted as an
error: network down after retries, out of memory, ...). Only a misconfigured judge
(JudgeConfigError: bad template, missing API key variable, HTTP 4xx) stops the selection, since it
would fail every comparison the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, JudgeConfigError, SelectionInterrupted
from .judges.base import Judge, JudgeVerdict, image_to_pil

__all__ = [
    "Comparison",
    "JudgeCall",
    "SelectionResult",
    "format_report",
    "judge_view",
    "select_best",
    "to_judge_image",
]

JUDGE_VIEWS = ("right_panel", "whole")

# Outcomes of one comparison (Comparison.outcome).
CHALLENGER_WINS = "challenger wins"
BEST_KEPT = "best kept"
DISAGREEMENT = "orders disagree, best kept"
UNUSABLE = "unusable answer, best kept"
JUDGE_ERROR = "judge error, best kept"


@dataclass
class JudgeCall:
    """One call to the judge: which candidate was image 1 and which image 2, and what came back."""

    image_1: int
    image_2: int
    verdict: JudgeVerdict | None  # None when the judge raised
    error: str | None = None
    seconds: float = 0.0

    @property
    def winner(self) -> int | None:
        """The candidate index the judge preferred, or None (unusable answer or error)."""
        if self.verdict is None or self.verdict.choice not in (1, 2):
            return None
        return self.image_1 if self.verdict.choice == 1 else self.image_2


@dataclass
class Comparison:
    """Current best against a challenger (one judge call, two with swap_check)."""

    best: int
    challenger: int
    calls: list[JudgeCall]
    outcome: str
    winner: int

    @property
    def reason(self) -> str:
        """The reason of the first usable answer (or the error)."""
        for call in self.calls:
            if call.verdict is not None and call.verdict.choice is not None:
                return call.verdict.reason
        for call in self.calls:
            if call.error:
                return call.error
            if call.verdict is not None:
                return f"unusable answer: {call.verdict.raw.strip()[:200]!r}"
        return ""


@dataclass
class SelectionResult:
    winner_index: int
    comparisons: list[Comparison]
    judge_calls: int
    unusable_answers: int
    judge_errors: int
    judge_seconds: float
    report: str = field(default="")


def _label(index: int, labels: Sequence[str] | None) -> str:
    if labels is not None and index < len(labels) and labels[index]:
        return f"candidate {index} ({labels[index]})"
    return f"candidate {index}"


def _call_judge(
    judge: Judge, original: Any, image_1: int, image_2: int, candidates, instruction: str
) -> JudgeCall:
    start = time.perf_counter()
    try:
        verdict = judge.compare(original, candidates[image_1], candidates[image_2], instruction)
    except JudgeConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - policy: a failed judge call keeps the current best
        return JudgeCall(image_1, image_2, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
    if not isinstance(verdict, JudgeVerdict):
        return JudgeCall(
            image_1,
            image_2,
            None,
            f"judge returned {type(verdict).__name__}, not a JudgeVerdict",
            time.perf_counter() - start,
        )
    return JudgeCall(image_1, image_2, verdict, None, time.perf_counter() - start)


def _decide(best: int, challenger: int, calls: list[JudgeCall]) -> tuple[str, int]:
    """The challenger takes over only when every call (both orders with swap_check) prefers it."""
    winners = [call.winner for call in calls]
    if all(winner == challenger for winner in winners):
        return CHALLENGER_WINS, challenger
    if any(call.error for call in calls):
        return JUDGE_ERROR, best
    if any(winner is None for winner in winners):
        return UNUSABLE, best
    if all(winner == best for winner in winners):
        return BEST_KEPT, best
    return DISAGREEMENT, best


def select_best(
    candidates: Sequence[Any],
    original: Any,
    instruction: str,
    judge: Judge,
    *,
    swap_check: bool = False,
    labels: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], Any] | None = None,
) -> SelectionResult:
    """Keep a running winner over `candidates` (images as the judge takes them) in one pass.

    progress(done_calls, total_calls) is called after each judge call; should_stop() before each
    call: an exception it raises propagates (a ComfyUI interrupt), a true return value raises
    SelectionInterrupted. labels name candidates in the report (for example their seeds).
    """
    count = len(candidates)
    if count == 0:
        raise ConfigError("The early filter got no candidates to choose from: use at least one candidate.")
    if labels is not None and len(labels) != count:
        raise ConfigError(
            f"{len(labels)} labels for {count} candidates: give one label per candidate or none."
        )
    orders_per_pair = 2 if swap_check else 1
    total_calls = (count - 1) * orders_per_pair
    done_calls = 0
    best = 0
    comparisons: list[Comparison] = []
    for challenger in range(1, count):
        orders = [(best, challenger)] + ([(challenger, best)] if swap_check else [])
        calls: list[JudgeCall] = []
        for image_1, image_2 in orders:
            if should_stop is not None and should_stop():
                raise SelectionInterrupted(
                    f"The early-filter selection was stopped after {done_calls} of {total_calls} judge calls."
                )
            calls.append(_call_judge(judge, original, image_1, image_2, candidates, instruction))
            done_calls += 1
            if progress is not None:
                progress(done_calls, total_calls)
        outcome, winner = _decide(best, challenger, calls)
        comparisons.append(Comparison(best, challenger, calls, outcome, winner))
        best = winner
    all_calls = [call for comparison in comparisons for call in comparison.calls]
    result = SelectionResult(
        winner_index=best,
        comparisons=comparisons,
        judge_calls=len(all_calls),
        unusable_answers=sum(1 for c in all_calls if c.verdict is not None and c.verdict.choice is None),
        judge_errors=sum(1 for c in all_calls if c.error),
        judge_seconds=sum(c.seconds for c in all_calls),
    )
    result.report = format_report(result, count, judge, swap_check, labels)
    return result


def format_report(
    result: SelectionResult, count: int, judge: Judge, swap_check: bool, labels: Sequence[str] | None
) -> str:
    """The human-readable account of a selection: every comparison with its outcome and reason."""
    describe = getattr(judge, "describe", None)
    judge_name = describe() if callable(describe) else type(judge).__name__
    lines = [
        f"Early-filter selection among {count} candidate(s) by {judge_name}; each comparison shows "
        "the current best as image 1 and the challenger as image 2"
        + (", then again in swapped order (the challenger must win both)." if swap_check else "."),
    ]
    for number, comparison in enumerate(result.comparisons, start=1):
        head = (
            f"{number}. {_label(comparison.best, labels)} vs {_label(comparison.challenger, labels)}: "
            f"{comparison.outcome} -> {_label(comparison.winner, labels)}"
        )
        lines.append(head)
        for call in comparison.calls:
            asked = f"   [image 1 = {call.image_1}, image 2 = {call.image_2}, {call.seconds:.1f} s] "
            if call.error:
                lines.append(asked + f"error: {call.error}")
            elif call.verdict is not None and call.verdict.choice is None:
                lines.append(asked + f"unusable answer: {call.verdict.raw.strip()[:300]!r}")
            elif call.verdict is not None:
                lines.append(asked + f"answer {call.verdict.choice}: {call.verdict.reason}")
    lines.append(
        f"Winner: {_label(result.winner_index, labels)}. Judge calls: {result.judge_calls}, "
        f"unusable answers: {result.unusable_answers}, judge errors: {result.judge_errors}, "
        f"judge time: {result.judge_seconds:.1f} s. "
        "Policy: ties, disagreements, unusable answers and judge errors keep the current best."
    )
    if result.judge_calls and result.judge_errors == result.judge_calls:
        lines.append("WARNING: every judge call failed, so the first candidate was kept without any judging.")
    elif result.judge_calls and result.unusable_answers + result.judge_errors == result.judge_calls:
        lines.append(
            "WARNING: no judge answer was usable, so the first candidate was kept without any judging."
        )
    return "\n".join(lines)


def judge_view(image: Any, view: str = "right_panel") -> Any:
    """What the judge sees of an image: the right panel of a side-by-side diptych, or the whole image.

    Takes a PIL image (returns a PIL image), or an HWC / BHWC array or tensor (ComfyUI IMAGE layout;
    returns the same type, sliced along the width). The right panel of a canvas W wide is
    [W // 2, W), which is ICEdit's [W_src, 2 W_src) crop.
    """
    if view not in JUDGE_VIEWS:
        raise ConfigError(f"Unknown judge view {view!r}: use one of {', '.join(JUDGE_VIEWS)}.")
    if view == "whole":
        return image
    if hasattr(image, "crop") and hasattr(image, "size"):  # PIL
        width, height = image.size
        return image.crop((width // 2, 0, width, height))
    shape = getattr(image, "shape", None)
    if shape is None or len(shape) not in (3, 4):
        raise ConfigError(
            f"Cannot cut the right panel of {type(image).__name__} with shape {shape}: give a PIL image "
            "or an HWC/BHWC array or tensor."
        )
    width = shape[-2]
    return image[..., width // 2 :, :]


def to_judge_image(image: Any, view: str = "right_panel"):
    """judge_view followed by conversion to one RGB PIL image."""
    return image_to_pil(judge_view(image, view))
