"""The trained model: a frozen diffusers FLUX.1 Fill transformer with MoE-LoRA adapters injected.

Each adapted ``nn.Linear`` is replaced by :class:`AdaptedLinear`, which calls the frozen base layer
and adds the delta of an ``x2edit_core.moe.MoELoRA`` (the one MoE implementation shared with the
nodes). ``apply="input"`` gives ``base(x) + delta(x)``; ``apply="output"`` gives
``h = base(x); h + delta(h)`` (X2Edit's residual adapter after the attention output projection).
Plain LoRA parts are MoELoRAs with one expert and forced routing, i.e. exactly ``B A x * alpha/r``.

Per-sample task embeddings reach the task-aware routers through a shared :class:`AdapterContext`
that :class:`EditModel` fills before each forward (a module attribute rather than an argument,
because the diffusers blocks do not pass extra arguments down to their Linear layers).
Forward hooks on the double blocks capture the image-stream outputs of the edited tokens for the
contrastive loss.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from x2edit_core.errors import ConfigError, FormatError
from x2edit_core.formats import MoEAdapter
from x2edit_core.moe import ROUTER_FORCED, MoEConfig, MoELoRA
from x2edit_core.placement import APPLY_INPUT, APPLY_OUTPUT

from .presets import Placement

# diffusers config of black-forest-labs/FLUX.1-Fill-dev (transformer/config.json): 384 input channels
# = packed noisy latents (64) + packed masked-image latents (64) + packed 8x8 pixel mask (256).
FLUX_FILL_CONFIG = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 384,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "out_channels": 64,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}


def load_transformer(path: str = "", config: str | dict | None = None, dtype=torch.float32):
    """A FluxTransformer2DModel from a diffusers folder, a single .safetensors file, or a config only.

    ``config`` is a dict, a config.json path or a diffusers folder; with no ``path`` the model is
    built with random weights (tests, benchmarks).
    """
    from diffusers import FluxTransformer2DModel

    if path and os.path.isdir(path):
        sub = os.path.join(path, "transformer")
        folder = sub if os.path.isfile(os.path.join(sub, "config.json")) else path
        return FluxTransformer2DModel.from_pretrained(folder, torch_dtype=dtype)
    cfg = _read_config(config)
    model = FluxTransformer2DModel(**cfg).to(dtype)
    if path:
        if not os.path.isfile(path):
            raise FormatError(
                f"transformer {path!r} does not exist; give a diffusers folder or a .safetensors file"
            )
        from safetensors.torch import load_file

        state = load_file(path)
        if any("double_blocks." in k for k in state):  # BFL / ComfyUI layout
            from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

            state = convert_flux_transformer_checkpoint_to_diffusers(state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise FormatError(
                f"{os.path.basename(path)} does not fit the transformer config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]} (pass the matching --transformer-config)"
            )
        model.to(dtype)
    return model


def _read_config(config) -> dict:
    if config is None or config == "":
        return dict(FLUX_FILL_CONFIG)
    if isinstance(config, dict):
        cfg = dict(config)
    else:
        p = os.path.join(config, "config.json") if os.path.isdir(config) else config
        with open(p, encoding="utf-8") as fh:
            cfg = json.load(fh)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


class AdapterContext:
    """Per-forward state shared by all adapters of one model."""

    def __init__(self, num_tasks: int = 0):
        self.task_embedding: torch.Tensor | None = None  # [B, D], one row per sample
        self.task_ids: torch.Tensor | None = None  # [B]
        self.num_tasks = num_tasks
        self.record_usage = False
        self.usage: torch.Tensor | None = None  # [num_tasks, E] routed-slot counts, summed over layers


class AdaptedLinear(nn.Module):
    """A frozen nn.Linear plus an MoE-LoRA delta on its input or its output."""

    def __init__(self, base: nn.Linear, moe: MoELoRA, apply: str, context: AdapterContext):
        super().__init__()
        if apply not in (APPLY_INPUT, APPLY_OUTPUT):
            raise ConfigError(f"unknown apply mode {apply!r}")
        self.base = base
        self.moe = moe
        self.apply_mode = apply  # not "apply": that would hide nn.Module.apply (DeepSpeed calls it)
        self._context = [context]  # in a list so it is not registered or saved
        self.strength = 1.0
        self.enabled = True

    @property
    def context(self) -> AdapterContext:
        return self._context[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if not self.enabled:
            return h
        src = x if self.apply_mode == APPLY_INPUT else h
        ctx = self.context
        task = ctx.task_embedding if self.moe.config.router == "task" else None
        if ctx.record_usage and self.moe.router_weight is not None and ctx.task_ids is not None:
            self._record_usage(src, task, ctx)
        return h + self.moe(src, task, self.strength).to(h.dtype)

    @torch.no_grad()
    def _record_usage(self, src, task, ctx):
        _, index = self.moe.route(src.detach(), None if task is None else task.detach())
        e = self.moe.config.num_experts
        per_sample = torch.nn.functional.one_hot(index.reshape(index.shape[0], -1), e).sum(1).float()
        if ctx.usage is None or ctx.usage.shape[1] != e:
            ctx.usage = torch.zeros(ctx.num_tasks, e, device=per_sample.device)
        ctx.usage.index_add_(0, ctx.task_ids.to(per_sample.device), per_sample)


def _get_parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


class EditModel(nn.Module):
    """Frozen FLUX Fill transformer + adapters + task embedding; the module the trainer optimises."""

    def __init__(self, transformer: nn.Module, placement: Placement, num_tasks: int = 16, seed: int = 0):
        super().__init__()
        self.transformer = transformer
        self.placement = placement
        transformer.requires_grad_(False)
        inner_dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        self.context = AdapterContext(num_tasks)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # adapter init independent of anything drawn before
        try:
            self.task_embedding = nn.Embedding(num_tasks, inner_dim) if placement.task_embedding else None
            self.adapted: dict[str, AdaptedLinear] = {}
            for module, apply in placement.moe_sites:
                self._inject(module, apply, placement.moe_config)
            if placement.plain_modules:
                plain_cfg = MoEConfig(1, placement.plain_rank, placement.plain_alpha, router=ROUTER_FORCED)
                for module in placement.plain_modules:
                    self._inject(module, APPLY_INPUT, plain_cfg)
        finally:
            torch.random.set_rng_state(gen_state)
        self.capture = False
        self.features: dict[int, torch.Tensor] = {}
        for i, block in enumerate(transformer.transformer_blocks):
            block.register_forward_hook(self._capture_hook(i))

    def _inject(self, name: str, apply: str, config: MoEConfig):
        base = self.transformer.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise ConfigError(
                f"{name} is a {type(base).__name__}, not a Linear layer; adapters wrap Linear layers"
            )
        width = base.in_features if apply == APPLY_INPUT else base.out_features
        p = next(base.parameters())
        moe = MoELoRA(width, base.out_features, config, device=p.device, dtype=torch.float32)
        wrapper = AdaptedLinear(base, moe, apply, self.context)
        parent, child = _get_parent(self.transformer, name)
        setattr(parent, child, wrapper)
        self.adapted[name] = wrapper

    def _capture_hook(self, index: int):
        def hook(module, args, output):
            # Only keep a reference here: any tensor op inside a checkpointed block would make the
            # recomputation (which runs this hook again, with capture off) save different tensors.
            if self.capture and index not in self.features:
                self.features[index] = output[1]  # image stream

        return hook

    # -- parameters --------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trained tensors (adapters + task embedding), for checkpoints."""
        names = {id(p) for p in self.trainable_parameters()}
        return {k: v for k, v in self.named_parameters() if id(v) in names}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]):
        own = dict(self.named_parameters())
        missing = [k for k in self.adapter_state_dict() if k not in state]
        if missing:
            raise FormatError(f"checkpoint lacks {len(missing)} adapter tensors, e.g. {missing[:3]}")
        with torch.no_grad():
            for k, v in state.items():
                if k not in own:
                    raise FormatError(f"checkpoint tensor {k!r} does not belong to this model/preset")
                own[k].copy_(v)

    def moe_adapters(self) -> list[MoEAdapter]:
        """Every adapter except the plain-LoRA parts (forced-routing MoE sites included)."""
        plain = set(self.placement.plain_modules)
        return [
            MoEAdapter(name, w.apply_mode, w.moe) for name, w in self.adapted.items() if name not in plain
        ]

    def plain_loras(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """The plain-LoRA parts as {module: (A [r, in], B [out, r], alpha)}."""
        return {
            name: (
                self.adapted[name].moe.lora_A[0],
                self.adapted[name].moe.lora_B[0],
                self.adapted[name].moe.config.alpha,
            )
            for name in self.placement.plain_modules
        }

    def set_adapters_enabled(self, enabled: bool):
        for w in self.adapted.values():
            w.enabled = enabled

    # -- forward -----------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states,
        encoder_hidden_states,
        pooled_projections,
        timestep,
        img_ids,
        txt_ids,
        guidance=None,
        task_ids=None,
        token_mask=None,
        capture: bool = False,
    ):
        """Returns (prediction [B, N, out], captured double-block features list or [])."""
        ctx = self.context
        ctx.task_ids = task_ids
        ctx.task_embedding = None
        if self.task_embedding is not None:
            if task_ids is None:
                raise ConfigError("the task-aware preset needs task ids for every sample")
            ctx.task_embedding = self.task_embedding(task_ids)
        self.capture = capture
        self.features = {}
        try:
            pred = self.transformer(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance,
                return_dict=False,
            )[0]
            feats = []
            if capture:
                mask = None if token_mask is None else token_mask.to(pred.device)
                feats = [
                    self.features[i] if mask is None else self.features[i][:, mask]
                    for i in sorted(self.features)
                ]
        finally:
            self.capture = False
            self.features = {}
        return pred, feats


# -- FLUX Fill inputs ------------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C] (2x2 patches, diffusers' FLUX packing)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ConfigError(f"latent size {h}x{w} must be even (image sides must be multiples of 16)")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for latent size h x w."""
    b, n, c4 = packed.shape
    x = packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def latent_image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """RoPE ids [h/2 * w/2, 3] = (0, row, column) of the packed latent grid."""
    rows = torch.arange(h // 2, device=device).view(-1, 1).expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device).view(1, -1).expand(h // 2, w // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return ids.reshape(-1, 3).float()


def pack_mask(mask: torch.Tensor, vae_scale: int) -> torch.Tensor:
    """Pixel mask [B, 1, H, W] -> packed Fill mask channels [B, N, 4 * vae_scale^2] (as FluxFillPipeline)."""
    b, _, hh, ww = mask.shape
    h, w = hh // vae_scale, ww // vae_scale
    m = (
        mask.view(b, h, vae_scale, w, vae_scale)
        .permute(0, 2, 4, 1, 3)
        .reshape(b, vae_scale * vae_scale, h, w)
    )
    return pack_latents(m)


def right_half_token_mask(h: int, w: int, device=None) -> torch.Tensor:
    """Bool [h/2 * w/2]: the packed tokens of the right half (the edited image) of a diptych latent."""
    cols = torch.arange(w // 2, device=device).view(1, -1).expand(h // 2, w // 2)
    return (cols >= (w // 4)).reshape(-1)


def fill_model_input(x_t_packed, masked_packed, mask_packed) -> torch.Tensor:
    """Channel concat (noisy, masked-image latents, mask) as the Fill transformer expects."""
    return torch.cat([x_t_packed, masked_packed, mask_packed.to(x_t_packed.dtype)], dim=-1)


def fill_in_channels(latent_channels: int, vae_scale: int) -> int:
    return 8 * latent_channels + 4 * vae_scale * vae_scale
