"""UI workflow -> API prompt conversion, substitutions and the x2edit-run CLI against a fake server.

The node specs are /object_info entries recorded from the ComfyUI test server
(tests/data/object_info_sample.json: ComfyUI 0.3.64 core nodes, the x2edit nodes, tooltips removed).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from x2edit_core.prompt import IC_PROMPT_TEMPLATE
from x2edit_core.run import cli as run_cli
from x2edit_core.run.workflow_api import (
    CONTROL_VALUES,
    ComfyAPI,
    ComfyServerError,
    MissingModelError,
    ProgressListener,
    PromptFailedError,
    PromptRejectedError,
    WorkflowError,
    check_combo_values,
    combo_options,
    find_nodes,
    has_control_widget,
    parse_assignment,
    replace_node_type,
    set_image,
    set_input,
    set_instruction,
    set_role_model,
    set_seed,
    spec_type,
    widget_inputs,
    widget_value_mismatches,
    workflow_to_prompt,
)

REPO = Path(__file__).resolve().parents[1]
# The workflows whose nodes are all in the recorded object_info sample (the early-filter workflow's
# nodes are not; tests/comfy/test_workflows.py runs every workflow on a live server).
WORKFLOWS = [
    REPO / "workflows" / n
    for n in ("icedit_moe_lora.json", "icedit_normal_lora.json", "x2edit_task_routed.json")
]
OBJECT_INFO = json.loads((REPO / "tests" / "data" / "object_info_sample.json").read_text())
UPLOAD_WIDGET_NODES = {"LoadImage"}  # the frontend adds an "upload" widget value after the image name
MODEL_NAMES = {
    "UNETLoader": "x2edit_tiny_flux_fill.safetensors",
    "VAELoader": "x2edit_tiny_vae.safetensors",
}


def load(name):
    return json.loads((REPO / "workflows" / name).read_text())


def by_type(prompt, kind):
    found = [(nid, n) for nid, n in prompt.items() if n["class_type"] == kind]
    assert len(found) == 1, (kind, found)
    return found[0]


# --- the shipped workflows ---------------------------------------------------------------------------


def test_the_workflows_are_shipped():
    assert all(p.is_file() for p in WORKFLOWS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_shipped_workflow_is_a_consistent_ui_graph(path):
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4 and {
        "last_node_id",
        "last_link_id",
        "nodes",
        "links",
        "groups",
        "config",
        "extra",
    } <= set(wf)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for n in nodes.values():  # the fields the ComfyUI frontend's workflow schema (zComfyNode) requires
        assert isinstance(n["id"], int) and isinstance(n["type"], str) and isinstance(n["flags"], dict)
        assert all(len(n[k]) == 2 and all(isinstance(v, (int, float)) for v in n[k]) for k in ("pos", "size"))
        assert isinstance(n["order"], int) and n["mode"] == 0 and isinstance(n["properties"], dict)
        assert all(isinstance(o["links"], (list, type(None))) for o in n["outputs"])
    assert all(len(link) == 6 for link in wf["links"])
    assert wf["last_node_id"] == max(nodes) and wf["last_link_id"] == max(link[0] for link in wf["links"])
    assert sorted(n["order"] for n in nodes.values()) == list(range(len(nodes)))
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert out["type"] == kind and inp["type"] in (kind, "*")
        assert nodes[src]["order"] < nodes[dst]["order"]
    notes = [n for n in nodes.values() if n["type"] in ("Note", "MarkdownNote")]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    for needed in (
        "models/diffusion_models",
        "models/loras",
        "models/text_encoders",
        "models/vae",
        "x2edit-run",
    ):
        assert needed in text
    for node in nodes.values():
        kind = node["type"]
        if kind in ("Note", "MarkdownNote"):
            continue
        assert kind in OBJECT_INFO, f"{kind} is neither core nor x2edit"
        assert not kind.startswith("X2EditTest")
        assert node["properties"]["Node name for S&R"] == kind
        for slot in node["inputs"]:  # input sockets are inputs of the node type (a widget when converted)
            spec = next(s for name, s, _ in _inputs(kind) if name == slot["name"])
            assert ("widget" in slot) == (spec_type(spec) in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"))


def _inputs(kind):
    from x2edit_core.run.workflow_api import node_inputs

    return node_inputs(OBJECT_INFO[kind])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_widget_values_match_the_servers_widget_order(path):
    """Exactly one value per widget (plus control_after_generate and upload values), each of the
    widget's type: a value in the wrong position would silently land on another input."""
    for node in json.loads(path.read_text())["nodes"]:
        kind = node["type"]
        if kind in ("Note", "MarkdownNote"):
            continue
        values = list(node["widgets_values"])
        for name, spec in widget_inputs(OBJECT_INFO[kind]):
            value = values.pop(0)
            kind_of = spec_type(spec)
            if kind_of == "INT":
                assert isinstance(value, int) and not isinstance(value, bool), (kind, name, value)
            elif kind_of == "FLOAT":
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (kind, name, value)
            elif kind_of == "BOOLEAN":
                assert isinstance(value, bool), (kind, name, value)
            elif kind_of == "STRING":
                assert isinstance(value, str), (kind, name, value)
            else:
                assert isinstance(value, str), (kind, name, value)
                if not name.endswith("_name") and name != "image" and combo_options(spec):
                    assert value in combo_options(spec), (kind, name, value)
            if has_control_widget(name, spec):
                assert values.pop(0) in CONTROL_VALUES, (kind, name)
        if kind in UPLOAD_WIDGET_NODES:
            assert values.pop(0) == "image"
        assert values == [], (kind, values)


def test_icedit_normal_lora_converts_to_the_expected_prompt():
    prompt = workflow_to_prompt(load("icedit_normal_lora.json"), OBJECT_INFO)
    kinds = sorted(n["class_type"] for n in prompt.values())
    assert kinds == sorted(
        [
            "LoadImage",
            "X2EditDiptych",
            "DualCLIPLoader",
            "X2EditICPrompt",
            "ConditioningZeroOut",
            "VAELoader",
            "InpaintModelConditioning",
            "UNETLoader",
            "LoraLoaderModelOnly",
            "KSampler",
            "VAEDecode",
            "X2EditCropDiptych",
            "SaveImage",
        ]
    )  # the note is gone
    ks_id, ks = by_type(prompt, "KSampler")
    inp_id, _ = by_type(prompt, "InpaintModelConditioning")
    lora_id, lora = by_type(prompt, "LoraLoaderModelOnly")
    assert ks["inputs"] == {
        "seed": 0,
        "steps": 28,
        "cfg": 1.0,
        "sampler_name": "euler",
        "scheduler": "simple",
        "denoise": 1.0,
        "model": [lora_id, 0],
        "positive": [inp_id, 0],
        "negative": [inp_id, 1],
        "latent_image": [inp_id, 2],
    }
    _, ic = by_type(prompt, "X2EditICPrompt")
    assert ic["inputs"]["template"] == IC_PROMPT_TEMPLATE and ic["inputs"]["guidance"] == 50.0
    assert by_type(prompt, "UNETLoader")[1]["inputs"] == {
        "unet_name": "flux1-fill-dev.safetensors",
        "weight_dtype": "default",
    }
    assert by_type(prompt, "DualCLIPLoader")[1]["inputs"] == {
        "clip_name1": "clip_l.safetensors",
        "clip_name2": "t5xxl_fp16.safetensors",
        "type": "flux",
        "device": "default",
    }
    assert lora["inputs"]["lora_name"] == "ICEdit-normal-LoRA.safetensors"
    assert by_type(prompt, "LoadImage")[1]["inputs"] == {"image": "example.png"}
    dip_id, _ = by_type(prompt, "X2EditDiptych")
    assert by_type(prompt, "X2EditCropDiptych")[1]["inputs"]["geometry"] == [dip_id, 2]
    assert by_type(prompt, "SaveImage")[1]["_meta"]["title"] == "Edited image"


def test_icedit_moe_workflow_uses_the_moe_loader_natively():
    prompt = workflow_to_prompt(load("icedit_moe_lora.json"), OBJECT_INFO)
    moe_id, moe = by_type(prompt, "X2EditMoELoRALoader")
    assert (
        moe["inputs"]["lora_name"] == "ICEdit-MoE-LoRA.safetensors" and moe["inputs"]["routing"] == "native"
    )
    assert moe["inputs"]["strength"] == 1.0
    assert by_type(prompt, "KSampler")[1]["inputs"]["model"] == [moe_id, 0]
    assert not any(n["class_type"] == "LoraLoaderModelOnly" for n in prompt.values())


def test_task_routed_workflow_shares_the_instruction_and_routes_the_sampler():
    prompt = workflow_to_prompt(load("x2edit_task_routed.json"), OBJECT_INFO)
    prim_id, prim = by_type(prompt, "PrimitiveStringMultiline")
    router_id, router = by_type(prompt, "X2EditTaskRouter")
    _, ic = by_type(prompt, "X2EditICPrompt")
    assert ic["inputs"]["instruction"] == [prim_id, 0] and router["inputs"]["instruction"] == [prim_id, 0]
    assert router["inputs"]["mode"] == "auto" and router["inputs"]["num_experts"] == 4
    assert by_type(prompt, "KSampler")[1]["inputs"]["model"] == [router_id, 0]
    assert by_type(prompt, "PreviewAny")[1]["inputs"]["source"] == [router_id, 2]
    moe_id, _ = by_type(prompt, "X2EditMoELoRALoader")
    assert router["inputs"]["model"] == [moe_id, 0]
    # --instruction replaces the linked value on both nodes
    set_instruction(prompt, "remove the cup")
    assert ic["inputs"]["instruction"] == router["inputs"]["instruction"] == "remove the cup"


# --- conversion rules on small graphs -------------------------------------------------------------------


def node(nid, kind, widgets=(), inputs=(), outputs=(), mode=0, title=None):
    n = {
        "id": nid,
        "type": kind,
        "mode": mode,
        "widgets_values": list(widgets),
        "inputs": [dict(i) for i in inputs],
        "outputs": [{"name": t, "type": t, "links": []} for t in outputs],
    }
    if title:
        n["title"] = title
    return n


def graph(nodes, links):
    return {"nodes": nodes, "links": links, "version": 0.4}


def sampler_graph(model_link=1, seed_widgets=(7, "randomize")):
    """UNETLoader(1) -> [slot] -> KSampler(3); CLIPTextEncode(4); the caller inserts nodes at 2."""
    return [
        node(1, "UNETLoader", ["a.safetensors", "default"], outputs=["MODEL"]),
        node(
            3,
            "KSampler",
            [*seed_widgets, 20, 7.5, "euler", "normal", 0.5],
            inputs=[{"name": "model", "type": "MODEL", "link": model_link}],
        ),
    ]


def test_control_after_generate_value_is_skipped_and_seed_names_count():
    prompt = workflow_to_prompt(graph(sampler_graph(), [[1, 1, 0, 3, 0, "MODEL"]]), OBJECT_INFO)
    assert prompt["3"]["inputs"] == {
        "seed": 7,
        "steps": 20,
        "cfg": 7.5,
        "sampler_name": "euler",
        "scheduler": "normal",
        "denoise": 0.5,
        "model": ["1", 0],
    }
    adv = node(
        5, "KSamplerAdvanced", ["enable", 3, "increment", 10, 1.0, "euler", "simple", 0, 10, "disable"]
    )
    noise = node(6, "RandomNoise", [42, "fixed"])
    prompt = workflow_to_prompt(graph([adv, noise], []), OBJECT_INFO)
    assert prompt["5"]["inputs"]["noise_seed"] == 3 and prompt["5"]["inputs"]["steps"] == 10
    assert prompt["5"]["inputs"]["return_with_leftover_noise"] == "disable"
    assert prompt["6"]["inputs"] == {"noise_seed": 42}


def test_workflow_without_control_value_still_converts():
    """API-style lists without the control value (older saves of non-seed INTs) keep positions."""
    prompt = workflow_to_prompt(
        graph(sampler_graph(seed_widgets=(7,)), [[1, 1, 0, 3, 0, "MODEL"]]), OBJECT_INFO
    )
    assert prompt["3"]["inputs"]["seed"] == 7 and prompt["3"]["inputs"]["steps"] == 20


def test_reroutes_are_followed_and_notes_dropped():
    nodes = sampler_graph(model_link=2)
    nodes.append(node(2, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}], outputs=["MODEL"]))
    nodes.append(node(9, "Note", ["hello"]))
    nodes.append(node(10, "MarkdownNote", ["# hi"]))
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"]]
    prompt = workflow_to_prompt(graph(nodes, links), OBJECT_INFO)
    assert set(prompt) == {"1", "3"}
    assert prompt["3"]["inputs"]["model"] == ["1", 0]


def test_primitive_node_value_is_inlined_into_a_converted_widget():
    nodes = [
        node(1, "PrimitiveNode", ["make it blue"], outputs=["STRING"]),
        node(
            2,
            "X2EditTaskRouter",
            ["stale widget text", "auto", "", "", 4],
            inputs=[
                {"name": "model", "type": "MODEL", "link": None},
                {"name": "instruction", "type": "STRING", "link": 1, "widget": {"name": "instruction"}},
            ],
        ),
        node(3, "PrimitiveNode", [99, "fixed"], outputs=["INT"]),
        node(
            4,
            "KSampler",
            [1, "fixed", 20, 1.0, "euler", "simple", 1.0],
            inputs=[{"name": "seed", "type": "INT", "link": 2, "widget": {"name": "seed"}}],
        ),
    ]
    links = [[1, 1, 0, 2, 1, "STRING"], [2, 3, 0, 4, 0, "INT"]]
    prompt = workflow_to_prompt(graph(nodes, links), OBJECT_INFO)
    assert set(prompt) == {"2", "4"}
    assert prompt["2"]["inputs"]["instruction"] == "make it blue"
    assert prompt["4"]["inputs"]["seed"] == 99 and prompt["4"]["inputs"]["steps"] == 20


def test_converted_widget_linked_from_a_real_node_becomes_a_link():
    nodes = [
        node(1, "PrimitiveStringMultiline", ["remove it"], outputs=["STRING"]),
        node(
            2,
            "X2EditTaskRouter",
            ["old", "remove_subject", "", "", 4],
            inputs=[{"name": "instruction", "type": "STRING", "link": 1, "widget": {"name": "instruction"}}],
        ),
    ]
    prompt = workflow_to_prompt(graph(nodes, [[1, 1, 0, 2, 0, "STRING"]]), OBJECT_INFO)
    assert prompt["2"]["inputs"]["instruction"] == ["1", 0]
    assert prompt["2"]["inputs"]["mode"] == "remove_subject"


def test_bypassed_node_passes_its_matching_input_through():
    nodes = sampler_graph(model_link=2)
    nodes.append(
        node(
            2,
            "LoraLoaderModelOnly",
            ["l.safetensors", 1.0],
            inputs=[{"name": "model", "type": "MODEL", "link": 1}],
            outputs=["MODEL"],
            mode=4,
        )
    )
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"]]
    prompt = workflow_to_prompt(graph(nodes, links), OBJECT_INFO)
    assert "2" not in prompt and prompt["3"]["inputs"]["model"] == ["1", 0]


def test_bypass_picks_the_input_of_the_output_type_not_the_slot():
    """InpaintModelConditioning bypassed: its LATENT output has no LATENT input, so nothing passes;
    its CONDITIONING outputs take the positive/negative inputs by slot."""
    nodes = [
        node(
            1,
            "CLIPTextEncode",
            ["a"],
            inputs=[{"name": "clip", "type": "CLIP", "link": None}],
            outputs=["CONDITIONING"],
        ),
        node(
            5,
            "CLIPTextEncode",
            ["b"],
            inputs=[{"name": "clip", "type": "CLIP", "link": None}],
            outputs=["CONDITIONING"],
        ),
        node(
            2,
            "InpaintModelConditioning",
            [True],
            inputs=[
                {"name": "positive", "type": "CONDITIONING", "link": 1},
                {"name": "negative", "type": "CONDITIONING", "link": 4},
                {"name": "vae", "type": "VAE", "link": None},
                {"name": "pixels", "type": "IMAGE", "link": None},
                {"name": "mask", "type": "MASK", "link": None},
            ],
            outputs=["CONDITIONING", "CONDITIONING", "LATENT"],
            mode=4,
        ),
        node(
            3,
            "KSampler",
            [1, "fixed", 20, 1.0, "euler", "simple", 1.0],
            inputs=[
                {"name": "positive", "type": "CONDITIONING", "link": 2},
                {"name": "negative", "type": "CONDITIONING", "link": 3},
                {"name": "latent_image", "type": "LATENT", "link": 5},
            ],
        ),
    ]
    links = [
        [1, 1, 0, 2, 0, "CONDITIONING"],
        [4, 5, 0, 2, 1, "CONDITIONING"],
        [2, 2, 0, 3, 0, "CONDITIONING"],
        [3, 2, 1, 3, 1, "CONDITIONING"],
        [5, 2, 2, 3, 2, "LATENT"],
    ]
    prompt = workflow_to_prompt(graph(nodes, links), OBJECT_INFO)
    assert prompt["3"]["inputs"]["positive"] == ["1", 0]
    assert prompt["3"]["inputs"]["negative"] == ["5", 0]
    assert "latent_image" not in prompt["3"]["inputs"]


def test_muted_nodes_and_their_links_are_dropped():
    nodes = sampler_graph()
    nodes[0]["mode"] = 2
    prompt = workflow_to_prompt(graph(nodes, [[1, 1, 0, 3, 0, "MODEL"]]), OBJECT_INFO)
    assert set(prompt) == {"3"} and "model" not in prompt["3"]["inputs"]


def test_dict_widget_values_and_dict_links():
    nodes = [
        node(1, "UNETLoader", outputs=["MODEL"]),
        node(2, "LoraLoaderModelOnly", inputs=[{"name": "model", "type": "MODEL", "link": 7}]),
    ]
    nodes[0]["widgets_values"] = {"unet_name": "u.safetensors", "weight_dtype": "fp8_e4m3fn"}
    nodes[1]["widgets_values"] = {"lora_name": "l.safetensors", "strength_model": 0.5}
    links = [{"id": 7, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "MODEL"}]
    prompt = workflow_to_prompt(graph(nodes, links), OBJECT_INFO)
    assert prompt["1"]["inputs"] == {"unet_name": "u.safetensors", "weight_dtype": "fp8_e4m3fn"}
    assert prompt["2"]["inputs"] == {"lora_name": "l.safetensors", "strength_model": 0.5, "model": ["1", 0]}


def test_api_prompt_passes_through_unchanged():
    api = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "u", "weight_dtype": "default"}}}
    out = workflow_to_prompt(api, OBJECT_INFO)
    assert out == api and out is not api


@pytest.mark.parametrize(
    "workflow, message",
    [
        ([], "must be a JSON object"),
        ({"foo": 1}, "not a ComfyUI workflow"),
        (graph([node(1, "NoSuchNode")], []), "no node type 'NoSuchNode'"),
        (graph([node(1, "workflow>my group")], []), "group node"),
        (graph([node(1, "Note", ["x"])], []), "no nodes to run"),
        (graph(sampler_graph(), []), "link 1, which its 'links' list lacks"),
        (graph(sampler_graph(), [[1, 8, 0, 3, 0, "MODEL"]]), "node 8, which is not in the workflow"),
    ],
)
def test_bad_workflows_give_clear_errors(workflow, message):
    with pytest.raises(WorkflowError, match=message):
        workflow_to_prompt(workflow, OBJECT_INFO)


def test_subgraphs_are_refused_with_a_fix():
    wf = graph([node(1, "3f2a-uuid")], [])
    wf["definitions"] = {"subgraphs": [{"id": "3f2a-uuid"}]}
    with pytest.raises(WorkflowError, match="Unpack"):
        workflow_to_prompt(wf, OBJECT_INFO)


# --- substitutions ------------------------------------------------------------------------------------


@pytest.fixture
def normal_prompt():
    return workflow_to_prompt(load("icedit_normal_lora.json"), OBJECT_INFO)


def test_find_nodes_by_id_title_and_type(normal_prompt):
    ks_id, _ = by_type(normal_prompt, "KSampler")
    assert find_nodes(normal_prompt, ks_id) == [ks_id]
    assert find_nodes(normal_prompt, "KSampler") == [ks_id]
    save_id, _ = by_type(normal_prompt, "SaveImage")
    assert find_nodes(normal_prompt, "edited IMAGE") == [save_id]
    with pytest.raises(WorkflowError, match="no node with id, title or type 'nope'.*Edited image"):
        find_nodes(normal_prompt, "nope")


def test_set_input_coerces_to_the_inputs_type(normal_prompt):
    set_input(normal_prompt, OBJECT_INFO, "KSampler", "steps", "4")
    set_input(normal_prompt, OBJECT_INFO, "KSampler", "cfg", "1.5")
    set_input(normal_prompt, OBJECT_INFO, "InpaintModelConditioning", "noise_mask", "false")
    set_input(normal_prompt, OBJECT_INFO, "X2Edit IC Prompt", "instruction", "42")
    ks = by_type(normal_prompt, "KSampler")[1]["inputs"]
    assert ks["steps"] == 4 and ks["cfg"] == 1.5
    assert by_type(normal_prompt, "InpaintModelConditioning")[1]["inputs"]["noise_mask"] is False
    assert by_type(normal_prompt, "X2EditICPrompt")[1]["inputs"]["instruction"] == "42"
    with pytest.raises(WorkflowError, match=r"KSampler.*steps takes a number \(INT\), got 'many'"):
        set_input(normal_prompt, OBJECT_INFO, "KSampler", "steps", "many")
    with pytest.raises(WorkflowError, match="takes true or false"):
        set_input(normal_prompt, OBJECT_INFO, "InpaintModelConditioning", "noise_mask", "maybe")
    with pytest.raises(WorkflowError, match="has no input 'stepz'; its inputs: model, seed, steps"):
        set_input(normal_prompt, OBJECT_INFO, "KSampler", "stepz", "1")


def test_parse_assignment_allows_dots_in_titles():
    assert parse_assignment("X2Edit Diptych.panel_width=64") == ("X2Edit Diptych", "panel_width", "64")
    assert parse_assignment("v1.2 loader.lora_name=a=b.safetensors") == (
        "v1.2 loader",
        "lora_name",
        "a=b.safetensors",
    )
    for bad in ("KSampler=3", "steps", ".steps=3"):
        with pytest.raises(WorkflowError, match="NODE.input=value"):
            parse_assignment(bad)


def test_instruction_seed_image_and_models(normal_prompt):
    set_instruction(normal_prompt, "make the sky pink")
    assert by_type(normal_prompt, "X2EditICPrompt")[1]["inputs"]["instruction"] == "make the sky pink"
    for empty in ("", "   \n"):
        with pytest.raises(WorkflowError, match="instruction is empty"):
            set_instruction(normal_prompt, empty)
    set_seed(normal_prompt, OBJECT_INFO, 1234)
    assert by_type(normal_prompt, "KSampler")[1]["inputs"]["seed"] == 1234
    set_image(normal_prompt, "uploaded/in.png")
    assert by_type(normal_prompt, "LoadImage")[1]["inputs"]["image"] == "uploaded/in.png"
    set_role_model(normal_prompt, "unet", "x2edit_tiny_flux_fill.safetensors")
    set_role_model(normal_prompt, "lora", "tiny.safetensors")
    set_role_model(normal_prompt, "clip_l", "c.safetensors")
    set_role_model(normal_prompt, "t5", "t.safetensors")
    assert (
        by_type(normal_prompt, "UNETLoader")[1]["inputs"]["unet_name"] == "x2edit_tiny_flux_fill.safetensors"
    )
    assert by_type(normal_prompt, "LoraLoaderModelOnly")[1]["inputs"]["lora_name"] == "tiny.safetensors"
    clip = by_type(normal_prompt, "DualCLIPLoader")[1]["inputs"]
    assert (clip["clip_name1"], clip["clip_name2"]) == ("c.safetensors", "t.safetensors")
    with pytest.raises(WorkflowError, match="unknown model role 'unett'; roles: unet, lora"):
        set_role_model(normal_prompt, "unett", "x")
    with pytest.raises(WorkflowError, match="no CheckpointLoaderSimple node"):
        set_role_model(normal_prompt, "checkpoint", "x")


def test_workflow_without_target_nodes_says_so():
    prompt = workflow_to_prompt(graph([node(1, "UNETLoader", ["u", "default"])], []), OBJECT_INFO)
    with pytest.raises(WorkflowError, match="no node that takes an instruction"):
        set_instruction(prompt, "x")
    with pytest.raises(WorkflowError, match="no seed input"):
        set_seed(prompt, OBJECT_INFO, 1)
    with pytest.raises(WorkflowError, match="no node that takes an input image"):
        set_image(prompt, "x.png")


def test_missing_model_lists_available_names_and_the_fix(normal_prompt):
    with pytest.raises(MissingModelError) as raised:
        check_combo_values(normal_prompt, OBJECT_INFO)
    text = str(raised.value)
    assert (
        "UNETLoader 'Load Diffusion Model').unet_name = 'flux1-fill-dev.safetensors' is not available" in text
    )
    assert "'x2edit_tiny_flux_fill.safetensors'" in text and "models/diffusion_models" in text
    assert "--model unet=NAME" in text and "--model lora=NAME" in text
    assert "clip_name1 = 'clip_l.safetensors' is not available. ComfyUI lists nothing for it." in text
    set_role_model(normal_prompt, "unet", "x2edit_tiny_flux_fill.safetensors")
    set_role_model(normal_prompt, "vae", "x2edit_tiny_vae.safetensors")
    set_role_model(normal_prompt, "lora", "x2edit_tiny_fill_lora.safetensors")
    replace_node_type(normal_prompt, OBJECT_INFO, "DualCLIPLoader", "X2EditTestCLIP")
    check_combo_values(normal_prompt, OBJECT_INFO)  # now complete
    by_type(normal_prompt, "KSampler")[1]["inputs"]["sampler_name"] = "eulr"
    with pytest.raises(MissingModelError, match="sampler_name = 'eulr' is not available"):
        check_combo_values(normal_prompt, OBJECT_INFO)


def test_replace_node_type_keeps_links_and_fills_defaults(normal_prompt):
    clip_id, _ = by_type(normal_prompt, "DualCLIPLoader")
    assert replace_node_type(normal_prompt, OBJECT_INFO, "DualCLIPLoader", "X2EditTestCLIP") == [clip_id]
    assert normal_prompt[clip_id]["class_type"] == "X2EditTestCLIP"
    assert normal_prompt[clip_id]["inputs"] == {"seed": 0, "tokens": 8, "context_dim": 32, "pooled_dim": 16}
    assert by_type(normal_prompt, "X2EditICPrompt")[1]["inputs"]["clip"] == [clip_id, 0]
    with pytest.raises(WorkflowError, match="no node type 'Nope'"):
        replace_node_type(normal_prompt, OBJECT_INFO, "X2EditTestCLIP", "Nope")
    with pytest.raises(WorkflowError, match="has no DualCLIPLoader node"):
        replace_node_type(normal_prompt, OBJECT_INFO, "DualCLIPLoader", "X2EditTestCLIP")


# --- server error text ----------------------------------------------------------------------------------

REJECTION = {
    "error": {
        "type": "prompt_outputs_failed_validation",
        "message": "Prompt outputs failed validation",
        "details": "",
    },
    "node_errors": {
        "12": {
            "errors": [
                {
                    "type": "custom_validation_failed",
                    "message": "Custom validation failed for node",
                    "details": "mode - Unknown task 'nonsense'. Valid names: unknown, remove_subject",
                }
            ],
            "dependent_outputs": ["17"],
            "class_type": "X2EditTaskRouter",
        }
    },
}


def test_rejection_summary_keeps_the_body_verbatim():
    body = json.dumps(REJECTION)
    error = PromptRejectedError(
        body, {"12": {"class_type": "X2EditTaskRouter", "_meta": {"title": "Router"}}}
    )
    text = str(error)
    assert "Prompt outputs failed validation" in text
    assert (
        "node 12 (X2EditTaskRouter 'Router'): Custom validation failed for node: "
        "mode - Unknown task 'nonsense'" in text
    )
    assert text.endswith(f"server response: {body}")
    assert str(PromptRejectedError("not json")).endswith("server response: not json")


def test_execution_error_text_is_the_servers():
    messages = [
        ["execution_start", {"prompt_id": "p"}],
        [
            "execution_error",
            {
                "prompt_id": "p",
                "node_id": "4",
                "node_type": "X2EditDiptych",
                "exception_type": "x2edit_core.diptych.ImageShapeError",
                "exception_message": "A 300x4 image resized to width 64 is 0.9 pixels high",
                "traceback": ["  File x, line 1\n", "ImageShapeError\n"],
            },
        ],
    ]
    text = str(PromptFailedError("p", messages))
    assert text.startswith(
        "ComfyUI failed while running node 4 (X2EditDiptych): x2edit_core.diptych.ImageShapeError: "
        "A 300x4 image resized to width 64 is 0.9 pixels high"
    )
    assert "File x, line 1" in text
    assert "interrupted" in str(PromptFailedError("p", [["execution_interrupted", {"node_id": "3"}]]))


# --- the CLI against a fake ComfyUI ---------------------------------------------------------------------


def _png(width, height, color=(10, 200, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeComfy:
    """Just enough of ComfyUI's HTTP API: object_info, upload, prompt, queue, history, view."""

    def __init__(self):
        self.uploads, self.prompts = [], []
        self.reject_body = None
        self.fail_messages = None
        self.never_done = False
        self.posts = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, payload, content_type="application/json"):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/object_info":
                    self._send(200, OBJECT_INFO)
                elif path == "/system_stats":
                    self._send(200, {})
                elif path == "/queue":
                    self._send(200, {"queue_running": [], "queue_pending": []})
                elif path.startswith("/history/"):
                    pid = path.rsplit("/", 1)[1]
                    if outer.never_done:
                        self._send(200, {})
                        return
                    if outer.fail_messages is not None:
                        status = {"status_str": "error", "completed": False, "messages": outer.fail_messages}
                        self._send(200, {pid: {"outputs": {}, "status": status}})
                        return
                    outputs = {
                        "13": {"text": ["remove_subject"]},
                        "17": {
                            "images": [{"filename": "r_00001_.png", "subfolder": "x2edit", "type": "output"}]
                        },
                    }
                    self._send(
                        200,
                        {pid: {"outputs": outputs, "status": {"status_str": "success", "completed": True}}},
                    )
                elif path == "/view":
                    assert "filename=r_00001_.png" in self.path and "subfolder=x2edit" in self.path
                    self._send(200, _png(77, 50), "image/png")
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path in ("/queue", "/interrupt"):
                    outer.posts.append((self.path, json.loads(body)))
                    self._send(200, b"")
                elif self.path == "/upload/image":
                    assert self.headers["Content-Type"].startswith("multipart/form-data; boundary=")
                    outer.uploads.append(body)
                    self._send(200, {"name": "in.png", "subfolder": "", "type": "input"})
                elif self.path == "/prompt":
                    outer.prompts.append(json.loads(body)["prompt"])
                    if outer.reject_body is not None:
                        self._send(400, outer.reject_body.encode())
                    else:
                        self._send(200, {"prompt_id": "pid-1", "number": 0, "node_errors": {}})
                else:
                    self._send(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    with FakeComfy() as server:
        yield server


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(_png(77, 50, (1, 2, 3)))
    return path


def cli_args(fake, image_file, tmp_path, *extra):
    return [
        str(REPO / "workflows" / "x2edit_task_routed.json"),
        "--url",
        fake.url,
        "--image",
        str(image_file),
        "--instruction",
        "remove the cup",
        "--output",
        str(tmp_path / "out" / "result.png"),
        "--model",
        "unet=x2edit_tiny_flux_fill.safetensors",
        "--model",
        "vae=x2edit_tiny_vae.safetensors",
        "--model",
        "lora=x2edit_tiny_fill_lora.safetensors",
        "--replace-node-type",
        "DualCLIPLoader=X2EditTestCLIP",
        *extra,
    ]


def test_cli_uploads_substitutes_queues_and_writes_the_image(fake, image_file, tmp_path, capsys):
    code = run_cli.main(cli_args(fake, image_file, tmp_path, "--seed", "5", "--set", "KSampler.steps=3"))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == str(tmp_path / "out" / "result.png")
    with Image.open(tmp_path / "out" / "result.png") as result:
        assert result.size == (77, 50)
    assert (
        len(fake.uploads) == 1 and b'filename="in.png"' in fake.uploads[0] and b"\x89PNG" in fake.uploads[0]
    )
    (prompt,) = fake.prompts
    assert by_type(prompt, "LoadImage")[1]["inputs"]["image"] == "in.png"
    assert by_type(prompt, "X2EditTaskRouter")[1]["inputs"]["instruction"] == "remove the cup"
    ks = by_type(prompt, "KSampler")[1]["inputs"]
    assert ks["seed"] == 5 and ks["steps"] == 3
    assert by_type(prompt, "X2EditTestCLIP")
    assert "Chosen task: remove_subject" in err and "queued prompt pid-1" in err


def test_cli_print_prompt_shows_the_api_prompt_without_queueing(fake, image_file, tmp_path, capsys):
    assert run_cli.main(cli_args(fake, image_file, tmp_path, "--print-prompt", "-q")) == 0
    prompt = json.loads(capsys.readouterr().out)
    assert (
        by_type(prompt, "X2EditMoELoRALoader")[1]["inputs"]["lora_name"]
        == "x2edit_tiny_fill_lora.safetensors"
    )
    assert fake.prompts == [] and fake.uploads == []


def test_cli_reports_a_rejection_verbatim(fake, image_file, tmp_path, capsys):
    fake.reject_body = json.dumps(REJECTION)
    assert run_cli.main(cli_args(fake, image_file, tmp_path)) == 3
    err = capsys.readouterr().err
    assert "x2edit-run: error: ComfyUI rejected the prompt." in err
    assert f"server response: {fake.reject_body}" in err


def test_cli_reports_an_execution_error_verbatim(fake, image_file, tmp_path, capsys):
    fake.fail_messages = [
        [
            "execution_error",
            {
                "node_id": "6",
                "node_type": "X2EditICPrompt",
                "exception_type": "EmptyInstructionError",
                "exception_message": "The edit instruction is empty.",
                "traceback": [],
            },
        ]
    ]
    assert run_cli.main(cli_args(fake, image_file, tmp_path)) == 3
    err = capsys.readouterr().err
    assert "node 6 (X2EditICPrompt): EmptyInstructionError: The edit instruction is empty." in err
    assert not (tmp_path / "out" / "result.png").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (["--instruction", "  "], "instruction is empty"),
        (["--model", "unet=nope.safetensors"], "'nope.safetensors' is not available. ComfyUI lists: "),
        (["--set", "KSampler.steps=lots"], "takes a number"),
        (["--set", "Nowhere.steps=1"], "no node with id, title or type 'Nowhere'"),
        (["--model", "unet"], "--model expects KEY=VALUE"),
        (["--image", "/no/such/image.png"], "the input image '/no/such/image.png' does not exist"),
    ],
)
def test_cli_bad_arguments_fail_before_queueing(fake, image_file, tmp_path, capsys, change, message):
    args = cli_args(fake, image_file, tmp_path)
    flag = change[0]
    if flag in ("--instruction", "--image"):
        args[args.index(flag) + 1] = change[1]
    else:
        args += change
    assert run_cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert fake.prompts == []


def test_cli_missing_workflow_model_lists_names(fake, image_file, tmp_path, capsys):
    args = [
        str(REPO / "workflows" / "icedit_normal_lora.json"),
        "--url",
        fake.url,
        "--image",
        str(image_file),
        "--instruction",
        "x",
        "-o",
        str(tmp_path / "o.png"),
    ]
    assert run_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "unet_name = 'flux1-fill-dev.safetensors' is not available" in err
    assert "'x2edit_tiny_flux_fill.safetensors'" in err


def test_cli_unreachable_server_and_unreadable_workflow(tmp_path, capsys):
    code = run_cli.main(["workflows/none.json", "--url", "http://127.0.0.1:9", "-o", str(tmp_path / "o.png")])
    assert code == 2 and "cannot read the workflow" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert run_cli.main([str(bad), "-o", "x.png"]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    wf = str(REPO / "workflows" / "icedit_normal_lora.json")
    assert run_cli.main([wf, "--url", "http://127.0.0.1:9", "-o", str(tmp_path / "o.png")]) == 3
    assert "cannot reach ComfyUI at http://127.0.0.1:9" in capsys.readouterr().err


def test_client_queue_raises_with_body(fake):
    fake.reject_body = "plain text refusal"
    with pytest.raises(PromptRejectedError) as raised:
        ComfyAPI(fake.url).queue({"1": {"class_type": "X", "inputs": {}}})
    assert raised.value.body == "plain text refusal"
    with pytest.raises(ComfyServerError, match="HTTP 404"):
        ComfyAPI(fake.url).get_json("/nope")


def test_converted_prompt_is_not_mutated_by_later_edits():
    wf = load("icedit_normal_lora.json")
    before = copy.deepcopy(wf)
    prompt = workflow_to_prompt(wf, OBJECT_INFO)
    set_instruction(prompt, "x")
    assert wf == before


def test_wait_timeout_removes_and_interrupts_only_its_own_prompt(fake):
    fake.never_done = True
    with pytest.raises(ComfyServerError, match="did not finish within 0 s"):
        ComfyAPI(fake.url).wait("pid-7", timeout=0.2)
    assert fake.posts == [("/queue", {"delete": ["pid-7"]}), ("/interrupt", {"prompt_id": "pid-7"})]


def test_progress_lines_from_websocket_messages():
    lines = []
    prompt = {"14": {"class_type": "KSampler", "_meta": {"title": "KSampler"}}}
    listener = ProgressListener("http://127.0.0.1:1", "cid", lines.append, prompt)
    listener.prompt_id = "p1"
    for message in (
        {"type": "executing", "data": {"node": "14", "prompt_id": "p1"}},
        {"type": "executing", "data": {"node": "3", "prompt_id": "other"}},  # another client's prompt
        {"type": "progress", "data": {"value": 1, "max": 2, "node": "14", "prompt_id": "p1"}},
        {"type": "progress", "data": {"value": 2, "max": 2, "node": "14", "prompt_id": "p1"}},
        {"type": "execution_cached", "data": {"nodes": ["1", "2"], "prompt_id": "p1"}},
        {"type": "executing", "data": {"node": None, "prompt_id": "p1"}},
    ):
        listener._handle(json.dumps(message).encode())
    listener._handle(b"not json")
    assert lines == ["running node 14 (KSampler)", "  step 1/2", "  step 2/2", "cached: 2 node(s)"]
    closed = ProgressListener("http://127.0.0.1:9", "cid", lines.append)
    assert not closed.start(timeout=1) and "polling the queue instead" in closed.unavailable


class FakeComfyWebsocket:
    """A one-connection websocket server on 127.0.0.1 (RFC 6455 handshake, unmasked server frames)
    that sends ComfyUI-style messages, then closes; records the request line."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, messages):
        self.messages = messages
        self.request_line = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @staticmethod
    def frame(payload: bytes, opcode: int) -> bytes:
        head = bytes([0x80 | opcode])
        if len(payload) < 126:
            return head + bytes([len(payload)]) + payload
        return head + bytes([126]) + len(payload).to_bytes(2, "big") + payload

    def _serve(self):
        conn, _ = self.listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(1024)
            lines = request.decode().split("\r\n")
            self.request_line = lines[0]
            key = next(
                line.split(":", 1)[1].strip()
                for line in lines
                if line.lower().startswith("sec-websocket-key")
            )
            accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
            conn.sendall(
                (
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
                ).encode()
            )
            conn.sendall(self.frame(b"\x00\x00\x00\x01preview-bytes", 2))  # binary: a preview image
            for message in self.messages:
                conn.sendall(self.frame(json.dumps(message).encode(), 1))
            conn.sendall(self.frame(b"\x03\xe8", 8))  # close
        self.listener.close()


def test_progress_over_a_real_websocket_connection():
    lines = []
    messages = [
        {"type": "status", "data": {"status": {}}},
        {"type": "executing", "data": {"node": "14", "prompt_id": "p1"}},
        {"type": "progress", "data": {"value": 2, "max": 2, "node": "14", "prompt_id": "p1"}},
    ]
    server = FakeComfyWebsocket(messages)
    listener = ProgressListener(server.url, "cid-7", lines.append, {"14": {"class_type": "KSampler"}})
    assert listener.start(timeout=5), listener.unavailable
    server.thread.join(timeout=30)
    listener._thread.join(timeout=30)  # ends at the server's close frame
    listener.stop()
    assert server.request_line == "GET /ws?clientId=cid-7 HTTP/1.1"
    assert lines == ["running node 14 (KSampler)", "  step 2/2"]


def test_without_websocket_client_the_cli_polls_and_says_so(fake, image_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "websocket", None)  # import websocket -> ImportError
    code = run_cli.main(cli_args(fake, image_file, tmp_path))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "needs the websocket-client package" in err and "polling the queue instead" in err


def test_new_frontend_widget_sockets_without_links_keep_widget_values():
    """Frontends since 1.16 list every widget as an input socket too (link null unless connected)."""
    ks = node(
        3,
        "KSampler",
        [11, "randomize", 4, 1.0, "euler", "simple", 1.0],
        inputs=[
            {"name": "model", "type": "MODEL", "link": 1},
            {"name": "seed", "type": "INT", "link": None, "widget": {"name": "seed"}},
            {"name": "steps", "type": "INT", "link": None, "widget": {"name": "steps"}},
            {
                "localized_name": "cfg",
                "name": "CFG scale",
                "type": "FLOAT",
                "link": None,
                "widget": {"name": "cfg"},
            },
        ],
    )
    prompt = workflow_to_prompt(
        graph([node(1, "UNETLoader", ["u", "default"], outputs=["MODEL"]), ks], [[1, 1, 0, 3, 0, "MODEL"]]),
        OBJECT_INFO,
    )
    assert prompt["3"]["inputs"] == {
        "seed": 11,
        "steps": 4,
        "cfg": 1.0,
        "sampler_name": "euler",
        "scheduler": "simple",
        "denoise": 1.0,
        "model": ["1", 0],
    }


def test_widget_value_mismatches_flag_shifted_values():
    for path in WORKFLOWS:
        assert widget_value_mismatches(json.loads(path.read_text()), OBJECT_INFO) == []
    extra = node(1, "LoraLoaderModelOnly", ["l.safetensors", 1.0, 0.5])
    shifted = node(2, "KSampler", [1, "fixed", "euler", 20, 1.0, "simple", 1.0], title="Sampler")
    upload = node(3, "LoadImage", ["a.png", "image"])
    problems = widget_value_mismatches(graph([extra, shifted, upload], []), OBJECT_INFO)
    assert problems == [
        "node 1 (LoraLoaderModelOnly): 1 value(s) too many",
        "node 2 (KSampler 'Sampler'): values of the wrong type: steps='euler', sampler_name=1.0",
    ]
