"""Writers of LoRA/MoE files in other projects' layouts (ICEdit, X2Edit), for tests and benchmarks.

Key names and shapes are those ICEdit's and X2Edit's saving code writes (described in docs/reference.md).
Sizes are parameters so tests can make tiny files and the benchmark a full-size one.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file


def icedit_state_dict(
    hidden=3072,
    mlp_ratio=4,
    num_double=19,
    num_single=38,
    experts=4,
    rank=32,
    dtype=torch.bfloat16,
    seed=0,
    plain=True,
    std=0.02,
    x_embedder_in=384,
):
    """An ICEdit-MoE-LoRA-layout state dict: MoE on ff.net.2 / proj_out, plain LoRA on the rest."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    mlp = hidden * mlp_ratio
    sd = {}
    moe_layers = [(f"transformer_blocks.{i}.ff.net.2", mlp) for i in range(num_double)]
    moe_layers += [(f"single_transformer_blocks.{i}.proj_out", hidden + mlp) for i in range(num_single)]
    for module, n_in in moe_layers:
        for j in range(experts):
            sd[f"transformer.{module}.lora_A.expert_{j}.weight"] = rnd(rank, n_in)
            sd[f"transformer.{module}.lora_B.expert_{j}.weight"] = rnd(hidden, rank)
        sd[f"transformer.{module}.lora_route.weight"] = rnd(experts, n_in) * 10
    if plain:
        layers = [("x_embedder", x_embedder_in, hidden)]
        for i in range(num_double):
            p = f"transformer_blocks.{i}"
            layers += [(f"{p}.norm1.linear", hidden, 6 * hidden)]
            layers += [(f"{p}.attn.to_{q}", hidden, hidden) for q in "qkv"]
            layers += [(f"{p}.attn.to_out.0", hidden, hidden)]
        for i in range(num_single):
            p = f"single_transformer_blocks.{i}"
            layers += [(f"{p}.norm.linear", hidden, 3 * hidden), (f"{p}.proj_mlp", hidden, mlp)]
            layers += [(f"{p}.attn.to_{q}", hidden, hidden) for q in "qkv"]
        for module, n_in, n_out in layers:
            sd[f"transformer.{module}.lora_A.weight"] = rnd(rank, n_in)
            sd[f"transformer.{module}.lora_B.weight"] = rnd(n_out, rank)
    return sd


def write_icedit(path, **kw):
    save_file(icedit_state_dict(**kw), str(path))
    return path


def x2edit_state_dict(
    hidden=3072,
    num_double=19,
    num_single=38,
    experts=12,
    rank=64,
    num_tasks=16,
    seed=0,
    dtype=torch.float32,
    std=0.02,
):
    """(lora.safetensors dict, task embedding [num_tasks, hidden]) in X2Edit's layout."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    sd = {}
    groups = [("transformer_blocks", i, w) for i in range(num_double) for w in ("q", "k", "v", "proj")]
    groups += [("single_transformer_blocks", i, w) for i in range(num_single) for w in ("q", "k", "v")]
    for kind, i, which in groups:
        p = f"{kind}.{i}.attn.processor.{which}_moe_lora"
        for j in range(experts):
            sd[f"{p}.experts.{j}.down.weight"] = rnd(rank, hidden)
            sd[f"{p}.experts.{j}.up.weight"] = rnd(hidden, rank)
        sd[f"{p}.shared_experts.down.weight"] = rnd(rank, hidden)
        sd[f"{p}.shared_experts.up.weight"] = rnd(hidden, rank)
        sd[f"{p}.gate.weight"] = rnd(experts, 2 * hidden) * 10
    return sd, rnd(num_tasks, hidden) * 50


def alignnet_state_dict(
    num_states=29, in_dim=3584, out_dim=4096, pooled_dim=768, seed=0, dtype=torch.float32
):
    """Random weights in the key layout of X2Edit's AlignNet (diffusion_pytorch_model.bin)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    return {
        "conv.weight": rnd(1, num_states, 5, 5, scale=0.1),
        "conv.bias": rnd(1, scale=0.1),
        "mlp.layernorm.weight": 1.0 + rnd(in_dim, scale=0.1),
        "mlp.layernorm.bias": rnd(in_dim, scale=0.1),
        "mlp.projector.0.weight": rnd(out_dim, in_dim, scale=in_dim**-0.5),
        "mlp.projector.2.weight": rnd(out_dim, out_dim, scale=out_dim**-0.5),
        "mlp.fc.1.weight": rnd(pooled_dim, out_dim, scale=out_dim**-0.5),
        "mlp.fc.1.bias": rnd(pooled_dim, scale=0.1),
    }


def write_x2edit_dir(folder, with_alignnet=True, alignnet=None, **kw):
    """An X2Edit checkpoint folder; `alignnet` (a state dict) defaults to a tiny random AlignNet."""
    os.makedirs(folder, exist_ok=True)
    sd, emb = x2edit_state_dict(**kw)
    save_file(sd, os.path.join(folder, "lora.safetensors"))
    torch.save({"weight": emb}, os.path.join(folder, "task_embeddings.bin"))
    if with_alignnet:
        if alignnet is None:
            alignnet = alignnet_state_dict(num_states=5, in_dim=16, out_dim=8, pooled_dim=4)
        torch.save(alignnet, os.path.join(folder, "diffusion_pytorch_model.bin"))
    return folder
