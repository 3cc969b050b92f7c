"""Edit evaluation: MagicBrush / Emu Edit metrics (L1, L2, CLIP-I, CLIP-T, DINO) and VIEScore-style
judge scores (SC, PQ, overall) for a set of edits, with per-task tables and an HTML report.

Python API::

    from x2edit_core.evaluation import ClipEmbedder, DinoEmbedder, evaluate, load_manifest
    run = evaluate(load_manifest("edits.jsonl"), "eval_out", clip=ClipEmbedder("clip"), judge=judge)
    run.summary["tasks"]["remove"]["clip_i"]["mean"]

The command line is `x2edit-eval` (cli.py). torch and transformers are imported only when a model is
loaded; tqdm (the `eval` extra) draws the progress bar when installed.
"""

from .manifest import Sample, load_manifest, samples_from_folders
from .metrics import ClipEmbedder, DinoEmbedder, pixel_errors
from .runner import METRICS, EvalRun, evaluate, summarize

__all__ = [
    "METRICS",
    "ClipEmbedder",
    "DinoEmbedder",
    "EvalRun",
    "Sample",
    "evaluate",
    "load_manifest",
    "pixel_errors",
    "samples_from_folders",
    "summarize",
]
