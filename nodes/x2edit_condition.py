"""X2Edit's source image: preparation nodes and the condition stream on a ComfyUI FLUX model.

The stream's maths is in x2edit_core.condition_stream; here it is attached to a ModelPatcher:

- an object patch replaces the diffusion model's ``forward_orig`` (the token-level FLUX forward, after
  the host has packed the noisy latent and made its ids) with X2Edit's forward over [text | noisy |
  condition]. The host's own blocks' sub-modules are called, so MoE-LoRA adapters (object patches on the
  Linear forwards), LoRA weight patches and quantised weights (GGUF, fp8) all apply to the condition
  tokens too;
- a DIFFUSION_MODEL wrapper puts this model's condition (latent, offset, rounding) into the call's
  ``transformer_options``. An object patch left in place from a previous clone (the host does not always
  undo them before another clone runs) finds no condition in a call that is not ours and runs the host's
  own ``forward_orig``.
"""

from __future__ import annotations

import inspect
import logging
import uuid

import comfy.ldm.common_dit
import comfy.ldm.flux.layers
import comfy.ldm.flux.math
import comfy.model_management
import comfy.patcher_extension
import torch

from ..x2edit_core.condition_stream import (
    StreamInputs,
    check_flux_layout,
    condition_ids,
    pack_latent,
    x2edit_forward,
)
from ..x2edit_core.errors import ConfigError, ModelMismatchError
from ..x2edit_core.x2edit_source import (
    MODE_BUCKETS,
    OFFSET_1024,
    SOURCE_MODES,
    as_source_geometry,
    gaussian_posterior,
    prepare_source,
    restore_source,
    sample_posterior,
)
from .comfy_v3 import io
from .patching import transformer_options, with_transformer_options

log = logging.getLogger("x2edit")

CONDITION_OPTION = "x2edit_condition"  # transformer_options key: this call's condition (see _wrapper)
WRAPPER_PREFIX = "x2edit_condition_"
SourceGeometryType = io.Custom("X2EDIT_SOURCE_GEOMETRY")
WHO = "X2Edit Condition Stream"


# --- the patch -------------------------------------------------------------------------------------


def _condition_wrapper(latent: torch.Tensor, offset: int, reference_rounding: bool, signature):
    """DIFFUSION_MODEL wrapper: adds this model's condition to the call's transformer_options.
    ``signature``: the diffusion model's ``_forward`` signature, to find ``x`` and ``ref_latents`` by name
    however the host passes them."""

    def wrapper(executor, *args, **kwargs):
        options = transformer_options(wrapper, args, kwargs, WHO)
        try:
            call = signature.bind_partial(*args, **kwargs).arguments
        except TypeError as e:
            raise RuntimeError(
                f"{WHO}: FLUX was called with arguments its own forward does not take: {e}"
            ) from e
        x = call["x"]
        if call.get("ref_latents") is not None or kwargs.get("ref_latents") is not None:
            raise ConfigError(
                "X2Edit's condition stream replaces reference latents: remove the ReferenceLatent / Kontext "
                "image conditioning from this X2Edit workflow."
            )
        if tuple(latent.shape[-2:]) != tuple(x.shape[-2:]):
            raise ConfigError(
                f"The X2Edit source latent is {latent.shape[-1] * 8}x{latent.shape[-2] * 8} pixels but the "
                f"sampled latent is {x.shape[-1] * 8}x{x.shape[-2] * 8}: X2Edit generates at the source's "
                "size. Sample the VAE-encoded source itself (or an empty latent of the same size)."
            )
        if x.shape[0] % latent.shape[0]:
            raise ConfigError(
                f"The sampled batch ({x.shape[0]}) is not a multiple of the source batch "
                f"({latent.shape[0]}); give one source image, or as many as the latent batch."
            )
        cond = latent.to(device=x.device, dtype=x.dtype).repeat(x.shape[0] // latent.shape[0], 1, 1, 1)
        options = {**options, CONDITION_OPTION: (cond, offset, reference_rounding)}
        args, kwargs = with_transformer_options(wrapper, args, kwargs, options, WHO)
        return executor(*args, **kwargs)

    return wrapper


def _unsupported_patches(options: dict) -> list[str]:
    patches = options.get("patches", {}) or {}
    found = [k for k in ("post_input", "attn1_patch", "attn1_output_patch") if patches.get(k)]
    if (options.get("patches_replace", {}) or {}).get("dit"):
        found.append("block replacement (patches_replace dit)")
    return found


def _make_forward_orig(dm):
    """X2Edit's ``forward_orig`` for ``dm`` (bound to the instance by an object patch)."""
    signature = inspect.signature(type(dm).forward_orig)

    def forward_orig(*args, **kwargs):
        bound = signature.bind(dm, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        options = a.get("transformer_options") or {}
        condition = options.get(CONDITION_OPTION)
        if condition is None:  # not a call of a model with a condition stream: the host's own forward
            return type(dm).forward_orig(dm, *args, **kwargs)
        cond, offset, rounding = condition
        if a.get("timestep_zero_index") is not None:
            raise ConfigError(
                "X2Edit's condition stream cannot be combined with timestep-zero reference latents."
            )
        if a.get("attn_mask") is not None:
            raise ConfigError(
                "X2Edit's condition stream runs without an attention mask (as X2Edit does); this "
                "conditioning carries one. Use X2Edit's text encoder output as it is."
            )
        unsupported = _unsupported_patches(options)
        if unsupported:
            raise ConfigError(
                "X2Edit's condition stream runs its own FLUX forward and cannot apply these model patches: "
                + ", ".join(unsupported)
                + ". Remove the node that adds them (or apply it to another model)."
            )
        img, img_ids = a["img"], a["img_ids"]
        cond = comfy.ldm.common_dit.pad_to_patch_size(cond, (dm.patch_size, dm.patch_size))
        cond_tokens = pack_latent(cond)
        if cond_tokens.shape[1] != img.shape[1]:
            raise ConfigError(
                f"X2Edit condition has {cond_tokens.shape[1]} tokens but the model got {img.shape[1]} image "
                "tokens (reference latents or a patch changed the image tokens)."
            )
        inputs = StreamInputs(
            img=img,
            img_ids=img_ids,
            cond=cond_tokens,
            cond_ids=condition_ids(
                cond.shape[-2],
                cond.shape[-1],
                cond.shape[0],
                offset,
                axes=img_ids.shape[-1],
                device=img.device,
            ),
            txt=a["txt"],
            txt_ids=a["txt_ids"],
            timesteps=a["timesteps"],
            y=a["y"],
            guidance=a["guidance"],
        )

        def embed(t):
            return comfy.ldm.flux.layers.timestep_embedding(t, 256, time_factor=1.0)

        def attention(q, k, v, pe):
            return comfy.ldm.flux.math.attention(q, k, v, pe=pe, transformer_options=options)

        return x2edit_forward(
            dm,
            inputs,
            embed,
            attention,
            reference_rounding=rounding,
            control=a.get("control"),
            on_block=comfy.model_management.throw_exception_if_processing_interrupted,
        )

    forward_orig.x2edit_condition_patch = True
    return forward_orig


def _call_signature(function) -> inspect.Signature:
    """``function``'s signature without its ``self``: the arguments a DIFFUSION_MODEL wrapper receives."""
    parameters = list(inspect.signature(function).parameters.values())[1:]
    return inspect.Signature(parameters)


def has_condition_stream(model) -> bool:
    wrappers = model.wrappers.get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})
    return any(k.startswith(WRAPPER_PREFIX) for k in wrappers)


def apply_condition_stream(model, latent: dict, offset: int = OFFSET_1024, reference_rounding: bool = False):
    """Clone ``model`` with X2Edit's condition stream over the source ``latent`` (a LATENT dict)."""
    dm = model.get_model_object("diffusion_model")
    check_flux_layout(dm)
    if has_condition_stream(model):
        raise ConfigError(
            "This model already has an X2Edit condition stream; X2Edit takes one source image. Connect the "
            "model from before the first X2Edit Condition Stream node."
        )
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise ConfigError(
            "The source must be a LATENT from VAE Encode (a [batch, channels, height, width] latent)."
        )
    if getattr(samples, "is_nested", False):
        raise ConfigError("The source latent is a nested (multi-part) latent; give a plain FLUX latent.")
    channels = dm.params.in_channels
    if samples.shape[1] != channels:
        raise ModelMismatchError(
            f"The source latent has {samples.shape[1]} channels but this model takes {channels}: X2Edit "
            "runs on FLUX.1-dev-style models (16 latent channels, not Fill inpainting inputs), with the "
            "FLUX VAE."
        )
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ConfigError(f"offset must be a non-negative integer, got {offset!r}.")
    processed = model.model.process_latent_in(samples.float().cpu())  # FLUX latent shift and scale
    patched = model.clone()
    patched.add_object_patch("diffusion_model.forward_orig", _make_forward_orig(dm))
    key = WRAPPER_PREFIX + uuid.uuid4().hex
    patched.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
        key,
        _condition_wrapper(
            processed, int(offset), bool(reference_rounding), _call_signature(type(dm)._forward)
        ),
    )
    log.info(
        "x2edit condition stream: source %dx%d latent, batch %d, offset %d%s",
        samples.shape[-1],
        samples.shape[-2],
        samples.shape[0],
        offset,
        ", reference bf16 timestep rounding" if reference_rounding else "",
    )
    return patched


# --- the source latent ------------------------------------------------------------------------------

LATENT_MODE = "posterior mode (as VAE Encode)"
LATENT_SAMPLE = "posterior sample (as X2Edit)"
LATENT_CHOICES = (LATENT_MODE, LATENT_SAMPLE)


def _posterior_regularizer(vae):
    """The VAE's Gaussian posterior step, or a clear error for a VAE without one."""
    import comfy.ldm.models.autoencoder as autoencoder

    regularizer = getattr(getattr(vae, "first_stage_model", None), "regularization", None)
    if not isinstance(regularizer, autoencoder.DiagonalGaussianRegularizer):
        kind = type(getattr(vae, "first_stage_model", vae)).__name__
        raise ConfigError(
            f"This VAE ({kind}) has no Gaussian posterior to sample (TAESD-like VAEs encode straight to a "
            "latent): use the posterior mode, or load FLUX.1's VAE (ae.safetensors)."
        )
    if regularizer.sample:
        raise ConfigError("This VAE already samples its posterior in every encode; use the posterior mode.")
    return regularizer


def encode_source(vae, pixels: torch.Tensor, latent: str = LATENT_MODE, seed: int = 0) -> torch.Tensor:
    """The source latent through ComfyUI's VAE: its posterior mode (exactly what VAE Encode gives), or
    mean + std * noise(seed), from the moments the VAE's encoder computed in that same encode."""
    if latent == LATENT_MODE:
        return vae.encode(pixels[:, :, :, :3])
    if latent != LATENT_SAMPLE:
        raise ConfigError(f"latent must be one of {', '.join(LATENT_CHOICES)}, got {latent!r}")
    regularizer = _posterior_regularizer(vae)
    moments = []

    def keep_moments(module, args, output):  # the encoder's output, before the mode is taken
        moments.append(args[0].detach().to("cpu", torch.float32))

    handle = regularizer.register_forward_hook(keep_moments)
    try:
        mode = vae.encode(pixels[:, :, :, :3])
    finally:
        handle.remove()
    mean, std = gaussian_posterior(torch.cat(moments)) if moments else (None, None)
    if mean is None or mean.shape != mode.shape:
        raise ConfigError(
            "The VAE did not encode this image in one piece (it fell back to tiles, out of memory), so its "
            "posterior cannot be sampled as a whole: use a smaller source or the posterior mode."
        )
    if not torch.equal(mean.to(mode.dtype), mode.cpu()):
        raise ConfigError(
            "This VAE changes its latent after the posterior (e.g. a normalisation), so a sample of the "
            "posterior is not one of its latents: use the posterior mode."
        )
    return sample_posterior(mean, std, seed).to(device=mode.device, dtype=mode.dtype)


# --- nodes -----------------------------------------------------------------------------------------


class X2EditEncodeSource(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2EditEncodeSource",
            display_name="X2Edit Encode Source",
            category="x2edit/source",
            description="VAE-encodes the prepared source for X2Edit Condition Stream: the posterior mode "
            "(what VAE Encode gives), or a seeded sample of the posterior as X2Edit's pipeline encodes its "
            "source (mean + std * noise).",
            inputs=[
                io.Image.Input("pixels", tooltip="The prepared source (X2Edit Prepare Source output)."),
                io.Vae.Input("vae", tooltip="FLUX.1's VAE."),
                io.Combo.Input(
                    "latent",
                    options=list(LATENT_CHOICES),
                    default=LATENT_MODE,
                    tooltip="posterior mode: the mean, exactly VAE Encode's latent. posterior sample: mean + "
                    "std * noise from the seed, as X2Edit's pipeline does (its noise comes from its own "
                    "generator, so the draw itself differs). Needs a VAE with a Gaussian posterior (FLUX.1's "
                    "ae.safetensors, not TAESD) that encodes the image in one piece.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=False,
                    tooltip="posterior sample only: the seed of the noise (float32 normal noise on the CPU, "
                    "the same on every device).",
                ),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The source latent.")],
        )

    @classmethod
    def validate_inputs(cls, latent=None):
        if isinstance(latent, str) and latent not in LATENT_CHOICES:
            return f"latent {latent!r} is not one of {', '.join(LATENT_CHOICES)}"
        return True

    @classmethod
    def execute(cls, pixels, vae, latent, seed) -> io.NodeOutput:
        return io.NodeOutput({"samples": encode_source(vae, pixels, latent, seed)})


class X2EditPrepareSource(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2EditPrepareSource",
            display_name="X2Edit Prepare Source",
            category="x2edit/source",
            description="Resizes a source image as X2Edit's inference does (its 13 1024 buckets, or 512 "
            "centre crop), or keeps its aspect, and gives the condition tokens' RoPE offset for that "
            "checkpoint.",
            inputs=[
                io.Image.Input("image", tooltip="Source images (a batch of one size; RGB, RGBA or grey)."),
                io.Combo.Input(
                    "mode",
                    options=list(SOURCE_MODES),
                    default=MODE_BUCKETS,
                    tooltip="1024 buckets: nearest of X2Edit's 13 sizes (720x1456 .. 1456x720), aspect "
                    "distorted, offset 128. 512 centre crop: short side 512, centre 512x512, offset 64. keep "
                    "aspect: about size x size pixels, sides multiples of 16.",
                ),
                io.Int.Input(
                    "size",
                    default=1024,
                    min=256,
                    max=2048,
                    step=16,
                    tooltip="keep aspect only: the side of a square of the same area. Ignored by the other "
                    "modes.",
                ),
                io.Int.Input(
                    "offset",
                    default=-1,
                    min=-1,
                    max=4096,
                    tooltip="RoPE row offset of the condition tokens. -1: the checkpoint's (128 for the 1024 "
                    "model; 64 for the 512 model; keep aspect: 128 above size 768, else 64).",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="image", tooltip="The prepared source: encode it with VAE Encode."
                ),
                io.Int.Output(display_name="offset", tooltip="RoPE row offset for X2Edit Condition Stream."),
                SourceGeometryType.Output(
                    display_name="geometry",
                    tooltip="What X2Edit Restore Source needs to go back to the source size.",
                ),
                io.Int.Output(display_name="width", tooltip="Prepared width in pixels."),
                io.Int.Output(display_name="height", tooltip="Prepared height in pixels."),
            ],
        )

    @classmethod
    def execute(cls, image, mode, size, offset) -> io.NodeOutput:
        out, geometry = prepare_source(image, mode, size, offset)
        return io.NodeOutput(out, geometry.offset, geometry, geometry.width, geometry.height)


class X2EditRestoreSource(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2EditRestoreSource",
            display_name="X2Edit Restore Source Size",
            category="x2edit/source",
            description="Brings the edited image back to the source's size (undoes X2Edit Prepare Source). "
            "For the 512 centre crop, connect the source to paste the edit back into it.",
            inputs=[
                io.Image.Input("image", tooltip="The decoded edit (VAE Decode output)."),
                SourceGeometryType.Input("geometry", tooltip="The geometry output of X2Edit Prepare Source."),
                io.Image.Input(
                    "source",
                    optional=True,
                    tooltip="512 centre crop only: the original source; the edited window is pasted into it. "
                    "Without it the edited window alone is returned, at source scale.",
                ),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The edit at the source's size.")],
        )

    @classmethod
    def execute(cls, image, geometry, source=None) -> io.NodeOutput:
        return io.NodeOutput(restore_source(image, as_source_geometry(geometry), source))


class X2EditConditionStream(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2EditConditionStream",
            display_name="X2Edit Condition Stream",
            category="x2edit/source",
            description="Conditions a FLUX.1 model on the source image the way X2Edit does: the source "
            "latent's tokens run through every block beside the noisy ones, at timestep 0, with their RoPE "
            "rows offset, and see the MoE-LoRA experts. Put it after X2Edit MoE-LoRA Loader and the task "
            "router.",
            inputs=[
                io.Model.Input(
                    "model", tooltip="FLUX.1-dev (or schnell-like) with X2Edit's MoE-LoRA loaded."
                ),
                io.Latent.Input(
                    "source",
                    tooltip="The prepared source, VAE-encoded: VAE Encode (the posterior mode) or X2Edit "
                    "Encode Source (mode, or a posterior sample as X2Edit's pipeline draws). Sample a latent "
                    "of this same size.",
                ),
                io.Int.Input(
                    "offset",
                    default=OFFSET_1024,
                    min=0,
                    max=4096,
                    tooltip="RoPE row offset of the condition tokens: 128 for the 1024 checkpoint, 64 for "
                    "the 512 one (X2Edit Prepare Source outputs it).",
                ),
                io.Boolean.Input(
                    "reference_rounding",
                    default=False,
                    tooltip="Embed timesteps and guidance rounded as X2Edit's bf16 pipeline does (sigma 0.75 "
                    "-> 752, guidance 3.5 -> 3504). Off: ComfyUI's float32 values.",
                ),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the condition stream.")],
        )

    @classmethod
    def execute(cls, model, source, offset, reference_rounding) -> io.NodeOutput:
        return io.NodeOutput(apply_condition_stream(model, source, offset, reference_rounding))


NODES = [X2EditPrepareSource, X2EditEncodeSource, X2EditRestoreSource, X2EditConditionStream]
