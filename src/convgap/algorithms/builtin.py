"""Built-in algorithms that call torch's own kernels: torch, channels_last, prepacked, cudnn."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

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


def _mkldnn_ok() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


@register("prepacked")
class PrepackedConv(Algorithm):
    """oneDNN with the weight reordered once into its blocked layout for this input size
    (what ``torch.jit.freeze`` / inductor freezing do). Helps weight-heavy layers at small
    batch. CPU, float32/bfloat16, inference only."""

    differentiable = False
    exports = "fallback"

    def supports(self, spec):
        if spec.device != "cpu":
            return "oneDNN prepacking is CPU only"
        if not _mkldnn_ok():
            return "torch was built without oneDNN (mkldnn)"
        if spec.dtype not in ("float32", "bfloat16"):
            return f"oneDNN prepacked convolution does not take {spec.dtype}"
        if spec.dtype == "bfloat16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "this CPU lacks the instructions oneDNN needs for bf16 (avx512bw/vl/dq)"
        return None

    def prepare(self, weight, bias, spec):
        with torch.no_grad():
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.detach().to_mkldnn(), list(spec.padding), list(spec.stride),
                list(spec.dilation), spec.groups, list(spec.input_shape))
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
