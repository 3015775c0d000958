"""Batch-norm folded into the convolution or linear layer before it (the one copy of the
arithmetic): ``bn(layer(x)) == x`` through the folded weight and bias, in eval mode."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["folded"]


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


@torch.no_grad()
def folded(weight: torch.Tensor, bias: torch.Tensor | None,
           bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a conv / linear with ``bn`` (a BatchNorm's running statistics and
    affine parameters) folded in: computed in float64 on the CPU, returned in float64 (the
    caller stores them in its own dtype and device). A missing bias is zero."""
    scale = 1.0 / torch.sqrt(_f64(bn.running_var) + bn.eps)
    if bn.weight is not None:
        scale = scale * _f64(bn.weight)
    shift = ((0.0 if bias is None else _f64(bias)) - _f64(bn.running_mean)) * scale
    if bn.bias is not None:
        shift = shift + _f64(bn.bias)
    return _f64(weight) * scale.view(-1, *([1] * (weight.dim() - 1))), shift
