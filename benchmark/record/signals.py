"""Terminating signals end a command the way Ctrl-C does.

Schedulers, `docker stop` and `timeout` send SIGTERM; a closed terminal sends SIGHUP. Both are
turned into `Terminated`, a KeyboardInterrupt, so every handler of Ctrl-C (a cell's run becomes
`interrupted` with its checkpoint intact, a grid stops its workers, a study marks its trials)
handles them too. A command exits with 128 + the signal number: 130 (SIGINT), 143 (SIGTERM),
129 (SIGHUP), as a shell reports a process killed by that signal.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """A terminating signal (`signum`) arrived; handled like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


# signals arriving inside `deferred()` blocks, and the first signal of the command (`received`)
_held: dict[str, int | None] = {"depth": 0, "pending": None, "received": None}


def _raise_once(signum: int, frame: FrameType | None) -> None:
    """The first signal interrupts; later ones are ignored so that the cleanup it started
    (closing MLflow runs, stopping workers) is not itself interrupted. Inside a `deferred()`
    block the interruption waits for the block's end."""
    _held["received"] = _held["received"] or signum
    ignore_further()
    if _held["depth"]:
        _held["pending"] = signum
        return
    _interrupt(signum)


def ignore_further() -> None:
    """From now on ignore the handled signals and SIGINT (main thread only): an interruption is
    being cleaned up, e.g. another rank's loss (`RankLost`), which torchrun follows with SIGTERM
    to this rank a moment later; that signal must not cut the run's `interrupted` record."""
    if threading.current_thread() is threading.main_thread():
        for sig in (*HANDLED, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


def _interrupt(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold a handled signal until the block is done: a database write interrupted half-way
    leaves SQLite locked, so the run could not then be marked `interrupted`."""
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
        if not _held["depth"] and _held["pending"] is not None:
            signum, _held["pending"] = _held["pending"], None
            _interrupt(signum)


def _sigint(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C as Python handles it (every press interrupts), remembered: an interruption
    raised inside a finalizer or callback is printed and dropped by Python, and the command
    would then end as if it had finished (see `received`)."""
    _held["received"] = _held["received"] or signum
    raise KeyboardInterrupt


def install(include_sigint: bool = False) -> None:
    """Turn SIGTERM and SIGHUP (and SIGINT with `include_sigint`, for worker processes that
    get Ctrl-C twice: from the terminal and from their parent) into one interruption; without
    it, Ctrl-C keeps Python's behaviour and is only remembered. Only the main thread can
    install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    _held["received"] = None
    signal.signal(signal.SIGINT, _raise_once if include_sigint else _sigint)
    for sig in HANDLED:
        signal.signal(sig, _raise_once)


def received() -> int | None:
    """The first handled signal since `install` (None: none), even one whose interruption
    was swallowed on the way (raised inside a finalizer): a command checks it before it
    declares success or replaces a result."""
    return _held["received"]


def check() -> None:
    """Raise the interruption of a signal that arrived but was swallowed on the way."""
    if (signum := received()) is not None:
        _interrupt(signum)


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the number of the signal that interrupted (SIGINT for a plain Ctrl-C)."""
    return 128 + getattr(exc, "signum", signal.SIGINT)
