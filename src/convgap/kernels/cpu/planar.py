"""The fused factorized convolutions with channel-major intermediates (C kernel
``planar.c``).

:mod:`.pdp` and :mod:`.pcp` hold output channels in their vectors, on NHWC maps (an NCHW
input is read in place by their first GEMM, and each output band is transposed into the
result's planes). This kernel keeps the maps between the 1x1 convolutions channel-major
instead (pixels in the vectors, weights broadcast), so narrow ranks (a 24-channel Tucker
core, a tensor ring's 7-channel groups) still fill the vectors; but each band streams every
weight once, so small maps (7x7) run slower than on the NHWC kernels, and the layers measure
both. NCHW inputs and outputs are read and written in place; channels_last ones too (the
first 1x1 conv then runs with pixels as rows and its rows are transposed into the
intermediate's planes, and the last 1x1 conv writes pixel rows). It serves both families'
shapes: ``depthwise`` picks pointwise -> depthwise -> pointwise (CP), else pointwise -> conv
(-> conv along rows) -> pointwise (Tucker, TT, TR); a lone 3x3 conv with strides and
dilations of 1 between enough channels (a Tucker core) runs as Winograd F(2x2, 3x3).
Width strides must be 1, and with a second convolution the first must run along columns
only (as in TT and TR).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ...ops.layouts import channels_innermost
from .args import PlanarArgs
from .common import Kernel, bound_call, pack, padded

__all__ = ["available", "supports", "pointwise_weights", "bind", "Geometry", "Weights",
           "band_rows", "BAND_PIXELS",
           "BAND_FLOATS", "WINOGRAD", "WINOGRAD_MIN_CHANNELS", "winograd_applies",
           "winograd_weights", "TAIL_DOTS", "first_tail", "PAIRS", "first_pairs"]

# output pixels per band: each band streams every weight once and pays its window's halo,
# and here pixels are the vector dimension, so longer bands pay off (at batch 8, fused 10x
# layers on 128@28 ran 5% faster with whole 784-pixel images than with 384-pixel bands, and
# on 64@56 8-10% faster with 1568 than with 784, though their intermediates then outgrow
# the 1 MB L2); up to BAND_PIXELS, fewer where the band's intermediates would pass
# BAND_FLOATS (wide ranks on large maps)
BAND_PIXELS = 1568
BAND_FLOATS = 384 * 1024  # 1.5 MB of intermediates per thread


def band_rows(oh: int, ow: int, floats_per_pixel: int) -> int:
    """Output rows per band: about BAND_PIXELS pixels (at least 96, and no more than
    BAND_FLOATS of intermediates at ``floats_per_pixel``), whole rows, at most ``oh``."""
    pixels = min(BAND_PIXELS, max(96, BAND_FLOATS // max(1, floats_per_pixel)))
    return max(1, min(oh, round(pixels / ow)))


# a 3x3 filter with strides and dilations of 1 between at least WINOGRAD_MIN_CHANNELS
# channels runs as Winograd F(2x2, 3x3) (2.25x fewer products, plus the transforms; the
# filter's taps in winograd_weights' form); False runs every filter directly. Measured here
# (2 threads, whole layers): 24 -> 24 channels at 128@28, batch 8, 349 -> 325 us; 56 -> 56
# at 256@14, 415 -> 357 us; 24 at 64@56, 127 -> 115 us; but 16 at 64@56 90 -> 95 us (the
# transforms cost as much as the saved products), 20 at 128@28 about even.
WINOGRAD = True
WINOGRAD_MIN_CHANNELS = 20

# Winograd's filter transform G (4 x 3): U = G g G^T
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


TAIL_DOTS = 2


def first_tail(n: int) -> int:
    """How many of the first 1x1 conv's ``n`` output channels the kernel computes as dot
    products on channels_last maps (its G_TAIL): the last n % 16, where that is at most
    TAIL_DOTS and n > 16 (a full vector fewer in every GEMM block: a tensor ring's 49
    channels as 48 + 1), else 0."""
    return n % 16 if n > 16 and n % 16 <= TAIL_DOTS else 0


# channels_last maps: a first 1x1 conv into 8 or 24 channels (a half vector past a multiple
# of 16) runs two pixels per 16 or 48 lanes (gemm.h's gemm_pairs) instead of one in 16 or 32;
# False runs it like any other width. Measured here: 128 -> 24 channels over 416 pixels,
# 13.0 -> 10.6 us on one thread.
PAIRS = True


def first_pairs(n: int) -> bool:
    """True if the kernel computes the first 1x1 conv's ``n`` output channels two pixels at
    a time on channels_last maps (its G_PAIRS): n is 8 or 24, while PAIRS is on."""
    return PAIRS and n in (8, 24)


class Geometry(NamedTuple):
    """What a caller of :func:`bind` states about the layer, by name (the fields of
    args.h's PlanarArgs of the same names; :func:`bind` adds the band, the layout and the
    forms it picks: th, nhwc, wino, tail, pairs). Width strides are 1."""
    n: int
    h: int
    w: int
    c: int
    r1: int
    r2: int
    r3: int
    kh1: int
    kw1: int
    sh1: int
    ph1: int
    pw1: int
    dh1: int
    dw1: int
    kw2: int
    pw2: int
    dw2: int
    o: int
    oh: int
    ow: int
    z: int
    depthwise: int


class Weights(NamedTuple):
    """The kernel's weights in their prepared forms (see :func:`bind`), named as PlanarArgs'
    pointer fields."""
    a: torch.Tensor
    k1: torch.Tensor
    k2: torch.Tensor | None
    b: torch.Tensor
    bias: torch.Tensor | None


def winograd_applies(geometry: Geometry) -> bool:
    """True if the kernel runs ``geometry`` with Winograd F(2x2, 3x3): one 3x3 filter (no
    second one, no depthwise, no groups) with stride and dilation 1 and at least
    WINOGRAD_MIN_CHANNELS channels in and out, while WINOGRAD is on."""
    g = geometry
    return WINOGRAD and not g.depthwise and g.z == 1 and g.kw2 == 0 and \
        (g.kh1, g.kw1) == (3, 3) and g.sh1 == g.dh1 == g.dw1 == 1 and \
        min(g.r1, g.r2) >= WINOGRAD_MIN_CHANNELS


def winograd_weights(k: torch.Tensor) -> torch.Tensor:
    """The (R2, R1, 3, 3) filter ``k`` as the kernel's Winograd operand: U = G g G^T for
    every (out, in) pair, (16, R2, R1) contiguous float32, transformed in float64."""
    g = torch.tensor(_G, dtype=torch.float64)
    u = torch.einsum("xa,ocab,yb->xyoc", g, k.detach().double(), g)
    return u.reshape(16, k.shape[0], k.shape[1]).float().contiguous()


KERNEL = Kernel("planar", "planar_forward", PlanarArgs)
_lib = KERNEL.lib
available = KERNEL.available


def supports(x: torch.Tensor, stride: tuple, k1_shape: tuple, padding: tuple,
             second: tuple | None) -> bool:
    """True if the planar kernel can run this geometry on ``x``: a dense NCHW or
    channels_last input, width strides 1, and, with a second convolution, a first one along
    columns only."""
    if not (x.is_contiguous() or channels_innermost(x)) or stride[1] != 1:
        return False
    if second is not None and (second[0] != 1 or k1_shape[-1] != 1 or padding[1] != 0):
        return False
    return available()


def pointwise_weights(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                      nhwc: bool) -> tuple:
    """The two 1x1 convolutions' weights in the kernel's forms, from ``a`` (C, Z R1), ``b``
    (O, Z R3) and ``bias`` (O,) or None: (first, last, bias). For NCHW maps A^T and B
    row-major and the bias as is; for channels_last ones both packed for the GEMM core
    (gemm.h's pack_b; A's last :func:`first_tail` columns, run as dot products, follow the
    packed rest as rows of A^T; where :func:`first_pairs`, A packed twice side by side) and
    the bias padded to 16 floats."""
    if nhwc:
        lib = _lib()
        a = a.detach()
        tail = first_tail(a.shape[1])
        first = pack(lib, torch.cat([a, a], 1)) if first_pairs(a.shape[1]) else \
            pack(lib, a) if not tail else torch.cat(
                [pack(lib, a[:, :-tail]), a[:, -tail:].t().reshape(-1)])
        return first, pack(lib, b.detach().t()), padded(bias)
    return (a.detach().t().contiguous(), b.detach().contiguous(),
            None if bias is None else bias.detach().contiguous())


def bind(x: torch.Tensor, weights: Weights, geometry: Geometry, out_shape: tuple,
         store: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the kernel on inputs of ``x``'s shape and layout: ``weights``
    (first 1x1, first filter taps (in :func:`winograd_weights`' form where
    :func:`winograd_applies`), second filter taps or None, last 1x1, bias or None) prepared
    by the caller (float32, contiguous, held by the function; the 1x1s and bias from
    :func:`pointwise_weights` for ``x``'s layout); ``geometry``: the layer's sizes. It
    returns (N, O, OH, OW) in ``x``'s layout (channels_last where ``x`` has its channels
    innermost, else contiguous)."""
    lib = _lib()
    nhwc = channels_innermost(x)
    key = ("planar", geometry, nhwc)
    g = store.get(key)  # the geometry's PlanarArgs, without weights
    if g is None:
        z, r1 = geometry.z, geometry.r1
        # t1, the window and the band's last two buffers, (v1 with a second filter)
        per_pixel = z * (2 * r1 + (geometry.r2 if geometry.kw2 else 0) + 2 * geometry.r3)
        # the first 1x1's forms on channels_last maps, as pointwise_weights packs it
        g = store[key] = PlanarArgs(
            **geometry._asdict(), th=band_rows(geometry.oh, geometry.ow, per_pixel),
            nhwc=int(nhwc), wino=int(winograd_applies(geometry)),
            tail=first_tail(z * r1) if nhwc else 0, pairs=int(nhwc and first_pairs(z * r1)))
    per = lib.scratch_floats(g)
    args = g.copy(**{name: None if t is None else t.data_ptr()
                     for name, t in weights._asdict().items()})
    # the scratch is this geometry's alone and zero-filled when new: the kernel never writes
    # its window's padding columns, so they stay zero from call to call
    return bound_call(lib.planar_forward, args, per, x.shape, out_shape, nhwc, store,
                      weights, owner=("planar", id(g)))  # (g lives in store)
