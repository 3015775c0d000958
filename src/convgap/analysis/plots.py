"""Figures of a convgap report: efficiency gap, per-layer efficiency, block waterline.

Every function takes report objects (:class:`~convgap.analysis.report.Run`) and returns a
:class:`matplotlib.figure.Figure` drawn on its own Agg canvas. pyplot is never imported, so
nothing here touches the user's backend or pyplot's figure registry; save a figure with
``fig.savefig(path)``.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import offset_copy

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
_GAP_MARKER_SIZE = 7.0       # points
_GAP_MARKER_EDGE = 1.5       # points
_GAP_LABEL_SIZE = 7.5        # points


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

    Each run is labelled by its measured point (gid ``f"gap-label-{i}"``, i its index).
    While the axes have room, labels overlap neither one another nor the legend nor the
    diagonals' percentages, and stay inside the axes; a label moved away from a crowded
    point is joined to it by a thin leader line (gid ``f"gap-leader-{i}"``). The label
    positions are computed for the figure's size: the layout is settled when the figure is
    built (constrained layout once, then fixed); any dpi saves alike.
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
    labels: list[tuple[str, float, float, float, str]] = []
    for run in runs:
        color = colors.setdefault(run.model, palette[len(colors) % len(palette)])
        marker = _layout_marker(run.layout, other_markers)
        x = float(run.total.macs)
        y_ideal, y_meas = _ms(run.total.ideal_s), _ms(run.total.measured_s)
        ax.plot([x, x], [y_ideal, y_meas], color=color, lw=1.5, alpha=0.7, zorder=2)
        ax.plot([x], [y_ideal], marker=marker, ls="none", ms=_GAP_MARKER_SIZE, mfc="white",
                mec=color, mew=_GAP_MARKER_EDGE, zorder=3)
        ax.plot([x], [y_meas], marker=marker, ls="none", ms=_GAP_MARKER_SIZE, color=color,
                zorder=3)
        labels.append((run.label, x, y_ideal, y_meas, color))
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
    _place_gap_labels(fig, ax, labels)
    return fig


def _place_gap_labels(fig: Figure, ax, labels: Sequence[tuple[str, float, float, float, str]]
                      ) -> None:
    """Label each run at its measured point so that no two labels overlap, none leaves the
    axes, and none covers the legend or a diagonal's percentage; markers and gap segments
    are avoided where possible.

    The layout is settled first (constrained layout runs once, then the axes stay where it
    put them), so positions are final in display coordinates. Labels are then placed
    greedily, the most crowded point first: each takes the cheapest free candidate on rings
    of growing radius around its point (cost: distance, a slight preference for the upper
    right, penalties for covering markers or segments). A label set apart from its point is
    joined to it by a thin leader line in its colour. Offsets are kept in points, so the
    figure saves alike at any dpi."""
    if not labels:
        return
    fig.draw_without_rendering()           # run constrained layout once ...
    fig.set_layout_engine("none")          # ... and keep the axes where it put them
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    to_px = ax.transData.transform

    axes_box = ax.get_window_extent(renderer)
    margin = 2.0 * px_per_pt               # between a label and anything else
    hard: list[tuple[float, float, float, float]] = []   # boxes no label may touch
    legend = ax.get_legend()
    if legend is not None:
        b = legend.get_window_extent(renderer)
        hard.append((b.x0, b.y0, b.x1, b.y1))
    for t in ax.texts:                      # the diagonals' percentages
        b = t.get_window_extent(renderer)
        hard.append((b.x0, b.y0, b.x1, b.y1))

    # markers (both points of every run) and the gap segments: avoided where possible
    r_mark = (_GAP_MARKER_SIZE / 2 + _GAP_MARKER_EDGE / 2) * px_per_pt
    half_seg = 1.5 * px_per_pt
    # box + penalty per px^2; per run: measured marker, ideal marker, segment
    soft: list[tuple[float, float, float, float, float]] = []
    points = []
    for _, x, y_ideal, y_meas, _ in labels:
        (px, py_m), (_, py_i) = to_px([(x, y_meas), (x, y_ideal)])
        points.append((px, py_m))
        for py in (py_m, py_i):
            soft.append((px - r_mark, py - r_mark, px + r_mark, py + r_mark, 4.0))
        lo, hi = sorted((py_m, py_i))
        soft.append((px - half_seg, lo, px + half_seg, hi, 1.0))
    hard_a = np.array(hard, dtype=float).reshape(-1, 4)
    soft_a = np.array(soft, dtype=float).reshape(-1, 5)

    # the most crowded points choose first
    pts = np.array(points)
    d = np.hypot(*(pts[:, None, :] - pts[None, :, :]).transpose(2, 0, 1))
    crowd = (d < 60 * px_per_pt).sum(axis=1)
    order = sorted(range(len(labels)), key=lambda i: (-crowd[i], i))

    gap0 = r_mark + 2.0 * px_per_pt          # first ring: just off the marker
    lead_from = gap0 + 6.0 * px_per_pt       # farther than this: a leader line
    diag = math.hypot(axes_box.width, axes_box.height)
    radii, r, step = [], gap0, 3.0 * px_per_pt
    while r < diag:
        radii.append(r)
        r += step
        step *= 1.25
    placed: list[tuple[float, float, float, float]] = []
    leaders: list[tuple[float, float, float, float]] = []
    for i in order:
        name, x, _, y_meas, color = labels[i]
        px, py = points[i]
        probe = ax.text(x, y_meas, name, fontsize=_GAP_LABEL_SIZE, ha="left", va="bottom")
        ext = probe.get_window_extent(renderer)
        probe.remove()
        w, h = ext.width, ext.height
        dx0, dy0 = ext.x0 - px, ext.y0 - py     # the text's box against its anchor

        # candidate boxes: on rings around the point, the gap along each ray = radius
        cands = []
        for r in radii:
            n = max(16, min(256, int(math.ceil(2 * math.pi * r / max(h, 1.0)))))
            th = np.arange(n) * (2 * math.pi / n) + math.radians(30)
            ux, uy = np.cos(th), np.sin(th)
            with np.errstate(divide="ignore"):
                t = r + np.minimum(np.where(ux != 0, w / 2 / np.abs(ux), np.inf),
                                   np.where(uy != 0, h / 2 / np.abs(uy), np.inf))
            cx, cy = px + ux * t, py + uy * t
            pref = (1 - np.cos(th - math.radians(30))) * 2.0 * px_per_pt
            cands.append(np.stack([cx - w / 2, cy - h / 2, np.full(n, r) + pref], axis=1))
        c = np.concatenate(cands)
        x0, y0, cost = c[:, 0], c[:, 1], c[:, 2].copy()
        x1, y1 = x0 + w, y0 + h
        ok = ((x0 >= axes_box.x0 + margin) & (x1 <= axes_box.x1 - margin)
              & (y0 >= axes_box.y0 + margin) & (y1 <= axes_box.y1 - margin))
        for boxes in (hard_a, np.array(placed, dtype=float).reshape(-1, 4)):
            if len(boxes):
                hit = ((x0[:, None] < boxes[None, :, 2] + margin)
                       & (boxes[None, :, 0] - margin < x1[:, None])
                       & (y0[:, None] < boxes[None, :, 3] + margin)
                       & (boxes[None, :, 1] - margin < y1[:, None]))
                ok &= ~hit.any(axis=1)
        ow = (np.minimum(x1[:, None], soft_a[None, :, 2])
              - np.maximum(x0[:, None], soft_a[None, :, 0])).clip(min=0)
        oh = (np.minimum(y1[:, None], soft_a[None, :, 3])
              - np.maximum(y0[:, None], soft_a[None, :, 1])).clip(min=0)
        cost += (ow * oh * soft_a[None, :, 4]).sum(axis=1) / px_per_pt
        # leader lines: a candidate's own should not cross a placed label, nor its box a
        # placed leader
        qx = np.clip(px, x0, x1)
        qy = np.clip(py, y0, y1)
        far = np.hypot(qx - px, qy - py) > lead_from
        if placed:
            pb = np.array(placed, dtype=float)
            pb[:, :2] -= margin
            pb[:, 2:] += margin
            crossed = _segments_hit_boxes(np.full(len(c), px), np.full(len(c), py), qx, qy,
                                          pb).any(axis=1)
            cost += np.where(far & crossed, 200.0 * px_per_pt, 0.0)
        if leaders:
            la = np.array(leaders, dtype=float)
            boxes = np.stack([x0 - margin, y0 - margin, x1 + margin, y1 + margin], axis=1)
            crossed = _segments_hit_boxes(la[:, 0], la[:, 1], la[:, 2], la[:, 3],
                                          boxes).any(axis=0)
            cost += np.where(crossed, 200.0 * px_per_pt, 0.0)
        # ... nor run over another marker or segment (nor its own ideal point)
        others = np.delete(soft_a[:, :4], [3 * i, 3 * i + 2], axis=0)
        crossed = _segments_hit_boxes(np.full(len(c), px), np.full(len(c), py), qx, qy,
                                      others).sum(axis=1)
        cost += np.where(far, 15.0 * px_per_pt * crossed, 0.0)
        if not ok.any():       # no free place left: inside the axes, the least overlap
            taken = np.concatenate([hard_a, np.array(placed, dtype=float).reshape(-1, 4)])
            ow = (np.minimum(x1[:, None], taken[None, :, 2])
                  - np.maximum(x0[:, None], taken[None, :, 0])).clip(min=0)
            oh = (np.minimum(y1[:, None], taken[None, :, 3])
                  - np.maximum(y0[:, None], taken[None, :, 1])).clip(min=0)
            cost += 100.0 * (ow * oh).sum(axis=1)
            ok = ((x0 >= axes_box.x0) & (x1 <= axes_box.x1)
                  & (y0 >= axes_box.y0) & (y1 <= axes_box.y1))
            if not ok.any():
                ok[:] = True
        k = int(np.argmin(np.where(ok, cost, np.inf)))
        bx0, by0 = x0[k], y0[k]
        placed.append((bx0, by0, bx0 + w, by0 + h))

        off_x, off_y = (bx0 - dx0 - px) / px_per_pt, (by0 - dy0 - py) / px_per_pt
        ax.text(x, y_meas, name, fontsize=_GAP_LABEL_SIZE, color=color, ha="left",
                va="bottom", zorder=4, gid=f"gap-label-{i}",
                transform=offset_copy(ax.transData, fig=fig, x=off_x, y=off_y,
                                      units="points"),
                bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.75))
        # a leader line from the marker's edge to the nearest point of the label's box
        qx, qy = float(qx[k]), float(qy[k])
        dist = math.hypot(qx - px, qy - py)
        if dist > lead_from:
            sx, sy = px + (qx - px) * r_mark / dist, py + (qy - py) * r_mark / dist
            inv = ax.transData.inverted()
            (lx0, ly0), (lx1, ly1) = inv.transform([(sx, sy), (qx, qy)])
            ax.add_line(Line2D([lx0, lx1], [ly0, ly1], color=color, lw=0.7, alpha=0.8,
                               zorder=3, gid=f"gap-leader-{i}"))
            leaders.append((sx, sy, qx, qy))


def _segments_hit_boxes(ax0, ay0, ax1, ay1, boxes) -> np.ndarray:
    """(N segments) x (M boxes): does segment n cross box m (x0, y0, x1, y1)? Liang-Barsky
    clipping, vectorised; a segment touching a box counts."""
    ax0, ay0, ax1, ay1 = (np.asarray(v, dtype=float)[:, None] for v in (ax0, ay0, ax1, ay1))
    b = np.asarray(boxes, dtype=float).reshape(-1, 4)
    dx, dy = ax1 - ax0, ay1 - ay0
    t0 = np.zeros((ax0.shape[0], b.shape[0]))
    t1 = np.ones_like(t0)
    inside = np.ones_like(t0, dtype=bool)
    for p, q in ((-dx, ax0 - b[None, :, 0]), (dx, b[None, :, 2] - ax0),
                 (-dy, ay0 - b[None, :, 1]), (dy, b[None, :, 3] - ay0)):
        p = np.broadcast_to(p, t0.shape)
        q = np.broadcast_to(q, t0.shape)
        parallel = p == 0
        inside &= ~(parallel & (q < 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(parallel, 0.0, q / np.where(parallel, 1.0, p))
        t0 = np.where(~parallel & (p < 0), np.maximum(t0, r), t0)
        t1 = np.where(~parallel & (p > 0), np.minimum(t1, r), t1)
    return inside & (t0 <= t1)


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
    ("layers measured one by one", "layers_measured_s", "tab:pink"),
    ("measured", "measured_s", "tab:red"),
    ("sum of layer-wise rooflines", "layerwise_roofline_s", "tab:orange"),
    ("fused-block roofline", "roofline_s", "tab:green"),
    ("ideal", "ideal_s", "tab:blue"),
)


def waterline(run: Run, max_labels: int = 40) -> Figure:
    """Per block: its layers measured one by one, the block measured, sum of its layers'
    rooflines, its fused (one-kernel) roofline and its ideal latency, as grouped bars (ms,
    log). The distance between the layer-wise and the fused roofline is what fusion can
    win; on a fused model (:func:`convgap.fuse`) a fused block's measured bar is hatched
    ("measured, fused"): what fusion won is its distance to the layers measured one by
    one."""
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
    fused = [b.type.startswith("Fused") for b in blocks]
    for i, (label, attr, color) in enumerate(_WATERLINE_SERIES):
        ys = [_ms(getattr(b, attr)) for b in blocks]
        xs = [j + (i - (n_series - 1) / 2) * width for j in range(len(blocks))]
        if attr == "measured_s" and any(fused):
            plain = [k for k, f in enumerate(fused) if not f]
            if plain:
                ax.bar([xs[k] for k in plain], [ys[k] for k in plain], width=width,
                       color=color, label=label, zorder=2)
            done = [k for k, f in enumerate(fused) if f]
            ax.bar([xs[k] for k in done], [ys[k] for k in done], width=width, color=color,
                   hatch="//", edgecolor="black", linewidth=0.3, label="measured, fused",
                   zorder=2)
        else:
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
