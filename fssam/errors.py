"""The few exception types of fssam. Messages name the offending input and what was expected."""


class FSSAMError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero."""


class ConfigError(FSSAMError):
    """Unknown config name or an invalid option value."""


class CheckpointError(FSSAMError):
    """A checkpoint file that cannot be read or does not fit the model."""


class InputError(FSSAMError):
    """Bad images, masks or tensors given to the model or the CLI."""


class DataError(FSSAMError):
    """A data set folder or split list that is missing or malformed."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty): what a
    one-line report quotes of an error from a library."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
