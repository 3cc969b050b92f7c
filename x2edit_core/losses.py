"""Training losses: ICEdit's flow matching and X2Edit's task contrastive ("dispersive") loss.

Pure torch, no distributed calls: the trainer gathers features across processes and passes the
global batch here, so these functions are the one implementation and can be checked against a
plain loop.

Flow matching (ICEdit, rectified flow as in FLUX): with clean latent x0, noise n and t in (0, 1),
``x_t = (1 - t) * x0 + t * n`` and the model predicts the velocity ``n - x0``. Timesteps are
logit-normal: ``t = sigmoid(randn)``. The loss is the mean squared error over the edited tokens
(the right half of the diptych) only.

Contrastive loss (REFERENCE.md section 2): for one double block, each sample's image-stream output
over the edited tokens is flattened (tokens x channels) and L2-normalised to z_i. With
``d(i, j) = ||z_i - z_j||^2 / tau``::

    L_i = -log( sum_{j in P(i)} exp(-d(i, j)) / sum_{j} exp(-d(i, j)) )

where P(i) = samples of the same task anywhere in the global batch except i itself, and the
denominator runs over the whole global batch including i. A sample with no positive in the global
batch contributes the constant 0 (no gradient) and still counts in the mean, so the loss scale
does not depend on how many samples happen to have a partner. The loss is the mean over the
anchors (the local samples), averaged over blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def contrastive_loss(
    features: torch.Tensor,
    tasks: torch.Tensor,
    anchors: torch.Tensor | None = None,
    tau: float = 0.5,
) -> torch.Tensor:
    """Task contrastive loss of one block over a global batch.

    features: [G, ...] one row per sample of the global batch (flattened and L2-normalised here).
    tasks: [G] integer task ids. anchors: indices of the rows that act as anchors (the local
    samples; default all). Rows that should carry no gradient must be detached by the caller.
    """
    z = F.normalize(features.reshape(features.shape[0], -1).float(), dim=-1)
    g = z.shape[0]
    if anchors is None:
        anchors = torch.arange(g, device=z.device)
    za = z.index_select(0, anchors)
    # ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b, with |a| = |b| = 1
    dist = (2.0 - 2.0 * za @ z.T).clamp_min(0.0) / tau  # [A, G]
    logits = -dist
    tasks = tasks.to(z.device)
    positive = tasks.index_select(0, anchors).unsqueeze(1) == tasks.unsqueeze(0)
    positive[torch.arange(len(anchors), device=z.device), anchors] = False
    has_positive = positive.any(dim=1)
    log_all = torch.logsumexp(logits, dim=1)
    # A large finite fill (not -inf) keeps rows without positives free of NaN gradients; exp of it
    # underflows to exactly 0 next to any real logit (distances are at most 4 / tau).
    log_pos = torch.logsumexp(logits.masked_fill(~positive, -1e9), dim=1)
    per_anchor = torch.where(has_positive, log_all - log_pos, torch.zeros_like(log_all))
    return per_anchor.mean()


def contrastive_loss_over_blocks(
    block_features: list[torch.Tensor],
    tasks: torch.Tensor,
    anchors: torch.Tensor | None = None,
    tau: float = 0.5,
) -> torch.Tensor:
    """Mean of :func:`contrastive_loss` over blocks (one [G, ...] tensor per block)."""
    if not block_features:
        raise ValueError("the contrastive loss needs the features of at least one block")
    return torch.stack([contrastive_loss(f, tasks, anchors, tau) for f in block_features]).mean()
