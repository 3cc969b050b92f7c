"""MoE-LoRA maths against plain references written from REFERENCE.md (loops, no shared code)."""

import pytest
import torch

from x2edit_core.errors import ConfigError
from x2edit_core.moe import MoEConfig, MoELoRA, route_top_k

torch.manual_seed(0)


def _random_moe(cfg, n_in=24, n_out=20):
    moe = MoELoRA(n_in, n_out, cfg, dtype=torch.float64)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def reference_icedit(x, A, B, route, scale, top_k=1):
    """ICEdit: logits = route(x); top-k; softmax over kept; sum_j w_j B_j A_j x * scale (per token)."""
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype)
    for n in range(x.shape[0]):
        logits = route @ x[n]
        kept, idx = torch.topk(logits, top_k)
        w = torch.exp(kept - kept.max())
        w = w / w.sum()
        for wj, j in zip(w, idx):
            out[n] += wj * (B[j] @ (A[j] @ x[n])) * scale
    return out


def reference_x2edit(x, task_vec, A, B, gate, sA, sB, scale, top_k=2):
    """X2Edit: gate(concat(x, task)); softmax over all; top-k without renorm; + shared expert."""
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype)
    for n in range(x.shape[0]):
        logits = gate @ torch.cat([x[n], task_vec])
        p = torch.exp(logits - logits.max())
        p = p / p.sum()
        w, idx = torch.topk(p, top_k)
        for wj, j in zip(w, idx):
            out[n] += wj * (B[j] @ (A[j] @ x[n])) * scale
        out[n] += (sB @ (sA @ x[n])) * scale
    return out


@pytest.mark.parametrize("top_k", [1, 2])
def test_token_router_matches_reference(top_k):
    cfg = MoEConfig(num_experts=4, rank=3, alpha=6.0, router="token", top_k=top_k)
    moe = _random_moe(cfg)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    got = moe(x)
    want = reference_icedit(x.reshape(-1, 24), moe.lora_A, moe.lora_B, moe.router_weight, 2.0, top_k)
    torch.testing.assert_close(got.reshape(-1, 20), want)


def test_token_router_top1_weight_is_one():
    w, idx = route_top_k(torch.randn(5, 4), 1, renormalize=True)
    assert torch.equal(w, torch.ones(5, 1))


def test_task_router_matches_reference_with_per_sample_tasks():
    cfg = MoEConfig(num_experts=6, rank=2, alpha=2.0, router="task", top_k=2, shared_expert=True, task_dim=5)
    moe = _random_moe(cfg)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    tasks = torch.randn(2, 5, dtype=torch.float64)
    got = moe(x, task_embedding=tasks, strength=0.7)
    for b in range(2):
        want = reference_x2edit(
            x[b], tasks[b], moe.lora_A, moe.lora_B, moe.router_weight, moe.shared_A, moe.shared_B, 1.0
        )
        torch.testing.assert_close(got[b], 0.7 * want)


def test_task_router_without_renormalisation():
    w, _ = route_top_k(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), 2, renormalize=False)
    assert w.sum() < 1.0
    torch.testing.assert_close(w, torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0]), -1)[:2].unsqueeze(0))


def test_task_router_requires_task():
    cfg = MoEConfig(num_experts=3, rank=2, alpha=2.0, router="task", top_k=2, task_dim=4)
    with pytest.raises(ConfigError, match="task"):
        _random_moe(cfg)(torch.randn(1, 3, 24, dtype=torch.float64))


def test_forced_routing_mix_and_merge():
    cfg = MoEConfig(num_experts=4, rank=3, alpha=3.0, router="token", top_k=1, shared_expert=True)
    moe = _random_moe(cfg)
    weights = torch.tensor([0.5, 0.0, 0.25, 0.25], dtype=torch.float64)
    moe.set_forced_weights(weights)
    x = torch.randn(11, 24, dtype=torch.float64)
    want = sum(weights[j] * (x @ moe.lora_A[j].T @ moe.lora_B[j].T) for j in range(4))
    want = want + x @ moe.shared_A.T @ moe.shared_B.T
    torch.testing.assert_close(moe(x), want)
    down, up, scale = moe.merged_lora()
    assert down.shape == (3 * 3 + 3, 24)  # the zero-weight expert is dropped
    torch.testing.assert_close(scale * (x @ down.T @ up.T), want)
    torch.testing.assert_close(x @ moe.merged_delta_weight().double().T, want)


def test_forced_single_expert_is_that_expert():
    cfg = MoEConfig(num_experts=4, rank=3, alpha=3.0)
    moe = _random_moe(cfg)
    moe.set_forced_weights([0, 0, 1, 0])
    down, up, _ = moe.merged_lora()
    assert torch.equal(down, moe.lora_A[2]) and torch.equal(up, moe.lora_B[2])


def test_forced_router_kind_defaults_to_mean():
    cfg = MoEConfig(num_experts=2, rank=2, alpha=2.0, router="forced")
    moe = _random_moe(cfg)
    x = torch.randn(3, 24, dtype=torch.float64)
    want = 0.5 * (x @ moe.lora_A[0].T @ moe.lora_B[0].T + x @ moe.lora_A[1].T @ moe.lora_B[1].T)
    torch.testing.assert_close(moe(x), want)


def test_gradients_flow_to_experts_and_gate():
    cfg = MoEConfig(num_experts=4, rank=2, alpha=2.0, router="task", top_k=2, shared_expert=True, task_dim=3)
    moe = MoELoRA(8, 6, cfg)
    with torch.no_grad():
        moe.lora_B.normal_()
    task = torch.randn(3, requires_grad=True)
    moe(torch.randn(2, 5, 8), task_embedding=task).square().sum().backward()
    assert moe.lora_A.grad.abs().sum() > 0 and moe.router_weight.grad.abs().sum() > 0
    assert task.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_experts=0, rank=2, alpha=1.0),
        dict(num_experts=2, rank=2, alpha=1.0, top_k=3),
        dict(num_experts=2, rank=2, alpha=1.0, router="task"),
        dict(num_experts=2, rank=2, alpha=1.0, router="bogus"),
        dict(num_experts=2, rank=2, alpha=float("nan")),
    ],
)
def test_bad_configs(kwargs):
    with pytest.raises(ConfigError):
        MoEConfig(**kwargs)


def test_from_tensors_checks_shapes():
    cfg = MoEConfig(num_experts=2, rank=3, alpha=3.0)
    with pytest.raises(ConfigError, match="router"):
        MoELoRA.from_tensors(cfg, torch.zeros(2, 3, 8), torch.zeros(2, 5, 3), router=torch.zeros(2, 7))
    with pytest.raises(ConfigError, match="expert shapes"):
        MoELoRA.from_tensors(cfg, torch.zeros(3, 3, 8), torch.zeros(2, 5, 3), router=torch.zeros(2, 8))


@pytest.mark.parametrize("router", ["token", "task", "forced"])
def test_accumulating_into_a_row_slice_equals_adding_the_delta(router):
    task_dim = 4 if router == "task" else 0
    cfg = MoEConfig(
        num_experts=3, rank=2, alpha=4.0, router=router, top_k=2, shared_expert=True, task_dim=task_dim
    )
    moe = _random_moe(cfg, n_in=24, n_out=20)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    task = torch.randn(task_dim, dtype=torch.float64) if task_dim else None
    base = torch.randn(2, 5, 60, dtype=torch.float64)
    want = base.clone()
    want[..., 20:40] += moe(x, task, 0.5)
    got = base.clone()
    assert moe(x, task, 0.5, out=got[..., 20:40]) is not None
    torch.testing.assert_close(got, want)


def test_converted_copy_leaves_the_original_untouched():
    cfg = MoEConfig(num_experts=3, rank=2, alpha=2.0, shared_expert=True)
    moe = _random_moe(cfg)
    copy = moe.converted(dtype=torch.float32, forced_weights=[0, 1, 0])
    assert copy.lora_A.dtype == torch.float32 and moe.lora_A.dtype == torch.float64
    assert moe.forced_weights is None and copy.forced_weights.tolist() == [0, 1, 0]
    x = torch.randn(4, 24, dtype=torch.float64)
    want = x @ moe.lora_A[1].T @ moe.lora_B[1].T + x @ moe.shared_A.T @ moe.shared_B.T
    torch.testing.assert_close(copy(x.float()).double(), want, rtol=1e-4, atol=1e-5)
