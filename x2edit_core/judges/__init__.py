"""VLM judges: which of two edits is better (early filter), and how good one edit is (scoring).

`base` holds the interface, the prompt and answer parsing (no optional dependency); `scoring` the
pointwise (VIEScore-style) prompt, parsing and scoring loop; `served` speaks to an OpenAI-compatible
chat-completions server, with `api_keys` deciding which key it may send where; `local` runs a
transformers VLM folder and imports transformers only when it loads a model.
"""

from .base import (
    DEFAULT_JUDGE_PROMPT,
    IMAGE_LABELS,
    Judge,
    JudgeConnectionError,
    JudgeDeadlineError,
    JudgeFailedError,
    JudgeVerdict,
    build_judge_prompt,
    image_to_pil,
    limit_image_side,
    parse_choice,
    validate_prompt_template,
    verdict_from_answer,
)
from .local import LocalVLMJudge
from .scoring import (
    DEFAULT_SCORE_PROMPT,
    SCORE_IMAGE_LABELS,
    EditScore,
    build_score_prompt,
    edit_score_from_answer,
    parse_scores,
    score_edits,
)
from .served import ServedJudge, check_served_judge_settings

__all__ = [
    "DEFAULT_JUDGE_PROMPT",
    "DEFAULT_SCORE_PROMPT",
    "SCORE_IMAGE_LABELS",
    "EditScore",
    "build_score_prompt",
    "edit_score_from_answer",
    "parse_scores",
    "score_edits",
    "IMAGE_LABELS",
    "Judge",
    "JudgeConnectionError",
    "JudgeDeadlineError",
    "JudgeFailedError",
    "JudgeVerdict",
    "LocalVLMJudge",
    "ServedJudge",
    "build_judge_prompt",
    "check_served_judge_settings",
    "image_to_pil",
    "limit_image_side",
    "parse_choice",
    "validate_prompt_template",
    "verdict_from_answer",
]
