"""The report folder: rendered aside, then swapped in, so the last good report survives.

A report takes seconds to minutes to render; deleting the previous one first meant that a
Ctrl-C, a crash or a full disk half-way left a few files of a 40-file report. `staging` renders
into a temporary folder inside the output folder and only at the end moves each generated entry
into place (one rename each); any failure removes the temporary folder, and the folders it had
to create, and leaves the previous report as it was.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from benchmark.errors import ConfigError
from benchmark.files import check_name, dir_size, disk_errors, size_text
from benchmark.record import signals

MARKER = ".flexbench-report"
# What a report writes at the top of its folder; anything else there is the user's and stays.
GENERATED = ("figures", "tables", "index.html", "report.md", MARKER)


def check_out(out: Path) -> None:
    """Refuse, before any work, an output folder the report could not (or must not) fill: a
    file, a name the file system cannot hold, or a folder whose `figures/`, `index.html`, ...
    were not written by `flexbench report` (they would be replaced)."""
    check_name(out.resolve().name, "report folder (--out)", out.resolve().parent)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and not (out / MARKER).exists():
        taken = [n for n in GENERATED if (out / n).exists()]
        if taken:
            raise ConfigError(
                f"--out {out} holds {', '.join(taken)}, not written by `flexbench report`; "
                f"pass a new or empty folder"
            )


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temporary folder inside `out` to render into; on success its entries replace the
    previous report's, on any failure (Ctrl-C, a full disk) it disappears."""
    made = _missing(out)
    tmp = out / f".report.tmp{os.getpid()}"
    fix = "make room there or pass --out on another disk; the previous report is unchanged"
    try:
        with disk_errors(out, fix, lambda: f"more than the {size_text(dir_size(tmp))} written"):
            tmp.mkdir(parents=True)
            (tmp / MARKER).write_text("written by `flexbench report`; safe to delete\n")
            yield tmp
            signals.check()  # a Ctrl-C swallowed on the way: no half-rendered report goes in
            _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:
            with suppress(OSError):
                folder.rmdir()
        raise


def _missing(out: Path) -> list[Path]:
    """`out` and those of its ancestors that do not exist yet, deepest first."""
    missing = []
    path = out.absolute()
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


def _swap_in(tmp: Path, out: Path) -> None:
    """Move the previous report's generated entries aside, the new ones in, then drop both
    the old ones and `tmp`: the folder holds a whole report but for the few renames."""
    new = list(tmp.iterdir())
    old = tmp / ".previous"
    old.mkdir()
    if (out / MARKER).exists():
        for name in GENERATED:
            if (out / name).exists():
                os.replace(out / name, old / name)
    for entry in new:
        os.replace(entry, out / entry.name)
    shutil.rmtree(tmp)


def relocate(paths: list[Path], tmp: Path, out: Path) -> list[Path]:
    """Paths rendered under `tmp` as they are after the swap, under `out`."""
    return [out / p.relative_to(tmp) for p in paths]
