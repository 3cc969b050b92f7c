"""Every shipped workflow runs on the real server through x2edit-run (in process), with tiny models.

Substitutions: the tiny FLUX Fill and VAE (--model), tiny LoRA files in the ICEdit / X2Edit layouts, and
one stand-in node, X2EditTestCLIP for DualCLIPLoader (--replace-node-type: CLIP-L + T5 cannot be tiny);
every other node is the shipped one (the early filter's served judge talks to a fake chat server on
127.0.0.1). Small panels and two steps keep each run to a few seconds.
"""

import copy
import json
import socket

import lora_files
import pytest
import torch
from comfy_harness import REPO_ROOT
from PIL import Image
from safetensors.torch import load_file
from vlm_fixtures import FakeChatServer, chat_reply

from x2edit_core.run import cli as run_cli
from x2edit_core.run.workflow_api import widget_value_mismatches, workflow_to_prompt

WORKFLOWS = ("icedit_normal_lora", "icedit_moe_lora", "x2edit_task_routed")


@pytest.fixture(scope="module")
def tiny_loras(comfy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("workflow_loras")
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
    comfy.add_lora("wf_tiny_icedit_moe.safetensors", icedit)
    lora_files.write_x2edit_dir(
        comfy.loras_dir / "wf_tiny_x2edit", hidden=64, num_double=2, num_single=2, experts=3, rank=2
    )
    return {
        "icedit_normal_lora": comfy.models["fill_lora"],
        "icedit_moe_lora": "wf_tiny_icedit_moe.safetensors",
        "x2edit_task_routed": "wf_tiny_x2edit/lora.safetensors",
    }


def write_image(path, width, height, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand((height, width, 3), generator=generator) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def tiny_args(comfy, workflow, lora, image, output, *extra, instruction="remove the cup from the table"):
    return [
        str(REPO_ROOT / "workflows" / f"{workflow}.json"),
        "--url",
        comfy.url,
        "--image",
        str(image),
        "--instruction",
        instruction,
        "--output",
        str(output),
        "--model",
        f"unet={comfy.models['fill']}",
        "--model",
        f"vae={comfy.models['vae']}",
        "--model",
        f"lora={lora}",
        "--replace-node-type",
        "DualCLIPLoader=X2EditTestCLIP",
        "--set",
        "X2Edit Diptych.panel_width=64",
        "--set",
        "KSampler.steps=2",
        *extra,
    ]


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_shipped_workflow_runs_through_x2edit_run_with_a_stand_in_text_encoder(
    comfy, tiny_loras, tmp_path, capsys, workflow
):
    image = write_image(tmp_path / "source.png", 77, 50)
    output = tmp_path / "result" / "edited.png"
    code = run_cli.main(tiny_args(comfy, workflow, tiny_loras[workflow], image, output, "--seed", "3"))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == str(output)
    with Image.open(output) as result:
        assert result.size == (77, 50)
        assert result.mode == "RGB"
    assert "running node" in err and "step 2/2" in err  # progress from the server's websocket
    if workflow == "x2edit_task_routed":
        assert "Chosen task: remove_subject" in err


# --- the early-filter workflow -------------------------------------------------------------------------

EARLY_FILTER = "icedit_moe_early_filter"


def early_filter_args(comfy, tiny_loras, image, output, judge_url, *extra):
    return [
        str(REPO_ROOT / "workflows" / f"{EARLY_FILTER}.json"),
        "--url",
        comfy.url,
        "--image",
        str(image),
        "--instruction",
        "remove the cup from the table",
        "--output",
        str(output),
        "--model",
        f"unet={comfy.models['fill']}",
        "--model",
        f"vae={comfy.models['vae']}",
        "--model",
        f"lora={tiny_loras['icedit_moe_lora']}",
        "--replace-node-type",
        "DualCLIPLoader=X2EditTestCLIP",
        "--set",
        "X2EditDiptych.panel_width=64",
        "--set",
        "X2EditEarlyFilter.candidates=3",
        "--set",
        "X2EditEarlyFilter.early_steps=2",
        "--set",
        "X2EditEarlyFilter.total_steps=2",
        "--set",
        f"X2EditServedJudge.base_url={judge_url}",
        *extra,
    ]


def test_shipped_early_filter_workflow_runs_through_x2edit_run(comfy, tiny_loras, tmp_path, capsys):
    image = write_image(tmp_path / "source.png", 77, 50)
    output = tmp_path / "edited.png"
    with FakeChatServer([chat_reply("2\nImage 2 removed the cup.")]) as judge:
        code = run_cli.main(early_filter_args(comfy, tiny_loras, image, output, judge.base_url))
    out, err = capsys.readouterr()
    assert code == 0, err
    with Image.open(output) as result:
        assert result.size == (77, 50)
    # --instruction reaches the judge as well as the prompt; the challenger won both comparisons.
    assert len(judge.requests) == 2
    assert '"remove the cup from the table"' in judge.requests[0].body["messages"][0]["content"][-1]["text"]
    assert "Winning seed: 2 (candidate 2)" in err and "Image 2 removed the cup." in err


def test_shipped_early_filter_workflow_fails_loudly_without_its_judge(comfy, tiny_loras, tmp_path, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    image = write_image(tmp_path / "source.png", 77, 50)
    output = tmp_path / "edited.png"
    args = early_filter_args(comfy, tiny_loras, image, output, f"http://127.0.0.1:{port}/v1", "-q")
    code = run_cli.main(args + ["--set", "X2EditServedJudge.retries=0"])
    err = capsys.readouterr().err
    assert code == 3 and not output.exists()
    assert "first judge call could not connect" in err and f"127.0.0.1:{port}" in err


# --- two tasks in one queue --------------------------------------------------------------------------


def routed_prompt(comfy, tiny_loras, image_name):
    """The task-routed workflow as an API prompt on the tiny models, with the KSampler latent saved."""
    args = run_cli.build_parser().parse_args(
        tiny_args(comfy, "x2edit_task_routed", tiny_loras["x2edit_task_routed"], image_name, "unused.png")
    )
    workflow = json.loads((REPO_ROOT / "workflows" / "x2edit_task_routed.json").read_text())
    args.image = None  # set below: the file is already in the input folder
    prompt = run_cli.prepare_prompt(args, workflow, comfy.object_info(), None, lambda line: None)
    ids = {node["class_type"]: nid for nid, node in prompt.items()}
    prompt[ids["LoadImage"]]["inputs"]["image"] = image_name
    return prompt, ids


def with_branches(prompt, ids, modes, prefix):
    """One router + sampler branch per mode, all on the same loaded MoE model; latents saved per branch."""
    out = copy.deepcopy(prompt)
    router, sampler = ids["X2EditTaskRouter"], ids["KSampler"]
    for i, mode in enumerate(modes):
        r, k, t = (router, sampler, f"90{i}") if i == 0 else (f"8{i}0", f"8{i}1", f"90{i}")
        out[r] = copy.deepcopy(prompt[router])
        out[r]["inputs"]["mode"] = mode
        out[k] = copy.deepcopy(prompt[sampler])
        out[k]["inputs"]["model"] = [r, 0]
        out[t] = {
            "class_type": "X2EditTestSaveTensors",
            "inputs": {"filename_prefix": f"{prefix}_{i}", "latent": [k, 0]},
        }
    return out


def _latents(comfy, entry, count):
    return [
        load_file(comfy.output_files(entry, node_id=f"90{i}", kind="tensors")[0])["latent"]
        for i in range(count)
    ]


def test_two_tasks_in_one_queue_match_each_run_alone(comfy, tiny_loras, tmp_path):
    name = comfy.add_input_file("wf_two_tasks.png", write_image(tmp_path / "s.png", 77, 50, seed=5))
    prompt, ids = routed_prompt(comfy, tiny_loras, name)
    tasks = ("remove_subject", "style_change")
    # Each task alone, as two prompts queued back to back (the second clone runs right after the first).
    queued = [comfy.queue(with_branches(prompt, ids, [t], f"wf_two/alone_{t}")) for t in tasks]
    alone = [_latents(comfy, comfy.wait(pid), 1)[0] for pid in queued]
    assert not torch.equal(alone[0], alone[1]), "the task embedding must change the result"

    # Both tasks in one prompt: two routers on the same loaded MoE model.
    both = _latents(comfy, comfy.run(with_branches(prompt, ids, tasks, "wf_two/both")), 2)
    assert torch.equal(both[0], alone[0]) and torch.equal(both[1], alone[1])


def test_expert_map_forces_the_mapped_expert(comfy, tiny_loras, tmp_path):
    """Router expert map on ICEdit's token-routed MoE == the loader's own 'single expert' routing."""
    name = comfy.add_input_file("wf_expert_map.png", write_image(tmp_path / "s.png", 64, 64, seed=6))
    prompt, ids = routed_prompt(comfy, tiny_loras, name)
    loader, router = ids["X2EditMoELoRALoader"], ids["X2EditTaskRouter"]
    prompt[loader]["inputs"]["lora_name"] = tiny_loras["icedit_moe_lora"]
    prompt[router]["inputs"].update(mode="remove_subject", expert_map="remove_subject:2, *:0", num_experts=4)
    routed = _latents(
        comfy, comfy.run(with_branches(prompt, ids, ["remove_subject", "style_change"], "wf_map/r")), 2
    )

    single = []
    for expert in (2, 0):
        fixed = copy.deepcopy(prompt)
        fixed[loader]["inputs"].update(routing="single expert", expert_index=expert)
        fixed[router]["inputs"]["expert_map"] = ""
        single.append(
            _latents(comfy, comfy.run(with_branches(fixed, ids, ["unknown"], f"wf_map/s{expert}")), 1)[0]
        )
    torch.testing.assert_close(routed[0], single[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(routed[1], single[1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(single[0], single[1], atol=1e-3)


# --- bad input ----------------------------------------------------------------------------------------


def run_bad(comfy, tiny_loras, tmp_path, capsys, workflow="x2edit_task_routed", size=(77, 50), edit=None):
    image = write_image(tmp_path / "source.png", *size)
    output = tmp_path / "edited.png"
    args = tiny_args(comfy, workflow, tiny_loras[workflow], image, output, "-q")
    if edit is not None:
        args = edit(args)
    code = run_cli.main(args)
    assert not output.exists()
    return code, capsys.readouterr().err


def test_empty_instruction_is_refused(comfy, tiny_loras, tmp_path, capsys):
    def edit(args):
        args[args.index("--instruction") + 1] = "  "
        return args

    code, err = run_bad(comfy, tiny_loras, tmp_path, capsys, edit=edit)
    assert code == 2 and "the instruction is empty" in err


def test_unknown_task_name_is_refused_with_the_valid_names(comfy, tiny_loras, tmp_path, capsys):
    code, err = run_bad(
        comfy, tiny_loras, tmp_path, capsys, edit=lambda a: a + ["--set", "X2Edit Task Router.mode=teleport"]
    )
    assert code == 2
    assert (
        "mode = 'teleport' is not available" in err
        and "'remove_subject'" in err
        and "'subject_driven'" in err
    )


def test_image_too_small_for_a_patch_reports_the_servers_error(comfy, tiny_loras, tmp_path, capsys):
    code, err = run_bad(comfy, tiny_loras, tmp_path, capsys, size=(300, 4))
    assert code == 3
    assert "X2EditDiptych" in err and "less than one 16-pixel patch" in err


def test_workflow_naming_a_missing_model_lists_the_available_ones(comfy, tiny_loras, tmp_path, capsys):
    def edit(args):
        i = args.index(f"unet={comfy.models['fill']}")
        return args[: i - 1] + args[i + 1 :]  # keep the workflow's flux1-fill-dev.safetensors

    code, err = run_bad(comfy, tiny_loras, tmp_path, capsys, workflow="icedit_normal_lora", edit=edit)
    assert code == 2
    assert "unet_name = 'flux1-fill-dev.safetensors' is not available" in err
    assert comfy.models["fill"] in err and "models/diffusion_models" in err


def test_server_validation_error_is_reported_verbatim(comfy, tiny_loras, tmp_path, capsys):
    code, err = run_bad(comfy, tiny_loras, tmp_path, capsys, edit=lambda a: a + ["--set", "KSampler.steps=0"])
    assert code == 3
    assert "ComfyUI rejected the prompt." in err and "Value 0 smaller than min of 1" in err
    assert "server response: {" in err


def test_every_workflow_in_the_folder_lines_up_with_the_live_servers_nodes(comfy):
    """All workflows/*.json: only installed node types, widget values that line up with the server's
    inputs, and a prompt that saves an image."""
    info = comfy.object_info()
    paths = sorted((REPO_ROOT / "workflows").glob("*.json"))
    assert {f"{w}.json" for w in WORKFLOWS + (EARLY_FILTER,)} <= {p.name for p in paths}
    for path in paths:
        workflow = json.loads(path.read_text())
        assert widget_value_mismatches(workflow, info) == [], path.name
        prompt = workflow_to_prompt(workflow, info)
        assert "SaveImage" in {n["class_type"] for n in prompt.values()}, path.name
        assert not any(n["class_type"].startswith("X2EditTest") for n in prompt.values()), path.name


def test_x2edit_run_starts_a_headless_comfyui_when_given_a_root(
    comfy, tiny_loras, tmp_path, capsys, monkeypatch
):
    """--comfyui-root without --url: x2edit-run starts its own server (here on the tier's models and
    custom nodes), runs the workflow and stops the server."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delenv("COMFYUI_URL", raising=False)
    base = tmp_path / "started"
    for sub in ("output", "input", "user"):
        (base / sub).mkdir(parents=True)
    server_args = (
        f"--cpu --extra-model-paths-config {comfy.server.config_path} --output-directory {base / 'output'} "
        f"--input-directory {base / 'input'} --temp-directory {base} --user-directory {base / 'user'} "
        "--disable-api-nodes --preview-method none --database-url sqlite:///:memory:"
    )
    image = write_image(tmp_path / "source.png", 31, 45)
    output = tmp_path / "edited.png"
    args = tiny_args(comfy, "icedit_normal_lora", tiny_loras["icedit_normal_lora"], image, output)
    i = args.index("--url")
    del args[i : i + 2]
    args += [
        "--comfyui-root",
        str(comfy.server.install.root),
        "--comfyui-python",
        str(comfy.server.install.python),
    ]
    args += ["--server-args", server_args]
    code = run_cli.main(args)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "starting ComfyUI" in err
    with Image.open(output) as result:
        assert result.size == (31, 45)
    assert list((base / "output").rglob("*.png"))  # saved by the started server, not the tier's
