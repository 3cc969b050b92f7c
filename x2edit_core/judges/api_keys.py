"""Which API key a served judge may send, and where: the machine owner decides, never a workflow.

Workflows are files strangers share, and anyone who can queue a prompt on a listening ComfyUI server
chooses every input of every node. A workflow therefore names the judge's URL and the *name* of an
environment variable, but it can only ever get a key that the owner of the machine released:

1. Variable names of the form ``X2EDIT_<NAME>_API_KEY`` (upper case) are released for judges, or
2. the owner's judge config (JSON, outside every workflow and outside ComfyUI's user directory, which
   its HTTP API can write) lists the variable for the URL's host::

       {"api_keys": {"api.openai.com": "OPENAI_API_KEY", "127.0.0.1:8000": "X2EDIT_VLLM_API_KEY"}}

   A key names a host (any port) or ``host:port`` (IPv6 in brackets: ``[::1]:8000``). A variable the
   config lists is sent only to the hosts it is listed for, also when its name is ``X2EDIT_*_API_KEY``.
   The config is read from ``$X2EDIT_JUDGES_CONFIG``, else ``$XDG_CONFIG_HOME/x2edit/judges.json``,
   else ``~/.config/x2edit/judges.json``; only environment variables choose the path.

A released key is sent only over https, or over plain http to a loopback host (127.0.0.0/8, ::1,
``localhost``), never through a proxy for loopback hosts, and never after a redirect (the caller
refuses every redirect). URLs with user information (``user:pass@host``) are refused outright.
Every refusal is a JudgeConfigError that names the rule; no message ever contains a key.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ..errors import JudgeConfigError

__all__ = [
    "CONFIG_ENV",
    "RELEASED_NAME_RE",
    "JudgeEndpoint",
    "config_path",
    "is_loopback_host",
    "parse_endpoint",
    "read_api_key",
    "released_variables",
]

CONFIG_ENV = "X2EDIT_JUDGES_CONFIG"
RELEASED_NAME_RE = re.compile(r"^X2EDIT_[A-Z0-9][A-Z0-9_]*_API_KEY$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RULE = (
    "API keys are read only from variables the machine's owner released: names of the form "
    "X2EDIT_<NAME>_API_KEY, or variables listed for the judge's host in the judge config "
    "({path}); keys are sent only over https or to a loopback host"
)


@dataclass(frozen=True)
class JudgeEndpoint:
    """A parsed judge URL: scheme, lower-case host (IPv6 without brackets), effective port."""

    url: str
    scheme: str
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        return is_loopback_host(self.host)

    def host_keys(self) -> tuple[str, str]:
        """The two config keys that match this endpoint: "host:port" and "host"."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}", host


def config_path() -> Path:
    """Where the owner's judge config is read from (environment variables only choose it)."""
    explicit = os.environ.get(CONFIG_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "x2edit" / "judges.json"


def _rule() -> str:
    return RULE.format(path=config_path())


def is_loopback_host(host: str) -> bool:
    """True for "localhost", 127.0.0.0/8 and ::1 (a literal address, not a name that resolves there)."""
    host = (host or "").strip().lower().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_endpoint(url: str) -> JudgeEndpoint:
    """Check and split a judge URL: http(s), a host, no user information, a valid port."""
    text = (url or "").strip()
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise JudgeConfigError(
            f"The judge server URL {url!r} is not an http(s) URL: give the base URL of an "
            "OpenAI-compatible API, for example http://127.0.0.1:8000/v1."
        )
    if "@" in parsed.netloc:
        raise JudgeConfigError(
            "The judge server URL contains user information (user:password@host), which x2edit refuses: "
            "credentials never go in a workflow, and the part before '@' hides the real host. Give the "
            "URL without it; keys come from environment variables."
        )
    try:
        port = parsed.port
    except ValueError as exc:
        raise JudgeConfigError(f"The judge server URL {url!r} has an invalid port: {exc}.") from exc
    host = (parsed.hostname or "").lower()
    if not host:
        raise JudgeConfigError(f"The judge server URL {url!r} names no host.")
    if port is None:
        port = 443 if parsed.scheme == "https" else 80
    return JudgeEndpoint(text, parsed.scheme, host, port)


def released_variables(path: Path | None = None) -> dict[str, str]:
    """The owner's config: {host or host:port (lower case): variable name}. Missing file: empty."""
    path = config_path() if path is None else path
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise JudgeConfigError(f"Cannot read the judge config {path}: {exc}.") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise JudgeConfigError(f"The judge config {path} is not valid JSON: {exc}.") from exc
    table = data.get("api_keys") if isinstance(data, dict) else None
    if not isinstance(table, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _ENV_NAME_RE.match(v) for k, v in table.items()
    ):
        raise JudgeConfigError(
            f'The judge config {path} must be a JSON object with an "api_keys" object mapping hosts to '
            'environment variable names, e.g. {"api_keys": {"api.openai.com": "OPENAI_API_KEY"}}.'
        )
    return {key.strip().lower(): value for key, value in table.items()}


def _check_name(env_name: str) -> None:
    if not _ENV_NAME_RE.match(env_name) or env_name.lower().startswith(("sk-", "sk_")):
        # Someone pasted the key itself: refuse it so it never ends up saved in a workflow.
        raise JudgeConfigError(
            "The API key setting must be the NAME of an environment variable (for example "
            "X2EDIT_JUDGE_API_KEY), not the key itself; remove the key from the workflow, set the variable "
            "before starting ComfyUI and put its name here."
        )


def check_key_destination(env_name: str, endpoint: JudgeEndpoint) -> None:
    """Raise JudgeConfigError unless the variable `env_name` may be sent to `endpoint`."""
    _check_name(env_name)
    released = released_variables()
    listed_for = {key for key, name in released.items() if name == env_name}
    if listed_for:
        if not listed_for.intersection(endpoint.host_keys()):
            raise JudgeConfigError(
                f"The judge config ({config_path()}) releases {env_name} only for "
                f"{', '.join(sorted(listed_for))}, not for {endpoint.host_keys()[0]}: the key is not sent. "
                f"Rule: {_rule()}."
            )
    elif not RELEASED_NAME_RE.match(env_name):
        raise JudgeConfigError(
            f"The workflow asks for the API key in {env_name}, which the machine's owner has not released "
            f"to judges, so it is not read. Rule: {_rule()}. Set the key in a variable such as "
            "X2EDIT_JUDGE_API_KEY, or list the variable for this host in the judge config."
        )
    if endpoint.scheme != "https" and not endpoint.loopback:
        raise JudgeConfigError(
            f"The judge URL {endpoint.url!r} is plain http to a host that is not loopback, so the API key "
            f"would travel unencrypted: it is not sent. Rule: {_rule()}. Use https, or a server on "
            "127.0.0.1 / ::1 / localhost."
        )


def read_api_key(env_name: str, endpoint: JudgeEndpoint) -> str | None:
    """The key in `env_name` if the rules allow sending it to `endpoint`; None when no name is set."""
    env_name = (env_name or "").strip()
    if not env_name:
        return None
    check_key_destination(env_name, endpoint)
    value = os.environ.get(env_name)
    if not value:
        raise JudgeConfigError(
            f"The environment variable {env_name} is not set (or empty): set it to the API key before "
            "starting ComfyUI, or leave the variable name empty for a server that needs no key."
        )
    return value
