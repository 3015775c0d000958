"""Tests for the report figures (convgap.analysis.plots) and the HTML page (.html)."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest
from matplotlib.figure import Figure

from convgap.analysis import plots
from convgap.analysis.report import Report, Row, Run

PEAK = 1e12        # FLOP/s
BW = 1e11          # bytes/s
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = 'tiny<net>&"q\''


def row(name, kind, macs, nbytes, measured_s, *, type_="Conv2d", share=0.0, block=None,
        block_kind=None, layerwise_roofline_s=None, params=1000, out=(1, 8, 4, 4)):
    ideal = 2 * macs / PEAK
    mem = nbytes / BW
    return Row(name=name, kind=kind, type=type_, input_shape=(1, 8, 4, 4),
               output_shape=tuple(out), macs=macs, params=params, bytes=nbytes,
               measured_s=measured_s, ideal_s=ideal, roofline_s=max(ideal, mem),
               bound="compute" if ideal >= mem else "memory", share=share, block=block,
               block_kind=block_kind, layerwise_roofline_s=layerwise_roofline_s)


def make_run(model, batch, layout, measured_s, macs, *, blocks=True, n_layers=4):
    layers = []
    for i in range(n_layers):
        if i % 3 == 2:   # a 0-MAC layer (activation): efficiency 0 by definition
            layers.append(row(f"layer{i}.relu", "layer", 0, 2_000_000, 1e-4, type_="ReLU",
                              block="layer0.0" if blocks else None))
        else:
            layers.append(row(f"layer{i}.conv", "layer", macs // n_layers, 500_000,
                              measured_s / n_layers, block="layer0.0" if blocks else None))
    total_layers = sum(r.measured_s for r in layers)
    for r in layers:
        r.share = r.measured_s / total_layers
    blk = []
    if blocks:
        blk = [row("layer0.0", "block", macs // 2, 800_000, measured_s / 2, type_="Bottleneck",
                   block_kind="bottleneck", layerwise_roofline_s=3e-5, share=0.5),
               row("layer0.1", "block", macs // 2, 300_000, measured_s / 3, type_="Bottleneck",
                   block_kind="bottleneck", layerwise_roofline_s=None, share=0.33)]
    total = row("model", "model", macs, 5_000_000, measured_s, type_=model, params=11_689_512,
                layerwise_roofline_s=sum(r.roofline_s for r in layers))
    return Run(model=model, batch=batch, input_shape=(batch, 3, 224, 224), layout=layout,
               dtype="float32", device="cpu", device_name="Test CPU <x86>", threads=2,
               peak_flops=PEAK, bandwidth=BW, total=total, layers=layers, blocks=blk,
               unattributed_macs=0)


def _plain(d):
    """A dict as JSON would hold it (tuples -> lists)."""
    return json.loads(json.dumps(d, default=list))


@pytest.fixture
def report():
    runs = [make_run(EVIL, 1, "nchw", 0.012345, 1_800_000_000),
            make_run("resnet18", 8, "channels_last", 0.0456, 14_500_000_000),
            make_run("resnet18", 8, "nchw", 0.1, 14_500_000_000, blocks=False, n_layers=6)]
    return Report(runs, {"convgap": "0.1.0", "torch": "2.13.0", "device": "cpu",
                         "threads": 2, "date": "2026-11-02", "note": "<script>x</script>"})


def test_save_html_writes_page_plots_and_json(report, tmp_path):
    out = tmp_path / "rep"
    index = report.save_html(out)
    assert index == out / "index.html" and index.exists()
    page = index.read_text(encoding="utf-8")

    # every PNG written is referenced, every referenced PNG exists and is a real PNG
    srcs = set(re.findall(r'<img src="([^"]+)"', page))
    written = {p.name for p in out.glob("*.png")}
    assert srcs == written
    assert "gap.png" in written and len(written) == 1 + 2 * len(report.runs)
    for name in srcs:
        assert "/" not in name and not name.startswith(".")
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 5000

    # report.json round-trips
    back = Report.from_json(out / "report.json")
    assert back.runs == report.runs and back.meta == report.meta
    assert _plain(back.to_dict()) == _plain(report.to_dict())
    assert back.runs[0].model == EVIL
    assert back.runs[1].total.measured_s == 0.0456
    assert back.runs[2].blocks == []

    # summary table: measured ms to 3 significant digits
    summary = page.split('<table class="summary">', 1)[1].split("</table>", 1)[0]
    assert summary.count("<tr>") == 1 + len(report.runs)
    for expected in ("12.3", "45.6", "100"):
        assert f'<td class="n">{expected}</td>' in summary
    # ideal ms of run 0: 2 * 1.8e9 / 1e12 s = 3.6 ms; efficiency 3.6 / 12.345 = 29.2 %
    assert '<td class="n">3.6</td>' in summary
    assert '<td class="n">29.2</td>' in summary

    # html special characters are escaped, in the model name and in meta
    assert "<net>" not in page and "<script>" not in page and "<x86>" not in page
    assert "tiny&lt;net&gt;&amp;&quot;q&#x27;" in page
    assert "&lt;script&gt;" in page

    # per-run content: block table with the fusion win, layer table in <details>
    assert page.count("<details>") == len(report.runs)
    assert "No residual blocks found." in page


def test_block_table_fusion_win(tmp_path):
    run = make_run("m", 1, "nchw", 0.01, 1_000_000)   # tiny MACs: blocks memory-bound
    b = run.blocks[0]
    assert b.bound == "memory" and b.roofline_s == pytest.approx(8e-6)
    index = Report([run]).save_html(tmp_path)
    blocks = index.read_text().split('<table class="blocks">', 1)[1].split("</table>")[0]
    first = blocks.split("<tr>")[2]
    # fusion could win: layer-wise 3e-5 s - fused 8e-6 s = 0.022 ms
    assert '<td class="n">0.022</td>' in first
    # second block has no layer-wise roofline: a dash, not a crash
    assert "–" in blocks.split("<tr>")[3]


def test_slugs_are_safe_and_distinct():
    from convgap.analysis.html import _slugs
    a = make_run("../evil/ name", 1, "nchw", 0.01, 10**9)
    b = make_run("../evil/ name", 1, "nchw", 0.01, 10**9)
    b.dtype = "bfloat16"
    s = _slugs([a, b])
    assert len(set(s)) == 2
    for x in s:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", x)


def _line(fig: Figure, gid: str):
    lines = [l for ax in fig.axes for l in ax.get_lines() if l.get_gid() == gid]
    assert len(lines) == 1, gid
    return lines[0]


def test_efficiency_gap_diagonals(report):
    fig = plots.efficiency_gap(report.runs)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    l100 = _line(fig, "efficiency-100")
    xs, ys = l100.get_xdata(), l100.get_ydata()
    assert len(xs) >= 2
    for x, y in zip(xs[:2], ys[:2]):
        assert y == pytest.approx(2 * x / PEAK * 1e3)          # ms
    l10 = _line(fig, "efficiency-10")
    assert l10.get_ydata()[0] == pytest.approx(10 * ys[0])
    for g in ("efficiency-50", "efficiency-25"):
        _line(fig, g)
    # all points inside the limits, the roof named in the title
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    for run in report.runs:
        assert x0 < run.total.macs < x1
        assert y0 < run.total.ideal_s * 1e3 < y1 and y0 < run.total.measured_s * 1e3 < y1
    assert "Test CPU <x86>" in ax.get_title() and "float32" in ax.get_title()
    texts = [t.get_text() for t in ax.texts]
    assert {"100%", "50%", "25%", "10%"} <= set(texts)
    fig.savefig(io.BytesIO(), format="png")
    # no runs: a figure all the same
    plots.efficiency_gap([]).savefig(io.BytesIO(), format="png")


def test_waterline_without_blocks(report):
    fig = plots.waterline(report.runs[2])
    assert isinstance(fig, Figure)
    assert any("no residual blocks found" in t.get_text() for t in fig.axes[0].texts)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == PNG_MAGIC


def test_waterline_bars(report):
    fig = plots.waterline(report.runs[1])
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    bars = [p for c in ax.containers for p in c]
    assert len(bars) == 5 * len(report.runs[1].blocks)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["layers measured one by one", "measured"] and "ideal" in labels
    assert not any(p.get_hatch() for p in bars)


def test_waterline_marks_fused_blocks():
    run = make_run("fused", 1, "nchw", 0.01, 10**9)
    run.blocks[0].type = "FusedBottleneck"
    for b in run.blocks:
        b.layers_measured_s = 2 * b.measured_s
    ax = plots.waterline(run).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "measured, fused" in labels and "measured" in labels
    hatched = [p for c in ax.containers for p in c if p.get_hatch()]
    assert len(hatched) == 1


def test_layer_efficiency_many_layers():
    run = make_run("big", 1, "nchw", 0.5, 10**10, n_layers=170)
    fig = plots.layer_efficiency(run)
    top, bottom = fig.axes[:2]
    assert len(top.patches) == 170                    # 0-MAC layers kept (height 0)
    assert min(p.get_height() for p in top.patches) == 0
    assert len(bottom.get_xticks()) <= 30
    assert bottom.get_yscale() == "log"
    fig.savefig(io.BytesIO(), format="png")


class _NoPyplot:
    """A meta-path finder that refuses to import matplotlib.pyplot."""

    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib.pyplot":
            raise ImportError("convgap must not import pyplot")
        return None


def test_plots_do_not_import_pyplot(report, monkeypatch):
    import importlib
    monkeypatch.delitem(sys.modules, "matplotlib.pyplot", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoPyplot(), *sys.meta_path])
    mod = importlib.reload(plots)          # the import of the module itself
    run = report.runs[0]
    for fig in (mod.efficiency_gap(report.runs), mod.layer_efficiency(run),
                mod.waterline(run), mod.waterline(report.runs[2])):
        fig.savefig(io.BytesIO(), format="png")
    assert "matplotlib.pyplot" not in sys.modules
