"""Ray executor: the same cell function as Ray tasks on an existing cluster (`--ray-address`).

Each cell is one task with `num_gpus` / `num_cpus` resources; Ray places them on the nodes. A
cell of N devices (`devices_per_cell`) asks for N GPUs (or N x the CPUs of one device) and runs
its N ranks under `launch_cell` inside its task, on one node.
Progress events travel through a `ray.util.queue.Queue` actor. Tasks are not retried
(`max_retries=0`): a task whose worker dies is a failed cell, as with the local executor.
Every node must see the tracking URI (use an MLflow server beyond one machine), the dataset
paths and `runtime.workdir` (checkpoints) at the same paths. The driver's MLFLOW_* and
FLEXBENCH_* environment variables (e.g. MLflow credentials) are passed to the tasks through
Ray's runtime_env.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from benchmark.errors import ConfigError

Event = Callable[[tuple], None]
FORWARD_ENV = ("MLFLOW_", "FLEXBENCH_")


def _cell_task(task: dict[str, Any], queue: Any, cpus: float, gpus: float) -> dict:
    """Runs inside a Ray worker process (Ray sets CUDA_VISIBLE_DEVICES for num_gpus); `cpus`,
    `gpus`: the task's whole request (`RayExecutor.task_resources`). A cell of N devices runs
    its N ranks under `launch_cell` here, on the task's GPUs (or CPUs)."""
    import ray

    from benchmark.grid.worker import run_cell

    where = f"ray {ray.util.get_node_ip_address()} pid {os.getpid()}"
    n = task["devices"]
    device = ",".join(f"cuda:{i}" for i in range(n)) if gpus > 0 else "cpu"

    def emit(msg: tuple) -> None:
        queue.put_nowait((msg[0], where, *msg[1:]))

    emit(("start", task["key"]))
    return run_cell(task, device, max(1, int(cpus)), emit)


class RayExecutor:
    name = "ray"

    def __init__(
        self,
        address: str | None,
        cpus_per_cell: float | None,
        gpus_per_cell: float | None,
        devices_per_cell: int = 1,
    ) -> None:
        """`cpus_per_cell` / `gpus_per_cell`: one device's share (a cell of N devices asks N
        times as much, `task_resources`); `devices_per_cell`: the most any cell asks for."""
        address = address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise ConfigError(
                "--executor ray needs --ray-address (or RAY_ADDRESS) of a running cluster, "
                "e.g. start one with `ray start --head --port 6379` and pass 127.0.0.1:6379"
            )
        try:
            import ray  # noqa: F401
        except ImportError as exc:
            raise ConfigError("--executor ray needs Ray: pip install 'flexbench[ray]'") from exc
        self.address = address
        self.cpus = cpus_per_cell
        self.gpus = gpus_per_cell
        self.per_cell = devices_per_cell
        self._ray: Any = None

    def task_resources(self, n: int) -> dict[str, float]:
        """Ray resources of a cell of `n` devices: n x the CPUs of one, and n whole GPUs (one
        per rank) when the cells use GPUs, else none: `num_cpus` = n x threads on CPU."""
        gpus = float(n) if n > 1 and self.gpus else (self.gpus or 0.0)
        return {"num_cpus": n * (self.cpus or 1.0), "num_gpus": gpus}

    def check_reachable(self) -> None:
        """ray.init retries an unreachable address for minutes: fail fast on HOST:PORT."""
        host, sep, port = self.address.rpartition(":")
        if not sep or not port.isdigit() or "://" in self.address:
            return  # "auto", ray://...: left to Ray
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise ConfigError(
                f"cannot reach the Ray cluster at {self.address} ({exc}); is `ray start --head` "
                f"running there?"
            ) from exc

    def connect(self) -> None:
        import ray

        if not ray.is_initialized():
            self.check_reachable()
            # Tasks run in the cluster's worker processes, which do not inherit this shell:
            # MLflow credentials/settings and flexbench's cache folder travel with the job.
            env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV)}
            try:
                ray.init(
                    address=self.address,
                    log_to_driver=False,
                    logging_level="ERROR",
                    configure_logging=True,
                    runtime_env={"env_vars": env} if env else None,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                msg = f"cannot connect to the Ray cluster at {self.address}: {exc}"
                raise ConfigError(msg) from exc
        res = ray.cluster_resources()
        deadline = time.monotonic() + 30
        while not res.get("CPU") and time.monotonic() < deadline:  # a node still joining
            time.sleep(0.5)
            res = ray.cluster_resources()
        if self.gpus is None:
            self.gpus = 1.0 if res.get("GPU", 0) >= 1 else 0.0
        if self.cpus is None:
            cpus, gpus = res.get("CPU", 1), res.get("GPU", 0)
            self.cpus = float(max(1, int(cpus // gpus))) if self.gpus and gpus else 1.0
        need = self.task_resources(self.per_cell)
        if need["num_gpus"] > res.get("GPU", 0) or need["num_cpus"] > res.get("CPU", 0):
            raise ConfigError(
                f"a cell asks for {need['num_cpus']:g} CPU / {need['num_gpus']:g} GPU "
                f"(devices_per_cell {self.per_cell}) but the cluster has {res.get('CPU', 0):g} "
                f"CPU / {res.get('GPU', 0):g} GPU; set --cpus-per-cell / --gpus-per-cell "
                f"(per device) or a smaller devices_per_cell"
            )
        self._ray = ray

    def describe(self) -> str:
        res = self._ray.cluster_resources() if self._ray else {}
        nodes = len(self._ray.nodes()) if self._ray else 0
        return (
            f"ray executor: cluster {self.address} ({nodes} node(s), {res.get('CPU', 0):g} CPU, "
            f"{res.get('GPU', 0):g} GPU); {self.cpus:g} CPU / {self.gpus:g} GPU per cell"
        )

    def run(self, tasks: list[dict], emit: Event) -> None:
        if self._ray is None:
            self.connect()
        ray = self._ray
        from ray.util.queue import Empty, Queue

        queue = Queue()
        remote = ray.remote(_cell_task)
        refs = {}
        for t in tasks:
            need = self.task_resources(t["devices"])
            ref = remote.options(max_retries=0, **need).remote(
                t, queue, need["num_cpus"], need["num_gpus"]
            )
            refs[ref] = t
        where: dict[str, str] = {}

        def drain() -> list[tuple]:
            msgs = []
            while True:
                try:
                    msgs.append(queue.get_nowait())
                except Empty:
                    return msgs

        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
                msgs = drain()
                ended = {refs[r]["key"] for r in done}
                for msg in msgs:
                    if msg[0] == "start":
                        where[msg[2]] = msg[1]
                # the ended cells' own events, then their outcome, then the others' events
                # (a cell may have started on the worker an ended cell just freed)
                for msg in msgs:
                    if msg[2] in ended:
                        emit(msg)
                for ref in done:
                    task = refs.pop(ref)
                    at = where.get(task["key"], "ray")
                    try:
                        emit(("done", at, task["key"], ray.get(ref)))
                    except ray.exceptions.RayTaskError as exc:
                        cause = exc.cause if getattr(exc, "cause", None) else exc
                        emit(("failed", at, task["key"], f"{type(cause).__name__}: {cause}"))
                    except ray.exceptions.RayError as exc:  # worker crashed, node died, ...
                        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                        emit(("failed", at, task["key"], f"{type(exc).__name__}: {first}"))
                for msg in msgs:
                    if msg[2] not in ended:
                        emit(msg)
                emit(("tick",))
        except BaseException:
            for ref in refs:  # KeyboardInterrupt inside the task: its run becomes interrupted
                ray.cancel(ref, force=False)
            ray.wait(list(refs), num_returns=len(refs), timeout=20)
            raise
        finally:
            ray.shutdown()
            self._ray = None
