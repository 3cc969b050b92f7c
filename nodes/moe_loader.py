"""Node: X2Edit MoE-LoRA Loader."""

from __future__ import annotations

import os

import folder_paths

from ..x2edit_core.formats import load_adapters
from . import search_aliases
from .comfy_v3 import io
from .patching import ROUTING_MODES, ROUTING_NATIVE, apply_adapters

_cache: dict = {}  # (path, mtime, size) -> LoadedAdapters; one entry, like core LoraLoader's cache


def _load_cached(path: str):
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _cache:
        _cache.clear()
        _cache[key] = load_adapters(path)
    return _cache[key]


def _loras_folders() -> str:
    return ", ".join(folder_paths.get_folder_paths("loras")) or "none configured"


class X2EditMoELoRALoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2EditMoELoRALoader",
            display_name="X2Edit MoE-LoRA Loader",
            category="x2edit/loaders",
            **search_aliases("ICEdit MoE-LoRA", "mixture of experts LoRA"),
            description=(
                "Loads a mixture-of-experts LoRA exactly onto a FLUX model (dev, Fill or Kontext): ICEdit's "
                "MoE-LoRA, an X2Edit checkpoint folder (pick its lora.safetensors), an x2edit-trained file, "
                "or a plain LoRA. Stacks with core LoRA loaders before or after it."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The FLUX diffusion model to patch."),
                io.Combo.Input(
                    "lora_name",
                    options=folder_paths.get_filename_list("loras"),
                    tooltip="File in ComfyUI's loras folder. For an X2Edit checkpoint, put its folder in "
                    "loras and pick the lora.safetensors inside (task_embeddings.bin is read beside it).",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Multiplies every expert and plain LoRA part. 0 gives the unpatched model.",
                ),
                io.Combo.Input(
                    "routing",
                    options=list(ROUTING_MODES),
                    default=ROUTING_NATIVE,
                    tooltip="native: the trained routers pick experts per token (and per task). The other "
                    "modes fix the expert weights for every token, which merges into the weights (no extra "
                    "cost): the mean of all experts, one expert, or a custom mix.",
                ),
                io.Int.Input(
                    "expert_index",
                    default=0,
                    min=0,
                    max=255,
                    tooltip="Expert used by routing 'single expert' (0-based).",
                ),
                io.String.Input(
                    "expert_weights",
                    default="",
                    tooltip="Comma-separated weight per expert for routing 'custom mix', e.g. 0.5, 0.5, 0, 0",
                ),
            ],
            outputs=[
                io.Model.Output(tooltip="The patched model."),
                io.String.Output(
                    "report",
                    display_name="report",
                    tooltip="What was loaded: format, experts, layers, ignored keys.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None, routing=None):
        # At queue time, before anything loads. Defining this hands these inputs' checks to us (older
        # ComfyUI releases never checked V3 combo values); linked inputs arrive as None.
        if isinstance(lora_name, str) and folder_paths.get_full_path("loras", lora_name) is None:
            return f"LoRA file {lora_name!r} is not in the loras folder ({_loras_folders()})"
        if isinstance(routing, str) and routing not in ROUTING_MODES:
            return f"routing {routing!r} is not one of {', '.join(ROUTING_MODES)}"
        return True

    @classmethod
    def execute(cls, model, lora_name, strength, routing, expert_index, expert_weights) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        loaded = _load_cached(path)
        patched, report = apply_adapters(model, loaded, strength, routing, expert_index, expert_weights)
        return io.NodeOutput(patched, report)


NODES = [X2EditMoELoRALoader]
