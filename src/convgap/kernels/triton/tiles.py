"""A residual block's body on kept output tiles, added into the output in place, in Triton:
the sparse execution of a spatially dynamic block on a GPU (the CPU's is ``tiles.c``,
:func:`convgap.kernels.cpu.tiles.residual_tiles`: the same body and tiles, given as an
index list).

The body (:class:`convgap.kernels.cpu.tiles.Body`, batch norms folded): an optional first
conv (C -> R, k1 x k1, stride s1, zero padding k1 // 2) with ``act1``, a k x k conv (R ->
R, dense or depthwise, stride s, zero padding k // 2) with ``act2``, an optional 1x1 conv
(R -> O). A tile (n, ty, tx) is the S x S output pixels from (ty S, tx S) of image n,
clipped at the output's bottom and right edges. The kept tiles come as a keep grid (N,
gh, gw), turned on the device into their flat indices in order followed by -1
(:func:`kept_order`: a cumulative sum and a scatter), and both launches cover the whole
grid: a program whose first tile is past the kept ones returns at once. Nothing reads a
count back to the host, so a block runs inside a CUDA graph (captured once, replayed with
new masks), which the index list of the first design (``nonzero``, a synchronization per
block) could not. Two or three launches:

1. with a first conv, ``u`` at every pixel of each kept tile's window (the first conv's
   output pixels the middle conv reads for the tile): programs take BLOCK_P window pixels
   (of all the tiles' windows in a row: small tiles still fill a block) and BLOCK_R of the
   R channels, an implicit GEMM over the first conv's taps and C in BLOCK_C chunks, bias1
   and act1, stored into an (N, H, W, R) buffer. Windows of neighbouring tiles overlap:
   their shared pixels are computed by each and stored with the same value (no pixel of
   u another tile's window does not read is touched, nothing reads an unwritten one);
2. programs take BLOCK_P output pixels of the kept tiles (all tiles' pixels in a row) and
   BLOCK_O output channels: per BLOCK_R chunk of R, the middle conv at those pixels (dense:
   ``tl.dot`` per tap and input chunk; depthwise: per tap, elementwise), bias2 and act2,
   multiplied into the output tile by the last conv's rows (without a last conv the
   output chunk is the middle conv's); the bias, then ``y += `` the tile at its pixels
   inside the output (tiles do not overlap: no two programs write one element). This
   fuses the last conv only where its outputs fit one BLOCK_O block: with more, each block
   would compute the middle conv again (a bottleneck's 4R outputs: 4x its work), so
3. instead, launch 2 stores the middle conv's R channels at the kept pixels and a third
   launch of the same kernel runs the last conv there as a 1x1 tile conv, adding into y.

float32 (IEEE products unless ``torch.backends.cuda.matmul.allow_tf32``); x, y and the
weights in any strides. Under ``TRITON_INTERPRET=1`` (set before triton is imported) the
kernels run on CPU tensors with 16-wide blocks (``tl.dot`` needs every dimension >= 16);
on a GPU the first launch in one configuration (:data:`FIRST_CONFIG`), the tile kernel
autotuned over :data:`TILE_CONFIGS` (none spills compiled for sm_90); not yet timed on a
device.
Inference only.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import ConvgapError
from ..cpu.tiles import Body
from .blocks import _check_operands
from .implicit_gemm import AVAILABLE, dot_precision, interpreting, runnable, tl, triton

__all__ = ["AVAILABLE", "kept_order", "residual_tiles", "runnable"]

ACTIVATIONS = (None, "relu", "relu6", "silu", "sigmoid")
INTERPRET_CONFIG = {"BLOCK_P": 16, "BLOCK_R": 16, "BLOCK_C": 16, "BLOCK_O": 16}
# the first launch on a GPU (not yet timed on a device): 64-pixel blocks, 32-wide chunks,
# 8 warps (100 registers compiled for sm_90, no spills)
FIRST_CONFIG = {"BLOCK_P": 64, "BLOCK_R": 32, "BLOCK_C": 32, "num_warps": 8}
# the tile kernel's configurations the autotuner times on a GPU, (BLOCK_P, BLOCK_R,
# BLOCK_C, BLOCK_O, warps): none spills registers compiled for sm_90 in any of the
# kernel's four forms (dense or depthwise middle, with or without the last conv); 128-wide
# output blocks, or 128-pixel blocks with 64-wide outputs, spilled 56-3132 bytes, and
# (64, 32, 32, 64) 144-288 bytes with 4 warps
TILE_CONFIGS = [(32, 32, 32, 64, 4), (64, 32, 32, 64, 8), (128, 32, 32, 32, 8),
                (64, 64, 32, 64, 8), (32, 16, 32, 32, 4)]
# the last conv runs in the middle conv's launch only where its outputs fit one block
LAST_FUSED_MAX = max(c[3] for c in TILE_CONFIGS)


def _apply(v, ACT: tl.constexpr):
    """The activation ``ACT`` (a name of :data:`ACTIVATIONS`, "none" for None) of a float32
    tile."""
    if ACT == "relu":
        v = tl.maximum(v, 0.0)
    elif ACT == "relu6":
        v = tl.minimum(tl.maximum(v, 0.0), 6.0)
    elif ACT == "silu":
        v = v * tl.sigmoid(v)
    elif ACT == "sigmoid":
        v = tl.sigmoid(v)
    return v


if AVAILABLE:  # a jitted helper resolves as a global of the kernels at compile time
    _apply = triton.jit(_apply)


def _tile_of(order_ptr, q, q_ok, SIDE2, GH, GW):
    """(n, ty, tx, ok) of the kept tile that pixel ``q`` lies in (SIDE2 pixels a tile);
    ok False past the kept tiles."""
    f = tl.load(order_ptr + q // SIDE2, mask=q_ok, other=-1)
    ok = q_ok & (f >= 0)
    f = tl.maximum(f, 0)
    n = f // (GH * GW)
    rem = f - n * (GH * GW)
    ty = rem // GW
    return n, ty, rem - ty * GW, ok


if AVAILABLE:
    _tile_of = triton.jit(_tile_of)


def _first_kernel(
    x_ptr, w_ptr, b_ptr, u_ptr, order_ptr,
    P, GH, GW, H, W, XH, XW, C, R, S, SIDE, ST, PAD,
    x_sn, x_sc, x_sh, x_sw, w_sr, w_sc, w_si, w_sj, u_sn, u_sh, u_sw,
    ST1: tl.constexpr, K1: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """u[n, iy, ix, r] = act(first conv of x + bias) at the kept tiles' window pixels."""
    pid_p = tl.program_id(0)
    pid_r = tl.program_id(1)
    if tl.load(order_ptr + (pid_p * BLOCK_P) // (SIDE * SIDE)) < 0:
        return      # past the kept tiles
    q = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    q_ok = q < P
    p = q % (SIDE * SIDE)
    n, ty, tx, q_ok = _tile_of(order_ptr, q, q_ok, SIDE * SIDE, GH, GW)
    iy = ty * S * ST - PAD + p // SIDE
    ix = tx * S * ST - PAD + p % SIDE
    ok = q_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    rs = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rs < R
    offs_c = tl.arange(0, BLOCK_C)
    x_img = n.to(tl.int64) * x_sn
    e = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for tap in range(K1 * K1):
        i = tap // K1
        j = tap - i * K1
        xy = iy * ST1 - K1 // 2 + i
        xx = ix * ST1 - K1 // 2 + j
        okx = ok & (xy >= 0) & (xy < XH) & (xx >= 0) & (xx < XW)
        pix = x_img + xy.to(tl.int64) * x_sh + xx.to(tl.int64) * x_sw
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + offs_c
            c_ok = cs < C
            xt = tl.load(x_ptr + pix[:, None] + cs.to(tl.int64)[None, :] * x_sc,
                         mask=okx[:, None] & c_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + cs[:, None] * w_sc + rs[None, :] * w_sr + i * w_si
                         + j * w_sj, mask=c_ok[:, None] & r_ok[None, :], other=0.0)
            e = tl.dot(xt, wt, e, input_precision=PRECISION)
    e += tl.load(b_ptr + rs, mask=r_ok, other=0.0)[None, :]
    e = _apply(e, ACT)
    at = n.to(tl.int64) * u_sn + iy.to(tl.int64) * u_sh + ix.to(tl.int64) * u_sw
    tl.store(u_ptr + at[:, None] + rs.to(tl.int64)[None, :], e,
             mask=ok[:, None] & r_ok[None, :])


def _middle(u_ptr, k_ptr, n, iy0, ix0, ok, rs, r_ok, H, W, R,
            u_sn, u_sc, u_sh, u_sw, k_so, k_si, k_sh, k_sw,
            KS: tl.constexpr, DEPTHWISE: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The middle conv's output channels ``rs`` at the pixels whose windows start at (iy0,
    ix0) (float32, before its bias)."""
    mid = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    img = n.to(tl.int64) * u_sn
    offs_c = tl.arange(0, BLOCK_C)
    for tap in range(KS * KS):
        i = tap // KS
        j = tap - i * KS
        iy = iy0 + i
        ix = ix0 + j
        okt = ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        pix = img + iy.to(tl.int64) * u_sh + ix.to(tl.int64) * u_sw
        if DEPTHWISE:
            ut = tl.load(u_ptr + pix[:, None] + rs.to(tl.int64)[None, :] * u_sc,
                         mask=okt[:, None] & r_ok[None, :], other=0.0)
            kt = tl.load(k_ptr + rs * k_so + i * k_sh + j * k_sw, mask=r_ok, other=0.0)
            mid += ut * kt[None, :]
        else:
            for c0 in range(0, R, BLOCK_C):
                cs = c0 + offs_c
                c_ok = cs < R
                ut = tl.load(u_ptr + pix[:, None] + cs.to(tl.int64)[None, :] * u_sc,
                             mask=okt[:, None] & c_ok[None, :], other=0.0)
                kt = tl.load(k_ptr + cs[:, None] * k_si + rs[None, :] * k_so + i * k_sh
                             + j * k_sw, mask=c_ok[:, None] & r_ok[None, :], other=0.0)
                mid = tl.dot(ut, kt, mid, input_precision=PRECISION)
    return mid


if AVAILABLE:
    _middle = triton.jit(_middle)


def _tile_kernel(
    u_ptr, k_ptr, b2_ptr, w3_ptr, b3_ptr, y_ptr, order_ptr,
    P, GH, GW, H, W, OH, OW, R, O, S, ST, PAD,
    u_sn, u_sc, u_sh, u_sw, k_so, k_si, k_sh, k_sw, w3_so, w3_sr,
    y_sn, y_sc, y_sh, y_sw,
    KS: tl.constexpr, DEPTHWISE: tl.constexpr, LAST: tl.constexpr, HAS_B3: tl.constexpr,
    ACT: tl.constexpr, ADD: tl.constexpr, PRECISION: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """y[n, o, oy, ox] += (last conv of) act(middle conv of u + bias2) at the kept tiles'
    output pixels (``ADD`` False: y = ...)."""
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    if tl.load(order_ptr + (pid_p * BLOCK_P) // (S * S)) < 0:
        return      # past the kept tiles
    q = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    q_ok = q < P
    p = q % (S * S)
    n, ty, tx, q_ok = _tile_of(order_ptr, q, q_ok, S * S, GH, GW)
    oy = ty * S + p // S
    ox = tx * S + p % S
    ok = q_ok & (oy < OH) & (ox < OW)
    iy0 = oy * ST - PAD
    ix0 = ox * ST - PAD
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < O
    if LAST:
        acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            r_ok = rs < R
            mid = _middle(u_ptr, k_ptr, n, iy0, ix0, ok, rs, r_ok, H, W, R,
                          u_sn, u_sc, u_sh, u_sw, k_so, k_si, k_sh, k_sw,
                          KS, DEPTHWISE, PRECISION, BLOCK_P, BLOCK_R, BLOCK_C)
            mid += tl.load(b2_ptr + rs, mask=r_ok, other=0.0)[None, :]
            mid = _apply(mid, ACT)
            wt = tl.load(w3_ptr + rs[:, None] * w3_sr + offs_o[None, :] * w3_so,
                         mask=r_ok[:, None] & o_ok[None, :], other=0.0)  # rows past R: 0
            acc = tl.dot(mid, wt, acc, input_precision=PRECISION)
        if HAS_B3:
            acc += tl.load(b3_ptr + offs_o, mask=o_ok, other=0.0)[None, :]
    else:  # the output channels are the middle conv's
        acc = _middle(u_ptr, k_ptr, n, iy0, ix0, ok, offs_o, o_ok, H, W, R,
                      u_sn, u_sc, u_sh, u_sw, k_so, k_si, k_sh, k_sw,
                      KS, DEPTHWISE, PRECISION, BLOCK_P, BLOCK_O, BLOCK_C)
        acc += tl.load(b2_ptr + offs_o, mask=o_ok, other=0.0)[None, :]
        acc = _apply(acc, ACT)
    at = (n.to(tl.int64) * y_sn + oy.to(tl.int64) * y_sh + ox.to(tl.int64) * y_sw)[:, None] \
        + offs_o.to(tl.int64)[None, :] * y_sc
    mask = ok[:, None] & o_ok[None, :]
    if ADD:
        acc += tl.load(y_ptr + at, mask=mask, other=0.0)
    tl.store(y_ptr + at, acc, mask=mask)


_KERNELS: dict[tuple[str, bool], Any] = {}


def prune_tile_configs(configs, named_args, **kwargs):
    """The tile kernel's configurations worth timing for a problem: with the last conv,
    those whose output block covers every output (else each block would compute the
    middle conv again); without, none whose output or hidden block is much wider than the
    channels it covers; the smallest where none is left."""
    args = {**named_args, **kwargs}
    o_cap = max(16, triton.next_power_of_2(args["O"]))
    r_cap = max(16, triton.next_power_of_2(args["R"]))
    if args["LAST"]:
        kept = [c for c in configs if c.kwargs["BLOCK_O"] >= args["O"]
                and c.kwargs["BLOCK_R"] <= r_cap]
    else:
        kept = [c for c in configs if c.kwargs["BLOCK_O"] <= o_cap]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_O"])]


def _kernel(name: str, interpret: bool):
    """The jitted kernel ``name``, built on first use: plain under the interpreter, the
    tile kernel autotuned over :data:`TILE_CONFIGS` on a GPU (it adds into its output:
    the autotuner restores it after each timing); sizes as plain ints (one binary for
    every map size and tile count)."""
    if (name, interpret) not in _KERNELS:
        fn, generic = {
            "first": (_first_kernel, ("P", "GH", "GW", "H", "W", "XH", "XW", "S", "SIDE",
                                      "ST", "PAD", "x_sn", "x_sh", "x_sw", "u_sn", "u_sh",
                                      "u_sw")),
            "tiles": (_tile_kernel, ("P", "GH", "GW", "H", "W", "OH", "OW", "S", "ST",
                                     "PAD", "u_sn", "u_sh", "u_sw", "y_sn", "y_sh",
                                     "y_sw")),
        }[name]
        jitted = triton.jit(fn, do_not_specialize=generic)
        if name == "tiles" and not interpret:
            jitted = triton.autotune(
                configs=[triton.Config({"BLOCK_P": p, "BLOCK_R": r, "BLOCK_C": c,
                                        "BLOCK_O": o}, num_warps=w)
                         for p, r, c, o, w in TILE_CONFIGS],
                key=["R", "O", "S", "ST", "KS", "DEPTHWISE", "LAST", "ACT", "ADD",
                     "PRECISION"],
                prune_configs_by={"early_config_prune": prune_tile_configs},
                restore_value=["y_ptr"])(jitted)
        _KERNELS[name, interpret] = jitted
    return _KERNELS[name, interpret]



def _act_name(act: str | None) -> str:
    if act not in ACTIVATIONS:
        raise ConvgapError(f"unknown activation {act!r}: use one of "
                           f"{', '.join(str(a) for a in ACTIVATIONS)}")
    return "none" if act is None else act


def _check(x: torch.Tensor, out: torch.Tensor, body: Body) -> None:
    _check_operands(x, out=out, **{f: t for f in ("w1", "b1", "w2", "b2", "w3", "b3")
                                   if (t := getattr(body, f)) is not None})
    if x.dtype != torch.float32:
        raise ConvgapError(f"the sparse tile kernels take float32 tensors, got {x.dtype}")
    _act_name(body.act1), _act_name(body.act2)
    r = body.w2.shape[0]
    c = r if body.w1 is None else body.w1.shape[1]
    (h, w), (oh, ow) = body.sizes(tuple(x.shape[-2:]))
    if x.dim() != 4 or x.shape[1] != c:
        raise ConvgapError(f"x must be (N, {c}, H, W), got {tuple(x.shape)}")
    if tuple(out.shape) != (x.shape[0], body.out_channels(), oh, ow):
        raise ConvgapError(f"out must have shape {(x.shape[0], body.out_channels(), oh, ow)}"
                           f" (the body's output), got {tuple(out.shape)}")


def kept_order(keep: torch.Tensor) -> torch.Tensor:
    """(T,) int32 for a keep grid of T cells: the flat indices of its nonzero cells in
    ascending order, then -1 for the rest (``torch.nonzero_static``'s answer), from device
    ops that read nothing back to the host (a cumulative sum and a scatter), so a CUDA
    graph can capture it."""
    flat = keep.reshape(-1) != 0
    t = flat.numel()
    dst = torch.where(flat, torch.cumsum(flat, 0) - 1, t)    # the dropped go to slot t
    order = torch.full((t + 1,), -1, dtype=torch.int32, device=keep.device)
    order.scatter_(0, dst, torch.arange(t, dtype=torch.int32, device=keep.device))
    return order[:t]


def residual_tiles(x: torch.Tensor, out: torch.Tensor, keep: torch.Tensor,
                   granularity: int, body: Body) -> torch.Tensor:
    """``out[n, :, ty S:(ty + 1) S, tx S:(tx + 1) S] += body(x)[same]`` for each tile (n,
    ty, tx) where ``keep[n, ty, tx]`` is nonzero (S = ``granularity``), in place; returns
    ``out``. Nothing is read back to the host: the call can be captured in a CUDA graph.

    x: (N, C, H, W) float32 CUDA tensor (CPU under the interpreter), any strides; out: the
    body's output (N, O, OH, OW), any strides (modified in place); keep: (N, ceil(OH / S),
    ceil(OW / S)) on x's device, any dtype; body: a
    :class:`~convgap.kernels.cpu.tiles.Body`.
    Raises ConvgapError on bad operands; RuntimeError where the kernels cannot run (see
    :func:`runnable`)."""
    _check(x, out, body)
    s = int(granularity)
    if s < 1:
        raise ConvgapError(f"granularity must be >= 1, got {granularity}")
    (h, w), (oh, ow) = body.sizes(tuple(x.shape[-2:]))
    gh, gw = -(-oh // s), -(-ow // s)
    if tuple(keep.shape) != (x.shape[0], gh, gw) or keep.device != x.device:
        raise ConvgapError(f"keep must be the ({x.shape[0]}, {gh}, {gw}) grid of {s} x {s} "
                           f"tiles on {x.device}, got {tuple(keep.shape)} on {keep.device}")
    if not runnable(x):
        raise RuntimeError("the sparse tile kernels need triton and a CUDA tensor (or "
                           "TRITON_INTERPRET=1 set before triton is imported, on CPU)")
    if not keep.numel():
        return out
    zeros = torch.zeros(body.w2.shape[0], device=x.device)
    body = body._replace(b1=body.b1 if body.b1 is not None or body.w1 is None else zeros,
                         b2=body.b2 if body.b2 is not None else zeros)
    order = kept_order(keep)
    interpret = interpreting()
    first_cfg = dict(INTERPRET_CONFIG) if interpret else dict(FIRST_CONFIG)
    first_warps = {} if interpret else {"num_warps": first_cfg.pop("num_warps")}
    tile_cfg = dict(INTERPRET_CONFIG) if interpret else {}     # else: the autotuner's
    r, ks, st = body.w2.shape[0], body.w2.shape[2], body.stride
    pad = ks // 2
    src = x
    if body.w1 is not None:    # launch 1: u at the kept tiles' windows
        w1 = body.w1 if body.w1.dim() == 4 else body.w1[:, :, None, None]
        k1 = w1.shape[2]
        side = (s - 1) * st + ks
        u = torch.empty(x.shape[0], h, w, r, device=x.device)
        p = len(order) * side * side
        grid1 = (triton.cdiv(p, first_cfg["BLOCK_P"]), triton.cdiv(r, first_cfg["BLOCK_R"]))
        _kernel("first", interpret)[grid1](
            x, w1, body.b1, u, order, p, gh, gw, h, w, x.shape[2], x.shape[3], x.shape[1],
            r, s, side, st, pad, *x.stride(), *w1.stride(), u.stride(0), u.stride(1),
            u.stride(2), ST1=body.stride1, K1=k1, ACT=_act_name(body.act1),
            PRECISION=dot_precision(x), **first_cfg, **first_warps)
        src = u.permute(0, 3, 1, 2)     # (N, R, H, W) view
    o = body.out_channels()
    tiles_kernel = _kernel("tiles", interpret)

    def launch(src, k, b, y, depthwise, st, pad, act, add, w3=None, b3=None):
        """The tile kernel: y (+)= [w3 x] act(k * src + b) at the kept tiles' pixels, k
        (R', R or 1, ks, ks) the middle conv, w3 (O', R') the last."""
        chans = k.shape[0] if w3 is None else w3.shape[0]
        w3s = w3.stride() if w3 is not None else (0, 0)
        p = len(order) * s * s

        def grid(meta):
            return triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(chans, meta["BLOCK_O"])
        tiles_kernel[grid](
            src, k, b, k if w3 is None else w3, b if b3 is None else b3, y, order, p, gh,
            gw, src.shape[2], src.shape[3], oh, ow, k.shape[0] if depthwise else k.shape[1],
            chans, s, st, pad, *src.stride(), *k.stride(), *w3s, *y.stride(),
            KS=k.shape[2], DEPTHWISE=depthwise, LAST=w3 is not None,
            HAS_B3=b3 is not None, ACT=act, ADD=add, PRECISION=dot_precision(x),
            **tile_cfg)

    act2, dw = _act_name(body.act2), body.depthwise()
    if body.w3 is None:         # launch 2: the middle conv is the body's output
        launch(src, body.w2, body.b2, out, dw, st, pad, act2, True)
    elif o <= (tile_cfg["BLOCK_O"] if interpret else LAST_FUSED_MAX):
        # launch 2: middle and last conv in one (one output block: see prune_tile_configs)
        launch(src, body.w2, body.b2, out, dw, st, pad, act2, True, body.w3, body.b3)
    else:
        # more than one output block would each compute the middle conv again (4x its
        # work for a bottleneck's 4R outputs): launch 2 stores it at the kept pixels
        # (R channels), launch 3 runs the last conv there as a 1x1 tile conv
        v = torch.empty(x.shape[0], oh, ow, r, device=x.device).permute(0, 3, 1, 2)
        launch(src, body.w2, body.b2, v, dw, st, pad, act2, False)
        launch(v, body.w3[:, :, None, None],
               body.b3 if body.b3 is not None else torch.zeros(o, device=x.device),
               out, False, 1, 0, "none", True)
    return out
