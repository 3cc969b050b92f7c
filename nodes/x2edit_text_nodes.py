"""Node: X2Edit Text Encode (Qwen2.5-VL hidden states through X2Edit's AlignNet -> FLUX conditioning).

Two sources for Qwen2.5-VL-7B: ComfyUI's own text encoder (the CLIP that core CLIPLoader loads from
``qwen_2.5_vl_7b.safetensors`` with type qwen_image, the file Qwen-Image users already have) or a
transformers model folder. The prompt, padding, mask and position maths are in
``x2edit_core.x2edit_text``; the AlignNet is ``x2edit_core.alignnet``.

ComfyUI's text encoder is run layer by layer here instead of through its own forward, because its
forward builds an attention mask that leaves the left-padding rows with no key at all (NaN), while the
reference lets those rows attend to every token; the layers, weights, memory management and attention
kernel are ComfyUI's own.
"""

from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..x2edit_core.alignnet import ALIGNNET_FILE, AlignNet, load_alignnet
from ..x2edit_core.errors import ConfigError
from ..x2edit_core.x2edit_text import (
    MAX_TOKENS,
    PROMPT_FORMS,
    PROMPT_INFERENCE,
    TokenizedPrompt,
    attention_bias,
    position_ids,
    rope_cos_sin,
    tokenize_prompt,
)
from .comfy_v3 import io

log = logging.getLogger("x2edit")

NO_ALIGNNET_FOUND = "(no AlignNet found: put the X2Edit checkpoint folder in models/loras)"
USE_CLIP = "(use the clip input)"
_ALIGNNET_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")

_alignnet_cache: dict = {}  # (path, mtime, size) -> AlignNet; one entry


def alignnet_choices() -> list[str]:
    """AlignNet files in the loras folders: X2Edit's ``diffusion_pytorch_model.bin`` inside a checkpoint
    folder, or a projector file such as X2I's ``qwen2.5-vl-7b_proj.pt``."""
    names = []
    for name in folder_paths.get_filename_list("loras"):
        base = os.path.basename(name).lower()
        if base == ALIGNNET_FILE or ("proj" in base and base.endswith(_ALIGNNET_SUFFIXES)):
            names.append(name)
    return names


def _alignnet_choice_problem(alignnet: str) -> str | None:
    """Why ``alignnet`` is not a usable choice (None when it is one of the listed files)."""
    if alignnet != NO_ALIGNNET_FOUND and alignnet in alignnet_choices():
        return None
    return (
        f"AlignNet {alignnet!r} not found in the loras folders. Put the X2Edit checkpoint folder (with "
        f"{ALIGNNET_FILE}) in models/loras and pick its {ALIGNNET_FILE}, or place X2I's *_proj.pt there."
    )


def _vlm_folders() -> dict[str, str]:
    try:
        from .early_filter_nodes import _vlm_folders as folders
    except ImportError:  # the judge nodes are optional; their folder list is not
        return {}
    return folders()


def _load_alignnet_cached(path: str) -> AlignNet:
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _alignnet_cache:
        _alignnet_cache.clear()
        _alignnet_cache[key] = load_alignnet(path).float()
    return _alignnet_cache[key]


# -- ComfyUI's Qwen2.5-VL ----------------------------------------------------------------------------


def comfy_qwen_parts(clip):
    """(SD clip model holding Qwen2.5-VL, its Llama-style decoder, the underlying Qwen2 tokenizer)."""
    cond_model = getattr(clip, "cond_stage_model", None)
    te = getattr(cond_model, "qwen25_7b", None)
    transformer = getattr(te, "transformer", None)
    decoder = getattr(transformer, "model", None)
    tokenizer = getattr(getattr(getattr(clip, "tokenizer", None), "qwen25_7b", None), "tokenizer", None)
    if decoder is None or not hasattr(decoder, "layers") or tokenizer is None:
        kind = type(cond_model).__name__ if cond_model is not None else type(clip).__name__
        raise ConfigError(
            f"X2Edit Text Encode needs Qwen2.5-VL-7B as a CLIP: load qwen_2.5_vl_7b.safetensors with core "
            f"'Load CLIP' (CLIPLoader), type qwen_image. This CLIP is {kind}, which holds no Qwen2.5-VL "
            "text model (FLUX's CLIP-L/T5 cannot drive X2Edit)."
        )
    return te, decoder, tokenizer


def _rope_tables(decoder, positions: torch.Tensor, round_bf16: bool):
    """RoPE tables in the layout this ComfyUI release's layers expect, from ComfyUI's own function;
    with `round_bf16`, the same layout filled from bf16-rounded inverse frequencies."""
    import comfy.text_encoders.llama as llama

    config = decoder.config
    if hasattr(decoder, "compute_freqs_cis"):
        tables = decoder.compute_freqs_cis(positions, positions.device)
    else:
        tables = llama.precompute_freqs_cis(
            config.head_dim,
            positions,
            config.rope_theta,
            config.rope_scale,
            config.rope_dims,
            device=positions.device,
        )
    if not round_bf16:
        return tables
    if isinstance(config.rope_theta, list) or config.rope_scale is not None or not isinstance(tables, tuple):
        raise ConfigError("bf16 RoPE rounding is only defined for Qwen2.5-VL's single plain RoPE")
    cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta, round_to=torch.bfloat16)
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, L, D], as ComfyUI lays them out
    if tuple(tables[0].shape) != tuple(cos.shape):
        raise ConfigError(f"unexpected RoPE table shape {tuple(tables[0].shape)} in this ComfyUI release")
    if len(tables) == 2:
        return cos, sin
    if len(tables) == 3:  # newer releases: (cos, sin of the first half, -sin of the second half)
        half = sin.shape[-1] // 2
        return cos, sin[..., :half], -sin[..., half:]
    raise ConfigError(f"unexpected RoPE table layout ({len(tables)} parts) in this ComfyUI release")


def comfy_hidden_states(
    clip, prompt: TokenizedPrompt, round_rope_bf16: bool = False, pbar=None
) -> torch.Tensor:
    """All hidden states of ComfyUI's Qwen2.5-VL for one tokenised prompt: [1, layers + 1, L, width] fp32."""
    from comfy.ldm.modules.attention import optimized_attention_for_device

    _, decoder, _ = comfy_qwen_parts(clip)
    comfy.model_management.load_models_gpu([clip.patcher])
    device = decoder.embed_tokens.weight.device  # where ComfyUI's own encode runs
    ids = prompt.input_ids[None].to(device)
    mask = prompt.attention_mask[None].to(device)
    with torch.no_grad():
        x = decoder.embed_tokens(ids, out_dtype=torch.float32)  # fp32 activations, as ComfyUI encodes
        tables = _rope_tables(decoder, position_ids(mask), round_rope_bf16)
        bias = attention_bias(mask, x.dtype)
        attention = optimized_attention_for_device(x.device, mask=True, small_input=True)
        states = [x.clone()]
        for layer in decoder.layers:
            comfy.model_management.throw_exception_if_processing_interrupted()
            out = layer(x=x, attention_mask=bias, freqs_cis=tables, optimized_attention=attention)
            x = out[0] if isinstance(out, tuple) else out  # newer releases also return a KV cache
            states.append(x.clone())  # layers may write their output into their input
            if pbar is not None:
                pbar.update(1)
        states[-1] = decoder.norm(x)
    return torch.stack(states, dim=1).float()


# -- the node --------------------------------------------------------------------------------------


class X2EditTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        alignnets = alignnet_choices() or [NO_ALIGNNET_FOUND]
        return io.Schema(
            node_id="X2EditTextEncode",
            display_name="X2Edit Text Encode (Qwen2.5-VL + AlignNet)",
            category="x2edit/conditioning",
            description=(
                "X2Edit's text path: the instruction in Qwen2.5-VL-7B's chat format, padded to 512 tokens, "
                "all hidden states through X2Edit's AlignNet -> FLUX conditioning (context + pooled). "
                "Replaces CLIP-L/T5. Add guidance with FluxGuidance."
            ),
            inputs=[
                io.String.Input(
                    "instruction",
                    multiline=True,
                    dynamic_prompts=True,
                    default="",
                    tooltip="The edit instruction, inserted as written (English or Chinese).",
                ),
                io.Combo.Input(
                    "alignnet",
                    options=alignnets,
                    tooltip="X2Edit's AlignNet: diffusion_pytorch_model.bin inside the X2Edit checkpoint "
                    "folder (the folder in models/loras whose lora.safetensors the MoE-LoRA loader reads), "
                    "or X2I's *_proj.pt placed in models/loras.",
                ),
                io.Combo.Input(
                    "prompt_form",
                    options=list(PROMPT_FORMS),
                    default=PROMPT_INFERENCE,
                    tooltip="inference (dict): the message X2Edit's inference code sends (the instruction "
                    "inside a small dict, as Python prints it). training (raw): the instruction alone, as in "
                    "training.",
                ),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="Qwen2.5-VL-7B from core 'Load CLIP' (qwen_2.5_vl_7b.safetensors, type "
                    "qwen_image). Its fp8-scaled variant runs but cannot reproduce the reference exactly.",
                ),
                io.Combo.Input(
                    "qwen_folder",
                    options=[USE_CLIP, *_vlm_folders()],
                    default=USE_CLIP,
                    optional=True,
                    tooltip="Instead of the clip input: a transformers Qwen2.5-VL-7B-Instruct folder under "
                    "models/vlm or models/LLM.",
                ),
                io.Boolean.Input(
                    "round_rope_bf16",
                    default=False,
                    optional=True,
                    tooltip="Round Qwen's RoPE frequencies to bf16, as the reference does when it casts the "
                    "whole model to bf16. Off: exact fp32 frequencies.",
                ),
            ],
            outputs=[
                io.Conditioning.Output(
                    display_name="conditioning",
                    tooltip="FLUX conditioning: context [1, 512, 4096] and pooled_output [1, 768]; no "
                    "guidance (use FluxGuidance).",
                ),
                io.String.Output(
                    display_name="report", tooltip="Prompt text, token count, truncation, AlignNet."
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, alignnet=None, prompt_form=None, qwen_folder=None):
        # At queue time, before any model loads; linked inputs arrive as None. Defining this hands these
        # inputs' checks to us (older releases never checked V3 combo values). The AlignNet file's form is
        # checked when it is read.
        if isinstance(alignnet, str):
            problem = _alignnet_choice_problem(alignnet)
            if problem:
                return problem
        if isinstance(prompt_form, str) and prompt_form not in PROMPT_FORMS:
            return f"prompt_form {prompt_form!r} is not one of {', '.join(PROMPT_FORMS)}"
        if isinstance(qwen_folder, str) and qwen_folder not in ("", USE_CLIP, *_vlm_folders()):
            return (
                f"Qwen folder {qwen_folder!r} is not under models/vlm or models/LLM: put the transformers "
                "Qwen2.5-VL folder there and refresh, or use the clip input."
            )
        return True

    @classmethod
    def execute(
        cls, instruction, alignnet, prompt_form, clip=None, qwen_folder=USE_CLIP, round_rope_bf16=False
    ) -> io.NodeOutput:
        use_folder = qwen_folder not in (None, "", USE_CLIP)
        if clip is None and not use_folder:
            raise ConfigError(
                "X2Edit Text Encode: connect a clip (Qwen2.5-VL-7B from 'Load CLIP', type qwen_image) or "
                "pick a qwen_folder."
            )
        if clip is not None and use_folder:
            raise ConfigError("X2Edit Text Encode: give either the clip input or a qwen_folder, not both.")
        problem = _alignnet_choice_problem(alignnet)
        if problem:  # a choice that skipped validate_inputs
            raise ConfigError(f"X2Edit Text Encode: {problem}")
        net = _load_alignnet_cached(folder_paths.get_full_path_or_raise("loras", alignnet))

        if use_folder:
            folders = _vlm_folders()
            if qwen_folder not in folders:
                raise ConfigError(
                    f"X2Edit Text Encode: Qwen folder {qwen_folder!r} not found under models/vlm."
                )
            from ..x2edit_core.models.qwen_vl_text import QwenVLTextEncoder

            device = comfy.model_management.get_torch_device()
            encoder = QwenVLTextEncoder(folders[qwen_folder], device=device)
            try:
                prompt = tokenize_prompt(encoder.tokenizer, instruction, prompt_form, MAX_TOKENS)
                states = encoder.hidden_states(prompt, round_rope_bf16=round_rope_bf16)
            finally:
                encoder.release()
            source = f"transformers folder {qwen_folder}"
        else:
            te, decoder, tokenizer = comfy_qwen_parts(clip)
            prompt = tokenize_prompt(tokenizer, instruction, prompt_form, MAX_TOKENS)
            pbar = comfy.utils.ProgressBar(len(decoder.layers))
            states = comfy_hidden_states(clip, prompt, round_rope_bf16, pbar)
            dtypes = sorted(
                str(d).replace("torch.", "") for d in getattr(clip.cond_stage_model, "dtypes", ())
            )
            source = f"ComfyUI Qwen2.5-VL ({len(decoder.layers)} layers, weights {', '.join(dtypes) or '?'})"

        if states.shape[1] != net.num_states or states.shape[-1] != net.in_dim:
            raise ConfigError(
                f"X2Edit Text Encode: the text model gives {states.shape[1]} hidden states of width "
                f"{states.shape[-1]}, but this AlignNet expects {net.num_states} of width {net.in_dim}: "
                "use Qwen2.5-VL-7B with X2Edit's AlignNet."
            )
        with torch.no_grad():
            embeds, pooled = net.to(states.device)(states)  # fp32, the accuracy ComfyUI encodes text at
        net.to("cpu")
        out_device = comfy.model_management.intermediate_device()
        cond = embeds.to(out_device, torch.float32)
        pooled = pooled.to(out_device, torch.float32)

        lines = [
            f"prompt form: {prompt_form}; {prompt.num_tokens} tokens, left-padded to {MAX_TOKENS}",
            f"text model: {source}; RoPE frequencies {'bf16-rounded' if round_rope_bf16 else 'fp32'}",
            f"AlignNet: {alignnet} ({net.num_states} states x {net.in_dim} -> context {net.out_dim}, "
            f"pooled {net.pooled_dim})",
            f"chat text: {prompt.text!r}",
        ]
        if prompt.truncated:
            warning = (
                f"WARNING: the prompt is {prompt.num_tokens + prompt.truncated} tokens; the last "
                f"{prompt.truncated} were cut to fit {MAX_TOKENS} (as the reference does), including the end "
                "of the chat format"
            )
            log.warning("x2edit: X2Edit Text Encode: %s", warning)
            lines.insert(1, warning)
        return io.NodeOutput([[cond, {"pooled_output": pooled}]], "\n".join(lines))


NODES = [X2EditTextEncode]
