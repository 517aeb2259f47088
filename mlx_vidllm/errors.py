"""Error types the CLI turns into one-line messages and distinct exit codes."""

from __future__ import annotations


class VidLLMError(Exception):
    """Base class: the message names the file or value and the problem."""

    exit_code = 1


class InputError(VidLLMError, ValueError):
    """A video or image the user gave cannot be used."""

    exit_code = 3


class ModelError(VidLLMError, ValueError):
    """A model folder, repo, config or checkpoint cannot be used."""

    exit_code = 4


class ConversionError(VidLLMError):
    """A conversion could not be completed; nothing was written."""

    exit_code = 5


class ContextLengthError(VidLLMError, ValueError):
    """Prompt plus visual tokens do not fit the model's context."""

    exit_code = 6


EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 unexpected error, 2 bad command-line usage, 3 unusable video/image, "
    "4 unusable model, 5 conversion failed, 6 prompt longer than the context, "
    "7 outside the parity tolerance (verify), 130 interrupted."
)
