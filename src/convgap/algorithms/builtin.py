"""Built-in algorithms that call torch's own kernels: torch, channels_last, prepacked, cudnn."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..ops import onednn
from .registry import Algorithm, register
from .spec import ConvSpec

__all__ = ["TorchConv", "ChannelsLastConv", "PrepackedConv", "CudnnConv"]


def _conv(x, state, spec: ConvSpec) -> torch.Tensor:
    weight, bias = state
    return F.conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups)


@register("torch")
class TorchConv(Algorithm):
    """``F.conv2d`` on the input as given: the reference every other algorithm is checked
    against."""

    def run(self, x, state, spec):
        return _conv(x, state, spec)


@register("channels_last")
class ChannelsLastConv(Algorithm):
    """``F.conv2d`` with input and weight in channels_last (NHWC) memory format; the output
    stays channels_last. oneDNN's NHWC kernels are much faster for 1x1 convolutions and large
    stems at batch > 1."""

    def prepare(self, weight, bias, spec):
        return weight.contiguous(memory_format=torch.channels_last), bias

    def run(self, x, state, spec):
        return _conv(x.contiguous(memory_format=torch.channels_last), state, spec)


@register("prepacked")
class PrepackedConv(Algorithm):
    """oneDNN with the weight reordered once into its blocked layout for this input size
    (what ``torch.jit.freeze`` / inductor freezing do). Helps weight-heavy layers at small
    batch. CPU, float32/bfloat16, inference only."""

    differentiable = False
    exports = "fallback"

    def supports(self, spec):
        return onednn.unsupported(spec.device, spec.dtype, "convolution")

    def prepare(self, weight, bias, spec):
        packed = onednn.pack_conv(weight, spec.padding, spec.stride, spec.dilation,
                                  spec.groups, spec.input_shape)
        return packed, None if bias is None else bias.detach()

    def run(self, x, state, spec):
        packed, bias = state
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, bias, list(spec.padding), list(spec.stride), list(spec.dilation),
            spec.groups, "none", [], "")


@register("cudnn")
class CudnnConv(Algorithm):
    """cuDNN with ``torch.backends.cudnn.benchmark`` on: cuDNN times its own algorithms for
    this shape on first use and keeps the fastest. CUDA only."""

    def supports(self, spec):
        if spec.device != "cuda":
            return "needs a CUDA device"
        if not torch.backends.cudnn.is_available():
            return "cuDNN is not available"
        return None

    def run(self, x, state, spec):
        with _cudnn_benchmark():
            return _conv(x, state, spec)


@contextlib.contextmanager
def _cudnn_benchmark():
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old
