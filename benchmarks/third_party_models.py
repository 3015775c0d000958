"""Small stand-ins for the CNN families users bring from timm / torchvision.

Each factory ``name(num_classes=10) -> nn.Module`` builds a narrow model (1-2 blocks per
stage) that runs a 1x3x64x64 forward in a few milliseconds, but keeps its family's
distinctive structure: the shortcut styles, grouped / depthwise / mixed kernels, concats,
squeeze-excitation, channels-last LayerNorm, Conv2d subclasses with their own forward, ...
They are written here from the papers' descriptions (no downloads, no copied code) so that
convgap can be checked on models it was not written against.

Deliberately, no block class carries a ``block_kind`` attribute and none is named like the
well-known torchvision/timm block classes: convgap must find blocks by structure. The
residual additions are written in the styles found in the wild (``out = out + identity``,
``out += shortcut`` then an in-place ReLU, ``x + self.drop_path(self.ls * y)``,
``torch.add``, an in-place add into a channel slice, shortcuts that are ``nn.Identity()``
or ``Sequential(AvgPool2d, Conv2d 1x1, BatchNorm2d)``).

Every factory ends with :func:`_trained_like`: conv / linear weights re-drawn with
variance-preserving gains and normalization layers given non-trivial statistics and affine
parameters, so that activations keep a sane scale through depth and batch-norm folding or
algorithm swaps are checked on numbers that look like a trained model's. Everything is
drawn from torch's global generator: ``torch.manual_seed(s)`` before a factory call gives
the same model every time, and every model is deterministic in eval mode.

``MODELS`` maps each name to its factory.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MODELS", "Conv2dSame", "ScaledStdConv2d", "ScaledConv2d", "NoisyConv2d",
           "CosineLinear"]


# -- shared pieces -------------------------------------------------------------------------
def _div(v: float, d: int = 8) -> int:
    """Round ``v`` to a multiple of ``d`` (not below 90% of it), as MobileNets do."""
    n = max(d, int(v + d / 2) // d * d)
    return n + d if n < 0.9 * v else n


def conv_bn(cin: int, cout: int, k: int | tuple = 3, s: int = 1, g: int = 1,
            act: Callable[[], nn.Module] | None = nn.ReLU, p: int | tuple | None = None,
            eps: float = 1e-5) -> nn.Sequential:
    """Conv2d (no bias) -> BatchNorm2d -> optional activation, 'same'-ish padding k//2."""
    if p is None:
        p = tuple(x // 2 for x in k) if isinstance(k, tuple) else k // 2
    layers = [nn.Conv2d(cin, cout, k, s, p, groups=g, bias=False), nn.BatchNorm2d(cout, eps=eps)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Channel attention: global mean -> 1x1 reduce -> act -> 1x1 expand -> gate -> scale."""

    def __init__(self, c: int, rd: int, act=nn.ReLU, gate=nn.Sigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(c, rd, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(rd, c, 1)
        self.gate = gate()

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class SEPooled(nn.Module):
    """Squeeze-excitation written with an AdaptiveAvgPool2d module and Linear layers."""

    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(c, c // reduction), nn.ReLU(inplace=True),
                                nn.Linear(c // reduction, c), nn.Sigmoid())

    def forward(self, x):
        b, c = x.shape[:2]
        w = self.fc(self.pool(x).flatten(1)).view(b, c, 1, 1)
        return x * w


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class ClassifierHead(nn.Module):
    """Global average pool -> flatten -> (dropout) -> Linear."""

    def __init__(self, c: int, num_classes: int, drop: float = 0.0):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


@torch.no_grad()
def _trained_like(model: nn.Module) -> nn.Module:
    """Variance-preserving weights and non-trivial norm statistics (see the module doc)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                m.bias.normal_(0.0, 0.05)
        elif isinstance(m, nn.Linear):
            m.weight.normal_(0.0, math.sqrt(1.0 / m.in_features))
            if m.bias is not None:
                m.bias.normal_(0.0, 0.05)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            if m.affine:
                m.weight.uniform_(0.6, 1.2)
                m.bias.normal_(0.0, 0.1)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            m.weight.uniform_(0.6, 1.2)
            if m.bias is not None:
                m.bias.normal_(0.0, 0.1)
    return model


# -- resnet_d: deep stem, average-pool downsample shortcut ---------------------------------
class ResNetDUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            pool = (nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
                    if stride > 1 else nn.Identity())
            self.downsample = nn.Sequential(pool, nn.Conv2d(cin, cout, 1, bias=False),
                                            nn.BatchNorm2d(cout))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = x
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            shortcut = self.downsample(x)
        out += shortcut
        return self.act(out)


class ResNetD(nn.Module):
    def __init__(self, widths=(24, 48, 96, 160), depths=(1, 2, 1, 1), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 3, 2), conv_bn(16, 16), conv_bn(16, 24),
                                  nn.MaxPool2d(3, 2, 1))
        stages, cin = [], 24
        for i, (w, d) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(d):
                blocks.append(ResNetDUnit(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(cin, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def resnet_d(num_classes: int = 10) -> nn.Module:
    return _trained_like(ResNetD(num_classes=num_classes))


# -- resnext / seresnext: grouped 3x3 bottleneck (+ squeeze-excitation) --------------------
class ResNeXtUnit(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, cardinality: int = 8,
                 base_width: int = 8, se: bool = False):
        super().__init__()
        width = cardinality * base_width * planes // 32
        cout = planes * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.se = SEPooled(cout, 8) if se else None
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class ResNeXt(nn.Module):
    def __init__(self, planes=(8, 16, 32, 48), depths=(1, 2, 1, 1), se=False, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, layers = 24, []
        for i, (p, d) in enumerate(zip(planes, depths)):
            blocks = []
            for j in range(d):
                blocks.append(ResNeXtUnit(cin, p, 2 if (j == 0 and i > 0) else 1, se=se))
                cin = p * 4
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnext(num_classes: int = 10) -> nn.Module:
    return _trained_like(ResNeXt(num_classes=num_classes))


def seresnext(num_classes: int = 10) -> nn.Module:
    return _trained_like(ResNeXt(se=True, num_classes=num_classes))


# -- regnet (RegNetY): fixed group width, SE, Identity-or-projection shortcut ---------------
class RegNetYUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, group_width: int = 8):
        super().__init__()
        self.a = conv_bn(cin, cout, 1, act=lambda: nn.ReLU(inplace=True))
        self.b = conv_bn(cout, cout, 3, stride, g=cout // group_width,
                         act=lambda: nn.ReLU(inplace=True))
        self.se = SqueezeExcite(cout, max(4, cin // 4))
        self.c = conv_bn(cout, cout, 1, act=None)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.c(self.se(self.b(self.a(x))))
        return self.act(torch.add(self.shortcut(x), y))


class RegNetY(nn.Module):
    def __init__(self, widths=(24, 48, 96, 192), depths=(1, 2, 2, 1), num_classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        cin, stages = 16, []
        for w, d in zip(widths, depths):
            stages.append(nn.Sequential(*[RegNetYUnit(cin if j == 0 else w, w, 2 if j == 0 else 1)
                                          for j in range(d)]))
            cin = w
        self.s1, self.s2, self.s3, self.s4 = stages
        self.head = ClassifierHead(cin, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for s in (self.s1, self.s2, self.s3, self.s4):
            x = s(x)
        return self.head(x)


def regnet(num_classes: int = 10) -> nn.Module:
    return _trained_like(RegNetY(num_classes=num_classes))


# -- mobilenetv3: inverted residual, hard-sigmoid SE, hardswish ----------------------------
class MobileV3Unit(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, act, stride: int):
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        layers = []
        if exp != cin:
            layers.append(conv_bn(cin, exp, 1, act=act))
        layers.append(conv_bn(exp, exp, k, stride, g=exp, act=act))
        if se:
            layers.append(SqueezeExcite(exp, _div(exp / 4), act=nn.ReLU, gate=nn.Hardsigmoid))
        layers.append(conv_bn(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        y = self.block(x)
        if self.use_res:
            return x + y
        return y


class MobileNetV3(nn.Module):
    # (kernel, expansion, out, se, activation, stride), a narrow "small" configuration
    CFG = [(3, 16, 16, True, "RE", 2), (3, 48, 24, False, "RE", 2), (3, 64, 24, False, "RE", 1),
           (5, 72, 40, True, "HS", 2), (5, 120, 40, True, "HS", 1), (5, 144, 48, True, "HS", 1),
           (5, 192, 64, True, "HS", 2)]

    def __init__(self, num_classes=10):
        super().__init__()
        acts = {"RE": nn.ReLU, "HS": nn.Hardswish}
        layers = [conv_bn(3, 16, 3, 2, act=nn.Hardswish)]
        cin = 16
        for k, e, c, se, a, s in self.CFG:
            layers.append(MobileV3Unit(cin, k, e, c, se, acts[a], s))
            cin = c
        layers.append(conv_bn(cin, 256, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(256, 384), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(384, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenetv3(num_classes: int = 10) -> nn.Module:
    return _trained_like(MobileNetV3(num_classes))


# -- efficientnet: MBConv + SE + SiLU, drop path ------------------------------------------
class EffUnit(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int, drop: float):
        super().__init__()
        mid = cin * expand
        self.has_skip = stride == 1 and cin == cout
        self.conv_pw = conv_bn(cin, mid, 1, act=nn.SiLU) if expand != 1 else nn.Identity()
        self.conv_dw = conv_bn(mid, mid, k, stride, g=mid, act=nn.SiLU)
        self.se = SqueezeExcite(mid, max(1, cin // 4), act=nn.SiLU)
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.drop_path = DropPath(drop)

    def forward(self, x):
        shortcut = x
        x = self.se(self.conv_dw(self.conv_pw(x)))
        x = self.bn3(self.conv_pwl(x))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class EfficientNet(nn.Module):
    # (expand, kernel, stride, out, repeats)
    CFG = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 32, 2), (6, 3, 2, 48, 1),
           (6, 5, 1, 64, 1), (6, 5, 2, 96, 1)]

    def __init__(self, num_classes=10, drop_path=0.2):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 24, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.act1 = nn.SiLU(inplace=True)
        total = sum(r for *_, r in self.CFG)
        blocks, cin, i = [], 24, 0
        for e, k, s, c, r in self.CFG:
            stage = []
            for j in range(r):
                stage.append(EffUnit(cin, c, e, k, s if j == 0 else 1, drop_path * i / total))
                cin, i = c, i + 1
            blocks.append(nn.Sequential(*stage))
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = conv_bn(cin, 256, 1, act=nn.SiLU)
        self.head = ClassifierHead(256, num_classes, drop=0.2)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv_stem(x)))
        return self.head(self.conv_head(self.blocks(x)))


def efficientnet(num_classes: int = 10) -> nn.Module:
    return _trained_like(EfficientNet(num_classes))


# -- efficientnet_lite_same: every conv pads TensorFlow "SAME" from the input size ----------
class Conv2dSame(nn.Conv2d):
    """A Conv2d whose forward pads like TensorFlow's "SAME": output = ceil(input / stride),
    the extra row / column of an odd total padding at the bottom / right."""

    def __init__(self, cin, cout, kernel_size, stride=1, groups=1, bias=True, dilation=1):
        super().__init__(cin, cout, kernel_size, stride, 0, dilation, groups, bias)

    @staticmethod
    def _pad(size: int, k: int, s: int, d: int) -> int:
        return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)

    def forward(self, x):
        h, w = x.shape[-2:]
        ph = self._pad(h, self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = self._pad(w, self.kernel_size[1], self.stride[1], self.dilation[1])
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _same_bn(cin, cout, k=1, s=1, g=1, act=True):
    layers = [Conv2dSame(cin, cout, k, s, g, bias=False), nn.BatchNorm2d(cout, eps=1e-3)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class LiteUnit(nn.Module):
    def __init__(self, cin, cout, expand, k, stride):
        super().__init__()
        mid = cin * expand
        self.skip = stride == 1 and cin == cout
        self.expand = _same_bn(cin, mid) if expand != 1 else None
        self.dw = _same_bn(mid, mid, k, stride, g=mid)
        self.project = _same_bn(mid, cout, act=False)

    def forward(self, x):
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.dw(y))
        return y + x if self.skip else y


class EfficientNetLiteSame(nn.Module):
    CFG = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 1), (6, 3, 2, 64, 2),
           (6, 5, 2, 96, 1)]

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = _same_bn(3, 24, 3, 2)
        cin, blocks = 24, []
        for e, k, s, c, r in self.CFG:
            for j in range(r):
                blocks.append(LiteUnit(cin, c, e, k, s if j == 0 else 1))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head_conv = _same_bn(cin, 256)
        self.head = ClassifierHead(256, num_classes, drop=0.2)

    def forward(self, x):
        return self.head(self.head_conv(self.blocks(self.stem(x))))


def efficientnet_lite_same(num_classes: int = 10) -> nn.Module:
    return _trained_like(EfficientNetLiteSame(num_classes))


# -- mixnet: channels split across 3x3 / 5x5 / 7x7 depthwise kernels -----------------------
def _split(c: int, n: int) -> list[int]:
    parts = [c // n] * n
    parts[0] += c - sum(parts)
    return parts


class MixedDepthwise(nn.Module):
    def __init__(self, c: int, kernels=(3, 5, 7), stride: int = 1):
        super().__init__()
        self.splits = _split(c, len(kernels))
        self.convs = nn.ModuleList(nn.Conv2d(s, s, k, stride, k // 2, groups=s, bias=False)
                                   for s, k in zip(self.splits, kernels))

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return torch.cat([conv(p) for conv, p in zip(self.convs, parts)], 1)


class MixUnit(nn.Module):
    def __init__(self, cin, cout, expand, kernels, stride, se=True):
        super().__init__()
        mid = cin * expand
        self.skip = stride == 1 and cin == cout
        self.conv_pw = conv_bn(cin, mid, 1, act=nn.SiLU) if expand > 1 else nn.Identity()
        self.conv_dw = MixedDepthwise(mid, kernels, stride)
        self.bn2 = nn.BatchNorm2d(mid)
        self.act2 = nn.SiLU()
        self.se = SqueezeExcite(mid, max(2, cin // 2), act=nn.SiLU) if se else nn.Identity()
        self.conv_pwl = conv_bn(mid, cout, 1, act=None)

    def forward(self, x):
        y = self.act2(self.bn2(self.conv_dw(self.conv_pw(x))))
        y = self.conv_pwl(self.se(y))
        if self.skip:
            y = y + x
        return y


class MixNet(nn.Module):
    CFG = [(1, (3,), 1, 16), (3, (3, 5, 7), 2, 24), (3, (3, 5, 7), 1, 24), (6, (3, 5, 7), 2, 40),
           (6, (3, 5), 2, 64), (3, (3, 5, 7), 1, 64), (6, (3, 5, 7), 2, 96)]

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        cin, blocks = 16, []
        for e, ks, s, c in self.CFG:
            blocks.append(MixUnit(cin, c, e, ks, s, se=e > 1))
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = conv_bn(cin, 256, 1)
        self.head = ClassifierHead(256, num_classes)

    def forward(self, x):
        return self.head(self.conv_head(self.blocks(self.stem(x))))


def mixnet(num_classes: int = 10) -> nn.Module:
    return _trained_like(MixNet(num_classes))


# -- ghostnet: half the maps from a 1x1 conv, half from a cheap depthwise op ---------------
class GhostModule(nn.Module):
    def __init__(self, cin: int, cout: int, relu: bool = True):
        super().__init__()
        self.cout = cout
        init = math.ceil(cout / 2)
        self.primary = conv_bn(cin, init, 1, act=(lambda: nn.ReLU(inplace=True)) if relu else None)
        self.cheap = conv_bn(init, init, 3, g=init,
                             act=(lambda: nn.ReLU(inplace=True)) if relu else None)

    def forward(self, x):
        x1 = self.primary(x)
        x2 = self.cheap(x1)
        return torch.cat([x1, x2], dim=1)[:, :self.cout]


class GhostUnit(nn.Module):
    def __init__(self, cin, mid, cout, k=3, stride=1, se=False):
        super().__init__()
        self.ghost1 = GhostModule(cin, mid, relu=True)
        self.conv_dw = (conv_bn(mid, mid, k, stride, g=mid, act=None) if stride > 1
                        else nn.Identity())
        self.se = SqueezeExcite(mid, _div(mid / 4, 4), gate=nn.Hardsigmoid) if se else None
        self.ghost2 = GhostModule(mid, cout, relu=False)
        if cin == cout and stride == 1:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(conv_bn(cin, cin, k, stride, g=cin, act=None),
                                          conv_bn(cin, cout, 1, act=None))

    def forward(self, x):
        residual = x
        x = self.conv_dw(self.ghost1(x))
        if self.se is not None:
            x = self.se(x)
        x = self.ghost2(x)
        return x + self.shortcut(residual)


class GhostNet(nn.Module):
    # (kernel, mid, out, se, stride)
    CFG = [(3, 16, 16, False, 1), (3, 48, 24, False, 2), (3, 72, 24, False, 1),
           (5, 72, 40, True, 2), (3, 120, 48, False, 2), (3, 144, 48, True, 1),
           (5, 192, 80, True, 2)]

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv_stem = conv_bn(3, 16, 3, 2)
        cin, blocks = 16, []
        for k, m, c, se, s in self.CFG:
            blocks.append(GhostUnit(cin, m, c, k, s, se))
            cin = c
        blocks.append(conv_bn(cin, 192, 1))
        self.blocks = nn.Sequential(*blocks)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(192, 320, 1)
        self.act2 = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(320, num_classes)

    def forward(self, x):
        x = self.global_pool(self.blocks(self.conv_stem(x)))
        return self.classifier(self.act2(self.conv_head(x)).flatten(1))


def ghostnet(num_classes: int = 10) -> nn.Module:
    return _trained_like(GhostNet(num_classes))


# -- repvgg: train-time 3x3 + 1x1 + BN-identity branches, summed ---------------------------
class RepVGGUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, 3, stride, act=None)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, act=None, p=0)
        self.nonlinearity = nn.ReLU()

    def forward(self, x):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.rbr_dense(x) + self.rbr_1x1(x) + id_out)


class RepVGG(nn.Module):
    def __init__(self, widths=(16, 32, 64, 128, 192), depths=(1, 2, 2, 2, 1), num_classes=10):
        super().__init__()
        cin, stages = 3, []
        for w, d in zip(widths, depths):
            stages.append(nn.Sequential(*[RepVGGUnit(cin if j == 0 else w, w, 2 if j == 0 else 1)
                                          for j in range(d)]))
            cin = w
        self.stage0, self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        for s in (self.stage0, self.stage1, self.stage2, self.stage3, self.stage4):
            x = s(x)
        return self.linear(self.gap(x).flatten(1))


def repvgg(num_classes: int = 10) -> nn.Module:
    return _trained_like(RepVGG(num_classes=num_classes))


# -- densenet: dense layers concatenating every earlier feature map ------------------------
class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size=4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseStage(nn.ModuleDict):
    def __init__(self, layers, cin, growth):
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth))

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseTransition(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2, 2))


class DenseNet(nn.Module):
    def __init__(self, growth=12, blocks=(3, 4, 3), init=24, num_classes=10):
        super().__init__()
        feats = [("conv0", nn.Conv2d(3, init, 3, 2, 1, bias=False)), ("norm0", nn.BatchNorm2d(init)),
                 ("relu0", nn.ReLU(inplace=True)), ("pool0", nn.MaxPool2d(3, 2, 1))]
        c = init
        for i, n in enumerate(blocks):
            feats.append((f"denseblock{i + 1}", DenseStage(n, c, growth)))
            c += n * growth
            if i < len(blocks) - 1:
                feats.append((f"transition{i + 1}", DenseTransition(c, c // 2)))
                c //= 2
        feats.append(("norm5", nn.BatchNorm2d(c)))
        self.features = nn.Sequential(OrderedDict(feats))
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.features(x), inplace=True)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def densenet(num_classes: int = 10) -> nn.Module:
    return _trained_like(DenseNet(num_classes=num_classes))


# -- dla: tree aggregation, roots concatenating children then a 1x1 conv -------------------
class DlaUnit(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += shortcut
        return self.relu(out)


class DlaRoot(nn.Module):
    def __init__(self, cin, cout, residual=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual

    def forward(self, *xs):
        x = self.bn(self.conv(torch.cat(xs, 1)))
        if self.residual:
            x = x + xs[0]
        return self.relu(x)


class DlaTree(nn.Module):
    def __init__(self, levels, cin, cout, stride=1, level_root=False, root_dim=0,
                 root_residual=False):
        super().__init__()
        if root_dim == 0:
            root_dim = 2 * cout
        if level_root:
            root_dim += cin
        self.levels, self.level_root = levels, level_root
        self.downsample = nn.MaxPool2d(stride, stride) if stride > 1 else nn.Identity()
        self.project = (nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
                        if cin != cout else nn.Identity())
        if levels == 1:
            self.tree1 = DlaUnit(cin, cout, stride)
            self.tree2 = DlaUnit(cout, cout, 1)
            self.root = DlaRoot(root_dim, cout, root_residual)
        else:
            self.tree1 = DlaTree(levels - 1, cin, cout, stride, root_residual=root_residual)
            self.tree2 = DlaTree(levels - 1, cout, cout, 1, root_dim=root_dim + cout,
                                 root_residual=root_residual)
            self.root = None

    def forward(self, x, shortcut=None, children=None):
        children = [] if children is None else children
        bottom = self.downsample(x)
        # as in the reference DLA, a tree of levels > 1 computes a projection its child
        # tree does not use (the child projects again): dead work, kept on purpose
        shortcut = self.project(bottom)
        if self.level_root:
            children.append(bottom)
        x1 = self.tree1(x, shortcut)
        if self.levels == 1:
            x2 = self.tree2(x1)
            return self.root(x2, x1, *children)
        children.append(x1)
        return self.tree2(x1, None, children)


class DLA(nn.Module):
    def __init__(self, ch=(16, 24, 32, 48, 64, 96), num_classes=10):
        super().__init__()
        self.base_layer = conv_bn(3, ch[0], 7)
        self.level0 = conv_bn(ch[0], ch[0], 3)
        self.level1 = conv_bn(ch[0], ch[1], 3, 2)
        self.level2 = DlaTree(1, ch[1], ch[2], 2)
        self.level3 = DlaTree(2, ch[2], ch[3], 2, level_root=True, root_residual=True)
        self.level4 = DlaTree(1, ch[3], ch[4], 2, level_root=True)
        self.level5 = DlaTree(1, ch[4], ch[5], 2, level_root=True)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(ch[5], num_classes, 1)

    def forward(self, x):
        x = self.level1(self.level0(self.base_layer(x)))
        x = self.level5(self.level4(self.level3(self.level2(x))))
        return self.fc(self.global_pool(x)).flatten(1)


def dla(num_classes: int = 10) -> nn.Module:
    return _trained_like(DLA(num_classes=num_classes))


# -- hrnet: two resolutions in parallel, fused by upsample / strided conv and add ----------
class HRBranchUnit(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = conv_bn(c, c, 3)
        self.conv2 = conv_bn(c, c, 3, act=None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv2(self.conv1(x)) + x)


class HRModule(nn.Module):
    def __init__(self, c0, c1):
        super().__init__()
        self.branches = nn.ModuleList([HRBranchUnit(c0), HRBranchUnit(c1)])
        # fuse_layers[i][j]: branch j's output brought to branch i's resolution and width
        self.fuse_layers = nn.ModuleList([
            nn.ModuleList([nn.Identity(),
                           nn.Sequential(nn.Conv2d(c1, c0, 1, bias=False), nn.BatchNorm2d(c0),
                                         nn.Upsample(scale_factor=2, mode="nearest"))]),
            nn.ModuleList([conv_bn(c0, c1, 3, 2, act=None), nn.Identity()]),
        ])
        self.fuse_act = nn.ReLU(inplace=False)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [b(x) for b, x in zip(self.branches, xs)]
        out = []
        for fuse in self.fuse_layers:
            y = fuse[0](xs[0])
            for j in range(1, len(xs)):
                y = y + fuse[j](xs[j])
            out.append(self.fuse_act(y))
        return out


class HRNet(nn.Module):
    def __init__(self, c0=16, c1=32, modules=2, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 32, 3, 2), conv_bn(32, 32, 3, 2))
        self.transition = nn.ModuleList([conv_bn(32, c0, 3), conv_bn(32, c1, 3, 2)])
        self.stage = nn.ModuleList(HRModule(c0, c1) for _ in range(modules))
        self.incre = nn.ModuleList([conv_bn(c0, 64, 1), conv_bn(c1, 64, 1)])
        self.down = conv_bn(64, 64, 3, 2)
        self.final = conv_bn(64, 128, 1)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.stem(x)
        xs = [t(x) for t in self.transition]
        for m in self.stage:
            xs = m(xs)
        y = self.incre[0](xs[0])
        y = self.down(y) + self.incre[1](xs[1])
        y = self.final(y)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def hrnet(num_classes: int = 10) -> nn.Module:
    return _trained_like(HRNet(num_classes=num_classes))


# -- res2net: hierarchical split 3x3 convs inside a bottleneck -----------------------------
class Res2Unit(nn.Module):
    def __init__(self, cin, planes, stride=1, scale=4, base_width=8):
        super().__init__()
        width = planes * base_width // 16
        cout = planes * 4
        self.scale, self.width = scale, width
        self.first = stride > 1 or cin != cout  # the 'stage' type: no hierarchy, pool last
        self.conv1 = nn.Conv2d(cin, width * scale, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, stride, 1, bias=False)
                                   for _ in range(scale - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale - 1))
        self.pool = nn.AvgPool2d(3, stride, 1) if self.first and stride > 1 else None
        self.conv3 = nn.Conv2d(width * scale, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                         nn.BatchNorm2d(cout))
                           if self.first else None)

    def forward(self, x):
        shortcut = x
        out = self.relu(self.bn1(self.conv1(x)))
        spx = torch.split(out, self.width, 1)
        outs = []
        sp = spx[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = spx[i] if (i == 0 or self.first) else sp + spx[i]
            sp = self.relu(bn(conv(sp)))
            outs.append(sp)
        last = spx[-1]
        outs.append(self.pool(last) if self.pool is not None else last)
        out = self.bn3(self.conv3(torch.cat(outs, 1)))
        if self.downsample is not None:
            shortcut = self.downsample(x)
        out += shortcut
        return self.relu(out)


class Res2Net(nn.Module):
    def __init__(self, planes=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 24, 7, 2), nn.MaxPool2d(3, 2, 1))
        cin, layers = 24, []
        for i, (p, d) in enumerate(zip(planes, depths)):
            for j in range(d):
                layers.append(Res2Unit(cin, p, 2 if (j == 0 and i > 0) else 1))
                cin = p * 4
        self.layers = nn.Sequential(*layers)
        self.head = ClassifierHead(cin, num_classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


def res2net(num_classes: int = 10) -> nn.Module:
    return _trained_like(Res2Net(num_classes=num_classes))


# -- convnext: 7x7 depthwise, channels-last LayerNorm, Linear MLP, layer scale -------------
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (permute to NHWC and back)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class NeXtUnit(nn.Module):
    def __init__(self, dim, drop_path=0.0, ls_init=0.5):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        # timm starts layer scale at 1e-6, which hides the branch from any numerical check;
        # a trained model's values are O(0.1-1)
        self.ls = nn.Parameter(torch.full((dim, 1, 1), ls_init))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        y = y.permute(0, 3, 1, 2)
        return x + self.drop_path(self.ls * y)


class ConvNeXt(nn.Module):
    def __init__(self, dims=(24, 48, 96, 160), depths=(1, 1, 2, 1), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        stages, total, i = [], sum(depths), 0
        for s, (d, n) in enumerate(zip(dims, depths)):
            layers = []
            if s > 0:
                layers += [LayerNorm2d(dims[s - 1], eps=1e-6), nn.Conv2d(dims[s - 1], d, 2, 2)]
            for _ in range(n):
                layers.append(NeXtUnit(d, 0.1 * i / total))
                i += 1
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.fc = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x)).mean((2, 3))
        return self.fc(self.norm(x))


def convnext(num_classes: int = 10) -> nn.Module:
    return _trained_like(ConvNeXt(num_classes=num_classes))


# -- rexnet: residual added to only the first C channels of a wider output -----------------
class ReXUnit(nn.Module):
    def __init__(self, cin, cout, stride, exp=6, se=True):
        super().__init__()
        self.in_channels = cin
        self.use_shortcut = stride == 1 and cin <= cout
        mid = cin * exp if exp > 1 else cin
        self.conv_exp = conv_bn(cin, mid, 1, act=nn.SiLU) if exp > 1 else None
        self.conv_dw = conv_bn(mid, mid, 3, stride, g=mid, act=None)
        self.se = SqueezeExcite(mid, _div(mid / 12), act=nn.ReLU) if se else None
        self.act_dw = nn.ReLU6()
        self.conv_pwl = conv_bn(mid, cout, 1, act=None)

    def forward(self, x):
        shortcut = x
        if self.conv_exp is not None:
            x = self.conv_exp(x)
        x = self.conv_dw(x)
        if self.se is not None:
            x = self.se(x)
        x = self.conv_pwl(self.act_dw(x))
        if self.use_shortcut:
            x[:, 0:self.in_channels] += shortcut
        return x


class ReXNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        chs = [16, 22, 28, 34, 40, 48, 56, 64, 72]
        strides = [1, 2, 1, 2, 1, 2, 1, 2]
        self.stem = conv_bn(3, 16, 3, 2, act=nn.SiLU)
        blocks = []
        for i, s in enumerate(strides):
            blocks.append(ReXUnit(chs[i], chs[i + 1], s, exp=1 if i == 0 else 6, se=i >= 2))
        self.features = nn.Sequential(*blocks, conv_bn(chs[-1], 192, 1, act=nn.SiLU))
        self.head = ClassifierHead(192, num_classes, drop=0.2)

    def forward(self, x):
        return self.head(self.features(self.stem(x)))


def rexnet(num_classes: int = 10) -> nn.Module:
    return _trained_like(ReXNet(num_classes))


# -- lcnet: depthwise-separable stacks, no residual, hardswish, SE late --------------------
class LCUnit(nn.Module):
    def __init__(self, cin, cout, k, stride, se):
        super().__init__()
        self.conv_dw = conv_bn(cin, cin, k, stride, g=cin, act=nn.Hardswish)
        self.se = (SqueezeExcite(cin, cin // 4, act=nn.ReLU, gate=nn.Hardsigmoid)
                   if se else nn.Identity())
        self.conv_pw = conv_bn(cin, cout, 1, act=nn.Hardswish)

    def forward(self, x):
        return self.conv_pw(self.se(self.conv_dw(x)))


class LCNet(nn.Module):
    CFG = [(3, 16, 1, False), (3, 32, 2, False), (3, 32, 1, False), (3, 64, 2, False),
           (3, 64, 1, False), (5, 128, 2, False), (5, 128, 1, False), (5, 256, 2, True),
           (5, 256, 1, True)]

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2, act=nn.Hardswish)
        cin, blocks = 16, []
        for k, c, s, se in self.CFG:
            blocks.append(LCUnit(cin, c, k, s, se))
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(cin, 512, 1)
        self.act = nn.Hardswish()
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.global_pool(self.blocks(self.stem(x)))
        x = self.drop(self.act(self.conv_head(x)))
        return self.fc(torch.flatten(x, 1))


def lcnet(num_classes: int = 10) -> nn.Module:
    return _trained_like(LCNet(num_classes))


# -- fbnet: inverted residuals with searched expansion / kernel, some grouped 1x1 ----------
class FBUnit(nn.Module):
    def __init__(self, cin, cout, exp, k, stride, groups=1):
        super().__init__()
        mid = cin * exp
        self.res = stride == 1 and cin == cout
        self.pw = conv_bn(cin, mid, 1, g=groups, act=lambda: nn.ReLU(inplace=True))
        self.groups = groups
        self.dw = conv_bn(mid, mid, k, stride, g=mid, act=lambda: nn.ReLU(inplace=True))
        self.pwl = conv_bn(mid, cout, 1, g=groups, act=None)

    def forward(self, x):
        y = self.pw(x)
        if self.groups > 1:  # channel shuffle between grouped 1x1 convs
            b, c, h, w = y.shape
            y = y.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)
        y = self.pwl(self.dw(y))
        if self.res:
            y = y + x
        return y


class FBNet(nn.Module):
    # (expansion, kernel, out, stride, groups)
    CFG = [(1, 3, 16, 1, 1), (6, 3, 24, 2, 1), (1, 5, 24, 1, 1), (3, 3, 24, 1, 2),
           (6, 5, 32, 2, 1), (3, 5, 32, 1, 1), (6, 3, 64, 2, 1), (1, 5, 64, 1, 2),
           (6, 5, 96, 2, 1), (3, 3, 96, 1, 1)]

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        cin, blocks = 16, []
        for e, k, c, s, g in self.CFG:
            blocks.append(FBUnit(cin, c, e, k, s, g))
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.last = conv_bn(cin, 256, 1)
        self.head = ClassifierHead(256, num_classes, drop=0.2)

    def forward(self, x):
        return self.head(self.last(self.blocks(self.stem(x))))


def fbnet(num_classes: int = 10) -> nn.Module:
    return _trained_like(FBNet(num_classes))


# -- cspresnet: cross-stage partial stages ------------------------------------------------
def _leaky():
    return nn.LeakyReLU(0.1, inplace=True)


class CspResUnit(nn.Module):
    def __init__(self, c, mid):
        super().__init__()
        self.conv1 = conv_bn(c, mid, 1, act=_leaky)
        self.conv2 = conv_bn(mid, mid, 3, act=_leaky)
        self.conv3 = conv_bn(mid, c, 1, act=None)
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, x):
        shortcut = x
        x = self.conv3(self.conv2(self.conv1(x)))
        return self.act(x + shortcut)


class CspStage(nn.Module):
    def __init__(self, cin, cout, depth, stride):
        super().__init__()
        self.conv_down = conv_bn(cin, cout, 3, stride, act=_leaky) if stride > 1 else nn.Identity()
        c = cout if stride > 1 else cin
        self.conv_exp = conv_bn(c, 2 * cout, 1, act=_leaky)
        self.half = cout
        self.blocks = nn.Sequential(*[CspResUnit(cout, cout // 2) for _ in range(depth)])
        self.conv_transition_b = conv_bn(cout, cout, 1, act=_leaky)
        self.conv_transition = conv_bn(2 * cout, cout, 1, act=_leaky)

    def forward(self, x):
        x = self.conv_exp(self.conv_down(x))
        xs, xb = x.split(self.half, dim=1)
        xb = self.conv_transition_b(self.blocks(xb))
        return self.conv_transition(torch.cat([xs, xb], dim=1))


class CspResNet(nn.Module):
    def __init__(self, widths=(32, 64, 96, 128), depths=(1, 2, 1, 1), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 32, 7, 2, act=_leaky), nn.MaxPool2d(3, 2, 1))
        cin, stages = 32, []
        for i, (w, d) in enumerate(zip(widths, depths)):
            stages.append(CspStage(cin, w, d, 1 if i == 0 else 2))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(cin, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def cspresnet(num_classes: int = 10) -> nn.Module:
    return _trained_like(CspResNet(num_classes=num_classes))


# -- vgg_bn: plain conv-BN-ReLU stacks and max pools --------------------------------------
class VGG(nn.Module):
    CFG = [16, "M", 32, "M", 64, 64, "M", 96, 96, "M", 128, 128, "M"]

    def __init__(self, num_classes=10):
        super().__init__()
        layers, c = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Linear(c * 4, 256), nn.ReLU(True), nn.Dropout(), nn.Linear(256, 256),
            nn.ReLU(True), nn.Dropout(), nn.Linear(256, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg_bn(num_classes: int = 10) -> nn.Module:
    return _trained_like(VGG(num_classes))


# -- inception_v3: parallel branches, 5x5 as two 3x3, factorized 1x7 / 7x1 -----------------
class IncConv(nn.Module):
    def __init__(self, cin, cout, k, s=1, p=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, p, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class IncA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = IncConv(cin, 16, 1)
        self.branch3x3_1 = IncConv(cin, 12, 1)
        self.branch3x3_2 = IncConv(12, 16, 3, p=1)
        self.branch5x5_1 = IncConv(cin, 16, 1)          # a 5x5 receptive field as two 3x3
        self.branch5x5_2 = IncConv(16, 24, 3, p=1)
        self.branch5x5_3 = IncConv(24, 24, 3, p=1)
        self.branch_pool = IncConv(cin, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b5 = self.branch5x5_3(self.branch5x5_2(self.branch5x5_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, 3, 1, 1))
        return torch.cat([b1, b3, b5, bp], 1)


class IncReduction(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = IncConv(cin, 48, 3, s=2)
        self.branch3x3dbl_1 = IncConv(cin, 16, 1)
        self.branch3x3dbl_2 = IncConv(16, 24, 3, p=1)
        self.branch3x3dbl_3 = IncConv(24, 24, 3, s=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, 3, 2)
        return torch.cat([b3, bd, bp], 1)


class IncC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = IncConv(cin, 32, 1)
        self.branch7x7_1 = IncConv(cin, c7, 1)
        self.branch7x7_2 = IncConv(c7, c7, (1, 7), p=(0, 3))
        self.branch7x7_3 = IncConv(c7, 32, (7, 1), p=(3, 0))
        self.branch7x7dbl = nn.Sequential(
            IncConv(cin, c7, 1), IncConv(c7, c7, (7, 1), p=(3, 0)),
            IncConv(c7, c7, (1, 7), p=(0, 3)), IncConv(c7, c7, (7, 1), p=(3, 0)),
            IncConv(c7, 32, (1, 7), p=(0, 3)))
        self.branch_pool = IncConv(cin, 32, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl(x)
        bp = self.branch_pool(F.avg_pool2d(x, 3, 1, 1))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionV3(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.Conv2d_1a_3x3 = IncConv(3, 16, 3, s=2, p=1)
        self.Conv2d_2a_3x3 = IncConv(16, 16, 3, p=1)
        self.Conv2d_2b_3x3 = IncConv(16, 32, 3, p=1)
        self.maxpool1 = nn.MaxPool2d(3, 2, 1)
        self.Conv2d_3b_1x1 = IncConv(32, 40, 1)
        self.Conv2d_4a_3x3 = IncConv(40, 64, 3, p=1)
        self.Mixed_5b = IncA(64, 16)     # 16 + 16 + 24 + 16 = 72
        self.Mixed_5c = IncA(72, 24)     # 80
        self.Mixed_6a = IncReduction(80)  # 48 + 24 + 80 = 152
        self.Mixed_6b = IncC(152, 24)    # 128
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(self.maxpool1(x)))
        x = self.Mixed_6b(self.Mixed_6a(self.Mixed_5c(self.Mixed_5b(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def inception_v3(num_classes: int = 10) -> nn.Module:
    return _trained_like(InceptionV3(num_classes))


# -- xception: separable convs, 1x1 stride-2 projection shortcuts -------------------------
class SeparableConv2d(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, k, stride, k // 2, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return self.pointwise(self.conv1(x))


class XceptionUnit(nn.Module):
    def __init__(self, cin, cout, reps, stride=1, start_with_relu=True, grow_first=True):
        super().__init__()
        if cout != cin or stride != 1:
            self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.skipbn = nn.BatchNorm2d(cout)
        else:
            self.skip = None
        rep, c = [], cin
        for i in range(reps):
            mid = cout if (grow_first or i == reps - 1) else cin
            # the first ReLU must not be in place: its input is the shortcut
            rep += [nn.ReLU(inplace=i > 0), SeparableConv2d(c, mid), nn.BatchNorm2d(mid)]
            c = mid
        if not start_with_relu:
            rep = rep[1:]
        if stride != 1:
            rep.append(nn.MaxPool2d(3, stride, 1))
        self.rep = nn.Sequential(*rep)

    def forward(self, inp):
        x = self.rep(inp)
        if self.skip is not None:
            skip = self.skipbn(self.skip(inp))
        else:
            skip = inp
        x += skip
        return x


class Xception(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(16, 32, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.act2 = nn.ReLU(inplace=True)
        self.block1 = XceptionUnit(32, 48, 2, 2, start_with_relu=False)
        self.block2 = XceptionUnit(48, 64, 2, 2)
        self.block3 = XceptionUnit(64, 96, 2, 2)
        self.block4 = XceptionUnit(96, 96, 3, 1)
        self.block5 = XceptionUnit(96, 128, 2, 2, grow_first=False)
        self.conv3 = SeparableConv2d(128, 192)
        self.bn3 = nn.BatchNorm2d(192)
        self.act3 = nn.ReLU(inplace=True)
        self.fc = nn.Linear(192, num_classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        for b in (self.block1, self.block2, self.block3, self.block4, self.block5):
            x = b(x)
        x = self.act3(self.bn3(self.conv3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def xception(num_classes: int = 10) -> nn.Module:
    return _trained_like(Xception(num_classes))


# -- nf_regnet: normalizer-free, scaled weight standardization, skip-init ------------------
class ScaledStdConv2d(nn.Conv2d):
    """Conv2d whose forward standardizes its weight per output channel (zero mean, variance
    1 / fan_in) and multiplies it by a learnable gain, as normalizer-free networks do."""

    def __init__(self, cin, cout, k, stride=1, padding=None, groups=1, bias=True,
                 gamma=1.0, eps=1e-6):
        if padding is None:
            padding = k // 2
        super().__init__(cin, cout, k, stride, padding, groups=groups, bias=bias)
        self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1))
        self.gamma, self.eps = gamma, eps

    def forward(self, x):
        w = self.weight
        fan_in = w[0].numel()
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        w = (w - mean) * torch.rsqrt(var * fan_in + self.eps) * (self.gain * self.gamma)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledAct(nn.Module):
    """An activation times the constant that restores unit variance for unit-Gaussian input."""

    GAMMAS = {"relu": 1.7139588594436646, "silu": 1.7881293296813965}

    def __init__(self, kind="silu"):
        super().__init__()
        self.act = nn.SiLU() if kind == "silu" else nn.ReLU()
        self.gamma = self.GAMMAS[kind]

    def forward(self, x):
        return self.act(x) * self.gamma


class NFRegUnit(nn.Module):
    def __init__(self, cin, cout, stride, beta, alpha=0.2, group_width=8):
        super().__init__()
        self.beta, self.alpha = beta, alpha
        self.act_in = ScaledAct()
        self.downsample = None
        if stride > 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
                if stride > 1 else nn.Identity(),
                ScaledStdConv2d(cin, cout, 1))
        mid = cout
        self.conv1 = ScaledStdConv2d(cin, mid, 1)
        self.act1 = ScaledAct()
        self.conv2 = ScaledStdConv2d(mid, mid, 3, stride, groups=mid // group_width)
        self.act2 = ScaledAct()
        self.attn = SqueezeExcite(mid, max(4, mid // 4))
        self.act3 = ScaledAct()
        self.conv3 = ScaledStdConv2d(mid, cout, 1)
        # skip-init: a learnable residual scale (timm starts at 0, which would hide the
        # branch from every check; a trained model's value is O(1))
        self.skipinit_gain = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        out = self.act_in(x) * self.beta
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.act1(self.conv1(out))
        out = self.act2(self.conv2(out))
        out = self.act3(2.0 * self.attn(out))  # SE with a gain of 2, as NF nets do
        out = self.conv3(out)
        return out * (self.alpha * self.skipinit_gain) + shortcut


class NFRegNet(nn.Module):
    def __init__(self, widths=(24, 48, 96, 160), depths=(1, 2, 2, 1), alpha=0.2, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(ScaledStdConv2d(3, 16, 3, 2), ScaledAct(),
                                  ScaledStdConv2d(16, 24, 3, 1))
        cin, blocks, var = 24, [], 1.0
        for w, d in zip(widths, depths):
            for j in range(d):
                if j == 0:
                    var = 1.0  # a transition block's projection resets the expected variance
                blocks.append(NFRegUnit(cin, w, 2 if j == 0 else 1, var ** -0.5, alpha))
                var += alpha ** 2
                cin = w
        self.stages = nn.Sequential(*blocks)
        self.final_conv = ScaledStdConv2d(cin, 256, 1)
        self.final_act = ScaledAct()
        self.head = ClassifierHead(256, num_classes, drop=0.2)

    def forward(self, x):
        x = self.final_act(self.final_conv(self.stages(self.stem(x))))
        return self.head(x)


def nf_regnet(num_classes: int = 10) -> nn.Module:
    model = _trained_like(NFRegNet(num_classes=num_classes))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ScaledStdConv2d):
                m.gain.uniform_(0.8, 1.2)
    return model


# -- scaled_conv: a Conv2d subclass scaling its output ------------------------------------
class ScaledConv2d(nn.Conv2d):
    """Conv2d whose output is multiplied by a scale: learnable (a Parameter) or a constant."""

    def __init__(self, *args, scale: float = 0.5, learnable: bool = True, **kw):
        super().__init__(*args, **kw)
        if learnable:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x):
        return super().forward(x) * self.scale


class ScaledConvNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(ScaledConv2d(3, 24, 3, 2, 1, bias=False, scale=0.7),
                                  nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        self.body = nn.ModuleList()
        for cin, cout in ((24, 32), (32, 48), (48, 64)):
            self.body.append(nn.ModuleDict({
                "conv_a": ScaledConv2d(cin, cout, 3, 2, 1, bias=False, scale=1.5, learnable=False),
                "bn_a": nn.BatchNorm2d(cout),
                "conv_b": ScaledConv2d(cout, cout, 3, 1, 1, bias=False, scale=0.8),
                "bn_b": nn.BatchNorm2d(cout),
                "proj": nn.Conv2d(cin, cout, 1, 2, bias=False),  # plain Conv2d shortcut
            }))
        self.head = ClassifierHead(64, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for b in self.body:
            y = F.relu(b["bn_a"](b["conv_a"](x)))
            y = b["bn_b"](b["conv_b"](y))
            x = F.relu(y + b["proj"](x))
        return self.head(x)


def scaled_conv(num_classes: int = 10) -> nn.Module:
    return _trained_like(ScaledConvNet(num_classes))


# -- noisy_conv: a Conv2d subclass adding noise in training only ---------------------------
class NoisyConv2d(nn.Conv2d):
    """Conv2d adding Gaussian noise (std ``sigma``) to its output while ``self.training``;
    in eval mode it is a plain, deterministic convolution."""

    def __init__(self, *args, sigma: float = 0.1, **kw):
        super().__init__(*args, **kw)
        self.sigma = sigma

    def forward(self, x):
        y = super().forward(x)
        if self.training:
            y = y + self.sigma * torch.randn_like(y)
        return y


class NoisyConvNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        layers, c = [], 3
        for cout, s in ((24, 2), (32, 1), (48, 2), (48, 1), (64, 2), (96, 2)):
            layers += [NoisyConv2d(c, cout, 3, s, 1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
            c = cout
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(c, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def noisy_conv(num_classes: int = 10) -> nn.Module:
    return _trained_like(NoisyConvNet(num_classes))


# -- linear_subclass: an nn.Linear subclass with its own forward (cosine classifier) -------
class CosineLinear(nn.Linear):
    """Cosine-similarity classifier: inputs and weight rows normalized to unit length, a
    learnable gain, divided by a temperature."""

    def __init__(self, cin, cout, temperature=0.1):
        super().__init__(cin, cout, bias=True)
        self.g = nn.Parameter(torch.ones(cout))
        self.temperature = temperature

    def forward(self, x):
        w = F.normalize(self.weight, dim=1) * self.g[:, None]
        return F.linear(F.normalize(x, dim=-1), w, self.bias) / self.temperature


class LinearSubclassNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 24, 3, 2), conv_bn(24, 48, 3, 2),
                                      conv_bn(48, 48, 3, g=48), conv_bn(48, 96, 1),
                                      conv_bn(96, 128, 3, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.neck = nn.Sequential(nn.Linear(128, 192), nn.GELU())  # a plain nn.Linear
        self.fc = CosineLinear(192, num_classes)

    def forward(self, x):
        return self.fc(self.neck(self.pool(self.features(x)).flatten(1)))


def linear_subclass(num_classes: int = 10) -> nn.Module:
    return _trained_like(LinearSubclassNet(num_classes))


MODELS: dict[str, Callable[..., nn.Module]] = {
    f.__name__: f for f in (
        resnet_d, resnext, seresnext, regnet, mobilenetv3, efficientnet, efficientnet_lite_same,
        mixnet, ghostnet, repvgg, densenet, dla, hrnet, res2net, convnext, rexnet, lcnet, fbnet,
        cspresnet, vgg_bn, inception_v3, xception, nf_regnet, scaled_conv, noisy_conv,
        linear_subclass)
}
