"""Training data: record sources, bad-record accounting, aspect buckets, diptychs, encoders, caches.

Sources (each yields :class:`EditRecord` entries; images are read lazily):

- JSONL manifest: one object per line with ``source``, ``target`` (paths, relative to the
  manifest's folder), ``instruction`` and optional ``task`` (id or name).
- Paired folders: ``<root>/source/<name>.<ext>`` and ``<root>/target/<name>.<ext>`` with the
  instruction in ``<root>/target/<name>.txt`` (or ``<root>/instructions/<name>.txt``) and an optional
  task in ``<root>/target/<name>.task``.
- WebDataset tar shards as X2Edit writes them: per key ``<key>.json`` (``instruction`` or
  ``instruction_en``, ``task``), ``<key>.1.0.jpg`` (source) and ``<key>.2.jpg`` (target). Read with
  ``tarfile``; members are located once and read by offset.
- Parquet (pyarrow): MagicBrush columns (``source_img``, ``target_img``, ``instruction``) or
  OmniEdit columns (``src_img``, ``edited_img``, ``edited_prompt_list``, ``task``); image cells are
  Hugging Face image structs ``{bytes, path}`` or raw bytes.

A bad record (missing or corrupt image, empty instruction, unknown task) is skipped and counted;
:class:`BadRecordTracker` raises :class:`DataError` once the bad share passes ``max_bad_fraction``.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import json
import math
import os
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
    try:
        img = Image.open(io.BytesIO(_read_bytes(obj)))
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadRecord(f"missing or corrupt image: {e}") from e
    if img.mode == "RGBA":  # composite on white, as the nodes do
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    return img.convert("RGB")


def _check(record: EditRecord) -> EditRecord:
    if not isinstance(record.instruction, str) or not record.instruction.strip():
        raise BadRecord(f"{record.key}: empty instruction")
    return record


def read_jsonl(path: str, default_task: int, num_tasks: int, tracker: BadRecordTracker) -> list[EditRecord]:
    root = os.path.dirname(os.path.abspath(path))
    out = []
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
                out.append(_check(rec))
            except (BadRecord, json.JSONDecodeError) as e:
                tracker.bad(key, str(e))
    return out


def _first_with_ext(folder: str, stem: str) -> str | None:
    for ext in IMAGE_EXTS:
        p = os.path.join(folder, stem + ext)
        if os.path.isfile(p):
            return p
    return None


def read_folder(root: str, default_task: int, num_tasks: int, tracker: BadRecordTracker) -> list[EditRecord]:
    src_dir, tgt_dir = os.path.join(root, "source"), os.path.join(root, "target")
    if not os.path.isdir(src_dir) or not os.path.isdir(tgt_dir):
        raise DataError(f"{root}: a paired folder needs source/ and target/ subfolders")
    out = []
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
            out.append(_check(EditRecord(key, os.path.join(src_dir, name), tgt, text or "", task)))
        except BadRecord as e:
            tracker.bad(key, str(e))
    return out


class _TarMember:
    """Reads one member of a tar file by offset (picklable, no open handle kept)."""

    def __init__(self, path: str, offset: int, size: int):
        self.path, self.offset, self.size = path, offset, size

    def __call__(self) -> bytes:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.size)
        if len(data) != self.size:
            raise BadRecord(f"{self.path}: truncated member at {self.offset}")
        return data


def read_tar(path: str, default_task: int, num_tasks: int, tracker: BadRecordTracker) -> list[EditRecord]:
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    order = []
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                base = os.path.basename(info.name)
                key, _, ext = base.partition(".")
                full_key = os.path.join(os.path.dirname(info.name), key)
                if full_key not in groups:
                    groups[full_key] = {}
                    order.append(full_key)
                groups[full_key][ext] = info
            members = {k: {e: (i.offset_data, i.size) for e, i in g.items()} for k, g in groups.items()}
            meta = {}
            for k in order:
                if "json" in groups[k]:
                    meta[k] = tf.extractfile(groups[k]["json"]).read()
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path}: not a readable tar shard ({e})") from e
    out = []
    for k in order:
        key = f"{os.path.basename(path)}:{k}"
        try:
            m = members[k]
            if "json" not in m or "1.0.jpg" not in m or "2.jpg" not in m:
                raise BadRecord(f"{key}: needs json, 1.0.jpg and 2.jpg (has {sorted(m)})")
            obj = json.loads(meta[k])
            if not isinstance(obj, dict):
                raise BadRecord(f"{key}: json is not an object")
            text = obj.get("instruction_en") or obj.get("instruction") or ""
            rec = EditRecord(
                key,
                _TarMember(path, *m["1.0.jpg"]),
                _TarMember(path, *m["2.jpg"]),
                text,
                parse_task(obj.get("task"), default_task, num_tasks),
            )
            out.append(_check(rec))
        except (BadRecord, json.JSONDecodeError, UnicodeDecodeError) as e:
            tracker.bad(key, str(e))
    return out


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


def read_parquet(path: str, default_task: int, num_tasks: int, tracker: BadRecordTracker) -> list[EditRecord]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    layout = next((v for v in PARQUET_LAYOUTS.values() if {v[0], v[1], v[2]} <= names), None)
    if layout is None:
        raise DataError(
            f"{path}: columns {sorted(names)} match neither MagicBrush (source_img, target_img, instruction) "
            "nor OmniEdit (src_img, edited_img, edited_prompt_list)"
        )
    src_col, tgt_col, text_col, task_col = layout
    cols = [text_col] + ([task_col] if task_col and task_col in names else [])
    out = []
    for g in range(pf.num_row_groups):
        table = pf.read_row_group(g, columns=cols).to_pylist()
        for r, row in enumerate(table):
            key = f"{os.path.basename(path)}:{g}:{r}"
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
                    key, _ParquetCell(path, src_col, g, r), _ParquetCell(path, tgt_col, g, r), text, task
                )
                out.append(_check(rec))
            except BadRecord as e:
                tracker.bad(key, str(e))
    return out


READERS = {"jsonl": read_jsonl, "folder": read_folder, "tar": read_tar, "parquet": read_parquet}


def _expand_source(spec: str) -> list[tuple[str, str]]:
    kind, sep, rest = spec.partition(":")
    if sep and kind in READERS and not os.path.exists(spec):
        paths = sorted(glob.glob(rest)) or [rest]
        return [(kind, p) for p in paths]
    paths = sorted(glob.glob(spec)) or [spec]
    out = []
    for p in paths:
        if os.path.isdir(p):
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
                "prefix it with jsonl:, folder:, tar: or parquet:"
            )
    return out


def read_sources(
    specs: list[str], default_task: int = 0, num_tasks: int = 16, tracker: BadRecordTracker | None = None
) -> list[EditRecord]:
    tracker = tracker or BadRecordTracker()
    records = []
    for spec in specs:
        for kind, path in _expand_source(spec):
            if not os.path.exists(path):
                raise DataError(f"data source {path!r} does not exist")
            records += READERS[kind](path, default_task, num_tasks, tracker)
    tracker.seen += len(records)
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


# -- buckets and batch plan ------------------------------------------------------------------------


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


def assign_buckets(records: list[EditRecord], resolution: int, aspect: bool) -> list[tuple[int, int]]:
    """Panel size for each record: the square (ICEdit) or the closest aspect bucket."""
    side = max(PATCH, resolution // PATCH * PATCH)
    if not aspect:
        return [(side, side)] * len(records)
    sizes = bucket_sizes(side)
    out = []
    for rec in records:
        if rec.size is None:
            try:
                with Image.open(io.BytesIO(_read_bytes(rec.source))) as img:
                    rec.size = (img.height, img.width)
            except (OSError, ValueError, BadRecord):
                rec.size = (side, side)  # a broken image is found and counted when loaded
        ratio = rec.size[0] / rec.size[1]
        out.append(min(sizes, key=lambda s: abs(math.log(s[0] / s[1]) - math.log(ratio))))
    return out


def epoch_plan(buckets: list[tuple[int, int]], group: int, seed: int, epoch: int) -> list[list[int]]:
    """Global batches of one epoch: each a list of ``group`` record indices from one bucket.

    Deterministic in (seed, epoch), so a resumed run continues the same order. Incomplete groups are
    dropped (every process needs the same batch size for the gathered contrastive loss).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(buckets):
        by_bucket.setdefault(b, []).append(i)
    batches = []
    for b in sorted(by_bucket):
        idx = by_bucket[b]
        perm = torch.randperm(len(idx), generator=gen).tolist()
        shuffled = [idx[p] for p in perm]
        batches += [shuffled[i : i + group] for i in range(0, len(shuffled) - group + 1, group)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[o] for o in order]


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
        self.max_tokens, self.device = max_tokens, device

    @torch.no_grad()
    def encode(self, prompts: list[str]):
        c = self.clip_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        pooled = self.clip(c.input_ids.to(self.device), output_hidden_states=False).pooler_output
        t = self.t5_tok(
            prompts, padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        )
        embeds = self.t5(t.input_ids.to(self.device), output_hidden_states=False)[0]
        return embeds.float(), pooled.float()


# -- caches ----------------------------------------------------------------------------------------


def _digest(*parts) -> str:
    return hashlib.sha1("\x00".join(str(p) for p in parts).encode("utf-8")).hexdigest()


class TensorCache:
    """Small safetensors files keyed by a digest, written atomically."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, key[:2], key + ".safetensors")

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        p = self._path(key)
        if not os.path.isfile(p):
            return None
        try:
            return load_file(p)
        except (SafetensorError, OSError):
            return None  # a damaged cache entry is recomputed

    def put(self, key: str, tensors: dict[str, torch.Tensor]):
        from safetensors.torch import save_file

        p = self._path(key)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = f"{p}.tmp-{os.getpid()}"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, p)


# -- the data pipeline the trainer uses ------------------------------------------------------------


class EditData:
    """Records + batch plan + loading into model-ready tensors (latents and text embeddings).

    ``batch(indices, size, rank_slice)`` loads one process's share of a global batch; a bad record is
    replaced by the next good record of the same bucket so every process keeps the same batch size.
    """

    def __init__(
        self,
        records: list[EditRecord],
        resolution: int,
        aspect_buckets: bool,
        latent_encoder: LatentEncoder | None,
        text_encoder,
        tracker: BadRecordTracker,
        cache_dir: str = "",
        cache_latents: bool = False,
        cache_text: bool = False,
    ):
        self.records = records
        self.aspect = aspect_buckets
        self.buckets = assign_buckets(records, resolution, aspect_buckets)
        self.latent_encoder = latent_encoder
        self.text_encoder = text_encoder
        self.tracker = tracker
        self.bad_indices: set[int] = set()
        self.latent_cache = (
            TensorCache(os.path.join(cache_dir, "latents")) if cache_dir and cache_latents else None
        )
        self.text_cache = TensorCache(os.path.join(cache_dir, "text")) if cache_dir and cache_text else None

    def __len__(self):
        return len(self.records)

    def _latents(self, i: int, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        rec = self.records[i]
        key = _digest("latents", rec.key, size, self.aspect)
        if self.latent_cache is not None:
            hit = self.latent_cache.get(key)
            if hit is not None:
                return hit
        if self.latent_encoder is None:
            raise DataError("no VAE given and the latents are not cached; pass --vae")
        h, w = size
        src = fit_panel(load_image(rec.source), h, w, self.aspect)
        tgt = fit_panel(load_image(rec.target), h, w, self.aspect)
        full, masked, mask = training_diptych(src, tgt)
        out = {
            "x0": self.latent_encoder.encode(full)[0],
            "masked": self.latent_encoder.encode(masked)[0],
            "mask": mask[0],
        }
        if self.latent_cache is not None:
            self.latent_cache.put(key, out)
        return out

    def text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_cache is None:
            if self.text_encoder is None:
                raise DataError("no text encoder and no text cache")
            return self.text_encoder.encode(prompts)
        embeds, pooled = [None] * len(prompts), [None] * len(prompts)
        todo = []
        for j, p in enumerate(prompts):
            hit = self.text_cache.get(_digest("text", p))
            if hit is None:
                todo.append(j)
            else:
                embeds[j], pooled[j] = hit["embeds"], hit["pooled"]
        if todo:
            if self.text_encoder is None:
                raise DataError(
                    f"prompt {prompts[todo[0]]!r} is not in the text cache and no encoder is loaded"
                )
            e, p = self.text_encoder.encode([prompts[j] for j in todo])
            for n, j in enumerate(todo):
                embeds[j], pooled[j] = e[n], p[n]
                self.text_cache.put(_digest("text", prompts[j]), {"embeds": e[n], "pooled": p[n]})
        return torch.stack(embeds), torch.stack(pooled)

    def load_batch(self, indices: list[int]) -> dict:
        """Latents, prompts and tasks of ``indices`` (all from one bucket), bad records replaced."""
        size = self.buckets[indices[0]]
        same_bucket = [i for i, b in enumerate(self.buckets) if b == size]
        items, used = [], []
        for i in indices:
            j, tries = i, 0
            while True:
                if j not in self.bad_indices:
                    try:
                        items.append(self._latents(j, size))
                        used.append(j)
                        break
                    except BadRecord as e:
                        self.bad_indices.add(j)
                        self.tracker.bad(self.records[j].key, str(e), already_seen=True)
                        self.tracker.check()
                tries += 1
                if tries > len(same_bucket):
                    raise DataError(f"every record of the {size} bucket is bad")
                j = same_bucket[(same_bucket.index(j) + 1) % len(same_bucket)]
        recs = [self.records[j] for j in used]
        return {
            "x0": torch.stack([it["x0"] for it in items]),
            "masked": torch.stack([it["masked"] for it in items]),
            "mask": torch.stack([it["mask"] for it in items]),
            "prompts": [build_ic_prompt(r.instruction) for r in recs],
            "tasks": torch.tensor([r.task for r in recs], dtype=torch.long),
            "keys": [r.key for r in recs],
        }
