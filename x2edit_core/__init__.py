"""x2edit core: the maths and file formats of the x2edit pack, importable without ComfyUI.

Layout (dependencies point down this list and never to ComfyUI, ``nodes`` or ``train``):

Pure maths and formats (torch, safetensors, Pillow; no network, no optional dependency)
    moe.py             MoE-LoRA layer: experts, token / task / forced routers, merging
    placement.py       diffusers FLUX module names -> ComfyUI's fused layers and row slices
    formats.py         detect and read ICEdit / X2Edit / our / plain LoRA files; write ours
    safetensors_io.py  strict, streaming safetensors reader
    prompt.py          ICEdit's in-context prompt, safe templates
    diptych.py         diptych geometry, build and crop
    tasks.py           X2Edit's 16 tasks and the built-in instruction classifier
    x2edit_text.py     X2Edit's text path: chat text, 512-token left padding, mask, positions, RoPE
    alignnet.py        X2Edit's AlignNet: a VLM's hidden states -> FLUX text conditioning
    x2edit_source.py   X2Edit's source sizes (buckets, 512 crop, keep aspect), RoPE offset, posterior
    condition_stream.py X2Edit's condition stream over FLUX blocks: ids, t = 0 modulation, joint blocks
    losses.py          flow matching and X2Edit's contrastive loss (used by training)
    early_filter.py    the early filter's plan: seeds, batches, NFE, report
    selection.py       running-winner selection over any judge; failure policy and deadline
    errors.py          error types (every message says what to do)

Sub-packages (heavier or optional dependencies, imported lazily)
    judges/            VLM judges: base (interface, prompt, answer parsing), scoring (VIEScore-style
                       SC/PQ scores), served (OpenAI-compatible HTTP; api_keys: which key may go
                       where), local (transformers VLM folder)
    models/            local model loading: task_lm (task classification with a causal LM folder),
                       qwen_vl_text (X2Edit's text encoder from a Qwen2.5-VL folder)
    run/               ``x2edit-run``: workflow_api (UI -> API prompt, ComfyUI HTTP client, progress
                       over websocket-client from the ``run`` extra), cli
    evaluation/        ``x2edit-eval``: manifests, L1/L2/CLIP/DINO metrics, judge scores, HTML report

Formats, formulas and their sources: docs/reference.md (X2Edit's text path: docs/x2edit_text.md); how
the parts fit: docs/architecture.md.
"""

__version__ = "0.1.0"
