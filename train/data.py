"""Training data: shards of records, streamed batches, bad-record accounting, diptychs and encoders.

Sources are split into shards, listed without being opened (a tar shard or a parquet row group is
only read when a loader worker reaches it):

- JSONL manifest (one shard): one object per line with ``source``, ``target`` (paths, relative to
  the manifest's folder), ``instruction`` and optional ``task`` (id or name).
- Paired folder (one shard): ``<root>/source/<name>.<ext>`` and ``<root>/target/<name>.<ext>`` with
  the instruction in ``<root>/target/<name>.txt`` (or ``<root>/instructions/<name>.txt``) and an
  optional task in ``<root>/target/<name>.task``.
- WebDataset tar shards as X2Edit writes them (one shard per file): per key ``<key>.json``
  (``instruction`` or ``instruction_en``, ``task``), ``<key>.1.0.jpg`` (source) and ``<key>.2.jpg``
  (target). Streamed member by member; images are read later by offset.
- Parquet (one shard per row group): MagicBrush columns (``source_img``, ``target_img``,
  ``instruction``) or OmniEdit columns (``src_img``, ``edited_img``, ``edited_prompt_list``,
  ``task``); image cells are Hugging Face image structs ``{bytes, path}`` or raw bytes.
- A latent cache written by ``x2edit-train cache`` (a folder with ``index.json``; one shard per
  safetensors file): VAE latents and text embeddings, so neither encoder is needed to train.

Batches (:class:`BatchPlanner`) are formed from metadata only: records pass through a shuffle
buffer into per-bucket pools, and a pool that holds a batch's worth of records becomes a batch.
Image sizes for aspect buckets are read from the image headers when a record enters the buffer.
Decoding happens afterwards (:class:`EditStream`, inside DataLoader workers), so the batch order is
a pure function of (seed, shards, process and worker counts) and a resumed run replays it without
decoding anything. A record that fails to decode is replaced by one of the batch's spares (records
of the same bucket still in the buffer).

With at least as many shards as consumers (processes x workers) each consumer streams its own
shards; with fewer, every consumer forms the same global batches and decodes only its share, so a
small data set gives the same global batches whatever the number of processes.

A bad record (missing or corrupt image, empty instruction, unknown task) is skipped and counted;
:class:`BadRecordTracker` raises :class:`DataError` once the bad share passes ``max_bad_fraction``.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import math
import os
import random
import tarfile
import zlib
from dataclasses import dataclass, field

import torch
from PIL import Image

from x2edit_core.diptych import PATCH, resize_images
from x2edit_core.errors import X2EditError
from x2edit_core.prompt import build_ic_prompt
from x2edit_core.tasks import UnknownTaskError, task_id

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_INDEX = "index.json"
CACHE_FORMAT = "x2edit-latent-cache"
# JPEG headers (with EXIF/ICC blocks) fit in this much of the file nearly always; the whole member
# is read when they do not.
HEADER_PREFIX = 1 << 16
MAX_JSON_BYTES = 1 << 20


class DataError(X2EditError, RuntimeError):
    """The training data cannot be used (too many bad records, no records, unknown layout)."""


class BadRecord(X2EditError, ValueError):
    """One record is unusable; it is skipped and counted."""


# -- records ---------------------------------------------------------------------------------------


@dataclass
class EditRecord:
    key: str
    source: object  # path, bytes, or a zero-argument callable returning bytes
    target: object
    instruction: str
    task: int = 0
    size: tuple[int, int] | None = None  # (height, width) of the source when known
    latents: object = None  # cache records: a zero-argument callable returning the cached tensors
    bucket: tuple[int, int] | None = None  # cache records: the panel size the latents were made at


@dataclass
class Skip:
    """A record found bad while streaming metadata."""

    key: str
    why: str


def parse_task(value, default: int = 0, num_tasks: int = 16) -> int:
    """Task id from an int, a digit string or an X2Edit task name (x2edit_core.tasks)."""
    if value is None or value == "":
        return default
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        tid = value
    else:
        try:
            tid = task_id(value)
        except UnknownTaskError as e:
            raise BadRecord(str(e)) from e
    if not 0 <= tid < num_tasks:
        raise BadRecord(f"task id {tid} is outside 0..{num_tasks - 1}")
    return tid


def _read_bytes(obj) -> bytes:
    if callable(obj):
        return obj()
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj)
    if isinstance(obj, str):
        with open(obj, "rb") as fh:
            return fh.read()
    raise BadRecord(f"cannot read an image from {type(obj).__name__}")


def load_image(obj) -> Image.Image:
    """Read and decode one image (RGBA composited on white, as the nodes do)."""
    try:
        img = Image.open(io.BytesIO(_read_bytes(obj)))
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadRecord(f"missing or corrupt image: {e}") from e
    if img.mode == "RGBA":
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    return img.convert("RGB")


def image_size(obj) -> tuple[int, int]:
    """(height, width) from the image header only; nothing is decoded."""
    try:
        if isinstance(obj, str):
            with Image.open(obj) as img:
                return img.height, img.width
        if isinstance(obj, _TarMember):
            try:
                with Image.open(io.BytesIO(obj.prefix(HEADER_PREFIX))) as img:
                    return img.height, img.width
            except (OSError, ValueError):
                pass  # the header is longer than the prefix: read the whole member
        with Image.open(io.BytesIO(_read_bytes(obj))) as img:
            return img.height, img.width
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadRecord(f"missing or corrupt image: {e}") from e


def _check(record: EditRecord) -> EditRecord:
    if not isinstance(record.instruction, str) or not record.instruction.strip():
        raise BadRecord(f"{record.key}: empty instruction")
    return record


# -- shard readers: each yields EditRecord or Skip, lazily -----------------------------------------


def iter_jsonl(path: str, default_task: int, num_tasks: int):
    root = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            if not line.strip():
                continue
            key = f"{os.path.basename(path)}:{n + 1}"
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise BadRecord("line is not a JSON object")
                src, tgt = obj.get("source"), obj.get("target")
                if not isinstance(src, str) or not isinstance(tgt, str):
                    raise BadRecord("needs string 'source' and 'target' paths")
                rec = EditRecord(
                    key,
                    os.path.join(root, src),
                    os.path.join(root, tgt),
                    obj.get("instruction", ""),
                    parse_task(obj.get("task"), default_task, num_tasks),
                )
                yield _check(rec)
            except (BadRecord, json.JSONDecodeError) as e:
                yield Skip(key, str(e))


def _first_with_ext(folder: str, stem: str) -> str | None:
    for ext in IMAGE_EXTS:
        p = os.path.join(folder, stem + ext)
        if os.path.isfile(p):
            return p
    return None


def iter_folder(root: str, default_task: int, num_tasks: int):
    src_dir, tgt_dir = os.path.join(root, "source"), os.path.join(root, "target")
    for name in sorted(os.listdir(src_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTS:
            continue
        key = f"{os.path.basename(root)}/{stem}"
        try:
            tgt = _first_with_ext(tgt_dir, stem)
            if tgt is None:
                raise BadRecord(f"{key}: no target image")
            text = None
            for p in (
                os.path.join(tgt_dir, stem + ".txt"),
                os.path.join(root, "instructions", stem + ".txt"),
            ):
                if os.path.isfile(p):
                    with open(p, encoding="utf-8") as fh:
                        text = fh.read().strip()
                    break
            task = default_task
            task_file = os.path.join(tgt_dir, stem + ".task")
            if os.path.isfile(task_file):
                with open(task_file, encoding="utf-8") as fh:
                    task = parse_task(fh.read().strip(), default_task, num_tasks)
            yield _check(EditRecord(key, os.path.join(src_dir, name), tgt, text or "", task))
        except BadRecord as e:
            yield Skip(key, str(e))


class _TarMember:
    """Reads one member of a tar file by offset (picklable, no open handle kept)."""

    def __init__(self, path: str, offset: int, size: int):
        self.path, self.offset, self.size = path, offset, size

    def prefix(self, n: int) -> bytes:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            return fh.read(min(n, self.size))

    def __call__(self) -> bytes:
        data = self.prefix(self.size)
        if len(data) != self.size:
            raise BadRecord(f"{self.path}: truncated member at {self.offset}")
        return data


def _tar_record(path: str, key: str, group: dict, default_task: int, num_tasks: int):
    full = f"{os.path.basename(path)}:{key}"
    try:
        if "json" not in group or "1.0.jpg" not in group or "2.jpg" not in group:
            raise BadRecord(f"{full}: needs json, 1.0.jpg and 2.jpg (has {sorted(group)})")
        obj = json.loads(group["json"])
        if not isinstance(obj, dict):
            raise BadRecord(f"{full}: json is not an object")
        text = obj.get("instruction_en") or obj.get("instruction") or ""
        rec = EditRecord(
            full,
            _TarMember(path, *group["1.0.jpg"]),
            _TarMember(path, *group["2.jpg"]),
            text,
            parse_task(obj.get("task"), default_task, num_tasks),
        )
        return _check(rec)
    except (BadRecord, json.JSONDecodeError, UnicodeDecodeError) as e:
        return Skip(full, str(e))


def iter_tar(path: str, default_task: int, num_tasks: int):
    """Stream a WebDataset shard: a sample's members are adjacent, so a sample is complete when the
    next key starts. Image data is skipped (seeked over), only the json is read. A damaged shard
    counts as one bad record and ends there (the samples read before the damage are kept)."""
    try:
        tf = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as e:
        yield Skip(path, f"not a readable tar shard ({e})")
        return
    with tf:
        key, group = None, {}
        while True:
            try:
                info = tf.next()
            except (tarfile.TarError, OSError) as e:
                yield Skip(path, f"damaged tar shard ({e})")
                return
            tf.members = []  # tarfile would otherwise remember every member of the shard
            if info is None:
                break
            if not info.isfile():
                continue
            base = os.path.basename(info.name)
            stem, _, ext = base.partition(".")
            full_key = os.path.join(os.path.dirname(info.name), stem)
            if full_key != key:
                if key is not None:
                    yield _tar_record(path, key, group, default_task, num_tasks)
                key, group = full_key, {}
            if ext == "json":
                if info.size > MAX_JSON_BYTES:
                    group["json"] = b"[]"  # found bad by _tar_record
                else:
                    group["json"] = tf.extractfile(info).read()
            else:
                group[ext] = (info.offset_data, info.size)
        if key is not None:
            yield _tar_record(path, key, group, default_task, num_tasks)


class _ParquetCell:
    """Reads one image cell of a parquet file on demand (row group + row)."""

    def __init__(self, path: str, column: str, group: int, row: int):
        self.path, self.column, self.group, self.row = path, column, group, row

    def __call__(self) -> bytes:
        return _cell_bytes(_row_group_column(self.path, self.group, self.column)[self.row].as_py())


@functools.lru_cache(maxsize=8)
def _row_group_column(path: str, group: int, column: str):
    """One column of one row group; neighbouring records (and source/target of one record) share it."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(column)


def _cell_bytes(cell) -> bytes:
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path") and os.path.isfile(cell["path"]):
            with open(cell["path"], "rb") as fh:
                return fh.read()
        raise BadRecord("image cell has neither bytes nor a readable path")
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    raise BadRecord(f"image cell of type {type(cell).__name__}")


PARQUET_LAYOUTS = {
    # name: (source column, target column, instruction column, task column or None)
    "magicbrush": ("source_img", "target_img", "instruction", None),
    "omniedit": ("src_img", "edited_img", "edited_prompt_list", "task"),
}


def _parquet_layout(path: str, names: set):
    layout = next((v for v in PARQUET_LAYOUTS.values() if {v[0], v[1], v[2]} <= names), None)
    if layout is None:
        raise DataError(
            f"{path}: columns {sorted(names)} match neither MagicBrush (source_img, target_img, instruction) "
            "nor OmniEdit (src_img, edited_img, edited_prompt_list)"
        )
    return layout


def iter_parquet(path: str, group: int, default_task: int, num_tasks: int):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    src_col, tgt_col, text_col, task_col = _parquet_layout(path, names)
    cols = [text_col] + ([task_col] if task_col and task_col in names else [])
    for r, row in enumerate(pf.read_row_group(group, columns=cols).to_pylist()):
        key = f"{os.path.basename(path)}:{group}:{r}"
        try:
            text = row[text_col]
            if isinstance(text, list):  # OmniEdit: several phrasings; the first is used
                text = next((t for t in text if isinstance(t, str) and t.strip()), "")
            task = default_task
            if task_col in row:
                try:
                    task = parse_task(row[task_col], default_task, num_tasks)
                except BadRecord:
                    task = default_task  # OmniEdit's own task names are not X2Edit's ids
            rec = EditRecord(
                key, _ParquetCell(path, src_col, group, r), _ParquetCell(path, tgt_col, group, r), text, task
            )
            yield _check(rec)
        except BadRecord as e:
            yield Skip(key, str(e))


class _CachedTensors:
    """Reads one record's tensors from a cache shard (picklable; opened on demand)."""

    def __init__(self, path: str, index: int):
        self.path, self.index = path, index

    def __call__(self) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(self.path, framework="pt") as f:
                p = f"{self.index}."
                return {k[len(p) :]: f.get_tensor(k) for k in f.keys() if k.startswith(p)}
        except (SafetensorError, OSError) as e:
            raise BadRecord(f"{self.path}: unreadable cache shard ({e})") from e


def iter_cache_shard(path: str):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("records", "[]"))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable cache shard ({e})") from e
    for i, m in enumerate(meta):
        rec = EditRecord(m["key"], None, None, m["instruction"], int(m["task"]))
        rec.bucket = (int(m["bucket"][0]), int(m["bucket"][1]))
        rec.latents = _CachedTensors(path, i)
        yield rec


@dataclass(frozen=True)
class Shard:
    kind: str  # jsonl, folder, tar, parquet or cache
    path: str
    group: int = 0  # parquet row group

    @property
    def name(self) -> str:
        return f"{self.path}#{self.group}" if self.kind == "parquet" else self.path

    def records(self, default_task: int = 0, num_tasks: int = 16):
        if self.kind == "jsonl":
            return iter_jsonl(self.path, default_task, num_tasks)
        if self.kind == "folder":
            return iter_folder(self.path, default_task, num_tasks)
        if self.kind == "tar":
            return iter_tar(self.path, default_task, num_tasks)
        if self.kind == "parquet":
            return iter_parquet(self.path, self.group, default_task, num_tasks)
        return iter_cache_shard(self.path)


KINDS = ("jsonl", "folder", "tar", "parquet", "cache")


def _expand_source(spec: str) -> list[tuple[str, str]]:
    kind, sep, rest = spec.partition(":")
    if sep and kind in KINDS and not os.path.exists(spec):
        paths = sorted(glob.glob(rest)) or [rest]
        return [(kind, p) for p in paths]
    paths = sorted(glob.glob(spec)) or [spec]
    out = []
    for p in paths:
        if os.path.isfile(os.path.join(p, CACHE_INDEX)):
            out.append(("cache", p))
        elif os.path.isdir(p):
            out.append(("folder", p))
        elif p.endswith(".jsonl"):
            out.append(("jsonl", p))
        elif p.endswith(".tar"):
            out.append(("tar", p))
        elif p.endswith(".parquet"):
            out.append(("parquet", p))
        else:
            raise DataError(
                f"data source {spec!r}: cannot tell its type; "
                "prefix it with jsonl:, folder:, tar:, parquet: or cache:"
            )
    return out


def read_cache_index(folder: str) -> dict:
    path = os.path.join(folder, CACHE_INDEX)
    try:
        with open(path, encoding="utf-8") as fh:
            index = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable cache index ({e})") from e
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
        raise DataError(f"{path}: not an x2edit latent cache (format {index.get('format')!r})")
    return index


def list_shards(specs: list[str]) -> list[Shard]:
    """Every shard of the sources, without reading any record (parquet: the file footer only)."""
    shards = []
    for spec in specs:
        for kind, path in _expand_source(spec):
            if not os.path.exists(path):
                raise DataError(f"data source {path!r} does not exist")
            if kind == "folder" and not (
                os.path.isdir(os.path.join(path, "source")) and os.path.isdir(os.path.join(path, "target"))
            ):
                raise DataError(f"{path}: a paired folder needs source/ and target/ subfolders")
            if kind == "parquet":
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(path)
                _parquet_layout(path, set(pf.schema_arrow.names))
                shards += [Shard("parquet", path, g) for g in range(pf.num_row_groups)]
            elif kind == "cache":
                index = read_cache_index(path)
                shards += [Shard("cache", os.path.join(path, s["file"])) for s in index["shards"]]
            else:
                shards.append(Shard(kind, path))
    kinds = {s.kind == "cache" for s in shards}
    if len(kinds) > 1:
        raise DataError("a latent cache cannot be mixed with image sources in one run")
    if not shards:
        raise DataError(f"no data shards in {specs}")
    return shards


def read_sources(
    specs: list[str], default_task: int = 0, num_tasks: int = 16, tracker: BadRecordTracker | None = None
) -> list[EditRecord]:
    """Every record of small sources as a list (held-out sets, tests); training streams instead."""
    tracker = tracker or BadRecordTracker()
    records = []
    for shard in list_shards(specs):
        for item in shard.records(default_task, num_tasks):
            if isinstance(item, Skip):
                tracker.bad(item.key, item.why)
            else:
                records.append(item)
                tracker.seen += 1
    tracker.check()
    if not records:
        raise DataError(f"no usable records in {specs} ({tracker.count} bad)")
    return records


@dataclass
class BadRecordTracker:
    max_fraction: float = 0.05
    seen: int = 0  # good + bad
    count: int = 0
    examples: list = field(default_factory=list)

    def bad(self, key: str, why: str, already_seen: bool = False):
        self.count += 1
        self.seen += 0 if already_seen else 1
        if len(self.examples) < 5:
            self.examples.append(f"{key}: {why}")

    def add(self, stats: dict):
        """Counts reported by a loader worker with one batch."""
        self.seen += int(stats["seen"])
        self.count += int(stats["bad"])
        for e in stats["examples"]:
            if len(self.examples) < 5:
                self.examples.append(e)

    @property
    def fraction(self) -> float:
        return self.count / max(self.seen, 1)

    def check(self):
        if self.count and self.fraction > self.max_fraction:
            raise DataError(
                f"{self.count} of {self.seen} records are bad ({self.fraction:.1%} > max_bad_fraction "
                f"{self.max_fraction:.1%}); e.g. {self.examples}. Fix the data or raise --max-bad-fraction."
            )

    def state_dict(self) -> dict:
        return {"seen": self.seen, "count": self.count, "examples": list(self.examples)}

    def load_state_dict(self, d: dict):
        self.seen, self.count, self.examples = int(d["seen"]), int(d["count"]), list(d["examples"])


# -- buckets and batch formation -------------------------------------------------------------------


def panel_side(resolution: int) -> int:
    return max(PATCH, resolution // PATCH * PATCH)


def bucket_sizes(
    resolution: int, ratios=(0.5, 0.5625, 0.625, 0.75, 1.0, 1.333, 1.6, 1.778, 2.0)
) -> list[tuple[int, int]]:
    """Panel sizes (h, w), multiples of 16, of about resolution^2 pixels for a range of aspect ratios."""
    out = []
    for r in ratios:  # r = h / w
        w = max(PATCH, int(round(resolution / math.sqrt(r) / PATCH)) * PATCH)
        h = max(PATCH, int(round(resolution * math.sqrt(r) / PATCH)) * PATCH)
        if (h, w) not in out:
            out.append((h, w))
    return out


def nearest_bucket(size: tuple[int, int], sizes: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = size[0] / size[1]
    return min(sizes, key=lambda s: abs(math.log(s[0] / s[1]) - math.log(ratio)))


@dataclass
class PlannedBatch:
    index: int  # position in the planner's sequence of batches
    bucket: tuple[int, int]  # panel size (h, w)
    records: list[EditRecord]
    spares: list[EditRecord]  # same-bucket records still in the buffer, for records that fail to decode
    seen: int  # records streamed since the previous batch (bad ones included)
    skipped: list[Skip]  # bad records found while streaming since the previous batch
    passes: int  # complete passes over this consumer's shards before this batch


class BatchPlanner:
    """Forms batches of ``group`` same-bucket records from one consumer's shards, from metadata only.

    Each pass visits the shards in an order drawn from (seed, pass) and keeps those of this consumer
    (``consumer``-th of every ``consumers``). Records go through a shuffle buffer of
    ``shuffle_buffer`` records into per-bucket pools; a full pool is a batch. At the end of a pass
    the buffer is emptied in random order; partial pools carry over into the next pass (or, with
    ``flush``, become short batches). The work per batch does not depend on the data set's size.
    """

    def __init__(
        self,
        shards: list[Shard],
        group: int,
        resolution: int,
        aspect: bool,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        consumer: int = 0,
        consumers: int = 1,
        spares: int = 4,
        shuffle: bool = True,
        passes: int | None = None,
        flush: bool = False,
        default_task: int = 0,
        num_tasks: int = 16,
    ):
        self.shards, self.group = list(shards), group
        self.side, self.aspect = panel_side(resolution), aspect
        self.sizes = bucket_sizes(self.side)
        self.seed, self.buffer_size = seed, max(1, shuffle_buffer if shuffle else 1)
        self.consumer, self.consumers = consumer, consumers
        self.spares, self.shuffle, self.passes, self.flush = spares, shuffle, passes, flush
        self.default_task, self.num_tasks = default_task, num_tasks

    def shard_order(self, pass_no: int) -> list[Shard]:
        order = self.shards
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_no)
            order = [self.shards[i] for i in torch.randperm(len(self.shards), generator=gen).tolist()]
        return order[self.consumer :: self.consumers]

    def bucket(self, rec: EditRecord) -> tuple[int, int]:
        if rec.bucket is not None:
            return rec.bucket
        if not self.aspect:
            return (self.side, self.side)
        if rec.size is None:
            rec.size = image_size(rec.source)
        return nearest_bucket(rec.size, self.sizes)

    def __iter__(self):
        rng = random.Random(f"x2edit-planner:{self.seed}:{self.consumer}")
        buffer: list[tuple[EditRecord, tuple[int, int]]] = []
        pools: dict[tuple[int, int], list[EditRecord]] = {}
        state = {"index": 0, "seen": 0, "skipped": [], "passes": 0}

        def emit(b, recs):
            spares = [r for r, rb in buffer if rb == b][: self.spares]
            out = PlannedBatch(
                state["index"], b, recs, spares, state["seen"], state["skipped"], state["passes"]
            )
            state.update(index=state["index"] + 1, seen=0, skipped=[])
            return out

        def add(rec, b):
            pool = pools.setdefault(b, [])
            pool.append(rec)
            if len(pool) == self.group:
                pools[b] = []
                return emit(b, pool)
            return None

        pass_no = 0
        while self.passes is None or pass_no < self.passes:
            good, emitted = 0, 0
            for shard in self.shard_order(pass_no):
                for item in shard.records(self.default_task, self.num_tasks):
                    state["seen"] += 1
                    if isinstance(item, Skip):
                        state["skipped"].append(item)
                        continue
                    try:
                        b = self.bucket(item)
                    except BadRecord as e:
                        state["skipped"].append(Skip(item.key, str(e)))
                        continue
                    good += 1
                    buffer.append((item, b))
                    if len(buffer) >= self.buffer_size:
                        j = rng.randrange(len(buffer))
                        buffer[j], buffer[-1] = buffer[-1], buffer[j]
                        batch = add(*buffer.pop())
                        if batch is not None:
                            emitted += 1
                            yield batch
            while buffer:
                j = rng.randrange(len(buffer))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                batch = add(*buffer.pop())
                if batch is not None:
                    emitted += 1
                    yield batch
            if good == 0:
                names = [s.name for s in self.shard_order(pass_no)][:3]
                raise DataError(f"no usable records in the shards {names}... ({len(state['skipped'])} bad)")
            if self.flush:
                for b in sorted(pools):
                    if pools[b]:
                        recs, pools[b] = pools[b], []
                        yield emit(b, recs)
            elif emitted == 0 and pass_no == 0:
                raise DataError(
                    f"{good} records cannot fill one batch of {self.group} within an aspect bucket; "
                    "add data or lower --batch-size"
                )
            pass_no += 1
            state["passes"] = pass_no


# -- diptychs --------------------------------------------------------------------------------------


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> [1, H, W, 3] floats in 0..1 (ComfyUI IMAGE layout, as the diptych helpers take)."""
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(1, img.height, img.width, 3).float() / 255.0


def fit_panel(img: Image.Image, h: int, w: int, crop: bool) -> torch.Tensor:
    """[1, h, w, 3] in 0..1: resized ignoring aspect (crop False, ICEdit) or covered and centre-cropped."""
    x = _to_tensor(img)
    if crop:
        scale = max(h / img.height, w / img.width)
        rh, rw = max(h, round(img.height * scale)), max(w, round(img.width * scale))
        x = resize_images(x, rh, rw)
        top, left = (rh - h) // 2, (rw - w) // 2
        return x[:, top : top + h, left : left + w]
    return resize_images(x, h, w)


def training_diptych(source: torch.Tensor, target: torch.Tensor):
    """(diptych, masked, mask) from panels [B, h, w, 3] in 0..1, as model inputs in [-1, 1] NCHW.

    diptych = source | target; masked = source | grey (ComfyUI's InpaintModelConditioning greys
    the masked pixels, which is what the nodes feed at inference); mask = 0 | 1.
    """
    b, h, w, _ = source.shape
    full = torch.cat([source, target], dim=2)
    mask = torch.zeros(b, h, 2 * w, 1, dtype=full.dtype)
    mask[:, :, w:] = 1.0
    masked = (full - 0.5) * (1.0 - mask) + 0.5
    to_model = lambda x: (x * 2.0 - 1.0).movedim(-1, 1).contiguous()  # noqa: E731
    return to_model(full), to_model(masked), mask.movedim(-1, 1).contiguous()


# -- encoders ----------------------------------------------------------------------------------------


class LatentEncoder:
    """diffusers AutoencoderKL -> FLUX latents ((mean - shift) * scale; the mean, not a sample)."""

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.scale = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.vae_scale = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)

    @classmethod
    def from_path(cls, path: str, dtype=torch.float32):
        from diffusers import AutoencoderKL

        sub = os.path.join(path, "vae")
        return cls(AutoencoderKL.from_pretrained(sub if os.path.isdir(sub) else path, torch_dtype=dtype))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        dist = self.vae.encode(images.to(p.device, p.dtype)).latent_dist
        return ((dist.mean - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        return self.vae.decode((latents / self.scale + self.shift).to(p.device, p.dtype)).sample.float()


class HashTextEncoder:
    """A deterministic toy text encoder for tests and the synthetic suite: each word gets a fixed random
    vector (seeded by its CRC32), so equal prompts give equal embeddings and different words differ."""

    def __init__(self, joint_dim: int, pooled_dim: int, seq_len: int = 16):
        self.joint_dim, self.pooled_dim, self.seq_len = joint_dim, pooled_dim, seq_len

    def _word(self, word: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(word.encode("utf-8")))
        return torch.randn(self.joint_dim + self.pooled_dim, generator=gen)

    @torch.no_grad()
    def encode(self, prompts: list[str]):
        embeds = torch.zeros(len(prompts), self.seq_len, self.joint_dim)
        pooled = torch.zeros(len(prompts), self.pooled_dim)
        for i, p in enumerate(prompts):
            words = p.lower().split()[-self.seq_len :]  # the instruction is at the end of the IC prompt
            for j, w in enumerate(words):
                v = self._word(w)
                embeds[i, j] = v[: self.joint_dim]
                pooled[i] += v[self.joint_dim :] / max(len(words), 1)
        return embeds, pooled


class FluxTextEncoder:
    """CLIP-L (pooled) + T5-XXL (sequence) from local transformers folders, as FLUX.1 uses them."""

    def __init__(
        self, clip_path: str, t5_path: str, max_tokens: int = 512, device="cpu", dtype=torch.float32
    ):
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        def sub(path, name):
            p = os.path.join(path, name)
            return p if os.path.isdir(p) else path

        self.clip_tok = CLIPTokenizer.from_pretrained(sub(clip_path, "tokenizer"))
        self.clip = (
            CLIPTextModel.from_pretrained(sub(clip_path, "text_encoder"), torch_dtype=dtype).to(device).eval()
        )
        self.t5_tok = T5TokenizerFast.from_pretrained(sub(t5_path, "tokenizer_2"))
        self.t5 = (
            T5EncoderModel.from_pretrained(sub(t5_path, "text_encoder_2"), torch_dtype=dtype)
            .to(device)
            .eval()
        )
        self.max_tokens, self.device, self.dtype = max_tokens, device, dtype

    @torch.no_grad()
    def encode(self, prompts: list[str]):
        c = self.clip_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        pooled = self.clip(c.input_ids.to(self.device), output_hidden_states=False).pooler_output
        t = self.t5_tok(
            prompts, padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        )
        embeds = self.t5(t.input_ids.to(self.device), output_hidden_states=False)[0]
        return embeds.float(), pooled.float()


# -- decoding and the loader -----------------------------------------------------------------------


def load_panels(rec: EditRecord, size: tuple[int, int], crop: bool) -> dict[str, torch.Tensor]:
    """Source and target panels [h, w, 3] in 0..1 of one record (decoded here)."""
    h, w = size
    src = fit_panel(load_image(rec.source), h, w, crop)[0]
    tgt = fit_panel(load_image(rec.target), h, w, crop)[0]
    return {"source": src, "target": tgt}


def encode_diptychs(latent_encoder: LatentEncoder, source: torch.Tensor, target: torch.Tensor) -> dict:
    """Latents of a batch of panels [B, h, w, 3]: x0 (the diptych), masked (source | grey) and the
    pixel mask. Each sample is encoded on its own, so its latents do not depend on the batch it
    came in (a latent cache and a run from images agree exactly)."""
    full, masked, mask = training_diptych(source, target)
    lat = [latent_encoder.encode(torch.stack([full[i], masked[i]])) for i in range(full.shape[0])]
    return {
        "x0": torch.stack([x[0] for x in lat]),
        "masked": torch.stack([x[1] for x in lat]),
        "mask": mask,
    }


def diptych_mask(batch: int, h: int, w: int) -> torch.Tensor:
    """The pixel mask [B, 1, h, 2w] of a diptych of panels h x w (0 = source, 1 = edited half)."""
    mask = torch.zeros(batch, 1, h, 2 * w)
    mask[..., w:] = 1.0
    return mask


class EditStream(torch.utils.data.IterableDataset):
    """This process's batches, endless, for a torch DataLoader (``batch_size=None``).

    Consumers are the DataLoader workers of every process (``world`` x ``num_workers``; one per
    process without workers). With at least as many shards as consumers, consumer ``rank *
    workers + worker`` streams every ``consumers``-th shard and forms batches of ``batch_size``;
    otherwise every consumer forms the same global batches of ``batch_size * world`` and this
    process decodes its slice. Either way consumer slot ``c`` yields this process's batches ``c, c +
    W, ...``, the order a DataLoader returns them in, so ``skip`` (batches already consumed by this
    process) resumes the exact sequence: the skipped batches are formed but never decoded.

    Each batch: ``source``/``target`` panels [B, h, w, 3] (or, from a latent cache, ``x0``,
    ``masked``, ``embeds``, ``pooled``), ``prompts``, ``tasks``, ``keys`` and ``stats`` (records seen
    and bad since the previous batch of the same consumer).
    """

    def __init__(
        self,
        shards: list[Shard],
        batch_size: int,
        resolution: int,
        aspect: bool,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        skip: int = 0,
        spares: int = 4,
        default_task: int = 0,
        num_tasks: int = 16,
    ):
        super().__init__()
        self.shards, self.batch_size = list(shards), batch_size
        self.resolution, self.aspect, self.seed = resolution, aspect, seed
        self.shuffle_buffer, self.rank, self.world = shuffle_buffer, rank, world
        self.workers = max(1, num_workers)
        self.num_workers, self.skip, self.spares = num_workers, skip, spares
        self.default_task, self.num_tasks = default_task, num_tasks
        self.split = "shards" if len(self.shards) >= world * self.workers else "replicated"

    def planner(self, worker: int) -> BatchPlanner:
        kw = dict(
            resolution=self.resolution,
            aspect=self.aspect,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            default_task=self.default_task,
            num_tasks=self.num_tasks,
        )
        if self.split == "shards":
            return BatchPlanner(
                self.shards,
                self.batch_size,
                consumer=self.rank * self.workers + worker,
                consumers=self.world * self.workers,
                spares=self.spares,
                **kw,
            )
        return BatchPlanner(self.shards, self.batch_size * self.world, spares=self.spares * self.world, **kw)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        loader_worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise DataError(f"the stream was set up for {self.workers} workers, not {info.num_workers}")
        w_count = self.workers
        # A DataLoader takes batches from its workers in turn, starting with worker 0, and the
        # batches of this process go round the consumer slots 0, 1, ..., W-1 from the start of
        # training: after ``skip`` batches, loader worker 0 must play slot ``skip % W``.
        slot = (self.skip + loader_worker) % w_count
        done = max(0, -(-(self.skip - slot) // w_count))  # batches of this slot already consumed
        owned = 0
        for plan in self.planner(slot):
            if self.split == "replicated" and plan.index % w_count != slot:
                continue
            owned += 1
            if owned <= done:
                continue
            yield self.decode(plan)

    def decode(self, plan: PlannedBatch) -> dict:
        b, r = self.batch_size, self.rank
        if self.split == "shards":
            recs, spares = plan.records, plan.spares
        else:
            recs, spares = plan.records[r * b : (r + 1) * b], plan.spares[r :: self.world]
        stats = {
            "seen": plan.seen,
            "bad": len(plan.skipped),
            "examples": [f"{s.key}: {s.why}" for s in plan.skipped[:5]],
        }
        items, used, spare_iter = [], [], iter(spares)
        for rec in recs:
            cand = rec
            while cand is not None:
                try:
                    items.append(self.load(cand, plan.bucket))
                    used.append(cand)
                    break
                except BadRecord as e:
                    stats["bad"] += 1
                    if len(stats["examples"]) < 5:
                        stats["examples"].append(f"{cand.key}: {e}")
                    cand = next(spare_iter, None)
        if not items:
            raise DataError(
                f"every record of a {plan.bucket} batch and its spares is bad, e.g. {stats['examples']}"
            )
        n = len(items)
        for i in range(len(recs) - n):  # spares ran out: repeat good records of the batch
            items.append(items[i % n])
            used.append(used[i % n])
        out = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        out.update(
            prompts=[build_ic_prompt(rec.instruction) for rec in used],
            tasks=torch.tensor([rec.task for rec in used], dtype=torch.long),
            keys=[rec.key for rec in used],
            stats=stats,
            passes=plan.passes,
        )
        return out

    def load(self, rec: EditRecord, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        if rec.latents is not None:
            return rec.latents()
        return load_panels(rec, size, self.aspect)

    def first_batch(self) -> dict:
        """This process's first batch, formed in this process (sample previews)."""
        stream = EditStream(
            self.shards,
            self.batch_size,
            self.resolution,
            self.aspect,
            self.seed,
            self.shuffle_buffer,
            self.rank,
            self.world,
            self.num_workers,
            0,
            self.spares,
            self.default_task,
            self.num_tasks,
        )
        it = iter(stream.planner(0))
        plan = next(it)
        return stream.decode(plan)


def _worker_init(_):
    torch.set_num_threads(1)  # workers decode and resize; threads would only compete for cores


def make_loader(stream: EditStream, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=stream.num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if stream.num_workers else None,
        prefetch_factor=2 if stream.num_workers else None,
    )


class EditData:
    """Model-ready batches of a small in-memory record list (held-out sets): ``load_batch(indices)``.

    A bad record is replaced by the next good one (resized to the batch's panel size) and counted.
    """

    def __init__(
        self,
        records: list[EditRecord],
        resolution: int,
        aspect_buckets: bool,
        latent_encoder: LatentEncoder | None,
        text_encoder,
        tracker: BadRecordTracker,
    ):
        self.records, self.aspect = records, aspect_buckets
        self.side, self.sizes = panel_side(resolution), bucket_sizes(panel_side(resolution))
        self.latent_encoder, self.text_encoder, self.tracker = latent_encoder, text_encoder, tracker
        self.bad_indices: set[int] = set()

    def __len__(self):
        return len(self.records)

    def size(self, i: int) -> tuple[int, int]:
        if not self.aspect:
            return (self.side, self.side)
        rec = self.records[i]
        if rec.size is None:
            try:
                rec.size = image_size(rec.source)
            except BadRecord:
                return (self.side, self.side)  # found and counted when loaded
        return nearest_bucket(rec.size, self.sizes)

    def text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoder is None:
            raise DataError("no text encoder loaded")
        return self.text_encoder.encode(prompts)

    def load_batch(self, indices: list[int]) -> dict:
        if self.latent_encoder is None:
            raise DataError("no VAE loaded; pass --vae")
        size = self.size(indices[0])
        panels, used = [], []
        for i in indices:
            j = i
            for _ in range(len(self.records)):
                if j not in self.bad_indices:
                    try:
                        panels.append(load_panels(self.records[j], size, self.aspect))
                        used.append(j)
                        break
                    except BadRecord as e:
                        self.bad_indices.add(j)
                        self.tracker.bad(self.records[j].key, str(e), already_seen=True)
                        self.tracker.check()
                j = (j + 1) % len(self.records)
            else:
                raise DataError("every record is bad")
        out = encode_diptychs(
            self.latent_encoder,
            torch.stack([p["source"] for p in panels]),
            torch.stack([p["target"] for p in panels]),
        )
        recs = [self.records[j] for j in used]
        out.update(
            prompts=[build_ic_prompt(r.instruction) for r in recs],
            tasks=torch.tensor([r.task for r in recs], dtype=torch.long),
            keys=[r.key for r in recs],
        )
        return out
