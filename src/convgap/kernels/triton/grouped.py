"""A grouped convolution (stride 1, "same" zero padding, odd filters) in Triton on tensor
cores: ConvFirst's grouped 3x3, where cuDNN reaches 11-14% of the H200's memory roofline
(docs/2026-12-04-gpu-h200.md).

Each program takes a BH x BW patch of output pixels of one image and BC output channels
(whole groups). Per filter tap it loads the input patch shifted by the tap with one 4-D TMA
load (the zero padding is TMA's zero fill past the image's edges: no masks, no per-element
addresses) and multiplies it by the tap's filter in block-diagonal form, a (BC, BC) matrix
whose diagonal blocks are the groups' (GW, GW) filters: one ``tl.dot`` per tap, BC / GW
times the useful products, on tensor cores that have them to spare in a memory-bound
layer. The block-diagonal filters are built once per weight (:func:`block_diagonal`).

:func:`grouped_conv` takes (N, C, H, W) maps in any format (channels_last read in place,
others copied) and returns channels_last; float32 (IEEE unless
``torch.backends.cuda.matmul.allow_tf32``), float16 or bfloat16 with float32 accumulation.
Under ``TRITON_INTERPRET=1`` one fixed configuration runs on CPU tensors; on a GPU a few
are autotuned. Inference only. Not yet timed on a GPU: :func:`convgap.kernels.triton.
blocks.convfirst` runs cuDNN's grouped conv unless asked for this one.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import ConvgapError
from .implicit_gemm import dot_precision, interpreting, runnable, tl, triton
from .tma import tma_ready, width_reason

__all__ = ["block_diagonal", "grouped_conv", "chunk_width"]

# (BH, BW, BC, num_warps, num_stages) tried on a GPU (BH * BW >= 64: a wgmma's height)
CONFIGS = ((8, 8, 32, 4, 3), (8, 16, 32, 4, 3), (16, 8, 32, 4, 3), (8, 8, 64, 4, 3),
           (8, 16, 64, 8, 3), (4, 16, 32, 4, 3), (8, 8, 16, 4, 3), (8, 16, 16, 4, 3))
INTERPRET = {"BH": 4, "BW": 4, "BC": 16}
_KERNELS: dict[bool, Any] = {}


def _kernel(x_desc, w_ptr, b_ptr, y_desc, N, H, W, C, w_st, w_sc, BCMAX,
            KH: tl.constexpr, KW: tl.constexpr, PRECISION: tl.constexpr,
            UPCAST: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    n_tc = C // BC
    n_tw = tl.cdiv(W, BW)
    n_th = tl.cdiv(H, BH)
    tc = pid % n_tc
    q = pid // n_tc
    tw = q % n_tw
    q = q // n_tw
    th = q % n_th
    n = q // n_th
    h0 = th * BH
    w0 = tw * BW
    c0 = tc * BC
    ci = tl.arange(0, BC)
    # the chunk's block-diagonal filter: rows = its input channels, columns = its outputs
    w_pos = (c0 + ci)[:, None] * w_sc + (c0 % BCMAX + ci)[None, :]
    acc = tl.zeros((BH * BW, BC), dtype=tl.float32)
    for tap in range(KH * KW):  # a runtime loop: the pipeliner multi-buffers its loads
        xt = x_desc.load([n, h0 + tap // KW - KH // 2, w0 + tap % KW - KW // 2, c0])
        xt = xt.reshape(BH * BW, BC)
        wt = tl.load(w_ptr + tap * w_st + w_pos)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
    acc += tl.load(b_ptr + c0 + ci).to(tl.float32)[None, :]
    y_desc.store([n, h0, w0, c0], acc.reshape(1, BH, BW, BC).to(y_desc.dtype))


def _blocks(nargs: dict) -> None:
    """Sets the descriptors' tiles to a configuration's (an autotune pre-hook)."""
    box = [1, nargs["BH"], nargs["BW"], nargs["BC"]]
    nargs["x_desc"].block_shape = box
    nargs["y_desc"].block_shape = box


def _prune(configs, named_args, **kwargs):
    """Configurations whose channel chunk divides the block-diagonal filters' width."""
    kept = [c for c in configs if named_args["BCMAX"] % c.kwargs["BC"] == 0]
    return kept or [min(configs, key=lambda c: c.kwargs["BC"])]


def _jitted(interpret: bool):
    if interpret not in _KERNELS:
        fn = triton.jit(_kernel, do_not_specialize=["N"])
        if not interpret:
            fn = triton.autotune(
                configs=[triton.Config({"BH": bh, "BW": bw, "BC": bc}, num_warps=w,
                                       num_stages=st, pre_hook=_blocks)
                         for bh, bw, bc, w, st in CONFIGS],
                key=["H", "W", "C", "BCMAX", "KH", "KW", "PRECISION"],
                prune_configs_by={"early_config_prune": _prune})(fn)
        _KERNELS[interpret] = fn
    return _KERNELS[interpret]


def chunk_width(c: int, gw: int) -> int | None:
    """The block-diagonal filters' width for C channels in groups of GW: the widest of 64,
    32, 16 that divides C and is whole groups; None when none is."""
    return next((b for b in (64, 32, 16) if c % b == 0 and b % gw == 0), None)


def block_diagonal(w: torch.Tensor) -> torch.Tensor:
    """A grouped conv's nn.Conv2d weight (C, GW, kh, kw) as the kernel reads it: (kh kw, C,
    B) with B = :func:`chunk_width`, entry [tap, ci, j] the weight from input channel ci
    to output channel (ci // B) B + j (zero across groups). ConvgapError where no chunk
    width fits."""
    c, gw, kh, kw = w.shape
    b = chunk_width(c, gw)
    if b is None:
        raise ConvgapError(f"the Triton grouped conv needs C ({c}) and its groups ({gw} "
                           "wide) to tile by 16, 32 or 64 channels")
    out = w.new_zeros(kh * kw, c, b)
    o = torch.arange(c, device=w.device)
    for k in range(gw):
        out[:, (o // gw) * gw + k, o % b] = w[:, k].reshape(c, kh * kw).t()
    return out


def grouped_conv(x: torch.Tensor, wbd: torch.Tensor, bias: torch.Tensor,
                 kernel_size: tuple[int, int]) -> torch.Tensor:
    """``F.conv2d(x, w, bias, padding=(kh // 2, kw // 2), groups=C // GW)`` with ``wbd =
    block_diagonal(w)``. x: (N, C, H, W) CUDA tensor (or CPU under the interpreter), any
    format; bias (C,); odd kh, kw. Returns (N, C, H, W) channels_last in x's dtype.
    ConvgapError on bad operands; RuntimeError where triton cannot run."""
    kh, kw = kernel_size
    n, c, h, w = x.shape
    if x.dim() != 4 or wbd.dim() != 3 or wbd.shape[:2] != (kh * kw, c) or \
            c % wbd.shape[2] or tuple(bias.shape) != (c,):
        raise ConvgapError(f"expected x (N, C, H, W), wbd (kh kw, C, B) from block_diagonal "
                           f"and bias (C,); got {tuple(x.shape)}, {tuple(wbd.shape)}, "
                           f"{tuple(bias.shape)}")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ConvgapError(f"'same' padding needs an odd filter, got {kh}x{kw}")
    for name, t in (("wbd", wbd), ("bias", bias)):
        if t.dtype != x.dtype or t.device != x.device:
            raise ConvgapError(f"{name} is {t.dtype} on {t.device}; x is {x.dtype} on "
                               f"{x.device}")
    reason = width_reason(x.dtype, C=c)
    if reason:
        raise ConvgapError(reason)
    if not runnable(x):
        raise RuntimeError("the Triton grouped conv needs triton and a CUDA tensor (or "
                           "TRITON_INTERPRET=1 set before triton is imported, on CPU)")
    from triton.tools.tensor_descriptor import TensorDescriptor
    x = tma_ready(x)
    y = torch.empty((n, c, h, w), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last)
    wbd = wbd.contiguous()
    bias = bias.contiguous()
    box = [1, 4, 4, 16]  # set per configuration
    x_desc = TensorDescriptor(x, [n, h, w, c], [x.stride(0), x.stride(2), x.stride(3), 1],
                              box)
    y_desc = TensorDescriptor(y, [n, h, w, c], [y.stride(0), y.stride(2), y.stride(3), 1],
                              box)
    interpret = interpreting()
    args = (x_desc, wbd, bias, y_desc, n, h, w, c, wbd.stride(0), wbd.stride(1),
            wbd.shape[2])
    meta = dict(KH=kh, KW=kw, PRECISION=dot_precision(x),
                UPCAST=interpret and x.dtype == torch.bfloat16)
    kernel = _jitted(interpret)

    def tiles(cfg):
        return (n * triton.cdiv(h, cfg["BH"]) * triton.cdiv(w, cfg["BW"]) * (c // cfg["BC"]),)
    if interpret:
        cfg = dict(INTERPRET)
        _blocks({**cfg, "x_desc": x_desc, "y_desc": y_desc})
        kernel[tiles(cfg)](*args, **meta, **cfg)
        return y
    with torch.cuda.device(x.device):
        kernel[tiles](*args, **meta)
    return y
