"""Conv2d / Linear subclasses with their own computation: every transform leaves them as they
are and says why, and every swap is checked against the original modules."""

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convgap
from convgap.algorithms import Algorithm, AlgorithmFallbackWarning, names, register, unregister
from convgap.transforms import choices, factorize, swap
from convgap.transforms.eligible import blocker


def rel(y, ref):
    return ((y - ref).abs().max() / ref.abs().max()).item()


class SameConv(nn.Conv2d):
    """TensorFlow 'SAME' padding, computed from the input size in forward."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv(nn.Conv2d):
    """Weight standardization inside forward (normalizer-free networks)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), 1.5))

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, self.gain * w, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class ScaledConv(nn.Conv2d):
    """Its own _conv_forward: the output scaled."""

    def _conv_forward(self, x, weight, bias):
        return 0.5 * super()._conv_forward(x, weight, bias)


class NoisyConv(nn.Conv2d):
    """Noise in training only; deterministic in eval."""

    def forward(self, x):
        y = super().forward(x)
        return y + torch.randn_like(y) if self.training else y


class InitOnlyConv(nn.Conv2d):
    """Only its initialisation differs: a plain convolution, rebuilt like one."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        nn.init.orthogonal_(self.weight)


class TempLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) / 3.0


SUBCLASSES = {"1": "SameConv", "3": "StdConv", "4": "ScaledConv", "5": "NoisyConv",
              "6": "WeightNormConv", "10": "TempLinear"}


def mixed_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),                           # 0 plain
        SameConv(8, 16, 3, stride=2),                            # 1 SAME, 15 -> 8
        nn.ReLU(),
        StdConv(16, 16, 3, padding=1),                           # 3
        ScaledConv(16, 16, 3, padding=1, groups=16),             # 4
        NoisyConv(16, 16, 1),                                    # 5
        nn.utils.parametrizations.weight_norm(nn.Conv2d(16, 16, 3, padding=1)),  # 6
        InitOnlyConv(16, 16, 3, padding=1),                      # 7 plain
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        TempLinear(16, 10),                                      # 10
    )
    return net.eval()


def x_in(layout="nchw"):
    x = torch.randn(2, 3, 15, 15, generator=torch.Generator().manual_seed(1))
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def test_blocker_names_each_reason():
    net = mixed_net()
    assert blocker(net[0]) is None and blocker(net[7]) is None
    assert "overrides Conv2d.forward" in blocker(net[1])
    assert "overrides Conv2d._conv_forward" in blocker(net[4])
    assert "parametrizations (weight)" in blocker(net[6])
    assert "overrides Linear.forward" in blocker(net[10])
    hooked = nn.Conv2d(3, 3, 1)
    hooked.register_forward_pre_hook(lambda m, a: None)
    assert "forward hooks" in blocker(hooked)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("algo", [*names(), "auto"])
def test_swap_every_algorithm_is_exact_against_the_original(algo, layout):
    net, x = mixed_net(), x_in(layout)
    ref = net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AlgorithmFallbackWarning)
        s = swap(net, algo, x, quiet=True, linear="auto" if algo == "auto" else "prepacked")
    y = s(x)
    assert y.shape == ref.shape
    assert rel(y, ref) <= 1e-4
    for n, cls in SUBCLASSES.items():
        assert s.get_submodule(n) is not net.get_submodule(n)  # a copy, left as it was
        assert type(s.get_submodule(n)) is type(net.get_submodule(n))
    made = {c.name: c for c in choices(s)}
    for n in SUBCLASSES:
        assert made[n].algorithm is None and "left as it is" in made[n].fallback
    assert made["0"].algorithm is not None and made["7"].algorithm is not None


def test_swap_leaves_subclasses_without_example_input_and_warns():
    net = mixed_net()
    with pytest.warns(AlgorithmFallbackWarning, match=r"6 layer\(s\) left as they are"):
        s = swap(net, "im2col", linear="prepacked")
    x = x_in()
    assert rel(s(x), net(x)) <= 1e-4
    assert type(s[1]) is SameConv and type(s[10]) is TempLinear
    assert s[0].algorithm == "im2col" and s[7].algorithm == "im2col"


def test_naming_a_subclass_explicitly_skips_it_with_the_reason():
    net, x = mixed_net(), x_in()
    with pytest.warns(AlgorithmFallbackWarning, match="SameConv overrides"):
        s = swap(net, {"1": "im2col", "0": "im2col"}, x)
    assert type(s[1]) is SameConv and s[0].algorithm == "im2col"


def test_noisy_conv_keeps_its_training_noise():
    net = mixed_net()
    s = swap(net, "torch", x_in())
    s.train()
    x = x_in()
    torch.manual_seed(3)
    a = s(x)
    torch.manual_seed(4)
    b = s(x)
    assert rel(a, b) > 1e-3  # the noise is still there


@pytest.fixture
def wrong_algorithm():
    @register("test_sign_flip")
    class SignFlip(Algorithm):
        def run(self, x, state, spec):
            w, b = state
            return -F.conv2d(x, w, b, spec.stride, spec.padding, spec.dilation, spec.groups)
    yield "test_sign_flip"
    unregister("test_sign_flip")


def test_a_requested_algorithm_that_disagrees_with_the_original_is_not_kept(wrong_algorithm):
    net, x = mixed_net(), x_in()
    with pytest.warns(AlgorithmFallbackWarning, match="check against the original layer"):
        s = swap(net, wrong_algorithm, x)
    assert rel(s(x), net(x)) <= 1e-4
    made = {c.name: c for c in choices(s)}
    assert made["0"].algorithm == "torch" and made["0"].requested == wrong_algorithm
    assert "differs by" in made["0"].fallback
    # without an input nothing can be checked: the user asked for it, the user gets it
    unchecked = swap(net, wrong_algorithm)
    assert unchecked[0].algorithm == wrong_algorithm


def test_factorize_leaves_subclasses_alone():
    net, x = mixed_net(), x_in()
    with pytest.warns(UserWarning, match="left as they are"):
        f = factorize(net, "tucker", rank=4, quiet=True)
    for n in ("1", "3"):
        assert type(f.get_submodule(n)) is type(net.get_submodule(n))
    assert isinstance(f[0], convgap.TensorialConv2d) and isinstance(f[7], convgap.TensorialConv2d)
    assert f(x).shape == net(x).shape
    skipped = {c.name: c.reason for c in convgap.changes(f) if c.transform == "left"}
    assert set(skipped) >= {"1", "3", "6"}
    with pytest.warns(UserWarning, match="SameConv overrides"):
        f = factorize(net, "cp", rank=4, layers=["1", "0"], quiet=True)
    assert type(f[1]) is SameConv and isinstance(f[0], convgap.TensorialConv2d)
