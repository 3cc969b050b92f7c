"""ICEdit-style in-context editing nodes: IC prompt, diptych and crop. The maths is in x2edit_core."""

from __future__ import annotations

from ..x2edit_core.diptych import DEFAULT_PANEL_WIDTH, MAX_PANEL_SIDE, crop_right_panel, make_diptych
from ..x2edit_core.prompt import IC_PROMPT_TEMPLATE, build_ic_prompt
from . import search_aliases
from .comfy_v3 import io

DiptychGeometryType = io.Custom("X2EDIT_DIPTYCH_GEOMETRY")


class X2EditICPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2EditICPrompt",
            display_name="X2Edit ICEdit Prompt",
            category="x2edit/in-context",
            **search_aliases("ICEdit", "in-context edit", "IC prompt"),
            description="Wraps an edit instruction in ICEdit's in-context diptych prompt (the training text, "
            "word for word) and encodes it with FLUX guidance.",
            inputs=[
                io.Clip.Input("clip", tooltip="The FLUX text encoders (CLIP-L + T5-XXL)."),
                io.String.Input(
                    "instruction",
                    multiline=True,
                    dynamic_prompts=True,
                    default="",
                    tooltip="What to change, e.g. 'make the car red'. Inserted as written (only outer "
                    "whitespace is stripped).",
                ),
                io.String.Input(
                    "template",
                    multiline=True,
                    dynamic_prompts=False,
                    default=IC_PROMPT_TEMPLATE,
                    tooltip="Prompt template. Must contain {instruction}; may contain {subject}. "
                    "Write {{ and }} for literal braces. The default is ICEdit's training prompt.",
                ),
                io.Float.Input(
                    "guidance",
                    default=50.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip="FLUX embedded guidance. ICEdit uses 50 with FLUX.1 Fill (and cfg 1).",
                ),
                io.String.Input(
                    "subject",
                    default="",
                    optional=True,
                    tooltip="Fills {subject} if the template has one; ignored otherwise.",
                ),
            ],
            outputs=[
                io.Conditioning.Output(
                    display_name="conditioning", tooltip="The encoded prompt with guidance set."
                ),
                io.String.Output(display_name="prompt", tooltip="The full prompt text that was encoded."),
            ],
        )

    @classmethod
    def execute(cls, clip, instruction, template, guidance, subject="") -> io.NodeOutput:
        prompt = build_ic_prompt(instruction, template, subject=subject or None)
        tokens = clip.tokenize(prompt)
        conditioning = clip.encode_from_tokens_scheduled(tokens, add_dict={"guidance": guidance})
        return io.NodeOutput(conditioning, prompt)


class X2EditDiptych(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2EditDiptych",
            display_name="X2Edit Diptych",
            category="x2edit/in-context",
            **search_aliases("ICEdit", "in-context edit"),
            description="Puts each source image on the left of a diptych (aspect kept, sides multiples of "
            "16) with a mask over the right half, for InpaintModelConditioning on a FLUX Fill model.",
            inputs=[
                io.Image.Input("image", tooltip="Source images (a batch of any size; RGB, RGBA or grey)."),
                io.Int.Input(
                    "panel_width",
                    default=DEFAULT_PANEL_WIDTH,
                    min=16,
                    max=MAX_PANEL_SIDE,
                    step=16,
                    tooltip="Width of each half. 512 is ICEdit's training width; the height follows the "
                    "aspect ratio, rounded to a multiple of 16.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="diptych", tooltip="Source on the left, black on the right."),
                io.Mask.Output(
                    display_name="mask", tooltip="1 on the right half (the part to generate), 0 on the left."
                ),
                DiptychGeometryType.Output(
                    display_name="geometry",
                    tooltip="Sizes needed by X2Edit Crop Diptych to restore the source size.",
                ),
            ],
        )

    @classmethod
    def execute(cls, image, panel_width) -> io.NodeOutput:
        diptych, mask, geometry = make_diptych(image, panel_width)
        return io.NodeOutput(diptych, mask, geometry)


class X2EditCropDiptych(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2EditCropDiptych",
            display_name="X2Edit Crop Diptych",
            category="x2edit/in-context",
            **search_aliases("ICEdit", "in-context edit"),
            description="Takes the right (edited) half of a decoded diptych and resizes it to the source's "
            "exact size.",
            inputs=[
                io.Image.Input("image", tooltip="The decoded diptych (VAE Decode output)."),
                DiptychGeometryType.Input(
                    "geometry", tooltip="The geometry output of the X2Edit Diptych node."
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="image", tooltip="The edited images at the source's width and height."
                ),
            ],
        )

    @classmethod
    def execute(cls, image, geometry) -> io.NodeOutput:
        return io.NodeOutput(crop_right_panel(image, geometry))


NODES = [X2EditICPrompt, X2EditDiptych, X2EditCropDiptych]
