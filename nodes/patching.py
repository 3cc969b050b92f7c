"""Apply loaded MoE-LoRAs to a ComfyUI FLUX ModelPatcher (ComfyUI glue; the maths is in x2edit_core).

Two paths, chosen per adapter:

- **merged**: forced (constant) routing on an input adapter is a plain LoRA (``MoELoRA.merged_lora``); it
  goes through ComfyUI's own LoRA patching exactly like ``LoraLoaderModelOnly``. So do a file's plain LoRA
  parts.
- **dynamic**: token- or task-routed adapters cannot be merged. We patch the bound ``forward`` of the
  target Linear with ``ModelPatcher.add_object_patch`` (never replace the module: an ordinary LoRA
  merged into that Linear's weight must still apply). The patched forward calls the previous forward of
  this patcher chain (or the class's own ``forward``: a stale instance patch from another clone is never
  called) and adds the MoE delta on the fused rows it owns.

A stale patch can stay installed while another clone samples (docs/reference.md, ComfyUI host), so the delta
is only added while this loader's DIFFUSION_MODEL wrapper is running: the wrapper publishes, in a context
variable, which patch sets are active for this call and their task embedding.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import uuid

import comfy.lora
import comfy.lora_convert
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import torch

from ..x2edit_core.errors import ConfigError, ModelMismatchError
from ..x2edit_core.formats import X2EDIT_TASK_FILE, LoadedAdapters
from ..x2edit_core.placement import APPLY_OUTPUT, comfy_target

log = logging.getLogger("x2edit")

TASK_OPTION = "x2edit_task"  # transformer_options key holding the task id for task-aware gates
# transformer_options key: {num_experts: [weight per expert]} that overrides the routing of the dynamic
# adapters with that many experts for this call (a task router mapping tasks to experts sets it)
FORCED_OPTION = "x2edit_forced_experts"
ROUTING_NATIVE = "native"
ROUTING_MEAN = "mean of experts"
ROUTING_SINGLE = "single expert"
ROUTING_CUSTOM = "custom mix"
ROUTING_MODES = (ROUTING_NATIVE, ROUTING_MEAN, ROUTING_SINGLE, ROUTING_CUSTOM)

# patch-set key -> task embedding row (or None) for the diffusion-model call in progress
_ACTIVE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("x2edit_active_moe", default=None)
_UNSET = object()


def flux_model(model):
    """The patcher's FLUX diffusion model, or a clear error for anything else."""
    dm = model.get_model_object("diffusion_model")
    if not (hasattr(dm, "double_blocks") and hasattr(dm, "single_blocks") and hasattr(dm, "hidden_size")):
        raise ModelMismatchError(
            f"the x2edit MoE-LoRA loader supports FLUX models (dev, Fill, Kontext); this model is "
            f"{type(dm).__name__}"
        )
    return dm


def compute_dtype(model) -> torch.dtype:
    base = model.model
    dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.bfloat16


def forced_weights_for(routing: str, num_experts: int, expert_index: int, expert_weights: str):
    """Per-expert weights for a forced routing mode (None for native routing)."""
    if routing == ROUTING_NATIVE:
        return None
    if routing == ROUTING_MEAN:
        return [1.0 / num_experts] * num_experts
    if routing == ROUTING_SINGLE:
        if not 0 <= expert_index < num_experts:
            raise ConfigError(
                f"expert_index {expert_index} is out of range: this file has {num_experts} experts"
            )
        return [1.0 if j == expert_index else 0.0 for j in range(num_experts)]
    if routing == ROUTING_CUSTOM:
        try:
            w = [float(v) for v in expert_weights.replace(";", ",").split(",") if v.strip()]
        except ValueError as e:
            raise ConfigError(
                f"expert_weights must be numbers separated by commas, got {expert_weights!r}"
            ) from e
        if len(w) != num_experts:
            raise ConfigError(f"expert_weights has {len(w)} numbers but the file has {num_experts} experts")
        return w
    raise ConfigError(f"unknown routing mode {routing!r}; expected one of {ROUTING_MODES}")


def _weight_shape(weight) -> tuple[int, ...] | None:
    """The logical shape of a layer weight. Quantized weights (ComfyUI-GGUF) keep their packed bytes in
    the tensor and the real shape in ``tensor_shape``; their state_dict() entries show the packed shape."""
    if weight is None:
        return None
    return tuple(getattr(weight, "tensor_shape", None) or weight.shape)


def _resolve(dm, model, adapter):
    """(ComfyUI module path, Linear, output row slice or None) for an adapter, with shape checks."""
    target = comfy_target(adapter.module)
    path = f"diffusion_model.{target.module}"
    try:
        layer = model.get_model_object(path)
    except AttributeError:
        raise ModelMismatchError(
            f"{adapter.module}: the model has no layer {target.module} ({len(dm.double_blocks)} double and "
            f"{len(dm.single_blocks)} single blocks): this LoRA is for a different FLUX model"
        ) from None
    shape = _weight_shape(getattr(layer, "weight", None))
    if shape is None or len(shape) != 2:
        raise ModelMismatchError(f"{adapter.module}: {target.module} is not a Linear layer")
    out_f, in_f = shape
    moe = adapter.moe
    if adapter.apply == APPLY_OUTPUT:
        if target.part is not None or moe.in_features != out_f or moe.out_features != out_f:
            raise ModelMismatchError(
                f"{adapter.module}: output adapter [{moe.in_features} -> {moe.out_features}] does not fit "
                f"{target.module} output width {out_f}: this LoRA is for another model width"
            )
        return path, layer, None
    rows = target.row_slice(dm.hidden_size, out_f)
    n_rows = len(range(*rows.indices(out_f)))
    if moe.in_features != in_f or moe.out_features != n_rows:
        raise ModelMismatchError(
            f"{adapter.module}: adapter [{moe.in_features} -> {moe.out_features}] does not fit "
            f"{target.module}{'' if target.part is None else f' ({target.part} rows)'} "
            f"[{in_f} -> {n_rows}]: this LoRA is for another model width"
        )
    return path, layer, (None if target.part is None else rows)


def _plain_patches(model, state_dict: dict, dm) -> tuple[dict, list[str]]:
    """ComfyUI patches for a plain LoRA state dict, with shape checks; also the keys nothing used."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    sd = comfy.lora_convert.convert_lora(dict(state_dict))
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
    used = set()
    for prefix, target in key_map.items():
        if target not in patches:
            continue
        adapter = patches[target]
        used.update(getattr(adapter, "loaded_keys", ()) or ())
        used.update(k for k in (f"{prefix}.alpha", f"{prefix}.dora_scale") if k in sd)
        weights = getattr(adapter, "weights", None)
        key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
        if weights is None or not isinstance(weights[0], torch.Tensor):
            continue
        try:
            shape = _weight_shape(comfy.utils.get_attr(model.model, key))
        except AttributeError:
            continue
        rows = shape[0] if offset is None else offset[2]
        cols = shape[1] if len(shape) > 1 else 1
        up, down = weights[0], weights[1]
        if up.dim() == 2 and down.dim() == 2 and (up.shape[0] != rows or down.shape[1] != cols):
            raise ModelMismatchError(
                f"{prefix}: LoRA [{down.shape[1]} -> {up.shape[0]}] does not fit {key} [{cols} -> {rows}]: "
                "this LoRA is for another model width"
            )
    unused = sorted(k for k in sd if k not in used)
    if sd and not patches:
        raise ModelMismatchError(
            f"none of the {len(sd)} LoRA keys match this FLUX model (e.g. {next(iter(sd))!r}): the LoRA is "
            "for another architecture"
        )
    return patches, unused


def _merge_lora_state(adapters_with_weights) -> dict:
    """Forced input adapters as one plain diffusers LoRA state dict ComfyUI's loader reads."""
    sd = {}
    for adapter, weights in adapters_with_weights:
        moe = adapter.moe.converted(forced_weights=weights)
        down, up, scale = moe.merged_lora()
        base = f"transformer.{adapter.module}"
        sd[f"{base}.lora_A.weight"] = down
        sd[f"{base}.lora_B.weight"] = up
        sd[f"{base}.alpha"] = torch.tensor(scale * down.shape[0])  # ComfyUI scales by alpha / rank
    return sd


def _options_place(wrapper, args, kwargs):
    """Where a DIFFUSION_MODEL call carries its transformer_options: "kw" for the keyword, else the index
    of the positional dict that registers ``wrapper`` (ComfyUI finds its wrappers there, so the call's own
    options hold it); None when absent. Never a fixed position: ComfyUI releases order the diffusion
    model's arguments differently."""
    if isinstance(kwargs.get("transformer_options"), dict):
        return "kw"
    for index, value in enumerate(args):
        if isinstance(value, dict) and _registers(value, wrapper):
            return index
    return None


def _missing_options(who: str) -> RuntimeError:
    return RuntimeError(
        f"{who}: the diffusion model was called without its transformer_options, so this model's patches "
        "cannot tell their calls from another model's; this ComfyUI release calls FLUX in a way the x2edit "
        "nodes do not know"
    )


def transformer_options(wrapper, args, kwargs, who: str = "x2edit MoE-LoRA") -> dict:
    """The transformer_options of the DIFFUSION_MODEL call that runs ``wrapper`` (see _options_place)."""
    place = _options_place(wrapper, args, kwargs)
    if place is None:
        raise _missing_options(who)
    return kwargs["transformer_options"] if place == "kw" else args[place]


def with_transformer_options(wrapper, args, kwargs, options: dict, who: str) -> tuple[tuple, dict]:
    """(args, kwargs) of the same call with ``options`` in place of its transformer_options; the caller's
    dict is left as it was."""
    place = _options_place(wrapper, args, kwargs)
    if place is None:
        raise _missing_options(who)
    if place == "kw":
        return args, {**kwargs, "transformer_options": options}
    return (*args[:place], options, *args[place + 1 :]), kwargs


def _registers(options: dict, wrapper) -> bool:
    wrappers = options.get("wrappers")
    if not isinstance(wrappers, dict):
        return False
    by_key = wrappers.get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL) or {}
    return any(wrapper in functions for functions in by_key.values())


def _context_wrapper(key: str, task_table: torch.Tensor | None, default_task: int):
    """DIFFUSION_MODEL wrapper: marks this patch set active (with its task embedding) for the call."""

    def wrapper(executor, *args, **kwargs):
        opts = transformer_options(wrapper, args, kwargs)
        task = None
        if task_table is not None:
            task_id = int(opts.get(TASK_OPTION, default_task))
            if not 0 <= task_id < task_table.shape[0]:
                raise ConfigError(
                    f"task id {task_id} is out of range for {task_table.shape[0]} task embeddings"
                )
            task = task_table[task_id]
            x = args[0] if args else kwargs.get("x")
            if isinstance(x, torch.Tensor):  # one copy per model call, not one per adapted layer
                task = task.to(x.device)
        forced = opts.get(FORCED_OPTION) or None
        token = _ACTIVE.set({**(_ACTIVE.get() or {}), key: (task, forced)})
        try:
            return executor(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    return wrapper


def _make_forward(base_call, entries, key: str, strength: float):
    def forward(x, *args, **kwargs):
        out = base_call(x, *args, **kwargs)
        state = (_ACTIVE.get() or {}).get(key, _UNSET)
        if state is _UNSET:  # not this patch set's call (e.g. a stale patch under another clone)
            return out
        task, forced = state
        for rows, apply, moe in entries:
            w = None if forced is None else forced.get(moe.config.num_experts)
            if apply == APPLY_OUTPUT:  # reads the output it changes: not in place
                out = out + moe(out, task, strength, w)
            elif rows is None:  # accumulate straight into the (contiguous) layer output
                moe(x, task, strength, w, out=out)
            else:  # a strided row slice of a fused layer: a contiguous delta, then one add, is faster
                out[..., rows] += moe(x, task, strength, w)
        return out

    forward.x2edit_patch = True
    return forward


class AdapterBank(torch.nn.Module):
    """Holds one loader's dynamic adapters so ComfyUI moves them with the model."""

    def __init__(self, modules):
        super().__init__()
        self.adapters = torch.nn.ModuleList(modules)


def apply_adapters(
    model,
    loaded: LoadedAdapters,
    strength: float = 1.0,
    routing: str = ROUTING_NATIVE,
    expert_index: int = 0,
    expert_weights: str = "",
    default_task: int = 0,
):
    """Clone ``model`` and apply ``loaded``; returns (patched clone, report text)."""
    dm = flux_model(model)
    m = model.clone()
    report = [loaded.summary(), f"strength {strength:g}, routing {routing}"]
    dtype = compute_dtype(model)

    merged, dynamic = [], []
    for adapter in loaded.moe:
        path, layer, rows = _resolve(dm, model, adapter)
        weights = forced_weights_for(routing, adapter.moe.config.num_experts, expert_index, expert_weights)
        if weights is None and adapter.moe.config.router == "task" and loaded.task_embedding is None:
            raise ConfigError(
                f"{adapter.module}: task-aware experts need the task embeddings ({X2EDIT_TASK_FILE}), "
                "which this file lacks; pick the checkpoint folder's lora.safetensors next to it, or use a "
                "forced routing mode"
            )
        if weights is not None and adapter.apply != APPLY_OUTPUT:
            merged.append((adapter, weights))
        else:
            dynamic.append((path, layer, rows, adapter, weights))

    plain_sd = dict(loaded.plain)
    if merged:
        plain_sd.update(_merge_lora_state(merged))
    if plain_sd:
        patches, unused = _plain_patches(m, plain_sd, dm)
        applied = set(m.add_patches(patches, strength))
        report.append(f"{len(applied)} layers patched by ComfyUI's LoRA loader (plain + merged experts)")
        for k in unused:
            report.append(f"ignored {k}: no matching layer in this model")

    if dynamic and strength != 0.0:
        key = uuid.uuid4().hex
        task_table = None
        if loaded.task_embedding is not None:
            task_table = loaded.task_embedding.to(dtype)
        layers: dict[str, list] = {}
        modules = []
        for path, layer, rows, adapter, weights in dynamic:
            moe = adapter.moe.converted(dtype=dtype, forced_weights=weights)
            modules.append(moe)
            layers.setdefault(path, [layer, []])[1].append((rows, adapter.apply, moe))
        for path, (layer, entries) in layers.items():
            patch_name = f"{path}.forward"
            previous = m.object_patches.get(patch_name)
            base_call = previous if callable(previous) else functools.partial(type(layer).forward, layer)
            m.add_object_patch(patch_name, _make_forward(base_call, entries, key, strength))
        m.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
            f"x2edit_moe_{key}",
            _context_wrapper(key, task_table, default_task),
        )
        bank = comfy.model_patcher.ModelPatcher(AdapterBank(modules), m.load_device, m.offload_device)
        m.set_additional_models(f"x2edit_moe_{key}", [bank])
        report.append(f"{len(layers)} layers patched with routed experts ({len(modules)} adapters)")
        if task_table is not None:
            report.append(f"task-aware gates: task {default_task} unless a task router sets another")
    elif dynamic:
        report.append("strength 0: routed experts not applied")
    text = "\n".join(report)
    log.info("x2edit MoE-LoRA: %s", text.replace("\n", "; "))
    return m, text
