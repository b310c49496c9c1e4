"""Statistics over seeds: mean, std, 95% CI, paired tests against a baseline method.

Everything works on a long `scores` table: one row per (arch, dataset, profile, method, seed, key)
where `key` is a sub-model name or one of the per-cell summaries `MEAN` (mean top-1 over the
sub-models), `AUC` (normalised area under top-1 vs the panel's `cost`: MFLOPs, or GBitOps
where only bit-widths separate the sub-models, see `reports.load`) and, for cells that ran
early exiting, `EE_AUC` (the cell's `test/budgeted_auc`: the area under its early-exit curve).
So a summary gets exactly the same treatment (CIs, paired tests, tables) as a sub-model.
Rows carry the panel's `cost_axis`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats as st

from benchmark.costs.axis import auc_top1
from reports.load import PANEL

MEAN = "top-1 mean"
AUC = "AUC"
EE_AUC = "early-exit AUC"
SUMMARIES = (MEAN, AUC, EE_AUC)  # the per-cell summary keys, after the sub-models
ALPHA = 0.05
MIN_N_SIGNIFICANCE = 3  # never mark significance with fewer paired seeds
MIN_N_WILCOXON = 6  # below 6 pairs the exact two-sided Wilcoxon p cannot reach 0.05
# Costs of a sub-model (NaN for the summaries) and the panel's cost axis (on every row).
COSTS = ("mflops", "gbitops", "cost_axis", "cost")


def scores(tidy: pd.DataFrame) -> pd.DataFrame:
    """Long table: per cell, one row per sub-model (top-1) plus the summaries (`SUMMARIES`)."""
    cols = [*PANEL, "method", "seed", "key", "key_index", *COSTS, "value"]
    if tidy.empty:
        return pd.DataFrame(columns=cols)
    subs = tidy.rename(columns={"submodel": "key", "submodel_index": "key_index", "top1": "value"})
    subs = subs[cols]
    rows = []
    for cell, g in tidy.groupby([*PANEL, "method", "seed"], sort=False):
        g = g.dropna(subset=["top1"])
        if g.empty:
            continue
        base = dict(zip([*PANEL, "method", "seed"], cell), cost_axis=g["cost_axis"].iloc[0])
        rows.append({**base, "key": MEAN, "key_index": 1000, "value": g["top1"].mean()})
        if g["cost"].notna().all():
            value = auc_top1(g["cost"].tolist(), g["top1"].tolist())
            rows.append({**base, "key": AUC, "key_index": 1001, "value": value})
        if "budgeted_auc" in g and g["budgeted_auc"].notna().any():
            value = float(g["budgeted_auc"].dropna().iloc[0])
            rows.append({**base, "key": EE_AUC, "key_index": 1002, "value": value})
    out = pd.concat([subs, pd.DataFrame(rows, columns=cols)], ignore_index=True)
    out["key_index"] = out["key_index"].astype(int)
    return out


def _mean(x: pd.Series) -> float:
    return float(x.mean()) if x.notna().any() else math.nan


def describe(values) -> dict[str, float]:
    """n, mean, sample std (ddof=1), and the half-width of the t-based 95% CI of the mean.
    std and CI are NaN with a single value."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci95": math.nan}
    if n == 1:
        return {"n": 1, "mean": float(x[0]), "std": math.nan, "ci95": math.nan}
    std = float(np.std(x, ddof=1))
    ci = float(st.t.ppf(1 - ALPHA / 2, n - 1) * std / math.sqrt(n))
    return {"n": n, "mean": float(np.mean(x)), "std": std, "ci95": ci}


def summarize(sc: pd.DataFrame) -> pd.DataFrame:
    """Per (panel, method, key): n, mean, std, ci95 over seeds, the costs, and the seeds used."""
    cols = [*PANEL, "method", "key", "key_index", *COSTS, "n", "mean", "std", "ci95", "seeds"]
    if sc.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for key, g in sc.groupby([*PANEL, "method", "key"], sort=False):
        d = describe(g["value"].tolist())
        rows.append(
            {
                **dict(zip([*PANEL, "method", "key"], key)),
                "key_index": int(g["key_index"].iloc[0]),
                **{c: _mean(g[c]) for c in ("mflops", "gbitops", "cost")},
                "cost_axis": g["cost_axis"].iloc[0],
                **d,
                "seeds": ",".join(str(s) for s in sorted(g["seed"].unique())),
            }
        )
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values([*PANEL, "method", "key_index"]).reset_index(drop=True)


def paired_test(diffs) -> dict[str, float]:
    """Paired t-test of method - baseline differences over seeds (`scipy.stats.ttest_rel` on the
    pairs is the one-sample t-test of the differences), plus the exact Wilcoxon signed-rank test
    when there are at least MIN_N_WILCOXON pairs. Degenerate cases give NaN, never an error."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    out = {"t": math.nan, "p": math.nan, "wilcoxon_w": math.nan, "wilcoxon_p": math.nan}
    if n < 2:
        return out
    if np.allclose(d, d[0]):  # zero variance: the t statistic is undefined
        if np.allclose(d, 0):
            out["p"] = 1.0
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = st.ttest_1samp(d, 0.0)
        out["t"], out["p"] = float(res.statistic), float(res.pvalue)
        if n >= MIN_N_WILCOXON and np.any(d != 0):
            w = st.wilcoxon(d)
            out["wilcoxon_w"], out["wilcoxon_p"] = float(w.statistic), float(w.pvalue)
    return out


def mark(p: float, n: int) -> str:
    """'**' p < 0.01, '*' p < 0.05, '' otherwise or when n < MIN_N_SIGNIFICANCE."""
    if n < MIN_N_SIGNIFICANCE or p is None or math.isnan(p):
        return ""
    return "**" if p < 0.01 else "*" if p < ALPHA else ""


def paired(sc: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """Per (panel, method != baseline, key): statistics of the paired differences over the seeds
    both methods finished (methods share initial weights per seed, so the pairs are matched)."""
    cols = [
        *PANEL,
        "method",
        "key",
        "key_index",
        "n",
        "seeds",
        "diff_mean",
        "diff_std",
        "diff_ci95",
        "t",
        "p",
        "wilcoxon_w",
        "wilcoxon_p",
        "mark",
    ]
    if sc.empty or baseline is None:
        return pd.DataFrame(columns=cols)
    rows = []
    for panel, g in sc.groupby(PANEL, sort=False):
        base = g[g["method"] == baseline].set_index(["key", "seed"])["value"]
        if base.empty:
            continue
        for (method, key), h in g[g["method"] != baseline].groupby(["method", "key"], sort=False):
            pairs = [
                (s, v - base[(key, s)]) for s, v in zip(h["seed"], h["value"]) if (key, s) in base
            ]
            pairs.sort()
            diffs = [d for _, d in pairs]
            d = describe(diffs)
            test = paired_test(diffs)
            rows.append(
                {
                    **dict(zip(PANEL, panel)),
                    "method": method,
                    "key": key,
                    "key_index": int(h["key_index"].iloc[0]),
                    "n": d["n"],
                    "seeds": ",".join(str(s) for s, _ in pairs),
                    "diff_mean": d["mean"],
                    "diff_std": d["std"],
                    "diff_ci95": d["ci95"],
                    **test,
                    "mark": mark(test["p"], d["n"]),
                }
            )
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values([*PANEL, "method", "key_index"]).reset_index(drop=True)
