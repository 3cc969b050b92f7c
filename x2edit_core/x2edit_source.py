"""X2Edit source-image preparation on ComfyUI tensors (IMAGE [B,H,W,C] floats in 0..1).

X2Edit edits at a fixed set of sizes and generates at the processed source's size. Its inference script
(OPPO-Mente-Lab/X2Edit infer.py) has two modes, reproduced here:

- **1024 buckets**: the source is resized (bilinear, aspect *distorted*) to the one of 13 buckets from
  720x1456 to 1456x720 whose height/width ratio is nearest to the source's (first bucket on a tie). The
  condition tokens' RoPE row offset is 128 (the 1024 checkpoint).
- **512 centre crop**: the short side is resized to 512 (the long side truncated to an integer), then the
  centre 512x512 is cut out (torchvision's CenterCrop rounding). Offset 64 (the 512 checkpoint).
- **keep aspect** (ours, not in X2Edit): the aspect is kept at about ``size`` x ``size`` pixels of area,
  both sides rounded to multiples of 16. The offset belongs to the checkpoint, not to the image size: auto
  picks 128 (the 1024 checkpoint) for ``size`` above 768 and 64 otherwise. Both leave the condition rows
  clear of the noisy rows for every aspect the 1024 buckets cover; a taller image can overlap them, which
  is allowed (the positions stay distinct in x or by the offset) but is out of the training distribution.

Resizing uses bilinear filtering with antialiasing (PIL's bilinear, which torchvision uses on PIL images,
is antialiased when it shrinks). Undoing the preparation (``restore_source``) resizes back to the source
size (bicubic); for the centre crop it returns the edited crop at source scale, or pastes it into the
source image when one is given.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .diptych import ImageShapeError, _as_rgb, resize_images
from .errors import ConfigError, X2EditError

PATCH = 16
MODE_BUCKETS = "1024 buckets"
MODE_CROP = "512 centre crop"
MODE_KEEP = "keep aspect"
SOURCE_MODES = (MODE_BUCKETS, MODE_CROP, MODE_KEEP)
OFFSET_1024 = 128
OFFSET_512 = 64
CROP_SIZE = 512
MAX_SIDE = 4096
# (height, width) of X2Edit's 1024 buckets, all multiples of 16
BUCKETS_1024 = (
    (720, 1456),
    (752, 1392),
    (784, 1312),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1312, 784),
    (1392, 752),
    (1456, 720),
)


class SourceGeometryError(X2EditError, ValueError):
    """A source geometry is malformed or does not match the image it is used with."""


@dataclass(frozen=True)
class SourceGeometry:
    """How a source was prepared: resized to (resized_height, resized_width), then the window
    (crop_top, crop_left, height, width) was kept. ``offset`` is the condition tokens' RoPE row offset."""

    mode: str
    source_height: int
    source_width: int
    resized_height: int
    resized_width: int
    crop_top: int
    crop_left: int
    height: int
    width: int
    offset: int

    def __post_init__(self) -> None:
        if self.mode not in SOURCE_MODES:
            raise SourceGeometryError(
                f"Source geometry mode must be one of {SOURCE_MODES}, got {self.mode!r}."
            )
        for name, value in asdict(self).items():
            if name == "mode":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SourceGeometryError(
                    f"Source geometry field {name!r} must be a non-negative integer, got {value!r}."
                )
        if min(self.source_height, self.source_width, self.height, self.width) < 1:
            raise SourceGeometryError("Source geometry sizes must be positive.")
        if self.height % PATCH or self.width % PATCH:
            raise SourceGeometryError(
                f"Prepared size {self.width}x{self.height} is not a multiple of {PATCH}; the geometry was "
                "not made by X2Edit Prepare Source."
            )
        if (
            self.crop_top + self.height > self.resized_height
            or self.crop_left + self.width > self.resized_width
        ):
            raise SourceGeometryError("Source geometry crop window lies outside the resized image.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SourceGeometry:
        if not isinstance(data, dict):
            raise SourceGeometryError(f"Source geometry must be a dict, got {type(data).__name__}.")
        expected = set(cls.__dataclass_fields__)
        if set(data) != expected:
            raise SourceGeometryError(
                f"Source geometry needs exactly the keys {sorted(expected)}, got {sorted(data)}."
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SourceGeometry:
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as err:
            raise SourceGeometryError(f"Source geometry is not valid JSON: {err}.") from err
        return cls.from_dict(data)


def as_source_geometry(value) -> SourceGeometry:
    """A SourceGeometry from itself, its dict or its JSON string."""
    if isinstance(value, SourceGeometry):
        return value
    if isinstance(value, dict):
        return SourceGeometry.from_dict(value)
    if isinstance(value, str):
        return SourceGeometry.from_json(value)
    raise SourceGeometryError(
        f"Expected a source geometry (from X2Edit Prepare Source), got {type(value).__name__}."
    )


def nearest_bucket(height: int, width: int) -> tuple[int, int]:
    """X2Edit's 1024 bucket (height, width) whose height/width ratio is nearest the source's."""
    _check_size(height, width)
    aspect = height / width
    diffs = [abs(bh / bw - aspect) for bh, bw in BUCKETS_1024]
    return BUCKETS_1024[diffs.index(min(diffs))]


def auto_offset(mode: str, size: int = 1024) -> int:
    """RoPE row offset of the checkpoint a mode targets (see the module docstring for keep aspect)."""
    if mode == MODE_BUCKETS:
        return OFFSET_1024
    if mode == MODE_CROP:
        return OFFSET_512
    if mode == MODE_KEEP:
        return OFFSET_1024 if size > 768 else OFFSET_512
    raise ConfigError(f"Unknown source mode {mode!r}; use one of {SOURCE_MODES}.")


def _check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ImageShapeError(f"The image is empty ({width}x{height} pixels); give a real image.")


def _round16(x: float) -> int:
    return max(PATCH, int(x / PATCH + 0.5) * PATCH)


def plan_source(height: int, width: int, mode: str = MODE_BUCKETS, size: int = 1024, offset: int = -1):
    """The SourceGeometry for a ``height`` x ``width`` source; ``offset`` -1 picks ``auto_offset``."""
    _check_size(height, width)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < -1:
        raise ConfigError(f"offset must be -1 (auto) or a non-negative integer, got {offset!r}.")
    if offset == -1:
        offset = auto_offset(mode, size)
    if mode == MODE_BUCKETS:
        h, w = nearest_bucket(height, width)
        return SourceGeometry(mode, height, width, h, w, 0, 0, h, w, offset)
    if mode == MODE_CROP:
        # torchvision: the short side becomes 512, the long side int(long * 512 / short); CenterCrop
        # then starts at round((resized - 512) / 2) (Python rounding).
        if int(width * CROP_SIZE / height) >= CROP_SIZE:
            rh, rw = CROP_SIZE, int(width * CROP_SIZE / height)
        else:
            rh, rw = int(height * CROP_SIZE / width), CROP_SIZE
        top, left = int(round((rh - CROP_SIZE) / 2.0)), int(round((rw - CROP_SIZE) / 2.0))
        return SourceGeometry(mode, height, width, rh, rw, top, left, CROP_SIZE, CROP_SIZE, offset)
    if mode == MODE_KEEP:
        if isinstance(size, bool) or not isinstance(size, int) or size < PATCH:
            raise ConfigError(f"size must be an integer of at least {PATCH}, got {size!r}.")
        scale = (size * size / (height * width)) ** 0.5
        h, w = _round16(height * scale), _round16(width * scale)
        if max(h, w) > MAX_SIDE:
            raise ImageShapeError(
                f"A {width}x{height} image at about {size}x{size} pixels of area with its aspect kept is "
                f"{w}x{h}, more than {MAX_SIDE} pixels on a side. Crop it to a less extreme aspect ratio."
            )
        return SourceGeometry(mode, height, width, h, w, 0, 0, h, w, offset)
    raise ConfigError(f"Unknown source mode {mode!r}; use one of {SOURCE_MODES}.")


def _resize_bilinear(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if images.shape[1] == height and images.shape[2] == width:
        return images
    x = images.movedim(-1, 1).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0).movedim(1, -1).to(images.dtype)


def _check_images(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ImageShapeError(
            f"Expected an IMAGE tensor [batch, height, width, channels], got {shape}. Connect an IMAGE "
            "output."
        )
    return _as_rgb(images)


def prepare_source(
    images: torch.Tensor, mode: str = MODE_BUCKETS, size: int = 1024, offset: int = -1
) -> tuple[torch.Tensor, SourceGeometry]:
    """Resize (and for the centre crop, crop) sources as X2Edit does; returns (images, geometry)."""
    rgb = _check_images(images)
    geometry = plan_source(rgb.shape[1], rgb.shape[2], mode, size, offset)
    out = _resize_bilinear(rgb, geometry.resized_height, geometry.resized_width)
    t, left = geometry.crop_top, geometry.crop_left
    out = out[:, t : t + geometry.height, left : left + geometry.width]
    return out.contiguous(), geometry


def crop_box_in_source(geometry: SourceGeometry) -> tuple[int, int, int, int]:
    """(top, left, height, width) in source pixels of the window the prepared image shows."""
    sy = geometry.source_height / geometry.resized_height
    sx = geometry.source_width / geometry.resized_width
    top, left = round(geometry.crop_top * sy), round(geometry.crop_left * sx)
    bottom = min(geometry.source_height, round((geometry.crop_top + geometry.height) * sy))
    right = min(geometry.source_width, round((geometry.crop_left + geometry.width) * sx))
    return top, left, max(1, bottom - top), max(1, right - left)


def restore_source(
    images: torch.Tensor, geometry: SourceGeometry, source: torch.Tensor | None = None
) -> torch.Tensor:
    """Edited images at the prepared size -> the source's size.

    Buckets and keep aspect: resized to the source size. Centre crop: the edited window resized to the
    size it covers in the source; pasted into ``source`` (same batch, or 1) when it is given, so the
    result has the source's full size with the cropped-off margins unedited.
    """
    geometry = as_source_geometry(geometry)
    rgb = _check_images(images)
    if (rgb.shape[1], rgb.shape[2]) != (geometry.height, geometry.width):
        raise SourceGeometryError(
            f"The image is {rgb.shape[2]}x{rgb.shape[1]} but the geometry describes a prepared size of "
            f"{geometry.width}x{geometry.height}. Connect the geometry from the X2Edit Prepare Source node "
            "that made the edited image's source, and do not resize in between."
        )
    top, left, h, w = crop_box_in_source(geometry)
    if (top, left, h, w) == (0, 0, geometry.source_height, geometry.source_width):
        return resize_images(rgb, geometry.source_height, geometry.source_width).contiguous()
    window = resize_images(rgb, h, w)
    if source is None:
        return window.contiguous()
    base = _check_images(source)
    if (base.shape[1], base.shape[2]) != (geometry.source_height, geometry.source_width):
        raise SourceGeometryError(
            f"The source image is {base.shape[2]}x{base.shape[1]} but the geometry was made from a "
            f"{geometry.source_width}x{geometry.source_height} source."
        )
    if base.shape[0] not in (1, window.shape[0]):
        raise ImageShapeError(
            f"The source batch ({base.shape[0]}) matches neither 1 nor the edited batch ({window.shape[0]})."
        )
    out = base.expand(window.shape[0], -1, -1, -1).clone().to(window.dtype)
    out[:, top : top + h, left : left + w] = window
    return out


# --- the source latent: the VAE posterior's mode or a sample of it -----------------------------------

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # the clamp FLUX's (and SD's) Gaussian VAE posterior applies


def gaussian_posterior(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) in float32 of a diagonal Gaussian VAE posterior from its moments [B, 2C, ...]: the
    first C channels are the mean, the last C the log-variance (clamped as the VAE does)."""
    if moments.ndim < 2 or moments.shape[1] % 2:
        raise ConfigError(
            f"VAE posterior moments need an even channel count, got shape {tuple(moments.shape)}"
        )
    mean, logvar = moments.float().chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))


def posterior_noise(shape, seed: int) -> torch.Tensor:
    """Standard normal noise for a posterior sample: float32 on the CPU from ``seed`` (the same on every
    device)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, seed: int) -> torch.Tensor:
    """mean + std * noise(seed): a draw from the posterior, as X2Edit's pipeline encodes its source."""
    noise = posterior_noise(mean.shape, seed)
    return mean + std * noise.to(mean.device)
