"""A judge served by any OpenAI-compatible chat-completions endpoint (stdlib HTTP only)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from ..errors import JudgeConfigError, JudgeRequestError, JudgeUnavailableError
from .api_keys import JudgeEndpoint, check_key_destination, parse_endpoint, read_api_key
from .base import (
    IMAGE_LABELS,
    Judge,
    JudgeConnectionError,
    JudgeDeadlineError,
    JudgeVerdict,
    image_to_pil,
    limit_image_side,
    png_data_url,
    validate_prompt_template,
    verdict_from_answer,
)
from .scoring import SCORE_IMAGE_LABELS, EditScore, edit_score_from_answer


def _chat_completions_url(base_url: str) -> str:
    url = parse_endpoint(base_url).url.rstrip("/")
    if not url.endswith("/chat/completions"):
        url += "/chat/completions"
    return url


def check_served_judge_settings(base_url: str, api_key_env: str = "") -> None:
    """Raise JudgeConfigError when the URL or the key variable breaks the rules (see api_keys), without
    contacting anything: what a node checks when a prompt is queued."""
    endpoint = parse_endpoint(_chat_completions_url(base_url))
    read_api_key((api_key_env or "").strip(), endpoint)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would re-send the request (with its Authorization header) to wherever the server
    points, so none is followed: the 3xx reaches the caller as an HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _opener(endpoint: JudgeEndpoint) -> urllib.request.OpenerDirector:
    # Loopback requests never go through a proxy from the environment (it would see a plain-http key);
    # other hosts use the environment's proxies (https is tunnelled end to end).
    proxies = urllib.request.ProxyHandler({}) if endpoint.loopback else urllib.request.ProxyHandler()
    return urllib.request.build_opener(proxies, _RefuseRedirects())


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
    api_key_env: NAME of the environment variable holding the key ("" when the server needs none);
    only variables the machine's owner released are read, and only sent over https or to a loopback
    host (x2edit_core.judges.api_keys). Redirects are never followed.
    Connection errors, timeouts, 5xx and 429 are retried `max_retries` times with exponential backoff
    (429's Retry-After is honoured up to 60 s), all within `deadline` when the selection sets one;
    other 4xx raise JudgeRequestError with the server's error message. When no attempt could connect
    the error is a JudgeConnectionError. Images are downscaled to `max_image_side` (longer side).
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = _chat_completions_url(base_url)
        self.endpoint = parse_endpoint(self.url)
        self.model = (model or "").strip()
        if not self.model:
            raise JudgeConfigError(
                "The served judge needs a model name (as the server lists it under /v1/models)."
            )
        self.api_key_env = (api_key_env or "").strip()
        if self.api_key_env:
            # Checked now so a refused or unset name fails before any sampling; the key itself is read
            # again per request and never kept.
            check_key_destination(self.api_key_env, self.endpoint)
            read_api_key(self.api_key_env, self.endpoint)
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
        self._clock = clock

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

    def _remaining(self) -> float | None:
        """Seconds left before the selection's deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - self._clock()

    def _deadline_error(self, attempts: int, last_problem: str) -> JudgeDeadlineError:
        problem = f" Last problem: {last_problem}." if last_problem else ""
        return JudgeDeadlineError(
            f"The judging deadline ran out while waiting for the judge server at {self.url} "
            f"({attempts} attempt(s) made).{problem} Raise the early filter's judge deadline, or check "
            "the server."
        )

    def _post(self, data: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = read_api_key(self.api_key_env, self.endpoint)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        opener = _opener(self.endpoint)
        last_problem = ""
        connected = False
        attempts = 0
        for attempt in range(self.max_retries + 1):
            wait = self.backoff_s * (2**attempt)
            timeout = self.timeout_s
            remaining = self._remaining()
            if remaining is not None:
                if remaining <= 0:
                    raise self._deadline_error(attempts, last_problem)
                timeout = min(timeout, remaining)
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            attempts += 1
            try:
                with opener.open(request, timeout=timeout) as response:
                    raw = response.read()
                connected = True
                try:
                    return json.loads(raw.decode("utf-8"))
                except ValueError:
                    last_problem = f"a reply that is not JSON: {raw[:300]!r}"
            except urllib.error.HTTPError as exc:
                connected = True
                message = _server_error_text(exc.read() or b"")
                if 300 <= exc.code < 400:
                    location = exc.headers.get("Location", "") if exc.headers else ""
                    raise JudgeRequestError(
                        f"The judge server at {self.url} answered HTTP {exc.code}, a redirect to "
                        f"{location[:300]!r}. Redirects are not followed (they would carry the request and "
                        "its API key elsewhere): put the final address in base_url."
                    ) from exc
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
                connected = True
                last_problem = f"no reply within {timeout:g} s (timeout)"
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                    connected = True
                    last_problem = f"no reply within {timeout:g} s (timeout)"
                else:
                    last_problem = f"cannot connect: {exc.reason}"
            except (ConnectionError, OSError) as exc:
                last_problem = f"connection failed: {exc}"
            if attempt < self.max_retries:
                remaining = self._remaining()
                if remaining is not None and remaining <= wait:
                    raise self._deadline_error(attempts, last_problem)
                self._sleep(wait)
        error_class = JudgeUnavailableError if connected else JudgeConnectionError
        raise error_class(
            f"The judge server at {self.url} gave no usable reply after {attempts} attempt(s): "
            f"{last_problem}. Check that the server is running and reachable, or raise the timeout."
        )
