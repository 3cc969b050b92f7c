"""Edit evaluation (x2edit_core.evaluation, x2edit-eval): metrics against plain reference formulas on
tiny random CLIP / DINOv2 models, manifests, resume, per-task summaries, reports, the CLI."""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from vlm_fixtures import FakeChatServer, chat_reply

from x2edit_core.errors import ConfigError
from x2edit_core.evaluation import (
    ClipEmbedder,
    DinoEmbedder,
    evaluate,
    load_manifest,
    pixel_errors,
    samples_from_folders,
)
from x2edit_core.evaluation.cli import main as eval_main
from x2edit_core.judges import Judge, JudgeConnectionError, JudgeFailedError, edit_score_from_answer


@pytest.fixture(autouse=True)
def no_http_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------------------------------
# Tiny random models, written as real model folders


def _byte_level_chars() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2/CLIP), in their usual order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """CLIP with a character-level BPE vocabulary (no merges), width 32, projection 16, 32x32 input."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_level_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    transformers.CLIPModel(config).save_pretrained(folder)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


def build_tiny_dinov2(folder: Path, seed: int = 1) -> Path:
    config = transformers.Dinov2Config(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2
    )
    torch.manual_seed(seed)
    transformers.Dinov2Model(config).save_pretrained(folder)
    transformers.BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_convert_rgb=True
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_eval_models")
    return build_tiny_clip(root / "clip"), build_tiny_dinov2(root / "dinov2")


class ScriptedScoreJudge(Judge):
    """score(): SC from the edited image's mean red, PQ from its mean green (0-10); counts calls.
    Instructions containing "fail" raise, "mumble" gets an unusable answer."""

    def __init__(self):
        self.calls = 0
        self.released = 0

    def score(self, source, edited, instruction, *, prompt_template=None):
        self.calls += 1
        if "refused" in instruction:
            raise JudgeConnectionError("connection refused")
        if "fail" in instruction:
            raise ConnectionError("judge server unreachable")
        if "mumble" in instruction:
            return edit_score_from_answer("hmm, hard to say")
        pixels = np.asarray(edited, dtype=np.float64)
        sc, pq = pixels[..., 0].mean() / 25.5, pixels[..., 1].mean() / 25.5
        return edit_score_from_answer(f'{{"SC": {sc:.4f}, "PQ": {pq:.4f}, "reason": "<b>scripted</b>"}}')

    def release(self):
        self.released += 1

    def describe(self):
        return "scripted score judge"


# --------------------------------------------------------------------------------------------------
# A small data set on disk


def _image(path: Path, seed: int, size=(40, 30)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def dataset(tmp_path):
    """Six samples in two tasks; one without a target, one with a target of another size."""
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(6):
        row = {
            "id": f"s{i}",
            "source": f"images/src{i}.png",
            "edited": f"images/out{i}.png",
            "instruction": f"make object {i} red",
            "task": "color" if i % 2 else "remove",
        }
        _image(images / f"src{i}.png", 100 + i)
        _image(images / f"out{i}.png", 200 + i)
        if i != 3:
            _image(images / f"tgt{i}.png", 300 + i, size=(40, 30) if i != 4 else (20, 16))
            row["target"] = f"images/tgt{i}.png"
        if i == 1:
            row["caption"] = "a red car"
        rows.append(row)
    manifest = tmp_path / "edits.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


# --------------------------------------------------------------------------------------------------
# Metrics against reference formulas


def test_pixel_errors_match_the_reference_formula(tmp_path):
    a, b = _image(tmp_path / "a.png", 1), _image(tmp_path / "b.png", 2)
    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.float64) / 255
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.float64) / 255
    l1, l2 = pixel_errors(Image.open(a), Image.open(b))
    assert l1 == pytest.approx(np.abs(x - y).mean(), abs=1e-12)
    assert l2 == pytest.approx(((x - y) ** 2).mean(), abs=1e-12)
    assert pixel_errors(Image.open(a), Image.open(a)) == (0.0, 0.0)
    small = Image.open(b).resize((20, 16))
    resized = (
        np.asarray(Image.open(a).convert("RGB").resize((20, 16), Image.Resampling.BICUBIC), np.float64) / 255
    )
    target = np.asarray(small, np.float64) / 255
    assert pixel_errors(Image.open(a), small)[0] == pytest.approx(np.abs(resized - target).mean(), abs=1e-12)


def reference_clip(folder, images, texts):
    """CLIP-I / CLIP-T from one plain forward of CLIPModel (its own normalised embeddings)."""
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    processor = transformers.CLIPImageProcessor.from_pretrained(folder)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(
            pixel_values=pixels, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
    return out.image_embeds, out.text_embeds


def reference_dino(folder, images):
    model = transformers.Dinov2Model.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        hidden = model(
            pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]
        ).last_hidden_state
    cls = hidden[:, 0]  # the CLS token after the final layer norm
    return cls / cls.norm(dim=-1, keepdim=True)


def test_evaluate_metrics_equal_reference_formulas(dataset, tiny_models, tmp_path):
    clip_dir, dino_dir = tiny_models
    samples = load_manifest(dataset)
    judge = ScriptedScoreJudge()
    run = evaluate(
        samples,
        tmp_path / "out",
        clip=ClipEmbedder(clip_dir, "cpu"),
        dino=DinoEmbedder(dino_dir, "cpu"),
        judge=judge,
        batch_size=4,
        progress=False,
    )
    assert run.computed == 6 and run.reused == 0 and judge.calls == 6 and judge.released == 1
    by_id = {r["id"]: r for r in run.records}
    edited = [Image.open(s.edited).convert("RGB") for s in samples]
    with_target = [i for i, s in enumerate(samples) if s.target is not None]
    targets = [Image.open(samples[i].target).convert("RGB") for i in with_target]
    texts = [s.caption or s.instruction for s in samples]

    image_embeds, text_embeds = reference_clip(clip_dir, edited, texts)
    target_embeds, _ = reference_clip(clip_dir, targets, texts[: len(targets)])
    dino_edited, dino_target = reference_dino(dino_dir, edited), reference_dino(dino_dir, targets)
    for row, i in enumerate(with_target):
        record = by_id[samples[i].id]
        assert record["clip_i"] == pytest.approx(float(image_embeds[i] @ target_embeds[row]), abs=1e-5)
        assert record["dino"] == pytest.approx(float(dino_edited[i] @ dino_target[row]), abs=1e-5)
        l1, l2 = pixel_errors(edited[i], targets[row])
        assert (record["l1"], record["l2"]) == (pytest.approx(l1), pytest.approx(l2))
    for i, sample in enumerate(samples):
        assert by_id[sample.id]["clip_t"] == pytest.approx(float(image_embeds[i] @ text_embeds[i]), abs=1e-5)
        pixels = np.asarray(edited[i], np.float64)
        sc, pq = pixels[..., 0].mean() / 25.5, pixels[..., 1].mean() / 25.5
        assert by_id[sample.id]["sc"] == pytest.approx(sc, abs=1e-4)
        assert by_id[sample.id]["overall"] == pytest.approx(math.sqrt(sc * pq), abs=1e-4)
    no_target = by_id["s3"]
    assert no_target["l1"] is None and no_target["clip_i"] is None and no_target["dino"] is None
    assert no_target["clip_t"] is not None

    # Per-task means are plain means of the per-sample values.
    for task in ("color", "remove"):
        rows = [r for r in run.records if r["task"] == task]
        for metric in ("l1", "clip_i", "clip_t", "dino", "overall"):
            values = [r[metric] for r in rows if r[metric] is not None]
            assert run.summary["tasks"][task][metric]["mean"] == pytest.approx(sum(values) / len(values))
            assert run.summary["tasks"][task][metric]["count"] == len(values)
    assert run.summary["all"]["samples"] == 6 and run.summary["all"]["clip_i"]["count"] == 5

    # Batching does not change the numbers.
    one_by_one = evaluate(
        samples,
        tmp_path / "out1",
        clip=ClipEmbedder(clip_dir, "cpu"),
        batch_size=1,
        progress=False,
        html=False,
    )
    for record in one_by_one.records:
        assert record["clip_i"] == pytest.approx(by_id[record["id"]]["clip_i"], abs=1e-5)
        assert record["clip_t"] == pytest.approx(by_id[record["id"]]["clip_t"], abs=1e-5)


def test_outputs_csv_summary_and_self_contained_html(dataset, tiny_models, tmp_path):
    clip_dir, _ = tiny_models
    samples = load_manifest(dataset)
    run = evaluate(
        samples,
        tmp_path / "out",
        clip=ClipEmbedder(clip_dir, "cpu"),
        judge=ScriptedScoreJudge(),
        progress=False,
    )
    with open(run.files["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == [s.id for s in samples]
    assert float(rows[0]["clip_t"]) == pytest.approx(run.records[0]["clip_t"], rel=1e-5)
    assert rows[3]["l1"] == ""  # no target
    summary = json.loads(run.files["summary"].read_text())
    assert set(summary["tasks"]) == {"color", "remove"}
    page = run.files["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script>" in page and "<svg" in page
    assert page.count('src="data:image/jpeg;base64,') == 6 + 6 + 5  # source, edited, target thumbnails
    for outside in ("http://", "https://", "<link", 'src="/', "src='http"):
        assert outside not in page, outside  # nothing fetched from anywhere
    assert "<b>scripted</b>" not in page and html.escape("<b>scripted</b>") in page  # judge text escaped
    for task in ("color", "remove"):
        assert f'<td class="text">{task}</td>' in page
    assert "CLIP-T" in page and 'class="sortable"' in page


def test_resume_skips_scored_samples_and_retries_judge_errors(dataset, tiny_models, tmp_path):
    clip_dir, _ = tiny_models
    samples = load_manifest(dataset)
    out = tmp_path / "out"
    # A run that is interrupted after the first batch leaves those samples in results.jsonl.
    judge = ScriptedScoreJudge()

    def stop_after_first(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(samples, out, judge=judge, batch_size=2, progress=False, on_batch=stop_after_first)
    assert judge.calls == 2 and len((out / "results.jsonl").read_text().splitlines()) == 2
    judge = ScriptedScoreJudge()
    run = evaluate(samples, out, judge=judge, batch_size=2, progress=False)
    assert judge.calls == 4 and run.computed == 4 and run.reused == 2
    # Everything scored: nothing is asked again.
    judge = ScriptedScoreJudge()
    run = evaluate(samples, out, judge=judge, progress=False)
    assert judge.calls == 0 and run.reused == 6
    # Adding CLIP computes only CLIP for every sample; the judge is not asked again.
    judge = ScriptedScoreJudge()
    run = evaluate(samples, out, clip=ClipEmbedder(clip_dir, "cpu"), judge=judge, progress=False)
    assert judge.calls == 0 and run.computed == 6 and all(r["clip_t"] is not None for r in run.records)
    # A changed instruction scores that sample again; a judge error is recorded and retried next time.
    renamed = {"s2": "fail please", "s4": "make it new"}
    changed = [type(s)(**{**s.__dict__, "instruction": renamed.get(s.id, s.instruction)}) for s in samples]
    judge = ScriptedScoreJudge()
    run = evaluate(changed, out, clip=ClipEmbedder(clip_dir, "cpu"), judge=judge, progress=False)
    assert judge.calls == 2 and run.judge_errors == 1 and run.computed == 2
    record = next(r for r in run.records if r["id"] == "s2")
    assert "judge server unreachable" in record["judge_error"] and "overall" not in record
    assert record["clip_t"] is not None
    assert run.summary["all"]["judge_errors"] == 1
    judge = ScriptedScoreJudge()
    with pytest.raises(JudgeFailedError, match=r"first 1 judge call\(s\) all failed"):
        evaluate(changed, out, clip=ClipEmbedder(clip_dir, "cpu"), judge=judge, progress=False)
    assert judge.calls == 1  # only the failed one was retried
    # Other models in the same folder are refused instead of mixed in.
    other = build_tiny_clip(tmp_path / "other_clip", seed=5)
    with pytest.raises(ConfigError, match="results from other models"):
        evaluate(samples, out, clip=ClipEmbedder(other, "cpu"), progress=False)
    run = evaluate(samples, out, clip=ClipEmbedder(other, "cpu"), resume=False, progress=False)
    assert run.reused == 0 and "overall" not in run.records[0]


def test_judge_failures(dataset, tmp_path):
    samples = load_manifest(dataset)
    failing = [type(s)(**{**s.__dict__, "instruction": "fail"}) for s in samples]
    with pytest.raises(JudgeFailedError, match=r"first 6 judge call\(s\) all failed.*unreachable"):
        evaluate(failing, tmp_path / "out", judge=ScriptedScoreJudge(), progress=False)
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 6  # L1/L2 kept
    refused = [type(s)(**{**s.__dict__, "instruction": "refused"}) for s in samples]
    judge = ScriptedScoreJudge()
    with pytest.raises(JudgeFailedError, match="connection refused"):
        evaluate(refused, tmp_path / "out4", judge=judge, batch_size=1, progress=False)
    assert judge.calls == 1  # a first call that cannot connect stops at once
    mumbling = [type(s)(**{**s.__dict__, "instruction": "mumble"}) for s in samples]
    run = evaluate(mumbling, tmp_path / "out2", judge=ScriptedScoreJudge(), progress=False)
    assert run.summary["all"]["judge_unusable"] == 6 and run.summary["all"]["overall"]["count"] == 0
    no_instruction = [type(s)(**{**s.__dict__, "instruction": ""}) for s in samples]
    with pytest.raises(ConfigError, match="6 sample.* no instruction"):
        evaluate(no_instruction, tmp_path / "out3", judge=ScriptedScoreJudge(), progress=False)


# --------------------------------------------------------------------------------------------------
# Manifests and folders


def test_manifest_formats_and_errors(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _image(tmp_path / name, len(name))
    (tmp_path / "m.csv").write_text("output_image,input,prompt,edit_type\nb.png,a.png,add a hat,add\n")
    (sample,) = load_manifest(tmp_path / "m.csv")
    assert (sample.source.name, sample.edited.name, sample.instruction, sample.task, sample.target) == (
        "a.png",
        "b.png",
        "add a hat",
        "add",
        None,
    )
    assert sample.id == "000002" and sample.clip_t_text == "add a hat"
    (tmp_path / "bad.jsonl").write_text('{"source": "a.png"}\n')
    with pytest.raises(ConfigError, match="line 1: a sample needs a source image and an edited image"):
        load_manifest(tmp_path / "bad.jsonl")
    (tmp_path / "missing.jsonl").write_text('{"source": "a.png", "edited": "nope.png"}\n')
    with pytest.raises(ConfigError, match="1 image file.*nope.png"):
        load_manifest(tmp_path / "missing.jsonl")
    (tmp_path / "dup.jsonl").write_text('{"id": 1, "source": "a.png", "edited": "b.png"}\n' * 2)
    with pytest.raises(ConfigError, match="appears twice"):
        load_manifest(tmp_path / "dup.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="line 1: not valid JSON"):
        load_manifest(tmp_path / "broken.jsonl")
    with pytest.raises(ConfigError, match="Unknown manifest type"):
        load_manifest(tmp_path / "a.png")


def test_folders_matched_by_name(tmp_path):
    for folder in ("src", "out", "gt"):
        (tmp_path / folder).mkdir()
    for stem in ("cat", "dog", "owl"):
        _image(tmp_path / "src" / f"{stem}.png", 1)
    _image(tmp_path / "out" / "cat.jpg", 2)
    _image(tmp_path / "out" / "dog.png", 3)
    _image(tmp_path / "gt" / "cat.png", 4)
    (tmp_path / "src" / "dog.txt").write_text("make the dog blue\n")
    (tmp_path / "instr.jsonl").write_text('{"id": "cat", "instruction": "add a hat", "task": "add"}\n')
    samples, notes = samples_from_folders(
        tmp_path / "src", tmp_path / "out", tmp_path / "gt", tmp_path / "instr.jsonl"
    )
    assert [(s.id, s.instruction, s.task, s.target is not None) for s in samples] == [
        ("cat", "add a hat", "add", True),
        ("dog", "make the dog blue", "all", False),
    ]
    assert any("1 source image(s) have no edited image" in n for n in notes)
    _image(tmp_path / "out" / "eel.png", 5)
    with pytest.raises(ConfigError, match="have no source image.*eel"):
        samples_from_folders(tmp_path / "src", tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# Command line


def test_cli_with_a_served_judge_and_folders(tmp_path, tiny_models, capsys):
    clip_dir, dino_dir = tiny_models
    for folder in ("src", "out"):
        (tmp_path / folder).mkdir()
    for i, stem in enumerate(("a", "b", "c")):
        _image(tmp_path / "src" / f"{stem}.png", i)
        _image(tmp_path / "out" / f"{stem}.png", 10 + i)
        (tmp_path / "src" / f"{stem}.txt").write_text(f"edit {stem}")
    replies = [chat_reply('{"SC": [7, 9], "PQ": [8, 6], "reason": "ok"}')]
    with FakeChatServer(replies) as server:
        code = eval_main(
            [
                "--source-dir", str(tmp_path / "src"), "--edited-dir", str(tmp_path / "out"),
                "--out", str(tmp_path / "eval"), "--clip", str(clip_dir), "--dino", str(dino_dir),
                "--judge-url", server.base_url, "--judge-model", "tiny", "--judge-workers", "2",
                "--device", "cpu", "--no-progress",
            ]
        )  # fmt: skip
        requests = list(server.requests)
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert len(requests) == 3
    assert "3 samples (3 scored now, 0 reused); judge calls 3, judge errors 0" in printed
    assert f"{'all':16} {3:5d}" in printed and "6.481" in printed  # sqrt(7 * 6)
    records = [json.loads(line) for line in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b", "c"] and all(
        r["overall"] == pytest.approx(42**0.5) for r in records
    )
    assert (tmp_path / "eval" / "report.html").is_file()
    # Bad input: a clear message and exit code 2, nothing raised.
    assert (
        eval_main(
            [
                "--source-dir",
                str(tmp_path / "nope"),
                "--edited-dir",
                str(tmp_path / "out"),
                "--out",
                str(tmp_path / "e2"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert eval_main([str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "e3"), "--clip", str(tmp_path)]) == 2


def test_embedder_configuration_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ClipEmbedder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="Unknown device"):
        DinoEmbedder(tmp_path, device="tpu:x")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            ClipEmbedder(tmp_path, device="cuda")
