"""Depthwise convolution (one filter per channel, M filters per channel): tap by tap on
torch ops, or on oneDNN's NHWC kernel with its filters blocked once."""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F

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
    one. Rounding: prod(kernel) fp32 multiply-adds per output, as a direct convolution."""
    n, c = x.shape[:2]
    nd = x.dim() - 2
    mult = taps.shape[2]
    outs = [conv_length(size, k, s, pad, d)
            for size, k, s, pad, d in zip(x.shape[2:], kernel, stride, pads, dilation)]
    flat = [v for pad in reversed(pads) for v in pad]
    # channel multiplier M > 1: the input view gets a broadcast dim of size 1 after
    # (NHWC) / before (NCHW) the channels; M == 1 needs none (simpler broadcasts)
    mdims = (c, mult) if mult > 1 else (c,)
    ones = (1,) * nd
    if nhwc:
        xp = x.movedim(1, -1)
        if any(flat):
            xp = F.pad(xp, [0, 0, *flat])
        if mult > 1:
            xp = xp.unsqueeze(-1)
        wt = taps.reshape(-1, 1, *ones, *mdims)
        bt = None if bias is None else bias.reshape(1, *ones, *mdims)
        lead: tuple = (slice(None),)
    else:
        xp = F.pad(x, flat) if any(flat) else x
        if mult > 1:
            xp = xp.unsqueeze(2)                                            # N,C,1,*spatial
        wt = taps.reshape(-1, 1, *mdims, *ones)
        bt = None if bias is None else bias.reshape(1, *mdims, *ones)
        lead = (Ellipsis,)
    spans = [(d, (m - 1) * s + 1, s) for d, m, s in zip(dilation, outs, stride)]
    acc = None
    for t, idx in enumerate(itertools.product(*[range(k) for k in kernel])):
        xs = xp[lead + tuple(slice(i * d, i * d + span, s)
                             for i, (d, span, s) in zip(idx, spans))]
        if acc is None:
            acc = xs * wt[t] if bt is None else torch.addcmul(bt, xs, wt[t])
        else:
            acc = acc.addcmul_(xs, wt[t])
    if nhwc:
        return acc.reshape(n, *outs, c * mult).permute(0, nd + 1, *range(1, nd + 1))
    return acc.reshape(n, c * mult, *outs) if mult > 1 else acc


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
