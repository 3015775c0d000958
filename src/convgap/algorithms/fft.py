"""FFT convolution: products in the frequency domain, for large kernels.

``F.conv2d`` is a cross-correlation, y[o] = sum_c x[c] (star) w[o, c]. With the zero-padded
input xp (Hp x Wp) and the kernel zero-padded to the same FFT size, the *circular*
cross-correlation is ``irfft2(rfft2(xp) * conj(rfft2(w)))``; its entries (i, j) with
i <= Hp - kh_eff and j <= Wp - kw_eff never wrap around, and those are exactly the
stride-1 outputs. So no padding beyond the convolution's own is needed; the FFT size is
rounded up to a 7-smooth length (62 = 2 x 31 -> 64: 5x faster transforms), which only adds
zeros.

- prepare: dilate the kernel (insert d-1 zeros between taps), rfft2 it at the FFT size of
  the spec's padded input and conjugate it, laid out as real GEMM operands;
- run: pad, rfft2 the input, multiply-accumulate over the input channels of each group,
  irfft2, crop, apply the stride by slicing (the dense stride-1 result is computed and
  subsampled), add the bias.

The channel sum is, per group and frequency, a complex (N x C/g) @ (C/g x O/g) product. It
runs as ONE real batched GEMM [Re X; Im X] (2N x C/g) @ [Re W | Im W] (C/g x 2 O/g), whose
four blocks combine into the real and imaginary parts: torch's complex ``bmm`` on CPU copies
every batch entry and was 4x slower. Depthwise layers (C/g == 1) are a plain element-wise
complex product.

Cost: O(N C F log F) for the transforms plus N O C/g F complex MACs (F = frequencies, about
Hp*Wp/2), independent of the kernel size: it pays off for large dense kernels (7x7 and up),
not for 3x3 or depthwise layers. Half-precision inputs are computed in float32 (CPU FFTs do
not take them) and cast back. ``exports = 'fallback'``: the TorchScript ONNX exporter has
no rfft2, so traced / exported graphs use F.conv2d (same result).

Accuracy (fp32, max |y - ref| / max |ref|, C up to 512, kernels 3x3 to 31x31, dense and
depthwise, normal / ReLU / DC-dominated inputs): <= 7e-7 against a float64 reference, more
accurate than fp32 ``F.conv2d`` itself (<= 6e-6 apart); tolerance 1e-4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Algorithm, register
from .spec import ConvSpec

__all__ = ["FFTConv"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


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


def _kernel_fft(weight: torch.Tensor, groups: int, dilation: tuple[int, int],
                size: tuple[int, int]) -> torch.Tensor:
    """conj(rfft2(dilated kernel, size)), as real GEMM operands.

    Depthwise (C/g == 1): complex (groups, O/g, F). Otherwise real (groups * F, C/g, 2 O/g):
    [Re | Im] side by side, so that one real batched GEMM of [Re X; Im X] with it yields all
    four real products of the complex multiply."""
    o, cg, kh, kw = weight.shape
    dh, dw = dilation
    w = weight.to(_compute_dtype(weight.dtype))
    if (dh, dw) != (1, 1):
        wd = w.new_zeros(o, cg, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        wd[:, :, ::dh, ::dw] = w
        w = wd
    wf = torch.fft.rfft2(w, s=size).conj_physical()                     # O, C/g, Fh, Fw
    f = wf.shape[-2] * wf.shape[-1]
    og = o // groups
    if cg == 1:
        return wf.reshape(groups, og, f)
    wr = torch.view_as_real(wf.reshape(groups, og, cg, f))      # g, O/g, C/g, F, 2
    return wr.permute(0, 3, 2, 4, 1).reshape(groups * f, cg, 2 * og)


@register("fft")
class FFTConv(Algorithm):
    """rfft2 convolution: cost independent of the kernel size (large kernels). Exported
    graphs fall back to F.conv2d (no rfft2 in the TorchScript ONNX exporter)."""

    tolerance = 1e-4
    exports = "fallback"

    def supports(self, spec: ConvSpec) -> str | None:
        return spec.empty_output() or spec.not_floating("FFT convolution")

    def prepare(self, weight, bias, spec):
        """Kernel spectrum for the spec's padded input size (and the weight, in case
        ``run`` sees another size)."""
        _, _, h, w = spec.input_shape
        size = (fft_size(h + 2 * spec.padding[0]), fft_size(w + 2 * spec.padding[1]))
        return (_kernel_fft(weight, spec.groups, spec.dilation, size), size, weight, bias)

    def run(self, x, state, spec):
        wf, size, weight, bias = state
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (spec.kernel_size, spec.stride, spec.padding,
                                                  spec.dilation)
        g = spec.groups
        n, c, h, w = x.shape
        hp, wp = h + 2 * ph, w + 2 * pw
        if (fft_size(hp), fft_size(wp)) != size:  # another input size than prepared for
            size = (fft_size(hp), fft_size(wp))
            wf = _kernel_fft(weight, g, (dh, dw), size)
        cg = c // g
        xf = torch.fft.rfft2(F.pad(x.to(_compute_dtype(x.dtype)), (pw, pw, ph, ph)), s=size)
        fh, fw = xf.shape[-2:]
        f = fh * fw
        if cg == 1:       # depthwise: one input channel per group, no channel sum
            og = wf.shape[1]
            yf = (xf.view(n, g, 1, f) * wf).view(n, g * og, fh, fw)
        else:             # per group and frequency: [Re X; Im X] (2N x C/g) @ [Re W | Im W]
            og = wf.shape[2] // 2
            xr = torch.view_as_real(xf).view(n, g, cg, f, 2)
            xr = xr.permute(1, 3, 4, 0, 2).reshape(g * f, 2 * n, cg)
            p = torch.bmm(xr, wf).view(g, f, 2, n, 2, og)       # (x re/im) x (w re/im)
            yr = p[:, :, 0, :, 0] - p[:, :, 1, :, 1]
            yi = p[:, :, 0, :, 1] + p[:, :, 1, :, 0]
            yf = torch.view_as_complex(torch.stack((yr, yi), -1).permute(2, 0, 3, 1, 4)
                                       .reshape(n, g * og, fh, fw, 2))
        o = g * og
        y = torch.fft.irfft2(yf, s=size)
        oh = (hp - dh * (kh - 1) - 1) // sh + 1
        ow = (wp - dw * (kw - 1) - 1) // sw + 1
        y = y[:, :, :(oh - 1) * sh + 1:sh, :(ow - 1) * sw + 1:sw]
        if bias is not None:
            y = y + bias.to(y.dtype).view(1, o, 1, 1)
        y = y.to(x.dtype)
        if _channels_last(x):
            return y.contiguous(memory_format=torch.channels_last)
        return y.contiguous()
