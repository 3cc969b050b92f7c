"""Test support for the early-filter judges: a tiny random Qwen2-VL folder and a fake chat server.

- `build_tiny_qwen2vl(folder)` writes a randomly initialised Qwen2-VL (hidden 64, 2 text layers,
  vision depth 1, patch 14) with a word-level tokenizer that has the special tokens of Qwen2-VL's
  chat format, a Qwen2-VL image processor (small min/max pixels) and a chat template: the same
  files a real model folder has, with nothing downloaded.
- `FakeChatServer` is an OpenAI-style chat-completions server on 127.0.0.1 (http.server in a
  thread) that answers from a script and records every request.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Words the tiny model can say; the answers are random but come from this list.
TINY_WORDS = [
    "user",
    "assistant",
    "system",
    "Edited",
    "Original",
    "image",
    "Image",
    "edit",
    "1",
    "2",
    "1:",
    "2:",
    "image:",
    "is",
    "better",
    "worse",
    "the",
    "first",
    "second",
    "because",
    "background",
    "cat",
    "hat",
]

# The Qwen2-VL chat format (what the real model folders ship, without the system prompt).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer():
    """A fast word-level tokenizer with Qwen2-VL's special tokens, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0}
    for word in TINY_WORDS + QWEN_SPECIAL_TOKENS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    backend.add_special_tokens(QWEN_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_image_processor():
    """Qwen2-VL's image processor with few patches (56x56 to 112x112 pixels per image)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as ImageProcessor,
        )
    except ImportError:  # older transformers: one class
        from transformers import Qwen2VLImageProcessor as ImageProcessor

    return ImageProcessor(
        min_pixels=56 * 56,
        max_pixels=112 * 112,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )


def build_tiny_qwen2vl(folder: str | Path, seed: int = 0, family: str = "qwen2_vl") -> Path:
    """Write a tiny random Qwen2-VL (family "qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl") model folder:
    config, weights, tokenizer and processor files."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    image_processor = build_tiny_image_processor()
    ids = tokenizer.convert_tokens_to_ids
    vocab_size = len(tokenizer)
    if family == "qwen2_vl":
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision_config = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    elif family == "qwen2_5_vl":
        config_class = transformers.Qwen2_5_VLConfig
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
        vision_config = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            window_size=56,
            fullatt_block_indexes=[1],
        )
    else:
        raise ValueError(f"unknown tiny VLM family {family!r}")
    vision_config.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = config_class(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    # What a real folder has besides: the processor's class and its chat template.
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": TINY_CHAT_TEMPLATE}))
    return folder


def build_tiny_qwen2vl_processor():
    """A full Qwen2VLProcessor for the tiny model, even where transformers cannot build one
    (without torchvision it insists on a video processor); the judge never sees videos."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    tokenizer = build_tiny_tokenizer()
    image_processor = build_tiny_image_processor()
    try:
        return Qwen2VLProcessor(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=TINY_CHAT_TEMPLATE
        )
    except (ImportError, AttributeError, TypeError, ValueError):
        pass
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, value: None
    try:
        return Qwen2VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=TINY_CHAT_TEMPLATE,
        )
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


# --------------------------------------------------------------------------------------------------
# Fake chat-completions server


@dataclass
class ScriptedReply:
    """One scripted HTTP reply: status, JSON body (or raw bytes), optional delay and headers."""

    status: int = 200
    body: dict | bytes | None = None
    delay_s: float = 0.0
    headers: dict = field(default_factory=dict)


def chat_reply(text: str) -> ScriptedReply:
    """A successful chat-completions reply whose message content is `text`."""
    return ScriptedReply(
        200,
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
        },
    )


@dataclass
class RecordedRequest:
    path: str
    headers: dict
    body: dict


class FakeChatServer:
    """A chat-completions server on 127.0.0.1 answering from `replies` (the last one repeats).

    Use as a context manager; `base_url` is "http://127.0.0.1:PORT/v1" and `requests` lists what
    it received (path, headers with lower-case names, parsed JSON body).
    """

    def __init__(self, replies: list[ScriptedReply]):
        self.replies = list(replies)
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _next_reply(self) -> ScriptedReply:
        with self._lock:
            index = min(len(self.requests) - 1, len(self.replies) - 1)
            return self.replies[index]

    def __enter__(self) -> FakeChatServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw.decode("utf-8"))
                except ValueError:
                    body = {"_unparsed": raw[:200].decode("utf-8", "replace")}
                with fake._lock:
                    fake.requests.append(
                        RecordedRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                reply = fake._next_reply()
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                payload = (
                    reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body or {}).encode()
                )
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):  # keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
