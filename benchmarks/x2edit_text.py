"""Peak memory of X2Edit's text path on CPU (tiny and medium random Qwen2.5-VL), measured in one run.

    python benchmarks/x2edit_text.py [--sizes tiny,medium] [--tokens 60]

For each model size, above the RSS with the model loaded (Linux peak-RSS counter, reset per case):
  ours:   the transformers-folder path of X2Edit Text Encode (explicit 512 x 512 mask, positions,
          all hidden states stacked into [1, layers + 1, 512, width] fp32);
  stock:  the same model's plain transformers forward on the same 512 tokens with a 2D padding mask and
          output_hidden_states (no stacking), printed beside it as the ratio ours / stock;
  AlignNet: X2Edit's AlignNet at its real widths (29 x 3584 -> 4096 / 768) on a [1, 29, 512, 3584]
          stack, with the size of that stack for scale.
No assertion: the figures are printed.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from x2edit_core.alignnet import AlignNet  # noqa: E402
from x2edit_core.models.qwen_vl_text import QwenVLTextEncoder  # noqa: E402
from x2edit_core.x2edit_text import pad_left  # noqa: E402

SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=1),
    "medium": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=4),
}
MB = 1024 * 1024


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def peak_above_baseline(fn) -> float:
    """MB of peak RSS above the RSS before `fn` runs (the peak counter is reset first)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status("VmRSS")
    result = fn()
    peak = _status("VmHWM")
    del result
    gc.collect()
    return (peak - base) / MB


def build_folder(size: str, folder: str) -> None:
    import transformers
    from qwen_text_fixtures import TINY_TEXT, build_tiny_qwen25vl
    from vlm_fixtures import build_tiny_tokenizer

    TINY_TEXT_BACKUP = dict(TINY_TEXT)
    TINY_TEXT.update(SIZES[size], num_key_value_heads=1)
    try:
        model = build_tiny_qwen25vl(seed=0, num_layers=SIZES[size]["num_hidden_layers"])
    finally:
        TINY_TEXT.clear()
        TINY_TEXT.update(TINY_TEXT_BACKUP)
    model.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    del model
    assert transformers  # the folder is read back by QwenVLTextEncoder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="tiny,medium")
    parser.add_argument("--tokens", type=int, default=60, help="real tokens before left padding to 512")
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = ("model", "layers", "width", "states MB", "ours MB", "stock MB", "ratio")
    print("{:<8} {:>6} {:>6} {:>10} {:>9} {:>9} {:>6}".format(*header))
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as folder:
            build_folder(size, folder)
            encoder = QwenVLTextEncoder(folder, dtype=torch.float32)
            lm = encoder.text_model
            ids = torch.randint(0, 20, (args.tokens,)).tolist()
            prompt = pad_left(ids, 512, pad_id=encoder.tokenizer.convert_tokens_to_ids("<|endoftext|>"))
            layers, width = len(lm.layers), lm.config.hidden_size
            states_mb = (layers + 1) * 512 * width * 4 / MB

            def ours(encoder=encoder, prompt=prompt):
                return encoder.hidden_states(prompt)

            def stock(lm=lm, prompt=prompt):
                with torch.no_grad():
                    return lm(
                        input_ids=prompt.input_ids[None],
                        attention_mask=prompt.attention_mask[None],
                        output_hidden_states=True,
                        use_cache=False,
                    ).hidden_states

            ours(), stock()  # warm-up (lazy allocations)
            m_ours, m_stock = peak_above_baseline(ours), peak_above_baseline(stock)
            print(
                f"{size:<8} {layers:>6} {width:>6} {states_mb:>10.1f} {m_ours:>9.1f} {m_stock:>9.1f} "
                f"{m_ours / max(m_stock, 1e-9):>5.2f}x"
            )
            encoder.release()
    net = AlignNet().eval()  # X2Edit's widths, random weights
    states = torch.randn(1, 29, 512, 3584)

    def align():
        with torch.no_grad():
            return net(states)

    align()
    weights_mb = sum(p.numel() for p in net.parameters()) * 4 / MB
    print(
        f"AlignNet (29 x 3584 -> 4096 / 768, {weights_mb:.0f} MB fp32): input stack "
        f"{states.numel() * 4 / MB:.0f} MB, peak above baseline {peak_above_baseline(align):.0f} MB"
    )


if __name__ == "__main__":
    main()
