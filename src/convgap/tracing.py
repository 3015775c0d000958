"""Whether the current call runs under ``torch.jit.trace`` or ``torch.compile``/``export``.

Fast paths that call opaque kernels (oneDNN packed weights, measured kernel choices) step
aside while torch records a graph, so traced, exported and compiled models hold plain
torch ops.
"""

from __future__ import annotations

import torch

__all__ = ["exporting"]

_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


def exporting() -> bool:
    """True under torch.jit tracing (which the TorchScript ONNX exporter uses), or while
    torch.compile / torch.export trace. Cheap: it runs on every call."""
    return torch._C._get_tracing_state() is not None or _is_compiling()
