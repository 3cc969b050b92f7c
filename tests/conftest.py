import os
import sys

# tests import their helpers (tiny_models, lora_files) by name, and the pack's core as `x2edit_core`
HERE = os.path.dirname(os.path.abspath(__file__))
for p in (HERE, os.path.dirname(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)
