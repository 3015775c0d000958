"""Factorized convolution kernels: for each family, its conv_einsum expression, factor
shapes for given ranks, parameter count, the rank that meets a compression target, and the
decomposition of a trained dense kernel (TensorLy).

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


def cp_als(tensor: np.ndarray, rank: int, n_iter: int = 100, tol: float = 1e-7,
           seed: int = 0) -> list[np.ndarray]:
    """CP by alternating least squares (float64, torch): SVD initialisation (random columns
    beyond each unfolding's rank), MTTKRP by einsum, stop when the relative fit changes by
    less than ``tol``. The same algorithm as TensorLy's ``parafac``, whose explicit
    Khatri-Rao products took 10-170 s per 256-channel 3x3 kernel on this machine (this:
    well under a second)."""
    t = torch.from_numpy(np.ascontiguousarray(tensor, dtype=np.float64))
    n = t.dim()
    gen = torch.Generator().manual_seed(seed)
    factors = []
    for k in range(n):
        unfold = t.movedim(k, 0).reshape(t.shape[k], -1)
        u = torch.linalg.svd(unfold, full_matrices=False)[0][:, :rank]
        if u.shape[1] < rank:
            extra = torch.randn(t.shape[k], rank - u.shape[1], generator=gen,
                                dtype=torch.float64) / math.sqrt(t.shape[k])
            u = torch.cat([u, extra], dim=1)
        factors.append(u)
    letters = "abcdefgh"[:n]
    norm = t.norm()
    last = None
    for it in range(n_iter):
        for k in range(n):
            others = [j for j in range(n) if j != k]
            spec = f"{letters}," + ",".join(f"{letters[j]}z" for j in others) + \
                f"->{letters[k]}z"
            mttkrp = torch.einsum(spec, t, *[factors[j] for j in others])
            gram = torch.ones(rank, rank, dtype=torch.float64)
            for j in others:
                gram = gram * (factors[j].T @ factors[j])
            factors[k] = torch.linalg.lstsq(gram, mttkrp.T).solution.T
        if it % 5 == 4 or it == n_iter - 1:
            rebuilt = torch.einsum(",".join(f"{c}z" for c in letters) + f"->{letters}",
                                   *factors)
            err = ((rebuilt - t).norm() / norm).item() if norm > 0 else 0.0
            if last is not None and abs(last - err) < tol:
                break
            last = err
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
    """Tucker-2 by TensorLy's partial_tucker (HOOI, SVD init) at ranks capped by the channel
    counts, zero-padded to the requested ranks (a rank above the channel count adds
    nothing: the decomposition is then exact in that mode)."""
    o, s = weight.shape[:2]
    ro, rs = min(r[0], o), min(r[1], s)
    from tensorly.decomposition import partial_tucker
    (core, (uo, us)), _ = partial_tucker(weight, [ro, rs], modes=[0, 1], init="svd",
                                         n_iter_max=100, tol=1e-10)
    us_p, uo_p = np.zeros((s, r[1])), np.zeros((o, r[0]))
    core_p = np.zeros((r[0], r[1], *weight.shape[2:]))
    us_p[:, :rs], uo_p[:, :ro], core_p[:ro, :rs] = us, uo, core
    return [us_p, core_p, uo_p]


# -- tensor train / tensor ring over (s, h, w, o) -------------------------------------------
def _tt_shapes(r, o, s, h, w):
    return [(s, r[0]), (r[0], h, r[1]), (r[1], w, r[2]), (r[2], o)]


def _tt_decompose(weight: np.ndarray, r: Ranks) -> list[np.ndarray]:
    from tensorly.decomposition import tensor_train
    t = np.transpose(weight, (1, 2, 3, 0))  # (s, h, w, o)
    dims = t.shape
    eff, prev = [], 1  # TT-SVD's bonds: at most previous bond x mode, and what remains
    for k, want in enumerate(r):
        prev = min(want, prev * dims[k], math.prod(dims[k + 1:]))
        eff.append(prev)
    cores = tensor_train(t, [1, *eff, 1])
    g = [np.asarray(c) for c in cores]
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
    from tensorly.decomposition import tensor_ring
    t = np.transpose(weight, (1, 2, 3, 0))  # (s, h, w, o)
    dims = t.shape
    if r[0] * r[1] > min(dims[0], math.prod(dims[1:])):
        raise ConvgapError(
            "tensor-ring decomposition needs rank[0] * rank[1] <= "
            f"{min(dims[0], math.prod(dims[1:]))} "
            f"(the first unfolding's rank) for a kernel with {dims[0]} input channels; got "
            f"ranks {r}: lower the rank (or the compression target's rank)")
    cores = [np.asarray(c) for c in tensor_ring(t, [*r, r[0]])]
    got = tuple(c.shape[0] for c in cores)
    if got != tuple(r):
        raise ConvgapError(
            f"tensor-ring ranks {r} are not reachable by TR-SVD for a kernel of (s, h, w, o) "
            f"= {dims}: it gives at most {got}; lower the ranks")
    return cores


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
