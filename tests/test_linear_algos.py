"""AlgoLinear: nn.Linear as a pointwise convolution run by torch or prepacked oneDNN;
agreement with F.linear, gradients, exports, weight changes, and swap(..., linear=...)."""

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from convgap import ConvgapError, cache, config, timing
from convgap.algorithms import AlgoLinear, AlgorithmFallbackWarning, tuner
from convgap.algorithms.linear import LinearSpec, supports_prepacked
from convgap.transforms import choices, swap, unswap

QUICK = timing.TimingConfig(warmup=1, min_repeats=3, max_repeats=3, min_time=0.0)
ONEDNN = supports_prepacked(LinearSpec(4, 4, True, (2, 4), "float32", "cpu", True)) is None
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="torch without oneDNN")


def rel(y, ref):
    return ((y - ref).abs().max() / ref.abs().max()).item()


@needs_onednn
@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       fin=st.integers(1, 40), fout=st.integers(1, 40), bias=st.booleans(),
       strided=st.booleans())
def test_prepacked_equals_f_linear(lead, fin, fout, bias, strided):
    lin = nn.Linear(fin, fout, bias=bias).eval()
    if strided:  # a permuted view, as ConvNeXt feeds its Linear layers from NCHW maps
        x = torch.randn(lead[0], fin, *lead[1:]).movedim(1, -1)
    else:
        x = torch.randn(*lead, fin)
    layer = AlgoLinear(lin, "prepacked")
    with torch.no_grad():
        y, ref = layer(x), F.linear(x, lin.weight, lin.bias)
    assert y.shape == ref.shape
    assert rel(y, ref) <= 1e-5


@needs_onednn
@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bf16")
def test_prepacked_bfloat16():
    lin = nn.Linear(64, 48).eval().to(torch.bfloat16)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert rel(AlgoLinear(lin, "prepacked")(x).float(), lin(x).float()) < 1e-2


def test_backward_agrees_and_state_dict_unchanged():
    lin = nn.Linear(12, 7)
    layer = AlgoLinear(lin, "prepacked")
    assert layer.state_dict().keys() == lin.state_dict().keys()
    assert layer.weight is lin.weight and layer.bias is lin.bias
    x = torch.randn(4, 3, 12, requires_grad=True)
    layer(x).square().sum().backward()
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    x.grad, lin.weight.grad = None, None
    F.linear(x, lin.weight, lin.bias).square().sum().backward()
    assert torch.allclose(gx, x.grad) and torch.allclose(gw, lin.weight.grad)


@needs_onednn
def test_weight_change_repacks():
    lin = nn.Linear(16, 8).eval()
    layer = AlgoLinear(lin, "prepacked")
    x = torch.randn(5, 16)
    with torch.no_grad():
        layer(x)
        lin.weight.mul_(-2.0)   # in place: the packed copy is stale
        assert rel(layer(x), F.linear(x, lin.weight, lin.bias)) < 1e-5
        lin.weight = nn.Parameter(torch.randn(8, 16))  # replaced on the original only
        layer.weight = lin.weight
        assert rel(layer(x), F.linear(x, lin.weight, lin.bias)) < 1e-5


def test_trace_and_compile_fall_back_to_f_linear():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    s = swap(net, "torch", linear="prepacked")
    assert all(isinstance(m, AlgoLinear) for m in (s[0], s[2]))
    x = torch.randn(2, 8)
    with torch.no_grad():
        traced = torch.jit.trace(s, x)
        assert "linear" in str(traced.graph) and "mkldnn" not in str(traced.graph)
        assert rel(traced(x), net(x)) < 1e-5
        assert rel(torch.compile(s, backend="eager")(x), net(x)) < 1e-5


def convnext_like():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pw1, self.pw2 = nn.Linear(8, 32), nn.Linear(32, 8)

        def forward(self, x):
            y = self.dw(x).permute(0, 2, 3, 1)
            y = self.pw2(F.gelu(self.pw1(y))).permute(0, 3, 1, 2)
            return x + y
    return nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), Block(), Block()).eval()


def _quick_tuning(monkeypatch):
    monkeypatch.setattr(config, "CONFIRM_ROUNDS", QUICK)
    monkeypatch.setattr(config, "CHOICE_ROUNDS", QUICK)


def test_auto_tunes_linears_with_the_convs_and_caches(monkeypatch):
    _quick_tuning(monkeypatch)
    net, x = convnext_like(), torch.randn(2, 3, 16, 16)
    s = swap(net, "auto", x, quiet=True, check=False)
    made = {c.name: c for c in choices(s)}
    lins = [c for c in made.values() if c.spec.startswith("linear")]
    assert len(made) == 7 and len(lins) == 4
    for c in lins:
        assert c.requested == "auto" and c.algorithm in c.tuning["times"]
        assert "torch" in c.tuning["times"]
        if ONEDNN:
            assert "prepacked" in c.tuning["times"] and c.tuning["errors"]["prepacked"] < 1e-4
    with torch.no_grad():
        assert rel(s(x), net(x)) < 1e-5
    keys = json.loads((cache.cache_dir() / tuner.TUNING_FILE).read_text())
    lin_keys = [k for k in keys if "|linear|" in k]
    assert len(lin_keys) == 2  # two distinct specs: 8->32 and 32->8, strided input to pw1
    tuner.clear_memory()
    s2 = swap(net, "auto", x, quiet=True, check=False)
    assert all(c.tuning["cached"] for c in choices(s2))
    back = unswap(s2)
    assert type(back[1].pw1) is nn.Linear and torch.equal(back[1].pw1.weight, net[1].pw1.weight)


def test_linear_options_and_errors():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(2, 3, 8, 8)
    kept = swap(net, "torch", x)             # default: 'keep' unless algos == 'auto'
    assert type(kept[2]) is nn.Linear
    s = swap(net, "torch", x, linear="prepacked")
    assert isinstance(s[2], AlgoLinear) and s[2].requested == "prepacked"
    with torch.no_grad():
        assert rel(s(x), net(x)) < 1e-5
    with pytest.raises(ConvgapError, match="unknown linear algorithm 'fast'.*prepacked"):
        swap(net, "torch", x, linear="fast")
    with pytest.raises(ConvgapError, match="linear='auto'.*example_input"):
        swap(net, "torch", linear="auto")
    with pytest.raises(ConvgapError, match="unknown linear algorithm"):
        AlgoLinear(nn.Linear(2, 2), "winograd_f2")


def test_unsupported_prepacked_falls_back_with_a_warning():
    net = nn.Sequential(nn.Linear(6, 4)).double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    with pytest.warns(AlgorithmFallbackWarning, match="does not take float64"):
        s = swap(net, "torch", x, linear="prepacked")
    (c,) = choices(s)
    assert c.algorithm == "torch" and "float64" in c.fallback
    with torch.no_grad():
        assert torch.equal(s(x), net(x))


def test_linear_subclasses_and_uncalled_layers_are_left_alone(monkeypatch):
    _quick_tuning(monkeypatch)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)  # out_proj: a subclass
            self.head = nn.Linear(8, 3)
            self.unused = nn.Linear(8, 8)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0])
    net, x = Net().eval(), torch.randn(2, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = swap(net, "auto", x, quiet=True, check=False)
    assert isinstance(s.head, AlgoLinear)
    assert type(s.attn.out_proj) is not AlgoLinear and type(s.unused) is nn.Linear
    with torch.no_grad():
        assert rel(s(x), net(x)) < 1e-5
