"""convgap.kernels.cpu: the fused C kernels (pointwise -> depthwise -> pointwise; pointwise ->
conv (-> conv along rows) -> pointwise) against float64 references of the convolutions they
replace, their errors, their weight stores, their build, and TensorialConv2d's CP, Tucker and
TT layers running on them."""

from __future__ import annotations

import contextlib
import ctypes
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convgap.errors import ConvgapError
from convgap.kernels import cpu
from convgap.kernels.cpu import args, build, common, pcp, pdp, planar, stem
from scratch_guard import run_guarded

needs_kernel = pytest.mark.skipif(not cpu.available(),
                                  reason="no AVX-512 CPU or no C compiler here")


def reference(x, a, d, b, bias, stride, padding, dilation):
    """The three convolutions in float64."""
    x, a, d, b = (t.double() for t in (x, a, d, b))
    u = F.conv2d(x, a.t()[..., None, None])
    v = F.conv2d(u, d[:, None], None, stride, padding, dilation, groups=d.shape[0])
    return F.conv2d(v, b[..., None, None], None if bias is None else bias.double())


def conditioned_error(y, x, a, d, b, bias, stride, padding, dilation):
    """max |y - ref| relative to the magnitude of the summed products (|x|, |a|, ... in
    the same convolutions), so a small output made of large terms is judged fairly."""
    ref = reference(x, a, d, b, bias, stride, padding, dilation)
    mag = reference(x.abs(), a.abs(), d.abs(), b.abs(), None if bias is None else bias.abs(),
                    stride, padding, dilation)
    return ((y.double() - ref).abs() / mag.clamp_min(1e-30)).max().item()


@needs_kernel
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), c=st.integers(1, 40), r=st.integers(1, 70),
       o=st.integers(1, 70), h=st.integers(1, 13), w=st.integers(1, 13),
       kh=st.sampled_from([1, 2, 3, 5, 7]), kw=st.sampled_from([1, 3, 4, 5, 7]),
       sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 3),
       pw=st.integers(0, 3), dh=st.integers(1, 2), dw=st.integers(1, 2),
       bias=st.booleans(), channels_last=st.booleans(),
       kernel=st.sampled_from(["auto", "nhwc", "planar"]))
def test_pdp_matches_the_three_convolutions(n, c, r, o, h, w, kh, kw, sh, sw, ph, pw, dh, dw,
                                            bias, channels_last, kernel):
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    x = torch.randn(n, c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a, d, b = torch.randn(c, r), torch.randn(r, kh, kw), torch.randn(o, r)
    bb = torch.randn(o) if bias else None
    args = ((sh, sw), (ph, pw), (dh, dw))
    if kernel == "planar" and sw != 1:  # (either layout)
        with pytest.raises(ConvgapError, match="planar kernel needs"):
            cpu.pointwise_depthwise_pointwise(x, a, d, b, bb, *args, kernel=kernel)
        return
    if out_h < 1 or out_w < 1:
        with pytest.raises(ConvgapError, match="does not fit"):
            cpu.pointwise_depthwise_pointwise(x, a, d, b, bb, *args, kernel=kernel)
        return
    with torch.no_grad():
        y = cpu.pointwise_depthwise_pointwise(x, a, d, b, bb, *args, kernel=kernel)
    assert y.shape == (n, o, out_h, out_w)
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    assert y.is_contiguous(memory_format=fmt)  # the input's memory format
    assert conditioned_error(y, x, a, d, b, bb, *args) < 1e-5


def pcp_reference(x, a, k1, b, bias, stride, padding, dilation, k2, second, groups=1):
    """The four convolutions in float64; groups share the filters (repeated per group)."""
    x, a, k1, b = (t.double() for t in (x, a, k1, b))
    v = F.conv2d(F.conv2d(x, a.t()[..., None, None]), k1.repeat(groups, 1, 1, 1), None, stride,
                 padding, dilation, groups=groups)
    if k2 is not None:
        s2, p2, d2 = second
        v = F.conv2d(v, k2.double().repeat(groups, 1, 1, 1), None, (1, s2), (0, p2), (1, d2),
                     groups=groups)
    return F.conv2d(v, b[..., None, None], None if bias is None else bias.double())


@needs_kernel
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), c=st.integers(1, 40), r1=st.integers(1, 40),
       r2=st.integers(1, 40), r3=st.integers(1, 40), o=st.integers(1, 70),
       h=st.integers(1, 12), w=st.integers(1, 12), kh=st.sampled_from([1, 2, 3, 5]),
       kw=st.sampled_from([1, 3, 4]), sh=st.integers(1, 3), sw=st.integers(1, 3),
       ph=st.integers(0, 3), pw=st.integers(0, 3), dh=st.integers(1, 2), dw=st.integers(1, 2),
       kw2=st.sampled_from([0, 1, 3, 5]), s2=st.integers(1, 2), p2=st.integers(0, 2),
       d2=st.integers(1, 2), groups=st.sampled_from([1, 1, 2, 5]), bias=st.booleans(),
       channels_last=st.booleans(), kernel=st.sampled_from(["auto", "nhwc", "planar"]))
def test_pcp_matches_the_convolutions(n, c, r1, r2, r3, o, h, w, kh, kw, sh, sw, ph, pw, dh,
                                      dw, kw2, s2, p2, d2, groups, bias, channels_last,
                                      kernel):
    if groups > 1:  # groups share the filters: width strides 1, fewer channels each
        sw = s2 = 1
        r1, r2, r3 = (1 + r % 8 for r in (r1, r2, r3))
    x = torch.randn(n, c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a, k1 = torch.randn(c, groups * r1), torch.randn(r2, r1, kh, kw)
    k2 = torch.randn(r3, r2, 1, kw2) if kw2 else None
    b = torch.randn(o, groups * (r3 if kw2 else r2))
    bb = torch.randn(o) if bias else None
    args = ((sh, sw), (ph, pw), (dh, dw), k2, (s2, p2, d2))
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w1 = out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if kw2:
        out_w = (w1 + 2 * p2 - d2 * (kw2 - 1) - 1) // s2 + 1
    if kw2 and kernel == "planar":  # the planar kernel's second filter: a first along columns
        k1, pw, args = k1[..., :1], 0, ((sh, sw), (ph, 0), (dh, dw), k2, (s2, p2, d2))
        w1 = out_w = w
        out_w = (w1 + 2 * p2 - d2 * (kw2 - 1) - 1) // s2 + 1
    planar_ok = sw == 1 and (not kw2 or (s2 == 1 and k1.shape[3] == 1 and pw == 0))
    if kernel == "planar" and not planar_ok:
        with pytest.raises(ConvgapError, match="planar kernel needs"):
            pcp.pointwise_conv_pointwise(x, a, k1, b, bb, *args[:3], k2, *args[4],
                                         groups=groups, kernel=kernel)
        return
    if out_h < 1 or w1 < 1 or out_w < 1:
        with pytest.raises(ConvgapError, match="do not fit"):
            pcp.pointwise_conv_pointwise(x, a, k1, b, bb, *args[:3], k2, *args[4],
                                         groups=groups, kernel=kernel)
        return
    with torch.no_grad():
        y = pcp.pointwise_conv_pointwise(x, a, k1, b, bb, *args[:3], k2, *args[4],
                                         groups=groups, kernel=kernel)
    ref = pcp_reference(x, a, k1, b, bb, *args, groups)
    mag = pcp_reference(x.abs(), a.abs(), k1.abs(), b.abs(), None if bb is None else bb.abs(),
                        *args[:3], None if k2 is None else k2.abs(), args[4], groups)
    assert y.shape == ref.shape
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    assert y.is_contiguous(memory_format=fmt)
    assert ((y.double() - ref).abs() / mag.clamp_min(1e-30)).max().item() < 1e-5


@needs_kernel
def test_pcp_rejects_bad_inputs():
    x = torch.randn(1, 8, 6, 6)
    a, k1, b = torch.randn(8, 5), torch.randn(4, 5, 3, 3), torch.randn(7, 4)
    f = pcp.pointwise_conv_pointwise
    with pytest.raises(ConvgapError, match="float32"):
        f(x, a.double(), k1, b)
    with pytest.raises(ConvgapError, match="channel counts"):
        f(x, a, torch.randn(4, 6, 3, 3), b)
    with pytest.raises(ConvgapError, match="channel counts"):
        f(x, a, k1, b, k2=torch.randn(3, 5, 1, 3))
    with pytest.raises(ConvgapError, match="along rows only"):
        f(x, a, k1, torch.randn(7, 3), k2=torch.randn(3, 4, 2, 3))
    with pytest.raises(ConvgapError, match="expected x"):
        f(x, a, k1[0], b)
    with pytest.raises(ConvgapError, match="bias"):
        f(x, a, k1, b, torch.randn(3))
    with pytest.raises(ConvgapError, match="groups must be"):
        f(x, a, k1, b, groups=0)
    with pytest.raises(ConvgapError, match="width must be 1"):
        f(x, torch.randn(8, 10), k1, torch.randn(7, 8), stride=(1, 2), groups=2)
    with pytest.raises(ConvgapError, match="channel counts"):
        f(x, a, k1, b, groups=2)
    with pytest.raises(ConvgapError, match="no backward"):
        f(x.requires_grad_(), a, k1, b)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel", ["auto", "planar"])
def test_pdp_any_thread_count_gives_the_same_result(threads, channels_last, kernel):
    """Each thread starts its own window of the first intermediate mid-image (rows split
    across threads recompute their halo): every split gives the reference result, on both
    kernels (auto: planar for NCHW, NHWC for channels_last) and on the planar one with
    channels_last maps."""
    x = torch.randn(2, 24, 11, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a, d, b, bias = torch.randn(24, 20), torch.randn(20, 3, 3), torch.randn(30, 20), \
        torch.randn(30)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            y = cpu.pointwise_depthwise_pointwise(x, a, d, b, bias, 1, 1, 1, kernel=kernel)
    finally:
        torch.set_num_threads(before)
    assert conditioned_error(y, x, a, d, b, bias, 1, 1, 1) < 1e-5


@needs_kernel
@pytest.mark.parametrize("kernel", ["nhwc", "planar"])
def test_pdp_store_keeps_packed_weights_and_follows_changes(monkeypatch, kernel):
    packs = []
    name = "_prepare" if kernel == "nhwc" else "_planar_weights"
    real = getattr(pdp, name)
    monkeypatch.setattr(pdp, name, lambda *args: packs.append(1) or real(*args))
    x = torch.randn(1, 8, 6, 6)
    a, d, b = torch.randn(8, 5), torch.randn(5, 3, 3), torch.randn(7, 5)
    store: dict = {}

    def call():
        with torch.no_grad():
            y = cpu.pointwise_depthwise_pointwise(x, a, d, b, None, 1, 1, 1, store, kernel)
        assert conditioned_error(y, x, a, d, b, None, 1, 1, 1) < 1e-5
    call()
    call()
    assert len(packs) == 1  # packed once, then reused
    a.mul_(-2.0)  # in place: the version counter moves
    call()
    assert len(packs) == 2
    b = torch.randn(7, 5)  # a different tensor
    call()
    assert len(packs) == 3


@needs_kernel
def test_pdp_rejects_bad_inputs():
    x = torch.randn(1, 8, 6, 6)
    a, d, b = torch.randn(8, 5), torch.randn(5, 3, 3), torch.randn(7, 5)
    f = cpu.pointwise_depthwise_pointwise
    with pytest.raises(ConvgapError, match="float32"):
        f(x.double(), a, d, b)
    with pytest.raises(ConvgapError, match="channel counts"):
        f(x, torch.randn(9, 5), d, b)
    with pytest.raises(ConvgapError, match="channel counts"):
        f(x, a, torch.randn(4, 3, 3), b)
    with pytest.raises(ConvgapError, match="expected x"):
        f(x[0], a, d, b)
    with pytest.raises(ConvgapError, match="bias"):
        f(x, a, d, b, torch.randn(6))
    with pytest.raises(ConvgapError, match="kernel must be"):
        f(x, a, d, b, kernel="fast")
    with pytest.raises(ConvgapError, match="planar kernel needs"):
        f(x, a, d, b, stride=(1, 2), kernel="planar")
    with pytest.raises(ConvgapError, match="no backward"):
        f(x, a.requires_grad_(), d, b)
    with pytest.raises(ConvgapError, match="does not fit"):
        f(x, a.detach(), torch.randn(5, 9, 3), b)


_STEM_ACTS = {None: lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu,
              "sigmoid": torch.sigmoid}


def _stem_reference(x: torch.Tensor, body: stem.StemBody) -> torch.Tensor:
    """The three convolutions in float64."""
    k1, k = body.w1.shape[-1], body.w2.shape[-1]
    u = _STEM_ACTS[body.act1](F.conv2d(x.double(), body.w1.double(), body.b1.double(),
                                       body.stride1, k1 // 2))
    v = _STEM_ACTS[body.act2](F.conv2d(u, body.w2.double(), body.b2.double(), 1, k // 2,
                                       groups=u.shape[1]))
    sq = body.squeeze
    if sq is not None:
        s = _STEM_ACTS[sq.act](F.linear(v.mean((2, 3)), sq.reduce.double(),
                                        sq.reduce_bias.double()))
        v = v * _STEM_ACTS[sq.gate](F.linear(s, sq.expand.double(),
                                             sq.expand_bias.double()))[:, :, None, None]
    return F.conv2d(v, body.w3.double()[..., None, None], body.b3.double())


@needs_kernel
@pytest.mark.parametrize("n, c, h, w, r, o, k1, st1, k, act1, act2, layout, se", [
    (1, 3, 224, 224, 32, 16, 3, 2, 3, "relu6", "relu6", "nchw", 0),   # mobilenet_v2's
    (1, 3, 224, 224, 32, 16, 3, 2, 3, "silu", "silu", "nchw", 8),     # efficientnet_b0's
    (2, 3, 33, 29, 32, 16, 3, 2, 3, "relu6", "relu6", "cl", 0),
    (3, 3, 31, 27, 40, 24, 3, 2, 3, "silu", "silu", "cl", 10),
    (1, 3, 17, 23, 16, 24, 3, 1, 3, "silu", None, "nchw", 0),
    (2, 4, 20, 18, 48, 8, 5, 2, 5, "relu", "silu", "cl", 0),
    (1, 1, 15, 16, 64, 40, 7, 3, 3, None, "sigmoid", "nchw", 0),
    (3, 3, 9, 9, 24, 17, 3, 2, 7, "relu6", "relu", "slice", 0),
    (2, 3, 9, 12, 16, 5, 3, 2, 3, "relu", "relu", "slice", 3),
    (1, 2, 6, 5, 8, 3, 1, 1, 1, "relu", "relu", "nchw", 0),
])
def test_stem_block_matches_the_three_convolutions(n, c, h, w, r, o, k1, st1, k, act1, act2,
                                                   layout, se):
    """The stem kernel against float64 convolutions: channel counts that are and are not
    multiples of 16 (R padded, O masked), every activation, strides 1-3, filter sides 1-7,
    with and without a squeeze-excitation, NCHW, channels_last and arbitrary strides in,
    channels_last out, 1 and 2 threads."""
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "slice":
        x = torch.randn(n, c + 2, h, 2 * w)[:, 1:c + 1, :, ::2]
    body = stem.StemBody(torch.randn(r, c, k1, k1) / k1, torch.randn(r),
                         torch.randn(r, 1, k, k) / k, torch.randn(r),
                         torch.randn(o, r) / r ** 0.5, torch.randn(o), st1, act1, act2)
    if se:
        body = body._replace(squeeze=pdp.Squeeze(
            torch.randn(se, r) / r ** 0.5, torch.randn(se), torch.randn(r, se) / se ** 0.5,
            torch.randn(r), "silu" if act1 != "relu" else "relu", "sigmoid"))
    want = _stem_reference(x, body)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = stem.stem_block(x, body)
            assert y.shape == want.shape and y.is_contiguous(memory_format=torch.channels_last)
            assert float((y.double() - want).abs().max() / want.abs().max()) <= 2e-6
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_stem_block_rejects_bad_inputs():
    body = stem.StemBody(torch.randn(32, 3, 3, 3), torch.randn(32), torch.randn(32, 1, 3, 3),
                         torch.randn(32), torch.randn(16, 32), torch.randn(16), 2, "relu6",
                         "relu6")
    x = torch.randn(1, 3, 16, 16)
    for bad, match in ((body._replace(w1=torch.randn(80, 3, 3, 3), b1=torch.randn(80),
                                      w2=torch.randn(80, 1, 3, 3), b2=torch.randn(80),
                                      w3=torch.randn(16, 80)), "at most 64"),
                       (body._replace(w2=torch.randn(32, 1, 4, 4)), "odd-sided"),
                       (body._replace(w3=torch.randn(16, 24)), "disagree"),
                       (body._replace(b3=torch.randn(15)), r"b3 must have shape \(16,\)"),
                       (body._replace(act1="gelu"), "unknown activation"),
                       (body._replace(squeeze=pdp.Squeeze(
                           torch.randn(8, 32), torch.randn(8), torch.randn(32, 7),
                           torch.randn(32))), "squeeze-excitation must be")):
        with pytest.raises(ConvgapError, match=match):
            stem.stem_block(x, bad)
    with pytest.raises(ConvgapError, match=r"x must be \(N, 3, H, W\)"):
        stem.stem_block(torch.randn(1, 4, 16, 16), body)
    with pytest.raises(ConvgapError, match="float32"):
        stem.stem_block(x.double(), body)
    with pytest.raises(ConvgapError, match="no backward"):
        stem.stem_block(x.requires_grad_(), body)


def test_native_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("CONVGAP_NATIVE", "0")
    assert not cpu.available()
    assert build.library("pdp") is None
    with pytest.raises(RuntimeError, match="not available"):
        cpu.pointwise_depthwise_pointwise(torch.randn(1, 2, 3, 3), torch.randn(2, 2),
                                          torch.randn(2, 1, 1), torch.randn(2, 2))


@pytest.mark.skipif(not build.avx512(), reason="the kernels are only built on AVX-512 CPUs")
def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "_LOADED", {})
    monkeypatch.setenv("CC", "false")  # a 'compiler' that always fails
    with pytest.warns(build.NativeKernelWarning, match="unavailable"):
        assert build.library("pdp") is None
    assert build.library("pdp") is None  # remembered: no second build, no second warning


@needs_kernel
def test_built_library_is_reused_from_the_cache(monkeypatch):
    """A second process (here: an emptied in-process table) loads the built file instead of
    compiling again."""
    monkeypatch.setattr(build, "_LOADED", {})
    assert build.library("pdp") is not None  # built into this test's cache
    monkeypatch.setattr(build, "_LOADED", {})
    runs = []
    real = build.subprocess.run
    monkeypatch.setattr(build.subprocess, "run",
                        lambda cmd, **kw: runs.append(cmd) or real(cmd, **kw))
    assert build.library("pdp") is not None
    assert not [c for c in runs if "-o" in c]  # only `cc --version`, no compile


# --- TensorialConv2d's layers on the kernels ---

RANKS = {"cp": 9, "tucker": (7, 5), "tt": (6, 5, 7), "tr": (3, 4, 2, 5)}


def _layer(family="cp", stride=1, padding=1, dilation=1, bias=True):
    from convgap import TensorialConv2d
    return TensorialConv2d(12, 10, 3, family, rank=RANKS[family], stride=stride,
                           padding=padding, dilation=dilation, bias=bias).eval()


def _count_runs(monkeypatch) -> list:
    """Calls of the fused kernels (of the functions pdp.bind and pcp.bind return)."""
    calls = []
    for mod in (pdp, pcp):
        real = mod.bind

        def counting(*a, real=real):
            call = real(*a)
            return lambda x: calls.append(1) or call(x)
        monkeypatch.setattr(mod, "bind", counting)
    return calls


@needs_kernel
@pytest.mark.parametrize("family", ["cp", "tucker", "tt", "tr"])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), ((2, 1), 1, 1),
                                                     (1, "same", (2, 1)), (1, "valid", 1),
                                                     ((2, 1), (0, 2), (1, 2))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_runs_fused_in_inference_and_matches_dense(monkeypatch, force, family, stride,
                                                         padding, dilation, channels_last):
    from convgap.layers import tensorial
    calls = _count_runs(monkeypatch)
    # take the fused kernel whatever the measurement says
    force({"tensorial": ["planar", "nhwc"]})  # a fused kernel, whatever the timing says
    layer = _layer(family, stride, padding, dilation)
    x = torch.randn(2, 12, 9, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pad = {"same": dilation, "valid": 0}[padding] if isinstance(padding, str) else padding
    with torch.no_grad():
        y = layer(x)
        ref = F.conv2d(x.double(), layer.dense_weight().double(), layer.bias.double(),
                       stride, pad, dilation)
    # it ran fused (tensor ring: only with width stride 1)
    assert bool(calls) == (family != "tr" or layer.stride[1] == 1)
    planar = layer.stride[1] == 1  # the first candidate, in either layout
    assert layer.kernel_for(x) == ("steps" if not calls else "planar" if planar else "nhwc")
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    with torch.no_grad():  # a changed factor: the next call follows it
        layer.factors[1].mul_(0.5)
        y2 = layer(x)
        ref2 = F.conv2d(x.double(), layer.dense_weight().double(), layer.bias.double(),
                        stride, pad, dilation)
    assert ((y2.double() - ref2).abs().max() / ref2.abs().max()).item() < 1e-5


@needs_kernel
@pytest.mark.parametrize("family", ["cp", "tucker", "tt", "tr"])
def test_layer_keeps_torch_steps_where_gradients_or_tracing_need_them(monkeypatch, force, family):
    from convgap.layers import tensorial
    calls = _count_runs(monkeypatch)
    force({"tensorial": ["planar", "nhwc"]})  # a fused kernel, whatever the timing says
    layer = _layer(family)
    x = torch.randn(2, 12, 9, 8, requires_grad=True)
    layer(x).sum().backward()  # autograd: the torch steps
    assert not calls and x.grad is not None and layer.factors[0].grad is not None
    with torch.no_grad():
        traced = torch.jit.trace(layer, x.detach(), check_trace=False)
    assert not calls
    with torch.no_grad():
        assert torch.allclose(traced(x), layer(x), atol=1e-5)
    assert calls  # plain inference does take it
    calls.clear()
    with torch.no_grad(), contextlib.suppress(RuntimeError):  # (some steps refuse mixed
        layer(x.detach().double())  # dtypes) the fused call's shape and strides, float64
    assert not calls  # not the float32 kernel
    layer.double()
    calls.clear()
    with torch.no_grad():
        layer(x.double())
    assert not calls  # float64: the torch steps


@needs_kernel
def test_layer_fused_choice_is_measured_once_per_shape(monkeypatch):
    from convgap.layers import tensorial
    real = tensorial.choose_kernel
    seen = []  # (key, the name chosen) of each measurement

    def spy(kind, key, fns, x):
        name = real(kind, key, fns, x)
        seen.append((key, name))
        return name
    monkeypatch.setattr(tensorial, "choose_kernel", spy)
    layer = _layer()
    x = torch.randn(2, 12, 9, 8)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        layer(torch.randn(1, 12, 9, 8))
    assert len(seen) == 2
    assert layer.kernel_for(x) == seen[0][1]  # what forward runs: the measured choice
    assert layer.kernel_for(torch.randn(3, 12, 9, 8)) is None  # not measured yet


@needs_kernel
@pytest.mark.parametrize("family,stride", [("rcp", 1), ("tr", (1, 2))])
def test_layers_without_a_fused_kernel_run_the_steps(monkeypatch, family, stride):
    """Reshaped CP has no fused kernel; tensor ring's has none for a width stride > 1 (its
    groups would sit at uneven strides)."""
    from convgap import TensorialConv2d
    calls = _count_runs(monkeypatch)
    layer = TensorialConv2d(12, 12, 3, family, rank=2 if family == "rcp" else (2, 3, 2, 3),
                            padding=1, stride=stride).eval()
    x = torch.randn(1, 12, 6, 6)
    with torch.no_grad():
        layer(x)
    assert not calls and layer.kernel_for(x) == "steps"


@needs_kernel
@pytest.mark.parametrize("family", ["cp", "tucker", "tt", "tr"])
@pytest.mark.parametrize("channels_last", [False, True])  # the planar and the NHWC kernel
def test_layer_packs_its_weights_once_until_they_change(monkeypatch, force, family, channels_last):
    """The kernels' packed weights are kept per tensor identity and version: a layer whose
    operands are views of its factors (TT, TR) must hand over the same view objects each
    call, or it would repack on every call."""
    from convgap.layers import tensorial
    force({"tensorial": ["planar", "nhwc"]})  # a fused kernel, whatever the timing says
    packs = []
    for mod in (pdp, pcp):
        for name in ("_prepare", "_planar_weights"):
            real = getattr(mod, name)
            monkeypatch.setattr(mod, name, lambda *a, real=real: packs.append(1) or real(*a))
    layer = _layer(family)
    x = torch.randn(2, 12, 9, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        layer(x)  # binds each candidate kernel to measure them
        first = len(packs)
        assert first == 2  # the planar and the NHWC kernel
        layer(x)
        layer(x)
        assert len(packs) == first
        layer.factors[-1].mul_(2.0)
        y = layer(x)
    assert len(packs) == first + 1  # only the chosen kernel repacks
    ref = F.conv2d(x.double(), layer.dense_weight().double(), layer.bias.double(), padding=1)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


@needs_kernel
@pytest.mark.parametrize("channels_last", [False, True])
def test_auto_kernel_is_planar_for_nchw_inputs(monkeypatch, channels_last):
    runs = []
    real = planar.bind
    monkeypatch.setattr(planar, "bind", lambda *a: runs.append(1) or real(*a))
    x = torch.randn(1, 8, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        cpu.pointwise_depthwise_pointwise(x, torch.randn(8, 5), torch.randn(5, 3, 3),
                                          torch.randn(7, 5), padding=1)
        pcp.pointwise_conv_pointwise(x, torch.randn(8, 5), torch.randn(4, 5, 3, 3),
                                     torch.randn(7, 4), padding=1)
    assert len(runs) == (0 if channels_last else 2)


@needs_kernel
@pytest.mark.parametrize("winner", [0, 1, -1])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_runs_whichever_candidate_measured_fastest(monkeypatch, force, winner, channels_last):
    """In either layout the candidates are the planar kernel, the NHWC kernel and the
    steps. The winner runs (and is remembered)."""
    from convgap.layers import tensorial
    force({"tensorial": ["planar", "nhwc", "steps"][winner]})
    layer = _layer("tucker")
    x = torch.randn(2, 12, 9, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    names = ["planar", "nhwc", "steps"]
    with torch.no_grad():
        for _ in range(2):
            y = layer(x)
            ref = F.conv2d(x.double(), layer.dense_weight().double(), layer.bias.double(),
                           padding=1)
            assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert layer.kernel_for(x) == names[winner]


@needs_kernel
@pytest.mark.parametrize("kernel", ["auto", "nhwc"])
def test_kernels_take_inputs_of_any_strides(kernel):
    """An input neither NCHW- nor channels_last-contiguous (a transposed view) runs as NCHW
    from one copy; the result is NCHW-contiguous."""
    base = torch.randn(2, 8, 7, 6)
    x = base.transpose(2, 3)  # (2, 8, 6, 7), strided
    a, d, b, bias = torch.randn(8, 5), torch.randn(5, 3, 3), torch.randn(7, 5), torch.randn(7)
    with torch.no_grad():
        y = cpu.pointwise_depthwise_pointwise(x, a, d, b, bias, 1, 1, 1, kernel=kernel)
        k1 = torch.randn(4, 5, 3, 3)
        z = pcp.pointwise_conv_pointwise(x, a, k1, torch.randn(7, 4), None, 1, 1, 1,
                                         kernel=kernel)
    assert y.is_contiguous() and z.is_contiguous()
    assert conditioned_error(y, x, a, d, b, bias, 1, 1, 1) < 1e-5


@needs_kernel
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_layer_serves_concurrent_threads(monkeypatch, force, channels_last):
    """Python threads running one layer at once (a server) each get their own scratch: every
    result matches its own input's reference."""
    import threading
    from convgap.layers import tensorial
    force({"tensorial": ["planar", "nhwc"]})  # a fused kernel, whatever the timing says
    from convgap import TensorialConv2d
    layer = TensorialConv2d(64, 64, 3, "tt", rank=(32, 32, 32), padding=1).eval()
    xs = [torch.randn(2, 64, 28, 28) for _ in range(4)]  # calls long enough to overlap
    if channels_last:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    with torch.no_grad():
        refs = [F.conv2d(x, layer.dense_weight(), layer.bias, padding=1) for x in xs]
        layer(xs[0])  # measured and bound before the threads start
    errors = []

    def work(i):
        with torch.no_grad():
            for _ in range(30):
                y = layer(xs[i])
                if not torch.allclose(y, refs[i], atol=1e-4, rtol=1e-4):
                    errors.append(i)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# --- FlattenedConv2d on the kernel (no second 1x1 conv; biases folded in) ---

@needs_kernel
@pytest.mark.parametrize("stride,padding,dilation,repeats", [(1, 1, 1, 1), (2, 1, 1, 1),
                                                             ((1, 2), (1, 2), (2, 1), 1),
                                                             (1, 0, 1, 2), ((2, 1), 1, 1, 2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_flattened_runs_fused_and_matches_its_torch_ops(monkeypatch, force, stride, padding, dilation,
                                                        repeats, bias, channels_last):
    from convgap.layers import FlattenedConv2d, flattened
    force({"flattened": "nhwc"})
    binds = []
    real = pdp.bind
    monkeypatch.setattr(pdp, "bind", lambda *a: binds.append(1) or real(*a))
    layer = FlattenedConv2d(12, 10, 3, repeats=repeats, stride=stride, padding=padding,
                            dilation=dilation, bias=bias).eval()
    x = torch.randn(2, 12, 11, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = layer(x)
        ref = layer._steps(x)
        if repeats == 1 and not bias:
            dense = F.conv2d(x.double(), layer.dense_weight().double(), None, stride, padding,
                             dilation)
            assert ((y.double() - dense).abs().max() / dense.abs().max()).item() < 1e-5
    assert len(binds) == repeats  # it ran fused, one pass per repeat
    assert layer.kernel_for(x) == "nhwc"
    assert y.shape == ref.shape
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-5
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    with torch.no_grad():  # a changed weight: rebound, the result follows
        layer.horizontal[0].mul_(-0.5)
        if bias:
            layer.biases[0].add_(1.0)
        y2, ref2 = layer(x), layer._steps(x)
    assert len(binds) == 2 * repeats - (repeats - 1)  # only repeat 0 changed
    assert ((y2 - ref2).abs().max() / ref2.abs().max()).item() < 1e-5


@needs_kernel
def test_flattened_keeps_torch_ops_for_gradients_and_when_they_measure_faster(monkeypatch, force):
    from convgap.layers import FlattenedConv2d, flattened
    binds = []
    real = pdp.bind
    monkeypatch.setattr(pdp, "bind", lambda *a: binds.append(1) or real(*a))
    layer = FlattenedConv2d(12, 10, 3, padding=1)
    x = torch.randn(2, 12, 9, 8, requires_grad=True)
    layer(x).sum().backward()
    assert not binds and x.grad is not None
    force({"flattened": "steps"})
    with torch.no_grad():
        y = layer(x)
        layer(x)
    assert not binds and layer.kernel_for(x) == "steps"  # the torch ops won
    assert torch.allclose(y, layer._steps(x), atol=1e-6)
    # never the C kernel (so never measured) in float64, or as written
    assert layer.kernel_for(torch.randn(1, 12, 5, 5, dtype=torch.float64)) == "steps"
    assert layer.kernel_for(torch.randn(1, 12, 5, 5)) is None  # not measured yet
    layer.as_written = True
    assert layer.kernel_for(torch.randn(1, 12, 5, 5)) == "steps"


def test_band_rows_follow_pixels_and_scratch_budget():
    """Bands of about BAND_PIXELS output pixels in whole rows, fewer where the band's
    intermediates would pass BAND_FLOATS, never fewer than 96 pixels' worth (one row at
    least) nor more rows than the output has."""
    assert planar.band_rows(28, 28, 224) == 28  # a whole 28x28 image (under the cap)
    assert planar.band_rows(56, 56, 64) == round(planar.BAND_PIXELS / 56)
    wide = planar.BAND_FLOATS // 2000  # 2000 floats per pixel: the budget binds
    assert planar.band_rows(200, 10, 2000) == round(wide / 10)
    assert planar.band_rows(200, 10, 10**9) == round(96 / 10)  # the floor
    assert planar.band_rows(3, 500, 1) == 3 and planar.band_rows(50, 5000, 1) == 1


def _check_planar_shapes(x, threads, winograd=False):
    """The planar kernel on ``threads`` threads over ``x`` (10 channels): depthwise, k x k
    (strided, dilated), k x 1 then 1 x k in 2 ring groups, and with ``winograd`` a 3 x 3
    between WINOGRAD_MIN_CHANNELS channels, each against float64. Returns the results."""
    a, d, b, bias = torch.randn(10, 6), torch.randn(6, 3, 3), torch.randn(9, 6), torch.randn(9)
    k, bk = torch.randn(5, 6, 3, 3), torch.randn(9, 5)
    a3, k1, k2, b3 = torch.randn(10, 8), torch.randn(3, 4, 3, 1), torch.randn(5, 3, 1, 3), \
        torch.randn(9, 10)
    r = planar.WINOGRAD_MIN_CHANNELS
    aw, kw, bw = torch.randn(10, r), torch.randn(r, r, 3, 3), torch.randn(9, r)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            ys = [cpu.pointwise_depthwise_pointwise(x, a, d, b, bias, 1, 1, 1, kernel="planar"),
                  pcp.pointwise_conv_pointwise(x, a, k, bk, bias, (2, 1), 2, 2, kernel="planar"),
                  pcp.pointwise_conv_pointwise(x, a3, k1, b3, None, 1, (1, 0), 1, k2=k2,
                                               padding2=1, groups=2, kernel="planar")]
            if winograd:
                ys.append(pcp.pointwise_conv_pointwise(x, aw, kw, bw, None, 1, 1, 1,
                                                       kernel="planar"))
    finally:
        torch.set_num_threads(before)
    assert conditioned_error(ys[0], x, a, d, b, bias, 1, 1, 1) < 1e-5
    refs = [pcp_reference(x, a, k, bk, bias, (2, 1), 2, 2, None, None),
            pcp_reference(x, a3, k1, b3, None, 1, (1, 0), 1, k2, (1, 1, 1), 2),
            pcp_reference(x, aw, kw, bw, None, 1, 1, 1, None, None)]
    for y, ref in zip(ys[1:], refs):
        assert y.shape == ref.shape
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
    return ys


@needs_kernel
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_planar_kernel_across_many_bands(monkeypatch, channels_last, threads):
    """Short bands (two output rows each) make every thread slide its window of the first
    intermediate down the image many times, keeping the halo rows: depthwise, k x k
    (strided, dilated) and k x 1 then 1 x k with ring groups, all against float64."""
    monkeypatch.setattr(planar, "BAND_PIXELS", 24)
    monkeypatch.setattr(planar, "BAND_FLOATS", 10**9)
    torch.manual_seed(0)
    x = torch.randn(2, 10, 17, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for y in _check_planar_shapes(x, threads):
        assert y.is_contiguous(memory_format=fmt)


@needs_kernel
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("height", [9, 17])
def test_planar_threads_share_window_rows_at_batch_1(channels_last, threads, height):
    """At batch 1 each thread takes one band of the image, and the threads compute the
    window rows where their bands meet once, copying them from each other: depthwise,
    k x k (strided, dilated), k x 1 then 1 x k in ring groups, and Winograd's 3 x 3,
    against float64, on 2 and 3 threads (bands of 3 to 9 rows, a 3-row one too short to
    share when strided)."""
    torch.manual_seed(0)
    x = torch.randn(1, 10, height, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _check_planar_shapes(x, threads, winograd=True)


@needs_kernel
@pytest.mark.parametrize("c", [600, 37])
def test_planar_channels_last_transposes_in_blocks(c):
    """On channels_last inputs the planar kernel's first 1x1 conv writes pixel rows, which
    are transposed into the window's channel planes in 16 x 16 blocks: 20 intermediate
    channels (a block and a tail of 4) on rows of 19 pixels (a block and a tail of 3), from
    600 or 37 input channels. Both fused shapes, against float64."""
    torch.manual_seed(0)
    x = torch.randn(2, c, 9, 19).contiguous(memory_format=torch.channels_last)
    a, d, b, bias = torch.randn(c, 20), torch.randn(20, 3, 3), torch.randn(7, 20), \
        torch.randn(7)
    k, bk = torch.randn(5, 20, 3, 3), torch.randn(7, 5)
    with torch.no_grad():
        y1 = cpu.pointwise_depthwise_pointwise(x, a, d, b, bias, 1, 1, 1, kernel="planar")
        y2 = pcp.pointwise_conv_pointwise(x, a, k, bk, None, 1, 1, 1, kernel="planar")
    assert conditioned_error(y1, x, a, d, b, bias, 1, 1, 1) < 1e-5
    ref = pcp_reference(x, a, k, bk, None, 1, 1, 1, None, None)
    mag = pcp_reference(x.abs(), a.abs(), k.abs(), bk.abs(), None, 1, 1, 1, None, None)
    assert ((y2.double() - ref).abs() / mag.clamp_min(1e-30)).max().item() < 1e-5
    for y in (y1, y2):
        assert y.is_contiguous(memory_format=torch.channels_last)


@needs_kernel
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("band", [24, 10**6])
def test_planar_winograd_matches_the_direct_convolution(monkeypatch, channels_last, threads,
                                                        band):
    """A 3x3 filter with strides and dilations of 1 runs as Winograd F(2x2, 3x3) in the
    planar kernel: against float64 and against the kernel's own direct convolution, on
    odd and even rows and columns (tiles half past the image), paddings 0-2, one-row maps,
    short bands (odd rows per band, bands sliding down the image) and whole ones, and rows
    wider than a plane's slack (a half tile past an odd band must not be written)."""
    monkeypatch.setattr(planar, "BAND_PIXELS", band)
    monkeypatch.setattr(planar, "BAND_FLOATS", 10**9)
    monkeypatch.setattr(planar, "WINOGRAD_MIN_CHANNELS", 1)
    geometry_runs = []  # whether each bind ran Winograd
    real = planar.bind
    monkeypatch.setattr(planar, "bind", lambda *b_: geometry_runs.append(
        planar.winograd_applies(b_[2])) or real(*b_))
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, c, h, w, r1, r2, o, pad in [(2, 16, 9, 11, 5, 7, 6, 1), (1, 8, 6, 5, 16, 3, 4, 0),
                                           (3, 10, 7, 13, 20, 17, 9, 2), (1, 4, 1, 1, 3, 3, 2, 1),
                                           (2, 6, 12, 34, 33, 18, 5, 1),
                                           (1, 4, 5, 90, 3, 4, 3, 1)]:  # rows past slack
            x = torch.randn(n, c, h, w)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            a, k, b, bias = torch.randn(c, r1), torch.randn(r2, r1, 3, 3), torch.randn(o, r2), \
                torch.randn(o)
            args = (x, a, k, b, bias, 1, pad, 1)
            geometry_runs.clear()
            with torch.no_grad():
                y = pcp.pointwise_conv_pointwise(*args, kernel="planar")
                monkeypatch.setattr(planar, "WINOGRAD", False)
                direct = pcp.pointwise_conv_pointwise(*args, kernel="planar")
                monkeypatch.setattr(planar, "WINOGRAD", True)
            assert geometry_runs == [True, False]
            ref = pcp_reference(x, a, k, b, bias, 1, pad, 1, None, None)
            mag = pcp_reference(x.abs(), a.abs(), k.abs(), b.abs(), bias.abs(), 1, pad, 1, None,
                                None)
            assert y.shape == ref.shape
            assert ((y.double() - ref).abs() / mag.clamp_min(1e-30)).max().item() < 1e-5
            assert torch.allclose(y, direct, rtol=1e-4, atol=1e-4 * direct.abs().max().item())
    finally:
        torch.set_num_threads(before)


def test_winograd_applies_only_to_plain_3x3_filters():
    """Winograd F(2x2, 3x3) takes one 3x3 filter with strides and dilations of 1 between
    enough channels: not a depthwise one, not ring groups, not a second filter, not 5x5,
    not strided or dilated, not fewer than WINOGRAD_MIN_CHANNELS channels in or out."""
    r = planar.WINOGRAD_MIN_CHANNELS
    base = planar.Geometry(n=1, h=8, w=8, c=4, r1=r, r2=r, r3=r, kh1=3, kw1=3, sh1=1, ph1=1,
                           pw1=1, dh1=1, dw1=1, kw2=0, pw2=0, dw2=1, o=5, oh=8, ow=8, z=1,
                           depthwise=0)
    assert planar.winograd_applies(base)
    for change in [{"depthwise": 1}, {"z": 2}, {"kw2": 3},  # a second filter
                   {"kh1": 5, "kw1": 5}, {"sh1": 2}, {"dh1": 2}, {"dw1": 2},  # strided, dilated
                   {"r1": r - 1}, {"r2": r - 1}]:  # too few channels in or out
        assert not planar.winograd_applies(base._replace(**change)), change


@needs_kernel
@pytest.mark.parametrize("width", [8, 24, 40])
def test_planar_channels_last_first_conv_in_pixel_pairs(width):
    """On channels_last maps the planar kernel's first 1x1 conv into 8 or 24 channels runs
    two pixels per 16 or 48 lanes (first_pairs; 40 runs one pixel per 48): CP's and
    Tucker's shapes against float64, on rows of 21 pixels (bands of odd pixel counts, whose
    last pixel is paired with itself), and one ring group on a single odd row."""
    assert planar.first_pairs(width) == (width in (8, 24))
    torch.manual_seed(0)
    x = torch.randn(2, 37, 5, 21).contiguous(memory_format=torch.channels_last)
    a, d, b, bias = torch.randn(37, width), torch.randn(width, 3, 3), torch.randn(6, width), \
        torch.randn(6)
    with torch.no_grad():
        y = cpu.pointwise_depthwise_pointwise(x, a, d, b, bias, 1, 1, 1, kernel="planar")
    assert conditioned_error(y, x, a, d, b, bias, 1, 1, 1) < 1e-5
    k = torch.randn(width, width, 3, 3)  # a Tucker core (Winograd from 20 channels)
    for xs in (x, x[:1, :, :1].contiguous(memory_format=torch.channels_last)):
        with torch.no_grad():
            y = pcp.pointwise_conv_pointwise(xs, a, k, b, bias, 1, 1, 1, kernel="planar")
        ref = pcp_reference(xs, a, k, b, bias, 1, 1, 1, None, None)
        mag = pcp_reference(xs.abs(), a.abs(), k.abs(), b.abs(), bias.abs(), 1, 1, 1, None,
                            None)
        assert ((y.double() - ref).abs() / mag.clamp_min(1e-30)).max().item() < 1e-5


@needs_kernel
@pytest.mark.parametrize("width", [17, 49, 50, 51])
def test_planar_channels_last_first_tail_as_dot_products(width):
    """On channels_last maps the planar kernel's first 1x1 conv runs its last width % 16
    output channels as dot products where there are at most TAIL_DOTS of them (17, 49 and
    50 channels; 51 runs whole): CP's shape, and a tensor ring's 7 groups of 7, against
    float64, on rows of 21 pixels (a partial block of 16)."""
    assert planar.first_tail(width) == (width % 16 if width % 16 <= planar.TAIL_DOTS else 0)
    torch.manual_seed(0)
    x = torch.randn(2, 37, 5, 21).contiguous(memory_format=torch.channels_last)
    a, d, b, bias = torch.randn(37, width), torch.randn(width, 3, 3), torch.randn(6, width), \
        torch.randn(6)
    with torch.no_grad():
        y = cpu.pointwise_depthwise_pointwise(x, a, d, b, bias, 1, 1, 1, kernel="planar")
    assert conditioned_error(y, x, a, d, b, bias, 1, 1, 1) < 1e-5
    if width == 49:  # 7 ring groups of 7 sharing a 3 x 1 then a 1 x 3 filter
        a3, k1, k2, b3 = torch.randn(37, 49), torch.randn(7, 7, 3, 1), torch.randn(7, 7, 1, 3), \
            torch.randn(6, 49)
        with torch.no_grad():
            y3 = pcp.pointwise_conv_pointwise(x, a3, k1, b3, None, 1, (1, 0), 1, k2=k2,
                                              padding2=1, groups=7, kernel="planar")
        ref = pcp_reference(x, a3, k1, b3, None, 1, (1, 0), 1, k2, (1, 1, 1), 7)
        mag = pcp_reference(x.abs(), a3.abs(), k1.abs(), b3.abs(), None, 1, (1, 0), 1,
                            k2.abs(), (1, 1, 1), 7)
        assert ((y3.double() - ref).abs() / mag.clamp_min(1e-30)).max().item() < 1e-5


# --- the kernels' arguments by name (args.h's structs, args.py's mirrors) ---

KERNELS = {"pdp": pdp, "pcp": pcp, "planar": planar, "stem": stem}


@needs_kernel
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_argument_structs_match_their_c_structs(name):
    """Each kernel's ctypes Structure has its C struct's size and its fields' names, order,
    offsets and sizes (checked at load; here again, and field by field)."""
    kernel = KERNELS[name].KERNEL
    lib = kernel.lib()
    args.check_layout(lib, kernel.args, name)
    size, fields = args.c_layout(lib)
    assert (size, fields) == args.py_layout(kernel.args)
    assert [f[0] for f in fields] == [n for n, _ in kernel.args._fields_]
    assert size == ctypes.sizeof(kernel.args) and len(fields) > 20


def _mirror(fields: list):
    class Bad(args.Args):
        _fields_ = fields
    return Bad


@needs_kernel
def test_layout_check_catches_a_wrong_mirror(monkeypatch):
    """A mirror with two fields swapped, an int field declared long, a field missing, one
    extra or one renamed is refused at load (ArgsLayoutError naming the field), never run."""
    good = list(args.PdpArgs._fields_)
    names = [n for n, _ in good]
    i, j = names.index("map"), names.index("n")  # the last pointer, the first int
    swapped = list(good)
    swapped[i], swapped[j] = good[j], good[i]
    ow = names.index("ow")
    sh, sw = names.index("sh"), names.index("sw")
    same_types = list(good)  # two ints of one size swapped: only the names tell
    same_types[sh], same_types[sw] = good[sw], good[sh]
    at = args.PdpArgs.ow.offset  # an int: a long in its place moves to the next 8 bytes
    last, last_at = names[-1], getattr(args.PdpArgs, names[-1]).offset
    cases = {"swapped": (swapped, f"field {i}: C has 'map'"),
             "same types swapped": (same_types, f"field {sh}: C has 'sh'"),
             "wider": (good[:ow] + [("ow", ctypes.c_long)] + good[ow + 1:],
                       f"C has 'ow' at byte {at} \\(4 bytes\\), ctypes 'ow' at byte "
                       f"{(at + 7) // 8 * 8} \\(8"),
             "missing": (good[:-1],
                         f"C has '{last}' at byte {last_at} \\(4 bytes\\), ctypes nothing"),
             "extra": (good + [("relu", ctypes.c_int)], "C has nothing, ctypes 'relu'"),
             "renamed": (good[:-1] + [("shortcut", ctypes.c_int)], f"C has '{last}'")}
    lib = pdp.KERNEL.lib()
    for case, (fields, message) in cases.items():
        bad = _mirror(fields)
        with pytest.raises(args.ArgsLayoutError, match=message):
            args.check_layout(lib, bad, "pdp")
        # and where it counts: a kernel with that mirror is refused when loaded
        with pytest.raises(args.ArgsLayoutError, match="does not match the C struct"):
            common.Kernel("pdp", "pdp_forward", bad).lib()
    # the real mirror still loads, and runs
    with torch.no_grad():
        x = torch.randn(1, 8, 6, 6)
        a, d, b = torch.randn(8, 5), torch.randn(5, 3, 3), torch.randn(7, 5)
        y = cpu.pointwise_depthwise_pointwise(x, a, d, b, None, 1, 1, 1, kernel="nhwc")
    assert conditioned_error(y, x, a, d, b, None, 1, 1, 1) < 1e-5


def test_args_are_set_by_name_only():
    """The mirrors take fields by name: an unknown name raises (ctypes alone would keep it
    as a plain attribute), and a struct built without one of its int fields raises (a field
    added to the struct but not set by a wrapper must not run as a silent zero)."""
    geometry = {n: i + 1 for i, (n, kind) in enumerate(args.PdpArgs._fields_)
                if kind is ctypes.c_int}
    g = args.PdpArgs(**geometry)
    assert g.a is None and g.th == geometry["th"] and g.nchw == geometry["nchw"]
    missing = dict(geometry)
    del missing["th"]
    with pytest.raises(TypeError, match="missing th"):
        args.PdpArgs(**missing)
    with pytest.raises(TypeError, match="no field relu"):
        args.PdpArgs(**geometry, relu=1)
    with pytest.raises(AttributeError, match="no field 'relu'"):
        g.relu = 1
    with pytest.raises(AttributeError, match="no field"):
        g.copy(shortcut=1)
    h = g.copy(a=4096, th=3)
    assert (h.a, h.th, h.ow) == (4096, 3, g.ow) and (g.a, g.th) == (None, geometry["th"])


@needs_kernel
def test_bound_calls_carry_their_arguments_by_name(monkeypatch):
    """A bound call holds its kernel's struct, weights and geometry filled in by name: a
    TT layer's shape on the NHWC kernel, and the planar kernel's geometry built from pcp's
    fields of the same names (its second filter's padding and dilation, not its stride)."""
    x = torch.randn(2, 6, 9, 8)
    a, k1, k2, b = torch.randn(6, 4), torch.randn(5, 4, 3, 1), torch.randn(7, 5, 1, 3), \
        torch.randn(3, 7)
    store: dict = {}
    call = pcp.bind(x, a, k1, b, None, (2, 1), (1, 0), (1, 1), k2, (1, 2, 3), store)
    g = call.args
    assert isinstance(g, args.PcpArgs)
    assert (g.n, g.h, g.w, g.c, g.r1, g.r2, g.r3, g.o) == (2, 9, 8, 6, 4, 5, 7, 3)
    assert (g.kh1, g.kw1, g.sh1, g.sw1, g.ph1, g.pw1) == (3, 1, 2, 1, 1, 0)
    assert (g.kw2, g.sw2, g.pw2, g.dw2, g.z, g.nchw) == (3, 1, 2, 3, 1, 1)
    assert g.a == call.weights["a"].data_ptr() and g.bias is None
    assert g.oh == 5 and g.ow == 8 + 4 - 3 * 2 and 1 <= g.th <= g.oh
    seen = []
    real = planar.bind
    monkeypatch.setattr(planar, "bind", lambda *b_: seen.append(b_[2]) or real(*b_))
    with torch.no_grad():
        y = pcp.bind(x, a, k1, b, None, (2, 1), (1, 0), (1, 1), k2, (1, 2, 3), store,
                     use_planar=True)(x)
    geo = seen[0]
    assert (geo.kw2, geo.pw2, geo.dw2, geo.sh1, geo.ph1, geo.z, geo.depthwise) == \
        (3, 2, 3, 2, 1, 1, 0)
    ref = pcp_reference(x, a, k1, b, None, (2, 1), (1, 0), 1, k2, (1, 2, 3))
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_a_changed_header_rebuilds(tmp_path):
    """The built file's key covers the kernel's C file and every header it includes (and
    they include): a change to args.h (a field added, say) gives a new key, so a stale
    build is never loaded."""
    copy = tmp_path / "cpu"
    shutil.copytree(Path(build.__file__).parent, copy,
                    ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    for name in KERNELS:
        files = build.sources(name, copy)
        text = "".join(f.read_text() for f in files)
        assert set(re.findall(r'#include "([^"]+)"', text)) <= {f.name for f in files}
        assert "args.h" in {f.name for f in files}
        before = build.digest(name, "cc", copy)
        assert build.digest(name, "cc", copy) == before
        header = copy / "args.h"
        header.write_text(header.read_text() + f"/* {name} */\n")
        assert build.digest(name, "cc", copy) != before


# Every kernel and form, with its scratch ending at an unmapped page (scratch_guard.py)
_GUARDED = r"""
for threads in (1, 2, 3):
    torch.set_num_threads(threads)
    for n, h, w, cl in [(2, 17, 11, False), (2, 17, 11, True), (1, 9, 13, False),
                        (1, 7, 7, True)]:
        x = torch.randn(n, 10, h, w)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        a, d, b, bias = torch.randn(10, 6), torch.randn(6, 3, 3), torch.randn(9, 6), torch.randn(9)
        k, bk = torch.randn(5, 6, 3, 3), torch.randn(9, 5)
        a3, k1, k2 = torch.randn(10, 8), torch.randn(3, 4, 3, 1), torch.randn(5, 3, 1, 3)
        b3 = torch.randn(9, 10)
        r = planar.WINOGRAD_MIN_CHANNELS
        aw, kw, bw = torch.randn(10, r), torch.randn(r, r, 3, 3), torch.randn(9, r)
        a49, k49, b49 = torch.randn(10, 49), torch.randn(7, 7, 3, 1), torch.randn(9, 49)
        k49b = torch.randn(7, 7, 1, 3)
        a24, d24, b24 = torch.randn(10, 24), torch.randn(24, 3, 3), torch.randn(9, 24)
        lat, dwk = torch.randn(6, 10), torch.randn(6, 3, 3)
        omap, bias6 = torch.randn(w, 6), torch.randn(6)
        for kernel in ("nhwc", "planar"):
            run(lambda s: pdp.pointwise_depthwise_pointwise(x, a, d, b, bias, 1, 1, 1, s, kernel))
            run(lambda s: pdp.pointwise_depthwise_pointwise(x, a24, d24, b24, bias, (2, 1), 2, 1,
                                                            s, kernel))
            run(lambda s: pcp.pointwise_conv_pointwise(x, a, k, bk, bias, (2, 1), 2, 2, store=s,
                                                       kernel=kernel))
            run(lambda s: pcp.pointwise_conv_pointwise(x, a3, k1, b3, None, 1, (1, 0), 1, k2=k2,
                                                       padding2=1, groups=2, store=s,
                                                       kernel=kernel))
            run(lambda s: pcp.pointwise_conv_pointwise(x, aw, kw, bw, None, 1, 1, 1, store=s,
                                                       kernel=kernel))
            run(lambda s: pcp.pointwise_conv_pointwise(x, a49, k49, b49, bias, 1, (1, 0), 1,
                                                       k2=k49b, padding2=1, groups=7, store=s,
                                                       kernel=kernel))
        run(lambda s: pdp.bind(x, lat.t(), dwk, None, None, (1, 1), (1, 1), (1, 1), s, False,
                               bias6, omap)(x))  # a flattened convolution
        run(lambda s: pcp.pointwise_conv_pointwise(x, a, k, bk, None, (1, 2), 1, 1, store=s,
                                                   kernel="nhwc"))  # a width stride
        for r, k1, st1, kd in ((32, 3, 2, 3), (40, 5, 1, 5), (16, 1, 1, 3)):
            body = stem.StemBody(torch.randn(r, 3, k1, k1), torch.randn(r),
                                 torch.randn(r, 1, kd, kd), torch.randn(r), torch.randn(9, r),
                                 torch.randn(9), st1, "relu6", "silu")
            run(lambda s: stem.stem_block(x[:, :3], body, s))  # channels sliced: strided
            sq = pdp.Squeeze(torch.randn(5, r), torch.randn(5), torch.randn(r, 5),
                             torch.randn(r))
            run(lambda s: stem.stem_block(x[:, :3], body._replace(squeeze=sq), s))
"""


@needs_kernel
def test_no_kernel_reads_or_writes_past_its_scratch(tmp_path):
    """The kernels' scratch has no unexplained slack: each thread's share is what its
    buffers need (their own slack named in them: planar.c's SLACK), rounded to whole
    cache lines, and with the buffer ending at an unmapped page every kernel and form runs
    (1-3 threads, both layouts, batch 1 with shared window rows, Winograd, ring groups, a
    first 1x1 in pixel pairs or with dot-product tails, a flattened convolution, a stem
    block) with the same results as usual."""
    run_guarded(tmp_path, _GUARDED)
    for name in KERNELS:  # whole cache lines per thread
        kernel = KERNELS[name].KERNEL
        assert kernel.lib().scratch_floats(_some_args(kernel.args)) % 16 == 0


def _some_args(struct):
    """A small, valid geometry for ``struct`` (odd sizes, so rounding shows)."""
    values = {"n": 1, "h": 7, "w": 5, "c": 3, "r": 3, "r1": 3, "r2": 5, "r3": 5, "o": 7,
              "oh": 7, "ow": 5, "th": 3, "z": 1}
    return struct(**{n: values.get(n, 1 if n[0] in "ksd" and n != "depthwise" else 0)
                     for n, kind in struct._fields_ if kind is ctypes.c_int})


def test_scratch_is_one_buffer_per_thread_shared_by_every_kernel():
    """Without an owner every kernel call of a thread gets the thread's one buffer (grown
    when a call needs more; another thread has its own); an owner's buffer is its own,
    zero-filled and kept in its store."""
    import threading
    a = common.scratch({}, 1000)
    b = common.scratch({}, 10)
    assert b is a and a.numel() >= 1000
    bigger = common.scratch({}, a.numel() + 1)
    assert bigger.numel() > a.numel() and common.scratch({}, 1) is bigger
    other = []
    t = threading.Thread(target=lambda: other.append(common.scratch({}, 10)))
    t.start()
    t.join()
    assert other[0].data_ptr() != bigger.data_ptr()
    store: dict = {}
    owned = common.scratch(store, 64, owner="planar-test")
    assert owned is not bigger and not owned.any()
    assert common.scratch(store, 64, owner="planar-test") is owned
