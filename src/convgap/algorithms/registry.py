"""The algorithm registry: every way convgap can compute a 2-D convolution.

An algorithm is a subclass of :class:`Algorithm` registered under a name with
``@register("name")``. Its contract:

- ``supports(spec) -> str | None``: ``None`` if it can run ``spec``, else the reason it
  cannot (shown to the user when a requested algorithm falls back to ``torch``).
- ``prepare(weight, bias, spec) -> state``: work done once per weight (a Winograd-domain
  filter, a packed weight). Must be differentiable torch code if ``differentiable`` is True
  (it is then re-run inside forward while gradients are needed).
- ``run(x, state, spec) -> y``: the convolution of ``x`` (N, C, H, W, already padded if the
  spec's padding is (0, 0) and the module had other padding) with symmetric zero padding
  ``spec.padding``; returns (N, O, OH, OW) in ``x``'s dtype. ``x`` may be in any layout.

Class attributes: ``tolerance`` (max relative error vs ``F.conv2d`` accepted by auto-tuning,
relative to the output's max magnitude), ``differentiable`` (backward through run/prepare
works), ``exports`` ('native': traced/exported as its own ops, 'fallback': AlgoConv2d
uses F.conv2d under jit.trace / ONNX export).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import ConvgapError
from .spec import ConvSpec

__all__ = ["Algorithm", "register", "get", "names", "unregister"]

_REGISTRY: dict[str, "Algorithm"] = {}


class Algorithm:
    """Base class of convolution algorithms (see the module docstring for the contract)."""

    name: str = ""
    tolerance: float = 1e-4
    differentiable: bool = True
    exports: str = "native"

    def supports(self, spec: ConvSpec) -> str | None:
        return None

    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> Any:
        return (weight, bias)

    def run(self, x: torch.Tensor, state: Any, spec: ConvSpec) -> torch.Tensor:
        raise NotImplementedError(f"algorithm {self.name!r} does not implement run()")

    def __repr__(self) -> str:
        return f"<convgap algorithm {self.name!r}>"


def register(name: str, *, replace: bool = False) -> Callable[[type], type]:
    """Class decorator: register an :class:`Algorithm` subclass under ``name``.

    Registering a name twice is an error unless ``replace=True``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConvgapError(f"algorithm name must be an identifier, got {name!r}")

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
            raise ConvgapError(f"@register({name!r}) needs a subclass of "
                               "convgap.algorithms.Algorithm")
        if name in _REGISTRY and not replace:
            raise ConvgapError(f"algorithm {name!r} is already registered; pass "
                               "replace=True to override it")
        cls.name = name
        _REGISTRY[name] = cls()
        return cls

    return deco


def unregister(name: str) -> None:
    """Remove algorithm ``name`` (for tests and user plug-ins)."""
    _REGISTRY.pop(name, None)


def names() -> list[str]:
    """Registered algorithm names, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> Algorithm:
    """The algorithm registered as ``name``; a clear error listing the names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConvgapError(f"unknown algorithm {name!r}; available: {', '.join(names())} "
                           "(or 'auto')") from None
