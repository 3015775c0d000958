"""The shared runtime (convgap.ops): each helper that replaced several copies is checked on
every caller's cases against torch (the FFT conv and the tap-by-tap depthwise conv of the
conv algorithms, 2-D, and of the einsum steps, 1-3 spatial dims), plus the guard, the
layouts, the output-size formula and oneDNN packing."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from convgap.errors import ConvgapError
from convgap.ops import guard, layouts, memo, onednn
from convgap.ops.depthwise import depthwise_taps, tap_weights
from convgap.ops.fft import fft_conv, fft_size, kernel_spectrum
from convgap.ops.sizes import conv_length

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).abs().max() / ref.abs().max()).item()


def _reference(x, w, bias, stride, pads, dilation, groups):
    """torch's convolution with (before, after) zero padding per spatial dim."""
    flat = [v for pad in reversed(pads) for v in pad]
    return CONV[x.dim() - 2](F.pad(x, flat), w, bias, stride, 0, dilation, groups)


@pytest.mark.parametrize("n, k, s, pad, d", [
    (7, 3, 1, (1, 1), 1), (8, 3, 2, (1, 1), 1), (9, 5, 2, (2, 1), 2), (5, 5, 1, (0, 0), 1),
    (4, 7, 3, (3, 0), 1), (3, 5, 1, (0, 0), 1)])
def test_conv_length_is_torchs(n, k, s, pad, d):
    x, w = torch.zeros(1, 1, n + pad[0] + pad[1]), torch.zeros(1, 1, k)
    if conv_length(n, k, s, pad, d) < 1:
        with pytest.raises(RuntimeError):
            F.conv1d(x, w, stride=s, dilation=d)
        return
    assert F.conv1d(x, w, stride=s, dilation=d).shape[-1] == conv_length(n, k, s, pad, d)


# -- FFT: the conv algorithm's cases (2-D, groups, stride, dilation, bias, channels_last)
# -- and the einsum steps' (1-3 spatial dims, stride 1, asymmetric padding, no bias)
FFT_CASES = [
    # (x shape, w shape, stride, pads, dilation, groups, bias, channels_last)
    ((2, 6, 13, 11), (4, 6, 5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1), 1, True, False),
    ((2, 6, 13, 11), (4, 6, 5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1), 1, True, True),
    ((1, 6, 16, 17), (6, 2, 3, 5), (2, 3), ((1, 1), (0, 0)), (2, 1), 3, False, False),
    ((2, 4, 9, 9), (8, 1, 7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1), 4, True, True),  # depthwise
    ((3, 5, 31), (7, 5, 9), (1,), ((4, 2),), (1,), 1, False, False),                # 1-D
    ((2, 4, 6, 7, 5), (4, 1, 3, 4, 2), (1, 1, 1), ((1, 0), (2, 1), (0, 1)), (1, 1, 1), 4,
     False, False),                                                                   # 3-D
]


@pytest.mark.parametrize("case", FFT_CASES)
def test_fft_conv_matches_torch(case):
    xs, ws, stride, pads, dilation, groups, with_bias, cl = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*xs, generator=g)
    w = torch.randn(*ws, generator=g)
    bias = torch.randn(ws[0], generator=g) if with_bias else None
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = _reference(x.double(), w.double(), None if bias is None else bias.double(), stride,
                     pads, dilation, groups)
    y = fft_conv(x, w, stride, pads, dilation, groups, bias)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert _rel(y.double(), ref) < 1e-5
    # the result keeps a channels_last input's layout, else it is contiguous
    assert y.is_contiguous(memory_format=torch.channels_last if cl else
                           torch.contiguous_format)
    y64 = fft_conv(x.double(), w.double(), stride, pads, dilation, groups,
                   None if bias is None else bias.double())
    assert y64.dtype == torch.float64 and _rel(y64, ref) < 1e-12


def test_fft_conv_uses_a_prepared_spectrum_only_for_its_size():
    """A spectrum prepared for one padded size is used there and recomputed for another."""
    x = torch.randn(1, 3, 10, 10)
    w = torch.randn(2, 3, 3, 3)
    pads = ((1, 1), (1, 1))
    size = (fft_size(12), fft_size(12))
    spectrum = kernel_spectrum(w, 1, (1, 1), size)
    ref = F.conv2d(x, w, padding=1)
    assert _rel(fft_conv(x, w, (1, 1), pads, (1, 1), 1, None, (spectrum, size)), ref) < 1e-5
    wrong = (torch.zeros_like(spectrum), size)  # a zero spectrum gives zeros where used
    assert fft_conv(x, w, (1, 1), pads, (1, 1), 1, None, wrong).abs().max() == 0
    bigger = torch.randn(1, 3, 20, 13)
    assert _rel(fft_conv(bigger, w, (1, 1), pads, (1, 1), 1, None, wrong),
                F.conv2d(bigger, w, padding=1)) < 1e-5


def test_fft_size_is_the_next_7_smooth_length():
    assert [fft_size(n) for n in (1, 11, 13, 31, 62, 97, 121)] == [1, 12, 14, 32, 63, 98, 125]


# -- tap-by-tap depthwise: the conv algorithm's cases (2-D, multiplier, bias, either internal
# -- layout) and the einsum steps' (1-3 spatial dims, asymmetric padding, channels-major)
DW_CASES = [
    # (x shape, multiplier, kernel, stride, pads, dilation, bias)
    ((2, 5, 9, 8), 1, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), True),
    ((2, 5, 9, 8), 3, (3, 3), (2, 1), ((1, 1), (2, 2)), (1, 2), True),
    ((1, 4, 7, 7), 2, (5, 3), (1, 2), ((0, 0), (0, 0)), (1, 1), False),
    ((3, 6, 17), 1, (5,), (1,), ((3, 1),), (1,), False),                    # 1-D
    ((2, 3, 5, 6, 4), 1, (3, 1, 2), (1, 1, 1), ((1, 1), (0, 0), (1, 0)), (1, 1, 1), False),
]


@pytest.mark.parametrize("case", DW_CASES)
@pytest.mark.parametrize("nhwc", [False, True])
def test_depthwise_taps_match_torch(case, nhwc):
    xs, mult, kernel, stride, pads, dilation, with_bias = case
    g = torch.Generator().manual_seed(1)
    c = xs[1]
    x = torch.randn(*xs, generator=g)
    w = torch.randn(c * mult, 1, *kernel, generator=g)
    bias = torch.randn(c * mult, generator=g) if with_bias else None
    ref = _reference(x.double(), w.double(), None if bias is None else bias.double(), stride,
                     pads, dilation, c)
    for taps in (tap_weights(w, c), tap_weights(w, c).contiguous()):  # a view, or kept
        y = depthwise_taps(x, taps, kernel, stride, pads, dilation,
                           None if bias is None else bias.reshape(c, mult), nhwc)
        assert y.shape == ref.shape and _rel(y.double(), ref) < 1e-5
        # nhwc: channels-innermost memory; else channels-major contiguous
        assert y.movedim(1, -1).is_contiguous() if nhwc else y.is_contiguous()


def test_depthwise_taps_take_strided_inputs():
    """A sliced (strided) input, as the einsum steps pass them, gives torch's result."""
    x = torch.randn(2, 8, 12, 12)[:, ::2, 1:, ::2]
    w = torch.randn(4, 1, 3, 3)
    ref = F.conv2d(x, w, padding=1, groups=4)
    for nhwc in (False, True):
        y = depthwise_taps(x, tap_weights(w, 4), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1),
                           None, nhwc)
        assert _rel(y, ref) < 1e-5


# -- the guard


def test_may_run_fast_needs_no_gradients():
    x, w = torch.randn(2, 3), torch.randn(3, 3)
    wg = w.clone().requires_grad_()
    assert guard.may_run_fast(x, (w, None))
    assert not guard.may_run_fast(x, (w, wg))
    assert not guard.may_run_fast(x.clone().requires_grad_())
    with torch.no_grad():
        assert guard.may_run_fast(x.clone().requires_grad_(), (wg, None))
    assert guard.may_run_fast(x, iter([w]))  # any iterable (a parameter dict's values)


def test_may_run_fast_is_false_while_tracing():
    seen = []

    def f(x):
        seen.append((guard.may_run_fast(x), guard.exporting(), guard.jit_tracing()))
        with guard.untraced():
            seen.append(guard.jit_tracing())
        return x * 2
    with torch.no_grad():
        torch.jit.trace(f, torch.randn(2), check_trace=False)
    assert seen == [(False, True, True), False]
    assert guard.may_run_fast(torch.randn(2)) and not guard.exporting()


def test_frozen_parameters_marks_parameters_without_gradients():
    p = torch.nn.Parameter(torch.randn(2))
    q = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    t = torch.randn(2)
    assert guard.frozen_parameters([p, q, t]) == 0b010
    with torch.no_grad():
        assert guard.frozen_parameters([p, q, t]) == 0b011


# -- layouts


def test_layouts():
    x = torch.randn(2, 3, 4, 5)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert [layouts.layout_of(t) for t in (x, cl, x[:, :, ::2])] == \
        ["nchw", "channels_last", "strided"]
    assert layouts.channels_last(cl) and not layouts.channels_last(x)
    assert layouts.channels_innermost(cl) and not layouts.channels_innermost(x)
    # N-d and permuted views: channels innermost whatever torch's memory-format names say
    x3 = torch.randn(2, 4, 3, 5, 6)
    assert layouts.channels_innermost(x3.movedim(1, -1).contiguous().movedim(-1, 1))
    assert not layouts.channels_innermost(torch.randn(2, 1, 4, 4))  # one channel
    assert layouts.memory_format("channels_last") is torch.channels_last
    assert layouts.memory_format("nchw") is torch.contiguous_format
    with pytest.raises(ConvgapError, match="unknown layout"):
        layouts.memory_format("nhwc")


# -- oneDNN packing: the conv algorithm's and linear layer's cases (contiguous parameters,
# -- a dtype for the linear) and the einsum steps' (permuted weight views)

needs_onednn = pytest.mark.skipif(not onednn.AVAILABLE, reason="torch without oneDNN")


@needs_onednn
@pytest.mark.parametrize("permuted", [False, True])
def test_packed_linear_matches_f_linear(permuted):
    x = torch.randn(10, 24)
    w = torch.randn(24, 16).t() if permuted else torch.randn(16, 24)
    b = torch.randn(16)
    packed = onednn.pack_linear(w, 10, torch.float32)
    y = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
    assert _rel(y, F.linear(x, w, b)) < 1e-5
    store: dict = {}
    assert _rel(onednn.linear(x, w, store), x @ w.t()) < 1e-5
    first = store["w"][2]
    assert onednn.linear(x, w, store) is not None and store["w"][2] is first  # reused


@needs_onednn
@pytest.mark.parametrize("permuted, groups", [(False, 1), (True, 1), (False, 4)])
def test_packed_conv_matches_f_conv2d(permuted, groups):
    x = torch.randn(2, 8, 9, 9)
    if permuted:
        w = torch.randn(3, 3, 8 // groups, 12).permute(3, 2, 0, 1)  # a view, as einsum's
    else:
        w = torch.randn(12, 8 // groups, 3, 3)
    b = torch.randn(12)
    packed = onednn.pack_conv(w, (1, 1), (2, 1), (1, 1), groups, x.shape)
    y = torch.ops.mkldnn._convolution_pointwise(x, packed, b, [1, 1], [2, 1], [1, 1],
                                                groups, "none", [], "")
    ref = F.conv2d(x, w, b, (2, 1), 1, 1, groups)
    assert _rel(y, ref) < 1e-5
    y = onednn.conv(x, w, (1, 1), (2, 1), (1, 1), groups, {}, b)
    assert _rel(y, ref) < 1e-5


def test_unsupported_says_why():
    assert "CPU only" in onednn.unsupported("cuda", "float32", "linear")
    why = onednn.unsupported("cpu", "float16", "convolution")
    assert ("does not take float16" if onednn.AVAILABLE else "without oneDNN") in why


def test_reuse_weight_gives_up_on_weights_built_every_call():
    store: dict = {}
    builds = []
    w = torch.randn(3)
    for _ in range(3):  # the same weight: built once
        memo.reuse_weight(store, w, 1, lambda: builds.append(1) or w * 2)
    assert len(builds) == 1
    for i in itertools.count():  # a new weight every call: a miss each, then None
        got = memo.reuse_weight(store, torch.randn(3), 1, lambda: torch.zeros(1))
        if got is None:
            break
    assert i == memo.MAX_MISSES and store["misses"] == memo.MAX_MISSES
    assert memo.reuse_weight(None, w, 1, lambda: w) is None
