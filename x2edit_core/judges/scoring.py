"""Pointwise edit scoring: one edit, its source and the instruction -> semantic consistency and quality.

VIEScore-style judging (as GEdit-Bench, ICEdit and X2Edit report it): a VLM rates semantic consistency
SC (was the instruction followed, without over-editing; 0-10) and perceptual quality PQ (natural look,
no artifacts; 0-10) from the source image, the edited image and the instruction; the overall score is
O = sqrt(SC * PQ). VIEScore asks for each of SC and PQ as a list of two sub-scores and keeps the lower
one (SC = min(editing success, absence of over-editing), PQ = min(naturalness, absence of artifacts));
the default prompt asks for exactly that, in one call.

This module is pure (no optional dependency, no I/O): the prompt, its validation, answer parsing and
`ScoringSession` / `score_edits`, which score several edits with the failure rules of the pairwise
selection: an unusable answer or a failed call (network down after retries, out of memory) is a
warning and leaves that edit unscored; a misconfigured judge (JudgeConfigError) stops at once; a first
call that cannot connect, or no usable score at all, stops with JudgeFailedError; an optional
deadline bounds all calls together.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, JudgeConfigError, SelectionInterrupted
from .base import JudgeConnectionError, JudgeFailedError, validate_prompt_template

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SCORE_PROMPT",
    "SCORE_IMAGE_LABELS",
    "EditScore",
    "ScoreCall",
    "ScoringResult",
    "ScoringSession",
    "build_score_prompt",
    "edit_score_from_answer",
    "overall_score",
    "parse_scores",
    "score_edits",
]

# The two images are shown in this order, each after its label.
SCORE_IMAGE_LABELS = ("Source image:", "Edited image:")

DEFAULT_SCORE_PROMPT = (
    "You are an expert judge of instruction-based image editing. Above are two images: the source "
    'image and an edited version of it, made with this instruction: "{instruction}"\n'
    "Rate the edit on a scale from 0 to 10 with four sub-scores:\n"
    "1. editing success: 0 if the edited image does not follow the instruction at all, 10 if it "
    "follows it perfectly;\n"
    "2. over-editing: 0 if the edited image is a completely different scene from the source, 10 if "
    "only what the instruction asks for changed and everything else is identical;\n"
    "3. naturalness: 0 if the edited image looks unnatural or fake, 10 if it looks like a real, "
    "coherent photograph or artwork;\n"
    "4. artifacts: 0 if it is full of distortions, blur, seams or watermarks, 10 if it has none.\n"
    'Answer with JSON only: {"SC": [editing success, over-editing], "PQ": [naturalness, artifacts], '
    '"reason": "one or two sentences"}'
)

_REASON_MAX_CHARS = 600
_SCALE = 10.0


@dataclass(frozen=True)
class EditScore:
    """One edit's scores on 0-10. `overall` is sqrt(sc * pq); when the answer gave only a single
    overall score, sc and pq are None and overall is that score. All None: the answer was unusable."""

    sc: float | None
    pq: float | None
    overall: float | None
    reason: str
    raw: str

    @property
    def usable(self) -> bool:
        return self.overall is not None


def overall_score(sc: float | None, pq: float | None) -> float | None:
    """O = sqrt(SC * PQ), or None when either is missing."""
    if sc is None or pq is None:
        return None
    return math.sqrt(max(0.0, sc) * max(0.0, pq))


# --------------------------------------------------------------------------------------------------
# Prompt


def build_score_prompt(instruction: str, template: str | None = None) -> str:
    """The scoring prompt: the template (validated like the pairwise one) with the instruction in place."""
    template = DEFAULT_SCORE_PROMPT if template is None else validate_prompt_template(template)
    instruction = (instruction or "").strip()
    if not instruction:
        raise JudgeConfigError("The edit instruction given to the judge is empty: pass the instruction text.")
    return template.replace("{instruction}", instruction)


# --------------------------------------------------------------------------------------------------
# Answer parsing

_SC_NAMES = (
    "sc",
    "semantic_consistency",
    "semantic consistency",
    "semantics",
    "semantic",
    "consistency",
    "instruction_following",
    "instruction following",
    "editing_success",
    "语义一致性",
    "语义一致",
    "语义",
    "指令遵循",
)
_PQ_NAMES = (
    "pq",
    "perceptual_quality",
    "perceptual quality",
    "perceptual",
    "quality",
    "image_quality",
    "image quality",
    "visual_quality",
    "visual quality",
    "感知质量",
    "图像质量",
    "视觉质量",
    "质量",
)
_OVERALL_NAMES = (
    "overall",
    "o",
    "score",
    "final_score",
    "final score",
    "rating",
    "总分",
    "总体评分",
    "评分",
    "得分",
)

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
# A value: a number, optionally "/ 10", "out of 10", "分"; or a bracketed list of numbers.
_VALUE = (
    rf"(?P<list>\[\s*{_NUMBER}(?:\s*[,，;；]\s*{_NUMBER})*\s*\])"
    rf"|(?P<num>{_NUMBER})(?:\s*(?:/|out\s+of|分之?)\s*(?P<den>\d+(?:\.\d+)?))?(?:\s*分)?"
)
_SEP = r"[\"'”’]?\s*(?:\([^()\n]{0,40}\)\s*)?(?:score|分数|得分)?\s*(?:is|of|=|:|：|-|—|为|是)?\s*[\"'“‘]?\s*"
_MARKUP_RE = re.compile(r"[*_`#>]+")


def _names_pattern(names: Sequence[str]) -> str:
    parts = sorted((re.escape(n).replace(r"\ ", r"[\s_]+").replace("_", r"[\s_]+") for n in names), key=len)
    return "(?:" + "|".join(reversed(parts)) + ")"


def _labelled_re(names: Sequence[str]) -> re.Pattern:
    # The label must not be glued to a preceding letter ("PQ" inside "XPQ") nor followed by one.
    return re.compile(rf"(?<![A-Za-z]){_names_pattern(names)}(?![A-Za-z]){_SEP}(?:{_VALUE})", re.IGNORECASE)


_SC_RE = _labelled_re(_SC_NAMES)
_PQ_RE = _labelled_re(_PQ_NAMES)
_OVERALL_RE = _labelled_re(_OVERALL_NAMES)
_BARE_FRACTION_RE = re.compile(rf"(?<![\w.])(?P<num>{_NUMBER})\s*(?:/|out\s+of)\s*(?P<den>10|100|5)\b")


def _to_scale(value: float, denominator: float | None) -> float | None:
    """A 0-10 score from a value and its stated scale (7/10, 4/5, 70/100); None when out of range."""
    if denominator is not None:
        if denominator <= 0:
            return None
        value = value / denominator * _SCALE
    if not 0.0 <= value <= _SCALE or math.isnan(value):
        return None
    return float(value)


def _value_from_match(match: re.Match) -> float | None:
    if match.group("list"):
        numbers = [float(x) for x in re.findall(_NUMBER, match.group("list"))]
        values = [_to_scale(x, None) for x in numbers]
        return None if not values or any(v is None for v in values) else min(values)
    den = match.group("den")
    return _to_scale(float(match.group("num")), float(den) if den else None)


def _json_number(value: Any) -> float | None:
    """A 0-10 score from a JSON value: a number, a numeric string ("7", "7/10") or a list (min)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return _to_scale(float(value), None)
    if isinstance(value, str):
        match = re.fullmatch(rf"\s*(?:{_VALUE})\s*", value, re.IGNORECASE)
        return _value_from_match(match) if match else None
    if isinstance(value, list) and value:
        values = [_json_number(v) for v in value]
        return None if any(v is None for v in values) else min(values)
    return None


def _json_objects(text: str) -> list[dict]:
    """Every JSON object in the text (fenced or inline, nested one level deep at most)."""
    found = []
    for candidate in re.findall(r"\{(?:[^{}]|\{[^{}]*\})*\}", text):
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(data, dict):
            found.append(data)
    return found


def _normalise_key(key: str) -> str:
    return re.sub(r"[\s\-]+", "_", str(key).strip().lower())


def _scores_from_json(data: dict) -> tuple[float | None, float | None, float | None, str]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):  # {"scores": {"SC": 7, "PQ": 8}}
            for inner_key, inner in value.items():
                flat.setdefault(_normalise_key(inner_key), inner)
        flat.setdefault(_normalise_key(key), value)
    sc = pq = overall = None
    for name in _SC_NAMES:
        if _normalise_key(name) in flat:
            sc = _json_number(flat[_normalise_key(name)])
            break
    for name in _PQ_NAMES:
        if _normalise_key(name) in flat:
            pq = _json_number(flat[_normalise_key(name)])
            break
    for name in _OVERALL_NAMES:
        if _normalise_key(name) in flat:
            overall = _json_number(flat[_normalise_key(name)])
            break
    reason = ""
    for key in ("reason", "reasoning", "explanation", "rationale", "理由", "原因"):
        if isinstance(flat.get(key), str):
            reason = flat[key]
            break
    return sc, pq, overall, reason


def parse_scores(text: str) -> tuple[float | None, float | None, float | None]:
    """(sc, pq, overall) on 0-10 read from a free-form answer; None for what the answer does not give.

    Read, most explicit first: a JSON object ({"SC": 7, "PQ": [8, 6]}, also fenced in markdown, with
    long key names or Chinese keys); labelled values in text ("SC: 7", "**Semantic consistency**: 7/10",
    "PQ = [8, 6]", "感知质量：8分"); else a single labelled overall score ("Score: 7/10", "overall 6")
    or a lone fraction ("7/10"), which gives only the overall. Lists give their minimum (VIEScore's
    sub-scores); "x/5" and "x/100" are rescaled to 0-10; values outside 0-10 are unusable. overall is
    sqrt(sc * pq) whenever both are found (a stated overall is then ignored).
    """
    if not isinstance(text, str) or not text.strip():
        return None, None, None
    for data in _json_objects(text):
        sc, pq, overall, _ = _scores_from_json(data)
        if sc is not None and pq is not None:
            return sc, pq, overall_score(sc, pq)
        if sc is None and pq is None and overall is not None:
            return None, None, overall
    plain = _MARKUP_RE.sub("", text)
    sc_match, pq_match = _SC_RE.search(plain), _PQ_RE.search(plain)
    sc = _value_from_match(sc_match) if sc_match else None
    pq = _value_from_match(pq_match) if pq_match else None
    if sc is not None and pq is not None:
        return sc, pq, overall_score(sc, pq)
    if sc_match or pq_match:
        # Only one of the two (or an out-of-range value): an overall cannot be formed honestly.
        return sc, pq, None
    match = _OVERALL_RE.search(plain)
    if match:
        return None, None, _value_from_match(match)
    match = _BARE_FRACTION_RE.search(plain)
    if match:
        return None, None, _to_scale(float(match.group("num")), float(match.group("den")))
    return None, None, None


def _reason_from_answer(text: str) -> str:
    text = (text or "").strip()
    for data in _json_objects(text):
        reason = _scores_from_json(data)[3]
        if reason:
            text = reason
            break
    text = " ".join(text.split())
    if len(text) > _REASON_MAX_CHARS:
        text = text[: _REASON_MAX_CHARS - 3].rstrip() + "..."
    return text


def edit_score_from_answer(answer: str) -> EditScore:
    """An EditScore from a raw answer text (scores parsed, reason extracted)."""
    sc, pq, overall = parse_scores(answer)
    return EditScore(sc=sc, pq=pq, overall=overall, reason=_reason_from_answer(answer), raw=answer or "")


# --------------------------------------------------------------------------------------------------
# Scoring several edits


@dataclass
class ScoreCall:
    """One scoring call: which edit, what came back (None when the judge raised or was not asked)."""

    index: int
    score: EditScore | None
    error: str | None = None
    seconds: float = 0.0
    asked: bool = True  # False: skipped because the judging deadline had passed
    connection_failed: bool = False  # the judge could not reach its server at all

    @property
    def overall(self) -> float | None:
        return self.score.overall if self.score is not None else None


@dataclass
class ScoringResult:
    calls: list[ScoreCall]
    unusable_answers: int
    judge_errors: int
    judge_seconds: float
    order: list[int] = field(default_factory=list)  # edit indices, best first; unscored last
    skipped_calls: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def overall(self) -> list[float | None]:
        return [call.overall for call in self.calls]


def _set_deadline(judge: Any, deadline: float | None) -> None:
    try:
        judge.deadline = deadline
    except AttributeError:  # a judge object that takes no attributes simply has no deadline
        pass


def call_score(
    judge: Any,
    source: Any,
    edited: Any,
    instruction: str,
    index: int = 0,
    *,
    deadline: float | None = None,
    **kwargs,
) -> ScoreCall:
    """One judge.score call under the failure rules: a misconfigured judge raises; any other failure
    is recorded in the call. `deadline` (a time.monotonic() instant) is handed to the judge."""
    start = time.perf_counter()
    _set_deadline(judge, deadline)
    try:
        score = judge.score(source, edited, instruction, **kwargs)
    except JudgeConfigError:
        raise
    except NotImplementedError as exc:
        raise JudgeConfigError(
            f"{_describe(judge)} cannot score single edits ({exc}): use X2Edit Served Judge or X2Edit "
            "Local VLM Judge."
        ) from exc
    except Exception as exc:  # noqa: BLE001 - policy: a failed call leaves this edit unscored
        return ScoreCall(
            index,
            None,
            f"{type(exc).__name__}: {exc}",
            time.perf_counter() - start,
            connection_failed=isinstance(exc, JudgeConnectionError),
        )
    finally:
        _set_deadline(judge, None)
    if not isinstance(score, EditScore):
        return ScoreCall(
            index,
            None,
            f"judge returned {type(score).__name__}, not an EditScore",
            time.perf_counter() - start,
        )
    return ScoreCall(index, score, None, time.perf_counter() - start)


def rank_order(values: Sequence[float | None]) -> list[int]:
    """Indices best first by value (ties: earlier first); None values last, in their order."""
    scored = sorted((i for i, v in enumerate(values) if v is not None), key=lambda i: (-values[i], i))
    return scored + [i for i, v in enumerate(values) if v is None]


def _describe(judge: Any) -> str:
    describe = getattr(judge, "describe", None)
    return describe() if callable(describe) else type(judge).__name__


class ScoringSession:
    """Scores edits one call at a time under the pairwise judge's failure rules (see the module
    docstring of x2edit_core.selection), for `score_edits` and the adaptive early filter:

    - a misconfigured judge (JudgeConfigError) stops at once;
    - when the very first call cannot connect, JudgeFailedError at once (nothing else is tried);
    - `finish()` raises JudgeFailedError when no call gave a usable score, unless
      `keep_first_on_failure` (then `fell_back` is set and a warning says so);
    - `deadline_s` bounds all calls together: once it has passed, calls are not asked (`expired`);
    - every failed call or unusable answer is a warning (logged and kept in `warnings`).
    """

    def __init__(
        self,
        judge: Any,
        instruction: str,
        *,
        prompt_template: str | None = None,
        deadline_s: float | None = None,
        keep_first_on_failure: bool = False,
        clock: Callable[[], float] = time.monotonic,
        log_prefix: str = "x2edit scoring",
        labels: Sequence[str] | None = None,
        noun: str = "edit",
    ):
        if deadline_s is not None and not deadline_s > 0:
            raise ConfigError(f"The judging deadline must be a positive number of seconds, got {deadline_s}.")
        self.judge = judge
        self.instruction = instruction
        self.kwargs = (
            {} if prompt_template is None else {"prompt_template": validate_prompt_template(prompt_template)}
        )
        self.deadline_s = deadline_s
        self.clock = clock
        self.deadline = None if deadline_s is None else clock() + deadline_s
        self.keep_first_on_failure = keep_first_on_failure
        self.log_prefix = log_prefix
        self.labels = labels
        self.noun = noun
        self.calls: list[ScoreCall] = []
        self.warnings: list[str] = []
        self.fell_back = False

    def label(self, index: int) -> str:
        if self.labels is not None and index < len(self.labels) and self.labels[index]:
            return f"{self.noun} {index} ({self.labels[index]})"
        return f"{self.noun} {index}"

    @property
    def expired(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        logger.warning("%s: %s", self.log_prefix, message)

    def score(self, index: int, source: Any, edited: Any) -> ScoreCall:
        if self.expired:
            call = ScoreCall(
                index,
                None,
                f"not asked: the judging deadline of {self.deadline_s:g} s had passed",
                asked=False,
            )
            self.calls.append(call)
            return call
        call = call_score(
            self.judge, source, edited, self.instruction, index, deadline=self.deadline, **self.kwargs
        )
        self.calls.append(call)
        if len(self.calls) == 1 and call.connection_failed and not self.keep_first_on_failure:
            message = (
                f"The first judge call could not connect ({call.error}), so scoring stops; nothing else "
                "was tried. Start or fix the judge server."
            )
            logger.error("%s: %s", self.log_prefix, message)
            raise JudgeFailedError(message)
        if call.asked and call.error:
            self.warn(f"judge call failed ({self.label(index)}), left unscored: {call.error}")
        elif call.score is not None and not call.score.usable:
            raw = call.score.raw.strip()[:200]
            self.warn(f"unusable judge answer ({self.label(index)}), left unscored: {raw!r}")
        return call

    def finish(self, what: str = "nothing can be ranked") -> None:
        """Apply the whole-run rule: no usable score at all is an error (or the asked-for fall-back)."""
        asked = [c for c in self.calls if c.asked]
        skipped = len(self.calls) - len(asked)
        if skipped:
            self.warn(
                f"the judging deadline of {self.deadline_s:g} s passed: {skipped} call(s) were not asked"
            )
        if not self.calls or any(c.overall is not None for c in self.calls):
            return
        errors = [c.error for c in asked if c.error]
        unusable = [c for c in asked if c.score is not None and not c.score.usable]
        first = next(
            (c.error or repr(c.score.raw.strip()[:200]) for c in self.calls if c.error or c.score), ""
        )
        summary = (
            f"No scoring call to {_describe(self.judge)} gave a usable score ({len(asked)} asked, "
            f"{len(errors)} error(s), {len(unusable)} unusable answer(s), {skipped} not asked before the "
            f"deadline), so {what}; first problem: {first or 'none recorded'}"
        )
        if not self.keep_first_on_failure:
            logger.error("%s: %s", self.log_prefix, summary)
            raise JudgeFailedError(f"{summary}. Fix the judge (server, model, prompt, deadline).")
        self.fell_back = True
        self.warn(
            f"{summary}. keep_first_if_judge_fails is on, so the first candidate was kept WITHOUT judging."
        )

    def result(self) -> ScoringResult:
        asked = [c for c in self.calls if c.asked]
        return ScoringResult(
            calls=list(self.calls),
            unusable_answers=sum(1 for c in asked if c.score is not None and not c.score.usable),
            judge_errors=sum(1 for c in asked if c.error),
            judge_seconds=sum(c.seconds for c in self.calls),
            order=rank_order([c.overall for c in self.calls]),
            skipped_calls=len(self.calls) - len(asked),
            warnings=list(self.warnings),
        )


def score_edits(
    edits: Sequence[Any],
    source: Any,
    instruction: str,
    judge: Any,
    *,
    prompt_template: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], Any] | None = None,
    deadline_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ScoringResult:
    """Score every edit of `source` (images as the judge takes them) and rank them, best first.

    `source` is one image for all edits, or a list or tuple with one source per edit.
    progress(done, total) after each call; should_stop() before each (an exception it raises
    propagates, a true value raises SelectionInterrupted). Failures follow ScoringSession's rules:
    JudgeFailedError when the first call cannot connect or no call gave a usable score,
    JudgeConfigError at once for a misconfigured judge.
    """
    if isinstance(source, (list, tuple)):
        if len(source) != len(edits):
            raise JudgeConfigError(f"{len(source)} source images for {len(edits)} edits: give one per edit.")
        sources = list(source)
    else:
        sources = [source] * len(edits)
    session = ScoringSession(
        judge, instruction, prompt_template=prompt_template, deadline_s=deadline_s, clock=clock
    )
    for index, edited in enumerate(edits):
        if should_stop is not None and should_stop():
            raise SelectionInterrupted(f"Scoring was stopped after {index} of {len(edits)} edits.")
        session.score(index, sources[index], edited)
        if progress is not None:
            progress(index + 1, len(edits))
    session.finish()
    return session.result()


def format_score_line(label: str, call: ScoreCall) -> str:
    """One report line: '<label>: O 7.48 (SC 7, PQ 8): reason' or the error / unusable answer."""
    if not call.asked:
        return f"{label}: {call.error}"
    if call.error:
        return f"{label}: judge error: {call.error}"
    score = call.score
    if score is None or not score.usable:
        raw = score.raw.strip()[:300] if score is not None else ""
        return f"{label}: unusable answer: {raw!r}"
    parts = f"O {score.overall:.2f}"
    if score.sc is not None and score.pq is not None:
        parts += f" (SC {score.sc:g}, PQ {score.pq:g})"
    return f"{label}: {parts}" + (f": {score.reason}" if score.reason else "")
