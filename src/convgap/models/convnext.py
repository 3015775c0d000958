"""ConvNeXt-Tiny (Liu et al., 2022) as defined by torchvision."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import LayerNorm2d, Permute, StochasticDepth
from ._registry import register


class CNBlock(nn.Module):
    """7x7 depthwise conv -> LayerNorm -> Linear x4 -> GELU -> Linear -> layer scale -> residual."""

    block_kind = "convnext"

    def __init__(self, dim: int, layer_scale: float = 1e-6, stochastic_depth_prob: float = 0.0) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=True),
            Permute((0, 2, 3, 1)),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute((0, 3, 1, 2)),
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), float(layer_scale)))
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)
        self.out_channels = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.stochastic_depth(self.layer_scale * self.block(x))


class ConvNeXt(nn.Module):
    """Patchify stem (4x4/4 conv + LayerNorm2d), four stages joined by LN + 2x2/2 conv, LN head."""

    def __init__(
        self,
        widths: tuple[int, ...] = (96, 192, 384, 768),
        depths: tuple[int, ...] = (3, 3, 9, 3),
        num_classes: int = 1000,
        stochastic_depth_prob: float = 0.1,
        layer_scale: float = 1e-6,
    ) -> None:
        super().__init__()
        features: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, widths[0], 4, stride=4), LayerNorm2d(widths[0], eps=1e-6))
        ]
        total = sum(depths)
        block_id = 0
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for _ in range(depth):
                sd = stochastic_depth_prob * block_id / max(total - 1, 1)
                blocks.append(CNBlock(width, layer_scale, sd))
                block_id += 1
            features.append(nn.Sequential(*blocks))
            if i + 1 < len(widths):
                features.append(
                    nn.Sequential(
                        LayerNorm2d(width, eps=1e-6),
                        nn.Conv2d(width, widths[i + 1], 2, stride=2),
                    )
                )
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            LayerNorm2d(widths[-1], eps=1e-6), nn.Flatten(1), nn.Linear(widths[-1], num_classes)
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                # torchvision uses trunc_normal_(std=0.02, a=-2, b=2): the cut at +-2 (100 std)
                # never binds, so a plain normal is the same distribution and much cheaper.
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


@register("convnext_tiny")
def convnext_tiny(num_classes: int = 1000, stochastic_depth_prob: float = 0.1) -> ConvNeXt:
    """ConvNeXt-T (widths 96-768, depths 3-3-9-3); 28,589,128 parameters at 1000 classes."""
    return ConvNeXt((96, 192, 384, 768), (3, 3, 9, 3), num_classes, stochastic_depth_prob)
