"""Residual and dense blocks found by structure (no class attribute, no known class name),
hints kept, and the modules where no block was found named."""

import pytest
import torch
import torch.nn as nn

import convgap
from convgap import blocks as B
from convgap.count import count


def cbr(i, o, k=3, s=1, g=1, act=True):
    layers = [nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if act else nn.Sequential(*layers)


class TwoConvs(nn.Module):  # basic: out += identity, then an in-place ReLU
    def __init__(self, c):
        super().__init__()
        self.a, self.b = cbr(c, c), cbr(c, c, act=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.b(self.a(x))
        out += x
        return self.act(out)


class Neck(nn.Module):  # bottleneck with a projection shortcut, torch.add
    def __init__(self, i, o, s):
        super().__init__()
        self.c1, self.c2, self.c3 = cbr(i, o // 4, 1), cbr(o // 4, o // 4, 3, s), cbr(o // 4, o, 1, act=False)
        self.proj = nn.Sequential(nn.AvgPool2d(s), nn.Conv2d(i, o, 1, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        return torch.relu(torch.add(self.c3(self.c2(self.c1(x))), self.proj(x)))


class Expand(nn.Module):  # inverted residual: x + body(x)
    def __init__(self, c, t=4):
        super().__init__()
        self.body = nn.Sequential(cbr(c, c * t, 1), cbr(c * t, c * t, 3, g=c * t), cbr(c * t, c, 1, act=False))

    def forward(self, x):
        return x + self.body(x)


class Skip(nn.Module):
    def forward(self, x):
        return x


class Mixer(nn.Module):  # ConvNeXt-like: permutes, Linear, layer scale, drop path
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.act, self.fc2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 1e-2))
        self.drop_path = Skip()

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y)))) * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class Grow(nn.Module):  # dense layer: concatenates its input with new features
    def __init__(self, c, k):
        super().__init__()
        self.f = cbr(c, k)

    def forward(self, x):
        return torch.cat([x, self.f(x)], 1)


class DenseStack(nn.Module):  # dense block keeping a list of features
    def __init__(self, c, k, n):
        super().__init__()
        self.layers = nn.ModuleList(cbr(c + i * k, k) for i in range(n))

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats, 1)


class Branches(nn.Module):  # inception-like: parallel branches concatenated, no input in it
    def __init__(self, c):
        super().__init__()
        self.a, self.b = cbr(c, c, 1), cbr(c, c, 3)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


class Biased(nn.Module):  # adds a parameter, not its input: no residual
    def __init__(self, c):
        super().__init__()
        self.f = cbr(c, c)
        self.bias_map = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        return self.f(x) + self.bias_map


class SliceAdd(nn.Module):  # ReXNet: the shortcut added in place to the first channels
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(cbr(c, 4 * c, 1), cbr(4 * c, 4 * c, 3, g=4 * c), cbr(4 * c, c + 8, 1, act=False))

    def forward(self, x):
        y = self.body(x)
        y[:, :x.shape[1]] += x
        return y


class PassedShortcut(nn.Module):  # DLA: the caller projects the shortcut and passes it in
    def __init__(self, c):
        super().__init__()
        self.a, self.b = cbr(c, c), cbr(c, c, act=False)

    def forward(self, x, shortcut):
        return torch.relu(self.b(self.a(x)) + shortcut)


class Tree(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.proj = cbr(c, c, 1, act=False)
        self.unit = PassedShortcut(c)

    def forward(self, x):
        return self.unit(x, self.proj(x))


class TwoInputs(nn.Module):  # adds two unrelated inputs' branches: not a residual block
    def __init__(self, c):
        super().__init__()
        self.a, self.b = cbr(c, c), cbr(c, c)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


class SEBottleneck(Neck):  # squeeze-excitation (Linear on pooled vectors) stays a bottleneck
    def __init__(self, i, o, s):
        super().__init__(i, o, s)
        self.fc1, self.fc2 = nn.Linear(o, o // 4), nn.Linear(o // 4, o)

    def forward(self, x):
        y = self.c3(self.c2(self.c1(x)))
        w = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3))))))
        return torch.relu(y * w[:, :, None, None] + self.proj(x))


def test_more_residual_forms():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 8, 8)
    for block, kind in [(SliceAdd(8), "inverted_residual"), (Tree(8), None),
                        (SEBottleneck(8, 16, 1), "bottleneck")]:
        found = {b.name: b.kind for b in B.find_blocks(block.eval(), x).values()}
        assert found == ({"": kind} if kind else {"unit": "basic"}), type(block).__name__
    two = TwoInputs(8).eval()
    assert B.find_blocks(two, x, torch.randn(1, 8, 8, 8)) == {}


class Wrapper(nn.Module):  # holds a residual block: the addition is not its own
    def __init__(self, c):
        super().__init__()
        self.inner = TwoConvs(c)

    def forward(self, x):
        return self.inner(x)


class HintedStrided(nn.Module):  # a hinted block without a residual stays a block
    block_kind = "inverted_residual"

    def __init__(self, c):
        super().__init__()
        self.body = cbr(c, 2 * c, 3, 2)

    def forward(self, x):
        return self.body(x)


def user_net():
    torch.manual_seed(0)
    return nn.Sequential(
        cbr(3, 16, 3, 2),                                         # 0 stem
        TwoConvs(16), Neck(16, 32, 2), Expand(32), Mixer(32),     # 1-4
        Grow(32, 8), DenseStack(40, 8, 2), Branches(56), Biased(112),  # 5-8
        Wrapper(112), HintedStrided(112),                         # 9-10
        nn.Sequential(cbr(224, 32), cbr(32, 32)),                 # 11: plain, no block
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def test_user_blocks_found_by_structure():
    net = user_net()
    found = {b.name: b for b in B.find_blocks(net, torch.randn(1, 3, 32, 32)).values()}
    assert {n: (b.kind, b.found_by) for n, b in found.items()} == {
        "1": ("basic", "structure"), "2": ("bottleneck", "structure"),
        "3": ("inverted_residual", "structure"), "4": ("convnext", "structure"),
        "5": ("dense", "structure"), "6": ("dense", "structure"),
        "9.inner": ("basic", "structure"), "10": ("inverted_residual", "hint")}
    assert found["2"].shortcut == ["2.proj.0", "2.proj.1", "2.proj.2"]
    assert found["2"].body[:2] == ["2.c1.0", "2.c1.1"] and "2.proj.1" not in found["2"].body
    assert found["1"].shortcut == [] and found["1"].body[0] == "1.a.0"
    assert found["4"].body == ["4.dw", "4.norm", "4.fc1", "4.act", "4.fc2", "4.drop_path"]


def test_count_rows_for_user_blocks_and_unclassified_modules():
    net = user_net()
    c = count(net, (2, 3, 32, 32))
    rows = {b.name: b for b in c.blocks}
    assert set(rows) == {"1", "2", "3", "4", "5", "6", "9.inner", "10"}
    two = rows["1"]
    assert two.layers == ["1.a.0", "1.a.1", "1.a.2", "1.b.0", "1.b.1", "1.act"]
    assert two.macs == sum(r.macs for r in c.layers if r.name in two.layers) > 0
    assert all(r.block == "1" for r in c.layers if r.name.startswith("1."))
    assert all(r.block == "9.inner" for r in c.layers if r.name.startswith("9."))
    assert rows["2"].shortcut == ["2.proj.0", "2.proj.1", "2.proj.2"]
    # one-conv modules (the stem, Biased) are not worth naming
    assert c.unclassified == ["7 (Branches, 2 convolutions)", "11 (Sequential, 2 convolutions)"]


def test_a_model_without_blocks_names_where_it_found_none():
    vgg = nn.Sequential(nn.Sequential(cbr(3, 8), cbr(8, 8), nn.MaxPool2d(2), cbr(8, 16)),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    c = count(vgg, (1, 3, 16, 16))
    assert c.blocks == [] and c.unclassified == ["0 (Sequential, 3 convolutions)"]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0",
                                  "convnext_tiny", "convfirst"])
def test_zoo_blocks_found_without_hints(name, monkeypatch):
    net = convgap.models.create(name, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    hinted = {m for m in net.modules() if hasattr(type(m), "block_kind")}
    with_hints = B.find_blocks(net, x)
    assert set(with_hints) == hinted
    monkeypatch.setattr(B, "block_kind", lambda m: None)
    alone = B.find_blocks(net, x)
    residual = {m for m in hinted if getattr(m, "use_res_connect", True)
                and getattr(m, "use_residual", True)}
    assert set(alone) == residual and all(b.found_by == "structure" for b in alone.values())
