"""im2col + GEMM: the textbook lowering of convolution to one matrix product.

Every receptive field of the zero-padded, strided, dilated input is copied into one row /
column of a matrix, and one GEMM with the weight viewed as (O, C*kh*kw) gives the output;
grouped convolutions are one batched GEMM over the groups. Runs every spec on any device, at
the price of a kh*kw-times larger copy of the input (the classic memory cost that direct,
Winograd and FFT methods avoid). Rounding is that of one fp32 GEMM (tolerance 1e-4).

The gather is the same matrix ``F.unfold`` builds, but made as ONE copy of a strided window
view of the padded input (``Tensor.unfold`` twice): 1.5-4x faster than ``F.unfold``'s own
im2col on CPU (measured with torch 2.13, 2 threads). Layout follows the input:

- NCHW input: columns (N, C*kh*kw, OH*OW), GEMM ``W @ cols`` per image (one batched call),
  the output comes out NCHW;
- channels_last input: rows (N*OH*OW, kh*kw*C) with channels innermost (contiguous runs),
  one GEMM ``rows @ W^T`` whose result *is* the channels_last output.

Under ``torch.jit.trace`` (which the TorchScript ONNX exporter runs) both layouts gather
with ``F.unfold`` instead, from the input as it is (ONNX tensors have no memory layout): the
exporter's symbolic for the window views needs static sizes its traced graph does not carry
("ONNX export of operator Unfold, input size not accessible"). ``prepare`` decides this, so
an inference call pays nothing for it: a state prepared while tracing holds the weight in
the ``F.unfold`` form and says so. torch.export (the default ONNX exporter) and
torch.compile take the window views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.guard import jit_tracing
from ..ops.layouts import channels_last
from ..ops.sizes import conv_length
from .registry import Algorithm, register
from .spec import ConvSpec

__all__ = ["Im2col"]


def _windows(xp: torch.Tensor, hdim: int, spec: ConvSpec) -> torch.Tensor:
    """Receptive fields of ``xp`` as a view: dims ``hdim`` / ``hdim+1`` become (OH, OW) and
    (kh, kw) are appended last (dilation by slicing the windows)."""
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel_size, spec.stride, spec.dilation
    v = xp.unfold(hdim, dh * (kh - 1) + 1, sh).unfold(hdim + 1, dw * (kw - 1) + 1, sw)
    if (dh, dw) != (1, 1):
        v = v[..., ::dh, ::dw]
    return v


@register("im2col")
class Im2col(Algorithm):
    """Receptive fields gathered into a matrix + one GEMM (a batched GEMM over groups) +
    bias. Every spec, any device."""

    tolerance = 1e-4

    def supports(self, spec: ConvSpec) -> str | None:
        return spec.empty_output()

    def prepare(self, weight, bias, spec):
        """``(wm, bias, unfold)``: the weight as GEMM operands, (groups, O/g, C/g*kh*kw)
        for NCHW inputs and (groups, kh*kw*C/g, O/g) (channels innermost) for channels_last
        inputs; ``unfold``: prepared under ``torch.jit.trace``, where ``run`` gathers with
        ``F.unfold`` whatever the layout (and ``wm`` has the NCHW form)."""
        g = spec.groups
        o = weight.shape[0]
        unfold = jit_tracing()
        if spec.layout == "channels_last" and not unfold:
            return (weight.permute(0, 2, 3, 1).reshape(g, o // g, -1).transpose(1, 2), bias,
                    False)
        return weight.reshape(g, o // g, -1), bias, unfold

    def run(self, x, state, spec):
        wm, bias, unfold = state
        g = spec.groups
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (spec.kernel_size, spec.stride, spec.padding,
                                                  spec.dilation)
        oh, ow = conv_length(h, kh, sh, (ph, ph), dh), conv_length(w, kw, sw, (pw, pw), dw)
        if unfold:  # prepared while tracing: the NCHW form, gathered by F.unfold below
            cl = False
        else:
            cl = channels_last(x)
            if cl != (spec.layout == "channels_last"):  # prepared for the other layout
                wm = _relayout(wm, g, c // g, kh, kw, to_cl=cl)
        o = g * (wm.shape[2] if cl else wm.shape[1])
        if cl:
            return self._run_nhwc(x, wm, bias, spec, oh, ow, o)
        k = c // g * kh * kw
        if unfold:  # (F.unfold has a TorchScript ONNX symbolic; the window views do not)
            cols = F.unfold(x, (kh, kw), (dh, dw), (ph, pw), (sh, sw))
        else:
            win = _windows(F.pad(x, (pw, pw, ph, ph)), 2, spec)   # N, C, OH, OW, kh, kw
            cols = win.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, oh * ow)
        if g == 1:
            wn = wm[0].expand(n, o, k)
            if bias is None:
                y = torch.bmm(wn, cols)
            else:
                y = torch.baddbmm(bias.view(1, o, 1), wn, cols)
            return y.view(n, o, oh, ow)
        y = torch.matmul(wm, cols.view(n, g, k, oh * ow))                # N, g, O/g, L
        y = y.reshape(n, o, oh, ow)
        if bias is not None:
            y = y + bias.view(1, o, 1, 1)
        return y

    def _run_nhwc(self, x, wm, bias, spec, oh, ow, o):
        """channels_last: rows of (kh, kw, C) with C innermost; the GEMM result is NHWC."""
        g, k, og = wm.shape
        n, c = x.shape[:2]
        (kh, kw), (ph, pw) = spec.kernel_size, spec.padding
        xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))     # N, Hp, Wp, C
        win = _windows(xp, 1, spec)                                     # N, OH, OW, C, kh, kw
        if g == 1:
            rows = win.permute(0, 1, 2, 4, 5, 3).reshape(n * oh * ow, k)
            if bias is None:
                y = torch.mm(rows, wm[0])
            else:
                y = torch.addmm(bias, rows, wm[0])
            return y.view(n, oh, ow, o).permute(0, 3, 1, 2)
        rows = win.unflatten(3, (g, c // g)).permute(3, 0, 1, 2, 5, 6, 4)
        rows = rows.reshape(g, n * oh * ow, k)
        if bias is None:
            y = torch.bmm(rows, wm)                                     # g, N*L, O/g
        else:
            y = torch.baddbmm(bias.view(g, 1, og), rows, wm)
        y = y.view(g, n, oh, ow, og).permute(1, 2, 3, 0, 4).contiguous()
        return y.view(n, oh, ow, o).permute(0, 3, 1, 2)


def _relayout(wm: torch.Tensor, g: int, cg: int, kh: int, kw: int, to_cl: bool) -> torch.Tensor:
    """Convert prepared GEMM weights between the NCHW and channels_last forms."""
    if to_cl:   # (g, O/g, C/g*kh*kw) -> (g, kh*kw*C/g, O/g)
        og = wm.shape[1]
        return wm.view(g, og, cg, kh, kw).permute(0, 3, 4, 2, 1).reshape(g, kh * kw * cg, og)
    og = wm.shape[2]  # (g, kh*kw*C/g, O/g) -> (g, O/g, C/g*kh*kw)
    return wm.view(g, kh, kw, cg, og).permute(0, 4, 3, 1, 2).reshape(g, og, cg * kh * kw)
