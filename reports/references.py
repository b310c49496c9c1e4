"""Published numbers (reports/references/*.yaml) next to ours: "paper vs reproduced".

Each YAML file is one source (see reports/references/README.md for the fields). An entry is
compared with the mean over seeds of the flexbench cells it names; entries whose source has no
flexbench counterpart, or whose arch/dataset the experiment does not hold, are only counted.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from benchmark.errors import ConfigError

DEFAULT_DIR = Path(__file__).parent / "references"
REQUIRED = ("id", "citation", "source", "url", "measured", "value", "entries")
VALUE_KINDS = ("top1", "top1_error")
COST_KINDS = ("mmacs", "mflops", None)


@dataclass
class Reference:
    id: str
    citation: str
    source: str
    url: str
    measured: str
    value: str
    cost: str | None
    flexbench: dict | None
    entries: list[dict]
    path: Path


def load_references(folder: Path | None = None) -> list[Reference]:
    """Every *.yaml under `folder` (default: the shipped references), validated."""
    folder = Path(folder) if folder is not None else DEFAULT_DIR
    if not folder.is_dir():
        raise ConfigError(f"references folder {folder} does not exist")
    refs = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        refs.append(_validate(doc, path))
    ids = [r.id for r in refs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"reference ids used twice in {folder}: {', '.join(dup)}")
    return refs


def _validate(doc, path: Path) -> Reference:
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping")
    missing = [k for k in REQUIRED if not doc.get(k)]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)} (every number needs a source)")
    if doc["value"] not in VALUE_KINDS:
        raise ConfigError(f"{path}: value must be one of {VALUE_KINDS}, got {doc['value']!r}")
    if doc.get("cost") not in COST_KINDS:
        raise ConfigError(f"{path}: cost must be one of {COST_KINDS}, got {doc.get('cost')!r}")
    fb = doc.get("flexbench")
    if fb is not None and not (isinstance(fb, dict) and {"arch", "dataset", "method"} <= set(fb)):
        raise ConfigError(
            f"{path}: flexbench must be null or have arch, dataset and method, got {fb!r}"
        )
    for i, e in enumerate(doc["entries"]):
        if not isinstance(e, dict) or not isinstance(e.get("value"), (int, float)):
            raise ConfigError(f"{path}: entry {i + 1} needs a numeric value")
        if fb is not None and not e.get("submodel"):
            raise ConfigError(f"{path}: entry {i + 1} needs the flexbench submodel it matches")
    return Reference(
        id=str(doc["id"]),
        citation=" ".join(str(doc["citation"]).split()),
        source=" ".join(str(doc["source"]).split()),
        url=str(doc["url"]),
        measured=" ".join(str(doc["measured"]).split()),
        value=doc["value"],
        cost=doc.get("cost"),
        flexbench=fb,
        entries=list(doc["entries"]),
        path=path,
    )


def published_top1(ref: Reference, entry: dict) -> float:
    v = float(entry["value"])
    return 100.0 - v if ref.value == "top1_error" else v


COLUMNS = [
    "reference",
    "entry",
    "arch",
    "dataset",
    "profile",
    "method",
    "submodel",
    "published top-1",
    "ours top-1",
    "ours std",
    "n",
    "ours − published",
    "published cost",
    "ours cost",
    "cost unit",
]


def compare(refs: list[Reference], tidy: pd.DataFrame) -> tuple[pd.DataFrame, list[Reference]]:
    """Rows for every entry whose arch and dataset the experiment holds (ours may be missing);
    the second value lists the references that concern nothing in this experiment."""
    rows, unrelated = [], []
    panels = tidy[["arch", "dataset", "profile"]].drop_duplicates() if not tidy.empty else None
    for ref in refs:
        fb = ref.flexbench
        matched = []
        if fb is not None and panels is not None:
            matched = [
                p
                for p in panels.itertuples(index=False)
                if p.arch == fb["arch"] and fnmatch.fnmatchcase(p.dataset, fb["dataset"])
            ]
        if not matched:
            unrelated.append(ref)
            continue
        for p in matched:
            for e in ref.entries:
                method = e.get("method", fb["method"])
                sub = e["submodel"]
                g = tidy[
                    (tidy["arch"] == p.arch)
                    & (tidy["dataset"] == p.dataset)
                    & (tidy["profile"] == p.profile)
                    & (tidy["method"] == method)
                    & (tidy["submodel"] == sub)
                ]
                pub = published_top1(ref, e)
                n = len(g)
                ours = float(g["top1"].mean()) if n else math.nan
                std = float(g["top1"].std(ddof=1)) if n > 1 else math.nan
                cost_ours = math.nan
                if ref.cost and n and g[ref.cost].notna().any():
                    cost_ours = float(g[ref.cost].mean())
                rows.append(
                    {
                        "reference": ref.id,
                        "entry": e.get("label", sub),
                        "arch": p.arch,
                        "dataset": p.dataset,
                        "profile": p.profile,
                        "method": method,
                        "submodel": sub,
                        "published top-1": pub,
                        "ours top-1": ours,
                        "ours std": std,
                        "n": n,
                        "ours − published": ours - pub if n else math.nan,
                        "published cost": float(e["cost"]) if e.get("cost") is not None else None,
                        "ours cost": cost_ours,
                        "cost unit": {"mmacs": "MMACs", "mflops": "MFLOPs"}.get(ref.cost, ""),
                    }
                )
    return pd.DataFrame(rows, columns=COLUMNS), unrelated


def sources_frame(refs: list[Reference]) -> pd.DataFrame:
    """One row per reference: what was measured and where it is printed."""
    return pd.DataFrame(
        [
            {
                "reference": r.id,
                "citation": r.citation,
                "source": r.source,
                "url": r.url,
                "measured": r.measured,
                "flexbench counterpart": (
                    f"{r.flexbench['method']} on {r.flexbench['arch']} / {r.flexbench['dataset']}"
                    if r.flexbench
                    else "none"
                ),
                "entries": len(r.entries),
            }
            for r in refs
        ]
    )
