"""Rank statistics of the report (reports/ranks.py) against hand-computed values and against the
worked example of Demšar (2006), and the critical-difference diagram on a synthetic experiment.
"""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from reports import ranks

# Demšar (2006), JMLR 7:1-30, Table 6: AUC of C4.5 with and without the cut-off parameter m and
# the confidence level cf tuned, on 14 UCI data sets (rows). The table prints "voting" as
# 0.975 / 0.975 for C4.5+cf / C4.5+m+cf but ranks them 2 and 3 (the unrounded values differ),
# and its average ranks (3.143, 2.000, 2.893, 1.964) follow those ranks: 0.97501 reproduces it.
DEMSAR_METHODS = ["C4.5", "C4.5+m", "C4.5+cf", "C4.5+m+cf"]
DEMSAR_AUC = [
    [0.763, 0.768, 0.771, 0.798],  # adult (sample)
    [0.599, 0.591, 0.590, 0.569],  # breast cancer
    [0.954, 0.971, 0.968, 0.967],  # breast cancer wisconsin
    [0.628, 0.661, 0.654, 0.657],  # cmc
    [0.882, 0.888, 0.886, 0.898],  # ionosphere
    [0.936, 0.931, 0.916, 0.931],  # iris
    [0.661, 0.668, 0.609, 0.685],  # liver disorders
    [0.583, 0.583, 0.563, 0.625],  # lung cancer
    [0.775, 0.838, 0.866, 0.875],  # lymphography
    [1.000, 1.000, 1.000, 1.000],  # mushroom
    [0.940, 0.962, 0.965, 0.962],  # primary tumor
    [0.619, 0.666, 0.614, 0.669],  # rheum
    [0.972, 0.981, 0.97501, 0.975],  # voting (see above)
    [0.957, 0.978, 0.946, 0.970],  # wine
]


def _scores(matrix: list[list[float]], methods: list[str]) -> pd.DataFrame:
    """A `reports.stats.scores` table with one case (panel, sub-model, seed) per matrix row."""
    rows = [
        {
            "arch": f"a{i}",
            "dataset": "d",
            "profile": "p",
            "method": m,
            "seed": 0,
            "key": "s",
            "key_index": 0,
            "value": v,
        }
        for i, row in enumerate(matrix)
        for m, v in zip(methods, row)
    ]
    return pd.DataFrame(rows)


def test_demsar_worked_example():
    t = ranks.rank_test(_scores(DEMSAR_AUC, DEMSAR_METHODS))
    assert t.n_cases == 14 and not t.left_out
    # §3.2.2: average ranks 3.143, 2.000, 2.893, 1.964
    avg = t.avg_rank[DEMSAR_METHODS].to_numpy()
    assert avg == pytest.approx([3.143, 2.000, 2.893, 1.964], abs=5e-4)
    assert t.methods == ["C4.5+m+cf", "C4.5+m", "C4.5+cf", "C4.5"]  # best first
    # chi2_F = 12N/(k(k+1)) [sum R_j^2 - k(k+1)^2/4] = 9.28 (the paper's, without tie
    # correction); scipy corrects for ties: divide by 1 - sum(t^3 - t) / (N k (k^2 - 1)) with
    # ties iris (2), lung cancer (2), mushroom (4), primary tumor (2): 1 - 78 / 840.
    plain = 12 * 14 / (4 * 5) * (np.sum(avg**2) - 4 * 25 / 4)
    assert plain == pytest.approx(9.28, abs=5e-3)
    assert t.chi2 == pytest.approx(plain / (1 - 78 / 840))
    # F_F = (N-1) chi2 / (N(k-1) - chi2) = 3.69 > F(3, 39; 0.05) = 2.85: reject
    ff, p_ff = ranks.iman_davenport(plain, 14, 4)
    assert ff == pytest.approx(3.69, abs=5e-3) and p_ff < 0.05
    # Nemenyi: q_0.05 = 2.569, CD = 2.569 sqrt(4 x 5 / (6 x 14)) = 1.25; q_0.10 = 2.291, CD = 1.12
    assert t.q_alpha == pytest.approx(2.569, abs=5e-4) and t.cd == pytest.approx(1.25, abs=5e-3)
    cd10, q10 = ranks.nemenyi_cd(4, 14, 0.10)
    assert q10 == pytest.approx(2.291, abs=5e-4) and cd10 == pytest.approx(1.12, abs=5e-3)
    # "... at alpha = 0.05 the post-hoc test is not powerful enough to detect any significant
    # differences"; at 0.10, C4.5 is worse than C4.5+m (1.143 > 1.12) and C4.5+m+cf.
    p = t.pvalues
    assert (p.to_numpy()[~np.eye(4, dtype=bool)] >= 0.05).all()
    below = {
        tuple(sorted((a, b))) for a in p.index for b in p.columns if a < b and p.loc[a, b] < 0.10
    }
    assert below == {("C4.5", "C4.5+m"), ("C4.5", "C4.5+m+cf")}
    # the library's pairwise p values and our CD draw the same line
    for a in p.index:
        for b in p.columns:
            if a != b:
                differ = abs(t.avg_rank[a] - t.avg_rank[b]) >= t.cd
                assert differ == (p.loc[a, b] < 0.05)


def test_ranks_friedman_and_cd_by_hand():
    # 3 methods x 4 cases, no ties. Ranks per case (1 = highest):
    #   case 1: a 1, b 2, c 3; case 2: a 1, b 3, c 2; case 3: a 2, b 1, c 3; case 4: a 1, b 2, c 3
    matrix = [[90, 80, 70], [90, 70, 80], [85, 88, 60], [70, 65, 60]]
    t = ranks.rank_test(_scores(matrix, ["a", "b", "c"]))
    assert t.avg_rank.to_dict() == pytest.approx({"a": 5 / 4, "b": 8 / 4, "c": 11 / 4})
    # chi2 = 12N/(k(k+1)) sum R^2 - 3N(k+1) = 12*4/12 * (25+64+121)/16 - 3*4*4 = 52.5 - 48
    assert t.chi2 == pytest.approx(4.5)
    # F_F = 3 * 4.5 / (4 * 2 - 4.5) = 13.5 / 3.5 with 2 and 6 degrees of freedom
    assert t.ff == pytest.approx(13.5 / 3.5)
    # Demšar Table 5(a): q_0.05 = 2.343 for k = 3 (2.3437); CD = q * sqrt(3 * 4 / 24)
    assert t.q_alpha == pytest.approx(2.343, abs=1e-3)  # printed to 3 decimals
    assert t.cd == pytest.approx(2.343 * math.sqrt(0.5), abs=1e-3)


def test_methods_missing_from_cases_are_left_out_or_cases_dropped():
    # d is missing from 3 of 4 cases: ranking a, b, c over 4 cases keeps 12 numbers, a-d over
    # the one complete case only 4, so d is left out.
    matrix = [[3, 2, 1, 0], [3, 2, 1, None], [3, 1, 2, None], [2, 3, 1, None]]
    t = ranks.rank_test(_scores(matrix, ["a", "b", "c", "d"]).dropna())
    assert t.left_out == ["d"] and t.n_cases == 4 and t.cases_left_out == 0
    # c missing from one case of 4: keeping it over 3 cases (9 numbers) beats 2 methods x 4
    matrix = [[3, 2, 1], [3, 2, None], [1, 3, 2], [3, 1, 2]]
    t = ranks.rank_test(_scores(matrix, ["a", "b", "c"]).dropna())
    assert t.left_out == [] and t.n_cases == 3 and t.cases_left_out == 1
    # d and e ran on the first architecture only (cases 0-3), f on the second (4-7): no case
    # has all six, and leaving out d, then e, completes none; without all three, 3 x 8 numbers
    matrix = [[3, 2, 1, 0, 4, None]] * 4 + [[3, 1, 2, None, None, 0]] * 4
    t = ranks.rank_test(_scores(matrix, ["a", "b", "c", "d", "e", "f"]).dropna())
    assert t is not None and t.left_out == ["d", "e", "f"] and t.n_cases == 8
    # two methods: Friedman does not apply (the paired test does)
    assert ranks.rank_test(_scores([[1, 2], [2, 1]], ["a", "b"])) is None


def test_seeds_needed_power_estimate():
    # Sample sizes of a two-sided paired t-test, alpha 0.05, power 0.8, as G*Power gives them
    # (and Guenther's approximation ((z_.975 + z_.8) / d)^2 + z_.975^2 / 2 rounded up):
    # d_z = 0.5 -> 34, 0.8 -> 15, 1.0 -> 10. Differences (d - a, d + a), a = 1/sqrt 2: sd 1.
    a = 1 / math.sqrt(2)
    for dz, n in ((0.5, 34), (0.8, 15), (1.0, 10)):
        assert ranks.seeds_needed([dz - a, dz + a]) == n
        assert ranks.seeds_needed([-dz - a, -dz + a]) == n  # the sign does not matter
    assert ranks.seeds_needed([1.0]) is None  # no spread from one seed
    assert ranks.seeds_needed([2.0, 2.0, 2.0]) is None  # no spread at all
    assert ranks.seeds_needed([-1.0, 1.0]) is None  # no difference to detect
    assert ranks.seeds_needed([0.01 - a, 0.01 + a]) == ranks.N_MAX + 1  # beyond the search


def test_cd_diagram_of_a_synthetic_experiment(tmp_path):
    """4 methods over 12 cases: d < c < b < a everywhere except 4 cases where b beats a. Ranks
    a 16/12, b 20/12, c 3, d 4; chi2 = 12*12/20 * sum R^2 - 3*12*5 = 32.8. CD(k=4, N=12) =
    2.569 sqrt(20/72) = 1.354: a and b are tied by a bar; c, d differ from a."""
    from reports.cd_diagram import cd_diagram
    from reports.style import method_styles

    methods = ["joint", "ipkd", "ipkd_ta", "takd"]  # a, b, c, d
    matrix = [[70 + i, 69 + i, 60 + i, 50 + i] for i in range(8)]
    matrix += [[69 + i, 70 + i, 60 + i, 50 + i] for i in range(4)]
    t = ranks.rank_test(_scores(matrix, methods))
    assert t.avg_rank.to_dict() == pytest.approx(
        {"joint": 16 / 12, "ipkd": 20 / 12, "ipkd_ta": 3.0, "takd": 4.0}
    )
    assert t.chi2 == pytest.approx(12 * 12 / 20 * sum(r**2 for r in t.avg_rank) - 180)
    assert t.chi2 == pytest.approx(32.8)
    assert t.cd == pytest.approx(2.569 * math.sqrt(20 / 72), abs=1e-3)
    assert t.pvalues.loc["joint", "ipkd"] > 0.05 and t.pvalues.loc["joint", "takd"] < 0.05
    fig = cd_diagram(t, method_styles(methods), tmp_path)
    png = tmp_path / "figures" / "cd_diagram.png"
    assert fig.files == [png, tmp_path / "figures" / "cd_diagram.pdf"]
    img = mpimg.imread(png)
    assert img.shape[1] > 500 and img.std() > 0.05
    assert "CD" in fig.caption and "N = 12" in fig.caption and "1.35" in fig.caption
