"""Pointwise -> convolution (-> convolution along rows) -> pointwise in one pass (C kernel
``pcp.c``): the shape of Tucker-2 (1x1, k x k core, 1x1) and tensor-train (1x1, k x 1, 1 x k,
1x1) factorized convolutions, and, with groups sharing the filters, of tensor-ring ones.

Each thread walks bands of output rows over a zero-padded window of the first 1x1 conv's
output, and runs each convolution as an implicit GEMM over that window, so the intermediates
stay in cache and each step runs on full vector blocks. Float32, CPU, inference (no
autograd).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.modules.utils import _pair

from ...errors import ConvgapError
from ...ops.memo import reuse
from ...ops.sizes import conv_length
from . import planar
from .args import PcpArgs
from .common import (BAND_PIXELS, Kernel, bound_call, channels_innermost, check_tensors,
                     kernel_choice, pack, padded)

__all__ = ["available", "pointwise_conv_pointwise", "run", "bind"]


KERNEL = Kernel("pcp", "pcp_forward", PcpArgs)
_lib = KERNEL.lib
available = KERNEL.available


def _check(x, a, k1, b, bias, k2, groups, stride, stride2) -> None:
    check_tensors("pointwise_conv_pointwise", x=x, a=a, k1=k1, b=b, bias=bias, k2=k2)
    if not isinstance(groups, int) or groups < 1:
        raise ConvgapError(f"groups must be a positive int, got {groups!r}")
    if groups > 1 and (_pair(stride)[1] != 1 or stride2 != 1):
        raise ConvgapError("with groups > 1 the stride along the width must be 1")
    if x.dim() != 4 or a.dim() != 2 or k1.dim() != 4 or b.dim() != 2 or \
            (k2 is not None and k2.dim() != 4):
        raise ConvgapError("expected x (N, C, H, W), a (C, R1), k1 (R2, R1, kh, kw), k2 None "
                           "or (R3, R2, 1, kw), b (O, R3)")
    r3 = k1.shape[0] if k2 is None else k2.shape[0]
    if x.shape[1] != a.shape[0] or groups * k1.shape[1] != a.shape[1] or \
            b.shape[1] != groups * r3 or \
            (k2 is not None and k2.shape[1] != k1.shape[0]):
        raise ConvgapError(f"channel counts disagree: x has {x.shape[1]}, a is "
                           f"{tuple(a.shape)}, k1 {tuple(k1.shape)}, k2 "
                           f"{None if k2 is None else tuple(k2.shape)}, b {tuple(b.shape)}")
    if k2 is not None and k2.shape[2] != 1:
        raise ConvgapError(f"k2 convolves along rows only (R3, R2, 1, kw); got "
                           f"{tuple(k2.shape)}")
    if bias is not None and tuple(bias.shape) != (b.shape[0],):
        raise ConvgapError(f"bias must have shape ({b.shape[0]},), got {tuple(bias.shape)}")


def pointwise_conv_pointwise(x: torch.Tensor, a: torch.Tensor, k1: torch.Tensor,
                             b: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
                             padding=0, dilation=1, k2: torch.Tensor | None = None,
                             stride2: int = 1, padding2: int = 0, dilation2: int = 1,
                             groups: int = 1, store: dict | None = None,
                             kernel: str = "auto") -> torch.Tensor:
    """``F.conv2d(F.conv2d(F.conv2d(F.conv2d(x, a.t()[..., None, None]), k1, None, stride,
    padding, dilation), k2, None, (1, stride2), (0, padding2), (1, dilation2)),
    b[..., None, None], bias)`` in one pass (without the k2 step where k2 is None); with
    ``groups`` = Z > 1 the maps between the 1x1 convolutions hold Z groups of channels and
    each filter applies to every group (``F.conv2d(u, k1.repeat(Z, 1, 1, 1), groups=Z)``).

    x: (N, C, H, W) float32 on CPU, either memory format; a: (C, Z R1); k1: (R2, R1, kh,
    kw), an nn.Conv2d weight; k2: None or (R3, R2, 1, kw2), a second convolution along
    rows; b: (O, Z R3) (R3 = R2 without k2); bias: (O,) or None; group-major channel order.
    stride, padding (zeros, symmetric), dilation of k1: an int or a pair; those of k2: ints
    along the width. Returns (N, O, OH, OW) in x's memory format. ``store``: a dict kept by
    the caller for the packed weights (rebuilt when a weight is a different tensor or was
    modified in place). ``kernel``: 'nhwc' (channels innermost, this module's kernel),
    'planar' (channel-major intermediates, :mod:`.planar`; width strides 1, and with k2 a
    k1 along columns only) or 'auto' (planar for NCHW inputs where it applies, else nhwc);
    both read and write either layout in place. Raises ConvgapError on bad
    shapes, dtypes, devices, or inputs needing gradients; RuntimeError where the kernel is
    not available (see :func:`available`)."""
    _check(x, a, k1, b, bias, k2, groups, stride, stride2)
    if _lib() is None:
        raise RuntimeError("convgap's C kernel is not available here (see "
                           "convgap.kernels.cpu.available)")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    second = (int(stride2), int(padding2), int(dilation2))
    use_planar = kernel_choice(kernel, planar.supports(x, stride, k1.shape, padding,
                                                       None if k2 is None else second),
                               x.is_contiguous())
    return run(x, a, k1, b, bias, stride, padding, dilation, k2, second,
               {} if store is None else store, groups, use_planar)


def _geometry(lib, x: torch.Tensor, a, k1, k2, b, stride, padding, dilation, second,
              groups: int, nchw: bool) -> tuple:
    """(pcp_forward's geometry as a PcpArgs without weights, output shape, scratch floats
    per thread)"""
    n, c, h, w = x.shape
    r2, r1, kh, kw = k1.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh, w1 = conv_length(h, kh, sh, (ph, ph), dh), conv_length(w, kw, sw, (pw, pw), dw)
    r3, kw2 = (r2, 0) if k2 is None else (k2.shape[0], k2.shape[3])
    s2, p2, d2 = second
    ow = w1 if k2 is None else conv_length(w1, kw2, s2, (p2, p2), d2)
    if oh < 1 or w1 < 1 or ow < 1:
        raise ConvgapError(f"the filters do not fit a {h}x{w} input (padding {(ph, pw)}, "
                           f"dilation {(dh, dw)})")
    band = max(1, min(oh, round(BAND_PIXELS / ow)))
    g = PcpArgs(n=n, h=h, w=w, c=c, r1=r1, r2=r2, r3=r3, kh1=kh, kw1=kw, sh1=sh, sw1=sw,
                ph1=ph, pw1=pw, dh1=dh, dw1=dw, kw2=kw2, sw2=s2, pw2=p2, dw2=d2,
                o=b.shape[0], oh=oh, ow=ow, th=band, z=groups, nchw=int(nchw))
    return g, (n, b.shape[0], oh, ow), lib.scratch_floats(g)


def _prepare(lib, a, k1, k2, b, bias) -> dict:
    """The kernel's operands by PcpArgs' field names, packed for the GEMM core."""
    def taps(k):  # (R_out, R_in, kh, kw) -> (kh * kw, R_in, R_out)
        return k.detach().permute(2, 3, 1, 0).reshape(-1, k.shape[1], k.shape[0])
    return {"a": pack(lib, a), "k1": pack(lib, taps(k1)),
            "k2": None if k2 is None else pack(lib, taps(k2)), "b": pack(lib, b.t()),
            "bias": padded(bias)}


def _planar_weights(a, k1, k2, b, bias, nhwc: bool = False,
                    winograd: bool = False) -> planar.Weights:
    def taps(k):  # (R_out, R_in, kh, kw) -> (kh * kw, R_out, R_in)
        return k.detach().permute(2, 3, 0, 1).reshape(-1, k.shape[0], k.shape[1]).contiguous()
    first, last, bias_ = planar.pointwise_weights(a, b, bias, nhwc)
    return planar.Weights(a=first, k1=planar.winograd_weights(k1) if winograd else taps(k1),
                          k2=None if k2 is None else taps(k2), b=last, bias=bias_)


def run(x: torch.Tensor, a: torch.Tensor, k1: torch.Tensor, b: torch.Tensor,
        bias: torch.Tensor | None, stride: tuple, padding: tuple, dilation: tuple,
        k2: torch.Tensor | None, second: tuple, store: dict, groups: int = 1,
        use_planar: bool = False) -> torch.Tensor:
    """:func:`pointwise_conv_pointwise` without its checks (the caller has made them;
    stride, padding, dilation are pairs, ``second`` is k2's (stride, padding, dilation)):
    ``bind(...)(x)``."""
    return bind(x, a, k1, b, bias, stride, padding, dilation, k2, second, store, groups,
                use_planar)(x)


def bind(x: torch.Tensor, a: torch.Tensor, k1: torch.Tensor, b: torch.Tensor,
         bias: torch.Tensor | None, stride: tuple, padding: tuple, dilation: tuple,
         k2: torch.Tensor | None, second: tuple, store: dict, groups: int = 1,
         use_planar: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The kernel bound to these weights for inputs of ``x``'s shape and strides, as
    :func:`.pdp.bind` (valid while the weights are unchanged)."""
    lib = _lib()
    nhwc = channels_innermost(x)
    key = (x.shape, stride, padding, dilation, second, groups, nhwc)
    geo = store.get(key)
    if geo is None:
        geo = store[key] = _geometry(lib, x, a, k1, k2, b, stride, padding, dilation, second,
                                     groups, not nhwc)
    g, out_shape, per = geo
    weights = [t for t in (a, k1, k2, b, bias) if t is not None]
    if use_planar:
        # planar's geometry: pcp's fields of the same names (it has no width strides)
        if g.sw1 != 1 or (k2 is not None and g.sw2 != 1):  # (no k2: no second stride)
            raise ConvgapError("the planar kernel runs width strides of 1 only")
        geometry = planar.Geometry(**{name: getattr(g, name) for name in planar.Geometry._fields
                                      if name != "depthwise"}, depthwise=0)
        wino = planar.winograd_applies(geometry)
        return planar.bind(x, reuse(store, ("planar_weights", nhwc, wino), weights,
                                    lambda: _planar_weights(a, k1, k2, b, bias, nhwc, wino)),
                           geometry, out_shape, store)
    prepared = reuse(store, "weights", weights, lambda: _prepare(lib, a, k1, k2, b, bias))
    args = g.copy(**{name: None if t is None else t.data_ptr() for name, t in prepared.items()})
    return bound_call(lib.pcp_forward, args, per, x.shape, out_shape, nhwc, store, prepared)
