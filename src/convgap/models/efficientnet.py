"""EfficientNet-B0 (Tan & Le, 2019) as defined by torchvision: MBConv blocks with squeeze-excitation."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._layers import ConvNormAct, StochasticDepth, make_divisible
from ._registry import register

# (expand ratio, kernel, first stride, in channels, out channels, repeats) for B0.
_B0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


class SqueezeExcitation(nn.Module):
    """Global pool -> 1x1 conv reduce (SiLU) -> 1x1 conv expand (sigmoid) -> channel rescale."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale


class MBConv(nn.Module):
    """1x1 expand (SiLU) -> kxk depthwise (SiLU) -> SE -> 1x1 project; stochastic-depth residual."""

    block_kind = "mbconv"

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        expand_ratio: int,
        kernel_size: int,
        stride: int,
        stochastic_depth_prob: float,
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and in_ch == out_ch
        expanded = make_divisible(in_ch * expand_ratio, 8)
        layers: list[nn.Module] = []
        if expanded != in_ch:
            layers.append(ConvNormAct(in_ch, expanded, 1, activation=nn.SiLU))
        layers += [
            ConvNormAct(
                expanded, expanded, kernel_size, stride=stride, groups=expanded, activation=nn.SiLU
            ),
            SqueezeExcitation(expanded, max(1, in_ch // 4)),
            ConvNormAct(expanded, out_ch, 1, activation=None),
        ]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)
        self.out_channels = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNet(nn.Module):
    """Stem 3x3/2 conv (SiLU), seven MBConv stages, 1x1 conv head, dropout + linear classifier."""

    def __init__(
        self,
        stages: tuple[tuple[int, int, int, int, int, int], ...] = _B0_STAGES,
        num_classes: int = 1000,
        dropout: float = 0.2,
        stochastic_depth_prob: float = 0.2,
        last_channels: int = 1280,
    ) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvNormAct(3, stages[0][3], 3, stride=2, activation=nn.SiLU)]
        total = sum(s[5] for s in stages)
        block_id = 0
        for expand, kernel, stride, in_ch, out_ch, repeats in stages:
            blocks = []
            for i in range(repeats):
                sd = stochastic_depth_prob * block_id / total
                blocks.append(
                    MBConv(in_ch if i == 0 else out_ch, out_ch, expand, kernel,
                           stride if i == 0 else 1, sd)
                )
                block_id += 1
            features.append(nn.Sequential(*blocks))
        features.append(ConvNormAct(stages[-1][4], last_channels, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


@register("efficientnet_b0")
def efficientnet_b0(
    num_classes: int = 1000, dropout: float = 0.2, stochastic_depth_prob: float = 0.2
) -> EfficientNet:
    """EfficientNet-B0 (16 MBConv blocks with SE, SiLU); 5,288,548 parameters at 1000 classes."""
    return EfficientNet(_B0_STAGES, num_classes, dropout, stochastic_depth_prob)
