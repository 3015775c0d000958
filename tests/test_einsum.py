"""conv_einsum (convgap.einsum): the cost model and path search against an independent
brute force, evaluation against dense references (F.conv1d/2d/3d, torch.einsum, and a
first-principles reference that writes every convolution as a 0/1 convolution tensor), FFT
agreement, gradients, the error messages of bad input, and plan caching.

Nothing here imports convgap.einsum internals for a reference: the cost model, the
enumeration of contraction orders and the dense reference are all written below."""

from __future__ import annotations

import functools
import itertools
import math
import random
import string
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from convgap import choice
from hypothesis import HealthCheck, given, settings, strategies as st

from convgap.einsum import clear_cache, einsum, einsum_path
from convgap.errors import ConvgapError

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (a second one only adds sync overhead, and
    thousands of tiny ops crawl when another process holds the other core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(0, 2**32 - 1)
DT = torch.float64
COMBO = 64  # documented: 'combo' = MACs + 64 x elements written


# ----------------------------------------------------------------------------------------
# An independent reference: problems, cost model, brute force over all contraction orders
# ----------------------------------------------------------------------------------------

@dataclass
class Prob:
    """A conv_einsum problem with explicit per-mode parameters (pads are (left, right))."""

    inputs: list[str]
    output: str
    conv: list[str]
    shapes: list[tuple[int, ...]]
    stride: dict
    pad: dict
    dil: dict

    @property
    def expr(self) -> str:
        e = ",".join(self.inputs) + "->" + self.output
        return e + "|" + "".join(self.conv) if self.conv else e

    def kwargs(self) -> dict:
        if not self.conv:
            return {}
        return dict(stride=dict(self.stride), padding=dict(self.pad), dilation=dict(self.dil))


class RefCost:
    """The cost model from first principles.

    An intermediate is a set of operands. It holds every mode of its operands that is in the
    output or held by some operand outside the set. A convolved mode is ``n`` long while only
    its signal operand is inside, ``k`` while only its kernel is, and the output length
    ``(n + pl + pr - d (k - 1) - 1) // s + 1`` once both are. Merging A and B costs the
    product, over the modes of A and B, of the mode length -- except a mode convolved in
    that step (held by both), which costs output length x kernel length. The step writes
    the product of its result's mode lengths. torch can run a step only if it convolves at
    most three modes, all with the signal on the same side."""

    def __init__(self, p: Prob):
        self.p = p
        self.n = len(p.inputs)
        self.holders = {m: [i for i, ops in enumerate(p.inputs) if m in ops]
                        for m in set("".join(p.inputs))}
        self.size, self.sig, self.ker, self.outlen, self.klen = {}, {}, {}, {}, {}
        for i, (ops, shape) in enumerate(zip(p.inputs, p.shapes)):
            for m, n in zip(ops, shape):
                if m not in p.conv:
                    self.size[m] = n
        for m in p.conv:
            s, k = self.holders[m]
            self.sig[m], self.ker[m] = s, k
            n = p.shapes[s][p.inputs[s].index(m)]
            kk = p.shapes[k][p.inputs[k].index(m)]
            (pl, pr), d, st_ = p.pad[m], p.dil[m], p.stride[m]
            self.size[m] = n
            self.klen[m] = kk
            self.outlen[m] = (n + pl + pr - d * (kk - 1) - 1) // st_ + 1

    def modes(self, s: frozenset) -> dict[str, int]:
        out = {}
        for i in sorted(s):
            for m in self.p.inputs[i]:
                needed = m in self.p.output or any(j not in s for j in self.holders[m])
                if not needed:
                    continue
                if m in self.p.conv:
                    has_s, has_k = self.sig[m] in s, self.ker[m] in s
                    out[m] = (self.outlen[m] if has_s and has_k
                              else self.size[m] if has_s else self.klen[m])
                else:
                    out[m] = self.size[m]
        return out

    def step(self, a: frozenset, b: frozenset) -> tuple[int, int, bool]:
        """(MACs, elements written, feasible) of merging intermediates a and b."""
        ma, mb = self.modes(a), self.modes(b)
        now = [m for m in self.p.conv if m in ma and m in mb]
        macs = 1
        for m in set(ma) | set(mb):
            macs *= self.outlen[m] * self.klen[m] if m in now else ma.get(m, mb.get(m))
        written = math.prod(self.modes(a | b).values())
        feasible = len(now) <= 3 and len({self.sig[m] in a for m in now}) <= 1
        return macs, written, feasible

    def objective(self, a, b, name: str) -> float:
        macs, written, ok = self.step(a, b)
        if not ok:
            return math.inf
        return {"flops": macs, "memory": written, "combo": macs + COMBO * written}[name]

    def brute_force(self, name: str) -> float:
        """Minimum of ``name`` over ALL pairwise contraction orders: recursively every pair
        of the current list of intermediates (memoised on the list, as a set)."""

        @functools.lru_cache(maxsize=None)
        def best(state: frozenset) -> float:
            if len(state) == 1:
                return 0
            items = sorted(state, key=sorted)
            top = math.inf
            for a, b in itertools.combinations(items, 2):
                c = self.objective(a, b, name)
                if math.isinf(c):
                    continue
                top = min(top, c + best(state - {a, b} | {a | b}))
            return top

        return best(frozenset(frozenset([i]) for i in range(self.n)))

    def simulate(self, path) -> list[tuple[int, int, bool]]:
        """Per-step (MACs, written, feasible) of an opt_einsum-format path."""
        live = [frozenset([i]) for i in range(self.n)]
        steps = []
        for i, j in path:
            a, b = live[i], live[j]
            steps.append(self.step(a, b))
            live = [x for k, x in enumerate(live) if k not in (i, j)] + [a | b]
        assert len(live) == 1
        return steps


def all_paths(n: int):
    """Every opt_einsum-format path for n operands (all pairs at every step)."""
    if n <= 1:
        yield []
        return
    for i, j in itertools.combinations(range(n), 2):
        for rest in all_paths(n - 1):
            yield [(i, j)] + rest


def left_path(n: int) -> list[tuple[int, int]]:
    """((A B) C) D ... in opt_einsum format (the result is appended at the end)."""
    return [(0, 1)] + [(0, k) for k in range(n - 2, 0, -1)] if n > 1 else []


def random_prob(rng: random.Random, n_min: int, n_max: int, max_size: int, conv: bool = True,
                max_modes: int = 7, max_rank: int = 4, budget: int | None = None) -> Prob:
    while True:
        n = rng.randint(n_min, n_max)
        letters = rng.sample(string.ascii_lowercase, rng.randint(1, max_modes))
        inputs = ["".join(rng.sample(letters, rng.randint(1, min(max_rank, len(letters)))))
                  for _ in range(n)]
        present = sorted(set("".join(inputs)))
        two = [m for m in present if sum(m in ops for ops in inputs) == 2]
        cm = rng.sample(two, rng.randint(0, min(3, len(two)))) if conv else []
        output = "".join(rng.sample(present, rng.randint(0, len(present))))
        size = {m: rng.randint(1, max_size) for m in present}
        stride, pad, dil, klen, slen = {}, {}, {}, {}, {}
        for m in cm:
            stride[m], dil[m] = rng.randint(1, 2), rng.randint(1, 2)
            pad[m] = (rng.randint(0, 1), rng.randint(0, 1))
            klen[m] = rng.randint(1, 3)
            slen[m] = max(1, dil[m] * (klen[m] - 1) + 1 - sum(pad[m])) + rng.randint(0, 2)
        shapes = []
        for i, ops in enumerate(inputs):
            shape = []
            for m in ops:
                if m in cm:
                    first = next(j for j, o in enumerate(inputs) if m in o)
                    shape.append(slen[m] if i == first else klen[m])
                else:
                    shape.append(size[m])
            shapes.append(tuple(shape))
        p = Prob(inputs, output, cm, shapes, stride, pad, dil)
        if budget is None or _reference_volume(p) <= budget:
            return p


def _reference_volume(p: Prob) -> int:
    r = RefCost(p)
    vol = 1
    for m in set("".join(p.inputs)):
        vol *= r.size[m] * (r.klen[m] * r.outlen[m] if m in p.conv else 1)
    return vol


# ----------------------------------------------------------------------------------------
# An independent dense reference: each convolution as a 0/1 tensor T[o, n, k]
# ----------------------------------------------------------------------------------------

def dense_reference(p: Prob, tensors) -> torch.Tensor:
    """conv_einsum by plain torch.einsum: the convolved mode m becomes a fresh mode in the
    signal and another in the kernel, joined by T_m[m, n, k] = 1 iff n = m s + k d - pl."""
    used = set("".join(p.inputs))
    fresh = iter(c for c in string.ascii_letters if c not in used)
    inputs = list(p.inputs)
    ops, extra = [], []
    for m in p.conv:
        si, ki = [i for i, o in enumerate(p.inputs) if m in o]
        n = tensors[si].shape[p.inputs[si].index(m)]
        k = tensors[ki].shape[p.inputs[ki].index(m)]
        (pl, pr), d, s = p.pad[m], p.dil[m], p.stride[m]
        out = (n + pl + pr - d * (k - 1) - 1) // s + 1
        t = torch.zeros(out, n, k, dtype=DT)
        for o in range(out):
            for j in range(k):
                idx = o * s + j * d - pl
                if 0 <= idx < n:
                    t[o, idx, j] = 1
        ns, nk = next(fresh), next(fresh)
        inputs[si] = inputs[si].replace(m, ns)
        inputs[ki] = inputs[ki].replace(m, nk)
        ops.append(m + ns + nk)
        extra.append(t)
    return torch.einsum(",".join(inputs + ops) + "->" + p.output, *tensors, *extra)


def conv_ref(x, w, stride=1, pads=None, dilation=1, groups=1):
    """F.convNd after explicit (left, right) padding per spatial dim."""
    nd = x.dim() - 2
    if pads is not None:
        x = F.pad(x, [v for lr in reversed(pads) for v in lr])
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd](x, w, None, stride, 0, dilation, groups)


def close(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------
# 1. Path cost equals brute force
# ----------------------------------------------------------------------------------------

def test_plain_conv_cost_is_the_conv_macs():
    # b*o*s * (out_h*k_h) * (out_w*k_w): exactly F.conv2d's MACs, not max(n,k)^2 per mode
    info = einsum_path("bshw,oshw->bohw|hw", (2, 3, 8, 8), (4, 3, 3, 3), padding=1)
    assert info.macs == 2 * 4 * 3 * 8 * 8 * 3 * 3
    assert info.written == 2 * 4 * 8 * 8
    assert [s.kind for s in info.steps] == ["conv2d"]
    info = einsum_path("bshw,oshw->bohw|hw", (1, 3, 9, 9), (4, 3, 3, 3), stride=2)
    assert info.macs == 1 * 4 * 3 * 4 * 4 * 9


def check_against_brute_force(p: Prob):
    ref = RefCost(p)
    for objective in ("flops", "memory", "combo"):
        best = ref.brute_force(objective)
        if math.isinf(best):
            with pytest.raises(ConvgapError, match="no contraction order"):
                einsum_path(p.expr, *p.shapes, objective=objective, path="optimal",
                            **p.kwargs())
            continue
        info = einsum_path(p.expr, *p.shapes, objective=objective, path="optimal",
                           **p.kwargs())
        assert info.method == "optimal"
        steps = ref.simulate(info.path)
        assert all(ok for _, _, ok in steps)
        assert [s.macs for s in info.steps] == [m for m, _, _ in steps]
        assert [s.written for s in info.steps] == [w for _, w, _ in steps]
        assert info.macs == sum(m for m, _, _ in steps)
        assert info.written == sum(w for _, w, _ in steps)
        assert info.largest == max((w for _, w, _ in steps), default=0)
        total = {"flops": info.macs, "memory": info.written,
                 "combo": info.macs + COMBO * info.written}[objective]
        assert total == best, (objective, info.path, total, best)
        # the left-to-right cost as reported
        left = ref.simulate(left_path(ref.n))
        assert info.naive_macs == sum(m for m, _, _ in left)
        # 'auto' is optimal for few operands
        assert einsum_path(p.expr, *p.shapes, objective=objective,
                           **p.kwargs()).macs == info.macs
        # other methods: their reported steps are costed right and never beat the optimum
        for method in ("greedy", "left"):
            try:
                other = einsum_path(p.expr, *p.shapes, objective=objective, path=method,
                                    **p.kwargs())
            except ConvgapError:
                if method == "left":
                    assert not all(ok for _, _, ok in left)
                continue
            if method == "left":
                assert other.path == left_path(ref.n)
            st_ = ref.simulate(other.path)
            assert all(ok for _, _, ok in st_)
            assert [s.macs for s in other.steps] == [m for m, _, _ in st_]
            assert [s.written for s in other.steps] == [w for _, w, _ in st_]
            assert {"flops": other.macs, "memory": other.written,
                    "combo": other.macs + COMBO * other.written}[objective] >= best


@settings(max_examples=60, **SETTINGS)
@given(seed=SEEDS)
def test_optimal_path_equals_brute_force_with_convolutions(seed):
    check_against_brute_force(random_prob(random.Random(seed), 2, 6, 5, conv=True))


@settings(max_examples=30, **SETTINGS)
@given(seed=SEEDS)
def test_optimal_path_equals_brute_force_pure_einsum(seed):
    check_against_brute_force(random_prob(random.Random(seed), 2, 6, 5, conv=False))


@pytest.mark.parametrize("expr,shapes", [
    ("bshw,sr,rh,rw,or->bohw|hw", [(2, 8, 10, 10), (8, 3), (3, 3), (3, 3), (16, 3)]),
    ("bshw,sk,akhw,oa->bohw|hw", [(2, 8, 10, 10), (8, 4), (5, 4, 3, 3), (16, 5)]),
    ("bshw,sa,ahc,cwd,do->bohw|hw", [(2, 8, 10, 10), (8, 2), (2, 3, 3), (3, 3, 2),
                                     (2, 16)]),
    ("bshw,zsa,ahc,cwd,doz->bohw|hw", [(2, 8, 10, 10), (2, 8, 2), (2, 3, 3), (3, 3, 2),
                                       (2, 16, 2)]),
])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_tensorial_forms_optimal_equals_brute_force(expr, shapes, stride, padding, dilation):
    lhs, rest = expr.split("->")
    out, conv = rest.split("|")
    p = Prob(lhs.split(","), out, list(conv), shapes, {m: stride for m in conv},
             {m: (padding, padding) for m in conv}, {m: dilation for m in conv})
    check_against_brute_force(p)


# ----------------------------------------------------------------------------------------
# 2. Evaluation equals dense references
# ----------------------------------------------------------------------------------------

def _pads_of(padding, kh, kw, dh, dw):
    """(left, right) per spatial dim (h, w) for any accepted padding spec."""
    def one(v, k, d):
        if v == "same":
            t = d * (k - 1)
            return (t // 2, t - t // 2)
        if v == "valid":
            return (0, 0)
        if isinstance(v, int):
            return (v, v)
        return tuple(v)
    if isinstance(padding, dict):
        return [one(padding.get("h", 0), kh, dh), one(padding.get("w", 0), kw, dw)]
    return [one(padding, kh, dh), one(padding, kw, dw)]


def _per(v, m):
    return v.get(m, 1) if isinstance(v, dict) else v


PAD_SPECS = [0, 1, 2, (0, 2), (2, 1), "valid", "same", {"h": 1}, {"w": (1, 0)},
             {"h": "same", "w": 2}, {"h": (0, 1), "w": "valid"}]


@settings(max_examples=60, **SETTINGS)
@given(pad=st.sampled_from(PAD_SPECS),
       stride=st.sampled_from([1, 2, 3, {"h": 2}, {"w": 2, "h": 1}]),
       dilation=st.sampled_from([1, 2, {"h": 2}, {"w": 3}]),
       kh=st.integers(1, 4), kw=st.integers(1, 4), extra=st.integers(0, 4),
       b=st.integers(1, 2), s=st.integers(1, 3), o=st.integers(1, 3))
def test_plain_conv2d_matches_F_conv2d(pad, stride, dilation, kh, kw, extra, b, s, o):
    sh, sw = _per(stride, "h"), _per(stride, "w")
    dh, dw = _per(dilation, "h"), _per(dilation, "w")
    uses_same = pad == "same" or (isinstance(pad, dict) and "same" in pad.values())
    if uses_same and (sh, sw) != (1, 1):
        stride, sh, sw = 1, 1, 1
    h = dh * (kh - 1) + 1 + extra
    w_ = dw * (kw - 1) + 1 + (extra + 1) % 4
    x = torch.randn(b, s, h, w_, dtype=DT)
    w = torch.randn(o, s, kh, kw, dtype=DT)
    y = einsum("bshw,oshw->bohw|hw", x, w, stride=stride, padding=pad, dilation=dilation)
    ref = conv_ref(x, w, (sh, sw), _pads_of(pad, kh, kw, dh, dw), (dh, dw))
    close(y, ref)
    if isinstance(pad, int) or pad in ("same", "valid"):  # torch's own padding handling
        close(y, F.conv2d(x, w, None, (sh, sw), pad, (dh, dw)))


@pytest.mark.parametrize("stride,padding,dilation", [
    (1, 0, 1), (2, 1, 1), (1, (2, 0), 2), (3, "valid", 1), (1, "same", 2)])
def test_conv1d_matches_F_conv1d(stride, padding, dilation):
    x = torch.randn(2, 3, 13, dtype=DT)
    w = torch.randn(4, 3, 4, dtype=DT)
    y = einsum("bsl,osl->bol|l", x, w, stride=stride, padding=padding, dilation=dilation)
    pads = [_pads_of(padding, 4, 4, dilation, dilation)[0]]
    close(y, conv_ref(x, w, stride, pads, dilation))
    if not isinstance(padding, tuple):
        close(y, F.conv1d(x, w, None, stride, padding, dilation))


@pytest.mark.parametrize("stride,padding,dilation", [
    (1, 0, 1), (2, 1, 1), ({"d": 2, "h": 1, "w": 3}, {"d": (1, 0), "w": 2}, {"h": 2}),
    (1, "same", 1)])
def test_conv3d_matches_F_conv3d(stride, padding, dilation):
    x = torch.randn(1, 2, 6, 7, 8, dtype=DT)
    w = torch.randn(3, 2, 2, 3, 2, dtype=DT)
    y = einsum("bsdhw,osdhw->bodhw|dhw", x, w, stride=stride, padding=padding,
               dilation=dilation)
    ks = dict(zip("dhw", (2, 3, 2)))
    pads, strides, dils = [], [], []
    for m in "dhw":
        d = _per(dilation, m)
        v = padding.get(m, 0) if isinstance(padding, dict) else padding
        pads.append(_pads_of(v, ks[m], ks[m], d, d)[0])
        strides.append(_per(stride, m))
        dils.append(d)
    close(y, conv_ref(x, w, strides, pads, dils))


TENSORIAL = {
    "cp": ("bshw,sr,rh,rw,or->bohw|hw", "sr,rh,rw,or->oshw",
           [(3, 2), (2, 3), (2, 2), (4, 2)]),
    "tucker": ("bshw,sk,akhw,oa->bohw|hw", "sk,akhw,oa->oshw",
               [(3, 2), (2, 2, 3, 2), (4, 2)]),
    "tt": ("bshw,sa,ahc,cwd,do->bohw|hw", "sa,ahc,cwd,do->oshw",
           [(3, 2), (2, 3, 2), (2, 2, 2), (2, 4)]),
    "tr": ("bshw,zsa,ahc,cwd,doz->bohw|hw", "zsa,ahc,cwd,doz->oshw",
           [(2, 3, 2), (2, 3, 2), (2, 2, 2), (2, 4, 2)]),
}
CONV_PARAMS = [(1, 0, 1), (2, 1, 1), (1, {"h": (2, 0), "w": 1}, 2), (1, "same", 1)]


def _tensorial(name):
    expr, rebuild, fshapes = TENSORIAL[name]
    x = torch.randn(2, 3, 7, 6, dtype=DT)
    factors = [torch.randn(*s, dtype=DT) for s in fshapes]
    return expr, x, factors, torch.einsum(rebuild, *factors)


@pytest.mark.parametrize("name", list(TENSORIAL))
@pytest.mark.parametrize("stride,padding,dilation", CONV_PARAMS)
def test_tensorial_forms_match_rebuilt_kernel_for_every_path(name, stride, padding,
                                                             dilation):
    expr, x, factors, kernel = _tensorial(name)
    kh, kw = kernel.shape[2:]
    ref = conv_ref(x, kernel, stride, _pads_of(padding, kh, kw, dilation, dilation),
                   dilation)
    kw_ = dict(stride=stride, padding=padding, dilation=dilation)
    for method in ("auto", "optimal", "greedy", "left"):
        close(einsum(expr, x, *factors, path=method, **kw_), ref)
    for objective in ("memory", "combo"):
        close(einsum(expr, x, *factors, objective=objective, **kw_), ref)
    # every explicit order: the feasible ones agree, the others are refused
    p = Prob(expr.split("->")[0].split(","), "bohw", ["h", "w"],
             [tuple(x.shape)] + [tuple(f.shape) for f in factors],
             {m: stride for m in "hw"}, {m: (0, 0) for m in "hw"}, {m: dilation for m in "hw"})
    ref_cost = RefCost(p)
    n_ok = 0
    for path in all_paths(1 + len(factors)):
        if all(ok for _, _, ok in ref_cost.simulate(path)):
            info = einsum_path(expr, x, *factors, path=path, **kw_)
            assert info.path == path and info.method == "given"
            close(einsum(expr, x, *factors, path=path, **kw_), ref)
            n_ok += 1
        else:
            with pytest.raises(ConvgapError, match="cannot run"):
                einsum(expr, x, *factors, path=path, **kw_)
    assert n_ok > 0


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, "same", 2)])
def test_grouped_conv_matches_F_conv2d_groups(stride, padding, dilation):
    g, s, o = 3, 2, 2
    x = torch.randn(2, g * s, 7, 8, dtype=DT)
    w = torch.randn(g * o, s, 3, 2, dtype=DT)
    y = einsum("bgshw,goshw->bgohw|hw", x.view(2, g, s, 7, 8), w.view(g, o, s, 3, 2),
               stride=stride, padding=padding, dilation=dilation)
    ref = F.conv2d(x, w, None, stride, padding, dilation, groups=g)
    close(y.reshape(ref.shape), ref)
    # depthwise: the channel mode is shared and kept
    wd = torch.randn(g * s, 3, 3, dtype=DT)
    y = einsum("bchw,chw->bchw|hw", x, wd, stride=stride, padding=padding, dilation=dilation)
    close(y, F.conv2d(x, wd.unsqueeze(1), None, stride, padding, dilation, groups=g * s))


@pytest.mark.parametrize("expr,shapes", [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 2)]),
    ("i,j->ij", [(3,), (4,)]),
    ("ab,ab->", [(3, 4), (3, 4)]),
    ("abc->cab", [(2, 3, 4)]),
    ("abc->", [(2, 3, 4)]),
    ("abc,cd->ad", [(2, 3, 4), (4, 5)]),
    ("ab,bc,cd,de->ae", [(2, 3), (3, 4), (4, 2), (2, 3)]),
    ("ab,cd,bd->ca", [(2, 3), (4, 5), (3, 5)]),
])
def test_pure_einsum_matches_torch_einsum(expr, shapes):
    ts = [torch.randn(*s, dtype=DT) for s in shapes]
    ref = torch.einsum(expr, *ts)
    for method in ("optimal", "greedy", "left"):
        close(einsum(expr, *ts, path=method), ref)


@settings(max_examples=40, **SETTINGS)
@given(seed=SEEDS)
def test_random_pure_einsum_matches_torch_einsum(seed):
    rng = random.Random(seed)
    p = random_prob(rng, 1, 5, 3, conv=False, max_modes=6, budget=20000)
    ts = [torch.randn(*s, dtype=DT) for s in p.shapes]
    ref = torch.einsum(p.expr, *ts)
    for method in ("optimal", "greedy", "left"):
        close(einsum(p.expr, *ts, path=method), ref)


@settings(max_examples=60, **SETTINGS)
@given(seed=SEEDS)
def test_random_conv_einsum_matches_convolution_tensor_reference(seed):
    rng = random.Random(seed)
    p = random_prob(rng, 2, 5, 3, conv=True, max_modes=6, budget=20000)
    ts = [torch.randn(*s, dtype=DT) for s in p.shapes]
    ref_cost = RefCost(p)
    if math.isinf(ref_cost.brute_force("flops")):
        with pytest.raises(ConvgapError, match="no contraction order"):
            einsum(p.expr, *ts, **p.kwargs())
        return
    ref = dense_reference(p, ts)
    close(einsum(p.expr, *ts, **p.kwargs()), ref)
    close(einsum(p.expr, *ts, fft=True, **p.kwargs()), ref)
    for method in ("greedy", "left"):
        try:
            y = einsum(p.expr, *ts, path=method, **p.kwargs())
        except ConvgapError:
            continue  # a heuristic / fixed order may be infeasible; optimal ran above
        close(y, ref)
    # a few random explicit orders
    paths = list(all_paths(len(ts)))
    for path in rng.sample(paths, min(5, len(paths))):
        if all(ok for _, _, ok in ref_cost.simulate(path)):
            close(einsum(p.expr, *ts, path=path, **p.kwargs()), ref)


@pytest.mark.parametrize("padding", [0, 5, (3, 20), "same"])
def test_fft_matches_direct_for_long_kernels(padding):
    x = torch.randn(2, 3, 64, dtype=DT)
    w = torch.randn(4, 3, 33, dtype=DT)
    ys = [einsum("bsl,osl->bol|l", x, w, padding=padding, fft=f) for f in (True, False, "auto")]
    close(ys[0], ys[1])
    close(ys[2], ys[1])
    pads = [_pads_of(padding, 33, 33, 1, 1)[0]]
    close(ys[1], conv_ref(x, w, 1, pads, 1))
    # 2-D, grouped
    x2 = torch.randn(1, 2, 3, 16, 14, dtype=DT)
    w2 = torch.randn(2, 2, 3, 9, 8, dtype=DT)
    p2 = padding if not isinstance(padding, tuple) else {"h": padding, "w": 1}
    a = einsum("bgshw,goshw->bgohw|hw", x2, w2, padding=p2, fft=True)
    b = einsum("bgshw,goshw->bgohw|hw", x2, w2, padding=p2, fft=False)
    close(a, b)


def test_fft_tensorial_and_strided_fall_back(monkeypatch):
    from convgap.einsum import evaluate
    ffts = []
    real = evaluate.fft_conv
    monkeypatch.setattr(evaluate, "fft_conv", lambda *a, **k: ffts.append(1) or real(*a, **k))
    expr, x, factors, kernel = _tensorial("tt")
    close(einsum(expr, x, *factors, padding=1, fft=True),
          F.conv2d(x, kernel, padding=1))
    assert len(ffts) == 2  # both 1-D filters by FFT
    ffts.clear()
    # stride / dilation cannot run by FFT: fft=True falls back to direct convolutions,
    # with the right answer
    close(einsum(expr, x, *factors, stride=2, dilation=2, padding=1, fft=True),
          F.conv2d(x, kernel, None, 2, 1, 2))
    assert not ffts


def test_gradcheck_cp():
    expr, x, factors, _ = _tensorial("cp")
    x = torch.randn(1, 3, 4, 4, dtype=DT)
    inputs = [t.detach().requires_grad_() for t in (x, *factors)]
    for kw in (dict(stride=2, padding=1), dict(padding=(1, 0), dilation=2)):
        assert torch.autograd.gradcheck(lambda *ts: einsum(expr, *ts, **kw), inputs)
    assert torch.autograd.gradcheck(lambda *ts: einsum(expr, *ts, padding=1, fft=True),
                                    inputs)


@pytest.mark.parametrize("name", ["tucker", "tr"])
def test_grads_equal_dense_reference(name):
    expr, rebuild, _ = TENSORIAL[name]
    _, x, factors, _ = _tensorial(name)
    ts = [t.detach().requires_grad_() for t in (x, *factors)]
    g = torch.randn(2, 4, 4, 4, dtype=DT)
    (einsum(expr, *ts, stride=2, padding=1) * g).sum().backward()
    got = [t.grad.clone() for t in ts]
    rs = [t.detach().requires_grad_() for t in (x, *factors)]
    (F.conv2d(rs[0], torch.einsum(rebuild, *rs[1:]), None, 2, 1) * g).sum().backward()
    for a, b in zip(got, (t.grad for t in rs)):
        close(a, b)


def test_non_contiguous_operands():
    x = torch.randn(2, 6, 7, 3, dtype=DT).permute(0, 3, 1, 2)         # (2, 3, 6, 7) view
    w = torch.randn(4, 5, 3, 3, dtype=DT)[:, 1:4]                      # sliced channels
    xl = torch.randn(2, 3, 6, 7, dtype=DT).contiguous(memory_format=torch.channels_last)
    for xx in (x, xl):
        close(einsum("bshw,oshw->bohw|hw", xx, w, padding=1),
              F.conv2d(xx.contiguous(), w.contiguous(), padding=1))
    expr, _, factors, kernel = _tensorial("cp")
    fs = [f.t().contiguous().t() if f.dim() == 2 else f for f in factors]  # column-major
    close(einsum(expr, x, *fs, padding=1), F.conv2d(x, kernel, padding=1))


def test_mixed_dtypes_promote():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float32)
    w = torch.randn(3, 2, 3, 3, dtype=DT)
    y = einsum("bshw,oshw->bohw|hw", x, w)
    assert y.dtype == DT
    close(y, F.conv2d(x.double(), w))


# ----------------------------------------------------------------------------------------
# 3. Bad input: ConvgapError naming the problem
# ----------------------------------------------------------------------------------------

X, W = (1, 2, 5, 5), (3, 2, 3, 3)
CONV = "bshw,oshw->bohw|hw"
BAD = [
    ("b1hw,oshw->bohw|hw", [X, W], {}, r"'1' is not a mode"),
    ("bs.w,oshw->bohw|hw", [X, W], {}, r"'\.' is not a mode"),
    ("bshw,oshw->bohw|h1", [X, W], {}, r"'1' is not a mode"),
    ("bshh,oshw->bohw|hw", [X, W], {}, r"operand 0 .*repeats mode\(s\) h"),
    ("ab,bc->aca", [(2, 3), (3, 4)], {}, r"output repeat\(s\) mode\(s\) a"),
    ("ab,bc->az", [(2, 3), (3, 4)], {}, r"output mode\(s\) z appear in no operand"),
    ("bshw,osw->bohw|hw", [X, (3, 2, 3)], {}, r"convolved mode 'h' appears in 1 operand"),
    ("ab,bc->ac|z", [(2, 3), (3, 4)], {}, r"convolved mode 'z' appears in 0 operand"),
    ("ah,bh,ch->abch|h", [(1, 5), (1, 3), (1, 2)], {}, r"'h' appears in 3 operands"),
    ("ab,bc|b", [(2, 3), (3, 4)], {}, r"no '->'"),
    ("ab,bc->ac|b|c", [(2, 3), (3, 4)], {}, r"more than one '\|'"),
    ("ab,bc->ac", [(2, 3)], {}, r"2 operand\(s\) but 1 were given"),
    ("ab,bc->ac", [(2, 3), (3, 4), (4, 5)], {}, r"2 operand\(s\) but 3 were given"),
    (CONV, [(1, 2, 5), W], {}, r"operand 0 \('bshw'\) has 4 modes but a tensor of 3 dim"),
    (CONV, [X, (3, 4, 3, 3)], {}, r"mode 's' has size 2 in operand 0 but 4 in operand 1"),
    (CONV, [(1, 2, 2, 5), W], {}, r"convolved mode 'h'.*output would be empty"),
    (CONV, [X, (3, 2, 3, 3)], {"dilation": 3}, r"output would be empty"),
    (CONV, [X, W], {"stride": 0}, r"stride for mode 'h' must be an int >= 1"),
    (CONV, [X, W], {"stride": {"w": -1}}, r"stride for mode 'w' must be an int >= 1"),
    (CONV, [X, W], {"dilation": 0}, r"dilation for mode 'h' must be an int >= 1"),
    (CONV, [X, W], {"padding": {"s": 1}}, r"padding given for mode\(s\) s, which are not "
                                          r"convolved"),
    (CONV, [X, W], {"stride": {"b": 2}}, r"stride given for mode\(s\) b"),
    (CONV, [X, W], {"padding": -1}, r"padding for mode 'h' must be"),
    (CONV, [X, W], {"padding": "full"}, r"padding for mode 'h' must be"),
    (CONV, [X, W], {"padding": "same", "stride": 2}, r"padding 'same' needs stride 1"),
    (CONV, [X, W], {"objective": "time"}, r"objective must be one of flops, memory, combo"),
    (CONV, [X, W], {"path": "fastest"}, r"path method must be 'auto', 'optimal'"),
    ("ab,bc,cd->ad", [(2, 3), (3, 4), (4, 5)], {"path": [(0, 0), (0, 1)]},
     r"path step 0 \(0, 0\): needs two different positions"),
    ("ab,bc,cd->ad", [(2, 3), (3, 4), (4, 5)], {"path": [(0, 3), (0, 1)]},
     r"path step 0 \(0, 3\): needs two different positions among the 3"),
    ("ab,bc,cd->ad", [(2, 3), (3, 4), (4, 5)], {"path": [(0, 1)]},
     r"the path has 1 steps; 3 operands need 2"),
    ("ab,bc,cd->ad", [(2, 3), (3, 4), (4, 5)], {"path": [(0, 1), (0, 1), (0, 1)]},
     r"path step 2 \(0, 1\): needs two different positions among the 1"),
    ("ab,bc,cd->ad", [(2, 3), (3, 4), (4, 5)], {"path": [(0, 1, 2), (0, 1)]},
     r"path step 0 \(0, 1, 2\)"),
    ("ab,bc,cd->ad", [(2, 3), (3, 4), (4, 5)], {"path": [("x", "y"), (0, 1)]},
     r"a path is a list of \(i, j\) pairs"),
    ("ab,bc,cd->ad", [(2, 3), (3, 4), (4, 5)], {"path": [3, 4]},
     r"a path is a list of \(i, j\) pairs"),
    ("bhw,hwc,cwh->b|hw", [(1, 5, 5), (3, 3, 2), (2, 3, 3)], {},
     r"convolved mode 'h' appears in 3 operands"),
    ("ahijk,bhijk->ab|hijk", [(1, 3, 3, 3, 3), (1, 2, 2, 2, 2)], {},
     r"no contraction order can run it"),
]


@pytest.mark.parametrize("expr,shapes,kw,match", BAD)
def test_bad_input_raises_convgap_error(expr, shapes, kw, match):
    clear_cache()
    with pytest.raises(ConvgapError, match=match):
        einsum_path(expr, *shapes, **kw)
    with pytest.raises(ConvgapError, match=match):
        einsum(expr, *[torch.randn(*s, dtype=DT) for s in shapes], **kw)


def test_bad_operands_raise():
    with pytest.raises(ConvgapError, match="expected a tensor"):
        einsum("ab,bc->ac", torch.randn(2, 3), (3, 4))
    with pytest.raises(ConvgapError, match="expected a tensor or a shape"):
        einsum_path("ab,bc->ac", (2, 3), (3, 0))
    with pytest.raises(ConvgapError, match="is a string"):
        einsum_path(123, (2, 3))
    with pytest.raises(ConvgapError, match="empty term"):
        einsum_path("ab,,bc->ac", (2, 3), (3, 4))


def test_four_modes_at_once_refused_only_where_every_order_needs_it():
    # left-to-right first takes the outer product of the two signals, then would convolve
    # four modes in one step (torch has no conv4d); signal-then-kernel order runs it
    expr = "ahi,bjk,hijk->ab|hijk"
    shapes = [(1, 4, 5), (2, 5, 4), (2, 3, 2, 2)]
    with pytest.raises(ConvgapError, match="left-to-right order cannot run it"):
        einsum_path(expr, *shapes, path="left")
    ts = [torch.randn(*s, dtype=DT) for s in shapes]
    p = Prob(["ahi", "bjk", "hijk"], "ab", list("hijk"), shapes, dict.fromkeys("hijk", 1),
             dict.fromkeys("hijk", (0, 0)), dict.fromkeys("hijk", 1))
    check_against_brute_force(p)
    close(einsum(expr, *ts), dense_reference(p, ts))
    close(einsum(expr, *ts, path="greedy"), dense_reference(p, ts))


# ----------------------------------------------------------------------------------------
# 4. Plan caching
# ----------------------------------------------------------------------------------------

def test_path_cache_returns_identical_object_and_clear_cache_forgets():
    clear_cache()
    x, w = torch.randn(*X, dtype=DT), torch.randn(*W, dtype=DT)
    a = einsum_path(CONV, x, w, padding={"h": (1, 0)})
    b = einsum_path(CONV, x, w, padding={"h": (1, 0)})
    assert a is b
    assert einsum_path(CONV, X, W, padding={"h": (1, 0)}) is a  # shapes or tensors: one key
    assert einsum_path(CONV, X, W, padding={"h": [1, 0]}) is a  # lists frozen like tuples
    c = einsum_path(CONV, X, W, padding=1)
    assert c is not a and c.macs != a.macs
    assert einsum_path(CONV, X, W, padding={"h": (1, 0)}, objective="memory") is not a
    clear_cache()
    d = einsum_path(CONV, X, W, padding={"h": (1, 0)})
    assert d is not a
    assert (d.path, d.macs, d.written) == (a.path, a.macs, a.written)
    assert einsum_path(CONV, X, W, padding={"h": (1, 0)}) is d
    # einsum uses the same cache
    einsum(CONV, x, w, padding={"h": (1, 0)})
    assert einsum_path(CONV, X, W, padding={"h": (1, 0)}) is d


def test_cache_does_not_bypass_validation():
    clear_cache()
    einsum_path(CONV, X, W, stride=1, padding=1)
    with pytest.raises(ConvgapError, match="stride"):
        einsum_path(CONV, X, W, stride=True, padding=1)
    with pytest.raises(ConvgapError, match="padding"):
        einsum_path(CONV, X, W, stride=1, padding=1.0)


def test_greedy_avoids_dead_ends():
    # r, f, z convolved; greedy's cheapest first step (0, 2) convolves r and leaves
    # f: signal in {0, 2}, kernel in {1}; z: signal in {1}, kernel in {0, 2}
    expr, shapes = "rf,fz,zr->|rfz", [(1, 2), (2, 3), (2, 1)]
    opt = einsum_path(expr, *shapes, path="optimal")
    assert opt.path == [(0, 1), (0, 1)] and opt.macs == 10
    info = einsum_path(expr, *shapes, path="greedy")
    assert info.macs >= opt.macs
    ts = [torch.randn(*s, dtype=DT) for s in shapes]
    close(einsum(expr, *ts, path="greedy"), einsum(expr, *ts, path="optimal"))


def test_path_info_renders():
    info = einsum_path("bshw,sr,rh,rw,or->bohw|hw", (2, 8, 10, 10), (8, 3), (3, 3), (3, 3),
                       (16, 3), padding=1)
    text = str(info)
    assert str(info.path) in text and f"{info.macs:,}" in text
    assert len(info.steps) == 4 and info.steps[-1].shape == (2, 16, 10, 10)
    assert info.speedup == info.naive_macs / info.macs
    assert info.table().row_count == 4


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("out_layout", [False, True])
@pytest.mark.parametrize("measured", [False, True])
def test_gemm_step_on_onednn_agrees_and_is_used_for_inference(monkeypatch, layout, out_layout,
                                                             measured):
    """Weight x feature-map steps run on oneDNN's linear kernel in inference (fp32 CPU):
    always where no layout copy is needed (channels innermost in and out), else where it
    measured faster; on torch.mm/bmm when autograd needs them. All agree with einsum."""
    from convgap.ops import onednn, pointwise
    if not onednn.AVAILABLE:
        pytest.skip("torch without oneDNN")
    used = []
    real = pointwise.linear
    monkeypatch.setattr(pointwise, "linear", lambda x, w, *a: used.append(1) or real(x, w, *a))
    # where a layout copy is needed the step is a measured choice: force oneDNN or BLAS
    name = "onednn" if measured else "blas"
    x = torch.randn(3, 24, 5, 7)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(40, 24)
    ref = torch.einsum("nchw,oc->nohw", x, w)
    with torch.no_grad(), choice.forced({"einsum-gemm-to-nchw": name,
                                         "einsum-gemm-to-cl": name}):
        y = pointwise.pointwise(x, w, 1, out_layout)
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4)
    expect = (layout == "channels_last" and out_layout) or \
        (measured and layout != "channels_last" and out_layout) or \
        (measured and layout == "channels_last" and not out_layout)
    assert len(used) == int(expect)
    if not out_layout:  # the result is channels-major whichever kernel ran
        assert y.is_contiguous()
    wg = w.clone().requires_grad_()
    y = pointwise.pointwise(x, wg, 1, out_layout)  # autograd: torch ops, gradients flow
    y.sum().backward()
    assert len(used) == int(expect) and wg.grad is not None
    assert torch.allclose(y.detach(), ref, rtol=1e-4, atol=1e-4)


def test_step_choice_is_verified_timed_once_and_kept_by_name(monkeypatch):
    """The fastest correct candidate wins past the margin, a wrong one never does, and the
    decision is kept by name per key: a later call times nothing, whatever the order."""
    from convgap.ops.measured import fastest
    calls = {"slow": 0, "fast": 0, "middle": 0, "wrong": 0}

    def make(name, delay, value=1.0):
        def fn():
            calls[name] += 1
            if delay:
                import time
                time.sleep(delay)
            return torch.full((4,), value)
        return fn
    slow, fast, middle = make("slow", 0.003), make("fast", 0.0), make("middle", 0.0015)
    wrong = make("wrong", 0.0, value=2.0)
    fns = {"slow": slow, "fast": fast, "middle": middle, "wrong": wrong}
    assert fastest("test-step", ("k",), fns) is fast
    assert calls["wrong"] == 1 and calls["fast"] >= 9  # checked once, never timed
    before = dict(calls)
    again = {"middle": middle, "slow": slow, "fast": fast}
    assert fastest("test-step", ("k",), again) is fast  # by name, not position
    assert calls == before
    assert fastest("test-step", ("k2",), {"slow": slow, "middle": middle}) is middle
    assert fastest("test-step", ("k3",), {"fast": fast, "slow": slow}) is fast
    with choice.forced({"test-step": "slow"}):
        assert fastest("test-step", ("k",), fns) is slow


@pytest.mark.parametrize("which", [0, 1, 2])
def test_channels_innermost_to_nchw_gemm_candidates_agree(monkeypatch, which):
    """A GEMM step from a channels-innermost map to a channels-major result has three
    ways (the map as oneDNN's weight operand then a row copy; oneDNN then a transposing
    copy; BLAS): each gives the einsum result, NCHW-contiguous, at any batch."""
    from convgap.ops import onednn, pointwise
    if not onednn.AVAILABLE:
        pytest.skip("torch without oneDNN")
    picked = []
    real = pointwise.fastest
    monkeypatch.setattr(pointwise, "fastest", lambda kind, key, fns: picked.append(
        (kind, list(fns))) or real(kind, key, fns))
    name = ["swapped", "onednn", "blas"][which]
    for n in (1, 3):
        x = torch.randn(n, 24, 5, 7).contiguous(memory_format=torch.channels_last)
        w = torch.randn(40, 24)
        with torch.no_grad(), choice.forced({"einsum-gemm-to-nchw": name}):
            y = pointwise.pointwise(x, w, 1, False, {})
        assert y.is_contiguous()
        assert torch.allclose(y, torch.einsum("nchw,oc->nohw", x, w), rtol=1e-4, atol=1e-4)
    assert picked == [("einsum-gemm-to-nchw", ["swapped", "onednn", "blas"])] * 2


@pytest.mark.parametrize("measured", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv_step_on_onednn_or_torch_agrees(monkeypatch, torch_steps, measured, layout):
    """A step that convolves two spatial modes runs on oneDNN's convolution or on
    F.conv2d, whichever measured faster for its shapes; both agree with the dense conv."""
    from convgap import TensorialConv2d
    from convgap.einsum import evaluate
    from convgap.ops import onednn
    if not onednn.AVAILABLE:
        pytest.skip("torch without oneDNN")
    keys = []
    real = evaluate.fastest
    monkeypatch.setattr(evaluate, "fastest",
                        lambda kind, key, fns: keys.append(kind) or real(kind, key, fns))
    layer = TensorialConv2d(12, 10, 3, "tucker", rank=(6, 5), padding=1, stride=2).eval()
    x = torch.randn(2, 12, 9, 9)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    name = "onednn" if measured else "native"
    with torch.no_grad(), choice.forced({"einsum-conv": name}):
        y = layer(x)
        ref = F.conv2d(x, layer.dense_weight(), layer.bias, stride=2, padding=1)
    assert "einsum-conv" in keys  # the core convolution asked for the measured choice
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_packed_gemm_weight_follows_changes_and_stops_when_rebuilt(monkeypatch, torch_steps):
    """A GEMM step packs its weight once for oneDNN and reuses it; an in-place change or a
    replaced factor repacks (the result follows the new weight); a step whose weight is
    new every call stops packing."""
    from convgap import TensorialConv2d
    from convgap.ops import memo, onednn
    if not onednn.AVAILABLE:
        pytest.skip("torch without oneDNN")
    reorders = []
    real = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight",
                        lambda w, rows: reorders.append(rows) or real(w, rows),
                        raising=False)
    layer = TensorialConv2d(16, 12, 3, "cp", rank=8, padding=1).eval()
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)

    def check():
        with torch.no_grad():
            y = layer(x)
        ref = F.conv2d(x, layer.dense_weight().detach(), layer.bias.detach(), padding=1)
        assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-5
    check()
    first = len(reorders)
    assert first >= 1
    check()
    check()
    assert len(reorders) == first  # reused
    with torch.no_grad():
        layer.factors[0].mul_(2.0)  # in place: version bump
    check()
    assert len(reorders) > first
    packed = {}
    w = torch.randn(5, 7)
    xs = torch.randn(4, 7)
    for _ in range(4):  # a weight built afresh each call
        y = onednn.linear(xs, w.clone(), packed)
        assert torch.allclose(y, xs @ w.t(), atol=1e-5)
    assert packed["misses"] == memo.MAX_MISSES


def _matches_dense(layer, x, tol=1e-5):
    with torch.no_grad():
        y = layer(x)
    ref = F.conv2d(x, layer.dense_weight().detach(),
                   None if layer.bias is None else layer.bias.detach(),
                   layer.stride, layer.padding)
    return ((y - ref).abs().max() / ref.abs().max()).item() < tol


def test_packed_conv_weight_follows_changes(monkeypatch, torch_steps, force):
    """A 2-D conv step on oneDNN blocks its weight once for the input shape and reuses it;
    an in-place change or a replaced tensor re-blocks (the result follows)."""
    from convgap import TensorialConv2d
    from convgap.ops import onednn
    if not onednn.AVAILABLE:
        pytest.skip("torch without oneDNN")
    force({"einsum-conv": "onednn"})
    blocks = []
    real = torch._C._nn.mkldnn_reorder_conv2d_weight
    monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight",
                        lambda w, *a: blocks.append(tuple(w.shape)) or real(w, *a))
    layer = TensorialConv2d(16, 12, 3, "tucker", rank=(8, 6), padding=1).eval()
    x = torch.randn(2, 16, 7, 7).contiguous(memory_format=torch.channels_last)
    assert _matches_dense(layer, x)
    first = len(blocks)
    assert first >= 1
    assert _matches_dense(layer, x) and _matches_dense(layer, x)
    assert len(blocks) == first  # reused
    with torch.no_grad():
        layer.factors[1].mul_(-0.5)  # the core, in place
    assert _matches_dense(layer, x)
    assert len(blocks) == first + 1
    layer.factors[1].data = torch.randn_like(layer.factors[1])  # a new tensor, same version
    assert _matches_dense(layer, x)
    assert len(blocks) == first + 2


def _programs(layer, x):
    return list(layer._plans[x.shape][2].values())


def test_weight_only_steps_are_reused_in_inference_and_follow_changes(torch_steps):
    """CP's k_h x k_w filter (the product of its two 1-D factors) is computed once in
    inference and reused while the factors are unchanged; an in-place change or a replaced
    tensor recomputes it; with gradients it is never reused."""
    from convgap import TensorialConv2d
    # the combo objective multiplies the 1-D factors first (here as on large layers)
    layer = TensorialConv2d(8, 6, 3, "cp", rank=5, padding=1, objective="combo")
    x = torch.randn(2, 8, 6, 6)
    assert _matches_dense(layer, x)  # the first call compiles the steps
    (program,) = _programs(layer, x)
    assert not program.memo
    assert _matches_dense(layer, x)
    assert program.memo  # the weight-only step was kept
    def kept():
        return {m: e[2] for m, e in program.memo.items()}
    for _, leaves, _ in program.memo.values():
        assert all(isinstance(t, torch.nn.Parameter) for t in leaves)
    before = kept()
    assert _matches_dense(layer, x)
    assert all(kept()[m] is t for m, t in before.items())  # reused, not recomputed
    for i in (1, 2, 3):  # each factor in turn, changed in place
        with torch.no_grad():
            layer.factors[i].mul_(1.5)
        assert _matches_dense(layer, x)
        changed = {m for m, t in kept().items() if t is not before[m]}
        over = {m for m in before if m >> (i + 1) & 1}  # steps with factor i below them
        assert over and changed == over
        before = kept()
    layer.factors[3].data = torch.randn_like(layer.factors[3])  # new tensor, same version
    assert _matches_dense(layer, x)
    assert any(kept()[m] is not t for m, t in before.items())
    # training: gradients reach every factor as through the dense kernel
    xg = torch.randn(2, 8, 6, 6)
    layer(xg).square().sum().backward()
    got = [f.grad.clone() for f in layer.factors]
    layer.zero_grad()
    F.conv2d(xg, layer.dense_weight(), layer.bias, padding=1).square().sum().backward()
    for g, f in zip(got, layer.factors):
        assert torch.allclose(g, f.grad, rtol=1e-4, atol=1e-6)


def test_layers_of_one_shape_keep_their_own_compiled_state():
    """Two layers with the same expression and shapes share the plan, not the compiled
    steps: alternating calls give each its own result; a deep copy starts afresh."""
    import copy

    from convgap import TensorialConv2d
    a = TensorialConv2d(8, 8, 3, "cp", rank=4, padding=1).eval()
    b = TensorialConv2d(8, 8, 3, "cp", rank=4, padding=1).eval()
    x = torch.randn(1, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        assert _matches_dense(a, x) and _matches_dense(b, x)
    assert a._plans[x.shape][0] is b._plans[x.shape][0]  # one Problem (the plan cache)
    assert not set(map(id, _programs(a, x))) & set(map(id, _programs(b, x)))
    c = copy.deepcopy(a)
    assert not c._plans
    with torch.no_grad():
        c.factors[0].mul_(2.0)
    assert _matches_dense(c, x) and _matches_dense(a, x)
    with torch.no_grad():
        assert not torch.allclose(c(x), a(x))


def test_refresh_after_writes_that_bypass_the_version_counter():
    """``p.data.mul_()`` changes a parameter without bumping its version: the kept state
    cannot see it (documented), and convgap.transforms.refresh drops it."""
    from convgap import FlattenedConv2d, TensorialConv2d
    from convgap.algorithms import AlgoConv2d
    from convgap.transforms import refresh
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    model = torch.nn.Sequential(
        TensorialConv2d(8, 8, 3, "cp", rank=4, padding=1, objective="combo", bias=False),
        FlattenedConv2d(8, 8, 3, padding=1, bias=False),
        AlgoConv2d(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), "prepacked")).eval()
    with torch.no_grad():
        for _ in range(3):
            model(x)
        for p in model.parameters():
            p.data.mul_(-1.5)  # no version bump
        assert refresh(model) == 3
        want = x
        for m in model:
            w = m.dense_weight() if hasattr(m, "dense_weight") else m.weight
            want = F.conv2d(want, w, None, 1, 1)
        y = model(x)
    assert ((y - want).abs().max() / want.abs().max()).item() < 1e-5
