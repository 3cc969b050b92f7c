"""X2Edit Edit Score: a VLM judge scores each edit of a batch against its source and instruction
(VIEScore-style SC, PQ, overall) and the batch comes back sorted best first.

The prompt, parsing and failure rules are in x2edit_core.judges.scoring; the judges are the same
X2EDIT_JUDGE objects the early filter uses.
"""

from __future__ import annotations

import comfy.model_management
import comfy.utils
import torch

from ..x2edit_core.errors import ConfigError
from ..x2edit_core.judges import image_to_pil
from ..x2edit_core.judges.scoring import format_score_line, score_edits
from ..x2edit_core.selection import JUDGE_VIEWS, to_judge_image
from . import search_aliases
from .comfy_v3 import io, ui
from .early_filter import _free_memory_for_judge
from .early_filter_nodes import JudgeType

UNSCORED = -1.0
SCORE_PROMPT_TOOLTIP = (
    "Scoring prompt override; must contain {instruction}. Leave empty for the default VIEScore-style "
    "prompt: SC = min(editing success, no over-editing), PQ = min(naturalness, no artifacts), 0-10 each, "
    "answered as JSON."
)


def _sources(source_image: torch.Tensor, count: int) -> list:
    if source_image.ndim != 4 or source_image.shape[0] < 1:
        raise ConfigError(
            f"The source image must be an IMAGE batch [B, H, W, C], got shape {tuple(source_image.shape)}."
        )
    if source_image.shape[0] == 1:
        return [image_to_pil(source_image[:1])] * count
    if source_image.shape[0] == count:
        return [image_to_pil(source_image[i : i + 1]) for i in range(count)]
    raise ConfigError(
        f"{source_image.shape[0]} source images for {count} edits: give one source for all, or one per edit."
    )


class X2EditEditScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2EditEditScore",
            display_name="X2Edit Edit Score",
            category="x2edit/evaluation",
            **search_aliases("VIEScore", "VLM judge score", "rank edits"),
            description="A VLM judge scores each edit against its source and the instruction, "
            "VIEScore-style: semantic consistency SC and perceptual quality PQ (0-10), overall "
            "sqrt(SC*PQ). Returns the edits sorted best first with their scores and a report.",
            inputs=[
                io.Image.Input("images", tooltip="The edits to score (a batch; each is scored on its own)."),
                io.Image.Input(
                    "source_image",
                    tooltip="The original image: one for the whole batch, or one per edit.",
                ),
                io.String.Input(
                    "instruction",
                    multiline=True,
                    default="",
                    tooltip="The edit instruction as the judge should read it (plain, without the "
                    "in-context prompt).",
                ),
                JudgeType.Input(
                    "judge", tooltip="A judge from X2Edit Local VLM Judge or X2Edit Served Judge."
                ),
                io.Combo.Input(
                    "judge_view",
                    options=list(JUDGE_VIEWS),
                    default="whole",
                    tooltip="What the judge sees of each edit: the whole image, or the right panel of a "
                    "side-by-side diptych.",
                ),
                io.String.Input(
                    "prompt", default="", multiline=True, optional=True, tooltip=SCORE_PROMPT_TOOLTIP
                ),
                io.Float.Input(
                    "judge_deadline",
                    default=600.0,
                    min=1.0,
                    max=86400.0,
                    step=1.0,
                    optional=True,
                    tooltip="Seconds for all scoring calls together (every call and retry). Edits not yet "
                    "scored when it passes are left unscored (a warning); if nothing was scored the node "
                    "stops with an error.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The edits sorted best first."),
                io.Float.Output(
                    display_name="scores",
                    is_output_list=True,
                    tooltip=f"Overall score (0-10) of each sorted edit; {UNSCORED:g} for an edit the judge "
                    "could not score (error or unusable answer), which sorts last.",
                ),
                io.Int.Output(
                    display_name="indices",
                    is_output_list=True,
                    tooltip="Position in the input batch of each sorted edit.",
                ),
                io.String.Output(display_name="report", tooltip="Every edit's SC, PQ, overall and reason."),
            ],
        )

    @classmethod
    def validate_inputs(cls, instruction):
        if isinstance(instruction, str) and not instruction.strip():
            return "The instruction is empty: the judge needs it to score the edits."
        return True

    @classmethod
    def execute(
        cls, images, source_image, instruction, judge, judge_view, prompt="", judge_deadline=600.0
    ) -> io.NodeOutput:
        if images.ndim != 4 or images.shape[0] < 1:
            raise ConfigError(
                f"The edits must be an IMAGE batch [B, H, W, C], got shape {tuple(images.shape)}."
            )
        count = images.shape[0]
        sources = _sources(source_image, count)
        edits = [to_judge_image(images[i : i + 1], judge_view) for i in range(count)]
        bar = comfy.utils.ProgressBar(count)
        template = prompt if prompt and prompt.strip() else None
        try:
            _free_memory_for_judge(judge)
            result = score_edits(
                edits,
                sources[0] if source_image.shape[0] == 1 else sources,
                instruction,
                judge,
                prompt_template=template,
                progress=lambda done, total: bar.update_absolute(done, total),
                should_stop=comfy.model_management.throw_exception_if_processing_interrupted,
                deadline_s=float(judge_deadline),
            )
        finally:
            release = getattr(judge, "release", None)
            if callable(release):
                release()
        calls = result.calls
        order = result.order
        sorted_images = images[order]
        scores = [calls[i].overall if calls[i].overall is not None else UNSCORED for i in order]
        describe = getattr(judge, "describe", None)
        lines = [f"WARNING: {warning}" for warning in result.warnings]
        lines += [
            f"X2Edit edit scores by {describe() if callable(describe) else type(judge).__name__} "
            f"({count} edit(s), best first; O = sqrt(SC*PQ)):"
        ]
        for rank, index in enumerate(order, start=1):
            lines.append(format_score_line(f"{rank}. edit {index}", calls[index]))
        lines.append(
            f"Judge calls: {len(calls) - result.skipped_calls}, unusable answers: "
            f"{result.unusable_answers}, judge errors: {result.judge_errors}, "
            + (f"not asked (deadline): {result.skipped_calls}, " if result.skipped_calls else "")
            + f"judge time: {result.judge_seconds:.1f} s."
        )
        report = "\n".join(lines)
        return io.NodeOutput(sorted_images, scores, list(order), report, ui=ui.PreviewText(report))


NODES = [X2EditEditScore]
