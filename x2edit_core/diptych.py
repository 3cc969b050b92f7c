"""ICEdit diptychs on ComfyUI tensors: IMAGE [B,H,W,C] floats in 0..1, MASK [B,H,W].

ICEdit's official inference (River-Zhang/ICEdit scripts/gradio_demo.py) resizes the source to
width 512 keeping the aspect, pastes it on the left of a black 2W x H canvas, masks the right
half, and crops [W:2W] after decoding. Here:

- both panel sides are rounded to the nearest multiple of 16 (FLUX: VAE /8, then 2x2 patches);
  the official scripts floor to 8 and the official node does not round, which breaks shapes;
- the right half is black like the official canvas. Its content does not matter at denoise 1:
  FLUX Fill's ``InpaintModelConditioning`` greys out the masked pixels for the conditioning
  latent and sampling starts from pure noise;
- every image of a batch is used (the official node keeps only the first);
- RGBA is composited on white (transparent areas often hold arbitrary colours, and a white
  backdrop is what viewers show); grey (C=1) is repeated to RGB;
- resizing is bicubic with antialiasing, clamped to 0..1; when a side already has the target
  size nothing is resampled, so a 512-wide source with a height multiple of 16 round-trips exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError, X2EditError

PATCH = 16
DEFAULT_PANEL_WIDTH = 512
MAX_PANEL_SIDE = 4096  # FLUX at 16x the training area is already far out of distribution


class ImageShapeError(X2EditError, ValueError):
    """An IMAGE or MASK tensor has the wrong rank, channel count or size."""


class GeometryError(X2EditError, ValueError):
    """A diptych geometry is malformed or does not match the image it is used with."""


@dataclass(frozen=True)
class DiptychGeometry:
    """What is needed to undo a diptych: the source size and the panel size (one half)."""

    source_height: int
    source_width: int
    panel_height: int
    panel_width: int
    batch: int

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GeometryError(
                    f"Diptych geometry field {name!r} must be a positive integer, got {value!r}."
                )
        if self.panel_height % PATCH or self.panel_width % PATCH:
            raise GeometryError(
                f"Diptych panel {self.panel_width}x{self.panel_height} is not a multiple of {PATCH}; "
                "the geometry was not made by X2Edit Diptych."
            )

    @property
    def diptych_height(self) -> int:
        return self.panel_height

    @property
    def diptych_width(self) -> int:
        return 2 * self.panel_width

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DiptychGeometry:
        if not isinstance(data, dict):
            raise GeometryError(f"Diptych geometry must be a dict, got {type(data).__name__}.")
        expected = set(cls.__dataclass_fields__)
        if set(data) != expected:
            raise GeometryError(
                f"Diptych geometry needs exactly the keys {sorted(expected)}, got {sorted(data)}."
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DiptychGeometry:
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as err:
            raise GeometryError(f"Diptych geometry is not valid JSON: {err}.") from err
        return cls.from_dict(data)


def as_geometry(value) -> DiptychGeometry:
    """A DiptychGeometry from itself, its dict or its JSON string (e.g. from an API-format workflow)."""
    if isinstance(value, DiptychGeometry):
        return value
    if isinstance(value, dict):
        return DiptychGeometry.from_dict(value)
    if isinstance(value, str):
        return DiptychGeometry.from_json(value)
    raise GeometryError(
        f"Expected a diptych geometry (from X2Edit Diptych), got {type(value).__name__}. Connect the "
        "geometry output of the X2Edit Diptych node that made the image."
    )


def round_to_patch(x: float) -> int:
    """Nearest multiple of 16 (halves round up); 0 when x is below 8."""
    return int((x / PATCH) + 0.5) * PATCH


def panel_size(height: int, width: int, panel_width: int = DEFAULT_PANEL_WIDTH) -> tuple[int, int]:
    """Panel (height, width) for a source: width ``panel_width`` rounded to 16, aspect kept."""
    if isinstance(panel_width, bool) or not isinstance(panel_width, int) or panel_width < PATCH:
        raise ConfigError(f"panel_width must be an integer of at least {PATCH}, got {panel_width!r}.")
    if height < 1 or width < 1:
        raise ImageShapeError(f"The image is empty ({width}x{height} pixels); give a real image.")
    pw = max(PATCH, round_to_patch(panel_width))
    exact_h = pw * height / width
    ph = round_to_patch(exact_h)
    if ph < PATCH:
        raise ImageShapeError(
            f"A {width}x{height} image resized to width {pw} is {exact_h:.1f} pixels high: less than one "
            f"{PATCH}-pixel patch. Crop it to a less extreme aspect ratio or raise panel_width."
        )
    if ph > MAX_PANEL_SIDE or pw > MAX_PANEL_SIDE:
        raise ImageShapeError(
            f"A {width}x{height} image at panel width {pw} gives a {pw}x{ph} panel, larger than "
            f"{MAX_PANEL_SIDE} pixels on a side. Crop it to a less extreme aspect ratio or lower panel_width."
        )
    return ph, pw


def _as_rgb(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ImageShapeError(
            f"Expected an IMAGE tensor [batch, height, width, channels], got {shape}. "
            "Connect an IMAGE output (e.g. Load Image)."
        )
    c = images.shape[-1]
    if c == 3:
        return images
    if c == 1:
        return images.expand(-1, -1, -1, 3)
    if c == 4:
        alpha = images[..., 3:4]
        return images[..., :3] * alpha + (1.0 - alpha)
    raise ImageShapeError(f"Expected 1 (grey), 3 (RGB) or 4 (RGBA) channels, got {c}.")


def resize_images(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic, antialiased resize of [B,H,W,C] to (height, width), values clamped to 0..1."""
    if images.shape[1] == height and images.shape[2] == width:
        return images
    x = images.movedim(-1, 1).float()
    x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0).movedim(1, -1).to(images.dtype)


def make_diptych(
    images: torch.Tensor, panel_width: int = DEFAULT_PANEL_WIDTH
) -> tuple[torch.Tensor, torch.Tensor, DiptychGeometry]:
    """Source on the left, black on the right; mask 1 on the right half.

    Returns (diptych [B, Hp, 2Wp, 3], mask [B, Hp, 2Wp], geometry).
    """
    rgb = _as_rgb(images)
    b, h, w, _ = rgb.shape
    ph, pw = panel_size(h, w, panel_width)
    left = resize_images(rgb, ph, pw)
    diptych = torch.zeros((b, ph, 2 * pw, 3), dtype=left.dtype, device=left.device)
    diptych[:, :, :pw] = left
    mask = torch.zeros((b, ph, 2 * pw), dtype=torch.float32, device=left.device)
    mask[:, :, pw:] = 1.0
    return diptych, mask, DiptychGeometry(h, w, ph, pw, b)


def check_geometry(images: torch.Tensor, geometry: DiptychGeometry) -> None:
    """Raise GeometryError unless ``images`` [B,H,W,C] has the diptych size of ``geometry``."""
    if not isinstance(geometry, DiptychGeometry):
        raise GeometryError(f"Expected a DiptychGeometry, got {type(geometry).__name__}.")
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ImageShapeError(f"Expected an IMAGE tensor [batch, height, width, channels], got {shape}.")
    h, w = images.shape[1], images.shape[2]
    if (h, w) != (geometry.diptych_height, geometry.diptych_width):
        raise GeometryError(
            f"The image is {w}x{h} but the geometry describes a {geometry.diptych_width}x"
            f"{geometry.diptych_height} diptych. Connect the geometry from the X2Edit Diptych node that "
            "made this image, and do not resize the latent in between."
        )


def check_mask(diptych: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise ImageShapeError unless ``mask`` [B,H,W] (or [H,W]) matches the diptych's height and width."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ImageShapeError(f"Expected a MASK tensor [batch, height, width], got {shape}.")
    if diptych.ndim != 4:
        raise ImageShapeError(
            f"Expected an IMAGE tensor [batch, height, width, channels], got {tuple(diptych.shape)}."
        )
    if tuple(mask.shape[-2:]) != tuple(diptych.shape[1:3]):
        raise ImageShapeError(
            f"The mask is {mask.shape[-1]}x{mask.shape[-2]} but the diptych is {diptych.shape[2]}x"
            f"{diptych.shape[1]}. Use the mask made together with the diptych."
        )
    if mask.ndim == 3 and mask.shape[0] not in (1, diptych.shape[0]):
        raise ImageShapeError(
            f"The mask batch ({mask.shape[0]}) matches neither 1 nor the diptych batch ({diptych.shape[0]})."
        )


def crop_right_panel(decoded: torch.Tensor, geometry: DiptychGeometry) -> torch.Tensor:
    """Right panel of a decoded diptych, resized back to the source's exact size.

    The batch may differ from the geometry's (several samples per source); every image is cropped.
    """
    geometry = as_geometry(geometry)
    check_geometry(decoded, geometry)
    right = _as_rgb(decoded)[:, :, geometry.panel_width :]
    return resize_images(right, geometry.source_height, geometry.source_width).contiguous()
