"""Test support for X2Edit's text path: a tiny random Qwen2.5-VL that ComfyUI can load too.

ComfyUI's Qwen2.5-VL-7B text encoder fixes head_dim 128 and the RoPE sections (16, 24, 24), and
Qwen's tokenizer needs the full vocabulary (152064), so the tiny model keeps those and shrinks the
rest: width 128 (one head), 3 layers. `comfy_state_dict` writes it in the key layout of
``qwen_2.5_vl_7b.safetensors``.

`reference_hidden_states` is the reference written from the facts, independent of x2edit_core: it
builds the left-padding mask, positions and the "fully masked row attends everywhere" rule itself and
runs transformers' own model with them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TINY_TEXT = dict(
    vocab_size=152064,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=1,
    num_key_value_heads=1,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    max_position_embeddings=4096,
)
# What ComfyUI's Qwen2.5-VL config needs overridden to build the same model.
COMFY_TINY_CONFIG = {
    k: TINY_TEXT[k]
    for k in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    )
}
PAD_ID = 151643
ENDOFTEXT = "<|endoftext|>"


def host_roots() -> list[Path]:
    base = Path(os.environ.get("X2EDIT_HOSTS_DIR") or Path.home() / ".cache" / "x2edit" / "hosts")
    return sorted(p for p in base.glob("ComfyUI-*") if (p / "main.py").is_file())


def qwen_tokenizer_dir() -> Path | None:
    """ComfyUI's Qwen2.5 tokenizer folder (COMFYUI_ROOT, else any host release); None if none."""
    roots = [Path(os.environ["COMFYUI_ROOT"])] if os.environ.get("COMFYUI_ROOT") else []
    roots += host_roots() + [Path("/opt/ComfyUI")]
    for root in roots:
        folder = root / "comfy" / "text_encoders" / "qwen25_tokenizer"
        if (folder / "vocab.json").is_file():
            return folder
    return None


def load_qwen_tokenizer(folder: Path):
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(str(folder))


def build_tiny_qwen25vl(seed: int = 0, num_layers: int = 3):
    """A random fp32 Qwen2_5_VLForConditionalGeneration with ComfyUI-compatible widths (eval mode)."""
    import transformers

    text = dict(TINY_TEXT, num_hidden_layers=num_layers)
    text.update(
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        bos_token_id=PAD_ID,
        eos_token_id=151645,
        pad_token_id=PAD_ID,
        tie_word_embeddings=True,
    )
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=text["hidden_size"],
        window_size=56,
        fullatt_block_indexes=[0],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    config = transformers.Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "visual" in name:
                continue
            if name.endswith("norm.weight"):  # not all ones, so a missed norm shows
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def text_model(model):
    inner = model.model
    return getattr(inner, "language_model", inner)


def comfy_state_dict(model) -> dict[str, torch.Tensor]:
    """The language model's weights in the key layout of ComfyUI's qwen_2.5_vl_7b.safetensors."""
    sd = {}
    for key, value in text_model(model).state_dict().items():
        if "rotary_emb" in key:
            continue
        sd[f"model.{key}"] = value.detach().clone().contiguous()
    return sd


def reference_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, round_bf16=False):
    """[B, layers + 1, L, H]: what X2Edit's reference computes, with transformers' own model.

    Positions: cumsum(mask) - 1 on real tokens, 1 on padding. Mask: causal and padding; a query row
    with nothing left to attend to attends to every key instead.
    """
    lm = text_model(model)
    positions = attention_mask.long().cumsum(-1) - 1
    positions[attention_mask == 0] = 1
    length = input_ids.shape[1]
    allowed = torch.ones(length, length).tril().bool()[None] & attention_mask.bool()[:, None, :]
    empty_rows = ~allowed.any(-1)
    allowed[empty_rows] = True
    bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]
    saved = {}
    if round_bf16:
        for m in lm.modules():
            if isinstance(getattr(m, "inv_freq", None), torch.Tensor):
                saved[m] = m.inv_freq
                m.inv_freq = m.inv_freq.to(torch.bfloat16).float()
    try:
        with torch.no_grad():
            out = lm(
                input_ids=input_ids,
                attention_mask=bias,
                position_ids=positions[None].expand(3, -1, -1),
                output_hidden_states=True,
                use_cache=False,
            )
    finally:
        for m, inv in saved.items():
            m.inv_freq = inv
    return torch.stack(out.hidden_states, dim=1)


def reference_alignnet(sd, states, eps=1e-6):
    """X2Edit's AlignNet in plain torch: conv(states -> 1, k5, pad 2) -> LayerNorm -> Linear -> GELU ->
    Linear = embeds; pooled = mean over tokens of Linear(GELU(embeds)) (with bias)."""
    import torch.nn.functional as F

    x = F.conv2d(states, sd["conv.weight"], sd["conv.bias"], padding=2)[:, 0]
    x = F.layer_norm(x, (x.shape[-1],), sd["mlp.layernorm.weight"], sd["mlp.layernorm.bias"], eps)
    embeds = F.linear(F.gelu(F.linear(x, sd["mlp.projector.0.weight"])), sd["mlp.projector.2.weight"])
    pooled = F.linear(F.gelu(embeds), sd["mlp.fc.1.weight"], sd["mlp.fc.1.bias"]).mean(dim=1)
    return embeds, pooled
