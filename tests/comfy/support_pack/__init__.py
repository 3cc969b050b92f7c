"""Test-only ComfyUI node pack for the x2edit ComfyUI test tier. Never ship or load it in production.

At import it wraps `comfy.model_detection.detect_unet_config` so UNETLoader can load tiny random
FLUX models (ComfyUI hard-codes FLUX.1's widths), and it adds nodes that stand in for the text
encoders and write/read raw tensors for exact comparisons.
"""

import hashlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

import comfy.model_detection
import folder_paths
import torch
from safetensors.torch import load_file, save_file


def _load_tiny_models():
    # tests/tiny_models.py owns the RoPE split rule; load it by path (tests/ is not a package here).
    path = Path(__file__).resolve().parents[2] / "tiny_models.py"
    spec = importlib.util.spec_from_file_location("x2edit_test_tiny_models", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


tiny_models = _load_tiny_models()
logger = logging.getLogger(__name__)


# --- model detection hook ---


def _flux_widths_from_shapes(state_dict, key_prefix):
    """FLUX widths read from tensor shapes; None if the keys are not those of a BFL-layout FLUX."""
    # The RMSNorm gain is `.scale` in BFL files; newer releases name it `.weight` when converting
    # diffusers files.
    norm = f"{key_prefix}double_blocks.0.img_attn.norm.key_norm."
    keys = {
        "img_in": f"{key_prefix}img_in.weight",
        "txt_in": f"{key_prefix}txt_in.weight",
        "head": f"{norm}scale" if f"{norm}scale" in state_dict else f"{norm}weight",
        "mlp": f"{key_prefix}double_blocks.0.img_mlp.0.weight",
        "final": f"{key_prefix}final_layer.linear.weight",
    }
    if keys["head"] not in state_dict:  # newer releases name the RMSNorm gain "weight" (diffusers conversion)
        keys["head"] = f"{key_prefix}double_blocks.0.img_attn.norm.key_norm.weight"
    if any(k not in state_dict for k in keys.values()):
        return None
    hidden = state_dict[keys["img_in"]].shape[0]
    head_dim = state_dict[keys["head"]].shape[0]
    return {
        "hidden_size": hidden,
        "num_heads": hidden // head_dim,
        "context_in_dim": state_dict[keys["txt_in"]].shape[1],
        "mlp_ratio": state_dict[keys["mlp"]].shape[0] / hidden,
        "out_channels": state_dict[keys["final"]].shape[0] // 4,
        "axes_dim": tiny_models.flux_axes_dim(head_dim),
        "qkv_bias": f"{key_prefix}double_blocks.0.img_attn.qkv.bias" in state_dict,
    }


_original_detect_unet_config = getattr(
    comfy.model_detection.detect_unet_config, "x2edit_test_original", comfy.model_detection.detect_unet_config
)


def detect_unet_config_with_tiny_flux(state_dict, key_prefix, metadata=None):
    config = _original_detect_unet_config(state_dict, key_prefix, metadata=metadata)
    if config is None or config.get("image_model") != "flux":
        return config
    widths = _flux_widths_from_shapes(state_dict, key_prefix)
    if widths is None or all(config.get(k) == v for k, v in widths.items()):
        logger.info("x2edit test support: FLUX widths left as ComfyUI detected them")
        return config  # a real FLUX.1: leave ComfyUI's own answer untouched
    logger.info("x2edit test support: tiny FLUX detected, widths from tensor shapes: %s", widths)
    return {**config, **widths}


if os.environ.get("X2EDIT_TEST_FLUX_DETECTION_HOOK", "1") == "0":
    # A server started this way loads every model through ComfyUI's unmodified detection.
    logger.info("x2edit test support: FLUX detection hook off")
else:
    detect_unet_config_with_tiny_flux.x2edit_test_original = _original_detect_unet_config
    comfy.model_detection.detect_unet_config = detect_unet_config_with_tiny_flux


# --- nodes ---


def _generator(seed, text=""):
    # sha256, not hash(): Python salts str hashes per process and runs must repeat exactly.
    digest = hashlib.sha256(f"{int(seed)}\0{text}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)


class X2EditTestConditioning:
    """Deterministic random FLUX conditioning of any width (stands in for CLIP-L + T5)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFF_FFFF_FFFF_FFFF}),
                "text": ("STRING", {"default": "", "multiline": True}),
                "tokens": ("INT", {"default": 8, "min": 1, "max": 4096}),
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1}),
                "context_dim": ("INT", {"default": 32, "min": 1, "max": 8192}),
                "pooled_dim": ("INT", {"default": 16, "min": 1, "max": 8192}),
            },
            "optional": {"model": ("MODEL",)},
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "x2edit_test"

    def make(self, seed, text, tokens, guidance, context_dim, pooled_dim, model=None):
        if model is not None:  # take the widths from the model so they cannot mismatch
            unet_config = model.model.model_config.unet_config
            context_dim = unet_config.get("context_in_dim", context_dim)
            pooled_dim = unet_config.get("vec_in_dim", pooled_dim)
        generator = _generator(seed, text)
        cond = torch.randn((1, tokens, context_dim), generator=generator)
        pooled = torch.randn((1, pooled_dim), generator=generator)
        return ([[cond, {"pooled_output": pooled, "guidance": guidance}]],)


class X2EditTestNoiseImage:
    """Deterministic smooth random image (a low-resolution grid upsampled plus fine noise)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "width": ("INT", {"default": 64, "min": 8, "max": 8192}),
                "height": ("INT", {"default": 64, "min": 8, "max": 8192}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFF_FFFF_FFFF_FFFF}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "x2edit_test"

    def make(self, width, height, batch_size, seed):
        generator = _generator(seed, "noise image")
        coarse = torch.rand((batch_size, 3, 4, 4), generator=generator)
        image = torch.nn.functional.interpolate(
            coarse, size=(height, width), mode="bilinear", align_corners=False
        )
        image = image + 0.05 * torch.randn(image.shape, generator=generator)
        return (image.clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous(),)


class X2EditTestSaveTensors:
    """Writes the given IMAGE / LATENT samples / MASK unchanged to <output>/<prefix>_NNNNN_.safetensors."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"filename_prefix": ("STRING", {"default": "tensors/x2edit_test"})},
            "optional": {"image": ("IMAGE",), "latent": ("LATENT",), "mask": ("MASK",)},
        }

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "x2edit_test"

    def save(self, filename_prefix, image=None, latent=None, mask=None):
        tensors = {}
        if image is not None:
            tensors["image"] = image
        if latent is not None:
            tensors["latent"] = latent["samples"]
        if mask is not None:
            tensors["mask"] = mask
        if not tensors:
            raise ValueError("X2EditTestSaveTensors: connect at least one of image, latent, mask")
        output_dir = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir)
        filename = f"{name}_{counter:05}_.safetensors"
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        save_file(tensors, os.path.join(folder, filename))
        return {"ui": {"tensors": [{"filename": filename, "subfolder": subfolder, "type": "output"}]}}


class X2EditTestLoadTensors:
    """Reads `image` / `latent` / `mask` tensors from a safetensors file in the input directory.

    A missing key gives a 1x8x8 zero placeholder of that type.
    """

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"filename": ("STRING", {"default": "tensors.safetensors"})}}

    RETURN_TYPES = ("IMAGE", "LATENT", "MASK")
    FUNCTION = "load"
    CATEGORY = "x2edit_test"

    def load(self, filename):
        path = os.path.join(folder_paths.get_input_directory(), filename)
        tensors = load_file(path)
        image = tensors.get("image", torch.zeros((1, 8, 8, 3)))
        latent = tensors.get("latent", torch.zeros((1, 16, 1, 1)))
        mask = tensors.get("mask", torch.zeros((1, 8, 8)))
        return (image, {"samples": latent}, mask)


NODE_CLASS_MAPPINGS = {
    "X2EditTestConditioning": X2EditTestConditioning,
    "X2EditTestNoiseImage": X2EditTestNoiseImage,
    "X2EditTestSaveTensors": X2EditTestSaveTensors,
    "X2EditTestLoadTensors": X2EditTestLoadTensors,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "X2EditTestConditioning": "X2Edit Test Conditioning",
    "X2EditTestNoiseImage": "X2Edit Test Noise Image",
    "X2EditTestSaveTensors": "X2Edit Test Save Tensors",
    "X2EditTestLoadTensors": "X2Edit Test Load Tensors",
}


# --- text-encoder stand-in (workflow tests) ---


class _TestClipModel:
    """Duck-typed CLIP for nodes that call `tokenize` and `encode_from_tokens_scheduled` (IC prompt,
    CLIPTextEncode): deterministic random conditioning of the tiny models' widths, seeded by the text."""

    def __init__(self, seed, tokens, context_dim, pooled_dim):
        self.seed, self.tokens, self.context_dim, self.pooled_dim = seed, tokens, context_dim, pooled_dim

    def tokenize(self, text, **kwargs):
        return {"x2edit_test_text": text}

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        text = tokens["x2edit_test_text"]
        generator = _generator(self.seed, text)
        cond = torch.randn((1, self.tokens, self.context_dim), generator=generator)
        pooled = torch.randn((1, self.pooled_dim), generator=generator)
        return [[cond, {"pooled_output": pooled, "x2edit_test_text": text, **(add_dict or {})}]]


class X2EditTestCLIP:
    """Stands in for DualCLIPLoader (CLIP-L + T5 cannot be tiny): a CLIP whose encoding is random
    conditioning seeded by the prompt text, so different prompts give different conditioning."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFF_FFFF_FFFF_FFFF}),
                "tokens": ("INT", {"default": 8, "min": 1, "max": 4096}),
                "context_dim": ("INT", {"default": 32, "min": 1, "max": 8192}),
                "pooled_dim": ("INT", {"default": 16, "min": 1, "max": 8192}),
            }
        }

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "x2edit_test"

    def load(self, seed, tokens, context_dim, pooled_dim):
        return (_TestClipModel(seed, tokens, context_dim, pooled_dim),)


NODE_CLASS_MAPPINGS["X2EditTestCLIP"] = X2EditTestCLIP
NODE_DISPLAY_NAME_MAPPINGS["X2EditTestCLIP"] = "X2Edit Test CLIP"


# --- early filter: a judge that knows the "true quality" (appended for tests/comfy/test_early_filter.py) ---


def _x2edit_module(suffix, attribute):
    for name, module in list(sys.modules.items()):
        if name.endswith(suffix) and hasattr(module, attribute):
            return module
    raise RuntimeError(f"X2EditTestScriptedJudge: the x2edit pack's {suffix} is not loaded")


def _x2edit_judge_module():
    # The x2edit pack is loaded by ComfyUI under its folder name; find its judge module at call time
    # so the verdict is the pack's own JudgeVerdict class whatever the load order.
    for name, module in list(sys.modules.items()):
        if name.endswith("x2edit_core.judges.base") and hasattr(module, "JudgeVerdict"):
            return module
    raise RuntimeError("X2EditTestScriptedJudge: the x2edit pack's x2edit_core.judges.base is not loaded")


class ScriptedJudge:
    """Judge interface (compare -> JudgeVerdict) with a known quality: mean brightness of the image.

    prefer: "brighter" / "darker" picks by that quality; "first" / "second" always answers 1 / 2;
    "unusable" gives an answer that names no winner. `calls` counts compare calls.
    """

    def __init__(self, prefer):
        self.prefer = prefer
        self.calls = 0
        self.released = 0

    @staticmethod
    def quality(image):
        import numpy as np

        return float(np.asarray(image.convert("RGB"), dtype=np.float64).mean())

    def compare(self, original, candidate_1, candidate_2, instruction):
        verdict_class = _x2edit_judge_module().JudgeVerdict
        self.calls += 1
        if self.prefer == "unusable":
            return verdict_class(None, "", "Both look the same to me.")
        if self.prefer in ("first", "second"):
            choice = 1 if self.prefer == "first" else 2
        else:
            q1, q2 = self.quality(candidate_1), self.quality(candidate_2)
            choice = 1 if (q1 >= q2) == (self.prefer == "brighter") else 2
        reason = f"scripted {self.prefer}: image {choice} (size {candidate_1.size}, original {original.size})"
        return verdict_class(choice, reason, f"{choice}\n{reason}")

    def score(self, source, edited, instruction, *, prompt_template=None):
        """SC = PQ = overall = the known quality on 0-10 (brightness / 25.5; "darker": 10 minus it);
        "first"/"second" score every edit 5; "unusable" gives an answer without scores."""
        scoring = _x2edit_module("x2edit_core.judges.scoring", "EditScore")
        self.calls += 1
        if self.prefer == "unusable":
            return scoring.EditScore(None, None, None, "", "It looks fine to me.")
        value = 5.0
        if self.prefer in ("brighter", "darker"):
            value = self.quality(edited) / 25.5
            value = value if self.prefer == "brighter" else 10.0 - value
        reason = f"scripted {self.prefer}: {value:.3f} (size {edited.size}, source {source.size})"
        return scoring.EditScore(value, value, value, reason, f"SC: {value}, PQ: {value}")

    def release(self):
        self.released += 1

    def describe(self):
        return f"scripted judge ({self.prefer})"


class X2EditTestScriptedJudge:
    """An X2EDIT_JUDGE whose choices follow a known rule (see ScriptedJudge)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prefer": (["brighter", "darker", "first", "second", "unusable"],)}}

    RETURN_TYPES = ("X2EDIT_JUDGE",)
    FUNCTION = "make"
    CATEGORY = "x2edit_test"

    def make(self, prefer):
        return (ScriptedJudge(prefer),)


NODE_CLASS_MAPPINGS["X2EditTestScriptedJudge"] = X2EditTestScriptedJudge
NODE_DISPLAY_NAME_MAPPINGS["X2EditTestScriptedJudge"] = "X2Edit Test Scripted Judge"


# --- one raw diffusion-model call (appended for tests/comfy/test_cross_implementation.py) ---


class X2EditTestModelForward:
    """Calls the patched FLUX diffusion model once on fixed inputs and saves its raw output.

    The inputs file (input directory) holds `x` [B, C, H, W], `timestep` [B] in [0, 1], `context`
    [B, T, D], `y` [B, P] and `guidance` [B]. The call gets the patched model's transformer_options and
    wrappers plus the task id, as sampling would, so wrappers and task-aware adapters take part.
    `call`: "module" calls the diffusion model as samplers do (its wrappers then get transformer_options
    by position); "keyword" runs the same wrappers with transformer_options passed by keyword, as another
    release could; "no options" runs them without transformer_options at all.
    """

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "filename": ("STRING", {"default": "forward_inputs.safetensors"}),
                "task": ("INT", {"default": 0, "min": 0, "max": 255}),
                "filename_prefix": ("STRING", {"default": "tensors/x2edit_forward"}),
            },
            "optional": {"call": (["module", "keyword", "no options"], {"default": "module"})},
        }

    RETURN_TYPES = ()
    FUNCTION = "forward"
    OUTPUT_NODE = True
    CATEGORY = "x2edit_test"

    def forward(self, model, filename, task, filename_prefix, call="module"):
        import comfy.model_management
        import comfy.patcher_extension

        inputs = load_file(os.path.join(folder_paths.get_input_directory(), filename))
        comfy.model_management.load_models_gpu([model])
        diffusion_model = model.model.diffusion_model
        # The computation dtype: weights stored as fp8 (or packed by GGUF) are cast to it per layer.
        device = model.load_device
        dtype = getattr(model.model, "manual_cast_dtype", None) or model.model.get_dtype()
        x, timestep, context, y, guidance = (
            inputs[k].to(device, dtype) for k in ("x", "timestep", "context", "y", "guidance")
        )
        # As sampling does (comfy.sampler_helpers.prepare_model_patcher): the patcher's wrappers join
        # a copy of its transformer_options, so DIFFUSION_MODEL wrappers run around the call.
        options = dict(model.model_options.get("transformer_options", {}))
        options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(
            options.get("wrappers", {}), model.wrappers, copy_dict1=True
        )
        options["x2edit_task"] = int(task)
        with torch.no_grad():
            if call == "module":
                out = diffusion_model(
                    x, timestep, context, y=y, guidance=guidance, transformer_options=options
                )
            else:
                executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
                    diffusion_model._forward,
                    diffusion_model,
                    comfy.patcher_extension.get_all_wrappers(
                        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, options
                    ),
                )
                extra = {"transformer_options": options} if call == "keyword" else {}
                out = executor.execute(x, timestep, context, y=y, guidance=guidance, **extra)
        output_dir = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir)
        out_name = f"{name}_{counter:05}_.safetensors"
        save_file(
            {"output": out.detach().to("cpu", torch.float32).contiguous()}, os.path.join(folder, out_name)
        )
        return {"ui": {"tensors": [{"filename": out_name, "subfolder": subfolder, "type": "output"}]}}


NODE_CLASS_MAPPINGS["X2EditTestModelForward"] = X2EditTestModelForward
NODE_DISPLAY_NAME_MAPPINGS["X2EditTestModelForward"] = "X2Edit Test Model Forward"


# --- fixed conditioning from a file (appended for tests/comfy/test_x2edit_condition.py) ---


class X2EditTestLoadConditioning:
    """CONDITIONING from `cond` [B, T, D], `pooled` [B, P] and optional `guidance` [1] tensors in a
    safetensors file of the input directory, so tests can feed the same text to a reference model."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"filename": ("STRING", {"default": "conditioning.safetensors"})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "load"
    CATEGORY = "x2edit_test"

    def load(self, filename):
        tensors = load_file(os.path.join(folder_paths.get_input_directory(), filename))
        extra = {"pooled_output": tensors["pooled"]}
        if "guidance" in tensors:
            extra["guidance"] = float(tensors["guidance"].item())
        return ([[tensors["cond"], extra]],)


NODE_CLASS_MAPPINGS["X2EditTestLoadConditioning"] = X2EditTestLoadConditioning
NODE_DISPLAY_NAME_MAPPINGS["X2EditTestLoadConditioning"] = "X2Edit Test Load Conditioning"


# --- X2Edit text path: tiny Qwen2.5-VL via CLIPLoader, tensor writers (tests/comfy/test_x2edit_text.py) ---

from . import qwen_text_support  # noqa: E402  (installs its loader hook at import)

NODE_CLASS_MAPPINGS.update(qwen_text_support.NODE_CLASS_MAPPINGS)
NODE_DISPLAY_NAME_MAPPINGS.update(qwen_text_support.NODE_DISPLAY_NAME_MAPPINGS)
