"""X2Edit's text encoder from a local transformers Qwen2.5-VL folder (no download).

Only the language model runs (the source image is not shown to the VLM). The attention mask and the
positions are the ones of ``x2edit_core.x2edit_text`` and are given to transformers explicitly, so the
result does not depend on how a transformers release or attention kernel treats fully padded rows.
transformers is imported only when an encoder is built.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from ..errors import ConfigError
from ..x2edit_text import TokenizedPrompt, attention_bias, position_ids


def _text_model(model):
    """The decoder stack of a Qwen2-VL / Qwen2.5-VL model across transformers releases."""
    inner = getattr(model, "model", model)
    text = getattr(inner, "language_model", None)
    if text is None and hasattr(inner, "layers"):
        text = inner
    if text is None or not hasattr(text, "layers"):
        raise ConfigError(f"{type(model).__name__}: no Qwen2.5-VL language model found in it")
    return text


class QwenVLTextEncoder:
    """All hidden states of a transformers Qwen2.5-VL text model for X2Edit prompts."""

    def __init__(
        self, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = "auto"
    ):
        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"Qwen2.5-VL folder {str(folder)!r} does not exist; give a local model folder.")
        try:
            import transformers
        except ImportError as err:  # pragma: no cover - transformers is a runtime dependency
            raise ConfigError("The Qwen2.5-VL folder path needs the 'transformers' package.") from err
        model_class = getattr(transformers, "Qwen2_5_VLForConditionalGeneration", None)
        if model_class is None:  # pragma: no cover - very old transformers
            raise ConfigError(f"transformers {transformers.__version__} has no Qwen2.5-VL; update it.")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            kwargs = {"local_files_only": True, "attn_implementation": "sdpa"}
            try:
                model = model_class.from_pretrained(folder, dtype=dtype, **kwargs)
            except TypeError:  # transformers before 4.56 names it torch_dtype
                model = model_class.from_pretrained(folder, torch_dtype=dtype, **kwargs)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"Could not load Qwen2.5-VL and its tokenizer from {str(folder)!r}: {err}. The folder needs "
                "config.json, the weights and the tokenizer files (as saved by save_pretrained)."
            ) from err
        self.model = model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.text_model = _text_model(self.model).to(self.device)
        self._inv_freq = {}  # rotary module -> its fp32 inverse frequencies

    def _set_rope_rounding(self, round_bf16: bool) -> None:
        for module in self.text_model.modules():
            inv = getattr(module, "inv_freq", None)
            if not isinstance(inv, torch.Tensor):
                continue
            if module not in self._inv_freq:
                self._inv_freq[module] = inv.detach().clone()
            base = self._inv_freq[module]
            new = base.to(torch.bfloat16).float() if round_bf16 else base
            module.inv_freq = new.to(inv.device)

    def hidden_states(self, prompt: TokenizedPrompt, round_rope_bf16: bool = False) -> torch.Tensor:
        """[1, layers + 1, L, width] in fp32 for one tokenised prompt."""
        ids = prompt.input_ids[None].to(self.device)
        mask = prompt.attention_mask[None].to(self.device)
        dtype = self.text_model.embed_tokens.weight.dtype
        pos = position_ids(mask)
        self._set_rope_rounding(round_rope_bf16)
        with torch.no_grad():
            out = self.text_model(
                input_ids=ids,
                attention_mask=attention_bias(mask, dtype),
                position_ids=pos[None].expand(3, -1, -1),
                output_hidden_states=True,
                use_cache=False,
                return_dict=True,
            )
        states = out.hidden_states
        if len(states) != len(self.text_model.layers) + 1:
            raise ConfigError(
                f"transformers returned {len(states)} hidden states for {len(self.text_model.layers)} layers"
            )
        return torch.stack([s.float() for s in states], dim=1)

    def release(self) -> None:
        """Drop the model (the node builds an encoder per run; the 7B model must not stay in memory)."""
        self.model = self.text_model = None
        self._inv_freq = {}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
