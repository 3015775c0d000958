"""The HTML page of a convgap report: ``index.html`` beside its PNG plots and ``report.json``.

The page is self-contained apart from the PNGs (relative ``<img src>``), with a little inline
CSS; every string from the report is html-escaped.
"""

from __future__ import annotations

import html as _html
import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import plots
from .report import Report, Row, Run

__all__ = ["save_html", "fmt", "slug"]

_META_ORDER = ("convgap", "torch", "device", "device_name", "threads", "dtype", "date")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto;
       max-width: 1250px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.88em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.55em; }
th { background: #f3f3f3; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
table.meta th { background: none; border: none; padding-right: 1.2em; }
table.meta td { border: none; }
img { max-width: 100%; height: auto; display: block; margin: 0.6em 0; }
.compute { color: #1f77b4; } .memory { color: #ff7f0e; }
.note { color: #555; font-size: 0.92em; }
details summary { cursor: pointer; font-weight: 600; margin: 0.6em 0; }
"""


def fmt(x: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits; integers >= 10**digits in full with
    thousands separators; None/NaN -> an en dash."""
    if x is None:
        return "–"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if v == 0:
        return "0"
    v = float(f"{v:.{digits}g}")  # round first: 999.6 -> 1000, not "1e+03"
    if abs(v) >= 10 ** digits:
        return f"{v:,.0f}"
    if abs(v) < 1e-3:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def _ms(seconds: float | None) -> str:
    return fmt(None if seconds is None else seconds * 1e3)


def _pct(fraction: float | None) -> str:
    return fmt(None if fraction is None else fraction * 100)


def slug(run: Run) -> str:
    """A filesystem-safe name for a run, from its model, batch and layout."""
    s = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{run.model}_b{run.batch}_{run.layout}")
    s = re.sub(r"-{2,}", "-", s).strip("-_")
    return s[:80] or "run"


def _slugs(runs: Sequence[Run]) -> list[str]:
    """One distinct slug per run (a suffix where model/batch/layout repeat)."""
    out: list[str] = []
    seen: set[str] = set()
    for run in runs:
        base = s = slug(run)
        if s in seen:
            s = f"{base}_{run.dtype}" if run.dtype else base
            s = re.sub(r"[^A-Za-z0-9_-]+", "-", s)
        i = 2
        while s in seen:
            s = f"{base}_{i}"
            i += 1
        seen.add(s)
        out.append(s)
    return out


def _e(x: Any) -> str:
    return _html.escape(str(x), quote=True)


def _shape(shape: Any) -> str:
    if isinstance(shape, (list, tuple)) and all(isinstance(v, int) for v in shape):
        return "×".join(str(v) for v in shape) if shape else "scalar"
    if shape is None:
        return "–"
    return str(shape)


def _table(headers: Sequence[str], rows: Iterable[Sequence[tuple[str, bool]]],
           cls: str = "") -> str:
    """rows: cells as (already escaped html, is_number)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for cells in rows:
        body.append("<tr>" + "".join(f'<td class="n">{c}</td>' if num else f"<td>{c}</td>"
                                     for c, num in cells) + "</tr>")
    c = f' class="{cls}"' if cls else ""
    return (f"<table{c}><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body)
            + "\n</tbody></table>")


def _n(text: str) -> tuple[str, bool]:
    return _e(text), True


def _t(text: Any) -> tuple[str, bool]:
    return _e(text), False


def _bound(bound: str) -> tuple[str, bool]:
    cls = bound if bound in ("compute", "memory") else ""
    return f'<span class="{cls}">{_e(bound)}</span>', False


def _meta_table(meta: dict) -> str:
    if not meta:
        return ""
    keys = [k for k in _META_ORDER if k in meta] + [k for k in meta if k not in _META_ORDER]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(meta[k])}</td></tr>" for k in keys)
    return f'<table class="meta"><tbody>{rows}</tbody></table>'


SUMMARY_HEADERS = ("model", "batch", "layout", "dtype", "GMACs", "params (M)",
                   "measured (ms)", "ideal (ms)", "roofline (ms)",
                   "computational efficiency (%)", "bound",
                   "sum of isolated layers / whole model")


def _summary(runs: Sequence[Run], slugs: Sequence[str]) -> str:
    rows = []
    for run, s in zip(runs, slugs):
        t = run.total
        rows.append([(f'<a href="#{_e(s)}">{_e(run.model)}</a>', False), _n(str(run.batch)),
                     _t(run.layout), _t(run.dtype), _n(fmt(t.macs / 1e9)),
                     _n(fmt(t.params / 1e6)), _n(_ms(t.measured_s)), _n(_ms(t.ideal_s)),
                     _n(_ms(t.roofline_s)), _n(_pct(t.efficiency)), _bound(t.bound),
                     _n(fmt(run.layers_ratio) + "×" if run.layers_timed else "–")])
    return _table(SUMMARY_HEADERS, rows, "summary")


BLOCK_HEADERS = ("block", "kind", "GMACs", "measured (ms)", "layer-wise roofline (ms)",
                 "fused roofline (ms)", "ideal (ms)", "efficiency (%)",
                 "fusion could win (ms)")


def _fusion_win(b: Row) -> float | None:
    if b.layerwise_roofline_s is None:
        return None
    return b.layerwise_roofline_s - b.roofline_s


def _blocks(run: Run) -> str:
    if not run.blocks:
        return '<p class="note">No residual blocks found.</p>'
    rows = []
    for b in run.blocks:
        win = _fusion_win(b)
        rows.append([_t(b.name), _t(b.block_kind or b.type), _n(fmt(b.macs / 1e9)),
                     _n(_ms(b.measured_s)), _n(_ms(b.layerwise_roofline_s)),
                     _n(_ms(b.roofline_s)), _n(_ms(b.ideal_s)), _n(_pct(b.efficiency)),
                     _n(_ms(win))])
    return _table(BLOCK_HEADERS, rows, "blocks")


LAYER_HEADERS = ("layer", "type", "output shape", "MMACs", "kB moved", "intensity (FLOP/B)",
                 "measured (ms)", "roofline (ms)", "efficiency (%)",
                 "roofline efficiency (%)", "bound", "share (%)")


def _layers(run: Run) -> str:
    if not run.layers:
        return '<p class="note">No layer rows.</p>'
    rows = []
    for r in run.layers:
        rows.append([_t(r.name), _t(r.type), _t(_shape(r.output_shape)),
                     _n(fmt(r.macs / 1e6)), _n(fmt(r.bytes / 1e3)), _n(fmt(r.intensity)),
                     _n(_ms(r.measured_s)), _n(_ms(r.roofline_s)), _n(_pct(r.efficiency)),
                     _n(_pct(r.roofline_efficiency)), _bound(r.bound), _n(_pct(r.share))])
    return (f"<details><summary>All {len(run.layers)} layer calls</summary>\n"
            + _table(LAYER_HEADERS, rows, "layers") + "\n</details>")


_GAP_TEXT = (
    "Each model is a vertical segment at its number of multiply-accumulates (MACs). The open "
    "marker is its <em>ideal latency</em> (FLOPs / peak FLOP/s, FLOPs = 2 × MACs), the "
    "filled marker its measured latency; the length of the segment on the log axis is the "
    "efficiency gap. The dashed diagonals are latencies of constant computational efficiency "
    "(ideal / measured) of 100 %, 50 %, 25 % and 10 % on the roof named in the title: a "
    "measured point on the 25 % diagonal uses a quarter of the device's peak. Points further "
    "up and to the left are less efficient; two models at the same height have the same "
    "latency however different their MACs. The peak is a measured large GEMM, not a datasheet "
    "number, so a model whose convolutions beat that GEMM (fused, compiled) can sit slightly "
    "below the 100 % diagonal.")


def _run_section(run: Run, s: str, layers_png: str, waterline_png: str) -> str:
    t = run.total
    facts = [f"{_e(run.dtype)} on {_e(run.device_name)} ({_e(run.device)}), "
             f"{_e(run.threads)} threads",
             f"input {_e(_shape(list(run.input_shape)))}",
             f"roofs: peak {_e(fmt(run.peak_flops / 1e9))} GFLOP/s, "
             f"bandwidth {_e(fmt(run.bandwidth / 1e9))} GB/s",
             f"measured {_e(_ms(t.measured_s))} ms, ideal {_e(_ms(t.ideal_s))} ms, "
             f"roofline {_e(_ms(t.roofline_s))} ms, "
             f"computational efficiency {_e(_pct(t.efficiency))} %"]
    if run.layers_timed:
        facts.append(f"sum of {len(run.layers)} isolated layer calls "
                     f"{_e(_ms(run.layers_sum_s))} ms = {_e(fmt(run.layers_ratio))}× "
                     "the whole model")
    if t.layerwise_roofline_s is not None:
        facts.append(f"whole model: layer-wise roofline {_e(_ms(t.layerwise_roofline_s))} ms")
    if run.allocation:
        a = run.allocation
        facts.append(
            f"malloc ({_e(a.get('policy', run.malloc))}, {_e(fmt(run.faults_per_call or 0))} "
            f"page faults per call): {_e(_ms(a['current_s']))} ms as measured, "
            f"{_e(_ms(a['retain_s']))} ms with freed memory retained; the process's malloc "
            f"policy costs {_e(_ms(a['overhead_s']))} ms ({_e(_pct(a['share']))} %) per call "
            "(<code>convgap.allocator.set_policy('retain')</code> removes it)")
    if run.unattributed_macs:
        facts.append(f"<strong>{_e(fmt(run.unattributed_macs / 1e6))} MMACs not attributed "
                     "to any layer</strong>")
    if run.unclassified:
        facts.append("no residual or dense block found in: " + ", ".join(
            _e(u) for u in run.unclassified) + " (no waterline or fusion estimate there)")
    items = "".join(f"<li>{f}</li>" for f in facts)
    return f"""
<section id="{_e(s)}">
<h2>{_e(run.label)}</h2>
<ul>{items}</ul>
<h3>Per-layer efficiency</h3>
<img src="{_e(layers_png)}" alt="{_e('per-layer efficiency of ' + run.label)}">
<p class="note">Bars: computational efficiency (ideal / measured; 0 for layers without
MACs). Marks: roofline efficiency (roofline / measured). A memory-bound layer above 100 %
kept its data in cache: its working set is smaller than the last-level cache, so DRAM
bandwidth, which the roofline assumes, was not its limit.</p>
<h3>Waterline</h3>
<img src="{_e(waterline_png)}" alt="{_e('waterline of ' + run.label)}">
<p class="note">Per block: measured latency, the sum of its layers' roofline latencies
(each layer reading and writing DRAM), its roofline as one fused kernel (block input +
weights + block output) and its ideal latency. Layer-wise minus fused roofline is what
fusion could win.</p>
<h3>Blocks</h3>
{_blocks(run)}
<h3>Layers</h3>
{_layers(run)}
</section>"""


def _save(fig, path: Path) -> None:
    fig.savefig(path, format="png", dpi=plots.DPI)


def save_html(report: Report, directory: Path) -> Path:
    """Write ``gap.png``, ``<slug>_layers.png`` and ``<slug>_waterline.png`` per run,
    ``report.json`` and ``index.html`` into ``directory``; return the path of index.html."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    runs = list(report.runs)
    slugs = _slugs(runs)

    _save(plots.efficiency_gap(runs), directory / "gap.png")
    sections = []
    for run, s in zip(runs, slugs):
        layers_png, waterline_png = f"{s}_layers.png", f"{s}_waterline.png"
        _save(plots.layer_efficiency(run), directory / layers_png)
        _save(plots.waterline(run), directory / waterline_png)
        sections.append(_run_section(run, s, layers_png, waterline_png))
    report.to_json(directory / "report.json")

    title = "convgap report"
    if runs:
        models = list(dict.fromkeys(r.model for r in runs))
        title += ": " + ", ".join(models[:6]) + (" …" if len(models) > 6 else "")
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{_e(title)}</h1>
{_meta_table(report.meta)}
<p class="note">All numbers as measured by <code>convgap analyze</code>; the whole report
as JSON: <a href="report.json">report.json</a>.</p>
<h2>Summary</h2>
{_summary(runs, slugs) if runs else '<p class="note">No runs.</p>'}
<h2>Efficiency gap</h2>
<img src="gap.png" alt="efficiency-gap plot">
<p>{_GAP_TEXT}</p>
{''.join(sections)}
</body>
</html>
"""
    index = directory / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
