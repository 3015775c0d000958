"""Counts against independent references: torch's FlopCounterMode and hand arithmetic."""

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode

from convgap import ConvgapError, count, models


def torch_macs(model, shape):
    x = torch.randn(shape)
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        model(x)
    return c.get_total_flops() // 2


@pytest.mark.parametrize("name", models.names())
def test_zoo_macs_match_flop_counter(name):
    model = models.create(name).eval()
    shape = (1, 3, 224, 224)
    c = count(model, shape)
    reference = torch_macs(model, shape)
    assert sum(r.macs for r in c.layers) == reference   # every MAC sits in a layer row
    assert c.macs == reference and c.unattributed_macs == 0
    assert c.params == sum(p.numel() for p in model.parameters())
    # all MACs come from our own formulas, not from torch's counter (independence)
    assert all(r.macs == 0 for r in c.layers if r.macs_source != "formula")


@pytest.mark.parametrize("name, blocks", [("resnet50", 16), ("mobilenet_v2", 17),
                                          ("convnext_tiny", 18)])
def test_zoo_blocks_partition_their_layers(name, blocks):
    c = count(models.create(name).eval(), (2, 3, 64, 64))
    assert len(c.blocks) == blocks
    by_name = {r.name: r for r in c.layers}
    for b in c.blocks:
        inner = [by_name[n] for n in b.layers]
        assert inner and all(r.block == b.name for r in inner)
        assert b.macs == sum(r.macs for r in inner)
        assert b.layerwise_bytes == sum(r.min_bytes for r in inner)
        # one kernel moves no more than the layers do one by one
        assert b.fused_bytes < b.layerwise_bytes


conv_cases = st.tuples(
    st.sampled_from([1, 2, 4]),          # groups
    st.integers(1, 3),                   # channel multiplier in
    st.integers(1, 3),                   # channel multiplier out
    st.sampled_from([1, 3, 5]),          # kernel
    st.integers(1, 2),                   # stride
    st.integers(0, 2),                   # padding
    st.integers(1, 2),                   # dilation
    st.integers(7, 12),                  # size
    st.booleans(),                       # transposed
)


@settings(max_examples=40, deadline=None)
@given(conv_cases)
def test_conv_macs_match_flop_counter(case):
    g, mi, mo, k, s, p, d, size, transposed = case
    cin, cout = 4 * mi, 4 * mo
    assume(size + 2 * p - d * (k - 1) - 1 >= 0)  # the kernel fits the padded input
    cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    conv = cls(cin, cout, k, stride=s, padding=p, dilation=d, groups=g)
    shape = (2, cin, size, size)
    c = count(conv, shape)
    assert c.layers[0].macs == torch_macs(conv, shape)


def test_depthwise_and_grouped_by_hand():
    dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
    c = count(dw, (1, 32, 10, 10))
    assert c.macs == 32 * 10 * 10 * 9          # one 3x3 filter per channel
    grouped = nn.Conv2d(32, 64, 3, padding=1, groups=4, bias=True)
    r = count(grouped, (2, 32, 10, 10)).layers[0]
    assert r.macs == 2 * 64 * 10 * 10 * (32 // 4) * 9
    assert r.params == 64 * 8 * 9 + 64
    assert r.weight_bytes == 4 * r.params
    assert r.act_in_bytes == 4 * 2 * 32 * 100 and r.act_out_bytes == 4 * 2 * 64 * 100
    assert r.min_bytes == r.weight_bytes + r.act_in_bytes + r.act_out_bytes
    assert math.isclose(r.intensity, 2 * r.macs / r.min_bytes)


def test_linear_on_channels_last_tokens_and_other_ranks():
    for model, shape in [(nn.Linear(16, 8), (2, 5, 5, 16)),
                         (nn.Conv1d(4, 6, 3, groups=2), (3, 4, 20)),
                         (nn.Conv3d(2, 4, 3, padding=1), (1, 2, 6, 6, 6))]:
        assert count(model, shape).macs == torch_macs(model, shape)


def test_functional_work_is_unattributed_and_unknown_leaves_use_torch():
    class Gram(nn.Module):           # a leaf with no formula: torch's count is used
        def forward(self, x):
            return x @ x.transpose(-1, -2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.gram = Gram()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            y = self.gram(self.conv(x).flatten(2))   # (N, 4, 4)
            return y @ self.w                          # functional: no module

    net = Net()
    c = count(net, (2, 3, 10, 10))
    gram = next(r for r in c.layers if r.name == "gram")
    assert gram.macs_source == "flop_counter" and gram.macs == 2 * 4 * 4 * 64
    assert c.unattributed_macs == 2 * 4 * 4 * 4
    assert c.macs == torch_macs(net, (2, 3, 10, 10))


def test_shared_module_rows_per_call_params_once():
    relu = nn.ReLU()
    net = nn.Sequential(nn.Conv2d(3, 3, 1), relu, nn.Conv2d(3, 3, 1), relu)
    c = count(net, (1, 3, 4, 4))
    assert [r.name for r in c.layers] == ["0", "1", "2", "1#2"]
    assert sum(r.params for r in c.layers) == c.params == 24


@pytest.mark.parametrize("shape, match", [
    ((3, 224, 224), "rank 3"), ((1, 1, 224, 224), "1 channels"), ((1, 3, 0, 4), "non-positive"),
    ("abc", "sequence of ints")])
def test_bad_input_shapes(shape, match):
    with pytest.raises(ConvgapError, match=match):
        count(models.create("resnet18"), shape)


def test_failing_forward_is_a_clear_error():
    with pytest.raises(ConvgapError, match=r"failed on an input of shape \(1, 3, 3, 3\)"):
        count(nn.Conv2d(3, 4, 5), (1, 3, 3, 3))


def test_counts_a_model_whose_first_conv_was_factorized():
    """The input check reads the first layer taking channels: a factorized stem is not
    skipped for a later plain conv (which would demand its channels of the input)."""
    from convgap import TensorialConv2d
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    net[0] = TensorialConv2d.from_conv(net[0], "cp", rank=2)
    net.eval()
    with torch.no_grad():  # inference: the factorized layer binds its fused kernel
        net(torch.randn(1, 3, 12, 12))
    c = count(net, (1, 3, 12, 12))
    assert c.macs == sum(layer.macs for layer in c.layers) + c.unattributed_macs
    # the factorized layer's steps are counted (its fused kernel, which no counter sees,
    # steps aside while convgap counts), beside the plain conv's
    assert c.unattributed_macs > 0 and c.macs > 8 * 4 * 9 * 8 * 8
    with pytest.raises(ConvgapError, match="has 3 channels"):
        count(nn.Sequential(nn.Conv2d(8, 4, 3)), (1, 3, 12, 12))
