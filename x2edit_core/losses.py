"""Training losses: ICEdit's flow matching and X2Edit's task contrastive ("dispersive") loss.

Pure torch, no distributed calls: the trainer hands in a ``gather`` callable for multi-process runs,
so these functions are the one implementation and can be checked against a plain loop.

Flow matching (ICEdit, rectified flow as in FLUX): with clean latent x0, noise n and t in (0, 1),
``x_t = (1 - t) * x0 + t * n`` and the model predicts the velocity ``n - x0``. Timesteps are
logit-normal: ``t = sigmoid(randn)``. The loss is the mean squared error over the edited tokens
(the right half of the diptych) only.

Contrastive loss, as X2Edit trains it (variant ``x2edit``, the default): for one double block, each
sample's image-stream output over the edited tokens is flattened (tokens x channels) and
L2-normalised to z_i. The anchors are this process's samples; the other side is the whole global
batch as a constant (X2Edit all-gathers it into a buffer without gradient, the process's own rows
included), written sg(z_j). With ``d(i, j) = ||z_i - sg(z_j)||^2 / tau``::

    a_i = sum_{j in P(i)} exp(-d(i, j)),   b_i = sum_j exp(-d(i, j))
    L_i = -log((a_i + 1e-8) / (b_i + 1e-8))

where P(i) = samples of the same task anywhere in the global batch except i itself, and b_i runs
over the whole global batch including i. A sample with no positive is not constant: its term is
``log(b_i + 1e-8) + 18.42`` and its gradient pushes it away from every other sample. The loss is
the mean over the anchors, then over the blocks. Because gradient reaches a sample only through its
own anchor term, N processes with batch B give (after DDP's gradient average) exactly the gradient
of one process with batch N * B. X2Edit evaluates this in bf16 under mixed precision; here it is
always float32 (the epsilons are the same; in bf16 the 1e-8 next to b_i >= 1 vanishes anyway).

Variant ``symmetric`` (this package's earlier form): ``-log(a_i / b_i)`` without epsilons, 0 for a
sample without a positive, and gradient through both sides wherever the rows carry it (every row in
one process; the local rows in a multi-process run). On a batch where every sample has a positive
its gradient is about twice X2Edit's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

CONTRASTIVE_X2EDIT = "x2edit"
CONTRASTIVE_SYMMETRIC = "symmetric"
CONTRASTIVE_VARIANTS = (CONTRASTIVE_X2EDIT, CONTRASTIVE_SYMMETRIC)
CONTRASTIVE_EPS = 1e-8  # X2Edit's, added to numerator and denominator


def logit_normal_timesteps(
    n: int, generator: torch.Generator | None = None, device=None, mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    """t = sigmoid(mean + std * randn) in (0, 1), shape [n] (float32)."""
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(mean + std * z)


def flow_matching_pair(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) with x_t = (1 - t) x0 + t noise and target = noise - x0; t is [B]."""
    tb = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - tb) * x0 + tb * noise, noise - x0


def masked_mse(
    pred: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error over the tokens where ``token_mask`` is true.

    pred/target are [B, N, C]; token_mask is [N] or [B, N] (bool). Computed in float32.
    """
    err = (pred.float() - target.float()) ** 2
    if token_mask is None:
        return err.mean()
    mask = token_mask.to(device=err.device, dtype=torch.bool)
    if mask.dim() == 1:
        mask = mask.unsqueeze(0).expand(err.shape[0], -1)
    weight = mask.unsqueeze(-1).to(err.dtype)
    denom = weight.sum() * err.shape[-1]
    return (err * weight).sum() / denom.clamp_min(1.0)


def _check_variant(variant: str):
    if variant not in CONTRASTIVE_VARIANTS:
        raise ValueError(
            f"unknown contrastive loss variant {variant!r}; expected one of {CONTRASTIVE_VARIANTS}"
        )


def contrastive_loss(
    features: torch.Tensor,
    tasks: torch.Tensor,
    anchors: torch.Tensor | None = None,
    tau: float = 0.5,
    variant: str = CONTRASTIVE_X2EDIT,
) -> torch.Tensor:
    """Task contrastive loss of one block over a global batch (see the module docstring).

    features: [G, ...] one row per sample of the global batch (flattened and L2-normalised here).
    tasks: [G] integer task ids. anchors: indices of the rows that act as anchors (the local
    samples; default all). ``x2edit``: gradient reaches only the anchor rows, through their own
    terms. ``symmetric``: gradient also flows through the other side, wherever rows carry it.
    """
    _check_variant(variant)
    z = F.normalize(features.reshape(features.shape[0], -1).float(), dim=-1)
    g = z.shape[0]
    if anchors is None:
        anchors = torch.arange(g, device=z.device)
    anchors = anchors.to(z.device)
    za = z.index_select(0, anchors)
    others = z.detach() if variant == CONTRASTIVE_X2EDIT else z
    # ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b, with |a| = |b| = 1
    logits = -(2.0 - 2.0 * za @ others.T).clamp_min(0.0) / tau  # -d(i, j), [A, G]
    tasks = tasks.to(z.device)
    positive = tasks.index_select(0, anchors).unsqueeze(1) == tasks.unsqueeze(0)
    positive[torch.arange(len(anchors), device=z.device), anchors] = False
    log_all = torch.logsumexp(logits, dim=1)
    # A large finite fill (not -inf) keeps rows without positives free of NaN gradients; exp of it
    # underflows to exactly 0 next to any real logit (distances are at most 4 / tau).
    log_pos = torch.logsumexp(logits.masked_fill(~positive, -1e9), dim=1)
    if variant == CONTRASTIVE_X2EDIT:
        # log(s + eps) = logaddexp(log s, log eps): the epsilons exactly, without underflow at small tau
        log_eps = torch.full_like(log_all, math.log(CONTRASTIVE_EPS))
        per_anchor = torch.logaddexp(log_all, log_eps) - torch.logaddexp(log_pos, log_eps)
    else:
        per_anchor = torch.where(positive.any(dim=1), log_all - log_pos, torch.zeros_like(log_all))
    return per_anchor.mean()


def contrastive_loss_over_blocks(
    block_features: list[torch.Tensor],
    tasks: torch.Tensor,
    anchors: torch.Tensor | None = None,
    tau: float = 0.5,
    variant: str = CONTRASTIVE_X2EDIT,
) -> torch.Tensor:
    """Mean of :func:`contrastive_loss` over blocks (one [G, ...] tensor per block)."""
    if not block_features:
        raise ValueError("the contrastive loss needs the features of at least one block")
    return torch.stack([contrastive_loss(f, tasks, anchors, tau, variant) for f in block_features]).mean()


def gathered_contrastive_loss(
    block_features: list[torch.Tensor],
    tasks: torch.Tensor,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rank: int = 0,
    tau: float = 0.5,
    variant: str = CONTRASTIVE_X2EDIT,
) -> torch.Tensor:
    """The loss of this process's samples (anchors) against the global batch.

    block_features: one [B, ...] tensor per block (this process's samples, with gradient); tasks: [B].
    ``gather(t)`` returns the concatenation of ``t`` over all processes in rank order, without
    gradient (e.g. accelerate's ``Accelerator.gather``); None for one process. Every process must
    have the same B.
    """
    if gather is None:
        return contrastive_loss_over_blocks(block_features, tasks, None, tau, variant)
    b = tasks.shape[0]
    global_tasks = gather(tasks.contiguous())
    anchors = torch.arange(rank * b, (rank + 1) * b, device=tasks.device)
    global_feats = []
    for f in block_features:
        g = gather(f.detach().contiguous())
        # the local rows keep their gradient (used by the anchors, and by the symmetric variant's other
        # side); the other processes' copies carry none
        global_feats.append(torch.cat([g[: rank * b], f, g[(rank + 1) * b :]], dim=0))
    return contrastive_loss_over_blocks(global_feats, global_tasks, anchors, tau, variant)
