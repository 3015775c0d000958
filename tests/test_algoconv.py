"""Every registered algorithm through AlgoConv2d agrees with nn.Conv2d over the whole space
of nn.Conv2d configurations: padding ints / 'same' / 'valid', all padding modes, stride,
dilation, groups, bias, dtype, and contiguous / channels_last / sliced inputs."""

import re
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from convgap import models
from convgap.algorithms import AlgoConv2d, AlgorithmFallbackWarning, get, names
from convgap.transforms import swap
from test_algorithm_math import conditioned_error  # noqa: E402

# algorithms that can run on this machine's CPU (others need CUDA and are skipped here)
CPU_ALGOS = [n for n in names() if n not in ("cudnn", "implicit_gemm")]


def rel(y, ref):
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 4]))
    depthwise = draw(st.booleans())
    if depthwise:
        c = draw(st.sampled_from([4, 8]))
        cin, cout, groups = c, c * draw(st.sampled_from([1, 2])), c
    else:
        cin, cout = groups * draw(st.integers(1, 4)), groups * draw(st.integers(1, 4))
    k = (draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 3, 5])))
    stride = draw(st.sampled_from([1, 1, 2, (1, 2)]))
    dilation = draw(st.sampled_from([1, 1, 2]))
    padding = draw(st.sampled_from([0, 1, 2, (1, 0), "same", "valid"]))
    if padding == "same":
        stride = 1
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    if mode != "zeros" and padding not in ("same", "valid"):
        padding = 1  # reflect needs padding < input size; keep it small
    bias = draw(st.booleans())
    n = draw(st.integers(1, 2))
    h, w = draw(st.integers(7, 12)), draw(st.integers(7, 12))
    layout = draw(st.sampled_from(["nchw", "channels_last", "sliced"]))
    return dict(cin=cin, cout=cout, k=k, stride=stride, dilation=dilation, padding=padding,
                mode=mode, bias=bias, groups=groups, n=n, h=h, w=w, layout=layout)


def build(case, dtype):
    conv = nn.Conv2d(case["cin"], case["cout"], case["k"], stride=case["stride"],
                     padding=case["padding"], dilation=case["dilation"],
                     groups=case["groups"], bias=case["bias"], padding_mode=case["mode"])
    conv = conv.to(dtype).eval()
    x = torch.randn(case["n"], case["cin"], case["h"], case["w"], dtype=dtype)
    if case["layout"] == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case["layout"] == "sliced":
        x = torch.cat([x, torch.randn_like(x)], dim=2)[:, :, ::2]  # non-contiguous view
    return conv, x


@pytest.mark.parametrize("algo", CPU_ALGOS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases(), double=st.booleans())
def test_algoconv_matches_conv2d(algo, case, double):
    dtype = torch.float64 if double else torch.float32
    conv, x = build(case, dtype)
    try:
        ref = conv(x)
    except RuntimeError:
        ref = None
    assume(ref is not None)  # not a configuration torch itself rejects (e.g. kernel > input)
    layer = AlgoConv2d(conv, algo)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == ref.shape
    tol = get(algo).tolerance if dtype == torch.float32 else 1e-9
    assert conditioned_error(y, conv, x) <= tol, (algo, case)


@pytest.mark.parametrize("algo", CPU_ALGOS)
def test_bfloat16_runs_or_falls_back(algo):
    conv = nn.Conv2d(8, 8, 3, padding=1).to(torch.bfloat16).eval()
    x = torch.randn(1, 8, 8, 8, dtype=torch.bfloat16)
    layer = AlgoConv2d(conv, algo)
    reason = get(algo).supports(layer.spec_for(x))
    with torch.no_grad():
        if reason is None:  # it runs bfloat16 itself, without a fallback
            with warnings.catch_warnings():
                warnings.simplefilter("error", AlgorithmFallbackWarning)
                y = layer(x)
            assert rel(y.float(), conv(x).float()) < 3e-2   # bf16 has ~3 digits
        else:  # torch runs the call, and the layer says why
            with pytest.warns(AlgorithmFallbackWarning, match=re.escape(reason)):
                y = layer(x)
            assert torch.equal(y, conv(x))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "convnext_tiny"])
def test_swapped_zoo_models_equal_originals(name):
    net = models.create(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
        for algo in CPU_ALGOS:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = swap(net, algo, x)
            assert rel(s(x), ref) < 10 * get(algo).tolerance, algo
