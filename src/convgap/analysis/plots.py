"""Figures of a convgap report: efficiency gap, per-layer efficiency, block waterline.

Every function takes report objects (:class:`~convgap.analysis.report.Run`) and returns a
:class:`matplotlib.figure.Figure` drawn on its own Agg canvas. pyplot is never imported, so
nothing here touches the user's backend or pyplot's figure registry; save a figure with
``fig.savefig(path)``.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .report import Run

__all__ = ["efficiency_gap", "layer_efficiency", "waterline", "EFFICIENCIES"]

#: Efficiencies of the dashed diagonals of the efficiency-gap plot.
EFFICIENCIES: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1)

FIGSIZE = (11.0, 5.0)
DPI = 110
_LAYOUT_MARKERS = {"nchw": "o", "channels_last": "s"}
_OTHER_MARKERS = ("^", "D", "v", "P", "X")
_BOUND_COLORS = {"compute": "tab:blue", "memory": "tab:orange"}
_OTHER_BOUND_COLOR = "tab:gray"


def _figure(figsize: tuple[float, float] = FIGSIZE) -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _ms(seconds: float | None) -> float:
    """Seconds -> milliseconds for a log axis: missing or non-positive -> NaN (not drawn)."""
    if seconds is None or not seconds > 0 or math.isinf(seconds):
        return math.nan
    return seconds * 1e3


def _roof_text(run: Run) -> str:
    return f"{run.device_name}, {run.dtype}, {run.threads} threads"


def _run_title(run: Run) -> str:
    return f"{run.label} — {_roof_text(run)}"


def _message(fig: Figure, ax, text: str) -> Figure:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12,
            color="0.3")
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def _layout_marker(layout: str, seen: dict[str, str]) -> str:
    if layout in _LAYOUT_MARKERS:
        return _LAYOUT_MARKERS[layout]
    if layout not in seen:
        seen[layout] = _OTHER_MARKERS[len(seen) % len(_OTHER_MARKERS)]
    return seen[layout]


def _sparse_ticks(ax, labels: Sequence[str], max_labels: int = 30, rotation: float = 60):
    """Tick every k-th position (at most ``max_labels`` labels), labels rotated."""
    n = len(labels)
    k = max(1, math.ceil(n / max_labels))
    idx = list(range(0, n, k))
    ax.set_xticks(idx)
    ax.set_xticklabels([labels[i] for i in idx], rotation=rotation, ha="right",
                       rotation_mode="anchor", fontsize=7)


def efficiency_gap(runs: Iterable[Run],
                   efficiencies: Sequence[float] = EFFICIENCIES) -> Figure:
    """The efficiency-gap plot: x = MACs (log), y = latency in ms (log).

    Each run is its ideal point (open marker) joined to its measured point (filled marker)
    by a segment: the gap. One colour per model, one marker per layout. Dashed diagonals of
    constant computational efficiency, latency = 2 * MACs / (peak * efficiency), use the
    peak FLOP/s of the first run (named in the title). The diagonal for efficiency ``e``
    has ``gid`` ``f"efficiency-{round(100 * e)}"``.
    """
    runs = [r for r in runs if r.total.macs > 0 and r.total.ideal_s > 0
            and r.total.measured_s > 0]
    fig = _figure()
    ax = fig.add_subplot()
    if not runs:
        ax.set_title("Efficiency gap")
        return _message(fig, ax, "no runs with MACs and a measured latency")

    roof = runs[0]
    peak = roof.peak_flops
    palette = [f"C{i}" for i in range(10)]
    colors: dict[str, str] = {}
    other_markers: dict[str, str] = {}
    xs: list[float] = []
    ys: list[float] = []
    for i, run in enumerate(runs):
        color = colors.setdefault(run.model, palette[len(colors) % len(palette)])
        marker = _layout_marker(run.layout, other_markers)
        x = float(run.total.macs)
        y_ideal, y_meas = _ms(run.total.ideal_s), _ms(run.total.measured_s)
        ax.plot([x, x], [y_ideal, y_meas], color=color, lw=1.5, alpha=0.7, zorder=2)
        ax.plot([x], [y_ideal], marker=marker, ls="none", ms=7, mfc="white", mec=color,
                mew=1.5, zorder=3)
        ax.plot([x], [y_meas], marker=marker, ls="none", ms=7, color=color, zorder=3)
        ax.annotate(run.label, (x, y_meas), xytext=(6, 4 + 8 * (i % 2)),
                    textcoords="offset points", fontsize=7.5, color=color, zorder=4)
        xs.append(x)
        ys += [y_ideal, y_meas]

    # limits: points padded, diagonals drawn across the whole x range, their labels at the
    # right end inside the axes.
    x_lo, x_hi = min(xs) / 4.0, max(xs) * 4.0

    def diag(x: float, eff: float) -> float:
        return 2.0 * x / (peak * eff) * 1e3

    x_label = x_hi / 1.3
    label_ys = [diag(x_label, e) for e in efficiencies if e > 0]
    y_lo = min(ys + label_ys) / 2.5
    y_hi = max(ys + label_ys) * 2.5
    for eff in efficiencies:
        if eff <= 0:
            continue
        pct = round(100 * eff)
        ax.plot([x_lo, x_hi], [diag(x_lo, eff), diag(x_hi, eff)], ls="--", lw=0.9,
                color="0.55", zorder=1, gid=f"efficiency-{pct}")
        ax.text(x_label, diag(x_label, eff), f"{pct:g}%", ha="right", va="bottom",
                fontsize=8, color="0.35", zorder=1,
                bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.7))

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set_xlabel("MACs")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, which="major", lw=0.4, alpha=0.5)
    ax.set_title(f"Efficiency gap — diagonals: constant computational efficiency on "
                 f"{_roof_text(roof)} (peak {peak / 1e9:.3g} GFLOP/s)", fontsize=10)

    handles = [Line2D([], [], color=c, lw=2, label=m) for m, c in colors.items()]
    layouts = dict.fromkeys(r.layout for r in runs)
    handles += [Line2D([], [], color="0.3", marker=_layout_marker(l, other_markers),
                       ls="none", label=l) for l in layouts]
    handles += [Line2D([], [], color="0.3", marker="o", mfc="white", ls="none",
                       label="ideal"),
                Line2D([], [], color="0.3", marker="o", ls="none", label="measured")]
    # below the 100 % diagonal nothing can be: the lower right corner is free.
    ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.9)
    return fig


def layer_efficiency(run: Run, max_labels: int = 30) -> Figure:
    """Per layer call, in forward order: computational efficiency (bars, coloured by bound)
    and roofline efficiency (markers) in %; below, measured vs roofline latency (ms, log).
    Layers with 0 MACs have computational efficiency 0 by definition and are kept."""
    layers = run.layers
    fig = _figure((11.0, 6.0))
    if not layers:
        ax = fig.add_subplot()
        ax.set_title(f"Per-layer efficiency — {_run_title(run)}", fontsize=10)
        return _message(fig, ax, "no layers")

    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1.1, 1.0])
    x = list(range(len(layers)))
    eff = [100.0 * r.efficiency for r in layers]
    roof_eff = [100.0 * r.roofline_efficiency for r in layers]
    colors = [_BOUND_COLORS.get(r.bound, _OTHER_BOUND_COLOR) for r in layers]
    top.bar(x, eff, width=0.8, color=colors, zorder=2)
    top.plot(x, roof_eff, ls="none", marker="_", ms=7, mew=1.5, color="black", zorder=3)
    y_top = max([100.0] + [v for v in eff + roof_eff if math.isfinite(v)])
    top.set_ylim(0, y_top * 1.05)
    top.set_ylabel("efficiency (%)")
    top.grid(True, axis="y", lw=0.4, alpha=0.5)
    handles = [Patch(color=c, label=f"computational efficiency, {b}-bound")
               for b, c in _BOUND_COLORS.items()]
    if any(r.bound not in _BOUND_COLORS for r in layers):
        handles.append(Patch(color=_OTHER_BOUND_COLOR, label="computational efficiency"))
    handles.append(Line2D([], [], ls="none", marker="_", ms=7, mew=1.5, color="black",
                          label="roofline efficiency"))
    top.legend(handles=handles, loc="upper right", fontsize=7.5, ncol=len(handles),
               framealpha=0.9)
    top.set_title(f"Per-layer efficiency — {_run_title(run)}", fontsize=10)

    bottom.plot(x, [_ms(r.measured_s) for r in layers], marker="o", ms=3, lw=0.8,
                color="tab:red", label="measured")
    bottom.plot(x, [_ms(r.roofline_s) for r in layers], marker="x", ms=3.5, lw=0.8,
                ls="--", color="tab:green", label="roofline")
    bottom.set_yscale("log")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("layer call (forward order)")
    bottom.grid(True, which="major", lw=0.4, alpha=0.5)
    bottom.legend(loc="upper right", fontsize=7.5, ncol=2, framealpha=0.9)
    bottom.set_xlim(-0.7, len(layers) - 0.3)
    top.tick_params(labelbottom=False)
    _sparse_ticks(bottom, [r.name for r in layers], max_labels)
    return fig


_WATERLINE_SERIES = (
    ("measured", "measured_s", "tab:red"),
    ("sum of layer-wise rooflines", "layerwise_roofline_s", "tab:orange"),
    ("fused-block roofline", "roofline_s", "tab:green"),
    ("ideal", "ideal_s", "tab:blue"),
)


def waterline(run: Run, max_labels: int = 40) -> Figure:
    """Per block: measured latency, sum of its layers' rooflines, its fused (one-kernel)
    roofline and its ideal latency, as grouped bars (ms, log). The distance between the
    layer-wise and the fused roofline is what fusion can win."""
    fig = _figure()
    ax = fig.add_subplot()
    title = f"Waterline — {_run_title(run)}"
    if not run.blocks:
        ax.set_title(title, fontsize=10)
        return _message(fig, ax, "no residual blocks found")

    blocks = run.blocks
    n_series = len(_WATERLINE_SERIES)
    width = 0.8 / n_series
    values: list[float] = []
    for i, (label, attr, color) in enumerate(_WATERLINE_SERIES):
        ys = [_ms(getattr(b, attr)) for b in blocks]
        xs = [j + (i - (n_series - 1) / 2) * width for j in range(len(blocks))]
        ax.bar(xs, ys, width=width, color=color, label=label, zorder=2)
        values += [y for y in ys if math.isfinite(y)]
    ax.set_yscale("log")
    if values:
        # bars of a log axis start at the bottom limit: keep it well below the smallest.
        ax.set_ylim(min(values) / 3.0, max(values) * 2.0)
    ax.set_ylabel("latency (ms)")
    ax.set_xlim(-0.6, len(blocks) - 0.4)
    ax.grid(True, axis="y", which="major", lw=0.4, alpha=0.5)
    _sparse_ticks(ax, [b.name for b in blocks], max_labels, rotation=45)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=n_series, fontsize=8,
              frameon=False)
    fig.suptitle(title, fontsize=10)
    return fig
