"""One colour and one marker per method, the same in every figure; sizes for two-column papers."""

from __future__ import annotations

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies and in greyscale
# through the markers. Known methods get fixed entries so that a method looks the same in every
# report; methods flexbench does not know get the remaining entries in sorted order.
_PALETTE = [
    "#000000",  # black
    "#E69F00",  # orange
    "#0072B2",  # blue
    "#009E73",  # green
    "#D55E00",  # vermillion
    "#CC79A7",  # purple
    "#56B4E9",  # sky blue
    "#999999",  # grey
    "#F0E442",  # yellow (last: weak on white)
]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h"]
KNOWN_METHODS = [
    "joint",
    "independent",
    "ipkd",
    "ipkd_ta",
    "takd",
    "ekd",
    "multi_teacher",
    "hsd",
]

# Widths in inches: one column / two columns of a typical two-column paper.
COLUMN_WIDTH = 3.4
PAGE_WIDTH = 7.0
RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "lines.linewidth": 1.3,
    "lines.markersize": 4.5,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "savefig.dpi": 200,
    "pdf.fonttype": 42,  # embed TrueType: editable text in the PDF, accepted by publishers
}


def method_styles(methods: list[str]) -> dict[str, dict[str, str]]:
    """{method: {"color": ..., "marker": ...}} — deterministic for a given set of methods."""
    styles: dict[str, dict[str, str]] = {}
    free = list(range(len(KNOWN_METHODS), len(_PALETTE)))
    for m in sorted(set(methods)):
        if m in KNOWN_METHODS:
            i = KNOWN_METHODS.index(m)
        elif free:
            i = free.pop(0)
        else:  # more unknown methods than palette entries: cycle
            i = len(styles) % len(_PALETTE)
        styles[m] = {"color": _PALETTE[i % len(_PALETTE)], "marker": _MARKERS[i % len(_MARKERS)]}
    return styles


def method_order(methods: list[str], baseline: str | None) -> list[str]:
    """Baseline first, then known methods in their canonical order, then the rest sorted."""
    rest = sorted(
        set(methods) - {baseline},
        key=lambda m: (KNOWN_METHODS.index(m) if m in KNOWN_METHODS else len(KNOWN_METHODS), m),
    )
    return ([baseline] if baseline in methods else []) + rest
