"""im2col + GEMM: the textbook lowering of convolution to one matrix product.

``F.unfold`` copies every receptive field of the (zero-padded, strided, dilated) input into a
column: (N, C*kh*kw, OH*OW). One GEMM with the weight viewed as (O, C*kh*kw) gives the
output; grouped convolutions are one batched GEMM over the groups. Runs every spec on any
device, at the price of a kh*kw-times larger copy of the input (the classic memory cost
that direct and Winograd/FFT methods avoid). Rounding is that of an ordinary fp32 GEMM
(tolerance 1e-4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Algorithm, register
from .spec import ConvSpec

__all__ = ["Im2col"]


def _channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


@register("im2col")
class Im2col(Algorithm):
    """``F.unfold`` + one GEMM (a batched GEMM over groups) + bias. Every spec, any device."""

    tolerance = 1e-4

    def supports(self, spec: ConvSpec) -> str | None:
        _, _, oh, ow = spec.output_shape
        if oh < 1 or ow < 1:
            return "the output would be empty (input smaller than the kernel)"
        return None

    def prepare(self, weight, bias, spec):
        """The weight as (groups, O/groups, C/groups * kh * kw) GEMM operands."""
        g = spec.groups
        o = weight.shape[0]
        return weight.reshape(g, o // g, -1), bias

    def run(self, x, state, spec):
        wm, bias = state
        g, og, k = wm.shape
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (spec.kernel_size, spec.stride, spec.padding,
                                                  spec.dilation)
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, (kh, kw), (dh, dw), (ph, pw), (sh, sw))   # N, C*kh*kw, L
        o = g * og
        if g == 1:
            if _channels_last(x):  # (N, L, K) @ (K, O): the output comes out NHWC
                wt = wm[0].t().expand(n, k, o)
                if bias is None:
                    y = torch.bmm(cols.transpose(1, 2), wt)
                else:
                    y = torch.baddbmm(bias.view(1, 1, o), cols.transpose(1, 2), wt)
                return y.view(n, oh, ow, o).permute(0, 3, 1, 2)
            wn = wm[0].expand(n, o, k)
            if bias is None:
                y = torch.bmm(wn, cols)
            else:
                y = torch.baddbmm(bias.view(1, o, 1), wn, cols)
            return y.view(n, o, oh, ow)
        y = torch.matmul(wm, cols.view(n, g, k, oh * ow))               # N, g, O/g, L
        y = y.reshape(n, o, oh, ow)
        if bias is not None:
            y = y + bias.view(1, o, 1, 1)
        if _channels_last(x):
            return y.contiguous(memory_format=torch.channels_last)
        return y
