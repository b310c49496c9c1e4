"""Live progress of a grid run.

On a terminal: a block redrawn in place, one status line (cells done / failed / running /
pending, elapsed, ETA) and one line per worker (its cell and epoch); finished and failed cells
scroll above it. Elsewhere (CI, logs): one line per started, finished and failed cell and a
status line every minute.
ETA: seconds per unit of estimated training compute, learned from the cells finished in this
run (or from the epochs done so far), times the compute left, divided by the workers.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from benchmark.grid.spec import GridCell


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    def __init__(
        self,
        cells: dict[str, GridCell],
        run_keys: list[str],
        slots: int,
        stream: TextIO | None = None,
        tty: bool | None = None,
        status_every: float = 60.0,
    ) -> None:
        self.cells = cells
        self.keys = list(run_keys)
        self.slots = max(1, slots)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.status_every = status_every
        self.t0 = time.monotonic()
        self.last_status = self.t0
        self.last_draw = 0.0
        self.drawn = 0
        self.running: dict[str, dict[str, Any]] = {}  # where -> {key, epoch, val, t0}
        self.started: dict[str, float] = {}
        self.done: dict[str, float] = {}  # key -> seconds
        self.failed: dict[str, str] = {}
        self.results: dict[str, dict] = {}
        weights = [cells[k].gflops for k in self.keys]
        self.by_flops = all(w is not None and w > 0 for w in weights)

    # --- events --------------------------------------------------------------------------
    def handle(self, ev: tuple) -> None:
        kind = ev[0]
        if kind == "start":
            _, where, key = ev
            self.running[where] = {"key": key, "epoch": 0, "val": None, "t0": time.monotonic()}
            self.started[key] = time.monotonic()
            if not self.tty:
                self._line(f"start  {self._label(key)} on {where}")
        elif kind == "epoch":
            _, where, key, epoch, val, _loss = ev
            run = self.running.get(where)
            if run is None or run["key"] != key:
                run = self.running[where] = {"key": key, "t0": time.monotonic()}
            run["epoch"], run["val"] = epoch, val
        elif kind == "done":
            _, where, key, result = ev
            self._stop(where, key)
            secs = time.monotonic() - self.started.get(key, self.t0)
            self.done[key] = secs
            self.results[key] = result
            top1 = result.get("metrics", {}).get("test/top1_mean")
            acc = f" test top-1 mean {top1:.2f}%" if top1 is not None else ""
            self._line(f"done   {self._count()} {self._label(key)}{acc} ({fmt_s(secs)}, {where})")
        elif kind == "failed":
            _, where, key, reason = ev
            self._stop(where, key)
            self.failed[key] = reason
            self._line(f"FAILED {self._count()} {self._label(key)} ({where}): {reason}")
        self.render()

    def _stop(self, where: str, key: str) -> None:
        if where in self.running and self.running[where]["key"] == key:
            del self.running[where]
        else:
            for w, run in list(self.running.items()):
                if run["key"] == key:
                    del self.running[w]

    def _label(self, key: str) -> str:
        return self.cells[key].label if key in self.cells else key

    def _count(self) -> str:
        return f"[{len(self.done) + len(self.failed)}/{len(self.keys)}]"

    # --- ETA -----------------------------------------------------------------------------
    def _w(self, key: str) -> float:
        return float(self.cells[key].gflops) if self.by_flops else 1.0

    def _frac(self, run: dict[str, Any]) -> float:
        total = self.cells[run["key"]].total_epochs if run["key"] in self.cells else 0
        return min(1.0, run.get("epoch", 0) / total) if total else 0.0

    def eta(self) -> float | None:
        now = time.monotonic()
        work = sum(self._w(k) for k in self.done)
        secs = sum(self.done.values())
        if not work:  # nothing finished yet: learn from the epochs of running cells
            for run in self.running.values():
                f = self._frac(run)
                if f > 0:
                    work += self._w(run["key"]) * f
                    secs += now - run["t0"]
        if not work:
            return None
        rate = secs / work
        finished = set(self.done) | set(self.failed)
        active = {r["key"]: r for r in self.running.values()}
        left = 0.0
        for k in self.keys:
            if k in finished:
                continue
            left += self._w(k) * (1 - self._frac(active[k])) if k in active else self._w(k)
        n_left = len(self.keys) - len(finished)
        return left * rate / max(1, min(self.slots, n_left))

    def status(self) -> str:
        n_fin = len(self.done) + len(self.failed)
        pending = len(self.keys) - n_fin - len(self.running)
        elapsed = time.monotonic() - self.t0
        return (
            f"grid: {len(self.done)}/{len(self.keys)} done, {len(self.failed)} failed, "
            f"{len(self.running)} running, {max(0, pending)} pending | elapsed {fmt_s(elapsed)}"
            f" | ETA {fmt_s(self.eta())}"
        )

    # --- output --------------------------------------------------------------------------
    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def _line(self, text: str) -> None:
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()
        self.last_draw = 0.0

    def render(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.tty:
            if now - self.last_status >= self.status_every:
                self.last_status = now
                self._line(self.status())
            return
        if not force and now - self.last_draw < 0.5:
            return
        self.last_draw = now
        lines = [self.status()]
        for where in sorted(self.running):
            run = self.running[where]
            cell = self.cells.get(run["key"])
            total = cell.total_epochs if cell else 0
            val = f"  val top-1 mean {run['val']:.1f}%" if run.get("val") is not None else ""
            lines.append(
                f"  {where:14s} {self._label(run['key']):50s} epoch {run.get('epoch', 0)}/"
                f"{total or '?'}{val}  ({fmt_s(now - run['t0'])})"
            )
        self._clear()
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self.drawn = len(lines)

    def close(self) -> None:
        self._clear()
        self.stream.flush()
