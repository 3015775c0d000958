"""Label placement of the efficiency-gap plot (convgap.analysis.plots.efficiency_gap):
model labels never overlap each other, and stay inside the axes and the figure."""

from __future__ import annotations

import io
import itertools
import random

import pytest
from matplotlib.text import Text

from convgap.analysis import plots
from convgap.analysis.report import Row, Run

PEAK = 494e9       # FLOP/s, the roof of the README's `make run` (AMD EPYC Zen 5, 2 threads)


def run(model: str, gmacs: float, measured_ms: float, *, batch: int = 1,
        layout: str = "nchw") -> Run:
    macs = int(gmacs * 1e9)
    ideal = 2 * macs / PEAK
    total = Row(name="model", kind="model", type=model, input_shape=(batch, 3, 224, 224),
                output_shape=(batch, 1000), macs=macs, params=1, bytes=1,
                measured_s=measured_ms / 1e3, ideal_s=ideal, roofline_s=ideal,
                bound="compute")
    return Run(model=model, batch=batch, input_shape=(batch, 3, 224, 224), layout=layout,
               dtype="float32", device="cpu", device_name="AMD EPYC", threads=2,
               peak_flops=PEAK, bandwidth=9e10, total=total)


# the README's `make run`: resnet50, convnext_tiny and convfirst nearly coincide
MAKE_RUN = [run("resnet50", 4.09, 35.9), run("mobilenet_v2", 0.301, 10.7),
            run("convnext_tiny", 4.46, 60.4), run("convfirst", 4.5, 35.5)]

# closer still: MACs within 10-20 %, latencies within 10 %, both layouts, two batches
CLUSTER = [run("resnet50", 4.09, 35.9), run("convnext_tiny", 4.46, 37.1),
           run("convfirst", 4.50, 35.5), run("resnet50", 4.09, 34.0, layout="channels_last"),
           run("convnext_tiny", 4.46, 36.5, layout="channels_last"),
           run("convfirst", 4.50, 38.0, layout="channels_last"),
           run("mobilenet_v2", 0.301, 10.7), run("resnet18", 1.82, 17.0),
           run("resnet50", 32.7, 270.0, batch=8), run("convfirst", 36.0, 262.0, batch=8),
           run("convnext_tiny", 35.7, 255.0, batch=8)]

# the same point eight times: nothing to tell them apart but their labels
SAME = [run(f"net{i}", 4.0, 30.0) for i in range(8)]


def _random_cluster(seed: int, n: int = 12) -> list[Run]:
    """n runs with MACs within 20 % and latencies within 10 % of one another."""
    rng = random.Random(seed)
    return [run(f"model{i}", 4.0 * rng.uniform(1.0, 1.2), 35.0 * rng.uniform(1.0, 1.1),
                batch=rng.choice([1, 8]), layout=rng.choice(["nchw", "channels_last"]))
            for i in range(n)]


CASES = {"make_run": MAKE_RUN, "cluster": CLUSTER, "same": SAME,
         **{f"random{s}": _random_cluster(s) for s in range(3)}}


def _labels(fig, runs) -> list[Text]:
    ax = fig.axes[0]
    names = {r.label for r in runs}
    texts = [t for t in ax.texts if t.get_text() in names]
    assert sorted(t.get_text() for t in texts) == sorted(names)
    return texts


def _overlap(a, b) -> bool:
    """Strict intersection of two display boxes (touching edges do not count)."""
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _inside(inner, outer) -> bool:
    return (inner.x0 >= outer.x0 - 0.5 and inner.x1 <= outer.x1 + 0.5
            and inner.y0 >= outer.y0 - 0.5 and inner.y1 <= outer.y1 + 0.5)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dpi", [plots.DPI, 200])
def test_gap_labels_never_overlap(case, dpi):
    runs = CASES[case]
    fig = plots.efficiency_gap(runs)
    fig.set_dpi(dpi)                      # savefig at another dpi scales everything alike
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    texts = _labels(fig, runs)
    boxes = {t.get_text(): t.get_window_extent(renderer) for t in texts}
    for (na, a), (nb, b) in itertools.combinations(boxes.items(), 2):
        assert not _overlap(a, b), f"labels {na!r} and {nb!r} overlap: {a} / {b}"
    fig_box = fig.bbox
    ax_box = ax.get_window_extent(renderer)
    for name, box in boxes.items():
        assert _inside(box, fig_box), f"label {name!r} leaves the figure: {box}"
        assert _inside(box, ax_box), f"label {name!r} leaves the axes: {box}"
    # nor over the legend, nor the diagonals' percentages
    legend = ax.get_legend().get_window_extent(renderer)
    pcts = [t.get_window_extent(renderer) for t in ax.texts
            if t.get_text() in {"100%", "50%", "25%", "10%"}]
    for name, box in boxes.items():
        assert not _overlap(box, legend), f"label {name!r} covers the legend"
        for p in pcts:
            assert not _overlap(box, p), f"label {name!r} covers a diagonal's label"
    fig.savefig(io.BytesIO(), format="png")


def test_gap_labels_keep_their_colour_and_point():
    """Each label is in its model's colour, and one displaced far from its point is joined to
    it by a leader line in that colour."""
    fig = plots.efficiency_gap(CLUSTER)
    fig.canvas.draw()
    ax = fig.axes[0]
    point_colours = {}
    for line in ax.get_lines():
        if line.get_marker() not in (None, "None", "none", "") and len(line.get_xdata()) == 1:
            if line.get_markerfacecolor() != "white":
                point_colours[(float(line.get_xdata()[0]), float(line.get_ydata()[0]))] = \
                    line.get_color()
    for r, t in zip(CLUSTER, sorted(_labels(fig, CLUSTER),
                                    key=lambda t: [x.label for x in CLUSTER].index(t.get_text()))):
        assert t.get_text() == r.label
        key = (float(r.total.macs), r.total.measured_s * 1e3)
        assert key in point_colours
        assert t.get_color() == point_colours[key]
