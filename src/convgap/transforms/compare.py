"""compare: what a transform bought, per replaced layer and for the whole model.

Works for any transform or combination (swap, factorize, both): the replaced layers are
those :func:`~convgap.transforms.changes.changes` lists as swapped or factorized whose
module in the original model is of another type (a folded BatchNorm is no layer of its own:
the whole models show what folding bought). Each is timed against the module it
replaced, each on the input it sees in its own model (layout included), interleaved; then
the two whole models, interleaved. Budgets: ``config.LAYER_COMPARE``,
``config.MODEL_COMPARE``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from rich.table import Table

from .. import allocator, config, timing
from ..ops.layouts import layout_of
from ..count import formula_macs, parameter_count
from ..progress import make_progress
from .changes import Change, changes
from .eligible import first_inputs

__all__ = ["compare", "Comparison", "LayerComparison"]


@dataclass
class LayerComparison:
    """One replaced layer against the module it replaced: weight parameters, MACs (None
    where no formula applies) and median latency in seconds, ``(before, after)``. ``runs``:
    what the new layer ran when timed (an algorithm; for a factorized layer its kernel:
    'planar', 'nhwc', 'triton', or its torch steps)."""

    name: str
    transform: str
    runs: str | None
    params: tuple[int, int]
    macs: tuple[int | None, int | None]
    seconds: tuple[float, float]

    @property
    def speedup(self) -> float:
        return self.seconds[0] / self.seconds[1]

    @property
    def mac_reduction(self) -> float | None:
        before, after = self.macs
        return before / after if before and after else None

    def to_dict(self) -> dict:
        return {"name": self.name, "transform": self.transform, "runs": self.runs,
                "params": list(self.params), "macs": list(self.macs),
                "seconds": list(self.seconds), "speedup": self.speedup,
                "mac_reduction": self.mac_reduction}


def _ms(pair: tuple[float, float]) -> str:
    return f"{1e3 * pair[0]:.3g} -> {1e3 * pair[1]:.3g}"


def _m(macs: int | None) -> str:
    return "-" if macs is None else f"{macs / 1e6:,.1f}M"


@dataclass
class Comparison:
    """An original and a transformed model on one input: each replaced layer
    (:class:`LayerComparison`), the whole models' parameters and median latency in seconds
    ``(original, transformed)``, and :func:`changes` of the transformed model."""

    input_shape: tuple[int, ...]
    layout: str
    threads: int
    malloc: str | None  # the malloc policy everything was timed under (CPU), else None
    layers: list[LayerComparison]
    params: tuple[int, int]
    model_s: tuple[float, float]
    changes: list[Change]

    @property
    def speedup(self) -> float:
        """Original latency / transformed latency (whole models, timed interleaved)."""
        return self.model_s[0] / self.model_s[1]

    @property
    def left(self) -> dict[str, str]:
        """Layer name -> why it was left as it is."""
        return {c.name: c.reason for c in self.changes if c.transform == "left"}

    @property
    def layout_variant(self) -> str | None:
        """Why swap('auto')'s layout variant (a conv running channels_last and every layer
        after it in that layout) was adopted, or None."""
        return next(((c.tuning or {}).get("variant") for c in self.changes
                     if (c.tuning or {}).get("variant")), None)

    def table(self, title: str = "convgap compare") -> Table:
        t = Table(title=title, title_justify="left")
        for col in ("layer", "change", "runs", "params", "MACs", "ms", "MAC cut", "speedup"):
            t.add_column(col, justify="left" if col in ("layer", "change", "runs") else "right")
        kinds = {c.name: c for c in self.changes}
        for r in self.layers:
            cut = r.mac_reduction
            t.add_row(r.name, f"{r.transform} {kinds[r.name].runs}", r.runs or "-",
                      f"{r.params[0]:,} -> {r.params[1]:,}",
                      f"{_m(r.macs[0])} -> {_m(r.macs[1])}", _ms(r.seconds),
                      "-" if cut is None else f"{cut:.2f}x", f"{r.speedup:.2f}x")
        if self.layers:
            total = tuple(sum(r.seconds[i] for r in self.layers) for i in (0, 1))
            params = tuple(sum(r.params[i] for r in self.layers) for i in (0, 1))
            known = all(None not in r.macs for r in self.layers)
            macs = tuple(sum(r.macs[i] for r in self.layers) if known else None
                         for i in (0, 1))
            t.add_row("replaced layers", "", "", f"{params[0]:,} -> {params[1]:,}",
                      f"{_m(macs[0])} -> {_m(macs[1])}" if known else "", _ms(total),
                      f"{macs[0] / macs[1]:.2f}x" if known and macs[1] else "",
                      f"{total[0] / total[1]:.2f}x", style="bold")
        t.add_row("whole model", "", "", f"{self.params[0]:,} -> {self.params[1]:,}", "",
                  _ms(self.model_s), "", f"{self.speedup:.2f}x", style="bold")
        return t

    def summary(self) -> str:
        """One line on the whole models and the changes, plus the layout variant if taken."""
        counts: dict[str, int] = {}
        cached = 0
        for c in self.changes:
            key = ("left as it is" if c.transform == "left" else
                   c.transform if c.runs is None else f"{c.transform} {c.runs}")
            counts[key] = counts.get(key, 0) + 1
            cached += bool((c.tuning or {}).get("cached"))
        picked = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        s = (f"whole model: original {1e3 * self.model_s[0]:.2f} ms, transformed "
             f"{1e3 * self.model_s[1]:.2f} ms ({self.speedup:.2f}x, interleaved medians, "
             f"{self.threads} threads" + (f", malloc {self.malloc}" if self.malloc else "")
             + f"); {picked or 'no changes'}"
             + (f" ({cached} decided from the tuning cache)" if cached else ""))
        return s if self.layout_variant is None else f"{s}\n{self.layout_variant}"

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "layout": self.layout,
                "threads": self.threads, "malloc": self.malloc, "params": list(self.params),
                "model_s": list(self.model_s), "speedup": self.speedup,
                "layout_variant": self.layout_variant,
                "layers": [r.to_dict() for r in self.layers],
                "changes": [c.to_dict() for c in self.changes]}

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def _inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple]:
    """A copy of the arguments of each named module's first call in ``model(x)``."""
    return first_inputs({model.get_submodule(n): n for n in names}, lambda: model(x))[0]


def _macs(module: nn.Module, args: tuple, out: Any) -> int | None:
    if hasattr(module, "macs"):  # factorized layers: their contraction path's count
        return module.macs(tuple(args[0].shape))
    return formula_macs(module, args, out)


def _params(module: nn.Module) -> int:
    """Weight parameters (bias excluded; a module without one weight: all its
    parameters)."""
    if hasattr(module, "weight_params"):
        return module.weight_params
    weight = getattr(module, "weight", None)
    return weight.numel() if isinstance(weight, torch.Tensor) else parameter_count(module)


@torch.no_grad()
def compare(original: nn.Module, transformed: nn.Module, example_input: torch.Tensor, *,
            threads: int | None = None, quiet: bool = False,
            malloc: str | None = None) -> Comparison:
    """Time ``transformed`` against ``original`` on ``example_input`` (its memory layout is
    the one timed), both in eval mode (restored after): each replaced layer against the
    module it replaced, each on its real input in its own model (interleaved), then the two
    whole models (interleaved). ``threads``: torch threads for the timing (None: as they
    are); ``malloc``: on CPU, the :mod:`convgap.allocator` policy to time under ('retain',
    'default'; None: the process as it is). Returns a :class:`Comparison` (``table()``,
    ``summary()``, ``to_dict()``, ``to_json(path)``)."""
    if malloc is not None:
        allocator.check_policy(malloc)
    made = changes(transformed)
    before = dict(original.named_modules())
    rows = [c for c in made if c.transform not in ("left", "fold") and c.name in before
            and c.name != ""     # the whole model (fuse's network): the last row's
            and type(before[c.name]) is not type(transformed.get_submodule(c.name))]
    names = [c.name for c in rows]
    modes = (original.training, transformed.training)
    original.eval()
    transformed.eval()
    on_cpu = example_input.device.type == "cpu"
    try:
        with timing.threads(threads) as n_threads, make_progress(quiet) as progress, \
                allocator.use(malloc if on_cpu else None) as policy:
            seen_before = _inputs(original, names, example_input)
            seen_after = _inputs(transformed, names, example_input)
            task = progress.add_task("timing layers", total=len(rows) + 1)
            out = []
            for c in rows:
                if c.name not in seen_before or c.name not in seen_after:
                    progress.advance(task)
                    continue  # not called by the forward pass
                old, new = before[c.name], transformed.get_submodule(c.name)
                a0, a1 = seen_before[c.name], seen_after[c.name]
                macs = (_macs(old, a0, old(*a0)), _macs(new, a1, new(*a1)))
                t0, t1 = timing.compare([lambda: old(*a0), lambda: new(*a1)],
                                        config.LAYER_COMPARE, example_input.device.type)
                runs = new.kernel_for(a1[0]) if hasattr(new, "kernel_for") else c.runs
                out.append(LayerComparison(c.name, c.transform, runs,
                                           (_params(old), _params(new)), macs,
                                           (t0.median, t1.median)))
                progress.advance(task)
            m0, m1 = timing.compare([lambda: original(example_input),
                                     lambda: transformed(example_input)],
                                    config.MODEL_COMPARE, example_input.device.type)
            progress.advance(task)
    finally:
        original.train(modes[0])
        transformed.train(modes[1])
    params = (parameter_count(original), parameter_count(transformed))
    return Comparison(tuple(example_input.shape), layout_of(example_input), n_threads,
                      policy if on_cpu else None, out, params, (m0.median, m1.median), made)
