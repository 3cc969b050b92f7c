"""Flow matching and the contrastive loss (both variants, one and two processes) against plain loops."""

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from train.config import make_config
from x2edit_core.losses import (
    contrastive_loss,
    contrastive_loss_over_blocks,
    flow_matching_pair,
    gathered_contrastive_loss,
    logit_normal_timesteps,
    masked_mse,
)

EPS = 1e-8


def reference_x2edit(features, tasks, anchors, tau):
    """X2Edit's loss from its description, as loops in float64: anchors z_i against the whole batch held
    constant (sg), positives = same task except i, 1e-8 added above and below, mean over anchors."""
    z = [f.reshape(-1).double() for f in features]
    z = [v / v.norm() for v in z]
    const = [v.detach() for v in z]
    terms = []
    for i in anchors:
        a, b = 0.0, 0.0
        for j in range(len(z)):
            e = torch.exp(-((z[i] - const[j]) ** 2).sum() / tau)
            b = b + e
            if j != i and int(tasks[j]) == int(tasks[i]):
                a = a + e
        terms.append(-torch.log((a + EPS) / (b + EPS)))
    return torch.stack(terms).mean()


def reference_symmetric(features, tasks, anchors, tau):
    """The symmetric variant as loops: no epsilons, 0 without a positive, gradient on both sides."""
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


REFERENCES = {"x2edit": reference_x2edit, "symmetric": reference_symmetric}


@pytest.mark.parametrize("variant", ["x2edit", "symmetric"])
@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_contrastive_matches_loop(variant, tau):
    torch.manual_seed(0)
    feats = torch.randn(7, 5, 3)
    tasks = torch.tensor([1, 2, 1, 3, 2, 1, 4])  # tasks 3 and 4 have no positive
    for anchors in (list(range(7)), [2, 3, 4]):
        got = contrastive_loss(feats, tasks, torch.tensor(anchors), tau, variant)
        want = REFERENCES[variant](feats, tasks, anchors, tau)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5), (got, want)


@pytest.mark.parametrize("variant", ["x2edit", "symmetric"])
def test_contrastive_gradients_match_loop_and_are_finite(variant):
    torch.manual_seed(1)
    feats = torch.randn(6, 4, 2, requires_grad=True)
    ref = feats.detach().clone().requires_grad_(True)
    tasks = torch.tensor([0, 0, 1, 1, 2, 5])  # 2 and 5 have no positive
    contrastive_loss(feats, tasks, None, 0.5, variant).backward()
    REFERENCES[variant](ref, tasks, range(6), 0.5).backward()
    assert torch.isfinite(feats.grad).all()
    diff = (feats.grad.double() - ref.grad).abs().max().item()
    assert diff < 1e-6, diff
    assert ref.grad.abs().max() > 1e-2  # a real gradient, not two zeros


def test_x2edit_is_the_default():
    torch.manual_seed(4)
    feats, tasks = torch.randn(5, 6), torch.tensor([1, 1, 2, 3, 3])
    assert torch.equal(contrastive_loss(feats, tasks), contrastive_loss(feats, tasks, variant="x2edit"))
    assert make_config(preset="x2edit", data=["x.jsonl"]).contrastive_variant == "x2edit"
    with pytest.raises(ValueError, match="variant"):
        contrastive_loss(feats, tasks, variant="bogus")


def test_no_positive_is_pushed_away_in_x2edit_and_zero_in_symmetric():
    torch.manual_seed(5)
    feats = torch.randn(3, 8, requires_grad=True)
    tasks = torch.tensor([0, 1, 2])
    loss = contrastive_loss(feats, tasks, None, 0.5)
    z = torch.nn.functional.normalize(feats.detach().double(), dim=-1)
    b = torch.exp(-(torch.cdist(z, z) ** 2) / 0.5).sum(1)
    want = (torch.log(b + EPS) - math.log(EPS)).mean()  # log(b_i + 1e-8) + 18.42 per sample
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-6)
    loss.backward()
    assert feats.grad.abs().sum() > 0
    with torch.no_grad():  # a small step down the gradient spreads the samples apart
        moved = torch.nn.functional.normalize(feats - 0.1 * feats.grad, dim=-1)
    before = torch.pdist(torch.nn.functional.normalize(feats.detach(), dim=-1)).min()
    assert torch.pdist(moved).min() > before
    sym = torch.randn(3, 8, requires_grad=True)
    loss = contrastive_loss(sym, tasks, None, 0.5, "symmetric")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(sym.grad == 0)


def test_symmetric_gradient_is_about_twice_x2edits_when_all_have_positives():
    torch.manual_seed(6)
    base = torch.randn(8, 32) + 3.0  # similar samples: the other side matters
    tasks = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    grads = {}
    for variant in ("x2edit", "symmetric"):
        f = base.clone().requires_grad_(True)
        contrastive_loss(f, tasks, None, 0.5, variant).backward()
        grads[variant] = f.grad.flatten()
    ratio = grads["symmetric"].norm() / grads["x2edit"].norm()
    cos = torch.nn.functional.cosine_similarity(grads["symmetric"], grads["x2edit"], dim=0)
    assert 1.8 < ratio < 2.2 and cos > 0.98, (ratio, cos)


def test_detached_rows_carry_no_gradient():
    """Gathered copies from other processes are detached: only the local rows get gradient."""
    torch.manual_seed(2)
    local = torch.randn(2, 6, requires_grad=True)
    other = torch.randn(2, 6)
    feats = torch.cat([local, other.detach()])
    tasks = torch.tensor([0, 1, 0, 1])
    contrastive_loss(feats, tasks, torch.tensor([0, 1]), 0.5).backward()
    assert local.grad is not None and local.grad.abs().sum() > 0


def test_gathered_loss_in_one_process_is_the_plain_loss():
    torch.manual_seed(7)
    blocks = [torch.randn(4, 3, 2) for _ in range(2)]
    tasks = torch.tensor([0, 0, 1, 2])
    want = contrastive_loss_over_blocks(blocks, tasks, None, 0.5)
    assert torch.equal(gathered_contrastive_loss(blocks, tasks, None, 0, 0.5), want)


_WORKER = r"""
import sys
import torch
import torch.distributed as dist
from x2edit_core.losses import gathered_contrastive_loss

rank, world, init, out, variant = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=world)
torch.manual_seed(0)  # every process draws the same global batch and keeps its own rows
blocks = [torch.randn(2 * world, 5, 3) for _ in range(3)]
tasks = torch.tensor([1, 2, 1, 3, 2, 4, 1, 1][: 2 * world])


def gather(t):
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return torch.cat(parts)


local = [b[2 * rank : 2 * rank + 2].clone().requires_grad_(True) for b in blocks]
loss = gathered_contrastive_loss(local, tasks[2 * rank : 2 * rank + 2], gather, rank, 0.5, variant)
loss.backward()
torch.save({"loss": loss.detach(), "grads": [f.grad for f in local]}, out)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("variant", ["x2edit", "symmetric"])
def test_two_processes_match_the_reference_on_the_gathered_batch(tmp_path, variant):
    """Two gloo processes with 2 samples each against the loop reference on the 4-sample global batch.

    x2edit: the mean of the two processes' losses is the reference loss, and each process's gradient
    is twice the reference's rows (its loss averages 2 anchors, the reference 4), so DDP's average
    gives exactly the one-process gradient of the doubled batch. symmetric: the same values; the
    gradient keeps only the process's own rows on the other side.
    """
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    init = str(tmp_path / "init")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", init, str(tmp_path / f"out{r}.pt"), variant],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
    outs = [torch.load(tmp_path / f"out{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    blocks = [torch.randn(4, 5, 3) for _ in range(3)]
    tasks = torch.tensor([1, 2, 1, 3])  # task 2, 3: no positive
    ref_blocks = [b.double().requires_grad_(True) for b in blocks]
    ref = REFERENCES[variant]
    if variant == "x2edit":
        want = torch.stack([ref(b, tasks, range(4), 0.5) for b in ref_blocks]).mean()
        want.backward()
        got = (outs[0]["loss"] + outs[1]["loss"]) / 2
        assert abs(got.item() - want.item()) < 1e-5, (got, want)
        for r, out in enumerate(outs):
            for blk, g in enumerate(out["grads"]):
                want_g = 2 * ref_blocks[blk].grad[2 * r : 2 * r + 2]
                assert (g.double() - want_g).abs().max() < 1e-6
    else:
        for r, out in enumerate(outs):
            local = [b[2 * r : 2 * r + 2].double().requires_grad_(True) for b in blocks]
            full = [
                torch.cat([b[: 2 * r].double(), loc, b[2 * r + 2 :].double()])
                for b, loc in zip(blocks, local)
            ]
            want = torch.stack([ref(f, tasks, [2 * r, 2 * r + 1], 0.5) for f in full]).mean()
            want.backward()
            assert abs(out["loss"].item() - want.item()) < 1e-5
            for g, loc in zip(out["grads"], local):
                assert (g.double() - loc.grad).abs().max() < 1e-6


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
