"""Where adapters go: diffusers FLUX module names, and their place in ComfyUI's (BFL) fused layers.

Adapters are named by the diffusers ``FluxTransformer2DModel`` module they modify (the naming of
ICEdit, X2Edit and our training). ComfyUI's Flux fuses some of those modules: double-block
``attn.to_q/k/v`` are row slices of ``img_attn.qkv``; single-block ``attn.to_q/k/v`` and ``proj_mlp`` are
row slices of ``linear1``. :func:`comfy_target` maps one onto the other.

An adapter is applied either to the module *input* (``apply="input"``: out = base(x) + delta(x), the
usual LoRA) or to its *output* (``apply="output"``: h = base(x); out = h + delta(h), X2Edit's residual
adapter after the attention output projection).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ModelMismatchError

APPLY_INPUT = "input"
APPLY_OUTPUT = "output"

# Fused-row parts: name -> (index among the equal hidden-size slices; None = the MLP rest of linear1)
_PARTS = {"q": 0, "k": 1, "v": 2, "mlp": None}

_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", "q"),
    "attn.to_k": ("img_attn.qkv", "k"),
    "attn.to_v": ("img_attn.qkv", "v"),
    "attn.add_q_proj": ("txt_attn.qkv", "q"),
    "attn.add_k_proj": ("txt_attn.qkv", "k"),
    "attn.add_v_proj": ("txt_attn.qkv", "v"),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
}
_SINGLE = {
    "attn.to_q": ("linear1", "q"),
    "attn.to_k": ("linear1", "k"),
    "attn.to_v": ("linear1", "v"),
    "proj_mlp": ("linear1", "mlp"),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}
_BLOCK_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ComfyTarget:
    """A ComfyUI Flux Linear (path under ``diffusion_model``) and, for fused layers, the part it is."""

    module: str
    part: str | None = None  # "q", "k", "v", "mlp" or None for the whole layer

    def row_slice(self, hidden_size: int, out_features: int) -> slice:
        """Output rows of the fused layer this part covers."""
        if self.part is None:
            return slice(0, out_features)
        index = _PARTS[self.part]
        if index is None:
            return slice(3 * hidden_size, out_features)
        return slice(index * hidden_size, (index + 1) * hidden_size)


def comfy_target(diffusers_module: str) -> ComfyTarget:
    """Map a diffusers FLUX transformer module name to the ComfyUI Flux layer (and fused part)."""
    name = diffusers_module.removeprefix("transformer.")
    m = _BLOCK_RE.match(name)
    if m:
        kind, index, rest = m.groups()
        table, prefix = (
            (_DOUBLE, "double_blocks") if kind == "transformer_blocks" else (_SINGLE, "single_blocks")
        )
        if rest in table:
            module, part = table[rest]
            return ComfyTarget(f"{prefix}.{index}.{module}", part)
    top = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear"}
    if name in top:
        return ComfyTarget(top[name])
    raise ModelMismatchError(
        f"{diffusers_module!r} is not a FLUX transformer layer this pack can place an adapter on"
    )


def icedit_moe_modules(num_double: int = 19, num_single: int = 38) -> list[str]:
    """ICEdit's 57 MoE layers: double-block ``ff.net.2`` and single-block ``proj_out``."""
    return [f"transformer_blocks.{i}.ff.net.2" for i in range(num_double)] + [
        f"single_transformer_blocks.{i}.proj_out" for i in range(num_single)
    ]


def icedit_plain_modules(num_double: int = 19, num_single: int = 38) -> list[str]:
    """ICEdit's plain-LoRA targets (besides the MoE layers)."""
    mods = ["x_embedder"]
    for i in range(num_double):
        mods += [f"transformer_blocks.{i}.{s}" for s in ("norm1.linear", "attn.to_q", "attn.to_k")]
        mods += [f"transformer_blocks.{i}.{s}" for s in ("attn.to_v", "attn.to_out.0")]
    for i in range(num_single):
        mods += [f"single_transformer_blocks.{i}.{s}" for s in ("norm.linear", "proj_mlp")]
        mods += [f"single_transformer_blocks.{i}.attn.{s}" for s in ("to_q", "to_k", "to_v")]
    return mods


def x2edit_moe_sites(num_double: int = 19, num_single: int = 38) -> list[tuple[str, str]]:
    """X2Edit's MoE placement as (diffusers module, apply): q/k/v everywhere, proj output in double blocks."""
    sites = []
    for i in range(num_double):
        sites += [(f"transformer_blocks.{i}.attn.to_{p}", APPLY_INPUT) for p in "qkv"]
        sites.append((f"transformer_blocks.{i}.attn.to_out.0", APPLY_OUTPUT))
    for i in range(num_single):
        sites += [(f"single_transformer_blocks.{i}.attn.to_{p}", APPLY_INPUT) for p in "qkv"]
    return sites
