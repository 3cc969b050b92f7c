"""``x2edit-train cache``: VAE latents and text embeddings of every record, written once to disk.

Layout of the output folder:

- ``shard-rRRR-NNNNNN.safetensors``: up to ``cache_shard_size`` records; tensors ``{i}.x0`` and
  ``{i}.masked`` (the diptych's and the masked diptych's latents, float32), ``{i}.embeds`` and
  ``{i}.pooled`` (text embeddings of the in-context prompt, in the text encoder's dtype); the
  metadata entry ``records`` holds each record's key, task, instruction and panel size.
- ``empty.safetensors``: the embeddings of the empty prompt (text dropout).
- ``index.json``: the settings the cache was made with and its shard list.

Training with ``--data <folder>`` then needs neither the VAE nor the text encoders. Every process
of a distributed run writes the shards of its share of the sources; the first writes the index.
"""

from __future__ import annotations

import json
import os

import torch

from x2edit_core.errors import ConfigError
from x2edit_core.prompt import build_ic_prompt

from .data import (
    CACHE_FORMAT,
    CACHE_INDEX,
    BadRecord,
    BadRecordTracker,
    BatchPlanner,
    DataError,
    EditRecord,
    LatentEncoder,
    Shard,
    encode_diptychs,
    list_shards,
    load_panels,
    read_cache_index,
)

EMPTY_FILE = "empty.safetensors"
CACHE_VERSION = 1


class CacheRecords(torch.utils.data.IterableDataset):
    """Every record of some shards once, in order, decoded to panels (bad ones reported, not raised)."""

    def __init__(self, shards: list[Shard], resolution: int, aspect: bool, default_task: int, num_tasks: int):
        super().__init__()
        self.shards, self.resolution, self.aspect = shards, resolution, aspect
        self.default_task, self.num_tasks = default_task, num_tasks

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        planner = BatchPlanner(
            self.shards,
            1,
            self.resolution,
            self.aspect,
            consumer=worker,
            consumers=workers,
            spares=0,
            shuffle=False,
            passes=1,
            flush=True,
            default_task=self.default_task,
            num_tasks=self.num_tasks,
        )
        try:
            for plan in planner:
                rec: EditRecord = plan.records[0]
                stats = {"seen": plan.seen, "skipped": [f"{s.key}: {s.why}" for s in plan.skipped]}
                try:
                    panels = load_panels(rec, plan.bucket, self.aspect)
                except BadRecord as e:
                    yield {"bad": f"{rec.key}: {e}", "stats": stats}
                    continue
                yield {"record": rec_meta(rec, plan.bucket), "panels": panels, "stats": stats}
        except DataError as e:
            if "no usable records" not in str(e):
                raise


def rec_meta(rec: EditRecord, bucket) -> dict:
    return {"key": rec.key, "task": rec.task, "instruction": rec.instruction, "bucket": list(bucket)}


def _storage_dtype(text_encoder) -> torch.dtype:
    dtype = getattr(text_encoder, "dtype", torch.float32)
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


class ShardWriter:
    def __init__(self, folder: str, rank: int, size: int, text_dtype: torch.dtype):
        self.folder, self.rank, self.size, self.text_dtype = folder, rank, size, text_dtype
        self.tensors, self.meta, self.files = {}, [], []

    def add(self, meta: dict, latents: dict, embeds: torch.Tensor, pooled: torch.Tensor):
        i = len(self.meta)
        self.tensors[f"{i}.x0"] = latents["x0"].float().contiguous()
        self.tensors[f"{i}.masked"] = latents["masked"].float().contiguous()
        self.tensors[f"{i}.embeds"] = embeds.to(self.text_dtype).contiguous()
        self.tensors[f"{i}.pooled"] = pooled.to(self.text_dtype).contiguous()
        self.meta.append(meta)
        if len(self.meta) >= self.size:
            self.flush()

    def flush(self):
        from safetensors.torch import save_file

        if not self.meta:
            return
        name = f"shard-r{self.rank:03d}-{len(self.files):06d}.safetensors"
        path = os.path.join(self.folder, name)
        save_file(self.tensors, path + ".tmp", metadata={"records": json.dumps(self.meta)})
        os.replace(path + ".tmp", path)
        self.files.append({"file": name, "records": len(self.meta)})
        self.tensors, self.meta = {}, []


def write_cache(cfg, latent_encoder: LatentEncoder, text_encoder, accelerator=None, progress=None) -> dict:
    """Encode every record of ``cfg.data`` into ``cfg.cache_dir``; returns the index (collective)."""
    from safetensors.torch import save_file

    if not cfg.cache_dir:
        raise ConfigError("x2edit-train cache needs --cache-dir (the output folder)")
    if latent_encoder is None or text_encoder is None:
        raise ConfigError("x2edit-train cache needs the VAE (--vae) and a text encoder")
    shards = list_shards(cfg.data)
    if shards[0].kind == "cache":
        raise ConfigError("the data is already a latent cache")
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    mine = shards[rank::world] if len(shards) >= world else (shards if rank == 0 else [])
    os.makedirs(cfg.cache_dir, exist_ok=True)
    text_dtype = _storage_dtype(text_encoder)
    writer = ShardWriter(cfg.cache_dir, rank, cfg.cache_shard_size, text_dtype)
    tracker = BadRecordTracker(max_fraction=cfg.max_bad_fraction)
    if mine:
        workers = min(cfg.num_workers, len(mine))
        loader = torch.utils.data.DataLoader(
            CacheRecords(mine, cfg.resolution, cfg.aspect_buckets, cfg.default_task, cfg.num_tasks),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
        )
        for item in loader:
            stats = item["stats"]
            tracker.seen += stats["seen"]
            for why in stats["skipped"]:
                tracker.bad(why.split(": ", 1)[0], why.split(": ", 1)[-1], already_seen=True)
            if "bad" in item:
                tracker.bad(item["bad"].split(": ", 1)[0], item["bad"].split(": ", 1)[-1], already_seen=True)
                continue
            meta, panels = item["record"], item["panels"]
            latents = encode_diptychs(latent_encoder, panels["source"][None], panels["target"][None])
            embeds, pooled = text_encoder.encode([build_ic_prompt(meta["instruction"])])
            writer.add(meta, {"x0": latents["x0"][0], "masked": latents["masked"][0]}, embeds[0], pooled[0])
            if progress is not None:
                progress.update(1)
        writer.flush()
    with open(os.path.join(cfg.cache_dir, f"shards-r{rank:03d}.json"), "w", encoding="utf-8") as fh:
        json.dump({"shards": writer.files, **tracker.state_dict()}, fh)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    index = None
    if rank == 0:
        parts = []
        for r in range(world):
            with open(os.path.join(cfg.cache_dir, f"shards-r{r:03d}.json"), encoding="utf-8") as fh:
                parts.append(json.load(fh))
        total = BadRecordTracker(max_fraction=cfg.max_bad_fraction)
        for p in parts:
            total.seen += p["seen"]
            total.count += p["count"]
            total.examples += p["examples"][: 5 - len(total.examples)]
        total.check()
        embeds, pooled = text_encoder.encode([""])
        empty = {"embeds": embeds[0], "pooled": pooled[0]}
        empty = {k: v.to(text_dtype).contiguous() for k, v in empty.items()}
        save_file(empty, os.path.join(cfg.cache_dir, EMPTY_FILE))
        files = [s for p in parts for s in p["shards"]]
        if not files:
            raise DataError(f"no usable records in {cfg.data} ({total.count} bad)")
        index = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "resolution": cfg.resolution,
            "aspect_buckets": cfg.aspect_buckets,
            "latent_channels": latent_encoder.latent_channels,
            "vae_scale": latent_encoder.vae_scale,
            "text_encoder": cfg.text_encoder,
            "max_text_tokens": cfg.max_text_tokens,
            "empty_prompt": EMPTY_FILE,
            "records": sum(s["records"] for s in files),
            "bad_records": total.count,
            "shards": files,
        }
        tmp = os.path.join(cfg.cache_dir, CACHE_INDEX + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=1)
        os.replace(tmp, os.path.join(cfg.cache_dir, CACHE_INDEX))
        for r in range(world):
            os.remove(os.path.join(cfg.cache_dir, f"shards-r{r:03d}.json"))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return index if index is not None else read_cache_index(cfg.cache_dir)


def load_empty_prompt(folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    t = load_file(os.path.join(folder, read_cache_index(folder)["empty_prompt"]))
    return t["embeds"].float(), t["pooled"].float()
