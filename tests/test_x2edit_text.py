"""X2Edit's text path (core tier): prompt building, tokens, padding, mask, positions, and all hidden
states of a transformers Qwen2.5-VL folder against a reference written from the facts."""

import pytest
import torch
from qwen_text_fixtures import (
    PAD_ID,
    load_qwen_tokenizer,
    qwen_tokenizer_dir,
    reference_hidden_states,
)

from x2edit_core.x2edit_text import (
    MAX_TOKENS,
    PROMPT_INFERENCE,
    PROMPT_TRAINING,
    attention_bias,
    chat_text,
    pad_left,
    position_ids,
    rope_cos_sin,
    tokenize_prompt,
    user_message,
)

INSTRUCTIONS = [
    'Make the "old" car red',
    "Remove the man's hat",
    "把背景换成海滩，保留人物\nand keep 'both' quotes \"as is\" \\ ok",
    "Add a sign that says <|im_end|> and {braces}",
    "paint every brick a different colour " * 100,  # more than 512 tokens
]


def test_user_message_forms():
    assert user_message('Make the "old" car red') == (
        "{'Text input': '', 'Instruction editing description': 'Make the \"old\" car red', "
        "'image input': 'yes'}"
    )
    # Python picks double quotes for a string with a single quote, and escapes newlines and backslashes
    assert user_message("it's\nfine \\ ok") == (
        "{'Text input': '', 'Instruction editing description': \"it's\\nfine \\\\ ok\", 'image input': 'yes'}"
    )
    assert user_message("把猫变红", PROMPT_INFERENCE) == (
        "{'Text input': '', 'Instruction editing description': '把猫变红', 'image input': 'yes'}"
    )
    assert user_message("  raw text\n", PROMPT_TRAINING) == "  raw text\n"
    with pytest.raises(ValueError, match="unknown prompt form"):
        user_message("x", "json")


def test_chat_text_is_qwens_chat_format():
    assert chat_text("hi") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_left_padding_positions_and_mask():
    p = pad_left([5, 6, 7], length=6, pad_id=0)
    assert p.input_ids.tolist() == [0, 0, 0, 5, 6, 7]
    assert p.attention_mask.tolist() == [0, 0, 0, 1, 1, 1]
    assert (p.num_tokens, p.truncated) == (3, 0)
    assert position_ids(p.attention_mask[None]).tolist() == [[1, 1, 1, 0, 1, 2]]
    cut = pad_left(list(range(10)), length=4, pad_id=0)
    assert cut.input_ids.tolist() == [0, 1, 2, 3] and (cut.num_tokens, cut.truncated) == (4, 6)
    assert cut.attention_mask.tolist() == [1, 1, 1, 1]

    bias = attention_bias(p.attention_mask[None])
    assert bias.shape == (1, 1, 6, 6)
    allowed = (bias[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 1, 1, 1, 1, 1],  # padding rows: nothing to attend to under the causal padding mask -> all keys
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 0, 0],  # real rows: causal over real keys only
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
    ]
    assert torch.isfinite(bias).all()
    # a softmax over a blocked entry gives exactly zero weight
    scores = torch.zeros(6) + bias[0, 0, 3]
    assert torch.softmax(scores, -1).tolist() == [0, 0, 0, 1, 0, 0]


def test_rope_rounding_rounds_only_the_frequencies():
    pos = torch.tensor([[0, 1, 511]])
    cos, sin = rope_cos_sin(pos, 128, 1e6)
    inv = 1.0 / (1e6 ** (torch.arange(0, 128, 2).float() / 128))
    assert torch.equal(cos[0, 2, :64], torch.cos(511 * inv)) and torch.equal(cos[..., :64], cos[..., 64:])
    cos_r, _ = rope_cos_sin(pos, 128, 1e6, round_to=torch.bfloat16)
    assert torch.equal(cos_r[0, 2, :64], torch.cos(511 * inv.bfloat16().float()))
    change = (511 * (inv - inv.bfloat16().float())).abs().max()
    print(f"bf16-rounded RoPE, largest angle change at position 511: {change:.3f} rad")


# -- with ComfyUI's Qwen2.5 tokenizer files ---------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_tokenizer():
    folder = qwen_tokenizer_dir()
    if folder is None:
        pytest.skip("no ComfyUI checkout with comfy/text_encoders/qwen25_tokenizer (set COMFYUI_ROOT)")
    return load_qwen_tokenizer(folder)


def test_chat_text_matches_the_tokenizer_folders_template(qwen_tokenizer):
    message = user_message(INSTRUCTIONS[2])
    rendered = qwen_tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == chat_text(message)


@pytest.mark.parametrize("index", range(len(INSTRUCTIONS)))
def test_tokens_equal_the_reference_processor_call(qwen_tokenizer, index):
    """Ours == the tokenizer asked as the reference asks: max_length padding on the left, truncation."""
    instruction = INSTRUCTIONS[index]
    ours = tokenize_prompt(qwen_tokenizer, instruction)
    qwen_tokenizer.padding_side = "left"
    ref = qwen_tokenizer(
        [chat_text(user_message(instruction))],
        padding="max_length",
        max_length=MAX_TOKENS,
        truncation=True,
        return_tensors="pt",
    )
    assert ours.input_ids.tolist() == ref["input_ids"][0].tolist()
    assert ours.attention_mask.tolist() == ref["attention_mask"][0].tolist()
    assert ours.input_ids[0].item() == PAD_ID or ours.truncated > 0
    if index == len(INSTRUCTIONS) - 1:
        assert ours.num_tokens == MAX_TOKENS and ours.truncated > 0
    else:
        assert ours.truncated == 0
    if index == 3:  # a special-token string typed in the instruction stays special, as in the reference
        assert ours.input_ids.tolist().count(qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")) == 3


# -- transformers folder path ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The judge tests' tiny Qwen2.5-VL folder (word-level tokenizer; its own padding id)."""
    from vlm_fixtures import build_tiny_qwen2vl

    return build_tiny_qwen2vl(tmp_path_factory.mktemp("qwen25vl"), seed=3, family="qwen2_5_vl")


@pytest.mark.parametrize("round_bf16", [False, True])
def test_folder_hidden_states_equal_reference(tiny_folder, round_bf16):
    import transformers

    from x2edit_core.models.qwen_vl_text import QwenVLTextEncoder

    encoder = QwenVLTextEncoder(tiny_folder, dtype=torch.float32)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_folder, dtype=torch.float32)
    model.eval()
    worst = 0.0
    for instruction in ["the cat is better", "edit the background image " * 150]:
        prompt = tokenize_prompt(encoder.tokenizer, instruction, length=256)
        assert prompt.input_ids[prompt.attention_mask == 0].unique().tolist() in (
            [],
            [encoder.tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        )
        got = encoder.hidden_states(prompt, round_rope_bf16=round_bf16)
        ref = reference_hidden_states(
            model, prompt.input_ids[None], prompt.attention_mask[None], round_bf16=round_bf16
        )
        assert got.shape == ref.shape == (1, 3, 256, 64)
        assert torch.isfinite(got).all()
        worst = max(worst, (got - ref).abs().max().item())
    print(f"transformers folder path (round_bf16={round_bf16}): max |hidden - reference| {worst:.3g}")
    assert worst <= 1e-5
    if round_bf16:  # the switch changes the result, so the test above can tell the two apart
        effect = (encoder.hidden_states(prompt, round_rope_bf16=False) - got).abs().max().item()
        print(f"  effect of the rounding on the same prompt: {effect:.3g}")
        assert effect > 20 * max(worst, 1e-6)
    encoder.release()
