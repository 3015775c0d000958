"""Whether the current call runs under ``torch.jit.trace`` or ``torch.compile``/``export``.

Fast paths that call opaque kernels (oneDNN packed weights, measured kernel choices) step
aside while torch records a graph, so traced, exported and compiled models hold plain
torch ops. Both ONNX exporters count: the TorchScript one (``dynamo=False``) runs
``torch.jit.trace``; the default one (``dynamo=True``) runs ``torch.export`` (non-strict:
the model's Python runs on fake tensors, with ``torch.compiler.is_compiling()`` true).

Under ``torch.jit.trace`` a tensor's sizes read as traced 0-dim tensors, not ints: the
graph records the shape arithmetic (so an export with ``dynamic_axes`` can run other
sizes), but such sizes are no cache key a later call matches. :func:`untraced` reads them
(and plans from them) as plain ints without recording anything.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["exporting", "jit_tracing", "untraced"]

_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


def exporting() -> bool:
    """True under torch.jit tracing (which the TorchScript ONNX exporter uses), or while
    torch.compile / torch.export trace (which the default ONNX exporter uses). Cheap: it
    runs on every call."""
    return torch._C._get_tracing_state() is not None or _is_compiling()


def jit_tracing() -> bool:
    """True under ``torch.jit.trace`` (and so under the TorchScript ONNX exporter); False
    under torch.compile / torch.export, which fold it to False."""
    return torch._C._get_tracing_state() is not None


@contextlib.contextmanager
def untraced() -> Iterator[None]:
    """Suspend ``torch.jit.trace`` recording inside (a no-op when not tracing): sizes read
    as ints and ops run without being recorded. For planning work (meta tensors, shape
    arithmetic) that must not reach the graph or key a cache by traced values."""
    state = torch._C._get_tracing_state()
    if state is None:
        yield
        return
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)
