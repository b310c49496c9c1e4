"""Every file flexbench writes: atomic writes, one clear line when the disk refuses, safe names.

`write_atomic` writes into a temporary file in the target's folder, fsyncs it and renames it
over the target, so a kill or a full disk leaves the old file or the new one, never half of one,
and the temporary file is removed on every failure path (Ctrl-C included). `disk_errors` turns an
operating-system refusal to write (a full disk, a quota, a read-only or foreign folder) into
`WriteError`: one line naming the file, the device it lives on, the space needed and free, and
the way out; torch reports a full disk as `RuntimeError: unexpected pos ...` with the `OSError`
only in its context, which is where it is found. `check_name` refuses experiment, study and grid
names that cannot be a folder name, before any work.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from benchmark.errors import ConfigError, WriteError

FULL = (errno.ENOSPC, errno.EDQUOT)
# What a file system answers to a write it refuses (others, e.g. a refused connection to an
# MLflow server, are not about the disk and pass through unchanged).
REFUSED = (*FULL, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENAMETOOLONG)
# Bytes flexbench adds around a name inside one path component (`report-<name>`, the temporary
# `.<name>.tmp<pid>` of `write_atomic`): a name may use the file system's limit less these.
AFFIX_BYTES = 32


def write_atomic(path: Path, write: Callable[[BinaryIO], object], fix: str) -> None:
    """Write `path` atomically through `write(file)`; `fix`: the way out a `WriteError` names.

    On a full disk the space needed is measured by running `write` again into a counter (only
    then: a checkpoint is not serialized twice on the normal path)."""
    tmp = path.with_name(f".{path.name[:200]}.tmp{os.getpid()}")
    with disk_errors(path, fix, need=lambda: _needs(write)):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise


def write_text(path: Path, text: str, fix: str) -> None:
    """`write_atomic` of a UTF-8 text."""
    data = text.encode()
    write_atomic(path, lambda fh: fh.write(data), fix)


@contextmanager
def disk_errors(path: Path, fix: str, need: Callable[[], str | None] = lambda: None) -> Iterator:
    """Turn an OSError raised while writing `path` (or found in the context of another error,
    as torch raises them) into `WriteError`; `need()`: what the write needs, e.g. `it needs
    12.3 MB`, if known."""
    try:
        yield
    except WriteError:
        raise
    except Exception as exc:
        os_error = _os_error(exc)
        if os_error is None:
            raise
        raise WriteError(_message(path, os_error, fix, need)) from None


def _os_error(exc: BaseException | None) -> OSError | None:
    """The refused write (OSError) `exc` is or was raised while handling (torch wraps it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in REFUSED:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _message(path: Path, exc: OSError, fix: str, need: Callable[[], str | None]) -> str:
    path = Path(exc.filename) if isinstance(exc.filename, str) else path
    where = Device(path.parent)
    if exc.errno in FULL:
        space = f"{size_text(shutil.disk_usage(where.mount).free)} free"
        needed = need()
        if needed is not None:
            space = f"{needed}, {space}"
        kind = "quota exceeded" if exc.errno == errno.EDQUOT else "no space left"
        return f"{kind} on {where} to write {path} ({space}); {fix}"
    return f"cannot write {path} on {where}: {exc.strerror}; {fix}"


def _needs(write: Callable[[BinaryIO], object]) -> str | None:
    """`it needs 12.3 MB`: the bytes `write` produces, counted without storing them."""

    class Counter:
        n = 0

        def write(self, data: bytes) -> int:
            self.n += len(data)
            return len(data)

        def flush(self) -> None:
            pass

    counter = Counter()
    try:
        write(counter)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - a writer that needs a real file: size unknown
        return None
    return f"it needs {size_text(counter.n)}"


class Device:
    """The file system holding a folder: its mount point and source (e.g. /dev/sda1)."""

    def __init__(self, folder: Path) -> None:
        p = existing_ancestor(folder).resolve()
        dev = p.stat().st_dev
        while p.parent != p and p.parent.stat().st_dev == dev:
            p = p.parent
        self.mount = p
        self.source = _mount_sources().get(str(p))

    def __str__(self) -> str:
        return f"{self.source} (mounted at {self.mount})" if self.source else f"{self.mount}"


def _mount_sources() -> dict[str, str]:
    """{mount point: source} from /proc/self/mounts (Linux); empty elsewhere."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        parts = line.split()
        if len(parts) >= 2:  # spaces in mount points are written as \040
            out[parts[1].encode().decode("unicode_escape")] = parts[0]
    return out


def existing_ancestor(path: Path) -> Path:
    """`path` or its nearest ancestor that exists (a folder flexbench has yet to create)."""
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def size_text(n: int) -> str:
    """Bytes as `12.3 MB` (kB, MB, GB: powers of 1000, as `df -H`)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def dir_size(folder: Path) -> int:
    """Bytes of the files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_name(name: str, what: str, folder: Path | str = ".") -> None:
    """Refuse a name that cannot be one folder name under `folder` (ConfigError): experiments,
    studies and grids become folders (`runtime.workdir/<experiment>/`, `report-<experiment>`).
    The limit is the file system's bytes per path component (NAME_MAX, 255 on most) less
    `AFFIX_BYTES`."""
    limit = _name_max(Path(folder)) - AFFIX_BYTES
    size = len(name.encode())
    if name not in ("", ".", "..") and "/" not in name and "\0" not in name and size <= limit:
        return
    shown = repr(name if len(name) <= 40 else name[:40] + "...")
    raise ConfigError(
        f"{what} {shown} ({size} bytes) cannot be a folder name: it must have 1 to {limit} "
        f"bytes (UTF-8), no '/' or NUL, and not be '.' or '..'; choose a shorter name"
    )


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(existing_ancestor(folder), "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255
