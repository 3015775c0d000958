"""fuse: block patterns recognised by what they compute, fused modules exact against the
blocks they replace, kept only where measured faster, and plain modules afterwards."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from convgap import ConvgapError, choice, count, models
from convgap.kernels import cpu as kernels
from convgap.layers import fused_blocks as fb
from convgap.transforms import changes
from convgap.transforms.changes import LEFT_ATTR
from convgap.transforms.fold import fold_batchnorm
from convgap.transforms.fuse import FUSED_ATTR, FusionWarning
from convgap.transforms.fuse import fuse as fuse_all
from convgap.transforms.patterns import (PATTERNS, Pattern, block_patterns, describe,
                                         match, register)
from batchnorm import randomize


def fuse(net, *args, **kwargs):
    """fuse with the block patterns only (the whole-network plan: tests/test_plan.py)."""
    kwargs.setdefault("patterns", block_patterns())
    return fuse_all(net, *args, **kwargs)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def fused_modules(net):
    """The fused modules of ``net`` not inside another (a FusedStemBlock holds two)."""
    found = {}
    for n, m in net.named_modules():
        if isinstance(m, fb.FusedBlock) and not any(n.startswith(p + ".") for p in found):
            found[n] = m
    return found


@pytest.fixture
def always_fuse():
    with choice.forced({"fuse": "fused"}):
        yield


# the blocks each zoo model has, by pattern (stems and head convs: conv_act; classifier
# heads: pool_linear; mobilenet_v2's stem and first block: stem_block)
ZOO = {
    "resnet18": {"basic": 8, "conv_act": 1, "pool_linear": 1},
    "mobilenet_v2": {"stem_block": 1, "inverted_residual": 16, "conv_act": 1,
                     "pool_linear": 1},
    "efficientnet_b0": {"stem_block": 1, "mbconv": 15, "conv_act": 1, "pool_linear": 1},
    "convnext_tiny": {"convnext": 18},
    "convfirst": {"convfirst": 18, "conv_act": 1},
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_blocks_fused_exact(name, always_fuse):
    torch.manual_seed(0)
    net = randomize(models.create(name, num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    f = fuse(net, x, quiet=True)
    found = fused_modules(f)
    by_pattern = {}
    for m in found.values():
        by_pattern[m.pattern] = by_pattern.get(m.pattern, 0) + 1
    assert by_pattern == ZOO[name]
    assert all(getattr(m, FUSED_ATTR)["error"] <= 1e-4 for m in found.values())
    with torch.no_grad():
        ref = net(x)
        assert rel(f(x), ref) < 1e-4
        assert rel(f(x.contiguous(memory_format=torch.channels_last)), ref) < 1e-4
    # the original model is untouched (inplace=False)
    assert not fused_modules(net) and bns == sum(isinstance(m, nn.BatchNorm2d)
                                                 for m in net.modules())


def test_resnet50_bottleneck_with_projection(always_fuse):
    torch.manual_seed(0)
    net = randomize(models.create("resnet50", num_classes=10))
    x = torch.randn(1, 3, 64, 64)
    f = fuse(net, x, quiet=True)
    found = fused_modules(f)
    assert found.pop("conv1").pattern == "conv_act"   # the stem, outside any block
    found = {n: m for n, m in found.items() if m.pattern != "pool_linear"}
    assert len(found) == 16 and all(m.pattern == "bottleneck" for m in found.values())
    assert sum(m.shortcut is not None for m in found.values()) == 4  # projection shortcuts
    with torch.no_grad():
        assert rel(f(x), net(x)) < 1e-4


# -- blocks written the way third-party code writes them -------------------------------
class FunctionalInvertedResidual(nn.Module):
    """Functional activations, convs with biases, no BatchNorm, in-place add."""

    def __init__(self, c=16, r=64):
        super().__init__()
        self.pw = nn.Conv2d(c, r, 1)
        self.dw = nn.Conv2d(r, r, 3, padding=1, groups=r)
        self.pwl = nn.Conv2d(r, c, 1)

    def forward(self, x):
        y = F.relu6(self.pw(x))
        y = F.hardtanh(self.dw(y), 0.0, 6.0)
        y = self.pwl(y)
        y += x
        return y


class TorchvisionStyleBasic(nn.Module):
    def __init__(self, c_in=8, c=16, stride=2):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False),
                                        nn.BatchNorm2d(c))

    def forward(self, x):
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TimmStyleSE(nn.Module):
    """MBConv with a functional squeeze-excitation (mean, sigmoid) and SiLU."""

    def __init__(self, c=16, r=48, s=8):
        super().__init__()
        self.conv_pw = nn.Conv2d(c, r, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(r)
        self.conv_dw = nn.Conv2d(r, r, 5, padding=2, groups=r, bias=False)
        self.bn2 = nn.BatchNorm2d(r)
        self.se_reduce = nn.Conv2d(r, s, 1)
        self.se_expand = nn.Conv2d(s, r, 1)
        self.conv_pwl = nn.Conv2d(r, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.silu(self.bn1(self.conv_pw(x)))
        y = F.silu(self.bn2(self.conv_dw(y)))
        s = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        y = y * s
        return x + self.bn3(self.conv_pwl(y))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block as its authors wrote it (the layer scale on the NHWC result, before
    the permute back) or as torchvision does (a (C, 1, 1) scale on the NCHW result)."""

    def __init__(self, c=16, scale_first=True):
        super().__init__()
        self.scale_first = scale_first
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1, self.pwconv2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(torch.rand(c) if scale_first else torch.rand(c, 1, 1))

    def forward(self, x):
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1)))))
        if self.scale_first:
            return x + (self.gamma * y).permute(0, 3, 1, 2)
        return x + self.gamma * y.permute(0, 3, 1, 2)


@pytest.mark.parametrize("block, pattern", [
    (FunctionalInvertedResidual, "inverted_residual"),
    (TorchvisionStyleBasic, "basic"),
    (TimmStyleSE, "mbconv"),
    (ConvNeXtBlock, "convnext"),
    (lambda: ConvNeXtBlock(scale_first=False), "convnext"),
])
def test_third_party_blocks_recognised(block, pattern, always_fuse):
    torch.manual_seed(1)
    m = randomize(block())
    net = nn.Sequential(m).eval()
    x = torch.randn(2, m.conv1.in_channels if hasattr(m, "conv1") else 16, 12, 12)
    f = fuse(net, x, quiet=True)
    found = fused_modules(f)
    assert [b.pattern for b in found.values()] == [pattern]
    with torch.no_grad():
        assert rel(f(x), net(x)) < 1e-4


def test_describe_normalises_activations():
    chain = describe(FunctionalInvertedResidual())
    assert repr(chain) == "conv1x1 -> act:relu6 -> conv3x3/dw -> act:relu6 -> conv1x1 + x"
    p, _ = match(chain)
    assert p.name == "inverted_residual"


def test_unfusable_block_left_with_reason(always_fuse):
    class Pooling(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.pool = nn.MaxPool2d(3, 1, 1)

        def forward(self, x):
            return x + self.pool(self.conv(x))

    net = nn.Sequential(Pooling()).eval()
    x = torch.randn(1, 8, 6, 6)
    f = fuse(net, x, quiet=True)
    assert not fused_modules(f)
    assert "MaxPool2d" in getattr(f[0], LEFT_ATTR)
    rows = [c for c in changes(f) if c.transform == "left" and c.name == "0"]
    assert rows and "MaxPool2d" in rows[0].reason


def test_not_faster_is_not_kept():
    net = nn.Sequential(FunctionalInvertedResidual()).eval()
    x = torch.randn(1, 16, 8, 8)
    with choice.forced({"fuse": "layerwise"}):
        f = fuse(net, x, quiet=True)
    assert not fused_modules(f)
    assert "not faster" in getattr(f[0], LEFT_ATTR)


def test_disagreeing_fused_block_is_not_kept(monkeypatch, always_fuse):
    real = fb.FusedConvChain._bind

    def wrong(self, x):
        run = real(self, x)
        return lambda t: run(t) * 1.01
    monkeypatch.setattr(fb.FusedConvChain, "_bind", wrong)
    net = nn.Sequential(FunctionalInvertedResidual()).eval()
    x = torch.randn(1, 16, 8, 8)
    with pytest.warns(FusionWarning, match="disagrees"):
        f = fuse(net, x, quiet=True)
    assert not fused_modules(f)


def test_selection_and_errors(always_fuse):
    net = randomize(models.create("mobilenet_v2", num_classes=10))
    x = torch.randn(1, 3, 32, 32)
    f = fuse(net, x, quiet=True, layers=["features.2", "features.3"])
    assert sorted(fused_modules(f)) == ["features.2", "features.3"]
    f = fuse(net, x, quiet=True, patterns=["conv_act"])
    assert {m.pattern for m in fused_modules(f).values()} == {"conv_act"}
    with pytest.raises(ConvgapError, match="unknown block patterns"):
        fuse(net, x, patterns=["nope"])
    with pytest.raises(ConvgapError, match="eval"):
        fuse(net.train(), x)


def test_state_dict_round_trip(always_fuse):
    torch.manual_seed(0)
    net = randomize(models.create("mobilenet_v2", num_classes=10))
    x = torch.randn(1, 3, 32, 32)
    f = fuse(net, x, quiet=True)
    other = fuse(randomize(models.create("mobilenet_v2", num_classes=10), seed=5), x,
                 quiet=True)
    buf = io.BytesIO()
    torch.save(f.state_dict(), buf)
    buf.seek(0)
    with torch.no_grad():
        before = other(x)
        other.load_state_dict(torch.load(buf, weights_only=True))
        after = other(x)  # the bound plans follow the loaded weights
        assert rel(after, f(x)) < 1e-6 and rel(before, after) > 1e-3


def test_trace_export_and_training_use_the_torch_ops(always_fuse):
    torch.manual_seed(0)
    net = randomize(models.create("resnet18", num_classes=10))
    x = torch.randn(1, 3, 32, 32)
    f = fuse(net, x, quiet=True)
    with torch.no_grad():
        ref = f(x)
        traced = torch.jit.trace(f, x)
        assert rel(traced(x), ref) < 1e-5
        graph = str(traced.inlined_graph)
        assert "mkldnn" not in graph and "aten::_convolution" in graph
    ort = pytest.importorskip("onnxruntime")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(f, (x,), buf, dynamo=False, opset_version=17)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert rel(torch.from_numpy(y), ref) < 1e-4
    # training through a fused block: the reference ops, gradients reach its parameters
    block = next(iter(fused_modules(f).values()))
    xb = torch.randn(1, block.convs[0].in_channels, 8, 8, requires_grad=True)
    block(xb).square().sum().backward()
    assert block.convs[0].weight.grad is not None and xb.grad is not None


def test_count_sees_what_the_fused_blocks_compute(always_fuse):
    torch.manual_seed(0)
    net = randomize(models.create("mobilenet_v2", num_classes=10))
    x = torch.randn(1, 3, 32, 32)
    f = fuse(net, x, quiet=True)
    folded = fold_batchnorm(net, x, quiet=True)
    assert count(f, x.shape).macs == count(folded, x.shape).macs


def test_user_pattern(always_fuse):
    class Doubler(nn.Module):
        def forward(self, x):
            return 2 * x

    def matches(chain):
        return None if [o.kind for o in chain.body] == ["conv", "act"] and \
            chain.body[1].arg == "tanh" else "not conv + tanh"

    def build(chain):
        conv = chain.body[0].module
        return nn.Sequential(conv, nn.Tanh())

    net = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Tanh())).eval()
    register(Pattern("conv_tanh", matches, build), first=True)
    try:
        assert list(PATTERNS)[0] == "conv_tanh"
        f = fuse(net, torch.randn(1, 3, 4, 4), quiet=True, check=False)
        assert isinstance(f[0], nn.Sequential) and getattr(f[0], FUSED_ATTR)["pattern"] == \
            "conv_tanh"
        with pytest.raises(ValueError, match="already registered"):
            register(Pattern("conv_tanh", matches, build))
    finally:
        PATTERNS.pop("conv_tanh")


_GPU_SCRIPT = """
import json, torch, torch.nn as nn
from convgap.layers import FusedConvFirst, FusedInvertedResidual
from interpreted import rel
torch.manual_seed(0)
def conv(c, o, k=1, s=1, g=1):
    m = nn.Conv2d(c, o, k, s, k // 2, groups=g)
    with torch.no_grad():
        m.weight.mul_(0.5)
    return m
blocks = [
    FusedInvertedResidual([conv(8, 24), conv(24, 24, 3, 1, 24), conv(24, 8)],
                          ["relu6", "relu6", None], "identity"),
    FusedInvertedResidual([conv(8, 24), conv(24, 24, 3, 2, 24), conv(24, 16)],
                          ["silu", "silu", None]),
    FusedInvertedResidual([conv(8, 8, 3, 1, 8), conv(8, 16)], ["relu6", None]),
    FusedConvFirst([conv(16, 16, 3, 1, 2), conv(16, 64), conv(64, 16)],
                   [None, "silu", None], "identity"),
]
out = []
with torch.no_grad():
    for m in blocks:
        x = torch.randn(1, m.convs[0].in_channels, 6, 6)
        call = m.gpu_call(x)
        out.append(None if call is None else rel(call(x), m.reference(x)))
print("JSON:" + json.dumps(out))
"""


def test_gpu_path_is_the_triton_kernel_and_agrees():
    """The fused modules' GPU calls (Triton, run by the interpreter on CPU tensors) agree
    with their torch reference: inverted residuals with and without the residual, stride
    2, no expansion, and a ConvFirst block."""
    pytest.importorskip("triton")
    from interpreted import run_interpreted
    out = run_interpreted(_GPU_SCRIPT)
    assert len(out) == 4 and None not in out
    assert max(out) < 1e-4


@pytest.mark.parametrize("name, kind, runs", [
    ("mobilenet_v2", "fused_inverted_residual", "onednn"),
    ("mobilenet_v2", "fused_inverted_residual", "kernel"),
    ("efficientnet_b0", "fused_mbconv", "onednn"),
    ("efficientnet_b0", "fused_mbconv", "kernel"),
    ("efficientnet_b0", "fused_mbconv", "block")])
def test_every_fast_path_agrees(name, kind, runs, always_fuse):
    """Inverted residuals and MBConv blocks run the oneDNN chain or the C kernel (MBConv:
    its first pass, or the whole block) as the measured choice decides: each, forced,
    agrees with the unfused model."""
    if runs != "onednn" and not kernels.available():
        pytest.skip("the C kernels need AVX-512")
    torch.manual_seed(0)
    net = randomize(models.create(name, num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    with choice.forced({kind: runs}):
        f = fuse(net, x, quiet=True)
        with torch.no_grad():
            assert rel(f(x), net(x)) < 1e-4
    chose = {m.kernel_choice for m in fused_modules(f).values()
             if m.pattern in ("inverted_residual", "mbconv")}
    # None: a block without the kernel; an MBConv without an expansion has no separate
    # first pass to run as 'kernel' (it keeps the incumbent)
    allowed = {runs, None} | ({"onednn"} if (name, runs) == ("efficientnet_b0", "kernel")
                              else set())
    assert runs in chose and chose <= allowed


def test_stages_holding_fused_blocks_are_not_reported_left(always_fuse):
    net = randomize(models.create("efficientnet_b0", num_classes=10))
    f = fuse(net, torch.randn(1, 3, 32, 32), quiet=True)
    left = [c.name for c in changes(f) if c.transform == "left"]
    # the stem-to-head Sequentials hold fused blocks: none of them is a block left as is
    assert not any(n.startswith("features") and n.count(".") == 1 for n in left), left
    assert [c for c in changes(f) if c.transform == "fuse"]


class _ActResidual(nn.Module):
    """conv-bn-act, conv-bn, + x, then ``act`` (not only ReLU: timm's blocks take any)."""

    def __init__(self, c, act):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.act1, self.act2 = act(), act()

    def forward(self, x):
        return self.act2(self.b2(self.c2(self.act1(self.b1(self.c1(x))))) + x)


@pytest.mark.parametrize("act", [nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_residual_blocks_with_any_post_activation_run_fused(act, fmt):
    """oneDNN fuses only relu after its binary add: any other activation after the
    residual add runs after the fused conv + add, exact."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), _ActResidual(8, act)).eval()
    randomize(net)
    fused = fuse(net, quiet=True)
    assert len(fused_modules(fused)) >= 1
    x = torch.randn(2, 3, 12, 12).contiguous(memory_format=fmt)
    with torch.no_grad():
        assert rel(fused(x), net(x)) < 1e-5


class PooledNet(nn.Module):
    """A third-party-style classifier: conv features, then the head written with a
    functional flatten between an nn pool, a dropout and the linear layer."""

    def __init__(self, p=0.3, flatten_module=False):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten() if flatten_module else None
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(24, 7)

    def forward(self, x):
        h = self.pool(self.features(x))
        h = self.flatten(h) if self.flatten is not None else torch.flatten(h, 1)
        return self.head(self.drop(h))


@pytest.mark.parametrize("flatten_module", [False, True])
def test_classifier_head_fused(flatten_module, always_fuse):
    from convgap.transforms.changes import FUSED_INTO_ATTR
    torch.manual_seed(0)
    net = PooledNet(flatten_module=flatten_module).eval()
    x = torch.randn(3, 3, 10, 12)
    f = fuse(net, x, quiet=True)
    assert isinstance(f.pool, fb.FusedPoolLinear) and f.pool.p == pytest.approx(0.3)
    replaced = ["drop", "head"] + (["flatten"] if flatten_module else [])
    for name in replaced:
        assert isinstance(f.get_submodule(name), nn.Identity)
        assert getattr(f.get_submodule(name), FUSED_INTO_ATTR) == "pool"
    by_name = {c.name: c for c in changes(f)}
    assert by_name["pool"].transform == "fuse" and by_name["pool"].runs == "pool_linear"
    assert all(by_name[n].transform == "fuse" and by_name[n].into == "pool"
               for n in replaced)
    with torch.no_grad():
        assert rel(f(x), net(x)) < 1e-5
        assert rel(f(x.contiguous(memory_format=torch.channels_last)), net(x)) < 1e-5
        # the torch reference path (float64, as on CUDA or in half precision): in eval
        # mode like the model, so no dropout (a new module starts in training mode)
        assert not any(m.training for m in f.modules())
        f64, n64 = copy.deepcopy(f).double(), copy.deepcopy(net).double()
        assert rel(f64(x.double()), n64(x.double())) < 1e-12
    # training: the same dropout draws as the original head, gradients reach the linear
    f.train(), net.train()
    torch.manual_seed(3)
    want = net(x)
    torch.manual_seed(3)
    got = f(x)
    assert rel(got, want) < 1e-5 and rel(got, net(x)) > 1e-3  # dropout is on
    got.square().sum().backward()
    assert f.pool.linear.weight.grad is not None


def test_classifier_head_not_fused_where_it_is_not_one():
    from convgap.transforms.patterns import find_head

    class TwoOutputs(PooledNet):  # the pooled features are returned too
        def forward(self, x):
            h = torch.flatten(self.pool(self.features(x)), 1)
            return self.head(h), h

    class NoFlatten(PooledNet):
        def forward(self, x):
            return self.head(self.pool(self.features(x)).flatten(2).squeeze(2))

    class SharedLinear(PooledNet):  # the linear layer called twice
        def forward(self, x):
            h = torch.flatten(self.pool(self.features(x)), 1)
            return self.head(h) + self.head(h)

    assert find_head(PooledNet()).pool == "pool"
    for net in (TwoOutputs(), NoFlatten(), SharedLinear()):
        assert isinstance(find_head(net.eval()), str)
    net = PooledNet().eval()
    x = torch.randn(1, 3, 8, 8)
    with choice.forced({"fuse": "layerwise"}):
        f = fuse(net, x, quiet=True)
    assert type(f.pool) is nn.AdaptiveAvgPool2d and isinstance(f.head, nn.Linear)
    assert "not faster" in getattr(f.pool, LEFT_ATTR)
    with choice.forced({"fuse": "fused"}):
        only = fuse(net, x, quiet=True, patterns=["pool_linear"])
        blocks = fuse(net, x, quiet=True, patterns=["conv_act"])
    assert {m.pattern for m in fused_modules(only).values()} == {"pool_linear"}
    assert isinstance(blocks.head, nn.Linear)


def test_disagreeing_head_is_not_kept(monkeypatch, always_fuse):
    real = fb.FusedPoolLinear._bind
    monkeypatch.setattr(fb.FusedPoolLinear, "_bind",
                        lambda self, x: (lambda t, run=real(self, x): run(t) + 1.0))
    net = PooledNet().eval()
    with pytest.warns(FusionWarning, match="disagrees"):
        f = fuse(net, torch.randn(2, 3, 8, 8), quiet=True)
    assert type(f.pool) is nn.AdaptiveAvgPool2d and isinstance(f.head, nn.Linear)


class _StemNet(nn.Module):
    """A stem (conv + BN + ReLU6 from RGB), a no-expand inverted residual (depthwise + BN +
    act, 1x1 + BN), then ``tail``; ``reuse``: the stem's output also feeds the tail."""

    def __init__(self, act=nn.ReLU6, reuse=False, stride=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24),
                                  act())
        self.block = nn.Sequential(nn.Conv2d(24, 24, 3, stride, 1, groups=24, bias=False),
                                   nn.BatchNorm2d(24), act(), nn.Conv2d(24, 16, 1, bias=False),
                                   nn.BatchNorm2d(16))
        self.reuse, self.stride = reuse, stride

    def forward(self, x):
        s = self.stem(x)
        y = self.block(s)
        return y + s[:, :16, ::self.stride, ::self.stride] if self.reuse else y


@pytest.mark.parametrize("act", [nn.ReLU6, nn.SiLU])
def test_stem_and_first_block_fused_as_one(act, always_fuse):
    """A stem and the no-expand inverted residual it feeds run as one FusedStemBlock in the
    stem's place, equal to the original (NCHW and channels_last inputs), the block's module
    an Identity reported as fused into the stem; patterns without 'stem_block' keep two."""
    from convgap.transforms.changes import FUSED_INTO_ATTR
    torch.manual_seed(0)
    net = randomize(_StemNet(act)).eval()
    x = torch.randn(2, 3, 30, 26)
    f = fuse(net, x, quiet=True)
    assert isinstance(f.stem, fb.FusedStemBlock) and isinstance(f.block, nn.Identity)
    assert getattr(f.block, FUSED_INTO_ATTR) == "stem"
    by_name = {c.name: c for c in changes(f)}
    assert by_name["stem"].runs == "stem_block" and by_name["block"].into == "stem"
    assert set(by_name["stem"].tuning["parts"]) == {"stem", "block"}  # the two it holds
    assert not [c for c in changes(f) if c.name.startswith("stem.")]
    with torch.no_grad():
        ref = net(x)
        assert rel(f(x), ref) < 1e-5
        assert rel(f(x.contiguous(memory_format=torch.channels_last)), ref) < 1e-5
        if kernels.available():
            f(x)
            assert f.stem.kernel_choice in ("kernel", "modules")
    two = fuse(net, x, quiet=True, patterns=["conv_act", "inverted_residual"])
    assert isinstance(two.stem, fb.FusedConvAct)
    assert isinstance(two.block, fb.FusedInvertedResidual)


@pytest.mark.parametrize("change", ["reuse", "stride"])
def test_stem_block_only_where_the_stem_feeds_one_stride_1_block(change, always_fuse):
    """A stem whose output is read elsewhere too, or a block at stride 2, stays two fused
    modules."""
    torch.manual_seed(0)
    net = randomize(_StemNet(reuse=change == "reuse", stride=2 if change == "stride" else 1))
    net.eval()
    x = torch.randn(1, 3, 20, 20)
    f = fuse(net, x, quiet=True)
    assert not any(isinstance(m, fb.FusedStemBlock) for m in f.modules())
    with torch.no_grad():
        assert rel(f(x), net(x)) < 1e-5


def test_fused_stem_block_fast_paths_agree():
    """FusedStemBlock's kernel and its two modules give the block's result, both layouts,
    with an inverted residual or an MBConv (squeeze-excitation) after the stem (the two
    fast paths the measured choice picks between; without the C kernel, the modules' own
    alone); other blocks are refused."""
    torch.manual_seed(0)
    first = fb.FusedConvAct([nn.Conv2d(3, 32, 3, 2, 1)], ["silu"])
    ir = fb.FusedInvertedResidual([nn.Conv2d(32, 32, 3, 1, 1, groups=32),
                                   nn.Conv2d(32, 16, 1)], ["relu6", None])
    mb = fb.FusedMBConv(None, "silu", nn.Conv2d(32, 32, 3, 1, 1, groups=32), "silu",
                        nn.Conv2d(32, 8, 1), "silu", nn.Conv2d(8, 32, 1), "sigmoid",
                        nn.Conv2d(32, 16, 1), False)
    x = torch.randn(2, 3, 37, 41)
    for block in (ir, mb):
        fused = fb.FusedStemBlock(first, block).eval()
        with torch.no_grad():
            want = block.reference(first.reference(x))
            assert rel(fused.reference(x), want) < 1e-6
            for inp in (x, x.contiguous(memory_format=torch.channels_last)):
                assert rel(block(first(inp)), want) < 1e-5
                kernel = fused._kernel(inp)
                assert (kernel is None) == (not kernels.available())
                if kernel is not None:
                    assert rel(kernel(inp), want) < 1e-5
                assert rel(fused(inp), want) < 1e-5
    with pytest.raises(ValueError, match="no expansion"):
        fb.FusedStemBlock(first, fb.FusedInvertedResidual(
            [nn.Conv2d(32, 64, 1), nn.Conv2d(64, 64, 3, 1, 1, groups=64),
             nn.Conv2d(64, 16, 1)], ["relu6", "relu6", None]))
    with pytest.raises(ValueError, match="FusedInvertedResidual or a FusedMBConv"):
        fb.FusedStemBlock(first, first)


def test_stem_block_formed_where_the_stem_alone_was_not_faster(monkeypatch, always_fuse):
    """A stem whose fused conv + act measured no faster than its layers (kept as it is)
    still joins the block after it: the stem block is timed against what the model runs."""
    import importlib
    fuse_module = importlib.import_module("convgap.transforms.fuse")
    verify = fuse_module._verify

    def stem_alone_slower(old, new, pattern, args, info):
        if pattern == "conv_act":
            verify(old, new, pattern, args, info)
            return "fused conv_act not faster (forced)", False
        return verify(old, new, pattern, args, info)
    monkeypatch.setattr(fuse_module, "_verify", stem_alone_slower)
    torch.manual_seed(0)
    net = randomize(_StemNet()).eval()
    x = torch.randn(1, 3, 24, 24)
    f = fuse(net, x, quiet=True)
    assert isinstance(f.stem, fb.FusedStemBlock) and isinstance(f.block, nn.Identity)
    with torch.no_grad():
        assert rel(f(x), net(x)) < 1e-5
    f = fuse(net, x, quiet=True, patterns=["conv_act", "inverted_residual"])
    assert not isinstance(f.stem, fb.FusedBlock)   # the stem alone stays as it was


# -- a conv + activation written outside any block -------------------------------------
class LooseConvActs(nn.Module):
    """Conv + act pairs in a model's own forward: a stem (conv, BN, ReLU), one through a
    dropout to a SiLU, one whose ReLU module is shared, one with a functional ReLU, one
    whose output is also read elsewhere; none inside a block."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn, self.act = nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU()
        self.c2, self.drop, self.silu = nn.Conv2d(8, 8, 3, 1, 1), nn.Dropout(0.1), nn.SiLU()
        self.c3, self.c4 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.shared = nn.ReLU()
        self.c5, self.c6 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        h = self.act(self.bn(self.stem(x)))
        h = self.silu(self.drop(self.c2(h)))
        h = self.shared(self.c3(h)) + self.shared(self.c4(h))   # the ReLU module is shared
        h = F.relu(self.c5(h))                                  # a functional activation
        g = self.c6(h)
        return torch.relu(g) + g                                # g read twice


def test_loose_conv_acts_fused_where_the_activation_is_its_own(always_fuse):
    torch.manual_seed(0)
    net = randomize(LooseConvActs()).eval()
    x = torch.randn(2, 3, 16, 16)
    f = fuse(net, x, quiet=True)
    found = fused_modules(f)
    assert sorted(found) == ["c2", "stem"]
    assert found["stem"].acts == ["relu"] and found["c2"].acts == ["silu"]
    assert isinstance(f.act, nn.Identity) and isinstance(f.silu, nn.Identity)
    assert isinstance(f.shared, nn.ReLU) and type(f.c3) is nn.Conv2d
    by_name = {c.name: c for c in changes(f)}
    assert by_name["act"].transform == "fuse" and by_name["act"].into == "stem"
    assert by_name["stem"].runs == "conv_act"
    with torch.no_grad():
        assert rel(f(x), net(x)) < 1e-4
    # without the conv_act pattern nothing outside a block is fused
    assert not fused_modules(fuse(net, x, quiet=True, patterns=["basic", "bottleneck"]))
