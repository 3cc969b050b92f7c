"""`x2edit-eval`: score edits with MagicBrush / Emu Edit metrics and a VIEScore-style VLM judge.

    x2edit-eval manifest.jsonl --out eval_out --clip models/clip-vit-large-patch14 \\
        --dino models/dinov2-base --judge-url http://127.0.0.1:8000/v1 --judge-model Qwen2.5-VL-72B
    x2edit-eval --source-dir sources --edited-dir outputs [--target-dir targets] --out eval_out

Writes results.jsonl, results.csv, summary.json and report.html to --out. Rerunning with the same
--out skips samples already scored (--overwrite starts again).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import X2EditError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="x2edit-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "manifest",
        nargs="?",
        help="JSONL/JSON/CSV/TSV manifest: source, edited, [target], [instruction], [task], [caption], [id]",
    )
    parser.add_argument("--source-dir", help="folder of source images (instead of a manifest)")
    parser.add_argument("--edited-dir", help="folder of edited images, matched to the sources by file name")
    parser.add_argument("--target-dir", help="folder of ground-truth targets, matched by file name")
    parser.add_argument(
        "--instructions",
        help="with folders: a manifest of id (file stem), instruction, task, caption; else <stem>.txt "
        "beside each source image",
    )
    parser.add_argument("--out", required=True, help="output folder (results, CSV, summary, HTML report)")
    parser.add_argument("--clip", help="local CLIP model folder (CLIP-I, CLIP-T)")
    parser.add_argument("--dino", help="local DINOv2 model folder (DINO)")
    parser.add_argument("--judge-url", help="OpenAI-compatible chat-completions base URL of a VLM judge")
    parser.add_argument("--judge-model", default="", help="model name on the judge server")
    parser.add_argument(
        "--judge-api-key-env",
        default="",
        help="NAME of the variable holding the judge's API key (one released for judges: "
        "X2EDIT_<NAME>_API_KEY)",
    )
    parser.add_argument("--judge-vlm", help="local VLM folder (Qwen2-VL / Qwen2.5-VL) as the judge")
    parser.add_argument("--judge-prompt", help="file with a scoring prompt template containing {instruction}")
    parser.add_argument("--judge-workers", type=int, default=1, help="parallel requests to a served judge")
    parser.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per judge request")
    parser.add_argument("--judge-max-image-side", type=int, default=1024, help="images shrunk to this side")
    parser.add_argument("--batch-size", type=int, default=16, help="images per CLIP/DINO batch")
    parser.add_argument("--device", default="auto", help="auto (the GPU when present), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="CLIP/DINO dtype: auto (fp16 on GPU), float32, ...")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")
    parser.add_argument("--no-html", action="store_true", help="skip the HTML report")
    parser.add_argument("--thumbnail-side", type=int, default=160, help="thumbnail size in the report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _samples(args):
    from .manifest import load_manifest, samples_from_folders

    if args.manifest and (args.source_dir or args.edited_dir):
        raise SystemExit("x2edit-eval: give either a manifest or --source-dir/--edited-dir, not both.")
    if args.manifest:
        return load_manifest(args.manifest), []
    if not (args.source_dir and args.edited_dir):
        raise SystemExit("x2edit-eval: give a manifest, or both --source-dir and --edited-dir.")
    return samples_from_folders(args.source_dir, args.edited_dir, args.target_dir, args.instructions)


def _judge(args):
    if args.judge_url and args.judge_vlm:
        raise SystemExit("x2edit-eval: give --judge-url or --judge-vlm, not both.")
    if args.judge_url:
        from ..judges.served import ServedJudge

        return ServedJudge(
            args.judge_url,
            args.judge_model,
            args.judge_api_key_env,
            timeout_s=args.judge_timeout,
            max_image_side=args.judge_max_image_side or None,
            max_tokens=512,
        )
    if args.judge_vlm:
        from ..judges.local import LocalVLMJudge

        return LocalVLMJudge(
            args.judge_vlm,
            device=args.device,
            max_new_tokens=256,
            max_image_side=args.judge_max_image_side or None,
        )
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .metrics import ClipEmbedder, DinoEmbedder
        from .runner import evaluate

        samples, notes = _samples(args)
        for note in notes:
            print(f"x2edit-eval: {note}", file=sys.stderr)
        prompt = None
        if args.judge_prompt:
            with open(args.judge_prompt, encoding="utf-8") as handle:
                prompt = handle.read()
        clip = ClipEmbedder(args.clip, args.device, args.dtype) if args.clip else None
        dino = DinoEmbedder(args.dino, args.device, args.dtype) if args.dino else None
        run = evaluate(
            samples,
            args.out,
            clip=clip,
            dino=dino,
            judge=_judge(args),
            judge_prompt=prompt,
            judge_workers=args.judge_workers,
            batch_size=args.batch_size,
            resume=not args.overwrite,
            progress=not args.no_progress,
            html=not args.no_html,
            thumbnail_side=args.thumbnail_side,
        )
    except X2EditError as exc:
        print(f"x2edit-eval: {exc}", file=sys.stderr)
        return 2
    print(format_summary(run))
    return 0


def format_summary(run) -> str:
    from .report import METRIC_LABELS

    metrics = [m for m in METRIC_LABELS if run.summary["all"][m]["count"]]
    lines = [
        f"{len(run.records)} samples ({run.computed} scored now, {run.reused} reused); judge calls "
        f"{run.judge_calls}, judge errors {run.judge_errors}",
        f"{'task':16} {'n':>5} " + " ".join(f"{METRIC_LABELS[m][0]:>7}" for m in metrics),
    ]
    rows = [("all", run.summary["all"])] + list(run.summary["tasks"].items())
    for name, block in rows:
        cells = " ".join(
            f"{block[m]['mean']:7.3f}" if block[m]["mean"] is not None else f"{'—':>7}" for m in metrics
        )
        lines.append(f"{name[:16]:16} {block['samples']:5d} {cells}")
    lines += [f"{kind}: {path}" for kind, path in run.files.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
