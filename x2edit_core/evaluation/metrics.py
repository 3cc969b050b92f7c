"""Edit metrics of the MagicBrush / Emu Edit protocol.

- L1, L2: mean absolute / mean squared difference between the edited image and the ground-truth
  target, per pixel and channel, with values in [0, 1]. When the sizes differ the edited image is
  resized (bicubic) to the target's size.
- CLIP-I: cosine similarity of the CLIP image embeddings (after CLIP's projection) of the edited image
  and the target.
- CLIP-T: cosine similarity of the edited image's CLIP embedding and the CLIP text embedding of the
  target caption (the instruction where a sample has none).
- DINO: cosine similarity of the DINOv2 embeddings (the normalised CLS token, `pooler_output`) of the
  edited image and the target.

The embedders load local transformers folders only (no download) and run batched on the chosen device;
torch and transformers are imported when an embedder is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError

__all__ = ["ClipEmbedder", "DinoEmbedder", "load_rgb", "pixel_errors", "resolve_device"]


def load_rgb(path: str | Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def pixel_errors(edited: Image.Image, target: Image.Image) -> tuple[float, float]:
    """(L1, L2) of the edited image against the target, values in [0, 1]."""
    if edited.size != target.size:
        edited = edited.resize(target.size, Image.Resampling.BICUBIC)
    a = np.asarray(edited.convert("RGB"), dtype=np.float64) / 255.0
    b = np.asarray(target.convert("RGB"), dtype=np.float64) / 255.0
    difference = a - b
    return float(np.abs(difference).mean()), float(np.square(difference).mean())


def resolve_device(name: str = "auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"Unknown device {name!r}: use auto, cpu, cuda or cuda:N.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {name!r} was asked for but no CUDA GPU is available: use auto or cpu.")
    return device


def _check_folder(folder: str | Path, what: str) -> Path:
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"The {what} folder {path} has no config.json: give a local transformers model folder "
            "(config.json, weights and the preprocessor files)."
        )
    return path


class _Embedder:
    def __init__(self, folder: str | Path, device: str, dtype: str, what: str):
        self.folder = _check_folder(folder, what)
        self.device = resolve_device(device)
        self.dtype_name = dtype
        self.model = None
        self.image_processor = None

    def _dtype(self):
        import torch

        if self.dtype_name == "auto":
            return torch.float16 if self.device.type == "cuda" else torch.float32
        if self.dtype_name not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"Unknown dtype {self.dtype_name!r}: use auto, float16, bfloat16 or float32.")
        return getattr(torch, self.dtype_name)

    def _pixels(self, images: Sequence[Image.Image]):
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixels.to(device=self.device, dtype=self._dtype())

    def release(self) -> None:
        self.model = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


class ClipEmbedder(_Embedder):
    """CLIP image and text embeddings (L2-normalised, projected) from a local CLIPModel folder."""

    def __init__(self, folder: str | Path, device: str = "auto", dtype: str = "auto"):
        super().__init__(folder, device, dtype, "CLIP")
        self.tokenizer = None

    def load(self) -> None:
        if self.model is not None:
            return
        import transformers

        try:
            self.image_processor = transformers.CLIPImageProcessor.from_pretrained(
                str(self.folder), local_files_only=True
            )
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(self.folder), local_files_only=True
            )
            model = transformers.CLIPModel.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"Cannot load CLIP from {self.folder}: {exc}") from exc
        self.model = model.to(device=self.device, dtype=self._dtype()).eval()

    def image_embeddings(self, images: Sequence[Image.Image]):
        import torch

        self.load()
        # CLIP's own definition (projection of the pooled vision output), spelled out because what
        # get_image_features returns changed between transformers releases.
        with torch.inference_mode():
            pooled = self.model.vision_model(pixel_values=self._pixels(images)).pooler_output
            features = self.model.visual_projection(pooled).float()
        return torch.nn.functional.normalize(features, dim=-1)

    def text_embeddings(self, texts: Sequence[str]):
        import torch

        self.load()
        max_length = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            pooled = self.model.text_model(**tokens).pooler_output
            features = self.model.text_projection(pooled).float()
        return torch.nn.functional.normalize(features, dim=-1)


class DinoEmbedder(_Embedder):
    """DINOv2 embeddings: the CLS token after the final layer norm, L2-normalised."""

    def __init__(self, folder: str | Path, device: str = "auto", dtype: str = "auto"):
        super().__init__(folder, device, dtype, "DINOv2")

    def load(self) -> None:
        if self.model is not None:
            return
        import transformers

        try:
            self.image_processor = transformers.AutoImageProcessor.from_pretrained(
                str(self.folder), local_files_only=True
            )
            model = transformers.AutoModel.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"Cannot load DINOv2 from {self.folder}: {exc}") from exc
        self.model = model.to(device=self.device, dtype=self._dtype()).eval()

    def image_embeddings(self, images: Sequence[Image.Image]):
        import torch

        self.load()
        with torch.inference_mode():
            output = self.model(pixel_values=self._pixels(images))
            features = output.pooler_output.float()
        return torch.nn.functional.normalize(features, dim=-1)


def cosine_rows(a, b) -> list[float]:
    """Row-wise cosine similarity of two batches of L2-normalised embeddings."""
    return [float(x) for x in (a * b).sum(dim=-1).cpu()]
