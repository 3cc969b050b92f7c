"""MoE-LoRA maths against plain references written from the published descriptions (loops, no shared code)."""

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


def _grouped_vs_sparse_cases():
    yield "token-top1", MoEConfig(num_experts=4, rank=3, alpha=6.0, router="token", top_k=1), 0
    yield "token-top2", MoEConfig(num_experts=5, rank=2, alpha=2.0, router="token", top_k=2), 0
    yield (
        "task-top2-shared",
        MoEConfig(num_experts=6, rank=2, alpha=2.0, router="task", top_k=2, shared_expert=True, task_dim=5),
        5,
    )
    yield "one-expert", MoEConfig(num_experts=1, rank=2, alpha=2.0, router="token", top_k=1), 0


@pytest.mark.parametrize("name,cfg,task_dim", list(_grouped_vs_sparse_cases()))
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_grouped_dispatch_equals_sparse(name, cfg, task_dim, tokens):
    """The sync-free path (the default off CPU), forced on CPU, against the sparse one: values and
    gradients, also accumulating into a row slice."""
    moe = _random_moe(cfg)
    x = torch.randn(2, tokens, 24, dtype=torch.float64, requires_grad=True)
    task = torch.randn(2, task_dim, dtype=torch.float64) if task_dim else None
    grads = {}
    for dispatch in ("sparse", "grouped"):
        moe.zero_grad()
        x.grad = None
        y = moe(x, task, 0.7, dispatch=dispatch)
        (y * torch.linspace(-1, 1, 20, dtype=torch.float64)).sum().backward()
        grads[dispatch] = (y.detach(), x.grad.clone(), moe.lora_A.grad.clone(), moe.lora_B.grad.clone())
    for a, b in zip(grads["sparse"], grads["grouped"]):
        torch.testing.assert_close(a, b)
    base = torch.randn(2, tokens, 50, dtype=torch.float64)
    want, got = base.clone(), base.clone()
    with torch.no_grad():
        moe(x, task, 0.7, out=want[..., 10:30], dispatch="sparse")
        moe(x, task, 0.7, out=got[..., 10:30], dispatch="grouped")
    torch.testing.assert_close(got, want)


def test_grouped_dispatch_with_every_token_on_one_expert():
    cfg = MoEConfig(num_experts=4, rank=3, alpha=3.0, router="token", top_k=1)
    moe = _random_moe(cfg)
    with torch.no_grad():
        moe.router_weight.zero_()
        moe.router_weight[2] = 1.0  # expert 2 wins for inputs with a positive sum
    x = torch.rand(1, 100, 24, dtype=torch.float64)
    torch.testing.assert_close(moe(x, dispatch="grouped"), moe(x, dispatch="sparse"))
    torch.testing.assert_close(moe(x, dispatch="grouped"), x @ moe.lora_A[2].T @ moe.lora_B[2].T)


def test_grouped_dispatch_reads_nothing_on_the_host():
    """On the meta device every read of a value on the host (.tolist(), .item(), bincount's size) fails,
    so running there shows the default off-CPU path never waits on the device; the sparse path does."""
    cfg = MoEConfig(num_experts=12, rank=4, alpha=4.0, router="task", top_k=2, shared_expert=True, task_dim=8)
    moe = MoELoRA(16, 16, cfg, device="meta")
    x = torch.empty(2, 64, 16, device="meta")
    y = moe(x, torch.empty(2, 8, device="meta"))
    assert y.shape == (2, 64, 16) and y.device.type == "meta"
    with pytest.raises((NotImplementedError, RuntimeError)):
        moe(x, torch.empty(2, 8, device="meta"), dispatch="sparse")


def test_dispatch_under_cpu_autocast_bf16():
    """Mixed precision as in training: float32 weights, bf16 autocast; both paths agree and give bf16."""
    for cfg, task in (
        (MoEConfig(num_experts=4, rank=3, alpha=3.0, router="token", top_k=1), None),
        (
            MoEConfig(
                num_experts=6, rank=2, alpha=2.0, router="task", top_k=2, shared_expert=True, task_dim=5
            ),
            torch.randn(2, 5),
        ),
    ):
        moe = MoELoRA(24, 20, cfg)
        with torch.no_grad():
            moe.lora_B.normal_()
        x = torch.randn(2, 9, 24)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ys = {d: moe(x, task, dispatch=d) for d in ("sparse", "grouped")}
            ys["sparse"].float().sum().backward()
        assert ys["sparse"].dtype == torch.bfloat16 and moe.lora_A.grad is not None
        torch.testing.assert_close(ys["grouped"].float(), ys["sparse"].float(), rtol=2e-2, atol=2e-2)


def test_unknown_dispatch_is_an_error():
    moe = _random_moe(MoEConfig(num_experts=2, rank=2, alpha=2.0))
    with pytest.raises(ConfigError, match="dispatch"):
        moe(torch.randn(3, 24, dtype=torch.float64), dispatch="fast")
