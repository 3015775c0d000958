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
The multiply-adds are :func:`convgap.ops.depthwise.depthwise_taps`; this algorithm picks the
layout and keeps the input's.
"""

from __future__ import annotations

import torch

from ..ops.depthwise import depthwise_taps, tap_weights
from ..ops.layouts import channels_last
from ..ops.sizes import conv_length
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
        c = spec.in_channels
        taps = tap_weights(weight, c).contiguous()
        return taps, (None if bias is None else bias.reshape(c, -1))

    def run(self, x, state, spec):
        taps, bias = state
        ph, pw = spec.padding
        ow = conv_length(x.shape[3], spec.kernel_size[1], spec.stride[1], (pw, pw),
                         spec.dilation[1])
        cl = channels_last(x)
        # NHWC internally for channels_last inputs, and for NCHW inputs with narrow maps
        # (OW < 32: NCHW rows of a 7x7 or 14x14 map are too short to vectorise; the
        # transposes then ride on the padding copy and one output copy). Wide NCHW maps
        # stay NCHW (measured faster there).
        if _INTERNAL is None:
            nhwc = cl or ow < 32
        else:
            nhwc = _INTERNAL == "nhwc"
        y = depthwise_taps(x, taps, spec.kernel_size, spec.stride, ((ph, ph), (pw, pw)),
                           spec.dilation, bias, nhwc)
        if nhwc:  # channels-innermost memory
            return y if cl else y.contiguous()
        return y.contiguous(memory_format=torch.channels_last) if cl else y
