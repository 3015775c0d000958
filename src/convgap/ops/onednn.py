"""oneDNN weight packing: a weight reordered once into oneDNN's blocked layout for a
geometry and an input shape (convolution) or a row count (linear), then reused, as
``torch.jit.freeze`` and inductor's freezing do.

On this AMD CPU oneDNN's linear on a packed weight runs at 350-480 GFLOP/s where torch.mm
(MKL sgemm, no AVX-512 here) reaches about 200; an unpacked convolution weight is
reordered inside every oneDNN call (a Tucker core on a 7x7 map at batch 1: most of the
step). CPU, float32 (bfloat16 where the CPU has the instructions), inference only: packed
weights carry no autograd.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .guard import may_run_fast
from .memo import reuse_weight

__all__ = ["AVAILABLE", "unsupported", "usable", "pack_conv", "pack_linear", "linear",
           "conv"]

AVAILABLE = torch.backends.mkldnn.is_available()


def unsupported(device: str, dtype: str, what: str) -> str | None:
    """Why oneDNN cannot run a prepacked ``what`` ('convolution', 'linear') on ``device``
    ('cpu', 'cuda') in ``dtype`` ('float32', ...), or None if it can."""
    if device != "cpu":
        return "oneDNN prepacking is CPU only"
    if not (AVAILABLE and torch.backends.mkldnn.enabled):
        return "torch was built without oneDNN (mkldnn)"
    if dtype not in ("float32", "bfloat16"):
        return f"oneDNN prepacked {what} does not take {dtype}"
    if dtype == "bfloat16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU lacks the instructions oneDNN needs for bf16 (avx512bw/vl/dq)"
    return None


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """True if ``x`` and the weight ``w`` may run on oneDNN's packed kernels here: oneDNN
    on, CPU, float32, and the fast path allowed (:func:`~.guard.may_run_fast`: no
    gradients needed, no graph being recorded)."""
    return (AVAILABLE and torch.backends.mkldnn.enabled and x.device.type == "cpu"
            and x.dtype == torch.float32 and w.dtype == torch.float32
            and may_run_fast(x, (w,)))


def pack_conv(w: torch.Tensor, padding: Sequence[int], stride: Sequence[int],
              dilation: Sequence[int], groups: int, input_shape: Sequence[int]
              ) -> torch.Tensor:
    """The 2-D convolution weight ``w`` (O, C/groups, kh, kw) in oneDNN's blocked layout
    for this geometry (symmetric zero ``padding`` (ph, pw)) and ``input_shape`` (N, C, H,
    W): the weight operand of ``torch.ops.mkldnn._convolution_pointwise``. No autograd."""
    with torch.no_grad():
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            w.detach().contiguous().to_mkldnn(), list(padding), list(stride), list(dilation),
            groups, list(input_shape))


def pack_linear(w: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """The linear weight ``w`` (O, C), in ``dtype``, reordered by oneDNN for a GEMM of
    ``rows`` rows: the weight operand of ``torch.ops.mkldnn._linear_pointwise``. No
    autograd."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(w.detach().to(dtype).contiguous(),
                                                       rows)


def linear(x: torch.Tensor, w: torch.Tensor, packed: dict | None = None) -> torch.Tensor:
    """``x @ w.t()`` by oneDNN (x: (..., C) in any strides, w: (O, C)). With a ``packed``
    store (one per caller), the weight is packed once for the row count and reused while
    unchanged (:func:`~.memo.reuse_weight`; 25% off a 6272-row GEMM here)."""
    rows = x.numel() // x.shape[-1]
    wp = reuse_weight(packed, w, rows, lambda: pack_linear(w, rows, w.dtype))
    return torch.ops.mkldnn._linear_pointwise(x, w if wp is None else wp, None, "none", [],
                                              "")


def conv(x: torch.Tensor, w: torch.Tensor, pad: Sequence[int], stride: Sequence[int],
         dilation: Sequence[int], groups: int, packed: dict | None = None,
         bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 2-D convolution on oneDNN (symmetric zero padding ``pad``). With a ``packed``
    store (one per caller), the weight is packed once for this input shape and reused
    while unchanged (:func:`~.memo.reuse_weight`); a plain weight is reordered inside every
    call."""
    pad, stride, dilation = list(pad), list(stride), list(dilation)
    wp = reuse_weight(packed, w, x.shape,
                      lambda: pack_conv(w, pad, stride, dilation, groups, x.shape))
    return torch.ops.mkldnn._convolution_pointwise(x, w if wp is None else wp, bias, pad,
                                                   stride, dilation, groups, "none", [], "")
