"""Whole residual blocks as Triton kernels on a GPU, their widest intermediate never in
memory: the inverted residual (MobileNetV2 / MBConv without squeeze-excitation) in one
launch and the ConvFirst block in two, batch norm folded into the weights and biases
beforehand.

:func:`inverted_residual`
    ``y = conv1x1(act(dw(act(conv1x1(x, a) + bias1), d) + bias2), b) + bias (+ x)``.
    Each program takes BLOCK_P output pixels and BLOCK_O output channels and streams the
    R expanded channels through registers in BLOCK_R chunks: per chunk and filter tap it
    expands the input pixels under that tap (a ``tl.dot`` over C in BLOCK_C chunks, the
    bias and the activation; taps in the zero padding give 0, as the padded expanded map
    does), accumulates the depthwise tap, then adds bias2, applies the activation and
    multiplies the chunk into the output tile by ``b``'s rows. So the R-channel maps never
    reach memory. Triton has no shifted reads of a register tile, so the expansion is
    recomputed per tap instead of once per input halo: it is evaluated ``kh kw`` times per
    output pixel, i.e. ``kh kw / (sh sw)`` times its layer-wise cost (9x at stride 1, 2.25x
    at stride 2 for 3x3 filters), and once more per extra output-channel tile
    (``ceil(O / BLOCK_O)``, 1 whenever the autotuner takes a BLOCK_O >= O). ``a=None`` is
    the:func:`pointwise_mlp`
    ``y = conv1x1(act(conv1x1(u, w2) + bias2), w3) + bias3 (+ residual)``, shaped like
    flash attention's forward: each program takes BLOCK_M pixels (128: a wgmma's height per
    warpgroup) and BLOCK_N output channels and streams the E hidden channels in BLOCK_E
    chunks: per chunk one ``tl.dot`` of the pixels' rows by ``w2`` (BLOCK_K >= C: the
    rows loaded once for every chunk), bias and activation in registers, one ``tl.dot``
    of the hidden chunk into the output tile by ``w3``; bias and residual in the epilogue.
    Every tile moves by TMA (tensor descriptors): the first version addressed tiles by
    per-element pointers and spilled 100-7000 bytes of registers in every configuration
    (compiled offline for sm_90), this one spills none. O wider than 256 is split over
    programs, each recomputing the first product (2x at O 384, 3x at 768: slower than
    cuBLAS layer by layer there, measured; the fused modules then keep their layers).

:func:`convfirst`
    ``y = x + conv1x1(act(conv1x1(gconv(x, w1) + bias1, w2) + bias2), w3) + bias3``, the
    grouped conv C -> C at stride 1 with "same" padding: the grouped conv on cuDNN (its
    output, C wide, is the one intermediate written), then :func:`pointwise_mlp` with x
    as the residual, so the 4C-wide hidden map never reaches memory. (The first design
    ran the whole block as one kernel, recomputing the grouped conv per hidden chunk with
    16-row ``tl.dot`` tiles and per-element addressing: 3-100x slower than cuDNN layer by
    layer on an H200, docs/2026-12-04-gpu-h200.md.)

Both blocks take (N, C, H, W) tensors in any memory format (channels_last is the fast one;
the output keeps x's format: channels_last stays channels_last, anything else comes back
contiguous); :func:`pointwise_mlp` returns channels_last. The inverted residual takes
weights in any strides, read fastest with the dim the kernel's tiles run along innermost:
``a`` as given (C, R) row-major, ``d`` channels innermost
(``d.permute(1, 2, 0).contiguous().permute(2, 0, 1)``), ``b`` transposed in memory
(``b.t().contiguous().t()``); the MLP reads its weights row-major as nn.Conv2d stores them
(others are copied), and its rows of channels must be 16-byte aligned (TMA). float32,
float16 or bfloat16, with float32 accumulation and the output in x's dtype: float32
products are IEEE unless ``torch.backends.cuda.matmul.allow_tf32`` (cuDNN's grouped conv
follows the same switch); in half precision every 1x1 conv multiplies x's dtype on tensor
cores (its input rounded to it, as the layer-wise block's intermediates are), while the
expansion feeding the depthwise conv stays float32. Activations ``"relu"``, ``"relu6"``
and ``"silu"`` (a constexpr: one binary each). Inference only.

silu"`` (a constexpr: one binary
each). Inference only.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU tensors
with one fixed block configuration; on a GPU they are autotuned over a few configurations
per problem size. This module imports without triton (:data:`AVAILABLE`);
:func:`supports` says whether a block can run here, or why not.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from ...errors import ConvgapError
from ...ops.layouts import channels_last
from ...ops.sizes import conv_length
from .implicit_gemm import AVAILABLE, dot_precision, interpreting, runnable, tl, triton
from . import grouped
from .tma import pixel_rows, tma_ready, width_reason

__all__ = ["AVAILABLE", "ACTIVATIONS", "inverted_residual", "convfirst", "pointwise_mlp",
           "supports"]

ACTIVATIONS = ("relu", "relu6", "silu")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the interpreter's one configuration (tl.dot needs every dimension >= 16)
INTERPRET_CONFIG = {"BLOCK_P": 16, "BLOCK_R": 16, "BLOCK_O": 16}
# (BLOCK_P, BLOCK_R, BLOCK_O, num_warps) tried for the inverted residual on a GPU. Compiled
# offline for sm_90 (triton 3.9, no GPU) each spills at most 80 bytes of registers in bf16
# and 104 in fp32
IR_CONFIGS = ((64, 32, 32, 8), (32, 32, 64, 4), (64, 32, 128, 8), (64, 64, 128, 8),
              (32, 64, 256, 8))
# (BLOCK_M, BLOCK_K, BLOCK_E, BLOCK_N, num_warps, num_stages) tried for the pointwise MLP on
# a GPU, pruned per problem (:func:`_mlp_prune`): flash-attention-shaped tiles (128 rows,
# a wgmma's height per warpgroup), BLOCK_K >= C holding the whole input row (C <= 256),
# BLOCK_N >= O where the accumulator fits (O <= 256)
MLP_CONFIGS = (
    (128, 128, 64, 128, 8, 3), (128, 128, 128, 128, 8, 2), (128, 64, 64, 128, 8, 3),
    (128, 32, 64, 128, 4, 3), (64, 128, 64, 128, 4, 3), (128, 64, 64, 64, 4, 3),
    (64, 256, 64, 256, 8, 2), (128, 64, 64, 256, 8, 3), (64, 64, 64, 256, 8, 3),
    (128, 256, 64, 256, 8, 2), (128, 64, 128, 256, 8, 2),
    # narrow problems (tests, small heads): output tiles of 16-64 channels
    (64, 32, 32, 64, 4, 2), (64, 32, 32, 32, 4, 2), (64, 16, 16, 16, 4, 2),
)
MLP_INTERPRET = {"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_E": 16, "BLOCK_N": 16}
_NOT_RUNNABLE = ("the Triton block kernels need triton and a CUDA tensor (or "
                 "TRITON_INTERPRET=1 set before triton is imported, on CPU)")


def _act(v, ACT: tl.constexpr):
    """The block's activation of a float32 tile."""
    if ACT == "relu":
        v = tl.maximum(v, 0.0)
    elif ACT == "relu6":
        v = tl.minimum(tl.maximum(v, 0.0), 6.0)
    else:  # "silu"
        v = v * tl.sigmoid(v)
    return v


if AVAILABLE:  # a jitted helper resolves as a global of the kernels at compile time
    _act = triton.jit(_act)


def _ir_kernel(
    x_ptr, a_ptr, b1_ptr, d_ptr, b2_ptr, b_ptr, bias_ptr, y_ptr,
    M, H, W, OH, OW, C, R, O,
    x_sn, x_sc, x_sh, x_sw, y_sn, y_sc, y_sh, y_sw,
    a_sc, a_sr, d_sr, d_si, d_sj, b_so, b_sr,
    stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr, EXPAND: tl.constexpr, RESIDUAL: tl.constexpr,
    ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < M
    ow = offs_p % OW
    q = offs_p // OW
    oh = q % OH
    n = q // OH
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_img = n.to(tl.int64) * x_sn
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < O
    offs_c = tl.arange(0, BLOCK_C)

    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):  # runtime loops: unrolled, fp32 dots compile slowly
        rs = r0 + tl.arange(0, BLOCK_R)
        r_ok = rs < R
        mid = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
        for tap in range(KH * KW):
            i = tap // KW
            j = tap - i * KW
            ih = ih0 + i
            iw = iw0 + j
            ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pix = x_img + ih.to(tl.int64) * x_sh + iw.to(tl.int64) * x_sw
            if EXPAND:  # this chunk of the expanded map at the tap's input pixels
                e = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    cs = c0 + offs_c
                    c_ok = cs < C
                    xt = tl.load(x_ptr + pix[:, None] + cs.to(tl.int64)[None, :] * x_sc,
                                 mask=ok[:, None] & c_ok[None, :], other=0.0)
                    at = tl.load(a_ptr + cs[:, None] * a_sc + rs[None, :] * a_sr,
                                 mask=c_ok[:, None] & r_ok[None, :], other=0.0)
                    if UPCAST:
                        xt = xt.to(tl.float32)
                        at = at.to(tl.float32)
                    e = tl.dot(xt, at, e, input_precision=PRECISION)
                e += tl.load(b1_ptr + rs, mask=r_ok, other=0.0).to(tl.float32)[None, :]
                # zero padding pads the expanded map (after its activation), not x
                e = tl.where(ok[:, None], _act(e, ACT), 0.0)
            else:  # R == C: the depthwise conv reads x itself
                e = tl.load(x_ptr + pix[:, None] + rs.to(tl.int64)[None, :] * x_sc,
                            mask=ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            dt = tl.load(d_ptr + rs * d_sr + i * d_si + j * d_sj, mask=r_ok, other=0.0)
            mid += e * dt.to(tl.float32)[None, :]
        mid += tl.load(b2_ptr + rs, mask=r_ok, other=0.0).to(tl.float32)[None, :]
        mid = _act(mid, ACT)
        bt = tl.load(b_ptr + rs[:, None] * b_sr + offs_o[None, :] * b_so,
                     mask=r_ok[:, None] & o_ok[None, :], other=0.0)  # rows past R: 0
        if UPCAST:
            acc = tl.dot(mid, bt.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(mid.to(bt.dtype), bt, acc, input_precision=PRECISION)

    acc += tl.load(bias_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    tile_ok = p_ok[:, None] & o_ok[None, :]
    if RESIDUAL:  # stride 1, O == C: the output pixel is the input pixel
        pix = x_img + oh.to(tl.int64) * x_sh + ow.to(tl.int64) * x_sw
        acc += tl.load(x_ptr + pix[:, None] + offs_o.to(tl.int64)[None, :] * x_sc,
                       mask=tile_ok, other=0.0).to(tl.float32)
    out = n.to(tl.int64) * y_sn + oh.to(tl.int64) * y_sh + ow.to(tl.int64) * y_sw
    tl.store(y_ptr + out[:, None] + offs_o.to(tl.int64)[None, :] * y_sc,
             acc.to(y_ptr.dtype.element_ty), mask=tile_ok)


def _mlp_kernel(
    u_desc, w2_desc, b2_ptr, w3_desc, b3_ptr, r_desc, y_desc, M, C, E, O,
    ACT: tl.constexpr, RESIDUAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr, ONE_K: tl.constexpr,
):
    # one program: BLOCK_M rows (pixels) x BLOCK_N output channels; the output-channel
    # tiles of one row tile are neighbouring programs (they read the same u rows). Every
    # tile moves by TMA (tensor descriptors): no per-element addresses in registers, and
    # the tails past M, C, E and O read as zeros and are not written
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(O, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid - pid_m * n_tiles
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    if ONE_K:  # the whole row of u in one tile, loaded once for every hidden chunk
        a0 = u_desc.load([off_m, 0])
        if UPCAST:
            a0 = a0.to(tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        if ONE_K:
            bt = w2_desc.load([e0, 0])  # (BLOCK_E, BLOCK_K): w2 as nn.Conv2d stores it
            if UPCAST:
                bt = bt.to(tl.float32)
            h = tl.dot(a0, bt.T, input_precision=PRECISION)
        else:
            h = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
            for k0 in range(0, C, BLOCK_K):
                a = u_desc.load([off_m, k0])
                bt = w2_desc.load([e0, k0])
                if UPCAST:
                    a = a.to(tl.float32)
                    bt = bt.to(tl.float32)
                h = tl.dot(a, bt.T, h, input_precision=PRECISION)
        es = e0 + tl.arange(0, BLOCK_E)
        h += tl.load(b2_ptr + es, mask=es < E, other=0.0).to(tl.float32)[None, :]
        h = _act(h, ACT)  # columns past E: w3's are read as zeros
        w3t = w3_desc.load([off_n, e0])  # (BLOCK_N, BLOCK_E)
        if UPCAST:
            acc = tl.dot(h, w3t.to(tl.float32).T, acc, input_precision=PRECISION)
        else:  # the hidden tile rounded to the dtype, as the layer-wise block stores it
            acc = tl.dot(h.to(w3t.dtype), w3t.T, acc, input_precision=PRECISION)

    offs_n = off_n + tl.arange(0, BLOCK_N)
    acc += tl.load(b3_ptr + offs_n, mask=offs_n < O, other=0.0).to(tl.float32)[None, :]
    if RESIDUAL:
        acc += r_desc.load([off_m, off_n]).to(tl.float32)
    y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


def _pruner(chunk: str, width: str, out: str):
    """An early_config_prune rule: configs whose hidden chunk (``chunk``) is not much wider
    than the hidden width (argument ``width``) and whose output tile is not much wider
    than the output channels (argument ``out``); else the smallest."""
    def prune(configs, named_args, **kwargs):
        w_cap = max(16, triton.next_power_of_2(named_args[width]))
        o_cap = max(16, triton.next_power_of_2(named_args[out]))
        kept = [c for c in configs
                if c.kwargs[chunk] <= w_cap and c.kwargs["BLOCK_O"] <= o_cap]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_O"])]
    return prune


# per kernel: its function, GPU configs, hidden-chunk name, autotune key (the problem's
# sizes, stride and input layout), prune arguments; sizes and strides as plain ints (one
# binary for every map size)
_SPECS = {
    "inverted_residual": (_ir_kernel, IR_CONFIGS, "BLOCK_R",
                          ["M", "C", "R", "O", "KH", "KW", "stride_h", "stride_w", "x_sc",
                           "EXPAND", "RESIDUAL", "ACT", "PRECISION"], ("R", "O"),
                          ("M", "H", "W", "OH", "OW", "x_sn", "x_sh", "x_sw", "y_sn", "y_sh",
                           "y_sw", "stride_h", "stride_w", "pad_h", "pad_w")),
}
_KERNELS: dict[tuple[str, bool], Any] = {}


def _kernel(block: str, interpret: bool):
    """The jitted kernel of ``block``, built on first use: plain under the interpreter,
    autotuned on a GPU."""
    if (block, interpret) not in _KERNELS:
        fn, configs, chunk, key, (width, out), generic = _SPECS[block]
        jitted = triton.jit(fn, do_not_specialize=generic)
        if not interpret:
            jitted = triton.autotune(
                configs=[triton.Config({"BLOCK_P": p, chunk: r, "BLOCK_O": o}, num_warps=w)
                         for p, r, o, w in configs],
                key=key, prune_configs_by={"early_config_prune": _pruner(chunk, width, out)},
            )(jitted)
        _KERNELS[block, interpret] = jitted
    return _KERNELS[block, interpret]


def _mlp_prune(configs, named_args, **kwargs):
    """The MLP configurations worth timing for a problem: no tile much wider than what it
    covers (BLOCK_K than C, BLOCK_E than E, BLOCK_N than O), and the widest output tile
    that covers O (or 256 wide) only, so that the hidden chunk is recomputed as few times as
    possible; else the smallest."""
    c, e, o = (max(16, triton.next_power_of_2(named_args[k])) for k in ("C", "E", "O"))
    n_cap = min(o, 256)
    kept = [cf for cf in configs if cf.kwargs["BLOCK_K"] <= c and cf.kwargs["BLOCK_E"] <= e
            and cf.kwargs["BLOCK_N"] == n_cap]
    return kept or [min(configs, key=lambda cf: cf.kwargs["BLOCK_M"] * cf.kwargs["BLOCK_N"])]


def _mlp_blocks(nargs: dict) -> None:
    """Sets the tensor descriptors' tile shapes to a configuration's blocks (an autotune
    pre-hook: each configuration times its own tiles)."""
    bm, bk, be, bn = (nargs[k] for k in ("BLOCK_M", "BLOCK_K", "BLOCK_E", "BLOCK_N"))
    shapes = {"u_desc": [bm, bk], "w2_desc": [be, bk], "w3_desc": [bn, be],
              "r_desc": [bm, bn], "y_desc": [bm, bn]}
    for name, shape in shapes.items():
        nargs[name].block_shape = shape


def _mlp(interpret: bool):
    """The jitted pointwise-MLP kernel, built on first use: plain under the interpreter,
    autotuned on a GPU (ONE_K set from the configuration: BLOCK_K >= C)."""
    if ("mlp", interpret) not in _KERNELS:
        jitted = triton.jit(_mlp_kernel, do_not_specialize=["M"])
        if not interpret:
            jitted = triton.autotune(
                configs=[triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_E": be,
                                        "BLOCK_N": bn}, num_warps=w, num_stages=st,
                                       pre_hook=_mlp_blocks)
                         for bm, bk, be, bn, w, st in MLP_CONFIGS],
                key=["M", "C", "E", "O", "RESIDUAL", "ACT", "PRECISION"],
                prune_configs_by={"early_config_prune": _mlp_prune},
            )(triton.heuristics({"ONE_K": lambda a: a["BLOCK_K"] >= a["C"]})(jitted))
        _KERNELS["mlp", interpret] = jitted
    return _KERNELS["mlp", interpret]


def _check_operands(x: torch.Tensor, **operands) -> None:
    """Every operand a tensor of x's dtype and device, not needing gradients; a supported
    dtype; x 4-D; ConvgapError otherwise."""
    for name, t in {"x": x, **operands}.items():
        if not isinstance(t, torch.Tensor):
            raise ConvgapError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ConvgapError(f"{name} is {t.dtype} on {t.device}; every operand must match "
                               f"x ({x.dtype} on {x.device})")
        if t.requires_grad and torch.is_grad_enabled():
            raise ConvgapError(f"{name} requires grad: the fused block kernels are inference "
                               "only (run under torch.no_grad() or use the block's layers)")
    if x.dtype not in _DTYPES:
        raise ConvgapError(f"expected float32, float16 or bfloat16 tensors, got {x.dtype}")
    if x.dim() != 4:
        raise ConvgapError(f"expected x (N, C, H, W), got shape {tuple(x.shape)}")


def _check_biases(**biases: tuple[torch.Tensor, int]) -> None:
    for name, (t, size) in biases.items():
        if tuple(t.shape) != (size,) or (size > 1 and t.stride(0) != 1):
            raise ConvgapError(f"{name} must be a contiguous ({size},) tensor, got shape "
                               f"{tuple(t.shape)}")


def _check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ConvgapError(f"unknown activation {act!r}: use one of {', '.join(ACTIVATIONS)}")


def _check_inverted_residual(x, a, bias1, d, bias2, b, bias, stride, padding, act,
                             residual) -> tuple:
    """Checks the operands of :func:`inverted_residual` (ConvgapError) and returns the
    output size and geometry ((oh, ow), (sh, sw), (ph, pw))."""
    expand = a is not None
    if not expand and bias1 is not None:
        raise ConvgapError("bias1 must be None without an expansion (a=None)")
    ops = {"d": d, "bias2": bias2, "b": b, "bias": bias}
    if expand:
        ops.update(a=a, bias1=bias1)
    _check_operands(x, **ops)
    _check_act(act)
    c = x.shape[1]
    if (expand and a.dim() != 2) or d.dim() != 3 or b.dim() != 2:
        raise ConvgapError(f"expected a (C, R) or None, d (R, kh, kw), b (O, R); got "
                           f"{None if a is None else tuple(a.shape)}, {tuple(d.shape)}, "
                           f"{tuple(b.shape)}")
    r = a.shape[1] if expand else c
    if (expand and a.shape[0] != c) or d.shape[0] != r or b.shape[1] != r:
        raise ConvgapError(f"channel counts disagree: x has {c}, a is "
                           f"{None if a is None else tuple(a.shape)}, d {tuple(d.shape)}, b "
                           f"{tuple(b.shape)} (without a, d and b take x's channels)")
    o = b.shape[0]
    _check_biases(bias2=(bias2, r), bias=(bias, o), **({"bias1": (bias1, r)} if expand else {}))
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    if min(sh, sw) < 1 or min(ph, pw) < 0:
        raise ConvgapError(f"stride must be >= 1 and padding >= 0, got {stride}, {padding}")
    kh, kw = d.shape[1:]
    h, w = x.shape[2:]
    oh, ow = conv_length(h, kh, sh, (ph, ph), 1), conv_length(w, kw, sw, (pw, pw), 1)
    if oh < 1 or ow < 1:
        raise ConvgapError(f"the {kh}x{kw} filter does not fit a {h}x{w} input (padding "
                           f"{(ph, pw)})")
    if residual and (o != c or (oh, ow) != (h, w)):
        raise ConvgapError(f"the residual add needs the output's shape to equal x's: "
                           f"{c} -> {o} channels, {h}x{w} -> {oh}x{ow}")
    return (oh, ow), (sh, sw), (ph, pw)


def _check_convfirst(x, w1, bias1, w2, bias2, w3, bias3, act) -> None:
    """Checks the operands of :func:`convfirst` (ConvgapError)."""
    _check_operands(x, w1=w1, bias1=bias1, w2=w2, bias2=bias2, w3=w3, bias3=bias3)
    _check_act(act)
    c = x.shape[1]
    if w1.dim() != 4 or w2.dim() != 2 or w3.dim() != 2:
        raise ConvgapError(f"expected w1 (C, C/groups, kh, kw), w2 (E, C), w3 (C, E); got "
                           f"{tuple(w1.shape)}, {tuple(w2.shape)}, {tuple(w3.shape)}")
    gw, (kh, kw), e = w1.shape[1], w1.shape[2:], w2.shape[0]
    if w1.shape[0] != c or c % gw or w2.shape[1] != c or tuple(w3.shape) != (c, e):
        raise ConvgapError(f"channel counts disagree: x has {c}, w1 is {tuple(w1.shape)}, w2 "
                           f"{tuple(w2.shape)}, w3 {tuple(w3.shape)}")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ConvgapError(f"the grouped conv needs an odd filter ('same' padding), got "
                           f"{kh}x{kw}")
    _check_biases(bias1=(bias1, c), bias2=(bias2, e), bias3=(bias3, c))
    reason = width_reason(x.dtype, C=c, E=e)
    if reason:
        raise ConvgapError(reason)


def supports(block: str, x: torch.Tensor, *operands, **options) -> str | None:
    """None when ``block`` ('inverted_residual' or 'convfirst') can run here on these
    operands (the arguments of that function, after ``x``), else the reason: the operands'
    shapes, dtypes and geometry (what the function would raise), triton missing, or x not
    a CUDA tensor (outside the interpreter)."""
    checks = {"inverted_residual": _ir_arguments, "convfirst": _cf_arguments}
    if block not in checks:
        raise ConvgapError(f"unknown block {block!r}: use one of {', '.join(checks)}")
    try:
        checks[block](x, *operands, **options)
    except (ConvgapError, TypeError) as exc:
        return str(exc)
    if not runnable(x):
        return _NOT_RUNNABLE
    return None


def _ir_arguments(x, a, bias1, d, bias2, b, bias, *, stride=1, padding=0, act="relu6",
                  residual):
    return _check_inverted_residual(x, a, bias1, d, bias2, b, bias, stride, padding, act,
                                    residual)


def _cf_arguments(x, w1, bias1, w2, bias2, w3, bias3, *, act="silu"):
    return _check_convfirst(x, w1, bias1, w2, bias2, w3, bias3, act)


def _runnable(x: torch.Tensor) -> None:
    if not runnable(x):
        raise RuntimeError(_NOT_RUNNABLE)


def _output(x: torch.Tensor, o: int, oh: int, ow: int) -> torch.Tensor:
    fmt = torch.channels_last if channels_last(x) else torch.contiguous_format
    return torch.empty((x.shape[0], o, oh, ow), device=x.device, dtype=x.dtype,
                       memory_format=fmt)


def _launch(block: str, x: torch.Tensor, m: int, o: int, args: tuple, meta: dict) -> None:
    """Launches ``block``'s kernel over m output pixels and o output channels: the
    interpreter's fixed blocks, or the autotuner's on x's GPU."""
    interpret = interpreting()
    kernel = _kernel(block, interpret)
    # the interpreter's tl.dot reads bf16 as raw bits: multiply in fp32 there
    meta.update(PRECISION=dot_precision(x), UPCAST=interpret and x.dtype == torch.bfloat16)
    if interpret:
        chunk = _SPECS[block][2]
        blocks = {k: INTERPRET_CONFIG[k] for k in ("BLOCK_P", chunk, "BLOCK_O")}
        grid = (triton.cdiv(m, blocks["BLOCK_P"]), triton.cdiv(o, blocks["BLOCK_O"]))
        kernel[grid](*args, **meta, **blocks)
        return

    def grid(meta_):
        return triton.cdiv(m, meta_["BLOCK_P"]), triton.cdiv(o, meta_["BLOCK_O"])
    with torch.cuda.device(x.device):
        kernel[grid](*args, **meta)


def inverted_residual(x: torch.Tensor, a: torch.Tensor | None, bias1: torch.Tensor | None,
                      d: torch.Tensor, bias2: torch.Tensor, b: torch.Tensor,
                      bias: torch.Tensor, *, stride=1, padding=0, act: str = "relu6",
                      residual: bool) -> torch.Tensor:
    """An inverted residual in one launch: ``t = act(F.conv2d(x, a.t()[..., None, None],
    bias1))`` (``t = x`` when ``a`` is None), ``u = act(F.conv2d(t, d[:, None], bias2,
    stride, padding, groups=R))``, ``y = F.conv2d(u, b[..., None, None], bias)``, plus x
    when ``residual``.

    x: (N, C, H, W) CUDA tensor, any memory format; a: (C, R) or None (then bias1 None and
    R = C); bias1, bias2: (R,); d: (R, kh, kw), one filter per channel; b: (O, R); bias:
    (O,); all of x's dtype and device, weights in any strides (batch norm folded in).
    stride, padding (zeros, symmetric): an int or a pair. act: 'relu', 'relu6' or 'silu',
    after the expansion and after the depthwise conv. residual needs O == C and stride 1.
    Returns (N, O, OH, OW) in x's memory format. Raises ConvgapError on bad operands;
    RuntimeError where triton cannot run."""
    (oh, ow), (sh, sw), (ph, pw) = _check_inverted_residual(
        x, a, bias1, d, bias2, b, bias, stride, padding, act, residual)
    _runnable(x)
    n, c, h, w = x.shape
    r, o = d.shape[0], b.shape[0]
    y = _output(x, o, oh, ow)
    expand = a is not None
    a_, b1_ = (a, bias1) if expand else (d, bias2)  # unread pointers without an expansion
    m = n * oh * ow
    args = (x, a_, b1_, d, bias2, b, bias, y, m, h, w, oh, ow, c, r, o, *x.stride(),
            *y.stride(), *(a.stride() if expand else (0, 0)), *d.stride(), *b.stride(),
            sh, sw, ph, pw)
    block_c = 16 if interpreting() else min(64, max(16, triton.next_power_of_2(c)))
    meta = dict(KH=d.shape[1], KW=d.shape[2], EXPAND=expand, RESIDUAL=bool(residual),
                ACT=act, BLOCK_C=block_c)
    _launch("inverted_residual", x, m, o, args, meta)
    return y


def _check_mlp(u, w2, bias2, w3, bias3, residual, act) -> None:
    """Checks :func:`pointwise_mlp`'s operands (ConvgapError)."""
    _check_operands(u, w2=w2, bias2=bias2, w3=w3, bias3=bias3,
                    **({} if residual is None else {"residual": residual}))
    _check_act(act)
    n, c, h, w = u.shape
    if w2.dim() != 2 or w3.dim() != 2 or w2.shape[1] != c or w3.shape[1] != w2.shape[0]:
        raise ConvgapError(f"expected w2 (E, C) and w3 (O, E) with C = {c}; got "
                           f"{tuple(w2.shape)}, {tuple(w3.shape)}")
    e, o = w2.shape[0], w3.shape[0]
    _check_biases(bias2=(bias2, e), bias3=(bias3, o))
    if residual is not None and tuple(residual.shape) != (n, o, h, w):
        raise ConvgapError(f"residual must be {(n, o, h, w)}, got {tuple(residual.shape)}")
    reason = width_reason(u.dtype, C=c, E=e, O=o)
    if reason:
        raise ConvgapError(reason)


def pointwise_mlp(u: torch.Tensor, w2: torch.Tensor, bias2: torch.Tensor, w3: torch.Tensor,
                  bias3: torch.Tensor, residual: torch.Tensor | None = None, *,
                  act: str = "silu") -> torch.Tensor:
    """Two 1x1 convolutions with an activation between them in one launch, the hidden map
    never in memory: ``y = F.conv2d(act(F.conv2d(u, w2[..., None, None], bias2)),
    w3[..., None, None], bias3)``, plus ``residual`` when given.

    Each program takes BLOCK_M pixels and BLOCK_N output channels and streams the E hidden
    channels in BLOCK_E chunks, as flash attention streams keys: per chunk one ``tl.dot``
    of the pixels' rows by ``w2`` (BLOCK_K >= C: the rows loaded once), bias, activation,
    one ``tl.dot`` of the hidden tile (rounded to the dtype in half precision, as the
    layer-wise block stores it) into the output tile by ``w3``; bias and residual in the
    epilogue. Tiles move by TMA. With O wider than the output tile (256) the hidden chunk
    is recomputed per output tile.

    u: (N, C, H, W) CUDA tensor (channels_last is read in place; other formats are copied
    to it); w2: (E, C); w3: (O, E); bias2 (E,), bias3 (O,); residual: (N, O, H, W) or None;
    all of u's dtype and device, weights in any strides (row-major is read in place). Rows
    of channels must be whole multiples of 16 bytes (C, E and O multiples of 8 in half
    precision, of 4 in float32). Returns (N, O, H, W) channels_last. Raises ConvgapError on
    bad operands; RuntimeError where triton cannot run."""
    _check_mlp(u, w2, bias2, w3, bias3, residual, act)
    _runnable(u)
    return _run_mlp(u, w2, bias2, w3, bias3, residual, act)


def _run_mlp(u, w2, bias2, w3, bias3, residual, act) -> torch.Tensor:
    """:func:`pointwise_mlp` on checked operands: u and residual read in place where TMA
    can (:func:`~convgap.kernels.triton.tma.tma_ready`), the weights where contiguous."""
    n, c, h, w = u.shape
    e, o = w2.shape[0], w3.shape[0]
    u2 = pixel_rows(tma_ready(u))
    r2 = None if residual is None else pixel_rows(tma_ready(residual))
    w2, w3 = (t if t.is_contiguous() and t.data_ptr() % 16 == 0 else
              t.clone(memory_format=torch.contiguous_format) for t in (w2, w3))
    y = torch.empty((n, o, h, w), device=u.device, dtype=u.dtype,
                    memory_format=torch.channels_last)
    y2 = pixel_rows(y)
    from triton.tools.tensor_descriptor import TensorDescriptor
    interpret = interpreting()
    # tile shapes set per configuration (_mlp_blocks: by the autotuner on a GPU)
    descs = {name: TensorDescriptor.from_tensor(t, [16, 16]) for name, t in (
        ("u_desc", u2), ("w2_desc", w2), ("w3_desc", w3),
        ("r_desc", y2 if r2 is None else r2), ("y_desc", y2))}  # r unread without residual
    m = n * h * w
    args = (descs["u_desc"], descs["w2_desc"], bias2, descs["w3_desc"], bias3,
            descs["r_desc"], descs["y_desc"], m, c, e, o)
    kernel = _mlp(interpret)
    # the interpreter's tl.dot reads bf16 as raw bits: multiply in fp32 there
    meta = dict(ACT=act, RESIDUAL=r2 is not None, PRECISION=dot_precision(u),
                UPCAST=interpret and u.dtype == torch.bfloat16)
    if interpret:
        cfg = dict(MLP_INTERPRET, ONE_K=MLP_INTERPRET["BLOCK_K"] >= c)
        _mlp_blocks({**cfg, **descs})
        kernel[(triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(o, cfg["BLOCK_N"]),)](
            *args, **meta, **cfg)
        return y

    def grid(meta_):
        return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(o, meta_["BLOCK_N"]),)
    with torch.cuda.device(u.device):
        kernel[grid](*args, **meta)
    return y


def _grouped_conv(x, w, bias, padding, groups) -> torch.Tensor:
    """F.conv2d with float32 products as the kernels take them (:func:`dot_precision`): cuDNN
    follows its own TF32 switch (on by default), the kernels torch's matmul one."""
    if x.is_cuda and x.dtype == torch.float32:
        was = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32
        try:
            return F.conv2d(x, w, bias, padding=padding, groups=groups)
        finally:
            torch.backends.cudnn.allow_tf32 = was
    return F.conv2d(x, w, bias, padding=padding, groups=groups)


def convfirst(x: torch.Tensor, w1: torch.Tensor, bias1: torch.Tensor, w2: torch.Tensor,
              bias2: torch.Tensor, w3: torch.Tensor, bias3: torch.Tensor, *,
              act: str = "silu", w1_diagonal: torch.Tensor | None = None) -> torch.Tensor:
    """A ConvFirst block in two launches: ``u = F.conv2d(x, w1, bias1, padding=(kh // 2,
    kw // 2), groups=C // w1.shape[1])`` (cuDNN, channels_last), then
    ``y = x + F.conv2d(act(F.conv2d(u, w2[..., None, None], bias2)), w3[..., None, None],
    bias3)`` as one :func:`pointwise_mlp`: the 4C-wide hidden map, the block's largest,
    never reaches memory.

    x: (N, C, H, W) CUDA tensor, any memory format; w1: (C, GW, kh, kw), the grouped conv's
    nn.Conv2d weight (odd kh and kw); w2: (E, C) and w3: (C, E), the 1x1 convs' weights
    without their 1x1 dims; bias1 (C,), bias2 (E,), bias3 (C,); all of x's dtype and device,
    weights in any strides (batch norm folded in). act: 'silu' (ConvFirst's), 'relu' or
    'relu6'. ``w1_diagonal``: ``grouped.block_diagonal(w1)`` to run the grouped conv as
    convgap's Triton kernel (:mod:`convgap.kernels.triton.grouped`) instead of cuDNN's
    (not yet timed on a GPU: the benchmark measures both). Returns (N, C, H, W) in x's
    memory format (channels_last stays channels_last, anything else comes back
    contiguous). Raises ConvgapError on bad operands; RuntimeError where triton cannot
    run."""
    _check_convfirst(x, w1, bias1, w2, bias2, w3, bias3, act)
    _runnable(x)
    kh, kw = w1.shape[2:]
    xc = tma_ready(x)
    if w1_diagonal is not None:
        u = grouped.grouped_conv(xc, w1_diagonal, bias1, (kh, kw))
    else:
        u = _grouped_conv(xc, w1, bias1, (kh // 2, kw // 2), x.shape[1] // w1.shape[1])
    y = _run_mlp(u, w2, bias2, w3, bias3, xc, act)
    return y if channels_last(x) else y.contiguous()
