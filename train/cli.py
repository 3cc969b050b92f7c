"""Command line.

``x2edit-train --config run.yaml [--flag value ...]`` trains (also ``python -m train``);
``x2edit-train cache --config run.yaml --cache-dir DIR`` writes the VAE latents and text embeddings of
``--data`` to DIR once, and ``x2edit-train --data DIR ...`` then trains without the encoders.
"""

from __future__ import annotations

import sys

from x2edit_core.errors import X2EditError


def main(argv: list[str] | None = None) -> int:
    from .config import parse_config

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["cache"]:
            return _cache(parse_config(argv[1:]))
        cfg = parse_config(argv)
        from .trainer import Trainer

        result = Trainer(cfg).run()
    except X2EditError as e:
        print(f"x2edit-train: error: {e}", file=sys.stderr)
        return 2
    if result["output"]:
        print(f"x2edit-train: wrote {result['output']} after {result['step']} steps")
    return 0


def _cache(cfg) -> int:
    import torch
    from accelerate import Accelerator

    from .latent_cache import write_cache
    from .model import load_transformer
    from .trainer import load_encoders

    acc = Accelerator(cpu=cfg.cpu)
    if cfg.text_encoder == "cached":
        from x2edit_core.errors import ConfigError

        raise ConfigError("x2edit-train cache needs a text encoder (--text-encoder flux or hash)")
    # Only the transformer's config is needed (input channels, text widths): build it on the meta device.
    with torch.device("meta"):
        transformer = load_transformer("", cfg.transformer_config or _transformer_config(cfg.transformer))
    latent_encoder, text_encoder = load_encoders(cfg, transformer, acc.device)
    from tqdm.auto import tqdm

    bar = tqdm(disable=not (acc.is_main_process and cfg.progress), desc="x2edit-train cache", unit="record")
    index = write_cache(cfg, latent_encoder, text_encoder, acc, bar)
    bar.close()
    if acc.is_main_process:
        print(
            f"x2edit-train: cached {index['records']} records in {len(index['shards'])} shards under "
            f"{cfg.cache_dir} ({index['bad_records']} bad records skipped)"
        )
    return 0


def _transformer_config(path: str):
    """The config of ``--transformer`` (a diffusers folder), or None for the shipped FLUX.1 Fill one."""
    import os

    for folder in (os.path.join(path, "transformer"), path):
        if path and os.path.isfile(os.path.join(folder, "config.json")):
            return os.path.join(folder, "config.json")
    return None
