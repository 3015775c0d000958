"""``predict_latency``: a model's latency on this device from its operators, without
running it.

The model's operators are recorded (:func:`~convgap.predict.record.record`: shapes only),
each is predicted inside the pass by its kind's calibrated model
(:mod:`convgap.predict.calibration`), and the whole model from their sum, their count and
its module count, with the calibration's weights. Rows are per module: each leaf module's
(or unit's: a fused or sparse dynamic block, :mod:`convgap.predict.units`) operators, each
top-level child's (a stage, a block), and the model's. Seconds throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from .. import hardware, timing
from ..errors import ConvgapError
from .calibration import Calibration, calibrate
from ..layers.dynamic import DynamicBlock
from .features import work
from ..ops.layouts import memory_format
from ..transforms.select import enclosing
from .plan import network_of, plan_ops
from .record import Density, Op, record
from .units import is_unit, outermost

__all__ = ["Prediction", "PredictedRow", "predict_latency"]


@dataclass
class PredictedRow:
    """A module's predicted latency: ``seconds`` of its operators inside the model's pass,
    summed (the whole model's weights apply to its total only), ``ops`` their count,
    ``flops`` and ``bytes`` their work."""

    name: str
    type: str
    seconds: float
    ops: int
    flops: float
    bytes: float


@dataclass
class Prediction:
    """Predicted latency of one model on one input. ``total_s``: the whole forward pass;
    ``ops_s``: its operators' predictions summed (before the calibration's weights);
    ``layers``: a row per leaf module that ran operators (call order), ``blocks``: a row per
    top-level child module, plus one row ('(model)') for operators in the model's own
    forward; ``op_seconds``: each recorded operator's prediction, in call order; ``path``:
    for a whole network :func:`convgap.fuse` lowered to a oneDNN plan, the form predicted
    faster (or the one it measured faster for this input, where this device has stored
    that choice: :meth:`~convgap.layers.FusedNetwork.stored_choice`), which it runs
    ('plan': ``ops`` are its primitives; 'blocks':
    its block-fused form; 'torch': its folded model, where it has no blocks), None for
    other models."""

    input_shape: tuple[int, ...]
    layout: str
    dtype: str
    threads: int
    total_s: float
    layers: list[PredictedRow]
    blocks: list[PredictedRow]
    ops: list[Op] = field(repr=False, default_factory=list)
    op_seconds: list[float] = field(repr=False, default_factory=list)
    path: str | None = None

    @property
    def ops_s(self) -> float:
        return sum(self.op_seconds)

    @property
    def total_ms(self) -> float:
        return self.total_s * 1e3

    def layer(self, name: str) -> PredictedRow:
        for r in self.layers + self.blocks:
            if r.name == name:
                return r
        raise KeyError(name)


def _rows(model: nn.Module, ops: Sequence[Op], seconds, names: Sequence[str]
          ) -> list[PredictedRow]:
    types = {n: type(m).__name__ for n, m in model.named_modules()}
    acc: dict[str, list] = {n: [0.0, 0, 0.0, 0.0] for n in names}
    for op, s in zip(ops, seconds):
        owner = enclosing(op.module, acc)
        if owner is None:
            continue
        flops, nbytes = work(op)
        row = acc[owner]
        row[0] += float(s)
        row[1] += 1
        row[2] += flops
        row[3] += nbytes
    return [PredictedRow(n or "(model)", types.get(n, type(model).__name__), *acc[n])
            for n in names if acc[n][1]]


def _check_density(model: nn.Module, density: Density) -> None:
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, DynamicBlock)}
    if density is None:
        free = [n for n, m in blocks.items() if is_unit(m) and m.masker.forced is None]
        if free:
            raise ConvgapError(
                f"a dynamic model's latency depends on how much its masks keep: give "
                f"density (one for all, or per block name; {len(free)} blocks, e.g. "
                f"{free[0]!r}), or force_density() the model")
        return
    if not blocks:
        raise ConvgapError("density is for dynamic models (convgap.make_dynamic); this one "
                           "has no dynamic blocks")
    given = density.items() if isinstance(density, Mapping) else [("", density)]
    for name, d in given:
        if name and name not in blocks:
            raise ConvgapError(f"density for {name!r}: no such dynamic block (the model's: "
                               f"{', '.join(list(blocks)[:4])}...)")
        if not isinstance(d, (int, float)) or not 0.0 <= float(d) <= 1.0:
            raise ConvgapError(f"density must be in [0, 1], got {d!r}")
    if isinstance(density, Mapping) and set(density) != set(blocks):
        missing = [n for n in blocks if n not in density]
        raise ConvgapError(f"density per block: {len(missing)} dynamic blocks have none "
                           f"(e.g. {missing[0]!r})")


def predict_latency(model: nn.Module, input_shape: Sequence[int], device: str = "cpu",
                    dtype: torch.dtype = torch.float32, layout: str = "nchw",
                    threads: int | None = None, density: Density = None,
                    calibration: Calibration | None = None, quiet: bool = True
                    ) -> Prediction:
    """Predict ``model``'s forward latency (seconds) on ``device`` for an input of
    ``input_shape`` (N, C, H, W) in ``dtype`` and ``layout`` ('nchw' or 'channels_last';
    the model's weights are taken as they are: convert them as you would to run it), under
    ``threads`` (default: the current count). Uses ``calibration`` or the cached one
    (:func:`~convgap.predict.calibration.calibrate`, run now if there is none: minutes).
    The model is not run. Fused blocks (:func:`convgap.fuse`) and sparse dynamic blocks
    (:func:`convgap.make_dynamic`) are predicted as one call each; a whole network
    :func:`convgap.fuse` lowered to a oneDNN plan, as the form it runs: the one it measured
    faster for this input if it has, else the faster predicted of its plan (each
    primitive) and its blocks (``path`` says which); ``density``: the share
    of mask cells the dynamic blocks keep, one for all or a dict by block name (None: each
    block's forced density, :func:`convgap.dynamic.force_density`; required otherwise).
    Raises ConvgapError where the model's forward needs real data."""
    memory_format(layout)   # checks the name
    dev = hardware.check_device(device)
    _check_density(model, density)
    with timing.threads(threads if dev.type == "cpu" else None) as n:
        cal = calibration or calibrate(dev, dtype, n, quiet=quiet)
        ops = record(model, input_shape, dtype, layout, density)
    seconds = cal.op_seconds(ops)
    total = cal.total(ops, seconds, model)
    units = outermost(model)
    inside = tuple(n + "." for n in units.values())
    leaves = [name for name, m in model.named_modules()
              if not name.startswith(inside) and (m in units or not any(True for _ in
                                                                        m.children()))]
    tops = [""] + [name for name, _ in model.named_children()]
    net, path = network_of(model) if dev.type == "cpu" else None, None
    if net is not None:   # what it runs: the faster of its plan and its blocks
        inner = "blocks" if net.blocks is not None else "model"
        path = inner if inner == "blocks" else "torch"
        try:
            steps = plan_ops(net, input_shape, layout, dtype)
        except ConvgapError:   # not float32
            steps = []
        stored = net.stored_choice(tuple(input_shape), layout) if net.blocks is not None \
            else None   # the choice it measured for this input, where it has one
        if steps and cal.stats.get("plans") and stored in (None, "plan"):
            step_s = cal.op_seconds(steps)
            if stored == "plan" or cal.plan_total(step_s) < total:
                ops, seconds, total, path = steps, step_s, cal.plan_total(step_s), "plan"
                inner = "model"
        tops = [""] + [f"{inner}.{name}" for name, _ in
                       net.get_submodule(inner).named_children()]
    return Prediction(tuple(int(s) for s in input_shape), layout,
                      str(dtype).removeprefix("torch."), n, total,
                      _rows(model, ops, seconds, leaves),
                      _rows(model, ops, seconds, tops), list(ops), [float(s) for s in seconds],
                      path)
