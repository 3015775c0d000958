"""changes: what every transform did to a model, read from its modules.

Nothing is kept on the model: a swapped layer is an :class:`AlgoConv2d` / :class:`AlgoLinear`
(its algorithm, request and tuning are its own attributes), a factorized layer is a
:class:`TensorialConv2d` / :class:`FlattenedConv2d` (its factorization and ranks are its
structure); so after any later edit (a layer put back, replaced, swapped again) the list
still says what the model is. Two attributes are set by :func:`convgap.factorize` on the
modules it decides about: ``approximation_error`` on a new layer, and ``convgap_left`` (the
reason) on a dense layer it measured and kept. :func:`convgap.fuse` sets ``convgap_fused``
(its pattern, error and times) on each fused module and ``convgap_left`` on each block it
left; a module it fused into another (a classifier head's flatten, dropout and linear, now
in the pool's place) becomes an ``nn.Identity`` carrying ``convgap_fused_into`` (that
module's name). :func:`convgap.fold_batchnorm` replaces each
BatchNorm it folds by an ``nn.Identity`` carrying ``convgap_folded_into`` (the name of the
conv / linear that now computes it), and sets ``convgap_left`` on each BatchNorm it leaves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..algorithms.linear import AlgoLinear
from ..algorithms.module import AlgoConv2d
from ..layers.network import FusedNetwork
from ..layers import FlattenedConv2d, TensorialConv2d
from .eligible import blocker

__all__ = ["Change", "changes", "ERROR_ATTR", "LEFT_ATTR", "FOLDED_ATTR", "FUSED_ATTR",
           "FUSED_INTO_ATTR"]

ERROR_ATTR = "approximation_error"  # on a factorized layer: its relative output error
LEFT_ATTR = "convgap_left"  # on a dense layer factorize kept, a BatchNorm fold left: why
FOLDED_ATTR = "convgap_folded_into"  # on the Identity standing for a folded BatchNorm
FUSED_ATTR = "convgap_fused"  # on a module fuse built: its pattern and measurements (a dict)
FUSED_INTO_ATTR = "convgap_fused_into"  # on the Identity standing for a module fused away


@dataclass
class Change:
    """One layer a transform rebuilt, or left as it is.

    ``transform``: 'swap', 'factorize', 'fold' (a BatchNorm folded into the conv / linear
    before it, named by ``into``; the module is now an ``nn.Identity``), 'fuse' (a block
    run as one fused module; ``tuning`` holds its chain, error and times; or, with
    ``into``, a module now run inside that fused one, itself an ``nn.Identity``), or 'left' (a
    Conv2d / Linear that every transform leaves as it is, one factorize measured and kept
    dense, a BatchNorm fold left as it is, a block fuse left; ``reason`` says why).
    ``runs``: swap: the algorithm the layer runs; factorize: the factorization ('cp',
    'tucker', 'tt', 'tr', 'rcp', 'flattened'); fuse: the block pattern. ``requested``, ``layout`` (the input layout
    'auto' tuned on) and ``tuning`` (the measured candidates, seconds): swap only; ``reason``
    for a swapped layer: why the request was not honoured. ``ranks``, ``error`` (relative
    output error on the example input, None if not measured): factorize only. ``params``:
    weight parameters of the layer now (bias excluded); ``dense_params``: of the dense
    layer it stands for (None for a BatchNorm)."""

    name: str
    transform: str
    runs: str | None = None
    requested: str | None = None
    layout: str | None = None
    ranks: tuple[int, ...] | None = None
    params: int | None = None
    dense_params: int | None = None
    error: float | None = None
    reason: str | None = None
    tuning: dict | None = None
    into: str | None = None

    @property
    def compression(self) -> float | None:
        """Dense / current weight parameters."""
        return self.dense_params / self.params if self.params else None

    def to_dict(self) -> dict:
        return dict(asdict(self), compression=self.compression)


def _dense_params(m: nn.Module) -> int:
    h, w = m.kernel_size
    return m.out_channels * m.in_channels * h * w


def _change(name: str, m: nn.Module) -> Change | None:
    if isinstance(m, (AlgoConv2d, AlgoLinear)):
        tuning = getattr(m, "tuning", None)
        n = m.weight.numel()
        return Change(name, "swap", m.algorithm, m.requested, (tuning or {}).get("layout"),
                      params=n, dense_params=n, reason=m.fallback, tuning=tuning)
    if isinstance(m, (TensorialConv2d, FlattenedConv2d)):
        flat = isinstance(m, FlattenedConv2d)
        return Change(name, "factorize", "flattened" if flat else m.factorization,
                      ranks=None if flat else tuple(m.ranks), params=m.weight_params,
                      dense_params=_dense_params(m), error=getattr(m, ERROR_ATTR, None))
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        reason = blocker(m) or getattr(m, LEFT_ATTR, None)
        if reason is not None:
            n = m.weight.numel()
            return Change(name, "left", params=n, dense_params=n, reason=reason)
    if isinstance(m, nn.Identity) and hasattr(m, FOLDED_ATTR):
        return Change(name, "fold", into=getattr(m, FOLDED_ATTR))
    if isinstance(m, nn.Identity) and hasattr(m, FUSED_INTO_ATTR):
        return Change(name, "fuse", into=getattr(m, FUSED_INTO_ATTR))
    if isinstance(m, _BatchNorm) and hasattr(m, LEFT_ATTR):
        return Change(name, "left", reason=getattr(m, LEFT_ATTR))
    info = getattr(m, FUSED_ATTR, None)
    if info is not None:
        return Change(name, "fuse", info["pattern"], error=info.get("error"), tuning=info)
    if hasattr(m, LEFT_ATTR):  # a block fuse matched or saw and left
        return Change(name, "left", reason=getattr(m, LEFT_ATTR))
    return None


def changes(model: nn.Module) -> list[Change]:
    """What each transform did to ``model``, in module order: every swapped layer, every
    factorized layer, every folded BatchNorm, and every Conv2d / Linear left as it is and
    BatchNorm fold left (with the reason)."""
    # a FusedNetwork's torch path repeats its block-fused form's folds: reported once
    twins = tuple(f"{n}.model." if n else "model." for n, m in model.named_modules()
                  if isinstance(m, FusedNetwork) and m.blocks is not None)
    return [c for n, m in model.named_modules()
            if not (twins and n.startswith(twins)) and (c := _change(n, m)) is not None]
