"""Search spaces: which method parameters a study searches, and where.

A method declares each parameter's range where it declares the parameter (`ParamSpec.search` in
its `PARAMS`; `declared_space` reads them). A study's space is that default, overridden by a
YAML file (`--space-file`) and then by `--space NAME=LOW:HIGH[:log]`; a parameter fixed with
`--set method.NAME=VALUE` leaves the space. Only a method's own parameters (its `PARAMS`) can be
searched, plus the training settings of `SEARCHABLE_SETTINGS` on request (BN recalibration
batches): the seed is never a search dimension (TAKD tuned the seed on test; we do not), nor is
any other training setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from benchmark.config import parse_value
from benchmark.dim import Dim
from benchmark.errors import ConfigError, got
from benchmark.methods import METHODS

__all__ = [
    "Dim",
    "declared_space",
    "parse_dim",
    "resolve_space",
    "space_from_dict",
    "space_to_dict",
    "suggest",
]


def declared_space(method: str, fixed: dict[str, Any] | None = None) -> dict[str, Dim]:
    """The ranges `method` declares beside its parameters (`ParamSpec.search`), for the
    parameters it searches that are active given the `fixed` values (e.g. alpha_minus only with
    divergence=alpha); raises ConfigError for an unknown method."""
    cls = METHODS.get(method)
    return {
        name: spec.search
        for name, spec in cls.PARAMS.items()
        if spec.searched and spec.search and _active(cls, name, fixed or {})
    }


def _active(cls: Any, name: str, fixed: dict[str, Any]) -> bool:
    """Whether parameter `name` has an effect given the fixed values (`ParamSpec.active_if`)."""
    cond = cls.PARAMS[name].active_if
    if cond is None:
        return True
    on, value = cond
    return fixed.get(on, cls.PARAMS[on].default) == value


NOT_SEARCHABLE = {"seed": "the seed is a grid axis, never a search dimension"}

# Training settings a study may search beside the method's parameters (opt-in, by their full
# name: `--space train.bn_calib_batches=5:50:log`); every other train./data./runtime. setting
# is refused. BN recalibration batches (US-Nets) are tuned on the validation split like a
# loss weight: calibration itself reads training batches only.
SEARCHABLE_SETTINGS = {"train.bn_calib_batches": "an integer >= 1"}


def parse_dim(name: str, text: Any) -> Dim:
    """`1:10:log`, `0:1`, [1, 10, log], {low: 1, high: 10, log: true} -> Dim."""
    if isinstance(text, dict):
        extra = set(text) - {"low", "high", "log"}
        if extra or not {"low", "high"} <= set(text):
            raise ConfigError(f"search range of {name}: expected keys low, high[, log], got {text}")
        parts: list[Any] = [text["low"], text["high"]] + (["log"] if text.get("log") else [])
    elif isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        parts = str(text).split(":")
    log = False
    if len(parts) == 3 and str(parts[2]).strip().lower() in ("log", "true"):
        log, parts = True, parts[:2]
    if len(parts) != 2:
        raise ConfigError(
            f"search range of {name}: expected LOW:HIGH or LOW:HIGH:log, got {text!r}"
        )
    try:
        low, high = (float(parse_value(p)) for p in parts)  # `1e-3` as in --set and grid files
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"search range of {name}: bounds must be numbers, got {text!r}") from exc
    if not low < high:
        raise ConfigError(f"search range of {name}: low must be < high, got {low:g}, {high:g}")
    if log and low <= 0:
        raise ConfigError(f"search range of {name}: a log range needs low > 0, got {low:g}")
    return Dim(low, high, log)


def _from_yaml(path: str, method: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"--space-file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"--space-file {path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"--space-file {path}: expected a mapping of parameter -> range")
    if set(doc) & set(METHODS.names()):  # per-method form
        doc = doc.get(method) or {}
        if not isinstance(doc, dict):
            raise ConfigError(
                f"--space-file {path}: the entry of {method} must be a mapping, {got(doc)}"
            )
    return doc


def _setting_dim(name: str, rng: Any, fixed_sets: dict[str, Any]) -> Dim:
    """The range of a searchable training setting: whole numbers >= 1, not also fixed."""
    if name in fixed_sets:
        raise ConfigError(
            f"{name} is both fixed (--set {name}=...) and searched (--space {name}=...); choose one"
        )
    dim = parse_dim(name, rng)
    if dim.low < 1 or dim.low != int(dim.low) or dim.high != int(dim.high):
        raise ConfigError(
            f"search range of {name} {dim.describe()}: {name} must be {SEARCHABLE_SETTINGS[name]}"
        )
    return Dim(dim.low, dim.high, dim.log, integer=True)


def _given_ranges(method: str, space_file: str | None, items: list[str] | None) -> dict[str, Any]:
    """The ranges asked for, by name as written: the YAML file's, then `--space` items (which
    override it)."""
    given: dict[str, Any] = _from_yaml(space_file, method) if space_file else {}
    for item in items or []:
        name, sep, rng = item.partition("=")
        if not sep:
            raise ConfigError(f"--space expects NAME=LOW:HIGH[:log], got {item!r}")
        given[name.strip()] = rng
    return given


def _param_key(cls: Any, method: str, name: str, fixed: dict[str, Any]) -> str:
    """The method parameter a given range `name` searches (`method.` prefix optional); refuses
    the seed, other settings, unknown or schedule parameters and inactive ones."""
    if name in NOT_SEARCHABLE or name.startswith(("seed", "train.", "data.", "runtime.")):
        raise ConfigError(
            f"{name} cannot be searched: {NOT_SEARCHABLE.get(name, 'only method parameters')}"
            f"; searchable parameters of {method}: {', '.join(cls.PARAMS) or '(none)'}; "
            f"training settings: {', '.join(SEARCHABLE_SETTINGS)}"
        )
    key = name.removeprefix("method.")
    if key not in cls.PARAMS:
        raise ConfigError(
            f"method {method} has no parameter {key!r}; searchable: "
            f"{', '.join(cls.PARAMS) or '(none)'}"
        )
    if not cls.PARAMS[key].searched:
        raise ConfigError(
            f"{key} is a schedule setting of method {method}, not searched; set it with "
            f"--set method.{key}=VALUE"
        )
    if not _active(cls, key, fixed):
        on, value = cls.PARAMS[key].active_if
        raise ConfigError(
            f"{key} has an effect only with {on}={value}; add --set method.{on}={value} "
            f"to search it"
        )
    return key


def _param_dim(cls: Any, key: str, rng: Any) -> Dim:
    """A method parameter's given range; whole numbers where its declared range is."""
    dim = parse_dim(key, rng)
    if cls.PARAMS[key].search is not None and cls.PARAMS[key].search.integer:
        dim = Dim(dim.low, dim.high, dim.log, integer=True)
    return dim


def _check_rules(cls: Any, method: str, space: dict[str, Dim]) -> None:
    """Both ends of every method parameter's range must be values the method accepts."""
    for key, dim in space.items():
        if key in SEARCHABLE_SETTINGS:
            continue
        check = cls.PARAMS[key].check
        if not (check(dim.low) and check(dim.high)):
            raise ConfigError(
                f"search range of {key} {dim.describe()} leaves the valid values of method "
                f"{method}: {cls.PARAMS[key].rule}"
            )


def _drop_fixed(space: dict[str, Dim], given: dict[str, Any], fixed: dict[str, Any]) -> None:
    """Parameters fixed with --set method.KEY=VALUE leave the space; a range asked for one of
    them is a contradiction, refused."""
    for key in fixed:
        if key in given or f"method.{key}" in given:
            raise ConfigError(
                f"{key} is both fixed (--set method.{key}=...) and searched (--space {key}=...); "
                f"choose one"
            )
        space.pop(key, None)


def _nothing_to_search(cls: Any, method: str) -> ConfigError:
    """The error of an empty space, naming the methods that do have parameters."""
    return ConfigError(
        f"nothing to search for method {method}"
        + (
            " (it has no parameters)"
            if not cls.PARAMS
            else " (every parameter is fixed with --set)"
        )
        + "; methods with parameters: "
        + ", ".join(n for n in METHODS.names() if METHODS.get(n).PARAMS)
    )


def resolve_space(
    method: str,
    space_file: str | None = None,
    items: list[str] | None = None,
    fixed: dict[str, Any] | None = None,
    fixed_sets: dict[str, Any] | None = None,
) -> dict[str, Dim]:
    """The validated search space of `method` (see module doc): method parameters by name,
    searchable training settings (`SEARCHABLE_SETTINGS`) by their full name; `fixed`: method
    parameters fixed with --set, `fixed_sets`: every --set. Raises ConfigError."""
    cls = METHODS.get(method)
    declared = declared_space(method, fixed)
    given = _given_ranges(method, space_file, items)
    space = dict(declared)
    for name, rng in given.items():
        if name in SEARCHABLE_SETTINGS:
            space[name] = _setting_dim(name, rng, fixed_sets or {})
        else:
            key = _param_key(cls, method, name, fixed or {})
            space[key] = _param_dim(cls, key, rng)
    _check_rules(cls, method, space)
    _drop_fixed(space, given, fixed or {})
    if not space:
        raise _nothing_to_search(cls, method)
    return space


def suggest(trial: Any, space: dict[str, Dim]) -> dict[str, float]:
    """One value per searched parameter from an Optuna trial (names as in the method)."""
    return {
        name: float(trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log))
        if dim.integer
        else trial.suggest_float(name, dim.low, dim.high, log=dim.log)
        for name, dim in sorted(space.items())
    }


def space_to_dict(space: dict[str, Dim]) -> dict[str, dict[str, Any]]:
    return {name: dim.to_dict() for name, dim in sorted(space.items())}


def space_from_dict(doc: dict[str, Any]) -> dict[str, Dim]:
    return {
        name: Dim(float(d["low"]), float(d["high"]), bool(d["log"]), bool(d.get("integer")))
        for name, d in doc.items()
    }
