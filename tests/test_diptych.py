"""Diptych / crop round trip on ComfyUI-layout tensors."""

import json
import math

import pytest
import torch

from x2edit_core.diptych import (
    DiptychGeometry,
    GeometryError,
    ImageShapeError,
    check_geometry,
    check_mask,
    crop_right_panel,
    make_diptych,
    panel_size,
)
from x2edit_core.errors import ConfigError


def smooth_images(b, h, w, c=3, seed=0):
    """Low-frequency content, so that resize + resize back is nearly lossless."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, h).view(1, h, 1, 1)
    xs = torch.linspace(0, 1, w).view(1, 1, w, 1)
    phase = torch.rand(b, 1, 1, c, generator=g) * 6.28
    return (0.5 + 0.35 * torch.sin(2.0 * ys + 3.0 * xs + phase)).float()


SIZES = [
    (17, 9),
    (9, 17),
    (16, 16),
    (512, 512),
    (512, 768),
    (768, 512),
    (333, 517),
    (1080, 1920),
    (1920, 1080),
    (31, 33),
    (40, 7),
    (1, 30),
    (4000, 600),
    (257, 255),
]


@pytest.mark.parametrize("h, w", SIZES)
def test_round_trip_sizes(h, w):
    b = 1 if h * w > 500_000 else 2
    x = smooth_images(b, h, w)
    dip, mask, geo = make_diptych(x)
    assert geo.panel_width == 512
    assert geo.panel_height % 16 == 0 and geo.panel_height >= 16
    assert abs(geo.panel_height - 512 * h / w) <= 8
    assert dip.shape == (b, geo.panel_height, 1024, 3)
    assert mask.shape == (b, geo.panel_height, 1024)
    # decoded = a perfect edit that copies the left panel to the right
    decoded = dip.clone()
    decoded[:, :, 512:] = dip[:, :, :512]
    out = crop_right_panel(decoded, geo)
    assert out.shape == (b, h, w, 3)
    if min(h, w) >= 9:
        assert (out - x).abs().mean() < 0.02, (out - x).abs().mean()


def test_exact_when_no_resize_needed():
    x = torch.rand(1, 256, 512, 3)
    dip, _mask, geo = make_diptych(x)
    assert geo.panel_height == 256
    assert torch.equal(dip[:, :, :512], x)
    decoded = dip.clone()
    decoded[:, :, 512:] = x
    assert torch.equal(crop_right_panel(decoded, geo), x)


def test_mask_exactly_right_half_and_right_black():
    dip, mask, geo = make_diptych(torch.rand(3, 40, 70, 3), panel_width=256)
    pw = geo.panel_width
    assert pw == 256
    assert torch.all(mask[:, :, :pw] == 0) and torch.all(mask[:, :, pw:] == 1)
    assert mask.dtype == torch.float32
    assert torch.all(dip[:, :, pw:] == 0)


@pytest.mark.parametrize(
    "pw_in, pw_out", [(512, 512), (520, 528), (519, 512), (16, 16), (24, 32), (1000, 1008)]
)
def test_panel_width_rounding(pw_in, pw_out):
    _, w = panel_size(100, 100, pw_in)
    assert w == pw_out


def test_panel_width_too_small():
    with pytest.raises(ConfigError):
        panel_size(10, 10, 8)


def test_grey_and_rgba():
    grey = smooth_images(1, 64, 48, c=1)
    dip, _, geo = make_diptych(grey)
    assert dip.shape[-1] == 3
    assert torch.allclose(dip[..., 0], dip[..., 1])
    rgba = torch.cat([torch.full((1, 32, 32, 3), 0.2), torch.zeros(1, 32, 32, 1)], dim=-1)
    rgba[:, :16, :, 3] = 1.0  # top half opaque, bottom half transparent -> white
    dip, _, geo = make_diptych(rgba, panel_width=32)
    assert torch.allclose(dip[0, :16, :32], torch.full((16, 32, 3), 0.2))
    assert torch.allclose(dip[0, 16:, :32], torch.ones(16, 32, 3))
    assert crop_right_panel(dip, geo).shape == (1, 32, 32, 3)


def test_crop_batch_may_differ_from_geometry():
    dip, _, geo = make_diptych(smooth_images(1, 50, 80))
    decoded = dip.repeat(4, 1, 1, 1)
    assert crop_right_panel(decoded, geo).shape == (4, 50, 80, 3)


def test_too_thin_image():
    with pytest.raises(ImageShapeError, match="less than one 16-pixel patch"):
        make_diptych(torch.rand(1, 1, 200, 3))


def test_too_tall_image():
    with pytest.raises(ImageShapeError, match="larger than 4096"):
        make_diptych(torch.rand(1, 100, 1, 3))
    with pytest.raises(ImageShapeError, match="larger than 4096"):
        panel_size(64, 64, 5000)


def test_empty_and_bad_rank():
    with pytest.raises(ImageShapeError):
        make_diptych(torch.rand(1, 0, 10, 3))
    with pytest.raises(ImageShapeError, match="IMAGE tensor"):
        make_diptych(torch.rand(10, 10, 3))
    with pytest.raises(ImageShapeError, match="channels"):
        make_diptych(torch.rand(1, 10, 10, 2))


def test_geometry_mismatch():
    dip, _, geo = make_diptych(torch.rand(1, 64, 64, 3), panel_width=64)
    with pytest.raises(GeometryError, match="geometry describes"):
        crop_right_panel(dip[:, :48], geo)
    with pytest.raises(GeometryError):
        check_geometry(dip, {"source_height": 64})  # type: ignore[arg-type]


def test_mask_mismatch():
    dip, mask, _ = make_diptych(torch.rand(2, 64, 64, 3), panel_width=64)
    check_mask(dip, mask)
    check_mask(dip, mask[0])
    with pytest.raises(ImageShapeError, match="mask is"):
        check_mask(dip, mask[:, :, :100])
    with pytest.raises(ImageShapeError, match="batch"):
        check_mask(dip, mask.repeat(3, 1, 1))
    with pytest.raises(ImageShapeError):
        check_mask(dip, mask[None])


def test_crop_accepts_dict_and_json_geometry():
    dip, _, geo = make_diptych(torch.rand(1, 40, 40, 3), panel_width=64)
    assert crop_right_panel(dip, geo.to_dict()).shape == (1, 40, 40, 3)
    assert crop_right_panel(dip, geo.to_json()).shape == (1, 40, 40, 3)
    with pytest.raises(GeometryError, match="Expected a diptych geometry"):
        crop_right_panel(dip, 5)  # type: ignore[arg-type]


def test_geometry_serialisation():
    geo = DiptychGeometry(source_height=333, source_width=517, panel_height=336, panel_width=512, batch=2)
    assert DiptychGeometry.from_dict(geo.to_dict()) == geo
    assert DiptychGeometry.from_json(geo.to_json()) == geo
    assert json.loads(geo.to_json())["panel_width"] == 512
    assert (geo.diptych_height, geo.diptych_width) == (336, 1024)


@pytest.mark.parametrize(
    "data",
    [
        "not json",
        json.dumps({"source_height": 1}),
        json.dumps(
            {"source_height": 1, "source_width": 1, "panel_height": 17, "panel_width": 16, "batch": 1}
        ),
        json.dumps(
            {"source_height": 0, "source_width": 1, "panel_height": 16, "panel_width": 16, "batch": 1}
        ),
        json.dumps(
            {"source_height": 1.5, "source_width": 1, "panel_height": 16, "panel_width": 16, "batch": 1}
        ),
        json.dumps([1, 2]),
    ],
)
def test_geometry_bad_json(data):
    with pytest.raises(GeometryError):
        DiptychGeometry.from_json(data)


def test_dtype_and_range_preserved():
    x = torch.rand(1, 70, 90, 3, dtype=torch.float16)
    dip, _, geo = make_diptych(x)
    assert dip.dtype == torch.float16
    assert float(dip.min()) >= 0.0 and float(dip.max()) <= 1.0
    out = crop_right_panel(dip, geo)
    assert out.dtype == torch.float16 and out.shape == (1, 70, 90, 3)


def test_aspect_kept():
    for h, w in [(300, 400), (1000, 250), (123, 456)]:
        ph, pw = panel_size(h, w)
        assert math.isclose(ph / pw, h / w, rel_tol=0.05 if ph > 64 else 0.5)
