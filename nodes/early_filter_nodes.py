"""Early-filter nodes: VLM judges (local folder or served API) and the early-filter sampler.

The judges are in x2edit_core.judges, the selection in x2edit_core.selection, the planning maths in
x2edit_core.early_filter and the ComfyUI sampling glue in nodes/early_filter.py.
"""

from __future__ import annotations

import copy
import os

import comfy.samplers
import folder_paths

from ..x2edit_core.early_filter import MODES, SEED_MODULUS, make_plan
from ..x2edit_core.errors import ConfigError, JudgeConfigError
from ..x2edit_core.judges import LocalVLMJudge, ServedJudge, check_served_judge_settings
from ..x2edit_core.selection import JUDGE_VIEWS, SELECTIONS
from . import search_aliases
from .comfy_v3 import io, ui
from .early_filter import run_early_filter, run_early_filter_advanced

try:  # ComfyUI's own NOISE object, so SamplerCustomAdvanced treats ours like RandomNoise's
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
except ImportError:  # pragma: no cover - very old ComfyUI
    Noise_RandomNoise = None

JudgeType = io.Custom("X2EDIT_JUDGE")

VLM_FOLDER_KEY = "x2edit_vlm"
VLM_SUBFOLDERS = ("vlm", "LLM")
NO_VLM_FOUND = "(no VLM folder found: put one in models/vlm or set folder_path)"
LOCAL_DTYPES = ("auto", "bfloat16", "float16", "float32")
LOCAL_DEVICES = ("auto", "cuda", "cpu")
PROMPT_TOOLTIP = (
    "Judge prompt override; must contain {instruction}. Leave empty for the paper's prompt (ICEdit Fig. "
    "13): which of two edits follows the instruction better, keeping the rest identical to the original."
)


def _register_vlm_folders() -> None:
    """models/vlm and models/LLM of ComfyUI's models dir and of every configured models base."""
    bases = {folder_paths.models_dir}
    for path in folder_paths.get_folder_paths("diffusion_models"):
        bases.add(os.path.dirname(os.path.normpath(path)))
    for base in sorted(bases):
        for sub in VLM_SUBFOLDERS:
            folder_paths.add_model_folder_path(VLM_FOLDER_KEY, os.path.join(base, sub))


_register_vlm_folders()


def _vlm_folders() -> dict[str, str]:
    """{name shown in the list: absolute folder} for model folders (with config.json), up to 2 deep."""
    found: dict[str, str] = {}
    for root in folder_paths.get_folder_paths(VLM_FOLDER_KEY):
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if not os.path.isdir(path):
                continue
            if os.path.isfile(os.path.join(path, "config.json")):
                found.setdefault(name, path)
                continue
            for inner in sorted(os.listdir(path)):  # e.g. Qwen/Qwen2.5-VL-7B-Instruct
                inner_path = os.path.join(path, inner)
                if os.path.isfile(os.path.join(inner_path, "config.json")):
                    found.setdefault(f"{name}/{inner}", inner_path)
    return found


def _selection_inputs() -> list:
    """The selection inputs both early-filter nodes share (optional, so older workflows still load)."""
    return [
        io.Combo.Input(
            "selection",
            options=list(SELECTIONS),
            default="pairwise",
            optional=True,
            tooltip="pairwise: the paper's running winner over all M candidates (M - 1 comparisons). "
            "adaptive: each candidate is scored on its own (SC/PQ, overall 0-10) as soon as it is drawn, "
            "and no more candidates are drawn once one reaches the threshold; M is the cap. The report "
            "gives the NFE spent.",
        ),
        io.Float.Input(
            "threshold",
            default=8.0,
            min=0.0,
            max=10.0,
            step=0.1,
            round=0.01,
            optional=True,
            tooltip="adaptive: stop drawing candidates once one's overall score (sqrt(SC*PQ), 0-10) is at "
            "least this. 10 draws all M unless one is perfect; the best-scored candidate drawn wins.",
        ),
    ]


def _judging_inputs(judge_view_default: str) -> list:
    return [
        io.Combo.Input(
            "judge_view",
            options=list(JUDGE_VIEWS),
            default=judge_view_default,
            tooltip="What the judge sees of each candidate: the right panel of the diptych (the edit) or "
            "the whole canvas.",
        ),
        io.Boolean.Input(
            "swap_check",
            default=False,
            optional=True,
            tooltip="pairwise: ask every pair twice in swapped order; the challenger must win both (cancels "
            "a judge's position bias, doubles the judge calls).",
        ),
        io.Float.Input(
            "judge_deadline",
            default=600.0,
            min=1.0,
            max=86400.0,
            step=1.0,
            optional=True,
            tooltip="Seconds for all judging together: every judge call and every retry. Calls not yet "
            "asked when it passes are skipped (a warning); if nothing was judged the filter stops with an "
            "error.",
        ),
        io.Boolean.Input(
            "keep_first_if_judge_fails",
            default=False,
            optional=True,
            tooltip="Off (default): when the judge gives no usable answer at all, or its first call cannot "
            "connect, the filter stops with an error. On: keep the first candidate (the plain run of the "
            "seed) unjudged, with a warning in the log and the report.",
        ),
    ]


def _prompt_override(prompt: str) -> str | None:
    return prompt if prompt and prompt.strip() else None


class X2EditLocalVLMJudge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        folders = list(_vlm_folders()) or [NO_VLM_FOUND]
        return io.Schema(
            node_id="X2EditLocalVLMJudge",
            display_name="X2Edit Local VLM Judge",
            category="x2edit/early-filter",
            description="A transformers VLM (Qwen2-VL / Qwen2.5-VL family, others through "
            "AutoModelForImageTextToText) that compares two edits for the early filter. Loaded only when "
            "the filter judges and released right after, so the diffusion model gets its memory back.",
            inputs=[
                io.Combo.Input(
                    "folder",
                    options=folders,
                    tooltip="A model folder (config.json, *.safetensors, tokenizer and processor files) "
                    "under models/vlm or models/LLM.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=list(LOCAL_DTYPES),
                    default="auto",
                    tooltip="Weights dtype. auto: bfloat16 on a GPU that supports it, else float16 on GPU, "
                    "float32 on CPU.",
                ),
                io.Combo.Input(
                    "device",
                    options=list(LOCAL_DEVICES),
                    default="auto",
                    tooltip="Where the judge runs. auto: the GPU when there is one. On the GPU, diffusion "
                    "models are unloaded first to make room.",
                ),
                io.Int.Input(
                    "max_new_tokens",
                    default=128,
                    min=1,
                    max=4096,
                    tooltip="Longest answer the judge may write (the choice plus a short reason).",
                ),
                io.Int.Input(
                    "max_image_side",
                    default=1024,
                    min=0,
                    max=8192,
                    step=8,
                    tooltip="Images are shrunk so their longer side is at most this (0: full size). "
                    "Smaller is faster and needs less memory.",
                ),
                io.String.Input(
                    "folder_path",
                    default="",
                    optional=True,
                    tooltip="Absolute path of a model folder; when set it is used instead of the list.",
                ),
                io.String.Input("prompt", default="", multiline=True, optional=True, tooltip=PROMPT_TOOLTIP),
            ],
            outputs=[JudgeType.Output(display_name="judge", tooltip="The judge, for X2Edit Early Filter.")],
        )

    @classmethod
    def validate_inputs(cls, folder=None, folder_path=""):
        # At queue time, before the diffusion model loads; a linked input arrives as None (unknown yet).
        if folder_path is None:
            return True
        if folder_path.strip():
            path = folder_path.strip()
            return True if os.path.isdir(path) else f"folder_path {path!r} is not a folder"
        if isinstance(folder, str) and folder not in _vlm_folders():
            return (
                f"VLM folder {folder!r} is not under models/vlm or models/LLM "
                f"(searched: {', '.join(folder_paths.get_folder_paths(VLM_FOLDER_KEY))}): put the model "
                "folder there and refresh, or set folder_path."
            )
        return True

    @classmethod
    def execute(
        cls, folder, dtype, device, max_new_tokens, max_image_side, folder_path="", prompt=""
    ) -> io.NodeOutput:
        path = (folder_path or "").strip()
        if not path:
            folders = _vlm_folders()
            if folder not in folders:
                raise JudgeConfigError(
                    f"VLM folder {folder!r} is not under models/vlm or models/LLM "
                    f"(searched: {', '.join(folder_paths.get_folder_paths(VLM_FOLDER_KEY))}): put the model "
                    "folder there and refresh, or set folder_path."
                )
            path = folders[folder]
        judge = LocalVLMJudge(
            path,
            dtype=dtype,
            device=device,
            max_new_tokens=max_new_tokens,
            max_image_side=max_image_side or None,
            prompt_template=_prompt_override(prompt),
        )
        return io.NodeOutput(judge)


class X2EditServedJudge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2EditServedJudge",
            display_name="X2Edit Served Judge",
            category="x2edit/early-filter",
            description="A VLM behind any OpenAI-compatible chat-completions API (vLLM, SGLang, llama.cpp, "
            "LM Studio, Ollama, hosted APIs) that compares two edits for the early filter. Images go "
            "inline; the API key is read from an environment variable and never stored in the workflow.",
            inputs=[
                io.String.Input(
                    "base_url",
                    default="http://127.0.0.1:8000/v1",
                    tooltip="API base URL (…/v1) or the full …/chat/completions URL.",
                ),
                io.String.Input(
                    "model",
                    default="Qwen/Qwen2.5-VL-72B-Instruct",
                    tooltip="Model name as the server lists it under /v1/models. The paper used "
                    "Qwen2.5-VL-72B; small (7B) judges often misjudge.",
                ),
                io.String.Input(
                    "api_key_env",
                    default="",
                    tooltip="NAME of the environment variable holding the API key, set before starting "
                    "ComfyUI; never the key itself. Empty: no key. Only variables the machine's owner "
                    "released are read: X2EDIT_<NAME>_API_KEY, or a variable listed for this host in "
                    "~/.config/x2edit/judges.json (path: $X2EDIT_JUDGES_CONFIG). Keys go only over https or "
                    "to 127.0.0.1 / ::1 / localhost, and never follow a redirect.",
                ),
                io.Float.Input(
                    "timeout",
                    default=120.0,
                    min=1.0,
                    max=3600.0,
                    step=1.0,
                    tooltip="Seconds to wait for one answer (the early filter's judge_deadline caps all "
                    "calls and retries together).",
                ),
                io.Int.Input(
                    "retries",
                    default=3,
                    min=0,
                    max=20,
                    tooltip="Retries after a timeout, connection error, HTTP 5xx or 429 (with backoff), "
                    "within the early filter's judge_deadline.",
                ),
                io.Int.Input(
                    "max_image_side",
                    default=1024,
                    min=0,
                    max=8192,
                    step=8,
                    tooltip="Images are shrunk so their longer side is at most this before sending "
                    "(0: full size).",
                ),
                io.String.Input("prompt", default="", multiline=True, optional=True, tooltip=PROMPT_TOOLTIP),
            ],
            outputs=[JudgeType.Output(display_name="judge", tooltip="The judge, for X2Edit Early Filter.")],
        )

    @classmethod
    def validate_inputs(cls, base_url=None, api_key_env=None):
        # At queue time, before any model loads: a refused URL or key variable (or an unset one) is an
        # error now. A linked input arrives as None (not known yet) and is checked when the node runs.
        if not isinstance(base_url, str) or api_key_env is None:
            return True
        try:
            check_served_judge_settings(base_url, api_key_env)
        except JudgeConfigError as error:
            return str(error)
        return True

    @classmethod
    def execute(
        cls, base_url, model, api_key_env, timeout, retries, max_image_side, prompt=""
    ) -> io.NodeOutput:
        judge = ServedJudge(
            base_url,
            model,
            api_key_env,
            timeout_s=timeout,
            max_retries=retries,
            max_image_side=max_image_side or None,
            prompt_template=_prompt_override(prompt),
        )
        return io.NodeOutput(judge)


class X2EditEarlyFilter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2EditEarlyFilter",
            display_name="X2Edit Early Filter",
            category="x2edit/early-filter",
            **search_aliases("ICEdit early filter", "inference-time scaling"),
            description="ICEdit's inference-time scaling: samples M noises for m early steps, lets a VLM "
            "judge keep the best early edit (pairwise, running winner) and finishes the winner with n "
            "steps. paper: the winner is re-run (NFE n + M*m); resume: it continues from step m "
            "(NFE M*m + n - m). adaptive selection scores candidates as they are drawn and stops at a "
            "threshold (M is then a cap).",
            inputs=[
                io.Model.Input("model", tooltip="The FLUX model (e.g. Fill with the ICEdit LoRA / MoE)."),
                io.Conditioning.Input(
                    "positive", tooltip="Positive conditioning (InpaintModelConditioning)."
                ),
                io.Conditioning.Input(
                    "negative", tooltip="Negative conditioning (InpaintModelConditioning)."
                ),
                io.Latent.Input(
                    "latent",
                    tooltip="The latent to edit, with its noise mask (InpaintModelConditioning's latent). "
                    "One image at a time.",
                ),
                io.Vae.Input("vae", tooltip="VAE that decodes the early results for the judge."),
                io.Image.Input(
                    "source_image",
                    tooltip="The original, unedited image the judge compares against (not the diptych).",
                ),
                io.String.Input(
                    "instruction",
                    multiline=True,
                    default="",
                    tooltip="The edit instruction as the judge should read it (plain, without the "
                    "in-context prompt).",
                ),
                JudgeType.Input(
                    "judge", tooltip="A judge from X2Edit Local VLM Judge or X2Edit Served Judge."
                ),
                io.Int.Input(
                    "candidates",
                    default=6,
                    min=1,
                    max=64,
                    tooltip="Number of noises M to try (the paper: 6). Candidate i uses seed + i.",
                ),
                io.Int.Input(
                    "early_steps",
                    default=10,
                    min=1,
                    max=10000,
                    tooltip="Steps m each candidate runs before judging (the paper: 10).",
                ),
                io.Int.Input(
                    "total_steps",
                    default=50,
                    min=1,
                    max=10000,
                    tooltip="Steps n of the final edit (the paper: 50).",
                ),
                io.Float.Input(
                    "cfg",
                    default=1.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance; 1.0 for FLUX (guidance is embedded).",
                ),
                io.Combo.Input(
                    "sampler_name",
                    options=comfy.samplers.KSampler.SAMPLERS,
                    default="euler",
                    tooltip="Sampler; resume mode matches a plain run exactly with single-step samplers "
                    "such as euler.",
                ),
                io.Combo.Input(
                    "scheduler",
                    options=comfy.samplers.KSampler.SCHEDULERS,
                    default="simple",
                    tooltip="Scheduler that computes the sigmas (as KSampler).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=SEED_MODULUS - 1,
                    control_after_generate=True,
                    tooltip="Seed of candidate 0; candidate i uses seed + i.",
                ),
                io.Combo.Input(
                    "mode",
                    options=list(MODES),
                    default="paper",
                    tooltip="paper: candidates run their own m-step schedule, the winner is re-run for n "
                    "steps (NFE n + M*m). resume: candidates run the first m of n steps, judged on the "
                    "predicted final image, and the winner continues (NFE M*m + n - m).",
                ),
                io.Int.Input(
                    "batch_size",
                    default=2,
                    min=1,
                    max=64,
                    tooltip="Candidates sent through the model together. Larger is faster on a GPU with "
                    "room; 1 runs them one by one.",
                ),
                io.Combo.Input(
                    "judge_view",
                    options=list(JUDGE_VIEWS),
                    default="right_panel",
                    tooltip="What the judge sees of each candidate: the right panel of the diptych (the "
                    "edit) or the whole canvas.",
                ),
                io.Boolean.Input(
                    "swap_check",
                    default=False,
                    optional=True,
                    tooltip="Ask every pair twice in swapped order; the challenger must win both (cancels "
                    "a judge's position bias, doubles the judge calls).",
                ),
                io.Float.Input(
                    "judge_deadline",
                    default=600.0,
                    min=1.0,
                    max=86400.0,
                    step=1.0,
                    optional=True,
                    tooltip="Seconds for all judging together: every judge call and every retry. Calls not "
                    "yet asked when it passes are skipped (a warning); if nothing was judged the filter "
                    "stops with an error.",
                ),
                io.Boolean.Input(
                    "keep_first_if_judge_fails",
                    default=False,
                    optional=True,
                    tooltip="Off (default): when the judge gives no usable answer at all, or its first call "
                    "cannot connect, the filter stops with an error. On: keep the first candidate (the "
                    "plain run of the seed) unjudged, with a warning in the log and the report.",
                ),
                *_selection_inputs(),
            ],
            outputs=[
                io.Int.Output(
                    display_name="seed",
                    tooltip="The winning seed (plain KSampler with it gives the same edit).",
                ),
                io.Noise.Output(
                    display_name="noise", tooltip="Noise of the winning seed, for SamplerCustomAdvanced."
                ),
                io.Latent.Output(display_name="latent", tooltip="The winner's finished latent (n steps)."),
                io.Image.Output(
                    display_name="previews",
                    tooltip="Every candidate's early result as the judge saw it, before cropping, in seed "
                    "order (resume: the predicted final image at step m).",
                ),
                io.String.Output(
                    display_name="report", tooltip="Plan, NFE, every comparison with its reason, the winner."
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        positive,
        negative,
        latent,
        vae,
        source_image,
        instruction,
        judge,
        candidates,
        early_steps,
        total_steps,
        cfg,
        sampler_name,
        scheduler,
        seed,
        mode,
        batch_size,
        judge_view,
        swap_check=False,
        judge_deadline=600.0,
        keep_first_if_judge_fails=False,
        selection="pairwise",
        threshold=8.0,
    ) -> io.NodeOutput:
        plan = make_plan(mode, candidates, early_steps, total_steps, batch_size, seed)
        result = run_early_filter(
            plan,
            model=model,
            positive=positive,
            negative=negative,
            latent=latent,
            vae=vae,
            source_image=source_image,
            instruction=instruction,
            judge=judge,
            cfg=cfg,
            sampler_name=sampler_name,
            scheduler=scheduler,
            judge_view=judge_view,
            swap_check=bool(swap_check),
            judge_deadline_s=float(judge_deadline),
            keep_first_on_failure=bool(keep_first_if_judge_fails),
            selection=selection,
            threshold=float(threshold),
        )
        noise = Noise_RandomNoise(result.winner_seed) if Noise_RandomNoise is not None else None
        return io.NodeOutput(
            result.winner_seed,
            noise,
            result.winner_latent,
            result.previews,
            result.report,
            ui=ui.PreviewText(result.report),
        )


class X2EditEarlyFilterAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2EditEarlyFilterAdvanced",
            display_name="X2Edit Early Filter (Advanced)",
            category="x2edit/early-filter",
            **search_aliases("ICEdit early filter", "inference-time scaling", "custom sampler early filter"),
            description="The early filter in SamplerCustomAdvanced's style: any NOISE, GUIDER (CFG, basic, "
            "Kontext reference latents, ...), SAMPLER and SIGMAS. Candidate i uses the noise's seed + i. "
            "resume: candidates run the first m of the sigmas and the winner continues; paper: candidates "
            "run early_sigmas (a short schedule) and the winner runs the sigmas from the start.",
            inputs=[
                io.Noise.Input(
                    "noise", tooltip="Noise of candidate 0 (RandomNoise); candidate i uses seed + i."
                ),
                io.Guider.Input("guider", tooltip="Any guider: CFGGuider, BasicGuider, Kontext, ..."),
                io.Sampler.Input("sampler", tooltip="The sampler (KSamplerSelect or a custom one)."),
                io.Sigmas.Input("sigmas", tooltip="The full n-step schedule the winner runs."),
                io.Latent.Input(
                    "latent_image", tooltip="The latent to edit (with its noise mask, if any). One image."
                ),
                io.Vae.Input("vae", tooltip="VAE that decodes the early results for the judge."),
                io.Image.Input(
                    "source_image",
                    tooltip="The original, unedited image the judge compares against (not the diptych).",
                ),
                io.String.Input(
                    "instruction",
                    multiline=True,
                    default="",
                    tooltip="The edit instruction as the judge should read it (plain, without the "
                    "in-context prompt).",
                ),
                JudgeType.Input(
                    "judge", tooltip="A judge from X2Edit Local VLM Judge or X2Edit Served Judge."
                ),
                io.Int.Input(
                    "candidates",
                    default=6,
                    min=1,
                    max=64,
                    tooltip="Number of noises M to try (adaptive: the most to try).",
                ),
                io.Int.Input(
                    "early_steps",
                    default=10,
                    min=1,
                    max=10000,
                    tooltip="resume: steps m of the sigmas each candidate runs before judging. paper: must "
                    "equal the number of steps in early_sigmas.",
                ),
                io.Combo.Input(
                    "mode",
                    options=list(MODES),
                    default="resume",
                    tooltip="resume: candidates run the first m steps of the sigmas and the winner continues "
                    "(NFE M*m + n - m). paper: candidates run early_sigmas, the winner is re-run (n + M*m).",
                ),
                io.Int.Input(
                    "batch_size",
                    default=2,
                    min=1,
                    max=64,
                    tooltip="Candidates sent through the model together (adaptive: drawn together).",
                ),
                *_judging_inputs("right_panel"),
                *_selection_inputs(),
                io.Sigmas.Input(
                    "early_sigmas",
                    optional=True,
                    tooltip="paper mode: the candidates' own short schedule (e.g. BasicScheduler with m "
                    "steps).",
                ),
            ],
            outputs=[
                io.Int.Output(display_name="seed", tooltip="The winning seed."),
                io.Noise.Output(
                    display_name="noise", tooltip="The winning noise (the input noise, seed + i)."
                ),
                io.Latent.Output(display_name="output", tooltip="The winner's finished latent."),
                io.Image.Output(
                    display_name="previews",
                    tooltip="Every candidate drawn, as the judge saw it before cropping, in seed order.",
                ),
                io.String.Output(display_name="report", tooltip="Plan, NFE, every judgement, the winner."),
            ],
        )

    @classmethod
    def execute(
        cls,
        noise,
        guider,
        sampler,
        sigmas,
        latent_image,
        vae,
        source_image,
        instruction,
        judge,
        candidates,
        early_steps,
        mode,
        batch_size,
        judge_view,
        swap_check=False,
        judge_deadline=600.0,
        keep_first_if_judge_fails=False,
        selection="pairwise",
        threshold=8.0,
        early_sigmas=None,
    ) -> io.NodeOutput:
        seed = getattr(noise, "seed", None)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(
                "The early filter needs a seeded noise (RandomNoise) so that candidate i can use seed + i; "
                f"the connected noise ({type(noise).__name__}) has no integer seed, so it cannot vary."
            )
        total_steps = int(sigmas.shape[-1]) - 1
        if total_steps < 1:
            raise ConfigError("The sigmas hold no step: connect a schedule with at least one step.")
        if mode == "paper":
            if early_sigmas is None:
                raise ConfigError(
                    "paper mode runs each candidate on its own short schedule: connect early_sigmas (e.g. "
                    "BasicScheduler with m steps), or use resume mode."
                )
            if int(early_sigmas.shape[-1]) - 1 != early_steps:
                raise ConfigError(
                    f"early_sigmas has {int(early_sigmas.shape[-1]) - 1} step(s) but early_steps is "
                    f"{early_steps}: make them equal."
                )
        plan = make_plan(mode, candidates, early_steps, total_steps, batch_size, seed % SEED_MODULUS)
        result = run_early_filter_advanced(
            plan,
            noise=noise,
            guider=guider,
            sampler=sampler,
            sigmas=sigmas,
            early_sigmas=early_sigmas,
            latent=latent_image,
            vae=vae,
            source_image=source_image,
            instruction=instruction,
            judge=judge,
            judge_view=judge_view,
            swap_check=bool(swap_check),
            judge_deadline_s=float(judge_deadline),
            keep_first_on_failure=bool(keep_first_if_judge_fails),
            selection=selection,
            threshold=float(threshold),
        )
        winner_noise = copy.copy(noise)
        winner_noise.seed = result.winner_seed
        return io.NodeOutput(
            result.winner_seed,
            winner_noise,
            result.winner_latent,
            result.previews,
            result.report,
            ui=ui.PreviewText(result.report),
        )


NODES = [X2EditLocalVLMJudge, X2EditServedJudge, X2EditEarlyFilter, X2EditEarlyFilterAdvanced]
