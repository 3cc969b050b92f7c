"""Node: X2Edit Task Router. Picks X2Edit's task for an instruction and applies it to a MoE-patched model.

The task id goes into ``transformer_options[TASK_OPTION]``, which the MoE loader's task-aware gates read
at every diffusion-model call (nodes/patching.py). So two routers on one loaded model give two clones
that sample with different tasks in the same queue, without reloading anything. For token-routed or
task-less models an expert map turns the task into forced expert weights (``FORCED_OPTION``).
"""

from __future__ import annotations

import logging
import os
import re

from ..x2edit_core.errors import ConfigError
from ..x2edit_core.models.task_lm import LocalLMClassifier
from ..x2edit_core.prompt import EmptyInstructionError
from ..x2edit_core.tasks import AUTO, resolve_task, task_choices, task_id
from .comfy_v3 import io
from .patching import FORCED_OPTION, TASK_OPTION

log = logging.getLogger("x2edit")

DEFAULT_KEYS = ("*", "default")  # expert-map key for every task the map does not name

_classifier_cache: dict = {}  # folder -> LocalLMClassifier; one entry (an LM is large)


def parse_expert_map(text: str, num_experts: int) -> dict[int, int]:
    """``"remove_subject:0, add_subject:1, *:3"`` -> {task id: expert index}; ``-1`` keys the default.

    Entries are separated by commas, semicolons or new lines; a task is a name, display name, X2Edit
    label or id (see x2edit_core.tasks.task_id); ``*`` or ``default`` maps every task not named.
    """
    mapping: dict[int, int] = {}
    for entry in re.split(r"[,;\n]", text or ""):
        entry = entry.strip()
        if not entry:
            continue
        task, sep, expert = entry.rpartition(":")
        if not sep or not task.strip():
            raise ConfigError(
                f"expert_map entry {entry!r} is not 'task:expert'; write e.g. "
                "'remove_subject:0, add_subject:1'."
            )
        try:
            index = int(expert.strip())
        except ValueError:
            raise ConfigError(
                f"expert_map entry {entry!r}: the expert {expert.strip()!r} is not a number"
            ) from None
        if not 0 <= index < num_experts:
            raise ConfigError(
                f"expert_map entry {entry!r}: expert {index} is out of range for num_experts {num_experts} "
                f"(use 0..{num_experts - 1}, or set num_experts to the file's expert count)"
            )
        key = -1 if task.strip().lower() in DEFAULT_KEYS else task_id(task.strip())
        if key in mapping:
            raise ConfigError(f"expert_map names {task.strip()!r} twice")
        mapping[key] = index
    return mapping


def forced_experts_for(task: int, mapping: dict[int, int], num_experts: int) -> list[float] | None:
    """One-hot expert weights for ``task`` under ``mapping`` (None: the task is not mapped)."""
    expert = mapping.get(task, mapping.get(-1))
    if expert is None:
        return None
    return [1.0 if j == expert else 0.0 for j in range(num_experts)]


def _lm_classifier(folder: str):
    if folder not in _classifier_cache:
        _classifier_cache.clear()
        _classifier_cache[folder] = LocalLMClassifier(folder)
    return _classifier_cache[folder]


class X2EditTaskRouter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2EditTaskRouter",
            display_name="X2Edit Task Router",
            category="x2edit/routing",
            description="Chooses X2Edit's edit task for an instruction (or takes the one you pick) and "
            "applies it to every task-aware expert gate of the model. An expert map can force one expert per "
            "task on token-routed MoE-LoRAs such as ICEdit's.",
            inputs=[
                io.Model.Input(
                    "model", tooltip="A model patched by X2Edit MoE-LoRA Loader (any model passes through)."
                ),
                io.String.Input(
                    "instruction",
                    multiline=True,
                    default="",
                    tooltip="The edit instruction (English or Chinese). Needed when mode is auto.",
                ),
                io.Combo.Input(
                    "mode",
                    options=task_choices(),
                    default=AUTO,
                    tooltip="auto: classify the instruction. Or pick one of X2Edit's 16 tasks to use as is.",
                ),
                io.String.Input(
                    "lm_folder",
                    default="",
                    optional=True,
                    tooltip="Local causal LM folder (transformers, e.g. Qwen3) that classifies instead of "
                    "the built-in English + Chinese rules, as X2Edit does. Empty: built-in rules.",
                ),
                io.String.Input(
                    "expert_map",
                    default="",
                    optional=True,
                    tooltip="Force one expert per task on adapters with num_experts experts, e.g. "
                    "'remove_subject:0, add_subject:1, *:2' (* = every other task). Empty: native routing.",
                ),
                io.Int.Input(
                    "num_experts",
                    default=4,
                    min=1,
                    max=256,
                    optional=True,
                    tooltip="Expert count of the adapters the expert map applies to (ICEdit's MoE-LoRA: 4, "
                    "X2Edit: 12). Adapters with another count keep their own routing.",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the task applied."),
                io.Int.Output(display_name="task_id", tooltip="X2Edit task id (0..15) that was chosen."),
                io.String.Output(display_name="task_name", tooltip="Name of the task that was chosen."),
            ],
        )

    @classmethod
    def validate_inputs(cls, mode=None, expert_map=None, num_experts=None, lm_folder=""):
        # Linked inputs arrive as None here; they are checked again in execute.
        if isinstance(lm_folder, str) and lm_folder.strip() and not os.path.isdir(lm_folder.strip()):
            return f"LM classifier folder {lm_folder.strip()!r} does not exist; give a local model folder."
        try:
            if isinstance(mode, str) and mode != AUTO:
                task_id(mode)
            if isinstance(expert_map, str) and expert_map.strip() and isinstance(num_experts, int):
                parse_expert_map(expert_map, num_experts)
        except ConfigError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, instruction, mode, lm_folder="", expert_map="", num_experts=4) -> io.NodeOutput:
        auto = isinstance(mode, str) and mode.strip().lower() == AUTO
        if auto and not (instruction or "").strip():
            raise EmptyInstructionError(
                "X2Edit Task Router: the instruction is empty and mode is auto, so there is nothing to "
                "classify. Write the edit instruction, or pick a task in mode."
            )
        if not auto:
            task_id(mode)  # a linked mode skipped validate_inputs
        folder = (lm_folder or "").strip()
        classifier = _lm_classifier(folder) if folder and auto else None
        choice = resolve_task(mode, instruction, classifier=classifier)
        mapping = parse_expert_map(expert_map, num_experts) if (expert_map or "").strip() else {}

        routed = model.clone()  # clone() deep-copies model_options: the source model keeps its options
        options = routed.model_options.setdefault("transformer_options", {})
        options[TASK_OPTION] = choice.task_id
        forced = forced_experts_for(choice.task_id, mapping, num_experts) if mapping else None
        if forced is not None:
            options[FORCED_OPTION] = {**options.get(FORCED_OPTION, {}), num_experts: forced}
        log.info(
            "x2edit task router: task %d %s (%s, score %.2f)%s",
            choice.task_id,
            choice.task_name,
            choice.matched_rule,
            choice.score,
            f", forced expert {forced.index(1.0)} of {num_experts}" if forced else "",
        )
        return io.NodeOutput(routed, choice.task_id, choice.task_name)


NODES = [X2EditTaskRouter]
