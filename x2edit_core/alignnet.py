"""X2Edit's text AlignNet (X2I's projector): all hidden states of a VLM -> FLUX text conditioning.

Input: the stacked hidden states of the VLM, [B, S, L, H] (S states: the embedding output, every
decoder layer's output and the final-norm output; L tokens; H the VLM width). Maths:

    x      = Conv2d(S -> 1, kernel k, padding k // 2)(states)      # over (tokens x width), squeezed
    x      = LayerNorm(H, eps)(x)
    embeds = Linear(D -> D, no bias)(GELU(Linear(H -> D, no bias)(x)))   # [B, L, D], FLUX context
    pooled = mean over tokens of Linear(D -> P)(GELU(embeds))            # [B, P], FLUX pooled vector

GELU is the exact (erf) form. For X2Edit on Qwen2.5-VL-7B: S 29, H 3584, D 4096, P 768, k 5,
eps 1e-6 (about 34.6M parameters). Every width is read from the weights, so other VLMs and tiny
test versions load the same way.

State-dict keys: ``conv.{weight,bias}``, ``mlp.layernorm.{weight,bias}``, ``mlp.projector.0.weight``,
``mlp.projector.2.weight``, ``mlp.fc.1.{weight,bias}``. Files: X2Edit's ``diffusion_pytorch_model.bin``
(a raw state dict, possibly with ``module.`` prefixes from distributed training) or X2I's wrapped
``{"config": ..., "state_dict": ...}`` (e.g. ``qwen2.5-vl-7b_proj.pt``); pickles are read with
``torch.load(weights_only=True)`` only. A ``.safetensors`` file with the same keys is read too.
"""

from __future__ import annotations

import os
import pickle

import torch
from torch import nn

from .errors import FormatError

ALIGNNET_FILE = "diffusion_pytorch_model.bin"
DEFAULT_LAYER_NORM_EPS = 1e-6

_REQUIRED = (
    "conv.weight",
    "conv.bias",
    "mlp.layernorm.weight",
    "mlp.layernorm.bias",
    "mlp.projector.0.weight",
    "mlp.projector.2.weight",
    "mlp.fc.1.weight",
    "mlp.fc.1.bias",
)
# Keys of X2I projector variants that are not the conv AlignNet X2Edit uses.
_OTHER_VARIANTS = {"t5stack.": "a T5 stack", "cha_scale": "a per-state scale instead of the conv"}


class _AlignMLP(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, pooled_dim: int, eps: float):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim, eps=eps)
        self.projector = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim, bias=False),
        )
        self.fc = nn.Sequential(nn.GELU(), nn.Linear(hidden_dim, pooled_dim))


class AlignNet(nn.Module):
    """Conv over the stacked hidden states, then LayerNorm + 2-layer MLP (embeds) and a pooled head."""

    def __init__(
        self,
        num_states: int = 29,
        in_dim: int = 3584,
        out_dim: int = 4096,
        pooled_dim: int = 768,
        kernel_size: int = 5,
        eps: float = DEFAULT_LAYER_NORM_EPS,
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"AlignNet kernel size must be odd (same-size padding), got {kernel_size}")
        self.conv = nn.Conv2d(num_states, 1, kernel_size=kernel_size, padding=kernel_size // 2)
        self.mlp = _AlignMLP(in_dim, out_dim, pooled_dim, eps)

    @property
    def num_states(self) -> int:
        return self.conv.in_channels

    @property
    def in_dim(self) -> int:
        return self.mlp.layernorm.normalized_shape[0]

    @property
    def out_dim(self) -> int:
        return self.mlp.projector[2].out_features

    @property
    def pooled_dim(self) -> int:
        return self.mlp.fc[1].out_features

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states [B, S, L, H] -> (prompt embeds [B, L, D], pooled [B, P])."""
        if states.dim() != 4 or states.shape[1] != self.num_states or states.shape[3] != self.in_dim:
            raise ValueError(
                f"AlignNet expects stacked hidden states [batch, {self.num_states}, tokens, {self.in_dim}], "
                f"got {tuple(states.shape)}: the VLM does not match this AlignNet (other model size or "
                "layer count)"
            )
        x = self.conv(states).squeeze(1)
        x = self.mlp.layernorm(x)
        embeds = self.mlp.projector(x)
        pooled = self.mlp.fc(embeds).mean(dim=1)
        return embeds, pooled


def _strip_prefix(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        new = key[len("module.") :] if key.startswith("module.") else key
        if new in out:
            raise FormatError(f"AlignNet: key {new!r} appears twice (with and without 'module.')")
        out[new] = value
    return out


def _read_file(path: str) -> tuple[dict, dict]:
    """(state dict, config) from any supported file; config is {} for raw state dicts."""
    name = os.path.basename(path)
    if path.endswith(".safetensors"):
        from .safetensors_io import load_file

        return load_file(path)[0], {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as e:
        raise FormatError(
            f"{name}: not a plain tensor checkpoint (refused to unpickle it; only weights_only=True "
            f"loading is allowed): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    if not isinstance(obj, dict):
        raise FormatError(f"{name}: expected an AlignNet state dict, got {type(obj).__name__}")
    config = {}
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        config = obj.get("config") or {}
        if not isinstance(config, dict):
            raise FormatError(
                f"{name}: 'config' of the wrapped AlignNet is {type(config).__name__}, not a dict"
            )
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(obj):
        bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))[:5]
        raise FormatError(f"{name}: entries that are not tensors: {bad}")
    return tensors, config


def alignnet_from_state_dict(
    state_dict: dict, config: dict | None = None, source: str = "AlignNet"
) -> AlignNet:
    """Build an :class:`AlignNet` whose widths are read from the weights; shapes are checked."""
    config = config or {}
    for flag, variant in (("use_t5", "a T5 stack"), ("use_scale", "a per-state scale instead of the conv")):
        if config.get(flag):
            raise FormatError(
                f"{source}: this projector uses {variant}; X2Edit's AlignNet is the conv variant"
            )
    if config.get("use_cnn") is False:
        raise FormatError(f"{source}: this projector has no conv (use_cnn False); X2Edit's AlignNet has one")
    sd = _strip_prefix(state_dict)
    for prefix, variant in _OTHER_VARIANTS.items():
        if any(k.startswith(prefix) for k in sd):
            raise FormatError(
                f"{source}: this projector has {variant}; X2Edit's AlignNet is the conv variant"
            )
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise FormatError(
            f"{source}: not an X2Edit AlignNet: missing {missing} (found {sorted(sd)[:8]}"
            f"{' ...' if len(sd) > 8 else ''})"
        )
    extra = sorted(set(sd) - set(_REQUIRED))
    if extra:
        raise FormatError(f"{source}: unexpected keys for an X2Edit AlignNet: {extra[:8]}")

    def shape_error(key, want):
        return FormatError(
            f"{source}: tensor {key!r} has shape {tuple(sd[key].shape)}, expected {want} "
            "(inconsistent AlignNet widths: damaged file or another projector)"
        )

    conv = sd["conv.weight"]
    if conv.dim() != 4 or conv.shape[0] != 1 or conv.shape[2] != conv.shape[3] or conv.shape[2] % 2 != 1:
        raise shape_error("conv.weight", "(1, states, k, k) with k odd")
    num_states, kernel = conv.shape[1], conv.shape[2]
    if "kernel_size" in config and int(config["kernel_size"]) != kernel:
        raise FormatError(
            f"{source}: config kernel_size {config['kernel_size']} but conv.weight is {kernel}x{kernel}"
        )
    if "in_channels" in config and int(config["in_channels"]) != num_states:
        raise FormatError(
            f"{source}: config in_channels {config['in_channels']} but conv.weight has {num_states}"
        )
    if tuple(sd["conv.bias"].shape) != (1,):
        raise shape_error("conv.bias", (1,))
    ln = sd["mlp.layernorm.weight"]
    if ln.dim() != 1:
        raise shape_error("mlp.layernorm.weight", "(width,)")
    in_dim = ln.shape[0]
    if tuple(sd["mlp.layernorm.bias"].shape) != (in_dim,):
        raise shape_error("mlp.layernorm.bias", (in_dim,))
    p0 = sd["mlp.projector.0.weight"]
    if p0.dim() != 2 or p0.shape[1] != in_dim:
        raise shape_error("mlp.projector.0.weight", ("out", in_dim))
    out_dim = p0.shape[0]
    if tuple(sd["mlp.projector.2.weight"].shape) != (out_dim, out_dim):
        raise shape_error("mlp.projector.2.weight", (out_dim, out_dim))
    fc = sd["mlp.fc.1.weight"]
    if fc.dim() != 2 or fc.shape[1] != out_dim:
        raise shape_error("mlp.fc.1.weight", ("pooled", out_dim))
    pooled_dim = fc.shape[0]
    if tuple(sd["mlp.fc.1.bias"].shape) != (pooled_dim,):
        raise shape_error("mlp.fc.1.bias", (pooled_dim,))
    eps = float(config.get("norm_eps", DEFAULT_LAYER_NORM_EPS))
    dtype = p0.dtype if p0.is_floating_point() else torch.float32
    with torch.device("meta"):
        net = AlignNet(num_states, in_dim, out_dim, pooled_dim, kernel, eps)
    net.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    return net.eval().requires_grad_(False)


def load_alignnet(path: str) -> AlignNet:
    """Read an AlignNet file (X2Edit's raw state dict, X2I's wrapped form or safetensors)."""
    if not os.path.isfile(path):
        raise FormatError(f"{path}: no such AlignNet file")
    state_dict, config = _read_file(path)
    return alignnet_from_state_dict(state_dict, config, source=os.path.basename(path))
