"""Early-filter planning maths (x2edit_core.early_filter): NFE, seeds, batches, validation, report."""

from __future__ import annotations

import pytest

from x2edit_core.early_filter import (
    SEED_MODULUS,
    candidate_seeds,
    format_filter_report,
    make_plan,
    nfe,
    plain_nfe,
    plan_batches,
)
from x2edit_core.errors import ConfigError


def test_nfe_matches_the_paper_table():
    # ICEdit Table 3b: 1 noise 50; 6x10 110; 6x4 74; 12x10 170; 6x50 350 (paper mode).
    assert plain_nfe(50) == 50
    assert nfe("paper", 6, 10, 50) == 110
    assert nfe("paper", 6, 4, 50) == 74
    assert nfe("paper", 12, 10, 50) == 170
    assert nfe("paper", 6, 50, 50) == 350


def test_nfe_resume_saves_the_winners_early_steps():
    assert nfe("resume", 6, 10, 50) == 100
    assert nfe("resume", 1, 10, 50) == 50  # one candidate: exactly a plain run
    assert make_plan("resume", 6, 10, 50, 2, 0).nfe_ratio == pytest.approx(2.0)
    assert make_plan("paper", 6, 10, 50, 2, 0).nfe_ratio == pytest.approx(2.2)


def test_seeds_are_consecutive_and_wrap():
    assert candidate_seeds(7, 3) == [7, 8, 9]
    assert candidate_seeds(SEED_MODULUS - 2, 4) == [SEED_MODULUS - 2, SEED_MODULUS - 1, 0, 1]
    with pytest.raises(ConfigError, match="outside"):
        candidate_seeds(-1, 2)
    with pytest.raises(ConfigError, match="at least 1 candidate"):
        candidate_seeds(0, 0)


@pytest.mark.parametrize(
    "count, batch, expected",
    [
        (6, 2, [[0, 1], [2, 3], [4, 5]]),
        (5, 2, [[0, 1], [2, 3], [4]]),
        (3, 8, [[0, 1, 2]]),
        (3, 1, [[0], [1], [2]]),
    ],
)
def test_batches_cover_every_candidate_once_in_order(count, batch, expected):
    assert plan_batches(count, batch) == expected


def test_batch_size_must_be_positive():
    with pytest.raises(ConfigError, match="batch size"):
        plan_batches(6, 0)


def test_plan_schedules_and_progress_units():
    paper = make_plan("paper", 6, 10, 50, 4, 100)
    assert paper.candidate_schedule_steps == 10 and paper.final_steps == 50
    assert paper.batches == [[0, 1, 2, 3], [4, 5]]
    assert paper.progress_total(judge_calls=5) == 60 + 6 + 5 + 50  # steps, previews, judge, winner
    resume = make_plan("resume", 6, 10, 50, 4, 100)
    assert resume.candidate_schedule_steps == 50 and resume.final_steps == 40
    assert resume.progress_total(judge_calls=5) == 60 + 6 + 5 + 40
    assert make_plan("paper", 3, 2, 4, 16, 0).batch_size == 3  # clamped to M
    assert "NFE 110" in paper.describe() and "2.20x" in paper.describe()


@pytest.mark.parametrize(
    "args, message",
    [
        (("resume", 6, 50, 50, 2, 0), "fewer than the total steps"),
        (("resume", 6, 60, 50, 2, 0), "fewer than the total steps"),
        (("paper", 6, 60, 50, 2, 0), "exceed the total steps"),
        (("paper", 0, 10, 50, 2, 0), "at least 1 candidate"),
        (("paper", 6, 0, 50, 2, 0), "early steps m must be at least 1"),
        (("paper", 6, 10, 0, 2, 0), "total steps n must be at least 1"),
        (("paper", 6, 10, 50, 0, 0), "batch size"),
        (("fast", 6, 10, 50, 2, 0), "Unknown early-filter mode"),
        (("paper", 6, 10, 50, 2, SEED_MODULUS), "outside"),
    ],
)
def test_invalid_plans_say_what_to_change(args, message):
    with pytest.raises(ConfigError, match=message):
        make_plan(*args)


def test_paper_mode_allows_full_length_candidates():
    plan = make_plan("paper", 6, 50, 50, 6, 0)  # the paper's 6x50 row
    assert plan.nfe == 350


def test_report_names_plan_seeds_winner_and_timings():
    plan = make_plan("resume", 3, 2, 8, 2, 41)
    report = format_filter_report(
        plan, 2, "SELECTION REPORT", {"candidates": 1.5, "judge": 0.5}, warnings=["judge call failed"]
    )
    assert report.splitlines()[0] == "WARNING: judge call failed"  # warnings come first
    assert "mode resume" in report and "NFE 12" in report
    assert "0: 41, 1: 42, 2: 43" in report
    assert "SELECTION REPORT" in report
    assert "Winning seed: 43 (candidate 2)" in report
    assert "Time: candidates 1.5 s, judge 0.5 s." in report
