"""The errors a user can act on. The command line prints their message (no traceback) and
exits with status 2; library callers catch `DialogtuneError` once.

Each says what was wrong, where (file, line, field or config key) and what would be valid.
"""

from __future__ import annotations


class DialogtuneError(Exception):
    """Base: input, configuration or setup that dialogtune cannot use as it is."""


class ConfigError(DialogtuneError, ValueError):
    """A config key or flag with a bad or unknown value."""


class DataError(DialogtuneError, ValueError):
    """Data that cannot be read or used at all (one bad record is a Reject, not an error)."""


class ModelError(DialogtuneError, ValueError):
    """A model, tokenizer or chat template that cannot be loaded or used for the job."""


class RunError(DialogtuneError, RuntimeError):
    """A run directory, training set-up or export that cannot go ahead as asked."""


class TemplateError(DialogtuneError, ValueError):
    """A chat template that cannot render the job's messages or label them exactly."""


class StrictError(DataError):
    """Under `strict: true`, the first rejected record, named (file, line, reason)."""
