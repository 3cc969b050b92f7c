"""Pointwise edit scoring (x2edit_core.judges.scoring): prompt, parsing, failure rules, served and
local judges."""

from __future__ import annotations

import math

import pytest
from PIL import Image
from vlm_fixtures import FakeChatServer, ScriptedReply, build_tiny_qwen2vl, chat_reply

from x2edit_core.errors import JudgeConfigError, JudgeUnavailableError, SelectionInterrupted
from x2edit_core.judges import (
    DEFAULT_SCORE_PROMPT,
    SCORE_IMAGE_LABELS,
    EditScore,
    Judge,
    JudgeConnectionError,
    JudgeFailedError,
    LocalVLMJudge,
    ServedJudge,
    build_score_prompt,
    edit_score_from_answer,
    parse_scores,
    score_edits,
)
from x2edit_core.judges.scoring import format_score_line, overall_score, rank_order


@pytest.fixture(autouse=True)
def no_http_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------------------------------
# Parsing

PARSE_CASES = [
    ('{"SC": 7, "PQ": 8, "reason": "ok"}', (7, 8)),
    ('{"SC": [7, 9], "PQ": [8, 6], "reason": "hat added; slight blur"}', (7, 6)),
    ('```json\n{"semantic_consistency": 6.5, "perceptual_quality": "9/10"}\n```', (6.5, 9)),
    ('Here you go: {"scores": {"sc": 3, "pq": 4}}', (3, 4)),
    ('{"语义一致性": 7, "感知质量": 8}', (7, 8)),
    ("SC: 7\nPQ: 8\nThe hat is red.", (7, 8)),
    ("**SC**: 7/10, **PQ**: 9/10", (7, 9)),
    ("Semantic consistency: 4 out of 10. Perceptual quality - 6.", (4, 6)),
    ("SC = [5, 8]; PQ = [9, 7]", (5, 7)),
    ("- SC (semantic consistency): 2\n- PQ (perceptual quality): 10", (2, 10)),
    ("语义一致性：7分，感知质量：8分。", (7, 8)),
    ("Instruction following score is 4/5 and image quality score 3/5", (8, 6)),
    ("SC: 70/100, PQ: 90/100", (7, 9)),
]


@pytest.mark.parametrize(("answer", "expected"), PARSE_CASES)
def test_parse_sc_and_pq(answer, expected):
    sc, pq, overall = parse_scores(answer)
    assert (sc, pq) == pytest.approx(expected)
    assert overall == pytest.approx(math.sqrt(expected[0] * expected[1]))


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("score 7/10", 7.0),
        ("Score: 6", 6.0),
        ("**Overall**: 8.5", 8.5),
        ("I'd give it 3/5.", 6.0),
        ('{"score": 9}', 9.0),
        ("评分：7", 7.0),
    ],
)
def test_a_single_overall_score_gives_only_the_overall(answer, expected):
    assert parse_scores(answer) == (None, None, pytest.approx(expected))


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "   ",
        "The edit looks fine.",
        "SC: 12, PQ: 8",  # out of range: unusable, not clamped
        '{"SC": "great", "PQ": 8}',
        "SC: 7",  # PQ missing: no overall can be formed
        "I cannot judge this.",
    ],
)
def test_unusable_answers_have_no_overall(answer):
    assert parse_scores(answer)[2] is None
    assert not edit_score_from_answer(answer).usable


def test_a_stated_overall_is_ignored_when_sc_and_pq_are_given():
    assert parse_scores("SC: 4, PQ: 9, Overall: 9") == (4.0, 9.0, pytest.approx(6.0))
    assert parse_scores(None) == (None, None, None)  # type: ignore[arg-type]


def test_edit_score_from_answer_reads_the_reason():
    score = edit_score_from_answer('{"SC": [6, 8], "PQ": 9, "reason": "The hat is there."}')
    assert score == EditScore(6.0, 9.0, pytest.approx(math.sqrt(54)), "The hat is there.", score.raw)
    assert edit_score_from_answer("SC: 1\nPQ: 1\n" + "x" * 5000).reason.endswith("...")
    assert overall_score(4, 9) == 6.0 and overall_score(None, 9) is None


# --------------------------------------------------------------------------------------------------
# Prompt


def test_default_score_prompt_asks_for_vie_score_sub_scores():
    prompt = build_score_prompt("  add a red hat ")
    assert '"add a red hat"' in prompt and "{instruction}" not in prompt
    for phrase in ("source image", "edited", "0 to 10", "over-editing", "naturalness", "artifacts", '"SC"'):
        assert phrase in prompt.lower() or phrase in prompt
    assert "{instruction}" in DEFAULT_SCORE_PROMPT
    assert SCORE_IMAGE_LABELS == ("Source image:", "Edited image:")


def test_score_prompt_templates_are_validated_like_the_pairwise_one():
    assert build_score_prompt("a {b}", 'Rate {instruction} as {"SC": 1}') == 'Rate a {b} as {"SC": 1}'
    with pytest.raises(JudgeConfigError, match="no {instruction}"):
        build_score_prompt("x", "Rate it")
    with pytest.raises(JudgeConfigError, match="unknown placeholder"):
        build_score_prompt("x", "{instruction} {source}")
    with pytest.raises(JudgeConfigError, match="instruction"):
        build_score_prompt(" ")


# --------------------------------------------------------------------------------------------------
# Scoring loop and its failure rules


class ListJudge(Judge):
    """Answers each score call with the next scripted item: a text answer, or an exception to raise."""

    def __init__(self, items):
        self.items = list(items)
        self.prompts: list[str] = []

    def score(self, source, edited, instruction, *, prompt_template=None):
        self.prompts.append(self.score_prompt(instruction, prompt_template))
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return edit_score_from_answer(item)


def test_score_edits_ranks_best_first_and_counts_failures():
    judge = ListJudge(
        ["SC: 5, PQ: 5", RuntimeError("connection reset"), "no idea", "SC: 9, PQ: 4", "score 8/10"]
    )
    progress = []
    result = score_edits(
        ["a", "b", "c", "d", "e"], "src", "add a hat", judge, progress=lambda d, t: progress.append((d, t))
    )
    assert result.overall == [5.0, None, None, 6.0, 8.0]
    assert result.order == [4, 3, 0, 1, 2]  # unscored last, in their order
    assert result.judge_errors == 1 and result.unusable_answers == 1
    assert "connection reset" in result.calls[1].error
    assert progress == [(i, 5) for i in range(1, 6)]
    lines = [format_score_line(f"edit {c.index}", c) for c in result.calls]
    assert lines[0] == "edit 0: O 5.00 (SC 5, PQ 5): SC: 5, PQ: 5"
    assert lines[1].startswith("edit 1: judge error: RuntimeError: connection reset")
    assert lines[2] == "edit 2: unusable answer: 'no idea'"


def test_rank_order_ties_keep_the_earlier_edit():
    assert rank_order([7.0, 8.0, 7.0, None, 8.0]) == [1, 4, 0, 2, 3]


def test_score_edits_stops_when_no_call_gives_a_usable_score(caplog):
    judge = ListJudge([JudgeUnavailableError("server down"), TimeoutError("slow")])
    with pytest.raises(JudgeFailedError, match=r"No scoring call .* \(2 asked, 2 error\(s\).*server down"):
        score_edits(["a", "b"], "src", "x", judge)
    judge = ListJudge(["hmm", "no idea"])
    with pytest.raises(JudgeFailedError, match="0 error.*2 unusable answer"):
        score_edits(["a", "b"], "src", "x", judge)
    assert "unusable judge answer (edit 0)" in caplog.text  # each problem is logged


def test_a_first_call_that_cannot_connect_stops_at_once():
    judge = ListJudge([JudgeConnectionError("connection refused"), "SC: 1, PQ: 1"])
    with pytest.raises(JudgeFailedError, match="first judge call could not connect.*connection refused"):
        score_edits(["a", "b"], "src", "x", judge)
    assert len(judge.items) == 1  # the second edit was never asked
    # Later connection failures are ordinary errors: that edit stays unscored.
    judge = ListJudge(["SC: 2, PQ: 2", JudgeConnectionError("gone")])
    result = score_edits(["a", "b"], "src", "x", judge)
    assert result.order == [0, 1] and result.judge_errors == 1
    assert result.warnings == ["judge call failed (edit 1), left unscored: JudgeConnectionError: gone"]


def test_the_deadline_bounds_all_calls():
    now = [0.0]

    class SlowJudge(ListJudge):
        def score(self, *args, **kwargs):
            assert self.deadline == 10.0  # handed to the judge for its own waits
            now[0] += 6.0
            return super().score(*args, **kwargs)

    judge = SlowJudge(["SC: 2, PQ: 2", "SC: 9, PQ: 9", "SC: 5, PQ: 5"])
    result = score_edits(["a", "b", "c"], "src", "x", judge, deadline_s=10.0, clock=lambda: now[0])
    assert result.overall == [2.0, 9.0, None] and result.skipped_calls == 1 and judge.deadline is None
    assert result.calls[2].error == "not asked: the judging deadline of 10 s had passed"
    assert "1 call(s) were not asked" in result.warnings[-1]


def test_score_edits_config_error_stops_at_once():
    judge = ListJudge([JudgeConfigError("bad key variable"), "SC: 1, PQ: 1"])
    with pytest.raises(JudgeConfigError, match="bad key variable"):
        score_edits(["a", "b"], "src", "x", judge)
    assert len(judge.items) == 1  # the second edit was never asked


def test_score_edits_prompt_override_and_interrupt():
    judge = ListJudge(["SC: 1, PQ: 1"] * 3)
    score_edits(["a"], "src", "add a hat", judge, prompt_template="Score {instruction}!")
    assert judge.prompts == ["Score add a hat!"]
    with pytest.raises(JudgeConfigError, match="no {instruction}"):
        score_edits(["a"], "src", "x", judge, prompt_template="Score it")
    with pytest.raises(SelectionInterrupted, match="after 0 of 2"):
        score_edits(["a", "b"], "src", "x", judge, should_stop=lambda: True)


def test_a_judge_without_scoring_is_a_config_error():
    class PairwiseOnly(Judge):
        def compare(self, *args):
            raise AssertionError

    with pytest.raises(JudgeConfigError, match="cannot score single edits"):
        score_edits(["a"], "src", "x", PairwiseOnly())


# --------------------------------------------------------------------------------------------------
# Served and local judges


def test_served_judge_scores_with_two_labelled_images():
    source, edited = Image.new("RGB", (300, 200), (10, 10, 10)), Image.new("RGB", (300, 200), (200, 0, 0))
    answer = '```json\n{"SC": [8, 9], "PQ": [7, 9], "reason": "red hat added"}\n```'
    with FakeChatServer([chat_reply(answer)]) as server:
        judge = ServedJudge(server.base_url, "m", max_image_side=150)
        score = judge.score(source, edited, "add a red hat")
    assert (score.sc, score.pq, score.reason) == (8.0, 7.0, "red hat added")
    assert score.overall == pytest.approx(math.sqrt(56))
    parts = server.requests[0].body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert [parts[0]["text"], parts[2]["text"]] == list(SCORE_IMAGE_LABELS)
    assert parts[-1]["text"] == build_score_prompt("add a red hat")


def test_served_judge_score_prompt_template_and_per_call_override():
    with FakeChatServer([chat_reply("SC: 1, PQ: 2")]) as server:
        judge = ServedJudge(server.base_url, "m", score_prompt_template="Judge: {instruction}")
        judge.score(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)), "x")
        judge.score(
            Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)), "x", prompt_template="Other {instruction}"
        )
    assert [r.body["messages"][0]["content"][-1]["text"] for r in server.requests] == ["Judge: x", "Other x"]
    with pytest.raises(JudgeConfigError, match="unknown placeholder"):
        ServedJudge("http://127.0.0.1:1/v1", "m", score_prompt_template="{instruction} {x}")


def test_served_judge_score_failures_follow_the_pairwise_rules():
    with FakeChatServer([ScriptedReply(500, {"error": {"message": "overloaded"}})]) as server:
        judge = ServedJudge(server.base_url, "m", max_retries=1, sleep=lambda s: None)
        with pytest.raises(JudgeUnavailableError, match="HTTP 500: overloaded"):
            judge.score(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)), "x")
    with FakeChatServer([ScriptedReply(400, {"error": {"message": "too many images"}})]) as server:
        judge = ServedJudge(server.base_url, "m", max_retries=3, sleep=lambda s: None)
        with pytest.raises(JudgeConfigError, match="too many images"):  # a 4xx stops at once
            score_edits([Image.new("RGB", (8, 8))], Image.new("RGB", (8, 8)), "x", judge)
        assert len(server.requests) == 1


def test_local_judge_scores_end_to_end(tmp_path):
    folder = build_tiny_qwen2vl(tmp_path / "tiny_qwen2vl")
    judge = LocalVLMJudge(folder, device="cpu", dtype="float32", max_new_tokens=6)
    score = judge.score(Image.new("RGB", (64, 48)), Image.new("RGB", (64, 48), (255, 0, 0)), "add a hat")
    assert isinstance(score, EditScore) and isinstance(score.raw, str)
    assert not score.usable  # the tiny model's words hold no scores: counted as unusable
    inputs = judge.encode(
        [Image.new("RGB", (64, 48))] * 2, "add a hat", SCORE_IMAGE_LABELS, judge.score_prompt("add a hat")
    )
    image_id = judge.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (
        int((inputs["input_ids"] == image_id).sum()) == int(inputs["image_grid_thw"].prod(dim=1).sum()) // 4
    )
    assert inputs["image_grid_thw"].shape[0] == 2
    judge.release()
    assert not judge.loaded
    with pytest.raises(JudgeConfigError, match="instruction"):
        judge.score(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)), " ")
    assert not judge.loaded  # the empty instruction failed before loading
