"""The activations convgap fuses, by one name each: the torch function that defines it and
the oneDNN post-op that computes it inside a convolution or linear call.

A name is what a block's trace is normalised to (``nn.ReLU6``, ``F.relu6`` and
``F.hardtanh(x, 0, 6)`` are all 'relu6'); the post-op is ``(attr, scalars, algorithm)`` for
``torch.ops.mkldnn._convolution_pointwise`` / ``_linear_pointwise`` (measured to agree with
the torch function within 6e-8 relative here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["Activation", "ACTIVATIONS", "apply", "post_op"]


@dataclass(frozen=True)
class Activation:
    """One activation: ``fn`` (tensor -> tensor, the definition) and ``onednn``
    (attr, scalars, algorithm), the fused post-op."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    onednn: tuple[str, list, str]


ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (
    Activation("relu", F.relu, ("relu", [], "")),
    Activation("relu6", F.relu6, ("hardtanh", [0.0, 6.0], "")),
    Activation("silu", F.silu, ("swish", [], "")),
    Activation("gelu", F.gelu, ("gelu", [], "none")),
    Activation("gelu_tanh", lambda t: F.gelu(t, approximate="tanh"), ("gelu", [], "tanh")),
    Activation("sigmoid", torch.sigmoid, ("sigmoid", [], "")),
    Activation("hardswish", F.hardswish, ("hardswish", [], "")),
    Activation("tanh", torch.tanh, ("tanh", [], "")),
)}

_NONE = ("none", [], "")


def apply(name: str | None, x: torch.Tensor) -> torch.Tensor:
    """``x`` through the activation ``name`` (None: unchanged)."""
    return x if name is None else ACTIVATIONS[name].fn(x)


def post_op(name: str | None) -> tuple[str, list, str]:
    """oneDNN's (attr, scalars, algorithm) for activation ``name`` (None: 'none')."""
    return _NONE if name is None else ACTIVATIONS[name].onednn
