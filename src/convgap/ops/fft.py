"""Convolution by FFT: products in the frequency domain, for large kernels.

A convolution (torch's, a cross-correlation) y[o] = sum_c x[c] (star) w[o, c] of the
zero-padded input xp with the kernel zero-padded to the same FFT size is, as a *circular*
cross-correlation, ``irfftn(rfftn(xp) * conj(rfftn(w)))``; its entries i <= P - k_eff
(per dim; P the padded length, k_eff the dilated kernel length) never wrap around, and
those are exactly the stride-1 outputs. So no padding beyond the convolution's own is
needed; each FFT length is rounded up to a 7-smooth one (62 = 2 x 31 -> 64: 5x faster
transforms), which only adds zeros. A stride subsamples the dense stride-1 result; a
dilation inserts zeros between the kernel's taps.

The channel sum is, per group and frequency, a complex (N x C/g) @ (C/g x O/g) product. It
runs as ONE real batched GEMM [Re X; Im X] (2N x C/g) @ [Re W | Im W] (C/g x 2 O/g), whose
four blocks combine into the real and imaginary parts: torch's complex ``bmm`` on CPU copies
every batch entry and was 4x slower. Depthwise convolutions (C/g == 1) are a plain
element-wise complex product.

Cost: O(N C F log F) for the transforms plus N O C/g F complex MACs (F = frequencies, about
half the padded points), independent of the kernel size: it pays off for large dense
kernels, not for 3x3 or depthwise ones. Half-precision inputs are computed in float32 (CPU
FFTs do not take them), float64 in float64. Accuracy (fp32, 2-D, max |y - ref| / max |ref|,
C up to 512, kernels 3x3 to 31x31): <= 7e-7 against a float64 reference.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .layouts import channels_last
from .sizes import conv_length

__all__ = ["fft_size", "kernel_spectrum", "fft_conv"]


def fft_size(n: int) -> int:
    """The smallest 7-smooth integer (2^a 3^b 5^c 7^d) >= n: FFT lengths with large prime
    factors are several times slower, and a longer period only adds zeros."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5, 7):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def kernel_spectrum(weight: torch.Tensor, groups: int, dilation: Sequence[int],
                    size: Sequence[int]) -> torch.Tensor:
    """conj(rfftn(dilated kernel, ``size``)) of ``weight`` (O, C/groups, *kernel), as real
    GEMM operands for :func:`fft_conv`.

    Depthwise (C/g == 1): complex (groups, O/g, F). Otherwise real (groups * F, C/g, 2 O/g):
    [Re | Im] side by side, so that one real batched GEMM of [Re X; Im X] with it yields all
    four real products of the complex multiply."""
    o, cg = weight.shape[:2]
    kernel = weight.shape[2:]
    w = weight.to(_compute_dtype(weight.dtype))
    if any(d != 1 for d in dilation):
        wd = w.new_zeros(o, cg, *[d * (k - 1) + 1 for d, k in zip(dilation, kernel)])
        wd[(slice(None), slice(None), *[slice(None, None, d) for d in dilation])] = w
        w = wd
    dims = tuple(range(2, w.dim()))
    wf = torch.fft.rfftn(w, s=tuple(size), dim=dims).conj_physical()  # O, C/g, *freqs
    f = math.prod(wf.shape[2:])
    og = o // groups
    if cg == 1:
        return wf.reshape(groups, og, f)
    wr = torch.view_as_real(wf.reshape(groups, og, cg, f))      # g, O/g, C/g, F, 2
    return wr.permute(0, 3, 2, 4, 1).reshape(groups * f, cg, 2 * og)


def fft_conv(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
             pads: Sequence[tuple[int, int]], dilation: Sequence[int], groups: int,
             bias: torch.Tensor | None = None,
             spectrum: tuple[torch.Tensor, tuple] | None = None) -> torch.Tensor:
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)`` by FFT, for
    ``x`` (N, C, *spatial) and ``weight`` (O, C/groups, *kernel); ``pads``: (before,
    after) zero padding per spatial dim. ``spectrum``: ``(kernel_spectrum(weight, groups,
    dilation, size), size)`` prepared beforehand, used where ``size`` is this input's FFT
    size (else computed here). Returns x's dtype; for a 4-D ``x`` in channels_last memory
    (:func:`~.layouts.channels_last`) channels_last, else contiguous."""
    nd = x.dim() - 2
    n, c = x.shape[:2]
    padded = [s + lo + hi for s, (lo, hi) in zip(x.shape[2:], pads)]
    size = tuple(fft_size(p) for p in padded)
    if spectrum is not None and spectrum[1] == size:
        wf = spectrum[0]
    else:
        wf = kernel_spectrum(weight, groups, dilation, size)
    g = groups
    cg = c // g
    flat = [v for pad in reversed(pads) for v in pad]
    xc = x.to(_compute_dtype(x.dtype))
    dims = tuple(range(2, 2 + nd))
    xf = torch.fft.rfftn(F.pad(xc, flat) if any(flat) else xc, s=size, dim=dims)
    freqs = xf.shape[2:]
    f = math.prod(freqs)
    if cg == 1:       # depthwise: one input channel per group, no channel sum
        og = wf.shape[1]
        yf = (xf.view(n, g, 1, f) * wf).view(n, g * og, *freqs)
    else:             # per group and frequency: [Re X; Im X] (2N x C/g) @ [Re W | Im W]
        og = wf.shape[2] // 2
        xr = torch.view_as_real(xf).view(n, g, cg, f, 2)
        xr = xr.permute(1, 3, 4, 0, 2).reshape(g * f, 2 * n, cg)
        p = torch.bmm(xr, wf).view(g, f, 2, n, 2, og)       # (x re/im) x (w re/im)
        yr = p[:, :, 0, :, 0] - p[:, :, 1, :, 1]
        yi = p[:, :, 0, :, 1] + p[:, :, 1, :, 0]
        yf = torch.view_as_complex(torch.stack((yr, yi), -1).permute(2, 0, 3, 1, 4)
                                   .reshape(n, g * og, *freqs, 2))
    o = g * og
    y = torch.fft.irfftn(yf, s=size, dim=dims)
    outs = [conv_length(p, k, s, (0, 0), d)
            for p, k, s, d in zip(padded, weight.shape[2:], stride, dilation)]
    y = y[(slice(None), slice(None),
           *[slice(None, (m - 1) * s + 1, s) for m, s in zip(outs, stride)])]
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, o, *(1,) * nd)
    y = y.to(x.dtype)
    if nd == 2 and channels_last(x):
        return y.contiguous(memory_format=torch.channels_last)
    return y.contiguous()
