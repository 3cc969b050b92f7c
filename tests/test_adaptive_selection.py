"""Adaptive early-filter selection (x2edit_core.selection.select_adaptive): candidates scored as they
are drawn, drawing stops at the threshold, the budget caps it, the pairwise failure rules apply."""

from __future__ import annotations

import pytest

from x2edit_core.early_filter import nfe
from x2edit_core.errors import ConfigError, JudgeConfigError, SelectionInterrupted
from x2edit_core.judges import Judge, JudgeConnectionError, JudgeFailedError, edit_score_from_answer
from x2edit_core.selection import select_adaptive


class QualityJudge(Judge):
    """Scores a candidate by its known quality: the candidate *is* its overall score (a float), or an
    exception to raise, or None for an unusable answer."""

    def __init__(self):
        self.asked: list = []

    def score(self, source, edited, instruction, *, prompt_template=None):
        self.asked.append(edited)
        if isinstance(edited, Exception):
            raise edited
        if edited is None:
            return edit_score_from_answer("no idea")
        return edit_score_from_answer(f"SC: {edited}, PQ: {edited}")

    def describe(self):
        return "quality judge"


def run(qualities, batch_size=1, threshold=7.0, **kwargs):
    batches = [
        list(range(i, min(i + batch_size, len(qualities)))) for i in range(0, len(qualities), batch_size)
    ]
    drawn_batches = []

    def draw(indices):
        drawn_batches.append(indices)
        return [qualities[i] for i in indices]

    judge = kwargs.pop("judge", QualityJudge())
    result = select_adaptive(batches, draw, "source", "add a hat", judge, threshold=threshold, **kwargs)
    return result, drawn_batches, judge


def test_stops_at_the_first_candidate_that_reaches_the_threshold():
    result, drawn, judge = run([3.0, 8.0, 9.5, 10.0], threshold=7.0)
    assert result.winner_index == 1 and result.drawn == 2 and result.stopped_early
    assert drawn == [[0], [1]] and judge.asked == [3.0, 8.0]
    assert result.scores == [3.0, 8.0]
    # NFE counts the drawn candidates only: paper 6x10/50 with two drawn is 50 + 2*10.
    assert nfe("paper", result.drawn, 10, 50) == 70 and nfe("resume", result.drawn, 10, 50) == 60
    assert "stopped after 2 of 4 candidate(s): threshold reached" in result.report
    assert "candidate 1: O 8.00 (SC 8, PQ 8)" in result.report


def test_budget_caps_drawing_and_the_best_is_kept():
    result, drawn, _ = run([3.0, 6.0, 5.0, 6.0], threshold=7.0)
    assert result.winner_index == 1 and result.drawn == 4 and not result.stopped_early  # tie: earlier one
    assert "none reached the threshold, the best is kept" in result.report
    result, _, _ = run([3.0, 6.0], threshold=11.0)  # above 10: never stops, best of M by score
    assert result.winner_index == 1 and result.drawn == 2


def test_batches_are_drawn_whole_and_judging_stops_inside_a_batch():
    result, drawn, judge = run([2.0, 9.0, 9.9, 1.0, 10.0], batch_size=3, threshold=8.5)
    assert drawn == [[0, 1, 2]] and result.drawn == 3 and judge.asked == [2.0, 9.0]
    assert result.winner_index == 1 and result.stopped_early
    result, drawn, _ = run([2.0, 3.0, 9.0], batch_size=2, threshold=8.5)
    assert drawn == [[0, 1], [2]] and result.winner_index == 2 and not result.stopped_early


def test_failures_follow_the_pairwise_rules():
    result, _, _ = run([RuntimeError("timeout"), None, 6.0, 4.0])
    assert result.winner_index == 2 and result.judge_errors == 1 and result.unusable_answers == 1
    assert result.report.startswith("WARNING: judge call failed (candidate 0), left unscored")
    with pytest.raises(JudgeFailedError, match="first judge call could not connect"):
        run([JudgeConnectionError("refused"), 9.0])
    with pytest.raises(JudgeFailedError, match="no candidate can be chosen"):
        run([None, RuntimeError("boom")])
    result, _, _ = run([None, RuntimeError("boom")], keep_first_on_failure=True)
    assert result.winner_index == 0 and result.fell_back and "WITHOUT judging" in result.report
    with pytest.raises(JudgeConfigError, match="bad template"):
        run([JudgeConfigError("bad template"), 9.0])


def test_deadline_stops_drawing_and_interrupts_propagate():
    now = [0.0]

    class SlowJudge(QualityJudge):
        def score(self, *args, **kwargs):
            now[0] += 4.0
            return super().score(*args, **kwargs)

    result, drawn, _ = run([1.0, 2.0, 3.0, 4.0], judge=SlowJudge(), deadline_s=7.0, clock=lambda: now[0])
    assert drawn == [[0], [1]] and result.drawn == 2 and result.winner_index == 1  # no sampling wasted
    with pytest.raises(SelectionInterrupted):
        run([1.0, 2.0], should_stop=lambda: True)


def test_labels_progress_and_bad_input():
    progress = []
    result, _, _ = run([1.0, 9.0], labels=["seed 5", "seed 6"], progress=lambda d, t: progress.append((d, t)))
    assert progress == [(1, 2), (2, 2)] and "Winner: candidate 1 (seed 6)" in result.report
    with pytest.raises(ConfigError, match="no candidates"):
        select_adaptive([], lambda i: [], "s", "x", QualityJudge(), threshold=5)
    with pytest.raises(ConfigError, match="must be a number"):
        run([1.0], threshold=float("nan"))


def test_benchmark_simulation_runs_and_accounts_nfe():
    """benchmarks/early_filter.py --simulate-only: fixed policies cost exactly their NFE, adaptive less."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "benchmarks", "early_filter.py"),
            "--simulate-only",
            "--trials",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {}
    for line in out.stdout.splitlines():
        parts = line.rsplit(None, 6)
        if len(parts) == 7 and parts[1].replace(".", "").isdigit():
            rows[parts[0].strip()] = [float(x) for x in parts[1:]]
    assert rows["plain (1 noise)"][0] == 50.0 and rows["paper best of 6"][0] == 110.0
    assert rows["resume best of 6"][0] == 100.0
    for threshold in ("6.5", "7", "7.5"):
        spent, ratio, drawn, calls = rows[f"adaptive/resume t={threshold}"][:4]
        assert 1 <= drawn <= 6 and spent == pytest.approx(10 * drawn + 40) and calls <= drawn
        assert rows[f"adaptive/paper t={threshold}"][0] == pytest.approx(
            50 + 10 * rows[f"adaptive/paper t={threshold}"][2]
        )
    best = rows["oracle best of 6"][4]
    assert all(row[4] <= best + 1e-9 for row in rows.values())  # nothing beats the oracle
