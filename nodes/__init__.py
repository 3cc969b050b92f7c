"""ComfyUI node classes of the x2edit pack (thin: the logic is in x2edit_core and nodes/patching.py).

Each node module exposes ``NODES``. A module that fails to import (e.g. a missing optional dependency)
is logged and skipped, so one broken part never takes the whole pack down.
"""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger("x2edit")

NODE_MODULES = (
    "moe_loader",
    "edit_nodes",
    "task_router",
    "early_filter_nodes",
    "edit_score_nodes",
    "x2edit_text_nodes",
    "x2edit_condition",
)


def search_aliases(*aliases: str) -> dict:
    """`io.Schema` keyword giving node-search aliases, on releases whose schema has the field; older
    releases' frontends search only names and display names, so there it is left out."""
    from .comfy_v3 import io

    supported = "search_aliases" in getattr(io.Schema, "__dataclass_fields__", {})
    return {"search_aliases": list(aliases)} if supported else {}


def load_node_classes() -> list:
    classes = []
    for name in NODE_MODULES:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # not shipped
            log.warning("x2edit: nodes.%s not loaded: %s", name, e)
            continue
        except Exception as e:  # noqa: BLE001 - any failure of an optional part must not kill the pack
            log.warning("x2edit: nodes.%s not loaded: %s: %s", name, type(e).__name__, e)
            continue
        classes.extend(getattr(module, "NODES", []))
    return classes
