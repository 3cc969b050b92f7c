"""X2Edit's condition stream over a FLUX transformer in the BFL module layout (pure torch).

X2Edit conditions FLUX.1 on the source image EasyControl-style: the VAE latent of the source is packed
2x2 like the noisy latent, embedded with the same ``img_in``, and run through every block as a third
group of tokens with the *image-stream* weights. The differences from the noisy tokens:

- their modulation vector is built with timestep 0 (same guidance and pooled text vector);
- their RoPE positions are (0, y + offset, x) on their own token grid, the noisy ones (0, y, x), the
  text ones zeros; ``offset`` is 128 for the 1024 checkpoint and 64 for the 512 one;
- attention is joint over [text | noisy | condition] in double and single blocks, without a mask;
- they keep their own residual stream through all blocks and are dropped after the last single block.

The functions here take the host's modules through the BFL layout that ComfyUI's FLUX uses
(``img_in``, ``time_in``, ``double_blocks[i].img_mod/img_attn.qkv/...``, ``single_blocks[i].linear1``)
and the host's attention (q, k, v [B, heads, L, head_dim], RoPE table -> [B, L, heads * head_dim]), so
every Linear is called as the host's own forward would call it: patched Linear forwards (task-routed
MoE-LoRA adapters, quantised weights, LoRA weight patches) see the condition tokens exactly where X2Edit
puts its adapters (double blocks: image-stream q/k/v and the attention output projection; single blocks:
``linear1`` over all tokens).

Timesteps: FLUX embeds ``1000 * t``. X2Edit's bf16 pipeline rounds the scheduler's timestep to bf16,
divides by 1000 in bf16 and multiplies back in bf16 inside the transformer (sigma 0.75 is embedded as
752), and embeds ``bf16(bf16(guidance) * 1000)``; ``reference_rounding`` reproduces both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import ModelMismatchError

LATENT_PATCH = 2  # FLUX packs 2x2 latent pixels into one token


def pack_latent(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] (H, W even) -> [B, H/2 * W/2, C * 4], channel-major inside each 2x2 patch."""
    b, c, h, w = latent.shape
    if h % LATENT_PATCH or w % LATENT_PATCH:
        raise ValueError(f"latent {h}x{w} is not a multiple of {LATENT_PATCH}")
    x = latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def grid_ids(
    rows: int, cols: int, batch: int, row_offset: float = 0.0, axes: int = 3, device=None, dtype=None
):
    """RoPE ids [batch, rows * cols, axes]: (0, y + row_offset, x), row-major like the packed tokens."""
    ids = torch.zeros(rows, cols, axes, device=device, dtype=dtype or torch.float32)
    ids[..., 1] = torch.arange(rows, device=device, dtype=ids.dtype)[:, None] + row_offset
    ids[..., 2] = torch.arange(cols, device=device, dtype=ids.dtype)[None, :]
    return ids.reshape(1, rows * cols, axes).expand(batch, -1, -1)


def condition_ids(latent_height: int, latent_width: int, batch: int, offset: int, **kw) -> torch.Tensor:
    """Condition-token ids (0, y + offset, x) for a latent of ``latent_height`` x ``latent_width``."""
    rows, cols = -(-latent_height // LATENT_PATCH), -(-latent_width // LATENT_PATCH)
    return grid_ids(rows, cols, batch, float(offset), **kw)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16)


def reference_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The number X2Edit's bf16 pipeline embeds for ``sigma`` (already times 1000), as float32."""
    t = _bf16(sigma.float() * 1000.0)  # scheduler timestep cast to the latents' dtype
    t = t / 1000.0  # the pipeline passes timestep / 1000 (bf16 arithmetic)
    return (_bf16(t) * 1000.0).float()  # the transformer casts to its dtype and multiplies by 1000


def reference_guidance(guidance: torch.Tensor) -> torch.Tensor:
    """The number X2Edit's bf16 transformer embeds for a guidance scale (already times 1000)."""
    return (_bf16(guidance.float()) * 1000.0).float()


@dataclass
class StreamInputs:
    """Everything one call of the X2Edit transformer needs, already packed (tokens) and on device."""

    img: torch.Tensor  # [B, N, C*4] noisy tokens
    img_ids: torch.Tensor  # [B, N, axes]
    cond: torch.Tensor  # [B, M, C*4] condition tokens
    cond_ids: torch.Tensor  # [B, M, axes]
    txt: torch.Tensor  # [B, T, context]
    txt_ids: torch.Tensor  # [B, T, axes]
    timesteps: torch.Tensor  # [B] sigma in 0..1
    y: torch.Tensor | None  # [B, pooled]
    guidance: torch.Tensor | None  # [B]


def check_flux_layout(dm) -> None:
    """Refuse models whose blocks are not FLUX.1's (global modulation, SiLU/Yak MLPs, ...)."""
    for attr in (
        "img_in",
        "time_in",
        "txt_in",
        "double_blocks",
        "single_blocks",
        "final_layer",
        "pe_embedder",
    ):
        if not hasattr(dm, attr):
            raise ModelMismatchError(
                f"X2Edit's condition stream needs a FLUX.1 model (dev, schnell or a fine-tune); this model "
                f"({type(dm).__name__}) has no {attr}"
            )
    params = getattr(dm, "params", None)
    if getattr(params, "global_modulation", False) or getattr(params, "yak_mlp", False):
        raise ModelMismatchError(
            "X2Edit's condition stream needs FLUX.1 blocks with their own modulation; this FLUX variant "
            "(global modulation or gated MLPs, e.g. Chroma or FLUX.2) is not what X2Edit was trained on"
        )
    if getattr(dm, "txt_norm", None) is not None:
        raise ModelMismatchError(
            "X2Edit's condition stream needs FLUX.1; this model normalises its text input"
        )
    if getattr(params, "mlp_silu_act", False):
        raise ModelMismatchError(
            "X2Edit's condition stream needs FLUX.1's GELU MLPs; this model uses SiLU MLPs"
        )


def _modulate(x: torch.Tensor, mod) -> torch.Tensor:
    return torch.addcmul(mod.shift, x, 1 + mod.scale)


def _heads(qkv: torch.Tensor, num_heads: int):
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def _clamp16(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float16:
        return torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x


Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def double_block(block, img, cond, txt, vec, vec_cond, pe, attention: Attention):
    """One double block over [text | noisy | condition]; returns (img, cond, txt)."""
    n = img.shape[1]
    img_mod1, img_mod2 = block.img_mod(vec)
    cond_mod1, cond_mod2 = block.img_mod(vec_cond)
    txt_mod1, txt_mod2 = block.txt_mod(vec)

    stream = torch.cat(
        (_modulate(block.img_norm1(img), img_mod1), _modulate(block.img_norm1(cond), cond_mod1)), 1
    )
    img_q, img_k, img_v = _heads(block.img_attn.qkv(stream), block.num_heads)
    img_q, img_k = block.img_attn.norm(img_q, img_k, img_v)

    txt_q, txt_k, txt_v = _heads(
        block.txt_attn.qkv(_modulate(block.txt_norm1(txt), txt_mod1)), block.num_heads
    )
    txt_q, txt_k = block.txt_attn.norm(txt_q, txt_k, txt_v)

    attn = attention(
        torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2), pe
    )
    t = txt.shape[1]
    txt_attn, stream_attn = attn[:, :t], attn[:, t:]

    proj = block.img_attn.proj(stream_attn)  # X2Edit's output adapter sees noisy and condition tokens
    img = img + img_mod1.gate * proj[:, :n]
    cond = cond + cond_mod1.gate * proj[:, n:]
    mlp_in = torch.cat(
        (_modulate(block.img_norm2(img), img_mod2), _modulate(block.img_norm2(cond), cond_mod2)), 1
    )
    mlp = block.img_mlp(mlp_in)
    img = img + img_mod2.gate * mlp[:, :n]
    cond = cond + cond_mod2.gate * mlp[:, n:]

    txt = txt + txt_mod1.gate * block.txt_attn.proj(txt_attn)
    txt = txt + txt_mod2.gate * block.txt_mlp(_modulate(block.txt_norm2(txt), txt_mod2))
    return img, cond, _clamp16(txt)


def single_block(block, x, cond, vec, vec_cond, pe, attention: Attention):
    """One single block over [text + noisy (x) | condition]; returns (x, cond)."""
    n = x.shape[1]
    mod, _ = block.modulation(vec)
    cond_mod, _ = block.modulation(vec_cond)
    hidden = block.hidden_size
    mlp_width = getattr(block, "mlp_hidden_dim_first", block.mlp_hidden_dim)
    stream = torch.cat((_modulate(block.pre_norm(x), mod), _modulate(block.pre_norm(cond), cond_mod)), 1)
    qkv, mlp = torch.split(block.linear1(stream), [3 * hidden, mlp_width], dim=-1)
    q, k, v = _heads(qkv, block.num_heads)
    q, k = block.norm(q, k, v)
    attn = attention(q, k, v, pe)
    out = block.linear2(torch.cat((attn, block.mlp_act(mlp)), 2))
    x = x + mod.gate * out[:, :n]
    cond = cond + cond_mod.gate * out[:, n:]
    return _clamp16(x), _clamp16(cond)


def modulation_vectors(dm, inputs: StreamInputs, embed, dtype, reference_rounding: bool = False):
    """(vec at t, vec at t = 0): time + guidance + pooled-text embeddings, as FLUX builds them.

    ``embed(t)`` is the host's sinusoidal embedding of an already scaled timestep (FLUX: 256 channels).
    """
    t = inputs.timesteps
    t_scaled = reference_timestep(t) if reference_rounding else t.float() * 1000.0
    both = torch.cat((t_scaled, torch.zeros_like(t_scaled)))  # one pass for noisy and condition tokens
    vec = dm.time_in(embed(both).to(dtype))
    if getattr(dm.params, "guidance_embed", False) and inputs.guidance is not None:
        g = reference_guidance(inputs.guidance) if reference_rounding else inputs.guidance.float() * 1000.0
        vec = vec + dm.guidance_in(embed(torch.cat((g, g))).to(dtype))
    if getattr(dm, "vector_in", None) is not None:
        y = inputs.y
        if y is None:
            y = torch.zeros((t.shape[0], dm.params.vec_in_dim), device=vec.device, dtype=dtype)
        y = y[:, : dm.params.vec_in_dim]
        vec = vec + dm.vector_in(torch.cat((y, y)))
    b = t.shape[0]
    return vec[:b], vec[b:]


def x2edit_forward(
    dm,
    inputs: StreamInputs,
    embed: Callable[[torch.Tensor], torch.Tensor],
    attention: Attention,
    reference_rounding: bool = False,
    control: dict | None = None,
    on_block: Callable[[], None] | None = None,
) -> torch.Tensor:
    """The X2Edit transformer: noisy-token predictions [B, N, out] (condition tokens dropped).

    ``control`` takes ControlNet residuals as FLUX does (``input`` per double block and ``output`` per
    single block, added to the noisy tokens). ``on_block`` is called after every block (interrupts).
    """
    img = dm.img_in(inputs.img)
    cond = dm.img_in(inputs.cond.to(inputs.img.dtype))
    vec, vec_cond = modulation_vectors(dm, inputs, embed, img.dtype, reference_rounding)
    txt = dm.txt_in(inputs.txt)
    ids = torch.cat((inputs.txt_ids, inputs.img_ids, inputs.cond_ids.to(inputs.img_ids)), 1)
    pe = dm.pe_embedder(ids)

    for i, block in enumerate(dm.double_blocks):
        img, cond, txt = double_block(block, img, cond, txt, vec, vec_cond, pe, attention)
        if control is not None and i < len(control.get("input") or ()):
            add = control["input"][i]
            if add is not None:
                img[:, : add.shape[1]] += add
        if on_block is not None:
            on_block()
    img = _clamp16(img)

    t = txt.shape[1]
    x = torch.cat((txt, img), 1)
    for i, block in enumerate(dm.single_blocks):
        x, cond = single_block(block, x, cond, vec, vec_cond, pe, attention)
        if control is not None and i < len(control.get("output") or ()):
            add = control["output"][i]
            if add is not None:
                x[:, t : t + add.shape[1]] += add
        if on_block is not None:
            on_block()
    return dm.final_layer(x[:, t:], vec)
