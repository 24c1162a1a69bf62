"""User-facing errors: the CLI prints these as one line (no traceback unless --debug)."""


class MiaotuiError(Exception):
    """Base class for errors caused by user input (paths, files, prompts, flags)."""


class ModelLoadError(MiaotuiError):
    """A model path is missing, corrupt, truncated or of an unsupported architecture."""


class PromptTooLongError(MiaotuiError):
    """The prompt plus the requested new tokens does not fit the model's context."""
