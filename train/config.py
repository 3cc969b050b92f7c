"""Run configuration: one dataclass, filled from defaults < preset < YAML file < command-line flags.

Every field is also a command-line flag (``--learning-rate 1e-4``); the help text of each flag is
the field's ``help`` metadata, so ``x2edit-train --help`` documents every option.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field

from x2edit_core.errors import ConfigError


def _opt(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # -- what to train ----------------------------------------------------------------------------
    preset: str = _opt(
        "icedit", "Adapter recipe: icedit, x2edit or custom.", choices=("icedit", "x2edit", "custom")
    )
    # -- model --------------------------------------------------------------------------------------
    transformer: str = _opt(
        "",
        "FLUX.1 Fill transformer: a diffusers folder (config.json + weights) or a single .safetensors file.",
    )
    transformer_config: str = _opt(
        "",
        "Config for a single-file transformer (a config.json or a diffusers folder); empty = the shipped "
        "FLUX.1 Fill config.",
    )
    vae: str = _opt(
        "", "Diffusers AutoencoderKL folder (empty when latents are cached or for the synthetic encoder)."
    )
    text_encoder: str = _opt(
        "flux",
        "Text encoder: flux (CLIP-L + T5-XXL from --clip-path/--t5-path), hash (deterministic toy "
        "encoder for "
        "tests) or cached (none: the data is a latent cache from `x2edit-train cache`).",
        choices=("flux", "hash", "cached"),
    )
    clip_path: str = _opt("", "Folder of the CLIP text model and tokenizer (transformers layout).")
    t5_path: str = _opt("", "Folder of the T5 encoder and tokenizer (transformers layout).")
    max_text_tokens: int = _opt(512, "T5 sequence length.")
    text_encoder_dtype: str = _opt(
        "bfloat16",
        "dtype of the CLIP and T5 weights on the training device.",
        choices=("bfloat16", "float16", "float32"),
    )
    # -- data ---------------------------------------------------------------------------------------
    data: list = _opt(
        [],
        "Data sources: JSONL manifests (*.jsonl), paired folders (with source/ and target/), WebDataset tar "
        "shards (*.tar, globs allowed) or parquet files (*.parquet, MagicBrush/OmniEdit columns). "
        "Prefix with jsonl:, folder:, tar: or parquet: to force a type.",
    )
    resolution: int = _opt(512, "Side of each half of the diptych (ICEdit: 512, giving 1024x512 diptychs).")
    aspect_buckets: bool = _opt(
        False, "Group samples by source aspect ratio instead of resizing to a square."
    )
    max_bad_fraction: float = _opt(
        0.05, "Stop with an error once more than this fraction of records is bad (missing/corrupt/empty)."
    )
    default_task: int = _opt(0, "Task id for records that name none (0 = unknown).")
    num_workers: int = _opt(
        2, "DataLoader worker processes per training process (0 = load in the training process)."
    )
    shuffle_buffer: int = _opt(
        1000, "Records in each loader's shuffle buffer (batches are formed per bucket from it)."
    )
    cache_dir: str = _opt(
        "", "Output folder of `x2edit-train cache` (latents + text embeddings); train from it with --data."
    )
    cache_shard_size: int = _opt(256, "Records per safetensors shard written by `x2edit-train cache`.")
    # -- adapters (empty / 0 = the preset's value) ------------------------------------------------
    num_experts: int = _opt(0, "Routed experts per MoE layer (icedit 4, x2edit 12).")
    rank: int = _opt(0, "Rank of each expert (icedit 32, x2edit 64).")
    alpha: float = _opt(0.0, "LoRA alpha of the experts (default: = rank).")
    router: str = _opt(
        "", "Router kind: token (ICEdit), task (X2Edit) or forced.", choices=("", "token", "task", "forced")
    )
    top_k: int = _opt(0, "Experts chosen per token (icedit 1, x2edit 2).")
    shared_expert: str = _opt(
        "", "Add an always-on shared expert: yes/no (x2edit yes).", choices=("", "yes", "no")
    )
    moe_targets: list = _opt(
        [],
        "custom preset: MoE sites as 'PATTERN' or 'PATTERN@output' (fnmatch over diffusers Linear "
        "names, e.g. "
        "'transformer_blocks.*.attn.to_q'); @output applies the adapter on the module's output.",
    )
    plain_targets: list = _opt([], "custom preset: modules that get a plain LoRA (fnmatch patterns).")
    plain_rank: int = _opt(0, "Rank of the plain LoRA parts (icedit 32).")
    plain_alpha: float = _opt(0.0, "Alpha of the plain LoRA parts (default: = plain rank).")
    num_tasks: int = _opt(16, "Rows of the task embedding (X2Edit: 16 task ids).")
    # -- losses -------------------------------------------------------------------------------------
    contrastive_weight: float = _opt(
        -1.0, "Weight of the contrastive loss (x2edit 0.2, icedit 0); <0 = preset."
    )
    contrastive_tau: float = _opt(0.5, "Temperature of the contrastive loss.")
    contrastive_variant: str = _opt(
        "x2edit",
        "x2edit: X2Edit's loss exactly (1e-8 epsilons, a sample without a same-task partner is pushed away "
        "from all others, gradient through the anchor side only); symmetric: no-partner samples count 0 "
        "and gradient flows through both sides (about twice the gradient).",
        choices=("x2edit", "symmetric"),
    )
    text_dropout: float = _opt(
        -1.0, "Probability of training with an empty prompt (icedit 0.1); <0 = preset."
    )
    timestep_mean: float = _opt(0.0, "Mean of the logit-normal timestep distribution.")
    timestep_std: float = _opt(1.0, "Std of the logit-normal timestep distribution.")
    guidance: float = _opt(1.0, "Embedded guidance value during training (ICEdit and X2Edit: 1).")
    # -- optimisation -------------------------------------------------------------------------------
    optimizer: str = _opt(
        "adamw", "adamw or prodigy (needs the prodigyopt package).", choices=("adamw", "prodigy")
    )
    learning_rate: float = _opt(1e-4, "Peak learning rate (prodigy: use 1.0).")
    weight_decay: float = _opt(1e-4, "AdamW weight decay.")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    adam_eps: float = _opt(1e-8, "AdamW epsilon.")
    grad_clip: float = _opt(1.0, "Clip the gradient norm to this (0 = off).")
    lr_scheduler: str = _opt(
        "constant", "constant, linear or cosine decay after warmup.", choices=("constant", "linear", "cosine")
    )
    warmup_steps: int = _opt(0, "Linear warmup steps.")
    max_steps: int = _opt(1000, "Optimizer steps to train.")
    batch_size: int = _opt(1, "Samples per process per step.")
    gradient_accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.")
    seed: int = _opt(0, "Random seed (data order, noise, timesteps, init).")
    # -- engine -------------------------------------------------------------------------------------
    mixed_precision: str = _opt(
        "no", "no, bf16 or fp16 (bf16 on CUDA for FLUX).", choices=("no", "bf16", "fp16")
    )
    base_dtype: str = _opt(
        "float32", "dtype of the frozen base weights: float32 or bfloat16.", choices=("float32", "bfloat16")
    )
    gradient_checkpointing: bool = _opt(False, "Recompute the transformer blocks in the backward pass.")
    cpu: bool = _opt(False, "Force CPU even when CUDA is available.")
    # -- output and visibility ----------------------------------------------------------------------
    output_dir: str = _opt("x2edit-run", "Folder for checkpoints, logs and the final adapter file.")
    output_name: str = _opt("x2edit_moe_lora", "File name (without .safetensors) of the exported adapter.")
    save_dtype: str = _opt("bfloat16", "dtype of the exported adapter: float32, bfloat16 or float16.")
    checkpoint_every: int = _opt(400, "Write a resumable checkpoint every N steps (0 = only at the end).")
    keep_last: int = _opt(3, "Keep the last K checkpoints.")
    resume: str = _opt("", "Resume: 'latest' (newest checkpoint in output_dir) or a checkpoint folder.")
    log_every: int = _opt(10, "Log scalars every N steps.")
    usage_every: int = _opt(50, "Log expert usage per task every N steps (0 = off).")
    tensorboard: bool = _opt(True, "Write TensorBoard scalars under output_dir/logs.")
    sample_every: int = _opt(0, "Render sample edits of the first batch every N steps (0 = off).")
    sample_steps: int = _opt(8, "Euler steps of the sample edits.")
    progress: bool = _opt(True, "Show a progress bar.")

    def resolved(self) -> TrainConfig:
        """A copy with the preset's values filled in where the user left a field at its 'unset' value."""
        from .presets import apply_preset

        return apply_preset(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _field_type(f: dataclasses.Field):
    hints = typing.get_type_hints(TrainConfig)
    return hints[f.name]


def load_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of option: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"{path}: unknown option {key!r}; see x2edit-train --help for the list")
        out[name] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="x2edit-train",
        description=(
            "Train ICEdit-style or X2Edit-style MoE-LoRA adapters for FLUX.1 Fill. Options come from "
            "defaults < preset < --config YAML < flags. Run distributed with "
            "`accelerate launch -m train ...`."
        ),
    )
    parser.add_argument("--config", default="", help="YAML file of options (keys are the flag names).")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        typ = _field_type(f)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kw = {"help": f"{f.metadata['help']} [default: {default!r}]", "default": argparse.SUPPRESS}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typ is list:
            parser.add_argument(flag, nargs="*", **kw)
        else:
            parser.add_argument(flag, type=typ, **kw)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags (and the --config YAML they name) into a resolved :class:`TrainConfig`."""
    args = vars(build_parser().parse_args(argv))
    values = {}
    config_path = args.pop("config", "")
    if config_path:
        values.update(load_yaml(config_path))
    values.update(args)
    return make_config(**values)


def make_config(**values) -> TrainConfig:
    """A resolved config from keyword values (for tests and the Python API)."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown options {unknown}")
    for name, value in list(values.items()):
        typ = _field_type(FIELDS[name])
        if typ is list and isinstance(value, str):
            values[name] = [value]
        elif typ is float and isinstance(value, int):
            values[name] = float(value)
    return TrainConfig(**values).resolved()
