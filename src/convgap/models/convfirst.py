"""ConvFirst, reconstructed from the description in Lavin, "On the Efficiency of Convolutional
Neural Networks" (arXiv 2404.03617). No reference code was published with the paper; this is
convgap's reading of the text, not an official model.

ConvFirst keeps ConvNeXt-T's macro design (patchify stem, stage widths 96-192-384-768, depths
3-3-9-3, norm + 2x2/2 conv downsampling) but moves the spatial mixing to the front of each
block as a grouped 3x3 conv with group width 8 and uses batch norm throughout, so every block is
conv -> BN -> 1x1 expand -> BN -> SiLU -> 1x1 project -> BN -> residual: a shape that can be
executed as a single fused kernel (block fusion).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import init_conv_bn_linear
from ._registry import register

GROUP_WIDTH = 8


class ConvFirstBlock(nn.Module):
    """Grouped 3x3 conv (group width 8) -> BN -> 1x1 expand x4 -> BN -> SiLU -> 1x1 project -> BN, + x."""

    block_kind = "convfirst"

    def __init__(self, dim: int, expansion: int = 4, group_width: int = GROUP_WIDTH) -> None:
        super().__init__()
        if dim % group_width:
            raise ValueError(f"channels ({dim}) must be a multiple of the group width ({group_width})")
        hidden = expansion * dim
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim // group_width, bias=False)
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, hidden, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.act = nn.SiLU()
        self.conv3 = nn.Conv2d(hidden, dim, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(dim)
        self.out_channels = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return x + out


class ConvFirst(nn.Module):
    """Stem 4x4/4 conv + BN, four stages of ConvFirst blocks joined by BN + 2x2/2 conv, pooled head."""

    def __init__(
        self,
        widths: tuple[int, ...] = (96, 192, 384, 768),
        depths: tuple[int, ...] = (3, 3, 9, 3),
        num_classes: int = 1000,
        zero_init_last_bn: bool = False,
    ) -> None:
        super().__init__()
        features: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, widths[0], 4, stride=4, bias=False), nn.BatchNorm2d(widths[0]))
        ]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            features.append(nn.Sequential(*(ConvFirstBlock(width) for _ in range(depth))))
            if i + 1 < len(widths):
                features.append(
                    nn.Sequential(
                        nn.BatchNorm2d(width),
                        nn.Conv2d(width, widths[i + 1], 2, stride=2, bias=False),
                    )
                )
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.BatchNorm2d(widths[-1])
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_conv_bn_linear(self)
        if zero_init_last_bn:
            for m in self.modules():
                if isinstance(m, ConvFirstBlock):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.fc(self.flatten(self.norm(x)))


@register("convfirst")
def convfirst(num_classes: int = 1000, zero_init_last_bn: bool = False) -> ConvFirst:
    """ConvFirst (ConvNeXt-T macro design, grouped-conv-first BN blocks); 28,759,912 parameters
    at 1000 classes (convgap's reconstruction; the paper's own count may differ)."""
    return ConvFirst((96, 192, 384, 768), (3, 3, 9, 3), num_classes, zero_init_last_bn)
