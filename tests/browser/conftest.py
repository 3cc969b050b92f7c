"""Browser tier: ComfyUI's own frontend in headless Chromium, on a real server with the tiny models.

Runs when a Chromium and the `playwright` package are found (see browser_harness.py) and a ComfyUI
checkout is found as for tests/comfy (COMFYUI_ROOT, else the newest release from scripts/setup_hosts.sh).
Otherwise every test is skipped with the reason, or collection fails when X2EDIT_REQUIRE_BROWSER=1 (CI).
Screenshots go to X2EDIT_BROWSER_ARTIFACTS when set, else to a pytest temp folder; the path is printed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TIER_DIR = Path(__file__).resolve().parent
COMFY_TIER_DIR = TIER_DIR.parent / "comfy"
for path in (TIER_DIR, COMFY_TIER_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from browser_harness import (  # noqa: E402
    VIEWPORT,
    ComfyPage,
    browser_required,
    find_chromium,
    missing_browser_reason,
    seed_user_settings,
)
from comfy_harness import ComfyClient, ComfyServer, comfyui_required, find_comfyui  # noqa: E402

_artifacts: list[Path] = []


def _in_tier(item) -> bool:
    return TIER_DIR in Path(str(item.path)).resolve().parents


def tier_missing_reason() -> str:
    reason = missing_browser_reason()
    if reason:
        return reason
    install = find_comfyui()
    if not install.available:
        return install.missing_reason.replace("ComfyUI tier", "browser tier")
    return ""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "browser: drives ComfyUI's frontend in headless Chromium (tests/browser)"
    )


def pytest_collection_modifyitems(config, items):
    mine = [item for item in items if _in_tier(item)]
    if not mine:
        return
    reason = tier_missing_reason()
    if reason and (browser_required() or (comfyui_required() and "ComfyUI" in reason)):
        raise pytest.UsageError(
            f"{reason}; X2EDIT_REQUIRE_BROWSER (or X2EDIT_REQUIRE_COMFYUI) is set, so a browser tier that "
            "cannot run is an error"
        )
    for item in mine:
        item.add_marker(pytest.mark.browser)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_terminal_summary(terminalreporter):
    if _artifacts:
        terminalreporter.write_line(f"browser tier screenshots: {_artifacts[0]}")


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory) -> Path:
    explicit = os.environ.get("X2EDIT_BROWSER_ARTIFACTS")
    path = Path(explicit) if explicit else tmp_path_factory.mktemp("browser_screenshots")
    path.mkdir(parents=True, exist_ok=True)
    _artifacts.append(path)
    return path


@pytest.fixture(scope="session")
def browser_server(tmp_path_factory):
    reason = tier_missing_reason()
    if reason:
        pytest.skip(reason)
    server = ComfyServer(find_comfyui(), tmp_path_factory.mktemp("comfyui_browser"))
    seed_user_settings(server.user_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser_comfy(browser_server):
    """ComfyClient for the browser tier's server (files, object_info, the log)."""
    return ComfyClient(browser_server)


@pytest.fixture(scope="session")
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(find_chromium()),
            # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def comfy_page(chromium, browser_server) -> ComfyPage:
    """One page with ComfyUI's frontend open (the frontend takes seconds to start; tests share it)."""
    context = chromium.new_context(viewport=VIEWPORT)
    page = ComfyPage(context.new_page(), browser_server.url)
    page.open()
    yield page
    context.close()
