import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

# Tiny models: threads only add contention on small CPUs.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from tiny import make_manifest, save_tiny_models

    folder = tmp_path_factory.mktemp("tiny")
    transformer, vae = save_tiny_models(str(folder / "models"))
    manifest = make_manifest(str(folder / "data"), n=8)
    return {"root": str(folder), "transformer": transformer, "vae": vae, "manifest": manifest}
