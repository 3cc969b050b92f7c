"""Data sources, bad-record accounting, buckets, batch plans, diptychs and caches."""

import io
import json
import os
import tarfile

import pytest
import torch
from PIL import Image
from tiny import make_manifest, tiny_vae

from train.data import (
    BadRecordTracker,
    DataError,
    EditData,
    HashTextEncoder,
    LatentEncoder,
    assign_buckets,
    epoch_plan,
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


def test_buckets_and_plan(tmp_path):
    man = make_manifest(str(tmp_path), n=6, size=(32, 64))
    recs = read_sources([man])
    assert set(assign_buckets(recs, 32, False)) == {(32, 32)}
    buckets = assign_buckets(recs, 64, True)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in buckets)
    assert buckets[0][0] < buckets[0][1]  # 64x32 is wider than high
    p1, p2 = epoch_plan(buckets, 2, 0, 0), epoch_plan(buckets, 2, 0, 0)
    assert p1 == p2 and p1 != epoch_plan(buckets, 2, 0, 1)
    assert sorted(i for b in p1 for i in b) == list(range(6))
    assert len(epoch_plan(buckets, 4, 0, 0)) == 1  # incomplete global batches are dropped


def test_training_diptych_layout():
    src, tgt = torch.zeros(1, 4, 4, 3), torch.ones(1, 4, 4, 3)
    full, masked, mask = training_diptych(src, tgt)
    assert full.shape == (1, 3, 4, 8)
    assert torch.all(full[..., :4] == -1) and torch.all(full[..., 4:] == 1)
    assert torch.all(masked[..., 4:] == 0)  # grey, as ComfyUI's inpaint conditioning
    assert torch.all(mask[..., 4:] == 1) and torch.all(mask[..., :4] == 0)


def test_latent_and_text_cache(tmp_path):
    man = make_manifest(str(tmp_path / "d"), n=2)
    tracker = BadRecordTracker()
    recs = read_sources([man], tracker=tracker)
    cache = str(tmp_path / "cache")
    data = EditData(
        recs, 16, False, LatentEncoder(tiny_vae()), HashTextEncoder(32, 16), tracker, cache, True, True
    )
    b1 = data.load_batch([0, 1])
    e1, _ = data.text(b1["prompts"])
    cached = EditData(recs, 16, False, None, None, tracker, cache, True, True)  # no encoders at all
    b2 = cached.load_batch([0, 1])
    e2, _ = cached.text(b2["prompts"])
    assert torch.equal(b1["x0"], b2["x0"]) and torch.equal(e1, e2)
