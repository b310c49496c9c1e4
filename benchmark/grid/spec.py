"""Grid files: YAML -> validated GridSpec -> cells (resolved configs with stable keys).

A grid file names the axes (`archs`, `datasets`, `methods`, `seeds`), a profile, and settings
at several scopes. `archs: all` / `methods: all` take every registered architecture / method
(in name order), so a grid grows with the registries; with `all` on either axis, a
(method, arch) pair the method cannot train (`Method.check_model` raises IncompatibleError) is
left out automatically and listed by `flexbench grid plan`. With explicit lists such a pair is an
error naming the `exclude` entry that skips it.

Settings precedence, lowest first: profile < `set` < `per_dataset` < `per_arch` <
`per_method` < `method_params.from_study` < `per_cell` < `--set` on the command line.

`devices_per_cell: N` (top level, default 1) gives every cell N devices (one torch.distributed
rank each, `benchmark.training.distributed.launch_cell`); a `per_cell` rule may give its cells
another N (`{arch: msdnet, devices_per_cell: 2}`), and `--devices-per-cell` overrides both.
`runtime.world_size` is the launcher's and cannot be set in a grid.

A `method.X` / `arch.X` setting given at a scope that covers several methods / archs (e.g. the
grid-wide `set`) applies only to the cells whose method / arch has that parameter; it is an
error when it applies to none of them. Relative paths written in the grid file (a dataset's
`imagefolder:<path>`, `data.root`, `runtime.workdir`, `from_study`) are resolved against the
folder of the grid file; relative paths given with `--set` against the current directory.

Everything is validated (every cell resolved, every dataset checked, every model built) before
the first cell starts; errors are ConfigError naming the problem and the valid values.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmark import data as datasets
from benchmark.config import PROFILES, SECTIONS, cell_key, resolve
from benchmark.errors import ConfigError, IncompatibleError, got
from benchmark.files import check_name
from benchmark.methods import METHODS
from benchmark.models import ARCHS
from benchmark.record import schema

TOP_KEYS = {
    "name": "MLflow experiment of the grid (letters, digits, . _ -)",
    "description": "free text",
    "profile": ", ".join(PROFILES),
    "archs": "list of architectures, or all",
    "datasets": "list of datasets",
    "methods": "list of methods, or all",
    "seeds": "list of integer seeds",
    "set": "settings for every cell",
    "per_dataset": "{dataset: settings}",
    "per_arch": "{arch: settings}",
    "per_method": "{method: settings}",
    "per_cell": "[{arch/dataset/method/seed: value(s), set: settings}]",
    "exclude": "[{arch/dataset/method/seed: value(s)}]",
    "method_params": "{from_study: best-params YAML}",
    "devices_per_cell": "devices (torch.distributed ranks) per cell, an integer >= 1",
}
AXES = {"arch": "archs", "dataset": "datasets", "method": "methods", "seed": "seeds"}
ALL = "all"  # `archs: all` / `methods: all`: every registered name
PATH_SETTINGS = ("data.root", "runtime.workdir")
PER_CELL_EXTRA = ("set", "devices_per_cell")  # a per_cell rule's keys besides the axes
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class GridCell:
    """One cell of a grid: its axis values, resolved config and key."""

    arch: str
    dataset: str  # as written in the grid file (resolved paths live in cfg["data"]["name"])
    method: str
    seed: int
    cfg: dict[str, Any]
    key: str
    devices: int = 1  # devices_per_cell: the ranks the cell trains on
    total_epochs: int = 0  # epochs x stages (TAKD trains one stage per sub-model)
    gflops: float | None = None  # estimated training compute

    @property
    def label(self) -> str:
        ds = schema.short_dataset(self.dataset)
        return f"{self.arch}/{ds}/{self.method}/s{self.seed}"

    def axis(self, name: str) -> Any:
        return getattr(self, name)


@dataclass
class GridSpec:
    path: Path
    name: str
    profile: str
    archs: list[str]
    datasets: list[str]
    methods: list[str]
    seeds: list[int]
    cells: list[GridCell]
    excluded: int = 0  # cells left out: by `exclude` rules and as incompatible pairs
    description: str = ""
    # (arch, method, reason) of the pairs left out automatically (`all` axes), in grid order
    incompatible: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def workdirs(self) -> list[Path]:
        return sorted({Path(c.cfg["runtime"]["workdir"]) for c in self.cells})

    def axes_text(self) -> str:
        n = [len(self.archs), len(self.datasets), len(self.methods), len(self.seeds)]
        words = ["arch", "dataset", "method", "seed"]
        parts = [f"{k} {w}{'s' if k != 1 else ''}" for k, w in zip(n, words)]
        text = " x ".join(parts)
        return text + (f", {self.excluded} excluded" if self.excluded else "")


def _err(where: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_path(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
        return str((base / Path(value).expanduser()).resolve())
    return str(Path(value).expanduser()) if isinstance(value, str) else value


def settings(obj: Any, where: str, base: Path | None) -> dict[str, Any]:
    """`{train.epochs: 3}` or `{train: {epochs: 3}}` -> {"train.epochs": 3}.

    With `base`, relative `data.root` / `runtime.workdir` become absolute against it."""
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise _err(
            where,
            f"expected a mapping of section.key: value (sections: {', '.join(SECTIONS)}), "
            f"got {type(obj).__name__} {obj!r}",
        )
    out: dict[str, Any] = {}
    for key, value in obj.items():
        key = str(key)
        if "." in key:
            section = key.partition(".")[0]
            items = [(key, value)]
        else:
            section = key
            if section in SECTIONS and not isinstance(value, dict):
                raise _err(
                    where, f"{key} must be a mapping of settings, e.g. {key}: {{...}}, {got(value)}"
                )
            items = [(f"{key}.{k}", v) for k, v in (value or {}).items()]
        if section not in SECTIONS:
            raise _err(
                where,
                f"unknown settings section {section!r} in {key!r}; "
                f"valid sections: {', '.join(SECTIONS)}",
            )
        for k, v in items:
            out[k] = _as_path(v, base) if base is not None and k in PATH_SETTINGS else v
    return out


REGISTRIES = {"archs": ARCHS, "methods": METHODS}


def _names(raw: Any, axis: str, where: str) -> list[Any]:
    if raw is None:
        raise _err(where, f"{axis} is missing; give a non-empty list")
    if raw == ALL and axis in REGISTRIES:
        return REGISTRIES[axis].names()
    if not isinstance(raw, list):
        also = f" or {ALL}" if axis in REGISTRIES else ""
        raise _err(where, f"{axis} must be a list{also}, e.g. {axis}: [{raw!r}], got {raw!r}")
    if not raw:
        raise _err(where, f"{axis} is empty; give at least one value")
    for i, v in enumerate(raw):
        if axis == "seeds":
            if not _is_int(v) or v < 0:
                raise _err(where, f"seeds[{i}] must be an integer >= 0, got {v!r}")
        elif not isinstance(v, str) or not v:
            raise _err(where, f"{axis}[{i}] must be a name (string), got {v!r}")
    dups = sorted({str(v) for v in raw if raw.count(v) > 1})
    if dups:
        raise _err(where, f"duplicate {axis}: {', '.join(dups)}")
    return list(raw)


def _check_names(where: str, archs, datasets_, methods) -> None:
    for i, a in enumerate(archs):
        try:
            ARCHS.get(a)
        except ConfigError as exc:
            raise _err(where, f"archs[{i}]: {exc}") from None
    for i, m in enumerate(methods):
        try:
            METHODS.get(m)
        except ConfigError as exc:
            raise _err(where, f"methods[{i}]: {exc}") from None
    for i, d in enumerate(datasets_):
        try:
            datasets.parse_name(d)
        except ConfigError as exc:
            raise _err(where, f"datasets[{i}]: {exc}") from None


def _matcher(rule: Any, where: str, axes: dict[str, list], extra: tuple[str, ...] = ()):
    """A per_cell / exclude rule -> {axis: set of values}, validated against the grid's axes."""
    if not isinstance(rule, dict):
        raise _err(where, f"expected a mapping like {{arch: msdnet, method: ipkd}}, got {rule!r}")
    unknown = sorted(set(map(str, rule)) - set(AXES) - set(extra))
    if unknown:
        valid = ", ".join(list(AXES) + list(extra))
        raise _err(where, f"unknown key(s) {', '.join(unknown)}; valid: {valid}")
    match: dict[str, set] = {}
    for axis in AXES:
        if axis not in rule:
            continue
        values = rule[axis] if isinstance(rule[axis], list) else [rule[axis]]
        grid_values = axes[AXES[axis]]
        for v in values:
            if v not in grid_values:
                raise _err(
                    where,
                    f"{axis} {v!r} is not in this grid's {AXES[axis]} "
                    f"({', '.join(map(str, grid_values))})",
                )
        match[axis] = set(values)
    if not match:
        raise _err(where, f"give at least one of {', '.join(AXES)} to select cells")
    return match


def _matches(match: dict[str, set], combo: dict[str, Any]) -> bool:
    return all(combo[axis] in values for axis, values in match.items())


def _accepts(section: str, name: str) -> set[str] | None:
    """Parameters an arch / method accepts; None for the other sections (always applied)."""
    if section == "method":
        return set(METHODS.get(name).PARAMS)
    if section == "arch":
        spec = ARCHS.get(name)
        keys = set(spec.defaults) | {"preset"}
        for preset in spec.presets.values():
            keys |= set(preset)
        return keys
    return None


Layer = tuple[str, dict[str, set] | None, dict[str, Any]]  # (scope, cell matcher, settings)


def _overrides(
    layers: list[Layer], combo: dict[str, Any], applied: dict[tuple[str, str], int]
) -> dict[str, Any]:
    """One cell's settings from the scopes that select it, lowest precedence first. A
    `method.X` / `arch.X` setting is skipped where the cell's method / arch has no X; `applied`
    counts, per (scope, setting), the cells it reached (0: it reached none)."""
    overrides: dict[str, Any] = {}
    for scope, match, sets in layers:
        if match is not None and not _matches(match, combo):
            continue
        for key, value in sets.items():
            section, _, param = key.partition(".")
            accepted = _accepts(section, combo["arch"] if section == "arch" else combo["method"])
            applied.setdefault((scope, key), 0)
            if accepted is not None and param not in accepted:
                continue
            applied[(scope, key)] += 1
            overrides[key] = value
    return overrides


def _load_from_study(raw: Any, where: str, base: Path) -> tuple[Path, dict[str, dict]]:
    hint = "method_params: {from_study: path/to/best_params.yaml}"
    if raw == "from_study" or (isinstance(raw, dict) and raw.get("from_study") in (None, "")):
        raise _err(where, f"from_study needs the study's best-params file: {hint}")
    if not isinstance(raw, dict) or set(raw) != {"from_study"}:
        raise _err(where, f"expected {hint}, got {raw!r}")
    path = Path(_as_path(raw["from_study"], base))
    if not path.is_file():
        raise _err(
            where,
            f"from_study file {path} does not exist; run the study and export its best "
            f"params there, or remove method_params to use the method defaults",
        )
    try:
        best = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise _err(where, f"cannot parse {path}: {exc}") from None
    if isinstance(best, dict):
        best.pop("study", None)  # metadata written by `flexbench study best --export`
    if not isinstance(best, dict) or not all(isinstance(v, dict) for v in best.values()):
        raise _err(where, f"{path} must map 'arch/dataset/method' to {{param: value}}")
    return path, {str(k): v for k, v in best.items()}


def load_grid(
    path: str | Path, cli_sets: dict[str, Any] | None = None, devices_per_cell: int | None = None
) -> GridSpec:
    """Read, validate and expand a grid file; `devices_per_cell` (`--devices-per-cell`), when
    given, overrides the file's for every cell. Raises ConfigError before any work."""
    path = Path(path)
    where = f"grid {path}"
    raw = _read_grid_file(path, where)
    base = path.resolve().parent
    name = _grid_name(raw, where)
    profile = raw.get("profile")
    if profile not in PROFILES:
        raise _err(where, f"profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    axes = _read_axes(raw, where)
    scopes = _read_scopes(raw, where, axes, base, cli_sets)
    if devices_per_cell is not None:
        scopes.devices = _devices_value(devices_per_cell, "--devices-per-cell")
        scopes.device_rules = []
    auto_exclude = ALL in (raw.get("archs"), raw.get("methods"))
    out = _Expansion(where, profile, base, auto_exclude, scopes)
    out.run(axes)
    _check_expansion(out, axes)
    _check_data(where, out.cells)
    return GridSpec(
        path=path,
        name=name,
        profile=profile,
        archs=axes["archs"],
        datasets=axes["datasets"],
        methods=axes["methods"],
        seeds=axes["seeds"],
        cells=out.cells,
        excluded=out.excluded,
        description=str(raw.get("description") or ""),
        incompatible=[(a, m, why) for (a, m), why in out.incompatible.items()],
    )


def select_cells(spec: GridSpec, only: list[str]) -> GridSpec:
    """The grid restricted to the cells matching every `AXIS=V[,V...]` of `only` (`--only`),
    e.g. ["arch=msdnet", "seed=0,1"]; the other cells are neither trained nor shown, and stay
    in the grid's recorded plan. Raises ConfigError naming the valid axes and values."""
    if not only:
        return spec
    keep = spec.cells
    for item in only:
        axis, sep, raw = item.partition("=")
        axis = axis.strip()
        if not sep or axis not in AXES:
            raise ConfigError(
                f"--only takes AXIS=VALUE[,VALUE...] with AXIS one of {', '.join(AXES)}; "
                f"got {item!r}"
            )
        values = [v.strip() for v in raw.split(",") if v.strip()]
        present = sorted({str(c.axis(axis)) for c in spec.cells})
        unknown = [v for v in values if v not in present]
        if unknown or not values:
            raise ConfigError(
                f"--only {item!r}: no cell of grid {spec.name} has {axis} "
                f"{', '.join(map(repr, unknown)) or '(empty)'}; its {axis} values: "
                f"{', '.join(present)}"
            )
        keep = [c for c in keep if str(c.axis(axis)) in values]
    if not keep:
        raise ConfigError(
            f"--only {' '.join(only)}: no cell of grid {spec.name} matches all of them (every "
            f"--only must match; list several values of one axis as AXIS=V1,V2)"
        )
    return dataclasses.replace(spec, cells=keep)


def _read_grid_file(path: Path, where: str) -> dict[str, Any]:
    """The grid file as a mapping with only known top-level keys, so that a typo in a key
    stops the grid instead of being ignored."""
    if not path.is_file():
        raise ConfigError(f"grid file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise _err(where, f"not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise _err(where, "expected a mapping with name, profile, archs, datasets, methods, seeds")
    unknown = sorted(set(map(str, raw)) - set(TOP_KEYS))
    if unknown:
        raise _err(where, f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(TOP_KEYS)}")
    return raw


def _grid_name(raw: dict[str, Any], where: str) -> str:
    """The grid's name, which is also its MLflow experiment name (hence the character set)."""
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise _err(
            where,
            f"name must be the grid's MLflow experiment name (letters, digits, . _ -), "
            f"got {name!r}",
        )
    check_name(name, f"{where}: name")
    return name


def _read_axes(raw: dict[str, Any], where: str) -> dict[str, list]:
    """The four axes (`all` expanded), checked against the registries before any scope
    refers to them."""
    archs = _names(raw.get("archs"), "archs", where)
    datasets_ = _names(raw.get("datasets"), "datasets", where)
    methods = _names(raw.get("methods"), "methods", where)
    seeds = _names(raw.get("seeds"), "seeds", where)
    _check_names(where, archs, datasets_, methods)
    return {"archs": archs, "datasets": datasets_, "methods": methods, "seeds": seeds}


@dataclass
class _Scopes:
    """Every settings scope and exclude rule of a grid file, parsed once before expansion."""

    layers: list[Layer]  # set, per_dataset, per_arch, per_method (lowest precedence first)
    cell_layers: list[Layer]  # per_cell (above method_params.from_study)
    cli_layer: Layer  # --set (highest)
    excludes: list[dict[str, set]]
    study_path: Path | None  # method_params.from_study
    best: dict[str, dict]  # its 'arch/dataset/method' -> {param: value}
    devices: int = 1  # devices_per_cell at the top (or --devices-per-cell)
    device_rules: list[tuple[dict[str, set], int]] = field(default_factory=list)  # per_cell's

    def devices_of(self, combo: dict[str, Any]) -> int:
        """The cell's devices_per_cell: the last per_cell rule selecting it that gives one,
        else the grid's."""
        given = [n for match, n in self.device_rules if _matches(match, combo)]
        return given[-1] if given else self.devices


def _devices_value(v: Any, where: str) -> int:
    if not (_is_int(v) and v >= 1):
        raise ConfigError(f"{where} must be an integer >= 1 (devices per cell), {got(v)}")
    return v


def _refuse_world_size(layers: list[Layer]) -> None:
    """`runtime.world_size` follows from a cell's devices, which the grid sets."""
    for scope, _, sets in layers:
        if "runtime.world_size" in sets:
            raise ConfigError(
                f"{scope}: runtime.world_size is set by the launcher; give the grid "
                f"devices_per_cell: N (or a per_cell rule's devices_per_cell, or "
                f"--devices-per-cell N), got runtime.world_size {sets['runtime.world_size']!r}"
            )


def _read_scopes(
    raw: dict[str, Any],
    where: str,
    axes: dict[str, list],
    base: Path,
    cli_sets: dict[str, Any] | None,
) -> _Scopes:
    """All scopes in file order, so that the first bad one is the one reported."""
    layers: list[Layer] = [("set", None, settings(raw.get("set"), f"{where}: set", base))]
    layers += _axis_layers(raw, where, axes, base)
    study_path, best = None, {}
    if raw.get("method_params") is not None:
        study_path, best = _load_from_study(raw["method_params"], f"{where}: method_params", base)
    cell_layers = _per_cell_layers(raw, where, axes, base)
    excludes = raw.get("exclude") or []
    if not isinstance(excludes, list):
        raise _err(
            where,
            f"exclude must be a list of {{arch/dataset/method/seed: value(s)}}, {got(excludes)}",
        )
    ex_matchers = [_matcher(r, f"{where}: exclude[{i}]", axes) for i, r in enumerate(excludes)]
    cli_layer = ("--set", None, dict(cli_sets or {}))
    _refuse_world_size([*layers, *cell_layers, cli_layer])
    devices = _devices_value(raw.get("devices_per_cell", 1), f"{where}: devices_per_cell")
    rules = _per_cell_devices(raw, where, axes)
    return _Scopes(layers, cell_layers, cli_layer, ex_matchers, study_path, best, devices, rules)


def _axis_layers(raw: dict[str, Any], where: str, axes: dict[str, list], base: Path) -> list[Layer]:
    """per_dataset / per_arch / per_method: settings for every cell with that axis value."""
    layers: list[Layer] = []
    for scope, axis in (("per_dataset", "dataset"), ("per_arch", "arch"), ("per_method", "method")):
        table = raw.get(scope) or {}
        if not isinstance(table, dict):
            raise _err(where, f"{scope} must be a mapping {{{axis}: settings}}, got {table!r}")
        for value, sets in table.items():
            if value not in axes[AXES[axis]]:
                raise _err(
                    where,
                    f"{scope}: {value!r} is not in this grid's {AXES[axis]} "
                    f"({', '.join(axes[AXES[axis]])})",
                )
            w = f"{where}: {scope}.{value}"
            layers.append((f"{scope}.{value}", {axis: {value}}, settings(sets, w, base)))
    return layers


def _per_cell_layers(
    raw: dict[str, Any], where: str, axes: dict[str, list], base: Path
) -> list[Layer]:
    """per_cell rules: settings for the cells a rule selects on any mix of axes."""
    rules = raw.get("per_cell") or []
    if not isinstance(rules, list):
        raise _err(
            where,
            f"per_cell must be a list of {{arch/dataset/method/seed: ..., set: ...}}, {got(rules)}",
        )
    cell_layers: list[Layer] = []
    for i, rule in enumerate(rules):
        w = f"{where}: per_cell[{i}]"
        match = _matcher(rule, w, axes, extra=PER_CELL_EXTRA)
        if not any(k in rule for k in PER_CELL_EXTRA):
            raise _err(
                w, "missing `set:` (the settings for the selected cells) or `devices_per_cell:`"
            )
        if "set" in rule:
            cell_layers.append((f"per_cell[{i}]", match, settings(rule["set"], w, base)))
    return cell_layers


def _per_cell_devices(
    raw: dict[str, Any], where: str, axes: dict[str, list]
) -> list[tuple[dict[str, set], int]]:
    """The per_cell rules that give their cells a devices_per_cell (already checked rules)."""
    out = []
    for i, rule in enumerate(raw.get("per_cell") or []):
        if "devices_per_cell" in rule:
            w = f"{where}: per_cell[{i}]"
            match = _matcher(rule, w, axes, extra=PER_CELL_EXTRA)
            out.append((match, _devices_value(rule["devices_per_cell"], f"{w}: devices_per_cell")))
    return out


def _resolved_dataset(name: str, base: Path) -> str:
    """A dataset name with its path argument made absolute against the grid file's folder."""
    spec, arg = datasets.parse_name(name)
    return f"{spec.name}:{_as_path(arg, base)}" if arg else name


def _absolute_paths(cfg: dict[str, Any]) -> None:
    """Paths not set in the grid file are relative to the current directory: make them
    absolute so that workers elsewhere (Ray) see the same files. Not part of the key."""
    cfg["runtime"]["workdir"] = str(Path(cfg["runtime"]["workdir"]).expanduser().resolve())
    if isinstance(cfg["data"].get("root"), str):
        cfg["data"]["root"] = str(Path(cfg["data"]["root"]).expanduser().resolve())


def _study_entry(best: dict[str, dict], combo: dict[str, Any]) -> dict | None:
    """The from_study entry of a cell: `arch/dataset/method` with the dataset as the grid file
    writes it; else, for a file-backed dataset, the one entry whose dataset names the same file
    (a study run from another folder writes another relative path to the same data)."""
    arch, ds, method = combo["arch"], combo["dataset"], combo["method"]
    if f"{arch}/{ds}/{method}" in best:
        return best[f"{arch}/{ds}/{method}"]
    same = [
        v
        for k, v in best.items()
        if k.count("/") >= 2
        and k.split("/", 1)[0] == arch
        and k.rsplit("/", 1)[1] == method
        and schema.short_dataset(k.split("/", 1)[1].rsplit("/", 1)[0]) == schema.short_dataset(ds)
        and ":" in ds
    ]
    return same[0] if len(same) == 1 else None


@dataclass
class _Expansion:
    """Expands the axes into cells, collecting what the checks after expansion need: which
    settings reached a cell, which cells lack study params, which pairs were left out."""

    where: str
    profile: str
    base: Path
    auto_exclude: bool  # `all` on an axis: incompatible pairs are left out, not an error
    scopes: _Scopes
    cells: list[GridCell] = field(default_factory=list)
    applied: dict[tuple[str, str], int] = field(default_factory=dict)
    missing_study: list[str] = field(default_factory=list)
    incompatible: dict[tuple[str, str], str] = field(default_factory=dict)
    excluded: int = 0

    def run(self, axes: dict[str, list]) -> None:
        """Every combination of the axes in grid order, minus the excluded ones."""
        product = itertools.product(axes["archs"], axes["datasets"], axes["methods"], axes["seeds"])
        for arch, ds, method, seed in product:
            combo = {"arch": arch, "dataset": ds, "method": method, "seed": seed}
            if any(_matches(m, combo) for m in self.scopes.excludes):
                self.excluded += 1
                continue
            self._add(combo)

    def _study_layer(self, combo: dict[str, Any]) -> tuple[list[Layer], dict | None, bool]:
        """The cell's from_study layer, its entry (None if the file lacks it) and whether
        the cell wants one (methods without parameters need none)."""
        scopes = self.scopes
        wants_study = scopes.study_path is not None and bool(METHODS.get(combo["method"]).PARAMS)
        if not wants_study:
            return [], None, False
        entry = _study_entry(scopes.best, combo)
        if entry is None:
            return [], None, True
        # method parameters by name; a tuned training setting by its full name
        sets = {(k if "." in k else f"method.{k}"): v for k, v in entry.items()}
        return [("method_params.from_study", None, sets)], entry, True

    def _resolve(self, combo: dict[str, Any], overrides: dict[str, Any]) -> dict | None:
        """The cell's config; None when the pair is left out as incompatible (`all` axes)."""
        arch, ds, method, seed = combo["arch"], combo["dataset"], combo["method"], combo["seed"]
        w = f"{self.where}: cell {arch}/{ds}/{method}/seed {seed}"
        try:
            dataset = _resolved_dataset(ds, self.base)
            return resolve(arch, dataset, method, seed, self.profile, overrides)
        except IncompatibleError as exc:
            if not self.auto_exclude:
                raise _err(
                    w,
                    f"{exc}; to skip this pair add to the grid: "
                    f"exclude: [{{arch: {arch}, method: {method}}}]",
                ) from None
            self.incompatible.setdefault((arch, method), str(exc))
            self.excluded += 1
            return None
        except ConfigError as exc:
            raise _err(w, str(exc)) from None

    def _add(self, combo: dict[str, Any]) -> None:
        """One combination: its settings, its config and, unless left out, its cell."""
        study_layer, entry, wants_study = self._study_layer(combo)
        counts: dict[tuple[str, str], int] = {}
        s = self.scopes
        scopes = s.layers + study_layer + s.cell_layers + [s.cli_layer]
        overrides = _overrides(scopes, combo, counts)
        cfg = self._resolve(combo, overrides)
        if cfg is None:
            counts = dict.fromkeys(counts, 0)  # settings of a left-out cell apply to nothing
        for k, n in counts.items():
            self.applied[k] = self.applied.get(k, 0) + n
        if cfg is None:
            return
        arch, ds, method, seed = combo["arch"], combo["dataset"], combo["method"], combo["seed"]
        if wants_study and entry is None:
            self.missing_study.append(f"{arch}/{ds}/{method}")
        _absolute_paths(cfg)
        n = self.scopes.devices_of(combo)
        self.cells.append(GridCell(arch, ds, method, seed, cfg, cell_key(cfg), devices=n))


def _check_expansion(out: _Expansion, axes: dict[str, list]) -> None:
    """Errors only visible once every cell is resolved: study params missing for some cell,
    a setting that reached no cell, no cell at all, two cells with one config."""
    where = out.where
    if out.missing_study:
        raise _err(
            f"{where}: method_params",
            f"{out.scopes.study_path} has no best params for {', '.join(out.missing_study)}; "
            f"it has: {', '.join(out.scopes.best) or 'nothing'}",
        )
    for (scope, key), count in out.applied.items():
        if count == 0:
            section, _, param = key.partition(".")
            names = axes["archs"] if section == "arch" else axes["methods"]
            having = [n for n in names if param in (_accepts(section, n) or ())]
            raise _err(
                where,
                f"{scope}: {key} applies to none of its cells; "
                f"{section}s of this grid with {param!r}: {', '.join(having) or 'none'}",
            )
    if not out.cells:
        raise _err(where, "exclude removes every cell; nothing to run")
    seen: dict[str, GridCell] = {}
    for c in out.cells:
        if c.key in seen:
            raise _err(
                where,
                f"cells {seen[c.key].label} and {c.label} resolve to the same config "
                f"(key {c.key}); remove the duplicate",
            )
        seen[c.key] = c


def _check_data(where: str, cells: list[GridCell]) -> None:
    """Every dataset source must exist before the first cell starts."""
    done: set[str] = set()
    for c in cells:
        blob = json.dumps(c.cfg["data"], sort_keys=True, default=str)
        if blob in done:
            continue
        done.add(blob)
        try:
            datasets.describe(*datasets.cell_source(c.cfg))
            datasets.check(*datasets.cell_source(c.cfg))
        except ConfigError as exc:
            raise _err(f"{where}: dataset {c.dataset}", str(exc)) from None


def n_train_images(cfg_data: dict[str, Any]) -> int | None:
    """Training images after the val split and subset, without decoding (None if unknown)."""
    total = datasets.train_size(cfg_data["name"], cfg_data)
    sub = cfg_data.get("train_subset")
    if _is_int(sub):
        return sub
    if total is None:
        return None
    val = cfg_data.get("val_size") or 0
    val = int(round(total * val)) if isinstance(val, float) else val
    rest = total - val
    return int(round(rest * sub)) if isinstance(sub, float) else rest


def estimate(spec: GridSpec, cells: list[GridCell] | None = None) -> None:
    """Build every distinct model once (validates arch settings) and fill in each cell's
    total epochs and estimated training compute: per step 3 x forward FLOPs of the trained
    sub-models (one pass for early-exit models) + forward FLOPs of frozen teachers.
    `cells`: only these (a run estimates the cells it will train)."""
    todo = [c for c in (spec.cells if cells is None else cells) if not c.total_epochs]
    from benchmark.training.plan import plan_cell

    for c in todo:
        try:
            plan = plan_cell(c.cfg)
        except ConfigError as exc:
            raise _err(f"grid {spec.path}: cell {c.label}", str(exc)) from None
        except Exception as exc:  # a bad arch setting that only the model build notices
            raise _err(
                f"grid {spec.path}: cell {c.label}",
                f"cannot build {c.arch} with {c.cfg['arch']}: {type(exc).__name__}: {exc}",
            ) from None
        c.total_epochs = plan.total_epochs
        n = n_train_images(c.cfg["data"])
        if n is None:
            c.gflops = None
            continue
        mflops = [s.mflops for s in plan.costs]
        per_image_epochs = 0.0  # a fitting stage (ZTW's ensembles) trains no sub-model
        for i, st in enumerate(plan.stages):
            trained = [mflops[k] for k in st.train] or [0.0]
            fwd = max(trained) if plan.single_pass else sum(trained)
            per_epoch = 3 * fwd + sum(mflops[k] for k in st.frozen_teachers)
            per_image_epochs += per_epoch * plan.stage_epochs(i)
        c.gflops = per_image_epochs * n / 1e3
