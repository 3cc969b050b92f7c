"""Flow matching and the contrastive loss against plain-loop references."""

import math

import pytest
import torch

from x2edit_core.losses import (
    contrastive_loss,
    contrastive_loss_over_blocks,
    flow_matching_pair,
    logit_normal_timesteps,
    masked_mse,
)


def reference_contrastive(features, tasks, anchors, tau):
    """REFERENCE.md section 2, written as loops."""
    z = [f.reshape(-1).double() for f in features]
    z = [v / v.norm() for v in z]
    terms = []
    for i in anchors:
        pos, total = 0.0, 0.0
        has_pos = False
        for j in range(len(z)):
            e = torch.exp(-((z[i] - z[j]) ** 2).sum() / tau)
            total = total + e
            if j != i and int(tasks[j]) == int(tasks[i]):
                pos = pos + e
                has_pos = True
        terms.append(-torch.log(pos / total) if has_pos else torch.zeros((), dtype=torch.float64))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_contrastive_matches_loop(tau):
    torch.manual_seed(0)
    feats = torch.randn(7, 5, 3)
    tasks = torch.tensor([1, 2, 1, 3, 2, 1, 4])  # tasks 3 and 4 have no positive
    for anchors in (list(range(7)), [2, 3, 4]):
        got = contrastive_loss(feats, tasks, torch.tensor(anchors), tau)
        want = reference_contrastive(feats, tasks, anchors, tau)
        assert torch.allclose(got.double(), want, atol=1e-5), (got, want)


def test_contrastive_gradients_match_loop_and_are_finite():
    torch.manual_seed(1)
    feats = torch.randn(6, 4, 2, requires_grad=True)
    ref = feats.detach().clone().requires_grad_(True)
    tasks = torch.tensor([0, 0, 1, 1, 2, 5])
    contrastive_loss(feats, tasks, None, 0.5).backward()
    reference_contrastive(ref, tasks, range(6), 0.5).backward()
    assert torch.isfinite(feats.grad).all()
    assert torch.allclose(feats.grad.double(), ref.grad.double(), atol=1e-5)


def test_no_positive_is_constant_zero():
    feats = torch.randn(3, 8, requires_grad=True)
    loss = contrastive_loss(feats, torch.tensor([0, 1, 2]), None, 0.5)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(feats.grad == 0)


def test_detached_rows_carry_no_gradient():
    """Gathered copies from other processes are detached: only the local rows get gradient."""
    torch.manual_seed(2)
    local = torch.randn(2, 6, requires_grad=True)
    other = torch.randn(2, 6)
    feats = torch.cat([local, other.detach()])
    tasks = torch.tensor([0, 1, 0, 1])
    contrastive_loss(feats, tasks, torch.tensor([0, 1]), 0.5).backward()
    assert local.grad is not None and local.grad.abs().sum() > 0


def test_over_blocks_is_mean():
    torch.manual_seed(3)
    blocks = [torch.randn(4, 3, 2) for _ in range(3)]
    tasks = torch.tensor([0, 0, 1, 1])
    want = sum(contrastive_loss(b, tasks, None, 0.5) for b in blocks) / 3
    assert torch.allclose(contrastive_loss_over_blocks(blocks, tasks, None, 0.5), want)


def test_flow_matching_pair_and_masked_mse():
    x0, noise = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    t = torch.tensor([0.25, 1.0])
    x_t, target = flow_matching_pair(x0, noise, t)
    assert torch.allclose(x_t[0], 0.75 * x0[0] + 0.25 * noise[0])
    assert torch.allclose(x_t[1], noise[1])
    assert torch.allclose(target, noise - x0)
    mask = torch.tensor([False, False, False, True, True, True])
    pred = target.clone()
    pred[:, :3] += 100.0  # errors outside the mask do not count
    assert masked_mse(pred, target, mask).item() == 0.0
    pred[:, 3:] += 1.0
    assert math.isclose(masked_mse(pred, target, mask).item(), 1.0, rel_tol=1e-6)


def test_logit_normal_timesteps_range():
    t = logit_normal_timesteps(10000, torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.02
