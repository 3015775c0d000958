"""Measured algorithm choice ('auto') for convolutions, through :mod:`convgap.choice`.

For a layer's real input the candidates are ``torch`` (the incumbent and reference) and
every registered algorithm that supports the spec, each run as a real
:class:`~convgap.algorithms.AlgoConv2d` sharing the layer's parameters. :mod:`convgap.choice`
checks each against ``F.conv2d`` (the algorithm's ``tolerance``, widened to the reference's
own rounding in fp16 / bf16 / TF32: :func:`tolerance`), times the correct ones interleaved,
confirms a non-``torch`` winner head to head against ``torch`` (it must be
``config.MARGIN`` faster) and stores the decision by name in ``tuning.json``, keyed by
device name, torch version, threads, the malloc policy on CPU (:mod:`convgap.allocator`)
and the full spec (dtype, layout and input shape included); a hit times nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from .. import choice
from ..choice import PRECISION_TOLERANCE, TUNING_FILE, clear_memory, precision_tolerance
from ..choice import relative_error
from . import registry
from .module import AlgoConv2d
from .spec import ConvSpec

__all__ = ["tune_layer", "tune_spec", "TUNING_FILE", "relative_error", "tuning_progress",
           "tolerance", "precision_tolerance", "PRECISION_TOLERANCE", "clear_memory",
           "advance_progress", "KIND"]

KIND = "conv2d"  # the kind of decision (convgap.choice.forced({KIND: name}))
_progress: list[tuple[Any, Any]] = []  # (rich Progress, task) of the running swap


def tolerance(alg: registry.Algorithm, spec: ConvSpec) -> float:
    """Relative error accepted from ``alg`` against ``F.conv2d`` on ``spec``: the algorithm's
    own ``tolerance``, widened to the rounding of the reference's precision."""
    return choice.tolerance(alg.tolerance, spec.dtype, spec.device)


@contextlib.contextmanager
def tuning_progress(progress: Any, task: Any) -> Iterator[None]:
    """Advance ``task`` of a rich ``progress`` once per tuned layer inside the block."""
    _progress.append((progress, task))
    try:
        yield
    finally:
        _progress.pop()


def _candidates(layer, x: torch.Tensor, spec: ConvSpec, names: Sequence[str] | None
                ) -> tuple[list[choice.Candidate], dict[str, str]]:
    """``torch`` first, then every named algorithm that supports ``spec``, each an
    AlgoConv2d probe on ``x``; and the unsupported ones with the reason."""
    names = list(names) if names is not None else registry.names()
    names = ["torch", *[n for n in names if n != "torch"]]
    cands, rejected = [], {}
    for name in names:
        alg = registry.get(name)
        reason = alg.supports(spec)
        if reason is not None:
            rejected[name] = f"unsupported: {reason}"
            continue
        probe = AlgoConv2d(layer, name)
        cands.append(choice.Candidate(name, lambda probe=probe: probe(x),
                                      tolerance(alg, spec)))
    return cands, rejected


@torch.no_grad()
def tune_spec(layer, x: torch.Tensor, candidates: Sequence[str] | None = None) -> dict:
    """Measure every candidate algorithm on ``layer`` (an AlgoConv2d) with input ``x``, no
    cache. Returns ``{"choice", "times": {name: median_s}, "errors": {name: rel_err},
    "rejected": {name: reason}, "confirm", ...}``."""
    spec = layer.spec_for(x)
    cands, rejected = _candidates(layer, x, spec, candidates)
    return choice.measure(cands, kind=KIND, device=spec.device, rejected=rejected).to_dict()


@torch.no_grad()
def tune_layer(layer, x: torch.Tensor) -> None:
    """Choose ``layer``'s algorithm for input ``x`` from the cache, or measure and cache it.
    Called by AlgoConv2d.forward while its algorithm is 'auto'."""
    spec = layer.spec_for(x)
    cands, rejected = _candidates(layer, x, spec, getattr(layer, "candidates", None))
    decision = choice.choose(cands, kind=KIND, spec_key=spec.key(), device=spec.device,
                             rejected=rejected)
    layer.set_algorithm(decision.choice)
    layer.tuning = dict(decision.to_dict(), cached=decision.cached, spec=spec.short(),
                        layout=spec.layout, spec_key=spec.key())
    advance_progress()


def advance_progress() -> None:
    """One layer tuned: advance the running swap's progress bar, if any."""
    if _progress:
        progress, task = _progress[-1]
        progress.advance(task)
