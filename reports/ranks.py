"""Rank statistics across cases, a win/tie/loss count and a seed-count estimate.

A *case* is one (arch, dataset, profile, sub-model, seed): every method evaluated on it gets a
rank, 1 = highest test top-1, ties sharing the mean of their ranks. Over the cases where all
compared methods have a number, the procedure of Demšar (2006), "Statistical comparisons of
classifiers over multiple data sets", JMLR 7:1-30, §3.2.2:

- average rank R_j of each method;
- Friedman test of "all methods rank alike" (`scipy.stats.friedmanchisquare`, which corrects
  for ties) and Iman-Davenport's F_F = (N-1) chi2 / (N(k-1) - chi2), F-distributed with k-1 and
  (k-1)(N-1) degrees of freedom;
- Nemenyi post-hoc test: two methods differ when their average ranks differ by at least
  CD = q_alpha sqrt(k(k+1) / (6N)), q_alpha = studentized range quantile (k groups, infinite
  degrees of freedom, `scipy.stats.studentized_range`) / sqrt(2); pairwise p values by
  `scikit_posthocs.posthoc_nemenyi_friedman`, the same test.

Cases of one cell are not independent (its sub-models share weights), nor are the panels'
seeds: the tests treat them as if they were, so their p values are optimistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scikit_posthocs as sp
from scipy import stats as st

from reports.load import PANEL
from reports.stats import ALPHA, SUMMARIES

CASE = [*PANEL, "key", "seed"]
POWER = 0.8  # target power of the seed-count estimate
N_MAX = 1000  # above this many seeds the estimate says "> N_MAX"


@dataclass
class RankTest:
    """Friedman/Nemenyi over `n_cases` cases; `avg_rank` is sorted best (lowest) first."""

    avg_rank: pd.Series  # method -> average rank, 1 = best
    n_cases: int
    chi2: float
    p_chi2: float
    ff: float
    p_ff: float
    alpha: float
    q_alpha: float
    cd: float
    pvalues: pd.DataFrame  # Nemenyi p, methods x methods
    left_out: list[str] = field(default_factory=list)  # methods not ranked (too few cases)
    cases_left_out: int = 0  # cases without every ranked method

    @property
    def methods(self) -> list[str]:
        return list(self.avg_rank.index)


def case_matrix(sc: pd.DataFrame) -> pd.DataFrame:
    """Test top-1 as cases (rows: panel, sub-model, seed) x methods; summaries left out so
    that no cell counts twice."""
    subs = sc[~sc["key"].isin(SUMMARIES)]
    if subs.empty:
        return pd.DataFrame()
    return subs.pivot_table(index=CASE, columns="method", values="value", aggfunc="first")


def complete_cases(matrix: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The methods to rank and the cases where each of them has a number: of all method sets
    of at least 3 (Friedman's minimum), the one that keeps the most numbers (cases x methods),
    the larger set on a tie; the second value lists the methods left out. Exact: a best set is
    the intersection of the method sets of the cases it keeps, so only the intersections of
    the cases' method sets are tried (e.g. a grid that runs some methods on one architecture
    only gives one set per architecture and their common methods). With no such set of 3, the
    cases where all methods have a number."""
    present = matrix.notna()
    patterns = {frozenset(present.columns[row]) for row in present.to_numpy()}
    closed, frontier = set(patterns), set(patterns)
    while frontier:
        frontier = {a & b for a in frontier for b in closed} - closed
        closed |= frontier

    def numbers(methods: frozenset) -> tuple[int, int]:
        return len(methods) * int(present[list(methods)].all(axis=1).sum()), len(methods)

    sets = [m for m in closed if len(m) >= 3]
    if not sets:
        return matrix.dropna(), []
    best = max(sets, key=numbers)
    kept = [c for c in matrix.columns if c in best]
    return matrix.loc[present[kept].all(axis=1), kept], [c for c in matrix.columns if c not in best]


def average_ranks(matrix: pd.DataFrame) -> pd.Series:
    """Mean over the cases of each method's rank, 1 = highest value; ties share ranks."""
    ranks = matrix.rank(axis=1, ascending=False, method="average")
    return ranks.mean().sort_values(kind="stable")


def iman_davenport(chi2: float, n: int, k: int) -> tuple[float, float]:
    """F_F and its p value from Friedman's chi2 with n cases and k methods (Demšar 2006, §3.2.2)."""
    denom = n * (k - 1) - chi2
    if denom <= 0:
        return math.inf, 0.0
    ff = (n - 1) * chi2 / denom
    return float(ff), float(st.f.sf(ff, k - 1, (k - 1) * (n - 1)))


def nemenyi_cd(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """(CD, q_alpha): critical difference of average ranks for k methods over n cases; q_alpha is
    the studentized range quantile at 1 - alpha (k groups, df = inf) divided by sqrt(2)."""
    q = float(st.studentized_range.ppf(1 - alpha, k, np.inf)) / math.sqrt(2)
    return q * math.sqrt(k * (k + 1) / (6 * n)), q


def rank_test(sc: pd.DataFrame, alpha: float = ALPHA) -> RankTest | None:
    """Friedman + Nemenyi over the complete cases of a scores table (`reports.stats.scores`).
    None when fewer than 3 methods or 2 complete cases remain (Friedman needs k >= 3; two
    methods are compared by the paired test instead)."""
    matrix = case_matrix(sc)
    if matrix.shape[1] < 3:
        return None
    full, left_out = complete_cases(matrix)
    n, k = full.shape
    if k < 3 or n < 2:
        return None
    avg = average_ranks(full)
    chi2, p = st.friedmanchisquare(*(full[c].to_numpy() for c in full.columns))
    ff, p_ff = iman_davenport(float(chi2), n, k)
    cd, q = nemenyi_cd(k, n, alpha)
    pv = sp.posthoc_nemenyi_friedman(full.reset_index(drop=True))
    return RankTest(
        avg_rank=avg,
        n_cases=n,
        chi2=float(chi2),
        p_chi2=float(p),
        ff=ff,
        p_ff=p_ff,
        alpha=alpha,
        q_alpha=q,
        cd=cd,
        pvalues=pv.loc[avg.index, avg.index],
        left_out=left_out,
        cases_left_out=len(matrix) - n,
    )


def win_tie_loss(pairs: pd.DataFrame, baseline: str | None, order: list[str]) -> pd.DataFrame:
    """Per method: over the (panel, sub-model) cells it shares with the baseline, how often its
    mean is significantly above (win) or below (loss) the baseline's by the paired t-test of
    `reports.stats.paired` (p < 0.05 with >= 3 pairs); every other cell is a tie."""
    cols = ["method", "cells", "wins", "ties", "losses", "ties with < 3 pairs"]
    if baseline is None or pairs.empty:
        return pd.DataFrame(columns=cols)
    subs = pairs[~pairs["key"].isin(SUMMARIES) & (pairs["n"] > 0)]
    rows = []
    for m in [m for m in order if m in set(subs["method"])]:
        g = subs[subs["method"] == m]
        sig = g["mark"].fillna("") != ""
        wins = int((sig & (g["diff_mean"] > 0)).sum())
        losses = int((sig & (g["diff_mean"] < 0)).sum())
        few = int((g["n"] < 3).sum())
        rows.append([m, len(g), wins, len(g) - wins - losses, losses, few])
    return pd.DataFrame(rows, columns=cols)


def seeds_needed(diffs, alpha: float = ALPHA, power: float = POWER, n_max: int = N_MAX):
    """Smallest number of paired seeds at which a two-sided paired t-test at level `alpha`
    detects the observed mean difference with probability `power`, taking the observed mean
    and sample std of the differences as the true ones (noncentral t, effect size
    d_z = mean / std; Cohen 1988, ch. 2). None when undefined (< 2 differences, zero std or
    zero mean), `n_max + 1` when more than `n_max` seeds would be needed."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return None
    sd = float(np.std(d, ddof=1))
    if sd == 0 or float(np.mean(d)) == 0:
        return None
    dz = abs(float(np.mean(d))) / sd
    n = np.arange(2, n_max + 1)
    crit = st.t.ppf(1 - alpha / 2, n - 1)
    nc = dz * np.sqrt(n)
    pw = st.nct.sf(crit, n - 1, nc) + st.nct.cdf(-crit, n - 1, nc)
    hit = np.nonzero(pw >= power)[0]
    return int(n[hit[0]]) if len(hit) else n_max + 1


def separation(sc: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Per (panel, sub-model or summary): the two methods with the best mean, their paired
    difference over shared seeds, and `seeds_needed` for it (a simple power estimate)."""
    cols = [*PANEL, "key", "best", "second", "n pairs", "diff_mean", "diff_std", "seeds needed"]
    rows = []
    for group, g in summary.groupby([*PANEL, "key"], sort=False):
        panel, key = group[:3], group[3]
        top = g[g["n"] > 0].sort_values("mean", ascending=False)
        if len(top) < 2:
            continue
        a, b = top["method"].iloc[0], top["method"].iloc[1]
        h = sc[(sc[PANEL] == pd.Series(panel, index=PANEL)).all(axis=1) & (sc["key"] == key)]
        va = h[h["method"] == a].set_index("seed")["value"]
        vb = h[h["method"] == b].set_index("seed")["value"]
        shared = sorted(set(va.index) & set(vb.index))
        d = (va[shared] - vb[shared]).to_numpy(dtype=float)
        rows.append(
            {
                **dict(zip(PANEL, panel)),
                "key": key,
                "key_index": int(g["key_index"].iloc[0]),
                "best": a,
                "second": b,
                "n pairs": len(d),
                "diff_mean": float(d.mean()) if len(d) else math.nan,
                "diff_std": float(d.std(ddof=1)) if len(d) > 1 else math.nan,
                "seeds needed": seeds_needed(d),
            }
        )
    if not rows:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame(rows).sort_values([*PANEL, "key_index"]).reset_index(drop=True)
    return out[cols]
