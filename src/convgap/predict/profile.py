"""Each operator's time inside a real run of the whole network.

An operator timed alone, called again and again, finds its weights and inputs in cache; in
a network it meets what the operators before it left there (at batch 1 most weights come
from memory: resnet18's 47 MB do not fit any cache here), and networks measured here ran
0.9-2.3x the sum of their layers timed alone. :func:`profile` runs the model for real under
a dispatch mode that reads the clock around every ATen operator, the same operators, in
the same order, :func:`~convgap.predict.record.record` sees: what calibration learns and
what the benchmark checks per layer. A unit (:mod:`.units`: a fused or sparse dynamic
block) is timed as one call with the mode lifted, so that its fast path runs, as the
recording keeps it as one op. The mode's own Python work falls between operators, outside
the timed spans. Seconds throughout.
"""

from __future__ import annotations

import dataclasses
import difflib
import statistics
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from .. import config, timing
from ..errors import ConvgapError
from ..transforms.select import enclosing
from .plan import PLAN_PREFIX, plan_times
from .record import UNIT_PREFIX
from .units import measured, outermost, unit_type

__all__ = ["profile", "OpTimes", "align", "with_densities", "by_module", "measure"]


class _Clock(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.funcs: list = []
        self.seconds: list[float] = []
        self.densities: list[tuple[float, float] | None] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        t1 = time.perf_counter()
        if func.namespace != "prim":   # as the recorder: no call in eager mode
            self.funcs.append(func)
            self.seconds.append(t1 - t0)
            self.densities.append(None)
        return out

    def unit(self, m: nn.Module):
        """``m.forward`` timed as one call, no mode watching."""
        forward, name = m.forward, UNIT_PREFIX + unit_type(m)

        def timed(*args, **kwargs):
            with _disable_current_modes():
                t0 = time.perf_counter()
                out = forward(*args, **kwargs)
                t1 = time.perf_counter()
                density = measured(m)
            self.funcs.append(name)
            self.seconds.append(t1 - t0)
            self.densities.append(density)
            return out
        return timed


class OpTimes(list):
    """Per operator (call order) the median seconds over the profiled runs; ``names``
    their ATen names (a unit: 'unit.<type>'), ``densities`` the (density, work share) each
    dynamic unit kept and computed in the last run (None for others), ``wholes`` each
    profiled run's wall time (seconds, the mode's work included)."""

    names: list[str]
    densities: list[tuple[float, float] | None]
    wholes: list[float]


@torch.no_grad()
def profile(model: nn.Module | Callable[[torch.Tensor], object], x: torch.Tensor,
            repeats: int = 5, warmup: int = 2) -> OpTimes:
    """Run ``model(x)`` ``warmup + repeats`` times, each ATen operator timed where it runs;
    per operator the median over the ``repeats`` runs (the warm-up runs may prepare what
    later ones reuse). Raises ConvgapError if the measured runs do not dispatch the same
    operators (a forward that depends on the data)."""
    if repeats < 1 or warmup < 0:
        raise ConvgapError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    runs: list[list[float]] = []
    funcs = None
    wholes = []
    units = outermost(model) if isinstance(model, nn.Module) else {}
    for i in range(warmup + repeats):
        clock = _Clock()
        for m in units:
            m.forward = clock.unit(m)   # an instance attribute: the class's, wrapped
        try:
            t0 = time.perf_counter()
            with clock:
                model(x)
            whole = time.perf_counter() - t0
        finally:
            for m in units:
                del m.forward
        if i < warmup:      # (first calls may prepare what later ones reuse)
            continue
        if funcs is None:
            funcs = clock.funcs
        elif clock.funcs != funcs:
            raise ConvgapError("the model dispatched different operators on two runs of "
                               "the same input: it cannot be profiled per operator")
        runs.append(clock.seconds)
        wholes.append(whole)
    out = OpTimes(statistics.median(s) for s in zip(*runs)) if funcs else OpTimes()
    out.names = [str(f) for f in (funcs or [])]
    out.densities = clock.densities
    out.wholes = wholes
    return out


def align(ops: Sequence, times: OpTimes) -> list[float | None]:
    """Each recorded op's profiled seconds (``ops``: :func:`~convgap.predict.record.record`
    of the profiled input). A real run may dispatch an op the meta recording does not (a
    real ``adaptive_avg_pool2d`` restrides its channels-last result with ``as_strided_``):
    the names are matched in order, an unmatched run op's time goes to the recorded op
    before it, and a recorded op the run did not dispatch gets None. Raises ConvgapError
    when more than a tenth of the recorded ops go unmatched."""
    names = [op.name for op in ops]
    if names == times.names:
        return list(times)
    out: list[float | None] = [None] * len(names)
    where = {}
    for i, j, n in difflib.SequenceMatcher(a=names, b=times.names,
                                           autojunk=False).get_matching_blocks():
        where.update((j + k, i + k) for k in range(n))
    last = None
    for j, s in enumerate(times):
        i = where.get(j)
        if i is not None:
            out[i], last = s, i
        elif last is not None:
            out[last] += s
    if sum(v is None for v in out) > len(out) / 10:
        raise ConvgapError("the model ran other operators than were recorded for this "
                           "input: its layers cannot be matched to the prediction's")
    return out


def with_densities(ops: Sequence, times: OpTimes) -> list:
    """``ops`` with each dynamic unit's density and work share those its profiled run kept
    and computed (units in order: the k-th recorded unit is the k-th profiled one)."""
    kept = iter([d for n, d in zip(times.names, times.densities) if n.startswith(UNIT_PREFIX)])
    out = []
    for op in ops:
        if op.unit:
            d = next(kept, None)
            if d is not None:
                op = dataclasses.replace(op, detail=op.detail[:3] + (d[0],) + op.detail[4:5]
                                         + (d[1],))
        out.append(op)
    return out


def by_module(ops: Sequence, seconds: Sequence[float | None], names: Sequence[str]) -> dict:
    """Seconds summed per module of ``names`` (each op to its nearest enclosing one; None
    counts 0)."""
    acc = {n: 0.0 for n in names}
    for op, s in zip(ops, seconds):
        owner = enclosing(op.module, acc)
        if owner is not None and s is not None:
            acc[owner] += s
    return acc


def measure(model: nn.Module, x: torch.Tensor, ops: Sequence, names: Sequence[str],
            timing_config: timing.TimingConfig = config.ANALYZE_MODEL, repeats: int = 7
            ) -> tuple[float, dict[str, float]]:
    """What a prediction is checked against: ``model(x)``'s median latency timed whole (as
    :func:`convgap.analyze` times it), and the seconds of the modules ``names`` inside
    the run (``ops``: the model's :func:`~convgap.predict.record.record` for ``x``;
    :func:`profile` with ``repeats`` runs; ``ops`` of a whole-network plan,
    :func:`~convgap.predict.plan.plan_times`)."""
    with torch.no_grad():
        whole = timing.measure(lambda: model(x), timing_config, x.device.type).median
    if ops and ops[0].name.startswith(PLAN_PREFIX):   # a whole-network plan's steps
        return whole, by_module(ops, plan_times(model, x, repeats), names)
    return whole, by_module(ops, align(ops, profile(model, x, repeats)), names)
