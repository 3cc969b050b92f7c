"""IC prompt: exact training text and safe custom templates."""

import pytest

from x2edit_core.errors import ConfigError, X2EditError
from x2edit_core.prompt import (
    IC_PROMPT_TEMPLATE,
    EmptyInstructionError,
    TemplateError,
    build_ic_prompt,
    parse_template,
)

# ICEdit's training and official-inference prompt, word for word (River-Zhang/ICEdit; docs/reference.md).
ICEDIT_TRAINING_TEMPLATE = (
    "A diptych with two side-by-side images of the same scene. On the right, the scene is exactly the same "
    "as on the left but {instruction}"
)


def test_default_template_is_icedit_training_text():
    assert IC_PROMPT_TEMPLATE == ICEDIT_TRAINING_TEMPLATE
    assert "exactly" in IC_PROMPT_TEMPLATE
    assert not IC_PROMPT_TEMPLATE.endswith(".")


def test_default_prompt_exact():
    assert build_ic_prompt("make the car red") == (
        "A diptych with two side-by-side images of the same scene. On the right, the scene is exactly the "
        "same as on the left but make the car red"
    )


def test_instruction_only_stripped_not_rewritten():
    out = build_ic_prompt("  \n Make the car red.\t ")
    assert out.endswith(" but Make the car red.")
    assert build_ic_prompt("把背景换成海滩").endswith("but 把背景换成海滩")


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_instruction(bad):
    with pytest.raises(EmptyInstructionError, match="empty"):
        build_ic_prompt(bad)


def test_empty_instruction_is_x2edit_error():
    assert issubclass(EmptyInstructionError, X2EditError)
    assert issubclass(EmptyInstructionError, ValueError)
    assert issubclass(TemplateError, ConfigError)


def test_custom_template_with_subject():
    tpl = "A photo of {subject}, edited: {instruction}"
    assert build_ic_prompt("add a hat", tpl, subject=" the dog ") == "A photo of the dog, edited: add a hat"


def test_subject_missing_for_template_that_needs_it():
    with pytest.raises(TemplateError, match="subject"):
        build_ic_prompt("add a hat", "{subject}: {instruction}")


def test_subject_ignored_without_placeholder():
    assert build_ic_prompt("x", "do {instruction}", subject="dog") == "do x"


def test_escaped_braces_are_literal():
    assert build_ic_prompt("x", "{{json}} {instruction} }}") == "{json} x }"


def test_braces_in_instruction_are_not_interpreted():
    assert (
        build_ic_prompt("write {subject} on the sign", "do {instruction}") == "do write {subject} on the sign"
    )


@pytest.mark.parametrize(
    "template, message",
    [
        ("no placeholder here", "no \\{instruction\\}"),
        ("{instruction} and {foo}", "Unknown placeholder \\{foo\\}"),
        ("{instruction.__class__}", "Unknown placeholder"),
        ("{instruction[0]}", "Unknown placeholder"),
        ("{0}", "Unknown placeholder"),
        ("{}", "Unknown placeholder"),
        ("{instruction!r}", "Unknown placeholder"),
        ("{instruction", "Unbalanced '\\{'"),
        ("{ {instruction}", "Unbalanced '\\{'"),
        ("{instruction} }", "Unbalanced '\\}'"),
        ("} {instruction}", "Unbalanced '\\}'"),
    ],
)
def test_template_validation(template, message):
    with pytest.raises(TemplateError, match=message):
        build_ic_prompt("make it red", template)


def test_parse_template_parts():
    assert parse_template("a {instruction} b") == [("text", "a "), ("field", "instruction"), ("text", " b")]


def test_non_string_template():
    with pytest.raises(TemplateError):
        build_ic_prompt("x", None)  # type: ignore[arg-type]
