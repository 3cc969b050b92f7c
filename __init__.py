"""x2edit: MoE-LoRA loading, in-context editing and early-filter nodes for FLUX.1 in ComfyUI.

ComfyUI loads this folder as a custom node pack through ``comfy_entrypoint`` (V3 API). Outside ComfyUI
(no ``comfy_api``) importing it does nothing, so tools and tests can import the pack's modules freely.
"""

import logging

log = logging.getLogger("x2edit")

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # not running inside ComfyUI
    ComfyExtension = None

if ComfyExtension is not None:

    class X2EditExtension(ComfyExtension):
        async def get_node_list(self):
            from .nodes import load_node_classes

            return load_node_classes()

    async def comfy_entrypoint():
        return X2EditExtension()
