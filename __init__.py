"""x2edit: MoE-LoRA loading, in-context editing and early-filter nodes for FLUX.1 in ComfyUI.

ComfyUI loads this folder as a custom node pack through ``comfy_entrypoint`` (V3 API, a versioned
``comfy_api`` module where the host has one: see nodes/comfy_v3.py). Outside ComfyUI (no ``comfy_api``)
importing it does nothing, so tools and tests can import the pack's modules freely.
"""

import logging

log = logging.getLogger("x2edit")

try:
    from .nodes.comfy_v3 import API_MODULE, ComfyExtension
except ImportError:  # not running inside ComfyUI
    ComfyExtension = None

if ComfyExtension is not None:

    class X2EditExtension(ComfyExtension):
        async def get_node_list(self):
            from .nodes import load_node_classes

            log.info("x2edit: nodes on %s", API_MODULE)
            return load_node_classes()

    async def comfy_entrypoint():
        return X2EditExtension()
