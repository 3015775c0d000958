"""convgap.kernels.cpu.pdp.inverted_residual: a MobileNetV2 inverted residual block (1x1
expand, activation, depthwise, activation, 1x1 project, residual add; batch norms folded)
in one pass of the pdp kernel, against a float64 torch reference, for both memory formats;
its errors; its epilogues with the scratch ending at an unmapped page; and the same
epilogues through ``pdp.bind`` without the second 1x1 (a flattened convolution's form)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convgap.errors import ConvgapError
from convgap.kernels import cpu
from convgap.kernels.cpu import common, pdp
from scratch_guard import run_guarded

pytestmark = pytest.mark.skipif(not cpu.available(),
                                reason="no AVX-512 CPU or no C compiler here")

TORCH_ACTS = {"none": lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu,
              "sigmoid": torch.sigmoid}


def reference(x, a, d, b, bias1, bias2, bias, stride, padding, dilation, act1, act2,
              residual, squeeze=None):
    """The block as torch ops in float64 (with a pdp.Squeeze: an MBConv block)."""
    def f64(t):
        return None if t is None else t.double()
    x64 = x.double()
    u = TORCH_ACTS[act1](F.conv2d(x64, f64(a).t()[..., None, None], f64(bias1)))
    v = TORCH_ACTS[act2](F.conv2d(u, f64(d)[:, None], f64(bias2), stride, padding, dilation,
                                  groups=d.shape[0]))
    if squeeze is not None:
        sq = squeeze
        t = TORCH_ACTS[sq.act](F.linear(v.mean((2, 3)), f64(sq.reduce), f64(sq.reduce_bias)))
        v = v * TORCH_ACTS[sq.gate](F.linear(t, f64(sq.expand), f64(sq.expand_bias)))[
            :, :, None, None]
    y = F.conv2d(v, f64(b)[..., None, None], f64(bias))
    return y + x64 if residual else y


def relative_error(y, ref) -> float:
    """max |y - ref| / max |ref|"""
    return ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def block(n, c, r, o, h, w, k, with_bias2, channels_last, scale=3.0):
    """x and the block's weights, scaled so that the first intermediate has a standard
    deviation of about ``scale`` (relu6 clips, silu sees both tails)."""
    x = torch.randn(n, c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a = torch.randn(c, r) * scale / c ** 0.5
    d = torch.randn(r, k, k) / k
    b = torch.randn(o, r) / r ** 0.5
    bias1, bias, bias2 = torch.randn(r), torch.randn(o), \
        torch.randn(r) if with_bias2 else None
    return x, a, d, b, bias1, bias2, bias


# (n, c, r, o, h, w, kernel, stride, bias2): MobileNetV2's widths (R not a multiple of 16
# but 144), both filter sizes, several bands per image (h 37 at w 9: bands of 11 rows)
GEOMETRIES = [
    (1, 16, 24, 16, 14, 13, 3, 1, True),
    (3, 24, 144, 24, 9, 10, 3, 1, False),
    (1, 32, 40, 32, 11, 11, 5, 1, True),
    (3, 96, 40, 96, 7, 6, 3, 1, True),
    (1, 24, 144, 24, 37, 9, 3, 1, False),
    (3, 24, 144, 32, 12, 11, 3, 2, True),
    (1, 16, 40, 24, 13, 13, 5, 2, False),
    (3, 32, 24, 96, 10, 9, 5, 2, True),
]


@pytest.mark.parametrize("act", list(common.ACTIVATIONS))
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_matches_the_torch_block(act, channels_last, residual):
    """Every geometry (the residual where its shapes allow it), act1 = act2 = ``act``, and
    the mixed pair (act, relu6); the result in x's memory format."""
    for n, c, r, o, h, w, k, s, with_bias2 in GEOMETRIES:
        if residual and (c != o or s != 1):
            continue
        x, a, d, b, bias1, bias2, bias = block(n, c, r, o, h, w, k, with_bias2,
                                               channels_last)
        for act1, act2 in ((act, act), (act, "relu6")):
            with torch.no_grad():
                y = pdp.inverted_residual(x, a, d, b, bias1=bias1, bias2=bias2, bias=bias,
                                          stride=s, padding=k // 2, act1=act1, act2=act2,
                                          residual=residual)
            ref = reference(x, a, d, b, bias1, bias2, bias, s, k // 2, 1, act1, act2,
                            residual)
            assert y.shape == ref.shape
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert y.is_contiguous(memory_format=fmt)
            err = relative_error(y, ref)
            assert err <= 1e-5, (n, c, r, o, h, w, k, s, act1, act2, err)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_any_thread_count_gives_the_same_result(threads, channels_last):
    """Threads split the rows mid-image, each computing its own window's first rows: act1
    is applied once to every row, kept or recomputed."""
    x, a, d, b, bias1, bias2, bias = block(2, 24, 40, 24, 29, 7, 3, True, channels_last)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            y = pdp.inverted_residual(x, a, d, b, bias1=bias1, bias2=bias2, bias=bias,
                                      padding=1, act1="silu", act2="relu6", residual=True)
    finally:
        torch.set_num_threads(before)
    ref = reference(x, a, d, b, bias1, bias2, bias, 1, 1, 1, "silu", "relu6", True)
    assert relative_error(y, ref) <= 1e-5


def test_activation_codes_match_act_h():
    """common.ACTIVATIONS mirrors act.h's ACT_ codes (names and numbers)."""
    text = (Path(common.__file__).parent / "act.h").read_text()
    codes = {name.lower(): int(code)
             for name, code in re.findall(r"#define ACT_(\w+) (\d+)", text)}
    assert codes == common.ACTIVATIONS


@pytest.mark.parametrize("act", ["relu", "relu6", "silu", "sigmoid"])
def test_activations_elementwise(act):
    """Identity weights make the block its activation alone: each element within 3e-7 of
    torch's (relative), over [-100, 100] and at 1e30 and -1e30, with no inf or NaN."""
    x = torch.linspace(-100, 100, 16 * 40 * 25).reshape(1, 16, 40, 25)
    x[0, 0, 0, :2] = torch.tensor([1e30, -1e30])
    eye, one = torch.eye(16), torch.ones(16, 1, 1)
    for where in ("act1", "act2"):
        with torch.no_grad():
            y = pdp.inverted_residual(x, eye, one, eye, **{where: act})
        ref = TORCH_ACTS[act](x.double())
        assert torch.isfinite(y).all()
        diff, big = (y.double() - ref).abs(), ref.abs() > 1e-30
        assert (diff[big] / ref.abs()[big]).max().item() <= 3e-7
        # silu's and sigmoid's far negative tail: 0 below -80, where it is under 2e-33
        assert diff[~big].max().item() <= 2e-33


def test_rejects_bad_inputs():
    x, a, d, b, bias1, bias2, bias = block(1, 16, 24, 16, 8, 8, 3, True, False)
    f = pdp.inverted_residual
    with pytest.raises(ConvgapError, match="unknown activation 'gelu'"):
        f(x, a, d, b, act1="gelu")
    with pytest.raises(ConvgapError, match="unknown activation"):
        f(x, a, d, b, act2=None)
    with pytest.raises(ConvgapError, match="residual add needs"):
        f(x, a, d, b[:8], padding=1, residual=True)  # C 16 -> O 8
    with pytest.raises(ConvgapError, match="residual add needs"):
        f(x, a, d, b, stride=2, padding=1, residual=True)
    with pytest.raises(ConvgapError, match="residual add needs"):
        f(x, a, d, b, padding=0, residual=True)  # 8x8 -> 6x6
    with pytest.raises(ConvgapError, match="bias2 must have shape"):
        f(x, a, d, b, bias2=torch.randn(23))
    with pytest.raises(ConvgapError, match="bias1 must have shape"):
        f(x, a, d, b, bias1=torch.randn(16))
    with pytest.raises(ConvgapError, match="channel counts"):
        f(x, a, d, b[:, :20])
    with pytest.raises(ConvgapError, match="float32"):
        f(x, a, d, b, bias2=bias2.double())
    with pytest.raises(ConvgapError, match="no backward"):
        f(x, a.requires_grad_(), d, b)
    with pytest.raises(ConvgapError, match="planar kernel runs no activations"):
        pdp.bind(x, a.detach(), d, b, None, (1, 1), (1, 1), (1, 1), {}, True, act1="relu")


def squeeze_of(r: int, s: int, act: str = "silu", gate: str = "sigmoid") -> pdp.Squeeze:
    return pdp.Squeeze(torch.randn(s, r) / r ** 0.5, torch.randn(s),
                       torch.randn(r, s) / s ** 0.5, torch.randn(r), act, gate)


# (n, c, r, o, h, w, kernel, stride, S): EfficientNet-B0's shapes scaled down; several
# bands per image, images split between threads, R not a multiple of 16
SE_GEOMETRIES = [
    (1, 16, 96, 24, 14, 14, 3, 2, 4),
    (2, 24, 144, 24, 12, 11, 3, 1, 6),
    (3, 40, 240, 40, 7, 9, 5, 1, 10),
    (1, 16, 40, 16, 37, 9, 5, 1, 20),
    (2, 8, 8, 4, 10, 10, 3, 1, 2),
]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_squeeze_excitation_matches_the_torch_block(threads, channels_last):
    """An MBConv block (the gate computed between the kernel's two passes): every
    geometry, the residual where its shapes allow it, against float64 torch, with 1-3
    threads (the depthwise output's mean summed over the threads' ranges)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, c, r, o, h, w, k, s, rows in SE_GEOMETRIES:
            x, a, d, b, bias1, bias2, bias = block(n, c, r, o, h, w, k, True, channels_last,
                                                   scale=1.0)
            sq = squeeze_of(r, rows)
            residual = c == o and s == 1
            with torch.no_grad():
                y = pdp.inverted_residual(x, a, d, b, bias1=bias1, bias2=bias2, bias=bias,
                                          stride=s, padding=k // 2, act1="silu",
                                          act2="silu", residual=residual, squeeze=sq)
            ref = reference(x, a, d, b, bias1, bias2, bias, s, k // 2, 1, "silu", "silu",
                            residual, sq)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert y.shape == ref.shape and y.is_contiguous(memory_format=fmt)
            assert relative_error(y, ref) <= 1e-5, (n, c, r, o, h, w, k, s, rows)
    finally:
        torch.set_num_threads(before)


def test_squeeze_ignores_what_the_scratch_held():
    """Channels past R (the padding of R up to 16 lanes, which no GEMM writes) hold
    whatever the scratch held before: NaNs there must not reach the gate."""
    x, a, d, b, bias1, bias2, bias = block(1, 16, 40, 16, 20, 9, 3, True, True, scale=1.0)
    sq = squeeze_of(40, 20)
    store: dict = {}
    kwargs = dict(bias1=bias1, bias2=bias2, bias=bias, padding=1, act1="silu", act2="silu",
                  squeeze=sq, store=store)
    ref = reference(x, a, d, b, bias1, bias2, bias, 1, 1, 1, "silu", "silu", False, sq)
    with torch.no_grad():
        pdp.inverted_residual(x, a, d, b, **kwargs)
        # the thread's scratch (shared by every kernel call), as the call left it
        common.scratch(store, 1).fill_(float("nan"))
        y = pdp.inverted_residual(x, a, d, b, **kwargs)
    assert relative_error(y, ref) <= 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_without_the_first_conv_the_depthwise_step_reads_x(channels_last):
    """a None: no expansion (R = C), act1 on x's rows, both layouts, with and without a
    squeeze-excitation; the same as an identity expansion."""
    x, _, d, b, _, bias2, bias = block(2, 24, 24, 24, 13, 11, 3, True, channels_last)
    eye = torch.eye(24)
    for sq in (None, squeeze_of(24, 6)):
        with torch.no_grad():
            y = pdp.bind(x, None, d, b, bias, (1, 1), (1, 1), (1, 1), {}, bias2=bias2,
                         act1="relu", act2="silu", residual=True, squeeze=sq)(x)
        ref = reference(x, eye, d, b, None, bias2, bias, 1, 1, 1, "relu", "silu", True, sq)
        assert relative_error(y, ref) <= 1e-5
    with pytest.raises(ConvgapError, match=r"needs 16 input channels \(got 24\)"):
        pdp.bind(x, None, d[:16], b[:, :16], bias, (1, 1), (1, 1), (1, 1), {})
    with pytest.raises(ConvgapError, match="no bias1"):
        pdp.bind(x, None, d, b, bias, (1, 1), (1, 1), (1, 1), {}, bias1=bias2)


def test_squeeze_activations_are_applied():
    """The squeeze's own activations (relu, and a relu6 'gate') reach the result."""
    x, a, d, b, bias1, bias2, bias = block(2, 16, 32, 16, 9, 9, 3, True, True, scale=1.0)
    sq = squeeze_of(32, 8, "relu", "relu6")
    with torch.no_grad():
        y = pdp.inverted_residual(x, a, d, b, bias1=bias1, bias2=bias2, bias=bias, padding=1,
                                  act1="relu6", act2="relu6", residual=True, squeeze=sq)
    ref = reference(x, a, d, b, bias1, bias2, bias, 1, 1, 1, "relu6", "relu6", True, sq)
    assert relative_error(y, ref) <= 1e-5


def test_rejects_a_bad_squeeze():
    x, a, d, b, bias1, bias2, bias = block(1, 16, 24, 16, 8, 8, 3, True, False)
    good = squeeze_of(24, 6)
    f = pdp.inverted_residual
    with pytest.raises(ConvgapError, match=r"squeeze.reduce must have shape"):
        f(x, a, d, b, squeeze=good._replace(reduce=torch.randn(6, 20)))
    with pytest.raises(ConvgapError, match=r"squeeze.expand must have shape \(24, 6\)"):
        f(x, a, d, b, squeeze=good._replace(expand=torch.randn(6, 24)))
    with pytest.raises(ConvgapError, match=r"squeeze.expand_bias must have shape"):
        f(x, a, d, b, squeeze=good._replace(expand_bias=torch.randn(6)))
    with pytest.raises(ConvgapError, match="unknown activation 'gelu'"):
        f(x, a, d, b, squeeze=good._replace(gate="gelu"))
    with pytest.raises(ConvgapError, match="float32"):
        f(x, a, d, b, squeeze=good._replace(reduce_bias=good.reduce_bias.double()))
    with pytest.raises(ConvgapError, match="give b"):
        pdp.bind(x, a, d, None, None, (1, 1), (1, 1), (1, 1), {}, squeeze=good)


def test_bind_defaults_leave_the_plain_kernel_and_store_follows_bias2():
    """bind without the new arguments runs the plain three convolutions; one store serves
    calls with and without a depthwise bias (each gets its own prepared weights)."""
    x, a, d, b, bias1, bias2, bias = block(2, 16, 24, 20, 9, 8, 3, True, True)
    store: dict = {}
    args = (x, a, d, b, bias, (1, 1), (1, 1), (1, 1), store)
    with torch.no_grad():
        plain = pdp.bind(*args)
        assert (plain.args.act1, plain.args.act2, plain.args.residual) == (0, 0, 0)
        assert plain.args.bias2 is None
        y = plain(x)
        with_bias2 = pdp.bind(*args, bias2=bias2, act2="relu")(x)
        again = pdp.bind(*args)(x)
    ref = reference(x, a, d, b, None, None, bias, 1, 1, 1, "none", "none", False)
    assert relative_error(y, ref) <= 1e-5 and torch.equal(again, y)
    ref2 = reference(x, a, d, b, None, bias2, bias, 1, 1, 1, "none", "relu", False)
    assert relative_error(with_bias2, ref2) <= 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_without_the_second_conv_the_depthwise_epilogue_applies(channels_last):
    """The flattened form (no b): act2(depthwise(act1(x @ a + bias1)) + bias2) + map,
    with the residual add where C = R."""
    x, a, d, _, bias1, bias2, _ = block(2, 12, 12, 12, 10, 9, 3, True, channels_last)
    omap = torch.randn(9, 12)
    with torch.no_grad():
        y = pdp.bind(x, a, d, None, None, (1, 1), (1, 1), (1, 1), {}, False, bias1, omap,
                     bias2=bias2, act1="relu6", act2="silu", residual=True)(x)
    u = F.relu6(F.conv2d(x.double(), a.double().t()[..., None, None], bias1.double()))
    v = F.silu(F.conv2d(u, d.double()[:, None], bias2.double(), 1, 1, groups=12))
    ref = v + omap.double().t()[None, :, None, :] + x.double()
    assert relative_error(y, ref) <= 1e-5


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 2), c=st.integers(1, 20), r=st.integers(1, 40),
       o=st.integers(1, 20), h=st.integers(1, 9), w=st.integers(1, 9),
       k=st.sampled_from([1, 3, 5]), s=st.integers(1, 2), p=st.integers(0, 2),
       dil=st.integers(1, 2), act1=st.sampled_from(list(common.ACTIVATIONS)),
       act2=st.sampled_from(list(common.ACTIVATIONS)), with_bias2=st.booleans(),
       residual=st.booleans(), channels_last=st.booleans())
def test_small_random_blocks(n, c, r, o, h, w, k, s, p, dil, act1, act2, with_bias2,
                             residual, channels_last):
    out_h = (h + 2 * p - dil * (k - 1) - 1) // s + 1
    out_w = (w + 2 * p - dil * (k - 1) - 1) // s + 1
    if out_h < 1 or out_w < 1:
        return
    if residual:
        o = c
    x, a, d, b, bias1, bias2, bias = block(n, c, r, o, h, w, k, with_bias2, channels_last)
    kwargs = dict(bias1=bias1, bias2=bias2, bias=bias, stride=s, padding=p, dilation=dil,
                  act1=act1, act2=act2, residual=residual)
    if residual and (s != 1 or out_h != h or out_w != w):
        with pytest.raises(ConvgapError, match="residual add needs"):
            pdp.inverted_residual(x, a, d, b, **kwargs)
        return
    with torch.no_grad():
        y = pdp.inverted_residual(x, a, d, b, **kwargs)
    ref = reference(x, a, d, b, bias1, bias2, bias, s, p, dil, act1, act2, residual)
    assert relative_error(y, ref) <= 1e-5


_GUARDED = r"""
for threads in (1, 2, 3):
    torch.set_num_threads(threads)
    for n, h, w, cl in [(2, 17, 11, False), (2, 17, 11, True), (1, 9, 13, False),
                        (1, 7, 7, True)]:
        x = torch.randn(n, 24, h, w)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        a, d, b = torch.randn(24, 40), torch.randn(40, 3, 3), torch.randn(24, 40)
        bias, bias2 = torch.randn(40), torch.randn(40)
        run(lambda s: pdp.inverted_residual(x, a, d, b, bias1=bias, bias2=bias2,
                                            bias=bias[:24], padding=1, act1="silu",
                                            act2="relu6", residual=True, store=s))
        run(lambda s: pdp.inverted_residual(x, a, d, b[:20], bias2=bias2, stride=2,
                                            padding=1, act1="relu", act2="silu", store=s))
        run(lambda s: pdp.bind(x, a[:, :24], d[:24], None, None, (1, 1), (1, 1), (1, 1), s,
                               False, bias[:24], None, bias2=bias2[:24], act1="silu",
                               act2="silu", residual=True)(x))
        sq = pdp.Squeeze(torch.randn(10, 40), torch.randn(10), torch.randn(40, 10),
                         torch.randn(40))
        run(lambda s: pdp.inverted_residual(x, a, d, b, bias1=bias, bias2=bias2,
                                            bias=bias[:24], padding=1, act1="silu",
                                            act2="silu", residual=True, squeeze=sq,
                                            store=s))
        run(lambda s: pdp.inverted_residual(x, a, d, b[:20], stride=2, padding=1,
                                            act1="relu", act2="silu", squeeze=sq, store=s))
        run(lambda s: pdp.bind(x, None, d[:24], b[:, :24], bias[:24], (1, 1), (1, 1),
                               (1, 1), s, act2="silu", residual=True,
                               squeeze=pdp.Squeeze(sq.reduce[:, :24], sq.reduce_bias,
                                                   sq.expand[:24], sq.expand_bias[:24]))(x))
"""


def test_epilogues_stay_within_the_scratch(tmp_path):
    """With the scratch ending at an unmapped page, blocks with every epilogue (1-3
    threads, both layouts, stride 1 with the residual and 2 without, the flattened form,
    the squeeze-excitation's two passes, no first 1x1) run with the same results as usual."""
    run_guarded(tmp_path, _GUARDED)
