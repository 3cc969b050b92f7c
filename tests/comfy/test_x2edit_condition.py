"""X2Edit's condition stream in a real ComfyUI equals a reference X2Edit forward written here from the facts.

The reference runs on a tiny diffusers FLUX.1-dev transformer (its own blocks' modules, called as X2Edit's
processors call them) with the X2Edit MoE-LoRA applied through x2edit_core.moe. ComfyUI loads the same
base weights from the diffusers-layout file (its own conversion), the same adapters with the X2Edit
MoE-LoRA Loader, and the condition with X2Edit Condition Stream. Checked: one forward (fp32, within
1e-4), the bf16 timestep rounding switch, a full 4-step euler sample with the same noise, that the
condition tokens see timestep 0, change the output and are not in it, that a batch of 2 equals two
batches of 1, the early filter and an fp8 base.
"""

import math
from pathlib import Path

import lora_files
import pytest
import torch
import torch.nn.functional as F
from comfy_harness import ComfyExecutionError
from safetensors.torch import load_file, save_file
from tiny_models import flux_axes_dim

from x2edit_core.formats import load_adapters
from x2edit_core.placement import APPLY_OUTPUT

pytest.importorskip("diffusers")

TOLERANCE = 1e-4
HEAD_DIM = 32
LATENT_H, LATENT_W = 8, 6  # 4 x 3 tokens: rows and columns differ, so a swapped axis shows
TEXT_TOKENS = 8
OFFSET = 128
TASK = 5
FLUX_SHIFT, FLUX_SCALE = 0.1159, 0.3611  # FLUX VAE latent normalisation (shift_factor, scaling_factor)
TINY_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": HEAD_DIM,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 16,
    "guidance_embeds": True,
    "axes_dims_rope": flux_axes_dim(HEAD_DIM),
}


# --- the reference, from the facts -------------------------------------------------------------------


def pack(latent):
    b, c, h, w = latent.shape
    return latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack(tokens, h, w):
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def ids_grid(h, w, row_offset=0):
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None] + row_offset
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def bf16(x):
    return x.to(torch.bfloat16)


class Reference:
    """X2Edit's transformer on diffusers FLUX modules, with MoE-LoRA deltas from x2edit_core.moe."""

    def __init__(self, transformer, adapters, task_table):
        self.tr = transformer
        self.moe = {a.module: a for a in adapters}
        self.task_table = task_table

    def delta(self, module, x, task):
        adapter = self.moe[module]
        return adapter.moe(x, self.task_table[task])

    def linear_with_moe(self, module_name, layer, x, task):
        return layer(x) + self.delta(module_name, x, task)

    @staticmethod
    def heads(x, n):
        return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)

    def attend(self, q, k, v, rot):
        from diffusers.models.embeddings import apply_rotary_emb

        q, k = apply_rotary_emb(q, rot), apply_rotary_emb(k, rot)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)

    @torch.no_grad()
    def __call__(self, x, cond, sigma, context, pooled, guidance, task, rounding=False, cond_at_t=False):
        tr = self.tr
        b, _, h, w = x.shape
        hid = tr.x_embedder(pack(x))
        c = tr.x_embedder(pack((cond - FLUX_SHIFT) * FLUX_SCALE))
        t = sigma * 1000
        g = guidance * 1000
        if rounding:  # X2Edit's bf16 pipeline: bf16(t) / 1000 in bf16, times 1000 in bf16; bf16(g) * 1000
            t = bf16(bf16(bf16(sigma * 1000) / 1000) * 1000).float()
            g = bf16(bf16(guidance) * 1000).float()
        temb = tr.time_text_embed(t, g, pooled)
        ctemb = temb if cond_at_t else tr.time_text_embed(torch.zeros_like(t), g, pooled)
        enc = tr.context_embedder(context)
        ids = torch.cat([torch.zeros(context.shape[1], 3), ids_grid(h, w), ids_grid(h, w, OFFSET)])
        rot = tr.pos_embed(ids)
        n, tt = hid.shape[1], enc.shape[1]
        for i, blk in enumerate(tr.transformer_blocks):
            a, p = blk.attn, f"transformer_blocks.{i}.attn"
            nh, gate_msa, shift_mlp, scale_mlp, gate_mlp = blk.norm1(hid, emb=temb)
            nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = blk.norm1(c, emb=ctemb)
            ne, e_gate_msa, e_shift_mlp, e_scale_mlp, e_gate_mlp = blk.norm1_context(enc, emb=temb)
            s = torch.cat([nh, nc], 1)
            q = a.norm_q(self.heads(self.linear_with_moe(f"{p}.to_q", a.to_q, s, task), a.heads))
            k = a.norm_k(self.heads(self.linear_with_moe(f"{p}.to_k", a.to_k, s, task), a.heads))
            v = self.heads(self.linear_with_moe(f"{p}.to_v", a.to_v, s, task), a.heads)
            eq = a.norm_added_q(self.heads(a.add_q_proj(ne), a.heads))
            ek = a.norm_added_k(self.heads(a.add_k_proj(ne), a.heads))
            ev = self.heads(a.add_v_proj(ne), a.heads)
            out = self.attend(torch.cat([eq, q], 2), torch.cat([ek, k], 2), torch.cat([ev, v], 2), rot)
            e_out, s_out = out[:, :tt], out[:, tt:]
            s_out = a.to_out[0](s_out)
            s_out = s_out + self.delta(f"{p}.to_out.0", s_out, task)
            s_out = a.to_out[1](s_out)
            e_out = a.to_add_out(e_out)
            hid = hid + gate_msa[:, None] * s_out[:, :n]
            c = c + c_gate_msa[:, None] * s_out[:, n:]
            hid = hid + gate_mlp[:, None] * blk.ff(
                blk.norm2(hid) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            )
            c = c + c_gate_mlp[:, None] * blk.ff(
                blk.norm2(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
            )
            enc = enc + e_gate_msa[:, None] * e_out
            enc_n = blk.norm2_context(enc) * (1 + e_scale_mlp[:, None]) + e_shift_mlp[:, None]
            enc = enc + e_gate_mlp[:, None] * blk.ff_context(enc_n)
        hs = torch.cat([enc, hid], 1)
        for i, blk in enumerate(tr.single_transformer_blocks):
            a, p = blk.attn, f"single_transformer_blocks.{i}.attn"
            nh, gate = blk.norm(hs, emb=temb)
            nc, c_gate = blk.norm(c, emb=ctemb)
            s = torch.cat([nh, nc], 1)
            q = a.norm_q(self.heads(self.linear_with_moe(f"{p}.to_q", a.to_q, s, task), a.heads))
            k = a.norm_k(self.heads(self.linear_with_moe(f"{p}.to_k", a.to_k, s, task), a.heads))
            v = self.heads(self.linear_with_moe(f"{p}.to_v", a.to_v, s, task), a.heads)
            out = self.attend(q, k, v, rot)
            m = hs.shape[1]
            hs = hs + gate[:, None] * blk.proj_out(torch.cat([out[:, :m], blk.act_mlp(blk.proj_mlp(nh))], 2))
            c = c + c_gate[:, None] * blk.proj_out(torch.cat([out[:, m:], blk.act_mlp(blk.proj_mlp(nc))], 2))
        out = tr.proj_out(tr.norm_out(hs[:, tt:], temb))
        return unpack(out, h, w)


# --- fixtures ----------------------------------------------------------------------------------------


def tiny_dev_transformer(seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**TINY_DEV)
    with torch.no_grad():  # diffusers zero-initialises some output layers; make every path non-trivial
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.02)
    return model.eval()


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def x2c(comfy, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("x2edit_condition")
    transformer = tiny_dev_transformer()
    path = folder / "tiny_dev_diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, str(path))
    unet = comfy.add_file("diffusion_models", "x2c_tiny_dev_diffusers.safetensors", path)
    lora_dir = lora_files.write_x2edit_dir(
        comfy.loras_dir / "x2c_tiny_x2edit", hidden=64, num_double=2, num_single=2, experts=3, rank=4, std=0.1
    )
    loaded = load_adapters(str(lora_dir / "lora.safetensors"))
    assert any(a.apply == APPLY_OUTPUT for a in loaded.moe)
    reference = Reference(transformer, [a for a in loaded.moe], loaded.task_embedding)
    data = {
        "x": randn(2, 16, LATENT_H, LATENT_W, seed=1),
        "cond": randn(2, 16, LATENT_H, LATENT_W, seed=2),
        "cond_other": randn(2, 16, LATENT_H, LATENT_W, seed=3),
        "timestep": torch.tensor([0.75, 0.4]),
        "context": randn(2, TEXT_TOKENS, 32, seed=4),
        "y": randn(2, 16, seed=5),
        "guidance": torch.tensor([3.5, 3.5]),
    }
    sel = {"b2": slice(0, 2), "b0": slice(0, 1), "b1": slice(1, 2)}
    for name, s in sel.items():
        forward = {k: data[k][s] for k in ("x", "timestep", "context", "y", "guidance")}
        save_file(forward, str(comfy.input_dir / f"x2c_forward_{name}.safetensors"))
        for cond in ("cond", "cond_other"):
            save_file(
                {"latent": data[cond][s].contiguous()},
                str(comfy.input_dir / f"x2c_{cond}_{name}.safetensors"),
            )
    yield {"unet": unet, "lora": "x2c_tiny_x2edit/lora.safetensors", "reference": reference, "data": data}
    torch.set_num_threads(threads)


def base_nodes(x2c, weight_dtype="default"):
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": x2c["unet"], "weight_dtype": weight_dtype}},
        "2": {
            "class_type": "X2EditMoELoRALoader",
            "inputs": {
                "model": ["1", 0],
                "lora_name": x2c["lora"],
                "strength": 1.0,
                "routing": "native",
                "expert_index": 0,
                "expert_weights": "",
            },
        },
    }


def add_forward(
    prompt, node, model, batch, cond="cond", rounding=False, task=TASK, offset=OFFSET, call="module"
):
    """Condition stream on `model` over the saved `cond` latent, then one saved forward on `batch`
    (`call`: how the support node calls the diffusion model's wrappers)."""
    prompt[f"{node}0"] = {
        "class_type": "X2EditTestLoadTensors",
        "inputs": {"filename": f"x2c_{cond}_{batch}.safetensors"},
    }
    prompt[f"{node}1"] = {
        "class_type": "X2EditConditionStream",
        "inputs": {
            "model": model,
            "source": [f"{node}0", 1],
            "offset": offset,
            "reference_rounding": rounding,
        },
    }
    prompt[f"{node}2"] = {
        "class_type": "X2EditTestModelForward",
        "inputs": {
            "model": [f"{node}1", 0],
            "filename": f"x2c_forward_{batch}.safetensors",
            "task": task,
            "filename_prefix": f"x2c/{node}",
            "call": call,
        },
    }


def forward_outputs(comfy, prompt, nodes):
    entry = comfy.run(prompt)
    return {
        n: load_file(comfy.output_files(entry, node_id=f"{n}2", kind="tensors")[0])["output"] for n in nodes
    }


def ref_call(x2c, s=slice(0, 2), cond="cond", **kw):
    d = x2c["data"]
    return x2c["reference"](
        d["x"][s], d[cond][s], d["timestep"][s], d["context"][s], d["y"][s], d["guidance"][s], TASK, **kw
    )


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def forwards(comfy, x2c):
    prompt = base_nodes(x2c)
    add_forward(prompt, "10", ["2", 0], "b2")
    add_forward(prompt, "11", ["2", 0], "b0")
    add_forward(prompt, "12", ["2", 0], "b1")
    add_forward(prompt, "13", ["2", 0], "b2", cond="cond_other")
    add_forward(prompt, "14", ["2", 0], "b2", rounding=True)
    return forward_outputs(comfy, prompt, ["10", "11", "12", "13", "14"])


# --- tests -------------------------------------------------------------------------------------------


def test_forward_matches_the_reference(x2c, forwards):
    got = forwards["10"]
    want = ref_call(x2c)
    assert got.shape == want.shape == (2, 16, LATENT_H, LATENT_W)  # the condition tokens are not in it
    assert want.abs().max() > 0.1
    diff = max_diff(got, want)
    print(f"X2Edit forward, batch 2: max abs diff ComfyUI vs reference {diff:.3e}")
    assert diff <= TOLERANCE


def test_condition_tokens_see_timestep_zero_and_change_the_output(x2c, forwards):
    got = forwards["10"]
    at_t = max_diff(got, ref_call(x2c, cond_at_t=True))
    other = max_diff(got, forwards["13"])
    other_ref = max_diff(forwards["13"], ref_call(x2c, cond="cond_other"))
    print(f"condition at timestep t instead of 0 differs by {at_t:.3e}; another source by {other:.3e}")
    print(f"another source: max abs diff ComfyUI vs reference {other_ref:.3e}")
    assert at_t > 10 * TOLERANCE
    assert other > 100 * TOLERANCE
    assert other_ref <= TOLERANCE


def test_batch_of_two_equals_two_batches_of_one(forwards):
    diff = max_diff(forwards["10"], torch.cat([forwards["11"], forwards["12"]]))
    print(f"batch of 2 vs two batches of 1: max abs diff {diff:.3e}")
    assert diff <= 1e-5


def test_reference_rounding_switch(x2c, forwards):
    got = forwards["14"]
    diff = max_diff(got, ref_call(x2c, rounding=True))
    effect = max_diff(got, forwards["10"])
    print(
        f"bf16 timestep rounding: max abs diff ComfyUI vs reference {diff:.3e}; "
        f"it changes the output by {effect:.3e}"
    )
    assert diff <= TOLERANCE
    assert effect > 10 * TOLERANCE


def test_wrappers_take_transformer_options_by_keyword_or_refuse_a_call_without(comfy, x2c, forwards):
    """Samplers pass transformer_options to the wrappers by position; a release passing it by keyword
    gives the same output, and a call without it is refused (no silent plain forward)."""
    prompt = base_nodes(x2c)
    add_forward(prompt, "20", ["2", 0], "b2", call="keyword")
    got = forward_outputs(comfy, prompt, ["20"])["20"]
    diff = max_diff(got, forwards["10"])
    print(f"transformer_options by keyword vs by position: max abs diff {diff:.3e}")
    assert diff == 0.0

    prompt = base_nodes(x2c)
    add_forward(prompt, "21", ["2", 0], "b2", call="no options")
    with pytest.raises(ComfyExecutionError, match="called without its transformer_options"):
        comfy.run(prompt)


def flux_sigmas(steps, width, height, base_shift=0.5, max_shift=1.15):
    """FLUX.1-dev's schedule at this size: mu from the token count, time-shifted linear steps."""
    mu = base_shift + (max_shift - base_shift) / (4096 - 256) * (width * height / 256 - 256)
    ts = [1 - i / steps for i in range(steps)]
    return [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in ts] + [0.0]


SEED, STEPS = 7, 4


def sample_prompt(comfy, x2c, weight_dtype="default"):
    """Loader, router, condition stream, ModelSamplingFlux, FluxGuidance, KSampler (euler); latent saved."""
    d = x2c["data"]
    seed, steps, width, height = SEED, STEPS, LATENT_W * 8, LATENT_H * 8
    save_file(
        {"cond": d["context"][:1].contiguous(), "pooled": d["y"][:1].contiguous()},
        str(comfy.input_dir / "x2c_text.safetensors"),
    )
    prompt = base_nodes(x2c, weight_dtype)
    prompt.update(
        {
            "3": {
                "class_type": "X2EditTaskRouter",
                "inputs": {"model": ["2", 0], "instruction": "", "mode": "color_change"},
            },
            "4": {"class_type": "X2EditTestLoadTensors", "inputs": {"filename": "x2c_cond_b2.safetensors"}},
            "5": {
                "class_type": "X2EditConditionStream",
                "inputs": {
                    "model": ["3", 0],
                    "source": ["4", 1],
                    "offset": OFFSET,
                    "reference_rounding": False,
                },
            },
            "6": {
                "class_type": "ModelSamplingFlux",
                "inputs": {
                    "model": ["5", 0],
                    "max_shift": 1.15,
                    "base_shift": 0.5,
                    "width": width,
                    "height": height,
                },
            },
            "7": {"class_type": "X2EditTestLoadConditioning", "inputs": {"filename": "x2c_text.safetensors"}},
            "8": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["7", 0], "guidance": 3.5}},
            "9": {
                "class_type": "KSampler",
                "inputs": {
                    "model": ["6", 0],
                    "seed": seed,
                    "steps": steps,
                    "cfg": 1.0,
                    "sampler_name": "euler",
                    "scheduler": "simple",
                    "positive": ["8", 0],
                    "negative": ["8", 0],
                    "latent_image": ["4", 1],
                    "denoise": 1.0,
                },
            },
            "20": {
                "class_type": "X2EditTestSaveTensors",
                "inputs": {"filename_prefix": "x2c/sample", "latent": ["9", 0]},
            },
        }
    )
    return prompt


def run_sample(comfy, prompt):
    entry = comfy.run(prompt)
    return load_file(comfy.output_files(entry, node_id="20", kind="tensors")[0])["latent"]


@pytest.fixture(scope="module")
def sampled(comfy, x2c):
    return run_sample(comfy, sample_prompt(comfy, x2c))


def test_four_step_sample_matches_the_reference_loop(x2c, sampled):
    d = x2c["data"]
    seed, steps, width, height = SEED, STEPS, LATENT_W * 8, LATENT_H * 8
    got = sampled

    generator = torch.manual_seed(seed)  # ComfyUI's noise for a seed
    x = torch.randn(d["cond"].shape, dtype=torch.float32, generator=generator)
    sigmas = flux_sigmas(steps, width, height)
    ref = x2c["reference"]
    context, pooled = d["context"][:1].expand(2, -1, -1), d["y"][:1].expand(2, -1)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = ref(x, d["cond"], torch.full((2,), s), context, pooled, torch.full((2,), 3.5), TASK)
        x = x + (s_next - s) * v
    want = x / FLUX_SCALE + FLUX_SHIFT  # back to the VAE's latent space, as the sampler returns it
    diff = max_diff(got, want)
    print(f"4-step euler sample, batch 2: max abs diff ComfyUI vs reference loop {diff:.3e}")
    assert got.shape == want.shape
    assert diff <= TOLERANCE


def test_fp8_base_samples_close_to_fp32(comfy, x2c, sampled):
    """fp8 weights (cast per layer while sampling) run the stream; the result stays near the fp32 one."""
    got = run_sample(comfy, sample_prompt(comfy, x2c, weight_dtype="fp8_e4m3fn"))
    diff = max_diff(got, sampled)
    print(
        f"fp8 base vs fp32 base, 4-step sample: max abs diff {diff:.3e} "
        f"(latent max {sampled.abs().max():.2f})"
    )
    assert torch.isfinite(got).all()
    assert 0 < diff < 0.25 * sampled.abs().max()


def test_early_filter_runs_on_the_condition_stream(comfy, x2c):
    """The early filter samples the conditioned model in candidate batches; its winner is the plain
    KSampler run from the winning seed."""
    prompt = sample_prompt(comfy, x2c)
    prompt["4"]["inputs"]["filename"] = "x2c_cond_b0.safetensors"
    prompt.update(
        {
            "30": {"class_type": "VAELoader", "inputs": {"vae_name": comfy.models["vae"]}},
            "31": {
                "class_type": "X2EditTestNoiseImage",
                "inputs": {"width": LATENT_W * 8, "height": LATENT_H * 8, "batch_size": 1, "seed": 1},
            },
            "32": {"class_type": "X2EditTestScriptedJudge", "inputs": {"prefer": "brighter"}},
            "33": {
                "class_type": "X2EditEarlyFilter",
                "inputs": {
                    "model": ["6", 0],
                    "positive": ["8", 0],
                    "negative": ["8", 0],
                    "latent": ["4", 1],
                    "vae": ["30", 0],
                    "source_image": ["31", 0],
                    "instruction": "make it red",
                    "judge": ["32", 0],
                    "candidates": 3,
                    "early_steps": 2,
                    "total_steps": STEPS,
                    "cfg": 1.0,
                    "sampler_name": "euler",
                    "scheduler": "simple",
                    "seed": 10,
                    "mode": "paper",
                    "batch_size": 2,
                    "judge_view": "whole",
                },
            },
            "34": {
                "class_type": "X2EditTestSaveTensors",
                "inputs": {"filename_prefix": "x2c/filter", "latent": ["33", 2]},
            },
        }
    )
    prompt["9"]["inputs"]["seed"] = ["33", 0]
    entry = comfy.run(prompt, timeout=300)
    winner = load_file(comfy.output_files(entry, node_id="34", kind="tensors")[0])["latent"]
    plain = load_file(comfy.output_files(entry, node_id="20", kind="tensors")[0])["latent"]
    diff = max_diff(winner, plain)
    print(f"early filter winner vs plain run from its seed: max abs diff {diff:.3e}")
    assert diff <= 1e-5


def test_size_mismatch_and_wrong_model_are_refused(comfy, x2c):
    prompt = base_nodes(x2c)
    add_forward(prompt, "10", ["2", 0], "b2")
    save_file({"latent": torch.zeros(1, 16, 4, 4)}, str(comfy.input_dir / "x2c_cond_small.safetensors"))
    prompt["100"]["inputs"]["filename"] = "x2c_cond_small.safetensors"
    with pytest.raises(ComfyExecutionError, match="X2Edit generates at the source's size"):
        comfy.run(prompt)

    prompt = {
        "1": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": comfy.models["fill"], "weight_dtype": "default"},
        },
    }
    add_forward(prompt, "10", ["1", 0], "b2")
    with pytest.raises(ComfyExecutionError, match="16 latent channels"):
        comfy.run(prompt)


# --- the shipped workflow, through x2edit-run ---------------------------------------------------------


@pytest.fixture(scope="module")
def workflow_models(comfy):
    """Tiny stand-ins for every model of workflows/x2edit_edit.json: FLUX dev, VAE, an X2Edit folder with
    its AlignNet, and a Qwen2.5-VL text encoder in ComfyUI's layout."""
    from lora_files import alignnet_state_dict
    from qwen_text_fixtures import build_tiny_qwen25vl, comfy_state_dict

    folder = comfy.loras_dir / "x2c_wf"
    lora_files.write_x2edit_dir(
        folder, with_alignnet=False, hidden=64, num_double=2, num_single=2, experts=3, rank=4, std=0.1
    )
    torch.save(
        alignnet_state_dict(num_states=4, in_dim=128, out_dim=32, pooled_dim=16, seed=3),
        str(folder / "diffusion_pytorch_model.bin"),
    )
    comfy.add_file(
        "text_encoders", "x2c_tiny_qwen25vl.safetensors", comfy_state_dict(build_tiny_qwen25vl(seed=2))
    )
    return [
        "--model",
        f"unet={comfy.models['dev']}",
        "--model",
        f"vae={comfy.models['vae']}",
        "--model",
        "lora=x2c_wf/lora.safetensors",
        "--set",
        "CLIPLoader.clip_name=x2c_tiny_qwen25vl.safetensors",
        "--set",
        "X2EditTextEncode.alignnet=x2c_wf/diffusion_pytorch_model.bin",
        "--set",
        "KSampler.steps=2",
    ]


@pytest.mark.parametrize("mode", ["keep aspect", "512 centre crop"])
def test_x2edit_edit_workflow_runs_through_x2edit_run(comfy, workflow_models, tmp_path, capsys, mode):
    from PIL import Image

    from x2edit_core.run import cli as run_cli

    source = tmp_path / "source.png"
    pixels = (torch.rand((50, 77, 3), generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    Image.fromarray(pixels.numpy()).save(source)
    output = tmp_path / "edited.png"
    workflow = str(Path(__file__).resolve().parents[2] / "workflows" / "x2edit_edit.json")
    args = [workflow, "--url", comfy.url, "--image", str(source), "--instruction", "make the car red"]
    args += ["--output", str(output), "--seed", "3", *workflow_models]
    args += ["--set", f"X2EditPrepareSource.mode={mode}", "--set", "X2EditPrepareSource.size=256"]
    code = run_cli.main(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == str(output)
    with Image.open(output) as result:
        assert result.size == (77, 50)  # back at the source's size (the crop pasted into the source)
    assert "step 2/2" in err
    assert "Chosen task: color_change" in err
