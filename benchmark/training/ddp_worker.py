"""Entry of one rank of a distributed cell: `python -m benchmark.training.ddp_worker <cell.json>`.

Started by `torch.distributed.run` (see `benchmark.training.distributed.launch_cell`), never by
hand. The JSON file holds the resolved cell config, its `CellOptions` and the path of the
outcome file, which each node's local rank 0 writes: `{"status": "finished", "result": ...}`,
or the status `interrupted` / `config` / `training` / `write` / `failed` with the message
(`cannot_resume` also with the checkpoint's path and why, for `checkpoint.CannotResume`).
"""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmark.errors import ConfigError, TrainingError, WriteError
from benchmark.record import signals


def run(spec_path: str) -> int:
    """Train the cell of `spec_path` as this rank; returns the process exit code."""
    from benchmark.training.checkpoint import CannotResume
    from benchmark.training.distributed import init_rank
    from benchmark.training.train import CellOptions, train_cell

    spec = json.loads(Path(spec_path).read_text())
    cfg, opts = spec["cfg"], CellOptions(**spec["opts"])
    signals.install()
    d, device = init_rank(str(cfg["runtime"]["device"]))
    cfg["runtime"]["device"] = device
    code, outcome = 0, {}
    try:
        result = train_cell(cfg, opts, d)
        outcome = {"status": "finished", "result": asdict(result)}
    except KeyboardInterrupt as exc:  # a signal, or another rank gone (RankLost)
        code, outcome = signals.exit_code(exc), _failure("interrupted", exc)
    except CannotResume as exc:  # the launcher raises it again (a grid then starts over)
        code = 2
        outcome = {**_failure("cannot_resume", exc), "path": str(exc.path), "why": exc.why}
        outcome["other_fix"] = exc.other_fix
    except (ConfigError, TrainingError, WriteError) as exc:
        kind = {ConfigError: "config", TrainingError: "training", WriteError: "write"}
        status = next(v for k, v in kind.items() if isinstance(exc, k))
        code, outcome = (2 if status == "config" else 1), _failure(status, exc)
    except Exception as exc:  # noqa: BLE001 - reported to the launching process, then exit 1
        traceback.print_exc()
        code, outcome = 1, _failure("failed", exc)
    if d.local_rank == 0:
        Path(spec["outcome"]).write_text(json.dumps(outcome))
    if code:
        print(f"rank {d.rank}: {outcome['message']}", file=sys.stderr, flush=True)
    return code


def _failure(status: str, exc: BaseException) -> dict[str, Any]:
    return {"status": status, "message": str(exc) or type(exc).__name__}


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
