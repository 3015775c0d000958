"""The one layer selector every transform takes (``layers=``).

A selector is None (the transform's own default), module names (one ``str`` or a sequence:
exact names from ``model.named_modules()``), a module type (or a tuple of types), or a
callable ``(name, module) -> bool``. Types and callables pick among the modules the
transform can rebuild; a name must exist and be such a module, else a
:class:`~convgap.errors.ConvgapError` says why (an unknown name lists the closest ones).
"""

from __future__ import annotations

import difflib
from typing import Callable, Sequence, Union

import torch.nn as nn

from ..errors import ConvgapError

__all__ = ["Layers", "select", "enclosing"]

Layers = Union[None, str, Sequence[str], type, tuple, Callable[[str, nn.Module], bool]]


def enclosing(name: str, names) -> str | None:
    """The longest of ``names`` (module names, '' the model) that is the module ``name``
    or one above it; None if none is."""
    while True:
        if name in names:
            return name
        if not name:
            return None
        name = name.rpartition(".")[0]


def select(model: nn.Module, layers: Layers, accepts: Callable[[nn.Module], bool],
           default: Callable[[str, nn.Module], bool], what: str) -> list[str]:
    """Names of the modules of ``model`` that ``layers`` selects, in module order (names in
    the order given). ``accepts``: which modules the transform can rebuild at all;
    ``default``: what None selects; ``what``: those modules in words ("Conv2d"), for errors."""
    modules = dict(model.named_modules())
    if layers is None:
        return [n for n, m in modules.items() if accepts(m) and default(n, m)]
    if isinstance(layers, type) or (isinstance(layers, tuple) and layers
                                    and all(isinstance(t, type) for t in layers)):
        return [n for n, m in modules.items() if isinstance(m, layers) and accepts(m)]
    if callable(layers):
        return [n for n, m in modules.items() if accepts(m) and layers(n, m)]
    names = [layers] if isinstance(layers, str) else list(layers)
    for n in names:
        if not isinstance(n, str):
            raise ConvgapError(f"layers: expected module names (str), a module type or a "
                               f"callable (name, module) -> bool; got {n!r}")
        if n not in modules:
            close = difflib.get_close_matches(n, [k for k, m in modules.items() if accepts(m)],
                                              n=5, cutoff=0.5)
            hint = (f"closest: {', '.join(close)}" if close else
                    "names are those of model.named_modules()")
            raise ConvgapError(f"layers: the model has no module {n!r}; {hint}")
        if not accepts(modules[n]):
            raise ConvgapError(f"layers: {n!r} is a {type(modules[n]).__name__}, not a {what}")
    return names
