"""X2Edit Encode Source on the real server. The posterior mode equals core VAE Encode bit for bit; the
posterior sample equals mean + std * noise(seed), with mean and std computed here by a diffusers
AutoencoderKL holding the same weights and the noise drawn here from the seed.

The VAE has FLUX.1's VAE layout and widths (ComfyUI fixes the widths when it loads a VAE), random weights
stored in bf16, in diffusers' key layout (ComfyUI converts it as it loads, into the same encoder and
Gaussian posterior step it uses for ae.safetensors).
"""

import pytest
import torch
from comfy_harness import ComfyExecutionError
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

VAE_NAME = "x2edit_flux_layout_vae.safetensors"
PIXELS = "x2src_pixels.safetensors"
HEIGHT, WIDTH = 48, 64
MODE, SAMPLE = "posterior mode (as VAE Encode)", "posterior sample (as X2Edit)"
TOLERANCE = 1e-4  # relative: the same weights through two implementations in float32


@pytest.fixture(scope="module")
def flux_vae(comfy):
    from diffusers import AutoencoderKL

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = AutoencoderKL(  # FLUX.1's VAE configuration
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in vae.state_dict().items()}
    vae.load_state_dict({k: v.float() for k, v in state.items()})
    comfy.add_file("vae", VAE_NAME, state)
    pixels = torch.rand((2, HEIGHT, WIDTH, 3), generator=torch.Generator().manual_seed(1))
    save_file({"image": pixels}, str(comfy.input_dir / PIXELS))
    with torch.no_grad():
        posterior = vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist
    yield posterior.mean, posterior.std
    torch.set_num_threads(threads)


def _prompt(vae_name, encodes):
    """VAELoader, the pixels, then one encode node per entry of ``encodes`` (node id -> node), each saved."""
    prompt = {
        "1": {"class_type": "VAELoader", "inputs": {"vae_name": vae_name}},
        "2": {"class_type": "X2EditTestLoadTensors", "inputs": {"filename": PIXELS}},
    }
    for node, (class_type, inputs) in encodes.items():
        prompt[node] = {"class_type": class_type, "inputs": {"pixels": ["2", 0], "vae": ["1", 0], **inputs}}
        prompt[f"{node}0"] = {
            "class_type": "X2EditTestSaveTensors",
            "inputs": {"filename_prefix": f"x2src/{node}", "latent": [node, 0]},
        }
    return prompt


def _source(latent, seed=0):
    return ("X2EditEncodeSource", {"latent": latent, "seed": seed})


def _latents(comfy, entry, nodes):
    return {
        n: load_file(comfy.output_files(entry, node_id=f"{n}0", kind="tensors")[0])["latent"] for n in nodes
    }


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_mode_equals_vae_encode_and_sample_is_mean_plus_std_noise(comfy, flux_vae):
    mean, std = flux_vae
    encodes = {
        "3": ("VAEEncode", {}),
        "4": _source(MODE, seed=5),
        "5": _source(SAMPLE, seed=5),
        "6": _source(SAMPLE, seed=6),
    }
    got = _latents(comfy, comfy.run(_prompt(VAE_NAME, encodes), timeout=300), encodes)
    assert got["3"].shape == mean.shape == (2, 16, HEIGHT // 8, WIDTH // 8)
    assert torch.equal(got["4"], got["3"])  # the default is VAE Encode's latent itself
    d_mean = rel(got["3"], mean)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    want = mean + std * noise
    d_sample = rel(got["5"], want)
    d_offset = rel(got["5"] - got["3"], std * noise)  # what sampling adds, against the reference's std
    other = rel(got["6"], got["5"])
    print(
        f"posterior mode vs reference mean: relative diff {d_mean:.3e}; sample(seed 5) vs reference "
        f"mean + std * noise: {d_sample:.3e}; sample minus mode vs std * noise: {d_offset:.3e}; seed 6 vs "
        f"seed 5: {other:.3f}; std range {std.min():.3f}..{std.max():.3f}"
    )
    assert d_mean <= TOLERANCE and d_sample <= TOLERANCE and d_offset <= TOLERANCE
    assert other > 0.1 and rel(got["5"], got["3"]) > 0.1


def test_sampling_a_vae_without_posterior_is_refused(comfy, flux_vae):
    with pytest.raises(ComfyExecutionError, match="has no Gaussian posterior to sample"):
        comfy.run(_prompt(comfy.models["vae"], {"3": _source(SAMPLE)}))  # the TAESD-layout test VAE
    entry = comfy.run(_prompt(comfy.models["vae"], {"3": ("VAEEncode", {}), "4": _source(MODE)}))
    got = _latents(comfy, entry, ["3", "4"])
    assert torch.equal(got["3"], got["4"])
