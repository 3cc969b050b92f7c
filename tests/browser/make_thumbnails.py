"""Write the template-browser thumbnails (workflows/<name>.jpg) from the frontend itself.

    .venv/bin/python tests/browser/make_thumbnails.py [--comfyui-root PATH]

Starts a headless ComfyUI (the browser tier's server: tiny models, the repository as the pack), opens each
shipped workflow in Chromium, zooms out to show the whole graph and saves it as a square JPEG, the shape
ComfyUI's template cards show. Run it after changing a workflow's layout; an older release (0.3.x) gives
clean pictures (newer frontends outline loaders whose model files are missing, as they are here).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

TIER_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(TIER_DIR), str(TIER_DIR.parent / "comfy")]

from browser_harness import ComfyPage, find_chromium, missing_browser_reason, seed_user_settings  # noqa: E402
from comfy_harness import REPO_ROOT, ComfyInstall, ComfyServer, find_comfyui  # noqa: E402

THUMBNAIL_SIDE = 512
# Big enough that the whole graph fits near 100% zoom: frontends draw nodes without text when zoomed out.
THUMBNAIL_VIEWPORT = {"width": 2000, "height": 2000}
JPEG_QUALITY = 85


# Shows the whole graph in the largest square the canvas has room for; returns that square (page pixels).
JS_FIT = """(margin) => {
    const canvas = window.app.canvas;
    canvas.show_info = false;
    const titleH = window.LiteGraph.NODE_TITLE_HEIGHT;
    const nodes = window.app.graph.nodes;
    const x0 = Math.min(...nodes.map((n) => n.pos[0])), y0 = Math.min(...nodes.map((n) => n.pos[1] - titleH));
    const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
    const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
    const rect = canvas.canvas.getBoundingClientRect();
    const side = Math.min(rect.width, rect.height) - 2 * margin;
    const scale = side / Math.max(x1 - x0, y1 - y0);
    canvas.ds.scale = scale;
    canvas.ds.offset = [
        margin / scale - x0 + (side / scale - (x1 - x0)) / 2,
        margin / scale - y0 + (side / scale - (y1 - y0)) / 2,
    ];
    canvas.setDirty(true, true);
    return {x: rect.left, y: rect.top, width: side + 2 * margin, height: side + 2 * margin};
}"""


def fit_whole_graph(page) -> dict:
    clip = page.evaluate(JS_FIT, 16)
    page.settle(1.0)
    return clip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--comfyui-root", type=Path, help="ComfyUI checkout (default: as the test tiers find it)"
    )
    args = parser.parse_args(argv)
    reason = missing_browser_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    install = find_comfyui()  # the older releases' frontend outlines no node for a missing model
    if args.comfyui_root:
        install = ComfyInstall(args.comfyui_root, args.comfyui_root / ".venv" / "bin" / "python")
    from PIL import Image
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as base:
        server = ComfyServer(install, Path(base))
        seed_user_settings(server.user_dir)
        server.start()
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=str(find_chromium()), args=["--no-sandbox"]
                )
                page = ComfyPage(browser.new_page(viewport=THUMBNAIL_VIEWPORT), server.url)
                page.open()
                for path in sorted((REPO_ROOT / "workflows").glob("*.json")):
                    page.load(json.loads(path.read_text()))
                    page.dismiss_dialogs()
                    page.settle(1.0)
                    clip = fit_whole_graph(page)
                    png = page.page.screenshot(clip=clip)
                    with Image.open(io.BytesIO(png)) as shot:
                        thumb = shot.convert("RGB").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.LANCZOS)
                        out = path.with_suffix(".jpg")
                        thumb.save(out, "JPEG", quality=JPEG_QUALITY)
                    print(out)
                browser.close()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
