"""Runs ``x2edit-train`` under an accelerate engine on CPU processes (gloo), for tests/train/test_engines.py.

accelerate runs FSDP only on accelerators, so this entry applies the FSDP plugin that the shipped
accelerate config describes (its environment is prepared by ``accelerate launch``'s own code) to a
CPU run; torch's FSDP2 itself shards over gloo. Usage: ``python -m torch.distributed.run ...
engine_entry.py ACCELERATE_CONFIG -- TRAIN ARGS``.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def fsdp_env(config_file: str, num_processes: int) -> dict[str, str]:
    """The FSDP_* environment ``accelerate launch --config_file`` would give each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", config_file, "--num_processes", str(num_processes), "entry.py"]
    )
    args = _validate_launch_command(args)[0]
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}


def force_fsdp_on_cpu(config_file: str, num_processes: int):
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    os.environ.update(fsdp_env(config_file, num_processes))
    init = Accelerator.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.state.distributed_type = DistributedType.FSDP
        PartialState().distributed_type = DistributedType.FSDP  # both shared states answer this
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()

    Accelerator.__init__ = patched


if __name__ == "__main__":
    config_file, rest = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    force_fsdp_on_cpu(config_file, int(os.environ.get("WORLD_SIZE", "1")))
    from train.cli import main

    sys.exit(main(rest))
