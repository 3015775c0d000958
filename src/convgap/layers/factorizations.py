"""Factorized convolution kernels: for each family, its conv_einsum expression, factor
shapes for given ranks, parameter count, the rank that meets a compression target, and the
decomposition of a trained dense kernel (in torch, on torch's threads: CP and RCP by
alternating least squares, Tucker-2 by HOOI, TT and TR by TT-SVD / TR-SVD, the algorithms
of TensorLy's parafac, partial_tucker, tensor_train and tensor_ring, made fast; see
docs/2026-12-03-factorize-speed.md).

The dense kernel is ``W[o, s, h, w]`` (out channels, in channels, kernel rows, columns); the
input ``x[b, s, h, w]``. Families (``O``/``S`` channels, ``H``/``W`` kernel size):

=========  ========================================  =====================================
name       kernel                                    expression
=========  ========================================  =====================================
cp         sum_r A[s,r] B[r,h] C[r,w] D[o,r]         ``bshw,sr,rh,rw,or->bohw|hw``
tucker     Tucker-2 on the channel modes, spatial    ``bshw,sk,akhw,oa->bohw|hw``
           modes kept whole: core[a,k,h,w]
tt         tensor train over (s, h, w, o)            ``bshw,sa,ahc,cwd,do->bohw|hw``
tr         tensor ring over (s, h, w, o)             ``bshw,zsa,ahc,cwd,doz->bohw|hw``
rcp        reshaped CP: S = s1 s2, O = o1 o2, CP     ``bsthw,rsp,rtq,rhw->bpqhw|hw``
           over the modes (s1 o1), (s2 o2), (h w)
=========  ========================================  =====================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import ConvgapError

__all__ = ["FAMILIES", "Family", "family", "balanced_split", "align"]

Ranks = tuple[int, ...]


def _stalled(trace: list | None, last: float | None, err: float, tol: float) -> bool:
    """One iteration of a decomposition ended with relative error ``err`` (recorded in
    ``trace`` when given): True when it improved on ``last`` by at most ``tol * err``."""
    if trace is not None:
        trace.append(err)
    return last is not None and last - err <= tol * err

def balanced_split(n: int) -> tuple[int, int]:
    """n = a * b with a <= b as close as possible (a = 1 for primes)."""
    a = int(math.isqrt(n))
    while n % a:
        a -= 1
    return a, n // a


@dataclass(frozen=True)
class Family:
    """One factorization family. ``ranks(rank, O, S, H, W)`` normalises a user rank;
    ``shapes(ranks, O, S, H, W)`` gives the factor shapes (in expression order after x);
    ``decompose(W, ranks)`` returns factors (float64 numpy) of a dense kernel."""

    name: str
    expression: str
    n_ranks: int
    shapes: Callable[[Ranks, int, int, int, int], list[tuple[int, ...]]]
    decompose: Callable[[np.ndarray, Ranks], list[np.ndarray]]
    full_rank: Callable[[int, int, int, int], Ranks]
    input_split: Callable[[int, int], tuple[int, ...]] | None = None
    channel_ranks: bool = False  # every rank is the channel count of an intermediate map

    def params(self, ranks: Ranks, o: int, s: int, h: int, w: int) -> int:
        return sum(math.prod(sh) for sh in self.shapes(ranks, o, s, h, w))

    def ranks(self, rank, o: int, s: int, h: int, w: int) -> Ranks:
        if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool):
            ranks = (int(rank),) * self.n_ranks
        elif isinstance(rank, Sequence) and len(rank) == self.n_ranks:
            ranks = tuple(int(r) for r in rank)
        else:
            raise ConvgapError(f"{self.name} takes rank as an int or {self.n_ranks} ints; "
                               f"got {rank!r}")
        if any(r < 1 for r in ranks):
            raise ConvgapError(f"{self.name} ranks must be >= 1; got {ranks}")
        return ranks

    def rank_for(self, compression: float, o: int, s: int, h: int, w: int,
                 multiple: int = 1) -> Ranks:
        """The largest (uniform, or for Tucker channel-proportional) ranks whose factors hold
        at most dense / ``compression`` parameters. With ``multiple`` > 1, in families whose
        ranks are channel counts of intermediate feature maps (CP, Tucker, TT), each rank of
        at least 2 x ``multiple`` is then rounded down to a multiple of it (:func:`align`):
        still within the budget, and what vectorised kernels run at full speed."""
        if not (isinstance(compression, (int, float)) and compression > 0):
            raise ConvgapError(f"compression must be a number > 0, got {compression!r}")
        budget = o * s * h * w / compression

        def ranks_at(t: int) -> Ranks:
            if self.name == "tucker":  # ranks in proportion to the channel counts
                f = t / max(o, s)
                return (max(1, round(f * o)), max(1, round(f * s)))
            return (t,) * self.n_ranks
        best = None
        t = 1
        limit = 4 * max(o, s, h * w)
        while t <= limit and self.params(ranks_at(t), o, s, h, w) <= budget:
            best = ranks_at(t)
            t += 1
        if best is None:
            smallest = self.params(ranks_at(1), o, s, h, w)
            raise ConvgapError(
                f"{self.name} cannot compress a {o}x{s}x{h}x{w} kernel {compression:g}x: even "
                f"rank 1 holds {smallest:,} parameters (at most "
                f"{o * s * h * w / smallest:.3g}x); ask for less compression")
        aligned = align(best, multiple)  # validates ``multiple`` for every family
        return aligned if self.channel_ranks else best


def align(ranks: Ranks, multiple: int) -> Ranks:
    """Each rank of at least 2 x ``multiple`` rounded down to a multiple of ``multiple``
    (smaller ranks, and ``multiple`` <= 1, left alone). CPU kernels block channels by 8
    (AVX2) or 16 (AVX-512), GPU ones by more: here a Tucker core of 57 channels ran 1.5x
    slower than one of 56."""
    if not isinstance(multiple, (int, np.integer)) or isinstance(multiple, bool) or multiple < 1:
        raise ConvgapError(f"rank_multiple must be an int >= 1, got {multiple!r}")
    if multiple == 1:
        return tuple(ranks)
    return tuple(r // multiple * multiple if r >= 2 * multiple else r for r in ranks)


# -- shared linear algebra ---------------------------------------------------------------
# Everything below runs in torch (float64 unless stated) on torch's threads. TensorLy's
# SVD-based routines spent their time in LAPACK's SVD of wide unfoldings; only their
# leading singular vectors are ever kept, and the Gram matrix and its eigh give them in a
# fraction of the time (docs/2026-12-03-factorize-speed.md).
F64 = torch.float64


def _leading(mat: torch.Tensor, k: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """An orthonormal basis ``(m, k)`` (float64) of the ``k`` leading left singular vectors
    of ``mat`` ``(m, n)``, ``k <= min(m, n)``, in decreasing order, each column's largest
    entry made positive (deterministic signs). From eigh of the smaller Gram matrix: for
    m <= n, ``mat @ mat.T``; otherwise ``mat.T @ mat`` gives the right vectors V and the
    basis is the Q of ``mat @ V`` (a thin QR), so at k = min(m, n) the basis spans the whole
    column space and projecting on it is exact to rounding. ``dtype=torch.float32`` for a
    starting point only (orthonormal to ~1e-7, half the time)."""
    m, n = mat.shape
    k = min(k, m, n)
    mat = mat.to(dtype)
    if m <= n:
        u = torch.linalg.eigh(mat @ mat.T)[1][:, m - k:].flip(1)
    else:
        v = torch.linalg.eigh(mat.T @ mat)[1][:, n - k:].flip(1)
        u = torch.linalg.qr(mat @ v).Q
    u = u.to(F64)
    idx = u.abs().argmax(0)
    sign = torch.sign(u[idx, torch.arange(k)])
    return u * torch.where(sign == 0, torch.ones_like(sign), sign)


def _unfold(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.movedim(k, 0).reshape(t.shape[k], -1)


# -- CP ----------------------------------------------------------------------------------
def _cp(tensor: np.ndarray, rank: int) -> list[np.ndarray]:
    """CP factors (one (dim, rank) matrix per mode, weights folded in). Exact by
    construction when rank >= prod(dims) / max(dims); alternating least squares otherwise
    (:func:`cp_als`)."""
    dims = tensor.shape
    big = int(np.argmax(dims))
    others = [d for i, d in enumerate(dims) if i != big]
    exact = math.prod(others)
    if rank >= exact:
        factors = [np.zeros((d, rank)) for d in dims]
        mat = np.moveaxis(tensor, big, 0).reshape(dims[big], exact)
        factors[big][:, :exact] = mat
        modes = [i for i in range(len(dims)) if i != big]
        for r, idx in enumerate(np.ndindex(*others)):
            for i, j in zip(modes, idx):
                factors[i][j, r] = 1.0
        return factors
    return cp_als(tensor, rank)


def cp_als(tensor: np.ndarray, rank: int, n_iter: int = 50, tol: float = 1e-4,
           seed: int = 0, linesearch: bool = True, fast_until: float = 1e-3,
           trace: list | None = None) -> list[np.ndarray]:
    """CP of a tensor of 3 or more modes by alternating least squares, made fast:

    - SVD initialisation (the leading left singular vectors of each unfolding, from
      :func:`_leading`; seeded random columns beyond each unfolding's rank);
    - one sweep = two large contractions: ``T x_1 B`` gives mode 0's MTTKRP, ``T x_0 A``
      mode 1's, and contracted once more with ``B`` every smaller mode's (the einsum of
      the previous code contracted the whole tensor once per mode, four times a sweep);
    - these contractions in float32 while the fit error is above ``fast_until``, float64
      below (a kernel of exactly this rank is recovered to ~1e-8, where float32 would stall
      near 1e-4); the normal equations (Hadamard products of Gram matrices, rank x rank)
      always in float64, by Cholesky;
    - the fit error from the Gram matrices and the last MTTKRP (no rebuilt kernel);
    - Bro's line search: after each sweep from the 4th on, the factors are extrapolated
      along the sweep's step by ``(it + 1) ** (1 / p)`` and kept if the fit is better (its
      evaluation is the next sweep's first MTTKRP); ``p`` grows after 4 misses;
    - stop when a sweep improves the relative error by less than ``tol`` of itself, or
      after ``n_iter`` sweeps (with the line search, 50 sweeps fit about as well as the
      100 plain sweeps of the previous code).

    See docs/2026-12-03-factorize-speed.md for what each of these bought (time and error
    on resnet26). ``trace``, if given, receives the relative error after each sweep."""
    t = torch.as_tensor(np.ascontiguousarray(tensor), dtype=F64)
    n = t.dim()
    if n < 3:
        raise ConvgapError(f"cp_als needs a tensor of 3 or more modes, got {n}")
    dims = tuple(t.shape)
    d0, d1, rest = dims[0], dims[1], dims[2:]
    k_rest = math.prod(rest)
    gen = torch.Generator().manual_seed(seed)
    factors = []
    for k in range(n):
        u = _leading(_unfold(t, k), rank, torch.float32)
        if u.shape[1] < rank:
            extra = torch.randn(dims[k], rank - u.shape[1], generator=gen,
                                dtype=F64) / math.sqrt(dims[k])
            u = torch.cat([u, extra], dim=1)
        factors.append(u)
    norm2 = float((t * t).sum())
    if norm2 == 0.0:
        return [f.zero_().numpy() for f in factors]
    # the two unfoldings the large contractions read, in float64 and float32
    t_1 = {F64: t.reshape(d0, d1, k_rest).transpose(1, 2).reshape(d0 * k_rest, d1)
           .contiguous()}
    t_0 = {F64: t.reshape(d0, d1 * k_rest)}
    t_1[torch.float32], t_0[torch.float32] = t_1[F64].float(), t_0[F64].float()
    ones = torch.ones(rank, rank, dtype=F64)
    eye = torch.eye(rank, dtype=F64)
    rl = "cdefgh"[:n - 2]  # letters of the smaller modes (2 ..)

    def khatri_rao_rest(fs):  # (prod(rest), rank), row-major over modes 2..
        out = torch.ones(1, rank, dtype=F64)
        for f in fs[2:]:
            out = (out[:, None, :] * f[None, :, :]).reshape(-1, rank)
        return out

    def gram_product(gs, skip=None):
        g = ones
        for j, gj in enumerate(gs):
            if j != skip:
                g = g * gj
        return g

    def mttkrp0(fs, dt):
        x = (t_1[dt] @ fs[1].to(dt)).to(F64).reshape(d0, k_rest, rank)
        return (x * khatri_rao_rest(fs)).sum(1)

    def solve(fs, gs, k, m):
        g = gram_product(gs, k)
        try:  # a tiny ridge keeps Cholesky through exactly collinear columns
            c = torch.linalg.cholesky(g + (1e-13 * float(g.diagonal().max())) * eye)
            fs[k] = torch.cholesky_solve(m.T, c).T
        except RuntimeError:
            fs[k] = torch.linalg.lstsq(g, m.T).solution.T
        gs[k] = fs[k].T @ fs[k]

    def error(inner, gs):
        return math.sqrt(max(norm2 - 2.0 * inner + float(gram_product(gs).sum()), 0.0)
                         / norm2)

    grams = [f.T @ f for f in factors]
    dt = torch.float32
    m0 = mttkrp0(factors, dt)
    prev, last, power, misses = None, None, 3.0, 0
    for it in range(n_iter):
        solve(factors, grams, 0, m0)
        y = factors[0].to(dt).T @ t_0[dt]  # T x_0 A: (rank, d1, k)
        y = y.to(F64).reshape(rank, d1, k_rest)
        solve(factors, grams, 1, torch.einsum("rjk,kr->jr", y, khatri_rao_rest(factors)))
        z = torch.einsum("rjk,jr->kr", y, factors[1]).reshape(*rest, rank)
        for k in range(2, n):
            others = [j for j in range(2, n) if j != k]
            spec = (f"{rl}z," + ",".join(f"{rl[j - 2]}z" for j in others)
                    + f"->{rl[k - 2]}z")
            m = torch.einsum(spec, z, *[factors[j] for j in others]) if others else z
            solve(factors, grams, k, m)
        err = error(float((m * factors[-1]).sum()), grams)
        m0 = None
        if linesearch and prev is not None and it >= 3:
            jump = (it + 1) ** (1.0 / power)
            cand = [p + jump * (f - p) for p, f in zip(prev, factors)]
            cand_grams = [f.T @ f for f in cand]
            cand_m0 = mttkrp0(cand, dt)
            cand_err = error(float((cand_m0 * cand[0]).sum()), cand_grams)
            if cand_err < err:
                factors, grams, m0, err, misses = cand, cand_grams, cand_m0, cand_err, 0
            else:
                misses += 1
                if misses == 4:
                    power, misses = power + 1.0, 0
        prev = list(factors) if linesearch else None
        if _stalled(trace, last, err, tol):
            break
        last = err
        if dt != F64 and err < fast_until:
            dt, m0 = F64, None
        if m0 is None:
            m0 = mttkrp0(factors, dt)
    return [f.numpy() for f in factors]


def _cp_shapes(r, o, s, h, w):
    return [(s, r[0]), (r[0], h), (r[0], w), (o, r[0])]


def _cp_decompose(weight: np.ndarray, r: Ranks) -> list[np.ndarray]:
    fo, fs, fh, fw = _cp(weight, r[0])
    return [fs, fh.T, fw.T, fo]


# -- Tucker-2 ----------------------------------------------------------------------------
def _tucker_shapes(r, o, s, h, w):
    return [(s, r[1]), (r[0], r[1], h, w), (o, r[0])]


def _tucker_decompose(weight: np.ndarray, r: Ranks) -> list[np.ndarray]:
    """Tucker-2 at ranks capped by the channel counts, zero-padded to the requested ranks
    (a rank above the channel count adds nothing: the decomposition is then exact in that
    mode). See :func:`tucker2`."""
    o, s = weight.shape[:2]
    ro, rs = min(r[0], o), min(r[1], s)
    core, uo, us = tucker2(weight, ro, rs)
    us_p, uo_p = np.zeros((s, r[1])), np.zeros((o, r[0]))
    core_p = np.zeros((r[0], r[1], *weight.shape[2:]))
    us_p[:, :rs], uo_p[:, :ro], core_p[:ro, :rs] = us, uo, core
    return [us_p, core_p, uo_p]


def tucker2(weight: np.ndarray, ro: int, rs: int, n_iter: int = 100, tol: float = 1e-4,
            power_steps: int = 2, fast_until: float = 1e-3, trace: list | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tucker-2 of ``W[o, s, ...]`` on its two channel modes (ranks ``ro <= o``,
    ``rs <= s``): ``W ~ core x_0 uo x_1 us``, ``uo``, ``us`` orthonormal. HOOI (the
    algorithm of TensorLy's partial_tucker) from the truncated HOSVD (:func:`_leading` of
    each unfolding), but each half-step is ``power_steps`` block power steps on the other
    mode's projection (``uo <- qr(Y Y^T uo)``, ``Y = W x_1 us^T``) instead of an SVD of it.
    Contractions in float32 while the error is above ``fast_until`` (float64 below: an
    exactly low-rank kernel is recovered to float64 rounding). The error is
    sqrt(|W|^2 - |core|^2) / |W|; stop when an iteration improves it by less than ``tol``
    of itself. A mode at full rank keeps the identity basis; the other mode's HOSVD basis
    is then the optimum (exact at full rank)."""
    w = torch.as_tensor(np.ascontiguousarray(weight), dtype=F64)
    o, s = w.shape[:2]
    w3 = w.reshape(o, s, -1)
    norm2 = float((w3 * w3).sum())
    iterate = ro < o and rs < s and norm2 > 0
    start = torch.float32 if iterate else F64
    uo = torch.eye(o, dtype=F64) if ro >= o else _leading(w3.reshape(o, -1), ro, start)
    us = torch.eye(s, dtype=F64) if rs >= s else _leading(_unfold(w3, 1), rs, start)
    dt = torch.float32
    w_dt = w3.to(dt)
    last = None
    for _ in range(n_iter if iterate else 0):
        uo_, us_ = uo.to(dt), us.to(dt)
        y = torch.einsum("osp,sk->okp", w_dt, us_).reshape(o, -1)
        for _ in range(power_steps):
            uo_ = torch.linalg.qr(y @ (y.T @ uo_)).Q
        z = torch.einsum("osp,oa->sap", w_dt, uo_).reshape(s, -1)
        for _ in range(power_steps):
            us_ = torch.linalg.qr(z @ (z.T @ us_)).Q
        uo, us = uo_.to(F64), us_.to(F64)
        err = math.sqrt(max(norm2 - float(((us_.T @ z).double() ** 2).sum()), 0.0) / norm2)
        if _stalled(trace, last, err, tol):
            break
        last = err
        if dt != F64 and err < fast_until:
            dt = F64
            w_dt = w3
    core = torch.einsum("osp,oa,sk->akp", w3, uo, us).reshape(ro, rs, *w.shape[2:])
    return core.numpy(), uo.numpy(), us.numpy()


# -- tensor train / tensor ring over (s, h, w, o) -------------------------------------------
def _tt_shapes(r, o, s, h, w):
    return [(s, r[0]), (r[0], h, r[1]), (r[1], w, r[2]), (r[2], o)]


def _tt_svd(t: torch.Tensor, ranks: Sequence[int]) -> list[torch.Tensor]:
    """TT-SVD (Oseledets; TensorLy's tensor_train) of ``t[r_0, d_1, .., d_N]`` (``r_0`` a
    leading bond, 1 for a plain TT): sweep the modes left to right, keep the leading left
    singular vectors of each unfolding (:func:`_leading`) as a core, carry ``U^T M`` on.
    Bond k is at most ``ranks[k - 1]`` and the unfolding's size. Returns cores
    ``(r_k, d_k, r_{k+1})``, the last with ``r_{N+1} = 1``."""
    dims = t.shape[1:]
    cores, rest, prev = [], t, t.shape[0]
    for k in range(len(dims) - 1):
        mat = rest.reshape(prev * dims[k], -1)
        u = _leading(mat, ranks[k])
        cores.append(u.reshape(prev, dims[k], u.shape[1]))
        rest, prev = u.T @ mat, u.shape[1]
    cores.append(rest.reshape(prev, dims[-1], 1))
    return cores


def _tt_decompose(weight: np.ndarray, r: Ranks) -> list[np.ndarray]:
    t = torch.as_tensor(np.ascontiguousarray(weight), dtype=F64).permute(1, 2, 3, 0)
    dims = t.shape  # (s, h, w, o)
    eff, prev = [], 1  # TT-SVD's bonds: at most previous bond x mode, and what remains
    for k, want in enumerate(r):
        prev = min(want, prev * dims[k], math.prod(dims[k + 1:]))
        eff.append(prev)
    g = [c.numpy() for c in _tt_svd(t[None], eff)]
    out = [g[0][0], g[1], g[2], g[3][:, :, 0]]
    # pad to the requested ranks with zeros (a rank above the unfolding rank adds nothing)
    pads = [np.zeros((dims[0], r[0])), np.zeros((r[0], dims[1], r[1])),
            np.zeros((r[1], dims[2], r[2])), np.zeros((r[2], dims[3]))]
    pads[0][:, :eff[0]] = out[0]
    pads[1][:eff[0], :, :eff[1]] = out[1]
    pads[2][:eff[1], :, :eff[2]] = out[2]
    pads[3][:eff[2], :] = out[3]
    return pads


def _tr_shapes(r, o, s, h, w):
    return [(r[0], s, r[1]), (r[1], h, r[2]), (r[2], w, r[3]), (r[3], o, r[0])]


def _tr_decompose(weight: np.ndarray, r: Ranks) -> list[np.ndarray]:
    """TR-SVD (Zhao et al.; TensorLy's tensor_ring, mode 0): the first unfolding's leading
    ``r0 r1`` left singular vectors split into the first core, then TT-SVD of the rest."""
    t = torch.as_tensor(np.ascontiguousarray(weight), dtype=F64).permute(1, 2, 3, 0)
    dims = tuple(t.shape)  # (s, h, w, o)
    first = min(dims[0], math.prod(dims[1:]))
    if r[0] * r[1] > first:
        raise ConvgapError(
            "tensor-ring decomposition needs rank[0] * rank[1] <= "
            f"{first} (the first unfolding's rank) for a kernel with {dims[0]} input "
            f"channels; got ranks {r}: lower the rank (or the compression target's rank)")
    mat = t.reshape(dims[0], -1)
    u = _leading(mat, r[0] * r[1])
    core0 = u.reshape(dims[0], r[0], r[1]).permute(1, 0, 2)
    # the rest, (r1, h, w, o, r0): a TT whose last bond is r0, folded into the last mode
    rest = (u.T @ mat).reshape(r[0], r[1], -1).permute(1, 2, 0).reshape(
        r[1], dims[1], dims[2], dims[3] * r[0])
    got, prev = [r[0], r[1]], r[1]
    for k, want in enumerate(r[2:], start=1):  # the TT-SVD's caps, as TensorLy sets them
        prev = min(want, prev * dims[k], math.prod(dims[k + 1:]) * r[0])
        got.append(prev)
    if tuple(got) != tuple(r):
        raise ConvgapError(
            f"tensor-ring ranks {r} are not reachable by TR-SVD for a kernel of (s, h, w, o) "
            f"= {dims}: it gives at most {tuple(got)}; lower the ranks")
    mid = _tt_svd(rest, r[2:])
    cores = [core0, *mid[:-1], mid[-1].reshape(r[3], dims[3], r[0])]
    return [c.contiguous().numpy() for c in cores]


# -- reshaped CP ---------------------------------------------------------------------------
def _rcp_dims(o, s):
    (s1, s2), (o1, o2) = balanced_split(s), balanced_split(o)
    return s1, s2, o1, o2


def _rcp_shapes(r, o, s, h, w):
    s1, s2, o1, o2 = _rcp_dims(o, s)
    return [(r[0], s1, o1), (r[0], s2, o2), (r[0], h, w)]


def _rcp_decompose(weight: np.ndarray, r: Ranks) -> list[np.ndarray]:
    o, s, h, w = weight.shape
    s1, s2, o1, o2 = _rcp_dims(o, s)
    t = weight.reshape(o1, o2, s1, s2, h, w).transpose(2, 0, 3, 1, 4, 5)
    f1, f2, f3 = _cp(t.reshape(s1 * o1, s2 * o2, h * w), r[0])
    return [f1.T.reshape(r[0], s1, o1), f2.T.reshape(r[0], s2, o2), f3.T.reshape(r[0], h, w)]


FAMILIES: dict[str, Family] = {
    "cp": Family("cp", "bshw,sr,rh,rw,or->bohw|hw", 1, _cp_shapes, _cp_decompose,
                 lambda o, s, h, w: (o * s * h * w // max(o, s, h, w),),
                 channel_ranks=True),
    "tucker": Family("tucker", "bshw,sk,akhw,oa->bohw|hw", 2, _tucker_shapes,
                     _tucker_decompose, lambda o, s, h, w: (o, s),
                     channel_ranks=True),
    "tt": Family("tt", "bshw,sa,ahc,cwd,do->bohw|hw", 3, _tt_shapes, _tt_decompose,
                 lambda o, s, h, w: (min(s, h * w * o), min(s * h, w * o), min(s * h * w, o)),
                 channel_ranks=True),
    "tr": Family("tr", "bshw,zsa,ahc,cwd,doz->bohw|hw", 4, _tr_shapes, _tr_decompose,
                 lambda o, s, h, w: (1, s, min(s * h, w * o), o)),
    "rcp": Family("rcp", "bsthw,rsp,rtq,rhw->bpqhw|hw", 1, _rcp_shapes, _rcp_decompose,
                  lambda o, s, h, w: (_rcp_full(o, s, h, w),),
                  input_split=lambda o, s: _rcp_dims(o, s)[:2]),
}


def _rcp_full(o, s, h, w):
    s1, s2, o1, o2 = _rcp_dims(o, s)
    dims = (s1 * o1, s2 * o2, h * w)
    return math.prod(dims) // max(dims)


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConvgapError(f"unknown factorization {name!r}; available: "
                           f"{', '.join(FAMILIES)}")
    return FAMILIES[name]


def rebuild(fam: Family, factors: Sequence[torch.Tensor], o: int, s: int) -> torch.Tensor:
    """The dense kernel (O, S, H, W) the factors stand for (for checks and references)."""
    ops = fam.expression.split("->")[0].split(",")[1:]
    if fam.name == "rcp":
        s1, s2, o1, o2 = _rcp_dims(o, s)
        k = torch.einsum("rsp,rtq,rhw->pqsthw", *factors)
        return k.reshape(o, s, *k.shape[-2:])
    out = {"cp": "oshw", "tucker": "oshw", "tt": "oshw", "tr": "oshw"}[fam.name]
    return torch.einsum(f"{','.join(ops)}->{out}", *factors)
