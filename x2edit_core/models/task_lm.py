"""Task classification with a local transformers causal LM folder (as X2Edit does with Qwen3-8B).

transformers is imported only when a classifier is built; the prompt and the answer parsing are pure
functions in `x2edit_core.tasks`.
"""

from __future__ import annotations

from pathlib import Path

from ..tasks import Classification, ClassifierError, build_lm_prompt, parse_task_answer


class LocalLMClassifier:
    """Classify with a local transformers causal LM folder (no download), as X2Edit does with Qwen3-8B."""

    def __init__(self, folder: str | Path, device: str = "cpu", max_new_tokens: int = 12):
        folder = Path(folder)
        if not folder.is_dir():
            raise ClassifierError(
                f"LM classifier folder {str(folder)!r} does not exist; give a local model folder."
            )
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as err:  # pragma: no cover - transformers is a runtime dependency
            raise ClassifierError("The LM classifier needs the 'transformers' package.") from err
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ClassifierError(
                f"Could not load a causal LM and tokenizer from {str(folder)!r}: {err}. The folder needs "
                "config.json, the weights and the tokenizer files (as saved by save_pretrained)."
            ) from err
        self.model.to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens

    def _encode(self, prompt: str):
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            try:
                text = tok.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
                )
            except TypeError:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        return tok(text, return_tensors="pt").to(self.device)

    def generate_answer(self, instruction: str) -> str:
        import torch

        inputs = self._encode(build_lm_prompt(instruction))
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad_id
            )
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True)

    def __call__(self, instruction: str) -> Classification:
        if not isinstance(instruction, str) or not instruction.strip():
            return Classification(0, 0.0, "empty")
        answer = self.generate_answer(instruction)
        tid = parse_task_answer(answer)
        return Classification(tid, 1.0 if tid else 0.0, f"lm:{answer.strip()[:40]}")
