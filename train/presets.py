"""Presets: ICEdit's and X2Edit's adapter recipes, and custom placement.

- ``icedit``: 4 experts of rank 32 (alpha 32), token top-1 routing on the double-block ``ff.net.2``
  and single-block ``proj_out``; a plain rank-32 LoRA on ICEdit's other targets; text dropout 10%;
  no task embedding or contrastive loss.
- ``x2edit``: 12 experts + 1 shared, rank 64 (alpha 64), task-aware top-2 routing (no
  renormalisation) on q/k/v of every block and on the output of the double-block attention output
  projection; a 16-row task embedding as wide as the model; contrastive loss weight 0.2, tau 0.5.
- ``custom``: placement from ``moe_targets`` / ``plain_targets`` patterns; every adapter option
  must then be given (or takes the generic defaults below).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

from torch import nn

from x2edit_core.errors import ConfigError
from x2edit_core.moe import MoEConfig
from x2edit_core.placement import (
    APPLY_INPUT,
    APPLY_OUTPUT,
    icedit_moe_modules,
    icedit_plain_modules,
    x2edit_moe_sites,
)

PRESET_DEFAULTS = {
    "icedit": dict(
        num_experts=4,
        rank=32,
        router="token",
        top_k=1,
        shared_expert="no",
        plain_rank=32,
        contrastive_weight=0.0,
        text_dropout=0.1,
    ),
    "x2edit": dict(
        num_experts=12,
        rank=64,
        router="task",
        top_k=2,
        shared_expert="yes",
        plain_rank=0,
        contrastive_weight=0.2,
        text_dropout=0.0,
    ),
    "custom": dict(
        num_experts=4,
        rank=16,
        router="token",
        top_k=1,
        shared_expert="no",
        plain_rank=16,
        contrastive_weight=0.0,
        text_dropout=0.0,
    ),
}
_UNSET = {"num_experts": 0, "rank": 0, "router": "", "top_k": 0, "shared_expert": "", "plain_rank": 0}


def apply_preset(cfg):
    """Copy of ``cfg`` with the preset's values wherever the field was left unset."""
    if cfg.preset not in PRESET_DEFAULTS:
        raise ConfigError(f"unknown preset {cfg.preset!r}; choose icedit, x2edit or custom")
    values = {}
    for name, value in PRESET_DEFAULTS[cfg.preset].items():
        current = getattr(cfg, name)
        unset = current == _UNSET[name] if name in _UNSET else current < 0
        values[name] = value if unset else current
    if cfg.preset == "custom" and not cfg.moe_targets and not cfg.plain_targets:
        raise ConfigError("the custom preset needs --moe-targets and/or --plain-targets")
    out = dataclasses.replace(cfg, **values)
    if out.alpha <= 0:
        out.alpha = float(out.rank)
    if out.plain_alpha <= 0:
        out.plain_alpha = float(out.plain_rank)
    return out


@dataclass
class Placement:
    """Resolved adapter placement for one model."""

    moe_sites: list[tuple[str, str]]  # (module, apply)
    moe_config: MoEConfig
    plain_modules: list[str]
    plain_rank: int
    plain_alpha: float
    task_embedding: bool

    @property
    def active_rank(self) -> int:
        """Rank a token sees in each MoE layer: top-k experts plus the shared one."""
        c = self.moe_config
        k = c.num_experts if c.router == "forced" else c.top_k
        return c.rank * (k + int(c.shared_expert))


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _match(patterns: list[str], names: list[str], what: str) -> list[str]:
    out = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ConfigError(f"{what} pattern {pattern!r} matches no Linear layer of the model")
        out += [h for h in hits if h not in out]
    return out


def resolve_placement(cfg, model: nn.Module) -> Placement:
    """Placement of the (resolved) config's preset on ``model`` (a diffusers FluxTransformer2DModel)."""
    num_double = len(model.transformer_blocks)
    num_single = len(model.single_transformer_blocks)
    inner_dim = model.config.num_attention_heads * model.config.attention_head_dim
    task_aware = cfg.router == "task"
    moe_config = MoEConfig(
        num_experts=cfg.num_experts,
        rank=cfg.rank,
        alpha=cfg.alpha,
        router=cfg.router,
        top_k=cfg.top_k if cfg.router != "forced" else 1,
        shared_expert=cfg.shared_expert == "yes",
        task_dim=inner_dim if task_aware else 0,
    )
    names = _linear_names(model)
    if cfg.preset == "icedit":
        sites = [(m, APPLY_INPUT) for m in icedit_moe_modules(num_double, num_single)]
        plain = icedit_plain_modules(num_double, num_single) if cfg.plain_rank > 0 else []
    elif cfg.preset == "x2edit":
        sites = x2edit_moe_sites(num_double, num_single)
        plain = []
    else:
        sites = []
        for target in cfg.moe_targets:
            pattern, _, apply = target.partition("@")
            apply = apply or APPLY_INPUT
            if apply not in (APPLY_INPUT, APPLY_OUTPUT):
                raise ConfigError(f"moe target {target!r}: apply must be 'input' or 'output'")
            sites += [(m, apply) for m in _match([pattern], names, "moe target")]
        plain = _match(cfg.plain_targets, names, "plain target") if cfg.plain_rank > 0 else []
    moe_modules = {m for m, _ in sites}
    plain = [m for m in plain if m not in moe_modules]
    missing = [m for m in [*moe_modules, *plain] if m not in names]
    if missing:
        raise ConfigError(f"the model has no Linear layers named {missing[:5]} (is it a FLUX transformer?)")
    return Placement(sites, moe_config, plain, cfg.plain_rank, cfg.plain_alpha, task_aware)
