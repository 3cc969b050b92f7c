"""The ComfyUI V3 node API the pack is written against.

A versioned module (``comfy_api.v0_0_2``) keeps its meaning when ComfyUI's ``latest`` moves on, so it is
used where the running ComfyUI has it; releases without it get ``comfy_api.latest``. ``API_MODULE`` names
the one in use.
"""

from __future__ import annotations

import importlib

PINNED_VERSIONS = ("comfy_api.v0_0_2",)
FALLBACK = "comfy_api.latest"


def _api_module():
    for name in PINNED_VERSIONS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if all(hasattr(module, attr) for attr in ("io", "ui", "ComfyExtension")):
            return module
    return importlib.import_module(FALLBACK)


_api = _api_module()
API_MODULE = _api.__name__
io = _api.io
ui = _api.ui
ComfyExtension = _api.ComfyExtension
