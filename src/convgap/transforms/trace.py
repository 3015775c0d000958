"""Symbolic traces of a model, for the transforms that match what layers compute
(``fold_batchnorm``, ``fuse``).

:func:`trace` runs ``torch.fx``'s symbolic tracer with one leaf policy: every module that
does one operation is a leaf (``torch.nn``'s own modules, convgap's rebuilt and factorized
layers, and any module whose ``forward`` cannot be traced), so the graph shows the
operations between them (additions, multiplications, activations written as functions,
permutations) and the leaves by their qualified names. :func:`roots` finds the largest
traceable submodules of a model that does not trace as a whole (data-dependent control
flow, unsupported calls): a transform then works inside each of them.
"""

from __future__ import annotations

from typing import Iterator

import torch.fx as fx
import torch.nn as nn

__all__ = ["trace", "roots", "is_leaf"]

# convgap packages whose modules are single operations (leaves) in a trace
_OWN_LEAVES = ("convgap.algorithms", "convgap.layers")


def is_leaf(module: nn.Module) -> bool:
    """A module a trace keeps as one call: torch.nn's own (except containers), convgap's
    rebuilt and factorized layers."""
    mod = type(module).__module__
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    return mod.startswith(("torch.nn", "torch.ao.nn")) or mod.startswith(_OWN_LEAVES)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_leaf(m)


def trace(module: nn.Module) -> fx.GraphModule | None:
    """``module``'s symbolic trace (leaves as :func:`is_leaf`), or None when it does not
    trace. The GraphModule shares ``module``'s submodules and parameters."""
    try:
        graph = _Tracer().trace(module)
    except Exception:  # control flow on values, unsupported calls: not traceable
        return None
    return fx.GraphModule(module, graph, type(module).__name__)


def roots(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module,
                                                                 fx.GraphModule]]:
    """``(name, module, trace)`` for the largest traceable submodules of ``model`` (itself
    when it traces), in module order; leaves are not yielded."""
    if is_leaf(model):
        return
    gm = trace(model)
    if gm is not None:
        yield prefix, model, gm
        return
    for name, child in model.named_children():
        yield from roots(child, f"{prefix}.{name}" if prefix else name)
