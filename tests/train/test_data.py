"""Data sources, bad-record accounting, streamed batches and their resume position, diptychs, the cache."""

import io
import json
import os
import tarfile

import pytest
import torch
from PIL import Image
from tiny import make_manifest, tiny_vae

import train.data as data_mod
from train.data import (
    BadRecordTracker,
    BatchPlanner,
    DataError,
    EditData,
    EditStream,
    HashTextEncoder,
    LatentEncoder,
    list_shards,
    make_loader,
    parse_task,
    read_sources,
    training_diptych,
)


def _png(color=(255, 0, 0), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(color=(0, 0, 255), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def test_jsonl_manifest_and_bad_records(tmp_path):
    man = make_manifest(str(tmp_path), n=4, bad=1)
    with open(man, "a") as fh:
        fh.write(
            json.dumps({"source": "src_0.png", "target": "tgt_0.png", "instruction": "  ", "task": 1}) + "\n"
        )
        fh.write(
            json.dumps({"source": "src_0.png", "target": "tgt_0.png", "instruction": "x", "task": "flying"})
            + "\n"
        )
        fh.write("{not json\n")
    tracker = BadRecordTracker(max_fraction=0.9)
    recs = read_sources([man], tracker=tracker)
    assert len(recs) == 5  # the broken image is only found when loaded
    assert tracker.count == 3 and tracker.seen == 8
    with pytest.raises(DataError, match="max_bad_fraction"):
        read_sources([man], tracker=BadRecordTracker(max_fraction=0.1))


def test_broken_image_is_replaced_and_counted(tmp_path):
    man = make_manifest(str(tmp_path), n=3, bad=1, tasks=(1,))
    tracker = BadRecordTracker(max_fraction=0.5)
    recs = read_sources([man], tracker=tracker)
    data = EditData(recs, 16, False, LatentEncoder(tiny_vae()), HashTextEncoder(32, 16), tracker)
    batch = data.load_batch([3, 0])  # record 3 has a corrupt source
    assert batch["x0"].shape == (2, 4, 8, 16)
    assert tracker.count == 1 and data.bad_indices == {3}
    assert batch["keys"][0] != recs[3].key
    tight = BadRecordTracker(max_fraction=0.1)
    data2 = EditData(read_sources([man], tracker=tight), 16, False, LatentEncoder(tiny_vae()), None, tight)
    with pytest.raises(DataError, match="bad"):
        data2.load_batch([3])


def test_paired_folder(tmp_path):
    for sub in ("source", "target"):
        os.makedirs(tmp_path / sub)
    for i in range(3):
        (tmp_path / "source" / f"{i}.png").write_bytes(_png())
        (tmp_path / "target" / f"{i}.png").write_bytes(_png((0, 255, 0)))
        (tmp_path / "target" / f"{i}.txt").write_text(f"turn it green {i}" if i else "")
    (tmp_path / "target" / "1.task").write_text("color change")
    tracker = BadRecordTracker(max_fraction=0.5)
    recs = read_sources([str(tmp_path)], default_task=3, tracker=tracker)
    assert [r.task for r in recs] == [5, 3] and tracker.count == 1  # "0" has an empty instruction


def test_webdataset_tar(tmp_path):
    path = str(tmp_path / "shard-000.tar")
    with tarfile.open(path, "w") as tf:

        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        for i in range(3):
            meta = {"instruction": "把它变蓝", "instruction_en": f"make it blue {i}", "task": 5}
            add(f"s{i}.json", json.dumps(meta).encode())
            add(f"s{i}.1.0.jpg", _jpg())
            if i != 2:
                add(f"s{i}.2.jpg", _jpg((255, 255, 0)))
    tracker = BadRecordTracker(max_fraction=0.5)
    recs = read_sources([path], tracker=tracker)
    assert len(recs) == 2 and tracker.count == 1
    assert recs[1].instruction == "make it blue 1" and recs[1].task == 5
    from train.data import load_image

    assert load_image(recs[0].target).getpixel((0, 0))[0] > 200


def test_parquet_magicbrush_and_omniedit(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    img = {"bytes": _png(), "path": None}
    mb = pa.table(
        {
            "img_id": ["1", "2"],
            "turn_index": [1, 1],
            "source_img": [img, img],
            "mask_img": [img, img],
            "instruction": ["add a hat", ""],
            "target_img": [img, {"bytes": _png((1, 2, 3)), "path": None}],
        }
    )
    pq.write_table(mb, tmp_path / "mb.parquet")
    om = pa.table(
        {
            "omni_edit_id": ["a"],
            "task": ["swap"],
            "src_img": [img],
            "edited_img": [img],
            "edited_prompt_list": [["", "remove the cat"]],
        }
    )
    pq.write_table(om, tmp_path / "om.parquet")
    tracker = BadRecordTracker(max_fraction=0.5)
    recs = read_sources([str(tmp_path / "mb.parquet"), str(tmp_path / "om.parquet")], tracker=tracker)
    assert [r.instruction for r in recs] == ["add a hat", "remove the cat"]
    assert tracker.count == 1
    from train.data import load_image

    assert load_image(recs[0].target).size == (24, 16)
    pq.write_table(pa.table({"foo": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="MagicBrush"):
        read_sources([str(tmp_path / "bad.parquet")])


def test_parse_task():
    assert parse_task("color change") == 5 and parse_task("color_change") == 5 and parse_task(7) == 7
    assert parse_task(None, default=4) == 4
    from train.data import BadRecord

    with pytest.raises(BadRecord):
        parse_task(16)


def test_buckets_and_planned_batches(tmp_path):
    man = make_manifest(str(tmp_path), n=6, size=(32, 64))
    shards = list_shards([man])

    def plan(group=2, aspect=True, seed=0, passes=1):
        return list(BatchPlanner(shards, group, 64, aspect, seed=seed, shuffle_buffer=4, passes=passes))

    square = plan(aspect=False)
    assert {p.bucket for p in square} == {(64, 64)}
    wide = plan()
    h, w = wide[0].bucket
    assert h % 16 == 0 and w % 16 == 0 and h < w  # 64x32 sources are wider than high
    keys = lambda ps: [[r.key for r in p.records] for p in ps]  # noqa: E731
    assert keys(plan()) == keys(wide) and keys(plan(seed=1)) != keys(wide)
    assert sorted(k for b in keys(wide) for k in b) == sorted(f"manifest.jsonl:{i}" for i in range(1, 7))
    assert [len(p.records) for p in plan(group=4, passes=2)] == [4, 4, 4]  # the remainder carries over
    with pytest.raises(DataError, match="cannot fill one batch"):
        plan(group=7)


def _write_shards(folder, n_shards, per_shard, size=(16, 24), bad=()):
    """WebDataset shards of tiny JPEG pairs; keys in ``bad`` get a corrupt source image."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = os.path.join(folder, f"shard-{s:03d}.tar")
        with tarfile.open(path, "w") as tf:

            def add(name, data):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

            for i in range(per_shard):
                key = f"s{s}_{i}"
                meta = {"instruction_en": f"edit {key}", "task": 1 + (i % 3)}
                add(f"{key}.json", json.dumps(meta).encode())
                add(f"{key}.1.0.jpg", b"\xff\xd8 broken" if key in bad else _jpg((s * 9, i * 20, 7), size))
                add(f"{key}.2.jpg", _jpg((i * 20, s * 9, 70), size))
        paths.append(path)
    return paths


def test_tar_shards_stream_lazily(tmp_path, monkeypatch):
    _write_shards(str(tmp_path), n_shards=20, per_shard=5)
    opened, decoded = [], []
    real_open, real_load = tarfile.open, data_mod.load_image
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    monkeypatch.setattr(data_mod, "load_image", lambda obj: decoded.append(1) or real_load(obj))
    shards = list_shards([str(tmp_path / "*.tar")])
    assert len(shards) == 20 and opened == []  # listing opens no shard
    stream = EditStream(shards, 2, 16, True, shuffle_buffer=3)
    batch = next(iter(stream))
    assert batch["source"].shape == (2, 16, 16, 3) and len(set(batch["keys"])) == 2
    assert len(opened) == 1 and len(decoded) == 4  # one shard read; two records (source + target) decoded
    assert batch["stats"] == {"seen": 4, "bad": 0, "examples": []}  # buffer of 3, then 2 out


def test_stream_split_by_rank_and_worker(tmp_path):
    shards = list_shards(_write_shards(str(tmp_path), n_shards=8, per_shard=3))
    seen = []
    for rank in range(2):
        stream = EditStream(shards, 1, 16, False, rank=rank, world=2, num_workers=2, shuffle_buffer=2)
        assert stream.split == "shards"
        keys = [k for _, b in zip(range(12), make_loader(stream)) for k in b["keys"]]
        seen.append({k.split(":")[0] for k in keys})
        assert len(set(keys)) == 12  # one pass over this process's shards, no repeats
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 8  # each shard read by one process


@pytest.mark.parametrize("n_shards", [1, 6])  # fewer shards than workers (shared global batches), or more
def test_loader_resume_position_with_workers(tmp_path, n_shards):
    """Batches after resuming at position k equal the uninterrupted run's batches k, k+1, ..."""
    shards = list_shards(_write_shards(str(tmp_path), n_shards=n_shards, per_shard=12 // n_shards))

    def run(skip, n):
        stream = EditStream(shards, 2, 16, False, seed=3, shuffle_buffer=4, num_workers=2, skip=skip)
        return [b for _, b in zip(range(n), make_loader(stream))]

    full = run(0, 9)  # crosses a pass boundary
    for k in (3, 4):
        resumed = run(k, 9 - k)
        assert [b["keys"] for b in resumed] == [b["keys"] for b in full[k:]]
        assert all(torch.equal(a["source"], b["source"]) for a, b in zip(resumed, full[k:]))


def test_stream_replaces_and_counts_bad_records(tmp_path):
    _write_shards(str(tmp_path), n_shards=2, per_shard=4, bad={"s0_1", "s1_2"})
    with tarfile.open(tmp_path / "shard-002.tar", "w") as tf:  # a sample without its target
        for name, data in (("x.json", b'{"instruction": "a"}'), ("x.1.0.jpg", _jpg())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "shard-003.tar").write_bytes(b"not a tar" * 100)  # a damaged shard
    stream = EditStream(list_shards([str(tmp_path / "*.tar")]), 2, 16, False, shuffle_buffer=8)
    tracker = BadRecordTracker(max_fraction=0.5)
    keys = []
    for _, batch in zip(range(4), stream):
        tracker.add(batch["stats"])
        keys += batch["keys"]
        assert len(batch["keys"]) == 2
    # two corrupt sources, one incomplete sample, one damaged shard
    assert tracker.count == 4 and tracker.seen == 10
    assert not {k for k in keys if k.endswith(("s0_1", "s1_2"))}
    assert any("needs json, 1.0.jpg and 2.jpg" in e for e in tracker.examples)
    assert any("corrupt image" in e for e in tracker.examples)
    assert any("tar shard" in e for e in tracker.examples)


def test_training_diptych_layout():
    src, tgt = torch.zeros(1, 4, 4, 3), torch.ones(1, 4, 4, 3)
    full, masked, mask = training_diptych(src, tgt)
    assert full.shape == (1, 3, 4, 8)
    assert torch.all(full[..., :4] == -1) and torch.all(full[..., 4:] == 1)
    assert torch.all(masked[..., 4:] == 0)  # grey, as ComfyUI's inpaint conditioning
    assert torch.all(mask[..., 4:] == 1) and torch.all(mask[..., :4] == 0)


def test_cache_subcommand_trains_like_images(tmp_path, tiny_dir):
    """x2edit-train cache, then training from the cache without encoders, gives the same losses and
    the same adapter as training from the images."""
    from tiny import tiny_transformer

    from train.cli import main
    from train.config import make_config
    from train.trainer import Trainer
    from x2edit_core.formats import load_adapters

    man = make_manifest(str(tmp_path / "data"), n=6, tasks=(1, 2, 1))
    common = dict(
        preset="x2edit", resolution=32, text_encoder="hash", rank=4, num_experts=4, progress=False,
        max_steps=3, batch_size=2, checkpoint_every=0, text_dropout=0.5, max_bad_fraction=0.5,
        tensorboard=False, save_dtype="float32", num_workers=0, learning_rate=1e-2,
    )  # fmt: skip
    cache = str(tmp_path / "cache")
    args = ["cache", "--data", man, "--vae", tiny_dir["vae"], "--text-encoder", "hash", "--cache-dir", cache]
    args += [
        "--transformer-config",
        os.path.join(tiny_dir["transformer"], "config.json"),
        "--resolution",
        "32",
    ]
    assert main(args + ["--no-progress"]) == 0
    index = json.load(open(os.path.join(cache, "index.json")))
    assert index["records"] == 6 and index["bad_records"] == 0

    from tiny import tiny_vae

    images = make_config(data=[man], output_dir=str(tmp_path / "a"), vae=tiny_dir["vae"], **common)
    a = Trainer(
        images, transformer=tiny_transformer(), vae=tiny_vae(), text_encoder=HashTextEncoder(32, 16)
    ).run()
    cached = make_config(data=[cache], output_dir=str(tmp_path / "b"), **{**common, "text_encoder": "cached"})
    trainer = Trainer(cached, transformer=tiny_transformer())
    assert trainer.latent_encoder is None and trainer.text_encoder is None
    b = trainer.run()
    for x, y in zip(a["history"], b["history"]):
        assert (x["loss"], x["contrastive"]) == (y["loss"], y["contrastive"])
    ea, eb = load_adapters(a["output"]), load_adapters(b["output"])
    assert all(torch.equal(p.moe.lora_B, q.moe.lora_B) for p, q in zip(ea.moe, eb.moe))
    assert torch.equal(ea.task_embedding, eb.task_embedding)
    assert any(h["contrastive"] > 0 for h in b["history"])
    # a bad record is skipped and counted while caching
    bad_man = make_manifest(str(tmp_path / "bad"), n=6, bad=1)
    args[args.index(man)], args[args.index(cache)] = bad_man, str(tmp_path / "cache2")
    assert main(args + ["--max-bad-fraction", "0.5", "--no-progress"]) == 0
    index = json.load(open(tmp_path / "cache2" / "index.json"))
    assert index["records"] == 6 and index["bad_records"] == 1
