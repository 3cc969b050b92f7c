"""MoE-LoRA file formats: detection, readers, and our own writer.

Formats (detected automatically by :func:`detect_format`):

- ``icedit``: ICEdit's MoE-LoRA (one safetensors file). MoE layers have ``lora_A.expert_{j}``,
  ``lora_B.expert_{j}`` and ``lora_route`` keys; the other layers are a plain diffusers LoRA.
- ``x2edit``: an X2Edit checkpoint folder: ``lora.safetensors`` (``*.attn.processor.{q,k,v,proj}_moe_lora.*``)
  with ``task_embeddings.bin`` (a torch pickle, read with ``weights_only=True`` only) and
  ``diffusion_pytorch_model.bin``, X2Edit's text AlignNet (read into :attr:`LoadedAdapters.alignnet`; see
  ``x2edit_core.alignnet``). X2Edit's Qwen-Image checkpoints use the same key names over 60
  ``transformer_blocks`` and no single blocks; they are recognised and refused with that reason.
- ``x2edit_moe_lora``: ours; one safetensors file whose metadata describes everything.
- ``plain``: any other LoRA file; handed to ComfyUI's own LoRA loader.

Every key is used or reported in :attr:`LoadedAdapters.ignored`; a malformed file raises
:class:`FormatError` naming the key.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .alignnet import ALIGNNET_FILE, AlignNet, load_alignnet
from .errors import FormatError
from .moe import ROUTER_TASK, ROUTER_TOKEN, MoEConfig, MoELoRA
from .placement import APPLY_INPUT, APPLY_OUTPUT
from .safetensors_io import SafetensorsHeader, TensorReader, read_header

FORMAT_ICEDIT = "icedit"
FORMAT_X2EDIT = "x2edit"
FORMAT_OURS = "x2edit_moe_lora"
FORMAT_PLAIN = "plain"

OURS_FORMAT_TAG = "x2edit.moe_lora"
OURS_FORMAT_VERSION = 1
X2EDIT_LORA_FILE = "lora.safetensors"
X2EDIT_TASK_FILE = "task_embeddings.bin"
X2EDIT_DEFAULT_TOP_K = 2  # from the paper; not stored in X2Edit's files
FLUX_DOUBLE_BLOCKS = 19  # FLUX.1; X2Edit's Qwen-Image variant has 60 blocks and no single blocks

_ICEDIT_RE = re.compile(r"^(?:transformer\.)?(.+)\.(lora_A|lora_B)\.expert_(\d+)\.weight$")
_ICEDIT_ROUTE_RE = re.compile(r"^(?:transformer\.)?(.+)\.lora_route\.weight$")
_X2EDIT_RE = re.compile(
    r"^(?:transformer\.)?(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn\.processor\."
    r"(q|k|v|proj)_moe_lora\.(?:experts\.(\d+)\.(down|up)|shared_experts\.(down|up)|(gate))\.weight$"
)


@dataclass
class MoEAdapter:
    """One MoE-LoRA on one diffusers module."""

    module: str  # diffusers module path, e.g. "transformer_blocks.0.ff.net.2"
    apply: str  # APPLY_INPUT or APPLY_OUTPUT
    moe: MoELoRA


@dataclass
class LoadedAdapters:
    format: str
    source: str
    moe: list[MoEAdapter] = field(default_factory=list)
    plain: dict[str, torch.Tensor] = field(default_factory=dict)  # a LoRA state dict ComfyUI can read
    task_embedding: torch.Tensor | None = None  # [num_tasks, task_dim]
    task_names: list[str] | None = None
    alignnet: AlignNet | None = None  # X2Edit's text AlignNet, when the checkpoint folder has one
    ignored: dict[str, str] = field(default_factory=dict)  # key or file -> why it was not used
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        n = sum(p.numel() for a in self.moe for p in a.moe.parameters())
        n += sum(t.numel() for t in self.plain.values())
        return n + (0 if self.task_embedding is None else self.task_embedding.numel())

    def summary(self) -> str:
        routers = sorted({a.moe.config.router for a in self.moe})
        lines = [
            f"{os.path.basename(self.source.rstrip(os.sep))}: format {self.format}, "
            f"{len(self.moe)} MoE layers (router {', '.join(routers) or '-'}), "
            f"{len(self.plain)} plain LoRA tensors, {self.num_parameters:,} parameters"
        ]
        if self.moe:
            c = self.moe[0].moe.config
            lines.append(
                f"experts {c.num_experts}, rank {c.rank}, alpha {c.alpha:g}, top-k {c.top_k}, "
                f"shared expert {'yes' if c.shared_expert else 'no'}"
            )
        if self.task_embedding is not None:
            lines.append(f"task embedding {tuple(self.task_embedding.shape)}")
        if self.alignnet is not None:
            a = self.alignnet
            lines.append(
                f"text AlignNet ({ALIGNNET_FILE}): {a.num_states} hidden states x {a.in_dim} -> context "
                f"{a.out_dim}, pooled {a.pooled_dim} (used by X2Edit Text Encode, not by this loader)"
            )
        for k, why in sorted(self.ignored.items()):
            lines.append(f"ignored {k}: {why}")
        return "\n".join(lines)


# -- detection -----------------------------------------------------------------------------------


def _x2edit_dir_of(path: str) -> str | None:
    """The X2Edit checkpoint folder ``path`` is, or whose lora.safetensors it is."""
    if os.path.isdir(path):
        return path
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path) == X2EDIT_LORA_FILE and os.path.isfile(os.path.join(folder, X2EDIT_TASK_FILE)):
        return folder
    return None


def detect_format(path: str, header: SafetensorsHeader | None = None) -> str:
    """Which format ``path`` is in (reads the safetensors header only)."""
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, X2EDIT_LORA_FILE)):
            raise FormatError(
                f"{path}: a folder is read as an X2Edit checkpoint and needs {X2EDIT_LORA_FILE} "
                f"(and {X2EDIT_TASK_FILE}); found {sorted(os.listdir(path))[:10]}"
            )
        return FORMAT_X2EDIT
    if not path.endswith(".safetensors"):
        raise FormatError(
            f"{os.path.basename(path)}: only .safetensors files (or X2Edit checkpoint folders) are read; "
            "pickled checkpoints are not loaded for safety"
        )
    header = header or read_header(path)
    if header.metadata.get("x2edit.format") == OURS_FORMAT_TAG:
        return FORMAT_OURS
    keys = header.tensors.keys()
    if any(_X2EDIT_RE.match(k) for k in keys):
        return FORMAT_X2EDIT
    if any(_ICEDIT_RE.match(k) or _ICEDIT_ROUTE_RE.match(k) for k in keys):
        return FORMAT_ICEDIT
    if not keys:
        raise FormatError(f"{os.path.basename(path)}: the file holds no tensors")
    return FORMAT_PLAIN


def load_adapters(path: str) -> LoadedAdapters:
    """Read any supported file or folder into :class:`LoadedAdapters`."""
    folder = _x2edit_dir_of(path) if os.path.exists(path) else None
    if folder is not None and os.path.isfile(os.path.join(folder, X2EDIT_LORA_FILE)):
        lora_path = os.path.join(folder, X2EDIT_LORA_FILE)
        header = read_header(lora_path)
        if detect_format(lora_path, header) == FORMAT_X2EDIT:
            return _load_x2edit(folder, header)
        if os.path.isdir(path):
            raise FormatError(f"{lora_path}: has no X2Edit MoE keys (*_moe_lora.*)")
    if not os.path.isfile(path) or not path.endswith(".safetensors"):
        detect_format(path)  # raises the matching error
    header = read_header(path)
    fmt = detect_format(path, header)
    if fmt == FORMAT_OURS:
        return _load_ours(header)
    if fmt == FORMAT_ICEDIT:
        return _load_icedit(header)
    if fmt == FORMAT_X2EDIT:
        return _load_x2edit(None, header)
    with TensorReader(header) as reader:
        plain = {k: reader.read(k) for k in header.tensors}
    return LoadedAdapters(FORMAT_PLAIN, path, plain=plain, metadata=header.metadata)


# -- ICEdit ----------------------------------------------------------------------------------------


def _shape_error(header, key, want, got) -> FormatError:
    return FormatError(
        f"{os.path.basename(header.path)}: tensor {key!r} has shape {tuple(got)}, expected {tuple(want)} "
        "(inconsistent expert shapes: the file is damaged or not an MoE-LoRA of this layout)"
    )


def _stack(reader: TensorReader, keys: list[str], dtype: torch.dtype) -> torch.Tensor:
    """Stack same-shaped tensors into one [n, ...] tensor, reading each straight into place."""
    header = reader.header
    shape = header.tensors[keys[0]].shape
    out = torch.empty((len(keys), *shape), dtype=dtype)
    for i, key in enumerate(keys):
        info = header.tensors[key]
        if info.shape != shape:
            raise _shape_error(header, key, shape, info.shape)
        if info.dtype != dtype:
            raise FormatError(
                f"{os.path.basename(header.path)}: tensor {key!r} is {info.dtype}, others {dtype}"
            )
        reader.read_into(key, out[i])
    return out


def _expert_keys(header, found: dict[int, str], what: str) -> list[str]:
    n = len(found)
    if sorted(found) != list(range(n)):
        raise FormatError(
            f"{os.path.basename(header.path)}: {what}: experts numbered {sorted(found)}, expected 0..{n - 1}"
        )
    return [found[j] for j in range(n)]


def _load_icedit(header: SafetensorsHeader) -> LoadedAdapters:
    experts: dict[str, dict[str, dict[int, str]]] = defaultdict(lambda: {"lora_A": {}, "lora_B": {}})
    routes: dict[str, str] = {}
    rest = []
    for key in header.tensors:
        m = _ICEDIT_RE.match(key)
        if m:
            experts[m.group(1)][m.group(2)][int(m.group(3))] = key
            continue
        m = _ICEDIT_ROUTE_RE.match(key)
        if m:
            routes[m.group(1)] = key
            continue
        rest.append(key)
    result = LoadedAdapters(FORMAT_ICEDIT, header.path, metadata=header.metadata)
    alpha_keys = set()
    with TensorReader(header) as reader:
        for module in sorted(set(experts) | set(routes)):
            if module not in routes:
                raise FormatError(
                    f"{os.path.basename(header.path)}: MoE layer {module!r} has experts but no lora_route"
                )
            if module not in experts:
                raise FormatError(
                    f"{os.path.basename(header.path)}: {routes[module]!r} has no experts beside it"
                )
            a_keys = _expert_keys(header, experts[module]["lora_A"], module + " lora_A")
            b_keys = _expert_keys(header, experts[module]["lora_B"], module + " lora_B")
            if len(a_keys) != len(b_keys):
                raise FormatError(
                    f"{os.path.basename(header.path)}: {module}: {len(a_keys)} lora_A experts but "
                    f"{len(b_keys)} lora_B experts"
                )
            info_a = header.tensors[a_keys[0]]
            if len(info_a.shape) != 2:
                raise _shape_error(header, a_keys[0], ("rank", "in"), info_a.shape)
            rank, n_in = info_a.shape
            info_b = header.tensors[b_keys[0]]
            if len(info_b.shape) != 2 or info_b.shape[1] != rank:
                raise _shape_error(header, b_keys[0], ("out", rank), info_b.shape)
            e = len(a_keys)
            route_info = header.tensors[routes[module]]
            if route_info.shape != (e, n_in):
                raise _shape_error(header, routes[module], (e, n_in), route_info.shape)
            alpha = float(rank)
            for ak in (f"transformer.{module}.alpha", f"{module}.alpha"):
                if ak in header.tensors:
                    alpha = float(reader.read(ak).item())
                    alpha_keys.add(ak)
            config = MoEConfig(num_experts=e, rank=rank, alpha=alpha, router=ROUTER_TOKEN, top_k=1)
            moe = MoELoRA.from_tensors(
                config,
                _stack(reader, a_keys, info_a.dtype),
                _stack(reader, b_keys, info_a.dtype),
                router=reader.read(routes[module]).to(info_a.dtype),
            )
            result.moe.append(MoEAdapter(module, APPLY_INPUT, moe))
        for key in rest:
            if key not in alpha_keys:
                result.plain[key] = reader.read(key)
    return result


# -- X2Edit ----------------------------------------------------------------------------------------


def _load_task_embedding(path: str) -> torch.Tensor:
    name = os.path.basename(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as e:
        raise FormatError(
            f"{name}: not a plain tensor checkpoint (refused to unpickle it; only weights_only=True "
            f"loading is allowed): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        weight = tensors.get("weight")
        if weight is None and len(tensors) == 1:
            weight = next(iter(tensors.values()))
    else:
        weight = obj if isinstance(obj, torch.Tensor) else None
    if weight is None or weight.dim() != 2:
        raise FormatError(f"{name}: expected {{'weight': tensor [num_tasks, dim]}}, got {type(obj).__name__}")
    return weight


def _load_x2edit(folder: str | None, header: SafetensorsHeader) -> LoadedAdapters:
    groups: dict[tuple[str, int, str], dict] = defaultdict(lambda: {"down": {}, "up": {}})
    result = LoadedAdapters(FORMAT_X2EDIT, folder or header.path, metadata=header.metadata)
    for key in header.tensors:
        m = _X2EDIT_RE.match(key)
        if not m:
            result.ignored[key] = "not an X2Edit MoE-LoRA key"
            continue
        kind, index, which, expert, part, shared_part, gate = m.groups()
        g = groups[(kind, int(index), which)]
        if expert is not None:
            g[part][int(expert)] = key
        elif shared_part is not None:
            g["shared_" + shared_part] = key
        else:
            g["gate"] = key
    fname = os.path.basename(header.path)
    double = {index for kind, index, _ in groups if kind == "transformer_blocks"}
    if (
        double
        and max(double) >= FLUX_DOUBLE_BLOCKS
        and not any(k == "single_transformer_blocks" for k, _, _ in groups)
    ):
        raise FormatError(
            f"{fname}: this is X2Edit's Qwen-Image variant ({max(double) + 1} transformer_blocks, no single "
            "blocks); this loader is for FLUX (19 double + 38 single blocks). Use X2Edit's FLUX checkpoint."
        )
    with TensorReader(header) as reader:
        for (kind, index, which), g in sorted(groups.items()):
            where = f"{kind}.{index} {which}_moe_lora"
            if kind == "single_transformer_blocks" and which == "proj":
                raise FormatError(f"{fname}: {where}: single blocks have no attention output projection")
            if "gate" not in g:
                raise FormatError(f"{fname}: {where}: missing the gate weight")
            downs = _expert_keys(header, g["down"], where + " experts.*.down")
            ups = _expert_keys(header, g["up"], where + " experts.*.up")
            if len(downs) != len(ups) or not downs:
                raise FormatError(f"{fname}: {where}: {len(downs)} expert downs but {len(ups)} ups")
            d0 = header.tensors[downs[0]]
            if len(d0.shape) != 2:
                raise _shape_error(header, downs[0], ("rank", "in"), d0.shape)
            rank, n_in = d0.shape
            u0 = header.tensors[ups[0]]
            if len(u0.shape) != 2 or u0.shape[1] != rank:
                raise _shape_error(header, ups[0], ("out", rank), u0.shape)
            e = len(downs)
            gate_info = header.tensors[g["gate"]]
            if len(gate_info.shape) != 2 or gate_info.shape[0] != e or gate_info.shape[1] <= n_in:
                raise _shape_error(header, g["gate"], (e, f"{n_in}+task_dim"), gate_info.shape)
            shared = "shared_down" in g or "shared_up" in g
            if shared and not ("shared_down" in g and "shared_up" in g):
                raise FormatError(f"{fname}: {where}: shared expert needs both down and up weights")
            if shared:
                sd, su = header.tensors[g["shared_down"]], header.tensors[g["shared_up"]]
                if sd.shape != (rank, n_in):
                    raise _shape_error(header, g["shared_down"], (rank, n_in), sd.shape)
                if su.shape != u0.shape:
                    raise _shape_error(header, g["shared_up"], u0.shape, su.shape)
            config = MoEConfig(
                num_experts=e,
                rank=rank,
                alpha=float(rank),
                router=ROUTER_TASK,
                top_k=min(X2EDIT_DEFAULT_TOP_K, e),
                shared_expert=shared,
                task_dim=gate_info.shape[1] - n_in,
            )
            dtype = d0.dtype
            moe = MoELoRA.from_tensors(
                config,
                _stack(reader, downs, dtype),
                _stack(reader, ups, dtype),
                router=reader.read(g["gate"]).to(dtype),
                shared_A=reader.read(g["shared_down"]).to(dtype) if shared else None,
                shared_B=reader.read(g["shared_up"]).to(dtype) if shared else None,
            )
            if which == "proj":
                result.moe.append(MoEAdapter(f"{kind}.{index}.attn.to_out.0", APPLY_OUTPUT, moe))
            else:
                result.moe.append(MoEAdapter(f"{kind}.{index}.attn.to_{which}", APPLY_INPUT, moe))
    task_dims = {a.moe.config.task_dim for a in result.moe}
    if len(task_dims) > 1:
        raise FormatError(f"{fname}: gates disagree on the task embedding width: {sorted(task_dims)}")
    if folder is not None:
        task_path = os.path.join(folder, X2EDIT_TASK_FILE)
        if os.path.isfile(task_path):
            emb = _load_task_embedding(task_path)
            if task_dims and emb.shape[1] != next(iter(task_dims)):
                raise FormatError(
                    f"{X2EDIT_TASK_FILE}: task embedding width {emb.shape[1]} does not fit the gates' "
                    f"{next(iter(task_dims))}"
                )
            result.task_embedding = emb
        for name in sorted(os.listdir(folder)):
            if name in (X2EDIT_LORA_FILE, X2EDIT_TASK_FILE):
                continue
            if name == ALIGNNET_FILE:
                result.alignnet = load_alignnet(os.path.join(folder, name))
            else:
                result.ignored[name] = "not part of an X2Edit MoE-LoRA checkpoint"
    if result.task_embedding is None:
        result.ignored[X2EDIT_TASK_FILE] = (
            "missing: the task-aware gates need it; only forced routing is possible without it"
        )
    return result


# -- ours ------------------------------------------------------------------------------------------


def _load_ours(header: SafetensorsHeader) -> LoadedAdapters:
    fname = os.path.basename(header.path)
    meta = header.metadata
    try:
        version = int(meta.get("x2edit.format_version", "0"))
        config = json.loads(meta["x2edit.config"])
    except (KeyError, ValueError) as e:
        raise FormatError(f"{fname}: x2edit metadata is missing or corrupt ({e!r})") from e
    if version > OURS_FORMAT_VERSION:
        raise FormatError(
            f"{fname}: format version {version} is newer than this pack reads ({OURS_FORMAT_VERSION}); "
            "update x2edit"
        )
    result = LoadedAdapters(FORMAT_OURS, header.path, metadata=meta)
    used = set()
    with TensorReader(header) as reader:

        def take(key, shape=None):
            if key not in header.tensors:
                raise FormatError(f"{fname}: missing tensor {key!r} described in its metadata")
            if shape is not None and header.tensors[key].shape != tuple(shape):
                raise _shape_error(header, key, shape, header.tensors[key].shape)
            used.add(key)
            return reader.read(key)

        for module, spec in config.get("moe", {}).items():
            spec = dict(spec)
            apply = spec.pop("apply", APPLY_INPUT)
            if apply not in (APPLY_INPUT, APPLY_OUTPUT):
                raise FormatError(f"{fname}: {module}: unknown apply mode {apply!r}")
            try:
                cfg = MoEConfig.from_dict(spec)
            except Exception as e:
                raise FormatError(f"{fname}: {module}: bad MoE config: {e}") from e
            p = f"{module}.moe."
            A = take(p + "lora_A")
            if A.dim() != 3 or A.shape[:2] != (cfg.num_experts, cfg.rank):
                raise _shape_error(header, p + "lora_A", (cfg.num_experts, cfg.rank, "in"), A.shape)
            n_in = A.shape[2]
            B = take(p + "lora_B")
            if B.dim() != 3 or B.shape[0] != cfg.num_experts or B.shape[2] != cfg.rank:
                raise _shape_error(header, p + "lora_B", (cfg.num_experts, "out", cfg.rank), B.shape)
            router = None
            if cfg.router != "forced":
                router = take(p + "router", (cfg.num_experts, n_in + cfg.task_dim))
            sA = sB = None
            if cfg.shared_expert:
                sA = take(p + "shared_A", (cfg.rank, n_in))
                sB = take(p + "shared_B", (B.shape[1], cfg.rank))
            moe = MoELoRA.from_tensors(cfg, A, B, router=router, shared_A=sA, shared_B=sB)
            forced_weights = config.get("forced_weights", {}).get(module)
            if cfg.router == "forced" and forced_weights is not None:
                moe.set_forced_weights(forced_weights)
            result.moe.append(MoEAdapter(module, apply, moe))
        if "task_embedding" in header.tensors:
            result.task_embedding = take("task_embedding")
        result.task_names = config.get("task_names")
        for key in header.tensors:
            if key in used:
                continue
            if key.startswith("transformer."):
                result.plain[key] = reader.read(key)
            else:
                result.ignored[key] = "not described by the file's metadata"
    return result


def save_moe_lora(
    path: str,
    adapters: list[MoEAdapter],
    plain: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None,
    task_embedding: torch.Tensor | None = None,
    task_names: list[str] | None = None,
    extra_metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
):
    """Write our format: MoE adapters + plain LoRAs ({module: (A [r,in], B [out,r], alpha)}) + tasks.

    The file is written to a temporary name and renamed, so an interrupted save never leaves a
    half-written file under the final name.
    """
    from safetensors.torch import save_file

    def prep(t):
        t = t.detach().to("cpu").contiguous()
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    tensors, moe_config = {}, {}
    for a in adapters:
        p = f"{a.module}.moe."
        moe_config[a.module] = {"apply": a.apply, **a.moe.config.to_dict()}
        tensors[p + "lora_A"] = prep(a.moe.lora_A)
        tensors[p + "lora_B"] = prep(a.moe.lora_B)
        if a.moe.router_weight is not None:
            tensors[p + "router"] = prep(a.moe.router_weight)
        if a.moe.shared_A is not None:
            tensors[p + "shared_A"] = prep(a.moe.shared_A)
            tensors[p + "shared_B"] = prep(a.moe.shared_B)
    for module, (A, B, alpha) in (plain or {}).items():
        tensors[f"transformer.{module}.lora_A.weight"] = prep(A)
        tensors[f"transformer.{module}.lora_B.weight"] = prep(B)
        tensors[f"transformer.{module}.alpha"] = torch.tensor(float(alpha))
    if task_embedding is not None:
        tensors["task_embedding"] = prep(task_embedding)
    config = {"moe": moe_config, "task_names": task_names}
    forced = {a.module: a.moe.forced_weights.tolist() for a in adapters if a.moe.config.router == "forced"}
    if forced:
        config["forced_weights"] = forced
    metadata = {
        "x2edit.format": OURS_FORMAT_TAG,
        "x2edit.format_version": str(OURS_FORMAT_VERSION),
        "x2edit.config": json.dumps(config, sort_keys=True),
        **(extra_metadata or {}),
    }
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
