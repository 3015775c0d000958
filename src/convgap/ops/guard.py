"""May the fast path run? Nothing needs a gradient, and torch is not recording a graph.

Fast paths (C and Triton kernels, oneDNN packed weights, weights and results kept between
calls, in-place and ``out=`` ops, measured kernel choices) step aside where autograd needs
the plain ops and while torch records a graph, so that traced, exported and compiled
models hold plain torch ops. Both ONNX exporters count: the TorchScript one
(``dynamo=False``) runs ``torch.jit.trace``; the default one (``dynamo=True``) runs
``torch.export`` (non-strict: the model's Python runs on fake tensors, with
``torch.compiler.is_compiling()`` true). TorchScript scripting never runs this Python.

Under ``torch.jit.trace`` a tensor's sizes read as traced 0-dim tensors, not ints: the
graph records the shape arithmetic (so an export with ``dynamic_axes`` can run other
sizes), but such sizes are no cache key a later call matches. :func:`untraced` reads them
(and plans from them) as plain ints without recording anything.

Every check here runs on every call of a layer: each costs well under a microsecond
(:func:`may_run_fast` about 0.2 us in inference).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.utils._python_dispatch

__all__ = ["may_run_fast", "exporting", "jit_tracing", "untraced", "frozen_parameters",
           "observed"]

_grad_enabled = torch.is_grad_enabled
_tracing_state = torch._C._get_tracing_state
_function_mode = torch._C._is_torch_function_mode_enabled
_dispatch_mode = torch.utils._python_dispatch._get_current_dispatch_mode
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


def may_run_fast(x: torch.Tensor, params: Iterable[torch.Tensor | None] = ()) -> bool:
    """True where a fast path may run on ``x`` and ``params`` (None entries are skipped):
    none of them needs a gradient (autograd off, or none requires grad), and torch is not
    recording a graph (:func:`exporting`)."""
    if _grad_enabled():
        if x.requires_grad:
            return False
        for p in params:  # (a loop: any() over a generator costs 0.2 us more)
            if p is not None and p.requires_grad:
                return False
    return _tracing_state() is None and not _is_compiling()


def observed() -> bool:
    """True while a ``TorchFunctionMode`` or ``TorchDispatchMode`` watches the ops
    (convgap.count's recorder, ``FlopCounterMode``, profilers built on them): a fused block
    then runs its reference ops, so what is counted is what the block computes."""
    return _function_mode() or _dispatch_mode() is not None


def exporting() -> bool:
    """True under ``torch.jit.trace`` (which the TorchScript ONNX exporter uses), or while
    torch.compile / torch.export trace (which the default ONNX exporter uses)."""
    return _tracing_state() is not None or _is_compiling()


def jit_tracing() -> bool:
    """True under ``torch.jit.trace`` (and so under the TorchScript ONNX exporter); False
    under torch.compile / torch.export, which fold it to False."""
    return _tracing_state() is not None


@contextlib.contextmanager
def untraced() -> Iterator[None]:
    """Suspend ``torch.jit.trace`` recording inside (a no-op when not tracing): sizes read
    as ints and ops run without being recorded. For planning work (meta tensors, shape
    arithmetic) that must not reach the graph or key a cache by traced values."""
    state = _tracing_state()
    if state is None:
        yield
        return
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def frozen_parameters(operands: Sequence[torch.Tensor]) -> int:
    """Bit mask of the operands that are ``nn.Parameter`` s not needing gradients now (no
    autograd, or requires_grad off): results computed from those alone may be kept. 0
    while torch records a graph (:func:`exporting`)."""
    if exporting():
        return 0
    grad = _grad_enabled()
    mask = 0
    for i, t in enumerate(operands):
        if isinstance(t, nn.Parameter) and not (grad and t.requires_grad):
            mask |= 1 << i
    return mask
