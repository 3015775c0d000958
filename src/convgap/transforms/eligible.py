"""Which layers a transform may rebuild: only what is provably a plain convolution or linear
layer.

A rebuilt layer (an :class:`~convgap.algorithms.AlgoConv2d`, a factorized layer) computes
what ``nn.Conv2d.forward`` (or ``nn.Linear.forward``) computes from the module's parameters
and attributes, nothing more. A subclass that overrides ``forward`` (TensorFlow-style SAME
padding computed from the input size, weight standardization, an output scale, noise in
training), a module with forward hooks (``torch.nn.utils.weight_norm`` recomputes the weight
in a pre-hook) or with parametrizations computes something else, so every transform leaves
it as it is and reports why (:func:`blocker`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..count import detached_copy
from ..errors import ConvgapError
from ..layers.fused_blocks import FusedBlock

__all__ = ["blocker", "is_conv", "is_linear", "Found", "find_layers", "first_inputs"]

# Methods that together define what a layer computes; overriding any of them makes it a
# different layer.
_DEFINING = {nn.Conv2d: ("forward", "_conv_forward"), nn.Linear: ("forward",),
             nn.Conv1d: ("forward", "_conv_forward"), nn.Conv3d: ("forward", "_conv_forward")}


def _own_rebuilds(module: nn.Module) -> bool:
    """convgap's own rebuilt layers (AlgoConv2d, AlgoLinear) compute what their base does."""
    from ..algorithms.linear import AlgoLinear
    from ..algorithms.module import AlgoConv2d
    return isinstance(module, (AlgoConv2d, AlgoLinear))


def blocker(module: nn.Module) -> str | None:
    """Why ``module`` (an ``nn.Conv2d`` or ``nn.Linear``, or a subclass; ``nn.Conv1d`` /
    ``nn.Conv3d`` for :func:`~convgap.transforms.fold.fold_batchnorm`) must not be rebuilt,
    or None when it is provably the base layer's computation."""
    base = next((b for b in _DEFINING if isinstance(module, b)), None)
    if base is None:
        return f"{type(module).__name__} is neither a convolution nor a Linear"
    if _own_rebuilds(module):
        return None
    cls = type(module)
    for method in _DEFINING[base]:
        if getattr(cls, method) is not getattr(base, method):
            return (f"{cls.__name__} overrides {base.__name__}.{method}(): a subclass with "
                    f"its own computation is left as it is")
    if parametrize.is_parametrized(module):
        return (f"{cls.__name__} has parametrizations "
                f"({', '.join(module.parametrizations.keys())}): left as it is")
    if module._forward_pre_hooks or module._forward_hooks:
        return (f"{cls.__name__} has forward hooks (e.g. weight_norm): its computation is "
                "not the plain layer's; left as it is")
    return None


def is_conv(module: nn.Module) -> bool:
    """An ``nn.Conv2d`` (or a subclass) that may be rebuilt."""
    return isinstance(module, nn.Conv2d) and blocker(module) is None


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or a subclass) that may be rebuilt."""
    return isinstance(module, nn.Linear) and blocker(module) is None


@dataclass
class Found:
    """What one forward pass of the original model showed: the rebuildable convs (and
    linears) in forward order, the layers left alone with the reason, and, with an example
    input, each layer's first input (a copy) and the model's output."""

    order: list[str]
    skipped: dict[str, str]
    inputs: dict[str, tuple]
    output: Any = None


def find_layers(model: nn.Module, example_input, linear: bool = False) -> Found:
    """Names of the rebuildable Conv2d layers (and, with ``linear``, Linear layers; not
    those inside a fused block, which runs them itself) in forward order (module order without an input), the Conv2d / Linear layers that must be
    left as they are (:func:`blocker`), and the input of each
    one's first call and the model's output when ``example_input`` is given."""
    names, skipped = {}, {}
    # a fused block's convolutions hold its parameters; the block runs them itself
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, FusedBlock))
    for n, m in model.named_modules():
        if inside and n.startswith(inside):
            continue
        if isinstance(m, nn.Conv2d) or (linear and isinstance(m, nn.Linear)):
            reason = blocker(m)
            if reason is None:
                names.setdefault(m, n)
            else:
                skipped.setdefault(n, reason)
    if example_input is None:
        return Found(list(names.values()), skipped, {})
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            inputs, output = first_inputs(names, lambda: model(example_input))
    except Exception as exc:
        raise ConvgapError(f"the model failed on example_input of shape "
                           f"{tuple(example_input.shape)}: {exc}") from exc
    finally:
        model.train(was_training)
    unused = [n for n in names.values() if n not in inputs]
    return Found([*inputs, *unused], skipped, inputs, detached_copy(output))


def first_inputs(modules: Mapping[nn.Module, str],
                 run: Callable[[], Any]) -> tuple[dict[str, tuple], Any]:
    """Call ``run()`` and keep a detached copy of the arguments of each of ``modules``'
    first call (keyed by its name, in call order: later in-place ops must not change them);
    returns them and ``run()``'s result. A module not called has no entry."""
    inputs: dict[str, tuple] = {}

    def hook(m, args):
        n = modules[m]
        if n not in inputs:
            inputs[n] = detached_copy(args)
    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        return inputs, run()
    finally:
        for h in handles:
            h.remove()
