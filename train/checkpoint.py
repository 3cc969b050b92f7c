"""Resumable checkpoints, written atomically: a ``step-NNNNNNNN.tmp`` folder renamed when complete.

A checkpoint holds only what training changes: the adapter tensors (safetensors), the optimizer and
scheduler states, each process's random generators, the data position and the bad-record counts,
plus the adapter exported in our format (so any checkpoint loads in the MoE-LoRA Loader node).
Under DeepSpeed or FSDP the optimizer (and under FSDP the parameters) are sharded, so those engines
also save through ``accelerator.save_state`` into the same folder; the adapter file and the export
are always made from full tensors gathered first (:func:`gather_adapter_state`).

Pickled parts are read back with ``torch.load(..., weights_only=True)`` only.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import torch

from x2edit_core.errors import FormatError

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "state.json"
ADAPTERS_FILE = "adapters.safetensors"


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (step, path), oldest first; unfinished ``.tmp`` folders are ignored."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = CHECKPOINT_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, STATE_FILE)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def find_resume(output_dir: str, resume: str) -> str | None:
    """The checkpoint folder to resume from, or None to start fresh."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise FormatError(f"--resume {resume!r} is not a complete checkpoint folder (no {STATE_FILE})")
    return resume


def rng_state(generator: torch.Generator) -> dict:
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_adapter_state(accelerator, wrapped, model, names: list[str]) -> dict[str, torch.Tensor] | None:
    """Full CPU copies of the trained tensors ``names`` on the main process (None elsewhere).

    Collective: every process must call it. DDP, one process and DeepSpeed ZeRO-1/2 keep whole
    parameters on every process. FSDP2 keeps each parameter as a sharded DTensor: only the trained
    ones are gathered (``full_tensor``), not the frozen base. FSDP1 (flattened parameters) and ZeRO-3
    go through accelerate's full state dict.
    """
    kind = engine_kind(accelerator)
    params = dict(model.named_parameters())
    main = accelerator.is_main_process
    if kind == "fsdp" and all(n in params for n in names):
        from torch.distributed.tensor import DTensor

        out = {}
        for n in names:  # the same order on every process: each full_tensor is a collective
            p = params[n]
            full = p.full_tensor() if isinstance(p, DTensor) else p
            if main:
                out[n] = full.detach().to("cpu", copy=True)
        return out if main else None
    zero3 = kind == "deepspeed" and accelerator.deepspeed_config["zero_optimization"]["stage"] == 3
    if kind == "fsdp" or zero3:
        state = accelerator.get_state_dict(wrapped)
        return {n: state[n].detach().to("cpu", copy=True) for n in names} if main else None
    return {n: params[n].detach().to("cpu", copy=True) for n in names} if main else None


def save_checkpoint(
    accelerator,
    output_dir: str,
    step: int,
    adapter_state: dict[str, torch.Tensor] | None,
    optimizer,
    scheduler,
    generator: torch.Generator,
    train_state: dict,
    export,
    keep_last: int,
) -> str:
    """Write checkpoint ``step`` (collective: every process must call it). Returns its folder.

    ``adapter_state`` is :func:`gather_adapter_state`'s result (used on the main process) and
    ``export(folder, adapter_state)`` writes the adapter in our format.
    """
    from safetensors.torch import save_file

    root = checkpoint_root(output_dir)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = final + ".tmp"
    sharded = _sharded_engine(accelerator)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    torch.save(rng_state(generator), os.path.join(tmp, f"rng-{accelerator.process_index}.pt"))
    if sharded:
        accelerator.save_state(os.path.join(tmp, "engine"))
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in adapter_state.items()}, os.path.join(tmp, ADAPTERS_FILE))
        if not sharded:
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        export(tmp, adapter_state)
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as fh:
            json.dump({"step": step, "num_processes": accelerator.num_processes, **train_state}, fh)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.isdir(final):  # a re-run of the same step replaces the old folder
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str, model, optimizer, scheduler, generator: torch.Generator) -> dict:
    """Restore everything saved by :func:`save_checkpoint`; returns the train state (step, data position)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as fh:
        state = json.load(fh)
    if state.get("num_processes", 1) != accelerator.num_processes:
        raise FormatError(
            f"{path} was written by {state.get('num_processes')} processes; resume with the same number "
            f"(now {accelerator.num_processes}) so the data order and random streams continue exactly"
        )
    if _sharded_engine(accelerator):
        accelerator.load_state(os.path.join(path, "engine"))
    else:
        model.load_adapter_state_dict(load_file(os.path.join(path, ADAPTERS_FILE)))
        optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    rng = torch.load(os.path.join(path, f"rng-{accelerator.process_index}.pt"), weights_only=True)
    set_rng_state(rng, generator)
    return state


def engine_kind(accelerator) -> str:
    """deepspeed, fsdp or plain (one process or DDP)."""
    kind = str(getattr(accelerator.state, "distributed_type", ""))
    return "deepspeed" if "DEEPSPEED" in kind else "fsdp" if "FSDP" in kind else "plain"


def _sharded_engine(accelerator) -> bool:
    return engine_kind(accelerator) != "plain"
