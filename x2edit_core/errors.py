"""Error types. Every message says what was wrong and what to do about it."""


class X2EditError(Exception):
    """Base class of all x2edit errors."""


class FormatError(X2EditError, ValueError):
    """A file or folder does not have the layout its format requires (or is corrupt)."""


class ModelMismatchError(X2EditError, ValueError):
    """A LoRA/MoE file does not fit the model it is applied to (other architecture or width)."""


class ConfigError(X2EditError, ValueError):
    """An option or a combination of options is invalid."""


class JudgeError(X2EditError):
    """Base class of the early-filter judge errors (x2edit_core.judges)."""


class JudgeConfigError(JudgeError, ValueError):
    """The judge is set up wrongly (prompt template, model folder, URL, API key variable):
    every comparison would fail the same way, so selection stops instead of counting it."""


class JudgeRequestError(JudgeConfigError):
    """A served judge refused the request (HTTP 4xx other than 429); retrying cannot help."""


class JudgeUnavailableError(JudgeError, RuntimeError):
    """The judge gave no usable reply after its retries (connection, timeout, 5xx/429, malformed
    reply); selection counts it and keeps the current best."""


class SelectionInterrupted(X2EditError):
    """The early-filter selection was asked to stop (its should_stop callback returned True)."""
