"""Tiny randomly initialised models for tests (needs only torch and safetensors).

- FLUX transformer in ComfyUI/BFL key layout (`img_in`, `double_blocks.N.img_attn.qkv`, ...), in the
  dev, Fill (96 input channels) and Kontext (same weights layout as dev) variants.
- A 16-channel VAE in ComfyUI's TAESD layout (`taesd_encoder.*`, `taesd_decoder.*`, `vae_scale`,
  `vae_shift`), which ComfyUI's VAELoader loads from `models/vae/` without any hook. The full
  AutoencoderKL has hard-coded widths (about 84M parameters), too big for fast tests.
- A plain diffusers/PEFT LoRA for the tiny FLUX (the ICEdit "normal LoRA" targets).

ComfyUI's model detection hard-codes FLUX widths; the test support pack
(`tests/comfy/support_pack`) reads them from the tensor shapes instead, with the RoPE axes split
given by `flux_axes_dim`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

FLUX_VARIANT_IN_CHANNELS = {"dev": 16, "kontext": 16, "fill": 96}


@dataclass(frozen=True)
class TinyFluxConfig:
    """Widths of a tiny FLUX; the names follow ComfyUI's FluxParams."""

    in_channels: int = 16  # latent channels before 2x2 packing (16 dev/Kontext, 96 Fill)
    out_channels: int = 16
    vec_in_dim: int = 16  # pooled text width (768 in FLUX.1)
    context_in_dim: int = 32  # text token width (4096 in FLUX.1)
    hidden_size: int = 64
    mlp_ratio: float = 4.0
    num_heads: int = 2
    depth: int = 2  # double blocks
    depth_single_blocks: int = 2
    guidance_embed: bool = True  # dev-style (guidance_in present)
    patch_size: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def axes_dim(self) -> list[int]:
        return flux_axes_dim(self.head_dim)


def flux_axes_dim(head_dim: int) -> list[int]:
    """RoPE split of one head over (index, row, column) axes, scaled from FLUX.1's [16, 56, 56] of 128.

    Every part must be even (ComfyUI's rope asserts it) and the parts must sum to the head width.
    """
    if head_dim % 4 != 0 or head_dim < 8:
        raise ValueError(f"head dim {head_dim} must be a multiple of 4 and at least 8 for a 3-axis RoPE")
    first = max(2, 2 * round(head_dim / 16))
    rest = head_dim - first
    if rest % 4 != 0:
        first += 2
        rest -= 2
    return [first, rest // 2, rest // 2]


def tiny_flux_config(variant: str = "dev", **overrides) -> TinyFluxConfig:
    """Config of a tiny FLUX variant: "dev", "kontext" (same layout as dev) or "fill" (96 channels)."""
    if variant not in FLUX_VARIANT_IN_CHANNELS:
        raise ValueError(f"unknown FLUX variant {variant!r}; use one of {sorted(FLUX_VARIANT_IN_CHANNELS)}")
    config = TinyFluxConfig(in_channels=FLUX_VARIANT_IN_CHANNELS[variant])
    return replace(config, **overrides)


def _linear(prefix: str, out_dim: int, in_dim: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.weight": (out_dim, in_dim)}
    if bias:
        shapes[f"{prefix}.bias"] = (out_dim,)
    return shapes


def flux_key_shapes(config: TinyFluxConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a FLUX state dict in ComfyUI's (BFL) layout."""
    h, mlp, hd = config.hidden_size, config.mlp_hidden_dim, config.head_dim
    p2 = config.patch_size * config.patch_size
    shapes: dict[str, tuple[int, ...]] = {}
    shapes |= _linear("img_in", h, config.in_channels * p2)
    for name, in_dim in [("time_in", 256), ("vector_in", config.vec_in_dim)]:
        shapes |= _linear(f"{name}.in_layer", h, in_dim) | _linear(f"{name}.out_layer", h, h)
    if config.guidance_embed:
        shapes |= _linear("guidance_in.in_layer", h, 256) | _linear("guidance_in.out_layer", h, h)
    shapes |= _linear("txt_in", h, config.context_in_dim)
    for i in range(config.depth):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}"
            shapes |= _linear(f"{b}_mod.lin", 6 * h, h)
            shapes |= _linear(f"{b}_attn.qkv", 3 * h, h)
            shapes[f"{b}_attn.norm.query_norm.scale"] = (hd,)
            shapes[f"{b}_attn.norm.key_norm.scale"] = (hd,)
            shapes |= _linear(f"{b}_attn.proj", h, h)
            shapes |= _linear(f"{b}_mlp.0", mlp, h) | _linear(f"{b}_mlp.2", h, mlp)
    for i in range(config.depth_single_blocks):
        b = f"single_blocks.{i}"
        shapes |= _linear(f"{b}.linear1", 3 * h + mlp, h) | _linear(f"{b}.linear2", h, h + mlp)
        shapes[f"{b}.norm.query_norm.scale"] = (hd,)
        shapes[f"{b}.norm.key_norm.scale"] = (hd,)
        shapes |= _linear(f"{b}.modulation.lin", 3 * h, h)
    shapes |= _linear("final_layer.linear", p2 * config.out_channels, h)
    shapes |= _linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name.endswith("_norm.scale"):
        # RMSNorm gains near 1 so attention logits stay in a normal range.
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=generator)
    std = 1.0 / math.sqrt(shape[1])
    if "mod.lin" in name or "modulation" in name:
        # Small modulation keeps the (1 + scale) and gate terms near their neutral values.
        std *= 0.3
    return std * torch.randn(shape, generator=generator)


def tiny_flux_state_dict(
    config: TinyFluxConfig | None = None, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random FLUX weights (fixed seed, fan-in scaled so outputs are finite and O(1))."""
    config = config or tiny_flux_config()
    generator = torch.Generator().manual_seed(seed)
    shapes = flux_key_shapes(config)
    return {
        name: _random_tensor(name, shapes[name], generator).to(dtype).contiguous() for name in sorted(shapes)
    }


def write_tiny_flux(
    path: str | Path,
    variant: str = "dev",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Path:
    """Write a tiny FLUX variant ("dev", "kontext", "fill") as a safetensors file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = tiny_flux_config(variant, **overrides)
    save_file(tiny_flux_state_dict(config, seed=seed, dtype=dtype), str(path))
    return path


# --- VAE (ComfyUI TAESD layout; conv widths fixed at 64 by ComfyUI's comfy/taesd/taesd.py) ---

TAESD_WIDTH = 64
_TAESD_BLOCKS_ENCODER = {1, 3, 4, 5, 7, 8, 9, 11, 12, 13}
_TAESD_BLOCKS_DECODER = {3, 4, 5, 8, 9, 10, 13, 14, 15, 18}


def _conv_shapes(prefix: str, n_in: int, n_out: int, bias: bool = True, kernel: int = 3) -> dict:
    shapes = {f"{prefix}.weight": (n_out, n_in, kernel, kernel)}
    if bias:
        shapes[f"{prefix}.bias"] = (n_out,)
    return shapes


def _block_shapes(prefix: str) -> dict:
    w = TAESD_WIDTH
    return (
        _conv_shapes(f"{prefix}.conv.0", w, w)
        | _conv_shapes(f"{prefix}.conv.2", w, w)
        | _conv_shapes(f"{prefix}.conv.4", w, w)
    )


def taesd_key_shapes(latent_channels: int = 16) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a ComfyUI TAESD VAE file with `latent_channels` channels."""
    w = TAESD_WIDTH
    shapes: dict[str, tuple[int, ...]] = {}
    enc = "taesd_encoder"
    shapes |= _conv_shapes(f"{enc}.0", 3, w)
    for i in (2, 6, 10):
        shapes |= _conv_shapes(f"{enc}.{i}", w, w, bias=False)
    for i in sorted(_TAESD_BLOCKS_ENCODER):
        shapes |= _block_shapes(f"{enc}.{i}")
    shapes |= _conv_shapes(f"{enc}.14", w, latent_channels)
    dec = "taesd_decoder"
    shapes |= _conv_shapes(f"{dec}.1", latent_channels, w)
    for i in (7, 12, 17):
        shapes |= _conv_shapes(f"{dec}.{i}", w, w, bias=False)
    for i in sorted(_TAESD_BLOCKS_DECODER):
        shapes |= _block_shapes(f"{dec}.{i}")
    shapes |= _conv_shapes(f"{dec}.19", w, 3)
    return shapes


def tiny_vae_state_dict(latent_channels: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random TAESD-layout VAE: 8x down/up-sampling, `latent_channels` latent channels (16 = FLUX)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = taesd_key_shapes(latent_channels)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith(".bias"):
            state[name] = 0.01 * torch.randn(shape, generator=generator)
            if name == "taesd_decoder.19.bias":
                state[name] += 0.5  # TAESD maps decoder output d to 2 * d - 1: centre images on grey
            continue
        fan_in = shape[1] * shape[2] * shape[3]
        gain = math.sqrt(2.0)  # ReLU networks
        if ".conv.4." in name:
            # Last conv of each residual block: small, so the ten residual blocks do not blow up.
            gain = 0.3
        if name.startswith("taesd_decoder.19."):
            gain = 0.5  # decoded image mostly inside [-1, 1] rather than saturated
        state[name] = gain / math.sqrt(fan_in) * torch.randn(shape, generator=generator)
    state["vae_scale"] = torch.tensor(1.0)
    state["vae_shift"] = torch.tensor(0.0)
    return {k: v.contiguous() for k, v in state.items()}


def write_tiny_vae(path: str | Path, latent_channels: int = 16, seed: int = 0) -> Path:
    """Write the tiny VAE as safetensors (for ComfyUI's `models/vae/`); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_vae_state_dict(latent_channels, seed), str(path))
    return path


# --- plain LoRA in diffusers/PEFT naming for the tiny FLUX ---

# diffusers module -> (BFL key it maps onto, input width, output width) as functions of the config.
ICEDIT_LORA_DOUBLE_TARGETS = (
    "norm1.linear",
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "ff.net.2",
)
ICEDIT_LORA_SINGLE_TARGETS = ("norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")


def flux_lora_target_dims(config: TinyFluxConfig, block_kind: str, target: str) -> tuple[int, int]:
    """(in_features, out_features) of a diffusers FLUX module; block_kind "double", "single" or "top"."""
    h, mlp = config.hidden_size, config.mlp_hidden_dim
    dims = {
        ("top", "x_embedder"): (config.in_channels * config.patch_size**2, h),
        ("double", "norm1.linear"): (h, 6 * h),
        ("double", "norm1_context.linear"): (h, 6 * h),
        ("double", "attn.to_q"): (h, h),
        ("double", "attn.to_k"): (h, h),
        ("double", "attn.to_v"): (h, h),
        ("double", "attn.to_out.0"): (h, h),
        ("double", "ff.net.0.proj"): (h, mlp),
        ("double", "ff.net.2"): (mlp, h),
        ("single", "norm.linear"): (h, 3 * h),
        ("single", "proj_mlp"): (h, mlp),
        ("single", "proj_out"): (h + mlp, h),
        ("single", "attn.to_q"): (h, h),
        ("single", "attn.to_k"): (h, h),
        ("single", "attn.to_v"): (h, h),
    }
    try:
        return dims[(block_kind, target)]
    except KeyError:
        raise ValueError(f"no tiny FLUX LoRA target {target!r} in {block_kind} blocks") from None


def tiny_flux_lora_state_dict(
    config: TinyFluxConfig | None = None,
    rank: int = 4,
    seed: int = 0,
    scale: float = 0.05,
    double_targets: tuple[str, ...] = ICEDIT_LORA_DOUBLE_TARGETS,
    single_targets: tuple[str, ...] = ICEDIT_LORA_SINGLE_TARGETS,
    include_x_embedder: bool = True,
) -> dict[str, torch.Tensor]:
    """Plain LoRA with keys `transformer.<module>.lora_A.weight` [rank, in] / `.lora_B.weight` [out, rank].

    Both factors are non-zero (unlike a fresh PEFT LoRA) so the LoRA visibly changes outputs.
    """
    config = config or tiny_flux_config("fill")
    generator = torch.Generator().manual_seed(seed)
    modules: list[tuple[str, str, str]] = []
    if include_x_embedder:
        modules.append(("x_embedder", "top", "x_embedder"))
    for i in range(config.depth):
        modules += [(f"transformer_blocks.{i}.{t}", "double", t) for t in double_targets]
    for i in range(config.depth_single_blocks):
        modules += [(f"single_transformer_blocks.{i}.{t}", "single", t) for t in single_targets]
    state = {}
    for module, kind, target in modules:
        in_dim, out_dim = flux_lora_target_dims(config, kind, target)
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(
            (rank, in_dim), generator=generator
        ) / math.sqrt(in_dim)
        state[f"transformer.{module}.lora_B.weight"] = scale * torch.randn(
            (out_dim, rank), generator=generator
        )
    return state


def write_tiny_flux_lora(path: str | Path, config: TinyFluxConfig | None = None, **kwargs) -> Path:
    """Write `tiny_flux_lora_state_dict(config, **kwargs)` as safetensors; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_flux_lora_state_dict(config, **kwargs), str(path))
    return path


# --- FLUX as GGUF (the layout ComfyUI-GGUF's UnetLoaderGGUF reads) ---

# As ComfyUI-GGUF's converter does: 1-D tensors and tensors of at most this many values stay F32.
GGUF_KEEP_F32_MAX_VALUES = 1024


def gguf_tensor_types(state_dict: dict[str, torch.Tensor], qtype_name: str) -> dict[str, str]:
    """GGML type name per tensor: `qtype_name` for weights whose rows split into whole quant blocks,
    F32 for 1-D and small tensors, F16 for the rest."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    types = {}
    for name, tensor in state_dict.items():
        if tensor.dim() <= 1 or tensor.numel() <= GGUF_KEEP_F32_MAX_VALUES:
            types[name] = "F32"
        elif tensor.shape[-1] % block_size == 0:
            types[name] = qtype_name
        else:
            types[name] = "F16"
    return types


def write_flux_gguf(path: str | Path, state_dict: dict[str, torch.Tensor], qtype_name: str = "Q8_0") -> Path:
    """Write a BFL-layout FLUX state dict as a GGUF file (architecture "flux", tensor names unchanged,
    weights quantized to `qtype_name`, e.g. Q8_0, Q5_0, Q4_0; see `gguf_tensor_types`)."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    types = gguf_tensor_types(state_dict, qtype_name)
    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name in sorted(state_dict):
        qtype = gguf.GGMLQuantizationType[types[name]]
        data = state_dict[name].detach().to(torch.float32).numpy()
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
