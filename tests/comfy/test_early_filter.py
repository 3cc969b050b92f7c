"""X2Edit Early Filter on the real ComfyUI server with the tiny FLUX Fill: selection, exactness of
both modes against plain KSampler runs, the served and local VLM judges, interrupts."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_harness import ComfyExecutionError, ComfyValidationError, tiny_fill_inpaint_prompt
from safetensors.torch import load_file
from vlm_fixtures import FakeChatServer, ScriptedReply, build_tiny_qwen2vl, chat_reply

FILTER_NODES = ["X2EditEarlyFilter", "X2EditServedJudge", "X2EditLocalVLMJudge", "X2EditTestScriptedJudge"]
INSTRUCTION = "make the right half red"


def filter_prompt(
    comfy,
    judge_node: dict,
    *,
    mode: str = "paper",
    candidates: int = 3,
    early_steps: int = 2,
    total_steps: int = 4,
    batch_size: int = 2,
    seed: int = 10,
    prefix: str = "early_filter/run",
    judge_view: str = "right_panel",
    keep_first_if_judge_fails: bool = False,
    judge_deadline: float = 600.0,
) -> dict:
    """The tiny Fill inpaint prompt plus the filter (node "41", judge "40"); the plain KSampler "10"
    runs n steps from the filter's winning seed, saved by "13"; "42" saves the filter's latent and
    previews."""
    prompt = tiny_fill_inpaint_prompt(comfy.models, steps=total_steps, prefix=prefix)
    prompt["40"] = judge_node
    prompt["41"] = {
        "class_type": "X2EditEarlyFilter",
        "inputs": {
            "model": ["1", 0],
            "positive": ["9", 0],
            "negative": ["9", 1],
            "latent": ["9", 2],
            "vae": ["2", 0],
            "source_image": ["5", 0],
            "instruction": INSTRUCTION,
            "judge": ["40", 0],
            "candidates": candidates,
            "early_steps": early_steps,
            "total_steps": total_steps,
            "cfg": 1.0,
            "sampler_name": "euler",
            "scheduler": "simple",
            "seed": seed,
            "mode": mode,
            "batch_size": batch_size,
            "judge_view": judge_view,
            "judge_deadline": judge_deadline,
            "keep_first_if_judge_fails": keep_first_if_judge_fails,
        },
    }
    prompt["42"] = {
        "class_type": "X2EditTestSaveTensors",
        "inputs": {"filename_prefix": f"{prefix}_filter", "latent": ["41", 2], "image": ["41", 3]},
    }
    prompt["10"]["inputs"]["seed"] = ["41", 0]
    return prompt


def scripted_judge(prefer: str) -> dict:
    return {"class_type": "X2EditTestScriptedJudge", "inputs": {"prefer": prefer}}


def served_judge(base_url: str, api_key_env: str = "", retries: int = 0) -> dict:
    return {
        "class_type": "X2EditServedJudge",
        "inputs": {
            "base_url": base_url,
            "model": "tiny-judge",
            "api_key_env": api_key_env,
            "timeout": 30.0,
            "retries": retries,
            "max_image_side": 256,
            "prompt": "",
        },
    }


def outputs(comfy, entry) -> dict:
    """Filter latent and previews, the plain run's latent, and the report."""
    (filter_path,) = comfy.output_files(entry, node_id="42", kind="tensors")
    (plain_path,) = comfy.output_files(entry, node_id="13", kind="latents")
    saved = load_file(filter_path)
    report = entry["outputs"]["41"]["text"][0]
    return {
        "latent": saved["latent"],
        "previews": saved["image"],
        "plain": load_file(plain_path)["latent_tensor"],
        "report": report,
    }


def combo_options(entry: list) -> list:
    """Options of a combo input in /object_info (V3 nodes list them as "COMBO" + options)."""
    return entry[1]["options"] if entry[0] == "COMBO" else entry[0]


def winning_seed(report: str) -> int:
    line = next(line for line in report.splitlines() if line.startswith("Winning seed: "))
    return int(line.split()[2])


def judged_brightness(preview: torch.Tensor) -> float:
    """What the scripted judge measures: the right panel as 8-bit RGB, averaged."""
    right = preview[:, preview.shape[1] // 2 :, :].numpy()
    return float((np.clip(right, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).astype(np.float64).mean())


def test_filter_nodes_listed(comfy):
    info = comfy.object_info()
    for node in FILTER_NODES:
        assert node in info, f"{node} missing from /object_info"
    spec = info["X2EditEarlyFilter"]
    assert spec["output"] == ["INT", "NOISE", "LATENT", "IMAGE", "STRING"]
    assert spec["input"]["required"]["judge"][0] == "X2EDIT_JUDGE"
    assert combo_options(spec["input"]["required"]["mode"]) == ["paper", "resume"]


@pytest.mark.parametrize("prefer", ["brighter", "darker"])
def test_paper_mode_best_candidate_wins_and_matches_plain_run(comfy, prefer):
    prompt = filter_prompt(
        comfy, scripted_judge(prefer), candidates=4, batch_size=3, prefix=f"ef/paper_{prefer}"
    )
    got = outputs(comfy, comfy.run(prompt))
    assert got["previews"].shape == (4, 64, 64, 3)
    scores = [judged_brightness(p) for p in got["previews"]]
    assert len(set(scores)) == 4, "candidates should differ"
    best = int(np.argmax(scores) if prefer == "brighter" else np.argmin(scores))
    assert winning_seed(got["report"]) == 10 + best
    assert "Judge calls: 3" in got["report"] and "NFE 12" in got["report"]
    # The winner's latent is a plain n-step KSampler run from the winning seed.
    torch.testing.assert_close(got["latent"], got["plain"], atol=1e-5, rtol=0)


def test_resume_mode_winner_matches_plain_n_step_run(comfy):
    prompt = filter_prompt(
        comfy,
        scripted_judge("brighter"),
        mode="resume",
        candidates=3,
        early_steps=3,
        total_steps=7,
        batch_size=2,
        prefix="ef/resume",
    )
    got = outputs(comfy, comfy.run(prompt))
    assert got["previews"].shape == (3, 64, 64, 3)
    scores = [judged_brightness(p) for p in got["previews"]]
    assert winning_seed(got["report"]) == 10 + int(np.argmax(scores))
    assert "NFE 13" in got["report"]  # 3*3 + 7 - 3
    diff = (got["latent"] - got["plain"]).abs().max().item()
    assert diff <= 1e-4, diff
    # The unmasked left half stays the encoded source, as in the plain inpaint run.
    assert torch.isfinite(got["latent"]).all()


def test_resume_winner_is_plain_run_whichever_candidate_wins(comfy):
    # "second" always prefers the challenger, so the last candidate (in the second batch) wins.
    prompt = filter_prompt(
        comfy,
        scripted_judge("second"),
        mode="resume",
        candidates=3,
        early_steps=2,
        total_steps=5,
        batch_size=2,
        seed=20,
        prefix="ef/resume_last",
    )
    got = outputs(comfy, comfy.run(prompt))
    assert winning_seed(got["report"]) == 22
    assert (got["latent"] - got["plain"]).abs().max().item() <= 1e-4


def test_only_unusable_answers_stop_the_filter_with_an_error(comfy):
    offset = comfy.log_offset()
    prompt = filter_prompt(comfy, scripted_judge("unusable"), candidates=3, prefix="ef/unusable")
    with pytest.raises(ComfyExecutionError, match="No judge call gave a usable answer"):
        comfy.run(prompt)
    log = comfy.log(since=offset)
    assert "unusable judge answer" in log  # each failed comparison is in the server log too


def test_asked_for_fall_back_keeps_the_first_candidate_with_a_warning_first(comfy):
    prompt = filter_prompt(
        comfy, scripted_judge("unusable"), candidates=3, prefix="ef/fallback", keep_first_if_judge_fails=True
    )
    got = outputs(comfy, comfy.run(prompt))
    assert winning_seed(got["report"]) == 10
    assert got["report"].startswith("WARNING: unusable judge answer")
    assert "kept WITHOUT any judging" in got["report"] and "unusable answers: 2" in got["report"]


def test_batched_and_one_by_one_candidates_agree(comfy):
    batched = outputs(
        comfy, comfy.run(filter_prompt(comfy, scripted_judge("brighter"), batch_size=3, prefix="ef/batched"))
    )
    single = outputs(
        comfy, comfy.run(filter_prompt(comfy, scripted_judge("brighter"), batch_size=1, prefix="ef/single"))
    )
    torch.testing.assert_close(batched["previews"], single["previews"], atol=2e-3, rtol=0)
    assert winning_seed(batched["report"]) == winning_seed(single["report"])


def test_served_judge_end_to_end(comfy):
    with FakeChatServer([chat_reply("2\nImage 2 follows the instruction better.")]) as server:
        prompt = filter_prompt(comfy, served_judge(server.base_url), candidates=3, prefix="ef/served")
        got = outputs(comfy, comfy.run(prompt))
        requests = list(server.requests)
    assert winning_seed(got["report"]) == 12  # the challenger wins every time
    assert len(requests) == 2
    body = requests[0].body
    assert requests[0].path == "/v1/chat/completions" and body["model"] == "tiny-judge"
    parts = body["messages"][0]["content"]
    assert sum(1 for p in parts if p["type"] == "image_url") == 3
    assert INSTRUCTION in parts[-1]["text"]
    assert "served judge tiny-judge" in got["report"]
    assert "Image 2 follows the instruction better." in got["report"]


def test_served_judge_missing_key_variable_is_refused_at_queue_time(comfy):
    prompt = filter_prompt(
        comfy,
        served_judge("http://127.0.0.1:9/v1", api_key_env="X2EDIT_TEST_UNSET_API_KEY"),
        prefix="ef/nokey",
    )
    with pytest.raises(ComfyValidationError, match="X2EDIT_TEST_UNSET_API_KEY is not set"):
        comfy.queue(prompt)


@pytest.mark.parametrize(
    ("url_kind", "variable", "message"),
    [
        ("fake", "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY, which the machine's owner has not"),
        ("fake", "HF_TOKEN", "HF_TOKEN, which the machine's owner has not"),
        ("http://judge.example.invalid/v1", "X2EDIT_TEST_UNSET_API_KEY", "plain http to a host that is not"),
        ("http://user:pass@127.0.0.1:9/v1", "", "user information"),
    ],
)
def test_hostile_workflow_is_refused_at_queue_time(comfy, url_kind, variable, message):
    with FakeChatServer([chat_reply("1")]) as server:
        url = server.base_url if url_kind == "fake" else url_kind
        prompt = filter_prompt(comfy, served_judge(url, api_key_env=variable), prefix="ef/hostile")
        with pytest.raises(ComfyValidationError, match=message):
            comfy.queue(prompt)
    assert server.requests == []


def test_served_judge_server_error_is_counted_not_fatal(comfy):
    replies = [ScriptedReply(500, {"error": {"message": "model overloaded"}}), chat_reply("2\nsharper")]
    with FakeChatServer(replies) as server:
        got = outputs(comfy, comfy.run(filter_prompt(comfy, served_judge(server.base_url), prefix="ef/500")))
    assert winning_seed(got["report"]) == 12  # the first call failed (kept 10); the second chose 12
    assert "judge errors: 1" in got["report"] and "model overloaded" in got["report"]
    assert got["report"].startswith("WARNING: judge call failed")


def test_every_served_judge_call_failing_is_an_error(comfy):
    with FakeChatServer([ScriptedReply(500, {"error": {"message": "model overloaded"}})]) as server:
        prompt = filter_prompt(comfy, served_judge(server.base_url), prefix="ef/all500")
        with pytest.raises(ComfyExecutionError, match="No judge call gave a usable answer.*model overloaded"):
            comfy.run(prompt)
    assert len(server.requests) == 2


def test_unreachable_judge_stops_at_the_first_call(comfy):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    prompt = filter_prompt(comfy, served_judge(f"http://127.0.0.1:{port}/v1"), prefix="ef/unreachable")
    with pytest.raises(ComfyExecutionError, match="first judge call could not connect"):
        comfy.run(prompt)


def test_local_vlm_judge_end_to_end(comfy):
    build_tiny_qwen2vl(comfy.models_dir / "vlm" / "x2edit_tiny_qwen2vl", seed=3)
    folders = combo_options(comfy.object_info("X2EditLocalVLMJudge")["input"]["required"]["folder"])
    assert "x2edit_tiny_qwen2vl" in folders
    judge = {
        "class_type": "X2EditLocalVLMJudge",
        "inputs": {
            "folder": "x2edit_tiny_qwen2vl",
            "dtype": "float32",
            "device": "cpu",
            "max_new_tokens": 6,
            "max_image_side": 64,
        },
    }
    prompt = filter_prompt(comfy, judge, candidates=2, prefix="ef/local", keep_first_if_judge_fails=True)
    got = outputs(comfy, comfy.run(prompt, timeout=300))
    # The random tiny VLM answers random words: any outcome is fine (an unusable one falls back, as
    # asked), but it must have been asked and have answered without an error.
    assert "local VLM judge x2edit_tiny_qwen2vl" in got["report"]
    assert "Judge calls: 1" in got["report"]
    assert "judge errors: 0" in got["report"], got["report"]
    # The winner follows the one answer: candidate 1 (seed 11) only on a usable "2".
    assert winning_seed(got["report"]) == (11 if "answer 2:" in got["report"] else 10)


def _interrupted(comfy, prompt_id: str) -> list:
    with pytest.raises(ComfyExecutionError) as error:
        comfy.wait(prompt_id, timeout=120)
    return [name for name, _ in error.value.messages]


def _plain_latent(comfy, prefix):
    entry = comfy.run(tiny_fill_inpaint_prompt(comfy.models, prefix=prefix))
    (path,) = comfy.output_files(entry, node_id="13", kind="latents")
    return load_file(path)["latent_tensor"]


def test_interrupt_while_judging_stops_and_leaves_model_clean(comfy):
    before = _plain_latent(comfy, "ef/interrupt_before_judge")
    slow = chat_reply("1\nImage 1 is better.")
    slow.delay_s = 1.0
    with FakeChatServer([slow]) as server:
        prompt_id = comfy.queue(
            filter_prompt(comfy, served_judge(server.base_url), candidates=6, prefix="ef/int")
        )
        deadline = time.monotonic() + 60
        while not server.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.requests, "the judge was never called"
        comfy.post("/interrupt", {})
        names = _interrupted(comfy, prompt_id)
        calls = len(server.requests)
    assert "execution_interrupted" in names
    assert calls < 5  # stopped before asking every pair
    assert torch.equal(_plain_latent(comfy, "ef/interrupt_after_judge"), before)


def test_interrupt_while_sampling_stops_promptly_and_leaves_model_clean(comfy):
    before = _plain_latent(comfy, "ef/interrupt_before_sampling")
    prompt = filter_prompt(
        comfy,
        scripted_judge("brighter"),
        candidates=8,
        early_steps=4000,
        total_steps=8000,
        batch_size=2,
        prefix="ef/int_sampling",
    )
    prompt_id = comfy.queue(prompt)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until our prompt runs
        running = comfy.get("/queue").get("queue_running", [])
        if any(item[1] == prompt_id for item in running):
            break
        time.sleep(0.05)
    time.sleep(1.0)
    comfy.post("/interrupt", {})
    # Uninterrupted, 8 x 4000 early steps would run far past the wait below: finishing within it
    # with "execution_interrupted" shows the sampling loop checked the interrupt.
    names = _interrupted(comfy, prompt_id)
    assert "execution_interrupted" in names
    assert torch.equal(_plain_latent(comfy, "ef/interrupt_after_sampling"), before)


def test_noise_output_drives_sampler_custom_advanced(comfy):
    prompt = filter_prompt(comfy, scripted_judge("brighter"), prefix="ef/noise")
    prompt["50"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    prompt["51"] = {
        "class_type": "BasicScheduler",
        "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": 4, "denoise": 1.0},
    }
    prompt["52"] = {
        "class_type": "CFGGuider",
        "inputs": {"model": ["1", 0], "positive": ["9", 0], "negative": ["9", 1], "cfg": 1.0},
    }
    prompt["53"] = {
        "class_type": "SamplerCustomAdvanced",
        "inputs": {
            "noise": ["41", 1],
            "guider": ["52", 0],
            "sampler": ["50", 0],
            "sigmas": ["51", 0],
            "latent_image": ["9", 2],
        },
    }
    prompt["54"] = {
        "class_type": "X2EditTestSaveTensors",
        "inputs": {"filename_prefix": "ef/noise_custom", "latent": ["53", 0]},
    }
    entry = comfy.run(prompt)
    got = outputs(comfy, entry)
    (custom_path,) = comfy.output_files(entry, node_id="54", kind="tensors")
    torch.testing.assert_close(load_file(custom_path)["latent"], got["plain"], atol=1e-5, rtol=0)


def test_bad_plan_is_reported(comfy):
    prompt = filter_prompt(
        comfy, scripted_judge("first"), mode="resume", early_steps=4, total_steps=4, prefix="ef/bad"
    )
    with pytest.raises(ComfyExecutionError, match="fewer than the total steps"):
        comfy.run(prompt)


WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "icedit_moe_early_filter.json"


def test_shipped_early_filter_workflow_runs_its_own_nodes(comfy, tmp_path):
    """The shipped workflow's own nodes, served judge included (pointed at a fake chat server on
    127.0.0.1), on tiny models. The one stand-in: X2EditTestCLIP for DualCLIPLoader, since CLIP-L + T5
    cannot be tiny; X2Edit ICEdit Prompt still encodes through it."""
    from lora_files import icedit_state_dict
    from PIL import Image

    from x2edit_core.run.workflow_api import check_combo_values, replace_node_type, workflow_to_prompt

    workflow = json.loads(WORKFLOW.read_text())
    info = comfy.object_info()
    for node in workflow["nodes"]:  # shipped workflows use only core and X2Edit nodes
        assert node["type"] in ("Note", "MarkdownNote") or node["type"] in info, node["type"]
        assert not node["type"].startswith("X2EditTest"), node["type"]
    prompt = workflow_to_prompt(workflow, info)
    shipped_types = {node["class_type"] for node in prompt.values()}
    by_type = {node["class_type"]: nid for nid, node in prompt.items()}
    filter_inputs = prompt[by_type["X2EditEarlyFilter"]]["inputs"]
    assert (filter_inputs["candidates"], filter_inputs["early_steps"], filter_inputs["total_steps"]) == (
        6,
        10,
        50,
    )
    assert filter_inputs["mode"] == "paper" and filter_inputs["seed"] == 0
    assert filter_inputs["keep_first_if_judge_fails"] is False and filter_inputs["judge_deadline"] == 600.0

    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "ef_source.png")
    lora = comfy.add_lora(
        "tiny_icedit_moe_ef.safetensors",
        icedit_state_dict(
            hidden=64, num_double=2, num_single=2, experts=4, rank=4, dtype=torch.float32, seed=3
        ),
    )
    prompt[by_type["UNETLoader"]]["inputs"]["unet_name"] = comfy.models["fill"]
    prompt[by_type["VAELoader"]]["inputs"]["vae_name"] = comfy.models["vae"]
    prompt[by_type["X2EditMoELoRALoader"]]["inputs"]["lora_name"] = lora
    prompt[by_type["LoadImage"]]["inputs"]["image"] = comfy.add_input_file(
        "ef_source.png", tmp_path / "ef_source.png"
    )
    prompt[by_type["X2EditDiptych"]]["inputs"]["panel_width"] = 32
    replace_node_type(prompt, info, "DualCLIPLoader", "X2EditTestCLIP")
    filter_inputs.update(candidates=3, early_steps=2, total_steps=3, batch_size=2)
    check_combo_values(prompt, comfy.object_info())
    assert shipped_types - {node["class_type"] for node in prompt.values()} == {"DualCLIPLoader"}

    replies = [chat_reply("2\nImage 2 is redder."), chat_reply("1\nImage 1 keeps the background.")]
    with FakeChatServer(replies) as server:
        prompt[by_type["X2EditServedJudge"]]["inputs"]["base_url"] = server.base_url
        entry = comfy.run(prompt, timeout=300)
    assert len(server.requests) == 2
    assert "make the car red" in server.requests[0].body["messages"][0]["content"][-1]["text"]
    (saved,) = comfy.output_files(entry, node_id=by_type["SaveImage"], kind="images")
    with Image.open(saved) as image:
        assert image.size == (32, 32)  # the crop restores the source size
    previews = comfy.output_files(entry, node_id=by_type["PreviewImage"], kind="images")
    assert len(previews) == 3
    report = "".join(entry["outputs"][by_type["PreviewAny"]]["text"])
    assert "Winning seed: 1 (candidate 1)" in report and "served judge Qwen/Qwen2.5-VL-72B-Instruct" in report
    assert "Image 2 is redder." in report and not report.startswith("WARNING")
