"""Implicit-GEMM forward 2-D convolution in Triton (NHWC activations).

The convolution is computed as a GEMM whose A operand is never materialised:

- M = N * OH * OW output pixels (rows), N_gemm = O / groups output channels of one group
  (columns), K = KH * KW * C / groups reduction, ordered (kh, kw, c) with c fastest so that
  a chunk of K reads contiguous channels of one NHWC input pixel;
- each program computes a BLOCK_M x BLOCK_N output tile of one group (grid axis 2), looping
  over K in BLOCK_K chunks; the input coordinates
  ``(n, oh*stride - pad + kh*dil, ow*stride - pad + kw*dil, g*C/groups + c)`` are computed on
  the fly, and out-of-image (zero padding) and tail elements are masked to 0;
- the weight is packed once (:func:`pack_weight`) as (groups, K, O/groups), contiguous;
- fp32 accumulation with ``tl.dot``; fp32 inputs use ``input_precision="ieee"`` unless
  ``allow_tf32=True``; fp16 / bf16 inputs are multiplied on tensor cores and accumulated in
  fp32; bias is added in fp32 before the single store;
- the output is written NHWC, i.e. an (N, O, OH, OW) tensor in ``channels_last`` format.

Two K loops, chosen per call (``FLAT_K``): *per-tap* (contiguous channel chunks of one filter
tap per K block; used when C/groups is a multiple of 16: where BLOCK_K divides C/groups
(``EVEN_C``) it is ONE loop over K decoded from the block's start, which pipelines across
taps, else nested loops over kh, kw and masked channel chunks) and *flat* (one loop over the
whole K with div/mod addressing per element: no padding waste when C/groups is small, e.g. a
3-channel stem).

Block sizes: under the interpreter (``TRITON_INTERPRET=1``) one fixed 16x16x16 config
(``tl.dot`` needs every dimension >= 16); on a GPU ``triton.autotune`` over a few configs,
keyed on (M, O/groups, K, C/groups, KH, KW, FLAT_K, precision) and the dtypes, pruned per
problem (:func:`_prune_configs`). The kernel is jitted lazily, on
first use, in the mode triton itself was imported in (see :func:`interpreting`).

This module imports without triton: :data:`AVAILABLE` says whether the kernel can be used.
"""

from __future__ import annotations

from typing import Any

import torch

from ...ops.sizes import conv_length

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # triton is not installed (or sys.modules["triton"] is None)
    triton = None
    tl = None

AVAILABLE: bool = triton is not None

__all__ = ["AVAILABLE", "conv2d_implicit_gemm", "dot_precision", "interpreting",
           "pack_weight", "runnable"]

# The fixed config used by the interpreter (and the smallest one tl.dot accepts).
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried by the autotuner on a GPU: the
# first _N_BASE, then Hopper-leaning ones (BLOCK_K 64, deeper pipelines, wider tiles). On
# an H100 in fp16 at batch 128, a 1024->256 1x1 conv at 14x14 ran in 0.046 ms with the
# Hopper ones against 0.097 with the others (cuDNN 0.032); a 64-channel 3x3 at 56x56 ran
# slower with them (0.198 against 0.110), so the autotuner chooses per shape among all.
GPU_CONFIGS = (
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (128, 32, 32, 4, 4),
    (64, 32, 32, 4, 4),
    (32, 64, 32, 4, 4),
    (64, 64, 16, 4, 3),
    (128, 64, 16, 4, 4),
    (64, 32, 16, 4, 4),
    (128, 32, 16, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 3),
    (128, 128, 64, 8, 4),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 64, 64, 4, 5),
    (64, 128, 64, 4, 5),
    (128, 128, 32, 8, 5),
)
_N_BASE = 13
BASE_CONFIGS, HOPPER_CONFIGS = GPU_CONFIGS[:_N_BASE], GPU_CONFIGS[_N_BASE:]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter.

    That is decided once, when ``triton`` is first imported, by ``TRITON_INTERPRET=1``
    (triton's own ``tl.*`` helpers are built for one mode or the other), so this reads
    triton's state, not the environment variable now."""
    return AVAILABLE and type(tl.zeros).__name__ == "InterpretedFunction"


def runnable(x: torch.Tensor) -> bool:
    """Whether convgap's Triton kernels can run on ``x``: triton here and x on a GPU, or on
    CPU under the interpreter."""
    return AVAILABLE and (x.device.type == "cuda" or interpreting())


def dot_precision(x: torch.Tensor) -> str | None:
    """``tl.dot``'s input precision for ``x``'s dtype: float32 products IEEE unless torch
    allows TF32 in matrix products (``torch.backends.cuda.matmul.allow_tf32``); None
    (triton's default: tensor cores) in half precision."""
    if x.dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def pack_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(O, C/g, KH, KW) -> (g, KH*KW*C/g, O/g) contiguous: the kernel's B operand, with K
    ordered (kh, kw, c), c fastest."""
    o, cg, kh, kw = weight.shape
    if o % groups:
        raise ValueError(f"out_channels={o} is not divisible by groups={groups}")
    og = o // groups
    return (weight.detach().reshape(groups, og, cg, kh, kw)
            .permute(0, 3, 4, 2, 1).reshape(groups, kh * kw * cg, og).contiguous())


def _conv2d_igemm_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    H, W, C, OH, OW, O, M, Cg, Og, Ktot,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, FLAT_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_C: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)

    # Output pixels of this tile (rows of the GEMM) -> (n, oh, ow).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    n = t // OH
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    # int64 base offset of each output pixel's input image plus this group's first channel.
    x_img = n.to(tl.int64) * H * W * C + g * Cg

    # Output channels of this tile within the group (columns of the GEMM).
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Og
    offs_k = tl.arange(0, BLOCK_K)
    w_grp = w_ptr + g.to(tl.int64) * Ktot * Og

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # One loop over K = (kh, kw, c), decoded per element.
        for k0 in range(0, Ktot, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < Ktot
            c = ks % Cg
            tap = ks // Cg
            kw = tap % KW
            kh = tap // KW
            ih = ih0[:, None] + (kh * dil_h)[None, :]
            iw = iw0[:, None] + (kw * dil_w)[None, :]
            a_ok = (m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H)
                    & (iw >= 0) & (iw < W))
            a_off = x_img[:, None] + (ih * W + iw).to(tl.int64) * C + c[None, :]
            a = tl.load(x_ptr + a_off, mask=a_ok, other=0.0)
            b = tl.load(w_grp + ks[:, None] * Og + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    elif EVEN_C:
        # Per tap, whole channel chunks (BLOCK_K divides C/groups): ONE loop over K whose
        # block k0 lies in one filter tap, decoded from k0 alone, so the A loads are
        # contiguous along channels with a row mask, and the loop pipelines across taps.
        for k0 in range(0, Ktot, BLOCK_K):
            tap = k0 // Cg
            c0 = k0 - tap * Cg
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            p_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_pix = x_img + (ih * W + iw).to(tl.int64) * C + c0
            a = tl.load(x_ptr + x_pix[:, None] + offs_k[None, :], mask=p_ok[:, None],
                        other=0.0)
            pb = w_grp + (k0 + offs_k)[:, None] * Og + offs_n[None, :]
            if EVEN_N:
                b = tl.load(pb)
            else:
                b = tl.load(pb, mask=n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        # Per filter tap (kh, kw): one row mask, then channel chunks with a tail mask.
        for kh in range(KH):
            ih = ih0 + kh * dil_h
            h_ok = m_ok & (ih >= 0) & (ih < H)
            for kw in range(KW):
                iw = iw0 + kw * dil_w
                p_ok = h_ok & (iw >= 0) & (iw < W)
                x_pix = x_img + (ih * W + iw).to(tl.int64) * C
                k_tap = (kh * KW + kw) * Cg
                for c0 in range(0, Cg, BLOCK_K):
                    cs = c0 + offs_k
                    c_ok = cs < Cg
                    a = tl.load(x_ptr + x_pix[:, None] + cs[None, :],
                                mask=p_ok[:, None] & c_ok[None, :], other=0.0)
                    b = tl.load(w_grp + (k_tap + cs)[:, None] * Og + offs_n[None, :],
                                mask=c_ok[:, None] & n_ok[None, :], other=0.0)
                    if UPCAST:
                        a = a.to(tl.float32)
                        b = b.to(tl.float32)
                    acc = tl.dot(a, b, acc, input_precision=PRECISION)

    if HAS_BIAS:
        bias = tl.load(b_ptr + g * Og + offs_n, mask=n_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    y_off = offs_m.to(tl.int64)[:, None] * O + (g * Og + offs_n)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _prune_configs(configs, named_args, **kwargs):
    """GPU configs worth timing for this problem: no BLOCK_N much wider than O/groups, no
    BLOCK_K wider than the K loop's extent (nor 16 on deep ones), and (per-tap loop) a
    BLOCK_K that divides C/groups when one does, so no channel chunk is mostly padding."""
    og, cg, ktot = named_args["Og"], named_args["Cg"], named_args["Ktot"]
    flat = kwargs.get("FLAT_K", named_args.get("FLAT_K"))
    n_cap = max(32, triton.next_power_of_2(og))
    kdim = ktot if flat else cg
    k_cap = max(16, triton.next_power_of_2(kdim))
    k_min = 32 if kdim >= 64 else 16  # BLOCK_K 16 only for shallow reductions
    kept = [c for c in configs if k_min <= c.kwargs["BLOCK_K"] <= k_cap] or [
        min(configs, key=lambda c: c.kwargs["BLOCK_K"])]
    kept = [c for c in kept if c.kwargs["BLOCK_N"] <= n_cap] or kept
    if not flat:
        kept = [c for c in kept if cg % c.kwargs["BLOCK_K"] == 0] or kept
    return kept


def gpu_configs() -> list:
    """:data:`GPU_CONFIGS` as ``triton.Config`` objects."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                          num_warps=nw, num_stages=ns)
            for bm, bn, bk, nw, ns in GPU_CONFIGS]


_KERNELS: dict[bool, Any] = {}


# EVEN_C / EVEN_N: C/groups and O/groups are whole multiples of the blocks (no tail masks
# in the per-tap loop); from the launch arguments, as triton.heuristics passes them
_EVEN = {"EVEN_C": lambda a: a["Cg"] % a["BLOCK_K"] == 0,
         "EVEN_N": lambda a: a["Og"] % a["BLOCK_N"] == 0}


def _kernel(interpret: bool):
    """The jitted kernel, built on first use: plain under the interpreter (launched with
    :data:`INTERPRET_CONFIG`), autotuned otherwise (its raw jitted function is ``.fn``)."""
    if interpret not in _KERNELS:
        jitted = triton.jit(_conv2d_igemm_kernel)
        if (type(jitted).__name__ == "InterpretedFunction") != interpret:
            # TRITON_INTERPRET changed after triton was imported: follow triton's mode.
            if interpret:
                from triton.runtime.interpreter import InterpretedFunction
                jitted = InterpretedFunction(_conv2d_igemm_kernel)
            else:
                jitted = triton.runtime.JITFunction(_conv2d_igemm_kernel)
        if not interpret:
            even = triton.heuristics(_EVEN)(jitted)
            jitted = triton.autotune(
                configs=gpu_configs(),
                key=["M", "Og", "Ktot", "Cg", "KH", "KW", "FLAT_K", "PRECISION"],
                prune_configs_by={"early_config_prune": _prune_configs},
            )(even)
            jitted.raw = even.fn
        _KERNELS[interpret] = jitted
    return _KERNELS[interpret]


def _check_config(config: dict) -> tuple[dict, dict]:
    """(block sizes, launch options) of a user-given ``config``; ValueError when malformed."""
    blocks = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    launch = {"num_warps": config.get("num_warps", 4), "num_stages": config.get("num_stages", 3)}
    ok = set(blocks) == {"BLOCK_M", "BLOCK_N", "BLOCK_K"} and all(
        isinstance(v, int) and v >= 16 and not v & (v - 1) for v in blocks.values())
    ok = ok and all(isinstance(v, int) and v >= 1 for v in launch.values())
    if not ok:
        raise ValueError("config needs BLOCK_M, BLOCK_N, BLOCK_K (powers of two >= 16) and "
                         f"optionally num_warps, num_stages (>= 1); got {config}")
    return blocks, launch


def conv2d_implicit_gemm(x: torch.Tensor, w_kxo: torch.Tensor, bias: torch.Tensor | None,
                         spec, *, allow_tf32: bool = False,
                         flat_k: bool | None = None,
                         config: dict | None = None) -> torch.Tensor:
    """Forward convolution of ``x`` (N, C, H, W, any layout) with the packed weight ``w_kxo``
    (groups, KH*KW*C/groups, O/groups) from :func:`pack_weight`, plus ``bias`` (O,) or None.

    ``spec`` supplies kernel_size, stride, padding (symmetric zero), dilation and groups
    (a :class:`convgap.algorithms.ConvSpec` or anything with those attributes). Returns
    (N, O, OH, OW) in ``x``'s dtype, ``channels_last`` memory format. ``flat_k`` forces
    the K-loop variant (None: flat when C/groups is not a multiple of 16). ``config`` skips
    the autotuner and launches one block configuration: ``BLOCK_M``, ``BLOCK_N``,
    ``BLOCK_K`` (powers of two >= 16) and optionally ``num_warps`` (4), ``num_stages`` (3);
    under the interpreter the block sizes are used and the launch options ignored."""
    if not AVAILABLE:
        raise RuntimeError("triton is not installed: the implicit-GEMM kernel cannot run")
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"implicit_gemm takes float32/float16/bfloat16 inputs, got {x.dtype}")
    fixed = None if config is None else _check_config(config)
    interpret = interpreting()
    if x.device.type != "cuda" and not interpret:
        raise RuntimeError("implicit_gemm needs a CUDA tensor (or TRITON_INTERPRET=1 set "
                           "before triton is imported, to run on CPU)")

    kh, kw = spec.kernel_size
    sh, sw = spec.stride
    ph, pw = spec.padding
    dh, dw = spec.dilation
    groups = spec.groups
    n, c, h, w = x.shape
    if c % groups:
        raise ValueError(f"in_channels={c} is not divisible by groups={groups}")
    cg = c // groups
    ktot = kh * kw * cg
    if w_kxo.dim() != 3 or w_kxo.shape[0] != groups or w_kxo.shape[1] != ktot:
        raise ValueError(f"packed weight has shape {tuple(w_kxo.shape)}, expected "
                         f"({groups}, {ktot}, O/groups); use pack_weight()")
    og = w_kxo.shape[2]
    o = og * groups
    oh, ow = conv_length(h, kh, sh, (ph, ph), dh), conv_length(w, kw, sw, (pw, pw), dw)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"input {h}x{w} is too small for the convolution (output {oh}x{ow})")

    xc = x.contiguous(memory_format=torch.channels_last)
    wc = w_kxo.to(device=x.device, dtype=x.dtype).contiguous()
    y = torch.empty((n, o, oh, ow), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last)
    m = n * oh * ow
    if m == 0 or o == 0:
        return y
    if ktot == 0:
        return y.zero_()
    has_bias = bias is not None
    b = bias.to(device=x.device).contiguous() if has_bias else wc  # dummy pointer if no bias
    if has_bias and b.numel() != o:
        raise ValueError(f"bias has {b.numel()} elements, expected {o}")
    if flat_k is None:
        flat_k = cg % 16 != 0
    # fp32: exact IEEE products unless tf32 is allowed; None: the target's default (tensor
    # cores for fp16/bf16, tf32 for fp32 where the device has it).
    precision = "ieee" if (x.dtype == torch.float32 and not allow_tf32) else None

    args = (xc, wc, b, y, h, w, c, oh, ow, o, m, cg, og, ktot, sh, sw, ph, pw, dh, dw)
    # The interpreter's tl.dot reads bf16 operands as raw bits (triton 3.x): multiply them
    # as fp32 there (exact: bf16 products are exact in fp32). Native bf16 dot on a GPU.
    upcast = interpret and x.dtype == torch.bfloat16
    meta = dict(KH=kh, KW=kw, HAS_BIAS=has_bias, FLAT_K=bool(flat_k), PRECISION=precision,
                UPCAST=upcast)
    kernel = _kernel(interpret)
    if interpret or fixed is not None:
        blocks, launch = fixed or (INTERPRET_CONFIG, {})
        grid = (triton.cdiv(m, blocks["BLOCK_M"]), triton.cdiv(og, blocks["BLOCK_N"]), groups)
        even = {k: rule({"Cg": cg, "Og": og, **blocks}) for k, rule in _EVEN.items()}
        if interpret:  # the interpreter takes no launch options
            kernel[grid](*args, **meta, **even, **blocks)
        else:  # the autotuner's own jitted function, one config
            with torch.cuda.device(x.device):
                kernel.raw[grid](*args, **meta, **even, **blocks, **launch)
    else:
        def grid(meta_):
            return (triton.cdiv(m, meta_["BLOCK_M"]), triton.cdiv(og, meta_["BLOCK_N"]),
                    groups)
        with torch.cuda.device(x.device):
            kernel[grid](*args, **meta)
    return y
