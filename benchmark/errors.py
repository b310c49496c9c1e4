"""Errors a user can fix; the CLI prints them without a traceback."""


class ConfigError(ValueError):
    """Bad input detected before any work starts."""


class TrainingError(RuntimeError):
    """A cell failed during training (e.g. a non-finite loss)."""


class WriteError(RuntimeError):
    """A file could not be written (a full disk, a quota, a read-only folder): the message names
    the file, its device, the space needed and the way out (see `benchmark.files`)."""


class IncompatibleError(ConfigError):
    """A method that cannot train an architecture (e.g. hsd needs re-rankable channels); a grid
    skips such a pair only when its file excludes it."""


class CellPruned(Exception):
    """Raised by an epoch callback to stop a cell early on purpose (a study's pruner); the run
    is then marked `pruned`, not failed."""


def got(value: object) -> str:
    """`got '5e-4' (str)`: the value a check received and its type, for every range error (a
    number that arrived as a string reads differently from the number itself)."""
    return f"got {value!r} ({type(value).__name__})"
