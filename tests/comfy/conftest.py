"""ComfyUI test tier: tests here drive one real headless ComfyUI (started once per session).

Every test under tests/comfy/ gets the `comfyui` marker. The checkout is COMFYUI_ROOT, else the newest
release laid out by scripts/setup_hosts.sh, else /opt/ComfyUI (its Python: COMFYUI_PYTHON, default
ROOT/.venv/bin/python). Without one the tier is skipped with the reason, or fails when
X2EDIT_REQUIRE_COMFYUI=1 (CI). Servers run with ComfyUI's default caching, as users have it.
Fixtures: `comfy_install`, `comfy_server`, `comfy` (a ComfyClient).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TIER_DIR = Path(__file__).resolve().parent
if str(TIER_DIR) not in sys.path:  # also works under --import-mode=importlib
    sys.path.insert(0, str(TIER_DIR))

from comfy_harness import ComfyClient, ComfyServer, comfyui_required, find_comfyui  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "comfyui: test drives a real headless ComfyUI server (tests/comfy)")


def pytest_collection_modifyitems(config, items):
    install = find_comfyui()
    if (
        not install.available
        and comfyui_required()
        and any(TIER_DIR in Path(str(item.path)).resolve().parents for item in items)
    ):
        raise pytest.UsageError(
            f"{install.missing_reason}; X2EDIT_REQUIRE_COMFYUI is set, so a missing ComfyUI tier is an "
            "error (run scripts/setup_hosts.sh, or point COMFYUI_ROOT at a checkout)"
        )
    skip = None if install.available else pytest.mark.skip(reason=install.missing_reason)
    for item in items:
        if TIER_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.comfyui)
            if skip is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_install():
    install = find_comfyui()
    if not install.available:
        pytest.skip(install.missing_reason)
    return install


@pytest.fixture(scope="session")
def comfy_server(comfy_install, tmp_path_factory):
    """The running ComfyServer (directories, process, log). Stopped at the end of the session."""
    server = ComfyServer(comfy_install, tmp_path_factory.mktemp("comfyui"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def comfy(comfy_server):
    """ComfyClient for the session's server: object_info, queue, run, output_files, add_lora, log..."""
    return ComfyClient(comfy_server)
