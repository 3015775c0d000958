"""Which kernel runs a factorized layer (the fused C kernels on the CPU, the Triton kernel on
a CUDA GPU), and with which operands.

A TensorialConv2d's families map onto two kernels of :mod:`convgap.kernels.cpu`:

=======  =====================================  ==============================================
family   kernel                                 operands from the factors
=======  =====================================  ==============================================
cp       pointwise -> depthwise -> pointwise    sr; rh x rw (one k_h x k_w filter per rank,
                                                kept while the factors are unchanged); or
tucker   pointwise -> conv -> pointwise         sk; the core akhw as a conv weight (a 3x3
                                                core of 20+ channels with stride 1 as
                                                Winograd F(2x2, 3x3) on the channel-major
                                                kernel); oa
tt       pointwise -> conv -> conv -> pointwise sa; ahc as a k_h x 1 conv; cwd as a 1 x k_w
                                                conv (stride, padding, dilation split by
                                                axis); do
tr       the same, the ring bond z as groups    zsa as s x (z a); ahc; cwd; doz as (z d) x o
         sharing both filters                   (both regrouped copies kept while unchanged);
                                                width stride 1 only
=======  =====================================  ==============================================

Each has a channels-innermost kernel (NHWC maps; NCHW inputs are read in place and the
result written into NCHW planes) and, for NCHW inputs with width stride 1, a channel-major
one (pixels in the vectors). Reshaped CP has no fused kernel: its layers always run the steps.

On a CUDA GPU every family runs :mod:`convgap.kernels.triton.pcp` (two launches: the first
1x1 conv as one matrix product, then the middle conv and the last 1x1 conv in one Triton
kernel): CP with its depthwise filter; tensor-train's and tensor-ring's two filters
multiplied into one k_h x k_w filter (:func:`~convgap.kernels.triton.pcp.sequential_core`,
kept while the factors are unchanged), the ring bond as groups; any stride.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..kernels import triton as gpu
from ..kernels.cpu import pcp, pdp, planar
from ..kernels.triton import pcp as gpu_pcp
from ..ops.guard import may_run_fast, observed
from ..ops.memo import reuse

__all__ = ["KERNEL_FAMILIES", "cpu_inference", "gpu_inference", "available",
           "planar_applies", "kernel_call"]

KERNEL_FAMILIES = ("cp", "tucker", "tt", "tr")


def _inference(x: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
    """A 4-D ``x`` and parameters of its dtype and device, nothing needing gradients, no
    tracing, export or compilation, and no mode watching the ops (``convgap.count``,
    ``FlopCounterMode``: they count what the steps compute, which a kernel hides)."""
    if x.dim() != 4 or any(p.dtype != x.dtype or p.device != x.device for p in params):
        return False
    return may_run_fast(x, params) and not observed()


def cpu_inference(x: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
    """True where a layer may run a fused C kernel: ``x`` and every parameter float32 on
    the CPU, nothing needing gradients, no tracing, export or compilation."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and _inference(x, params)


def gpu_inference(x: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
    """True where a layer may run the fused Triton kernel: ``x`` and every parameter on one
    CUDA device in float32, float16 or bfloat16, triton installed (and not interpreting),
    nothing needing gradients, no tracing, export or compilation."""
    return x.device.type == "cuda" and gpu.AVAILABLE and not gpu.interpreting() and \
        x.dtype in (torch.float32, torch.float16, torch.bfloat16) and _inference(x, params)


def available(family: str, stride: tuple = (1, 1), device: str = "cpu") -> bool:
    """True if ``family`` has a fused kernel for ``stride`` on ``device`` ('cpu': built
    here; 'cuda': triton is installed)."""
    if device == "cuda":
        return family in KERNEL_FAMILIES and gpu.AVAILABLE
    if family == "cp":
        return pdp.available()
    if family == "tr" and stride[1] != 1:
        return False
    return family in KERNEL_FAMILIES and pcp.available()


def planar_applies(x: torch.Tensor, stride: tuple) -> bool:
    """True if the channel-major kernel (:mod:`convgap.kernels.cpu.planar`) can run a fused
    family's layer on ``x``: a dense NCHW or channels_last input and width stride 1 (TT's
    and TR's first filter already runs along columns only)."""
    return planar.supports(x, stride, (), (0, 0), None)


def kernel_call(family: str, x: torch.Tensor, factors: list[torch.Tensor],
               bias: torch.Tensor | None, stride: tuple, pads: tuple, dilation: tuple,
               store: dict, kernel: str = "nhwc") -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the layer's forward with a fused kernel on inputs of ``x``'s
    shape and strides (the caller has checked dtype, device and autograd): ``kernel`` is
    'planar' (the channel-major C kernel, where :func:`planar_applies`), 'nhwc' (the
    channels-innermost one) or 'triton' (the GPU kernel). It holds the weights' prepared
    forms: call it again only while the factors are unchanged. ``store`` keeps the packed
    weights."""
    if kernel == "triton":
        return _triton_call(family, x, factors, bias, stride, pads, dilation, store)
    use_planar = kernel == "planar"
    if family == "cp":
        fa, fh, fw, fo = factors
        taps = reuse(store, "taps", [fh, fw], lambda: fh[:, :, None] * fw[:, None, :])
        return pdp.bind(x, fa, taps, fo, bias, stride, pads, dilation, store, use_planar)
    if family == "tucker":
        fs, core, fo = factors
        return pcp.bind(x, fs, core, fo, bias, stride, pads, dilation, None, (1, 0, 1), store,
                        1, use_planar)
    if family == "tt":
        fa, fh, fw, fo = factors  # sa, ahc, cwd, do
        # the same view objects while the factors are unchanged (the kernel's packed
        # weights are kept per tensor identity and version)
        vertical, horizontal, last = reuse(store, "views", factors, lambda: (
            fh.permute(2, 0, 1).unsqueeze(3),  # (c, a, kh, 1)
            fw.permute(2, 0, 1).unsqueeze(2),  # (d, c, 1, kw)
            fo.t()))
        return pcp.bind(x, fa, vertical, last, bias, (stride[0], 1), (pads[0], 0),
                        (dilation[0], 1), horizontal, (stride[1], pads[1], dilation[1]), store,
                        1, use_planar)
    if family == "tr":
        fa, fh, fw, fo = factors  # zsa, ahc, cwd, doz
        z, s, a = fa.shape
        first, vertical, horizontal, last = reuse(store, "views", factors, lambda: (
            fa.permute(1, 0, 2).reshape(s, z * a),
            fh.permute(2, 0, 1).unsqueeze(3),
            fw.permute(2, 0, 1).unsqueeze(2),
            fo.permute(1, 2, 0).reshape(fo.shape[1], z * fo.shape[0])))
        return pcp.bind(x, first, vertical, last, bias, (stride[0], 1), (pads[0], 0),
                        (dilation[0], 1), horizontal, (stride[1], pads[1], dilation[1]), store,
                        z, use_planar)
    raise ValueError(f"no fused kernel for the {family!r} family")


def _triton_call(family: str, x: torch.Tensor, factors: list[torch.Tensor],
                 bias: torch.Tensor | None, stride: tuple, pads: tuple, dilation: tuple,
                 store: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`kernel_call` on the GPU kernel: every family as first 1x1 -> one middle
    filter (depthwise for CP) -> last 1x1."""
    groups, depthwise = 1, family == "cp"
    if family == "cp":
        fa, fh, fw, last = factors
        middle = reuse(store, "taps", [fh, fw], lambda: fh[:, :, None] * fw[:, None, :])
    elif family == "tucker":
        fa, middle, last = factors
    elif family in ("tt", "tr"):
        fa, fh, fw, fo = factors  # sa, ahc, cwd, do (tt); zsa, ahc, cwd, doz (tr)
        middle, fa, last = reuse(store, "core", factors, lambda: (
            gpu_pcp.sequential_core(fh.detach().permute(2, 0, 1).unsqueeze(3),
                                    fw.detach().permute(2, 0, 1).unsqueeze(2)),
            fa if fa.dim() == 2 else fa.detach().permute(1, 0, 2).reshape(fa.shape[1], -1),
            fo.t() if fo.dim() == 2 else fo.detach().permute(1, 2, 0).reshape(
                fo.shape[1], -1)))
        groups = 1 if factors[0].dim() == 2 else factors[0].shape[0]
    else:
        raise ValueError(f"no fused kernel for the {family!r} family")
    return gpu_pcp.bind(x, fa, middle, last, bias, stride, pads, dilation, groups, depthwise,
                        store)