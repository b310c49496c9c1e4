"""One colour and one marker per method, the same in every figure; sizes for two-column papers."""

from __future__ import annotations

import itertools

# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), then darker
# ones from Paul Tol's palettes, so that every registered method and the variants of a report
# (`ipkd (T=3.71, a=0.62)`, `joint [arch.n_blocks=4]`) differ by colour, not only by marker.
# A registered method's `plot_slot` (declared in its file) picks its colour, marker and place in
# legends, so a method looks the same in every report and adding a method changes no other's
# style; names without a slot (variants, methods from older runs) take the free slots in sorted
# order.
_PALETTE = [
    "#000000",  # black
    "#E69F00",  # orange
    "#0072B2",  # blue
    "#009E73",  # green
    "#D55E00",  # vermillion
    "#CC79A7",  # purple
    "#56B4E9",  # sky blue
    "#999999",  # grey
    "#F0E442",  # yellow (weak on white)
    "#882255",  # wine
    "#999933",  # olive
    "#332288",  # indigo
    "#8C510A",  # brown
    "#44AA99",  # teal
    "#AA4499",  # magenta
    "#DDCC77",  # sand
    "#117733",  # dark green
    "#661100",  # dark red
    "#6699CC",  # steel blue
    "#AA4466",  # rose
    "#4477AA",  # mid blue
    "#997700",  # ochre
    "#BBBBBB",  # light grey
    "#EE99AA",  # pink
]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h"]

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


def declared_slots() -> dict[str, int]:
    """{method: plot_slot} of the registered methods that declare one."""
    from benchmark.methods import METHODS  # here: importing the methods imports torch

    slots = {name: METHODS.get(name).plot_slot for name in METHODS.names()}
    return {name: slot for name, slot in slots.items() if slot is not None}


def slot_style(slot: int) -> dict[str, str]:
    """Colour and marker of a slot; past the palette (24 colours) the marker shifts, so slot 24
    (black squares) still differs from slot 0 (black circles)."""
    n = len(_PALETTE)
    return {"color": _PALETTE[slot % n], "marker": _MARKERS[(slot + slot // n) % len(_MARKERS)]}


def _slots(methods: list[str]) -> dict[str, int]:
    declared = declared_slots()
    taken = set(declared.values())
    free = (i for i in itertools.count() if i not in taken)
    return {m: declared[m] if m in declared else next(free) for m in sorted(set(methods))}


def method_styles(methods: list[str]) -> dict[str, dict[str, str]]:
    """{method: {"color": ..., "marker": ...}}: fixed per registered method (its `plot_slot`),
    deterministic for a given set of other names."""
    return {m: slot_style(slot) for m, slot in _slots(methods).items()}


def method_order(methods: list[str], baseline: str | None) -> list[str]:
    """Baseline first, then the others by slot (registered methods in their declared order),
    ties by name."""
    slots = _slots(methods)
    rest = sorted(set(methods) - {baseline}, key=lambda m: (slots[m], m))
    return ([baseline] if baseline in methods else []) + rest
