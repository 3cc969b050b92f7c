"""Evaluation run: metrics for every sample, resumable, written as JSONL, CSV, a summary and HTML.

Results go to `<out>/results.jsonl` as they are computed (one line per sample and batch; a later line
for the same id wins), so an interrupted run loses at most one batch. On the next run a sample whose
stored record has every requested metric is skipped, judge errors are retried, and a sample whose
files or instruction changed is scored again. `<out>/eval_config.json` records which models produced
the numbers; resuming with other models is refused rather than mixing their numbers.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..judges.base import JudgeFailedError
from ..judges.scoring import call_score
from .manifest import Sample
from .metrics import ClipEmbedder, DinoEmbedder, cosine_rows, load_rgb, pixel_errors

__all__ = ["METRICS", "EvalRun", "evaluate", "summarize"]

# Metric columns in report order, and the group that computes each.
METRICS = ("l1", "l2", "clip_i", "clip_t", "dino", "sc", "pq", "overall")
GROUP_KEYS = {
    "pixel": ("l1", "l2"),
    "clip_i": ("clip_i",),
    "clip_t": ("clip_t",),
    "dino": ("dino",),
    "judge": ("sc", "pq", "overall"),
}
RESULTS_NAME = "results.jsonl"
CONFIG_NAME = "eval_config.json"
# A run whose first calls all fail (or whose very first call cannot connect) stops instead of waiting
# out every sample's retries; later failures are recorded per sample and retried on resume.
FAILED_JUDGE_CALLS_BEFORE_STOP = 8


@dataclass
class EvalRun:
    records: list[dict]
    summary: dict
    out_dir: Path
    computed: int  # samples scored in this run (the others were reused)
    reused: int
    judge_calls: int = 0
    judge_errors: int = 0
    files: dict[str, Path] = field(default_factory=dict)


def _model_identity(clip: ClipEmbedder | None, dino: DinoEmbedder | None, judge: Any) -> dict:
    describe = getattr(judge, "describe", None)
    return {
        "clip": str(clip.folder.resolve()) if clip else None,
        "dino": str(dino.folder.resolve()) if dino else None,
        "judge": (describe() if callable(describe) else type(judge).__name__) if judge is not None else None,
    }


def _read_records(path: Path) -> dict[str, dict]:
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut off by a crash: that sample is scored again
            if isinstance(record, dict) and "id" in record:
                records[str(record["id"])] = record
    return records


def _check_config(out_dir: Path, identity: dict, resume: bool) -> None:
    path = out_dir / CONFIG_NAME
    if resume and path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        clashes = [
            f"{key}: stored {stored.get(key)!r}, now {value!r}"
            for key, value in identity.items()
            if value is not None and stored.get(key) not in (None, value)
        ]
        if clashes:
            raise ConfigError(
                f"{out_dir} holds results from other models ({'; '.join(clashes)}): use another output "
                "folder, or overwrite (resume off) to start again."
            )
        identity = {key: identity.get(key) or stored.get(key) for key in set(stored) | set(identity)}
    path.write_text(json.dumps(identity, indent=2, sort_keys=True), encoding="utf-8")


def _needed_groups(sample: Sample, record: dict | None, requested: set[str]) -> set[str]:
    if record is None or record.get("identity") != sample.identity():
        return set(requested)
    needed = {group for group in requested if any(key not in record for key in GROUP_KEYS[group])}
    if "judge" in requested and record.get("judge_error"):
        needed.add("judge")
    return needed


class _Progress:
    """tqdm when installed, else a plain line on stderr every few percent."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.bar, self.enabled = total, 0, None, enabled and total > 0
        self.last_line = -1.0
        self.start = time.perf_counter()
        if self.enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="sample", desc="x2edit-eval")
            except ImportError:
                pass

    def update(self, count: int) -> None:
        self.done += count
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(count)
            return
        fraction = self.done / self.total
        if fraction - self.last_line >= 0.05 or self.done == self.total:
            self.last_line = fraction
            elapsed = time.perf_counter() - self.start
            print(f"x2edit-eval: {self.done}/{self.total} samples, {elapsed:.0f} s", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def evaluate(
    samples: Sequence[Sample],
    out_dir: str | Path,
    *,
    clip: ClipEmbedder | None = None,
    dino: DinoEmbedder | None = None,
    judge: Any = None,
    judge_prompt: str | None = None,
    judge_workers: int = 1,
    batch_size: int = 16,
    resume: bool = True,
    progress: bool = True,
    html: bool = True,
    thumbnail_side: int = 160,
    on_batch: Callable[[int, int], None] | None = None,
) -> EvalRun:
    """Evaluate `samples` into `out_dir` (see the module docstring) and return the records.

    L1/L2 are computed for every sample with a target; CLIP-I and DINO need a target and the model;
    CLIP-T needs CLIP; the judge's SC/PQ/overall need a judge with `score` and an instruction.
    judge_workers > 1 sends that many requests at once (served judges only).
    """
    if batch_size < 1:
        raise ConfigError(f"The batch size must be at least 1, got {batch_size}.")
    if judge_workers < 1:
        raise ConfigError(f"judge_workers must be at least 1, got {judge_workers}.")
    if not samples:
        raise ConfigError("Nothing to evaluate: no samples.")
    if judge is not None and not callable(getattr(judge, "score", None)):
        raise ConfigError(f"{type(judge).__name__} cannot score edits: it has no score() method.")
    if judge is not None:
        no_instruction = [s.id for s in samples if not s.instruction]
        if no_instruction:
            raise ConfigError(
                f"{len(no_instruction)} sample(s) have no instruction, which the judge needs: "
                + ", ".join(no_instruction[:5])
            )
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_NAME
    if not resume and results_path.exists():
        results_path.unlink()
    _check_config(out_dir, _model_identity(clip, dino, judge), resume)

    requested = {"pixel"}
    if clip is not None:
        requested |= {"clip_i", "clip_t"}
    if dino is not None:
        requested.add("dino")
    if judge is not None:
        requested.add("judge")

    stored = _read_records(results_path) if resume else {}
    work = []
    for sample in samples:
        needed = _needed_groups(sample, stored.get(sample.id), requested)
        if needed:
            work.append((sample, needed))
    bar = _Progress(len(work), progress)
    judge_calls = judge_errors = judge_successes = 0
    try:
        with open(results_path, "a", encoding="utf-8") as out:
            for start in range(0, len(work), batch_size):
                chunk = work[start : start + batch_size]
                new_records, calls = _score_chunk(
                    chunk, stored, clip, dino, judge, judge_prompt, judge_workers
                )
                for record in new_records:
                    stored[record["id"]] = record
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                judge_calls += len(calls)
                judge_errors += sum(1 for c in calls if c.error)
                judge_successes += sum(1 for c in calls if not c.error)
                bar.update(len(chunk))
                if on_batch is not None:
                    on_batch(start + len(chunk), len(work))
                cannot_connect = bool(calls) and calls[0].connection_failed and judge_calls == len(calls)
                if judge_successes == 0 and (
                    cannot_connect or judge_errors >= min(FAILED_JUDGE_CALLS_BEFORE_STOP, len(work))
                ):
                    errors = sorted({c.error for c in calls if c.error})
                    raise JudgeFailedError(
                        f"The first {judge_errors} judge call(s) all failed, so the run stops (the other "
                        f"metrics computed so far are saved; rerun to resume): {'; '.join(errors[:3])}"
                    )
    finally:
        bar.close()
        if judge is not None and hasattr(judge, "release"):
            judge.release()

    records = [stored[s.id] for s in samples if s.id in stored]
    _rewrite_jsonl(results_path, records)
    summary = summarize(records)
    from .report import write_csv, write_html

    files = {"jsonl": results_path, "csv": out_dir / "results.csv", "summary": out_dir / "summary.json"}
    write_csv(records, files["csv"])
    files["summary"].write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    if html:
        files["html"] = out_dir / "report.html"
        write_html(records, summary, files["html"], thumbnail_side=thumbnail_side)
    return EvalRun(
        records=records,
        summary=summary,
        out_dir=out_dir,
        computed=len(work),
        reused=len(samples) - len(work),
        judge_calls=judge_calls,
        judge_errors=judge_errors,
        files=files,
    )


def _rewrite_jsonl(path: Path, records: list[dict]) -> None:
    temporary = path.with_suffix(".jsonl.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


def _score_chunk(chunk, stored, clip, dino, judge, judge_prompt, judge_workers):
    """Records for one batch of samples: every needed metric group, embedders batched."""
    records = []
    images = []
    for sample, needed in chunk:
        old = stored.get(sample.id)
        record = dict(old) if old is not None and old.get("identity") == sample.identity() else {}
        record.update(
            id=sample.id, task=sample.task, instruction=sample.instruction, identity=sample.identity()
        )
        if "judge" in needed:
            record.pop("judge_error", None)
        records.append(record)
        edited = load_rgb(sample.edited)
        target = load_rgb(sample.target) if sample.target is not None else None
        images.append((edited, target))

    for (_sample, needed), record, (edited, target) in zip(chunk, records, images):
        if "pixel" in needed:
            l1, l2 = pixel_errors(edited, target) if target is not None else (None, None)
            record.update(l1=l1, l2=l2)

    for group, embedder in (("clip_i", clip), ("dino", dino)):
        if embedder is None:
            continue
        rows = [i for i, (s, needed) in enumerate(chunk) if group in needed]
        with_target = [i for i in rows if images[i][1] is not None]
        for i in rows:
            records[i][group] = None
        if with_target:
            a = embedder.image_embeddings([images[i][0] for i in with_target])
            b = embedder.image_embeddings([images[i][1] for i in with_target])
            for i, value in zip(with_target, cosine_rows(a, b)):
                records[i][group] = value

    if clip is not None:
        rows = [i for i, (s, needed) in enumerate(chunk) if "clip_t" in needed]
        texted = [i for i in rows if chunk[i][0].clip_t_text]
        for i in rows:
            records[i]["clip_t"] = None
        if texted:
            a = clip.image_embeddings([images[i][0] for i in texted])
            b = clip.text_embeddings([chunk[i][0].clip_t_text for i in texted])
            for i, value in zip(texted, cosine_rows(a, b)):
                records[i]["clip_t"] = value

    calls = []
    if judge is not None:
        rows = [i for i, (s, needed) in enumerate(chunk) if "judge" in needed]
        kwargs = {} if judge_prompt is None else {"prompt_template": judge_prompt}

        def one(i):
            sample = chunk[i][0]
            return call_score(judge, load_rgb(sample.source), images[i][0], sample.instruction, i, **kwargs)

        if judge_workers > 1 and len(rows) > 1:
            with ThreadPoolExecutor(max_workers=judge_workers) as pool:
                calls = list(pool.map(one, rows))
        else:
            calls = [one(i) for i in rows]
        for call in calls:
            record = records[call.index]
            if call.error:
                for key in GROUP_KEYS["judge"]:
                    record.pop(key, None)
                record["judge_error"] = call.error
                continue
            score = call.score
            record.update(sc=score.sc, pq=score.pq, overall=score.overall, judge_reason=score.reason)
            if not score.usable:
                record["judge_unusable"] = score.raw[:500]
            else:
                record.pop("judge_unusable", None)
    return records, calls


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: Sequence[dict]) -> dict:
    """Per-task and overall means: {"all": {metric: {"mean", "count"}}, "tasks": {task: {...}}, ...}."""

    def block(rows: Sequence[dict]) -> dict:
        out = {"samples": len(rows)}
        for metric in METRICS:
            values = [
                float(r[metric])
                for r in rows
                if isinstance(r.get(metric), (int, float)) and not math.isnan(r[metric])
            ]
            out[metric] = {"mean": _mean(values), "count": len(values)}
        out["judge_errors"] = sum(1 for r in rows if r.get("judge_error"))
        out["judge_unusable"] = sum(1 for r in rows if r.get("judge_unusable"))
        return out

    tasks: dict[str, list[dict]] = {}
    for record in records:
        tasks.setdefault(str(record.get("task", "all")), []).append(record)
    return {"all": block(list(records)), "tasks": {task: block(rows) for task, rows in sorted(tasks.items())}}
