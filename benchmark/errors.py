"""Errors a user can fix; the CLI prints them without a traceback."""


class ConfigError(ValueError):
    """Bad input detected before any work starts."""


class TrainingError(RuntimeError):
    """A cell failed during training (e.g. a non-finite loss)."""
