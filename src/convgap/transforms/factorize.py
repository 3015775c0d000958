"""factorize: replace a model's dense convolutions by factorized (TensorialConv2d) or
flattened (FlattenedConv2d) ones decomposed from the trained kernels (what that bought:
:func:`convgap.compare`; what was done: :func:`convgap.changes`)."""

from __future__ import annotations

import copy
import warnings
from typing import Sequence

import torch
import torch.nn as nn

from .. import allocator, config, timing
from ..errors import ConvgapError
from ..layers import FAMILIES, FlattenedConv2d, TensorialConv2d, family
from ..progress import make_progress
from .changes import ERROR_ATTR, LEFT_ATTR
from .eligible import blocker, find_layers
from .select import Layers, select

__all__ = ["factorize", "FACTORIZATIONS", "default_layers"]

FACTORIZATIONS = (*FAMILIES, "flattened")


def default_layers(name: str, module: nn.Module) -> bool:
    """The convolutions factorized by default: dense (groups=1), zeros padding, a spatial
    kernel (not 1x1)."""
    return (isinstance(module, nn.Conv2d) and module.groups == 1
            and module.padding_mode == "zeros" and tuple(module.kernel_size) != (1, 1))


def _check(name: str, conv: nn.Conv2d) -> None:
    if conv.groups != 1:
        raise ConvgapError(f"{name}: factorize needs dense convolutions; it has groups="
                           f"{conv.groups}")
    if conv.padding_mode != "zeros":
        raise ConvgapError(f"{name}: factorize needs zeros padding, not {conv.padding_mode!r}")
    if isinstance(conv.padding, str):
        raise ConvgapError(f"{name}: factorize needs numeric padding, not {conv.padding!r}")


KEEP = ("faster", "all")


def factorize(model: nn.Module, what: str, example_input: torch.Tensor | None = None,
              *, layers: Layers = None, inplace: bool = False, check: bool = True,
              quiet: bool = False, compression: float | None = None,
              rank: int | Sequence[int] | None = None, rank_multiple: int = 8,
              keep: str = "faster") -> nn.Module:
    """Replace convolutions of ``model`` by factorized ones decomposed from their weights;
    returns the model (a copy unless ``inplace``).

    ``what``: the factorization, 'cp', 'tucker', 'tt', 'tr', 'rcp'
    (:class:`TensorialConv2d`) or 'flattened' (:class:`FlattenedConv2d`, one rank-1 repeat
    per output channel; takes neither rank nor compression). Give ``compression`` (dense /
    factor weight parameters, per layer) or ``rank``; with ``compression``, CP / Tucker / TT
    ranks of at least 2 x ``rank_multiple`` are rounded down to a multiple of it (see
    :class:`TensorialConv2d`; 1: off). ``layers``: None (every dense, non-1x1 conv), module
    names, a module type, or a callable ``(name, module) -> bool``
    (:mod:`convgap.transforms.select`). Conv2d subclasses with their own computation (an
    overridden ``forward``, hooks, parametrizations) are never replaced: they are left with
    a warning (:func:`convgap.changes` lists them with the reason). Every layer's ranks are
    checked before anything is replaced (an impossible compression raises ConvgapError
    naming the layer).

    ``check`` (with ``example_input``, a batch of the shape you will run): each factorized
    layer runs on its real input; one whose output shape differs from the original layer's
    is not kept, its approximation error (max|y - y_dense| / max|y_dense|) is recorded on
    the new module (``approximation_error``), and with ``keep='faster'`` (the default) it
    is timed against the dense layer (interleaved, paired; ``config.LAYER_COMPARE``) and
    kept only if faster; ``keep='all'`` keeps every layer. A dense layer left this way
    carries the reason (``convgap_left``); :func:`convgap.changes` lists both. Without
    ``check`` or ``example_input`` every selected layer is replaced, unmeasured.
    """
    factorization = what
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
    names = select(model, layers, lambda m: isinstance(m, nn.Conv2d), default_layers, "Conv2d")
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
    measure = check and example_input is not None
    inputs = find_layers(model, example_input).inputs if measure else {}
    if not inplace:
        model = copy.deepcopy(model)
        modules = dict(model.named_modules())
    on_cpu = measure and example_input.device.type == "cpu"
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
            reason = _measure(conv, new, inputs[n][0], keep) if n in inputs else None
            if reason is None:
                parent, _, child = n.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, new)
            else:
                setattr(conv, LEFT_ATTR, reason)
            progress.advance(task)
    return model


def _measure(conv: nn.Module, new: nn.Module, x: torch.Tensor, keep: str) -> str | None:
    """Run the factorized layer on the dense one's real input ``x``: a different output
    shape is never kept; record the approximation error on ``new``; with
    ``keep='faster'`` time both (interleaved, paired) and keep only a faster one. Returns
    why the dense layer stays, or None."""
    was = new.training
    new.eval()
    try:
        y, ref = new(x), conv(x)
        if y.shape != ref.shape:
            return (f"the factorized layer's output is {tuple(y.shape)}, the original's "
                    f"{tuple(ref.shape)}")
        setattr(new, ERROR_ATTR,
                float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
        if keep == "faster":
            t_new, t_dense = timing.compare([lambda: new(x), lambda: conv(x)],
                                            config.LAYER_COMPARE, x.device.type)
            ratio = timing.paired_ratio(t_new, t_dense)
            if ratio >= 1.0:
                return (f"measured slower than the dense layer ({ratio:.2f}x its time); "
                        "keep='all' keeps it")
        return None
    finally:
        new.train(was)
