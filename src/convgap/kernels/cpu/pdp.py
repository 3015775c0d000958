"""Pointwise -> depthwise -> pointwise convolution in one pass (C kernel ``pdp.c``).

``y = conv1x1(depthwise(conv1x1(x, a), d), b) + bias`` is the shape of a CP-factorized
convolution (and of a MobileNet-style inverted bottleneck without its nonlinearities). Run as
three ops, the two R-channel intermediates travel to memory and back and each op pays its own
dispatch; here every thread walks a band of output rows, keeping its window of the first
intermediate and its band of the second in cache. Float32, CPU, inference (no autograd).

With activations after the first 1x1 and the depthwise step, a depthwise bias and the
residual add, the same pass runs a MobileNetV2 inverted residual block, batch norms folded
(:func:`inverted_residual`): each epilogue applied while its data is in cache.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.nn.modules.utils import _pair

from ...errors import ConvgapError
from ...ops.memo import reuse
from ...ops.sizes import conv_length
from . import planar
from .args import PdpArgs
from .common import (BAND_PIXELS, Kernel, activation_code, bound_call, channels_innermost,
                     check_tensors, kernel_choice, pack, padded, round16)

__all__ = ["available", "pointwise_depthwise_pointwise", "inverted_residual", "Squeeze", "run",
           "bind"]


class Squeeze(NamedTuple):
    """A squeeze-excitation between an inverted residual's depthwise step and its last 1x1
    conv (EfficientNet's MBConv): ``v *= gate(F.linear(act(F.linear(v.mean((2, 3)),
    reduce, reduce_bias)), expand, expand_bias))[:, :, None, None]``. reduce: (S, R);
    reduce_bias: (S,); expand: (R, S); expand_bias: (R,); act, gate: names of
    :data:`.common.ACTIVATIONS`."""

    reduce: torch.Tensor
    reduce_bias: torch.Tensor
    expand: torch.Tensor
    expand_bias: torch.Tensor
    act: str = "silu"
    gate: str = "sigmoid"


KERNEL = Kernel("pdp", "pdp_forward", PdpArgs)
_lib = KERNEL.lib
available = KERNEL.available


def _prepare(lib, a: torch.Tensor, d: torch.Tensor, b: torch.Tensor | None,
             bias: torch.Tensor | None, bias1: torch.Tensor | None = None,
             out_map: torch.Tensor | None = None, bias2: torch.Tensor | None = None,
             squeeze: Squeeze | None = None) -> dict:
    """The kernel's operands by PdpArgs' field names: packed a, its padded bias (bias1), the
    taps (d: kh kw x Rp), their padded bias (bias2), packed b, its padded bias, the output
    map padded to (OW, Rp), the squeeze's weights as (S, Rp) rows and padded biases; None
    where absent."""
    r = d.shape[0]
    taps = torch.zeros(d.shape[1] * d.shape[2], round16(r), dtype=torch.float32)
    taps[:, :r] = d.detach().reshape(r, -1).t()
    omap = None
    if out_map is not None:
        omap = torch.zeros(out_map.shape[0], round16(r), dtype=torch.float32)
        omap[:, :r] = out_map.detach()
    se = dict.fromkeys(("wr", "br", "wu", "bu"))
    if squeeze is not None:
        rows = squeeze.reduce.shape[0]
        wr, wu = (torch.zeros(rows, round16(r), dtype=torch.float32) for _ in range(2))
        wr[:, :r] = squeeze.reduce.detach()
        wu[:, :r] = squeeze.expand.detach().t()
        se = {"wr": wr, "br": padded(squeeze.reduce_bias), "wu": wu,
              "bu": padded(squeeze.expand_bias)}
    return {"a": None if a is None else pack(lib, a), "bias1": padded(bias1), "d": taps, "bias2": padded(bias2),
            "b": None if b is None else pack(lib, b.t()), "bias": padded(bias), "map": omap,
            **se}


def _planar_weights(a, d, b, bias, nhwc: bool = False) -> planar.Weights:
    first, last, bias_ = planar.pointwise_weights(a, b, bias, nhwc)
    return planar.Weights(a=first, k1=d.detach().reshape(d.shape[0], -1).contiguous(), k2=None,
                          b=last, bias=bias_)


def _check(x, a, d, b, bias, fn: str = "pointwise_depthwise_pointwise", bias1=None,
           bias2=None) -> None:
    check_tensors(fn, x=x, a=a, d=d, b=b, bias=bias, bias1=bias1, bias2=bias2)
    if x.dim() != 4 or a.dim() != 2 or d.dim() != 3 or b.dim() != 2:
        raise ConvgapError(f"expected x (N, C, H, W), a (C, R), d (R, kh, kw), b (O, R); got "
                           f"{tuple(x.shape)}, {tuple(a.shape)}, {tuple(d.shape)}, "
                           f"{tuple(b.shape)}")
    c, r = a.shape
    if x.shape[1] != c or d.shape[0] != r or b.shape[1] != r:
        raise ConvgapError(f"channel counts disagree: x has {x.shape[1]}, a is {tuple(a.shape)}"
                           f", d {tuple(d.shape)}, b {tuple(b.shape)}")
    for name, t, size in (("bias", bias, b.shape[0]), ("bias1", bias1, r), ("bias2", bias2, r)):
        if t is not None and tuple(t.shape) != (size,):
            raise ConvgapError(f"{name} must have shape ({size},), got {tuple(t.shape)}")


def pointwise_depthwise_pointwise(x: torch.Tensor, a: torch.Tensor, d: torch.Tensor,
                                  b: torch.Tensor, bias: torch.Tensor | None = None,
                                  stride=1, padding=0, dilation=1,
                                  store: dict | None = None, kernel: str = "auto"
                                  ) -> torch.Tensor:
    """``F.conv2d(F.conv2d(F.conv2d(x, a.t()[..., None, None]), d[:, None], None, stride,
    padding, dilation, groups=R), b[..., None, None], bias)`` in one pass.

    x: (N, C, H, W) float32 on CPU, either memory format; a: (C, R); d: (R, kh, kw), one
    filter per channel; b: (O, R); bias: (O,) or None. stride, padding (zeros, symmetric),
    dilation: an int or a pair. Returns (N, O, OH, OW) in x's memory format (NCHW where x
    is both, as with one channel). ``store``: a dict kept by the caller where the weights'
    packed copies live, rebuilt when any weight is a different tensor or was modified in
    place. ``kernel``: 'nhwc' (channels innermost, this module's kernel), 'planar'
    (channel-major intermediates, :mod:`.planar`; width stride 1 only) or 'auto' (planar
    for NCHW inputs where it applies, else nhwc); both read and write either layout in
    place. Raises
    ConvgapError on bad shapes, dtypes, devices, or inputs needing gradients; RuntimeError
    where the kernel is not available (see :func:`available`)."""
    _check(x, a, d, b, bias)
    if _lib() is None:
        raise RuntimeError("convgap's C kernel is not available here (see "
                           "convgap.kernels.cpu.available)")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    use_planar = kernel_choice(kernel, planar.supports(x, stride, d.shape, padding, None),
                               x.is_contiguous())
    return run(x, a, d, b, bias, stride, padding, dilation, {} if store is None else store,
               use_planar)


def inverted_residual(x: torch.Tensor, a: torch.Tensor, d: torch.Tensor, b: torch.Tensor, *,
                      bias1: torch.Tensor | None = None, bias2: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
                      act1: str = "none", act2: str = "none", residual: bool = False,
                      squeeze: Squeeze | None = None, store: dict | None = None
                      ) -> torch.Tensor:
    """A MobileNetV2 inverted residual block (batch norms folded into the weights and
    biases) in one pass of the NHWC kernel::

        u = act1(F.conv2d(x, a.t()[..., None, None], bias1))             # expand, C -> R
        v = act2(F.conv2d(u, d[:, None], bias2, stride, padding, dilation, groups=R))
        v = v * gate(v)      # with a squeeze-excitation (Squeeze): an MBConv block
        y = F.conv2d(v, b[..., None, None], bias) (+ x if residual)       # project, R -> O

    x: (N, C, H, W) float32 on CPU, either memory format (read in place; y is written in
    x's); a: (C, R); d: (R, kh, kw); b: (O, R); bias1, bias2: (R,) or None; bias: (O,) or
    None. act1, act2: a name of :data:`.common.ACTIVATIONS` ('none', 'relu', 'relu6',
    'silu'). residual: add x to the result (needs C = O, stride 1 and an output of x's
    height and width). squeeze: a :class:`Squeeze` (weights of S = reduce.shape[0]
    channels), or None. ``store``: as :func:`pointwise_depthwise_pointwise`'s. Raises
    ConvgapError on bad shapes, dtypes, devices, activation names, a residual the shapes do
    not allow, or inputs needing gradients; RuntimeError where the kernel is not available
    (see :func:`available`)."""
    _check(x, a, d, b, bias, "inverted_residual", bias1, bias2)
    if squeeze is not None:
        _check_squeeze(squeeze, a.shape[1])
    if _lib() is None:
        raise RuntimeError("convgap's C kernel is not available here (see "
                           "convgap.kernels.cpu.available)")
    return bind(x, a, d, b, bias, _pair(stride), _pair(padding), _pair(dilation),
                {} if store is None else store, False, bias1, bias2=bias2, act1=act1,
                act2=act2, residual=residual, squeeze=squeeze)(x)


def _check_squeeze(sq: Squeeze, r: int) -> None:
    check_tensors("inverted_residual", reduce=sq.reduce, reduce_bias=sq.reduce_bias,
                  expand=sq.expand, expand_bias=sq.expand_bias)
    s = sq.reduce.shape[0] if sq.reduce.dim() == 2 else -1
    want = {"reduce": (s, r), "reduce_bias": (s,), "expand": (r, s), "expand_bias": (r,)}
    for name, shape in want.items():
        if s < 1 or tuple(getattr(sq, name).shape) != shape:
            raise ConvgapError(f"squeeze.{name} must have shape {shape} (S reduced channels "
                               f"of R = {r}), got {tuple(getattr(sq, name).shape)}")


def _geometry(lib, x: torch.Tensor, r: int, kh: int, kw: int, o: int, stride, padding,
              dilation, nchw: bool) -> tuple:
    """(pdp_forward's geometry as a PdpArgs without weights, output shape, scratch floats
    per thread)"""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, c, h, w = x.shape
    oh, ow = conv_length(h, kh, sh, (ph, ph), dh), conv_length(w, kw, sw, (pw, pw), dw)
    if oh < 1 or ow < 1:
        raise ConvgapError(f"a {kh}x{kw} filter with padding {(ph, pw)} and dilation "
                           f"{(dh, dw)} does not fit a {h}x{w} input")
    band = max(1, min(oh, round(BAND_PIXELS / ow)))
    g = PdpArgs(n=n, h=h, w=w, c=c, r=r, kh=kh, kw=kw, sh=sh, sw=sw, ph=ph, pw=pw, dh=dh,
                dw=dw, o=o, oh=oh, ow=ow, th=band, nchw=int(nchw), act1=0, act2=0, residual=0,
                se=0, se_act=0, gate=0)
    return g, (n, o, oh, ow), lib.scratch_floats(g)


def run(x: torch.Tensor, a: torch.Tensor, d: torch.Tensor, b: torch.Tensor,
        bias: torch.Tensor | None, stride: tuple, padding: tuple, dilation: tuple,
        store: dict, use_planar: bool = False) -> torch.Tensor:
    """:func:`pointwise_depthwise_pointwise` without its checks (the caller has made them;
    stride, padding, dilation are pairs; ``use_planar`` only where :func:`planar.supports`):
    ``bind(...)(x)``."""
    return bind(x, a, d, b, bias, stride, padding, dilation, store, use_planar)(x)


def bind(x: torch.Tensor, a: torch.Tensor | None, d: torch.Tensor, b: torch.Tensor | None,
         bias: torch.Tensor | None, stride: tuple, padding: tuple, dilation: tuple,
         store: dict, use_planar: bool = False, bias1: torch.Tensor | None = None,
         out_map: torch.Tensor | None = None, *, bias2: torch.Tensor | None = None,
         act1: str = "none", act2: str = "none", residual: bool = False,
         squeeze: Squeeze | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the kernel on inputs of ``x``'s shape and strides with these
    weights in their prepared forms (packed now, or reused from ``store`` while each weight
    is the same tensor at the same version): call it again only while the weights are
    unchanged. Per input geometry the kernel's arguments are worked out once and kept in
    ``store``, with the scratch. Without ``b`` (a flattened convolution; NHWC kernel only)
    the output is the depthwise result plus ``out_map`` ((OW, R), added per output column),
    and ``bias1`` is the first 1x1 conv's bias. ``bias2`` (R,), ``act1``, ``act2`` and
    ``residual`` (NHWC kernel only) make it an inverted residual block: see
    :func:`inverted_residual` (ConvgapError for an unknown activation, or a residual the
    shapes do not allow); ``squeeze`` (NHWC kernel, with ``b``) a squeeze-excitation before
    the last 1x1 conv. ``a`` None (NHWC kernel, no ``bias1``): no first 1x1 conv, the
    depthwise step reads x (act1 applied), which has R channels: an inverted residual
    without expansion."""
    lib = _lib()
    codes = activation_code(act1), activation_code(act2)
    se = (0, 0, 0) if squeeze is None else \
        (squeeze.reduce.shape[0], activation_code(squeeze.act), activation_code(squeeze.gate))
    nhwc = channels_innermost(x)
    key = (x.shape, stride, padding, dilation, nhwc)
    geo = store.get(key)
    if geo is None:
        geo = store[key] = _geometry(lib, x, d.shape[0], d.shape[1], d.shape[2],
                                     d.shape[0] if b is None else b.shape[0], stride, padding,
                                     dilation, not nhwc)
    g, out_shape, per = geo
    if a is None and (use_planar or bias1 is not None or g.c != g.r):
        raise ConvgapError(f"without a first 1x1 conv (a None) the depthwise step reads x: "
                           f"it needs {g.r} input channels (got {g.c}), no bias1, and the "
                           f"NHWC kernel")
    if squeeze is not None:  # the squeeze's map and sums take scratch too
        if b is None:
            raise ConvgapError("a squeeze-excitation runs before the last 1x1 conv: give b")
        g = g.copy(se=se[0])
        per = lib.scratch_floats(g)
    if residual and not (g.c == g.o and g.sh == g.sw == 1 and g.oh == g.h and g.ow == g.w):
        raise ConvgapError(f"a residual add needs as many output channels as input ones, "
                           f"stride 1 and the input's height and width; got {g.c} -> {g.o} "
                           f"channels, stride {(g.sh, g.sw)}, {g.h}x{g.w} -> {g.oh}x{g.ow}")
    if use_planar:
        if bias2 is not None or any(codes) or residual or squeeze is not None:
            raise ConvgapError("the planar kernel runs no activations, depthwise bias or "
                               "residual add: use the NHWC one")
        weights = reuse(store, ("planar_weights", nhwc),
                        [t for t in (a, d, b, bias) if t is not None],
                        lambda: _planar_weights(a, d, b, bias, nhwc))
        # one depthwise filter: R1 = R2 = R3, no second filter, no groups (no width stride)
        if g.sw != 1:
            raise ConvgapError("the planar kernel runs width strides of 1 only")
        geometry = planar.Geometry(n=g.n, h=g.h, w=g.w, c=g.c, r1=g.r, r2=g.r, r3=g.r,
                                   kh1=g.kh, kw1=g.kw, sh1=g.sh, ph1=g.ph, pw1=g.pw, dh1=g.dh,
                                   dw1=g.dw, kw2=0, pw2=0, dw2=1, o=g.o, oh=g.oh, ow=g.ow,
                                   z=1, depthwise=1)
        return planar.bind(x, weights, geometry, out_shape, store)
    given = (a, d, b, bias, bias1, out_map, bias2) + (() if squeeze is None else squeeze[:4])
    # which are given, too: one tensor in another role must not find these prepared forms
    prepared = reuse(store, "weights", [t for t in given if t is not None],
                     lambda: _prepare(lib, a, d, b, bias, bias1, out_map, bias2, squeeze),
                     tuple(t is not None for t in given))
    args = g.copy(**{name: None if t is None else t.data_ptr() for name, t in prepared.items()},
                  act1=codes[0], act2=codes[1], residual=int(residual), se=se[0],
                  se_act=se[1], gate=se[2])
    return bound_call(lib.pdp_forward, args, per, x.shape, out_shape, nhwc, store, prepared)
