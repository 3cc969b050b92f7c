"""The training loop on Hugging Face accelerate: one process on CPU up to DDP / DeepSpeed / FSDP on GPUs."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import torch

from x2edit_core.errors import ConfigError
from x2edit_core.formats import MoEAdapter, save_moe_lora
from x2edit_core.losses import (
    flow_matching_pair,
    gathered_contrastive_loss,
    logit_normal_timesteps,
    masked_mse,
)
from x2edit_core.tasks import TASK_NAMES

from . import checkpoint as ckpt
from .config import TrainConfig
from .data import (
    BadRecordTracker,
    EditStream,
    HashTextEncoder,
    LatentEncoder,
    diptych_mask,
    encode_diptychs,
    list_shards,
    make_loader,
    read_cache_index,
)
from .model import (
    EditModel,
    fill_in_channels,
    fill_model_input,
    latent_image_ids,
    load_transformer,
    pack_latents,
    pack_mask,
    right_half_token_mask,
    unpack_latents,
)
from .presets import resolve_placement

log = logging.getLogger("x2edit.train")
MOE_TENSORS = ("lora_A", "lora_B", "router_weight", "shared_A", "shared_B")


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def make_optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as e:
            raise ConfigError(
                "--optimizer prodigy needs the prodigyopt package (pip install prodigyopt)"
            ) from e
        return Prodigy(
            params,
            lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
        )
    return torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
    )


def make_text_encoder(cfg: TrainConfig, transformer, device):
    if cfg.text_encoder == "hash":
        return HashTextEncoder(
            transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim
        )
    if cfg.text_encoder == "cached":
        return None
    if not cfg.clip_path or not cfg.t5_path:
        raise ConfigError("--text-encoder flux needs --clip-path and --t5-path (local folders)")
    from .data import FluxTextEncoder

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    return FluxTextEncoder(
        cfg.clip_path, cfg.t5_path, cfg.max_text_tokens, device=device, dtype=dtype[cfg.text_encoder_dtype]
    )


def load_encoders(
    cfg: TrainConfig, transformer, device, vae=None, text_encoder=None, need_vae=True, need_text=True
):
    """(LatentEncoder or None, text encoder or None) for images-in runs and for ``x2edit-train cache``."""
    if vae is None and cfg.vae and need_vae:
        latent_encoder = LatentEncoder.from_path(cfg.vae)
    else:
        latent_encoder = LatentEncoder(vae) if vae is not None else None
    if latent_encoder is not None:
        latent_encoder.vae.to(device)
        want = fill_in_channels(latent_encoder.latent_channels, latent_encoder.vae_scale)
        if transformer.config.in_channels != want:
            raise ConfigError(
                f"the transformer takes {transformer.config.in_channels} input channels but this VAE gives "
                f"FLUX Fill inputs of {want}; use a FLUX.1 Fill transformer with its VAE"
            )
    if text_encoder is None and need_text:
        text_encoder = make_text_encoder(cfg, transformer, device)
    return latent_encoder, text_encoder


class Trainer:
    """Build everything from a resolved :class:`TrainConfig` and train.

    ``transformer``, ``vae`` and ``text_encoder`` may be given directly (tests, benchmarks); otherwise
    they are loaded from the paths in the config.
    """

    def __init__(self, cfg: TrainConfig, transformer=None, vae=None, text_encoder=None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        cfg = cfg.resolved()  # idempotent; fills preset values into a hand-made TrainConfig
        if cfg.base_dtype == "bfloat16" and cfg.mixed_precision != "bf16":
            raise ConfigError(
                "--base-dtype bfloat16 needs --mixed-precision bf16 (inputs stay float32 otherwise)"
            )
        self.cfg = cfg
        # Top-k routing leaves some experts without tokens in a step, so DDP must allow unused parameters.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            cpu=cfg.cpu,
            kwargs_handlers=[ddp],
        )
        acc = self.accelerator
        torch.manual_seed(cfg.seed)
        self.device = acc.device
        base_dtype = torch.bfloat16 if cfg.base_dtype == "bfloat16" else torch.float32
        if transformer is None:
            transformer = load_transformer(cfg.transformer, cfg.transformer_config or None, base_dtype)
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        placement = resolve_placement(cfg, transformer)
        self.placement = placement
        self.model = EditModel(transformer, placement, cfg.num_tasks, seed=cfg.seed)
        self.model.to(self.device)
        if not cfg.data:
            raise ConfigError("no training data: pass --data (JSONL, folders, tar shards, parquet, a cache)")
        self.shards = list_shards(cfg.data)
        self.cache_index = None
        if self.shards[0].kind == "cache":
            self.cache_index = self._check_cache(cfg, transformer)
            # From a cache the encoders are not needed; the VAE only renders sample previews.
            self.latent_encoder, _ = load_encoders(
                cfg, transformer, self.device, vae, need_vae=cfg.sample_every > 0, need_text=False
            )
            self.text_encoder = None
            from .latent_cache import load_empty_prompt

            self.empty_prompt = load_empty_prompt(os.path.dirname(self.shards[0].path))
            self.vae_scale = int(self.cache_index["vae_scale"])
        else:
            self.latent_encoder, self.text_encoder = load_encoders(
                cfg, transformer, self.device, vae, text_encoder
            )
            if self.latent_encoder is None:
                raise ConfigError("training from images needs --vae (or train from a latent cache)")
            if self.text_encoder is None:
                raise ConfigError("--text-encoder cached needs a latent cache as --data (x2edit-train cache)")
            self.vae_scale = self.latent_encoder.vae_scale
        if (
            cfg.aspect_buckets
            and cfg.contrastive_weight > 0
            and acc.num_processes > 1
            and self.make_stream().split == "shards"
        ):
            # Each process then forms its own batches, so processes may be on different buckets in a
            # step, and the contrastive loss compares features of the whole global batch.
            raise ConfigError(
                "aspect buckets with the contrastive loss on several processes need every process on "
                "the same panel size; with this many shards each process forms its own batches. Train "
                "on square panels (--no-aspect-buckets), or with --contrastive-weight 0"
            )
        self.tracker = BadRecordTracker(max_fraction=cfg.max_bad_fraction)
        self.group = cfg.batch_size * acc.num_processes
        self.batches_done = 0  # batches this process consumed: the data position and the noise stream
        self._loader_iter = None
        params = self.model.trainable_parameters()
        self.adapter_names = list(self.model.adapter_state_dict())  # names before any engine wraps
        self.num_trainable = sum(p.numel() for p in params)
        self.optimizer = make_optimizer(cfg, params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, cfg.max_steps)
        )
        if ckpt.engine_kind(acc) == "deepspeed":
            # DeepSpeed sizes its engine from a prepared DataLoader; ours is built later, per resume.
            ds_config = acc.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
            ds_config["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
        self.ddp_model, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.generator = torch.Generator().manual_seed(cfg.seed * 7919 + acc.process_index)
        self.step = 0
        self.writer = None
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.history: list[dict] = []

    # -- data ---------------------------------------------------------------------------------------

    def make_stream(self, skip: int = 0) -> EditStream:
        cfg, acc = self.cfg, self.accelerator
        return EditStream(
            self.shards,
            cfg.batch_size,
            cfg.resolution,
            cfg.aspect_buckets,
            seed=cfg.seed,
            shuffle_buffer=cfg.shuffle_buffer,
            rank=acc.process_index,
            world=acc.num_processes,
            num_workers=cfg.num_workers,
            skip=skip,
            default_task=cfg.default_task,
            num_tasks=cfg.num_tasks,
        )

    def next_batch(self) -> dict:
        if self._loader_iter is None:  # started lazily, after a resume has set the position
            loader = make_loader(self.make_stream(self.batches_done), pin_memory=self.device.type == "cuda")
            self._loader_iter = iter(loader)
        raw = next(self._loader_iter)
        self.batches_done += 1
        self.tracker.add(raw.pop("stats"))
        # Early on the bad share is noisy; judge it after a full pass or a thousand records.
        if raw.pop("passes") > 0 or self.tracker.seen >= 1000:
            self.tracker.check()
        return self.model_batch(raw)

    def model_batch(self, raw: dict) -> dict:
        """Latents (encoded here from panels, or read from the cache), prompts and tasks of a batch."""
        if "x0" in raw:
            b, _, h, w2 = raw["x0"].shape
            raw["mask"] = diptych_mask(b, h * self.vae_scale, w2 * self.vae_scale // 2)
            raw["x0"], raw["masked"] = raw["x0"].float(), raw["masked"].float()
            return raw
        out = encode_diptychs(self.latent_encoder, raw.pop("source"), raw.pop("target"))
        raw.update({k: v.cpu() for k, v in out.items()})
        return raw

    def text(self, batch: dict, drop: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings of a batch; dropped samples get the empty prompt's."""
        if "embeds" in batch:
            embeds, pooled = batch["embeds"].float().clone(), batch["pooled"].float().clone()
            for j, d in enumerate(drop):
                if d:
                    embeds[j], pooled[j] = self.empty_prompt
            return embeds, pooled
        prompts = ["" if d else p for d, p in zip(drop, batch["prompts"])]
        return self.text_encoder.encode(prompts)

    def _check_cache(self, cfg: TrainConfig, transformer) -> dict:
        indexes = [read_cache_index(f) for f in dict.fromkeys(os.path.dirname(s.path) for s in self.shards)]
        for index in indexes:
            if index["resolution"] != cfg.resolution or bool(index["aspect_buckets"]) != cfg.aspect_buckets:
                raise ConfigError(
                    f"the latent cache was made with --resolution {index['resolution']} and aspect_buckets "
                    f"{index['aspect_buckets']}; train with the same settings (or re-run x2edit-train cache)"
                )
            want = fill_in_channels(int(index["latent_channels"]), int(index["vae_scale"]))
            if transformer.config.in_channels != want:
                raise ConfigError(
                    f"the transformer takes {transformer.config.in_channels} input channels but the cached "
                    f"latents give FLUX Fill inputs of {want}"
                )
        return indexes[0]

    # -- one step -----------------------------------------------------------------------------------

    def model_inputs(self, batch: dict, first_sample: int) -> dict:
        """Noised FLUX Fill inputs and the flow-matching target for one batch.

        Noise, timestep and text dropout of each sample come from a generator seeded by (seed, the
        sample's index in the global sample stream), so they depend neither on the number of
        processes nor on where a run was resumed.
        """
        cfg, dev = self.cfg, self.device
        x0 = batch["x0"]
        b, _, h, w = x0.shape
        x0p = pack_latents(x0)
        noise, t, drop = torch.empty_like(x0p), torch.empty(b), []
        for j in range(b):
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + first_sample + j + 1)
            noise[j] = torch.randn(x0p.shape[1:], generator=gen)
            t[j] = logit_normal_timesteps(1, gen, mean=cfg.timestep_mean, std=cfg.timestep_std)[0]
            drop.append(bool(torch.rand(1, generator=gen)[0] < cfg.text_dropout))
        embeds, pooled = self.text(batch, drop)
        x_t, target = flow_matching_pair(x0p, noise, t)
        inp = fill_model_input(x_t, pack_latents(batch["masked"]), pack_mask(batch["mask"], self.vae_scale))
        guidance = None
        if self.model.transformer.config.guidance_embeds:
            guidance = torch.full((b,), cfg.guidance, device=dev)
        return {
            "hidden_states": inp.to(dev),
            "encoder_hidden_states": embeds.to(dev),
            "pooled_projections": pooled.to(dev),
            "timestep": t.to(dev),
            "img_ids": latent_image_ids(h, w, dev),
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=dev),
            "guidance": guidance,
            "task_ids": batch["tasks"].to(dev),
            "token_mask": right_half_token_mask(h, w, dev),
            "target": target.to(dev),
            "latent_hw": (h, w),
        }

    def contrastive(self, feats: list[torch.Tensor], tasks: torch.Tensor) -> torch.Tensor:
        acc, cfg = self.accelerator, self.cfg
        gather = acc.gather if acc.num_processes > 1 else None
        return gathered_contrastive_loss(
            feats, tasks, gather, acc.process_index, cfg.contrastive_tau, cfg.contrastive_variant
        )

    def train_step(self, record_usage: bool = False) -> dict:
        """One optimizer step (with gradient accumulation); returns the scalars to log."""
        acc, cfg = self.accelerator, self.cfg
        use_con = cfg.contrastive_weight > 0
        sums = {"loss": 0.0, "flow": 0.0, "contrastive": 0.0}
        self.model.context.record_usage = record_usage
        self.model.context.usage = None
        for _ in range(cfg.gradient_accumulation_steps):
            first = self.batches_done * self.group + self.accelerator.process_index * cfg.batch_size
            batch = self.next_batch()
            inputs = self.model_inputs(batch, first)
            target = inputs.pop("target")
            inputs.pop("latent_hw")
            with acc.accumulate(self.ddp_model), acc.autocast():
                pred, feats = self.ddp_model(**inputs, capture=use_con)
                flow = masked_mse(pred, target, inputs["token_mask"])
                con = self.contrastive(feats, inputs["task_ids"]) if use_con else flow.new_zeros(())
                loss = flow + cfg.contrastive_weight * con
                acc.backward(loss)
                if acc.sync_gradients and cfg.grad_clip > 0:
                    # FSDP computes the global norm only when handed the wrapped model's parameters
                    params = (
                        self.ddp_model.parameters()
                        if ckpt.engine_kind(acc) == "fsdp"
                        else self.model.trainable_parameters()
                    )
                    acc.clip_grad_norm_(params, cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            n = cfg.gradient_accumulation_steps
            sums["loss"] += loss.item() / n
            sums["flow"] += flow.item() / n
            sums["contrastive"] += con.item() / n
        self.scheduler.step()
        self.step += 1
        self.model.context.record_usage = False
        # the logged loss is the mean over processes
        vals = torch.tensor([sums["loss"], sums["flow"], sums["contrastive"]], device=self.device)
        vals = acc.reduce(vals, reduction="mean")
        out = {
            "step": self.step,
            "loss": vals[0].item(),
            "flow": vals[1].item(),
            "contrastive": vals[2].item(),
        }
        out["lr"] = self.scheduler.get_last_lr()[0]
        if record_usage and self.model.context.usage is not None:
            usage = acc.reduce(self.model.context.usage, reduction="sum")
            out["usage"] = usage.cpu()
        return out

    # -- saving --------------------------------------------------------------------------------------

    def adapter_state(self) -> dict[str, torch.Tensor] | None:
        """Full trained tensors on the main process, None elsewhere (collective)."""
        return ckpt.gather_adapter_state(self.accelerator, self.ddp_model, self.model, self.adapter_names)

    def export(self, folder: str, state: dict[str, torch.Tensor]) -> str:
        """Write the adapter in our format from :meth:`adapter_state`'s tensors (main process)."""
        from types import SimpleNamespace

        path = os.path.join(folder, self.cfg.output_name + ".safetensors")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            self.cfg.save_dtype
        ]

        def moe(name: str, module):
            p = f"transformer.{name}.moe."
            return SimpleNamespace(
                config=module.config,
                forced_weights=module.forced_weights,
                **{k: state.get(p + k) for k in MOE_TENSORS},
            )

        plain = set(self.placement.plain_modules)
        adapters = [
            MoEAdapter(name, w.apply_mode, moe(name, w.moe))
            for name, w in self.model.adapted.items()
            if name not in plain
        ]
        plain_loras = {}
        for name in self.placement.plain_modules:
            m = moe(name, self.model.adapted[name].moe)
            plain_loras[name] = (m.lora_A[0], m.lora_B[0], m.config.alpha)
        te = state.get("task_embedding.weight")
        meta = {
            "x2edit.preset": self.cfg.preset,
            "x2edit.train_step": str(self.step),
            "x2edit.base_model": "FLUX.1-Fill-dev",
        }
        save_moe_lora(
            path,
            adapters,
            plain=plain_loras,
            task_embedding=te,
            task_names=list(TASK_NAMES[: self.cfg.num_tasks]) if te is not None else None,
            extra_metadata=meta,
            dtype=dtype,
        )
        return path

    def train_state(self) -> dict:
        return {
            "batches_done": self.batches_done,
            "num_workers": self.cfg.num_workers,
            "tracker": self.tracker.state_dict(),
            "preset": self.cfg.preset,
        }

    def save_checkpoint(self) -> str:
        return ckpt.save_checkpoint(
            self.accelerator,
            self.cfg.output_dir,
            self.step,
            self.adapter_state(),
            self.optimizer,
            self.scheduler,
            self.generator,
            self.train_state(),
            self.export,
            self.cfg.keep_last,
        )

    def resume(self) -> bool:
        path = ckpt.find_resume(self.cfg.output_dir, self.cfg.resume)
        if path is None:
            return False
        state = ckpt.load_checkpoint(
            self.accelerator, path, self.model, self.optimizer, self.scheduler, self.generator
        )
        if state.get("preset") != self.cfg.preset:
            raise ConfigError(
                f"{path} was trained with preset {state.get('preset')!r}, not {self.cfg.preset!r}"
            )
        if state.get("num_workers", self.cfg.num_workers) != self.cfg.num_workers:
            raise ConfigError(
                f"{path} was written with --num-workers {state['num_workers']}; resume with the same "
                "number so the batches continue in the same order"
            )
        self.step = int(state["step"])
        self.batches_done = int(state["batches_done"])
        self.tracker.load_state_dict(state["tracker"])
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # -- the loop ------------------------------------------------------------------------------------

    def _log(self, out: dict):
        if not self.accelerator.is_main_process:
            return
        rec = {k: v for k, v in out.items() if k != "usage"}
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.writer is not None:
            s = out["step"]
            self.writer.add_scalar("loss/total", out["loss"], s)
            self.writer.add_scalar("loss/flow", out["flow"], s)
            self.writer.add_scalar("loss/contrastive", out["contrastive"], s)
            self.writer.add_scalar("lr", out["lr"], s)
            self.writer.add_scalar("data/bad_records", self.tracker.count, s)
            if "usage" in out:
                for t, row in enumerate(out["usage"]):
                    total = float(row.sum())
                    if total == 0:
                        continue
                    name = TASK_NAMES[t] if t < len(TASK_NAMES) else str(t)
                    for e, c in enumerate(row.tolist()):
                        self.writer.add_scalar(f"expert_usage/{t:02d}_{name}/expert_{e:02d}", c / total, s)

    def run(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        os.makedirs(cfg.output_dir, exist_ok=True)
        if acc.is_main_process:
            _setup_logging(os.path.join(cfg.output_dir, "train.log"))
            with open(os.path.join(cfg.output_dir, "config.json"), "w", encoding="utf-8") as fh:
                json.dump(cfg.to_dict(), fh, indent=1)
        resumed = self.resume()
        if acc.is_main_process and not resumed and os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)
        if acc.is_main_process and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(cfg.output_dir, "logs"))
        log.info(
            "preset %s: %d adapted layers, %.2fM trainable parameters, %d data shards (%s), %d processes "
            "x %d loader workers",
            cfg.preset,
            len(self.model.adapted),
            self.num_trainable / 1e6,
            len(self.shards),
            self.make_stream().split,
            acc.num_processes,
            cfg.num_workers,
        )
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not (acc.is_main_process and cfg.progress),
            desc=f"x2edit-train {cfg.preset}",
            unit="step",
        )
        self.ddp_model.train()
        start, start_step = time.time(), self.step
        sample_batch = None
        while self.step < cfg.max_steps:
            usage = cfg.usage_every > 0 and (self.step + 1) % cfg.usage_every == 0
            out = self.train_step(record_usage=usage)
            self.history.append(out)
            if cfg.log_every > 0 and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps) or usage:
                self._log(out)
            elapsed = time.time() - start
            bar.set_postfix(
                loss=f"{out['loss']:.4f}",
                con=f"{out['contrastive']:.3f}",
                sps=f"{(self.step - start_step) / max(elapsed, 1e-9):.2f}",
            )
            bar.update(1)
            if cfg.sample_every > 0 and self.step % cfg.sample_every == 0 and self.latent_encoder is not None:
                if sample_batch is None:
                    raw = self.make_stream().first_batch()
                    raw.pop("stats"), raw.pop("passes")
                    sample_batch = self.model_batch(raw)
                self.sample(sample_batch)
            if (
                cfg.checkpoint_every > 0
                and self.step % cfg.checkpoint_every == 0
                and self.step < cfg.max_steps
            ):
                self.save_checkpoint()
        bar.close()
        self._loader_iter = None  # shuts the loader workers down
        final = None
        if self.step > start_step or not resumed:
            self.save_checkpoint()
        self.tracker.check()
        state = self.adapter_state()
        if acc.is_main_process:
            final = self.export(cfg.output_dir, state)
            log.info("wrote %s (%d bad records skipped)", final, self.tracker.count)
            if self.writer is not None:
                self.writer.close()
        acc.wait_for_everyone()
        return {
            "output": final,
            "history": self.history,
            "bad_records": self.tracker.count,
            "step": self.step,
        }

    # -- sample edits --------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, batch: dict):
        """Euler-sample the edited half for ``batch`` and save source | edit | target as a PNG.

        Every process samples through the prepared model (under FSDP each forward gathers the
        sharded parameters, so all processes must take part); the main process saves its grid.
        """
        inputs = self.model_inputs(batch, first_sample=-(10**9))  # a stream apart from training's
        h, w = inputs.pop("latent_hw")
        inputs.pop("target")
        self.ddp_model.eval()
        try:
            with self.accelerator.autocast():
                x = euler_edit(self.ddp_model, inputs, batch["x0"].shape[1] * 4, self.cfg.sample_steps)
        finally:
            self.ddp_model.train()
        if not self.accelerator.is_main_process:
            return
        img = self.latent_encoder.decode(unpack_latents(x, h, w))
        ref = self.latent_encoder.decode(batch["x0"].to(x.device))
        half = img.shape[-1] // 2
        grid = torch.cat([ref[..., :half], img[..., half:], ref[..., half:]], dim=-1)
        grid = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        from PIL import Image

        folder = os.path.join(self.cfg.output_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        rows = torch.cat(list(grid), dim=1).permute(1, 2, 0).contiguous().numpy()
        Image.fromarray(rows).save(os.path.join(folder, f"step-{self.step:08d}.png"))
        if self.writer is not None:
            self.writer.add_image("samples", torch.cat(list(grid), dim=1), self.step)


@torch.no_grad()
def euler_edit(
    model: EditModel, inputs: dict, packed_channels: int, steps: int, seed: int = 0
) -> torch.Tensor:
    """Sample the packed latents from noise with Euler steps on sigmas 1 -> 0 (the Fill conditioning of
    ``inputs["hidden_states"]`` is kept); returns [B, N, packed_channels]."""
    inputs = dict(inputs)
    inputs.pop("target", None)
    inputs.pop("latent_hw", None)
    cond = inputs["hidden_states"][..., packed_channels:]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cond.shape[0], cond.shape[1], packed_channels, generator=gen).to(cond)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        inputs["hidden_states"] = torch.cat([x, cond], dim=-1)
        inputs["timestep"] = torch.full((x.shape[0],), float(sigmas[i]), device=x.device)
        v, _ = model(**inputs)
        x = x + (sigmas[i + 1] - sigmas[i]) * v.float()
    return x


def _setup_logging(path: str):
    if any(
        isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(path) for h in log.handlers
    ):
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
