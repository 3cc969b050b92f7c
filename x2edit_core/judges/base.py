"""Judge interface, prompt and answer parsing for the early filter: which of two edits is better.

ICEdit (arXiv 2504.20690, section 3.3 and Fig. 13) lets a VLM compare two early edits of the same
source and keeps a running winner. A judge here gets the original image, two candidates and the
instruction, and answers 1 or 2 with a short reason:

- `ServedJudge`: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, llama.cpp, LM Studio,
  Ollama, hosted APIs). Images go inline as base64 PNG data URLs; the API key comes from an
  environment variable the machine's owner released for judges (see `api_keys`), never from a
  workflow.
- `LocalVLMJudge`: a transformers VLM from a local folder (Qwen2-VL / Qwen2.5-VL family, others
  through `AutoModelForImageTextToText`), loaded on first use and released afterwards so that the
  diffusion model gets its memory back.

Judges also score a single edit (`score`, VIEScore-style SC/PQ/overall; prompt and parsing in
`scoring`). Answers are parsed by `parse_choice`; an unusable answer gives a verdict with `choice=None`, which
the selection (x2edit_core.selection) counts and handles by keeping the current best.
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..errors import JudgeConfigError, JudgeError, JudgeUnavailableError

__all__ = [
    "DEFAULT_JUDGE_PROMPT",
    "IMAGE_LABELS",
    "Judge",
    "JudgeConnectionError",
    "JudgeDeadlineError",
    "JudgeFailedError",
    "JudgeVerdict",
    "build_judge_prompt",
    "image_to_pil",
    "parse_choice",
    "validate_prompt_template",
]

# The three images are shown in this order, each after its label (paper Fig. 13: edited image 1,
# edited image 2, then the original).
IMAGE_LABELS = ("Edited image 1:", "Edited image 2:", "Original image:")

# Paper Fig. 13 in substance; `{instruction}` is the only placeholder.
DEFAULT_JUDGE_PROMPT = (
    "You are an expert judge of instruction-based image editing. Above are three images: edited "
    "image 1, edited image 2, and the original image. Both edits were made from the original image "
    'with this instruction: "{instruction}"\n'
    "Which edit follows the instruction better, with higher image quality and fewer artifacts? "
    "Areas the instruction does not ask to change should stay identical to the original image, and "
    "the style should stay consistent with the original unless the instruction asks to change it.\n"
    "Answer with 1 or 2 on the first line, then briefly explain your choice."
)

INSTRUCTION_PLACEHOLDER = "{instruction}"
_PLACEHOLDER_RE = re.compile(r"\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}")
_REASON_MAX_CHARS = 600


class JudgeConnectionError(JudgeUnavailableError):
    """The judge server could not be reached at all (refused, unknown host, network down)."""


class JudgeDeadlineError(JudgeUnavailableError):
    """The judging time budget (the early filter's deadline) ran out before the judge answered."""


class JudgeFailedError(JudgeError, RuntimeError):
    """Judging failed as a whole (no usable answer, or the first call could not connect), so the
    early filter stops instead of silently keeping an unjudged candidate."""


@dataclass(frozen=True)
class JudgeVerdict:
    """One comparison's outcome. `choice` is 1 or 2, or None when the answer was unusable."""

    choice: int | None
    reason: str
    raw: str


# --------------------------------------------------------------------------------------------------
# Prompt


def validate_prompt_template(template: str) -> str:
    """Check a user prompt template; returns it unchanged.

    The template is filled by plain replacement of `{instruction}` (never `str.format`, so braces in
    the template or in the instruction are harmless). Other `{name}` fields are refused because they
    are almost always a typo of `{instruction}` that would silently send the literal text.
    """
    if not isinstance(template, str) or not template.strip():
        raise JudgeConfigError(
            "The judge prompt template is empty: leave it unset to use the default prompt."
        )
    if INSTRUCTION_PLACEHOLDER not in template:
        raise JudgeConfigError(
            "The judge prompt template has no {instruction} placeholder, so the judge would never see "
            "the edit instruction: add {instruction} where the instruction belongs."
        )
    unknown = sorted(
        {m.group(0) for m in _PLACEHOLDER_RE.finditer(template) if m.group(0) != "{instruction}"}
    )
    if unknown:
        raise JudgeConfigError(
            f"The judge prompt template has unknown placeholder(s) {', '.join(unknown)}; the only "
            "placeholder is {instruction} (written exactly so)."
        )
    return template


def build_judge_prompt(instruction: str, template: str | None = None) -> str:
    """The judge's text part: the template with the instruction put in place of `{instruction}`."""
    template = DEFAULT_JUDGE_PROMPT if template is None else validate_prompt_template(template)
    instruction = (instruction or "").strip()
    if not instruction:
        raise JudgeConfigError("The edit instruction given to the judge is empty: pass the instruction text.")
    return template.replace(INSTRUCTION_PLACEHOLDER, instruction)


# --------------------------------------------------------------------------------------------------
# Answer parsing

_NUM = r"(?:[12]|one|two|一|二)"
# A reference to one of the two edits: "image 2", "edit #1", "the second edit", "第二张", "图2".
_IMAGE_REF = (
    r"(?:(?:edited\s+)?(?:image|edit|picture|pic|photo|option|candidate|result|output|version)"
    r"\s*(?:no\.?|number|#)?\s*(?P<n1>[12]|one|two)\b"
    r"|(?:the\s+)?(?P<o1>first|second|1st|2nd)\s+(?:edited\s+)?(?:image|edit|picture|pic|photo|one|option"
    r"|candidate|result|output|version)"
    r"|第\s*(?P<c1>[12一二])\s*(?:张|个|幅|副|号)?(?:图片|图像|图|编辑|结果)?"
    r"|(?:图片|图像|图|编辑|结果|选项)\s*(?P<c2>[12一二]))"
)
_ANSWER_KW = (
    r"(?:final\s+answer|answer|choice|verdict|decision|selection|winner|preferred(?:\s+(?:image|edit))?"
    r"|better\s+(?:one|edit|image|result|option)|best\s+(?:one|edit|image|result|option)"
    r"|答案|选择|结论|更好的是|最好的是)"
)
_CHOOSE_VERB = r"(?:choose|chose|select|selected|pick|picked|prefer|go\s+with|vote\s+for|我选择|我选|选)"
_BARE = r"(?P<b1>[12])(?![\d.,]\d)\b"
_GAP = r"(?:(?!first|second|1st|2nd|第|图|\b[12]\b)[^.!?\n。；;])"  # within one clause, no other image named
_BETTER = (
    r"(?:better|superior|preferable|preferred|wins|stronger|more\s+(?:accurate|faithful|consistent|"
    r"natural|realistic|closely)|higher\s+quality|best|更好|更佳|较好|更符合|更优|胜出)"
)
_WORSE = (
    r"(?:worse|inferior|weaker|fails|less\s+(?:accurate|faithful|consistent)|lower\s+quality|更差|较差|不如)"
)
# A negation right before the judgement word flips it ("image 1 is not better").
_NEGATION_AT_END_RE = re.compile(r"(?:\bnot\b|n['’]t\b|\bno\b|不是|并不|不)\s*(?:\w+\s*)?$", re.IGNORECASE)

_FLAGS = re.IGNORECASE
_FIRST_LINE_RE = re.compile(
    rf"^(?:{_ANSWER_KW}\s*(?:is|would\s+be|[:：=\-])?\s*)?(?:{_IMAGE_REF}|{_BARE})\s*[.)。!:：]?$", _FLAGS
)
_ANSWER_RE = re.compile(
    rf"{_ANSWER_KW}\s*(?:is|would\s+be|[:：=\-])?\s*(?:clearly\s+)?(?:{_IMAGE_REF}|{_BARE})", _FLAGS
)
_CHOOSE_RE = re.compile(rf"{_CHOOSE_VERB}\s*(?:{_IMAGE_REF}|{_BARE})", _FLAGS)
_REF_THEN_JUDGEMENT_RE = re.compile(
    rf"{_IMAGE_REF}(?P<gap>{_GAP}{{0,60}}?)(?:(?P<better>{_BETTER})|(?P<worse>{_WORSE}))", _FLAGS
)
_JUDGEMENT_THEN_REF_RE = re.compile(
    rf"(?:{_BETTER})\s+(?:one|edit|image|result|option|choice)?\s*(?:is|would\s+be|[:：])\s*(?:{_IMAGE_REF}|{_BARE})",
    _FLAGS,
)
_ANY_REF_RE = re.compile(_IMAGE_REF, _FLAGS)
_ANY_DIGIT_RE = re.compile(r"(?<![\w.])[12](?![\w]|[.,]\d)")
_NO_CHOICE_RE = re.compile(
    r"^(?:both|neither|none|tie|equal|same|either|cannot\s+decide|can't\s+decide|无法|都|一样)\b", _FLAGS
)
_MARKUP_RE = re.compile(r"[*_`#>\"“”\[\]]+")
_JSON_KEYS = ("choice", "answer", "better", "best", "winner", "preferred", "selection", "verdict", "result")

_WORD_TO_CHOICE = {
    "1": 1,
    "2": 2,
    "one": 1,
    "two": 2,
    "一": 1,
    "二": 2,
    "first": 1,
    "second": 2,
    "1st": 1,
    "2nd": 2,
}


def _choice_from_match(match: re.Match) -> int | None:
    for name in ("n1", "o1", "c1", "c2", "b1"):
        value = match.groupdict().get(name)
        if value:
            return _WORD_TO_CHOICE.get(value.lower())
    return None


def _choice_from_json(text: str) -> int | None:
    for candidate in re.findall(r"\{[^{}]*\}", text):
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        lowered = {str(k).lower(): v for k, v in data.items()}
        for key in _JSON_KEYS:
            if key in lowered:
                value = lowered[key]
                if isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)) and value in (1, 2):
                    return int(value)
                if isinstance(value, str):
                    parsed = parse_choice(value) if value.strip() else None
                    if parsed is not None:
                        return parsed
    return None


def parse_choice(text: str) -> int | None:
    """The judge's choice (1 or 2) read from a free-form answer, or None when it names no winner.

    Tiers, most explicit first (the earliest match within the first tier that matches wins):
    a first line that is only the answer ("2", "**Image 2**", "Answer: 1", "第二张"); a JSON object
    ({"choice": 2}); an answer keyword or a choosing verb ("The answer is image 1", "I choose 2");
    a judgement about a named image ("Image 2 is better", "image 1 is worse than image 2", "the
    better edit is 2", "第二张更好"); then any named image; then the first standalone 1 or 2.
    A first line saying "both"/"neither"/"tie" gives None.
    """
    if not isinstance(text, str):
        return None
    text = text.strip()
    if not text:
        return None
    lines = [line for line in (_MARKUP_RE.sub("", ln).strip() for ln in text.splitlines()) if line]
    if not lines:
        return None
    first_line = lines[0]
    match = _FIRST_LINE_RE.match(first_line)
    if match:
        return _choice_from_match(match)
    first_sentence = re.split(r"[.!?。！？]", first_line, maxsplit=1)[0]
    if (
        _NO_CHOICE_RE.match(first_sentence)
        and not _ANY_REF_RE.search(first_sentence)
        and not _ANY_DIGIT_RE.search(first_sentence)
    ):
        return None
    choice = _choice_from_json(text)
    if choice is not None:
        return choice
    plain = _MARKUP_RE.sub("", text)
    for pattern in (_ANSWER_RE, _CHOOSE_RE):
        match = pattern.search(plain)
        if match:
            return _choice_from_match(match)
    judgements: list[tuple[int, int]] = []
    for match in _REF_THEN_JUDGEMENT_RE.finditer(plain):
        named = _choice_from_match(match)
        if named is None:
            continue
        positive = match.group("better") is not None
        if _NEGATION_AT_END_RE.search(match.group("gap") or ""):
            positive = not positive
        judgements.append((match.start(), named if positive else 3 - named))
    for match in _JUDGEMENT_THEN_REF_RE.finditer(plain):
        named = _choice_from_match(match)
        if named is not None:
            judgements.append((match.start(), named))
    if judgements:
        return min(judgements)[1]
    match = _ANY_REF_RE.search(plain)
    if match:
        return _choice_from_match(match)
    match = _ANY_DIGIT_RE.search(plain)
    if match:
        return int(match.group(0))
    return None


def _reason_from_answer(text: str) -> str:
    """The explanation part of an answer: the text after a first line that held only the choice."""
    text = (text or "").strip()
    lines = text.splitlines()
    if lines and _FIRST_LINE_RE.match(_MARKUP_RE.sub("", lines[0]).strip()) and len(lines) > 1:
        text = "\n".join(lines[1:]).strip()
    text = " ".join(text.split())
    if len(text) > _REASON_MAX_CHARS:
        text = text[: _REASON_MAX_CHARS - 3].rstrip() + "..."
    return text


def verdict_from_answer(answer: str) -> JudgeVerdict:
    """A verdict from a raw answer text (choice parsed, reason extracted)."""
    return JudgeVerdict(choice=parse_choice(answer), reason=_reason_from_answer(answer), raw=answer or "")


# --------------------------------------------------------------------------------------------------
# Images


def image_to_pil(image: Any) -> Image.Image:
    """An RGB PIL image from a PIL image, a numpy array or a torch tensor.

    Arrays/tensors are HWC (or a batch of one, 1HWC, as ComfyUI's IMAGE), float in [0, 1] or uint8.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if hasattr(image, "detach"):  # torch tensor, without importing torch here
        image = image.detach().to("cpu").float().numpy()
    import numpy as np

    array = np.asarray(image)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise JudgeConfigError(
                f"The judge takes one image at a time, got a batch of {array.shape[0]}: "
                "pass images one by one."
            )
        array = array[0]
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise JudgeConfigError(
            f"Cannot read an image of shape {tuple(array.shape)}: expected HWC with 1, 3 or 4 channels."
        )
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(array[:, :, :3]), mode="RGB")


def limit_image_side(image: Image.Image, max_side: int | None) -> Image.Image:
    """Downscale (keeping aspect) so that the longer side is at most `max_side`; None or 0 keeps it."""
    if not max_side or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------------
# Judges


class Judge:
    """Interface of a pairwise edit judge.

    `compare` shows the VLM candidate 1, candidate 2 and the original (in that order, after the labels
    in IMAGE_LABELS) with the prompt, and returns a verdict whose choice is None when the answer named
    no winner. Raises JudgeConfigError when the judge is set up wrongly, JudgeUnavailableError when
    it gave no reply.

    `deadline` is a `time.monotonic()` instant set by the selection while it calls the judge (None:
    no limit). A judge that waits (network, retries) must give up by then with JudgeDeadlineError; a
    judge that cannot stop mid-call is still bounded between calls by the selection.
    """

    prompt_template: str | None = None
    score_prompt_template: str | None = None
    deadline: float | None = None

    def compare(self, original: Any, candidate_1: Any, candidate_2: Any, instruction: str) -> JudgeVerdict:
        raise NotImplementedError

    def score(self, source: Any, edited: Any, instruction: str, *, prompt_template: str | None = None):
        """Pointwise scoring (x2edit_core.judges.scoring): the source, one edit and the instruction ->
        EditScore with SC, PQ and overall on 0-10 (all None for an unusable answer). Same errors as
        `compare`. prompt_template overrides the judge's scoring prompt for this call."""
        raise NotImplementedError(f"{self.describe()} has no pointwise scoring")

    def release(self) -> None:
        """Free the judge's memory (GPU first). A later `compare` loads it again when needed."""

    def describe(self) -> str:
        """A short human-readable name for reports."""
        return type(self).__name__

    def prompt(self, instruction: str) -> str:
        return build_judge_prompt(instruction, self.prompt_template)

    def score_prompt(self, instruction: str, template: str | None = None) -> str:
        """The scoring prompt: `template`, else the judge's own scoring template, else the default."""
        from .scoring import build_score_prompt

        return build_score_prompt(
            instruction, template if template is not None else self.score_prompt_template
        )
