"""Running-winner selection of ICEdit's early filter, independent of how candidates were sampled.

ICEdit (section 3.3) compares the early results pairwise with a VLM in a single pass that keeps a
running winner, "like selecting the maximum": M candidates take M - 1 comparisons. In each one the
current best is shown as image 1 and the challenger as image 2. With `swap_check` every pair is
asked twice, the second time in swapped order, and the challenger must win both to take over (this
cancels a judge's preference for a position; it doubles the judge calls).

Policy, stated once:
- within one comparison the current best is kept on a tie, on disagreement between the two orders,
  on an answer naming no winner (counted as unusable), and when the judge fails to answer (counted as
  an error: network down after retries, out of memory, deadline, ...); each such case is a warning in
  the server log and at the top of the report;
- a misconfigured judge (JudgeConfigError: bad template, refused API key variable, HTTP 4xx or a
  redirect) stops the selection at once, since it would fail every comparison the same way;
- when the very first call cannot connect, or when no call at all gave a usable answer, the
  selection stops with JudgeFailedError: keeping the first candidate would look like a success while
  nothing was judged. `keep_first_on_failure=True` asks for that fall-back instead (warned about);
- `deadline_s` bounds the whole judging (every call and every retry inside a judge): calls not yet
  asked when it passes are skipped and counted as errors.

`select_adaptive` is the other way to choose: each candidate is scored on its own (VIEScore-style,
x2edit_core.judges.scoring) as soon as it is drawn, and drawing stops once one scores at least a
threshold, so easy edits spend fewer candidates than the budget M. Its failure rules are the same.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, JudgeConfigError, SelectionInterrupted
from .judges.base import Judge, JudgeConnectionError, JudgeFailedError, JudgeVerdict, image_to_pil

logger = logging.getLogger(__name__)

__all__ = [
    "SELECTIONS",
    "AdaptiveResult",
    "Comparison",
    "JudgeCall",
    "SelectionResult",
    "format_report",
    "judge_view",
    "select_adaptive",
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
    verdict: JudgeVerdict | None  # None when the judge raised or was not asked
    error: str | None = None
    seconds: float = 0.0
    asked: bool = True  # False: skipped because the judging deadline had passed
    connection_failed: bool = False  # the judge could not reach its server at all

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
    skipped_calls: int = 0  # not asked: the deadline had passed
    warnings: list[str] = field(default_factory=list)
    fell_back: bool = False  # nothing was judged and keep_first_on_failure kept candidate 0


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
        return JudgeCall(
            image_1,
            image_2,
            None,
            f"{type(exc).__name__}: {exc}",
            time.perf_counter() - start,
            connection_failed=isinstance(exc, JudgeConnectionError),
        )
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


def _warn(warnings: list[str], message: str) -> None:
    warnings.append(message)
    logger.warning("x2edit early filter: %s", message)


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
    deadline_s: float | None = None,
    keep_first_on_failure: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> SelectionResult:
    """Keep a running winner over `candidates` (images as the judge takes them) in one pass.

    progress(done_calls, total_calls) is called after each judge call (asked or skipped); should_stop()
    before each call: an exception it raises propagates (a ComfyUI interrupt), a true return value
    raises SelectionInterrupted. labels name candidates in the report (for example their seeds).
    deadline_s: seconds for all judging together (None: no limit). Failures follow the module's policy.
    """
    count = len(candidates)
    if count == 0:
        raise ConfigError("The early filter got no candidates to choose from: use at least one candidate.")
    if labels is not None and len(labels) != count:
        raise ConfigError(
            f"{len(labels)} labels for {count} candidates: give one label per candidate or none."
        )
    if deadline_s is not None and not deadline_s > 0:
        raise ConfigError(f"The judging deadline must be a positive number of seconds, got {deadline_s}.")
    orders_per_pair = 2 if swap_check else 1
    total_calls = (count - 1) * orders_per_pair
    deadline = None if deadline_s is None else clock() + deadline_s
    done_calls = 0
    best = 0
    comparisons: list[Comparison] = []
    warnings: list[str] = []
    for challenger in range(1, count):
        orders = [(best, challenger)] + ([(challenger, best)] if swap_check else [])
        calls: list[JudgeCall] = []
        for image_1, image_2 in orders:
            if should_stop is not None and should_stop():
                raise SelectionInterrupted(
                    f"The early-filter selection was stopped after {done_calls} of {total_calls} judge calls."
                )
            if deadline is not None and clock() >= deadline:
                call = JudgeCall(
                    image_1,
                    image_2,
                    None,
                    f"not asked: the judging deadline of {deadline_s:g} s had passed",
                    asked=False,
                )
            else:
                judge.deadline = deadline
                try:
                    call = _call_judge(judge, original, image_1, image_2, candidates, instruction)
                finally:
                    judge.deadline = None
            calls.append(call)
            done_calls += 1
            if progress is not None:
                progress(done_calls, total_calls)
            if done_calls == 1 and call.connection_failed and not keep_first_on_failure:
                message = (
                    f"The first judge call could not connect ({call.error}), so the early filter stops "
                    f"instead of keeping an unjudged candidate; the other {total_calls - 1} call(s) were not "
                    "tried. Start or fix the judge server, or turn on keep_first_if_judge_fails."
                )
                logger.error("x2edit early filter: %s", message)
                raise JudgeFailedError(message)
        outcome, winner = _decide(best, challenger, calls)
        comparisons.append(Comparison(best, challenger, calls, outcome, winner))
        for call in calls:
            where = f"{_label(call.image_1, labels)} vs {_label(call.image_2, labels)}"
            if call.asked and call.error:
                _warn(warnings, f"judge call failed ({where}), current best kept: {call.error}")
            elif call.verdict is not None and call.verdict.choice is None:
                _warn(
                    warnings,
                    f"unusable judge answer ({where}), current best kept: {call.verdict.raw.strip()[:200]!r}",
                )
        best = winner
    all_calls = [call for comparison in comparisons for call in comparison.calls]
    asked = [call for call in all_calls if call.asked]
    skipped = len(all_calls) - len(asked)
    if skipped:
        _warn(
            warnings,
            f"the judging deadline of {deadline_s:g} s passed: {skipped} of {total_calls} judge call(s) were "
            "not asked and their challengers were not considered",
        )
    result = SelectionResult(
        winner_index=best,
        comparisons=comparisons,
        judge_calls=len(asked),
        unusable_answers=sum(1 for c in asked if c.verdict is not None and c.verdict.choice is None),
        judge_errors=sum(1 for c in asked if c.error),
        judge_seconds=sum(c.seconds for c in all_calls),
        skipped_calls=skipped,
        warnings=warnings,
    )
    usable = sum(1 for c in all_calls if c.winner is not None)
    if total_calls and usable == 0:
        summary = (
            f"No judge call gave a usable answer ({result.judge_calls} asked, {result.judge_errors} "
            f"error(s), {result.unusable_answers} unusable answer(s), {skipped} not asked before the "
            f"deadline); first problem: {comparisons[0].reason or 'none recorded'}"
        )
        if not keep_first_on_failure:
            logger.error("x2edit early filter: %s", summary)
            raise JudgeFailedError(
                f"{summary}. The early filter stops instead of keeping an unjudged candidate: fix the judge "
                "(server, model, prompt, deadline), or turn on keep_first_if_judge_fails."
            )
        result.fell_back = True
        _warn(
            warnings,
            f"{summary}. keep_first_if_judge_fails is on, so the first candidate was kept WITHOUT any "
            "judging.",
        )
    result.report = format_report(result, count, judge, swap_check, labels)
    return result


def format_report(
    result: SelectionResult, count: int, judge: Judge, swap_check: bool, labels: Sequence[str] | None
) -> str:
    """The human-readable account of a selection: every comparison with its outcome and reason."""
    describe = getattr(judge, "describe", None)
    judge_name = describe() if callable(describe) else type(judge).__name__
    lines = [f"WARNING: {warning}" for warning in result.warnings]
    lines += [
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
            if not call.asked:
                lines.append(asked + call.error)
            elif call.error:
                lines.append(asked + f"error: {call.error}")
            elif call.verdict is not None and call.verdict.choice is None:
                lines.append(asked + f"unusable answer: {call.verdict.raw.strip()[:300]!r}")
            elif call.verdict is not None:
                lines.append(asked + f"answer {call.verdict.choice}: {call.verdict.reason}")
    lines.append(
        f"Winner: {_label(result.winner_index, labels)}. Judge calls: {result.judge_calls}, "
        f"unusable answers: {result.unusable_answers}, judge errors: {result.judge_errors}, "
        + (f"not asked (deadline): {result.skipped_calls}, " if result.skipped_calls else "")
        + f"judge time: {result.judge_seconds:.1f} s. "
        "Policy: ties, disagreements, unusable answers and judge errors keep the current best."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Adaptive selection: score candidates as they are drawn, stop once one is good enough

SELECTIONS = ("pairwise", "adaptive")


@dataclass
class AdaptiveResult:
    """Outcome of `select_adaptive`: the winner among the candidates drawn, and how many were drawn."""

    winner_index: int
    drawn: int  # candidates sampled and offered to the judge (the NFE counts these)
    cap: int  # the candidate budget M
    threshold: float
    stopped_early: bool  # a candidate reached the threshold before the budget ran out
    calls: list  # ScoreCall per scored candidate, in drawing order
    judge_calls: int
    unusable_answers: int
    judge_errors: int
    judge_seconds: float
    skipped_calls: int = 0
    warnings: list[str] = field(default_factory=list)
    fell_back: bool = False
    report: str = ""

    @property
    def scores(self) -> list[float | None]:
        return [call.overall for call in self.calls]


def select_adaptive(
    batches: Sequence[Sequence[int]],
    draw: Callable[[list[int]], Sequence[Any]],
    original: Any,
    instruction: str,
    judge: Any,
    *,
    threshold: float,
    labels: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], Any] | None = None,
    deadline_s: float | None = None,
    keep_first_on_failure: bool = False,
    clock: Callable[[], float] = time.monotonic,
    prompt_template: str | None = None,
) -> AdaptiveResult:
    """Draw candidates batch by batch, score each (pointwise, `judge.score`) and stop drawing once one
    reaches `threshold` (overall score, 0-10); the budget is every index in `batches`.

    draw(indices) samples those candidates and returns their images as the judge takes them. Within a
    batch, judging stops at the first candidate that reaches the threshold (the rest of that batch
    were sampled but are not judged). The winner is the best-scored candidate drawn (ties: the earlier
    one); it is the one that reached the threshold when the run stopped early. When the deadline
    passes, no further batch is drawn. Failures follow ScoringSession's rules (the same as the
    pairwise selection's): a first call that cannot connect, or no usable score at all, raises
    JudgeFailedError unless keep_first_on_failure.
    """
    from .judges.scoring import ScoringSession

    if not math.isfinite(threshold):
        raise ConfigError(f"The adaptive threshold must be a number, got {threshold}.")
    cap = sum(len(batch) for batch in batches)
    if cap == 0:
        raise ConfigError("The early filter got no candidates to choose from: use at least one candidate.")
    if labels is not None and len(labels) != cap:
        raise ConfigError(f"{len(labels)} labels for {cap} candidates: give one label per candidate or none.")
    session = ScoringSession(
        judge,
        instruction,
        prompt_template=prompt_template,
        deadline_s=deadline_s,
        keep_first_on_failure=keep_first_on_failure,
        clock=clock,
        log_prefix="x2edit early filter",
        labels=labels,
        noun="candidate",
    )
    drawn = 0
    stopped_early = False
    for batch in batches:
        if session.expired:
            break
        images = list(draw(list(batch)))
        if len(images) != len(batch):
            raise ConfigError(f"draw() returned {len(images)} images for {len(batch)} candidates.")
        drawn += len(batch)
        for index, image in zip(batch, images):
            if should_stop is not None and should_stop():
                raise SelectionInterrupted(
                    f"The adaptive early filter was stopped after {len(session.calls)} judge calls."
                )
            call = session.score(index, original, image)
            if progress is not None:
                progress(len(session.calls), cap)
            if call.overall is not None and call.overall >= threshold:
                stopped_early = True
                break
        if stopped_early:
            break
    session.finish("no candidate can be chosen")
    scored = session.result()
    order = [scored.calls[i].index for i in scored.order]
    winner = batches[0][0] if session.fell_back else order[0]
    result = AdaptiveResult(
        winner_index=winner,
        drawn=drawn,
        cap=cap,
        threshold=threshold,
        stopped_early=stopped_early and drawn < cap,
        calls=scored.calls,
        judge_calls=len(scored.calls) - scored.skipped_calls,
        unusable_answers=scored.unusable_answers,
        judge_errors=scored.judge_errors,
        judge_seconds=scored.judge_seconds,
        skipped_calls=scored.skipped_calls,
        warnings=scored.warnings,
        fell_back=session.fell_back,
    )
    result.report = format_adaptive_report(result, judge, labels)
    return result


def format_adaptive_report(result: AdaptiveResult, judge: Any, labels: Sequence[str] | None) -> str:
    """Every scored candidate with its scores and reason, where drawing stopped and why, the winner."""
    from .judges.scoring import format_score_line

    describe = getattr(judge, "describe", None)
    judge_name = describe() if callable(describe) else type(judge).__name__
    lines = [f"WARNING: {warning}" for warning in result.warnings]
    lines.append(
        f"Adaptive early-filter selection by {judge_name}: candidates are scored as they are drawn "
        f"(overall O = sqrt(SC*PQ), 0-10) and drawing stops once one reaches {result.threshold:g}; "
        f"budget {result.cap} candidate(s)."
    )
    for call in result.calls:
        lines.append(format_score_line(f"   {_label(call.index, labels)}", call))
    if result.stopped_early:
        stop = f"stopped after {result.drawn} of {result.cap} candidate(s): threshold reached"
    elif any(c.overall is not None and c.overall >= result.threshold for c in result.calls):
        stop = f"drew all {result.drawn} candidate(s); the last batch reached the threshold"
    else:
        stop = (
            f"drew {result.drawn} of {result.cap} candidate(s); none reached the threshold, the best is kept"
        )
    lines.append(
        f"Drawing {stop}. Winner: {_label(result.winner_index, labels)}. Judge calls: {result.judge_calls}, "
        f"unusable answers: {result.unusable_answers}, judge errors: {result.judge_errors}, "
        + (f"not asked (deadline): {result.skipped_calls}, " if result.skipped_calls else "")
        + f"judge time: {result.judge_seconds:.1f} s."
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
