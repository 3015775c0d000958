"""FFT convolution: products in the frequency domain, for large kernels.

The convolution itself is :func:`convgap.ops.fft.fft_conv` (how and why it works, its cost
and accuracy are there). This algorithm prepares the kernel's spectrum once per input spec
(dilated, rfft2 at the FFT size of the spec's padded input, conjugated, laid out as real
GEMM operands) and runs the rest per call: pad, rfft2 the input, multiply-accumulate over
the input channels of each group, irfft2, crop, stride by slicing, add the bias.

It pays off for large dense kernels (7x7 and up), not for 3x3 or depthwise layers.
Half-precision inputs are computed in float32 (CPU FFTs do not take them) and cast back.
``exports = 'fallback'``: the TorchScript ONNX exporter has no rfft2, so traced / exported
graphs use F.conv2d (same result).

Accuracy (fp32, max |y - ref| / max |ref|, C up to 512, kernels 3x3 to 31x31, dense and
depthwise, normal / ReLU / DC-dominated inputs): <= 7e-7 against a float64 reference, more
accurate than fp32 ``F.conv2d`` itself (<= 6e-6 apart); tolerance 1e-4.
"""

from __future__ import annotations

from ..ops.fft import fft_conv, fft_size, kernel_spectrum
from .registry import Algorithm, register
from .spec import ConvSpec

__all__ = ["FFTConv"]


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
        return (kernel_spectrum(weight, spec.groups, spec.dilation, size), size, weight, bias)

    def run(self, x, state, spec):
        wf, size, weight, bias = state
        ph, pw = spec.padding
        return fft_conv(x, weight, spec.stride, ((ph, ph), (pw, pw)), spec.dilation,
                        spec.groups, bias, (wf, size))
