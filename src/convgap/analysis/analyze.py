"""Measure a model against the device's roofs: :func:`analyze`.

One forward pass counts every layer and block and captures its real input; then the whole
model, every block and every leaf layer are timed in isolation on those inputs with the
project's timing discipline (:mod:`convgap.timing`), under the requested thread count.
"""

from __future__ import annotations

import copy
import datetime as _dt
import platform
from typing import Sequence

import torch
import torch.nn as nn

from .. import allocator, config, hardware, timing
from ..count import Call, Trace, check_input, run_trace
from ..errors import ConvgapError
from ..ops.layouts import LAYOUTS, memory_format
from ..progress import make_progress
from .report import Report, Row, Run

__all__ = ["analyze", "LAYOUTS", "DTYPES"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a dtype or its name ('float32', 'bf16', ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ConvgapError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")


def _time_call(call: Call, cfg: timing.TimingConfig, device: str) -> float:
    args = call.inputs
    return timing.measure(lambda: call.module(*args), cfg, device).median


def _rows(tr: Trace, layer_s: list[float], block_s: list[float], roofs: hardware.Roofs
          ) -> tuple[list[Row], list[Row]]:
    c = tr.counts
    layers_total = sum(layer_s) or 1.0
    layers = []
    for lc, t in zip(c.layers, layer_s):
        layers.append(Row(
            name=lc.name, kind="layer", type=lc.type, input_shape=lc.input_shape,
            output_shape=lc.output_shape, macs=lc.macs, params=lc.params, bytes=lc.min_bytes,
            measured_s=t, ideal_s=roofs.ideal_latency(lc.flops),
            roofline_s=roofs.roofline_latency(lc.flops, lc.min_bytes),
            bound=roofs.bound(lc.flops, lc.min_bytes), share=t / layers_total, block=lc.block))
    by_name = {r.name: r for r in layers}
    blocks = []
    for bc, t in zip(c.blocks, block_s):
        inner = [by_name[n] for n in bc.layers]
        blocks.append(Row(
            name=bc.name, kind="block", type=bc.type, input_shape=bc.input_shape,
            output_shape=bc.output_shape, macs=bc.macs, params=bc.params, bytes=bc.fused_bytes,
            measured_s=t, ideal_s=roofs.ideal_latency(bc.flops),
            roofline_s=roofs.roofline_latency(bc.flops, bc.fused_bytes),
            bound=roofs.bound(bc.flops, bc.fused_bytes), block_kind=bc.kind,
            layerwise_bytes=bc.layerwise_bytes,
            layerwise_roofline_s=sum(r.roofline_s for r in inner),
            layers_measured_s=sum(r.measured_s for r in inner)))
    return layers, blocks


def analyze(
    model: nn.Module | str,
    input_shape: Sequence[int] = (1, 3, 224, 224),
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    layout: str = "nchw",
    *,
    threads: int | None = None,
    name: str | None = None,
    per_layer: bool = True,
    timing_config: timing.TimingConfig | None = None,
    roofs: hardware.Roofs | None = None,
    quiet: bool = False,
    progress=None,
    malloc: str | None = None,
    allocation: bool = True,
    predict: bool = False,
) -> Report:
    """Analyse ``model`` (an ``nn.Module`` or a zoo name) on one input shape.

    Counts MACs and bytes per layer and block, measures the device's roofs (cached), times the
    whole model, every block and every leaf layer in isolation on its real input, and returns
    a :class:`Report` with one run. ``layout`` is 'nchw' or 'channels_last'; ``threads`` sets
    ``torch.set_num_threads`` for the measurement (default: as is). ``per_layer=False``
    skips timing layers and blocks (counts and whole-model latency only). ``timing_config``:
    the budget of every timing (default: :data:`convgap.config.ANALYZE_MODEL` for the whole
    model, :data:`convgap.config.ANALYZE_CALL` for each layer and block).

    On CPU, ``malloc`` sets the malloc policy everything is measured under ('default' or
    'retain', see :mod:`convgap.allocator`; None: as the process is; restored afterwards),
    and ``allocation`` also times the whole model with freed memory retained, to report
    what the process's malloc policy costs per call against that (``Run.allocation``:
    seconds and page faults per call, see :func:`convgap.allocator.allocation_cost`; None
    where the policy cannot be set). That cost depends on the
    heap's history: a large request is served without faults whenever a big enough free
    chunk lies in the heap, so the first model analysed in a fresh process shows what a
    process serving only that model pays, and later ones may read less. The model is
    copied, put in eval mode and moved to ``device``/``dtype``/``layout``; the caller's model
    is not changed. ``predict``: also fill each layer's and the model's ``predicted_s``
    from :func:`convgap.predict_latency` (the device's calibration, made first if there is
    none: minutes). Latencies are in seconds.
    """
    if isinstance(model, str):
        from .. import models
        name = name or model
        model = models.load(model)
    if not isinstance(model, nn.Module):
        raise ConvgapError(f"model must be an nn.Module or a zoo name, got {type(model).__name__}")
    dev = hardware.check_device(device)
    dt = parse_dtype(dtype)
    fmt = memory_format(layout)
    shape = check_input(model, input_shape)
    if layout == "channels_last" and len(shape) != 4:
        raise ConvgapError(f"layout 'channels_last' needs a 4-D input, got shape {shape}")
    name = name or type(model).__name__
    cfg_model = timing_config or config.ANALYZE_MODEL
    cfg_call = timing_config or config.ANALYZE_CALL

    if malloc is not None:
        allocator.check_policy(malloc)
    on_cpu = dev.type == "cpu"
    with timing.threads(threads if on_cpu else None) as n_threads, \
            allocator.use(malloc if on_cpu else None) as policy:
        net = copy.deepcopy(model).eval().to(device=dev, dtype=dt, memory_format=fmt)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen).to(device=dev, dtype=dt)
        x = x.contiguous(memory_format=fmt)
        tr = run_trace(net, x, capture=per_layer)  # fails fast, before measuring roofs
        roof = roofs or hardware.roofs(dev, dt)
        calls = (tr.layer_calls + tr.block_calls) if per_layer else []
        own = progress is None
        prog = make_progress(quiet) if own else progress
        if own:
            prog.start()
        try:
            alloc_steps = int(allocation and on_cpu and allocator.available())
            task = prog.add_task(f"{name} {tuple(shape)} {layout}",
                                 total=1 + len(calls) + alloc_steps)
            measured = timing.measure(lambda: net(x), cfg_model, dev)
            whole = measured.median
            prog.advance(task)
            times = []
            for call in calls:
                times.append(_time_call(call, cfg_call, str(dev)))
                prog.advance(task)
            # last: 'retain' leaves free chunks in the heap that serve later requests
            # without faults under any policy; the process as it was is ``measured``
            cost = (allocator.allocation_cost(lambda: net(x), config.ALLOCATION, blocks=3,
                                              current=measured) if alloc_steps else None)
            prog.advance(task, alloc_steps)
        finally:
            if own:
                prog.stop()
        layer_s = times[:len(tr.layer_calls)] if per_layer else [0.0] * len(tr.counts.layers)
        block_s = times[len(tr.layer_calls):] if per_layer else [0.0] * len(tr.counts.blocks)
        layers, blocks = _rows(tr, layer_s, block_s, roof)
        for b in blocks:
            b.share = b.measured_s / whole if whole else 0.0
        c = tr.counts
        total = Row(
            name=name, kind="model", type=type(model).__name__, input_shape=c.input_shape,
            output_shape=tr.counts.layers[-1].output_shape if c.layers else None,
            macs=c.macs, params=c.params, bytes=c.min_bytes, measured_s=whole,
            ideal_s=roof.ideal_latency(c.flops), roofline_s=roof.roofline_latency(c.flops,
                                                                                 c.min_bytes),
            bound=roof.bound(c.flops, c.min_bytes), share=1.0,
            layerwise_bytes=c.layerwise_bytes,
            layerwise_roofline_s=sum(r.roofline_s for r in layers),
            layers_measured_s=sum(layer_s))
        if predict:
            _add_predictions(net, shape, dev, dt, layout, n_threads, total, layers)
        run = Run(model=name, batch=shape[0], input_shape=shape, layout=layout,
                  dtype=str(dt).removeprefix("torch."), device=str(dev),
                  device_name=roof.device_name, threads=n_threads, peak_flops=roof.peak_flops,
                  bandwidth=roof.bandwidth, total=total, layers=layers, blocks=blocks,
                  unattributed_macs=c.unattributed_macs, unclassified=c.unclassified,
                  malloc=policy if on_cpu else None,
                  faults_per_call=measured.faults_per_call if on_cpu else None,
                  allocation=cost.to_dict() if cost is not None else None)
    return Report([run], meta=report_meta())


def _add_predictions(net: nn.Module, shape, dev, dt, layout: str, threads: int, total: Row,
                     layers: list[Row]) -> None:
    """``predicted_s`` of the model and of each layer call (a module called k times: each
    call a k-th of its predicted time)."""
    from ..predict import predict_latency
    p = predict_latency(net, shape, dev, dt, layout, threads, quiet=False)
    total.predicted_s = p.total_s
    by_name = {r.name: r.seconds for r in p.layers}
    calls: dict[str, int] = {}
    for r in layers:
        base = r.name.split("#")[0]
        calls[base] = calls.get(base, 0) + 1
    for r in layers:
        base = r.name.split("#")[0]
        if base in by_name:
            r.predicted_s = by_name[base] / calls[base]


def report_meta() -> dict:
    """Versions and machine facts stamped on every report."""
    from .. import __version__
    return {"convgap": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
