"""Early-filter running-winner selection (x2edit_core.selection) with scripted judges."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from x2edit_core.errors import (
    ConfigError,
    JudgeConfigError,
    JudgeUnavailableError,
    SelectionInterrupted,
)
from x2edit_core.judges import Judge, JudgeConnectionError, JudgeDeadlineError, JudgeFailedError, JudgeVerdict
from x2edit_core.selection import (
    BEST_KEPT,
    CHALLENGER_WINS,
    DISAGREEMENT,
    JUDGE_ERROR,
    UNUSABLE,
    judge_view,
    select_best,
    to_judge_image,
)

ORIGINAL = "original"


class ScriptedJudge(Judge):
    """Knows each candidate's true quality; candidates are their names ("c0", "c1", ...).

    position_bias: answers 1 whenever the two qualities differ by less than this (a judge that
    prefers the first position on close calls). `answers` overrides the answer for given
    (image 1, image 2) name pairs: an int choice, None (unusable), or an exception to raise.
    """

    def __init__(self, quality: dict[str, float], position_bias: float = 0.0, answers=None):
        self.quality = quality
        self.position_bias = position_bias
        self.answers = answers or {}
        self.calls: list[tuple[str, str]] = []

    def compare(self, original, candidate_1, candidate_2, instruction):
        assert original == ORIGINAL and instruction == "add a hat"
        self.calls.append((candidate_1, candidate_2))
        scripted = self.answers.get((candidate_1, candidate_2), "unset")
        if isinstance(scripted, BaseException):
            raise scripted
        if scripted != "unset":
            raw = "I cannot tell." if scripted is None else f"{scripted}\nscripted"
            return JudgeVerdict(scripted, "scripted", raw)
        q1, q2 = self.quality[candidate_1], self.quality[candidate_2]
        if abs(q1 - q2) < self.position_bias:
            return JudgeVerdict(1, "close call, first one", "1")
        choice = 1 if q1 > q2 else 2
        return JudgeVerdict(choice, f"image {choice} has quality {max(q1, q2):.3f}", f"{choice}")

    def describe(self):
        return "scripted judge"


def names(count):
    return [f"c{i}" for i in range(count)]


@pytest.mark.parametrize("seed", range(40))
def test_best_candidate_wins_for_random_permutations(seed):
    rng = random.Random(seed)
    count = rng.randint(1, 9)
    qualities = rng.sample(range(100), count)  # distinct, random order
    candidates = names(count)
    judge = ScriptedJudge(dict(zip(candidates, qualities)))
    result = select_best(candidates, ORIGINAL, "add a hat", judge)
    assert result.winner_index == int(np.argmax(qualities))
    assert result.judge_calls == len(judge.calls) == count - 1
    assert result.unusable_answers == 0 and result.judge_errors == 0


def test_each_comparison_shows_the_current_best_as_image_1():
    candidates = names(5)
    quality = dict(zip(candidates, [3, 1, 4, 0, 5]))
    judge = ScriptedJudge(quality)
    result = select_best(candidates, ORIGINAL, "add a hat", judge)
    assert judge.calls == [("c0", "c1"), ("c0", "c2"), ("c2", "c3"), ("c2", "c4")]
    assert [c.outcome for c in result.comparisons] == [BEST_KEPT, CHALLENGER_WINS, BEST_KEPT, CHALLENGER_WINS]
    assert [(c.best, c.challenger, c.winner) for c in result.comparisons] == [
        (0, 1, 0),
        (0, 2, 2),
        (2, 3, 2),
        (2, 4, 4),
    ]
    assert result.winner_index == 4


def test_swap_check_asks_both_orders_and_resists_position_bias():
    candidates = names(4)
    # c3 is clearly best; c1 is only slightly better than c0 (a close call the judge gets wrong
    # in the first position's favour).
    quality = dict(zip(candidates, [0.50, 0.52, 0.10, 0.90]))
    biased = ScriptedJudge(quality, position_bias=0.05)
    result = select_best(candidates, ORIGINAL, "add a hat", biased, swap_check=True)
    assert biased.calls[:2] == [("c0", "c1"), ("c1", "c0")]
    assert result.judge_calls == 6
    assert result.comparisons[0].outcome == DISAGREEMENT  # each order preferred its first image
    assert result.winner_index == 3

    always_first = ScriptedJudge(quality, position_bias=10.0)
    assert select_best(candidates, ORIGINAL, "add a hat", always_first).winner_index == 0
    swapped = select_best(
        candidates, ORIGINAL, "add a hat", ScriptedJudge(quality, position_bias=10.0), swap_check=True
    )
    assert swapped.winner_index == 0
    assert all(c.outcome == DISAGREEMENT for c in swapped.comparisons)


def test_unusable_answers_keep_the_current_best_and_are_counted():
    candidates = names(4)
    quality = dict(zip(candidates, [1, 9, 5, 7]))
    judge = ScriptedJudge(quality, answers={("c0", "c1"): None})
    result = select_best(candidates, ORIGINAL, "add a hat", judge)
    # c1 would have won but the answer was unusable: c0 stays, then loses to c2 (5) and c2 to c3 (7).
    assert result.comparisons[0].outcome == UNUSABLE
    assert result.comparisons[0].winner == 0
    assert result.unusable_answers == 1 and result.judge_errors == 0
    assert result.winner_index == 3
    assert "unusable answer" in result.report and "I cannot tell." in result.report


def test_unusable_answer_in_one_swap_order_keeps_the_best():
    candidates = names(2)
    judge = ScriptedJudge(dict(zip(candidates, [1, 9])), answers={("c1", "c0"): None})
    result = select_best(candidates, ORIGINAL, "add a hat", judge, swap_check=True)
    assert result.winner_index == 0 and result.comparisons[0].outcome == UNUSABLE


@pytest.mark.parametrize(
    "error",
    [JudgeUnavailableError("server down after 4 attempts"), RuntimeError("CUDA error"), TimeoutError("slow")],
)
def test_judge_errors_keep_the_current_best_and_are_counted(error):
    candidates = names(3)
    judge = ScriptedJudge(dict(zip(candidates, [1, 9, 5])), answers={("c0", "c1"): error})
    result = select_best(candidates, ORIGINAL, "add a hat", judge)
    assert result.comparisons[0].outcome == JUDGE_ERROR
    assert result.judge_errors == 1 and result.unusable_answers == 0
    assert result.winner_index == 2  # c0 kept, then beaten by c2
    assert type(error).__name__ in result.report and str(error) in result.report


def test_every_call_failing_is_an_error_unless_the_fall_back_is_asked_for(caplog):
    candidates = names(3)
    failure = JudgeUnavailableError("no route to host")
    answers = {("c0", "c1"): failure, ("c0", "c2"): failure}
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(JudgeFailedError, match="No judge call gave a usable"),
    ):
        select_best(
            candidates,
            ORIGINAL,
            "add a hat",
            ScriptedJudge(dict(zip(candidates, [1, 9, 5])), answers=answers),
        )
    # Each failed call is in the server log as it happens, and the final error too.
    assert (
        sum("no route to host" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 2
    )
    assert any(r.levelno == logging.ERROR and "No judge call" in r.getMessage() for r in caplog.records)

    judge = ScriptedJudge(dict(zip(candidates, [1, 9, 5])), answers=answers)
    result = select_best(candidates, ORIGINAL, "add a hat", judge, keep_first_on_failure=True)
    assert result.winner_index == 0 and result.judge_errors == 2 and result.fell_back
    first_line = result.report.splitlines()[0]
    assert first_line.startswith("WARNING: judge call failed") and "no route to host" in first_line
    assert "kept WITHOUT any judging" in result.report


def test_only_unusable_answers_are_an_error():
    candidates = names(3)
    judge = ScriptedJudge(dict(zip(candidates, [1, 9, 5])), answers={("c0", "c1"): None, ("c0", "c2"): None})
    with pytest.raises(JudgeFailedError, match="0 error.*2 unusable answer"):
        select_best(candidates, ORIGINAL, "add a hat", judge)


def test_a_first_call_that_cannot_connect_stops_at_once():
    candidates = names(5)
    refused = JudgeConnectionError("cannot connect: connection refused")
    judge = ScriptedJudge(dict(zip(candidates, [1, 2, 3, 4, 5])), answers={("c0", "c1"): refused})
    with pytest.raises(JudgeFailedError, match="first judge call could not connect.*other 3 call"):
        select_best(candidates, ORIGINAL, "add a hat", judge)
    assert judge.calls == [("c0", "c1")]

    # Asked-for fall-back: the remaining calls are still tried and judged.
    judge = ScriptedJudge(dict(zip(candidates, [1, 2, 3, 4, 5])), answers={("c0", "c1"): refused})
    result = select_best(candidates, ORIGINAL, "add a hat", judge, keep_first_on_failure=True)
    assert len(judge.calls) == 4 and result.winner_index == 4 and not result.fell_back


def test_a_later_connection_failure_is_a_warning_not_a_stop():
    candidates = names(3)
    refused = JudgeConnectionError("cannot connect: connection refused")
    judge = ScriptedJudge(dict(zip(candidates, [1, 9, 5])), answers={("c1", "c2"): refused})
    result = select_best(candidates, ORIGINAL, "add a hat", judge)
    assert result.winner_index == 1 and result.judge_errors == 1
    assert result.warnings and "connection refused" in result.warnings[0]
    assert result.report.startswith("WARNING: judge call failed")


class SlowJudge(ScriptedJudge):
    """Each call takes `seconds` on a fake clock, and records the deadline the selection gave it."""

    def __init__(self, quality, clock, seconds):
        super().__init__(quality)
        self.clock, self.seconds = clock, seconds
        self.deadlines = []

    def compare(self, original, candidate_1, candidate_2, instruction):
        self.deadlines.append(self.deadline)
        self.clock[0] += self.seconds
        return super().compare(original, candidate_1, candidate_2, instruction)


def test_the_deadline_bounds_all_judge_calls():
    candidates = names(6)
    clock = [100.0]
    judge = SlowJudge(dict(zip(candidates, [1, 2, 3, 4, 5, 6])), clock, seconds=10.0)
    result = select_best(candidates, ORIGINAL, "add a hat", judge, deadline_s=25.0, clock=lambda: clock[0])
    # Calls start at t = 0, 10, 20; at t = 30 the deadline (25 s) has passed: two calls not asked.
    assert len(judge.calls) == 3 and result.judge_calls == 3 and result.skipped_calls == 2
    assert judge.deadlines == [125.0, 125.0, 125.0] and judge.deadline is None  # given during calls only
    assert result.winner_index == 3  # the best among the candidates that were compared
    assert "deadline of 25 s passed: 2 of 5 judge call(s) were not asked" in result.report.splitlines()[0]
    assert "not asked (deadline): 2" in result.report


def test_a_deadline_that_passes_before_any_answer_is_an_error():
    candidates = names(3)
    clock = [0.0]

    class Expiring(SlowJudge):
        def compare(self, *args):
            self.clock[0] += self.seconds
            raise JudgeDeadlineError("The judging deadline ran out")

    judge = Expiring(dict(zip(candidates, [1, 2, 3])), clock, seconds=5.0)
    with pytest.raises(JudgeFailedError, match=r"1 asked, 1 error.*1 not asked"):
        select_best(candidates, ORIGINAL, "add a hat", judge, deadline_s=5.0, clock=lambda: clock[0])


@pytest.mark.parametrize("deadline", [0, -1.0])
def test_deadline_must_be_positive(deadline):
    with pytest.raises(ConfigError, match="deadline"):
        select_best(names(2), ORIGINAL, "add a hat", ScriptedJudge({"c0": 1, "c1": 2}), deadline_s=deadline)


def test_a_misconfigured_judge_stops_the_selection():
    candidates = names(3)
    judge = ScriptedJudge(
        dict(zip(candidates, [1, 9, 5])),
        answers={("c0", "c1"): JudgeConfigError("OPENAI_API_KEY is not set")},
    )
    with pytest.raises(JudgeConfigError, match="OPENAI_API_KEY"):
        select_best(candidates, ORIGINAL, "add a hat", judge)


def test_report_lists_every_comparison_with_labels_and_reasons():
    candidates = names(3)
    judge = ScriptedJudge(dict(zip(candidates, [1, 9, 5])))
    result = select_best(candidates, ORIGINAL, "add a hat", judge, labels=["seed 10", "seed 11", "seed 12"])
    report = result.report
    assert "3 candidate(s) by scripted judge" in report
    assert (
        "1. candidate 0 (seed 10) vs candidate 1 (seed 11): challenger wins -> candidate 1 (seed 11)"
        in report
    )
    assert "2. candidate 1 (seed 11) vs candidate 2 (seed 12): best kept -> candidate 1 (seed 11)" in report
    assert "image 2 has quality 9.000" in report and "image 1 has quality 9.000" in report
    assert "Winner: candidate 1 (seed 11). Judge calls: 2, unusable answers: 0, judge errors: 0" in report
    assert "keep the current best" in report
    assert result.comparisons[0].reason == "image 2 has quality 9.000"


def test_single_candidate_needs_no_judge_and_empty_is_an_error():
    judge = ScriptedJudge({"c0": 1})
    result = select_best(["c0"], ORIGINAL, "add a hat", judge)
    assert result.winner_index == 0 and result.judge_calls == 0 and judge.calls == []
    with pytest.raises(ConfigError, match="no candidates"):
        select_best([], ORIGINAL, "add a hat", judge)
    with pytest.raises(ConfigError, match="labels"):
        select_best(["c0", "c1"], ORIGINAL, "add a hat", judge, labels=["only one"])


def test_progress_is_reported_after_each_judge_call():
    candidates = names(4)
    judge = ScriptedJudge(dict(zip(candidates, [1, 2, 3, 4])))
    seen = []

    def progress(done, total):
        seen.append((done, total, len(judge.calls)))

    select_best(candidates, ORIGINAL, "add a hat", judge, swap_check=True, progress=progress)
    assert seen == [(i, 6, i) for i in range(1, 7)]


def test_should_stop_is_checked_before_each_call_and_its_exception_propagates():
    class Interrupted(Exception):
        pass

    candidates = names(5)
    judge = ScriptedJudge(dict(zip(candidates, [1, 2, 3, 4, 5])))

    def should_stop():
        if len(judge.calls) == 2:
            raise Interrupted("processing interrupted")

    with pytest.raises(Interrupted):
        select_best(candidates, ORIGINAL, "add a hat", judge, should_stop=should_stop)
    assert len(judge.calls) == 2

    judge = ScriptedJudge(dict(zip(candidates, [1, 2, 3, 4, 5])))
    with pytest.raises(SelectionInterrupted, match="after 1 of 4"):
        select_best(candidates, ORIGINAL, "add a hat", judge, should_stop=lambda: len(judge.calls) >= 1)
    assert len(judge.calls) == 1


def test_judge_view_cuts_the_right_panel_of_pil_images_arrays_and_tensors():
    canvas = Image.new("RGB", (64, 24), (255, 0, 0))
    canvas.paste((0, 0, 255), (32, 0, 64, 24))
    panel = judge_view(canvas, "right_panel")
    assert panel.size == (32, 24) and panel.getpixel((0, 0)) == (0, 0, 255)
    assert judge_view(canvas, "whole") is canvas

    batch = torch.zeros(1, 24, 64, 3)
    batch[:, :, 32:, 2] = 1.0
    cut = judge_view(batch)
    assert isinstance(cut, torch.Tensor) and cut.shape == (1, 24, 32, 3) and bool((cut[..., 2] == 1).all())
    array = batch[0].numpy()
    assert judge_view(array).shape == (24, 32, 3)

    as_pil = to_judge_image(batch, "right_panel")
    assert as_pil.size == (32, 24) and as_pil.getpixel((5, 5)) == (0, 0, 255)
    with pytest.raises(ConfigError, match="Unknown judge view"):
        judge_view(canvas, "left")
    with pytest.raises(ConfigError, match="right panel"):
        judge_view(torch.zeros(5), "right_panel")
