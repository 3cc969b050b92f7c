"""The in-context editing nodes and the task router on the real server (API-format prompts).

The IC prompt node needs a CLIP; CLIP-L + T5 cannot be tiny, so X2EditTestCLIP (support pack) stands in:
its conditioning is seeded by the prompt text and carries that text, so the encoded prompt is visible.
"""

import pytest
import torch
from comfy_harness import ComfyExecutionError, ComfyValidationError
from safetensors.torch import load_file

from x2edit_core.prompt import IC_PROMPT_TEMPLATE
from x2edit_core.tasks import TASK_NAMES


def _texts(entry, node_id):
    return entry["outputs"][node_id]["text"]


def _tensors(comfy, entry, node_id):
    (path,) = comfy.output_files(entry, node_id=node_id, kind="tensors")
    return load_file(path)


def ic_prompt(instruction, template=IC_PROMPT_TEMPLATE, subject=""):
    return {
        "1": {
            "class_type": "X2EditTestCLIP",
            "inputs": {"seed": 0, "tokens": 8, "context_dim": 32, "pooled_dim": 16},
        },
        "2": {
            "class_type": "X2EditICPrompt",
            "inputs": {
                "clip": ["1", 0],
                "instruction": instruction,
                "template": template,
                "guidance": 50.0,
                "subject": subject,
            },
        },
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }


def test_ic_prompt_text_is_icedits_training_prompt(comfy):
    entry = comfy.run(ic_prompt("  make the car red  "))
    assert _texts(entry, "3") == [
        "A diptych with two side-by-side images of the same scene. On the right, the scene is exactly the "
        "same as on the left but make the car red"
    ]


def test_ic_prompt_custom_template_with_subject(comfy):
    entry = comfy.run(
        ic_prompt("turn it blue", "Edit {subject}: {instruction} {{exactly}}", subject="the mug")
    )
    assert _texts(entry, "3") == ["Edit the mug: turn it blue {exactly}"]


@pytest.mark.parametrize(
    "instruction, template, message",
    [
        ("   ", IC_PROMPT_TEMPLATE, "The edit instruction is empty"),
        ("x", "no placeholder here", "has no {instruction} placeholder"),
        ("x", "{instruction} {object}", "Unknown placeholder {object}"),
    ],
)
def test_ic_prompt_bad_input_is_a_clear_error(comfy, instruction, template, message):
    with pytest.raises(ComfyExecutionError, match="X2EditICPrompt") as raised:
        comfy.run(ic_prompt(instruction, template))
    assert message in str(raised.value)


def diptych_prompt(width, height, panel_width, batch=1, prefix="edit_nodes/diptych"):
    return {
        "1": {
            "class_type": "X2EditTestNoiseImage",
            "inputs": {"width": width, "height": height, "batch_size": batch, "seed": 3},
        },
        "2": {"class_type": "X2EditDiptych", "inputs": {"image": ["1", 0], "panel_width": panel_width}},
        "3": {"class_type": "X2EditCropDiptych", "inputs": {"image": ["2", 0], "geometry": ["2", 2]}},
        "4": {
            "class_type": "X2EditTestSaveTensors",
            "inputs": {"filename_prefix": f"{prefix}_dip", "image": ["2", 0], "mask": ["2", 1]},
        },
        "5": {
            "class_type": "X2EditTestSaveTensors",
            "inputs": {"filename_prefix": f"{prefix}_crop", "image": ["3", 0]},
        },
        "6": {
            "class_type": "X2EditTestSaveTensors",
            "inputs": {"filename_prefix": f"{prefix}_src", "image": ["1", 0]},
        },
    }


@pytest.mark.parametrize(
    "width, height, panel, batch, panel_hw",
    [
        (77, 50, 64, 1, (48, 64)),
        (50, 77, 64, 2, (96, 64)),
        (513, 17, 512, 1, (16, 512)),
        (16, 16, 16, 1, (16, 16)),
    ],
)
def test_diptych_and_crop_on_the_server(comfy, width, height, panel, batch, panel_hw):
    entry = comfy.run(diptych_prompt(width, height, panel, batch))
    dip = _tensors(comfy, entry, "4")
    ph, pw = panel_hw
    assert dip["image"].shape == (batch, ph, 2 * pw, 3)
    assert dip["mask"].shape == (batch, ph, 2 * pw)
    assert torch.all(dip["mask"][..., :pw] == 0) and torch.all(dip["mask"][..., pw:] == 1)
    crop = _tensors(comfy, entry, "5")["image"]
    assert crop.shape == (batch, height, width, 3)  # the source's exact size, whatever the panel


def test_diptych_of_an_image_too_flat_for_one_patch_is_a_clear_error(comfy):
    with pytest.raises(ComfyExecutionError, match="X2EditDiptych") as raised:
        comfy.run(diptych_prompt(300, 8, 64))
    assert "less than one 16-pixel patch" in str(raised.value)


def test_crop_with_a_foreign_geometry_is_a_clear_error(comfy):
    prompt = diptych_prompt(77, 50, 64)
    prompt["7"] = {
        "class_type": "X2EditTestNoiseImage",
        "inputs": {"width": 40, "height": 40, "batch_size": 1, "seed": 1},
    }
    prompt["3"]["inputs"]["image"] = ["7", 0]
    with pytest.raises(ComfyExecutionError, match="X2EditCropDiptych"):
        comfy.run(prompt)


def router_prompt(instruction, mode="auto", expert_map="", num_experts=4, models=None):
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": models["fill"], "weight_dtype": "default"}},
        "2": {
            "class_type": "X2EditTaskRouter",
            "inputs": {
                "model": ["1", 0],
                "instruction": instruction,
                "mode": mode,
                "lm_folder": "",
                "expert_map": expert_map,
                "num_experts": num_experts,
            },
        },
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }


@pytest.mark.parametrize(
    "instruction, mode, expected",
    [
        ("remove the cup from the table", "auto", "remove_subject"),
        ("把背景换成海滩", "auto", "background_change"),
        ("make it a watercolor painting", "auto", "style_change"),
        ("remove the cup from the table", "color_change", "color_change"),
        ("", "text_change", "text_change"),  # an explicit task needs no instruction
    ],
)
def test_task_router_reports_the_chosen_task(comfy, instruction, mode, expected):
    entry = comfy.run(router_prompt(instruction, mode, models=comfy.models))
    assert _texts(entry, "3") == [expected]
    assert _texts(entry, "4") == [str(TASK_NAMES.index(expected))]


def test_task_router_lists_every_task_in_its_mode_combo(comfy):
    spec = comfy.object_info("X2EditTaskRouter")["input"]["required"]["mode"]
    assert spec[1]["options"] == ["auto", *TASK_NAMES]


def test_task_router_empty_instruction_in_auto_mode_is_a_clear_error(comfy):
    with pytest.raises(ComfyExecutionError, match="X2EditTaskRouter") as raised:
        comfy.run(router_prompt("  ", "auto", models=comfy.models))
    assert "the instruction is empty and mode is auto" in str(raised.value)


def test_task_router_unknown_task_is_rejected_with_the_valid_names(comfy):
    with pytest.raises(ComfyValidationError) as raised:
        comfy.queue(router_prompt("x", "remove_everything", models=comfy.models))
    body = raised.value.body
    assert (
        "Unknown task 'remove_everything'" in body and "remove_subject" in body and "subject_driven" in body
    )


@pytest.mark.parametrize(
    "expert_map, message",
    [
        ("remove_subject:9", "expert 9 is out of range for num_experts 4"),
        ("remove_subject", "is not 'task:expert'"),
        ("teleport:1", "Unknown task 'teleport'"),
        ("remove_subject:1, remove_subject:2", "names 'remove_subject' twice"),
    ],
)
def test_task_router_bad_expert_map_is_rejected(comfy, expert_map, message):
    with pytest.raises(ComfyValidationError) as raised:
        comfy.queue(router_prompt("remove it", "auto", expert_map=expert_map, models=comfy.models))
    assert message in raised.value.body


def test_task_router_classifies_with_a_local_lm_folder(comfy, tmp_path):
    from test_tasks import _save_tiny_lm  # tests/ is on sys.path (comfy_harness)

    from x2edit_core.models.task_lm import LocalLMClassifier
    from x2edit_core.tasks import classify_instruction

    _save_tiny_lm(tmp_path / "lm", chat=True)
    # The tiny random LM answers the same way here (greedy decoding): the server must agree with it,
    # and the built-in rules must choose differently, or the test could not tell the two apart.
    expected = LocalLMClassifier(tmp_path / "lm")("remove the cup").task_id
    assert expected != classify_instruction("remove the cup").task_id
    prompt = router_prompt("remove the cup", "auto", models=comfy.models)
    prompt["2"]["inputs"]["lm_folder"] = str(tmp_path / "lm")
    entry = comfy.run(prompt)
    assert _texts(entry, "3") == [TASK_NAMES[expected]]
    assert _texts(entry, "4") == [str(expected)]

    prompt["2"]["inputs"]["lm_folder"] = str(tmp_path / "missing")
    with pytest.raises(ComfyValidationError) as raised:  # refused when queued, before anything runs
        comfy.queue(prompt)
    assert "does not exist" in raised.value.body
