"""X2Edit's AlignNet equals a plain torch reference written from its description (core tier)."""

import pytest
import torch
from lora_files import alignnet_state_dict
from qwen_text_fixtures import reference_alignnet
from safetensors.torch import save_file

from x2edit_core.alignnet import AlignNet, alignnet_from_state_dict, load_alignnet
from x2edit_core.errors import FormatError


@pytest.mark.parametrize(
    "widths, batch, tokens",
    [
        (dict(num_states=4, in_dim=128, out_dim=48, pooled_dim=24), 2, 512),
        (dict(num_states=29, in_dim=3584, out_dim=4096, pooled_dim=768), 1, 12),  # X2Edit's widths
    ],
)
def test_alignnet_equals_plain_reference(widths, batch, tokens):
    torch.manual_seed(0)
    sd = alignnet_state_dict(seed=3, **widths)
    net = alignnet_from_state_dict(sd)
    assert (net.num_states, net.in_dim, net.out_dim, net.pooled_dim) == tuple(widths.values())
    states = torch.randn(batch, widths["num_states"], tokens, widths["in_dim"])
    embeds, pooled = net(states)
    ref_embeds, ref_pooled = reference_alignnet(sd, states)
    assert embeds.shape == (batch, tokens, widths["out_dim"]) and pooled.shape == (
        batch,
        widths["pooled_dim"],
    )
    d_embeds = (embeds - ref_embeds).abs().max().item()
    d_pooled = (pooled - ref_pooled).abs().max().item()
    print(f"AlignNet {widths}: max |embeds - ref| {d_embeds:.3g}, max |pooled - ref| {d_pooled:.3g}")
    assert d_embeds <= 1e-5 and d_pooled <= 1e-5


def test_x2edit_parameter_count():
    with torch.device("meta"):
        net = AlignNet()
    assert (
        sum(p.numel() for p in net.parameters()) == 34_611_670
    )  # about 34.6M: conv 726, LayerNorm 7,168, MLP 31,457,280, pooled head 3,146,496


def test_alignnet_keeps_the_file_dtype_and_reads_safetensors(tmp_path):
    sd = alignnet_state_dict(num_states=4, in_dim=16, out_dim=8, pooled_dim=4, dtype=torch.bfloat16)
    save_file(sd, str(tmp_path / "proj.safetensors"))
    net = load_alignnet(str(tmp_path / "proj.safetensors"))
    assert net.conv.weight.dtype == torch.bfloat16
    assert torch.equal(net.mlp.fc[1].weight, sd["mlp.fc.1.weight"])


def test_wrapped_config_must_match_the_weights(tmp_path):
    sd = alignnet_state_dict(num_states=4, in_dim=16, out_dim=8, pooled_dim=4)
    torch.save({"config": {"in_channels": 29}, "state_dict": sd}, str(tmp_path / "x_proj.pt"))
    with pytest.raises(FormatError, match="in_channels 29"):
        load_alignnet(str(tmp_path / "x_proj.pt"))
    torch.save({"config": {"norm_eps": 1e-3}, "state_dict": sd}, str(tmp_path / "y_proj.pt"))
    assert load_alignnet(str(tmp_path / "y_proj.pt")).mlp.layernorm.eps == 1e-3


def test_bad_files(tmp_path):
    with pytest.raises(FormatError, match="no such"):
        load_alignnet(str(tmp_path / "missing.bin"))
    torch.save(torch.zeros(3), str(tmp_path / "tensor.bin"))
    with pytest.raises(FormatError, match="state dict"):
        load_alignnet(str(tmp_path / "tensor.bin"))
    torch.save({"conv.weight": torch.zeros(1, 4, 5, 5), "note": "text"}, str(tmp_path / "mixed.bin"))
    with pytest.raises(FormatError, match="not tensors"):
        load_alignnet(str(tmp_path / "mixed.bin"))


def test_wrong_hidden_states_are_a_clear_error():
    net = alignnet_from_state_dict(alignnet_state_dict(num_states=4, in_dim=16, out_dim=8, pooled_dim=4))
    with pytest.raises(ValueError, match=r"\[batch, 4, tokens, 16\]"):
        net(torch.zeros(1, 29, 8, 16))
