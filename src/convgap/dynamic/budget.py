"""The training budget of a dynamic model: what to pass as ``convgap.train.fit(...,
extra_loss=budget)``.

:class:`Budget` adds ``weight`` x (network term + block term) to the loss (LAUDNet's
weight is 10): the network term is the squared difference between the dynamic blocks' cost
at the masks of this step and ``target`` times their dense cost; the block term keeps each
block's own cost fraction within bounds that start at the target and widen to [0, 1] over
the first third of training (the schedule of LAUDNet's and DynConv's code: the blocks start
even, then each finds its own density while the network term holds the total). Each call
also sets the maskers' Gumbel temperature, decaying exponentially from ``tau[0]`` to
``tau[1]`` over ``steps``.

Costs, per block, as a function of its density ``d`` (the fraction of its output kept):

- ``'latency'`` (the default): the block's sparse execution timed on this device at
  densities 0, 0.25, 0.5, 0.75 and 1, each moved to the nearest density a sample of the
  block can have (a multiple of 1 / its mask cells: a layer block, or a spatial block of
  one tile, is timed skipping and computing) (:func:`measure_latency`, on the example
  input's shapes), interpolated linearly, as a fraction of the static block's time (the faster of
  the original block and the block fused by :func:`convgap.fuse`): training removes
  computation where it buys most time, and ``target`` is a fraction of the static
  network's block time (a sparse block slower than its static one at full density costs
  more than 1, and is pushed below its crossover);
- ``'predicted'``: the same tables from the device's latency predictor
  (:func:`predict_tables`: :func:`convgap.predict_latency` of the model at each density,
  and of its static and fused forms; nothing timed but the predictor's one-time
  calibration);
- ``'flops'``: the body's MACs at that density (each stage's share: spatial, the positions
  it computes, its halo included; channel, its kept input and output channels).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from .. import config, timing
from ..errors import ConvgapError
from ..progress import make_progress
from ..transforms import fuse
from ..transforms.eligible import first_inputs
from .transform import dynamic_blocks, evaluating

__all__ = ["Budget", "LatencyTable", "measure_latency", "predict_tables", "DENSITIES",
           "KINDS", "temperature"]

DENSITIES = (0.0, 0.25, 0.5, 0.75, 1.0)
KINDS = ("latency", "predicted", "flops")


def temperature(step: int, steps: int, tau: tuple[float, float] = (5.0, 0.1)) -> float:
    """The Gumbel temperature at ``step`` of ``steps``: exponential from tau[0] to
    tau[1]."""
    p = min(max(step / max(steps, 1), 0.0), 1.0)
    return tau[0] * (tau[1] / tau[0]) ** p


@dataclass
class LatencyTable:
    """A block's measured sparse latency (seconds) at ``densities``, and its static time
    (``static_s``: the faster of the original block and its fused form; None: the sparse
    time at the highest density stands in)."""

    densities: tuple[float, ...]
    seconds: tuple[float, ...]
    static_s: float | None = None

    @property
    def reference(self) -> float:
        """What the budget's fractions are of (seconds)."""
        return self.seconds[-1] if self.static_s is None else self.static_s

    def __call__(self, d: torch.Tensor) -> torch.Tensor:
        """The latency at density ``d`` (a tensor; linear between the measured points,
        differentiable in ``d``)."""
        xs = torch.tensor(self.densities, dtype=d.dtype, device=d.device)
        ys = torch.tensor(self.seconds, dtype=d.dtype, device=d.device)
        d = d.clamp(xs[0], xs[-1])
        i = torch.searchsorted(xs, d.detach().reshape(1)).clamp(1, len(xs) - 1)[0]
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (d - x0) / (x1 - x0)


def measure_latency(model: nn.Module, example_input: torch.Tensor, *,
                    densities: Sequence[float] = DENSITIES, quiet: bool = False
                    ) -> dict[str, LatencyTable]:
    """Each dynamic block of ``model`` timed on its input from ``example_input`` (eval, no
    autograd): sparse at each forced density, dense (the body times the mask), the original
    block and the original block fused (:func:`convgap.fuse`), in one interleaved run
    (medians, seconds). Each block's ``dense_from`` is set to the density from which the
    dense body is faster (linear between the measured points; above 1: never). The tables
    hold the sparse times (rising with density: the slope the budget's gradient follows,
    where the faster dense body would flatten it) and the static time (the faster of the
    original and the fused block)."""
    blocks = dynamic_blocks(model)
    if not blocks:
        raise ConvgapError("the model has no dynamic blocks (convgap.make_dynamic)")
    densities = tuple(sorted(densities))
    with evaluating(model), torch.no_grad():
        inputs, _ = first_inputs({b: n for n, b in blocks.items()},
                                 lambda: model(example_input))
        tables = {}
        with make_progress(quiet) as bar:
            task = bar.add_task("timing dynamic blocks", total=len(blocks))
            for name, b in blocks.items():
                x = inputs[name][0]
                # the densities a sample of this block can have, nearest those asked
                # (between them a batch's mean density: linear; at one cell, density 0.5
                # forced would keep round(0.5) = 0 cells)
                cells = b.cells(tuple(x.shape[-2:]))
                ds = tuple(sorted({round(d * cells) / cells for d in densities}))

                def sparse(d: float, b=b, x=x) -> torch.Tensor:
                    b.masker.force(d, seed=0)
                    return b.sparse(x, b.mask(x))

                def dense(b=b, x=x) -> torch.Tensor:
                    b.masker.force(1.0, seed=0)
                    return b.masked(x, b.mask(x))
                static = b.original()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # fuse's notes on what it left
                    # a copy: the original shares the block's children, whose modes
                    # evaluating() restores
                    # in a Sequential: fuse never takes the model itself as one block
                    fused = fuse(nn.Sequential(copy.deepcopy(static)).eval(), x, quiet=True,
                                 malloc=None)
                res = timing.compare([lambda d=d: sparse(d) for d in ds]
                                     + [dense, lambda: static(x), lambda: fused(x)],
                                     config.LAYER_COMPARE)
                times = [r.median for r in res[:len(ds)]]
                b.dense_from = _crossover(ds, times, res[len(ds)].median)
                tables[name] = LatencyTable(ds, tuple(times),
                                            min(r.median for r in res[-2:]))
                bar.advance(task)
    return tables


def predict_tables(model: nn.Module, example_input: torch.Tensor, *,
                   densities: Sequence[float] = DENSITIES) -> dict[str, LatencyTable]:
    """:func:`measure_latency`'s tables from the latency predictor
    (:func:`convgap.predict_latency`, on ``example_input``'s shape and layout): each sparse
    block's time inside the model with every block at each density, and its static time
    (the faster of the original block and its fused form, each inside the static model:
    :func:`convgap.fuse`'s, a whole-network plan where the static model lowers to one).
    Seconds. Nothing is timed (the predictor calibrates once per device, minutes)."""
    from ..ops.layouts import layout_of
    from ..predict import predict_latency
    from ..predict.profile import by_module
    blocks = dynamic_blocks(model)
    if not blocks:
        raise ConvgapError("the model has no dynamic blocks (convgap.make_dynamic)")
    densities = tuple(sorted(densities))
    shape, layout = tuple(example_input.shape), layout_of(example_input)

    def per_block(net: nn.Module, density: float | None) -> dict[str, float]:
        p = predict_latency(net, shape, layout=layout, density=density)
        # a whole-network plan's ops are its folded model's, its blocks' the fused model's
        inner = {"plan": "model.", "torch": "model.", "blocks": "blocks."}.get(p.path, "")
        found = by_module(p.ops, p.op_seconds, [inner + n for n in blocks])
        return {n: found[inner + n] for n in blocks}
    with evaluating(model):
        sparse = [per_block(model, d) for d in densities]
    static = copy.deepcopy(model).eval()
    for name, b in dynamic_blocks(static).items():
        static.set_submodule(name, b.original())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # fuse's notes on what it left
        fused = fuse(static, quiet=True)   # a whole-network plan where it lowers
    plain, folded = per_block(static, None), per_block(fused, None)
    return {n: LatencyTable(densities, tuple(s[n] for s in sparse),
                            min(plain[n], folded[n]) or None) for n in blocks}


def _crossover(densities: Sequence[float], times: Sequence[float], dense: float) -> float:
    """The lowest density from which sparse ``times`` (at ``densities``, ascending) reach
    the ``dense`` time, linear between points; 2.0 if they never do."""
    for i, t in enumerate(times):
        if t >= dense:
            if i == 0:
                return 0.0
            d0, d1, t0 = densities[i - 1], densities[i], times[i - 1]
            return d0 + (d1 - d0) * (dense - t0) / (t - t0)
    return 2.0


class Budget:
    """``extra_loss(model, inputs, outputs, step)`` for :func:`convgap.train.fit`: the
    computation budget of ``model``'s dynamic blocks (module docstring). ``steps``: the
    optimizer steps of the whole training (epochs x batches per epoch); ``kind``:
    'latency' (needs ``example_input``, a batch of the shape to run at, or ``tables``
    from :func:`measure_latency`) or 'flops'; ``target``: the fraction of the dense cost
    to keep; ``weight``: the term's weight; ``tau``: the temperature's start and end.
    The last values are kept: ``last`` (dict: network fraction, block fractions, bounds,
    temperature)."""

    def __init__(self, model: nn.Module, target: float = 0.5, *, steps: int,
                 kind: str = "latency", example_input: torch.Tensor | None = None,
                 tables: dict[str, LatencyTable] | None = None, weight: float = 10.0,
                 tau: tuple[float, float] = (5.0, 0.1), anneal: float = 0.33,
                 quiet: bool = False) -> None:
        if kind not in KINDS:
            raise ConvgapError(f"unknown budget kind {kind!r}: use one of {', '.join(KINDS)}")
        if not 0.0 < float(target) <= 1.0:
            raise ConvgapError(f"target must be in (0, 1], got {target!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConvgapError(f"steps must be a positive integer, got {steps!r}")
        self.blocks = dynamic_blocks(model)
        if not self.blocks:
            raise ConvgapError("the model has no dynamic blocks (convgap.make_dynamic)")
        self.target, self.steps, self.kind = float(target), steps, kind
        self.weight, self.tau, self.anneal = float(weight), tuple(tau), float(anneal)
        self.last: dict = {}
        if kind in ("latency", "predicted"):
            if tables is None:
                if example_input is None:
                    raise ConvgapError(f"a {kind} budget needs the blocks' inputs: give "
                                       "example_input (or tables, or kind='flops')")
                tables = (measure_latency(model, example_input, quiet=quiet)
                          if kind == "latency" else predict_tables(model, example_input))
            missing = set(self.blocks) - set(tables)
            if missing:
                raise ConvgapError(f"no latency table for blocks {sorted(missing)}")
            self.tables = tables
        else:
            self.tables = None
        for b in self.blocks.values():
            b.masker.tau = self.tau[0]

    def bounds(self, step: int) -> tuple[float, float]:
        """(lower, upper) bound of a block's cost fraction at ``step``."""
        p = step / (self.anneal * self.steps) if self.anneal > 0 else 1.0
        progress = math.cos(min(max(p, 0.0), 1.0) * math.pi / 2) ** 2
        return progress * self.target, 1 - progress * (1 - self.target)

    def __call__(self, model: nn.Module, inputs, outputs, step: int) -> torch.Tensor:
        tau = temperature(step, self.steps, self.tau)
        lower, upper = self.bounds(step)
        cost = full = None
        block_terms = []
        fractions = {}
        for name, b in self.blocks.items():
            b.masker.tau = tau     # for the next step (this step's masks are drawn)
            if b.last_mask is None:
                continue
            if self.kind == "flops":
                c, t = b.cost_macs(b.last_mask)
            else:
                d = b.density().mean()
                table = self.tables[name]
                c = table(d)
                t = torch.full((), table.reference, dtype=c.dtype, device=c.device)
            frac = c / t
            fractions[name] = float(frac.detach())
            block_terms.append(torch.relu(frac - upper) ** 2 + torch.relu(lower - frac) ** 2)
            cost = c if cost is None else cost + c
            full = t if full is None else full + t
        if cost is None:
            raise ConvgapError("no dynamic block ran in this step's forward pass")
        network = cost / full
        loss = (network - self.target) ** 2 + torch.stack(block_terms).mean()
        self.last = {"network": float(network.detach()), "blocks": fractions,
                     "bounds": (lower, upper), "tau": tau}
        return self.weight * loss
