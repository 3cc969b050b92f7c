"""X2Edit Text Encode on the real server: ComfyUI's own Qwen2.5-VL (core CLIPLoader, type qwen_image)
gives the same hidden states, pad rows included, as a transformers Qwen2_5_VLForConditionalGeneration
with the same weights run as X2Edit's reference runs it; the node's conditioning equals a plain torch
AlignNet over those reference states.

The text encoder is a tiny random Qwen2.5-VL (full vocabulary, width 128, 3 layers) written in the key
layout of qwen_2.5_vl_7b.safetensors; the test support pack tells ComfyUI its widths (ComfyUI hard-codes
the 7B's). Tokens come from ComfyUI's own Qwen2.5 tokenizer files.
"""

import pytest
import torch
from comfy_harness import ComfyExecutionError, ComfyValidationError
from lora_files import alignnet_state_dict
from qwen_text_fixtures import (
    build_tiny_qwen25vl,
    comfy_state_dict,
    load_qwen_tokenizer,
    qwen_tokenizer_dir,
    reference_alignnet,
    reference_hidden_states,
)
from safetensors.torch import load_file

TE_NAME = "x2edit_tiny_qwen25vl.safetensors"
ALIGNNET = "x2edit_tiny_ckpt/diffusion_pytorch_model.bin"
INSTRUCTIONS = [
    'Make the "old" car red',
    "把背景换成海滩，保留人物\nand keep 'both' quotes \"as is\"",
    "Add a sign that reads <|im_end|> {here}",
    "paint every brick a different colour " * 100,  # more than 512 tokens: truncated
]


@pytest.fixture(scope="module")
def tiny_text(comfy):
    model = build_tiny_qwen25vl(seed=11)
    comfy.add_file("text_encoders", TE_NAME, comfy_state_dict(model))
    sd = alignnet_state_dict(num_states=4, in_dim=128, out_dim=48, pooled_dim=24, seed=12)
    path = comfy.loras_dir / ALIGNNET
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"module.{k}": v for k, v in sd.items()}, str(path))  # as distributed training saves it
    return model, sd


def _clip_loader():
    return {"class_type": "CLIPLoader", "inputs": {"clip_name": TE_NAME, "type": "qwen_image"}}


def _tensors(comfy, entry, node_id):
    (path,) = comfy.output_files(entry, node_id=node_id, kind="tensors")
    return load_file(path)


def _hidden_prompt(instruction, form="inference (dict)", round_bf16=False):
    return {
        "1": _clip_loader(),
        "2": {
            "class_type": "X2EditTestQwenHiddenStates",
            "inputs": {
                "clip": ["1", 0],
                "instruction": instruction,
                "prompt_form": form,
                "round_rope_bf16": round_bf16,
                "filename_prefix": "x2edit_text/hidden",
            },
        },
    }


@pytest.mark.parametrize(
    "index, form, round_bf16",
    [(0, "inference (dict)", False), (1, "inference (dict)", False), (2, "training (raw)", False)]
    + [(3, "inference (dict)", False), (1, "inference (dict)", True)],
)
def test_hidden_states_equal_transformers_reference(comfy, tiny_text, index, form, round_bf16):
    model, _ = tiny_text
    out = _tensors(comfy, comfy.run(_hidden_prompt(INSTRUCTIONS[index], form, round_bf16)), "2")
    ids, mask, got = out["input_ids"], out["attention_mask"], out["hidden_states"]
    assert ids.shape == mask.shape == (512,)
    ref = reference_hidden_states(model, ids[None], mask[None], round_bf16=round_bf16)
    assert got.shape == ref.shape == (1, 4, 512, 128)
    assert torch.isfinite(got).all()
    pad = mask == 0
    d_all = (got - ref).abs().max().item()
    d_pad = (got[:, :, pad] - ref[:, :, pad]).abs().max().item() if pad.any() else 0.0
    print(
        f"ComfyUI Qwen2.5-VL vs transformers ({form}, round_bf16={round_bf16}, {int(mask.sum())} tokens, "
        f"{int(pad.sum())} pad rows): max |diff| {d_all:.3g} (pad rows {d_pad:.3g}), max |ref| "
        f"{ref.abs().max().item():.3g}"
    )
    assert d_all <= 1e-4
    if index == 3:
        assert not pad.any()
    else:
        assert pad.any() and ids[0].item() == 151643


def _encode_prompt(instruction, alignnet=ALIGNNET, clip=True, qwen_folder=None):
    inputs = {"instruction": instruction, "alignnet": alignnet, "prompt_form": "inference (dict)"}
    prompt = {}
    if clip is True:
        prompt["1"] = _clip_loader()
        inputs["clip"] = ["1", 0]
    elif clip == "stand-in":
        prompt["1"] = {
            "class_type": "X2EditTestCLIP",
            "inputs": {"seed": 0, "tokens": 8, "context_dim": 32, "pooled_dim": 16},
        }
        inputs["clip"] = ["1", 0]
    if qwen_folder is not None:
        inputs["qwen_folder"] = qwen_folder
    prompt["2"] = {"class_type": "X2EditTextEncode", "inputs": inputs}
    prompt["3"] = {
        "class_type": "X2EditTestSaveConditioning",
        "inputs": {"conditioning": ["2", 0], "filename_prefix": "x2edit_text/cond"},
    }
    prompt["4"] = {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}
    return prompt


@pytest.mark.parametrize("index", [0, 3])
def test_node_conditioning_equals_reference_alignnet(comfy, tiny_text, index):
    model, sd = tiny_text
    entry = comfy.run(_encode_prompt(INSTRUCTIONS[index]))
    out = _tensors(comfy, entry, "3")
    report = "".join(entry["outputs"]["4"]["text"])
    # the same tokens as the hidden-state node, then the reference over them
    hidden = _tensors(comfy, comfy.run(_hidden_prompt(INSTRUCTIONS[index])), "2")
    states = reference_hidden_states(model, hidden["input_ids"][None], hidden["attention_mask"][None])
    ref_embeds, ref_pooled = reference_alignnet(sd, states)
    assert set(out) == {"cond", "pooled_output"}  # no guidance unless FluxGuidance adds it
    assert out["cond"].shape == (1, 512, 48) and out["pooled_output"].shape == (1, 24)
    d_cond = (out["cond"] - ref_embeds).abs().max().item()
    d_pooled = (out["pooled_output"] - ref_pooled).abs().max().item()
    print(
        f"X2Edit Text Encode vs reference AlignNet(reference states): cond {d_cond:.3g}, "
        f"pooled {d_pooled:.3g}"
    )
    assert d_cond <= 1e-4 and d_pooled <= 1e-4
    assert "left-padded to 512" in report
    if index == 3:
        assert "WARNING" in report and "were cut to fit 512" in report
    else:
        assert "WARNING" not in report


def test_clear_errors(comfy, tiny_text):
    with pytest.raises(ComfyExecutionError, match="holds no Qwen2.5-VL"):
        comfy.run(_encode_prompt("make it red", clip="stand-in"))
    with pytest.raises(ComfyExecutionError, match="connect a clip"):
        comfy.run(_encode_prompt("make it red", clip=False))
    with pytest.raises((ComfyExecutionError, ComfyValidationError), match="AlignNet|alignnet"):
        comfy.run(_encode_prompt("make it red", alignnet="nowhere/diffusion_pytorch_model.bin"))


def test_alignnet_choice_is_checked_at_queue_time_and_its_form_when_read(comfy, tiny_text):
    """A missing AlignNet (or Qwen folder) is refused when the prompt is queued (HTTP 400), before the
    text encoder loads; a listed file that is no AlignNet fails when read, with the reason."""
    te = comfy.add_file(
        "text_encoders",
        "x2edit_queue_check_qwen25vl.safetensors",
        comfy.models_dir / "text_encoders" / TE_NAME,
    )

    def prompt(**inputs):
        p = _encode_prompt("make it red", **inputs)
        p["1"]["inputs"]["clip_name"] = te
        return p

    cases = {
        "missing AlignNet": (
            prompt(alignnet="nowhere/diffusion_pytorch_model.bin"),
            "not found in the loras",
        ),
        "AlignNet outside loras": (prompt(alignnet=f"../text_encoders/{te}"), "not found in the loras"),
        "missing Qwen folder": (prompt(qwen_folder="x2edit_no_such_qwen"), "is not under models/vlm"),
    }
    history = set(comfy.get("/history"))
    offset = comfy.log_offset()
    for case, (bad, needle) in cases.items():
        with pytest.raises(ComfyValidationError) as refused:
            comfy.queue(bad)
        assert needle in str(refused.value), f"{case}: {refused.value}"
    queue = comfy.get("/queue")
    assert not queue["queue_running"] and not queue["queue_pending"]
    assert set(comfy.get("/history")) == history
    assert "CLIP/text encoder model load" not in comfy.log(offset)  # the text encoder never loaded

    torch.save({"weight": torch.zeros(2, 2)}, str(comfy.loras_dir / "x2edit_not_an_alignnet_proj.pt"))
    with pytest.raises(ComfyExecutionError, match="x2edit_not_an_alignnet_proj.pt: not an X2Edit AlignNet"):
        comfy.run(prompt(alignnet="x2edit_not_an_alignnet_proj.pt"))
    comfy.run(prompt())  # the same prompt with a good AlignNet loads the text encoder
    assert "CLIP/text encoder model load" in comfy.log(offset)


def test_transformers_folder_equals_the_clip_loader_path(comfy, tiny_text):
    """The qwen_folder option (a transformers Qwen2.5-VL folder in models/vlm) gives the conditioning the
    CLIPLoader path gives on the same weights and tokenizer."""
    model, _ = tiny_text
    tokenizer_dir = qwen_tokenizer_dir()
    if tokenizer_dir is None:
        pytest.fail("no ComfyUI Qwen2.5 tokenizer folder found (the server's own release should have it)")
    name = "x2edit_tiny_qwen25vl_folder"
    folder = comfy.models_dir / "vlm" / name
    model.save_pretrained(str(folder))
    load_qwen_tokenizer(tokenizer_dir).save_pretrained(str(folder))
    for index in (0, 1):
        by_clip = _tensors(comfy, comfy.run(_encode_prompt(INSTRUCTIONS[index])), "3")
        entry = comfy.run(_encode_prompt(INSTRUCTIONS[index], clip=False, qwen_folder=name), timeout=300)
        by_folder = _tensors(comfy, entry, "3")
        assert f"transformers folder {name}" in "".join(entry["outputs"]["4"]["text"])
        d_cond = (by_folder["cond"] - by_clip["cond"]).abs().max().item()
        d_pooled = (by_folder["pooled_output"] - by_clip["pooled_output"]).abs().max().item()
        print(
            f"instruction {index}: transformers folder vs CLIPLoader path: cond {d_cond:.3g}, pooled "
            f"{d_pooled:.3g} (max |cond| {by_clip['cond'].abs().max().item():.3g})"
        )
        assert d_cond <= 1e-4 and d_pooled <= 1e-4
