"""Format detection, readers, our writer, and every bad-input case (core tier, no ComfyUI)."""

import os
import pickle

import pytest
import torch
from lora_files import alignnet_state_dict, write_icedit, write_x2edit_dir, x2edit_state_dict
from safetensors.torch import save_file

from x2edit_core.errors import FormatError
from x2edit_core.formats import (
    FORMAT_ICEDIT,
    FORMAT_OURS,
    FORMAT_PLAIN,
    FORMAT_X2EDIT,
    MoEAdapter,
    detect_format,
    load_adapters,
    save_moe_lora,
)
from x2edit_core.moe import MoEConfig, MoELoRA
from x2edit_core.placement import APPLY_OUTPUT, comfy_target
from x2edit_core.safetensors_io import load_file

TINY = dict(hidden=32, num_double=2, num_single=2)


def test_icedit_file(tmp_path):
    path = write_icedit(tmp_path / "icedit.safetensors", experts=4, rank=4, x_embedder_in=96, **TINY)
    assert detect_format(str(path)) == FORMAT_ICEDIT
    loaded = load_adapters(str(path))
    assert len(loaded.moe) == 4
    a = {x.module: x for x in loaded.moe}["transformer_blocks.1.ff.net.2"]
    cfg = a.moe.config
    assert (cfg.num_experts, cfg.rank, cfg.alpha, cfg.top_k, cfg.router) == (4, 4, 4.0, 1, "token")
    raw = load_file(str(path))[0]
    assert torch.equal(
        a.moe.lora_A[2], raw["transformer.transformer_blocks.1.ff.net.2.lora_A.expert_2.weight"]
    )
    assert torch.equal(
        a.moe.router_weight, raw["transformer.transformer_blocks.1.ff.net.2.lora_route.weight"]
    )
    # plain parts are kept as-is for ComfyUI's loader; nothing is dropped silently
    moe_keys = sum(1 for k in raw if "expert_" in k or "lora_route" in k)
    assert len(loaded.plain) + moe_keys == len(raw) and not loaded.ignored
    assert "transformer.x_embedder.lora_A.weight" in loaded.plain


def test_x2edit_folder_and_its_lora_file(tmp_path):
    folder = write_x2edit_dir(tmp_path / "ckpt", experts=3, rank=2, num_tasks=16, **TINY)
    for path in (folder, os.path.join(folder, "lora.safetensors")):
        loaded = load_adapters(str(path))
        assert loaded.format == FORMAT_X2EDIT
        assert len(loaded.moe) == 2 * 4 + 2 * 3
        assert loaded.task_embedding.shape == (16, 32)
        assert not loaded.ignored  # the AlignNet is read, not ignored
        assert (loaded.alignnet.num_states, loaded.alignnet.in_dim) == (5, 16)
        assert "text AlignNet" in loaded.summary()
        proj = [a for a in loaded.moe if a.apply == APPLY_OUTPUT]
        assert [a.module for a in proj] == [
            "transformer_blocks.0.attn.to_out.0",
            "transformer_blocks.1.attn.to_out.0",
        ]
        cfg = loaded.moe[0].moe.config
        assert (cfg.router, cfg.top_k, cfg.shared_expert, cfg.task_dim, cfg.alpha) == (
            "task",
            2,
            True,
            32,
            2.0,
        )


def test_x2edit_lora_alone_reports_missing_task_file(tmp_path):
    sd, _ = x2edit_state_dict(experts=3, rank=2, **TINY)
    save_file(sd, str(tmp_path / "x2.safetensors"))
    loaded = load_adapters(str(tmp_path / "x2.safetensors"))
    assert loaded.task_embedding is None and "task_embeddings.bin" in loaded.ignored


def test_ours_round_trip(tmp_path):
    token = MoELoRA(16, 8, MoEConfig(num_experts=3, rank=2, alpha=4.0, top_k=1))
    task = MoELoRA(
        8,
        8,
        MoEConfig(num_experts=4, rank=2, alpha=2.0, router="task", top_k=2, shared_expert=True, task_dim=8),
    )
    forced = MoELoRA(8, 8, MoEConfig(num_experts=2, rank=2, alpha=2.0, router="forced"))
    forced.set_forced_weights([0.25, 0.75])
    adapters = [
        MoEAdapter("transformer_blocks.0.ff.net.2", "input", token),
        MoEAdapter("transformer_blocks.0.attn.to_out.0", APPLY_OUTPUT, task),
        MoEAdapter("single_transformer_blocks.0.attn.to_q", "input", forced),
    ]
    plain = {"x_embedder": (torch.randn(2, 12), torch.randn(8, 2), 2.0)}
    path = str(tmp_path / "ours.safetensors")
    save_moe_lora(path, adapters, plain, task_embedding=torch.randn(16, 8), task_names=["a"] * 16)
    assert detect_format(path) == FORMAT_OURS
    loaded = load_adapters(path)
    assert not loaded.ignored and loaded.task_names == ["a"] * 16
    got = {a.module: a for a in loaded.moe}
    for a in adapters:
        b = got[a.module]
        assert b.apply == a.apply and b.moe.config == a.moe.config
        for name, p in a.moe.named_parameters():
            assert torch.equal(p, dict(b.moe.named_parameters())[name])
    assert got["single_transformer_blocks.0.attn.to_q"].moe.forced_weights.tolist() == [0.25, 0.75]
    assert set(loaded.plain) == {
        "transformer.x_embedder.lora_A.weight",
        "transformer.x_embedder.lora_B.weight",
        "transformer.x_embedder.alpha",
    }
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_plain_lora(tmp_path):
    save_file(
        {
            "transformer.x_embedder.lora_A.weight": torch.zeros(2, 4),
            "transformer.x_embedder.lora_B.weight": torch.zeros(4, 2),
        },
        str(tmp_path / "p.safetensors"),
    )
    loaded = load_adapters(str(tmp_path / "p.safetensors"))
    assert loaded.format == FORMAT_PLAIN and len(loaded.plain) == 2


# -- bad input -------------------------------------------------------------------------------------


def test_truncated_file(tmp_path):
    path = write_icedit(tmp_path / "t.safetensors", experts=2, rank=2, x_embedder_in=96, **TINY)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 100])
    with pytest.raises(FormatError, match="truncated"):
        load_adapters(str(path))
    open(path, "wb").write(data[:5])
    with pytest.raises(FormatError, match="not a safetensors"):
        load_adapters(str(path))


def test_corrupt_header(tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 10)
    with pytest.raises(FormatError, match="corrupt"):
        load_adapters(str(path))


def test_random_bytes(tmp_path):
    path = tmp_path / "r.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(FormatError):
        load_adapters(str(path))


def test_inconsistent_expert_shapes(tmp_path):
    sd = {
        "transformer.transformer_blocks.0.ff.net.2.lora_A.expert_0.weight": torch.zeros(4, 128),
        "transformer.transformer_blocks.0.ff.net.2.lora_A.expert_1.weight": torch.zeros(3, 128),
        "transformer.transformer_blocks.0.ff.net.2.lora_B.expert_0.weight": torch.zeros(32, 4),
        "transformer.transformer_blocks.0.ff.net.2.lora_B.expert_1.weight": torch.zeros(32, 4),
        "transformer.transformer_blocks.0.ff.net.2.lora_route.weight": torch.zeros(2, 128),
    }
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(FormatError, match="expert_1"):
        load_adapters(str(tmp_path / "bad.safetensors"))


def test_missing_expert_and_missing_route(tmp_path):
    base = "transformer.transformer_blocks.0.ff.net.2"
    sd = {
        f"{base}.lora_A.expert_0.weight": torch.zeros(4, 8),
        f"{base}.lora_B.expert_0.weight": torch.zeros(8, 4),
        f"{base}.lora_A.expert_2.weight": torch.zeros(4, 8),
        f"{base}.lora_B.expert_2.weight": torch.zeros(8, 4),
        f"{base}.lora_route.weight": torch.zeros(2, 8),
    }
    save_file(sd, str(tmp_path / "gap.safetensors"))
    with pytest.raises(FormatError, match="expected 0..1"):
        load_adapters(str(tmp_path / "gap.safetensors"))
    del sd[f"{base}.lora_route.weight"]
    save_file(sd, str(tmp_path / "noroute.safetensors"))
    with pytest.raises(FormatError, match="lora_route"):
        load_adapters(str(tmp_path / "noroute.safetensors"))


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_task_pickle_that_is_not_plain_tensors_is_refused(tmp_path, capsys):
    folder = write_x2edit_dir(tmp_path / "ckpt", experts=2, rank=2, **TINY)
    with open(os.path.join(folder, "task_embeddings.bin"), "wb") as f:
        pickle.dump({"weight": _Evil()}, f)
    with pytest.raises(FormatError, match="weights_only"):
        load_adapters(str(folder))
    assert "must never run" not in capsys.readouterr().out


def test_task_embedding_of_wrong_width(tmp_path):
    folder = write_x2edit_dir(tmp_path / "ckpt", experts=2, rank=2, **TINY)
    torch.save({"weight": torch.zeros(16, 7)}, os.path.join(folder, "task_embeddings.bin"))
    with pytest.raises(FormatError, match="width 7"):
        load_adapters(str(folder))


def test_folder_without_lora_and_pickle_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="lora.safetensors"):
        load_adapters(str(tmp_path / "empty"))
    torch.save({"a": torch.zeros(1)}, str(tmp_path / "x.ckpt"))
    with pytest.raises(FormatError, match="pickled"):
        load_adapters(str(tmp_path / "x.ckpt"))
    with pytest.raises(FormatError, match="no such file"):
        load_adapters(str(tmp_path / "nope.safetensors"))


def test_ours_from_the_future(tmp_path):
    path = str(tmp_path / "f.safetensors")
    save_moe_lora(path, [], extra_metadata={"x2edit.format_version": "99"})
    with pytest.raises(FormatError, match="newer"):
        load_adapters(path)


def test_placement_maps_fused_rows():
    t = comfy_target("single_transformer_blocks.3.attn.to_k")
    assert (t.module, t.part) == ("single_blocks.3.linear1", "k")
    assert t.row_slice(32, 32 * 7) == slice(32, 64)
    assert comfy_target("single_transformer_blocks.3.proj_mlp").row_slice(32, 32 * 7) == slice(96, 224)
    assert comfy_target("transformer_blocks.0.attn.to_v").module == "double_blocks.0.img_attn.qkv"
    assert comfy_target("transformer.transformer_blocks.0.ff.net.2").module == "double_blocks.0.img_mlp.2"


# -- X2Edit folder: AlignNet and the Qwen-Image variant -------------------------------------------


def _alignnet_forms(sd):
    return {
        "raw": sd,
        "module-prefixed": {f"module.{k}": v for k, v in sd.items()},
        "wrapped": {
            "config": {"in_channels": 5, "kernel_size": 5, "norm_eps": 1e-6, "use_cnn": True},
            "state_dict": sd,
        },
    }


@pytest.mark.parametrize("form", ["raw", "module-prefixed", "wrapped"])
def test_x2edit_folder_reads_its_alignnet_in_every_form(tmp_path, form):
    sd = alignnet_state_dict(num_states=5, in_dim=16, out_dim=8, pooled_dim=4, seed=7)
    folder = write_x2edit_dir(
        tmp_path / "ckpt", experts=2, rank=2, alignnet=_alignnet_forms(sd)[form], **TINY
    )
    net = load_adapters(str(folder)).alignnet
    got = net.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


def test_alignnet_pickle_that_is_not_plain_tensors_is_refused(tmp_path, capsys):
    folder = write_x2edit_dir(tmp_path / "ckpt", experts=2, rank=2, **TINY)
    with open(os.path.join(folder, "diffusion_pytorch_model.bin"), "wb") as f:
        pickle.dump({"conv.weight": _Evil()}, f)
    with pytest.raises(FormatError, match="weights_only"):
        load_adapters(str(folder))
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "key, shape",
    [
        ("mlp.projector.2.weight", (8, 7)),
        ("mlp.layernorm.bias", (15,)),
        ("mlp.fc.1.weight", (4, 9)),
        ("conv.weight", (1, 5, 4, 4)),
    ],
)
def test_alignnet_of_wrong_shape_names_the_tensor(tmp_path, key, shape):
    sd = alignnet_state_dict(num_states=5, in_dim=16, out_dim=8, pooled_dim=4)
    sd[key] = torch.zeros(shape)
    folder = write_x2edit_dir(tmp_path / "ckpt", experts=2, rank=2, alignnet=sd, **TINY)
    with pytest.raises(FormatError, match=key.replace(".", r"\.")):
        load_adapters(str(folder))


def test_alignnet_missing_keys_and_other_projector_variants(tmp_path):
    sd = alignnet_state_dict(num_states=5, in_dim=16, out_dim=8, pooled_dim=4)
    del sd["mlp.fc.1.bias"]
    folder = write_x2edit_dir(tmp_path / "a", experts=2, rank=2, alignnet=sd, **TINY)
    with pytest.raises(FormatError, match="mlp.fc.1.bias"):
        load_adapters(str(folder))
    sd = alignnet_state_dict(num_states=5, in_dim=16, out_dim=8, pooled_dim=4)
    sd["t5stack.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(2, 2)
    folder = write_x2edit_dir(tmp_path / "b", experts=2, rank=2, alignnet=sd, **TINY)
    with pytest.raises(FormatError, match="T5 stack"):
        load_adapters(str(folder))
    wrapped = {"config": {"use_t5": False, "use_scale": True}, "state_dict": alignnet_state_dict(5, 16, 8, 4)}
    folder = write_x2edit_dir(tmp_path / "c", experts=2, rank=2, alignnet=wrapped, **TINY)
    with pytest.raises(FormatError, match="conv variant"):
        load_adapters(str(folder))


def test_x2edit_qwen_image_checkpoint_is_recognised(tmp_path):
    sd, _ = x2edit_state_dict(hidden=8, num_double=60, num_single=0, experts=2, rank=2)
    folder = tmp_path / "model_qwen_image"
    folder.mkdir()
    save_file(sd, str(folder / "lora.safetensors"))
    torch.save({"weight": torch.zeros(16, 8)}, str(folder / "task_embeddings.bin"))
    with pytest.raises(FormatError, match="X2Edit's Qwen-Image variant.*this loader is for FLUX"):
        load_adapters(str(folder))
    # a FLUX file with double blocks only is not mistaken for it
    sd, _ = x2edit_state_dict(hidden=8, num_double=2, num_single=0, experts=2, rank=2)
    save_file(sd, str(tmp_path / "double_only.safetensors"))
    assert len(load_adapters(str(tmp_path / "double_only.safetensors")).moe) == 8
