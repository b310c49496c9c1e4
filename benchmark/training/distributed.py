"""One cell on several devices: torch's elastic launcher, DDP gradients, sharded evaluation.

`launch_cell` validates the cell in the calling process, then runs `torch.distributed.run`
(torchrun, `--max-restarts 0`) with `benchmark.training.ddp_worker` as each rank's entry; every
rank trains the cell (`train_cell(cfg, opts, dist)`), rank 0 alone writes MLflow, the checkpoint
and the result file the caller reads back. `Dist` is a rank's view of its process group: its
part of every batch (`shard`) and the few collectives the trainer and the evaluation call; its
single-process value `SINGLE` makes every collective a no-op, so one code path serves both.

Gradients: `DistributedDataParallel` over `Forwards` (the model's `forward_sub / forward_all /
forward_width` behind one `forward(mode, *args)`), `broadcast_buffers=False` as mmrazor's
BigNASDDP, `find_unused_parameters=True` (per-width BatchNorm and depth sub-nets leave parameters
unused in a forward); each sub-model's forward + backward is one DDP iteration, and every rank
draws the same sub-models (the step generator depends on seed, epoch and step only), so a
parameter unused on one rank is unused on all and keeps its gradient.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from benchmark import data as datasets
from benchmark.data.pipeline import Shard
from benchmark.errors import ConfigError, TrainingError, WriteError, got
from benchmark.methods import METHODS
from benchmark.record import schema, signals

if TYPE_CHECKING:
    from benchmark.training.final import CellResult
    from benchmark.training.train import CellOptions

BACKENDS = ("nccl", "gloo")  # torch.distributed backends a rank may be asked for (init_rank)
MODES = ("forward_sub", "forward_sub_features", "forward_all", "forward_all_features")


@dataclass(frozen=True)
class Dist:
    """A rank's place in its cell: rank, world size, the local device index (LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one rank that writes (MLflow, checkpoint, artifacts, result)."""
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return (self.rank, self.world)

    def sum_(self, t: Tensor) -> Tensor:
        """`t` summed over the ranks, in place (returned)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (picklable objects, e.g. CPU tensors)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (the others wait for it)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = Dist()


class Forwards(nn.Module):
    """The model's step forwards behind one `forward(mode, *args)`, for DDP to wrap."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, mode: str, *args: Any) -> Any:
        drawn = ("forward_width", "forward_subnet")
        if mode not in (*MODES, *drawn):
            raise ValueError(f"unknown forward {mode!r}; valid: {', '.join((*MODES, *drawn))}")
        return getattr(self.model, mode)(*args)


def ddp_forwards(model: nn.Module, d: Dist, device: torch.device) -> nn.Module | None:
    """`DistributedDataParallel(Forwards(model))` for world size > 1, else None."""
    if d.world == 1:
        return None
    ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():  # torch 2.14 deprecates broadcast_buffers, yet advises
        # keeping broadcast_buffers=False for rank-local buffers (BN per rank) until its
        # replacement can skip the sync at construction too
        warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
        return nn.parallel.DistributedDataParallel(
            Forwards(model), device_ids=ids, broadcast_buffers=False, find_unused_parameters=True
        )


def average_grads(params: Iterable[nn.Parameter], d: Dist) -> None:
    """Average over the ranks the gradients of parameters outside DDP (a method's own)."""
    grads = [p.grad for p in params if p.grad is not None]
    if d.world > 1 and grads:
        flat = d.sum_(torch.cat([g.reshape(-1) for g in grads])) / d.world
        for g, v in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(v.view_as(g))


def average_bn_buffers(model: nn.Module, d: Dist) -> None:
    """Average every BatchNorm running mean and variance over the ranks (timm's
    `distribute_bn(reduce=True)`), so that every rank and the checkpoint hold one network."""
    bufs = [b for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]
    if d.world > 1 and bufs:
        flat = d.sum_(torch.cat([b.reshape(-1).float() for b in bufs])) / d.world
        for b, v in zip(bufs, flat.split([b.numel() for b in bufs])):
            b.copy_(v.view_as(b))


class RankLost(KeyboardInterrupt):
    """Another rank of the cell stopped (killed, or its machine lost): this rank's collective
    failed. Handled like a terminating signal: the run becomes `interrupted`, the checkpoint
    stays, `--resume` continues it."""


# what gloo and NCCL raise when a peer is gone (plain RuntimeErrors, e.g. gloo's
# "pair.cc: Connection closed by peer")
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator")


@contextmanager
def peers_lost_interrupt(d: Dist) -> Iterator[None]:
    """Inside the block, a collective that fails because another rank is gone raises RankLost."""
    try:
        yield
    except (dist.DistError, RuntimeError) as exc:
        text = str(exc)
        if d.world > 1 and (isinstance(exc, dist.DistError) or any(s in text for s in _PEER_GONE)):
            signals.ignore_further()
            raise RankLost(
                f"another rank of the cell stopped ({text.splitlines()[0][:160]})"
            ) from exc
        raise


def init_rank(device_spec: str, backend: str | None = None) -> tuple[Dist, str]:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*): NCCL with
    cuda:LOCAL_RANK on CUDA, gloo on CPU; returns the rank's Dist and its device string.
    `backend` "gloo" on CUDA lets several ranks share a GPU (NCCL refuses two ranks on one
    device; gloo reduces CUDA tensors through the host): the rank runs on cuda:(LOCAL_RANK mod
    the device count), as scripts/gpu_check.py's one-GPU DDP check does. Raises ConfigError
    for a backend other than nccl or gloo."""
    if backend not in (None, *BACKENDS):
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, {got(backend)}")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    index = local % torch.cuda.device_count() if cuda and backend == "gloo" else local
    device = f"cuda:{index}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(index)
    default = "nccl" if cuda else "gloo"
    dist.init_process_group(backend or default, rank=rank, world_size=world)
    return Dist(rank, world, local), device


def check_world(
    cfg: dict[str, Any], nproc: int, nnodes: int = 1, flag: str = "--nproc-per-node"
) -> int:
    """The cell's world size nproc x nnodes, checked against the devices and the global batch
    (ConfigError); on CPU more ranks than cores only warn (they oversubscribe the cores).
    `flag`: how the user gave nproc (`--nproc-per-node`, a grid's `devices_per_cell`)."""
    for name, v in ((flag, nproc), ("--nnodes", nnodes)):
        if not (isinstance(v, int) and v >= 1):
            raise ConfigError(f"{name} must be an integer >= 1, {got(v)}")
    world = nproc * nnodes
    if world > 1 and METHODS.get(cfg["method"]["name"]).owns_step:
        raise ConfigError(
            f"method {cfg['method']['name']} runs its own training step (a look-ahead meta "
            f"update), which DistributedDataParallel cannot wrap: it runs on one device; "
            f"valid: {flag} 1, got world size {world}"
        )
    batch = cfg["train"]["batch_size"]
    if batch % world:
        valid = ", ".join(str(w) for w in range(1, batch + 1) if batch % w == 0)
        given = "--nproc-per-node x --nnodes" if flag == "--nproc-per-node" else flag
        raise ConfigError(
            f"train.batch_size {batch} is not divisible by the world size {world} "
            f"({given}); valid world sizes: {valid}"
        )
    dev = str(cfg["runtime"]["device"])
    cuda = dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())
    if cuda and nproc > torch.cuda.device_count():
        raise ConfigError(
            f"{flag} {nproc} exceeds the {torch.cuda.device_count()} CUDA devices "
            f"here; valid: 1..{torch.cuda.device_count()}"
        )
    cores = os.cpu_count() or 1
    if not cuda and nproc > cores:
        warnings.warn(f"{flag} {nproc} on CPU oversubscribes the {cores} cores", stacklevel=2)
    return world


def launch_cell(
    cfg: dict[str, Any],
    opts: CellOptions,
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> CellResult:
    """Train the resolved cell on nproc x nnodes ranks under `torch.distributed.run`; returns
    rank 0's result (on another node than rank 0's: that node's copy is read from the shared
    workdir only by rank 0, so the call returns the result of node 0 and raises elsewhere).
    Raises ConfigError before any process starts, and rank 0's ConfigError / TrainingError /
    WriteError or an interruption (KeyboardInterrupt, the run left `interrupted`) after."""
    if opts.epoch_callback is not None:
        raise ConfigError("an epoch callback cannot reach the ranks of a distributed cell")
    world = check_world(cfg, nproc, nnodes)
    if nnodes > 1 and master_addr is None:
        raise ConfigError(f"--nnodes {nnodes} needs --master-addr (the machine of node rank 0)")
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"--node-rank must be in 0..{nnodes - 1}, {got(node_rank)}")
    if master_port is not None and not 1 <= master_port <= 65535:
        raise ConfigError(f"--master-port must be a TCP port in 1..65535, {got(master_port)}")
    datasets.check(*datasets.cell_source(cfg))
    cfg = {**cfg, "runtime": {**cfg["runtime"], "world_size": world}}
    with tempfile.TemporaryDirectory(prefix="flexbench-ddp-") as tmp:
        spec, outcome = Path(tmp) / "cell.json", Path(tmp) / "outcome.json"
        options = {k: v for k, v in asdict(opts).items() if k != "epoch_callback"}
        options["run_id_file"] = str(Path(tmp) / "run_id")
        spec.write_text(json.dumps({"cfg": cfg, "opts": options, "outcome": str(outcome)}))
        cmd = _torchrun(spec, nproc, nnodes, node_rank, master_addr, master_port)
        code = _run(cmd, _rank_env(cfg, nproc))
        if not outcome.exists():
            raise RankLost(_rank0_lost(code, Path(options["run_id_file"]), opts))
        return _outcome(outcome)


def _torchrun(
    spec: Path,
    nproc: int,
    nnodes: int,
    node_rank: int,
    addr: str | None,
    port: int | None,
) -> list[str]:
    where = ["--standalone"] if nnodes == 1 and addr is None else [
        "--nnodes", str(nnodes), "--node-rank", str(node_rank),
        "--master-addr", addr or "127.0.0.1", "--master-port", str(port or 29500),
    ]  # fmt: skip
    return [
        sys.executable, "-m", "torch.distributed.run", *where,
        "--nproc-per-node", str(nproc), "--max-restarts", "0", "--monitor-interval", "0.5",
        "-m", "benchmark.training.ddp_worker", str(spec),
    ]  # fmt: skip


def _rank_env(cfg: dict[str, Any], nproc: int) -> dict[str, str]:
    """CPU threads per rank: runtime.threads, else cores // nproc (at least 1)."""
    threads = cfg["runtime"]["threads"] or max(1, (os.cpu_count() or 1) // nproc)
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def _term_with_parent() -> None:
    """In torchrun's process before it starts (Linux): the kernel sends it SIGTERM when the
    calling process dies, even by SIGKILL (a grid worker killed, a shell gone); torchrun then
    stops its ranks with SIGTERM and rank 0 marks the run `interrupted`, so no rank outlives
    its launcher."""
    import ctypes

    with suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _run(cmd: list[str], env: dict[str, str]) -> int:
    """Run torchrun; an interruption here (Ctrl-C, SIGTERM) is passed on to it as SIGTERM and
    waited for, so that rank 0 marks the run `interrupted` before this call raises."""
    linux = sys.platform.startswith("linux")
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_term_with_parent if linux else None)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise


def _rank0_lost(code: int, run_id_file: Path, opts: CellOptions) -> str:
    """Rank 0 died without reporting (SIGKILLed: the OOM killer, or torchrun's SIGKILL 30 s
    after its SIGTERM): the run it left `running` is marked `interrupted` here, so that the
    record says what happened; returns the message of the RankLost to raise."""
    from benchmark.record import tracking

    why = f"rank 0 ended without a result (torchrun exit code {code})"
    if not run_id_file.exists():  # it died before its run was open: there is nothing to mark
        return why
    rid = run_id_file.read_text().strip()
    try:
        uri = tracking.resolve_uri(opts.tracking_uri)
        run = tracking.CellRun(uri, opts.experiment or tracking.DEFAULT_EXPERIMENT)
    except Exception as exc:  # noqa: BLE001 - the store is gone too: say so, raise RankLost
        return f"{why}; its run {rid} could not be marked interrupted ({type(exc).__name__})"
    run.run_id = rid

    found: dict[str, str | None] = {}

    def end() -> None:  # a run rank 0 did close keeps its status
        found["status"] = run.client.get_run(rid).data.tags.get(schema.STATUS)
        if found["status"] == "running":
            run.interrupted()

    if not run.record_end(end):  # the store cannot take it: a warning, the run says running
        return f"{why}; its run {rid} could not be marked interrupted"
    if found["status"] == "running":
        return f"{why}; its run {rid} is marked interrupted"
    return f"{why}; its run {rid} is {found['status']}"


def _outcome(path: Path) -> CellResult:
    from benchmark.training.final import CellResult

    out = json.loads(path.read_text())
    errors = {"config": ConfigError, "training": TrainingError, "write": WriteError}
    if out["status"] == "cannot_resume":
        from benchmark.training.checkpoint import CannotResume

        raise CannotResume(out["path"], out["why"], out["other_fix"])
    if out["status"] == "finished":
        return CellResult(**out["result"])
    if out["status"] == "interrupted":  # a signal to the ranks, or a rank gone
        raise RankLost(f"the cell's ranks stopped (rank 0: {out['message']})")
    raise errors.get(out["status"], RuntimeError)(out["message"])
