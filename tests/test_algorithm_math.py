"""The convolution algorithms (im2col, winograd_f2/f4, fft, depthwise) agree with F.conv2d
over their supported space, for any input layout, in fp32 (within each algorithm's
documented tolerance) and fp64 (tight); they refuse what they cannot run with a reason, and
gradients through prepare/run equal F.conv2d's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

from convgap.algorithms import depthwise, fft, im2col, registry, winograd  # noqa: F401
from convgap.algorithms.spec import ConvSpec

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
LAYOUTS = ["nchw", "channels_last", "sliced", "transposed"]


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| (an all-zero reference, e.g. a stride that only samples
    padding, is compared absolutely at the 1e-3 scale)."""
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-3)).item()


def conditioned_error(y: torch.Tensor, conv: nn.Conv2d, x: torch.Tensor) -> float:
    """max |y - exact| / max (|x| * |w| + |b|): the error against a float64 reference,
    relative to the magnitude of the products summed (the scale of a dot product's
    rounding error). Unlike max |exact|, it does not blow up when a small output is the
    difference of large terms (a 6-channel 3x3 map to 1 channel read 1.006e-4 by max |ref|
    for Winograd F(4x4, 3x3), whose error against the products is 100x smaller). The
    conv's own forward runs both, so any padding mode is honoured."""
    exact_conv = copy.deepcopy(conv).double()
    abs_conv = copy.deepcopy(conv).double()
    with torch.no_grad():
        for p in abs_conv.parameters():
            p.abs_()
        xd = x.detach().double()
        exact, scale = exact_conv(xd), abs_conv(xd.abs())
    return ((y.detach().double() - exact).abs().max() / scale.max().clamp_min(1e-3)).item()


def make_input(n, c, h, w, layout, dtype):
    if layout == "nchw":
        return torch.randn(n, c, h, w, dtype=dtype)
    if layout == "channels_last":
        return torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
    if layout == "sliced":   # a view into a bigger tensor: offset, non-contiguous rows
        return torch.randn(n, c + 1, h + 1, w + 2, dtype=dtype)[:, 1:, 1:, 2:]
    return torch.randn(n, c, w, h, dtype=dtype).transpose(2, 3)[..., ::1]  # W-major strides


def check(name, conv, x, tol=None):
    """Run algorithm ``name`` on ``conv``/``x`` the registry way; compare with F.conv2d."""
    alg = registry.get(name)
    spec = ConvSpec.from_conv(conv, x)
    assert alg.supports(spec) is None, alg.supports(spec)
    with torch.no_grad():
        ref = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                       conv.groups)
        y = alg.run(x, alg.prepare(conv.weight, conv.bias, spec), spec)
    assert y.shape == ref.shape and y.dtype == x.dtype
    if tol is None:
        tol = alg.tolerance if x.dtype == torch.float32 else 1e-10
    err = conditioned_error(y, conv, x)
    assert err <= tol, (name, err, spec.short())
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last), name
    return y


dtypes = st.sampled_from([torch.float32, torch.float64])
layouts = st.sampled_from(LAYOUTS)


@st.composite
def general_cases(draw):
    """Any nn.Conv2d with symmetric integer padding."""
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 4))
    cout = groups * draw(st.integers(1, 4))
    k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    h = draw(st.integers(dilation[0] * (k[0] - 1) + 1, 14))
    w = draw(st.integers(dilation[1] * (k[1] - 1) + 1, 14))
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=draw(st.booleans()))
    return conv, (draw(st.integers(1, 3)), cin, h, w)


@pytest.mark.parametrize("name", ["im2col", "fft"])
@settings(max_examples=35, **SETTINGS)
@given(case=general_cases(), layout=layouts, dtype=dtypes)
def test_general_algorithms_match_conv2d(name, case, layout, dtype):
    conv, shape = case
    check(name, conv.to(dtype), make_input(*shape, layout, dtype))


@st.composite
def winograd_cases(draw):
    cin, cout = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    pad = draw(st.integers(0, 2))
    h, w = draw(st.integers(3 - 2 * pad, 13)), draw(st.integers(3 - 2 * pad, 13))
    conv = nn.Conv2d(cin, cout, 3, padding=pad, bias=draw(st.booleans()))
    return conv, (draw(st.integers(1, 3)), cin, max(h, 1), max(w, 1))


@pytest.mark.parametrize("name", ["winograd_f2", "winograd_f4"])
@settings(max_examples=40, **SETTINGS)
@given(case=winograd_cases(), layout=layouts, dtype=dtypes, graph=st.booleans())
def test_winograd_matches_conv2d(name, case, layout, dtype, graph):
    """Both code paths: the in-place one (no_grad) and the functional one (autograd)."""
    conv, shape = case
    conv = conv.to(dtype)
    x = make_input(*shape, layout, dtype)
    if not graph:
        check(name, conv, x)
        return
    alg = registry.get(name)
    spec = ConvSpec.from_conv(conv, x)
    x = x.requires_grad_()
    y = alg.run(x, alg.prepare(conv.weight, conv.bias, spec), spec)
    ref = conv(x)
    assert y.shape == ref.shape
    assert conditioned_error(y, conv, x) <= (alg.tolerance if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("name", ["winograd_f2", "winograd_f4"])
def test_winograd_functional_path_on_a_one_pixel_wide_transposed_input(name):
    """Regression (found by hypothesis): 1 channel, a 2x1 map with W-major strides and
    padding 2: the stacked tiles of the functional path are not viewable as a matrix."""
    conv = nn.Conv2d(1, 1, 3, padding=2, bias=False)
    x = make_input(1, 1, 2, 1, "transposed", torch.float32).requires_grad_()
    alg = registry.get(name)
    spec = ConvSpec.from_conv(conv, x)
    y = alg.run(x, alg.prepare(conv.weight, conv.bias, spec), spec)
    assert conditioned_error(y, conv, x) <= alg.tolerance


@st.composite
def depthwise_cases(draw):
    c, mult = draw(st.integers(1, 6)), draw(st.integers(1, 3))
    k = draw(st.sampled_from([(3, 3), (5, 5), (7, 7), (1, 1), (3, 5), (2, 2)]))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    h = draw(st.integers(dilation[0] * (k[0] - 1) + 1, 14))
    w = draw(st.integers(dilation[1] * (k[1] - 1) + 1, 14))
    conv = nn.Conv2d(c, c * mult, k, stride, padding, dilation, groups=c,
                     bias=draw(st.booleans()))
    return conv, (draw(st.integers(1, 3)), c, h, w)


@settings(max_examples=40, **SETTINGS)
@given(case=depthwise_cases(), layout=layouts, dtype=dtypes,
       internal=st.sampled_from([None, "nhwc", "nchw"]))
def test_depthwise_matches_conv2d(case, layout, dtype, internal):
    """Both internal layouts (the automatic choice and each one forced)."""
    conv, shape = case
    depthwise._INTERNAL = internal
    try:
        check("depthwise", conv.to(dtype), make_input(*shape, layout, dtype))
    finally:
        depthwise._INTERNAL = None


def test_depthwise_wide_nchw_map_stays_nchw():
    conv = nn.Conv2d(3, 6, 3, padding=1, groups=3)
    y = check("depthwise", conv, torch.randn(2, 3, 5, 40))     # OW >= 32: NCHW path
    assert y.is_contiguous()


# -- larger reductions: the fp32 error bounds the tolerances are set from ------------------
@pytest.mark.parametrize("name,c", [("winograd_f2", 512), ("winograd_f4", 512),
                                    ("fft", 256), ("im2col", 256)])
def test_error_within_tolerance_for_large_channel_counts(name, c):
    torch.manual_seed(1)
    conv = nn.Conv2d(c, 16, 3 if name.startswith("winograd") else 7, padding=1)
    check(name, conv, torch.randn(2, c, 12, 12))


def test_depthwise_convnext_shape_channels_last():
    conv = nn.Conv2d(32, 32, 7, padding=3, groups=32)
    x = torch.randn(2, 32, 14, 14).contiguous(memory_format=torch.channels_last)
    check("depthwise", conv, x)


@pytest.mark.parametrize("name", ["im2col", "winograd_f2", "winograd_f4", "fft", "depthwise"])
def test_half_precision_does_not_crash(name):
    c = 8
    conv = nn.Conv2d(c, c, 3, padding=1, groups=c if name == "depthwise" else 1)
    x = torch.randn(1, c, 9, 9)
    ref = conv(x)
    conv, x = conv.to(torch.bfloat16), x.to(torch.bfloat16)
    alg = registry.get(name)
    spec = ConvSpec.from_conv(conv, x)
    assert alg.supports(spec) is None
    with torch.no_grad():
        y = alg.run(x, alg.prepare(conv.weight, conv.bias, spec), spec)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert rel(y.float(), ref) < 5e-2


# -- what each algorithm refuses, and why ------------------------------------------------
def spec_of(conv, shape=(1, 8, 10, 10)):
    return ConvSpec.from_conv(conv, torch.empty(shape))


@pytest.mark.parametrize("name", ["winograd_f2", "winograd_f4"])
def test_winograd_refuses_with_reasons(name):
    alg = registry.get(name)
    assert alg.supports(spec_of(nn.Conv2d(8, 8, 3, padding=1))) is None
    for conv, word in [(nn.Conv2d(8, 8, 3, stride=2), "stride"),
                       (nn.Conv2d(8, 8, 5), "3x3"),
                       (nn.Conv2d(8, 8, 3, dilation=2), "dilation"),
                       (nn.Conv2d(8, 8, 3, groups=2), "groups"),
                       (nn.Conv2d(8, 8, 3, groups=8), "groups")]:
        reason = alg.supports(spec_of(conv))
        assert isinstance(reason, str) and word in reason, (conv, reason)


def test_depthwise_refuses_dense_and_grouped():
    alg = registry.get("depthwise")
    assert alg.supports(spec_of(nn.Conv2d(8, 16, 3, groups=8))) is None
    for conv in [nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 12, 3, groups=4)]:
        reason = alg.supports(spec_of(conv))
        assert isinstance(reason, str) and "depthwise" in reason


@pytest.mark.parametrize("name", ["im2col", "fft"])
def test_general_algorithms_support_everything(name):
    alg = registry.get(name)
    for conv in [nn.Conv2d(8, 8, 3, stride=2, dilation=2, groups=8),
                 nn.Conv2d(8, 4, (1, 7), padding=(0, 3), groups=2), nn.Conv2d(8, 8, 9)]:
        assert alg.supports(spec_of(conv)) is None
    assert "empty" in alg.supports(spec_of(nn.Conv2d(8, 8, 11)))


# -- Winograd matrices: the exact 1-D identity they must satisfy -------------------------
@pytest.mark.parametrize("m", [2, 4])
def test_winograd_matrices_compute_correlation(m):
    mats = winograd.winograd_matrices(m)
    d = torch.randn(m + 2, dtype=torch.float64)
    g = torch.randn(3, dtype=torch.float64)
    y = mats["AT"] @ ((mats["G"] @ g) * (mats["BT"] @ d))
    ref = torch.stack([(d[i:i + 3] * g).sum() for i in range(m)])
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


# -- gradients ---------------------------------------------------------------------------
GRAD_CASES = {
    "im2col": nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2),
    "winograd_f2": nn.Conv2d(3, 5, 3, padding=1),
    "winograd_f4": nn.Conv2d(3, 5, 3, padding=1),
    "fft": nn.Conv2d(4, 6, 5, stride=(1, 2), padding=2, dilation=(2, 1), groups=2),
    "depthwise": nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_backward_matches_conv2d(name, layout):
    torch.manual_seed(0)
    conv = GRAD_CASES[name].double()
    x = make_input(2, conv.in_channels, 9, 10, layout, torch.float64).requires_grad_()
    alg = registry.get(name)
    spec = ConvSpec.from_conv(conv, x)
    y = alg.run(x, alg.prepare(conv.weight, conv.bias, spec), spec)
    ref = conv(x)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, conv.weight, conv.bias), g)
    want = torch.autograd.grad(ref, (x, conv.weight, conv.bias), g)
    for a, b, what in zip(got, want, ("input", "weight", "bias")):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"{name} d/d{what}")


def test_fft_input_size_other_than_prepared():
    """The spectrum is prepared for the spec's size; another size is recomputed, not wrong."""
    conv = nn.Conv2d(3, 4, 5, padding=2)
    alg = registry.get("fft")
    spec = ConvSpec.from_conv(conv, torch.empty(1, 3, 12, 12))
    state = alg.prepare(conv.weight, conv.bias, spec)
    x = torch.randn(1, 3, 9, 11)
    with torch.no_grad():
        assert rel(alg.run(x, state, spec), conv(x)) < 1e-4


# -- exports: the algorithms marked exports='native' trace and export to ONNX -------------
@pytest.mark.parametrize("name", ["im2col", "winograd_f2", "winograd_f4", "depthwise"])
def test_native_algorithms_trace_and_export_to_onnx(name):
    import io
    import warnings

    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    alg = registry.get(name)
    assert alg.exports == "native"
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4 if name == "depthwise" else 1)
    conv = conv.eval().requires_grad_(False)
    x = torch.randn(1, 4, 9, 10)   # 9x10: a partial last Winograd tile
    spec = ConvSpec.from_conv(conv, x)

    class Run(nn.Module):
        def forward(self, x):
            return alg.run(x, alg.prepare(conv.weight, conv.bias, spec), spec)

    ref = conv(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rel(torch.jit.trace(Run(), x)(x), ref) < 1e-4
        buf = io.BytesIO()
        torch.onnx.export(Run(), (x,), buf, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    (out,) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})
    assert rel(torch.from_numpy(out), ref) < 1e-4


def test_fft_is_marked_fallback_for_export():
    assert registry.get("fft").exports == "fallback"   # no rfft2 in the TorchScript exporter


# -- the Winograd eager path reuses per-thread scratch buffers ---------------------------
@pytest.mark.parametrize("name", ["winograd_f2", "winograd_f4"])
def test_winograd_scratch_reuse_is_safe(name):
    """Same buffer shapes, other padding (the padding buffer's zero border must not carry
    data over), other weights, inference_mode then no_grad (inference tensors cannot be
    written outside inference mode)."""
    torch.manual_seed(0)
    a = nn.Conv2d(4, 5, 3, padding=1)    # 8x8 input, padding 1
    b = nn.Conv2d(4, 5, 3, padding=0)    # 10x10 input, padding 0: same padded size
    xa, xb = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 10, 10)
    with torch.inference_mode():
        check(name, a, xa)
        check(name, b, xb)
    for _ in range(2):
        check(name, a, xa)
        check(name, b, xb)
        check(name, a, xa.contiguous(memory_format=torch.channels_last))
    winograd.clear_workspace()
    check(name, b, xb)


def test_winograd_workspace_keeps_its_byte_count_and_evicts_oldest(monkeypatch):
    """The workspace's running byte count equals what it holds through reuse, growth past
    its limit and clearing; the least recently used buffer goes first."""
    ws = winograd._Workspace()
    monkeypatch.setattr(ws, "limit", 4000)
    like = torch.empty(0)

    def held():
        return sum(b.numel() * b.element_size() for b in ws.buffers.values())

    a = ws.get("a", (100,), like)                    # 400 bytes
    ws.get("b", (200,), like)                        # 800
    assert ws.get("a", (100,), like) is a            # reused, now most recent
    assert ws.nbytes == held() == 1200
    ws.get("c", (500,), like)                        # 2000: 3200 in all
    ws.get("d", (300,), like)                        # 1200: over 4000, 'b' (oldest) goes
    assert ("b", (200,)) not in [k[:2] for k in ws.buffers]
    assert ws.nbytes == held() == 3600                # 400 + 2000 + 1200
    z = ws.get("z", (2000,), like, zero=True)        # bigger than the limit alone: kept
    assert list(ws.buffers)[-1][0] == "z" and len(ws.buffers) == 1 and not z.any()
    assert ws.nbytes == held() == 8000
    ws.clear()
    assert ws.nbytes == held() == 0
