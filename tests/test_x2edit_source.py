"""X2Edit source preparation: buckets, centre crop, keep aspect, and undoing them."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from x2edit_core.x2edit_source import (
    BUCKETS_1024,
    MODE_BUCKETS,
    MODE_CROP,
    MODE_KEEP,
    SourceGeometry,
    SourceGeometryError,
    as_source_geometry,
    crop_box_in_source,
    nearest_bucket,
    plan_source,
    prepare_source,
    restore_source,
)


def reference_bucket(pil_size):
    """X2Edit's bucket choice as its script does it, from a PIL size (width, height)."""
    image_height, image_width = pil_size  # the script's names: these are really (width, height)
    image_aspect = image_width / image_height
    diffs = [abs(bucket[0] / bucket[1] - image_aspect) for bucket in BUCKETS_1024]
    return BUCKETS_1024[int(np.argmin(diffs))]


def image(h, w, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((b, h, w, 3), generator=g)


def smooth_image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 3, 6, 6), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").permute(0, 2, 3, 1)


def test_thirteen_buckets_multiples_of_16_and_about_a_megapixel():
    assert len(BUCKETS_1024) == 13
    assert BUCKETS_1024[0] == (720, 1456) and BUCKETS_1024[-1] == (1456, 720)
    for h, w in BUCKETS_1024:
        assert h % 16 == 0 and w % 16 == 0
        assert 0.95 < h * w / 1024**2 < 1.05


@pytest.mark.parametrize(
    "h, w", [(1024, 1024), (720, 1456), (1500, 1000), (480, 640), (3000, 1000), (100, 5000), (777, 901)]
)
def test_nearest_bucket_matches_the_scripts_choice(h, w):
    assert nearest_bucket(h, w) == reference_bucket((w, h))


def test_bucket_search_over_many_sizes():
    rng = np.random.default_rng(0)
    for h, w in rng.integers(16, 3000, size=(300, 2)):
        assert nearest_bucket(int(h), int(w)) == reference_bucket((int(w), int(h)))


def test_bucket_mode_distorts_the_aspect_and_uses_offset_128():
    g = plan_source(600, 800, MODE_BUCKETS)
    assert (g.height, g.width) == nearest_bucket(600, 800)
    assert g.offset == 128 and (g.crop_top, g.crop_left) == (0, 0)


def test_centre_crop_as_torchvision_does_it():
    g = plan_source(600, 800, MODE_CROP)  # short side 512, long side int(800 * 512 / 600) = 682
    assert (g.resized_height, g.resized_width) == (512, 682)
    assert (g.crop_top, g.crop_left) == (0, 85) and (g.height, g.width) == (512, 512)
    assert g.offset == 64
    g = plan_source(1001, 700, MODE_CROP)  # portrait: int(1001 * 512 / 700) = 732, top round(110) = 110
    assert (g.resized_height, g.resized_width, g.crop_top, g.crop_left) == (732, 512, 110, 0)
    g = plan_source(512, 515, MODE_CROP)  # round(1.5) = 2 (Python rounds half to even)
    assert (g.resized_width, g.crop_left) == (515, 2)


@pytest.mark.parametrize("h, w", [(500, 1000), (1000, 1000), (333, 1200), (2000, 1500)])
@pytest.mark.parametrize("size", [512, 768, 1024])
def test_keep_aspect_multiples_of_16_near_the_area(h, w, size):
    g = plan_source(h, w, MODE_KEEP, size=size)
    assert g.height % 16 == 0 and g.width % 16 == 0
    assert abs(g.height / g.width - h / w) < 16 / min(g.height, g.width)
    assert 0.85 < g.height * g.width / size**2 < 1.15
    assert g.offset == (128 if size > 768 else 64)


def test_explicit_offset_and_bad_values():
    assert plan_source(100, 100, MODE_KEEP, 1024, offset=200).offset == 200
    with pytest.raises(ValueError, match="offset"):
        plan_source(100, 100, MODE_KEEP, 1024, offset=-2)
    with pytest.raises(ValueError, match="Unknown source mode"):
        plan_source(100, 100, "stretch")
    with pytest.raises(ValueError, match="empty"):
        plan_source(0, 100)


def test_prepare_keeps_an_exact_bucket_unchanged_and_handles_batches_and_rgba():
    src = image(1024, 1024, b=3)
    out, g = prepare_source(src, MODE_BUCKETS)
    assert torch.equal(out, src) and g.height == 1024
    rgba = torch.cat([image(300, 200, b=2), torch.ones(2, 300, 200, 1)], dim=-1)
    out, g = prepare_source(rgba, MODE_CROP)
    assert out.shape == (2, 512, 512, 3)


def test_bilinear_resize_is_close_to_pils():
    src = image(300, 420, seed=3)
    out, g = prepare_source(src, MODE_BUCKETS)
    pil = Image.fromarray((src[0].numpy() * 255).round().astype(np.uint8))
    want = np.asarray(pil.resize((g.width, g.height), Image.BILINEAR), dtype=np.float32) / 255
    got = out[0].numpy()
    assert np.abs(got - want).mean() < 2 / 255
    small, g = prepare_source(image(2000, 3000, seed=4), MODE_CROP)  # shrinking: antialiased like PIL
    pil = Image.fromarray((image(2000, 3000, seed=4)[0].numpy() * 255).round().astype(np.uint8))
    want = pil.resize((g.resized_width, g.resized_height), Image.BILINEAR)
    want = np.asarray(want, dtype=np.float32)[g.crop_top : g.crop_top + 512, g.crop_left : g.crop_left + 512]
    assert np.abs(small[0].numpy() - want / 255).mean() < 2 / 255


def test_restore_gives_the_source_size():
    src = smooth_image(301, 450)
    for mode in (MODE_BUCKETS, MODE_KEEP):
        out, g = prepare_source(src, mode)
        back = restore_source(out, g)
        assert back.shape == src.shape
        assert (back - src).abs().mean() < 0.01


def test_restore_centre_crop_pastes_into_the_source():
    src = image(600, 800, b=2)
    out, g = prepare_source(src, MODE_CROP)
    top, left, h, w = crop_box_in_source(g)
    assert (top, left, h, w) == (0, 100, 600, 600)
    edited = 1.0 - out
    window = restore_source(edited, g)
    assert window.shape == (2, 600, 600, 3)
    pasted = restore_source(edited, g, source=src[:1])
    assert pasted.shape == (2, 600, 800, 3)
    assert torch.equal(pasted[:, :, :100], src[:1, :, :100].expand(2, -1, -1, -1))
    assert torch.equal(pasted[:, :, 100:700], window)
    with pytest.raises(SourceGeometryError, match="source image is"):
        restore_source(edited, g, source=image(10, 10))


def test_restore_refuses_a_mismatched_image():
    _, g = prepare_source(image(600, 800), MODE_BUCKETS)
    with pytest.raises(SourceGeometryError, match="prepared size"):
        restore_source(image(64, 64), g)


def test_geometry_round_trips_and_rejects_bad_data():
    _, g = prepare_source(image(600, 800), MODE_CROP)
    assert as_source_geometry(g.to_json()) == g and as_source_geometry(g.to_dict()) == g
    bad = {**g.to_dict(), "height": 500}
    with pytest.raises(SourceGeometryError):
        SourceGeometry.from_dict(bad)
    with pytest.raises(SourceGeometryError):
        as_source_geometry(3)
    with pytest.raises(SourceGeometryError):
        SourceGeometry.from_dict({"mode": MODE_CROP})


def test_posterior_mean_std_and_seeded_sample():
    from x2edit_core.x2edit_source import gaussian_posterior, posterior_noise, sample_posterior

    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 3, 4, 5, generator=g)
    logvar = torch.randn(2, 3, 4, 5, generator=g) * 2
    logvar[0, 0, 0, 0], logvar[0, 0, 0, 1] = 40.0, -50.0  # clamped to [-30, 20]
    got_mean, got_std = gaussian_posterior(torch.cat([mean, logvar], 1).to(torch.bfloat16))
    assert torch.equal(got_mean, mean.to(torch.bfloat16).float())
    want_std = torch.exp(0.5 * logvar.to(torch.bfloat16).float().clamp(-30, 20))
    assert torch.equal(got_std, want_std)
    assert got_std[0, 0, 0, 0] == math.exp(10.0) and got_std[0, 0, 0, 1] == pytest.approx(math.exp(-15.0))
    noise = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(posterior_noise((2, 3, 4, 5), 7), noise)
    assert torch.equal(sample_posterior(got_mean, got_std, 7), got_mean + got_std * noise)
    assert not torch.equal(sample_posterior(got_mean, got_std, 8), sample_posterior(got_mean, got_std, 7))
    with pytest.raises(Exception, match="even channel count"):
        gaussian_posterior(torch.zeros(1, 3, 2, 2))
