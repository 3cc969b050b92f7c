"""Runs ``x2edit-train`` under a shipped accelerate engine config on CPU processes (gloo), for
tests/train/test_engines.py.

The engine's environment comes from ``accelerate launch``'s own code for the given config file.
accelerate runs FSDP only on accelerators, so for an FSDP config this entry also applies the FSDP
plugin that environment describes to the CPU run; torch's FSDP2 itself shards over gloo. DeepSpeed
runs on its CPU accelerator as it is. Usage: ``python -m torch.distributed.run ... engine_entry.py
ACCELERATE_CONFIG -- TRAIN ARGS``.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def engine_env(config_file: str, num_processes: int) -> dict[str, str]:
    """The engine variables (FSDP_*, ACCELERATE_*DEEPSPEED*) ``accelerate launch --config_file`` sets."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", config_file, "--num_processes", str(num_processes), "entry.py"]
    )
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config) if defaults else ""
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    keep = (
        "FSDP_",
        "ACCELERATE_USE_FSDP",
        "ACCELERATE_USE_DEEPSPEED",
        "ACCELERATE_DEEPSPEED_",
        "ACCELERATE_GRADIENT",
    )
    return {k: v for k, v in env.items() if k.startswith(keep)}


def use_engine(config_file: str, num_processes: int):
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    env = engine_env(config_file, num_processes)
    os.environ.update(env)
    if env.get("ACCELERATE_USE_FSDP") != "true":
        return
    init = Accelerator.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.state.distributed_type = DistributedType.FSDP
        PartialState().distributed_type = DistributedType.FSDP  # both shared states answer this
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()

    Accelerator.__init__ = patched


if __name__ == "__main__":
    config_file, rest = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    use_engine(config_file, int(os.environ.get("WORLD_SIZE", "1")))
    from train.cli import main

    sys.exit(main(rest))
