"""Test-only support for X2Edit's text path: a tiny-width Qwen2.5-VL through core CLIPLoader, and
nodes that write the text path's tensors for exact comparisons.

ComfyUI builds its Qwen2.5-VL-7B text encoder with fixed widths (3584 wide, 28 layers) and detects it by
the 7B's key/value width. The hook below reads the widths of a *tiny* Qwen2.5 text encoder (full
vocabulary, fewer and narrower layers, head_dim 128) from its tensor shapes and hands them to ComfyUI's
own model through its per-model config override; a real 7B file is left to ComfyUI untouched. It is
test support, not the thing under test: the text path itself (tokenizer, layers, attention, weights,
memory management) is ComfyUI's.
"""

from __future__ import annotations

import logging
import os
import sys

import comfy.sd
import folder_paths
import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)
QWEN25_7B_WIDTH = 3584
QWEN_HEAD_DIM = 128  # fixed in ComfyUI's Qwen2.5-VL config


def _tiny_qwen25_widths(state_dict):
    """ComfyUI config overrides for a tiny Qwen2.5 text encoder; None for anything else."""
    embed = state_dict.get("model.embed_tokens.weight")
    if embed is None or "model.layers.0.self_attn.k_proj.bias" not in state_dict:
        return None
    if embed.shape[1] == QWEN25_7B_WIDTH:
        return None
    layers = 0
    while f"model.layers.{layers}.input_layernorm.weight" in state_dict:
        layers += 1
    return {
        "vocab_size": embed.shape[0],
        "hidden_size": embed.shape[1],
        "intermediate_size": state_dict["model.layers.0.mlp.gate_proj.weight"].shape[0],
        "num_hidden_layers": layers,
        "num_attention_heads": state_dict["model.layers.0.self_attn.q_proj.weight"].shape[0] // QWEN_HEAD_DIM,
        "num_key_value_heads": state_dict["model.layers.0.self_attn.k_proj.weight"].shape[0] // QWEN_HEAD_DIM,
    }


_original_detect = getattr(comfy.sd.detect_te_model, "x2edit_test_original", comfy.sd.detect_te_model)
_original_load = getattr(
    comfy.sd.load_text_encoder_state_dicts, "x2edit_test_original", comfy.sd.load_text_encoder_state_dicts
)


def detect_te_model_with_tiny_qwen(sd):
    if _tiny_qwen25_widths(sd) is not None:
        return comfy.sd.TEModel.QWEN25_7B
    return _original_detect(sd)


def load_text_encoder_state_dicts_with_tiny_qwen(state_dicts=[], *args, **kwargs):  # noqa: B006 - ComfyUI's signature
    for sd in state_dicts:
        widths = _tiny_qwen25_widths(sd)
        if widths is not None:
            logger.info(
                "x2edit test support: tiny Qwen2.5 text encoder, widths from tensor shapes: %s", widths
            )
            options = dict(kwargs.get("model_options") or {})
            options["qwen25_7b_model_config"] = widths
            kwargs["model_options"] = options
            break
    return _original_load(state_dicts, *args, **kwargs)


detect_te_model_with_tiny_qwen.x2edit_test_original = _original_detect
load_text_encoder_state_dicts_with_tiny_qwen.x2edit_test_original = _original_load
comfy.sd.detect_te_model = detect_te_model_with_tiny_qwen
comfy.sd.load_text_encoder_state_dicts = load_text_encoder_state_dicts_with_tiny_qwen


def _pack_module(suffix):
    for name, module in list(sys.modules.items()):
        if name.endswith(suffix):
            return module
    raise RuntimeError(f"x2edit test support: the x2edit pack's {suffix} is not loaded")


def _save(prefix, tensors):
    output_dir = folder_paths.get_output_directory()
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, output_dir)
    filename = f"{name}_{counter:05}_.safetensors"
    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, os.path.join(folder, filename)
    )
    return {"ui": {"tensors": [{"filename": filename, "subfolder": subfolder, "type": "output"}]}}


class X2EditTestQwenHiddenStates:
    """Writes the text path's tokens and ALL hidden states (ComfyUI's Qwen2.5-VL, X2Edit's mask)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP",),
                "instruction": ("STRING", {"default": "", "multiline": True}),
                "prompt_form": ("STRING", {"default": "inference (dict)"}),
                "round_rope_bf16": ("BOOLEAN", {"default": False}),
                "filename_prefix": ("STRING", {"default": "x2edit_test/qwen_hidden"}),
            }
        }

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "x2edit_test"

    def run(self, clip, instruction, prompt_form, round_rope_bf16, filename_prefix):
        nodes = _pack_module("nodes.x2edit_text_nodes")
        text = _pack_module("x2edit_core.x2edit_text")
        _, _, tokenizer = nodes.comfy_qwen_parts(clip)
        prompt = text.tokenize_prompt(tokenizer, instruction, prompt_form)
        states = nodes.comfy_hidden_states(clip, prompt, round_rope_bf16)
        return _save(
            filename_prefix,
            {
                "hidden_states": states.float(),
                "input_ids": prompt.input_ids,
                "attention_mask": prompt.attention_mask,
            },
        )


class X2EditTestSaveConditioning:
    """Writes the first CONDITIONING entry's tensors (cond, pooled_output) and flags for its other keys."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING",),
                "filename_prefix": ("STRING", {"default": "x2edit_test/conditioning"}),
            }
        }

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "x2edit_test"

    def run(self, conditioning, filename_prefix):
        cond, extra = conditioning[0]
        tensors = {"cond": cond.float()}
        for key, value in extra.items():
            if isinstance(value, torch.Tensor):
                tensors[key] = value.float()
            else:  # record that the key exists (e.g. guidance)
                tensors[f"has_{key}"] = torch.tensor(
                    [float(value) if isinstance(value, (int, float)) else 1.0]
                )
        return _save(filename_prefix, tensors)


NODE_CLASS_MAPPINGS = {
    "X2EditTestQwenHiddenStates": X2EditTestQwenHiddenStates,
    "X2EditTestSaveConditioning": X2EditTestSaveConditioning,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "X2EditTestQwenHiddenStates": "X2Edit Test Qwen Hidden States",
    "X2EditTestSaveConditioning": "X2Edit Test Save Conditioning",
}
