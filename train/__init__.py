"""x2edit training package: MoE-LoRA adapters for FLUX.1 Fill (ICEdit and X2Edit recipes).

Run from the repository root (``python -m train --help``) or through the ``x2edit-train`` console
script. The package imports ``x2edit_core`` absolutely, so the repository root must be on
``sys.path`` (it is when running ``python -m train`` or ``accelerate launch -m train`` from there).
"""

from .config import TrainConfig, make_config, parse_config

__all__ = ["TrainConfig", "make_config", "parse_config"]
