"""Adapter injection into the diffusers FLUX Fill transformer, and export to our file format."""

import pytest
import torch
from tiny import tiny_transformer

from train.config import make_config
from train.model import (
    AdaptedLinear,
    EditModel,
    latent_image_ids,
    pack_latents,
    right_half_token_mask,
    unpack_latents,
)
from train.presets import resolve_placement
from x2edit_core.formats import load_adapters
from x2edit_core.placement import APPLY_OUTPUT


def _inputs(b=2, h=8, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = (h // 2) * (w // 2)
    return dict(
        hidden_states=torch.randn(b, n, 48, generator=g),
        encoder_hidden_states=torch.randn(b, 5, 32, generator=g),
        pooled_projections=torch.randn(b, 16, generator=g),
        timestep=torch.rand(b, generator=g),
        img_ids=latent_image_ids(h, w),
        txt_ids=torch.zeros(5, 3),
        guidance=torch.ones(b),
    ), right_half_token_mask(h, w)


def _model(preset, **kw):
    cfg = make_config(preset=preset, data=["x.jsonl"], rank=4, num_experts=4, plain_rank=4, **kw)
    t = tiny_transformer()
    return EditModel(t, resolve_placement(cfg, t), num_tasks=16, seed=0)


def _randomise(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_icedit_placement_and_freezing():
    model = _model("icedit")
    names = set(model.adapted)
    assert "transformer_blocks.0.ff.net.2" in names and "single_transformer_blocks.1.proj_out" in names
    assert "x_embedder" in names and "transformer_blocks.1.attn.to_out.0" in names
    moe = {a.module for a in model.moe_adapters()}
    assert moe == {
        "transformer_blocks.0.ff.net.2",
        "transformer_blocks.1.ff.net.2",
        "single_transformer_blocks.0.proj_out",
        "single_transformer_blocks.1.proj_out",
    }
    assert all(a.moe.config.router == "token" and a.moe.config.top_k == 1 for a in model.moe_adapters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".moe." in n for n in trainable)
    assert model.task_embedding is None


def test_x2edit_placement_task_router_and_output_apply():
    model = _model("x2edit")
    adapters = {a.module: a for a in model.moe_adapters()}
    assert adapters["transformer_blocks.0.attn.to_out.0"].apply == APPLY_OUTPUT
    assert "single_transformer_blocks.1.attn.to_v" in adapters
    assert not model.plain_loras()
    c = adapters["transformer_blocks.0.attn.to_q"].moe.config
    assert (c.router, c.top_k, c.shared_expert, c.task_dim) == ("task", 2, True, 32)
    assert model.task_embedding.weight.shape == (16, 32)


def test_untrained_adapters_leave_the_model_unchanged():
    base = tiny_transformer()
    model = _model("x2edit")
    inputs, mask = _inputs()
    with torch.no_grad():
        want = base(**inputs, return_dict=False)[0]
        got, _ = model(**inputs, task_ids=torch.tensor([1, 2]))
    assert torch.allclose(got, want, atol=1e-6)


def test_adapted_linear_matches_manual_delta():
    model = _model("x2edit")
    _randomise(model)
    wrapper = model.adapted["transformer_blocks.0.attn.to_out.0"]
    x = torch.randn(2, 3, 32)
    temb = torch.randn(2, 32)
    model.context.task_embedding = temb
    h = wrapper.base(x)
    want = h + wrapper.moe(h, temb)  # output apply: the delta sees the projected output
    assert torch.allclose(wrapper(x), want, atol=1e-6)
    wq = model.adapted["transformer_blocks.0.attn.to_q"]
    assert torch.allclose(wq(x), wq.base(x) + wq.moe(x, temb), atol=1e-6)


def test_task_ids_change_the_output_per_sample():
    model = _model("x2edit")
    _randomise(model)
    inputs, _ = _inputs(b=2)
    inputs["hidden_states"][1] = inputs["hidden_states"][0]
    inputs["encoder_hidden_states"][1] = inputs["encoder_hidden_states"][0]
    inputs["pooled_projections"][1] = inputs["pooled_projections"][0]
    inputs["timestep"][1] = inputs["timestep"][0]
    with torch.no_grad():
        same, _ = model(**inputs, task_ids=torch.tensor([3, 3]))
        diff, _ = model(**inputs, task_ids=torch.tensor([3, 7]))
    assert torch.allclose(same[0], same[1], atol=1e-6)
    assert not torch.allclose(diff[0], diff[1], atol=1e-4)


def test_feature_capture_is_edited_half_of_each_double_block():
    model = _model("x2edit")
    inputs, mask = _inputs(b=3)
    _, feats = model(**inputs, task_ids=torch.tensor([1, 2, 1]), token_mask=mask, capture=True)
    assert len(feats) == 2 and all(f.shape == (3, int(mask.sum()), 32) for f in feats)
    assert feats[0].requires_grad
    _, none = model(**inputs, task_ids=torch.tensor([1, 2, 1]))
    assert none == []


def test_pack_roundtrip_and_right_half_mask():
    x = torch.randn(2, 4, 6, 8)
    assert torch.equal(unpack_latents(pack_latents(x), 6, 8), x)
    mask = right_half_token_mask(6, 8).view(3, 4)
    assert mask[:, 2:].all() and not mask[:, :2].any()


@pytest.mark.parametrize("preset", ["icedit", "x2edit"])
def test_export_loads_back_with_same_deltas(tmp_path, preset):
    model = _model(preset)
    _randomise(model)
    from x2edit_core.formats import save_moe_lora

    te = model.task_embedding.weight if model.task_embedding is not None else None
    path = str(tmp_path / "a.safetensors")
    save_moe_lora(path, model.moe_adapters(), plain=model.plain_loras(), task_embedding=te)
    loaded = load_adapters(path)
    assert {a.module for a in loaded.moe} == {a.module for a in model.moe_adapters()}
    for a in loaded.moe:
        mine = model.adapted[a.module].moe
        x = torch.randn(2, 5, mine.in_features)
        temb = None if te is None else te[torch.tensor([1, 4])]
        assert torch.allclose(a.moe(x, temb), mine(x, temb), atol=1e-5)
    if preset == "icedit":
        assert len(loaded.plain) == 3 * len(model.plain_loras())
        w = model.adapted["x_embedder"].moe
        assert torch.equal(loaded.plain["transformer.x_embedder.lora_A.weight"], w.lora_A[0].detach())
    else:
        assert torch.equal(loaded.task_embedding, te.detach())


def test_custom_preset_patterns():
    model = _model(
        "custom",
        moe_targets=["transformer_blocks.*.attn.to_q", "transformer_blocks.0.attn.to_out.0@output"],
        plain_targets=["proj_out"],
    )
    assert {a.module for a in model.moe_adapters()} == {
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.1.attn.to_q",
        "transformer_blocks.0.attn.to_out.0",
    }
    assert set(model.plain_loras()) == {"proj_out"}
    assert isinstance(model.transformer.proj_out, AdaptedLinear)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    from x2edit_core.losses import contrastive_loss_over_blocks

    results = []
    for checkpointing in (False, True):
        model = _model("x2edit")
        _randomise(model)
        if checkpointing:
            model.transformer.enable_gradient_checkpointing()
        inputs, mask = _inputs(b=4)
        tasks = torch.tensor([1, 2, 1, 2])
        pred, feats = model(**inputs, task_ids=tasks, token_mask=mask, capture=True)
        loss = pred.pow(2).mean() + contrastive_loss_over_blocks(feats, tasks, None, 0.5)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.trainable_parameters()]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-5)


def test_load_transformer_from_single_file_and_folder(tmp_path):
    from safetensors.torch import save_file
    from tiny import TINY_FLUX_FILL

    from train.model import load_transformer
    from x2edit_core.errors import FormatError

    ref = tiny_transformer()
    path = str(tmp_path / "flux.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    ref.save_pretrained(str(tmp_path / "folder"))
    inputs, _ = _inputs()
    with torch.no_grad():
        want = ref(**inputs, return_dict=False)[0]
        for model in (load_transformer(path, TINY_FLUX_FILL), load_transformer(str(tmp_path / "folder"))):
            assert torch.allclose(model(**inputs, return_dict=False)[0], want)
    with pytest.raises(FormatError, match="does not fit"):
        load_transformer(path, dict(TINY_FLUX_FILL, num_layers=3))
