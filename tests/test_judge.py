"""Early-filter judges (x2edit_core.judges): answer parsing, prompt, served and local judges."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from vlm_fixtures import (
    FakeChatServer,
    ScriptedReply,
    build_tiny_qwen2vl,
    build_tiny_qwen2vl_processor,
    chat_reply,
)

from x2edit_core.errors import JudgeConfigError, JudgeRequestError, JudgeUnavailableError
from x2edit_core.judges import (
    DEFAULT_JUDGE_PROMPT,
    IMAGE_LABELS,
    JudgeConnectionError,
    JudgeDeadlineError,
    JudgeFailedError,
    JudgeVerdict,
    LocalVLMJudge,
    ServedJudge,
    build_judge_prompt,
    check_served_judge_settings,
    image_to_pil,
    limit_image_side,
    parse_choice,
    validate_prompt_template,
    verdict_from_answer,
)
from x2edit_core.judges.api_keys import check_key_destination, is_loopback_host, parse_endpoint
from x2edit_core.selection import select_best

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@pytest.fixture(autouse=True)
def isolated_judge_environment(monkeypatch, tmp_path):
    """No proxy from the environment, and a judge config that is this test's own (absent unless a test
    writes it), never the machine owner's ~/.config/x2edit/judges.json."""
    for name in PROXY_VARIABLES + ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("X2EDIT_JUDGES_CONFIG", str(tmp_path / "judges.json"))


# --------------------------------------------------------------------------------------------------
# Answer parsing

PARSE_CASES = [
    ("1", 1),
    ("2", 2),
    (" 2 ", 2),
    ("Image 2", 2),
    ("Image 2.", 2),
    ("**2**", 2),
    ("**Image 1**\nIt keeps the background.", 1),
    ("Answer: 1", 1),
    ("Answer: **2**", 2),
    ("**Answer:** Image 2\n\n**Reason:** the hat is red.", 2),
    ("Final answer: the first image", 1),
    ("The answer is edit 2 because it keeps the sky.", 2),
    ("The second edit follows the instruction better.", 2),
    ("The first image is clearly superior.", 1),
    ("Image 1 is better than image 2.", 1),
    ("Image 1 is worse than image 2.", 2),
    ("Compared with image 1, image 2 is better.", 2),
    ("Image 1 is not better: the sky changed.", 2),
    ("Image 2 does not have artifacts and is better", 2),
    ("The better edit is image 1 because image 2 has artifacts.", 1),
    ("Edited image 1 keeps the background; it is preferred.", 1),
    ("Both edits add a hat, but image 2 is sharper and better.", 2),
    ("I would choose the second one.", 2),
    ("I prefer image 1.", 1),
    ("2\nImage 1 has artifacts around the hat.", 2),
    ("1.", 1),
    ('{"choice": 2, "reason": "cleaner edges"}', 2),
    ('```json\n{"answer": "Image 1", "reason": "sharper"}\n```', 1),
    ('Here is my verdict: {"better": 1}', 1),
    ("第二张", 2),
    ("第二张更好，因为背景保持不变。", 2),
    ("第1张图", 1),
    ("图2更符合指令", 2),
    ("答案：2", 2),
    ("我选择第一张", 1),
    ("第一张不如第二张", 2),
    ("Both are equally good.", None),
    ("Neither edit follows the instruction.", None),
    ("I cannot tell.", None),
    ("The image resolution is 1024 pixels", None),
    ("", None),
    ("   \n  ", None),
]


@pytest.mark.parametrize(("answer", "expected"), PARSE_CASES)
def test_parse_choice(answer, expected):
    assert parse_choice(answer) == expected


def test_parse_choice_rejects_non_text():
    assert parse_choice(None) is None  # type: ignore[arg-type]


def test_verdict_reason_drops_a_first_line_that_is_only_the_answer():
    verdict = verdict_from_answer("**2**\nImage 2 keeps the background\nunchanged.")
    assert verdict == JudgeVerdict(
        2, "Image 2 keeps the background unchanged.", "**2**\nImage 2 keeps the background\nunchanged."
    )
    assert verdict_from_answer("Image 1 is better: sharper.").reason == "Image 1 is better: sharper."
    assert len(verdict_from_answer("1\n" + "x" * 5000).reason) <= 600


# --------------------------------------------------------------------------------------------------
# Prompt


def test_default_prompt_follows_the_paper_and_takes_the_instruction():
    prompt = build_judge_prompt("  make the sky pink ")
    assert '"make the sky pink"' in prompt
    for phrase in (
        "edited image 1",
        "edited image 2",
        "original",
        "artifacts",
        "identical",
        "style",
        "1 or 2",
    ):
        assert phrase in prompt.lower()
    assert "{instruction}" in DEFAULT_JUDGE_PROMPT and "{instruction}" not in prompt


def test_prompt_template_is_filled_by_replacement_not_format():
    template = "Rate {instruction} and answer as {{json}} or {0}?"
    with pytest.raises(JudgeConfigError, match="unknown placeholder"):
        validate_prompt_template("Rate {instruction} for {prompt}")
    # Braces that are not identifiers, and braces in the instruction, go through untouched.
    template = 'Rate {instruction}. Reply as JSON like {"choice": 1} or { }.'
    assert validate_prompt_template(template) is template
    assert build_judge_prompt("add {name} and {0}", template) == (
        'Rate add {name} and {0}. Reply as JSON like {"choice": 1} or { }.'
    )


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("Which is better?", "no {instruction}"),
        ("{Instruction}?", "no {instruction}"),
    ],
)
def test_bad_prompt_templates_are_refused(template, message):
    with pytest.raises(JudgeConfigError, match=message):
        validate_prompt_template(template)


def test_empty_instruction_is_refused():
    with pytest.raises(JudgeConfigError, match="instruction"):
        build_judge_prompt("  ")


# --------------------------------------------------------------------------------------------------
# Images


def test_image_to_pil_accepts_pil_arrays_and_comfy_tensors():
    tensor = torch.zeros(1, 8, 12, 3)
    tensor[..., 0] = 1.0
    image = image_to_pil(tensor)
    assert image.size == (12, 8) and image.mode == "RGB" and image.getpixel((0, 0)) == (255, 0, 0)
    assert image_to_pil(np.full((4, 5, 3), 7, np.uint8)).getpixel((1, 1)) == (7, 7, 7)
    assert image_to_pil(np.ones((4, 5), np.float32)).getpixel((0, 0)) == (255, 255, 255)
    assert image_to_pil(Image.new("RGBA", (3, 3))).mode == "RGB"
    with pytest.raises(JudgeConfigError, match="batch of 2"):
        image_to_pil(torch.zeros(2, 8, 8, 3))
    with pytest.raises(JudgeConfigError, match="shape"):
        image_to_pil(np.zeros((4, 5, 7)))


def test_limit_image_side_keeps_aspect():
    image = Image.new("RGB", (300, 200))
    assert limit_image_side(image, 100).size == (100, 67)
    assert limit_image_side(image, 400) is image
    assert limit_image_side(image, None) is image


# --------------------------------------------------------------------------------------------------
# Served judge against a real HTTP server on 127.0.0.1


def images(size=(48, 32)):
    return [Image.new("RGB", size, color) for color in ((10, 10, 10), (200, 0, 0), (0, 200, 0))]


def decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))


def test_served_judge_sends_three_inline_images_and_the_key_from_the_named_variable(monkeypatch):
    monkeypatch.setenv("X2EDIT_TEST_JUDGE_API_KEY", "secret-123")
    original, edit_1, edit_2 = images((300, 200))
    with FakeChatServer([chat_reply("2\nImage 2 keeps the background.")]) as server:
        judge = ServedJudge(
            server.base_url, "qwen2.5-vl-72b", "X2EDIT_TEST_JUDGE_API_KEY", max_image_side=150
        )
        verdict = judge.compare(original, edit_1, edit_2, "add a red hat")
    assert verdict == JudgeVerdict(2, "Image 2 keeps the background.", "2\nImage 2 keeps the background.")
    (request,) = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer secret-123"
    assert request.headers["content-type"] == "application/json"
    body = request.body
    assert body["model"] == "qwen2.5-vl-72b" and body["temperature"] == 0.0 and body["max_tokens"] > 0
    (message,) = body["messages"]
    assert message["role"] == "user"
    parts = message["content"]
    assert [p["type"] for p in parts] == ["text", "image_url"] * 3 + ["text"]
    assert [parts[i]["text"] for i in (0, 2, 4)] == list(IMAGE_LABELS)
    sent = [decode_data_url(parts[i]["image_url"]["url"]) for i in (1, 3, 5)]
    assert all(image.size == (150, 100) for image in sent)  # downscaled to max_image_side
    # Order: edited image 1, edited image 2, original.
    assert [image.convert("RGB").getpixel((5, 5)) for image in sent] == [
        (200, 0, 0),
        (0, 200, 0),
        (10, 10, 10),
    ]
    assert '"add a red hat"' in parts[-1]["text"]
    assert "secret-123" not in repr(vars(judge))  # the key is read per request, never kept


def test_served_judge_without_key_sends_no_authorization_and_takes_a_full_url():
    with FakeChatServer([chat_reply("Answer: 1")]) as server:
        judge = ServedJudge(server.base_url + "/chat/completions/", "m", "")
        assert judge.compare(*images(), "x").choice == 1
    assert "authorization" not in server.requests[0].headers
    assert server.requests[0].path == "/v1/chat/completions"


def test_served_judge_uses_the_overridden_prompt_template():
    with FakeChatServer([chat_reply("1")]) as server:
        judge = ServedJudge(
            server.base_url, "m", prompt_template="Which edit does {instruction} best? 1 or 2."
        )
        judge.compare(*images(), "add a hat")
    assert (
        server.requests[0].body["messages"][0]["content"][-1]["text"]
        == "Which edit does add a hat best? 1 or 2."
    )


def test_served_judge_retries_server_errors_with_backoff():
    sleeps = []
    replies = [
        ScriptedReply(500, {"error": {"message": "overloaded"}}),
        ScriptedReply(503, b"busy"),
        chat_reply("1"),
    ]
    with FakeChatServer(replies) as server:
        judge = ServedJudge(server.base_url, "m", max_retries=3, backoff_s=0.5, sleep=sleeps.append)
        assert judge.compare(*images(), "x").choice == 1
    assert len(server.requests) == 3
    assert sleeps == [0.5, 1.0]


def test_served_judge_honours_retry_after_on_429():
    sleeps = []
    replies = [ScriptedReply(429, {"error": "slow down"}, headers={"Retry-After": "3"}), chat_reply("2")]
    with FakeChatServer(replies) as server:
        judge = ServedJudge(server.base_url, "m", backoff_s=0.1, sleep=sleeps.append)
        assert judge.compare(*images(), "x").choice == 2
    assert sleeps == [3.0]


def test_served_judge_gives_up_after_retries_with_the_server_message():
    with FakeChatServer([ScriptedReply(502, {"error": {"message": "upstream model crashed"}})]) as server:
        judge = ServedJudge(server.base_url, "m", max_retries=2, sleep=lambda s: None)
        with pytest.raises(JudgeUnavailableError, match="after 3 attempt.*HTTP 502: upstream model crashed"):
            judge.compare(*images(), "x")
    assert len(server.requests) == 3


def test_served_judge_shows_the_4xx_error_body_and_does_not_retry():
    error = {
        "error": {"message": "Image exceeds the maximum of 4 images per request", "type": "invalid_request"}
    }
    with FakeChatServer([ScriptedReply(400, error)]) as server:
        judge = ServedJudge(server.base_url, "m", max_retries=3, sleep=lambda s: None)
        with pytest.raises(
            JudgeRequestError, match="HTTP 400: Image exceeds the maximum of 4 images"
        ) as info:
            judge.compare(*images(), "x")
    assert isinstance(info.value, JudgeConfigError)  # stops a selection: retrying cannot help
    assert len(server.requests) == 1


def test_served_judge_timeout_is_a_clear_error():
    with FakeChatServer([ScriptedReply(200, {}, delay_s=2.0)]) as server:
        judge = ServedJudge(server.base_url, "m", timeout_s=0.3, max_retries=0)
        with pytest.raises(JudgeUnavailableError, match=r"no reply within 0.3 s \(timeout\)") as info:
            judge.compare(*images(), "x")
    assert not isinstance(info.value, JudgeConnectionError)  # it connected; the answer was late
    assert len(server.requests) == 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_served_judge_unreachable_server_is_a_connection_error():
    sleeps = []
    judge = ServedJudge(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=1, sleep=sleeps.append)
    with pytest.raises(JudgeConnectionError, match="after 2 attempt.*cannot connect"):
        judge.compare(*images(), "x")
    assert sleeps == [2.0]


class FakeClock:
    """time.monotonic stand-in that only moves when the code under test sleeps."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_served_judge_gives_up_at_the_deadline_across_retries():
    clock = FakeClock()
    with FakeChatServer([ScriptedReply(503, {"error": {"message": "busy"}})]) as server:
        judge = ServedJudge(
            server.base_url, "m", max_retries=10, backoff_s=4.0, sleep=clock.sleep, clock=clock
        )
        judge.deadline = clock() + 10.0
        with pytest.raises(JudgeDeadlineError, match=r"deadline ran out.*2 attempt.*HTTP 503: busy"):
            judge.compare(*images(), "x")
    # Attempt at t=0, sleep 4, attempt at t=4; the next backoff (8 s) would pass the deadline.
    assert len(server.requests) == 2 and clock.now == 1004.0


def test_served_judge_caps_each_attempt_at_the_time_left():
    clock = FakeClock()  # frozen: 0.5 s are left for the one attempt, whatever the judge's own timeout
    with FakeChatServer([ScriptedReply(200, {}, delay_s=2.0)]) as server:
        judge = ServedJudge(server.base_url, "m", timeout_s=120.0, max_retries=0, clock=clock)
        judge.deadline = clock() + 0.5
        with pytest.raises(JudgeUnavailableError, match=r"no reply within 0.5 s"):
            judge.compare(*images(), "x")
        judge.deadline = clock()  # nothing left: not even one attempt
        with pytest.raises(JudgeDeadlineError, match="0 attempt"):
            judge.compare(*images(), "x")
    assert len(server.requests) == 1


def test_served_judge_malformed_and_content_part_replies():
    content_parts = {"choices": [{"message": {"content": [{"type": "text", "text": "Image 2 is better."}]}}]}
    with FakeChatServer(
        [ScriptedReply(200, {"unexpected": True}), ScriptedReply(200, content_parts)]
    ) as server:
        judge = ServedJudge(server.base_url, "m", max_retries=0)
        with pytest.raises(JudgeUnavailableError, match="without choices"):
            judge.compare(*images(), "x")
        assert judge.compare(*images(), "x").choice == 2


def test_served_judge_configuration_errors(monkeypatch):
    monkeypatch.delenv("X2EDIT_TEST_MISSING_API_KEY", raising=False)
    with pytest.raises(JudgeConfigError, match="X2EDIT_TEST_MISSING_API_KEY is not set"):
        ServedJudge("http://127.0.0.1:1/v1", "m", "X2EDIT_TEST_MISSING_API_KEY")
    with pytest.raises(JudgeConfigError, match="NAME of an environment variable"):
        ServedJudge("http://127.0.0.1:1/v1", "m", "sk-abc123def456")
    with pytest.raises(JudgeConfigError, match="NAME of an environment variable"):
        ServedJudge("http://127.0.0.1:1/v1", "m", "my key")
    with pytest.raises(JudgeConfigError, match="not an http"):
        ServedJudge("file:///etc/passwd", "m")
    with pytest.raises(JudgeConfigError, match="model name"):
        ServedJudge("http://127.0.0.1:1/v1", " ")
    with pytest.raises(JudgeConfigError, match="unknown placeholder"):
        ServedJudge("http://127.0.0.1:1/v1", "m", prompt_template="{instruction} {seed}")


def test_selection_through_the_served_judge():
    replies = [chat_reply("2\nsharper"), chat_reply("Answer: 1"), chat_reply("maybe?"), chat_reply("Image 2")]
    with FakeChatServer(replies) as server:
        judge = ServedJudge(server.base_url, "m")
        result = select_best(images(), Image.new("RGB", (8, 8)), "add a hat", judge)
    assert result.winner_index == 1 and result.judge_calls == 2 and len(server.requests) == 2
    assert "sharper" in result.report


def test_selection_stops_when_the_first_judge_call_cannot_connect(caplog):
    judge = ServedJudge(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=0)
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(JudgeFailedError, match="first judge call could not"),
    ):
        select_best(images(), Image.new("RGB", (8, 8)), "add a hat", judge)
    assert any("first judge call could not connect" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------
# Hostile workflows: a workflow chooses the URL and the variable name, never which key leaves the
# machine. Every server here listens on 127.0.0.1; the connection guard proves nothing else is dialled.

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "aws-secret-do-not-send",
    "HF_TOKEN": "hf_do_not_send",
    "OPENAI_API_KEY": "sk-openai-do-not-send",
    "X2EDIT_JUDGE_API_KEY": "x2edit-judge-key",
}


@pytest.fixture
def secrets(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    return SECRETS


@pytest.fixture
def dialled(monkeypatch):
    """Every address a client tries to reach; anything but 127.0.0.1 is blocked (and recorded)."""
    attempts: list[str] = []
    real_create_connection = socket.create_connection
    real_getaddrinfo = socket.getaddrinfo

    def guarded_getaddrinfo(host, *args, **kwargs):
        attempts.append(str(host))
        if host not in ("127.0.0.1", b"127.0.0.1"):
            raise OSError(f"test guard: refused to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def guarded_create_connection(address, *args, **kwargs):
        if address[0] != "127.0.0.1":
            attempts.append(str(address[0]))
            raise OSError(f"test guard: refused to connect to {address!r}")
        return real_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", guarded_create_connection)
    return attempts


def assert_no_secret(text: str) -> None:
    for value in SECRETS.values():
        assert value not in text


def assert_nothing_sent(server: FakeChatServer) -> None:
    for request in server.requests:
        assert "authorization" not in request.headers
        assert_no_secret(json.dumps(request.headers))


@pytest.mark.parametrize("variable", ["AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "OPENAI_API_KEY", "PATH"])
def test_a_workflow_cannot_read_a_variable_the_owner_did_not_release(secrets, dialled, variable):
    with FakeChatServer([chat_reply("1")]) as server:
        with pytest.raises(JudgeConfigError, match=f"{variable}, which the machine's owner has not released"):
            ServedJudge(server.base_url, "m", variable)
    assert server.requests == [] and dialled.count("127.0.0.1") == 0


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("http://judge.example.invalid/v1", "plain http to a host that is not loopback"),
        ("http://127.0.0.1.evil.invalid:8000/v1", "plain http to a host that is not loopback"),
        ("http://localhost.evil.invalid/v1", "plain http to a host that is not loopback"),
        ("http://0.0.0.0:8000/v1", "plain http to a host that is not loopback"),
        ("http://10.0.0.5:8000/v1", "plain http to a host that is not loopback"),
        ("http://[::2]:8000/v1", "plain http to a host that is not loopback"),
        ("http://127.0.0.1:8000@evil.invalid/v1", "user information"),
        ("https://user:pass@127.0.0.1:8000/v1", "user information"),
        ("http://x2edit@[::1]:8000/v1", "user information"),
        ("ftp://127.0.0.1/v1", "not an http"),
        ("http://127.0.0.1:99999/v1", "invalid port"),
    ],
)
def test_a_released_key_never_goes_to_a_hostile_url(secrets, dialled, url, rule):
    with pytest.raises(JudgeConfigError, match=rule) as info:
        ServedJudge(url, "m", "X2EDIT_JUDGE_API_KEY")
    assert_no_secret(str(info.value))
    assert dialled == []


def test_queue_time_check_applies_the_same_rules_without_contacting_anything(secrets, dialled):
    check_served_judge_settings("http://127.0.0.1:9/v1", "X2EDIT_JUDGE_API_KEY")
    check_served_judge_settings("https://judge.example.invalid/v1", "")
    for url, variable, rule in [
        ("http://127.0.0.1:9/v1", "HF_TOKEN", "not released"),
        ("http://judge.example.invalid/v1", "X2EDIT_JUDGE_API_KEY", "plain http"),
        ("http://u:p@127.0.0.1:9/v1", "", "user information"),
        ("http://127.0.0.1:9/v1", "X2EDIT_UNSET_API_KEY", "is not set"),
    ]:
        with pytest.raises(JudgeConfigError, match=rule):
            check_served_judge_settings(url, variable)
    assert dialled == []


def test_loopback_hosts_take_a_key_over_http_others_only_over_https(secrets):
    for host in ("127.0.0.1", "127.8.9.10", "[::1]", "localhost", "LOCALHOST"):
        check_key_destination("X2EDIT_JUDGE_API_KEY", parse_endpoint(f"http://{host}:8000/v1"))
    check_key_destination("X2EDIT_JUDGE_API_KEY", parse_endpoint("https://judge.example.invalid/v1"))
    assert (
        is_loopback_host("::1") and not is_loopback_host("::2") and not is_loopback_host("127.0.0.1.nip.io")
    )
    for name in (
        "x2edit_judge_api_key",
        "X2EDIT_API_KEY",
        "X2EDIT_JUDGE_API_KEYS",
        "MY_X2EDIT_JUDGE_API_KEY",
    ):
        with pytest.raises(JudgeConfigError, match="not released"):
            check_key_destination(name, parse_endpoint("http://127.0.0.1:8000/v1"))


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_never_carries_the_key_to_another_port(secrets, dialled, status):
    with FakeChatServer([chat_reply("1")]) as elsewhere:
        target = elsewhere.base_url + "/chat/completions"
        with FakeChatServer([ScriptedReply(status, b"", headers={"Location": target})]) as server:
            judge = ServedJudge(server.base_url, "m", "X2EDIT_JUDGE_API_KEY", max_retries=3)
            with pytest.raises(JudgeRequestError, match=f"HTTP {status}, a redirect to") as info:
                judge.compare(*images(), "x")
            # The judge's own server got the key once; nothing followed the redirect.
            assert [r.headers["authorization"] for r in server.requests] == ["Bearer x2edit-judge-key"]
    assert elsewhere.requests == []
    assert_no_secret(str(info.value))
    assert set(dialled) <= {"127.0.0.1"}


def test_a_redirect_to_another_host_is_not_followed_and_stops_the_selection(secrets, dialled):
    redirect = ScriptedReply(302, b"", headers={"Location": "http://collector.evil.invalid/keys"})
    with FakeChatServer([redirect]) as server:
        judge = ServedJudge(server.base_url, "m", "X2EDIT_JUDGE_API_KEY")
        with pytest.raises(JudgeRequestError, match="collector.evil.invalid"):
            select_best(images(), Image.new("RGB", (8, 8)), "add a hat", judge)
    assert len(server.requests) == 1  # a redirect is a configuration error: not retried, no more calls
    assert "collector.evil.invalid" not in dialled and set(dialled) <= {"127.0.0.1"}


def test_loopback_requests_bypass_an_environment_proxy(secrets, monkeypatch):
    with FakeChatServer([chat_reply("1")]) as proxy, FakeChatServer([chat_reply("2")]) as server:
        for name in PROXY_VARIABLES:
            monkeypatch.setenv(name, proxy.base_url.rsplit("/v1", 1)[0])
        judge = ServedJudge(server.base_url, "m", "X2EDIT_JUDGE_API_KEY")
        assert judge.compare(*images(), "x").choice == 2
    assert proxy.requests == []
    assert server.requests[0].headers["authorization"] == "Bearer x2edit-judge-key"


def write_config(tmp_path, table) -> None:
    (tmp_path / "judges.json").write_text(json.dumps({"api_keys": table}))


def test_the_owner_config_releases_a_variable_for_one_host_and_port(secrets, dialled, tmp_path):
    with FakeChatServer([chat_reply("1")]) as allowed, FakeChatServer([chat_reply("1")]) as other:
        write_config(tmp_path, {f"127.0.0.1:{allowed.base_url.split(':')[2].split('/')[0]}": "HF_TOKEN"})
        judge = ServedJudge(allowed.base_url, "m", "HF_TOKEN")
        assert judge.compare(*images(), "x").choice == 1
        assert allowed.requests[0].headers["authorization"] == "Bearer hf_do_not_send"
        with pytest.raises(JudgeConfigError, match="releases HF_TOKEN only for 127.0.0.1:") as info:
            ServedJudge(other.base_url, "m", "HF_TOKEN")
        with pytest.raises(JudgeConfigError, match="not released"):
            ServedJudge(allowed.base_url, "m", "AWS_SECRET_ACCESS_KEY")  # the config names HF_TOKEN only
    assert other.requests == [] and len(allowed.requests) == 1
    assert_no_secret(str(info.value))


def test_the_owner_config_pins_an_x2edit_variable_to_its_hosts(secrets, dialled, tmp_path):
    write_config(tmp_path, {"judge.example.invalid": "X2EDIT_JUDGE_API_KEY"})
    check_key_destination("X2EDIT_JUDGE_API_KEY", parse_endpoint("https://judge.example.invalid:8443/v1"))
    with FakeChatServer([chat_reply("1")]) as server:
        with pytest.raises(JudgeConfigError, match="only for judge.example.invalid"):
            ServedJudge(server.base_url, "m", "X2EDIT_JUDGE_API_KEY")
    assert server.requests == [] and dialled == []


@pytest.mark.parametrize(
    "content", ["not json", '["HF_TOKEN"]', '{"api_keys": {"127.0.0.1": "$(cat /etc/passwd)"}}']
)
def test_a_broken_owner_config_is_a_clear_error(secrets, tmp_path, content):
    (tmp_path / "judges.json").write_text(content)
    with pytest.raises(JudgeConfigError, match="judge config"):
        ServedJudge("http://127.0.0.1:1/v1", "m", "X2EDIT_JUDGE_API_KEY")


def test_the_key_is_checked_again_when_sent(secrets, monkeypatch):
    """Released at construction, withdrawn before the call: nothing is sent."""
    with FakeChatServer([chat_reply("1")]) as server:
        judge = ServedJudge(server.base_url, "m", "X2EDIT_JUDGE_API_KEY")
        monkeypatch.delenv("X2EDIT_JUDGE_API_KEY")
        with pytest.raises(JudgeConfigError, match="is not set"):
            judge.compare(*images(), "x")
    assert server.requests == []
    assert_nothing_sent(server)


# --------------------------------------------------------------------------------------------------
# Local transformers judge on a tiny random Qwen2-VL


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory):
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl"))


def test_local_judge_runs_end_to_end_and_releases(tiny_vlm_dir):
    judge = LocalVLMJudge(tiny_vlm_dir, device="cpu", dtype="float32", max_new_tokens=6)
    assert not judge.loaded and judge.estimated_memory_bytes() > 0
    original, edit_1, edit_2 = images((64, 48))
    verdict = judge.compare(original, edit_1, edit_2, "add a red hat")
    # Random weights: any answer, but the verdict is the parse of what the model said.
    assert isinstance(verdict, JudgeVerdict) and verdict == verdict_from_answer(verdict.raw)
    assert judge.loaded
    judge.release()
    assert not judge.loaded and judge.model is None
    # Tensors in ComfyUI's layout work too, and the judge reloads after release. Its random answers
    # may all be unusable: the fall-back is asked for, so the selection still ends.
    result = select_best(
        [torch.rand(1, 40, 56, 3) for _ in range(3)],
        torch.rand(1, 40, 56, 3),
        "add a red hat",
        judge,
        keep_first_on_failure=True,
    )
    assert result.judge_calls == 2 and result.judge_errors == 0
    assert result.winner_index == result.comparisons[-1].winner
    for comparison in result.comparisons:  # each outcome follows from the parsed answer
        (call,) = comparison.calls
        assert comparison.winner == (call.winner if call.winner is not None else comparison.best)
    judge.release()


def test_local_judge_loads_the_qwen2_5_vl_family(tmp_path):
    folder = build_tiny_qwen2vl(tmp_path / "tiny_qwen2_5_vl", family="qwen2_5_vl")
    judge = LocalVLMJudge(folder, device="cpu", max_new_tokens=4)
    verdict = judge.compare(*images((64, 48)), "add a red hat")
    assert type(judge.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert judge.model.dtype == torch.float32  # dtype "auto" on CPU
    assert verdict == verdict_from_answer(verdict.raw)
    judge.release()
    assert not judge.loaded


def test_local_judge_fallback_prompt_matches_the_processor(tiny_vlm_dir):
    """Without a full processor (no torchvision) the judge builds Qwen's inputs itself: same tokens."""
    judge = LocalVLMJudge(tiny_vlm_dir, device="cpu", dtype="float32", max_new_tokens=4)
    judge.load()
    pictures = images((70, 50))
    judge.processor = None
    fallback = judge.encode(pictures, "add a hat")
    judge.processor = build_tiny_qwen2vl_processor()
    reference = judge.encode(pictures, "add a hat")
    assert set(reference) <= set(fallback) | {"token_type_ids"}
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(torch.as_tensor(fallback[key]), torch.as_tensor(reference[key])), key
    if "mm_token_type_ids" in reference:
        assert torch.equal(fallback["mm_token_type_ids"], torch.as_tensor(reference["mm_token_type_ids"]))
    image_id = judge.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    grid = fallback["image_grid_thw"]
    assert int((fallback["input_ids"] == image_id).sum()) == int(grid.prod(dim=1).sum()) // 4
    generated = judge.compare(*pictures, "add a hat")  # the processor path generates too
    assert generated == verdict_from_answer(generated.raw)
    judge.release()


def test_local_judge_configuration_errors(tmp_path, tiny_vlm_dir):
    with pytest.raises(JudgeConfigError, match="does not exist"):
        LocalVLMJudge(tmp_path / "missing")
    with pytest.raises(JudgeConfigError, match="no config.json"):
        LocalVLMJudge(tmp_path)
    with pytest.raises(JudgeConfigError, match="Unknown judge dtype"):
        LocalVLMJudge(tiny_vlm_dir, dtype="int4")
    with pytest.raises(JudgeConfigError, match="unknown placeholder"):
        LocalVLMJudge(tiny_vlm_dir, prompt_template="{instruction}{x}")
    with pytest.raises(JudgeConfigError, match="instruction"):
        LocalVLMJudge(tiny_vlm_dir).compare(*images(), "")
