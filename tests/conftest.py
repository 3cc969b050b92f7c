import os
import sys

# tests import their helpers (tiny_models, lora_files) by name, and the pack's core as `x2edit_core`
HERE = os.path.dirname(os.path.abspath(__file__))
for p in (HERE, os.path.dirname(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)


def pytest_report_header(config):
    """Say up front whether the ComfyUI tier (tests/comfy) runs, and against which checkout."""
    sys.path.insert(0, os.path.join(HERE, "comfy"))
    from comfy_harness import comfyui_version, find_comfyui

    install = find_comfyui()
    if install.available:
        return f"ComfyUI tier: runs against ComfyUI {comfyui_version(install.root)} at {install.root}"
    return install.missing_reason
