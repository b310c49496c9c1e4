"""Create or continue a study and run its trials in K worker processes on one storage.

The parent process does everything that must happen once: it opens the storage (creating the
schema), creates or loads the study, checks that a rerun asks for the same study, opens the
study's MLflow parent run, and fails (and queues for retry) trials left RUNNING by dead workers.
Then it starts the workers (`--workers 1`: in this process; more: spawned processes), each
running its share of `--trials` with its own sampler, and finally writes the summary to MLflow.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import multiprocessing
import os
import re
import socket
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from benchmark.errors import ConfigError, TrainingError
from benchmark.files import check_name
from benchmark.record import schema, signals
from benchmark.record.store import redact_uri
from studies import storage as st
from studies.choices import HEARTBEAT_S, OBJECTIVES, PRUNERS, SAMPLERS
from studies.objective import Objective, StudySpec, TrialContext, as_settings, is_per_run
from studies.space import resolve_space, space_from_dict, space_to_dict

DEFAULT_EXPERIMENT = "flexbench-studies"
CREATE_DEFAULTS = {"dataset": "cifar10", "profile": "smoke", "seed": 0, "objective": "mean"}
SPEC_FIELDS = ("arch", "dataset", "method", "profile", "seed", "objective")


@dataclass
class RunOptions:
    """`flexbench study run` arguments; None = take it from the stored study (or a default)."""

    trials: int | None  # trials to add; with `until`, computed from the study (`trials_to_run`)
    study_name: str | None = None
    storage: str | None = None
    arch: str | None = None
    dataset: str | None = None
    method: str | None = None
    profile: str | None = None
    seed: int | None = None
    objective: str | None = None
    sets: dict[str, Any] = field(default_factory=dict)
    space_file: str | None = None
    space_items: list[str] = field(default_factory=list)
    workers: int = 1
    sampler: str | None = None
    pruner: str | None = None
    sampler_seed: int | None = None
    heartbeat: int = HEARTBEAT_S
    tracking_uri: str | None = None
    experiment: str | None = None
    until: int | None = None  # run trials until the study holds this many complete + pruned


@dataclass
class RunSummary:
    study_name: str
    storage: str
    mlflow_run_id: str
    counts: dict[str, int]
    new_trials: int
    best: optuna.trial.FrozenTrial | None
    dead_workers: list[str]


def default_study_name(arch: str, dataset: str, method: str, profile: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{arch}-{dataset}-{method}-{profile}")


def counts(study: optuna.Study) -> dict[str, int]:
    out = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] += 1
    return out


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        if importlib.util.find_spec("cmaes") is None:
            raise ConfigError("--sampler cmaes needs the `cmaes` package: pip install cmaes")
        return optuna.samplers.CmaEsSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")


def make_pruner(name: str, total_epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":  # no verdict in the first tenth of training (early epochs are noise)
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=total_epochs // 10)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=max(total_epochs, 1), reduction_factor=3
        )
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner {name!r}; valid: {', '.join(PRUNERS)}")


# --- the study's definition: given now vs stored -------------------------------------------
def _spec(opts: RunOptions, stored: StudySpec | None, name: str, prev: dict[str, Any]) -> StudySpec:
    """The study's definition: a new one from the options, or the stored one, which a rerun
    must not contradict (`prev`: the stored study's user attributes)."""
    if stored is None:
        return _new_spec(opts, name)
    spec, conflicts = _located(stored, opts.dataset, name)
    given = {f: getattr(opts, f) for f in SPEC_FIELDS if getattr(opts, f) is not None}
    conflicts += [
        f"{f}={getattr(stored, f)!r} (given {v!r})"
        for f, v in given.items()
        if f != "dataset" and getattr(stored, f) != v
    ]
    conflicts += [
        f"--set {k}={stored.sets.get(k, '(not set)')!r} (given {v!r})"
        for k, v in opts.sets.items()
        if not is_per_run(k) and stored.sets.get(k, object()) != v
    ]
    conflicts += [
        f"--{what} {prev[what]} (given {given_value})"
        for what, given_value in (("sampler", opts.sampler), ("pruner", opts.pruner))
        if given_value and prev.get(what, given_value) != given_value
    ]
    if opts.space_file or opts.space_items:
        space = space_to_dict(
            resolve_space(
                stored.method,
                opts.space_file,
                opts.space_items,
                stored.fixed_params(),
                stored.sets,
            )  # fmt: skip
        )
        if space != stored.space:
            conflicts.append(f"search space {stored.space} (given {space})")
    if conflicts:
        raise ConfigError(
            f"study {name!r} already exists with different settings: {'; '.join(conflicts)}. "
            f"Rerun without them (they are stored in the study) or pick another --study-name"
        )
    return spec


def _new_spec(opts: RunOptions, name: str) -> StudySpec:
    """A new study's definition: its cell, objective, fixed settings, space and data."""
    from benchmark import data as datasets

    given = {f: getattr(opts, f) for f in SPEC_FIELDS if getattr(opts, f) is not None}
    missing = [f for f in ("arch", "method") if f not in given]
    if missing:
        raise ConfigError(
            f"study {name!r} does not exist yet: pass --{' and --'.join(missing)} to create it"
        )
    values = {**CREATE_DEFAULTS, **given}
    if values["objective"] not in OBJECTIVES:
        raise ConfigError(
            f"unknown objective {values['objective']!r}; valid: {', '.join(OBJECTIVES)}"
        )
    semantic = {k: v for k, v in opts.sets.items() if not is_per_run(k)}
    fixed = {k[len("method.") :]: v for k, v in semantic.items() if k.startswith("method.")}
    space = resolve_space(values["method"], opts.space_file, opts.space_items, fixed, semantic)
    data_id = datasets.identity(values["dataset"])
    return StudySpec(**values, sets=semantic, space=space_to_dict(space), data_id=data_id)


def _located(stored: StudySpec, given: str | None, name: str) -> tuple[StudySpec, list[str]]:
    """The stored spec with its dataset where it is now, and the conflicts: a dataset without a
    path (`cifar10`) must be named the same; an image folder may be given under another path
    when it holds the same images (`benchmark.data.identity`: names and sizes), and must then
    be, since the study's trials trained on them."""
    from benchmark import data as datasets

    dataset = given or stored.dataset
    if datasets.parse_name(stored.dataset)[1] is None or datasets.parse_name(dataset)[1] is None:
        same = dataset == stored.dataset
        return stored, [] if same else [f"dataset={stored.dataset!r} (given {dataset!r})"]
    stored_there = Path(datasets.parse_name(stored.dataset)[1]).expanduser().exists()
    if given is None and not stored_there:
        raise ConfigError(
            f"study {name!r} trained on {stored.dataset}, which no longer exists: pass "
            f"--dataset imagefolder:<its new place> (the same images, by name and size, "
            f"continue the study)"
        )
    now = datasets.identity(dataset)
    was = stored.data_id or (datasets.identity(stored.dataset) if stored_there else None)
    if was != now:
        why = (
            "which holds other images than the study's trials trained on"
            if was
            else "the study predates stored data identities and its old path is gone, so they "
            "cannot be compared: put the data back there once, rerun, then move it"
        )
        return stored, [f"dataset={stored.dataset!r} (given {dataset!r}: {why})"]
    return dataclasses.replace(stored, dataset=dataset, data_id=now), []


def _validate(spec: StudySpec, run_sets: dict[str, Any]) -> dict[str, Any]:
    """Resolve a trial's config at both ends of the space now, so bad input (e.g. more BN
    recalibration batches than the training set holds) fails before any worker starts."""
    from benchmark import data as datasets
    from benchmark.config import resolve

    space = space_from_dict(spec.space)
    for end in ("high", "low"):
        probe = as_settings({k: getattr(d, end) for k, d in space.items()})
        cfg = resolve(
            spec.arch, spec.dataset, spec.method, spec.seed, spec.profile,
            {**spec.sets, **run_sets, **probe},
        )  # fmt: skip
    if cfg["runtime"]["world_size"] != 1:
        raise ConfigError(
            f"a study trains each trial in one process on one device: runtime.world_size must "
            f"stay 1 (valid: 1), got {cfg['runtime']['world_size']}; to give cells several "
            f"devices use `flexbench train --nproc-per-node N` or a grid's devices_per_cell"
        )
    datasets.check(*datasets.cell_source(cfg))
    _check_calibration(space, cfg)
    return cfg


def _check_calibration(space: dict[str, Any], cfg: dict[str, Any]) -> None:
    """A searched `train.bn_calib_batches` range must fit the training batches (the trainer's
    own check, made before the first trial instead of in each)."""
    from benchmark.grid.spec import n_train_images

    dim = space.get("train.bn_calib_batches")
    n = n_train_images(cfg["data"])
    if dim is None or n is None:
        return
    batches = n // cfg["train"]["batch_size"]
    if dim.high > batches:
        raise ConfigError(
            f"search range of train.bn_calib_batches {dim.describe()} exceeds the {batches} "
            f"training batches of {cfg['train']['batch_size']} images; valid: 1..{batches}"
        )


# --- workers --------------------------------------------------------------------------------
def worker_seed(sampler_seed: int | None, index: int, trials_before: int) -> int | None:
    """The sampler seed of worker `index`: `sampler_seed + index` in the run that starts the
    study; in a later run (the study already holds `trials_before` trials) one drawn from
    (sampler_seed, trials_before, index) by `numpy.random.SeedSequence`. A sampler seeded in a
    new process restarts its random stream: with the first run's seed, a resumed TPE study
    (still in its random startup trials) proposes the first run's parameters again."""
    if sampler_seed is None:
        return None
    if trials_before == 0:
        return sampler_seed + index
    seq = np.random.SeedSequence([sampler_seed, trials_before, index])
    return int(seq.generate_state(1)[0])


def run_worker(ctx: TrialContext, n_trials: int, index: int, total_epochs: int) -> None:
    """Run `n_trials` trials of the study in this process."""
    storage = st.open_storage(ctx.storage_url, ctx.heartbeat)
    seed = worker_seed(ctx.sampler_seed, index, ctx.trials_before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.load_study(
            study_name=ctx.study_name,
            storage=storage,
            sampler=make_sampler(ctx.sampler, seed),
            pruner=make_pruner(ctx.pruner, total_epochs),
        )
        # a diverged trial (TrainingError) is FAIL and the study goes on; anything else
        # (a bug, TestSplitSealed, a lost tracking server) stops this worker loudly
        study.optimize(
            Objective(ctx), n_trials=n_trials, catch=(TrainingError,), gc_after_trial=True
        )


def _spawned(ctx: TrialContext, n_trials: int, index: int, total_epochs: int) -> None:
    signals.install()
    try:
        run_worker(ctx, n_trials, index, total_epochs)
    except KeyboardInterrupt as exc:
        sys.exit(signals.exit_code(exc))
    except ConfigError as exc:
        print(f"flexbench: worker {index}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def _recover(study: optuna.Study, storage, dead: set[str]) -> list[int]:
    """Trials left RUNNING by workers that died: FAIL now (no need to wait for the heartbeat
    grace period) and queue a retry with the same parameters."""
    retry = st._retry_callback()
    lost = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("worker") not in dead:
            continue
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                retry(study, storage.get_trial(t._trial_id))
                lost.append(t.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
    return lost


def _reconcile(study: optuna.Study, study_run) -> None:
    """MLflow runs of trials that Optuna failed for a lost worker are marked failed too."""
    failed = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    for run in study_run.trial_runs(status="RUNNING"):
        number = int(run.data.tags.get(schema.TRIAL, -1))
        if number in failed:
            study_run.fail_trial_run(
                run.info.run_id, "worker lost (no heartbeat): the trial was failed and retried"
            )


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _summarise(
    study: optuna.Study, study_run, url: str, started: datetime.datetime, dead: list[str]
) -> RunSummary:
    c = counts(study)
    done = sorted(
        study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number
    )
    best = max(done, key=lambda t: t.value) if done else None
    points = [
        ("trial/value", t.value, t.number, int(t.datetime_complete.timestamp() * 1000))
        for t in done
    ]
    tags = {
        schema.TRIALS_IN_STATE.format(state=k): str(v) for k, v in c.items() if k != "waiting" or v
    }
    if best is not None:
        points.append(
            ("best_value", best.value, len(done), int(best.datetime_complete.timestamp() * 1000))
        )
        tags[schema.BEST_TRIAL] = str(best.number)
        tags[schema.BEST_VALUE] = f"{best.value:.6g}"
        tags.update({schema.BEST_PARAM.format(param=k): f"{v:.6g}" for k, v in best.params.items()})
    study_run.log_points(points)
    study_run.set_tags(tags)
    return RunSummary(
        study.study_name,
        redact_uri(url),
        study_run.run_id,
        c,
        sum(t.datetime_start is not None and t.datetime_start >= started for t in study.trials),
        best,
        dead,
    )


def run_study(opts: RunOptions) -> RunSummary:
    """Create or continue the study, run its trials and record the summary in MLflow.
    Everything that can be wrong with the options fails before the first trial."""
    from benchmark.record import tracking
    from benchmark.training.plan import plan_cell

    _check_options(opts)
    name = _study_name(opts)
    url = st.resolve_url(opts.storage)
    storage = st.open_storage(url, opts.heartbeat)  # creates the schema, once, here
    existing = _existing_study(storage, name, url)
    stored = StudySpec(**existing.user_attrs["flexbench"]) if existing else None
    prev = existing.user_attrs if existing else {}
    spec = _spec(opts, stored, name, prev)
    run_sets = _run_sets(opts)
    cfg = _validate(spec, run_sets)
    total_epochs = plan_cell(cfg).total_epochs
    sampler = opts.sampler or prev.get("sampler", "tpe")
    pruner = opts.pruner or prev.get("pruner", "median")
    make_sampler(sampler, None), make_pruner(pruner, total_epochs)  # validate now
    uri = tracking.resolve_uri(opts.tracking_uri)
    experiment = opts.experiment or prev.get("mlflow_experiment") or DEFAULT_EXPERIMENT
    tracking.prepare_store(uri, experiment)  # schema under a lock; a deleted experiment stops

    study = _create_study(storage, name, spec, existing)
    study_run = tracking.StudyRun(uri, experiment)
    params = _run_params(name, spec)
    tags = _run_tags(spec, url, sampler, pruner, tracking.git_commit())
    run_id = study_run.open(name, tags, params, prev.get("mlflow_run_id"))
    study.set_user_attr("mlflow_run_id", run_id)
    study.set_user_attr("mlflow_experiment", experiment)
    study.set_user_attr("sampler", sampler)
    study.set_user_attr("pruner", pruner)

    started = datetime.datetime.now()
    _fail_stale(study)  # trials of workers that died before, once their heartbeat is stale
    _reconcile(study, study_run)
    ctx = TrialContext(
        spec=spec,
        study_name=name,
        storage_url=url,
        heartbeat=opts.heartbeat,
        tracking_uri=uri,
        experiment=experiment,
        parent_run_id=run_id,
        sampler=sampler,
        pruner=pruner,
        sampler_seed=opts.sampler_seed,
        trials_before=len(study.trials),
        run_sets=run_sets,
        progress=opts.workers == 1,
    )
    opts = dataclasses.replace(opts, trials=trials_to_run(study, opts))
    return _run_trials(ctx, opts, study, storage, study_run, started, total_epochs)


def trials_to_run(study: optuna.Study, opts: RunOptions) -> int:
    """`--trials N`: N. `--until N`: the trials still missing for the study to hold N complete
    or pruned trials (0 once it does), so rerunning the same command finishes a study and then
    adds nothing."""
    if opts.until is None:
        return opts.trials
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return max(0, opts.until - len(done))


def _check_options(opts: RunOptions) -> None:
    """Counts and names given on the command line, checked before the storage is opened."""
    if (opts.until is None) == (opts.trials is None):
        raise ConfigError("give one of --trials N (trials to add) or --until N (trials in all)")
    if opts.until is None and opts.trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {opts.trials}")
    if opts.until is not None and opts.until < 1:
        raise ConfigError(f"--until must be >= 1, got {opts.until}")
    if opts.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {opts.workers}")
    if opts.heartbeat < 1:
        raise ConfigError(f"--heartbeat must be >= 1 second, got {opts.heartbeat}")
    for value, valid, what in (
        (opts.sampler, SAMPLERS, "sampler"),
        (opts.pruner, PRUNERS, "pruner"),
        (opts.objective, tuple(OBJECTIVES), "objective"),
    ):
        if value is not None and value not in valid:
            raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def _study_name(opts: RunOptions) -> str:
    """--study-name, or the default name of a new study from its arch/dataset/method/profile;
    it (and --experiment) names the trials' folders, so it must be able to (ConfigError)."""
    if opts.experiment:
        check_name(opts.experiment, "experiment name (--experiment)")
    if opts.study_name:
        name = opts.study_name
    elif opts.arch and opts.method:
        name = default_study_name(
            opts.arch, opts.dataset or CREATE_DEFAULTS["dataset"], opts.method,
            opts.profile or CREATE_DEFAULTS["profile"],
        )  # fmt: skip
    else:
        raise ConfigError("pass --arch and --method (new study) or --study-name (existing one)")
    check_name(name, "study name (--study-name)")
    return name


def _existing_study(storage, name: str, url: str) -> optuna.Study | None:
    """The stored study of that name (None if new); one not created by flexbench is refused,
    since its spec (what a rerun must match) is unknown."""
    if name not in st.study_names(storage):
        return None
    existing = optuna.load_study(study_name=name, storage=storage)
    if "flexbench" not in existing.user_attrs:
        raise ConfigError(f"study {name!r} in {redact_uri(url)} was not created by flexbench")
    return existing


def _run_sets(opts: RunOptions) -> dict[str, Any]:
    """Per-run settings (not part of the study's identity); with several workers each gets
    its share of the CPU threads unless runtime.threads is given."""
    run_sets = {k: v for k, v in opts.sets.items() if is_per_run(k)}
    if opts.workers > 1 and not run_sets.get("runtime.threads"):
        run_sets["runtime.threads"] = max(1, (os.cpu_count() or 1) // opts.workers)
    return run_sets


def _create_study(
    storage, name: str, spec: StudySpec, existing: optuna.Study | None
) -> optuna.Study:
    """The Optuna study; it stores its spec so that reruns can be checked against it (a rerun
    stores where its data is now and, in a study created before they were stored, the data's
    identity)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(
            storage=storage, study_name=name, direction="maximize", load_if_exists=True
        )
    study.set_user_attr("flexbench", spec.to_dict())
    return study


def _run_params(name: str, spec: StudySpec) -> dict[str, str]:
    """The study's MLflow parent-run params: its spec, search space and fixed settings."""
    return {
        "study": name,
        **{f: str(getattr(spec, f)) for f in SPEC_FIELDS},
        **{f"space.{k}": space_from_dict(spec.space)[k].describe() for k in spec.space},
        **{f"set.{k}": str(v) for k, v in sorted(spec.sets.items())},
    }


def _run_tags(spec: StudySpec, url: str, sampler: str, pruner: str, commit: str) -> dict:
    """The study's MLflow parent-run tags (docs/mlflow-schema.md); the storage URI redacted."""
    return {
        schema.ARCH: spec.arch,
        schema.DATASET: spec.dataset,
        schema.METHOD: spec.method,
        schema.PROFILE: spec.profile,
        schema.STORAGE: redact_uri(url),
        schema.SAMPLER: sampler,
        schema.PRUNER: pruner,
        schema.OBJECTIVE: spec.objective,
        schema.GIT_COMMIT: commit,
    }


def _run_trials(
    ctx: TrialContext,
    opts: RunOptions,
    study: optuna.Study,
    storage,
    study_run,
    started: datetime.datetime,
    total_epochs: int,
) -> RunSummary:
    """Run the trials in this process or in spawned workers; whatever happens, recover the
    trials of dead workers, write the summary and end the parent run with its status."""
    shares = [
        opts.trials // opts.workers + (i < opts.trials % opts.workers) for i in range(opts.workers)
    ]
    dead: list[str] = []
    status = "finished"
    try:
        if opts.trials == 0:
            pass  # --until: the study already holds its trials
        elif opts.workers == 1:
            run_worker(ctx, opts.trials, 0, total_epochs)
        else:
            dead = _run_spawned(ctx, [n for n in shares if n], total_epochs)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except BaseException:
        status = "failed"
        raise
    finally:
        lost = _recover(study, storage, set(dead)) if dead else []
        _reconcile(study, study_run)
        summary = _summarise(study, study_run, ctx.storage_url, started, dead)
        if dead and status == "finished":
            status = "failed"
            study_run.set_tags(
                {
                    schema.ERROR: f"workers died: {', '.join(dead)}; "
                    f"trials {lost} failed and queued for retry"
                }
            )
        study_run.end(status)
    return summary


def _run_spawned(ctx: TrialContext, shares: list[int], total_epochs: int) -> list[str]:
    """Start one process per non-empty share; returns the ids of workers that died."""
    mp = multiprocessing.get_context("spawn")
    procs = [
        mp.Process(target=_spawned, args=(ctx, n, i, total_epochs), name=f"flexbench-study-{i}")
        for i, n in enumerate(shares)
        if n > 0
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:  # the workers got the same Ctrl-C: let them record FAIL and exit
        for p in procs:
            p.join(timeout=60)
        raise
    host = socket.gethostname()
    dead = [f"{host}:{p.pid}" for p in procs if p.exitcode != 0]
    for p in procs:
        if p.exitcode != 0:
            print(
                f"flexbench: study worker {p.name} (pid {p.pid}) exited with code {p.exitcode}",
                file=sys.stderr,
            )
    return dead
