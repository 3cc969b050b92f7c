"""ICEdit's in-context (IC) prompt and safe custom prompt templates.

ICEdit trains and infers with one fixed sentence around the user's instruction (River-Zhang/ICEdit,
its training code and scripts/gradio_demo.py; docs/reference.md). The official ComfyUI node drops the
word "exactly", which no longer matches training; the default here is the training text word for
word, without a trailing period.

Instruction handling: the instruction is inserted as given, only stripped of leading/trailing
whitespace. Case and a trailing period are kept, because ICEdit concatenates the raw instruction
and any rewriting would change what the user asked for.

Templates are filled by a small parser, never by ``str.format``: a user template such as
``{instruction.__class__}`` must be an error, not attribute access. Placeholders are
``{instruction}`` (required) and ``{subject}`` (optional); ``{{`` and ``}}`` stand for literal braces.
"""

from __future__ import annotations

from .errors import ConfigError, X2EditError

IC_PROMPT_TEMPLATE = (
    "A diptych with two side-by-side images of the same scene. "
    "On the right, the scene is exactly the same as on the left but {instruction}"
)
"""ICEdit's training / official-inference prompt, word for word."""

PLACEHOLDERS = ("instruction", "subject")


class EmptyInstructionError(X2EditError, ValueError):
    """The edit instruction is empty or only whitespace."""


class TemplateError(ConfigError):
    """A custom prompt template is malformed."""


def parse_template(template: str) -> list[tuple[str, str]]:
    """Split a template into ``("text", literal)`` and ``("field", name)`` parts.

    Raises TemplateError for unbalanced braces, empty or unknown placeholders and a missing
    ``{instruction}``.
    """
    if not isinstance(template, str):
        raise TemplateError(f"The prompt template must be a string, got {type(template).__name__}.")
    parts: list[tuple[str, str]] = []
    literal: list[str] = []
    i, n = 0, len(template)
    while i < n:
        ch = template[i]
        if ch == "{":
            if template.startswith("{{", i):
                literal.append("{")
                i += 2
                continue
            end = template.find("}", i + 1)
            nested = template.find("{", i + 1)
            if end < 0 or (0 <= nested < end):
                raise TemplateError(
                    f"Unbalanced '{{' at character {i} of the prompt template. Close it with '}}' "
                    "or write '{{' for a literal brace."
                )
            name = template[i + 1 : end]
            if name not in PLACEHOLDERS:
                shown = "{" + name + "}"
                raise TemplateError(
                    f"Unknown placeholder {shown} in the prompt template. Allowed: "
                    + ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                    + " (write '{{' and '}}' for literal braces)."
                )
            if literal:
                parts.append(("text", "".join(literal)))
                literal = []
            parts.append(("field", name))
            i = end + 1
        elif ch == "}":
            if template.startswith("}}", i):
                literal.append("}")
                i += 2
                continue
            raise TemplateError(
                f"Unbalanced '}}' at character {i} of the prompt template. Remove it or write '}}}}' "
                "for a literal brace."
            )
        else:
            literal.append(ch)
            i += 1
    if literal:
        parts.append(("text", "".join(literal)))
    if ("field", "instruction") not in parts:
        raise TemplateError(
            "The prompt template has no {instruction} placeholder; add it where the edit instruction "
            "goes, e.g. '... but {instruction}'."
        )
    return parts


def validate_template(template: str) -> None:
    """Raise TemplateError if ``template`` is not a usable prompt template."""
    parse_template(template)


def build_ic_prompt(instruction: str, template: str = IC_PROMPT_TEMPLATE, subject: str | None = None) -> str:
    """Put ``instruction`` (stripped, otherwise unchanged) into ``template``.

    ``subject`` fills ``{subject}`` when the template has one (then it must be non-empty); it is
    ignored by templates without ``{subject}``, such as the default.
    """
    if not isinstance(instruction, str):
        raise EmptyInstructionError(f"The instruction must be text, got {type(instruction).__name__}.")
    text = instruction.strip()
    if not text:
        raise EmptyInstructionError(
            "The edit instruction is empty. Write what should change, e.g. 'make the car red'."
        )
    parts = parse_template(template)
    values = {"instruction": text}
    if ("field", "subject") in parts:
        subject_text = (subject or "").strip()
        if not subject_text:
            raise TemplateError(
                "The prompt template uses {subject} but no subject was given. Give a subject "
                "(e.g. 'the red car') or remove {subject} from the template."
            )
        values["subject"] = subject_text
    return "".join(values[value] if kind == "field" else value for kind, value in parts)
