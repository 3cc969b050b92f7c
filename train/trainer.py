"""The training loop on Hugging Face accelerate: one process on CPU up to DDP / DeepSpeed / FSDP on GPUs."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import torch

from x2edit_core.errors import ConfigError
from x2edit_core.formats import save_moe_lora
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
    EditData,
    HashTextEncoder,
    LatentEncoder,
    epoch_plan,
    read_sources,
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

    return FluxTextEncoder(cfg.clip_path, cfg.t5_path, cfg.max_text_tokens, device=device)


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
        if vae is None and cfg.vae:
            self.latent_encoder = LatentEncoder.from_path(cfg.vae)
        else:
            self.latent_encoder = LatentEncoder(vae) if vae is not None else None
        if self.latent_encoder is not None:
            self.latent_encoder.vae.to(self.device)
            want = fill_in_channels(self.latent_encoder.latent_channels, self.latent_encoder.vae_scale)
            if transformer.config.in_channels != want:
                raise ConfigError(
                    f"the transformer takes {transformer.config.in_channels} input channels but this VAE "
                    "gives "
                    f"FLUX Fill inputs of {want}; use a FLUX.1 Fill transformer with its VAE"
                )
        self.text_encoder = (
            text_encoder if text_encoder is not None else make_text_encoder(cfg, transformer, self.device)
        )
        self.vae_scale = self.latent_encoder.vae_scale if self.latent_encoder else 8
        self.tracker = BadRecordTracker(max_fraction=cfg.max_bad_fraction)
        if not cfg.data:
            raise ConfigError("no training data: pass --data (JSONL, folders, tar shards or parquet)")
        records = read_sources(cfg.data, cfg.default_task, cfg.num_tasks, self.tracker)
        self.data = EditData(
            records,
            cfg.resolution,
            cfg.aspect_buckets,
            self.latent_encoder,
            self.text_encoder,
            self.tracker,
            cfg.cache_dir,
            cfg.cache_latents,
            cfg.cache_text,
        )
        self.group = cfg.batch_size * acc.num_processes
        if not epoch_plan(self.data.buckets, self.group, cfg.seed, 0):
            raise ConfigError(
                f"{len(records)} records cannot fill one global batch of {self.group} within a bucket; "
                "add data or lower --batch-size"
            )
        params = self.model.trainable_parameters()
        self.num_trainable = sum(p.numel() for p in params)
        self.optimizer = make_optimizer(cfg, params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, cfg.max_steps)
        )
        self.ddp_model, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.generator = torch.Generator().manual_seed(cfg.seed * 7919 + acc.process_index)
        self.step = 0
        self.epoch, self.position = 0, 0
        self.batches_done = 0  # global batches consumed: indexes the per-sample noise stream
        self._plan_cache: tuple[int, list] | None = None
        self.writer = None
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.history: list[dict] = []

    # -- data ---------------------------------------------------------------------------------------

    def _plan(self, epoch: int) -> list[list[int]]:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, epoch_plan(self.data.buckets, self.group, self.cfg.seed, epoch))
        return self._plan_cache[1]

    def next_batch(self) -> dict:
        plan = self._plan(self.epoch)
        if self.position >= len(plan):
            self.epoch, self.position = self.epoch + 1, 0
            plan = self._plan(self.epoch)
        global_batch = plan[self.position]
        self.position += 1
        self.batches_done += 1
        r, b = self.accelerator.process_index, self.cfg.batch_size
        return self.data.load_batch(global_batch[r * b : (r + 1) * b])

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
        prompts = ["" if d else p for d, p in zip(drop, batch["prompts"])]
        embeds, pooled = self.data.text(prompts)
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
                    acc.clip_grad_norm_(self.model.trainable_parameters(), cfg.grad_clip)
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

    def export(self, folder: str) -> str:
        path = os.path.join(folder, self.cfg.output_name + ".safetensors")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            self.cfg.save_dtype
        ]
        te = self.model.task_embedding.weight if self.model.task_embedding is not None else None
        meta = {
            "x2edit.preset": self.cfg.preset,
            "x2edit.train_step": str(self.step),
            "x2edit.base_model": "FLUX.1-Fill-dev",
        }
        save_moe_lora(
            path,
            self.model.moe_adapters(),
            plain=self.model.plain_loras(),
            task_embedding=te,
            task_names=list(TASK_NAMES[: self.cfg.num_tasks]) if te is not None else None,
            extra_metadata=meta,
            dtype=dtype,
        )
        return path

    def train_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "batches_done": self.batches_done,
            "bad_indices": sorted(self.data.bad_indices),
            "tracker": self.tracker.state_dict(),
            "preset": self.cfg.preset,
        }

    def save_checkpoint(self) -> str:
        return ckpt.save_checkpoint(
            self.accelerator,
            self.cfg.output_dir,
            self.step,
            self.model,
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
        self.step = int(state["step"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.batches_done = int(state["batches_done"])
        self.data.bad_indices = set(state["bad_indices"])
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
            "preset %s: %d adapted layers, %.2fM trainable parameters, %d records (%d bad), %d processes",
            cfg.preset,
            len(self.model.adapted),
            self.num_trainable / 1e6,
            len(self.data),
            self.tracker.count,
            acc.num_processes,
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
                    sample_batch = self.data.load_batch(self._plan(0)[0][: cfg.batch_size])
                self.sample(sample_batch)
            if (
                cfg.checkpoint_every > 0
                and self.step % cfg.checkpoint_every == 0
                and self.step < cfg.max_steps
            ):
                self.save_checkpoint()
        bar.close()
        final = None
        if self.step > start_step or not resumed:
            self.save_checkpoint()
        if acc.is_main_process:
            final = self.export(cfg.output_dir)
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
        """Euler-sample the edited half for ``batch`` and save source | edit | target as a PNG."""
        if not self.accelerator.is_main_process:
            return
        inputs = self.model_inputs(batch, first_sample=-(10**9))  # a stream apart from training's
        h, w = inputs.pop("latent_hw")
        inputs.pop("target")
        self.model.eval()
        try:
            x = euler_edit(self.model, inputs, batch["x0"].shape[1] * 4, self.cfg.sample_steps)
        finally:
            self.model.train()
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
