"""The model registry: a name -> factory table filled by the ``@register`` decorator."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from convgap.errors import ConvgapError

Factory = Callable[..., nn.Module]

_FACTORIES: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator that adds a model factory to the zoo under ``name``.

    The factory must accept ``num_classes`` as a keyword argument::

        @register("tiny")
        def tiny(num_classes: int = 1000) -> nn.Module: ...
    """
    if not isinstance(name, str) or not name:
        raise ConvgapError("register(name): name must be a non-empty string")

    def decorator(factory: Factory) -> Factory:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ConvgapError(
                f"a model named {name!r} is already registered; pick another name"
            )
        _FACTORIES[name] = factory
        return factory

    return decorator


def factories() -> dict[str, Factory]:
    """The live registry table (name -> factory)."""
    return _FACTORIES
