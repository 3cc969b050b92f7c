"""Drive ComfyUI's own frontend in headless Chromium (Playwright on the system browser).

The browser tier needs a Chromium binary (X2EDIT_CHROMIUM, else `chromium`/`chromium-browser`/
`google-chrome` on PATH; scripts/setup_browser.sh installs Debian's) and the `playwright` package (the dev
extra). Playwright's own browser download is never used: the system browser is passed as its executable.

Everything here works on the frontends of every supported ComfyUI release; where their pages differ (the
Run button, the node search box) both forms are looked for and the test fails when neither is found.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
VIEWPORT = {"width": 1920, "height": 1080}

# Settings a user who has already used ComfyUI has: no first-run template browser over the canvas, no
# minimap over the nodes. Written to the server's user directory before it starts.
USER_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
}


def browser_required() -> bool:
    """X2EDIT_REQUIRE_BROWSER=1 (on in CI) turns a missing browser tier into an error."""
    return os.environ.get("X2EDIT_REQUIRE_BROWSER", "").strip().lower() in ("1", "true", "yes")


def find_chromium() -> Path | None:
    explicit = os.environ.get("X2EDIT_CHROMIUM")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def missing_browser_reason() -> str:
    """Why the browser tier cannot run here ("" when it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "browser tier skipped: the `playwright` package is not installed (pip install -e '.[dev]')"
    chromium = find_chromium()
    if chromium is None:
        where = os.environ.get("X2EDIT_CHROMIUM") or "PATH (" + ", ".join(CHROMIUM_NAMES) + ")"
        return f"browser tier skipped: no Chromium found at {where}; run scripts/setup_browser.sh"
    return ""


def seed_user_settings(user_dir: Path) -> None:
    settings = Path(user_dir) / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(settings.read_text()) if settings.is_file() else {}
    settings.write_text(json.dumps({**current, **USER_SETTINGS}, indent=1))


def http_json(url: str, timeout: float = 30.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode())


# --- page scripts (plain JS, run with page.evaluate) ---------------------------------------------------

JS_READY = "() => !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph)"

JS_LOAD = """async (wf) => {
    await window.app.loadGraphData(wf);
    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
    return true;
}"""

# Nodes the frontend could not build from a registered node type: what its missing-nodes warning lists.
JS_UNREGISTERED = """() => window.app.graph.nodes
    .filter((n) => !(n.type in window.LiteGraph.registered_node_types))
    .map((n) => `${n.id}:${n.type}`)"""

JS_SERIALIZED = "() => window.app.graph.serialize()"

# Each node's box on the canvas (graph units: the body from pos, plus the title bar above it), the view
# transform and the canvas' size on the page.
JS_LAYOUT = """() => {
    const titleH = window.LiteGraph.NODE_TITLE_HEIGHT;
    const nodes = window.app.graph.nodes.map((n) => ({
        id: n.id, type: n.type, title: n.title,
        box: [n.pos[0], n.pos[1] - titleH, n.size[0], n.size[1] + titleH],
    }));
    const ds = window.app.canvas.ds;
    const rect = window.app.canvas.canvas.getBoundingClientRect();
    return {nodes, scale: ds.scale, offset: Array.from(ds.offset),
            canvas: [rect.left, rect.top, rect.width, rect.height],
            viewport: [window.innerWidth, window.innerHeight]};
}"""

# The tiny-model stand-ins. Values are set on the widgets the user would change, and the text-encoder
# loader is swapped for the test support pack's CLIP (CLIP-L + T5 cannot be tiny) with the same links.
JS_SUBSTITUTE = """(subs) => {
    const graph = window.app.graph;
    const done = [];
    const setWidget = (node, name, value) => {
        const w = (node.widgets || []).find((w) => w.name === name);
        if (!w) throw new Error(`node ${node.id} (${node.type}) has no widget ${name}`);
        w.value = value;
        if (w.callback) w.callback(value);
        done.push(`${node.type}.${name} = ${JSON.stringify(value)}`);
    };
    for (const node of [...graph.nodes]) {
        const values = subs.widgets[node.type] || {};
        for (const [name, value] of Object.entries(values)) setWidget(node, name, value);
        const replacement = subs.replace[node.type];
        if (!replacement) continue;
        const fresh = window.LiteGraph.createNode(replacement);
        if (!fresh) throw new Error(`cannot create ${replacement}`);
        fresh.pos = [node.pos[0], node.pos[1]];
        graph.add(fresh);
        node.outputs.forEach((output, slot) => {
            for (const linkId of [...(output.links || [])]) {
                const link = graph.getLink ? graph.getLink(linkId) : graph.links[linkId];
                fresh.connect(slot, graph.getNodeById(link.target_id), link.target_slot);
            }
        });
        graph.remove(node);
        done.push(`${node.type} -> ${replacement}`);
    }
    graph.setDirtyCanvas(true, true);
    return done;
}"""

# Images the frontend has loaded into a node's preview (what the user sees under Save Image).
JS_NODE_IMAGES = """(id) => {
    const node = window.app.graph.getNodeById(id);
    return (node && node.imgs ? node.imgs : []).map((img) => ({
        src: img.src, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight}));
}"""

# Results of the open node search box: options of the listbox (both frontends render the results as
# ARIA options).
JS_SEARCH_RESULTS = """() => Array.from(document.querySelectorAll('[role=option]'))
    .filter((e) => e.offsetParent !== null)
    .map((e) => e.innerText.replace(/\\s+/g, ' ').trim())"""

# A visible text field has the keyboard focus (the node search box focuses its own when it opens).
JS_TEXT_FIELD_FOCUSED = """() => {
    const e = document.activeElement;
    return !!e && e.tagName === 'INPUT' && e.type === 'text' && e.offsetParent !== null;
}"""

JS_DECODE_IMAGE = """async (src) => {
    const img = new Image();
    img.src = src;
    try { await img.decode(); } catch (e) { return {error: String(e)}; }
    return {width: img.naturalWidth, height: img.naturalHeight};
}"""


class ComfyPage:
    """One Chromium page on a running ComfyUI, with the helpers the tests use."""

    def __init__(self, page, url: str):
        self.page = page
        self.url = url
        self.console: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    def open(self, timeout: float = 120.0) -> None:
        self.page.goto(self.url)
        self.page.wait_for_function(JS_READY, timeout=timeout * 1000)
        # The app registers node types and settings after the canvas exists; wait for the pack's nodes.
        self.page.wait_for_function(
            "() => 'X2EditDiptych' in window.LiteGraph.registered_node_types", timeout=timeout * 1000
        )
        self.settle()

    def settle(self, seconds: float = 0.5) -> None:
        time.sleep(seconds)

    def evaluate(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def load(self, workflow: dict) -> None:
        self.evaluate(JS_LOAD, workflow)
        self.settle(1.0)

    def unregistered_nodes(self) -> list[str]:
        return self.evaluate(JS_UNREGISTERED)

    def serialized(self) -> dict:
        return self.evaluate(JS_SERIALIZED)

    def layout(self) -> dict:
        return self.evaluate(JS_LAYOUT)

    def visible_text(self) -> str:
        return self.evaluate("() => document.body.innerText")

    def substitute(self, widgets: dict, replace: dict) -> list[str]:
        return self.evaluate(JS_SUBSTITUTE, {"widgets": widgets, "replace": replace})

    def node_images(self, node_id: int) -> list[dict]:
        return self.evaluate(JS_NODE_IMAGES, node_id)

    def decode_image(self, src: str) -> dict:
        return self.evaluate(JS_DECODE_IMAGE, src)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return path

    def open_dialogs(self) -> int:
        return self.evaluate(
            "() => Array.from(document.querySelectorAll('[role=dialog]'))"
            ".filter((e) => e.offsetParent !== null).length"
        )

    def dismiss_dialogs(self) -> None:
        """Close every open dialog (Escape closes the top one)."""
        for _ in range(6):
            if not self.open_dialogs():
                return
            self.page.keyboard.press("Escape")
            self.settle(0.3)
        raise AssertionError("dialogs do not close with Escape:\n" + self.visible_text()[-2000:])

    def search_nodes(self, query: str) -> list[str]:
        """Open the node search box as a user does (double-click on empty canvas), type `query`, and
        return the text of each result the box shows."""
        left, top, width, height = self.evaluate(
            "() => { const r = window.app.canvas.canvas.getBoundingClientRect(); "
            "return [r.left, r.top, r.width, r.height]; }"
        )
        # The box opens with its text field focused; on a busy machine that can take over a second, and
        # keys typed before it opens go to the canvas. A double-click the frontend missed is repeated.
        for _ in range(3):
            self.page.mouse.dblclick(left + width / 2, top + height / 2)
            if self._wait_until(JS_TEXT_FIELD_FOCUSED, timeout=5.0):
                break
        else:
            raise AssertionError("the node search box did not open on a double-click on the empty canvas")
        self.page.keyboard.type(query)
        self.settle(1.5)
        return self.evaluate(JS_SEARCH_RESULTS)

    def _wait_until(self, script: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(script):
                return True
            self.settle(0.2)
        return bool(self.evaluate(script))

    def wait_for_node_image(self, node_id, timeout: float = 30.0) -> list[dict]:
        """The images the frontend shows under a node once they have loaded ([] if none in time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            images = self.node_images(node_id)
            if images and all(i["complete"] and i["width"] > 0 for i in images):
                return images
            self.settle(0.3)
        return self.node_images(node_id)

    def click_run(self) -> None:
        """Press the frontend's Run (queue) button, as a user does."""
        button = self.page.locator('[data-testid="queue-button"]')
        if button.count() == 0:
            button = self.page.get_by_role("button", name="Run", exact=True)
        if button.count() == 0:
            raise AssertionError("no Run button found on the page:\n" + self.visible_text()[:2000])
        button.first.click()


def overlaps(layout: dict, gap: float = 0.0) -> list[str]:
    """Pairs of nodes whose boxes (title included) overlap or come closer than `gap` graph units."""
    found = []
    nodes = layout["nodes"]
    for i, a in enumerate(nodes):
        ax, ay, aw, ah = a["box"]
        for b in nodes[i + 1 :]:
            bx, by, bw, bh = b["box"]
            if ax < bx + bw + gap and bx < ax + aw + gap and ay < by + bh + gap and by < ay + ah + gap:
                found.append(f"{a['title']} ({a['id']}) / {b['title']} ({b['id']})")
    return found


def screen_extent(layout: dict) -> tuple[float, float, float, float]:
    """Left, top, right, bottom of all nodes in page pixels under the workflow's saved view."""
    scale, (ox, oy) = layout["scale"], layout["offset"]
    left, top = layout["canvas"][0], layout["canvas"][1]
    xs0 = [(n["box"][0] + ox) * scale + left for n in layout["nodes"]]
    ys0 = [(n["box"][1] + oy) * scale + top for n in layout["nodes"]]
    xs1 = [(n["box"][0] + n["box"][2] + ox) * scale + left for n in layout["nodes"]]
    ys1 = [(n["box"][1] + n["box"][3] + oy) * scale + top for n in layout["nodes"]]
    return min(xs0), min(ys0), max(xs1), max(ys1)


def wait_for_new_history(base_url: str, before: set, timeout: float = 180.0) -> tuple[str, dict]:
    """The first prompt that appears in /history after `before` (its ids), once it has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = http_json(f"{base_url}/history")
        for prompt_id, entry in history.items():
            if prompt_id in before:
                continue
            status = entry.get("status", {})
            if status.get("status_str") == "error" or status.get("completed"):
                return prompt_id, entry
        time.sleep(0.5)
    raise TimeoutError(
        f"no new prompt finished within {timeout:.0f} s; queue: {http_json(base_url + '/queue')}"
    )
