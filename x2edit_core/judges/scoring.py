"""Pointwise edit scoring: one edit, its source and the instruction -> semantic consistency and quality.

VIEScore-style judging (as GEdit-Bench, ICEdit and X2Edit report it): a VLM rates semantic consistency
SC (was the instruction followed, without over-editing; 0-10) and perceptual quality PQ (natural look,
no artifacts; 0-10) from the source image, the edited image and the instruction; the overall score is
O = sqrt(SC * PQ). VIEScore asks for each of SC and PQ as a list of two sub-scores and keeps the lower
one (SC = min(editing success, absence of over-editing), PQ = min(naturalness, absence of artifacts));
the default prompt asks for exactly that, in one call.

This module is pure (no optional dependency, no I/O): the prompt, its validation, answer parsing and
`score_edits`, the loop that scores several edits with the failure rules of the pairwise selection:
an unusable answer or a failed call (network down after retries, out of memory) is counted and leaves
that edit unscored; a misconfigured judge (JudgeConfigError) stops at once; when every call fails the
run stops with the collected errors, since there is nothing to rank.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import JudgeConfigError, JudgeUnavailableError, SelectionInterrupted
from .base import validate_prompt_template

__all__ = [
    "DEFAULT_SCORE_PROMPT",
    "SCORE_IMAGE_LABELS",
    "EditScore",
    "ScoreCall",
    "ScoringResult",
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
    """One scoring call: which edit, what came back (None when the judge raised), and how long."""

    index: int
    score: EditScore | None
    error: str | None = None
    seconds: float = 0.0

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

    @property
    def overall(self) -> list[float | None]:
        return [call.overall for call in self.calls]


def call_score(judge: Any, source: Any, edited: Any, instruction: str, index: int = 0, **kwargs) -> ScoreCall:
    """One judge.score call under the failure rules (config errors raise, other failures are recorded)."""
    start = time.perf_counter()
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
        return ScoreCall(index, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
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


def score_edits(
    edits: Sequence[Any],
    source: Any,
    instruction: str,
    judge: Any,
    *,
    prompt_template: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], Any] | None = None,
) -> ScoringResult:
    """Score every edit of `source` (images as the judge takes them) and rank them, best first.

    `source` is one image for all edits, or a list or tuple with one source per edit.

    progress(done, total) after each call; should_stop() before each (an exception it raises
    propagates, a true value raises SelectionInterrupted). Raises JudgeUnavailableError when every
    call failed (with their errors), JudgeConfigError at once for a misconfigured judge.
    """
    kwargs = {} if prompt_template is None else {"prompt_template": validate_prompt_template(prompt_template)}
    if isinstance(source, (list, tuple)):
        if len(source) != len(edits):
            raise JudgeConfigError(f"{len(source)} source images for {len(edits)} edits: give one per edit.")
        sources = list(source)
    else:
        sources = [source] * len(edits)
    calls: list[ScoreCall] = []
    for index, edited in enumerate(edits):
        if should_stop is not None and should_stop():
            raise SelectionInterrupted(f"Scoring was stopped after {index} of {len(edits)} edits.")
        calls.append(call_score(judge, sources[index], edited, instruction, index, **kwargs))
        if progress is not None:
            progress(index + 1, len(edits))
    errors = [call for call in calls if call.error]
    if calls and len(errors) == len(calls):
        shown = "; ".join(sorted({call.error for call in errors})[:3])
        raise JudgeUnavailableError(
            f"Every one of the {len(calls)} scoring calls to {_describe(judge)} failed, so nothing can be "
            f"ranked: {shown}. Check that the judge is running and reachable."
        )
    return ScoringResult(
        calls=calls,
        unusable_answers=sum(1 for c in calls if c.score is not None and not c.score.usable),
        judge_errors=len(errors),
        judge_seconds=sum(c.seconds for c in calls),
        order=rank_order([c.overall for c in calls]),
    )


def format_score_line(label: str, call: ScoreCall) -> str:
    """One report line: '<label>: O 7.48 (SC 7, PQ 8): reason' or the error / unusable answer."""
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
