"""Winograd minimal-filtering convolution: F(2x2, 3x3) and F(4x4, 3x3) (Lavin & Gray 2015).

For an output tile of m x m pixels and a 3x3 filter, Winograd's algorithm reads an
alpha x alpha input tile d (alpha = m + 2) and computes

    Y = A^T [ (G g G^T) (.) (B^T d B) ] A

so a whole tile costs alpha^2 multiplications per (input, output) channel pair instead of
9 m^2: 16 instead of 36 for F(2x2,3x3) (2.25x fewer), 36 instead of 144 for F(4x4,3x3) (4x
fewer). Summing over input channels turns the element-wise product into alpha^2 independent
GEMMs ``M[a] = V[a] @ U[a]`` of shape (tiles x C) @ (C x O), done here as ONE ``torch.bmm``.

Pipeline of :meth:`_Winograd.run` (pure torch ops, no loops over pixels or channels):

1. zero-pad ``x`` into an NHWC buffer (one copy, also for NCHW inputs: tiles x channels GEMM
   operands measured faster than channels x tiles ones) whose height / width are
   ``m * tiles + 2``: the bottom / right get the extra zeros of a last partial tile;
2. input transform V = B^T d B of every tile and channel, separably: B^T along H as
   element-wise combinations of the alpha strided row slices of the buffer (common
   subexpressions shared, results written in place), then B along W the same way, straight
   into the GEMM operand V (alpha^2, tiles, C) -- no gathered copy of the overlapping tiles;
3. the alpha^2 GEMMs (tiles x C) @ (C x O) as ONE ``torch.bmm``, tiles of all images together;
4. output transform A^T M A: one GEMM with A^T over the row frequencies, one ``bmm`` over the
   column frequencies;
5. re-assembly of the m x m tiles into the (cropped) output with the bias added, one strided
   pass (plus one per partial tile row / column). The output is channels_last when the input
   was, NCHW otherwise.

Scratch buffers of the eager path (padding buffer, row-transformed rows, V, M, the
transformed outputs) are kept per thread and reused by the next call with the same shapes
(LRU, at most 256 MiB per thread; :func:`clear_workspace` frees them): fresh multi-MB
temporaries page-fault on every call with glibc malloc, which cost 2x on a 64-channel
56x56 layer at batch 8. The padding buffer's zero border then needs no refill.

When autograd records a graph, or under jit.trace / ONNX export / torch.compile, step 2 is
instead a gather of the tiles (alpha^2 strided slices, stacked) and one GEMM with
kron(B^T, B^T), and step 5 a permute/reshape/crop, all out-of-place (in-place ``out=`` ops
cannot be differentiated); same numbers up to rounding.

Matrices (standard Lavin-Gray). F(2x2,3x3) uses interpolation points 0, 1, -1 (and infinity);
F(4x4,3x3) uses 0, 1, -1, 2, -2 (and infinity). The filter transform is computed in float64
and cast to the compute dtype; the B^T and A^T entries are small integers (exact in any
float type). bfloat16 / float16 inputs are computed in float32 and only the output is
rounded back (F(4x4,3x3) entirely in bfloat16 is ~10% off).

Accuracy (fp32; max |y - ref| / max |ref|; 2 x 20 x 20 inputs, 64 outputs, C = 16 ... 512,
normal / ReLU / uniform / DC-dominated / heavy-tailed inputs and weights; also C = 1024, 2048):
F(2x2,3x3) <= 6e-7 against a float64 reference (<= 5e-6 against fp32 ``F.conv2d``, which
itself is ~3e-6 off); F(4x4,3x3) <= 9.2e-6 against float64, <= 1.5e-5 against fp32
``F.conv2d``. Its larger transform entries (5 in B^T, 8 in A^T) cost ~20x F(2x2,3x3)'s error
but stay an order of magnitude inside the 1e-4 tolerance both are given.

Why only 3x3 / stride 1 / dilation 1 / groups 1: the tile algebra is derived for a dense 3x3
correlation with unit stride; a strided or dilated convolution is not a sliding-window
product of one 3x3 filter over contiguous pixels, and grouped / depthwise layers have too
little channel reduction per tile to amortise the transforms (they are memory bound).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from fractions import Fraction as Fr

import torch
import torch.nn.functional as F

from ..ops.guard import jit_tracing, may_run_fast
from ..ops.layouts import channels_last
from .registry import Algorithm, register
from .spec import ConvSpec

__all__ = ["WinogradF2", "WinogradF4", "winograd_matrices", "clear_workspace"]

# --- the standard Lavin-Gray matrices (exact rationals) ---------------------------------
_MATRICES = {
    2: dict(
        BT=[[1, 0, -1, 0],
            [0, 1, 1, 0],
            [0, -1, 1, 0],
            [0, 1, 0, -1]],
        G=[[1, 0, 0],
           [Fr(1, 2), Fr(1, 2), Fr(1, 2)],
           [Fr(1, 2), Fr(-1, 2), Fr(1, 2)],
           [0, 0, 1]],
        AT=[[1, 1, 1, 0],
            [0, 1, -1, -1]],
    ),
    4: dict(  # interpolation points 0, 1, -1, 2, -2, infinity
        BT=[[4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1]],
        G=[[Fr(1, 4), 0, 0],
           [Fr(-1, 6), Fr(-1, 6), Fr(-1, 6)],
           [Fr(-1, 6), Fr(1, 6), Fr(-1, 6)],
           [Fr(1, 24), Fr(1, 12), Fr(1, 6)],
           [Fr(1, 24), Fr(-1, 12), Fr(1, 6)],
           [0, 0, 1]],
        AT=[[1, 1, 1, 1, 1, 0],
            [0, 1, -1, 2, -2, 0],
            [0, 1, 1, 4, 4, 0],
            [0, 1, -1, 8, -8, 1]],
    ),
}


def winograd_matrices(m: int) -> dict[str, torch.Tensor]:
    """The float64 matrices ``BT`` (alpha x alpha), ``G`` (alpha x 3), ``AT`` (m x alpha) of
    F(m x m, 3x3), m in (2, 4)."""
    return {k: torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)
            for k, rows in _MATRICES[m].items()}


_CONSTS: dict[tuple, dict[str, torch.Tensor]] = {}


def _consts(m: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """BT, AT and kron(BT, BT), kron(AT, AT) of F(m x m, 3x3) in ``dtype`` on ``device``."""
    key = (m, dtype, device)
    hit = _CONSTS.get(key)
    if hit is None:
        mats = winograd_matrices(m)
        hit = {"BT": mats["BT"].to(device, dtype), "AT": mats["AT"].to(device, dtype),
               "KB": torch.kron(mats["BT"], mats["BT"]).to(device, dtype),
               "KA": torch.kron(mats["AT"], mats["AT"]).to(device, dtype)}
        if not jit_tracing():  # a trace must record the same ops on every call
            _CONSTS[key] = hit
    return hit


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types run in float32: the transforms amplify rounding (F(4x4,3x3) in bfloat16
    would be ~10% off); only the output is rounded back."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class _Workspace(threading.local):
    """Per-thread scratch buffers of the eager path, reused across calls (LRU, at most
    ``limit`` bytes). Fresh multi-MB temporaries cost a page fault per 4 KiB on every call
    with glibc malloc (it hands big blocks back to the OS): ~5000 faults, 2x the run time of
    a 64-channel 56x56 layer at batch 8. ``nbytes`` is kept as buffers come and go, so a
    lookup costs the same with 10 buffers as with 1000 (summing them on every lookup made a
    swapped model 2.7x slower once a long-lived process had cached a few hundred shapes)."""

    limit = 256 * 2**20

    def __init__(self) -> None:
        self.buffers: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.nbytes = 0

    def get(self, tag: str, shape: tuple[int, ...], like: torch.Tensor,
            zero: bool = False) -> torch.Tensor:
        """A contiguous buffer for ``tag`` of ``shape`` (zero-filled when ``zero`` and newly
        made; a reused one holds what the last call left in it)."""
        key = (tag, tuple(shape), like.dtype, like.device, torch.is_inference_mode_enabled())
        buf = self.buffers.get(key)
        if buf is not None:
            self.buffers.move_to_end(key)
            return buf
        buf = like.new_zeros(shape) if zero else like.new_empty(shape)
        self.buffers[key] = buf
        self.nbytes += buf.numel() * buf.element_size()
        while self.nbytes > self.limit and len(self.buffers) > 1:
            _, old = self.buffers.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()
        return buf

    def clear(self) -> None:
        self.buffers.clear()
        self.nbytes = 0


_WORKSPACE = _Workspace()


def clear_workspace() -> None:
    """Free this thread's cached Winograd scratch buffers (at most 256 MiB per thread)."""
    _WORKSPACE.clear()


# --- element-wise input transforms B^T d along one axis (common subexpressions shared) ---
def _bt2(d: list[torch.Tensor], out: list[torch.Tensor], tmp: torch.Tensor | None) -> None:
    torch.sub(d[0], d[2], out=out[0])
    torch.add(d[1], d[2], out=out[1])
    torch.sub(d[2], d[1], out=out[2])
    torch.sub(d[1], d[3], out=out[3])


def _bt4(d: list[torch.Tensor], out: list[torch.Tensor], tmp: torch.Tensor | None) -> None:
    """``tmp``: scratch shaped like one d[j]; out[4] / out[5] double as scratch."""
    torch.add(d[4], d[2], alpha=-5, out=out[0]).add_(d[0], alpha=4)       # 4d0 - 5d2 + d4
    torch.add(d[1], d[2], out=tmp)
    torch.add(d[3], d[4], out=out[1]).add_(tmp, alpha=-4)                 # d3 + d4 - 4(d1 + d2)
    torch.sub(d[1], d[2], out=tmp)
    torch.sub(d[4], d[3], out=out[2]).add_(tmp, alpha=4)                  # d4 - d3 + 4(d1 - d2)
    e, f = torch.sub(d[4], d[2], out=out[4]), torch.sub(d[3], d[1], out=out[5])
    torch.add(e, f, alpha=2, out=out[3])                                  # d4 - d2 + 2(d3 - d1)
    e.add_(f, alpha=-2)                                                   # d4 - d2 - 2(d3 - d1)
    torch.add(d[5], d[3], alpha=-5, out=out[5]).add_(d[1], alpha=4)       # 4d1 - 5d3 + d5


_BT_ELEMENTWISE = {2: _bt2, 4: _bt4}


def assemble_tiles(y6: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """Write tiles ``y6`` (m, m, N, tH, tW, O) -- pixel (p, q) of tile (n, th, tw) -- into
    ``out`` (N, OH, OW, O) (any strides, OH <= tH*m, OW <= tW*m), adding ``bias``.

    Full tiles go in one strided op; a last partial tile row / column (output size not a
    multiple of m) in one more op each."""
    m = y6.shape[0]
    _, oh, ow, _ = out.shape
    rows = [(0, oh // m, m)] + ([(oh // m, 1, oh % m)] if oh % m else [])
    cols = [(0, ow // m, m)] + ([(ow // m, 1, ow % m)] if ow % m else [])
    for t0, nt, pr in rows:
        if nt == 0:
            continue
        dst_r = out[:, t0 * m:t0 * m + nt * pr].unflatten(1, (nt, pr))
        for u0, nu, qc in cols:
            if nu == 0:
                continue
            dst = dst_r[:, :, :, u0 * m:u0 * m + nu * qc].unflatten(3, (nu, qc))
            src = y6[:pr, :qc, :, t0:t0 + nt, u0:u0 + nu].permute(2, 3, 0, 4, 1, 5)
            if bias is None:
                dst.copy_(src)
            else:
                torch.add(src, bias, out=dst)


class _Winograd(Algorithm):
    """F(m x m, 3x3) Winograd convolution (see the module docstring)."""

    m: int = 2

    def supports(self, spec: ConvSpec) -> str | None:
        if spec.kernel_size != (3, 3):
            return f"Winograd F({self.m}x{self.m},3x3) is derived for 3x3 kernels only"
        if spec.stride != (1, 1):
            return "Winograd needs stride 1 (a strided conv is not one sliding 3x3 window)"
        if spec.dilation != (1, 1):
            return "Winograd needs dilation 1 (the tile algebra assumes adjacent pixels)"
        if spec.groups != 1:
            return ("Winograd runs dense (groups=1) convolutions only: grouped / depthwise "
                    "layers have too little channel reduction to amortise the transforms")
        return spec.empty_output() or spec.not_floating("Winograd")

    def prepare(self, weight, bias, spec):
        """Filter transform U = G g G^T in float64, stored as (alpha^2, C, O) in the compute
        dtype (index a = i * alpha + k for row frequency i, column frequency k)."""
        g = winograd_matrices(self.m)["G"].to(weight.device)
        alpha = self.m + 2
        o, c = weight.shape[:2]
        u = torch.einsum("ij,ocjl,kl->ikco", g, weight.to(torch.float64), g)
        u = u.reshape(alpha * alpha, c, o).to(_compute_dtype(weight.dtype))
        return u, bias

    def run(self, x, state, spec):
        u, bias = state
        m, alpha = self.m, self.m + 2
        n, c, h, w = x.shape
        ph, pw = spec.padding
        oh, ow = h + 2 * ph - 2, w + 2 * pw - 2
        th, tw = (oh + m - 1) // m, (ow + m - 1) // m
        out_dtype = x.dtype
        x = x.to(u.dtype)
        o = u.shape[2]
        cl = channels_last(x)
        # the in-place / out= steps into reused buffers where no autograd graph is recorded
        # and no graph is traced, exported or compiled (those get the functional steps)
        eager = may_run_fast(x, (u, bias))
        # 1. zero-padded NHWC copy, extra zeros bottom/right for a last partial tile (NHWC
        # for NCHW inputs too: (tiles x C) GEMM operands measured faster than (C x tiles));
        # 2. input transform V = B^T d B of every tile and channel: (a^2, tiles, C);
        # 3. the alpha^2 GEMMs (tiles x C) @ (C x O) in one call, tiles of all images;
        # 4. output transform A^T M A: A^T along i (one GEMM), then along k (one bmm)
        hp, wp = th * m + 2, tw * m + 2
        at = _consts(m, x.dtype, x.device)["AT"]
        tiles = n * th * tw
        if not eager:
            xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, wp - w - pw, ph, hp - h - ph))
            v = self._input_gemm(xp, th, tw)
            mm = torch.bmm(v, u)
            y = torch.mm(at, mm.view(alpha, -1)).view(m, alpha, -1)
            y = torch.bmm(at.expand(m, m, alpha), y)
        else:  # same steps, into reused per-thread buffers
            ws = _WORKSPACE
            # the zero border of a reused padding buffer is still zero: copy the interior
            xp = ws.get(f"xp{ph},{pw},{h},{w}", (n, hp, wp, c), x, zero=True)
            xp[:, ph:ph + h, pw:pw + w].copy_(x.permute(0, 2, 3, 1))
            v = self._input_elementwise(xp, th, tw, ws)
            mm = torch.bmm(v, u, out=ws.get("mm", (alpha * alpha, tiles, o), x))
            y = torch.mm(at, mm.view(alpha, -1), out=ws.get("y1", (m, alpha * tiles * o), x))
            y = torch.bmm(at.expand(m, m, alpha), y.view(m, alpha, -1),
                          out=ws.get("y", (m, m, tiles * o), x))
        y6 = y.view(m, m, n, th, tw, o)
        # 5. re-assemble (and crop) the tiles, adding the bias
        if not eager:
            full = y6.permute(2, 3, 0, 4, 1, 5).reshape(n, th * m, tw * m, o)[:, :oh, :ow]
            if bias is not None:
                full = full + bias
            res = full.permute(0, 3, 1, 2).to(out_dtype)
            if cl:
                return res.contiguous(memory_format=torch.channels_last)
            return res.contiguous()
        if cl:
            out = x.new_empty((n, oh, ow, o), dtype=out_dtype)
            res = out.permute(0, 3, 1, 2)
        else:
            res = x.new_empty((n, o, oh, ow), dtype=out_dtype)
            out = res.permute(0, 2, 3, 1)
        assemble_tiles(y6, bias, out)
        return res

    def _input_gemm(self, xp, th, tw):
        """Gather the overlapping tiles tap-major (alpha^2 strided slices of the NHWC buffer
        ``xp``, stacked: one copy), then B^T d B as one GEMM with kron(B^T, B^T). Purely
        functional: autograd, jit.trace, ONNX export (slices, not Tensor.unfold), compile."""
        m, alpha = self.m, self.m + 2
        n, c = xp.shape[0], xp.shape[3]
        kb = _consts(m, xp.dtype, xp.device)["KB"]
        d = torch.stack([xp[:, j:j + m * th:m, l:l + m * tw:m]
                         for j in range(alpha) for l in range(alpha)])
        # reshape: torch.stack may return a non-contiguous result when sizes are 1 (seen on
        # a 1-channel 2x1 input), where view would raise
        return torch.mm(kb, d.reshape(alpha * alpha, -1)).view(alpha * alpha, n * th * tw, c)

    def _input_elementwise(self, xp, th, tw, ws):
        """B^T along H from the alpha strided row slices of the NHWC buffer ``xp``, then B
        along W, as element-wise ops written in place into the GEMM operand (no tile
        gather; eager only; buffers from workspace ``ws``)."""
        m, alpha = self.m, self.m + 2
        n, _, wp, c = xp.shape
        bt = _BT_ELEMENTWISE[m]
        r = ws.get("r", (alpha, n, th, wp, c), xp)
        tmp = ws.get("tmp_r", (n, th, wp, c), xp) if m == 4 else None
        bt([xp[:, j:j + m * th:m] for j in range(alpha)], list(r), tmp)
        v = ws.get("v", (alpha, alpha, n, th, tw, c), xp)
        tmp = ws.get("tmp_v", (alpha, n, th, tw, c), xp) if m == 4 else None
        bt([r[:, :, :, l:l + m * tw:m] for l in range(alpha)], list(v.transpose(0, 1)), tmp)
        return v.view(alpha * alpha, n * th * tw, c)


@register("winograd_f2")
class WinogradF2(_Winograd):
    """Winograd F(2x2, 3x3): 2.25x fewer multiplications than direct 3x3 convolution;
    fp32 error no larger than direct convolution's (measured <= 6e-7 vs float64)."""

    m = 2
    tolerance = 1e-4


@register("winograd_f4")
class WinogradF4(_Winograd):
    """Winograd F(4x4, 3x3): 4x fewer multiplications than direct 3x3 convolution; its
    larger transforms cost accuracy (fp32 error measured <= 1.5e-5 relative, C up to 2048;
    tolerance 1e-4)."""

    m = 4
    tolerance = 1e-4
