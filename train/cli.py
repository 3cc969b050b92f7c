"""Command line: ``x2edit-train --config run.yaml [--flag value ...]`` (also ``python -m train``)."""

from __future__ import annotations

import sys

from x2edit_core.errors import X2EditError


def main(argv: list[str] | None = None) -> int:
    from .config import parse_config

    try:
        cfg = parse_config(argv)
        from .trainer import Trainer

        result = Trainer(cfg).run()
    except X2EditError as e:
        print(f"x2edit-train: error: {e}", file=sys.stderr)
        return 2
    if result["output"]:
        print(f"x2edit-train: wrote {result['output']} after {result['step']} steps")
    return 0
