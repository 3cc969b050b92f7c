"""VLM judges for ICEdit's early-filter selection: which of two edits is better.

ICEdit (arXiv 2504.20690, section 3.3 and Fig. 13) lets a VLM compare two early edits of the same
source and keeps a running winner. A judge here gets the original image, two candidates and the
instruction, and answers 1 or 2 with a short reason:

- `ServedJudge`: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, llama.cpp, LM Studio,
  Ollama, hosted APIs). Images go inline as base64 PNG data URLs; the API key is read from an
  environment variable whose *name* is configured, so no key ever sits in a workflow.
- `LocalVLMJudge`: a transformers VLM from a local folder (Qwen2-VL / Qwen2.5-VL family, others
  through `AutoModelForImageTextToText`), loaded on first use and released afterwards so that the
  diffusion model gets its memory back.

Answers are parsed by `parse_choice`; an unusable answer gives a verdict with `choice=None`, which
the selection (x2edit_core.selection) counts and handles by keeping the current best.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import JudgeConfigError, JudgeRequestError, JudgeUnavailableError

__all__ = [
    "DEFAULT_JUDGE_PROMPT",
    "IMAGE_LABELS",
    "Judge",
    "JudgeVerdict",
    "LocalVLMJudge",
    "ServedJudge",
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
    """

    prompt_template: str | None = None

    def compare(self, original: Any, candidate_1: Any, candidate_2: Any, instruction: str) -> JudgeVerdict:
        raise NotImplementedError

    def release(self) -> None:
        """Free the judge's memory (GPU first). A later `compare` loads it again when needed."""

    def describe(self) -> str:
        """A short human-readable name for reports."""
        return type(self).__name__

    def prompt(self, instruction: str) -> str:
        return build_judge_prompt(instruction, self.prompt_template)


_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _api_key_from_env(env_name: str) -> str | None:
    env_name = (env_name or "").strip()
    if not env_name:
        return None
    if not _ENV_NAME_RE.match(env_name) or env_name.lower().startswith(("sk-", "sk_")):
        # Someone pasted the key itself: refuse it so it never ends up saved in a workflow.
        raise JudgeConfigError(
            "The API key setting must be the NAME of an environment variable (for example "
            "OPENAI_API_KEY), not the key itself; remove the key from the workflow, set the variable "
            "before starting ComfyUI and put its name here."
        )
    value = os.environ.get(env_name)
    if not value:
        raise JudgeConfigError(
            f"The environment variable {env_name} is not set (or empty): set it to the API key before "
            "starting ComfyUI, or leave the variable name empty for a server that needs no key."
        )
    return value


def _chat_completions_url(base_url: str) -> str:
    url = (base_url or "").strip()
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise JudgeConfigError(
            f"The judge server URL {base_url!r} is not an http(s) URL: give the base URL of an "
            "OpenAI-compatible API, for example http://127.0.0.1:8000/v1."
        )
    url = url.rstrip("/")
    if not url.endswith("/chat/completions"):
        url += "/chat/completions"
    return url


def _server_error_text(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:2000]
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail") or json.dumps(error)
            return str(message)[:2000]
        if isinstance(error, str):
            return error[:2000]
    return text[:2000]


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # some servers answer with content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


class ServedJudge(Judge):
    """A judge behind an OpenAI-compatible chat-completions endpoint.

    base_url: the API base (".../v1") or the full ".../chat/completions" URL.
    api_key_env: NAME of the environment variable holding the key ("" when the server needs none).
    Connection errors, timeouts, 5xx and 429 are retried `max_retries` times with exponential backoff
    (429's Retry-After is honoured up to 60 s); other 4xx raise JudgeRequestError with the server's
    error message. Images are downscaled to `max_image_side` (longer side) before sending.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "",
        *,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 2.0,
        max_image_side: int | None = 1024,
        max_tokens: int = 256,
        temperature: float = 0.0,
        prompt_template: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = _chat_completions_url(base_url)
        self.model = (model or "").strip()
        if not self.model:
            raise JudgeConfigError(
                "The served judge needs a model name (as the server lists it under /v1/models)."
            )
        self.api_key_env = (api_key_env or "").strip()
        if self.api_key_env:
            # Checked now so a wrong name fails before any sampling; the key is read again per request.
            _api_key_from_env(self.api_key_env)
        if timeout_s <= 0:
            raise JudgeConfigError(f"The judge timeout must be positive, got {timeout_s}.")
        self.timeout_s = float(timeout_s)
        self.max_retries = max(0, int(max_retries))
        self.backoff_s = max(0.0, float(backoff_s))
        self.max_image_side = max_image_side
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.prompt_template = None if prompt_template is None else validate_prompt_template(prompt_template)
        self._sleep = sleep

    def describe(self) -> str:
        return f"served judge {self.model} at {self.url}"

    def build_request_body(self, original: Any, candidate_1: Any, candidate_2: Any, instruction: str) -> dict:
        images = [
            limit_image_side(image_to_pil(im), self.max_image_side)
            for im in (candidate_1, candidate_2, original)
        ]
        content: list[dict] = []
        for label, image in zip(IMAGE_LABELS, images):
            content.append({"type": "text", "text": label})
            content.append({"type": "image_url", "image_url": {"url": png_data_url(image)}})
        content.append({"type": "text", "text": self.prompt(instruction)})
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }

    def compare(self, original: Any, candidate_1: Any, candidate_2: Any, instruction: str) -> JudgeVerdict:
        body = self.build_request_body(original, candidate_1, candidate_2, instruction)
        reply = self._post(json.dumps(body).encode("utf-8"))
        try:
            answer = _content_text(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError) as exc:
            raise JudgeUnavailableError(
                f"The judge server at {self.url} answered without choices[0].message.content: "
                f"{json.dumps(reply)[:500]}; check that it is an OpenAI-compatible chat-completions API."
            ) from exc
        return verdict_from_answer(answer)

    def _post(self, data: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = _api_key_from_env(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last_problem = ""
        for attempt in range(self.max_retries + 1):
            wait = self.backoff_s * (2**attempt)
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                try:
                    return json.loads(raw.decode("utf-8"))
                except ValueError:
                    last_problem = f"a reply that is not JSON: {raw[:300]!r}"
            except urllib.error.HTTPError as exc:
                message = _server_error_text(exc.read() or b"")
                if exc.code == 429 or exc.code >= 500:
                    last_problem = f"HTTP {exc.code}: {message}"
                    retry_after = exc.headers.get("Retry-After") if exc.headers else None
                    if exc.code == 429 and retry_after and retry_after.strip().isdigit():
                        wait = min(60.0, float(retry_after))
                else:
                    raise JudgeRequestError(
                        f"The judge server at {self.url} refused the request with HTTP {exc.code}: "
                        f"{message}. Check the model name, the API key variable and the server's limits "
                        "(image size, context length)."
                    ) from exc
            except TimeoutError:
                last_problem = f"no reply within {self.timeout_s:g} s (timeout)"
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                    last_problem = f"no reply within {self.timeout_s:g} s (timeout)"
                else:
                    last_problem = f"cannot connect: {exc.reason}"
            except (ConnectionError, OSError) as exc:
                last_problem = f"connection failed: {exc}"
            if attempt < self.max_retries:
                self._sleep(wait)
        raise JudgeUnavailableError(
            f"The judge server at {self.url} gave no usable reply after {self.max_retries + 1} attempt(s): "
            f"{last_problem}. Check that the server is running and reachable, or raise the timeout."
        )


# Qwen2-VL's chat format, used when a model folder ships no chat template.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_QWEN_IMAGE_TOKEN = "<|image_pad|>"

_DTYPES = ("auto", "bfloat16", "float16", "float32")


class LocalVLMJudge(Judge):
    """A transformers VLM loaded from a local folder (no download: local_files_only).

    Qwen2-VL and Qwen2.5-VL load through their own classes, other VLMs through
    AutoModelForImageTextToText. The model is loaded on the first `compare` (or `load()`) and
    `release()` frees it (and empties the CUDA cache) so that FLUX gets the memory back; it is
    loaded again when needed. Generation is greedy with `max_new_tokens`.

    dtype: "auto" (bfloat16 on a GPU that supports it, else float16 on GPU, float32 on CPU),
    "bfloat16", "float16" or "float32". device: "auto" (cuda when available), "cpu", "cuda", "cuda:N".
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        dtype: str = "auto",
        device: str = "auto",
        max_new_tokens: int = 128,
        max_image_side: int | None = 1024,
        prompt_template: str | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir).expanduser()
        if not self.model_dir.is_dir():
            raise JudgeConfigError(
                f"The VLM folder {self.model_dir} does not exist: give a local model folder."
            )
        if not (self.model_dir / "config.json").is_file():
            raise JudgeConfigError(
                f"{self.model_dir} has no config.json, so it is not a transformers model folder: "
                "point to the folder that holds config.json, the *.safetensors weights and the "
                "tokenizer/processor files."
            )
        if dtype not in _DTYPES:
            raise JudgeConfigError(f"Unknown judge dtype {dtype!r}: use one of {', '.join(_DTYPES)}.")
        self.dtype_name = dtype
        self.device_name = device
        self.max_new_tokens = int(max_new_tokens)
        self.max_image_side = max_image_side
        self.prompt_template = None if prompt_template is None else validate_prompt_template(prompt_template)
        self.attn_implementation = attn_implementation
        self.model = None
        self.processor = None  # a full multimodal processor, or None when the fallback below is used
        self.tokenizer = None
        self.image_processor = None

    def describe(self) -> str:
        return f"local VLM judge {self.model_dir.name}"

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def estimated_memory_bytes(self) -> int:
        """Size of the weights on disk: what loading takes, about, at the stored dtype."""
        return sum(p.stat().st_size for p in self.model_dir.glob("*.safetensors"))

    def _device(self):
        import torch

        if self.device_name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device_name)
        except (RuntimeError, TypeError) as exc:
            raise JudgeConfigError(
                f"Unknown judge device {self.device_name!r}: use auto, cpu, cuda or cuda:N."
            ) from exc

    def _dtype(self, device):
        import torch

        if self.dtype_name == "auto":
            if device.type == "cuda":
                return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.float32
        return getattr(torch, self.dtype_name)

    def _model_class(self):
        import transformers

        with open(self.model_dir / "config.json", encoding="utf-8") as handle:
            model_type = json.load(handle).get("model_type", "")
        by_type = {
            "qwen2_vl": "Qwen2VLForConditionalGeneration",
            "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
        }
        names = [by_type[model_type]] if model_type in by_type else []
        names += ["AutoModelForImageTextToText", "AutoModelForVision2Seq"]
        for name in names:
            cls = getattr(transformers, name, None)
            if cls is not None:
                return cls
        raise JudgeConfigError(
            f"The installed transformers {transformers.__version__} has no class for VLM type "
            f"{model_type!r}: update transformers."
        )

    def load(self) -> None:
        """Load the processor and the model (no-op when loaded)."""
        if self.model is not None:
            return
        import transformers

        device = self._device()
        dtype = self._dtype(device)
        self._load_processor()
        cls = self._model_class()
        # transformers renamed torch_dtype to dtype in 4.56.
        dtype_key = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
        kwargs: dict[str, Any] = {"local_files_only": True, dtype_key: dtype}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        try:
            model = cls.from_pretrained(str(self.model_dir), **kwargs)
        except (OSError, ValueError) as exc:
            raise JudgeConfigError(f"Cannot load the VLM from {self.model_dir}: {exc}") from exc
        self.model = model.to(device).eval()

    def _load_processor(self) -> None:
        import transformers

        folder = str(self.model_dir)
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
            if not hasattr(self.processor, "image_processor"):
                raise ValueError("the folder's processor is not a multimodal processor")
            self.tokenizer = self.processor.tokenizer
            self.image_processor = self.processor.image_processor
            return
        except (ImportError, ValueError, TypeError, AttributeError, OSError) as exc:
            # Qwen2-VL's processor also wants a video processor, which needs torchvision; without it,
            # build the prompt ourselves from the tokenizer and the image processor.
            processor_problem = exc
        self.processor = None
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.image_processor = transformers.AutoImageProcessor.from_pretrained(
                folder, local_files_only=True
            )
        except (ImportError, ValueError, TypeError, OSError) as exc:
            raise JudgeConfigError(
                f"Cannot load the processor of {folder} ({processor_problem}) nor its tokenizer and image "
                f"processor ({exc}): the folder needs the tokenizer and preprocessor files of the model."
            ) from exc
        if self.tokenizer.convert_tokens_to_ids(_QWEN_IMAGE_TOKEN) in (None, self.tokenizer.unk_token_id):
            raise JudgeConfigError(
                f"Cannot load the processor of {folder} ({processor_problem}), and the fallback only knows "
                "Qwen-VL style prompts: install what the processor needs (often torchvision)."
            )

    def _chat_template(self) -> str | None:
        """The Qwen-VL template when the folder ships none, else None (the folder's own is used)."""
        owner = self.processor if self.processor is not None else self.tokenizer
        return None if getattr(owner, "chat_template", None) else QWEN_VL_CHAT_TEMPLATE

    def encode(self, images: list[Image.Image], instruction: str) -> dict:
        """Model inputs (tensors on CPU) for the three images and the prompt."""
        content: list[dict] = []
        for label in IMAGE_LABELS:
            content.append({"type": "text", "text": label})
            content.append({"type": "image"})
        content.append({"type": "text", "text": self.prompt(instruction)})
        messages = [{"role": "user", "content": content}]
        owner = self.processor if self.processor is not None else self.tokenizer
        fallback_template = self._chat_template()
        template_kwargs = {"chat_template": fallback_template} if fallback_template else {}
        text = owner.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **template_kwargs
        )
        if self.processor is not None:
            return dict(self.processor(text=[text], images=images, return_tensors="pt"))
        return self._encode_qwen_fallback(text, images)

    def _encode_qwen_fallback(self, text: str, images: list[Image.Image]) -> dict:
        import inspect

        vision = dict(self.image_processor(images=images, return_tensors="pt"))
        grids = vision["image_grid_thw"]
        pieces = text.split(_QWEN_IMAGE_TOKEN)
        if len(pieces) != len(images) + 1:
            raise JudgeConfigError(
                f"The chat template of {self.model_dir} produced {len(pieces) - 1} image slots for "
                f"{len(images)} images: the folder's chat template does not fit the Qwen-VL format."
            )
        merge = int(getattr(self.image_processor, "merge_size", 2)) ** 2
        expanded = pieces[0]
        for grid, piece in zip(grids, pieces[1:]):
            expanded += _QWEN_IMAGE_TOKEN * int(grid.prod().item() // merge) + piece
        inputs = dict(self.tokenizer([expanded], return_tensors="pt", add_special_tokens=False))
        inputs.update(vision)
        if self.model is None or "mm_token_type_ids" in inspect.signature(self.model.forward).parameters:
            image_id = self.tokenizer.convert_tokens_to_ids(_QWEN_IMAGE_TOKEN)
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_id).long()
        return inputs

    def compare(self, original: Any, candidate_1: Any, candidate_2: Any, instruction: str) -> JudgeVerdict:
        import torch

        self.prompt(instruction)  # an empty instruction fails here, before loading anything
        self.load()
        images = [
            limit_image_side(image_to_pil(im), self.max_image_side)
            for im in (candidate_1, candidate_2, original)
        ]
        inputs = self.encode(images, instruction)
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        moved = {}
        for key, value in inputs.items():
            if hasattr(value, "to"):
                value = (
                    value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
                )
            moved[key] = value
        pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        try:
            with torch.inference_mode():
                output = self.model.generate(
                    **moved, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad_id
                )
        except torch.cuda.OutOfMemoryError as exc:
            raise JudgeUnavailableError(
                f"The local judge ran out of GPU memory: {exc}. Lower max image side, use a smaller "
                "VLM, or run the judge on another device."
            ) from exc
        new_tokens = output[:, moved["input_ids"].shape[1] :]
        answer = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()
        return verdict_from_answer(answer)

    def release(self) -> None:
        """Drop the model and processor and empty the CUDA cache; `compare` reloads when needed."""
        model = self.model
        self.model = None
        self.processor = None
        self.tokenizer = None
        self.image_processor = None
        if model is not None:
            try:
                model.to("cpu")  # frees the GPU copy even if a caller still holds a reference
            except (RuntimeError, ValueError):
                pass
            del model
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = re.match(r"\d+", piece)
        parts.append(int(digits.group(0)) if digits else 0)
    return tuple(parts)
