"""Every shipped workflow in ComfyUI's own frontend (headless Chromium) on a real server.

Per workflow: it loads with no missing node, its widget values and output names survive loading, its
model metadata reaches the frontend's missing-models check, its layout is readable at 100% zoom on a
1920x1080 screen, and its template thumbnail is served. One workflow is run from the Run button on tiny
models: in page JS, before queueing, the model files are swapped for the tiny ones, DualCLIPLoader for
the test pack's X2EditTestCLIP (CLIP-L + T5 cannot be tiny), the source image for a small test image, the
panel width for 64 and the steps for 2. Screenshots of each loaded workflow and of the result are saved.
"""

from __future__ import annotations

import copy
import json
import os

import lora_files
import pytest
import torch
from browser_harness import VIEWPORT, http_json, overlaps, screen_extent, wait_for_new_history
from comfy_harness import REPO_ROOT
from PIL import Image

WORKFLOW_DIR = REPO_ROOT / "workflows"
ALL_WORKFLOWS = sorted(p.stem for p in WORKFLOW_DIR.glob("*.json"))
# Workflows held to every check below (metadata, layout, ...); every workflow in the folder gets the
# template-listing and thumbnail check.
WORKFLOWS = sorted(
    os.environ.get("X2EDIT_BROWSER_WORKFLOWS", "").split(",")
    if os.environ.get("X2EDIT_BROWSER_WORKFLOWS")
    else (
        "icedit_moe_early_filter",
        "icedit_moe_lora",
        "icedit_normal_lora",
        "x2edit_edit",
        "x2edit_task_routed",
    )
)
PACK = "x2edit"  # the pack's folder name under custom_nodes (the test server links the repository so)
HF = "https://huggingface.co/"

# The file each loader names, where it goes, and where the frontend may download it from.
EXPECTED_MODELS = {
    "flux1-fill-dev.safetensors": ("diffusion_models", "black-forest-labs/FLUX.1-Fill-dev/"),
    "clip_l.safetensors": ("text_encoders", "comfyanonymous/flux_text_encoders/"),
    "t5xxl_fp16.safetensors": ("text_encoders", "comfyanonymous/flux_text_encoders/"),
    "ae.safetensors": ("vae", "Comfy-Org/Lumina_Image_2.0_Repackaged/"),
    "ICEdit-normal-LoRA.safetensors": ("loras", "RiverZ/normal-lora/"),
    "ICEdit-MoE-LoRA.safetensors": ("loras", "sanaka87/ICEdit-MoE-LoRA/"),
    "flux1-dev.safetensors": ("diffusion_models", "black-forest-labs/FLUX.1-dev/"),
    "qwen_2.5_vl_7b.safetensors": ("text_encoders", "Comfy-Org/Qwen-Image_ComfyUI/"),
}
# Files inside a checkpoint folder (several files side by side), which no single link can fetch: a trained
# task-aware folder is the user's own; X2Edit's released folder is downloaded whole (see the note).
FOLDER_FILES = {"x2edit_task_moe/lora.safetensors", "x2edit/lora.safetensors"}
# These need the licence accepted on the hub and a token.
GATED = {"flux1-fill-dev.safetensors", "flux1-dev.safetensors"}
MODEL_LOADERS = {
    "UNETLoader",
    "DualCLIPLoader",
    "CLIPLoader",
    "VAELoader",
    "LoraLoaderModelOnly",
    "X2EditMoELoRALoader",
}

# Node types that are ICEdit's pieces; node search for "icedit" must find them.
ICEDIT_NODES = (
    "X2EditICPrompt",
    "X2EditDiptych",
    "X2EditCropDiptych",
    "X2EditMoELoRALoader",
    "X2EditEarlyFilter",
    "X2EditEarlyFilterAdvanced",
)

RUN_WORKFLOWS = ("icedit_moe_lora",)
MAX_GRAPH_SCALE_ERROR = 1e-6
MENU_CLEARANCE = (60, 84)  # page pixels taken by the side bar (left) and the tab and tool bars (top)


def read_workflow(name: str) -> dict:
    return json.loads((WORKFLOW_DIR / f"{name}.json").read_text())


def widget_values(node: dict) -> list:
    return list(node.get("widgets_values") or [])


@pytest.fixture(scope="module")
def loaded(comfy_page, artifacts_dir):
    """Load each workflow once (as a user opening it) and record what the frontend made of it."""
    results = {}
    for name in WORKFLOWS:
        comfy_page.load(read_workflow(name))
        results[name] = {
            "unregistered": comfy_page.unregistered_nodes(),
            "graph": comfy_page.serialized(),
            "layout": comfy_page.layout(),
            "text": comfy_page.visible_text(),
            "screenshot": comfy_page.screenshot(artifacts_dir / f"loaded_{name}.png"),
        }
        comfy_page.dismiss_dialogs()
        comfy_page.screenshot(artifacts_dir / f"loaded_{name}_no_dialog.png")
    print(f"\nscreenshots of the loaded workflows: {artifacts_dir}")
    return results


# --- loading -----------------------------------------------------------------------------------------


def test_the_missing_node_check_catches_an_unknown_node(comfy_page):
    """The check used below is the frontend's own: it must flag a node type that no pack provides."""
    workflow = copy.deepcopy(read_workflow("icedit_normal_lora"))
    workflow["nodes"][1]["type"] = "X2EditNoSuchNode"
    comfy_page.load(workflow)
    missing = comfy_page.unregistered_nodes()
    comfy_page.dismiss_dialogs()
    assert any(entry.endswith(":X2EditNoSuchNode") for entry in missing), missing


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_loads_with_every_node_installed(loaded, name):
    assert loaded[name]["unregistered"] == []
    assert "Some Nodes Are Missing" not in loaded[name]["text"]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_widget_values_and_output_names_survive_loading(loaded, name):
    file_nodes = {str(n["id"]): n for n in read_workflow(name)["nodes"]}
    graph_nodes = {str(n["id"]): n for n in loaded[name]["graph"]["nodes"]}
    assert graph_nodes.keys() == file_nodes.keys()
    for node_id, saved in file_nodes.items():
        after = graph_nodes[node_id]
        assert widget_values(after) == widget_values(saved), f"{name} node {node_id} ({saved['type']})"
        saved_names = [o["name"] for o in saved.get("outputs") or []]
        # Newer releases give some core nodes more outputs (Save Image passes its images on): the outputs
        # the file has keep their names, new ones come after them.
        after_names = [o["name"] for o in after.get("outputs") or []][: len(saved_names)]
        assert after_names == saved_names, f"{name} node {node_id} ({saved['type']})"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_outputs_have_names_not_bare_types(browser_comfy, name):
    """An output of an x2edit node shows its own name (e.g. `report`), never the bare type (`STRING`)."""
    info = browser_comfy.object_info()
    for node in read_workflow(name)["nodes"]:
        if not node["type"].startswith("X2Edit"):
            continue
        names = info[node["type"]]["output_name"]
        assert [o["name"] for o in node.get("outputs") or []] == names, (name, node["type"])
        types = info[node["type"]]["output"]
        assert all(n != t for n, t in zip(names, types) if t != "MODEL"), (node["type"], names, types)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_widgets_fed_by_links_store_no_text(name):
    """A widget whose input is linked is not used; a stale value in it would only mislead a reader."""
    for node in read_workflow(name)["nodes"]:
        linked = [s["widget"]["name"] for s in node.get("inputs") or [] if s.get("widget") and s.get("link")]
        if "instruction" in linked:
            assert widget_values(node)[0] == "", (name, node["type"], widget_values(node)[0])


# --- models ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WORKFLOWS)
def test_every_model_file_carries_its_folder_and_source(name):
    """Each loader's file has ComfyUI's model metadata ({name, url, directory} in properties.models),
    except files in a checkpoint folder, which have no single-file source."""
    for node in read_workflow(name)["nodes"]:
        if node["type"] not in MODEL_LOADERS:
            continue
        files = [v for v in widget_values(node) if isinstance(v, str) and v.endswith(".safetensors")]
        entries = {m["name"]: m for m in node["properties"].get("models", [])}
        for file in files:
            if file not in EXPECTED_MODELS:
                assert file in FOLDER_FILES and file not in entries, (name, file)
                continue
            directory, repo = EXPECTED_MODELS[file]
            assert entries[file]["directory"] == directory, (name, file)
            assert entries[file]["url"].startswith(HF + repo), (name, file)
            assert entries[file]["url"].endswith(".safetensors"), (name, file)
        assert set(entries) <= set(files), (name, node["type"], "metadata for a file the node does not load")


@pytest.mark.parametrize("name", WORKFLOWS)
def test_gated_models_are_named_in_the_note(name):
    notes = " ".join(
        str(v)
        for n in read_workflow(name)["nodes"]
        if n["type"] in ("Note", "MarkdownNote")
        for v in n["widgets_values"]
    )
    for file in GATED:
        if file in notes:
            assert "gated" in notes.lower(), name


@pytest.mark.parametrize("name", WORKFLOWS)
def test_the_frontend_lists_the_missing_models_from_the_metadata(loaded, browser_comfy, name):
    """The tiny test server has none of the real models. Where the frontend's missing-models dialog lists
    them (`directory / file`), every file with metadata is listed; frontends that show missing models on
    the nodes instead (newer releases) flag each loader node."""
    files = sorted(
        {
            m["name"]
            for n in read_workflow(name)["nodes"]
            for m in (n.get("properties") or {}).get("models", [])
        }
    )
    assert files, f"{name} carries no model metadata"
    text = loaded[name]["text"]
    if "Missing Models" in text:
        for file in files:
            assert f"{EXPECTED_MODELS[file][0]} / {file}" in text, (name, file)
        assert "Download not allowed" not in text and "Only allowed suffixes" not in text
    else:
        assert "error" in text.lower(), f"{name}: no missing-models warning of any kind:\n{text[-1500:]}"


# --- layout ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WORKFLOWS)
def test_layout_is_readable_at_100_percent_on_a_1920_screen(loaded, name):
    layout = loaded[name]["layout"]
    assert abs(layout["scale"] - 1.0) < MAX_GRAPH_SCALE_ERROR, "the saved view must open at 100% zoom"
    assert overlaps(layout, gap=10) == [], "nodes overlap or touch (title bars included)"
    left, top, right, bottom = screen_extent(layout)
    width, height = layout["viewport"]
    assert (width, height) == (VIEWPORT["width"], VIEWPORT["height"])
    # Clear of the side bar and the top bars, which newer frontends draw over the canvas.
    assert left >= max(layout["canvas"][0], MENU_CLEARANCE[0]), (left, layout["canvas"])
    assert top >= max(layout["canvas"][1], MENU_CLEARANCE[1]), (top, layout["canvas"])
    assert right <= width and bottom <= height, (
        f"graph reaches ({right:.0f}, {bottom:.0f}) on {width}x{height}"
    )


# --- templates and search ----------------------------------------------------------------------------


def test_template_browser_lists_every_workflow_with_its_thumbnail(comfy_page, browser_server):
    listed = http_json(f"{browser_server.url}/api/workflow_templates")
    assert sorted(listed.get(PACK, [])) == ALL_WORKFLOWS
    for name in ALL_WORKFLOWS:
        # The frontend asks for <workflow>.jpg beside the json for a custom node pack's template.
        thumb = WORKFLOW_DIR / f"{name}.jpg"
        assert thumb.is_file(), f"no thumbnail {thumb.name}"
        with Image.open(thumb) as image:
            assert image.format == "JPEG"
        decoded = comfy_page.decode_image(f"/api/workflow_templates/{PACK}/{name}.jpg")
        assert decoded.get("width", 0) > 0, (name, decoded)


def test_node_search_finds_icedit(comfy_page, browser_comfy, artifacts_dir):
    info = browser_comfy.object_info()
    comfy_page.evaluate("() => window.app.graph.clear()")
    found = comfy_page.search_nodes("icedit")
    comfy_page.screenshot(artifacts_dir / "node_search_icedit.png")
    comfy_page.dismiss_dialogs()
    expected = [n for n in ICEDIT_NODES if "ICEdit" in info[n]["display_name"]]
    # Releases whose node definitions carry search aliases are searched by them too.
    expected += [
        n for n in ICEDIT_NODES if any("icedit" in a.lower() for a in info[n].get("search_aliases") or [])
    ]
    assert expected, "no x2edit node names ICEdit in its display name or aliases"
    shown = " | ".join(found)
    for node_type in sorted(set(expected)):
        assert info[node_type]["display_name"] in shown, (node_type, found)


# --- a run from the Run button -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_loras(browser_comfy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser_loras")
    icedit = lora_files.write_icedit(
        folder / "icedit.safetensors",
        hidden=64,
        num_double=2,
        num_single=2,
        x_embedder_in=384,
        experts=4,
        rank=4,
        dtype=torch.float32,
    )
    browser_comfy.add_lora("browser_tiny_icedit_moe.safetensors", icedit)
    lora_files.write_x2edit_dir(
        browser_comfy.loras_dir / "browser_tiny_x2edit",
        hidden=64,
        num_double=2,
        num_single=2,
        experts=3,
        rank=2,
    )
    return {
        "icedit_normal_lora": browser_comfy.models["fill_lora"],
        "icedit_moe_lora": "browser_tiny_icedit_moe.safetensors",
        "x2edit_task_routed": "browser_tiny_x2edit/lora.safetensors",
    }


@pytest.mark.parametrize("name", RUN_WORKFLOWS)
def test_workflow_runs_from_the_run_button(
    comfy_page, browser_comfy, browser_server, tiny_loras, artifacts_dir, tmp_path, name
):
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand((50, 77, 3), generator=generator) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "source.png")
    image = browser_comfy.add_input_file("browser_source.png", tmp_path / "source.png")

    comfy_page.load(read_workflow(name))
    comfy_page.dismiss_dialogs()
    lora = tiny_loras[name]
    done = comfy_page.substitute(
        widgets={
            "LoadImage": {"image": image},
            "UNETLoader": {"unet_name": browser_comfy.models["fill"]},
            "VAELoader": {"vae_name": browser_comfy.models["vae"]},
            "LoraLoaderModelOnly": {"lora_name": lora},
            "X2EditMoELoRALoader": {"lora_name": lora},
            "X2EditDiptych": {"panel_width": 64},
            "KSampler": {"steps": 2},
        },
        replace={"DualCLIPLoader": "X2EditTestCLIP"},
    )
    print(f"\n{name}: substituted in the page before queueing: " + "; ".join(done))
    assert "DualCLIPLoader -> X2EditTestCLIP" in done

    before = set(http_json(f"{browser_server.url}/history"))
    comfy_page.click_run()
    prompt_id, entry = wait_for_new_history(browser_server.url, before)
    status = entry["status"]
    assert status.get("status_str") == "success", (
        json.dumps(status, indent=1) + "\n" + browser_comfy.log()[-4000:]
    )

    save_id = next(n["id"] for n in read_workflow(name)["nodes"] if n["type"] == "SaveImage")
    files = browser_comfy.output_files(entry, node_id=str(save_id), kind="images")
    assert len(files) == 1
    with Image.open(files[0]) as result:
        assert result.size == (77, 50)  # the crop restores the source's exact size
    shown = comfy_page.wait_for_node_image(save_id)
    assert shown and shown[0]["width"] == 77 and shown[0]["height"] == 50, shown
    path = comfy_page.screenshot(artifacts_dir / f"result_{name}.png")
    print(f"{name}: prompt {prompt_id} finished; result screenshot {path}")
