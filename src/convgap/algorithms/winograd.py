"""Winograd minimal-filtering convolution: F(2x2, 3x3) and F(4x4, 3x3) (Lavin & Gray 2015).

For an output tile of m x m pixels and a 3x3 filter, Winograd's algorithm reads an
alpha x alpha input tile d (alpha = m + 2) and computes

    Y = A^T [ (G g G^T) (.) (B^T d B) ] A

so a whole tile costs alpha^2 multiplications per (input, output) channel pair instead of
9 m^2: 16 instead of 36 for F(2x2,3x3) (2.25x fewer), 36 instead of 144 for F(4x4,3x3) (4x
fewer). Summing over input channels turns the element-wise product into alpha^2 independent
GEMMs ``M[a] = V[a] @ U[a]`` of shape (tiles x C) @ (C x O), done here as ONE ``torch.bmm``.

Pipeline of :meth:`_Winograd.run` (pure torch ops: autograd and torch.compile work):

1. zero-pad ``x`` into an NHWC buffer whose height/width are ``m * tiles + 2`` (the bottom /
   right get the extra zeros needed when the output size is not a multiple of m);
2. view the overlapping alpha x alpha tiles (``Tensor.unfold`` twice, stride m) and gather
   them, tap-major, into a (alpha^2, tiles * C) matrix -- the only input copy;
3. input transform ``B^T d B`` for all tiles and channels as one small GEMM with
   ``kron(B^T, B^T)`` (alpha^2 x alpha^2);
4. the alpha^2 batched GEMMs (one ``torch.bmm``), tiles flattened together with the batch;
5. output transform ``A^T m A`` as one GEMM with ``kron(A^T, A^T)`` (m^2 x alpha^2);
6. re-assembly of the m x m tiles into the (cropped) output, with the bias added in the same
   pass. The output is channels_last when the input was, NCHW otherwise.

Matrices (standard Lavin-Gray). F(2x2,3x3) uses interpolation points 0, 1, -1 (and infinity);
F(4x4,3x3) uses 0, 1, -1, 2, -2 (and infinity). The filter transform is computed in float64
and cast to the input dtype; the constant transform matrices are exact in any float type
(their entries are small integers), so the only rounding is in the GEMMs.

Accuracy (fp32; max |y - ref| / max |ref| against ``F.conv2d``, random normal inputs and
``nn.Conv2d`` default init, C up to 512, measured by ``python -m convgap.algorithms.winograd``):
F(2x2,3x3) stays below ~3e-6, tolerance 1e-4; F(4x4,3x3) stays below ~1e-4 (its B^T / A^T
entries reach 5 and 8, which amplifies the rounding of the transformed values); its tolerance
is set to 5e-4.

Why only 3x3 / stride 1 / dilation 1 / groups 1: the tile algebra is derived for a dense 3x3
correlation with unit stride; a strided or dilated convolution is not a sliding-window
product of one 3x3 filter over contiguous pixels, and grouped / depthwise layers have too
little channel reduction per tile to amortise the transforms (they are memory bound).
"""

from __future__ import annotations

from fractions import Fraction as Fr

import torch
import torch.nn.functional as F

from .registry import Algorithm, register
from .spec import ConvSpec

__all__ = ["WinogradF2", "WinogradF4", "winograd_matrices"]

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


_INTERNAL: str | None = None  # benchmark override: 'nhwc' / 'nchw'

_CONSTS: dict[tuple, dict[str, torch.Tensor]] = {}


def _consts(m: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """BT, AT and kron(BT, BT), kron(AT, AT) of F(m x m, 3x3) in ``dtype`` on ``device``."""
    key = (m, dtype, device)
    hit = _CONSTS.get(key)
    if hit is None:
        mats = winograd_matrices(m)
        hit = _CONSTS[key] = {
            "BT": mats["BT"].to(device, dtype), "AT": mats["AT"].to(device, dtype),
            "KB": torch.kron(mats["BT"], mats["BT"]).to(device, dtype),
            "KA": torch.kron(mats["AT"], mats["AT"]).to(device, dtype)}
    return hit


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types run in float32: the transforms amplify rounding (F(4x4,3x3) in bfloat16
    would be ~10% off); only the output is rounded back."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _eager(*tensors: torch.Tensor | None) -> bool:
    """True when the fast in-place / ``out=`` path may run: no autograd graph to record, not
    tracing / exporting / compiling (those get the purely functional path)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return False
    compiler = getattr(torch, "compiler", None)
    return not (compiler is not None and compiler.is_compiling())


# --- element-wise input transforms B^T d along one axis (common subexpressions shared) ---
def _bt2(d: list[torch.Tensor], out: list[torch.Tensor]) -> None:
    torch.sub(d[0], d[2], out=out[0])
    torch.add(d[1], d[2], out=out[1])
    torch.sub(d[2], d[1], out=out[2])
    torch.sub(d[1], d[3], out=out[3])


def _bt4(d: list[torch.Tensor], out: list[torch.Tensor]) -> None:
    torch.add(d[4], d[2], alpha=-5, out=out[0]).add_(d[0], alpha=4)       # 4d0 - 5d2 + d4
    s12 = d[1] + d[2]
    torch.add(d[3], d[4], out=out[1]).add_(s12, alpha=-4)                 # d3 + d4 - 4(d1 + d2)
    s12 = torch.sub(d[1], d[2], out=s12)
    torch.sub(d[4], d[3], out=out[2]).add_(s12, alpha=4)                  # d4 - d3 + 4(d1 - d2)
    e, f = d[4] - d[2], d[3] - d[1]
    torch.add(e, f, alpha=2, out=out[3])                                  # d4 - d2 + 2(d3 - d1)
    torch.add(e, f, alpha=-2, out=out[4])                                 # d4 - d2 - 2(d3 - d1)
    torch.add(d[5], d[3], alpha=-5, out=out[5]).add_(d[1], alpha=4)       # 4d1 - 5d3 + d5


_BT_ELEMENTWISE = {2: _bt2, 4: _bt4}


def _empty(x: torch.Tensor, shape: tuple[int, ...], order: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised tensor of logical ``shape`` whose memory holds the dims in ``order``
    (outermost first)."""
    buf = x.new_empty([shape[i] for i in order])
    inverse = [order.index(i) for i in range(len(shape))]
    return buf.permute(inverse)


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
        _, _, oh, ow = spec.output_shape
        if oh < 1 or ow < 1:
            return "the output would be empty (input smaller than the kernel)"
        if spec.dtype not in ("float32", "float64", "bfloat16", "float16"):
            return f"Winograd needs a floating-point input, got {spec.dtype}"
        return None

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
        th, tw = -(-oh // m), -(-ow // m)
        hp, wp = th * m + 2, tw * m + 2
        out_dtype = x.dtype
        x = x.to(u.dtype)
        consts = _consts(m, x.dtype, x.device)
        o = u.shape[2]
        tiles = n * th * tw
        channels_last = not x.is_contiguous() and \
            x.is_contiguous(memory_format=torch.channels_last)
        # zero padding, with extra zeros bottom/right for a last partial tile
        pads = (pw, wp - w - pw, ph, hp - h - ph)
        if not _eager(x, u, bias):
            y = self._run_functional(x, u, bias, pads, consts, channels_last, oh, ow)
            return y.to(out_dtype)
        nhwc = channels_last if _INTERNAL is None else _INTERNAL == 'nhwc'
        if nhwc:
            xp = F.pad(x.permute(0, 2, 3, 1), (0, 0) + pads).permute(0, 3, 1, 2)
        else:
            xp = F.pad(x, pads)
        bt = _BT_ELEMENTWISE[m]
        # 1. row transform (B^T along H) straight from strided row slices of xp
        r = _empty(x, (alpha, n, c, th, wp), (0, 1, 3, 4, 2) if nhwc else (0, 1, 2, 3, 4))
        bt([xp[:, :, j:j + m * th:m] for j in range(alpha)], list(r))
        # 2. column transform (B along W) into V[i, k], laid out for the batched GEMM
        v = _empty(x, (alpha, alpha, n, c, th, tw),
                   (0, 1, 2, 4, 5, 3) if nhwc else (0, 1, 3, 2, 4, 5))
        bt([r[..., l:l + m * tw:m] for l in range(alpha)], list(v.transpose(0, 1)))
        # 3. alpha^2 GEMMs in one call, tiles of all images together
        if nhwc:
            vm = v.permute(0, 1, 2, 4, 5, 3).reshape(alpha * alpha, tiles, c)
            mm = torch.bmm(vm, u)                                        # a^2, tiles, O
        else:
            vm = v.permute(0, 1, 3, 2, 4, 5).reshape(alpha * alpha, c, tiles)
            mm = torch.bmm(u.transpose(1, 2), vm)                         # a^2, O, tiles
        # 4. output transform A^T M A: A^T along i (one GEMM), then along k (one bmm)
        at = consts["AT"]
        y = torch.mm(at, mm.view(alpha, -1)).view(m, alpha, -1)
        y = torch.bmm(at.expand(m, m, alpha), y)                          # p, q, ...
        if nhwc:
            y6 = y.view(m, m, n, th, tw, o)
        else:
            y6 = y.view(m, m, o, n, th, tw).permute(0, 1, 3, 4, 5, 2)
        # 5. re-assemble (and crop) the tiles, adding the bias
        if channels_last:
            out = x.new_empty((n, oh, ow, o), dtype=out_dtype)
            res = out.permute(0, 3, 1, 2)
        else:
            res = x.new_empty((n, o, oh, ow), dtype=out_dtype)
            out = res.permute(0, 2, 3, 1)
        assemble_tiles(y6, bias, out)
        return res

    def _run_functional(self, x, u, bias, pads, consts, channels_last, oh, ow):
        """The same algorithm with out-of-place ops only (autograd, tracing, compile):
        2-D transforms as single GEMMs with kron(B^T, B^T) and kron(A^T, A^T)."""
        m, alpha = self.m, self.m + 2
        n, c = x.shape[:2]
        o = u.shape[2]
        xp = F.pad(x.permute(0, 2, 3, 1), (0, 0) + pads)                # N, Hp, Wp, C
        th, tw = (xp.shape[1] - 2) // m, (xp.shape[2] - 2) // m
        d = xp.unfold(1, alpha, m).unfold(2, alpha, m)                   # N, tH, tW, C, a, a
        d = d.permute(4, 5, 0, 1, 2, 3).reshape(alpha * alpha, -1)
        v = torch.mm(consts["KB"], d).view(alpha * alpha, n * th * tw, c)
        mm = torch.bmm(v, u)
        y = torch.mm(consts["KA"], mm.view(alpha * alpha, -1)).view(m, m, n, th, tw, o)
        full = y.permute(2, 3, 0, 4, 1, 5).reshape(n, th * m, tw * m, o)[:, :oh, :ow]
        if bias is not None:
            full = full + bias
        res = full.permute(0, 3, 1, 2)
        if channels_last:
            return res.contiguous(memory_format=torch.channels_last)
        return res.contiguous()


@register("winograd_f2")
class WinogradF2(_Winograd):
    """Winograd F(2x2, 3x3): 2.25x fewer multiplications than direct 3x3 convolution;
    fp32 error comparable to direct convolution."""

    m = 2
    tolerance = 1e-4


@register("winograd_f4")
class WinogradF4(_Winograd):
    """Winograd F(4x4, 3x3): 4x fewer multiplications than direct 3x3 convolution; its
    larger transforms cost accuracy (fp32 error up to ~1e-4 relative, tolerance 5e-4)."""

    m = 4
    tolerance = 5e-4
