"""factorize: replace a model's dense convolutions by factorized (TensorialConv2d) or
flattened (FlattenedConv2d) ones decomposed from the trained kernels, and measure what that
bought per layer and for the whole model."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import torch
import torch.nn as nn
from rich.table import Table

from .. import allocator, timing
from ..algorithms.spec import layout_of
from ..errors import ConvgapError
from ..layers import FAMILIES, FlattenedConv2d, TensorialConv2d, family
from ..progress import make_progress
from .eligible import blocker, find_layers

__all__ = ["factorize", "FactorizedLayer", "compare", "Comparison", "FACTORIZATIONS",
           "default_layers"]

FACTORIZATIONS = (*FAMILIES, "flattened")
LAYER_CONFIG = timing.TimingConfig(warmup=2, min_repeats=7, max_repeats=30, min_time=0.2)
MODEL_CONFIG = timing.TimingConfig(warmup=2, min_repeats=7, max_repeats=30, min_time=0.5)

Layers = Union[None, Sequence[str], type, Callable[[str, nn.Module], bool]]


def default_layers(name: str, module: nn.Module) -> bool:
    """The convolutions factorized by default: dense (groups=1), zeros padding, a spatial
    kernel (not 1x1)."""
    return (isinstance(module, nn.Conv2d) and module.groups == 1
            and module.padding_mode == "zeros" and tuple(module.kernel_size) != (1, 1))


@dataclass
class FactorizedLayer:
    """One considered layer: its name, the factorization, ranks and weight parameters;
    ``kept`` False with the ``reason`` where the layer was left as it is (a subclass with
    its own computation, a factorized form of another output shape or measured slower).
    With an example input: ``error``, the factorized layer's relative output error
    (max|y - y_dense| / max|y_dense|, the approximation) and ``time_ratio``, its measured
    time / the dense layer's (median of paired per-round ratios)."""

    name: str
    factorization: str
    ranks: tuple[int, ...] | None
    dense_params: int
    params: int
    kept: bool = True
    reason: str | None = None
    error: float | None = None
    time_ratio: float | None = None

    @property
    def compression(self) -> float:
        return self.dense_params / self.params


def _select(model: nn.Module, layers: Layers) -> list[str]:
    modules = dict(model.named_modules())
    if layers is None:
        return [n for n, m in modules.items() if default_layers(n, m)]
    if isinstance(layers, type):
        return [n for n, m in modules.items() if isinstance(m, layers)
                and isinstance(m, nn.Conv2d)]
    if callable(layers):
        return [n for n, m in modules.items() if isinstance(m, nn.Conv2d) and layers(n, m)]
    if isinstance(layers, str):
        layers = [layers]
    names = list(layers)
    for n in names:
        if n not in modules:
            convs = [k for k, m in modules.items() if isinstance(m, nn.Conv2d)]
            raise ConvgapError(f"layers: the model has no module {n!r}; its Conv2d layers: "
                               f"{', '.join(convs[:8])}{', ...' if len(convs) > 8 else ''}")
        if not isinstance(modules[n], nn.Conv2d):
            raise ConvgapError(f"layers: {n!r} is a {type(modules[n]).__name__}, not a Conv2d")
    return names


def _check(name: str, conv: nn.Conv2d) -> None:
    if conv.groups != 1:
        raise ConvgapError(f"{name}: factorize needs dense convolutions; it has groups="
                           f"{conv.groups}")
    if conv.padding_mode != "zeros":
        raise ConvgapError(f"{name}: factorize needs zeros padding, not {conv.padding_mode!r}")
    if isinstance(conv.padding, str):
        raise ConvgapError(f"{name}: factorize needs numeric padding, not {conv.padding!r}")


KEEP = ("faster", "all")


def factorize(model: nn.Module, factorization: str, example_input: torch.Tensor | None = None,
              *, compression: float | None = None, rank: int | Sequence[int] | None = None,
              layers: Layers = None, rank_multiple: int = 8, keep: str = "faster",
              inplace: bool = False, quiet: bool = False) -> nn.Module:
    """Replace convolutions of ``model`` by factorized ones decomposed from their weights.

    ``factorization``: 'cp', 'tucker', 'tt', 'tr', 'rcp' (:class:`TensorialConv2d`) or
    'flattened' (:class:`FlattenedConv2d`, one rank-1 repeat per output channel; takes
    neither rank nor compression). Give ``compression`` (dense / factor weight
    parameters, per layer) or ``rank``; with ``compression``, CP / Tucker / TT ranks of at
    least 2 x ``rank_multiple`` are rounded down to a multiple of it (see
    :class:`TensorialConv2d`; 1: off). ``layers``: None (every dense, non-1x1 conv), module
    names, a module type, or a callable ``(name, module) -> bool``. Conv2d subclasses with
    their own computation (an overridden ``forward``, hooks, parametrizations) are never
    replaced: they are listed with the reason and a warning. Every layer's ranks are
    checked before anything is replaced (an impossible compression raises ConvgapError
    naming the layer).

    With ``example_input`` (a batch of the shape you will run), each factorized layer is
    run on its real input: one whose output shape differs from the original layer's is not
    kept, its approximation error is recorded, and with ``keep='faster'`` (the default) it
    is timed against the dense layer (interleaved, paired) and kept only if faster;
    ``keep='all'`` keeps every layer. Returns the model (a copy unless ``inplace``) with
    ``model.factorized``: a list of :class:`FactorizedLayer`, one per considered layer.
    """
    if factorization not in FACTORIZATIONS:
        raise ConvgapError(f"unknown factorization {factorization!r}; available: "
                           f"{', '.join(FACTORIZATIONS)}")
    if keep not in KEEP:
        raise ConvgapError(f"keep must be one of {', '.join(KEEP)}; got {keep!r}")
    flattened = factorization == "flattened"
    if flattened and (rank is not None or compression is not None):
        raise ConvgapError("'flattened' has a fixed structure: give neither rank nor "
                           "compression")
    if not flattened and (rank is None) == (compression is None):
        raise ConvgapError("factorize needs exactly one of compression= or rank=")
    names = _select(model, layers)
    if not names:
        raise ConvgapError("no convolution matches `layers` (by default: dense, non-1x1 "
                           "Conv2d layers)")
    modules = dict(model.named_modules())
    skipped = {n: blocker(modules[n]) for n in names if blocker(modules[n]) is not None}
    plans = []
    for n in names:  # validate every layer before touching the model
        if n in skipped:
            continue
        conv = modules[n]
        _check(n, conv)
        o, s, (h, w) = conv.out_channels, conv.in_channels, conv.kernel_size
        if flattened:
            plans.append((n, None))
            continue
        fam = family(factorization)
        try:
            ranks = (fam.ranks(rank, o, s, h, w) if rank is not None
                     else fam.rank_for(compression, o, s, h, w, rank_multiple))
        except ConvgapError as exc:
            raise ConvgapError(f"{n}: {exc}") from None
        plans.append((n, ranks))
    if skipped:
        warnings.warn(f"factorize: {len(skipped)} layer(s) left as they are: " + "; ".join(
            f"{n}: {r}" for n, r in skipped.items()), UserWarning, stacklevel=2)
    inputs = find_layers(model, example_input).inputs if example_input is not None else {}
    if not inplace:
        model = copy.deepcopy(model)
        modules = dict(model.named_modules())
    done = [FactorizedLayer(n, factorization, None, modules[n].weight.numel(),
                            modules[n].weight.numel(), kept=False, reason=r)
            for n, r in skipped.items()]
    on_cpu = example_input is not None and example_input.device.type == "cpu"
    with make_progress(quiet) as progress, torch.no_grad(), \
            allocator.use("retain" if on_cpu and keep == "faster" else None):
        task = progress.add_task(f"factorizing ({factorization})", total=len(plans))
        for n, ranks in plans:
            progress.update(task, description=f"factorizing ({factorization}) {n}")
            conv = modules[n]
            if flattened:
                new = FlattenedConv2d.from_conv(conv)
            else:
                new = TensorialConv2d.from_conv(conv, factorization, rank=ranks)
            new.train(conv.training)
            row = FactorizedLayer(n, factorization, None if flattened else new.ranks,
                                  conv.weight.numel(), new.weight_params)
            if n in inputs:
                _measure(row, conv, new, inputs[n][0], keep)
            done.append(row)
            if row.kept:
                parent, _, child = n.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, new)
            progress.advance(task)
    model.factorized = done
    return model


def _measure(row: FactorizedLayer, conv: nn.Module, new: nn.Module, x: torch.Tensor,
             keep: str) -> None:
    """Run the factorized layer on the dense one's real input ``x``: a different output
    shape is never kept; record the approximation error; with ``keep='faster'`` time both
    (interleaved, paired) and keep only a faster one."""
    was = new.training
    new.eval()
    try:
        y, ref = new(x), conv(x)
        if y.shape != ref.shape:
            row.kept = False
            row.reason = (f"the factorized layer's output is {tuple(y.shape)}, the original's "
                          f"{tuple(ref.shape)}")
            return
        row.error = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        if keep == "faster":
            t_new, t_dense = timing.compare([lambda: new(x), lambda: conv(x)], LAYER_CONFIG,
                                            x.device.type)
            row.time_ratio = timing.paired_ratio(t_new, t_dense)
            if row.time_ratio >= 1.0:
                row.kept = False
                row.reason = (f"measured slower than the dense layer ({row.time_ratio:.2f}x "
                              "its time); keep='all' keeps it")
    finally:
        new.train(was)


# -- measurement ---------------------------------------------------------------------------
@dataclass
class LayerComparison:
    name: str
    factorization: str
    dense_params: int
    params: int
    dense_macs: int
    macs: int
    dense_s: float
    factorized_s: float
    runs: str | None = None  # what the layer ran: 'planar' / 'nhwc' (fused C), 'triton', ...

    @property
    def speedup(self) -> float:
        return self.dense_s / self.factorized_s

    @property
    def mac_reduction(self) -> float:
        return self.dense_macs / self.macs


@dataclass
class Comparison:
    """Per-layer and whole-model params, MACs and latency (seconds) before and after."""

    input_shape: tuple[int, ...]
    threads: int
    layers: list[LayerComparison]
    model_params: tuple[int, int]
    model_s: tuple[float, float]
    extra: dict = field(default_factory=dict)

    def table(self, title: str = "convgap factorize") -> Table:
        t = Table(title=title, title_justify="left")
        for col in ("layer", "runs", "params", "MACs", "ms", "MAC cut", "speedup"):
            t.add_column(col, justify="left" if col in ("layer", "runs") else "right")
        for r in self.layers:
            t.add_row(r.name, r.runs or "-", f"{r.dense_params:,} -> {r.params:,}",
                      f"{r.dense_macs / 1e6:,.1f}M -> {r.macs / 1e6:,.1f}M",
                      f"{1e3 * r.dense_s:.3g} -> {1e3 * r.factorized_s:.3g}",
                      f"{r.mac_reduction:.2f}x", f"{r.speedup:.2f}x")
        dm = sum(r.dense_macs for r in self.layers)
        fm = sum(r.macs for r in self.layers)
        ds = sum(r.dense_s for r in self.layers)
        fs = sum(r.factorized_s for r in self.layers)
        t.add_row("factorized layers", "", f"{sum(r.dense_params for r in self.layers):,} -> "
                  f"{sum(r.params for r in self.layers):,}",
                  f"{dm / 1e6:,.1f}M -> {fm / 1e6:,.1f}M", f"{1e3 * ds:.3g} -> {1e3 * fs:.3g}",
                  f"{dm / fm:.2f}x", f"{ds / fs:.2f}x", style="bold")
        (p0, p1), (t0, t1) = self.model_params, self.model_s
        t.add_row("whole model", "", f"{p0:,} -> {p1:,}", "", f"{1e3 * t0:.4g} -> {1e3 * t1:.4g}",
                  "", f"{t0 / t1:.2f}x", style="bold")
        return t

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "threads": self.threads,
                "model_params": list(self.model_params), "model_s": list(self.model_s),
                "layers": [dict(vars(r), speedup=r.speedup, mac_reduction=r.mac_reduction)
                           for r in self.layers], **self.extra}


def _dense_macs(conv: nn.Conv2d, out: torch.Tensor) -> int:
    n, o, oh, ow = out.shape
    return n * o * oh * ow * (conv.in_channels // conv.groups) * \
        conv.kernel_size[0] * conv.kernel_size[1]


@torch.no_grad()
def compare(original: nn.Module, factorized: nn.Module, x: torch.Tensor,
            threads: int | None = None, quiet: bool = False,
            malloc: str | None = None) -> Comparison:
    """Time each factorized layer against the conv it replaced, on the conv's real input
    (interleaved medians), and the two whole models; params and MACs beside. ``malloc``:
    on CPU, the :mod:`convgap.allocator` policy to time under ('retain', 'default'; None:
    the process as it is); ``x``'s memory layout is the one timed."""
    if malloc is not None:
        allocator.check_policy(malloc)
    rows = getattr(factorized, "factorized", None)
    if rows is None:
        raise ConvgapError("compare needs a model returned by factorize()")
    rows = [r for r in rows if r.kept]
    orig_modules = dict(original.named_modules())
    new_modules = dict(factorized.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    handles = [orig_modules[r.name].register_forward_pre_hook(
        lambda m, a, n=r.name: inputs.setdefault(n, a[0])) for r in rows]
    original.eval()
    factorized.eval()
    try:
        original(x)
    finally:
        for h in handles:
            h.remove()
    out: list[LayerComparison] = []
    on_cpu = x.device.type == "cpu"
    with timing.threads(threads) as n_threads, make_progress(quiet) as progress, \
            allocator.use(malloc if on_cpu else None) as policy:
        task = progress.add_task("timing layers", total=len(rows) + 1)
        for r in rows:
            conv, new = orig_modules[r.name], new_modules[r.name]
            xi = inputs[r.name]
            y = conv(xi)
            t_dense, t_new = timing.compare([lambda: conv(xi), lambda: new(xi)], LAYER_CONFIG,
                                            xi.device.type)
            kernel_for = getattr(new, "kernel_for", None)  # measured in its first calls
            out.append(LayerComparison(r.name, r.factorization, r.dense_params, r.params,
                                       _dense_macs(conv, y), new.macs(tuple(xi.shape)),
                                       t_dense.median, t_new.median,
                                       kernel_for(xi) if kernel_for else None))
            progress.advance(task)
        t0, t1 = timing.compare([lambda: original(x), lambda: factorized(x)], MODEL_CONFIG,
                                x.device.type)
        progress.advance(task)
    params = (sum(p.numel() for p in original.parameters()),
              sum(p.numel() for p in factorized.parameters()))
    return Comparison(tuple(x.shape), n_threads, out, params, (t0.median, t1.median),
                      {"layout": layout_of(x), "malloc": policy if on_cpu else None})
