"""A judge served by any OpenAI-compatible chat-completions endpoint (stdlib HTTP only)."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from ..errors import JudgeConfigError, JudgeRequestError, JudgeUnavailableError
from .base import (
    IMAGE_LABELS,
    Judge,
    JudgeVerdict,
    image_to_pil,
    limit_image_side,
    png_data_url,
    validate_prompt_template,
    verdict_from_answer,
)
from .scoring import SCORE_IMAGE_LABELS, EditScore, edit_score_from_answer

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
        score_prompt_template: str | None = None,
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
        self.score_prompt_template = (
            None if score_prompt_template is None else validate_prompt_template(score_prompt_template)
        )
        self._sleep = sleep

    def describe(self) -> str:
        return f"served judge {self.model} at {self.url}"

    def _request_body(self, images: list[Any], labels: tuple[str, ...], text: str) -> dict:
        content: list[dict] = []
        for label, image in zip(labels, images):
            picture = limit_image_side(image_to_pil(image), self.max_image_side)
            content.append({"type": "text", "text": label})
            content.append({"type": "image_url", "image_url": {"url": png_data_url(picture)}})
        content.append({"type": "text", "text": text})
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }

    def build_request_body(self, original: Any, candidate_1: Any, candidate_2: Any, instruction: str) -> dict:
        return self._request_body(
            [candidate_1, candidate_2, original], IMAGE_LABELS, self.prompt(instruction)
        )

    def build_score_request_body(
        self, source: Any, edited: Any, instruction: str, prompt_template: str | None = None
    ) -> dict:
        text = self.score_prompt(instruction, prompt_template)
        return self._request_body([source, edited], SCORE_IMAGE_LABELS, text)

    def _answer(self, body: dict) -> str:
        reply = self._post(json.dumps(body).encode("utf-8"))
        try:
            return _content_text(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError) as exc:
            raise JudgeUnavailableError(
                f"The judge server at {self.url} answered without choices[0].message.content: "
                f"{json.dumps(reply)[:500]}; check that it is an OpenAI-compatible chat-completions API."
            ) from exc

    def compare(self, original: Any, candidate_1: Any, candidate_2: Any, instruction: str) -> JudgeVerdict:
        body = self.build_request_body(original, candidate_1, candidate_2, instruction)
        return verdict_from_answer(self._answer(body))

    def score(
        self, source: Any, edited: Any, instruction: str, *, prompt_template: str | None = None
    ) -> EditScore:
        body = self.build_score_request_body(source, edited, instruction, prompt_template)
        return edit_score_from_answer(self._answer(body))

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
