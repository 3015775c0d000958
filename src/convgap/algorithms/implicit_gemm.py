"""``implicit_gemm``: the Triton implicit-GEMM kernel (:mod:`convgap.kernels.triton`).

CUDA; or CPU under triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported), which is how the tests check it. Forward only: ``AlgoConv2d`` falls back to
``F.conv2d`` when gradients are needed and under tracing / export.
"""

from __future__ import annotations

import os

import torch

from ..kernels.triton import implicit_gemm as _kernel
from .registry import Algorithm, register
from .spec import ConvSpec

__all__ = ["ImplicitGemmConv"]

_DTYPES = ("float32", "float16", "bfloat16")


@register("implicit_gemm")
class ImplicitGemmConv(Algorithm):
    """Implicit GEMM in Triton on NHWC activations: M = N*OH*OW pixels, N = O/groups output
    channels, K = KH*KW*C/groups, the im2col matrix never materialised; weight packed once
    as (groups, K, O/groups); fp32 accumulation; fp32 inputs multiply in IEEE fp32, or in
    TF32 on CUDA while ``torch.backends.cudnn.allow_tf32`` is on (as F.conv2d); fused bias;
    output in channels_last. Any stride / padding / dilation / groups."""

    tolerance = 1e-4
    differentiable = False
    exports = "fallback"

    def supports(self, spec: ConvSpec) -> str | None:
        if not _kernel.AVAILABLE:
            return "triton is not installed"
        if spec.device == "cuda":
            pass
        elif spec.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            if not _kernel.interpreting():
                return ("TRITON_INTERPRET=1 was set after triton was imported; set it "
                        "before importing torch/triton to run on CPU")
        else:
            return "needs a CUDA device"
        if spec.dtype not in _DTYPES:
            return f"the Triton kernel takes float32/float16/bfloat16, not {spec.dtype}"
        if spec.in_channels % spec.groups or spec.out_channels % spec.groups:
            return "channels are not divisible by groups"
        if min(spec.output_shape[2:]) <= 0:
            return "the input is smaller than the (dilated) kernel"
        return None

    def prepare(self, weight, bias, spec):
        packed = _kernel.pack_weight(weight.detach(), spec.groups)
        return packed, None if bias is None else bias.detach().contiguous()

    def run(self, x, state, spec):
        packed, bias = state
        # fp32 on CUDA multiplies in TF32 exactly when F.conv2d (cuDNN) does
        tf32 = x.is_cuda and torch.backends.cudnn.allow_tf32
        return _kernel.conv2d_implicit_gemm(x, packed, bias, spec, allow_tf32=tf32)
