"""The exception types the library raises; the CLI renders each as one line."""


class ComposeError(Exception):
    """Base class of every error we raise on purpose: the message is the whole story."""


class RecipeError(ComposeError):
    """A recipe (or an override) that does not validate."""


class BaseSourceError(ComposeError):
    """A base that cannot be found, fetched, verified or loaded."""


class DataError(ComposeError):
    """Training or evaluation data that cannot be read or is empty."""


class CheckpointError(ComposeError):
    """A checkpoint or mixture directory that is missing, corrupt or does not match."""


class ResourceError(ComposeError):
    """A run that would not fit the machine."""


class OutputError(ComposeError):
    """An output location that cannot be written."""


class CacheError(ComposeError):
    """A feature cache that is missing, incomplete, corrupt or made for another recipe."""


class CompareError(ComposeError):
    """An A/B comparison that cannot run: an unknown side or suite, or an unbuilt recipe."""


class PortError(ComposeError):
    """A patch (carry-on or LoRA) that cannot be ported to, or merged into, a base."""


class TrainError(ComposeError):
    """A training setting that cannot work (e.g. more processes than examples per step)."""


class ServingError(ComposeError):
    """The server, the chat or the lm-eval model cannot start (e.g. its extra is missing)."""


def first_line(exc: BaseException, text: str | None = None) -> str:
    """The first line of an exception's message (or of `text`, that message cleaned up), or
    the exception's type name when it says nothing: a library's error in one line of ours."""
    text = (str(exc) if text is None else text).strip()
    return text.splitlines()[0] if text else type(exc).__name__
