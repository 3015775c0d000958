"""Depthwise convolution (one filter per channel, M filters per channel): tap by tap on
torch ops, or on oneDNN's NHWC kernel with its filters blocked once."""

from __future__ import annotations

import functools
import itertools
from typing import Sequence

import torch
import torch.nn.functional as F

from .guard import jit_tracing
from .measured import fastest
from .onednn import conv, usable
from .sizes import conv_length

__all__ = ["tap_weights", "depthwise_taps", "depthwise_nhwc"]


def tap_weights(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A depthwise weight (C*M, 1, *kernel) as (taps, C, M): tap t of output channel
    c*M + j at [t, c, j] (a view; make it contiguous where it is kept)."""
    return weight.reshape(channels, weight.shape[0] // channels, -1).permute(2, 0, 1)


def depthwise_taps(x: torch.Tensor, taps: torch.Tensor, kernel: Sequence[int],
                   stride: Sequence[int], pads: Sequence[tuple[int, int]],
                   dilation: Sequence[int], bias: torch.Tensor | None = None,
                   nhwc: bool = False) -> torch.Tensor:
    """A depthwise convolution (1-3 spatial dims) as one multiply-add of a strided view of
    the zero-padded input per tap (``addcmul``; no copy of the input besides the padding).

    x: (N, C, *spatial), any strides; taps: (prod(kernel), C, M) from :func:`tap_weights`
    (output channel c*M + j filters input channel c; M > 1 broadcasts the input view, no
    repeated input); ``pads``: (before, after) zero padding per spatial dim; bias: (C, M) or
    None. ``nhwc``: run with the channels innermost (each multiply-add one long vector op
    along the channels: the input permuted and, where padded, copied in that order; the
    result (N, C*M, *out) has channels-innermost memory), else channels-major (the result
    is channels-major contiguous). Each tap reads the accumulator and an input view and
    writes the accumulator: ~3 trips through memory per tap, where a fused kernel makes
    one. Rounding: prod(kernel) fp32 multiply-adds per output, as a direct convolution.
    The geometry (kernel, stride, pads, dilation: tuples) is worked out once per input
    shape and kept (a call costs the ops and a lookup)."""
    args = (x.shape, tuple(kernel), tuple(stride), tuple(pads), tuple(dilation),
            taps.shape[2], nhwc)
    flat, wshape, bshape, windows, out_shape, perm = \
        _geometry.__wrapped__(*args) if jit_tracing() else _geometry(*args)
    if nhwc:
        xp = x.movedim(1, -1)
        if flat:
            xp = F.pad(xp, flat)
    else:
        xp = F.pad(x, flat) if flat else x
    if taps.shape[2] > 1:  # channel multiplier M > 1: a broadcast dim (see _geometry)
        xp = xp.unsqueeze(-1 if nhwc else 2)
    wt = taps.reshape(wshape)
    acc = None
    for t, window in enumerate(windows):
        xs = xp[window]
        if acc is None:
            acc = xs * wt[t] if bias is None else torch.addcmul(bias.reshape(bshape), xs,
                                                                  wt[t])
        else:
            acc = acc.addcmul_(xs, wt[t])
    if out_shape is not None:
        acc = acc.reshape(out_shape)
    return acc if perm is None else acc.permute(perm)


@functools.lru_cache(maxsize=512)
def _geometry(shape: torch.Size, kernel: tuple, stride: tuple, pads: tuple, dilation: tuple,
              mult: int, nhwc: bool) -> tuple:
    """What :func:`depthwise_taps` works out from the sizes: (the padding for F.pad or
    None, the taps' broadcast shape, the bias's, each tap's index into the padded input,
    the shape the accumulator is reshaped to or None, the result's permutation or None)."""
    n, c = shape[:2]
    nd = len(shape) - 2
    outs = [conv_length(size, k, s, pad, d)
            for size, k, s, pad, d in zip(shape[2:], kernel, stride, pads, dilation)]
    flat = [v for pad in reversed(pads) for v in pad]
    # channel multiplier M > 1: the input view gets a broadcast dim of size 1 after
    # (NHWC) / before (NCHW) the channels; M == 1 needs none (simpler broadcasts)
    mdims = (c, mult) if mult > 1 else (c,)
    ones = (1,) * nd
    # per spatial dim, the input window of each kernel offset; the taps run row-major
    windows = [[slice(i * d, i * d + (m - 1) * s + 1, s) for i in range(k)]
               for k, d, m, s in zip(kernel, dilation, outs, stride)]
    lead: tuple = (slice(None),) if nhwc else (Ellipsis,)
    index = [lead + w for w in itertools.product(*windows)]
    if nhwc:
        return ([0, 0, *flat] if any(flat) else None, (-1, 1, *ones, *mdims),
                (1, *ones, *mdims), index, (n, *outs, c * mult),
                (0, nd + 1, *range(1, nd + 1)))
    return (flat if any(flat) else None, (-1, 1, *mdims, *ones), (1, *mdims, *ones), index,
            (n, c * mult, *outs) if mult > 1 else None, None)


def depthwise_nhwc(x: torch.Tensor, w: torch.Tensor, stride, pad, dilation, groups: int,
                   packed: dict | None = None, bias: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """``F.conv2d(x, w, bias, stride, pad, dilation, groups)`` for a channels-innermost
    ``x`` and one filter per channel (symmetric zero padding ``pad``, per spatial dim).
    With a ``packed`` store, in CPU fp32 inference (:func:`~.onednn.usable`), the filters
    may run blocked once on oneDNN (:func:`~.onednn.conv`) instead: F.conv2d reorders them
    on every call, most of the time on a small map; a one-time paired measurement per
    shape picks."""
    def native():
        return F.conv2d(x, w, bias, stride, pad, dilation, groups)
    if packed is None or not usable(x, w):
        return native()

    def onednn():
        return conv(x, w, pad, stride, dilation, groups, packed, bias)
    key = (tuple(x.shape), x.stride(), tuple(w.shape), w.stride(), tuple(stride), tuple(pad),
           tuple(dilation), groups, bias is not None, str(x.dtype))
    return fastest("einsum-depthwise", key, {"onednn": onednn, "native": native})()
