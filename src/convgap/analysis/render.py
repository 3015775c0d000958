"""Terminal rendering of a :class:`~convgap.analysis.report.Report` with rich tables."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .report import Report, Row, Run

__all__ = ["tables", "summary_table", "layers_table", "blocks_table"]


def _ms(s: float) -> str:
    return f"{1e3 * s:.3g}"


def _pct(f: float) -> str:
    return f"{100 * f:.1f}%"


ALLOCATION_NOTE_SHARE = 0.05  # explain the malloc column once some run loses this much


def allocation_cell(run: Run) -> str:
    """What glibc's default malloc policy costs the run per call: 'ms (share)', or '-'."""
    a = run.allocation
    if not a:
        return "-"
    return f"{1e3 * a['overhead_s']:.1f} ({100 * a['share']:.0f}%)"


def summary_table(report: Report) -> Table:
    """One row per run: GMACs, measured / ideal / roofline ms, efficiency, layer-sum ratio,
    and on CPU the page faults per call and what the default malloc policy costs."""
    devices = sorted({f"{r.device_name}, {r.threads} threads, {r.dtype}" for r in report.runs})
    alloc = any(r.allocation for r in report.runs)
    caption = None
    if any(r.allocation and r.allocation["share"] > ALLOCATION_NOTE_SHARE for r in report.runs):
        caption = ("malloc cost: latency as measured minus latency with freed memory retained "
                   "(glibc mmaps large activations and returns freed heap to the kernel, so "
                   "they page-fault afresh every call). Remove it: "
                   "convgap.allocator.set_policy('retain'), or "
                   "MALLOC_MMAP_THRESHOLD_=2147483647 MALLOC_TRIM_THRESHOLD_=2147483647, or "
                   "LD_PRELOAD jemalloc/tcmalloc.")
    t = Table(title=f"convgap analyze ({'; '.join(devices)})", title_justify="left",
              caption=caption, caption_justify="left")
    predicted = any(r.total.predicted_s is not None for r in report.runs)
    cols = ["model", "batch", "layout", "GMACs", "params M", "measured ms"]
    if predicted:
        cols += ["predicted ms", "error"]
    cols += ["ideal ms", "roofline ms", "efficiency", "bound", "layers/model"]
    if alloc:
        cols += ["faults/call", "malloc cost ms"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("model", "layout", "bound") else "right")
    for r in report.runs:
        m = r.total
        cells = [r.model, str(r.batch), r.layout,
                 f"{m.macs / 1e9:.3g}", f"{m.params / 1e6:.3g}", _ms(m.measured_s)]
        if predicted:
            p = m.predicted_s
            cells += ["-", "-"] if p is None else [_ms(p), f"{p / m.measured_s - 1:+.1%}"]
        cells += [_ms(m.ideal_s), _ms(m.roofline_s), _pct(m.efficiency), m.bound,
                  f"{r.layers_ratio:.2f}x" if r.layers_timed else "-"]
        if alloc:
            cells += [f"{r.faults_per_call:.0f}" if r.faults_per_call is not None else "-",
                      allocation_cell(r)]
        t.add_row(*cells)
    return t


def _row_cells(row: Row, predicted: bool = False) -> list[str]:
    cells = [row.name, row.type, f"{row.macs / 1e6:.3g}", f"{row.intensity:.3g}",
             _ms(row.measured_s)]
    if predicted:
        cells.append("-" if row.predicted_s is None else _ms(row.predicted_s))
    return cells + [_ms(row.roofline_s), _pct(row.efficiency), _pct(row.roofline_efficiency),
                    row.bound, _pct(row.share)]


def layers_table(run: Run, top: int = 10) -> Table:
    """The ``top`` layers of ``run`` by share of the summed isolated layer time (with
    predictions: also the predictor's time of each inside the model's pass)."""
    predicted = any(r.predicted_s is not None for r in run.layers)
    t = Table(title=f"{run.label}: top {top} layers by time "
                    f"({run.device_name}, {run.threads} threads, {run.dtype})",
              title_justify="left")
    cols = ["layer", "type", "MMACs", "FLOP/B", "measured ms"]
    cols += ["predicted ms (in model)"] if predicted else []
    for col in cols + ["roofline ms", "efficiency", "of roofline", "bound", "share"]:
        t.add_column(col, justify="left" if col in ("layer", "type", "bound") else "right")
    for row in sorted(run.layers, key=lambda r: -r.measured_s)[:top]:
        t.add_row(*_row_cells(row, predicted))
    return t


def blocks_table(run: Run) -> Table:
    """Waterline of every block: measured vs layer-wise roofline vs fused roofline vs ideal."""
    caption = None
    if run.unclassified:
        caption = ("no residual or dense block found in: " + ", ".join(run.unclassified)
                   + " (no waterline or fusion estimate there)")
    t = Table(title=f"{run.label}: blocks (waterline)", title_justify="left", caption=caption,
              caption_justify="left")
    for col in ("block", "kind", "MMACs", "measured ms", "layer-wise roofline ms",
                "fused roofline ms", "ideal ms", "efficiency", "fusion could win ms"):
        t.add_column(col, justify="left" if col in ("block", "kind") else "right")
    for b in run.blocks:
        lw = b.layerwise_roofline_s or 0.0
        t.add_row(b.name, b.block_kind or "", f"{b.macs / 1e6:.3g}", _ms(b.measured_s),
                  _ms(lw), _ms(b.roofline_s), _ms(b.ideal_s), _pct(b.efficiency),
                  _ms(max(0.0, lw - b.roofline_s)))
    return t


def tables(report: Report, top: int = 10, blocks: bool = False) -> Group:
    """The summary; then per run its top layers (and, with ``blocks``, its block table)."""
    parts = [summary_table(report)]
    for run in report.runs:
        if run.layers_timed:
            parts.append(layers_table(run, top))
        if blocks and (run.blocks or run.unclassified):
            parts.append(blocks_table(run))
    if not blocks:
        seen = {}
        for run in report.runs:
            if run.unclassified:
                seen.setdefault(run.model, run.unclassified)
        for model, where in seen.items():
            parts.append(Text(f"{model}: no residual or dense block found in "
                              f"{', '.join(where)} (no waterline or fusion estimate there)"))
    return Group(*parts)
