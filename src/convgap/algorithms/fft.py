"""FFT convolution: products in the frequency domain, for large kernels.

``F.conv2d`` is a cross-correlation, y[o] = sum_c x[c] (star) w[o, c]. With the zero-padded
input xp (size Hp x Wp) and the kernel zero-padded to the same size, the *circular*
cross-correlation is ``irfft2(rfft2(xp) * conj(rfft2(w)))``; its entries (i, j) with
i <= Hp - kh_eff and j <= Wp - kw_eff never wrap around, and those are exactly the
stride-1 outputs. So no padding beyond the convolution's own is needed:

- prepare: dilate the kernel (insert d-1 zeros between taps), rfft2 it at the spec's padded
  input size and keep the conjugate, laid out (groups, Hp*Wq, C/g, O/g) for the channel sum;
- run: pad, rfft2 the input, complex multiply-accumulate over the input channels of each
  group (one batched complex GEMM; a plain product for depthwise), irfft2, crop, apply the
  stride by slicing (the dense stride-1 result is computed and subsampled), add the bias.

The cost is O(N C Hp Wp log(Hp Wp)) for the transforms plus N O C/g Hp Wp complex MACs,
independent of the kernel size: it pays off for large kernels (7x7 and up), rarely for 3x3.
Half-precision inputs are computed in float32 (CPU FFTs do not take them) and cast back.

Accuracy (fp32, max |y - ref| / max |ref|, C up to 256, kernels up to 15x15, measured by
``python -m convgap.algorithms.fft``): below ~1e-5; tolerance 1e-4.
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


def _kernel_fft(weight: torch.Tensor, groups: int, dilation: tuple[int, int],
                size: tuple[int, int]) -> torch.Tensor:
    """conj(rfft2(dilated kernel, size)) as (groups, Hp*Wq, C/g, O/g)."""
    o, cg, kh, kw = weight.shape
    dh, dw = dilation
    w = weight.to(_compute_dtype(weight.dtype))
    if (dh, dw) != (1, 1):
        wd = w.new_zeros(o, cg, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        wd[:, :, ::dh, ::dw] = w
        w = wd
    wf = torch.fft.rfft2(w, s=size).conj()                       # O, C/g, Hp, Wq
    f = wf.shape[-2] * wf.shape[-1]
    return wf.reshape(groups, o // groups, cg, f).permute(0, 3, 2, 1)


@register("fft")
class FFTConv(Algorithm):
    """rfft2 convolution: cost independent of the kernel size (large kernels)."""

    tolerance = 1e-4

    def supports(self, spec: ConvSpec) -> str | None:
        _, _, oh, ow = spec.output_shape
        if oh < 1 or ow < 1:
            return "the output would be empty (input smaller than the kernel)"
        if spec.dtype not in ("float32", "float64", "bfloat16", "float16"):
            return f"FFT convolution needs a floating-point input, got {spec.dtype}"
        return None

    def prepare(self, weight, bias, spec):
        """Kernel spectrum for the spec's padded input size (and the weight, in case
        ``run`` sees another size)."""
        _, _, h, w = spec.input_shape
        size = (h + 2 * spec.padding[0], w + 2 * spec.padding[1])
        return (_kernel_fft(weight, spec.groups, spec.dilation, size), size, weight, bias)

    def run(self, x, state, spec):
        wf, size, weight, bias = state
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (spec.kernel_size, spec.stride, spec.padding,
                                                  spec.dilation)
        g = spec.groups
        n, c, h, w = x.shape
        hp, wp = h + 2 * ph, w + 2 * pw
        if (hp, wp) != size:  # another input size than prepared for
            wf = _kernel_fft(weight, g, (dh, dw), (hp, wp))
        _, f, cg, og = wf.shape
        o = g * og
        xf = torch.fft.rfft2(F.pad(x.to(_compute_dtype(x.dtype)), (pw, pw, ph, ph)))
        wq = xf.shape[-1]
        if cg == 1:       # depthwise: one input channel per group, no channel sum
            yf = xf.view(n, g, 1, f) * wf.reshape(g, f, og).transpose(1, 2)
        else:             # per group and frequency: (N, C/g) @ (C/g, O/g)
            xg = xf.reshape(n, g, cg, f).permute(1, 3, 0, 2).reshape(g * f, n, cg)
            yf = torch.bmm(xg, wf.reshape(g * f, cg, og))                # g*f, N, O/g
            yf = yf.view(g, f, n, og).permute(2, 0, 3, 1)
        y = torch.fft.irfft2(yf.reshape(n, o, hp, wq), s=(hp, wp))
        oh = (hp - dh * (kh - 1) - 1) // sh + 1
        ow = (wp - dw * (kw - 1) - 1) // sw + 1
        y = y[:, :, :(oh - 1) * sh + 1:sh, :(ow - 1) * sw + 1:sw]
        if bias is not None:
            y = y + bias.to(y.dtype).view(1, o, 1, 1)
        y = y.to(x.dtype)
        if _channels_last(x):
            return y.contiguous(memory_format=torch.channels_last)
        return y.contiguous()
