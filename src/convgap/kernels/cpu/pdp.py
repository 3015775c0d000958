"""Pointwise -> depthwise -> pointwise convolution in one pass (C kernel ``pdp.c``).

``y = conv1x1(depthwise(conv1x1(x, a), d), b) + bias`` is the shape of a CP-factorized
convolution (and of a MobileNet-style inverted bottleneck without its nonlinearities). Run as
three ops, the two R-channel intermediates travel to memory and back and each op pays its own
dispatch; here every thread walks a band of output rows, keeping its window of the first
intermediate and its band of the second in cache. Float32, CPU, inference (no autograd).
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import torch
from torch.nn.modules.utils import _pair

from ...errors import ConvgapError
from .build import library

__all__ = ["available", "pointwise_depthwise_pointwise", "run", "BAND_PIXELS"]

BAND_PIXELS = 96  # output pixels per band: rows of the second GEMM per call of its loop
_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long


def _lib() -> ctypes.CDLL | None:
    lib = library("pdp")
    if lib is not None and not getattr(lib, "_typed", False):
        lib.packed_floats.restype = _L
        lib.packed_floats.argtypes = [_I, _I]
        lib.scratch_floats.restype = _L
        lib.scratch_floats.argtypes = [_I] * 7
        lib.pack_b.argtypes = [_P, _I, _I, _L, _L, _P]
        lib.pdp_forward.argtypes = [_P, _I, _I, _I, _I, _P, _I, _P, _I, _I, _I, _I, _I, _I,
                                    _I, _I, _P, _I, _P, _P, _I, _I, _I, _P, _I]
        lib.pdp_forward.restype = None
        lib._typed = True
    return lib


def available() -> bool:
    """True where the C kernel is built and loadable (x86-64 with AVX-512, a C compiler,
    ``CONVGAP_NATIVE`` not 0)."""
    return _lib() is not None


def _pack(lib, w: torch.Tensor) -> torch.Tensor:
    """A (K, N) weight (any strides) in the kernel's panel layout."""
    k, n = w.shape
    out = torch.empty(lib.packed_floats(k, n), dtype=torch.float32)
    lib.pack_b(w.data_ptr(), k, n, w.stride(0), w.stride(1), out.data_ptr())
    return out


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


def _prepare(lib, a: torch.Tensor, d: torch.Tensor, b: torch.Tensor,
             bias: torch.Tensor | None) -> tuple:
    r = a.shape[1]
    taps = torch.zeros(d.shape[1] * d.shape[2], _round16(r), dtype=torch.float32)
    taps[:, :r] = d.reshape(r, -1).t()
    padded = None
    if bias is not None:
        padded = torch.zeros(_round16(b.shape[0]), dtype=torch.float32)
        padded[:b.shape[0]] = bias
    return _pack(lib, a), taps, _pack(lib, b.t()), padded


def _check(x, a, d, b, bias) -> None:
    for name, t in (("x", x), ("a", a), ("d", d), ("b", b), ("bias", bias)):
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype != torch.float32:
            raise ConvgapError(f"pointwise_depthwise_pointwise runs float32 CPU tensors; "
                               f"{name} is {t.dtype} on {t.device}")
        if torch.is_grad_enabled() and t.requires_grad:
            raise ConvgapError("pointwise_depthwise_pointwise has no backward: call it "
                               "under torch.no_grad() (or use the layer's torch path)")
    if x.dim() != 4 or a.dim() != 2 or d.dim() != 3 or b.dim() != 2:
        raise ConvgapError(f"expected x (N, C, H, W), a (C, R), d (R, kh, kw), b (O, R); got "
                           f"{tuple(x.shape)}, {tuple(a.shape)}, {tuple(d.shape)}, "
                           f"{tuple(b.shape)}")
    c, r = a.shape
    if x.shape[1] != c or d.shape[0] != r or b.shape[1] != r:
        raise ConvgapError(f"channel counts disagree: x has {x.shape[1]}, a is {tuple(a.shape)}"
                           f", d {tuple(d.shape)}, b {tuple(b.shape)}")
    if bias is not None and tuple(bias.shape) != (b.shape[0],):
        raise ConvgapError(f"bias must have shape ({b.shape[0]},), got {tuple(bias.shape)}")


def pointwise_depthwise_pointwise(x: torch.Tensor, a: torch.Tensor, d: torch.Tensor,
                                  b: torch.Tensor, bias: torch.Tensor | None = None,
                                  stride=1, padding=0, dilation=1,
                                  store: dict | None = None) -> torch.Tensor:
    """``F.conv2d(F.conv2d(F.conv2d(x, a.t()[..., None, None]), d[:, None], None, stride,
    padding, dilation, groups=R), b[..., None, None], bias)`` in one pass.

    x: (N, C, H, W) float32 on CPU, either memory format (channels_last memory is read in
    place; NCHW is copied to it first); a: (C, R); d: (R, kh, kw), one filter per channel;
    b: (O, R); bias: (O,) or None. stride, padding (zeros, symmetric), dilation: an int or a
    pair. Returns (N, O, OH, OW) in x's memory format (NCHW where x is both, as with one
    channel). ``store``: a dict kept by the caller
    where the weights' packed copies live, rebuilt when any weight is a different tensor or
    was modified in place. Raises ConvgapError on bad shapes, dtypes, devices, or inputs
    needing gradients; RuntimeError where the kernel is not available (see
    :func:`available`)."""
    _check(x, a, d, b, bias)
    if _lib() is None:
        raise RuntimeError("convgap's C kernel is not available here (see "
                           "convgap.kernels.cpu.available)")
    return run(x, a, d, b, bias, _pair(stride), _pair(padding), _pair(dilation),
               {} if store is None else store)


def _geometry(lib, x: torch.Tensor, r: int, kh: int, kw: int, o: int, stride, padding,
              dilation) -> tuple:
    """(integer arguments of pdp_forward, output shape, scratch floats per thread)"""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, c, h, w = x.shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ConvgapError(f"a {kh}x{kw} filter with padding {(ph, pw)} and dilation "
                           f"{(dh, dw)} does not fit a {h}x{w} input")
    band = max(1, min(oh, round(BAND_PIXELS / ow)))
    per = lib.scratch_floats(w, r, kh, sh, dh, ow, band)
    return (n, h, w, c, r, kh, kw, sh, sw, ph, pw, dh, dw, o, oh, ow, band), \
        (n, o, oh, ow), per


def run(x: torch.Tensor, a: torch.Tensor, d: torch.Tensor, b: torch.Tensor,
        bias: torch.Tensor | None, stride: tuple, padding: tuple, dilation: tuple,
        store: dict) -> torch.Tensor:
    """:func:`pointwise_depthwise_pointwise` without its checks (the caller has made them;
    stride, padding, dilation are pairs): per input geometry the kernel's arguments are
    worked out once and kept in ``store``, with the packed weights and the scratch."""
    from ...einsum.evaluate import reuse
    lib = _lib()
    key = (x.shape, stride, padding, dilation)
    geo = store.get(key)
    if geo is None:
        geo = store[key] = _geometry(lib, x, d.shape[0], d.shape[1], d.shape[2], b.shape[0],
                                     stride, padding, dilation)
    ints, out_shape, per = geo
    weights = (a, d, b) if bias is None else (a, d, b, bias)
    pa, taps, pb, pbias = reuse(store, "weights", weights,
                                lambda: _prepare(lib, a, d, b, bias))
    nhwc = x.is_contiguous(memory_format=torch.channels_last)
    xh = x if nhwc else x.contiguous(memory_format=torch.channels_last)
    nchw_out = not nhwc or x.is_contiguous()  # (both, for 1 channel or 1 pixel: NCHW)
    threads = torch.get_num_threads()
    scratch = store.get("scratch")
    if scratch is None or scratch.numel() < threads * per:
        scratch = store["scratch"] = torch.empty(threads * per, dtype=torch.float32)
    y = torch.empty(out_shape, dtype=torch.float32, memory_format=torch.channels_last)
    n, h, w, c, r, kh, kw, sh, sw, ph, pw, dh, dw, o, oh, ow, band = ints
    lib.pdp_forward(xh.data_ptr(), n, h, w, c, pa.data_ptr(), r, taps.data_ptr(), kh, kw, sh,
                    sw, ph, pw, dh, dw, pb.data_ptr(), o,
                    None if pbias is None else pbias.data_ptr(), y.data_ptr(), oh, ow, band,
                    scratch.data_ptr(), threads)
    return y.contiguous() if nchw_out else y
