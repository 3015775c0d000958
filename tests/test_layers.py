"""TensorialConv2d (cp, tucker, tt, tr, rcp) and FlattenedConv2d: exactness against
F.conv2d, gradients, rank / compression selection, errors, MAC counts, from_conv, state."""

from __future__ import annotations

import io
import math
import re
from functools import lru_cache

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from convgap.errors import ConvgapError
from convgap.layers import FAMILIES, FlattenedConv2d, TensorialConv2d, family
from convgap.layers import tensorial as tensorial_mod
from convgap.layers.factorizations import rebuild

NAMES = list(FAMILIES)
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster and does not fight a benchmark for the cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def reference(layer: TensorialConv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, layer.dense_weight(), layer.bias, layer.stride, layer.padding,
                    layer.dilation)


def out_len(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


# ---------------------------------------------------------------------------------------
# 1. from_conv at full rank reproduces the convolution
# ---------------------------------------------------------------------------------------
# (in, out, kernel, stride, padding, dilation, bias)
CONVS = [
    (4, 6, 3, 1, 1, 1, True),
    (5, 7, (3, 1), 2, 0, 1, False),        # primes for rcp (s = 1 x 5, o = 1 x 7)
    (6, 4, (1, 3), 1, (0, 1), 2, True),
    (3, 5, 5, 2, 2, 1, True),
    (4, 6, 3, 1, "same", 2, False),
    (6, 9, 2, 1, "same", 1, True),         # even kernel: torch pads the extra on the right
    (5, 3, 3, 1, "valid", 1, True),
    (7, 11, (2, 3), (2, 1), (1, 0), (1, 2), True),
]


def _conv(cfg, dtype):
    i, o, k, s, p, d, b = cfg
    return nn.Conv2d(i, o, k, stride=s, padding=p, dilation=d, bias=b).to(dtype)


@pytest.mark.parametrize("cfg", CONVS, ids=lambda c: f"{c[0]}-{c[1]}-k{c[2]}-s{c[3]}-p{c[4]}-d{c[5]}")
@pytest.mark.parametrize("fam", NAMES)
def test_from_conv_full_rank_is_exact_float64(fam, cfg):
    conv = _conv(cfg, F64)
    o, s, (kh, kw) = conv.out_channels, conv.in_channels, conv.kernel_size
    rank = FAMILIES[fam].full_rank(o, s, kh, kw)
    layer = TensorialConv2d.from_conv(conv, fam, rank=rank)
    assert layer.ranks == tuple(rank) and layer.factorization == fam
    assert all(f.dtype == F64 for f in layer.factors)
    x = torch.randn(2, s, 9, 10, dtype=F64)
    with torch.no_grad():
        y, want = layer(x), conv(x)
        assert y.shape == want.shape
        assert rel(y, want) <= 1e-10
        assert rel(layer.dense_weight(), conv.weight) <= 1e-10


@pytest.mark.parametrize("cfg", CONVS[:4], ids=str)
@pytest.mark.parametrize("fam", NAMES)
def test_from_conv_full_rank_float32(fam, cfg):
    conv = _conv(cfg, torch.float32)
    o, s, (kh, kw) = conv.out_channels, conv.in_channels, conv.kernel_size
    layer = TensorialConv2d.from_conv(conv, fam, rank=FAMILIES[fam].full_rank(o, s, kh, kw))
    assert all(f.dtype == torch.float32 for f in layer.factors)
    x = torch.randn(3, s, 8, 7)
    with torch.no_grad():
        assert rel(layer(x), conv(x)) <= 1e-4


@pytest.mark.parametrize("fam", ["cp", "tucker", "tt", "rcp"])
def test_from_conv_low_rank_approximates_and_improves_with_rank(fam):
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 8, 3, padding=1).to(F64)
    o, s, (kh, kw) = 8, 6, (3, 3)
    full = FAMILIES[fam].full_rank(o, s, kh, kw)
    low = tuple(max(1, r // 3) for r in full)
    err_low = rel(TensorialConv2d.from_conv(conv, fam, rank=low).dense_weight(), conv.weight)
    err_full = rel(TensorialConv2d.from_conv(conv, fam, rank=full).dense_weight(), conv.weight)
    assert 1e-3 < err_low < 1.0  # a real (lossy) approximation, not garbage
    assert err_full < 1e-10


# ---------------------------------------------------------------------------------------
# 2. random-init forward == F.conv2d with the rebuilt kernel
# ---------------------------------------------------------------------------------------
# (kernel, stride, padding, dilation)
GEOMETRIES = [
    (3, 1, 1, 1),
    ((3, 1), 2, 0, 1),
    ((1, 3), 1, (0, 1), 2),
    (5, 2, 2, 1),
    (2, 1, "same", 1),
    ((2, 3), 1, "same", 2),
    (3, 1, "valid", 1),
    ((4, 2), (2, 1), (1, 3), (1, 2)),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("geom", GEOMETRIES, ids=str)
@pytest.mark.parametrize("fam", NAMES)
def test_forward_matches_dense_reference(fam, geom):
    k, st, pad, dil = geom
    for (i, o), batch in (((4, 6), 1), ((6, 5), 3)):
        layer = TensorialConv2d(i, o, k, fam, rank=2, stride=st, padding=pad, dilation=dil,
                                dtype=F64)
        base = torch.randn(batch, 2 * i, 13, 22, dtype=F64)
        inputs = {
            "contiguous": base[:, :i, :11, :10].contiguous(),
            "channels_last": base[:, :i, :11, :10].contiguous(
                memory_format=torch.channels_last),
            "strided slice": base[:, ::2, :11, ::2][..., :10],
            "narrowed": base[:, 1:i + 1, 2:13, 3:13],
        }
        with torch.no_grad():
            for name, x in inputs.items():
                assert x.shape == (batch, i, 11, 10), name
                y, want = layer(x), reference(layer, x)
                assert y.shape == want.shape, name
                assert rel(y, want) <= 1e-12, (name, rel(y, want))


@pytest.mark.parametrize("fam", NAMES)
def test_forward_float32_and_uneven_ranks(fam):
    ranks = {"cp": 3, "tucker": (2, 3), "tt": (2, 3, 2), "tr": (1, 2, 3, 2), "rcp": 3}[fam]
    layer = TensorialConv2d(6, 4, 3, fam, rank=ranks, padding=1, stride=2)
    x = torch.randn(2, 6, 9, 8)
    with torch.no_grad():
        assert rel(layer(x), reference(layer, x)) <= 1e-5


@pytest.mark.parametrize("geom", [((3, 2), (2, 1), (1, 0), (1, 2)), (3, 1, "same", 2)],
                         ids=str)
@pytest.mark.parametrize("fam", NAMES)
def test_gradients_match_dense_reference(fam, geom):
    k, st, pad, dil = geom
    layer = TensorialConv2d(4, 6, k, fam, rank=2, stride=st, padding=pad, dilation=dil,
                            dtype=F64)
    x = torch.randn(3, 4, 9, 8, dtype=F64, requires_grad=True)
    params = [x, *layer.factors, layer.bias]
    y = layer(x)
    g = torch.randn_like(y)
    got = torch.autograd.grad((y * g).sum(), params)
    dense = rebuild(layer.family, list(layer.factors), 6, 4)  # same factor tensors
    want_y = F.conv2d(x, dense, layer.bias, layer.stride, layer.padding, layer.dilation)
    want = torch.autograd.grad((want_y * g).sum(), params)
    for p, a, b in zip(params, got, want):
        assert a.shape == p.shape
        assert rel(a, b) <= 1e-10


@pytest.mark.parametrize("fam", ["cp", "tucker", "tt", "tr"])
def test_result_keeps_the_input_layout(fam):
    """Intermediates run channels innermost; the result has the input's memory layout (so a
    later .view() on an NCHW result still works), and equals the dense reference both ways."""
    layer = TensorialConv2d(8, 12, 3, fam, rank=3, padding=1, stride=(1, 2), dtype=F64)
    x = torch.randn(2, 8, 9, 10, dtype=F64)
    xcl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y, ycl = layer(x), layer(xcl)
        want = reference(layer, x)
    assert y.is_contiguous()
    assert ycl.is_contiguous(memory_format=torch.channels_last) and not ycl.is_contiguous()
    assert rel(y, want) <= 1e-12 and rel(ycl, want) <= 1e-12
    y.view(2, -1)  # would raise on a channels_last result


@pytest.mark.parametrize("fam", NAMES)
def test_compiled_plan_reused_across_dtypes_and_layouts(fam):
    """The plan is compiled on the first call for a shape; later calls with another dtype or
    layout of the same shape still give the reference result."""
    layer = TensorialConv2d(6, 6, 3, fam, rank=2, padding=1)
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        first = layer(x)
        again = layer(x)
        assert torch.equal(first, again)
        layer64 = layer.double()
        x64 = x.double().contiguous(memory_format=torch.channels_last)
        assert rel(layer64(x64), reference(layer64, x64)) <= 1e-12
        assert rel(layer64(x.double()), reference(layer64, x.double())) <= 1e-12


def test_forward_never_rebuilds_the_dense_kernel(monkeypatch):
    layers = [TensorialConv2d(4, 6, 3, fam, rank=2, padding=1) for fam in NAMES]
    x = torch.randn(1, 4, 6, 6)
    want = [reference(layer, x) for layer in layers]

    def boom(*a, **k):
        raise AssertionError("forward rebuilt the dense kernel")

    monkeypatch.setattr(tensorial_mod, "rebuild", boom)
    for layer, w in zip(layers, want):
        assert rel(layer(x), w) <= 1e-5


# ---------------------------------------------------------------------------------------
# 3. compression -> ranks, and errors
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [1.5, 3, 7, 12])
@pytest.mark.parametrize("fam", NAMES)
def test_compression_picks_largest_ranks_within_budget(fam, c):
    o, s, kh, kw = 18, 12, 3, 3
    layer = TensorialConv2d(s, o, 3, fam, compression=c, rank_multiple=1)
    dense = o * s * kh * kw
    fam_ = FAMILIES[fam]
    assert layer.weight_params == fam_.params(layer.ranks, o, s, kh, kw)
    assert layer.weight_params <= dense / c
    assert layer.compression >= c
    assert layer.compression == pytest.approx(dense / layer.weight_params)
    if fam != "tucker":  # uniform ranks: one more would break the budget
        t = layer.ranks[0]
        assert layer.ranks == (t,) * fam_.n_ranks
        assert fam_.params((t + 1,) * fam_.n_ranks, o, s, kh, kw) > dense / c


@pytest.mark.parametrize("fam", NAMES)
@pytest.mark.parametrize("multiple", [4, 8, 16])
def test_rank_multiple_rounds_channel_ranks_down(fam, multiple):
    o, s, c = 96, 64, 4
    free = TensorialConv2d(s, o, 3, fam, compression=c, rank_multiple=1)
    layer = TensorialConv2d(s, o, 3, fam, compression=c, rank_multiple=multiple)
    assert layer.compression >= c
    if fam in ("cp", "tucker", "tt"):  # ranks are channel counts: aligned
        for r, r0 in zip(layer.ranks, free.ranks):
            if r0 >= 2 * multiple:
                assert r % multiple == 0 and r0 - multiple < r <= r0
            else:
                assert r == r0
    else:  # tr bonds multiply, rcp ranks are not channels: untouched
        assert layer.ranks == free.ranks
    assert TensorialConv2d(s, o, 3, fam, rank=free.ranks, rank_multiple=multiple).ranks == \
        free.ranks  # an explicit rank is taken as given


@pytest.mark.parametrize("bad", [0, -8, 2.5, True])
def test_bad_rank_multiple_raises(bad):
    with pytest.raises(ConvgapError, match="rank_multiple"):
        TensorialConv2d(64, 64, 3, "tucker", compression=4, rank_multiple=bad)


@pytest.mark.parametrize("fam", ["cp", "rcp"])
def test_compression_single_rank_families_exact_boundary(fam):
    o, s, kh, kw = 16, 8, 3, 3
    for c in (2, 4, 8):
        r = TensorialConv2d(s, o, 3, fam, compression=c, rank_multiple=1).ranks[0]
        shapes = FAMILIES[fam].shapes((r,), o, s, kh, kw)
        per_rank = sum(math.prod(sh) for sh in shapes) // r  # params are linear in rank
        assert r * per_rank <= o * s * kh * kw / c < (r + 1) * per_rank


@pytest.mark.parametrize("fam", NAMES)
def test_impossible_compression_raises(fam):
    with pytest.raises(ConvgapError, match="cannot compress") as ei:
        TensorialConv2d(4, 4, 3, fam, compression=10000)
    assert "less compression" in str(ei.value)


@pytest.mark.parametrize("bad", [0, -2, "10"])
def test_bad_compression_value_raises(bad):
    with pytest.raises(ConvgapError, match="compression"):
        TensorialConv2d(4, 4, 3, "cp", compression=bad)


def test_rank_and_compression_exactly_one():
    with pytest.raises(ConvgapError, match="exactly one of rank= or compression="):
        TensorialConv2d(4, 4, 3, "cp")
    with pytest.raises(ConvgapError, match="exactly one of rank= or compression="):
        TensorialConv2d(4, 4, 3, "cp", rank=2, compression=2)


def test_unknown_factorization_lists_names():
    with pytest.raises(ConvgapError, match="unknown factorization 'svd'") as ei:
        TensorialConv2d(4, 4, 3, "svd", rank=2)
    for name in NAMES:
        assert name in str(ei.value)
    with pytest.raises(ConvgapError):
        family("CP ")


def test_bad_ranks_raise():
    with pytest.raises(ConvgapError, match="4 ints"):
        TensorialConv2d(4, 4, 3, "tr", rank=(1, 2))
    with pytest.raises(ConvgapError, match=">= 1"):
        TensorialConv2d(4, 4, 3, "tt", rank=(2, 0, 2))
    with pytest.raises(ConvgapError):
        TensorialConv2d(4, 4, 3, "cp", rank=True)


def test_tensor_ring_ranks_beyond_first_unfolding_raise():
    conv = nn.Conv2d(4, 4, 3)
    with pytest.raises(ConvgapError, match="tensor-ring") as ei:
        TensorialConv2d.from_conv(conv, "tr", rank=(2, 3, 2, 2))  # 2*3 > 4 input channels
    assert "lower the rank" in str(ei.value)


@pytest.mark.parametrize("rank,reachable", [((1, 4, 20, 4), (1, 4, 12, 4)),
                                            ((1, 2, 2, 8), (1, 2, 2, 4))])
def test_tensor_ring_later_ranks_too_large_raise_naming_the_reachable_ones(rank, reachable):
    conv = nn.Conv2d(4, 4, 3).to(F64)
    with pytest.raises(ConvgapError, match=re.escape(f"gives at most {reachable}")) as ei:
        TensorialConv2d.from_conv(conv, "tr", rank=rank)
    assert "lower the ranks" in str(ei.value)


@pytest.mark.parametrize("rank,effective", [((1, 5, 5), (1, 3, 4)), ((2, 9, 4), (2, 6, 4))])
def test_tt_from_conv_nonuniform_ranks_zero_pad(rank, effective):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3).to(F64)
    want = TensorialConv2d.from_conv(conv, "tt", rank=effective).dense_weight()
    layer = TensorialConv2d.from_conv(conv, "tt", rank=rank)
    assert layer.ranks == rank
    assert rel(layer.dense_weight(), want) <= 1e-9


def test_tucker_more_rank_never_hurts():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3).to(F64)
    err = lambda r: rel(TensorialConv2d.from_conv(conv, "tucker", rank=r).dense_weight(),
                        conv.weight)
    assert err((5, 3)) <= err((4, 3)) + 1e-9
    assert err((3, 5)) <= err((3, 4)) + 1e-9


def test_input_and_config_errors():
    layer = TensorialConv2d(4, 6, 3, "cp", rank=2)
    with pytest.raises(ConvgapError, match=r"\(N, 4, H, W\)"):
        layer(torch.randn(1, 5, 8, 8))
    with pytest.raises(ConvgapError, match=r"\(N, 4, H, W\)"):
        layer(torch.randn(4, 8, 8))
    with pytest.raises(ConvgapError, match=r"\(N, 4, H, W\)"):
        TensorialConv2d(4, 6, 3, "rcp", rank=2)(torch.randn(1, 6, 8, 8))
    with pytest.raises(ConvgapError, match="stride 1"):
        TensorialConv2d(4, 6, 3, "cp", rank=2, padding="same", stride=2)
    with pytest.raises(ConvgapError, match="padding"):
        TensorialConv2d(4, 6, 3, "cp", rank=2, padding="full")
    with pytest.raises(ConvgapError, match="groups=2"):
        TensorialConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), "cp", rank=2)
    with pytest.raises(ConvgapError, match="reflect"):
        TensorialConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                                  "cp", rank=2)
    with pytest.raises(ConvgapError, match="nn.Conv2d"):
        TensorialConv2d.from_conv(nn.Linear(4, 4), "cp", rank=2)


# ---------------------------------------------------------------------------------------
# 4. MACs
# ---------------------------------------------------------------------------------------
def brute_force_macs(expr: str, shapes, outlen: dict) -> int:
    """Minimum MACs over every binary contraction tree, by the rule in DESIGN.md: a step
    costs the product of its modes' lengths, a mode convolved in the step costs
    output length x kernel length; modes nobody else needs are summed for free."""
    lhs, rest = expr.split("->")
    out, conv = rest.split("|")
    ops = lhs.split(",")
    dims = [dict(zip(o, s)) for o, s in zip(ops, shapes)]
    holders = {m: [i for i, o in enumerate(ops) if m in o] for m in set("".join(ops))}

    def modes(S):
        res = {}
        for i in sorted(S):
            for m in ops[i]:
                if m in res or (m not in out and all(j in S for j in holders[m])):
                    continue
                both = m in conv and all(j in S for j in holders[m])
                res[m] = outlen[m] if both else dims[i][m]
        return res

    def cost(A, B):
        ma, mb = modes(A), modes(B)
        c = 1
        for m in set(ma) | set(mb):
            if m in conv and m in ma and m in mb:
                c *= outlen[m] * dims[holders[m][1]][m]
            else:
                c *= ma.get(m, mb.get(m))
        return c

    @lru_cache(None)
    def best(S):
        if len(S) == 1:
            return 0
        items = sorted(S)
        first, others = items[0], items[1:]
        top = math.inf
        for mask in range(1 << len(others)):
            A = frozenset([first] + [o for j, o in enumerate(others) if mask >> j & 1])
            B = S - A
            if B:
                top = min(top, best(A) + best(B) + cost(A, B))
        return top

    return best(frozenset(range(len(ops))))


# (in, out, kernel, stride, padding, dilation, rank, input HxW)
MAC_CASES = [
    (16, 24, 3, 1, 1, 1, 3, (15, 17)),
    (16, 24, (3, 5), 2, (1, 2), 1, 4, (15, 17)),
    (12, 10, 3, 1, "same", 2, 2, (9, 11)),
    (9, 15, (1, 3), 1, "valid", 1, 5, (8, 8)),
]


def _outlen(layer, hw):
    if layer.padding == "same":
        return {"h": hw[0], "w": hw[1]}
    pad = (0, 0) if layer.padding == "valid" else layer.padding
    return {m: out_len(hw[j], layer.kernel_size[j], layer.stride[j], pad[j],
                       layer.dilation[j]) for j, m in enumerate("hw")}


@pytest.mark.parametrize("case", MAC_CASES, ids=str)
@pytest.mark.parametrize("fam", NAMES)
def test_macs_equal_optimal_order_and_executed_ops(fam, case):
    i, o, k, st, pad, dil, r, hw = case
    layer = TensorialConv2d(i, o, k, fam, rank=r, stride=st, padding=pad, dilation=dil,
                            bias=False, objective="flops")
    shape = (2, i, *hw)
    info = layer.path(shape)
    macs = layer.macs(shape)
    assert macs == info.macs == sum(s.macs for s in info.steps)
    # independent: exhaustive search over every contraction order with the documented rule
    assert macs == brute_force_macs(layer.expression, info.shapes, _outlen(layer, hw))
    # independent: what torch actually executes (bmm + convolution FLOPs). A step that
    # sums nothing and convolves nothing (an outer product such as rh,rw->rhw) may run as
    # a broadcast multiply, which the FLOP counter does not see (or as a bmm, which it does).
    elementwise = sum(st.macs for st in info.steps
                      if not st.convolved and not set(st.left + st.right) - set(st.result))
    assert elementwise <= macs // 100
    # A per-channel convolution step (nothing summed, one operand's modes inside the
    # other's, e.g. brhw,rh->brhw) runs as shifted multiply-adds, also unseen by the counter.
    elementwise += sum(st.macs for st in info.steps
                       if st.convolved and not set(st.left + st.right) - set(st.result)
                       and (set(st.left) <= set(st.right) or set(st.right) <= set(st.left)))
    x = torch.randn(shape)
    with FlopCounterMode(display=False) as fc:
        y = layer(x)
    assert 2 * (macs - elementwise) <= fc.get_total_flops() <= 2 * macs
    assert y.shape[-2:] == tuple(_outlen(layer, hw).values())


@pytest.mark.parametrize("shape", [(2, 8, 9, 11), (1, 8, 32, 32)], ids=str)
@pytest.mark.parametrize("fam", NAMES)
def test_auto_objective_takes_combo_within_the_mac_slack(fam, shape):
    """The default objective ('auto') runs einsum_path's combo optimum when it costs at most
    AUTO_MAC_SLACK more MACs than the flops optimum, else the flops optimum; either way
    the result equals the dense reference."""
    from convgap import einsum_path
    from convgap.layers.tensorial import AUTO_MAC_SLACK
    layer = TensorialConv2d(8, 10, 3, fam, rank=3, padding=1, stride=(2, 1), dtype=F64)
    assert layer.objective == "auto"
    info = layer.path(shape)
    x = torch.randn(shape, dtype=F64)
    operands = [layer._input(x), *layer.factors]
    combo = einsum_path(layer.expression, *operands, objective="combo", **layer._conv_args())
    flops = einsum_path(layer.expression, *operands, objective="flops", **layer._conv_args())
    want = combo if combo.macs <= (1 + AUTO_MAC_SLACK) * flops.macs else flops
    assert info.path == want.path and info.macs == want.macs >= flops.macs
    with torch.no_grad():
        assert rel(layer(x), reference(layer, x)) <= 1e-12


def test_bad_objective_raises():
    with pytest.raises(ConvgapError, match="objective must be one of"):
        TensorialConv2d(4, 4, 3, "cp", rank=2, objective="speed")


def test_cp_macs_hand_formula():
    B, S, O, R, H, W = 2, 16, 24, 4, 15, 17
    (kh, kw), (sh, sw), (ph, pw) = (3, 5), (2, 2), (1, 2)
    layer = TensorialConv2d(S, O, (kh, kw), "cp", rank=R, stride=(sh, sw), padding=(ph, pw),
                            objective="flops")
    OH, OW = out_len(H, kh, sh, ph, 1), out_len(W, kw, sw, pw, 1)
    assert (OH, OW) == (8, 9)
    h_first = B * R * OH * W * kh + B * R * OH * OW * kw
    w_first = B * R * H * OW * kw + B * R * OH * OW * kh
    # x.A (contract s), the two 1-D convolutions (cheaper order), then .D (contract r)
    hand = B * S * H * W * R + min(h_first, w_first) + B * O * R * OH * OW
    assert hand == 32640 + 3264 + 2880 + 13824
    assert layer.macs((B, S, H, W)) == hand
    dense = B * O * S * OH * OW * kh * kw
    assert hand < dense / 10


@pytest.mark.parametrize("fam", NAMES)
def test_macs_far_below_dense_at_high_compression(fam):
    layer = TensorialConv2d(64, 64, 3, fam, compression=20, padding=1)
    dense = 1 * 64 * 64 * 9 * 32 * 32
    macs = layer.macs((1, 64, 32, 32))
    if fam == "rcp":
        # reshaped CP saves parameters, not arithmetic: its (h, w) factor is a full 3x3
        # convolution over rank x (o1 or s1) channels, so only ~1.8x fewer MACs here
        assert macs < dense / 1.5, (fam, macs, dense)
    else:
        assert macs < dense / 15, (fam, macs, dense)


# ---------------------------------------------------------------------------------------
# 5. FlattenedConv2d
# ---------------------------------------------------------------------------------------
FLAT_GEOMS = [
    (3, 1, 1, 1),
    ((3, 1), 2, 0, 1),
    ((1, 3), 1, (0, 1), 2),
    (5, 2, 2, 1),
    ((2, 4), (2, 1), (1, 3), (1, 2)),
    (3, 2, 3, 2),  # padding larger than the kernel reach: columns of pure padding
]


@pytest.mark.parametrize("repeats", [1, 2, 3])
@pytest.mark.parametrize("geom", FLAT_GEOMS, ids=str)
def test_flattened_equals_its_three_convolutions_as_written(geom, repeats):
    k, st, pad, dil = geom
    layer = FlattenedConv2d(4, 5, k, repeats, st, pad, dil, dtype=F64)
    with torch.no_grad():
        for b in layer.biases:
            b.normal_()  # non-zero lateral, vertical and horizontal biases
    x = torch.randn(2, 4, 13, 12, dtype=F64)
    xs = torch.randn(2, 8, 13, 24, dtype=F64)[:, ::2, :, ::2]
    for inp in (x, x.contiguous(memory_format=torch.channels_last), xs):
        layer.as_written = False
        merged = layer(inp)
        layer.as_written = True
        plain = layer(inp)
        assert merged.shape == plain.shape
        assert rel(merged, plain) <= 1e-12


@pytest.mark.parametrize("as_written", [False, True])
def test_flattened_result_keeps_the_input_layout(as_written):
    layer = FlattenedConv2d(4, 6, 3, 1, 1, 1, 1, dtype=F64, as_written=as_written)
    with torch.no_grad():
        for b in layer.biases:
            b.normal_()
        x = torch.randn(2, 4, 9, 8, dtype=F64)
        y = layer(x)
        ycl = layer(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous()
    assert ycl.is_contiguous(memory_format=torch.channels_last)
    assert rel(y, ycl) <= 1e-12


def test_flattened_gradients_with_biases():
    """Forward adds biases in place on its own intermediates: gradients must still equal
    those of the three plain convolutions."""
    layer = FlattenedConv2d(3, 4, 3, 2, 1, 1, 1, dtype=F64)
    with torch.no_grad():
        for b in layer.biases:
            b.normal_()
    x = torch.randn(2, 3, 7, 6, dtype=F64, requires_grad=True)
    params = [x, *layer.parameters()]
    g = torch.randn(2, 4, 7, 6, dtype=F64)
    layer.as_written = False
    got = torch.autograd.grad((layer(x) * g).sum(), params)
    layer.as_written = True
    want = torch.autograd.grad((layer(x) * g).sum(), params)
    for a, b in zip(got, want):
        assert rel(a, b) <= 1e-10


def test_flattened_as_written_is_the_three_convolutions():
    layer = FlattenedConv2d(3, 4, (3, 5), 1, (2, 1), (1, 2), (1, 2), dtype=F64,
                            as_written=True)
    with torch.no_grad():
        layer.biases[0].normal_()
    b = layer.biases[0]
    x = torch.randn(2, 3, 10, 11, dtype=F64)
    y = F.conv2d(x, layer.lateral[0][:, :, None, None], b[0])
    y = F.conv2d(y, layer.vertical[0][:, None, :, None], b[1], (2, 1), (1, 0), (1, 1), 4)
    y = F.conv2d(y, layer.horizontal[0][:, None, None, :], b[2], (1, 1), (0, 2), (1, 2), 4)
    assert rel(layer(x), y) <= 1e-12
    layer.as_written = False
    assert rel(layer(x), y) <= 1e-12
    # without biases the layer is a conv with the rank-1-per-channel dense kernel
    nb = FlattenedConv2d(3, 4, (3, 5), 1, (2, 1), (1, 2), (1, 2), bias=False, dtype=F64)
    assert rel(nb(x), F.conv2d(x, nb.dense_weight(), None, (2, 1), (1, 2), (1, 2))) <= 1e-12


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cin,cout,k,repeats", [(4, 5, 3, 1), (3, 8, (3, 5), 2), (6, 2, (1, 4), 3)])
def test_flattened_parameter_count(cin, cout, k, repeats, bias):
    layer = FlattenedConv2d(cin, cout, k, repeats, bias=bias)
    kh, kw = nn.modules.utils._pair(k)
    want = 0
    for r in range(repeats):
        c_in = cin if r == 0 else cout
        # docstring: C_in*C_out + 3*C_out + k_h*C_out + k_w*C_out per repeat
        want += c_in * cout + (3 * cout if bias else 0) + kh * cout + kw * cout
    assert sum(p.numel() for p in layer.parameters()) == want
    assert layer.weight_params == want - (3 * cout * repeats if bias else 0)


def test_flattened_macs_hand_count():
    layer = FlattenedConv2d(4, 5, (3, 5), 2, stride=2, padding=(1, 2), bias=False,
                            as_written=True)
    x = torch.randn(2, 4, 11, 13)
    # repeat 0: lateral on 11x13; vertical (stride 2, pad 1) -> 6 rows x 13 cols;
    # horizontal (stride 2, pad 2) -> 6 x 7.  repeat 1 (stride 1): 6x7 -> 6x7 -> 6x7
    want = (2 * 5 * 4 * 11 * 13 + 2 * 5 * 6 * 13 * 3 + 2 * 5 * 6 * 7 * 5
            + 2 * 5 * 5 * 6 * 7 + 2 * 5 * 6 * 7 * 3 + 2 * 5 * 6 * 7 * 5)
    assert want == 15620
    assert layer.macs(x.shape) == want
    with FlopCounterMode(display=False) as fc:
        y = layer(x)
    assert y.shape == (2, 5, 6, 7)
    assert fc.get_total_flops() == 2 * want


def _rank1_conv(o, s, k, dtype, **kw):
    conv = nn.Conv2d(s, o, k, **kw).to(dtype)
    kh, kwid = conv.kernel_size
    with torch.no_grad():
        for j in range(o):
            conv.weight[j] = torch.einsum("s,h,w->shw", torch.randn(s, dtype=dtype),
                                          torch.randn(kh, dtype=dtype),
                                          torch.randn(kwid, dtype=dtype))
    return conv


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kw", [dict(k=3, padding=1), dict(k=(3, 2), stride=2, padding=(1, 0)),
                                dict(k=(1, 5), dilation=2, padding=(0, 3), bias=False)],
                         ids=str)
def test_flattened_from_conv_rank1_is_exact(kw, dtype):
    kw = dict(kw)
    k = kw.pop("k")
    conv = _rank1_conv(6, 5, k, dtype, **kw)
    for as_written in (False, True):
        layer = FlattenedConv2d.from_conv(conv, as_written=as_written)
        assert layer.approximation_error < 1e-6
        x = torch.randn(2, 5, 9, 10, dtype=dtype)
        with torch.no_grad():
            assert rel(layer(x), conv(x)) <= (1e-4 if dtype == torch.float32 else 1e-10)
        assert rel(layer.dense_weight(), conv.weight) <= 1e-4


def test_flattened_from_conv_general_filter_reports_error():
    torch.manual_seed(3)
    conv = nn.Conv2d(5, 4, 3, padding=1).to(F64)
    layer = FlattenedConv2d.from_conv(conv)
    err = rel(layer.dense_weight(), conv.weight)
    assert 0.05 < layer.approximation_error < 1.0
    assert layer.approximation_error == pytest.approx(err, rel=1e-6)


def test_flattened_from_conv_with_a_zero_filter():
    conv = _rank1_conv(4, 3, 3, F64, padding=1)
    with torch.no_grad():
        conv.weight[1] = 0
    layer = FlattenedConv2d.from_conv(conv)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    assert rel(layer(x), conv(x)) <= 1e-10


def test_flattened_errors():
    with pytest.raises(ConvgapError, match="repeats"):
        FlattenedConv2d(3, 4, 3, repeats=0)
    with pytest.raises(ConvgapError, match="padding"):
        FlattenedConv2d(3, 4, 3, padding="same")
    with pytest.raises(ConvgapError, match=r"\(N, 3, H, W\)"):
        FlattenedConv2d(3, 4, 3)(torch.randn(1, 4, 8, 8))
    with pytest.raises(ConvgapError, match="repeats=1"):
        FlattenedConv2d(3, 4, 3, repeats=2).dense_weight()
    with pytest.raises(ConvgapError, match="groups=1"):
        FlattenedConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConvgapError, match="numeric padding"):
        FlattenedConv2d.from_conv(nn.Conv2d(4, 4, 3, padding="same"))


# ---------------------------------------------------------------------------------------
# state dicts and init
# ---------------------------------------------------------------------------------------
def _roundtrip(src: nn.Module, dst: nn.Module, x: torch.Tensor):
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == set(dst.state_dict())
    with torch.no_grad():
        assert not torch.equal(src(x), dst(x))
        dst.load_state_dict(state)
        assert torch.equal(src(x), dst(x))


@pytest.mark.parametrize("fam", NAMES)
def test_tensorial_state_dict_roundtrip(fam):
    torch.manual_seed(0)
    a = TensorialConv2d(6, 4, 3, fam, rank=2, padding=1)
    torch.manual_seed(1)
    b = TensorialConv2d(6, 4, 3, fam, rank=2, padding=1)
    _roundtrip(a, b, torch.randn(2, 6, 7, 7))
    assert b.ranks == a.ranks


@pytest.mark.parametrize("repeats", [1, 2])
def test_flattened_state_dict_roundtrip(repeats):
    torch.manual_seed(0)
    a = FlattenedConv2d(4, 5, (3, 5), repeats, padding=(1, 2))
    torch.manual_seed(1)
    b = FlattenedConv2d(4, 5, (3, 5), repeats, padding=(1, 2))
    _roundtrip(a, b, torch.randn(2, 4, 8, 9))


@pytest.mark.parametrize("fam", NAMES)
def test_tensorial_init_variance_close_to_conv_default(fam):
    torch.manual_seed(0)
    conv_var = nn.Conv2d(32, 48, 3).weight.var().item()
    assert conv_var == pytest.approx(1 / (3 * 32 * 9), rel=0.05)
    ratios = []
    for seed in range(3):
        torch.manual_seed(seed)
        layer = TensorialConv2d(32, 48, 3, fam, rank=8)
        ratios.append(layer.dense_weight().var().item() / conv_var)
    for r in ratios:
        assert 1 / 3 < r < 3, (fam, ratios)
    bound = 1 / math.sqrt(32 * 9)
    assert layer.bias.abs().max().item() <= bound


def test_flattened_inference_state_follows_changes():
    """In inference the rank-1 kernel v h^T is built once and the lateral weight packed
    once; in-place changes and replaced tensors are followed; copies start afresh."""
    import copy
    layer = FlattenedConv2d(12, 10, 3, padding=1, stride=2, bias=False)
    x = torch.randn(2, 12, 9, 9).contiguous(memory_format=torch.channels_last)

    def check(m):
        with torch.no_grad():
            assert rel(m(x), F.conv2d(x, m.dense_weight(), None, 2, 1)) <= 1e-5
    check(layer)
    check(layer)
    kernel = layer._cache[0]["kernel"][2]
    with torch.no_grad():
        layer(x)
    assert layer._cache[0]["kernel"][2] is kernel  # reused
    with torch.no_grad():
        layer.vertical[0].mul_(-2.0)
    check(layer)
    assert layer._cache[0]["kernel"][2] is not kernel
    kernel = layer._cache[0]["kernel"][2]
    layer.horizontal[0].data = torch.randn_like(layer.horizontal[0])
    check(layer)
    assert layer._cache[0]["kernel"][2] is not kernel
    assert copy.deepcopy(layer)._cache == [{}]
    # gradients: no kernel reuse, the graph goes through v and h
    layer.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.vertical[0].grad is not None and layer.horizontal[0].grad is not None


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_trace_after_inference_calls_follows_the_parameters():
    """Kept inference state (packed weights, v h^T, weight-only step results) never enters
    a trace: a traced layer reads its parameters, so a later change is followed."""
    x = torch.randn(2, 16, 10, 10).contiguous(memory_format=torch.channels_last)
    for layer in (TensorialConv2d(16, 16, 3, "cp", rank=6, padding=1, objective="combo"),
                  TensorialConv2d(16, 16, 3, "tucker", rank=(8, 8), padding=1),
                  FlattenedConv2d(16, 16, 3, padding=1)):
        layer.eval()
        with torch.no_grad():
            for _ in range(3):
                layer(x)  # compile the steps, keep inference state
            traced = torch.jit.trace(layer, x)
            assert rel(traced(x), layer(x)) <= 1e-6
            for i, p in enumerate(layer.parameters()):
                p.mul_(-1.0 - i)
            assert rel(traced(x), layer(x)) <= 1e-6, type(layer).__name__


@pytest.mark.parametrize("fam", NAMES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_tensorial_output_keeps_the_input_layout(torch_steps, fam, channels_last):
    """Like nn.Conv2d, an NCHW input gives an NCHW-contiguous result and a channels_last
    one a channels_last result (TT's and TR's last step convolves a channels-innermost
    intermediate, whose output was channels innermost even for NCHW inputs)."""
    from convgap import TensorialConv2d
    layer = TensorialConv2d(12, 10, 3, fam, rank=2, padding=1).eval()
    x = torch.randn(2, 12, 7, 6)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    with torch.no_grad():
        y = layer(x)
    assert y.is_contiguous(memory_format=fmt)
    ref = F.conv2d(x, layer.dense_weight(), layer.bias, padding=1)
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-4)
