"""Random convolutional networks for calibration: the operators a predictor must know,
in the contexts they run in, from no model a user (or the validation set) would use.

:func:`network` draws one from a seed: a stem, three to five stages of residual blocks of
one family (basic, bottleneck with groups, inverted residual with or without
squeeze-excitation, ConvNeXt-style depthwise 7x7 + LayerNorm + MLP, ConvFirst-style grouped
kxk + 1x1 expand + 1x1 project), random widths, depths,
kernel sizes, activations (in place or not) and expansion, squeeze-excitation gates
(sigmoid or hard sigmoid, 1x1 convs or linear layers), global pooling and a linear head; and
the image side its input should have.
"""

from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["network", "FAMILIES"]

FAMILIES = ("basic", "bottleneck", "inverted", "convnext", "convfirst")
_ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "gelu": nn.GELU,
         "hardswish": nn.Hardswish}
_IN_PLACE = ("relu", "relu6", "silu", "hardswish")


def _act(name: str) -> nn.Module:
    """The activation ``name``; a trailing '_' (e.g. 'relu_'): in place."""
    if name.endswith("_"):
        return _ACTS[name[:-1]](inplace=True)
    return _ACTS[name]()


def _cba(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
         act: str | None = "relu") -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(_act(act))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, body: nn.Module, shortcut: nn.Module | None, act: str | None) -> None:
        super().__init__()
        self.body, self.shortcut = body, shortcut
        self.act = None if act is None else _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x) + (x if self.shortcut is None else self.shortcut(x))
        return y if self.act is None else self.act(y)


class _SE(nn.Module):
    """Squeeze-excitation: the gate from 1x1 convs on the mean, or linear layers on the
    pooled vector; a sigmoid or a hard sigmoid."""

    def __init__(self, c: int, r: int, linear: bool, hard: bool) -> None:
        super().__init__()
        self.linear = linear
        if linear:
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.reduce, self.expand = nn.Linear(c, r), nn.Linear(r, c)
        else:
            self.reduce, self.expand = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)
        self.gate = nn.Hardsigmoid() if hard else nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear:
            s = self.gate(self.expand(F.relu(self.reduce(self.pool(x).flatten(1)))))
            return x * s[:, :, None, None]
        s = F.silu(self.reduce(x.mean((2, 3), keepdim=True)))
        return x * self.gate(self.expand(s))


class _ConvNeXt(nn.Module):
    def __init__(self, c: int, k: int, e: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, k, 1, k // 2, groups=c)
        self.norm = nn.LayerNorm(c)
        self.up, self.down = nn.Linear(c, e * c), nn.Linear(e * c, c)
        self.scale = nn.Parameter(torch.full((c,), 1e-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.down(F.gelu(self.up(self.norm(y)))) * self.scale
        return x + y.permute(0, 3, 1, 2)


class _ConvFirst(nn.Module):
    """Grouped kxk + BN, 1x1 expand + BN + act, 1x1 project + BN, + x."""

    def __init__(self, c: int, k: int, e: int, group_width: int, act: str) -> None:
        super().__init__()
        self.body = nn.Sequential(_cba(c, c, k, groups=c // group_width, act=None),
                                  _cba(c, e * c, 1, act=act), _cba(e * c, c, 1, act=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _block(family: str, cin: int, cout: int, stride: int, rng: random.Random,
           act: str, first: bool = False) -> nn.Module:
    k = rng.choice((3, 3, 5, 7) if family in ("inverted", "convnext") else (3, 3, 3, 5))
    if family == "convfirst":   # stages joined by BN + a strided conv, as ConvNeXt's
        if stride != 1 or cin != cout:
            return nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, stride, stride))
        gw = rng.choice([g for g in (4, 8, 16) if cout % g == 0] or [cout])
        return _ConvFirst(cout, k, rng.choice((2, 4)), gw, act)
    proj = None
    if stride != 1 or cin != cout:
        proj = _cba(cin, cout, 1, stride, act=None)
    if family == "basic":
        body = nn.Sequential(_cba(cin, cout, k, stride, act=act), _cba(cout, cout, k, act=None))
        return _Residual(body, proj, act)
    if family == "bottleneck":
        mid = max(8, cout // rng.choice((2, 4)))
        groups = rng.choice((1, 1, 2, 4, 8, 16, 32))
        mid = max(groups, mid // groups * groups)
        body = nn.Sequential(_cba(cin, mid, 1, act=act),
                             _cba(mid, mid, k, stride, groups, act=act),
                             _cba(mid, cout, 1, act=None))
        return _Residual(body, proj, act)
    if family == "inverted":
        # the block after a stride-2 stem (first): MobileNetV2's (no expansion, fewer
        # channels out, so no residual), which fuse runs with the stem as one kernel
        e = 1 if first else rng.choice((1, 3, 4, 6))
        mid = cin * e
        layers = ([_cba(cin, mid, 1, act=act)] if e > 1 else []) + [
            _cba(mid, mid, k, stride, mid, act=act)]
        if rng.random() < 0.5:
            layers.append(_SE(mid, max(4, cin // 4), rng.random() < 0.3,
                              rng.random() < 0.4))
        layers.append(_cba(mid, cout, 1, act=None))
        body = nn.Sequential(*layers)
        if stride == 1 and cin == cout:
            return _Residual(body, None, None)
        return body
    # convnext: the width changes between stages through a strided conv
    if stride != 1 or cin != cout:
        return nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, stride, stride))
    return _ConvNeXt(cout, k, rng.choice((2, 4)))


def network(seed: int, side: int | None = None) -> tuple[nn.Module, int]:
    """(a random network in eval mode, its input's image side) for ``seed``; ``side``
    fixes the image side (>= 16) instead of drawing it."""
    rng = random.Random(seed)
    family = FAMILIES[seed % len(FAMILIES)]
    act = rng.choice(("gelu",) if family == "convnext" else tuple(_ACTS))
    if act in _IN_PLACE and rng.random() < 0.5:
        act += "_"
    drawn = rng.choice((32, 48, 64, 96, 112, 128, 160, 192, 224, 256))
    side = drawn if side is None else side
    stages = rng.randint(3, 5 if side >= 96 else 4)
    width = rng.choice((8, 12, 16, 24, 32, 48, 64, 96))
    stem_stride = rng.choice((1, 2) if side <= 64 else (2, 4))
    # every stage's map at least 2 x 2
    while stages > 1 and side // stem_stride // 2 ** (stages - 1) < 2:
        stages -= 1
    stem_k = rng.choice((3, 5, 7))
    layers: list[nn.Module] = [_cba(3, width, stem_k, 2 if stem_stride > 1 else 1, act=act)]
    if stem_stride == 4:
        layers.append(nn.MaxPool2d(3, 2, 1) if rng.random() < 0.5 else
                      _cba(width, width, 3, 2, width, act=act))
    c = width
    if family == "inverted" and stem_stride == 2:
        cout = max(8, c // 2 // 4 * 4)
        layers.append(_block(family, c, cout, 1, rng, act, first=True))
        c = cout
    for s in range(stages):
        cout = int(c * rng.choice((1.5, 2, 2, 2.5))) if s else c
        cout = max(8, cout // 8 * 8 if family == "convfirst" else cout // 4 * 4)
        for d in range(rng.randint(1, 3)):
            stride = 2 if (d == 0 and s > 0) else 1
            layers.append(_block(family, c, cout, stride, rng, act))
            c = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, rng.choice((10, 100, 1000)))]
    return nn.Sequential(*layers).eval(), side
