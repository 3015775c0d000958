"""Depthwise convolution as a sum of kh*kw shifted, per-channel-scaled views of the input.

A depthwise layer (groups == in_channels, out_channels = multiplier * in_channels) has no
channel reduction: each output channel is one input channel correlated with its own kh x kw
filter. So

    y[n, c*M + j] = sum_{u, v} w[c*M + j, 0, u, v] * xp[n, c, u*dh + s*i, v*dw + s*k]

is kh*kw fused multiply-adds (``addcmul``) of strided views of the zero-padded input (no
copies of the input besides the padding), each with a per-channel weight broadcast along the
pixels. Channel multipliers M > 1 broadcast the input view over M (no repeated input).

Layout: channels_last inputs, and NCHW inputs with narrow maps (OW < 32), run in NHWC, where
the channel dim is innermost and each multiply-add is a long contiguous vector op (an NCHW
row of a 7x7 or 14x14 map is too short to vectorise; NCHW inputs pay one transposed padding
copy and one output copy). Wide NCHW maps run in NCHW. The output keeps the input's layout.

Cost: each tap reads the accumulator and a shifted input view and writes the accumulator,
so the output makes ~3 kh*kw trips through memory, where a fused kernel (oneDNN's, behind
F.conv2d) makes one: on CPU this is slower than F.conv2d's depthwise kernel except for
NCHW layers where torch's own NCHW path is slow; the tuner measures.

Rounding: kh*kw fp32 multiply-adds per output, as in a direct convolution (tolerance 1e-4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Algorithm, register
from .spec import ConvSpec

__all__ = ["DepthwiseConv"]

_INTERNAL: str | None = None  # benchmark / test override of the internal layout: 'nhwc' / 'nchw'


@register("depthwise")
class DepthwiseConv(Algorithm):
    """Depthwise convolution as kh*kw multiply-adds of shifted input views."""

    tolerance = 1e-4

    def supports(self, spec: ConvSpec) -> str | None:
        if not (spec.groups == spec.in_channels and spec.out_channels % spec.in_channels == 0):
            return ("depthwise only: needs groups == in_channels and out_channels a multiple "
                    f"of in_channels (got groups={spec.groups}, {spec.in_channels}->"
                    f"{spec.out_channels})")
        return spec.empty_output()

    def prepare(self, weight, bias, spec):
        """Per-tap weights as (kh*kw, C, M): tap t of output channel c*M + j at [t, c, j]."""
        o, _, kh, kw = weight.shape
        c = spec.in_channels
        taps = weight.reshape(c, o // c, kh * kw).permute(2, 0, 1).contiguous()
        return taps, (None if bias is None else bias.reshape(c, o // c))

    def run(self, x, state, spec):
        taps, bias = state
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (spec.kernel_size, spec.stride, spec.padding,
                                                  spec.dilation)
        n, c, h, w = x.shape
        mult = taps.shape[2]
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        channels_last = not x.is_contiguous() and \
            x.is_contiguous(memory_format=torch.channels_last)
        # NHWC internally for channels_last inputs, and for NCHW inputs with narrow maps
        # (OW < 32: NCHW rows of a 7x7 or 14x14 map are too short to vectorise; the
        # transposes then ride on the padding copy and one output copy). Wide NCHW maps
        # stay NCHW (measured faster there).
        if _INTERNAL is None:
            nhwc = channels_last or ow < 32
        else:
            nhwc = _INTERNAL == "nhwc"
        # channel multiplier M > 1: the input view gets a broadcast dim of size 1 after
        # (NHWC) / before (NCHW) the channels; M == 1 needs none (simpler broadcasts)
        mdims = (c, mult) if mult > 1 else (c,)
        if nhwc:
            xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))
            if mult > 1:
                xp = xp.unsqueeze(-1)
            wt = taps.view(kh * kw, 1, 1, 1, *mdims)
            bt = None if bias is None else bias.view(1, 1, 1, *mdims)

            def tap(u, v):
                return xp[:, u * dh:u * dh + (oh - 1) * sh + 1:sh,
                          v * dw:v * dw + (ow - 1) * sw + 1:sw]
        else:
            xp = F.pad(x, (pw, pw, ph, ph))
            if mult > 1:
                xp = xp.unsqueeze(2)                                            # N,C,1,H,W
            wt = taps.view(kh * kw, 1, *mdims, 1, 1)
            bt = None if bias is None else bias.view(1, *mdims, 1, 1)

            def tap(u, v):
                return xp[..., u * dh:u * dh + (oh - 1) * sh + 1:sh,
                          v * dw:v * dw + (ow - 1) * sw + 1:sw]
        acc = None
        for t in range(kh * kw):            # the kh*kw taps (not pixels or channels)
            xs = tap(t // kw, t % kw)
            if acc is None:
                acc = xs * wt[t] if bt is None else torch.addcmul(bt, xs, wt[t])
            else:
                acc = acc.addcmul_(xs, wt[t])
        if not nhwc:
            y = acc.reshape(n, c * mult, oh, ow)
            return y.contiguous(memory_format=torch.channels_last) if channels_last else y
        y = acc.reshape(n, oh, ow, c * mult).permute(0, 3, 1, 2)   # NHWC memory
        return y if channels_last else y.contiguous()
