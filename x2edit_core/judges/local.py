"""A judge run by a local transformers VLM folder; transformers is imported only when it loads."""

from __future__ import annotations

import gc
import json
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import JudgeConfigError, JudgeUnavailableError
from .base import (
    IMAGE_LABELS,
    Judge,
    JudgeVerdict,
    image_to_pil,
    limit_image_side,
    validate_prompt_template,
    verdict_from_answer,
)
from .scoring import SCORE_IMAGE_LABELS, EditScore, edit_score_from_answer

# Qwen2-VL's chat format, used when a model folder ships no chat template.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_QWEN_IMAGE_TOKEN = "<|image_pad|>"

_DTYPES = ("auto", "bfloat16", "float16", "float32")


class LocalVLMJudge(Judge):
    """A transformers VLM loaded from a local folder (no download: local_files_only).

    Qwen2-VL and Qwen2.5-VL load through their own classes, other VLMs through
    AutoModelForImageTextToText. The model is loaded on the first `compare` (or `load()`) and
    `release()` frees it (and empties the CUDA cache) so that FLUX gets the memory back; it is
    loaded again when needed. Generation is greedy with `max_new_tokens`.

    dtype: "auto" (bfloat16 on a GPU that supports it, else float16 on GPU, float32 on CPU),
    "bfloat16", "float16" or "float32". device: "auto" (cuda when available), "cpu", "cuda", "cuda:N".
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        dtype: str = "auto",
        device: str = "auto",
        max_new_tokens: int = 128,
        max_image_side: int | None = 1024,
        prompt_template: str | None = None,
        score_prompt_template: str | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir).expanduser()
        if not self.model_dir.is_dir():
            raise JudgeConfigError(
                f"The VLM folder {self.model_dir} does not exist: give a local model folder."
            )
        if not (self.model_dir / "config.json").is_file():
            raise JudgeConfigError(
                f"{self.model_dir} has no config.json, so it is not a transformers model folder: "
                "point to the folder that holds config.json, the *.safetensors weights and the "
                "tokenizer/processor files."
            )
        if dtype not in _DTYPES:
            raise JudgeConfigError(f"Unknown judge dtype {dtype!r}: use one of {', '.join(_DTYPES)}.")
        self.dtype_name = dtype
        self.device_name = device
        self.max_new_tokens = int(max_new_tokens)
        self.max_image_side = max_image_side
        self.prompt_template = None if prompt_template is None else validate_prompt_template(prompt_template)
        self.score_prompt_template = (
            None if score_prompt_template is None else validate_prompt_template(score_prompt_template)
        )
        self.attn_implementation = attn_implementation
        self.model = None
        self.processor = None  # a full multimodal processor, or None when the fallback below is used
        self.tokenizer = None
        self.image_processor = None

    def describe(self) -> str:
        return f"local VLM judge {self.model_dir.name}"

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def estimated_memory_bytes(self) -> int:
        """Size of the weights on disk: what loading takes, about, at the stored dtype."""
        return sum(p.stat().st_size for p in self.model_dir.glob("*.safetensors"))

    def _device(self):
        import torch

        if self.device_name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device_name)
        except (RuntimeError, TypeError) as exc:
            raise JudgeConfigError(
                f"Unknown judge device {self.device_name!r}: use auto, cpu, cuda or cuda:N."
            ) from exc

    def _dtype(self, device):
        import torch

        if self.dtype_name == "auto":
            if device.type == "cuda":
                return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.float32
        return getattr(torch, self.dtype_name)

    def _model_class(self):
        import transformers

        with open(self.model_dir / "config.json", encoding="utf-8") as handle:
            model_type = json.load(handle).get("model_type", "")
        by_type = {
            "qwen2_vl": "Qwen2VLForConditionalGeneration",
            "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
        }
        names = [by_type[model_type]] if model_type in by_type else []
        names += ["AutoModelForImageTextToText", "AutoModelForVision2Seq"]
        for name in names:
            cls = getattr(transformers, name, None)
            if cls is not None:
                return cls
        raise JudgeConfigError(
            f"The installed transformers {transformers.__version__} has no class for VLM type "
            f"{model_type!r}: update transformers."
        )

    def load(self) -> None:
        """Load the processor and the model (no-op when loaded)."""
        if self.model is not None:
            return
        import transformers

        device = self._device()
        dtype = self._dtype(device)
        self._load_processor()
        cls = self._model_class()
        # transformers renamed torch_dtype to dtype in 4.56.
        dtype_key = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
        kwargs: dict[str, Any] = {"local_files_only": True, dtype_key: dtype}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        try:
            model = cls.from_pretrained(str(self.model_dir), **kwargs)
        except (OSError, ValueError) as exc:
            raise JudgeConfigError(f"Cannot load the VLM from {self.model_dir}: {exc}") from exc
        self.model = model.to(device).eval()

    def _load_processor(self) -> None:
        import transformers

        folder = str(self.model_dir)
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
            if not hasattr(self.processor, "image_processor"):
                raise ValueError("the folder's processor is not a multimodal processor")
            self.tokenizer = self.processor.tokenizer
            self.image_processor = self.processor.image_processor
            return
        except (ImportError, ValueError, TypeError, AttributeError, OSError) as exc:
            # Qwen2-VL's processor also wants a video processor, which needs torchvision; without it,
            # build the prompt ourselves from the tokenizer and the image processor.
            processor_problem = exc
        self.processor = None
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.image_processor = transformers.AutoImageProcessor.from_pretrained(
                folder, local_files_only=True
            )
        except (ImportError, ValueError, TypeError, OSError) as exc:
            raise JudgeConfigError(
                f"Cannot load the processor of {folder} ({processor_problem}) nor its tokenizer and image "
                f"processor ({exc}): the folder needs the tokenizer and preprocessor files of the model."
            ) from exc
        if self.tokenizer.convert_tokens_to_ids(_QWEN_IMAGE_TOKEN) in (None, self.tokenizer.unk_token_id):
            raise JudgeConfigError(
                f"Cannot load the processor of {folder} ({processor_problem}), and the fallback only knows "
                "Qwen-VL style prompts: install what the processor needs (often torchvision)."
            )

    def _chat_template(self) -> str | None:
        """The Qwen-VL template when the folder ships none, else None (the folder's own is used)."""
        owner = self.processor if self.processor is not None else self.tokenizer
        return None if getattr(owner, "chat_template", None) else QWEN_VL_CHAT_TEMPLATE

    def encode(
        self,
        images: list[Image.Image],
        instruction: str,
        labels: tuple[str, ...] = IMAGE_LABELS,
        text: str | None = None,
    ) -> dict:
        """Model inputs (tensors on CPU) for the labelled images and the prompt (`text`, else the
        pairwise prompt for `instruction`)."""
        content: list[dict] = []
        for label in labels:
            content.append({"type": "text", "text": label})
            content.append({"type": "image"})
        content.append({"type": "text", "text": self.prompt(instruction) if text is None else text})
        messages = [{"role": "user", "content": content}]
        owner = self.processor if self.processor is not None else self.tokenizer
        fallback_template = self._chat_template()
        template_kwargs = {"chat_template": fallback_template} if fallback_template else {}
        text = owner.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **template_kwargs
        )
        if self.processor is not None:
            return dict(self.processor(text=[text], images=images, return_tensors="pt"))
        return self._encode_qwen_fallback(text, images)

    def _encode_qwen_fallback(self, text: str, images: list[Image.Image]) -> dict:
        import inspect

        vision = dict(self.image_processor(images=images, return_tensors="pt"))
        grids = vision["image_grid_thw"]
        pieces = text.split(_QWEN_IMAGE_TOKEN)
        if len(pieces) != len(images) + 1:
            raise JudgeConfigError(
                f"The chat template of {self.model_dir} produced {len(pieces) - 1} image slots for "
                f"{len(images)} images: the folder's chat template does not fit the Qwen-VL format."
            )
        merge = int(getattr(self.image_processor, "merge_size", 2)) ** 2
        expanded = pieces[0]
        for grid, piece in zip(grids, pieces[1:]):
            expanded += _QWEN_IMAGE_TOKEN * int(grid.prod().item() // merge) + piece
        inputs = dict(self.tokenizer([expanded], return_tensors="pt", add_special_tokens=False))
        inputs.update(vision)
        if self.model is None or "mm_token_type_ids" in inspect.signature(self.model.forward).parameters:
            image_id = self.tokenizer.convert_tokens_to_ids(_QWEN_IMAGE_TOKEN)
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_id).long()
        return inputs

    def compare(self, original: Any, candidate_1: Any, candidate_2: Any, instruction: str) -> JudgeVerdict:
        text = self.prompt(instruction)  # an empty instruction fails here, before loading anything
        answer = self._generate([candidate_1, candidate_2, original], IMAGE_LABELS, instruction, text)
        return verdict_from_answer(answer)

    def score(
        self, source: Any, edited: Any, instruction: str, *, prompt_template: str | None = None
    ) -> EditScore:
        text = self.score_prompt(instruction, prompt_template)
        answer = self._generate([source, edited], SCORE_IMAGE_LABELS, instruction, text)
        return edit_score_from_answer(answer)

    def _generate(self, pictures: list[Any], labels: tuple[str, ...], instruction: str, text: str) -> str:
        """The model's greedy answer to the labelled images and the prompt text."""
        import torch

        self.load()
        images = [limit_image_side(image_to_pil(im), self.max_image_side) for im in pictures]
        inputs = self.encode(images, instruction, labels, text)
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        moved = {}
        for key, value in inputs.items():
            if hasattr(value, "to"):
                value = (
                    value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
                )
            moved[key] = value
        pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        try:
            with torch.inference_mode():
                output = self.model.generate(
                    **moved, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad_id
                )
        except torch.cuda.OutOfMemoryError as exc:
            raise JudgeUnavailableError(
                f"The local judge ran out of GPU memory: {exc}. Lower max image side, use a smaller "
                "VLM, or run the judge on another device."
            ) from exc
        new_tokens = output[:, moved["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()

    def release(self) -> None:
        """Drop the model and processor and empty the CUDA cache; `compare` reloads when needed."""
        model = self.model
        self.model = None
        self.processor = None
        self.tokenizer = None
        self.image_processor = None
        if model is not None:
            try:
                model.to("cpu")  # frees the GPU copy even if a caller still holds a reference
            except (RuntimeError, ValueError):
                pass
            del model
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = re.match(r"\d+", piece)
        parts.append(int(digits.group(0)) if digits else 0)
    return tuple(parts)
