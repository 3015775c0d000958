"""The fused factorized convolutions on NCHW maps (C kernel ``planar.c``).

:mod:`.pdp` and :mod:`.pcp` hold output channels in their vectors, on NHWC maps (an NCHW
input is read in place by their first GEMM, and each output band is transposed into the
result's planes). This kernel keeps every map channel-major instead (pixels in the vectors,
weights broadcast): no transposes, and narrow ranks (a 24-channel Tucker core, a tensor
ring's 7-channel groups) still fill the vectors, but each band streams every weight once,
so small maps (7x7) run slower than on the NHWC kernels; the layers measure both. It serves
both: ``depthwise`` picks pointwise -> depthwise -> pointwise (CP), else pointwise -> conv
(-> conv along rows) -> pointwise (Tucker, TT, TR). Width strides must be 1, and with a
second convolution the first must run along columns only (as in TT and TR).
"""

from __future__ import annotations

import ctypes
from typing import Callable

import torch

from .common import Kernel, bound_call

__all__ = ["available", "supports", "bind", "BAND_PIXELS"]

# output pixels per band: each band streams every weight once, and here pixels are the
# vector dimension, so longer bands pay (128@28 at batch 8: 0.59 ms at 96, 0.53 at 384;
# the channels-innermost kernels' 96 is as fast as 192 there)
BAND_PIXELS = 384


KERNEL = Kernel("planar", "planar_forward", 9)
_lib = KERNEL.lib
available = KERNEL.available


def supports(x: torch.Tensor, stride: tuple, k1_shape: tuple, padding: tuple,
             second: tuple | None) -> bool:
    """True if the planar kernel can run this geometry on ``x``: an NCHW-contiguous input,
    width strides 1, and, with a second convolution, a first one along columns only."""
    if not x.is_contiguous() or stride[1] != 1:
        return False
    if second is not None and (second[0] != 1 or k1_shape[-1] != 1 or padding[1] != 0):
        return False
    return available()


def bind(x: torch.Tensor, weights: tuple, geometry: tuple, out_shape: tuple, store: dict
         ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the kernel on inputs of ``x``'s shape: ``weights`` = (A^T, first
    filter taps, second filter taps or None, B, bias or None) prepared by the caller
    (float32, contiguous, held by the function); ``geometry`` = the integer arguments but
    the band (see planar.c's enum, from G_N to G_OW, then G_Z and G_DEPTHWISE). It returns
    (N, O, OH, OW), NCHW."""
    lib = _lib()
    key = ("planar", geometry)
    ints = store.get(key)
    if ints is None:
        *head, z, depthwise = geometry
        ow = head[-1]
        band = max(1, min(head[-2], round(BAND_PIXELS / ow)))
        ints = store[key] = (ctypes.c_int * 23)(*head, band, z, depthwise)
    per = lib.scratch_floats(ints)
    pointers = tuple(None if t is None else t.data_ptr() for t in weights)
    return bound_call(lib.planar_forward, ints, pointers, per, out_shape, False, store,
                      weights)
