"""X2Edit's text path before the AlignNet: prompt, tokens, padding, attention mask, positions, RoPE.

X2Edit replaces FLUX's T5 and CLIP-L with Qwen2.5-VL-7B-Instruct run on text only (the source image is
not shown to the VLM). What the reference computes, and what this module reproduces:

- User message. Inference form (the default): the Python ``str()`` of the dict
  ``{"Text input": "", "Instruction editing description": <instruction>, "image input": "yes"}``.
  Training form: the raw instruction.
- Chat text: Qwen2.5-VL's chat format with its default system turn and the generation prompt
  (newlines written as \\n)::

      <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
      <|im_start|>user\\n{message}<|im_end|>\\n<|im_start|>assistant\\n

- Tokens: the Qwen2 tokenizer without added special tokens, truncated on the right to 512 tokens and
  left-padded to exactly 512 with ``<|endoftext|>`` (id 151643 in Qwen's vocabulary).
- Positions: ``cumsum(mask) - 1`` for real tokens; padding tokens get position 1 (transformers' rule for
  text-only Qwen2-VL/Qwen2.5-VL input with an attention mask).
- Attention: causal over the real tokens; a padding row, which sees no real key under that mask, is
  left fully unmasked (it attends to all 512 keys), as transformers' SDPA path does on CUDA, where the
  reference ran. A port that masks those rows gets NaN or zero rows instead, and the padding rows feed
  the AlignNet conv, the pooled mean and FLUX's attention, so they must match.
- Hidden states: all of them, stacked ``[B, layers + 1, 512, width]``: the embedding output, the output
  of every decoder layer but the last, and the final-norm output of the last layer.
- RoPE: optionally with the inverse frequencies rounded to bf16, as happens when the reference casts
  the whole Qwen model (buffers included) to bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOKENS = 512
PAD_TOKEN = "<|endoftext|>"
QWEN_PAD_ID = 151643
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

PROMPT_INFERENCE = "inference (dict)"
PROMPT_TRAINING = "training (raw)"
PROMPT_FORMS = (PROMPT_INFERENCE, PROMPT_TRAINING)


def user_message(instruction: str, form: str = PROMPT_INFERENCE) -> str:
    """The user turn's text for an instruction (exactly as the reference builds it)."""
    if form == PROMPT_INFERENCE:
        return str({"Text input": "", "Instruction editing description": instruction, "image input": "yes"})
    if form == PROMPT_TRAINING:
        return instruction
    raise ValueError(f"unknown prompt form {form!r}; expected one of {PROMPT_FORMS}")


def chat_text(message: str, system: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """Qwen2.5-VL's chat format: system turn, one user turn, generation prompt."""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{message}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@dataclass
class TokenizedPrompt:
    text: str  # the chat text that was tokenised
    input_ids: torch.Tensor  # [length], left-padded
    attention_mask: torch.Tensor  # [length], 1 for real tokens
    num_tokens: int  # real tokens kept
    truncated: int  # tokens cut off on the right (0 if the prompt fitted)


def pad_left(ids: list[int], length: int = MAX_TOKENS, pad_id: int = QWEN_PAD_ID) -> TokenizedPrompt:
    """Right-truncate to `length`, then left-pad with `pad_id` (text left empty)."""
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    ids = [int(i) for i in ids]
    kept = ids[:length]
    pad = length - len(kept)
    input_ids = torch.tensor([pad_id] * pad + kept, dtype=torch.long)
    mask = torch.tensor([0] * pad + [1] * len(kept), dtype=torch.long)
    return TokenizedPrompt("", input_ids, mask, len(kept), len(ids) - len(kept))


def pad_token_id(tokenizer) -> int:
    """The id of ``<|endoftext|>`` in `tokenizer` (Qwen's padding token)."""
    token_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    unk = getattr(tokenizer, "unk_token_id", None)
    if token_id is None or (unk is not None and token_id == unk):
        raise ValueError(f"the tokenizer has no {PAD_TOKEN} token: it is not a Qwen tokenizer")
    return int(token_id)


def tokenize_prompt(
    tokenizer,
    instruction: str,
    form: str = PROMPT_INFERENCE,
    length: int = MAX_TOKENS,
    system: str = DEFAULT_SYSTEM_PROMPT,
) -> TokenizedPrompt:
    """Instruction -> chat text -> tokens (no added special tokens) -> right-truncated, left-padded."""
    text = chat_text(user_message(instruction, form), system)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = pad_left(ids, length, pad_token_id(tokenizer))
    out.text = text
    return out


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L]: cumsum(mask) - 1 on real tokens, 1 on padding."""
    mask = attention_mask.long()
    pos = mask.cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, L] padding mask -> additive [B, 1, L, L] bias (0 = attend).

    Causal over real keys; a query row with no key left (every left-padding row) is fully unmasked.
    The blocked value is a quarter of the dtype's most negative number: exp() of it is exactly 0 in
    softmax, and unlike -inf it cannot produce NaN in any attention kernel.
    """
    mask = attention_mask.bool()
    length = mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    allowed = causal[None] & mask[:, None, :]  # [B, query, key]
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min / 4)
    return bias[:, None]


def rope_inv_freq(head_dim: int, theta: float, round_to: torch.dtype | None = None) -> torch.Tensor:
    """RoPE inverse frequencies in fp32, optionally rounded through `round_to` (e.g. torch.bfloat16)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if round_to is not None:
        inv_freq = inv_freq.to(round_to).float()
    return inv_freq


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, round_to: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, L] -> cos, sin [B, L, head_dim] in fp32 (angles repeated over both halves)."""
    inv_freq = rope_inv_freq(head_dim, theta, round_to).to(positions.device)
    angles = positions.float()[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()
