"""MoE-LoRA layer maths: experts, routers, merging.

One implementation shared by the ComfyUI nodes (inference) and the training package:

    delta(x) = strength * scale * sum_{j in chosen(x)} w_j(x) * B_j(A_j(x))   (+ shared expert B_s A_s x)

with scale = alpha / rank. Three router kinds:

- ``token`` (ICEdit): logits = route(x) on the layer input; keep the top-k logits; softmax over the
  kept ones (so with k = 1 the chosen expert has weight 1.0).
- ``task`` (X2Edit): logits = gate(concat(x, task_embedding)); softmax over all experts; keep the top-k
  weights *without* renormalising; an always-on shared expert is added with weight 1.
- ``forced``: fixed weights per expert, constant over tokens, so the whole adapter is a plain LoRA of
  rank E*r and can be merged into the base weight (see :meth:`MoELoRA.merged_lora`).

Routed experts are evaluated sparsely (each expert only on the tokens sent to it), which keeps the
cost close to that of a single LoRA of rank k*r. Two dispatch paths give the same result:

- ``sparse`` (default on CPU): one matrix product per expert on its gathered tokens; the per-expert
  token counts are read on the host to slice the segments.
- ``grouped`` (default on every other device): no host read at all, so a CUDA step never waits on
  the GPU inside the routed layers. The (token, slot) pairs are sorted by expert and laid out in
  blocks of a fixed size, each expert's segment padded to whole blocks; the number of blocks has a
  bound that depends only on the shapes, so every size is known without looking at the routing.
  Two batched products over the blocks (each block with its expert's weights) do the work; the
  padding rows have zero input and zero weight.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

ROUTER_TOKEN = "token"
ROUTER_TASK = "task"
ROUTER_FORCED = "forced"
ROUTER_KINDS = (ROUTER_TOKEN, ROUTER_TASK, ROUTER_FORCED)
DISPATCH_SPARSE = "sparse"
DISPATCH_GROUPED = "grouped"
DISPATCH_KINDS = (DISPATCH_SPARSE, DISPATCH_GROUPED)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype products with ``x`` run in: autocast's when it is on for x's device, else x's."""
    try:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
    except (TypeError, RuntimeError):  # torch < 2.4, or a device autocast does not know (meta)
        pass
    return x.dtype


def _operand(t: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # a no-op (no copy) when the weights already live on x's device in the compute dtype, as the
    # nodes keep them; under autocast it is the same cast autocast would make
    return t.to(x.device, dtype)


def grouped_block_size(slots: int, num_experts: int) -> int:
    """Rows per block of the grouped dispatch: about a quarter of an even expert share, a multiple of 16.

    Padding costs at most E * (block - 1) rows (about a quarter of the slots); the expert weights
    are gathered once per block (at most slots / block + E blocks).
    """
    share = -(-slots // (4 * num_experts))
    return max(16, -(-share // 16) * 16)


@dataclass(frozen=True)
class MoEConfig:
    """Shape and routing of one MoE-LoRA adapter."""

    num_experts: int
    rank: int
    alpha: float
    router: str = ROUTER_TOKEN
    top_k: int = 1
    shared_expert: bool = False
    task_dim: int = 0  # width of the task embedding concatenated to the gate input (router "task")

    def __post_init__(self):
        if self.router not in ROUTER_KINDS:
            raise ConfigError(f"unknown router kind {self.router!r}; expected one of {ROUTER_KINDS}")
        if self.num_experts < 1 or self.rank < 1:
            raise ConfigError(f"num_experts and rank must be >= 1 (got {self.num_experts}, {self.rank})")
        if self.router != ROUTER_FORCED and not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k must be in 1..num_experts={self.num_experts} (got {self.top_k})")
        if self.router == ROUTER_TASK and self.task_dim < 1:
            raise ConfigError("a task-aware router needs task_dim >= 1 (the task embedding width)")
        if self.router != ROUTER_TASK and self.task_dim:
            raise ConfigError(f"task_dim is only meaningful for router 'task' (router is {self.router!r})")
        if not math.isfinite(self.alpha):
            raise ConfigError(f"alpha must be finite (got {self.alpha})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MoEConfig:
        known = {f: d[f] for f in cls.__dataclass_fields__ if f in d}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown MoE config fields {unknown}")
        return cls(**known)


def route_top_k(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token routing weights and expert indices, both [..., top_k].

    renormalize=True: softmax over the kept logits (ICEdit). False: softmax over all experts, then keep
    the top-k probabilities as they are (X2Edit).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)  # softmax in at least fp32
    if renormalize:
        kept, index = logits.topk(top_k, dim=-1)
        return F.softmax(kept, dim=-1, dtype=dtype).to(logits.dtype), index
    probs = F.softmax(logits, dim=-1, dtype=dtype).to(logits.dtype)
    return probs.topk(top_k, dim=-1)


class MoELoRA(nn.Module):
    """A bank of LoRA experts with a router; ``forward(x)`` returns the delta to add to the layer output.

    Parameters (shapes): ``lora_A`` [E, r, in], ``lora_B`` [E, out, r], ``router_weight`` [E, in + task_dim]
    (absent for forced routing), ``shared_A`` [r, in] and ``shared_B`` [out, r] when there is a shared
    expert.
    """

    def __init__(self, in_features: int, out_features: int, config: MoEConfig, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        e, r = config.num_experts, config.rank
        kw = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(e, r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(e, out_features, r, **kw))
        # The gate is a bare Parameter (not an nn.Linear) so this module is a leaf that owns all its
        # weights: ComfyUI's ModelPatcher moves leaf modules between devices one by one.
        self.router_weight = None
        if config.router != ROUTER_FORCED:
            self.router_weight = nn.Parameter(torch.empty(e, in_features + config.task_dim, **kw))
        self.shared_A = self.shared_B = None
        if config.shared_expert:
            self.shared_A = nn.Parameter(torch.empty(r, in_features, **kw))
            self.shared_B = nn.Parameter(torch.empty(out_features, r, **kw))
        # Forced routing weights [E]: used when config.router == "forced", or to override a trained
        # router at inference (set_forced_weights).
        self.forced_weights: torch.Tensor | None = None
        if config.router == ROUTER_FORCED:
            self.forced_weights = torch.full((e,), 1.0 / e)
        self.reset_parameters()

    def reset_parameters(self):
        # X2Edit's init: down ~ N(0, 1/rank), up = 0, so a new adapter starts as the identity.
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=1.0 / self.config.rank)
            nn.init.zeros_(self.lora_B)
            if self.shared_A is not None:
                nn.init.normal_(self.shared_A, std=1.0 / self.config.rank)
                nn.init.zeros_(self.shared_B)
            if self.router_weight is not None:
                nn.init.kaiming_uniform_(self.router_weight, a=math.sqrt(5))

    @classmethod
    def from_tensors(
        cls,
        config: MoEConfig,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        router: torch.Tensor | None = None,
        shared_A: torch.Tensor | None = None,
        shared_B: torch.Tensor | None = None,
    ) -> MoELoRA:
        """Wrap existing tensors (no copy). Shapes are checked against ``config``."""
        e, r = config.num_experts, config.rank
        if lora_A.dim() != 3 or lora_B.dim() != 3 or lora_A.shape[:2] != (e, r) or lora_B.shape[0] != e:
            raise ConfigError(
                f"expert shapes A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)} do not fit "
                f"{e} experts of rank {r}"
            )
        if lora_B.shape[2] != r:
            raise ConfigError(f"expert B rank {lora_B.shape[2]} differs from A rank {r}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features, module.config = lora_A.shape[2], lora_B.shape[1], config
        module.lora_A = nn.Parameter(lora_A, requires_grad=False)
        module.lora_B = nn.Parameter(lora_B, requires_grad=False)
        module.router_weight = None
        if config.router != ROUTER_FORCED:
            want = (e, module.in_features + config.task_dim)
            if router is None or tuple(router.shape) != want:
                got = None if router is None else tuple(router.shape)
                raise ConfigError(f"router weight shape {got} does not fit {want}")
            module.router_weight = nn.Parameter(router, requires_grad=False)
        module.shared_A = module.shared_B = None
        if config.shared_expert:
            if shared_A is None or shared_B is None:
                raise ConfigError("config has a shared expert but no shared_A/shared_B tensors were given")
            if tuple(shared_A.shape) != (r, module.in_features) or tuple(shared_B.shape) != (
                module.out_features,
                r,
            ):
                raise ConfigError(
                    f"shared expert shapes A {tuple(shared_A.shape)}, B {tuple(shared_B.shape)} do not fit "
                    f"rank {r}, in {module.in_features}, out {module.out_features}"
                )
            module.shared_A = nn.Parameter(shared_A, requires_grad=False)
            module.shared_B = nn.Parameter(shared_B, requires_grad=False)
        module.forced_weights = None
        if config.router == ROUTER_FORCED:
            module.forced_weights = torch.full((e,), 1.0 / e)
        return module

    # -- routing -------------------------------------------------------------------------------------

    def set_forced_weights(self, weights: torch.Tensor | list[float] | None):
        """Route every token with these fixed expert weights (None restores the trained router)."""
        if weights is None:
            if self.router_weight is None:
                raise ConfigError("this adapter has no trained router; forced weights are required")
            self.forced_weights = None
            return
        w = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if w.numel() != self.config.num_experts:
            raise ConfigError(f"got {w.numel()} expert weights for {self.config.num_experts} experts")
        self.forced_weights = w

    def router_logits(self, x: torch.Tensor, task_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Gate logits [..., E]. For the task router, ``task_embedding`` is [D] or [B, D] (one per sample)."""
        if self.config.router != ROUTER_TASK:
            return F.linear(x, self.router_weight.to(x.device, x.dtype))
        if task_embedding is None:
            raise ConfigError("a task-aware MoE-LoRA needs a task embedding (choose a task)")
        w = self.router_weight.to(x.device, x.dtype)
        w_x, w_t = w[:, : self.in_features], w[:, self.in_features :]
        # concat(x, t) @ W^T == x @ W_x^T + t @ W_t^T; the task half is one row per sample.
        task_part = F.linear(task_embedding.to(x.device, x.dtype), w_t)
        if task_part.dim() == 2 and x.dim() >= 3:
            if task_part.shape[0] not in (1, x.shape[0]):
                raise ConfigError(f"{task_part.shape[0]} task embeddings for a batch of {x.shape[0]}")
            task_part = task_part.view(task_part.shape[0], *([1] * (x.dim() - 2)), -1)
        return F.linear(x, w_x) + task_part

    def route(self, x: torch.Tensor, task_embedding: torch.Tensor | None = None):
        """(weights [..., k], expert index [..., k]) for each token of ``x``."""
        logits = self.router_logits(x, task_embedding)
        return route_top_k(logits, self.config.top_k, renormalize=self.config.router == ROUTER_TOKEN)

    # -- forward -------------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        task_embedding: torch.Tensor | None = None,
        strength: float = 1.0,
        forced_weights: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        dispatch: str | None = None,
    ):
        """Delta for ``x`` [..., in]. ``forced_weights`` [E] overrides the routing for this call only.

        With ``out`` (shaped like the delta, e.g. a row slice of the base layer's output) the delta is
        added into it in place and ``out`` is returned: no extra full-size buffer or pass (inference).
        ``dispatch``: ``sparse`` or ``grouped`` (see the module docstring); None = sparse on CPU,
        grouped elsewhere.
        """
        lead, n_in = x.shape[:-1], x.shape[-1]
        if n_in != self.in_features:
            raise ConfigError(f"input width {n_in} does not fit this adapter's {self.in_features}")
        if dispatch is None:
            dispatch = DISPATCH_SPARSE if x.device.type == "cpu" else DISPATCH_GROUPED
        elif dispatch not in DISPATCH_KINDS:
            raise ConfigError(f"unknown dispatch {dispatch!r}; expected one of {DISPATCH_KINDS}")
        x2 = x.reshape(-1, n_in)
        dtype = _compute_dtype(x2)
        # The scale multiplies the small [N, r] intermediates, never a full [N, out] tensor.
        scale = self.config.scale * strength
        acc = None if out is None else out.view(-1, self.out_features)
        if self.shared_A is not None:  # the always-on expert
            acc = self._add_low_rank(x2, self.shared_A, self.shared_B, scale, acc, dtype)
        if forced_weights is None:
            forced_weights = self.forced_weights
        if forced_weights is not None:
            down, up = self._merged_factors(include_shared=False, weights=forced_weights)
            acc = self._add_low_rank(x2, down, up, scale, acc, dtype)
        else:
            weights, index = self.route(x, task_embedding)
            n = x2.shape[0]
            weights, index = weights.reshape(n, -1) * scale, index.reshape(n, -1)
            if dispatch == DISPATCH_SPARSE:
                acc = self._dispatch_sparse(x2, weights, index, acc, dtype)
            else:
                acc = self._dispatch_grouped(x2, weights, index, acc, dtype)
        return out if out is not None else acc.view(*lead, self.out_features)

    @staticmethod
    def _add_low_rank(x2, down, up, scale, acc, dtype):
        h = F.linear(x2, _operand(down, x2, dtype)) * scale
        up = _operand(up, x2, dtype)
        if acc is None:
            return F.linear(h, up)
        return acc.addmm_(h.to(acc.dtype), up.t().to(acc.dtype))

    def _accumulator(self, x2, acc, dtype):
        return x2.new_zeros(x2.shape[0], self.out_features, dtype=dtype) if acc is None else acc

    def _dispatch_sparse(self, x2, weights, index, out, dtype) -> torch.Tensor:
        """Sum of the chosen experts, each run only on its own tokens (added into ``out`` if given)."""
        n, k = index.shape
        flat_expert = index.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token = order // k
        w = weights.reshape(-1)[order].unsqueeze(-1)
        counts = torch.bincount(flat_expert, minlength=self.config.num_experts).tolist()  # host read
        out = self._accumulator(x2, out, dtype)
        # unbind once: indexing A[e] per expert would make its backward write a full-size zero gradient
        # for every expert
        A, B = _operand(self.lora_A, x2, dtype).unbind(0), _operand(self.lora_B, x2, dtype).unbind(0)
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            tok = token[start : start + c]
            h = F.linear(x2.index_select(0, tok), A[e]) * w[start : start + c]
            out.index_add_(0, tok, F.linear(h, B[e]).to(out.dtype))
            start += c
        return out

    def _dispatch_grouped(self, x2, weights, index, out, dtype) -> torch.Tensor:
        """The same sum with no device-to-host read: fixed-size blocks, one expert per block."""
        n, k = index.shape
        e_count = self.config.num_experts
        slots = n * k
        dev = x2.device
        size = grouped_block_size(slots, e_count)
        blocks = slots // size + e_count  # sum_e ceil(c_e / size) never exceeds this
        rows = blocks * size
        flat_expert = index.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        expert = flat_expert.index_select(0, order)
        # counts by scatter_add: bincount would read its maximum on the host
        counts = torch.zeros(e_count, dtype=torch.long, device=dev).scatter_add_(
            0, flat_expert, torch.ones_like(flat_expert)
        )
        padded = (counts + size - 1) // size * size
        padded_end = torch.cumsum(padded, 0)
        # row of each sorted slot in the padded layout: its expert's padded start + its rank inside it
        rank_in_expert = torch.arange(slots, device=dev) - (torch.cumsum(counts, 0) - counts).index_select(
            0, expert
        )
        row = (padded_end - padded).index_select(0, expert) + rank_in_expert
        token = order // k
        block_expert = torch.searchsorted(
            padded_end, torch.arange(blocks, device=dev) * size, right=True
        ).clamp_max_(e_count - 1)  # blocks past the last segment: zero rows, any expert
        # padding rows read token 0 with weight 0: they add exact zeros (and no gradient) to it
        ts = token.new_zeros(rows).index_copy(0, row, token)
        ws = weights.new_zeros(rows).index_copy(0, row, weights.reshape(-1).index_select(0, order))
        xs = x2.to(dtype).index_select(0, ts).view(blocks, size, -1)
        A = _operand(self.lora_A, x2, dtype).index_select(0, block_expert)  # [blocks, r, in]
        B = _operand(self.lora_B, x2, dtype).index_select(0, block_expert)  # [blocks, out, r]
        h = torch.bmm(xs, A.transpose(1, 2))
        h = h * ws.view(blocks, size, 1).to(h.dtype)
        y = torch.bmm(h, B.transpose(1, 2)).view(rows, self.out_features)
        out = self._accumulator(x2, out, y.dtype)
        return out.index_add_(0, ts, y.to(out.dtype))

    def converted(self, dtype=None, device=None, forced_weights=None) -> MoELoRA:
        """A new module with the same config and weights cast to ``dtype``/``device``; ``self`` is untouched
        (loaded files are cached and shared, so per-use settings never mutate them)."""

        def conv(t):
            return None if t is None else t.detach().to(device=device, dtype=dtype)

        new = MoELoRA.from_tensors(
            self.config,
            conv(self.lora_A),
            conv(self.lora_B),
            router=conv(self.router_weight),
            shared_A=conv(self.shared_A),
            shared_B=conv(self.shared_B),
        )
        new.forced_weights = self.forced_weights
        if forced_weights is not None:
            new.set_forced_weights(forced_weights)
        return new

    # -- merging -------------------------------------------------------------------------------------

    def _merged_factors(self, include_shared: bool, weights=None):
        w = self.forced_weights if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if w is None:
            raise ConfigError("merging needs forced (constant) routing weights")
        keep = [e for e in range(self.config.num_experts) if float(w[e]) != 0.0]
        downs = [self.lora_A[e] for e in keep]
        ups = [self.lora_B[e] * w[e].to(self.lora_B.device, self.lora_B.dtype) for e in keep]
        if include_shared and self.shared_A is not None:
            downs.append(self.shared_A)
            ups.append(self.shared_B)
        if not downs:  # all weights zero: a rank-1 zero LoRA keeps the shapes valid
            return self.lora_A.new_zeros(1, self.in_features), self.lora_B.new_zeros(self.out_features, 1)
        return torch.cat(downs, 0), torch.cat(ups, 1)

    @torch.no_grad()
    def merged_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The adapter under forced routing as one plain LoRA: (down [R, in], up [out, R], scale).

        delta(x) = scale * up @ down @ x exactly, shared expert included. Experts with weight 0 are
        dropped, so forcing one expert gives exactly that expert's A and B.
        """
        down, up = self._merged_factors(include_shared=True)
        return down, up, self.config.scale

    @torch.no_grad()
    def merged_delta_weight(self) -> torch.Tensor:
        """Dense [out, in] weight delta under forced routing (scale included)."""
        down, up, scale = self.merged_lora()
        dtype = torch.promote_types(up.dtype, torch.float32)  # at least fp32 for the product
        return (up.to(dtype) @ down.to(dtype)) * scale

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in={self.in_features}, out={self.out_features}, experts={c.num_experts}, rank={c.rank}, "
            f"alpha={c.alpha}, router={c.router}, top_k={c.top_k}, shared={c.shared_expert}"
        )


def expert_usage(index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Share of routed slots that went to each expert ([E], sums to 1); for logging and tests."""
    counts = torch.bincount(index.reshape(-1), minlength=num_experts).float()
    return counts / counts.sum().clamp_min(1)
